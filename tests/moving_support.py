"""A source and a destination ferry on two hosts (network namespaces), for tests and benchmarks.

:func:`start_hosts` starts ``ferry serve`` on the source host and ``ferry
listen`` on the destination host of a :class:`~handoff_support.Lan`, both
with the service address (``handoff_support.SERVICE``) and a local
lockspace of the test's own; clients run in the LAN's hosts named
``client…`` and reach the image at ``URI``, wherever it is served from.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from handoff_support import SERVICE, SERVICE_IP, SERVICE_PORT, Lan
from support import FERRY, FerryProcess, random_file, run, sparse_file, status
from workload import BLOCK

MiB = 1 << 20
URI = f"nbd://{SERVICE_IP}:{SERVICE_PORT}/"
WORKLOAD = Path(__file__).resolve().parent / "workload.py"


@dataclass
class Hosts:
    """A source and a destination ferry on two hosts, and where their clients run."""

    lan: Lan
    tmp: Path
    source_image: Path
    dest_image: Path
    source: FerryProcess
    dest: FerryProcess
    size: int
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def source_sock(self) -> Path:
        return self.tmp / "source.sock"

    @property
    def dest_sock(self) -> Path:
        return self.tmp / "dest.sock"

    def status(self, sock: Path) -> dict[str, str]:
        return status(sock)

    def writer(
        self, client: int, clients: int, stop: Path, depth: int = 16, span: int | None = None
    ) -> None:
        """A checkable libnbd writer (``tests/workload.py``), ``depth`` writes in flight,
        among the first ``span`` bytes (the whole image by default)."""
        blocks = (self.size if span is None else span) // BLOCK
        args = [str(WORKLOAD), URI, str(client), str(clients), str(blocks), str(stop), str(depth)]
        self.client(args)

    def client(self, args: Sequence[str], host: str = "client") -> None:
        """A script run by Debian's Python (libnbd's bindings) in a clients' host."""
        self.clients.append(
            subprocess.Popen(
                [*self.in_client_host(host), "/usr/bin/python3", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )

    def in_client_host(self, host: str = "client") -> list[str]:
        return ["ip", "netns", "exec", self.lan[host].netns]

    def mirror_command(self) -> list[str]:
        """``ferry mirror --wait`` to the destination host, from the source's control socket."""
        return [
            *FERRY,
            "mirror",
            "--sock",
            str(self.source_sock),
            "--addr",
            self.lan["destination"].address,
            "--port",
            str(SERVICE_PORT),
            "--action",
            "nothing",
            "--wait",
        ]

    def mirror(self) -> subprocess.CompletedProcess[bytes]:
        return run(self.mirror_command(), timeout=120, check=False)

    def finish(self, stop: Path) -> list[dict[str, object]]:
        """Tell the clients to stop, collect their reports, stop both ferries -- whatever fails."""
        stop.touch()
        try:
            reports = []
            for client in self.clients:
                stdout, stderr = client.communicate(timeout=60)
                assert client.returncode == 0, stderr.decode()
                reports.append(json.loads(stdout))
            return reports
        finally:
            self.stop()

    def stop(self) -> None:
        for client in self.clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        for process in (self.source, self.dest):
            if process.proc.poll() is None:
                process.stop()


def start_hosts(
    lan: Lan,
    tmp: Path,
    *,
    size: int = 64 * MiB,
    dest_wrap: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Hosts:
    """Both ferries, serving and listening; the destination run by ``dest_wrap`` (``setpriv``)
    with ``env``."""
    source_image = random_file(tmp / "source.img", size, seed=11)
    dest_image = sparse_file(tmp / "dest.img", size)
    locks = tmp / "locks"
    locks.mkdir(mode=0o700)
    common = [
        "--port",
        str(SERVICE_PORT),
        "--service-address",
        SERVICE,
        "--lockspace",
        f"local:{locks}",
    ]
    source = FerryProcess(
        [
            "serve",
            "--addr",
            lan["source"].address,
            "--file",
            str(source_image),
            "--sock",
            str(tmp / "source.sock"),
            *common,
        ],
        netns=lan["source"].netns,
    ).wait_serving()
    try:
        dest = FerryProcess(
            [
                "listen",
                "--addr",
                lan["destination"].address,
                "--file",
                str(dest_image),
                "--sock",
                str(tmp / "dest.sock"),
                *common,
                # Who may talk to it: the source (as the sender) and the clients.
                lan["source"].address,
                *(host.address for name, host in lan.hosts.items() if name.startswith("client")),
            ],
            netns=lan["destination"].netns,
            wrap=dest_wrap,
            env=env,
        ).wait_serving()
    except BaseException:
        source.stop()
        raise
    return Hosts(lan, tmp, source_image, dest_image, source, dest, size)


def written_since(image: Path, reference: Path) -> bool:
    """Some block of ``image`` differs from ``reference``'s: a client wrote it."""
    with image.open("rb") as a, reference.open("rb") as b:
        while chunk := a.read(8 * MiB):
            if chunk != b.read(len(chunk)):
                return True
    return False
