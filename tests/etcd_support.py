"""A real etcd for the lease tests: started, paused, restarted and stopped by the test.

It is Debian's ``etcd-server`` (``/usr/bin/etcd``, 3.4 on bookworm), run as a
one-member cluster on free loopback ports with its own data directory, so it
never meets a system etcd the package may have set up.  Readiness is its
``/health`` answer, polled until a deadline; nothing sleeps to synchronise.

The member runs with a 10 ms heartbeat and a 100 ms election timeout.  etcd
derives its minimum lease TTL from those (1.5 election timeouts, rounded up
to a whole second): 1 s here instead of the default 2 s, which keeps the
expiry tests short.

With ``tls`` (a certificate directory from ``tls_support``) the member
serves ``https://`` only and requires a client certificate from the
directory's CA (``--client-cert-auth``); the harness uses the directory's
client pair itself.  :meth:`EtcdServer.enable_auth` turns etcd's
authentication on, with a root user for the harness and a user that may
read and write ferry's prefix only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from support import DEADLINE, Deadline, free_port

ETCD = Path("/usr/bin/etcd")
HOST = "127.0.0.1"
FAST_RAFT = ["--heartbeat-interval", "10", "--election-timeout", "100"]
MIN_TTL = 1  # seconds, with FAST_RAFT (2 with etcd's defaults)


ROOT_PASSWORD = "root-secret"  # the harness's own etcd user (a test etcd, never a real one)


class EtcdServer:
    """One etcd member in a child process, on ports it keeps across restarts."""

    def __init__(self, root: Path, *, tls: Path | None = None) -> None:
        self.root = root
        self.tls = tls
        self._token: str | None = None  # the root user's, once auth is enabled
        self.data_dir = root / "data"
        self.log = root / "etcd.log"
        self.client_port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """The client URL, as an ``EtcdLockspace`` endpoint."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{HOST}:{self.client_port}"

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls / "ca-cert.pem"))
        context.load_cert_chain(self.tls / "client-cert.pem", self.tls / "client-key.pem")
        return context

    def argv(self) -> list[str]:
        peer = f"http://{HOST}:{self.peer_port}"
        return [
            str(ETCD),
            "--name=ferry-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=ferry-test={peer}",
            "--initial-cluster-state=new",
            *FAST_RAFT,
            *self._tls_args(),
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls / 'server-cert.pem'}",
            f"--key-file={self.tls / 'server-key.pem'}",
            f"--trusted-ca-file={self.tls / 'ca-cert.pem'}",
            "--client-cert-auth",
        ]

    def enable_auth(self, user: str, password: str, prefix: str = "/ferry/leases/") -> None:
        """Turn authentication on: ``user`` may read and write ``prefix``, nothing else."""
        key = prefix.encode()
        end = key[:-1] + bytes([key[-1] + 1])
        for path, payload in (
            ("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": "ferry"}),
            (
                "/v3/auth/role/grant",
                {
                    "name": "ferry",
                    "perm": {
                        "permType": "READWRITE",
                        "key": base64.b64encode(key).decode(),
                        "range_end": base64.b64encode(end).decode(),
                    },
                },
            ),
            ("/v3/auth/user/add", {"name": user, "password": password}),
            ("/v3/auth/user/grant", {"user": user, "role": "ferry"}),
            ("/v3/auth/enable", {}),
        ):
            self._post(path, payload)
        self._token = self._post(
            "/v3/auth/authenticate", {"name": "root", "password": ROOT_PASSWORD}
        )["token"]

    def change_password(self, user: str, password: str) -> None:
        """Set ``user``'s password (etcd then forgets every token it gave that user)."""
        self._post("/v3/auth/user/changepw", {"name": user, "password": password})

    def start(self, deadline: float = DEADLINE) -> EtcdServer:
        """Start on new free ports (a few tries: another process may take a port first)."""
        for _ in range(3):
            self.client_port, self.peer_port = free_port(), free_port()
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self._spawn_and_wait(Deadline(deadline)):
                return self
        raise RuntimeError(f"etcd did not start: {self.log_tail()}")

    def restart(self, deadline: float = DEADLINE) -> None:
        """Stop and start again on the same ports and data: leases and keys survive."""
        self.stop()
        if not self._spawn_and_wait(Deadline(deadline)):
            raise RuntimeError(f"etcd did not restart: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self._paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nobody answers.

        Returns once every thread of etcd has stopped: ``kill`` returns
        before a thread running on another core has, and under load a
        request sent at once was answered in that window.
        """
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True
        tasks = f"/proc/{self.proc.pid}/task"
        deadline = time.monotonic() + 30
        while not all(_stopped(f"{tasks}/{tid}/stat") for tid in os.listdir(tasks)):
            if time.monotonic() > deadline:
                raise AssertionError("etcd did not stop within 30 s of SIGSTOP")
            time.sleep(0.001)  # polling the threads' state itself

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (which it answers)."""
        header = self._post("/v3/kv/range", {"key": "AA=="})["header"]  # the key b"\x00"
        revision = int(header["revision"])
        self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def watchers(self) -> int:
        """How many watchers etcd has now (its ``etcd_debugging_mvcc_watcher_total`` gauge)."""
        metrics = f"{self.url}/metrics"
        with urllib.request.urlopen(metrics, timeout=DEADLINE, context=self._context()) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return int(float(line.split()[1]))
        raise RuntimeError("etcd's /metrics has no watcher gauge")

    def wait_for_watchers(self, at_least: int, deadline: float = DEADLINE) -> None:
        """Block until etcd has ``at_least`` watchers (run it in a thread, not on the reactor)."""
        until = Deadline(deadline)
        while self.watchers() < at_least:
            if until.expired():
                raise TimeoutError(f"etcd never had {at_least} watchers")
            assert self.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.02)  # a pause that notices etcd dying

    def _post(self, path: str, payload: dict[str, object]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(payload).encode())
        if self._token is not None:
            request.add_header("Authorization", self._token)
        with urllib.request.urlopen(request, timeout=DEADLINE, context=self._context()) as answer:
            result: dict[str, Any] = json.load(answer)
            return result

    def healthy(self) -> bool:
        try:
            health = f"{self.url}/health"
            with urllib.request.urlopen(health, timeout=1, context=self._context()) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def _spawn_and_wait(self, deadline: Deadline) -> bool:
        """Run etcd and wait until it is healthy (True) or has exited (False)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env
            )
        while not deadline.expired():
            if self.healthy():
                return True
            try:
                self.proc.wait(timeout=0.02)  # the pause doubles as a liveness check
            except subprocess.TimeoutExpired:
                continue
            self.proc = None
            return False
        self.stop()
        raise RuntimeError(f"etcd not healthy in time: {self.log_tail()}")


@pytest.fixture(scope="module", name="etcd")
def etcd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd per test module, stopped (and resumed first if paused) at the end."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield server
    finally:
        server.stop()


def _stopped(stat: str) -> bool:
    """The thread whose ``/proc/.../stat`` this is has stopped (or is gone)."""
    try:
        with open(stat) as file:
            text = file.read()
    except FileNotFoundError:
        return True
    return text.rsplit(")", 1)[1].split()[0] in ("T", "t")
