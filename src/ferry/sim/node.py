"""A simulated host and the ferry process on it, built from the parts ``ferry serve`` uses.

A :class:`Host` has an address and a :class:`~ferry.sim.disk.SimDisk`, which
outlives every process on it.  A :class:`FerryProcess` is one ``ferry serve``
or ``ferry listen`` run: the same objects :class:`ferry.node.Node` wires
together -- the :class:`~ferry.serve.export.Export` and its role, the
:class:`~ferry.serve.server.NBDServer`, the destination's
:class:`~ferry.migrate.destination.Receiver`, the
:class:`~ferry.migrate.manager.MirrorManager`, the
:class:`~ferry.exports.ExportUnit` that fences it, the
:class:`~ferry.lease.manager.LeaseManager` (or, listening, the
:class:`~ferry.lease.incoming.IncomingLease`) -- on a
:class:`~ferry.clock.ReactorClock` over the process's simulated time, the
simulated network, disk and lockspace.  ``serve`` takes the lease before the
port opens, as ``Node.start`` does; a refusal ends the process.

A process ends in one of three ways: :meth:`FerryProcess.shutdown` (SIGTERM:
the mirror stopped, clients drained, the image flushed, the role stopped,
the lease released, as ``Node.shutdown`` does; killed if it takes too
long), :meth:`FerryProcess.kill` (SIGKILL: the kernel closes its sockets,
the page cache stays), or a power cut of its host
(:meth:`Host.power_cut`: the unsynced pages may be gone, the host answers
nothing until it is powered on again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from ferry.chartnames import RoleState, RoleTrigger
from ferry.clock import ReactorClock
from ferry.exports import ExportConfig, ExportUnit
from ferry.lease.backend import LeaseMode
from ferry.lease.incoming import IncomingLease
from ferry.lease.manager import LeaseManager
from ferry.migrate.destination import Receiver
from ferry.migrate.options import Destination, MirrorOptions, StartOutcome
from ferry.migrate.source import MirrorSource
from ferry.serve.acl import Acl
from ferry.serve.export import Export
from ferry.serve.server import NBDServer
from ferry.sim import bugs
from ferry.sim.disk import SimDisk, SimImage
from ferry.sim.lockspace import Lockspace
from ferry.sim.network import PORT, Network
from ferry.sim.process import ProcessTime
from ferry.sim.world import World
from ferry.trace import Tracer, TraceRecord

__all__ = ["EXPORT", "RESOURCE", "FerryProcess", "Host"]

EXPORT: Final = "disk"
RESOURCE: Final = "/images/disk.img"
#: Who may connect, and hand an image over: both hosts and the clients (``ferry listen``
#: refuses to start unless its ACL names its senders).
ACL: Final = ("10.0.0.0/24",)
#: A SIGTERM'd process that has not finished its shutdown by then is killed.
SHUTDOWN_DEADLINE: Final = 30.0

Observer = Callable[["FerryProcess", TraceRecord], None]
MirrorObserver = Callable[["FerryProcess", MirrorSource], None]


class Host:
    """A machine: an address, a disk, and at most one ferry process at a time."""

    def __init__(self, world: World, name: str, address: str, disk: SimDisk) -> None:
        self.world = world
        self.name = name
        self.address = address
        self.disk = disk
        self.process: FerryProcess | None = None
        self.runs = 0
        self.powered = True

    def power_cut(self, network: Network, process: ProcessTime | None = None) -> None:
        """Power lost: the disk keeps what was synced (and what the kernel had written back)."""
        dropped = self.disk.power_cut()
        self.powered = False
        self.world.log(self.name, f"power cut: {dropped} unsynced pages lost")
        if process is not None:
            network.process_died(process, self.address, power_cut=True)
        else:
            network.power_off(self.address)

    def power_on(self, network: Network) -> None:
        self.powered = True
        self.world.log(self.name, "power on")
        network.power_on(self.address)

    @property
    def running(self) -> FerryProcess | None:
        """The process on this host, if one is alive."""
        process = self.process
        return process if process is not None and process.alive else None


class FerryProcess:
    """One ``ferry serve`` or ``ferry listen`` on a host; see the module doc."""

    def __init__(
        self,
        host: Host,
        mode: str,
        *,
        network: Network,
        lockspace: Lockspace,
        bug: str | None,
        observe: Observer,
        on_mirror: MirrorObserver,
    ) -> None:
        if mode not in ("serve", "listen"):
            raise ValueError(f"no mode {mode!r}")
        world = host.world
        host.runs += 1
        self.host = host
        self.mode = mode
        self.world = world
        self.network = network
        self.bug = bug
        self.name = f"{host.name}{host.runs}"
        self.owner = f"{self.name}:{EXPORT}"  # who the lockspace says holds the lease
        self.status = "starting"  # running, stopping, exited, killed
        self._observe = observe
        self.time = ProcessTime(world, self.name)
        self.clock = ReactorClock(self.time, monotonic=self.time.monotonic)
        self.records: list[TraceRecord] = []
        self.tracer = Tracer(self._record)
        self.image = SimImage(host.disk, f"/sim/{host.name}/disk.img")
        self.export = Export(EXPORT, self.image, clock=self.clock, tracer=self.tracer)
        run_blocking = bugs.run_blocking(bug, self.export, self._run_blocking)
        self.mirrors = bugs.mirror_manager(bug)(
            self.export,
            gate=self.export,
            clock=self.clock,
            connector=network.connector(self.time, host.address),
            tracer=self.tracer,
            stop_process=self._exit_after_handoff,
        )
        self.mirrors.on_start = lambda source: on_mirror(self, source)
        config = ExportConfig(file=str(self.image.path), name=EXPORT, listen=mode == "listen")
        self.unit = ExportUnit(config, self.export, self.mirrors)
        self.unit.resource = RESOURCE
        self.unit.address = f"{host.address}:{PORT}"
        self.server = NBDServer(
            [],
            clock=self.clock,
            run_blocking=run_blocking,
            acl=Acl.parse(ACL),
            receiver=Receiver(run_blocking=run_blocking, clock=self.clock),
        )
        self.backend = bugs.backend(
            bug, mode, lockspace.client(self.time, host.address, self.clock)
        )
        self.leases: list[LeaseManager] = []
        host.process = self

    def __repr__(self) -> str:
        return f"<FerryProcess {self.name} {self.mode} {self.status} {self.export.state}>"

    @property
    def alive(self) -> bool:
        return self.status in ("starting", "running", "stopping")

    # -- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """Take the lease (``serve``) or get ready for one (``listen``), then open the port."""
        unit = self.unit
        self.world.log(self.name, f"start {self.mode}")
        if self.mode == "listen":
            incoming = IncomingLease(
                self._make_lease,
                resource=RESOURCE,
                fallback=RESOURCE,
                on_taken=self._took,
            )
            unit.incoming = self.export.incoming_lease = incoming
            self._serve()
            return
        lease = self._make_lease(RESOURCE)
        lease.register()

        def held(_: object) -> None:
            if self.status == "starting":
                self._took(lease)
                self._serve()

        def refused(failure: Failure) -> None:
            if self.status == "starting":
                self.world.log(self.name, f"cannot take the lease: {failure.getErrorMessage()}")
                lease.shutdown()
                self._exited("the lease is someone else's")

        lease.acquire().addCallbacks(held, refused)

    def _make_lease(self, resource: str) -> LeaseManager:
        lease = LeaseManager(
            self.backend,
            resource=resource,
            owner=self.owner,
            mode=LeaseMode.EXCLUSIVE,
            clock=self.clock,
            tracer=self.tracer,
            on_fenced=self.unit.fenced,
        )
        lease.serving_address = self.unit.address  # published with each grant, for a proxy
        self.leases.append(lease)
        return lease

    def _took(self, lease: LeaseManager) -> None:
        self.unit.holds(lease)
        self.mirrors.lease = bugs.outgoing_lease(self.bug, lease)

    def _serve(self) -> None:
        self.server.add_export(self.export)
        self.export.trigger(RoleTrigger.LISTEN if self.mode == "listen" else RoleTrigger.SERVE)
        self.status = "running"
        self.network.listen(self.host.address, self.time, self.server)

    # -- what the operators do ------------------------------------------------------------

    def mirror(self, target: Host, options: MirrorOptions) -> Deferred[StartOutcome]:
        """``ferry mirror``; raises :class:`~ferry.migrate.options.MirrorError` when refused."""
        destination = Destination(target.address, PORT, export_name=EXPORT)
        return self.mirrors.mirror(destination, options)

    def control(self, command: Callable[[], object]) -> None:
        """A command on the control socket: performed when the process next runs.

        Now, unless it is paused (then when it resumes) or dead (never).
        """
        self.time.run(command)

    @property
    def lease(self) -> LeaseManager | None:
        return self.unit.lease

    def accepts_writes(self) -> bool:
        """The data plane would perform a client's write here now."""
        export = self.export
        if not (self.alive and export.has_control and export.clients_allowed):
            return False
        lease = export.lease
        return lease is None or lease.may_write()

    # -- ending -------------------------------------------------------------------------------

    def shutdown(self, why: str) -> None:
        """SIGTERM: what ``Node.shutdown`` does, then exit (killed if it takes too long)."""
        if self.status not in ("starting", "running"):
            return
        self.world.log(self.name, f"shutdown: {why}")
        self.status = "stopping"
        self.server.accepting = False
        self.network.stop_listening(self.host.address, self.time)
        self.time.callLater(SHUTDOWN_DEADLINE, self._exited, "shutdown took too long")
        d: Deferred[Any] = self.mirrors.stop(why)
        d.addBoth(lambda _: self.server.drain())
        d.addBoth(lambda _: self._run_blocking(self.image.flush))
        d.addBoth(lambda _: maybeDeferred(self.unit.stop))
        d.addBoth(lambda _: self._exited(why))

    def _exit_after_handoff(self) -> None:
        """The ``exit`` action (``Node._stop_after_handoff``): stop once the mirror has ended."""
        self.mirrors.finished().addBoth(
            lambda _: self.clock.call_later(0, self.shutdown, "exit after the handoff")
        )

    def _exited(self, why: str) -> None:
        if not self.alive:
            return
        self.world.log(self.name, f"exited: {why}")
        self.status = "exited"
        self.time.kill()
        self.network.process_died(self.time, self.host.address, power_cut=False)

    def kill(self) -> None:
        """SIGKILL: nothing more runs; the kernel resets its connections, keeps its pages."""
        if not self.alive:
            return
        self.world.log(self.name, "killed")
        self.status = "killed"
        self.time.kill()
        self.network.process_died(self.time, self.host.address, power_cut=False)

    def power_cut(self) -> None:
        """The host loses power under this process: see :meth:`Host.power_cut`."""
        if not self.alive:
            return
        self.status = "killed"
        self.time.kill()
        self.host.power_cut(self.network, self.time)

    # -- the machinery ---------------------------------------------------------------------------

    def _run_blocking(self, work: Callable[[], object]) -> Deferred[Any]:
        """A worker thread: ``work`` runs after the disk's latency, and answers after it."""
        d: Deferred[Any] = Deferred()

        def finish() -> None:
            try:
                result = work()
            except Exception as error:
                d.errback(error)
                return
            d.callback(result)

        self.time.callLater(self.host.disk.latency(), finish)
        return d

    def _record(self, record: TraceRecord) -> None:
        self.records.append(record)
        what = f"{record.machine} {record.event} {record.source}->{record.dest}"
        if not record.ok:
            what += f" FAILED: {record.error}"
            self.world.violate("no MachineError", f"{self.name}: {what}")
        self.world.log(self.name, what)
        self._observe(self, record)

    def role_is(self, *states: RoleState) -> bool:
        return self.alive and self.export.state in states
