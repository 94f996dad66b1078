#!/usr/bin/env python3
"""Data-plane benchmark: ferry against qemu-nbd, nbdkit and nbd-server.

One random image file is created once; each server in turn serves that same file on a free
loopback port and the same workloads run against it (nbdcopy sequential read and write, fio
4 KiB random read and write at iodepth 16 and 1, and from four clients at once). The result is a
table with one row per workload, one column per server and ferry's ratio to the best peer. See
benchmarks/README.md.

    python benchmarks/run.py [--size 1G] [--runtime 10] [--servers ferry,qemu-nbd,...] [--json OUT]
                             [--idle-connections N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_WORKDIR = BENCH_DIR / ".work"

FERRY = "ferry"
PEERS = ("qemu-nbd", "nbdkit", "nbd-server")
ALL_SERVERS = (FERRY, *PEERS)
NBD_SERVER_EXPORT = "bench"  # nbd-server addresses exports by config section name

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
NBD_MAGIC = b"NBDMAGIC"
READY_TIMEOUT = 30.0  # seconds for a server to answer the NBD greeting
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.02  # seconds between two readiness or exit checks
FIO_GRACE = 60.0  # seconds a fio job may overrun --runtime before it is killed
PR_SET_CHILD_SUBREAPER = 36
NOISY_PERCENT = 10.0  # other processes' CPU (% of one core) above which a run is flagged


class BenchError(Exception):
    """A server or workload failed; the message goes into the report."""


# ---------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    """`1G`, `512M`, `1GiB`, `4096` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 1G, 512M, 1073741824)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match[2].lower()]
    size = int(match[1]) << shift
    if size < MiB or size % (4 * KiB):
        raise argparse.ArgumentTypeError("size must be at least 1M and a multiple of 4K")
    return size


def parse_servers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_SERVERS]
    if unknown or not names:
        bad = ", ".join(unknown) or "(none)"
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {bad}; choose from {','.join(ALL_SERVERS)}"
        )
    return list(dict.fromkeys(names))


