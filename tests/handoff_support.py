"""Network namespaces as hosts on a LAN, and the handoff worker processes, for tests and benchmarks.

:class:`Lan` makes a switch (a namespace holding a bridge) and a namespace
per host, each with an ``eth0`` cabled to the bridge and an address on one
/24; closing it deletes every namespace, which takes the interfaces with
them.  Names start with ``fh-`` (the handoff worktree's prefix) and carry
the process id, so parallel runs do not meet.  :class:`Worker` runs
``tests/handoff_worker.py`` in a namespace (or here) and reads its JSON
lines with a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import Deadline, read_line

WORKER = [sys.executable, str(Path(__file__).with_name("handoff_worker.py"))]
_serial = itertools.count()


def unique(kind: str) -> str:
    """A name for something global this run creates: ``fh-<kind>-<pid>-<n>``."""
    return f"fh-{kind}-{os.getpid()}-{next(_serial)}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    netns: str
    address: str  # on eth0, without the prefix length


@dataclass
class Lan:
    """Hosts on one bridge: ``Lan.make(["source", "destination", "client"])``."""

    switch: str
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: str = "10.77.0"

    @classmethod
    def make(cls, names: Sequence[str], subnet: str = "10.77.0") -> Lan:
        lan = cls(unique("lan"), subnet=subnet)
        ip("netns", "add", lan.switch)
        try:
            ip("-n", lan.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", lan.switch, "link", "set", "br0", "up")
            for number, name in enumerate(names, start=1):
                lan._add_host(name, number)
        except BaseException:
            lan.close()
            raise
        return lan

    def _add_host(self, name: str, number: int) -> None:
        host = Host(name, unique(name[:4]), f"{self.subnet}.{number}")
        ip("netns", "add", host.netns)
        self.hosts[name] = host
        port = f"port{number}"
        ip(
            "-n",
            host.netns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            port,
            "netns",
            self.switch,
        )
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        for netns in [*(h.netns for h in self.hosts.values()), self.switch]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self.hosts.clear()


def netns_exists(name: str) -> bool:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return any(line.split()[0] == name for line in listed.stdout.splitlines() if line.strip())


class WorkerFailed(AssertionError):
    pass


class Worker:
    """One ``handoff_worker.py`` process; :meth:`expect` reads its events in order."""

    def __init__(self, args: Sequence[str], *, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.args = [*prefix, *WORKER, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, deadline: Deadline | None = None) -> dict[str, Any]:
        """The next event named ``event``; an ``error`` event or an exit before it fails."""
        deadline = deadline or Deadline()
        assert self.proc.stdout is not None
        while True:
            try:
                line = read_line(self.proc.stdout, deadline)
            except TimeoutError:
                raise WorkerFailed(f"no {event!r} from {self.args} in time{self._tail()}") from None
            if not line:
                raise WorkerFailed(f"{self.args} ended before {event!r}{self._tail()}")
            message = json.loads(line)
            self.events.append(message)
            if message["event"] == event:
                return dict(message)
            if message["event"] == "error":
                raise WorkerFailed(f"{self.args}: {message}{self._tail()}")

    def _tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return ":\n" + self.proc.stderr.read().decode(errors="replace")[-3000:]

    def finish(self, timeout: float = 30.0) -> int:
        """Close its stdin (``exit`` for a server, ``stop`` for a client) and reap it."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def stderr_text(self) -> str:
        if self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")


# -- the echo scenario across hosts, shared by the tests and the benchmark ----------------------

SERVICE_IP = "10.77.0.100"
SERVICE = f"{SERVICE_IP}/24@eth0"
SERVICE_PORT = 10809


def start_source_and_destination(lan: Lan, clients: int) -> tuple[Worker, Worker]:
    """The source host holding the service address and serving ``clients`` echo connections
    on it, and the destination host ready to restore them; both have said ``ready``.
    """
    ip("-n", lan["source"].netns, "addr", "add", f"{SERVICE_IP}/24", "dev", "eth0")
    source = Worker(
        [
            "server",
            "--listen",
            f"{SERVICE_IP}:{SERVICE_PORT}",
            "--clients",
            str(clients),
            "--freeze-table",
            unique("frz"),
            "--service",
            SERVICE,
        ],
        netns=lan["source"].netns,
    )
    destination = Worker(
        [
            "server",
            "--restore",
            "--freeze-table",
            unique("frz"),
            "--service",
            SERVICE,
            "--announce",
        ],
        netns=lan["destination"].netns,
    )
    try:
        source.expect("ready")
        destination.expect("ready")
    except BaseException:
        source.finish()
        destination.finish()
        raise
    return source, destination


def start_client(
    connect: str, clients: int, *, interval: float | None = None, netns: str | None = None
) -> Worker:
    """An echo client with ``clients`` connections to ``connect`` (IP:PORT)."""
    args = ["client", "--connect", connect, "--clients", str(clients)]
    if interval is not None:
        args += ["--interval", str(interval)]
    return Worker(args, netns=netns)
