#!/usr/bin/env python3
"""Proxy benchmark: ferry proxy in front of ferry serve, against ferry serve directly.

One random image is created once (like run.py's) and served by one ``ferry serve``; a
``ferry proxy`` on another port passes everything to it.  run.py's six workloads (nbdcopy
sequential read and write, fio 4 KiB random read and write at QD16 and QD1) run against
both in one run, direct then through the proxy for each workload, and the table gives each
figure and the proxy's ratio to direct.  Then a migration: a fresh ``ferry serve`` source
and ``ferry listen`` destination, the proxy in front of the source (it knows only the
source; the handed-off source tells it where the image went), benchmarks/writer.py writing
through the proxy with 16 requests in flight during ``ferry mirror --wait``: the longest
pause the writer saw, the proxy's own figure, and the source's ``last_downtime_ms``.
See benchmarks/README.md.

    python benchmarks/proxy.py [--size 1G] [--runtime 10] [--write-rate 8M] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
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

from migrate import status
from run import (
    DEFAULT_WORKDIR,
    HOST,
    WORKLOADS,
    Bench,
    BenchError,
    GiB,
    MiB,
    Result,
    ServerProcess,
    ServerSetup,
    Workload,
    become_subreaper,
    check_clients,
    create_image,
    find_ferry,
    format_value,
    free_port,
    human_size,
    interrupted,
    log,
    machine,
    output_tail,
    parse_size,
    reap_orphans,
    render_table,
    run_workload,
    server_setup,
    shell_join,
    tail,
    versions,
)

BENCH_DIR = Path(__file__).resolve().parent
WRITER = BENCH_DIR / "writer.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings
TARGET_RATIO = 0.8  # the aim, at QD16 and sequentially
MIGRATE_TIMEOUT = 600.0
FOUND_TIMEOUT = 60.0  # seconds for the proxy to reach the destination after the handoff
POLL = 0.05


@dataclass
class Pair:
    """One workload, direct and through the proxy."""

    work: Workload
    direct: Result
    proxied: Result
    ferry_cpu_percent_proxied: float | None = None  # ferry serve's CPU in the proxied run

    @property
    def ratio(self) -> float | None:
        if self.direct.value and self.proxied.value is not None:
            return self.proxied.value / self.direct.value
        return None


@dataclass
class Migration:
    command: str = ""
    seconds: float | None = None
    writer: dict[str, Any] = field(default_factory=dict)
    proxy_status: dict[str, Any] = field(default_factory=dict)
    source_last_downtime_ms: float | None = None
    # The proxy's server connection moved with the image (the source could move
    # it: root, TCP_REPAIR) instead of the proxy following the image.
    connection_moved: bool | None = None
    error: str | None = None


def proxy_setup(name: str, upstream_port: int, tmp: Path, *extra: str) -> ServerSetup:
    port = free_port()
    argv = [find_ferry(), "proxy", "--addr", HOST, "--port", str(port)]
    argv += ["--conn-addr", HOST, "--conn-port", str(upstream_port), "--quiet", *extra]
    return ServerSetup(name, argv, "", port, tmp / f"{name}.log")


# ---------------------------------------------------------------------------- data plane


def data_plane(bench: Bench, adopted: bool) -> list[Pair]:
    server = ServerProcess(server_setup("ferry", bench.image, free_port(), bench.tmp), adopted)
    front = ServerProcess(proxy_setup("ferry-proxy", server.setup.port, bench.tmp), adopted)
    pairs: list[Pair] = []
    try:
        for process in (server, front):
            log(f"  $ {shell_join(process.setup.argv)}")
            process.start()
        for work in WORKLOADS:
            direct = run_workload(work, bench, server)
            before = server.cpu_seconds()
            proxied = run_workload(work, bench, front)
            after = server.cpu_seconds()
            pair = Pair(work, direct, proxied)
            if before is not None and after is not None and proxied.seconds:
                pair.ferry_cpu_percent_proxied = round(100 * (after - before) / proxied.seconds, 1)
            pairs.append(pair)
            ratio = pair.ratio
            log(
                f"    {work.key}: direct {format_value(direct.value)}, proxied "
                f"{format_value(proxied.value)} {work.unit}"
                + ("" if ratio is None else f", ratio {ratio:.2f}")
            )
            for process in (server, front):
                if process.exited():
                    raise BenchError(f"{process.setup.name} died: {tail(process.setup.log)}")
    finally:
        for process in (front, server):
            log(f"  {process.setup.name}: {process.stop()}")
    return pairs


# ---------------------------------------------------------------------------- migration


def migration(bench: Bench, adopted: bool, write_rate: int) -> Migration:
    """Migrate under a writer that goes through the proxy; the longest pause it saw."""
    result = Migration()
    tmp = bench.tmp
    dest_image = tmp / "dest.raw"
    with dest_image.open("wb") as dest_file:
        dest_file.truncate(bench.size)
    source_sock, proxy_sock = tmp / "source.sock", tmp / "proxy.sock"
    ferry = find_ferry()
    source_port, dest_port = free_port(), free_port()
    source_argv = [ferry, "serve", "--addr", HOST, "--port", str(source_port)]
    source_argv += ["--file", str(bench.image), "--sock", str(source_sock)]
    dest_argv = [
        ferry,
        "listen",
        "--addr",
        HOST,
        "--port",
        str(dest_port),
        "--file",
        str(dest_image),
    ]
    quiet = ["--lockspace", "none", "--quiet"]
    source = ServerProcess(
        ServerSetup("source", source_argv + quiet, "", source_port, tmp / "source.log"), adopted
    )
    dest = ServerProcess(
        ServerSetup("dest", dest_argv + quiet, "", dest_port, tmp / "dest.log"), adopted
    )
    front = ServerProcess(
        proxy_setup("migration-proxy", source_port, tmp, "--control-sock", str(proxy_sock)),
        adopted,
    )
    stop_file = tmp / "writer.stop"
    writer: subprocess.Popen[str] | None = None
    try:
        for process in (source, dest, front):
            log(f"  $ {shell_join(process.setup.argv)}")
            process.start()
        argv = [SYSTEM_PYTHON, str(WRITER), front.setup.uri, str(write_rate)]
        argv += [str(MIGRATE_TIMEOUT), str(stop_file)]
        log(f"  $ {shell_join(argv)}")
        writer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # ``ferry status --json`` gives numbers as numbers.
        wait_for(lambda: status(proxy_sock).get("num_clients") == 1, "the writer")
        mirror = [ferry, "mirror", "--addr", HOST, "--port", str(dest_port)]
        mirror += ["--sock", str(source_sock), "--action", "nothing", "--wait"]
        result.command = shell_join(mirror)
        log(f"  $ {result.command}")
        started = time.perf_counter()
        done = subprocess.run(
            mirror, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT, check=False
        )
        result.seconds = round(time.perf_counter() - started, 3)
        if done.returncode != 0:
            raise BenchError(f"mirror exit status {done.returncode}: {output_tail(done.stdout)}")
        where = f"{HOST}:{dest_port}"

        def reached() -> bool:
            # Either the proxy followed the image, or its connection moved with it.
            moved = status(source_sock).get("connections_moved", 0)
            result.connection_moved = bool(moved)
            return bool(moved) or status(proxy_sock).get("upstream") == where

        wait_for(reached, "the proxy")
        stop_file.touch()
        out, err = writer.communicate(timeout=60)
        writer = None
        try:
            result.writer = json.loads(out)
        except ValueError as exc:
            raise BenchError(f"writer output unreadable: {output_tail(out + err)}") from exc
        result.proxy_status = status(proxy_sock)
        downtime = status(source_sock).get("last_downtime_ms")
        result.source_last_downtime_ms = None if downtime is None else float(downtime)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        result.error = str(exc)
        log(f"  error: {exc}; proxy log: {tail(front.setup.log)}")
    finally:
        if writer is not None:
            writer.kill()
            writer.communicate()
        for process in (front, source, dest):
            process.stop()
    return result


def wait_for(check: Any, what: str, timeout: float = FOUND_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(BenchError):
            if check():
                return
        if time.monotonic() >= deadline:
            raise BenchError(f"{what}: not there within {timeout:g} s")
        time.sleep(POLL)  # polling another process's status; a benchmark, not a test


# ---------------------------------------------------------------------------- report


def print_report(summary: dict[str, Any], pairs: list[Pair], moved: Migration | None) -> None:
    info = summary["machine"]
    print()
    print(
        f"machine: nproc {info['nproc']}, {info['kernel']}, {info['cpu_model']}, "
        f"{info['memory_gib']} GiB RAM"
    )
    for name, version in summary["versions"].items():
        print(f"  {name}: {version}")
    config = summary["config"]
    print(
        f"image: {human_size(config['size'])} of random data, page cache warm; "
        f"fio runtime {config['runtime']} s per job"
    )
    print()
    rows = [
        [
            "workload",
            "unit",
            "direct",
            "proxied",
            "proxied/direct",
            "proxy CPU %",
            "ferry CPU % (direct, proxied)",
        ]
    ]
    for pair in pairs:
        ratio = pair.ratio
        mark = "" if ratio is None or ratio >= TARGET_RATIO else "  (< aim)"
        rows.append(
            [
                pair.work.title,
                pair.work.unit,
                "error" if pair.direct.error else format_value(pair.direct.value),
                "error" if pair.proxied.error else format_value(pair.proxied.value),
                ("-" if ratio is None else f"{ratio:.2f}") + mark,
                format_value(pair.proxied.server_cpu_percent),
                f"{format_value(pair.direct.server_cpu_percent)}, "
                f"{format_value(pair.ferry_cpu_percent_proxied)}",
            ]
        )
    render_table(rows, sys.stdout)
    print(f"\naim: proxied/direct >= {TARGET_RATIO} at QD16 and sequentially")
    if moved is not None:
        print()
        if moved.error:
            print(f"migration under the proxy: error: {moved.error}")
        else:
            writer, status = moved.writer, moved.proxy_status
            how = "its server connection moved with the image; " if moved.connection_moved else ""
            print(
                f"migration under a writer through the proxy ({moved.seconds} s): "
                f"longest pause the writer saw {writer.get('longest_stall_ms')} ms "
                f"(p99 {writer.get('p99_ms')} ms, {writer.get('writes')} writes, "
                f"ended {writer.get('ended')} {writer.get('error') or ''}); "
                f"{how}the proxy's longest wait for a server {status.get('longest_pause_ms')} ms, "
                f"{status.get('requests_replayed')} requests replayed; "
                f"the source's last_downtime_ms {moved.source_last_downtime_ms}"
            )
    problems = [
        f"  {pair.work.key} {side}: {result.error}"
        for pair in pairs
        for side, result in (("direct", pair.direct), ("proxied", pair.proxied))
        if result.error
    ]
    if problems:
        print("\nerrors:")
        print("\n".join(problems))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark ferry proxy against ferry direct.")
    parser.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    parser.add_argument(
        "--write-rate",
        type=parse_size,
        default=8 * MiB,
        help="the migration writer's rate, bytes per second (default 8M: within what the "
        "proxy passes on here, so a long pause is the migration's, not a backlog's)",
    )
    parser.add_argument("--no-migration", action="store_true", help="the data plane only")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--copy-timeout", type=float, default=180.0)
    parser.add_argument("--keep", action="store_true", help="keep the image and logs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_clients()
    except BenchError as exc:
        log(f"proxy.py: {exc}")
        return 2
    adopted = become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="proxy-", dir=args.workdir))
    image = tmp / "image.raw"
    summary: dict[str, Any] = {
        "config": {"size": args.size, "runtime": args.runtime, "write_rate": args.write_rate},
        "machine": machine(args.workdir),
        "versions": versions(["ferry"]),
    }
    pairs: list[Pair] = []
    moved: Migration | None = None
    try:
        log(f"creating {human_size(args.size)} of random data in {image}")
        create_image(image, args.size)
        bench = Bench(image, args.size, args.runtime, args.copy_timeout, tmp)
        log("[direct and through the proxy]")
        pairs = data_plane(bench, adopted)
        reap_orphans()
        if not args.no_migration:
            log("[a migration under a writer through the proxy]")
            moved = migration(bench, adopted, args.write_rate)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BenchError as exc:
        log(f"proxy.py: {exc}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_report(summary, pairs, moved)
    if args.json:
        document = {
            **summary,
            "workloads": [
                {
                    "key": pair.work.key,
                    "unit": pair.work.unit,
                    "direct": pair.direct.as_json(),
                    "proxied": pair.proxied.as_json(),
                    "ratio": None if pair.ratio is None else round(pair.ratio, 4),
                    "ferry_cpu_percent_proxied": pair.ferry_cpu_percent_proxied,
                }
                for pair in pairs
            ],
            "migration": None if moved is None else moved.__dict__,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    failed = any(p.direct.error or p.proxied.error for p in pairs) or (moved and moved.error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
