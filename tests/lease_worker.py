"""One worker of the split-brain detector (``tests/integration/test_split_brain.py``).

Run as ``python tests/lease_worker.py --lockspace SPEC --resource R --name W
--stamp FILE [--ttl SECONDS]``.  It is sanlock's ``devcount`` idea on
ferry's lease manager: several workers race for one exclusive lease, and
whoever holds it stamps the shared file and checks that nobody else did.

The stamp cycle, while the lease is held::

    may_write()?  no -> the tenure is over (released, fenced or expired)
    pwrite "<name> <token> <seq>" at offset 0
    wait STAMP_INTERVAL                      (the workload: others would write now)
    pread offset 0 -- still ours?  no, and may_write() still true -> "overlap"

``may_write()`` is asked before *every* stamp: that is the check which
makes a holder that was stopped past its TTL write nothing when it
resumes.  A holder gives the lease up after :data:`STAMPS_PER_TENURE`
stamps and waits a little before competing again, so the lease changes
hands many times a second.

Everything the worker does is one JSON object per line on stdout (its
log, which the test checks); the test drives it with one word per line on
stdin:

``hold``   keep the lease once held (no voluntary release) until ``free``;
``free``   release after :data:`STAMPS_PER_TENURE` stamps again;
``freeze`` at the start of the next stamp cycle while holding, say
           ``freezing`` and SIGSTOP itself (the test SIGCONTs it later);
``stop``   release, say ``done`` and exit 0.

Why ``freeze`` is a request and not a SIGSTOP from the test: a stop that
lands between the ``may_write()`` check and the ``pwrite`` resumes into a
write that no lease can prevent (only a fencing token checked by the
storage could).  The test is about the lease, so it stops the holder just
before the check, deterministically, instead of measuring its luck.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ferry.clock import ReactorClock
from ferry.lease.backend import Grant, LeaseBackend, LeaseError, LeaseMode
from ferry.lease.manager import LeaseManager
from ferry.lease.spec import open_lockspace

reactor: Any = _reactor

STAMP_SIZE = 64
STAMP_INTERVAL = 0.002  # seconds between a stamp and its read-back
STAMPS_PER_TENURE = 25
RETRY_DELAY = (0.01, 0.04)  # seconds before asking again when the lease is busy
REST_AFTER_RELEASE = (0.02, 0.06)  # seconds a worker stays out after releasing


def log(name: str, event: str, **fields: Any) -> None:
    """One log line: the event, who, when (CLOCK_MONOTONIC: comparable across processes)."""
    record = {"ev": event, "w": name, "t": time.monotonic(), **fields}
    os.write(1, (json.dumps(record) + "\n").encode())


@dataclass
class Tenure:
    """One holding of the lease: its token and when its stamps were written."""

    token: int
    first: float | None = None  # monotonic time just before the first pwrite
    last: float | None = None  # monotonic time just after the last pwrite
    stamps: int = 0
    overlaps: list[str] = field(default_factory=list)


class Worker:
    def __init__(self, backend: LeaseBackend, resource: str, name: str, stamp_path: str) -> None:
        self.backend = backend
        self.resource = resource
        self.name = name
        self.clock = ReactorClock(reactor)
        self.fd = os.open(stamp_path, os.O_RDWR | os.O_CREAT, 0o644)
        self.lease: LeaseManager | None = None
        self.tenure: Tenure | None = None
        self.rounds = 0
        self.seq = 0
        self.hold = False
        self.freeze = False
        self.stopping = False
        self.asking = False  # an inquire or acquire is in flight
        self.finished = False
        self.fenced_reason: str | None = None

    def emit(self, event: str, **fields: Any) -> None:
        log(self.name, event, **fields)

    # -- commands from the test ----------------------------------------------------

    def command(self, word: str) -> None:
        if word == "hold":
            self.hold = True
        elif word == "free":
            self.hold = False
        elif word == "freeze":
            self.freeze = True
        elif word in ("stop", ""):
            self.stop()
            return
        self.emit("ack", command=word)

    # -- competing for the lease ---------------------------------------------------

    def compete(self) -> None:
        if self.stopping:
            self.finish()
            return
        self.rounds += 1
        self.fenced_reason = None
        self.lease = LeaseManager(
            self.backend,
            resource=self.resource,
            owner=self.name,
            mode=LeaseMode.EXCLUSIVE,
            clock=self.clock,
            on_fenced=self.fenced,
            instance=f"{self.name}#{self.rounds}",
        )
        self.lease.register()
        self.asking = True
        d = self.lease.inquire()
        d.addCallback(self.free_or_busy)
        d.addCallbacks(self.acquired, self.refused)

    def free_or_busy(self, holders: tuple[Any, ...]) -> Deferred[Grant] | None:
        """Ask for the lease only when it looks free: a failed acquire costs etcd three writes."""
        assert self.lease is not None
        if holders or self.stopping:
            return None
        return self.lease.acquire()

    def refused(self, failure: Failure) -> None:
        self.asking = False
        if not isinstance(failure.value, LeaseError):
            failure.raiseException()  # a bug in the worker: let the reactor log it
        self.retry()

    def retry(self, delay: tuple[float, float] = RETRY_DELAY) -> None:
        if self.stopping:
            self.finish()
            return
        self.clock.call_later(random.uniform(*delay), self.compete)

    def acquired(self, grant: Grant | None) -> None:
        self.asking = False
        if grant is None:  # busy
            self.retry()
            return
        self.tenure = Tenure(grant.token)
        self.emit("acquired", token=grant.token, round=self.rounds)
        self.clock.call_later(0, self.stamp)

    def fenced(self, reason: str) -> None:
        self.fenced_reason = reason
        self.emit("fenced", token=self.tenure.token if self.tenure else None, reason=reason)

    # -- stamping ------------------------------------------------------------------

    def stamp(self) -> None:
        lease, tenure = self.lease, self.tenure
        assert lease is not None and tenure is not None
        if self.freeze:
            self.freeze_now(lease)
        if not lease.may_write():
            self.end_tenure("fenced" if self.fenced_reason else "expired")
            return
        if self.stopping or (tenure.stamps >= STAMPS_PER_TENURE and not self.hold):
            self.end_tenure("released")
            return
        self.seq += 1
        mine = f"{self.name} {tenure.token} {self.seq}".encode().ljust(STAMP_SIZE, b" ")
        before = time.monotonic()
        os.pwrite(self.fd, mine, 0)
        tenure.last = time.monotonic()
        tenure.first = before if tenure.first is None else tenure.first
        tenure.stamps += 1
        time.sleep(STAMP_INTERVAL)
        seen = os.pread(self.fd, STAMP_SIZE, 0)
        if seen != mine and lease.may_write():
            tenure.overlaps.append(seen.decode(errors="replace").strip())
            self.emit("overlap", token=tenure.token, seq=self.seq, seen=tenure.overlaps[-1])
        self.clock.call_later(0, self.stamp)

    def freeze_now(self, lease: LeaseManager) -> None:
        """SIGSTOP this process before the may_write() check (see the module doc)."""
        self.freeze = False
        self.emit("freezing", token=self.tenure.token if self.tenure else None)
        os.kill(os.getpid(), signal.SIGSTOP)
        token = self.tenure.token if self.tenure else None
        self.emit("resumed", token=token, may_write=lease.may_write(), state=lease.state)

    def end_tenure(self, how: str) -> None:
        lease, tenure = self.lease, self.tenure
        assert lease is not None and tenure is not None
        self.tenure = None
        self.emit(
            "tenure",
            token=tenure.token,
            first=tenure.first,
            last=tenure.last,
            stamps=tenure.stamps,
            end=how,
            overlaps=len(tenure.overlaps),
        )
        d = lease.release() if lease.holds else lease.shutdown()
        d.addErrback(lambda _: None)  # a release that fails ends with the TTL
        d.addBoth(lambda _: self.retry(REST_AFTER_RELEASE))

    # -- the end ---------------------------------------------------------------------

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.tenure is None and not self.asking:  # else the stamp loop or the answer ends it
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.emit("done", rounds=self.rounds, stamps=self.seq)
        d = self.backend.close()
        d.addTimeout(2, reactor)
        d.addBoth(lambda _: reactor.stop())


def read_commands(worker: Worker) -> None:
    """Stdin, one word per line, handed to the reactor; EOF means stop."""
    for line in sys.stdin:
        reactor.callFromThread(worker.command, line.strip())
    reactor.callFromThread(worker.command, "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lockspace", required=True)
    parser.add_argument("--resource", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--stamp", required=True)
    parser.add_argument("--ttl", type=float)
    args = parser.parse_args()
    backend = open_lockspace(args.lockspace, reactor=reactor, ttl=args.ttl)
    worker = Worker(backend, args.resource, args.name, args.stamp)
    threading.Thread(target=read_commands, args=(worker,), daemon=True).start()
    reactor.callWhenRunning(log, args.name, "ready", pid=os.getpid())
    reactor.callWhenRunning(worker.compete)
    reactor.run()


if __name__ == "__main__":
    main()
