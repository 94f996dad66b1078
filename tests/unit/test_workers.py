"""ferry.workers.WorkerPool: every job runs once on a thread, its Deferred fires on the
reactor thread (here: the test's, draining what the threads hand back), idle threads are
reused rather than multiplied, and stop ends them once no job is left."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from twisted.python.failure import Failure

from ferry.workers import WorkerPool

DEADLINE = 10.0


class ThreadCalls:
    """A reactor's callFromThread: the calls wait here until the test thread runs them."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.calls.put(lambda: f(*args))

    def run_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.calls.get(timeout=DEADLINE)()


def has_length(items: list[str], n: int) -> bool:
    return len(items) == n


def test_every_job_answers_with_its_result_or_its_exception() -> None:
    reactor = ThreadCalls()
    pool = WorkerPool(reactor, 3)
    results: dict[int, object] = {}

    def job(n: int) -> int:
        if n % 7 == 0:
            raise ValueError(n)
        return n * n

    def answered(n: int, value: object) -> None:
        results[n] = value.value if isinstance(value, Failure) else value

    for n in range(200):
        pool(partial(job, n)).addBoth(partial(answered, n))
    reactor.run_until(lambda: len(results) == 200)
    for n in range(200):
        if n % 7 == 0:
            error = results[n]
            assert isinstance(error, ValueError) and error.args == (n,)
        else:
            assert results[n] == n * n
    assert 1 <= pool.threads <= 3
    pool.stop()


def test_jobs_one_after_another_reuse_one_thread() -> None:
    reactor = ThreadCalls()
    pool = WorkerPool(reactor, 8)
    names: list[str] = []
    for n in range(1, 51):
        d = pool(lambda: threading.current_thread().name)
        d.addCallback(names.append)
        reactor.run_until(partial(has_length, names, n))
    assert pool.threads == 1
    assert set(names) == {"ferry-worker-0"}
    pool.stop()


def test_no_more_threads_than_its_size_however_many_jobs_block() -> None:
    reactor = ThreadCalls()
    pool = WorkerPool(reactor, 2)
    release = threading.Event()
    answered: list[object] = []
    for _ in range(6):
        pool(lambda: release.wait(DEADLINE)).addCallback(answered.append)
    assert pool.threads == 2
    release.set()
    reactor.run_until(lambda: len(answered) == 6)
    assert answered == [True] * 6
    pool.stop()


def test_stop_runs_what_was_queued_then_ends_the_threads() -> None:
    reactor = ThreadCalls()
    pool = WorkerPool(reactor, 2)
    release = threading.Event()
    answered: list[int] = []

    def job(n: int) -> int:
        release.wait(DEADLINE)
        return n

    for n in range(5):
        pool(partial(job, n)).addCallback(answered.append)
    pool.stop()
    with pytest.raises(RuntimeError):
        pool(lambda: None)
    release.set()
    reactor.run_until(lambda: len(answered) == 5)
    assert sorted(answered) == [0, 1, 2, 3, 4]
    for thread in threading.enumerate():
        if thread.name.startswith("ferry-worker-"):
            thread.join(DEADLINE)
            assert not thread.is_alive()
