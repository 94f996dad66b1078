"""A split-brain detector for the leases, in the manner of sanlock's ``devcount``.

Three worker processes (``tests/lease_worker.py``) race for one exclusive
lease through :class:`~ferry.lease.manager.LeaseManager` on a real
lockspace.  Whoever holds it stamps its name, token and a sequence number
into a shared file, waits a moment, and reads the stamp back: anyone
else's stamp there while its lease is still writable is an *overlap*, two
writers at once.  Holders give the lease up every few dozen stamps, so it
changes hands many times a second, while the test injects faults:

* etcd: the server paused (SIGSTOP) until the holder fences itself, then
  resumed; a *holder* stopped past its TTL while another takes over, then
  resumed into a lease it no longer has; the server restarted.
* local: a holder killed with SIGKILL (the kernel drops its lock at once).

The verdict comes from the workers' logs (JSON lines, CLOCK_MONOTONIC
times, comparable across processes): no overlap was seen; ordered by
token, every tenure's stamps end before the next tenure's begin (which
also catches a stale writer that no read-back happened to see); every
worker's log is a well-formed sequence; and the lease changed hands often
enough that all this could have failed.

The test waits only for the workers' log lines, each wait with a deadline;
nothing sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from etcd_support import MIN_TTL, EtcdServer, etcd_fixture
from support import Deadline

pytestmark = pytest.mark.integration

__all__ = ["etcd_fixture"]  # the module's etcd fixture: pytest finds it by its name, "etcd"

WORKER = Path(__file__).resolve().parents[1] / "lease_worker.py"
RESOURCE = "/srv/images/shared.img"
DEADLINE = 15.0
MIN_HANDOVERS = 5
Event = dict[str, Any]


class Worker:
    """One worker process and everything it has logged so far."""

    def __init__(self, name: str, lockspace: str, stamp: Path, ttl: float | None = None) -> None:
        self.name = name
        argv = [sys.executable, str(WORKER), "--lockspace", lockspace, "--resource", RESOURCE]
        argv += ["--name", name, "--stamp", str(stamp)]
        argv += ["--ttl", str(ttl)] if ttl is not None else []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.events: list[Event] = []
        self.killed_at: float | None = None
        self._partial = b""
        self.eof = False

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        self.proc.stdin.flush()

    def fileno(self) -> int:
        """Its log's pipe (read with ``os.read`` only, never through the buffered file)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def feed(self) -> list[Event]:
        """Read what the worker has written (it is readable); the complete lines, parsed."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            self.eof = True
            return []
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        new = [json.loads(line) for line in lines]
        self.events.extend(new)
        return new

    def count(self, event: str, **match: Any) -> int:
        return sum(
            1
            for e in self.events
            if e["ev"] == event and all(e.get(k) == v for k, v in match.items())
        )

    def open_tenure(self) -> int | None:
        """The token of the tenure this worker has begun and not yet ended, as logged."""
        for e in reversed(self.events):
            if e["ev"] == "tenure":
                return None
            if e["ev"] == "acquired":
                return int(e["token"])
        return None

    def kill(self) -> None:
        """SIGKILL: no release, no last word; the lockspace must cope."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)
        self.killed_at = time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it is frozen
            self.proc.kill()
        self.proc.communicate()


