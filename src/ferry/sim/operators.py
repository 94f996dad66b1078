"""The operators: ``mirror``, ``break``, ``mirror_max_bps``, a second ``mirror``, and restarts.

While faults are being injected (:attr:`Operators.chaos`), an operator acts
now and then, at random: mirrors the image from the host that owns it to
the other one (starting ``ferry listen`` there first if nothing listens),
breaks the running migration, changes its rate limit, or asks for a second
mirror while one runs (which must be refused).  The answers -- refusals
included -- are logged; none may raise anything but the refusals the
control socket turns into replies.

All the time, a slower loop restarts what stopped, as an orchestrator
would: the owner's ferry as ``serve`` if it is not running with control (a
crash, a fence, the ``exit`` action); the other host's as ``listen`` if it
does not listen, so that the next mirror has somewhere to go.  It never
starts ``serve`` anywhere but on the owner: the lease keeps two processes
from serving at once, but only the operator can keep a stale copy from
being served (:mod:`ferry.sim.cluster` knows which copy is the newest).
A process with a migration that may have handed the image over
(``in_doubt``) is left alone: the lease settles it.

A host whose disk failed an fsync is rebooted before ferry starts there
again.  Linux marks the pages it could not write clean; the process that
saw the error refuses every later flush (:meth:`ferry.storage.Image.flush`),
but a new process cannot know -- its fsync succeeds without writing them --
so only a reboot (or rewriting the image) makes its flushes true again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.python.failure import Failure

from ferry.chartnames import RoleState
from ferry.migrate.manager import MirrorBusy
from ferry.migrate.options import FinishAction, MirrorError, MirrorOptions, StartOutcome
from ferry.sim.cluster import Cluster
from ferry.sim.node import FerryProcess, Host

__all__ = ["Operators"]

#: Role states after which a process is of no further use: restart it.
_SPENT: Final = frozenset({RoleState.HANDED_OFF, RoleState.FENCED, RoleState.STOPPED})
#: Seconds between looks at what needs restarting.
RECOVERY_INTERVAL: Final = 1.0


class Operators:
    """Random control commands while :attr:`chaos`; restarts always; see the module doc."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self.rng = cluster.world.stream("operators")
        self.chaos = True
        self.last_reply: str | None = None  # what the last mirror started answered

    def start(self) -> None:
        self.world.call_later(self.rng.uniform(0.5, 3.0), "operator", self._act)
        self.world.call_later(RECOVERY_INTERVAL, "operator", self._recover)

    # -- at random -------------------------------------------------------------------------

    def _act(self) -> None:
        if not self.chaos:
            return
        roll = self.rng.random()
        if roll < 0.5:
            self.mirror(self._random_options())
        elif roll < 0.65:
            self._on_owner("break", lambda p: p.mirrors.cancel())
        elif roll < 0.8:
            limit = self.rng.choice((None, 64 * 1024, 256 * 1024, 4 * 1024 * 1024))
            self._on_owner(f"mirror_max_bps {limit}", lambda p: p.mirrors.set_max_bps(limit))
        else:
            self.second_mirror()
        self.world.call_later(self.rng.expovariate(1 / 4.0), "operator", self._act)

    def _random_options(self) -> MirrorOptions:
        rng = self.rng
        return MirrorOptions(
            max_bps=rng.choice((None, None, 128 * 1024, 1024 * 1024)),
            max_downtime=rng.choice((0.05, 0.3, 1.0)),
            action=rng.choice((FinishAction.NOTHING, FinishAction.EXIT)),
            reply_timeout=rng.choice((5.0, 20.0, 60.0)),
            hello_timeout=5.0,
            connect_timeout=5.0,
            retry_initial=rng.choice((0.2, 1.0)),
            retry_max=5.0,
            max_in_flight=rng.choice((1, 4, 64)),
        )

    def _on_owner(self, what: str, command: Callable[[FerryProcess], object]) -> None:
        process = self.cluster.owner.running
        if process is None:
            return

        def perform() -> None:
            try:
                command(process)
            except MirrorError as refused:
                self.world.log("operator", f"{what} on {process.name}: refused: {refused}")
                return
            self.world.log("operator", f"{what} on {process.name}")

        process.control(perform)

    # -- mirroring ----------------------------------------------------------------------------

    def mirror(self, options: MirrorOptions) -> bool:
        """Mirror from the owner to the other host; False if nothing could be started now."""
        cluster = self.cluster
        source = cluster.owner.running
        target = cluster.other(cluster.owner)
        if source is None or source.export.state != RoleState.SERVING:
            return False
        listener = target.running
        if listener is None or listener.export.state != RoleState.LISTENING:
            self._make_listen(target)
            return False
        return self._send_mirror(source, target, options)

    def second_mirror(self) -> None:
        """``mirror`` while one runs: refused (``mirror already running``), the first untouched."""
        source = self.cluster.owner.running
        if source is None or not source.mirrors.running:
            return
        target = self.cluster.other(self.cluster.owner)
        options = self._random_options()

        def ask() -> None:
            if not source.mirrors.running:
                return  # it ended while the command waited for the process
            first = source.mirrors.current
            try:
                source.mirror(target, options)
            except MirrorBusy as refused:
                self.world.log("operator", f"second mirror {source.name}: refused: {refused}")
                if source.mirrors.current is not first:
                    self.world.violate("a second mirror is refused", "the first one was replaced")
                return
            self.world.violate(
                "a second mirror is refused", f"{source.name} started one beside {first!r}"
            )

        source.control(ask)

    def _send_mirror(self, source: FerryProcess, target: Host, options: MirrorOptions) -> bool:
        """Ask ``source`` to mirror to ``target`` (when it next runs: it may be paused)."""

        def answered(outcome: StartOutcome) -> None:
            self.last_reply = outcome.reply
            self.world.log("operator", f"mirror answered: {outcome.reply}")

        def failed(failure: Failure) -> None:
            self.world.violate("mirror is answered", f"{source.name}: {failure.getErrorMessage()}")

        def ask() -> None:
            try:
                started = source.mirror(target, options)
            except MirrorError as refused:
                self.last_reply = f"refused: {refused}"
                self.world.log("operator", f"mirror {source.name} -> {target.name}: {refused}")
                return
            self.world.log(
                "operator",
                f"mirror {source.name} -> {target.name} max_bps={options.max_bps} "
                f"action={options.action.value} reply_timeout={options.reply_timeout}",
            )
            started.addCallbacks(answered, failed)

        source.control(ask)
        return True

    # -- restarting what stopped -----------------------------------------------------------------

    def _recover(self) -> None:
        self.recover()
        self.world.call_later(RECOVERY_INTERVAL, "operator", self._recover)

    def recover(self) -> None:
        cluster = self.cluster
        owner = cluster.owner
        self._ensure(owner, "serve")
        self._ensure(cluster.other(owner), "listen")

    def _ensure(self, host: Host, mode: str) -> None:
        """``host`` runs ferry in ``mode`` (or is on its way), restarting it if need be."""
        if not host.powered:
            return
        process = host.running
        if process is None:
            if host.disk.lost_pages:
                self.world.log("operator", f"reboot {host.name}: its disk failed an fsync")
                self.cluster.reboot(host)
            self.world.log("operator", f"start {mode} on {host.name}")
            self.cluster.start(host, mode)
            return
        if process.status != "running":
            return
        state = process.export.state
        if state == RoleState.IN_DOUBT or process.mirrors.running:
            return  # the lease (or the migration) settles it
        wrong = (mode == "serve" and state != RoleState.SERVING) or (
            mode == "listen" and state in _SPENT
        )
        if wrong:
            self._restart(process, f"{process.name} is {state}")

    def _make_listen(self, host: Host) -> None:
        process = host.running
        if process is None or process.status != "running":
            self._ensure(host, "listen")
        elif process.export.state in _SPENT and not process.mirrors.running:
            self._restart(process, f"{process.name} must listen")

    def _restart(self, process: FerryProcess, why: str) -> None:
        self.world.log("operator", f"restart {process.host.name}: {why}")
        process.control(lambda: process.shutdown(why))  # SIGTERM: handled when it runs
