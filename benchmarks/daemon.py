#!/usr/bin/env python3
"""Daemon benchmark: one ``ferry daemon`` of 100 exports against one ``ferry serve`` of one.

Both serve the same random image (the busy export); the daemon also serves 99 sparse images
nobody uses.  For each server: the time from starting the process until NBD_OPT_LIST names
every export (every export's lease taken, every export served), its resident memory once
serving (``VmRSS``) and at its peak (``VmHWM``), and the busy export's throughput under
run.py's workloads (nbdcopy sequential read and write, fio 4 KiB random read and write at
queue depth 16).  Both take their leases in a local lockspace of the run's own.  See
benchmarks/README.md.

    python benchmarks/daemon.py [--exports 100] [--size 1G] [--runtime 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import (
    DEFAULT_WORKDIR,
    HOST,
    POLL_INTERVAL,
    READY_TIMEOUT,
    WORKLOADS,
    Bench,
    BenchError,
    GiB,
    Result,
    ServerProcess,
    ServerSetup,
    become_subreaper,
    check_clients,
    create_image,
    ferry_version,
    find_ferry,
    format_value,
    free_port,
    human_size,
    interrupted,
    log,
    machine,
    parse_size,
    probe_export,
    reap_orphans,
    render_table,
    run_workload,
    shell_join,
    tail,
)

KiB = 1 << 10
#: run.py's workloads a busy export runs here: the queue-depth-1 ones add little.
WANTED = ("seq-read", "seq-write", "randread-4k-qd16", "randwrite-4k-qd16")
BUSY = "disk000"


@dataclass
class Report:
    """One server's figures."""

    name: str
    command: str = ""
    exports: int = 0
    startup_seconds: float | None = None
    rss_mib: float | None = None  # once serving, before any client
    peak_rss_mib: float | None = None  # after every workload
    results: dict[str, Result] = field(default_factory=dict)
    error: str | None = None
    stop: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "exports": self.exports,
            "startup_seconds": self.startup_seconds,
            "rss_mib": self.rss_mib,
            "peak_rss_mib": self.peak_rss_mib,
            "error": self.error,
            "stop": self.stop,
            "results": {key: result.as_json() for key, result in self.results.items()},
        }


def memory_mib(pid: int | None, field_name: str) -> float | None:
    """``VmRSS`` or ``VmHWM`` of ``pid`` from /proc, in MiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) * KiB / (1 << 20), 1)
    except OSError:
        return None
    return None


def daemon_setup(image: Path, exports: int, size: int, tmp: Path) -> ServerSetup:
    """A daemon's file of ``exports`` exports: the busy image first, then sparse ones."""
    port = free_port()
    lines = [
        f'addr = "{HOST}"',
        f"port = {port}",
        f'lockspace = "local:{tmp / "locks"}"',
        "",
        "[[export]]",
        f'name = "{BUSY}"',
        f'file = "{image}"',
    ]
    for number in range(1, exports):
        idle = tmp / f"idle{number:03d}.img"
        with idle.open("wb") as f:
            f.truncate(size)
        lines += ["", "[[export]]", f'name = "disk{number:03d}"', f'file = "{idle}"']
    config = tmp / "ferry.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [find_ferry(), "daemon", "--config", str(config), "--quiet"]
    return ServerSetup("ferry daemon", argv, BUSY, port, tmp / "daemon.log")


def serve_setup(image: Path, tmp: Path) -> ServerSetup:
    port = free_port()
    argv = [find_ferry(), "serve", "--addr", HOST, "--port", str(port), "--file", str(image)]
    argv += ["--lockspace", f"local:{tmp / 'locks'}", "--quiet"]
    return ServerSetup("ferry serve", argv, "", port, tmp / "serve.log")


def wait_for_listing(setup: ServerSetup, exports: int, deadline: float) -> None:
    """Poll ``NBD_OPT_LIST`` until it names ``exports`` exports: every one served.

    The greeting alone does not say so: a node binds its port first and puts
    each export on it once that export's lease is taken.
    """
    uri = f"nbd://{HOST}:{setup.port}"
    listed = 0
    while True:
        done = subprocess.run(
            ["nbdinfo", "--list", "--json", uri], capture_output=True, timeout=30, check=False
        )
        if done.returncode == 0:
            listed = len(json.loads(done.stdout)["exports"])
            if listed >= exports:
                return
        if time.monotonic() >= deadline:
            raise BenchError(f"{setup.name} listed {listed} of {exports} exports in time")
        time.sleep(POLL_INTERVAL)  # polling the server's own answer, with a deadline


