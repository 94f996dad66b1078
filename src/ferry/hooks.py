"""Hooks: executables run at the steps of a migration, as CRIU's action scripts are.

An operator configures them per export (``[[export]] hooks`` in a daemon's
file, ``ferry serve --hook STAGE=PATH``) or for the whole daemon (its
top-level ``hooks``; an export's own hook for a stage replaces the
daemon's).  Each runs as a child process, spawned through the reactor and
never waited for on it, with its stdin closed and the environment of ferry
plus:

========================  ====================================================
``FERRY_STAGE``           the stage (below)
``FERRY_EXPORT``          the export's name
``FERRY_FILE``            the image file
``FERRY_PEER``            the other end: the migration's destination (source
                          side), or empty where there is none to name
``FERRY_LEASE_TOKEN``     the lease's fencing token, or empty without a lease
========================  ====================================================

Two stages may **veto** the step they come before: ``pre-migrate`` (before
the source connects anywhere) and ``pre-switchover`` (clients held, the last
pass flushed, before the lease is offered and the commit sent).  A hook
that exits non-zero there, or does not exit within its timeout (it is then
killed), cancels the migration: ``veto`` in the migration chart, the
clients released, the destination left listening, the job ``cancelled``
with the reason ``hook``.  The other stages (``post-handoff``,
``post-takeover``, ``lease-lost``, ``fenced``) only tell: a failure is
logged and counted, and nothing waits for them.

Every run is counted by stage and outcome (``ferry_hook_runs_total``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from typing import Protocol as TypingProtocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ferry.clock import Clock, DelayedCall, cancel_call

__all__ = [
    "DEFAULT_HOOK_TIMEOUT",
    "NO_HOOKS",
    "OUTCOMES",
    "VETOING",
    "Approver",
    "HookConfig",
    "HookOutcome",
    "HookStats",
    "Hooks",
    "Stage",
    "parse_hooks",
]

_log = Logger()

#: Seconds a hook may run before it is killed (and, where it may veto, vetoes).
DEFAULT_HOOK_TIMEOUT: Final = 30.0
#: What of a hook's output the log keeps, per stream.
OUTPUT_KEPT: Final = 2048


class Stage(enum.StrEnum):
    PRE_MIGRATE = "pre-migrate"
    PRE_SWITCHOVER = "pre-switchover"
    POST_HANDOFF = "post-handoff"
    POST_TAKEOVER = "post-takeover"
    LEASE_LOST = "lease-lost"
    FENCED = "fenced"


#: The stages whose hook decides whether the step goes on.
VETOING: Final = frozenset({Stage.PRE_MIGRATE, Stage.PRE_SWITCHOVER})

#: A run's outcome, as ``ferry_hook_runs_total{outcome}`` says it.
OUTCOMES: Final = ("ok", "failed", "timeout")


@dataclass(frozen=True)
class HookConfig:
    """Which executable runs at which stage, and how long each may take."""

    scripts: tuple[tuple[Stage, str], ...] = ()
    timeout: float | None = None  # None: the daemon's, or DEFAULT_HOOK_TIMEOUT

    def script(self, stage: Stage) -> str | None:
        return dict(self.scripts).get(stage)

    @property
    def seconds(self) -> float:
        return DEFAULT_HOOK_TIMEOUT if self.timeout is None else self.timeout

    def under(self, defaults: HookConfig | None) -> HookConfig:
        """These hooks over ``defaults`` (a daemon's): a stage or timeout of ours replaces its."""
        if defaults is None:
            return self
        merged = dict(defaults.scripts)
        merged.update(self.scripts)
        timeout = defaults.timeout if self.timeout is None else self.timeout
        return HookConfig(tuple(merged.items()), timeout)

    def settings(self) -> dict[str, str]:
        """The table ``parse_hooks`` reads."""
        return {stage.value: path for stage, path in self.scripts}


#: No hooks at all.
NO_HOOKS: Final = HookConfig()


def parse_hooks(table: object, timeout: object = None) -> HookConfig:
    """``{"pre-switchover": "/path", ...}`` (TOML or JSON) and a timeout in seconds, checked.

    Raises ValueError naming what is wrong: an unknown stage, a path that is
    not an executable file (checked now, so a typo is said at start, not at
    the first migration), a timeout that is not a positive number.
    """
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ValueError("hooks must be a table of STAGE = PATH")
    scripts: list[tuple[Stage, str]] = []
    for name, path in table.items():
        try:
            stage = Stage(name)
        except ValueError:
            stages = ", ".join(s.value for s in Stage)
            raise ValueError(f"no stage {name!r} (the stages: {stages})") from None
        if not isinstance(path, str) or not path:
            raise ValueError(f"{stage}: must be the path of an executable, not {path!r}")
        problem = executable_problem(path)
        if problem is not None:
            raise ValueError(f"{stage}: {path}: {problem}")
        scripts.append((stage, path))
    seconds: float | None = None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError(f"hook_timeout must be a number of seconds, not {timeout!r}")
        seconds = float(timeout)
        if not 0 < seconds < float("inf"):
            raise ValueError(f"hook_timeout must be a positive number of seconds, not {timeout!r}")
    return HookConfig(tuple(scripts), seconds)


def executable_problem(path: str) -> str | None:
    """Why ``path`` cannot be run as a hook (None: it can)."""
    if not os.path.isabs(path):
        return "not an absolute path"
    if not os.path.isfile(path):
        return "no such file" if not os.path.exists(path) else "not a file"
    if not os.access(path, os.X_OK):
        return "not executable"
    return None


@dataclass(frozen=True)
class HookOutcome:
    """How a run went: ``ok``, and if not, why (``hook pre-switchover /x exited 1``)."""

    ok: bool
    reason: str = ""


class Approver(TypingProtocol):
    """Who else decides a veto-able step: a control connection registered as the export's
    approver (``ferry.control.approvals``).  Asked after the stage's hook approved, if any;
    its answer is a :class:`HookOutcome`, as a hook's is (a timeout is a veto)."""

    def ask(self, stage: Stage, peer: str) -> Deferred[HookOutcome]: ...


@dataclass
class HookStats:
    """Runs by (stage, outcome): ``ferry_hook_runs_total``."""

    runs: Counter[tuple[Stage, str]] = field(default_factory=Counter)


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the export."""

    export: str
    file: str
    lease_token: Callable[[], int | None] = lambda: None


class Hooks:
    """One export's hooks: runs them and says how they went."""

    def __init__(
        self,
        config: HookConfig,
        context: HookContext,
        *,
        reactor: Any,
        clock: Clock,
        stats: HookStats | None = None,
    ) -> None:
        self.config = config
        self._context = context
        self._reactor = reactor
        self._clock = clock
        self.stats = stats or HookStats()
        self._running: set[_HookProcess] = set()

    def configured(self, stage: Stage) -> bool:
        return self.config.script(stage) is not None

    def run(self, stage: Stage, peer: str = "") -> Deferred[HookOutcome]:
        """Run ``stage``'s hook; fires with its outcome (ok at once if there is none)."""
        path = self.config.script(stage)
        if path is None:
            return succeed(HookOutcome(True))
        token = self._context.lease_token()
        env = dict(os.environ)
        env.update(
            FERRY_STAGE=stage.value,
            FERRY_EXPORT=self._context.export,
            FERRY_FILE=self._context.file,
            FERRY_PEER=peer,
            FERRY_LEASE_TOKEN="" if token is None else str(token),
        )
        done: Deferred[HookOutcome] = Deferred()
        child = _HookProcess(stage, path, self.config.seconds, done)
        self._running.add(child)
        done.addBoth(self._ran, child)
        try:
            self._reactor.spawnProcess(
                child, path, [path], env=env, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except Exception as error:
            child.finish(HookOutcome(False, f"hook {stage} {path} cannot start: {error}"))
            return done
        child.timer = self._clock.call_later(self.config.seconds, child.time_out)
        return done

    def notify(self, stage: Stage, peer: str = "") -> None:
        """Run a hook that only tells; its failure is logged and counted, nothing waits."""
        if self.configured(stage):
            self.run(stage, peer)

    def _ran(self, outcome: Any, child: _HookProcess) -> Any:
        self._running.discard(child)
        if isinstance(outcome, Failure):  # a fault of ours: logged whole, counted failed
            _log.failure("hook {stage}: internal error", outcome, stage=child.stage.value)
            outcome = HookOutcome(False, f"hook {child.stage} {child.path}: internal error")
        kind = "ok" if outcome.ok else ("timeout" if child.timed_out else "failed")
        self.stats.runs[child.stage, kind] += 1
        output = child.output()
        if outcome.ok:
            _log.info(
                "{export}: hook {stage} ran ({path}){output}",
                export=self._context.export,
                stage=child.stage.value,
                path=child.path,
                output=output,
            )
        else:
            what = "vetoes" if child.stage in VETOING else "failed"
            _log.warn(
                "{export}: hook {stage} {what}: {reason}{output}",
                export=self._context.export,
                stage=child.stage.value,
                what=what,
                reason=outcome.reason,
                output=output,
            )
        return outcome

    def stop(self) -> None:
        """The export goes: kill what still runs (its outcome is a failure)."""
        for child in list(self._running):
            child.time_out()


class _HookProcess(protocol.ProcessProtocol):
    """One run of one hook: its output kept (capped), its end or its timeout reported once."""

    def __init__(self, stage: Stage, path: str, timeout: float, done: Deferred[HookOutcome]):
        self.stage = stage
        self.path = path
        self.timeout = timeout
        self.done = done
        self.timer: DelayedCall | None = None
        self.timed_out = False
        self._out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        kept = self._out.get(childFD)
        if kept is not None and len(kept) < OUTPUT_KEPT:
            kept += data[: OUTPUT_KEPT - len(kept)]

    def processExited(self, reason: Failure) -> None:
        # Exited, even if a child of its own still holds its output open.
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if code == 0:
            self.finish(HookOutcome(True))
        elif sig is not None:
            self.finish(HookOutcome(False, f"hook {self.stage} {self.path} killed by signal {sig}"))
        else:
            self.finish(HookOutcome(False, f"hook {self.stage} {self.path} exited {code}"))

    def time_out(self) -> None:
        if self.done.called:
            return
        self.timed_out = True
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(Exception):  # exited meanwhile
                transport.signalProcess(signal.SIGKILL)
            transport.loseConnection()
        why = f"hook {self.stage} {self.path} did not exit within {self.timeout} s"
        self.finish(HookOutcome(False, why))

    def finish(self, outcome: HookOutcome) -> None:
        cancel_call(self.timer)
        self.timer = None
        if not self.done.called:
            self.done.callback(outcome)

    def output(self) -> str:
        parts = [
            f" {name}: {bytes(data).decode(errors='replace').strip()!r}"
            for name, data in (("stdout", self._out[1]), ("stderr", self._out[2]))
            if data.strip()
        ]
        return ";" + ";".join(parts) if parts else ""
