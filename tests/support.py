"""Test support shared by the suites: real ferry processes and real peers.

Everything waits on an event with a deadline (a log line, a port that
accepts, a process that exits); nothing sleeps to synchronise.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from ferry.status import parse_line

DEADLINE = 30.0
FERRY = [sys.executable, "-m", "ferry"]
# nbdsh is a Debian script that runs `python3 -m nbd`; the libnbd bindings
# live in Debian's Python, which may not be first on PATH.
NBDSH = ["/usr/bin/python3", "-m", "nbd"]


class Deadline:
    def __init__(self, seconds: float = DEADLINE) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def read_line(stream: IO[bytes], deadline: Deadline) -> bytes:
    """One line from a pipe, or b"" at EOF; TimeoutError past the deadline."""
    fd = stream.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], deadline.left())
        if not ready:
            raise TimeoutError(f"no complete line in time (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


class FerryProcess:
    """``ferry serve`` in a child process; knows its port once it says it serves.

    Every one started is remembered until :meth:`reap` (the integration
    tests' conftest calls it after each test, for the processes that test
    started), so a test that fails before it stops its processes does not
    leave them running into the next.
    """

    started: ClassVar[list[FerryProcess]] = []

    SERVING = re.compile(
        rb"(?:serving|listening for a migration of) .* on (?P<addr>\S+):(?P<port>\d+)"
    )

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        """``netns``: run it in that network namespace; ``wrap``: a command that runs it
        (``setpriv ... --``)."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.args = [*prefix, *wrap, *FERRY, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.log: list[str] = []
        self.port = 0
        FerryProcess.started.append(self)

    @classmethod
    def reap(cls, since: int = 0) -> list[str]:
        """Kill every process started since the ``since``-th that still runs; the command
        line of each one killed.  The earlier ones (a module's fixture) are kept."""
        killed = []
        for process in cls.started[since:]:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(timeout=DEADLINE)
                killed.append(" ".join(process.args))
        del cls.started[since:]
        return killed

    def wait_serving(self, deadline: Deadline | None = None) -> FerryProcess:
        deadline = deadline or Deadline()
        assert self.proc.stderr is not None
        while True:
            line = read_line(self.proc.stderr, deadline)
            if not line:
                self.proc.wait(timeout=deadline.left())
                raise RuntimeError(f"ferry exited {self.proc.returncode}: {''.join(self.log)}")
            self.log.append(line.decode(errors="replace"))
            match = self.SERVING.search(line)
            if match:
                self.port = int(match.group("port"))
                return self

    def wait_for_log(self, text: str, deadline: Deadline | None = None) -> str:
        """The first line logged from now on that contains ``text``."""
        deadline = deadline or Deadline()
        assert self.proc.stderr is not None
        while True:
            line = read_line(self.proc.stderr, deadline).decode(errors="replace")
            if not line:
                raise RuntimeError(f"ferry exited before logging {text!r}: {''.join(self.log)}")
            self.log.append(line)
            if text in line:
                return line

    def uri(self, name: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def metrics_url(self) -> str:
        """Where ``--metrics`` serves: the URL of the log line ``metrics at URL``."""
        for line in self.log:
            if match := re.search(r"metrics at (\S+)", line):
                return match.group(1)
        raise LookupError(f"no metrics line logged: {''.join(self.log)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return self.proc.returncode

    def stderr_text(self) -> str:
        """Everything logged so far, including after wait_serving (process must have exited)."""
        assert self.proc.stderr is not None
        rest = (
            self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        )
        return "".join(self.log) + rest


class ProxyProcess(FerryProcess):
    """``ferry proxy`` in a child process; knows its port once it says it is proxying."""

    SERVING = re.compile(rb"proxying .* on (?P<addr>\S+):(?P<port>\d+) to ")

    def status(self, sock: Path) -> dict[str, str]:
        return parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())

    def wait_status(
        self, sock: Path, check: Callable[[dict[str, str]], bool], deadline: float = 60
    ) -> dict[str, str]:
        """The status line once ``check`` holds, polled until ``deadline``: each poll asks anew."""
        until = Deadline(deadline)
        while True:
            status = self.status(sock)
            if check(status):
                return status
            if until.expired():
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"status never matched: {status}\n{self.stderr_text()}")
            try:
                self.proc.wait(timeout=0.05)  # a pause that notices the proxy dying
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"the proxy exited: {self.stderr_text()}")


def serve_args(image: Path, *extra: str, mode: str = "serve") -> list[str]:
    """The arguments of ``ferry serve`` (or ``listen``) of ``image`` on a free loopback port."""
    return [mode, "--addr", "127.0.0.1", "--port", "0", "--file", str(image), *extra]


def serve(
    image: Path, *extra: str, env: dict[str, str] | None = None, mode: str = "serve"
) -> FerryProcess:
    """``ferry serve`` (or ``mode``: ``listen``) of ``image`` on a free loopback port."""
    return FerryProcess(serve_args(image, *extra, mode=mode), env=env).wait_serving()


def status(sock: Path) -> dict[str, str]:
    """The status line of the ferry at control socket ``sock``, field by field."""
    from ferry.status import parse_line

    return parse_line(run([*FERRY, "status", "--sock", str(sock)]).stdout.decode())


def mirror_command(port: int, sock: Path, *extra: str) -> list[str]:
    """``ferry mirror`` of the server at control socket ``sock`` to ``127.0.0.1:port``."""
    return [
        *FERRY,
        "mirror",
        "--addr",
        "127.0.0.1",
        "--port",
        str(port),
        "--sock",
        str(sock),
        *extra,
    ]


def run(
    cmd: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout[-2000:]!r}\n"
            f"stderr: {result.stderr[-2000:]!r}"
        )
    return result