@dataclass
class Crowd:
    """The workers of one run, and waits on their logs."""

    lockspace: str
    stamp: Path
    ttl: float | None = None
    workers: list[Worker] = field(default_factory=list)

    def add(self, name: str) -> Worker:
        worker = Worker(name, self.lockspace, self.stamp, self.ttl)
        self.workers.append(worker)
        return worker

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.killed_at is None]

    def events(self, kind: str) -> list[Event]:
        return [e for w in self.workers for e in w.events if e["ev"] == kind]

    def acquisitions(self) -> list[Event]:
        return sorted(self.events("acquired"), key=lambda e: int(e["token"]))

    def handovers(self) -> int:
        owners = [e["w"] for e in self.acquisitions()]
        return sum(1 for a, b in itertools.pairwise(owners) if a != b)

    def wait(self, what: str, done: Callable[[], bool], seconds: float = DEADLINE) -> None:
        """Read the workers' logs until ``done()``; at the deadline, fail naming ``what``."""
        deadline = Deadline(seconds)
        while not done():
            readable = [w for w in self.live if not w.eof]
            if deadline.expired() or not readable:
                recent = [e for w in self.workers for e in w.events[-4:]]
                raise AssertionError(f"no {what} within {seconds} s; last events: {recent}")
            fds = {w.fileno(): w for w in readable}
            ready, _, _ = select.select(list(fds), [], [], min(deadline.left(), 1.0))
            for fd in ready:
                fds[fd].feed()

    def broadcast(self, word: str) -> None:
        """Send ``word`` to every live worker and wait until each has acknowledged it."""
        before = {w.name: w.count("ack", command=word) for w in self.live}
        for worker in self.live:
            worker.send(word)
        self.wait(
            f"ack of {word!r}",
            lambda: all(w.count("ack", command=word) > before[w.name] for w in self.live),
        )

    def pinned_holder(self) -> Worker:
        """Everyone told to ``hold``; the one that holds now (it will not let go by itself)."""
        self.broadcast("hold")
        holders: list[Worker] = []

        def found() -> bool:
            holders[:] = [w for w in self.live if w.open_tenure() is not None]
            return len(holders) == 1

        self.wait("pinned holder", found)
        return holders[0]

    def more_handovers(self, n: int) -> None:
        target = self.handovers() + n
        self.wait(f"{n} more hand-overs", lambda: self.handovers() >= target)

    def stop(self) -> None:
        for worker in self.live:
            worker.send("stop")
        self.wait("every worker done", lambda: all(w.count("done") for w in self.live))
        for worker in self.live:
            assert worker.proc.wait(timeout=DEADLINE) == 0


@pytest.fixture
def crowds() -> Iterator[list[Crowd]]:
    made: list[Crowd] = []
    yield made
    for crowd in made:
        for worker in crowd.workers:
            worker.close()


# -- the verdict -------------------------------------------------------------------------


@dataclass
class Verdict:
    handovers: int
    tenures: int
    stamps: int
    fences: int
    overlaps: list[str]


def judge(crowd: Crowd) -> Verdict:
    """Everything the logs say about exclusion; ``overlaps`` lists every violation found."""
    overlaps = [
        f"{e['w']} saw {e['seen']!r} over its stamp {e['seq']}" for e in crowd.events("overlap")
    ]
    tenures = sorted(crowd.events("tenure"), key=lambda e: int(e["token"]))
    stamped = [t for t in tenures if t["stamps"]]
    for before, after in itertools.pairwise(stamped):
        if before["last"] >= after["first"]:
            overlaps.append(
                f"{before['w']} (token {before['token']}) stamped until {before['last']:.6f}, "
                f"after {after['w']} (token {after['token']}) began at {after['first']:.6f}"
            )
    acquired = crowd.acquisitions()
    tokens = [int(e["token"]) for e in acquired]
    assert len(set(tokens)) == len(tokens), f"a token was granted twice: {tokens}"
    times = [e["t"] for e in acquired]
    assert times == sorted(times), "tokens were granted out of time order"
    for worker in crowd.workers:
        check_log(worker)
    return Verdict(
        handovers=crowd.handovers(),
        tenures=len(tenures),
        stamps=sum(t["stamps"] for t in tenures),
        fences=len(crowd.events("fenced")),
        overlaps=overlaps,
    )


def check_log(worker: Worker) -> None:
    """A worker's log reads ready, (acquired, ..., tenure)*, done -- or stops where it was killed.

    Within a tenure only ``fenced``, ``overlap``, ``freezing`` and then
    ``resumed`` may appear, all naming its token; a tenure ends ``fenced``
    only after a ``fenced`` event; its stamps lie between its ``acquired``
    and its end; a worker's tokens only grow.
    """
    events = worker.events
    assert events and events[0]["ev"] == "ready", events[:1]
    holding: Event | None = None
    seen: list[str] = []  # the events of the current tenure
    last_token = 0
    for e in events[1:]:
        kind = e["ev"]
        if kind == "ack":
            continue
        if kind == "acquired":
            assert holding is None and int(e["token"]) > last_token, e
            holding, seen, last_token = e, [], int(e["token"])
            continue
        if kind == "done":
            assert holding is None, e
            continue
        assert holding is not None and e["token"] == holding["token"], e
        if kind == "tenure":
            assert e["end"] in ("released", "fenced", "expired"), e
            assert e["end"] != "fenced" or "fenced" in seen, e
            if e["stamps"]:
                assert holding["t"] <= e["first"] <= e["last"] <= e["t"], e
            holding = None
            continue
        assert kind in ("fenced", "overlap", "freezing", "resumed"), e
        assert kind != "resumed" or seen[-1:] == ["freezing"], e
        seen.append(kind)
    assert events[-1]["ev"] == "done" or worker.killed_at is not None, worker.name