def human_size(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def shell_join(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " | ".join(text.splitlines()[-lines:])


def output_tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    """A free loopback port (the kernel's choice; the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def become_subreaper() -> bool:
    """Adopt orphaned descendants (nbd-server daemonizes) so we can reap and time them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_orphans() -> None:
    """Reap adopted processes that have exited (call only when no Popen is running)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def tree_cpu_seconds(root: int) -> float | None:
    """CPU time (user + system) of ROOT and all its descendants, live, zombie or reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        if fields is None:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        # utime, stime, cutime, cstime: own time plus that of reaped children
        cpu[pid] = sum(int(value) for value in fields[11:15])
    if root not in cpu:
        return None
    total = 0
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total / ticks


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle (steal included) since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal (guest time is inside user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the clients)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def sync_image(image: Path) -> None:
    """Write back dirty pages of the image (they stay cached) so no workload pays for another."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_image(path: Path, size: int) -> float:
    """Fill PATH with SIZE random bytes; returns the seconds it took."""
    start = time.perf_counter()
    chunk = 8 * MiB
    with path.open("wb") as image:
        left = size
        while left:
            count = min(chunk, left)
            image.write(os.urandom(count))
            left -= count
        image.flush()
        os.fsync(image.fileno())
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- servers


@dataclass
class ServerSetup:
    """How to start one server on the image: command line, export name, daemon pid file."""

    name: str
    argv: list[str]
    export: str
    port: int
    log: Path
    pidfile: Path | None = None  # set when the command daemonizes and writes its pid here
    config: str | None = None  # generated configuration file, for the report

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}/{self.export}"


def find_ferry() -> str:
    """The `ferry` of the Python that runs this script, else the one on PATH."""
    beside = Path(sys.executable).with_name("ferry")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ferry")
    if found is None:
        raise BenchError("no `ferry` command (pip install -e . in the repository)")
    return found


def require_tool(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise BenchError(f"`{tool}` is not installed")
    return tool


def server_setup(name: str, image: Path, port: int, tmp: Path) -> ServerSetup:
    log_path = tmp / f"{name}.log"
    if name == FERRY:
        argv = [find_ferry(), "serve", "--addr", HOST, "--port", str(port), "--file", str(image)]
        return ServerSetup(name, argv, "", port, log_path)
    if name == "qemu-nbd":
        argv = [
            require_tool("qemu-nbd"),
            "--format=raw",
            "--persistent",  # -t: keep serving after the last client leaves
            "--shared=16",  # -e 16: up to 16 simultaneous clients (nbdcopy multi-conn, fio)
            "--export-name=",
            f"--bind={HOST}",
            f"--port={port}",
            "--cache=writeback",  # the default, stated: page cache, no O_DIRECT
            "--aio=threads",  # the default with writeback
            str(image),
        ]
        return ServerSetup(name, argv, "", port, log_path)
    if name == "nbdkit":
        argv = [
            require_tool("nbdkit"),
            "--foreground",
            "--exit-with-parent",
            f"--ipaddr={HOST}",
            f"--port={port}",
            "file",
            f"file={image}",
        ]
        return ServerSetup(name, argv, "", port, log_path)
    if name == "nbd-server":
        # `nbd-server -d` (no fork) serves exactly one connection and then exits, which
        # rules out multi-conn and several workloads per start; so it runs as the daemon it
        # normally is (one forked process per client) and is stopped through its pid file.
        config = tmp / "nbd-server.conf"
        pidfile = tmp / "nbd-server.pid"
        text = (
            "[generic]\n"
            f"listenaddr = {HOST}\n"
            f"port = {port}\n"
            "allowlist = true\n"
            f"[{NBD_SERVER_EXPORT}]\n"
            f"exportname = {image}\n"
        )
        config.write_text(text)
        argv = [require_tool("nbd-server"), "-C", str(config), "-p", str(pidfile)]
        return ServerSetup(name, argv, NBD_SERVER_EXPORT, port, log_path, pidfile, text)
    raise BenchError(f"unknown server {name}")


class ServerProcess:
    """A running server: start it, wait for its NBD greeting, measure its CPU, stop it."""

    def __init__(self, setup: ServerSetup, adopted: bool) -> None:
        self.setup = setup
        self.adopted = adopted  # we are the subreaper, so a daemonized server is our child
        self.popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.exit_status: int | None = None

    # -- start

    def start(self) -> float:
        """Start the server and wait until it greets; returns the seconds that took."""
        setup = self.setup
        started = time.monotonic()
        deadline = started + READY_TIMEOUT
        with setup.log.open("wb") as log_file:
            try:
                self.popen = subprocess.Popen(
                    setup.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # our own process group, killed as one if needed
                )
            except OSError as exc:
                raise BenchError(f"cannot run {setup.argv[0]}: {exc}") from exc
        if setup.pidfile is None:
            self.pid = self.popen.pid
        else:
            self.pid = self._daemon_pid(deadline)
        self._wait_for_greeting(deadline)
        return time.monotonic() - started

    def _daemon_pid(self, deadline: float) -> int:
        assert self.popen is not None and self.setup.pidfile is not None
        try:
            status = self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise BenchError("the launcher did not daemonize") from exc
        if status != 0:
            raise BenchError(f"exited with status {status}: {tail(self.setup.log) or 'no output'}")
        while True:
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.setup.pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(self.setup.pidfile).encode() in cmdline:  # really the one we started
                    return pid
            if time.monotonic() >= deadline:
                raise BenchError(f"no pid in {self.setup.pidfile}: {tail(self.setup.log)}")
            time.sleep(POLL_INTERVAL)

    def _wait_for_greeting(self, deadline: float) -> None:
        """Poll-connect until the server sends the NBD greeting (or dies, or time is up)."""
        last = "nothing tried"
        while True:
            if self.exited():
                output = tail(self.setup.log) or "no output"
                raise BenchError(
                    f"exited with status {self.exit_status} before serving NBD: {output}"
                )
            try:
                with socket.create_connection((HOST, self.setup.port), timeout=1.0) as sock:
                    sock.settimeout(max(0.2, min(2.0, deadline - time.monotonic())))
                    greeting = b""
                    while len(greeting) < len(NBD_MAGIC):
                        data = sock.recv(len(NBD_MAGIC) - len(greeting))
                        if not data:
                            break
                        greeting += data
                if greeting == NBD_MAGIC:
                    return
                if greeting:
                    raise BenchError(f"port {self.setup.port} answered {greeting!r}, not NBD")
                last = "connection closed before the greeting"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"no NBD greeting on {HOST}:{self.setup.port} within {READY_TIMEOUT:g} s"
                    f" ({last}); log: {tail(self.setup.log) or 'empty'}"
                )
            time.sleep(POLL_INTERVAL)

    # -- state

    def exited(self) -> bool:
        """True once the server process is gone (and reaped where it is ours)."""
        if self.exit_status is not None:
            return True
        if self.pid is None:
            return self.popen is not None and self.popen.poll() is not None
        if self.setup.pidfile is None:
            assert self.popen is not None
            status = self.popen.poll()
            if status is not None:
                self.exit_status = status
            return status is not None
        if self.adopted:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return False
                self.exit_status = os.waitstatus_to_exitcode(status)
                return True
        fields = proc_stat(self.pid)
        if fields is None or fields[0] in ("Z", "X"):
            self.exit_status = -1  # not our child: status unknown
            return True
        return False

    def cpu_seconds(self) -> float | None:
        return None if self.pid is None or self.exited() else tree_cpu_seconds(self.pid)

    # -- stop

    def stop(self) -> str:
        """SIGTERM, wait, SIGKILL the process group after STOP_TIMEOUT; describes the end."""
        if self.pid is None:
            if self.popen is not None and self.popen.poll() is None:
                self._kill_group(self.popen.pid)
                self.popen.wait()
            return "not started"
        if self.exited():
            return f"had already exited with status {self.exit_status}"
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if self._wait_exit(time.monotonic() + STOP_TIMEOUT):
            return f"stopped by SIGTERM, exit status {self.exit_status}"
        self._kill_group(self.pid)
        self._wait_exit(time.monotonic() + STOP_TIMEOUT)
        return f"did not stop within {STOP_TIMEOUT:g} s of SIGTERM; killed"

    def _wait_exit(self, deadline: float) -> bool:
        if self.setup.pidfile is None and self.popen is not None:
            try:
                self.exit_status = self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                return True
            except subprocess.TimeoutExpired:
                return False
        while not self.exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    @staticmethod
    def _kill_group(pid: int) -> None:
        # the server leads its own session (start_new_session, or setsid in daemon(3))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def probe_export(uri: str, size: int) -> dict[str, Any]:
    """Check the export size with nbdinfo and note whether it offers multi-conn."""
    argv = ["nbdinfo", "--size", uri]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BenchError(f"nbdinfo --size failed: {output_tail(done.stderr + done.stdout)}")
    served = int(done.stdout.strip())
    if served != size:
        raise BenchError(f"export size is {served}, the image is {size}")
    done = subprocess.run(
        ["nbdinfo", "--can", "multi-conn", uri],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    multi_conn = {0: True, 2: False}.get(done.returncode)
    return {"export_size": served, "can_multi_conn": multi_conn}


# ---------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str  # "GiB/s" or "kIOPS"; higher is better for every workload
    tool: str  # "nbdcopy" or "fio"
    direction: str  # "read" or "write"
    iodepth: int = 0
    clients: int = 1  # fio jobs, each its own NBD connection (multi-conn), reported together


WORKLOADS = (
    Workload("seq-read", "seq read, nbdcopy → null:", "GiB/s", "nbdcopy", "read"),
    Workload("seq-write", "seq write, nbdcopy file → NBD", "GiB/s", "nbdcopy", "write"),
    Workload("randread-4k-qd16", "4K rand read, fio QD16", "kIOPS", "fio", "read", 16),
    Workload("randwrite-4k-qd16", "4K rand write, fio QD16", "kIOPS", "fio", "write", 16),
    Workload("randread-4k-qd1", "4K rand read, fio QD1", "kIOPS", "fio", "read", 1),
    Workload("randwrite-4k-qd1", "4K rand write, fio QD1", "kIOPS", "fio", "write", 1),
    Workload("randread-4k-4x16", "4K rand read, 4 clients QD16", "kIOPS", "fio", "read", 16, 4),
    Workload("randwrite-4k-4x16", "4K rand write, 4 clients QD16", "kIOPS", "fio", "write", 16, 4),
)


@dataclass
class Result:
    value: float | None = None
    error: str | None = None
    argv: list[str] = field(default_factory=list)
    seconds: float | None = None
    server_cpu_percent: float | None = None  # % of one core, over the run's wall time
    other_cpu_percent: float | None = None  # everything but server, client and run.py: noise
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "value": None if self.value is None else round(self.value, 4),
            "error": self.error,
            "command": shell_join(self.argv),
            "seconds": self.seconds,
            "server_cpu_percent": self.server_cpu_percent,
            "other_cpu_percent": self.other_cpu_percent,
            **self.details,
        }


@dataclass
class Bench:
    image: Path
    size: int
    runtime: int
    copy_timeout: float
    tmp: Path
    idle_connections: int = 0  # NBD connections opened before the workloads and left idle


def workload_argv(work: Workload, bench: Bench, uri: str, server: str) -> list[str]:
    if work.tool == "nbdcopy":
        # read: the export into the null sink; write: the local image file into the export
        # (the same bytes go back where they came from, so the image content is unchanged)
        if work.direction == "read":
            return ["nbdcopy", "--", uri, "null:"]
        return ["nbdcopy", "--", str(bench.image), uri]
    output = bench.tmp / f"fio-{server}-{work.key}.json"
    return [
        "fio",
        f"--name={work.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw=rand{work.direction}",
        "--bs=4k",
        f"--iodepth={work.iodepth}",
        f"--numjobs={work.clients}",  # one job = one NBD connection
        "--group_reporting",  # the clients' sum
        "--norandommap",
        "--randrepeat=0",
        "--time_based",
        f"--runtime={bench.runtime}",
        "--output-format=json",
        f"--output={output}",
    ]


def run_workload(work: Workload, bench: Bench, server: ServerProcess) -> Result:
    uri = server.setup.uri
    result = Result(argv=workload_argv(work, bench, uri, server.setup.name))
    timeout = bench.copy_timeout if work.tool == "nbdcopy" else bench.runtime + FIO_GRACE
    sync_image(bench.image)  # outside the timed part; the cache stays warm
    log(f"  $ {shell_join(result.argv)}")
    cpu_before = server.cpu_seconds()
    busy_before, own_before = machine_busy_seconds(), own_cpu_seconds()
    started = time.perf_counter()
    try:
        done = subprocess.run(
            result.argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout:g} s"
        return result
    elapsed = time.perf_counter() - started
    cpu_after = server.cpu_seconds()
    busy = machine_busy_seconds() - busy_before
    own = own_cpu_seconds() - own_before
    result.seconds = round(elapsed, 3)
    if cpu_before is not None and cpu_after is not None:
        server_cpu = cpu_after - cpu_before
        result.server_cpu_percent = round(100 * server_cpu / elapsed, 1)
        other = max(0.0, busy - own - server_cpu)
        result.other_cpu_percent = round(100 * other / elapsed, 1)
    if done.returncode != 0:
        result.error = f"exit status {done.returncode}: {output_tail(done.stderr + done.stdout)}"
        return result
    if work.tool == "nbdcopy":
        result.value = bench.size / elapsed / GiB
        result.details = {"bytes": bench.size}
        return result
    return parse_fio(work, Path(result.argv[-1].removeprefix("--output=")), result)


def parse_fio(work: Workload, output: Path, result: Result) -> Result:
    try:
        report = json.loads(output.read_text())
        job = report["jobs"][0]
        side = job[work.direction]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        result.error = f"cannot read fio output {output}: {exc}"
        return result
    if job.get("error"):
        result.error = f"fio error {job['error']}"
        return result
    if not side.get("total_ios"):
        result.error = "fio completed no I/O"
        return result
    clat = side.get("clat_ns", {})
    percentiles = clat.get("percentile", {})
    result.value = side["iops"] / 1000
    result.details = {
        "iops": round(side["iops"], 1),
        "bandwidth_mib_s": round(side["bw_bytes"] / MiB, 2),
        "total_ios": side["total_ios"],
        "fio_runtime_ms": side["runtime"],
        "clat_mean_us": round(clat.get("mean", 0.0) / 1000, 1),
        "clat_p99_us": round(percentiles.get("99.000000", 0) / 1000, 1),
        "clat_p999_us": round(percentiles.get("99.900000", 0) / 1000, 1),
    }
    return result


# ---------------------------------------------------------------------------- one server


@dataclass
class ServerReport:
    name: str
    command: str | None = None
    uri: str | None = None
    config: str | None = None
    error: str | None = None
    startup_seconds: float | None = None
    export: dict[str, Any] = field(default_factory=dict)
    stop: str | None = None
    results: dict[str, Result] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "uri": self.uri,
            "config": self.config,
            "error": self.error,
            "startup_seconds": self.startup_seconds,
            **self.export,
            "stop": self.stop,
        }


def bench_server(name: str, bench: Bench, adopted: bool) -> ServerReport:
    report = ServerReport(name)
    log(f"[{name}]")
    try:
        setup = server_setup(name, bench.image, free_port(), bench.tmp)
    except BenchError as exc:
        report.error = f"start: {exc}"
        log(f"  error: {report.error}")
        return report
    report.command, report.uri, report.config = shell_join(setup.argv), setup.uri, setup.config
    server = ServerProcess(setup, adopted)
    log(f"  $ {report.command}")
    stack = contextlib.ExitStack()
    try:
        try:
            report.startup_seconds = round(server.start(), 3)
        except BenchError as exc:
            report.error = f"start: {exc}"
            return report
        report.export = probe_export(setup.uri, bench.size)
        log(f"  serving {setup.uri} after {report.startup_seconds} s, {report.export}")
        idle = open_idle_connections(setup, bench.idle_connections)
        stack.callback(close_all, idle)
        for work in WORKLOADS:
            result = run_workload(work, bench, server)
            report.results[work.key] = result
            if result.error is None:
                cpu = result.server_cpu_percent
                log(f"    {work.key}: {format_value(result.value)} {work.unit}, server CPU {cpu}%")
            else:
                log(f"    {work.key}: error: {result.error}")
            if server.exited():
                report.error = (
                    f"died during {work.key} with status {server.exit_status}: "
                    f"{tail(setup.log) or 'no output'}"
                )
                break
    except BenchError as exc:
        report.error = str(exc)
    finally:
        stack.close()
        report.stop = server.stop()
        if report.error:
            log(f"  error: {report.error}")
        log(f"  {report.stop}")
    return report


def open_idle_connections(setup: ServerSetup, count: int) -> list[socket.socket]:
    """``count`` NBD connections through the handshake (NBD_OPT_EXPORT_NAME), then idle.

    They come from 127.0.0.2, 127.0.0.3, ... 32 from each: a server may limit the connections
    from one address (ferry: ``MAX_CONNECTIONS_PER_ADDRESS``, 32).
    """
    opened: list[socket.socket] = []
    try:
        for n in range(count):
            source = (f"127.0.0.{2 + n // 32}", 0)
            sock = socket.create_connection(
                (HOST, setup.port), timeout=READY_TIMEOUT, source_address=source
            )
            opened.append(sock)
            nbd_export_name(sock, setup.export)
    except (OSError, BenchError) as exc:
        close_all(opened)
        raise BenchError(f"idle connection {len(opened)} of {count}: {exc}") from exc
    if count:
        log(f"  {count} idle connections open")
    return opened


def nbd_export_name(sock: socket.socket, export: str) -> None:
    """The fixed-newstyle handshake up to transmission, the oldest way: NBD_OPT_EXPORT_NAME."""
    greeting = receive_exactly(sock, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
    if greeting[:16] != NBD_MAGIC + b"IHAVEOPT":
        raise BenchError(f"not a newstyle NBD greeting: {greeting!r}")
    name = export.encode()
    flags = 3  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    sock.sendall(struct.pack(">I", flags) + b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
    no_zeroes = struct.unpack(">H", greeting[16:])[0] & 2
    receive_exactly(sock, 10 if no_zeroes else 134)  # export size, transmission flags[, zeroes]


def receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise BenchError("the server closed the connection in the handshake")
        data += chunk
    return data


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# ---------------------------------------------------------------------------- report


def tool_version(argv: Sequence[str], lines: int = 1) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return ", ".join(text[:lines]) or f"unknown (exit status {done.returncode})"


def ferry_version() -> str:
    try:
        version = metadata.version("ferry")
    except metadata.PackageNotFoundError:
        version = "not installed"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode == 0:
            version += f" (git {done.stdout.strip()}, working tree as is)"
    return version


def versions(servers: Sequence[str]) -> dict[str, str]:
    found: dict[str, Callable[[], str]] = {
        FERRY: ferry_version,
        "qemu-nbd": lambda: tool_version(["qemu-nbd", "--version"]),
        "nbdkit": lambda: tool_version(["nbdkit", "--version"]),
        "nbd-server": lambda: tool_version(["nbd-server", "-V"]),
    }
    table = {name: found[name]() for name in servers}
    table["nbdcopy"] = tool_version(["nbdcopy", "--version"], lines=2)
    table["fio"] = tool_version(["fio", "--version"])
    return table


def machine(workdir: Path) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) * KiB / GiB, 1)
    fs_type = tool_version(["stat", "-f", "-c", "%T", str(workdir)])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "workdir_filesystem": fs_type,
    }


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ferry_ratio(
    work: Workload, reports: dict[str, ServerReport]
) -> tuple[float | None, str | None]:
    """ferry's figure divided by the best peer's (higher is better everywhere)."""
    ferry = reports.get(FERRY)
    ours = ferry.results.get(work.key) if ferry else None
    peers = {
        name: report.results[work.key].value
        for name, report in reports.items()
        if name != FERRY and work.key in report.results
    }
    scored = {name: value for name, value in peers.items() if value}
    if not scored:
        return None, None
    best = max(scored, key=lambda name: scored[name])
    if ours is None or ours.value is None:
        return None, best
    return ours.value / scored[best], best


def render_table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip(), file=out)
        if index == 0:
            print("  ".join("-" * width for width in widths), file=out)


def print_report(summary: dict[str, Any], reports: dict[str, ServerReport], out: TextIO) -> None:
    info = summary["machine"]
    print(file=out)
    print(
        f"machine: nproc {info['nproc']}, {info['kernel']}, {info['cpu_model']}, "
        f"{info['memory_gib']} GiB RAM, image on {info['workdir_filesystem']}",
        file=out,
    )
    for name, version in summary["versions"].items():
        print(f"  {name}: {version}", file=out)
    config = summary["config"]
    print(
        f"image: {human_size(config['size'])} of random data, page cache warm; "
        f"fio runtime {config['runtime']} s per job"
        + (
            f"; {config['idle_connections']} idle connections open"
            if config.get("idle_connections")
            else ""
        ),
        file=out,
    )
    print(file=out)
    names = list(reports)
    header = ["workload", "unit", *names]
    if FERRY in reports:
        header.append("ferry/best peer")
    rows = [header]
    cpu_rows = [["server CPU, % of one core", *names]]
    other_rows = [["other processes' CPU, % of one core", *names]]
    others: list[float] = []
    for work in WORKLOADS:
        row = [work.title, work.unit]
        cpu_row = [work.title]
        other_row = [work.title]
        for name in names:
            result = reports[name].results.get(work.key)
            if result is None:
                row.append("n/a" if reports[name].error else "-")
                cpu_row.append("-")
                other_row.append("-")
            else:
                row.append("error" if result.error else format_value(result.value))
                cpu_row.append(format_value(result.server_cpu_percent))
                other_row.append(format_value(result.other_cpu_percent))
                if result.other_cpu_percent is not None:
                    others.append(result.other_cpu_percent)
        if FERRY in reports:
            ratio, best = ferry_ratio(work, reports)
            row.append(f"{ratio:.2f} vs {best}" if ratio is not None else "-")
        rows.append(row)
        cpu_rows.append(cpu_row)
        other_rows.append(other_row)
    render_table(rows, out)
    print(file=out)
    render_table(cpu_rows, out)
    print(file=out)
    render_table(other_rows, out)
    if others and max(others) > NOISY_PERCENT:
        print(
            f"\nwarning: other processes used up to {max(others):.0f}% of a core "
            f"(mean {sum(others) / len(others):.0f}%) during the workloads; "
            "these figures are not from a quiet machine",
            file=out,
        )
    problems = [f"  {name}: {report.error}" for name, report in reports.items() if report.error] + [
        f"  {name} {key}: {result.error}"
        for name, report in reports.items()
        for key, result in report.results.items()
        if result.error
    ]
    if problems:
        print("\nerrors:", file=out)
        print("\n".join(problems), file=out)


def conclude(
    summary: dict[str, Any],
    reports: dict[str, ServerReport],
    json_path: Path | None,
    *,
    report: Callable[[dict[str, Any], dict[str, ServerReport], TextIO], None] | None = None,
    to_json: Callable[[dict[str, Any], dict[str, ServerReport]], dict[str, Any]] | None = None,
) -> int:
    """Print the table, write the JSON (``--json``), and the exit status: 1 if a run failed.

    ``report`` and ``to_json`` are another benchmark's own (tls.py); by default this one's.
    """
    (report or print_report)(summary, reports, sys.stdout)
    if json_path is not None:
        figures = (to_json or summary_json)(summary, reports)
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {json_path}")
    failed = any(
        server.error or any(result.error for result in server.results.values())
        for server in reports.values()
    )
    return 1 if failed else 0


def summary_json(summary: dict[str, Any], reports: dict[str, ServerReport]) -> dict[str, Any]:
    workloads = []
    for work in WORKLOADS:
        ratio, best = ferry_ratio(work, reports)
        workloads.append(
            {
                "key": work.key,
                "title": work.title,
                "unit": work.unit,
                "results": {
                    name: report.results[work.key].as_json()
                    for name, report in reports.items()
                    if work.key in report.results
                },
                "best_peer": best,
                "ferry_vs_best_peer": None if ratio is None else round(ratio, 4),
            }
        )
    return {
        **summary,
        "servers": {name: report.as_json() for name, report in reports.items()},
        "workloads": workloads,
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark ferry's NBD data plane against qemu-nbd, nbdkit and nbd-server.",
    )
    parser.add_argument(
        "--size", type=parse_size, default=GiB, help="image size (default 1G; binary units)"
    )
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    parser.add_argument(
        "--servers",
        type=parse_servers,
        default=list(ALL_SERVERS),
        help=f"comma-separated, in order (default {','.join(ALL_SERVERS)})",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where the run's temporary directory goes (default benchmarks/.work)",
    )
    parser.add_argument(
        "--copy-timeout",
        type=float,
        default=180.0,
        help="seconds before an nbdcopy run is abandoned (default 180)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the image, logs and fio output after the run"
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=0,
        metavar="N",
        help="open N NBD connections to each server before its workloads and leave them idle",
    )
    args = parser.parse_args(argv)
    if args.runtime < 1:
        parser.error("--runtime must be at least 1")
    return args


def check_clients() -> None:
    for tool in ("nbdcopy", "nbdinfo", "fio"):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` is not installed (Debian: libnbd-bin, fio)")
    engines = subprocess.run(
        ["fio", "--enghelp"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split()
    if "nbd" not in engines:
        raise BenchError("this fio has no nbd ioengine (built without libnbd)")


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_clients()
    except BenchError as exc:
        log(f"run.py: {exc}")
        return 2
    adopted = become_subreaper()
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the running server is stopped and the image removed
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    image = tmp / "image.raw"
    summary: dict[str, Any] = {
        "config": {
            "size": args.size,
            "runtime": args.runtime,
            "servers": args.servers,
            "idle_connections": args.idle_connections,
            "page_cache": "warm (nothing dropped; the image is fsynced before each workload)",
        },
        "machine": machine(args.workdir),
        "versions": versions(args.servers),
    }
    reports: dict[str, ServerReport] = {}
    try:
        log(f"creating {human_size(args.size)} of random data in {image}")
        summary["config"]["image_create_seconds"] = round(create_image(image, args.size), 2)
        bench = Bench(image, args.size, args.runtime, args.copy_timeout, tmp, args.idle_connections)
        for name in args.servers:
            reports[name] = bench_server(name, bench, adopted)
            reap_orphans()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        reap_orphans()
    return conclude(summary, reports, args.json)


if __name__ == "__main__":
    sys.exit(main())