def nbdsh(
    uri: str, script: str, *, base_allocation: bool = False, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    extra = ["--base-allocation"] if base_allocation else []
    return run([*NBDSH, *extra, "-u", uri, "-c", script], **kwargs)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """Incompressible, reproducible content (no /dev/urandom: reruns must match)."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def sparse_file(path: Path, size: int, data_at: Sequence[tuple[int, int]] = ()) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_at:
            f.seek(offset)
            f.write(b"\xa5" * length)
    return path


def connect_raw(port: int, deadline: Deadline | None = None) -> socket.socket:
    deadline = deadline or Deadline()
    sock = socket.create_connection(("127.0.0.1", port), timeout=deadline.left())
    return sock


# -- peer servers (qemu-nbd, nbdkit, nbd-server) --------------------------------


def free_port() -> int:
    """A port nothing listens on now (a peer that loses the race is restarted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something LISTENs on ``port``, asked of the kernel, not by connecting.

    (Connecting would use up nbd-server -d's only connection.)
    """
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def start_peer(
    argv_for: Callable[[int], list[str]],
    log: Path,
    *,
    probe: Callable[[int], bool] = listening,
    deadline: float = DEADLINE,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free port and wait until ``probe`` says it is ready.

    If it exits first (most likely someone took the port meanwhile), try
    again on another port, three times at most.
    """
    for _ in range(3):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv_for(port), stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        until = Deadline(deadline)
        while not until.expired():
            if probe(port):
                return proc, port
            try:
                proc.wait(timeout=0.02)  # the pause doubles as a liveness check
            except subprocess.TimeoutExpired:
                continue
            break
        else:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{argv_for(port)[0]} not ready in {deadline} s")
    raise RuntimeError(f"{argv_for(0)[0]} never listened: {log.read_text()[-2000:]}")


def stop_peer(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- a daemon and its writers -------------------------------------------------------


def daemon(config: Path, *, env: dict[str, str] | None = None) -> FerryProcess:
    """``ferry daemon --config CONFIG``, once it logs that every export serves.

    Its port is the one the ``ready: N exports on ADDR:PORT`` line names.
    """
    process = FerryProcess(["daemon", "--config", str(config)], env=env)
    line = process.wait_for_log("ready: ")
    match = re.search(r" on \S+:(\d+)", line)
    assert match, line
    process.port = int(match.group(1))
    return process


WORKLOAD = Path(__file__).resolve().parent / "workload.py"


class Writers:
    """libnbd clients writing the checkable workload (``workload.py``) until stopped.

    Each URI gets one client that owns every block of its export.
    """

    def __init__(self, uris: dict[str, str], blocks: int, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.clients = {
            name: subprocess.Popen(
                ["/usr/bin/python3", str(WORKLOAD), uri, "0", "1", str(blocks), str(stop_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for name, uri in uris.items()
        }

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop every client; each one's report (``ended``, ``writes``, ``acked``...)."""
        import json

        self.stop_file.touch()
        reports = {}
        for name, client in self.clients.items():
            stdout, stderr = client.communicate(timeout=DEADLINE)
            assert client.returncode == 0, f"{name}: {stderr.decode()}"
            reports[name] = json.loads(stdout)
        return reports


def check_acked(report: dict[str, Any], image: bytes) -> None:
    """Every write ``report`` says was acknowledged is in ``image`` (or a later one of it),
    and there was one."""
    from workload import lost_writes

    assert report["acked"], f"client {report['client']} had no write acknowledged"
    assert lost_writes(image, report) == []


def wait_until(what: str, check: Callable[[], bool], deadline: Deadline | None = None) -> None:
    """Poll ``check`` until it holds; AssertionError naming ``what`` past the deadline."""
    deadline = deadline or Deadline()
    while not check():
        if deadline.expired():
            raise AssertionError(f"not in time: {what}")
        time.sleep(0.02)  # polling the condition itself, not waiting in its place


class QemuIo:
    """``qemu-io`` on one NBD connection, fed write-then-verify pairs until told to stop."""

    SLOTS = 64
    SLOT = 65536

    def __init__(self, prefix: list[str], uri: str, offset: int) -> None:
        """``prefix`` runs it elsewhere (``ip netns exec HOST``); it works on the 64
        slots of 64 KiB from ``offset``, a pattern byte each pair."""
        self.proc = subprocess.Popen(
            [*prefix, "qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.offset = offset
        self.pairs = 0
        self._stop = threading.Event()
        self._output: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._feed, daemon=True)
        self._writer.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._output.append(line)

    def _feed(self) -> None:
        assert self.proc.stdin is not None
        try:
            while not self._stop.is_set():
                pattern = self.pattern(self.pairs)
                at = self.offset + (self.pairs % self.SLOTS) * self.SLOT
                self.proc.stdin.write(
                    f"write -P {pattern} {at} 64k\nread -P {pattern} {at} 64k\n".encode()
                )
                self.proc.stdin.flush()
                self.pairs += 1
                # One pair at a time: qemu-io reads its commands as it runs them.
                self._stop.wait(0.005)
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    @staticmethod
    def pattern(pair: int) -> int:
        return pair % 251 + 1

    def last_written(self) -> dict[int, bytes]:
        """What each slot it wrote holds last, by offset (once it has finished)."""
        last = {}
        for pair in range(max(0, self.pairs - self.SLOTS), self.pairs):
            at = self.offset + (pair % self.SLOTS) * self.SLOT
            last[at] = bytes([self.pattern(pair)]) * self.SLOT
        return last

    def finish(self) -> str:
        self._stop.set()
        self._writer.join(30)
        self.proc.wait(60)
        self._reader.join(30)
        return b"".join(self._output).decode(errors="replace")
