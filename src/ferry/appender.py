"""A file the reactor appends lines to without waiting on it: the trace, the JSON log.

A ``write`` to a file usually ends in the page cache within microseconds,
but not always: the kernel throttles a writer when too many pages are
dirty, a journal commit can hold the inode, a disk or NFS server that hangs
holds its writers for as long as it hangs, and a pipe nobody reads (a log
shipper that stopped) holds them for ever.  The trace and the ``--log``
file are written on every transition and every log event, from the reactor
thread, so one stuck append stalled every client, every export and the
lease's renewals -- and a client sending garbage made ferry log a warning
per connection, so it could fill a slow log on purpose.  Here the text goes
on a queue instead, and one thread of the file's own writes it, in order,
and flushes it.

The queue is bounded (:data:`QUEUE_LIMIT` characters), or a file that
takes nothing would cost unbounded memory.  Past the limit lines are
dropped, and a write that fails (ENOSPC, EIO) loses its lines; either is
said on stderr, once until a write works again, and ferry goes on: losing
a log line must not cost a client its write.  (A trace that lost lines no
longer replays whole.)

What a crash loses: a SIGKILL loses the text still on the queue, the last
microseconds' lines; the thread writes whole lines, in order, so a trace
still ends at a transition.  A process that exits normally writes
everything first (:meth:`Appender.close`, also at interpreter exit),
waiting at most :data:`CLOSE_WAIT` for a file that takes nothing.
"""

from __future__ import annotations

import atexit
import io
import queue
import sys
import threading
from typing import IO, Final

__all__ = ["CLOSE_WAIT", "QUEUE_LIMIT", "Appender"]

#: How long closing waits for the thread to write what is queued.
CLOSE_WAIT: Final = 5.0
#: Text queued and not yet written, at most (characters).
QUEUE_LIMIT: Final = 16 << 20

_STOP: Final = None


class Appender(io.TextIOBase):
    """``file`` (opened for appending), written by a thread of its own; see the module doc."""

    def __init__(self, file: IO[str], *, what: str, limit: int = QUEUE_LIMIT) -> None:
        super().__init__()
        self._file = file
        self._what = what
        self._limit = limit
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # characters on the queue
        self._losing = False  # lines are being lost: said once, until a write works again
        self.lost = 0  # lines lost in all, dropped at the limit or failed to write
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"ferry-{what}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def name(self) -> str:
        """``trace file PATH``: what the file is, and where."""
        path = getattr(self._file, "name", None)
        return self._what if path is None else f"{self._what} {path}"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        """Queue ``text`` (whole lines) for the thread.  Any thread may call this."""
        if self._closing:
            raise ValueError(f"{self._what} is closed")
        with self._lock:
            room = self._queued + len(text) <= self._limit
            if room:
                self._queued += len(text)
        if room:
            self._queue.put(text)
        else:
            self._lose(text, f"more than {self._limit} characters wait to be written")
        return len(text)

    def flush(self) -> None:
        """Nothing to do here: the thread flushes after each batch (see :meth:`drain`)."""

    def drain(self, timeout: float = CLOSE_WAIT) -> bool:
        """Wait until what was written before this call is on the file; False on timeout."""
        if not self._thread.is_alive():
            return False
        written = threading.Event()
        self._queue.put(written)
        return written.wait(timeout)

    def close(self) -> None:
        """Write what is queued (waiting at most :data:`CLOSE_WAIT`), then close the file."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        self._queue.put(_STOP)
        self._thread.join(CLOSE_WAIT)
        if not self._thread.is_alive():  # a file that takes nothing keeps its thread
            self._file.close()
        super().close()

    # -- on the appender's thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            batch: list[str] = []
            markers: list[threading.Event] = []
            item = self._queue.get()
            while True:  # everything queued meanwhile goes in one write
                if item is _STOP:
                    break
                if isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                text = "".join(batch)
                self._append(text)
                with self._lock:
                    self._queued -= len(text)
            for marker in markers:
                marker.set()
            if item is _STOP:
                return

    def _append(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError) as error:
            self._lose(text, str(getattr(error, "strerror", None) or error))
            return
        with self._lock:
            self._losing = False

    # -- on either ----------------------------------------------------------------------

    def _lose(self, text: str, why: str) -> None:
        with self._lock:
            self.lost += text.count("\n") or 1
            said, self._losing = self._losing, True
        if not said:
            print(f"ferry: {self.name}: {why}; lines are lost", file=sys.stderr)