def bench_one(setup: ServerSetup, bench: Bench, exports: int, adopted: bool) -> Report:
    report = Report(setup.name, shell_join(setup.argv), exports)
    log(f"[{setup.name}, {exports} export{'s' if exports != 1 else ''}]")
    log(f"  $ {report.command}")
    server = ServerProcess(setup, adopted)
    try:
        started = time.monotonic()
        server.start()
        wait_for_listing(setup, exports, started + READY_TIMEOUT)
        report.startup_seconds = round(time.monotonic() - started, 3)
        report.rss_mib = memory_mib(server.pid, "VmRSS")
        probe_export(setup.uri, bench.size)
        log(f"  serving after {report.startup_seconds} s, RSS {report.rss_mib} MiB")
        for work in WORKLOADS:
            if work.key not in WANTED:
                continue
            result = run_workload(work, bench, server)
            report.results[work.key] = result
            shown = result.error or f"{format_value(result.value)} {work.unit}"
            log(f"    {work.key}: {shown}")
            if server.exited():
                raise BenchError(f"died during {work.key}: {tail(setup.log) or 'no output'}")
        report.peak_rss_mib = memory_mib(server.pid, "VmHWM")
    except BenchError as exc:
        report.error = str(exc)
        log(f"  error: {exc}")
    finally:
        report.stop = server.stop()
        log(f"  {report.stop}")
    return report


def print_report(summary: dict[str, Any], serve: Report, daemon: Report) -> None:
    info = summary["machine"]
    print()
    print(
        f"machine: nproc {info['nproc']}, {info['kernel']}, {info['cpu_model']}, "
        f"{info['memory_gib']} GiB RAM, images on {info['workdir_filesystem']}"
    )
    print(f"  ferry: {summary['versions']['ferry']}")
    config = summary["config"]
    print(
        f"busy image: {human_size(config['size'])} of random data, page cache warm; "
        f"{daemon.exports - 1} idle sparse exports of the same size; "
        f"fio runtime {config['runtime']} s per job"
    )
    print()
    rows = [
        [
            "",
            f"{serve.name} (1 export)",
            f"{daemon.name} ({daemon.exports} exports)",
            "ratio",
            "others' CPU %",
        ]
    ]

    def row(title: str, ours: float | None, theirs: float | None, noise: str = "") -> None:
        ratio = f"{theirs / ours:.2f}" if ours and theirs is not None else "-"
        rows.append([title, format_value(ours), format_value(theirs), ratio, noise])

    row("startup to every export listed, s", serve.startup_seconds, daemon.startup_seconds)
    row("RSS serving, MiB", serve.rss_mib, daemon.rss_mib)
    row("peak RSS, MiB", serve.peak_rss_mib, daemon.peak_rss_mib)
    for work in WORKLOADS:
        if work.key in WANTED:
            mine = serve.results.get(work.key)
            theirs = daemon.results.get(work.key)
            noise = "/".join(
                format_value(r.other_cpu_percent) if r else "-" for r in (mine, theirs)
            )
            row(
                f"{work.title}, {work.unit}",
                mine.value if mine else None,
                theirs.value if theirs else None,
                noise,
            )
    render_table(rows, sys.stdout)
    print(
        "\nothers' CPU %: what other processes took during the workload (serve/daemon run), "
        "in % of one core; above ~10 the throughput figures are mostly noise"
    )
    failed = [f"  {r.name}: {r.error}" for r in (serve, daemon) if r.error]
    failed += [
        f"  {r.name} {key}: {result.error}"
        for r in (serve, daemon)
        for key, result in r.results.items()
        if result.error
    ]
    if failed:
        print("\nerrors:")
        print("\n".join(failed))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark one ferry daemon of many exports.")
    parser.add_argument("--exports", type=int, default=100, help="exports in the daemon")
    parser.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--copy-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.exports < 1:
        parser.error("--exports must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_clients()
    adopted = become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="daemon-", dir=args.workdir))
    (tmp / "locks").mkdir(mode=0o700)
    image = tmp / "busy.img"
    bench = Bench(image, args.size, args.runtime, args.copy_timeout, tmp)
    summary: dict[str, Any] = {
        "config": {"size": args.size, "runtime": args.runtime, "exports": args.exports},
        "machine": machine(args.workdir),
        "versions": {"ferry": ferry_version()},
    }
    try:
        log(f"creating {human_size(args.size)} of random data in {image}")
        create_image(image, args.size)
        serve = bench_one(serve_setup(image, tmp), bench, 1, adopted)
        daemon = bench_one(
            daemon_setup(image, args.exports, args.size, tmp), bench, args.exports, adopted
        )
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        reap_orphans()
    print_report(summary, serve, daemon)
    if args.json is not None:
        result = {**summary, "serve": serve.as_json(), "daemon": daemon.as_json()}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    failed = serve.error or daemon.error
    return (
        1
        if failed or any(r.error for r in (*serve.results.values(), *daemon.results.values()))
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