def report(name: str, verdict: Verdict) -> None:
    print(
        f"\nsplit-brain detector, {name}: {verdict.handovers} hand-overs in "
        f"{verdict.tenures} tenures, {verdict.stamps} stamps, {verdict.fences} fences, "
        f"{len(verdict.overlaps)} overlaps"
    )
    assert verdict.overlaps == []
    assert verdict.handovers >= MIN_HANDOVERS


# -- the runs -----------------------------------------------------------------------------


def test_no_two_holders_write_at_once_on_a_local_lockspace(
    tmp_path: Path, crowds: list[Crowd]
) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    crowd = Crowd(f"local:{locks}", tmp_path / "stamp")
    crowds.append(crowd)
    for name in ("w1", "w2", "w3"):
        crowd.add(name)
    crowd.more_handovers(3)

    for replacement in ("w4", "w5"):
        victim = crowd.pinned_holder()
        victim.kill()
        crowd.add(replacement)
        crowd.broadcast("free")
        # Someone else takes it: the kernel dropped the dead holder's lock.
        crowd.wait(f"a take-over from the killed {victim.name}", taken_after(crowd, victim))
        crowd.more_handovers(2)

    crowd.stop()
    report("local", judge(crowd))


def test_no_two_holders_write_at_once_on_etcd(
    tmp_path: Path, crowds: list[Crowd], etcd: EtcdServer
) -> None:
    crowd = Crowd(f"etcd:{etcd.url}", tmp_path / "stamp", ttl=MIN_TTL)
    crowds.append(crowd)
    for name in ("w1", "w2", "w3"):
        crowd.add(name)
    crowd.more_handovers(3)

    pause_etcd_until_the_holder_fences(crowd, etcd)
    crowd.more_handovers(2)
    stop_a_holder_past_its_ttl(crowd)
    crowd.more_handovers(2)
    etcd.restart()
    crowd.more_handovers(2)

    crowd.stop()
    report("etcd", judge(crowd))


def taken_after(crowd: Crowd, victim: Worker) -> Callable[[], bool]:
    """Whether anyone has acquired the lease since ``victim`` was killed."""
    killed_at = victim.killed_at
    assert killed_at is not None
    return lambda: any(e["t"] > killed_at for e in crowd.events("acquired"))


def pause_etcd_until_the_holder_fences(crowd: Crowd, etcd: EtcdServer) -> None:
    """etcd stops answering: the holder must stop writing at its deadline, alone.

    Either its lease fences it (the expiry timer fired), or its next stamp
    finds ``may_write()`` false first and it ends the tenure as
    ``expired``: which comes first is a race between two events of the
    same instant, and both stop the writes.
    """
    holder = crowd.pinned_holder()
    token = holder.open_tenure()

    def stopped() -> bool:
        ended = any(
            e["ev"] == "tenure" and e["token"] == token and e["end"] in ("fenced", "expired")
            for e in holder.events
        )
        return ended or holder.count("fenced", token=token) > 0

    with etcd.paused():
        crowd.wait(f"{holder.name} stopped writing at its deadline", stopped)
    crowd.broadcast("free")


def stop_a_holder_past_its_ttl(crowd: Crowd) -> None:
    """A holder frozen past its TTL loses the lease, and writes nothing when it resumes."""
    holder = crowd.pinned_holder()
    token = holder.open_tenure()
    assert token is not None
    holder.send("freeze")
    crowd.wait(f"{holder.name} frozen", lambda: holder.count("freezing") > 0)
    # Everyone still holds on to what they take: the taker keeps stamping meanwhile.
    taker: list[Event] = []

    def taken() -> bool:
        taker[:] = [e for e in crowd.events("acquired") if int(e["token"]) > token]
        return bool(taker)

    crowd.wait(f"a take-over from the frozen {holder.name}", taken)
    holder.proc.send_signal(signal.SIGCONT)
    crowd.wait(
        f"{holder.name} resumed and ended its tenure",
        lambda: holder.count("tenure", token=token) > 0,
    )
    [resumed] = [e for e in holder.events if e["ev"] == "resumed"]
    assert resumed["may_write"] is False, resumed
    [tenure] = [e for e in holder.events if e["ev"] == "tenure" and e["token"] == token]
    assert tenure["end"] in ("fenced", "expired") and tenure["last"] < resumed["t"], tenure
    crowd.broadcast("free")
