#!/usr/bin/env python3
"""TLS benchmark: ferry and nbdkit, plain and under ``--tls require``, on the same certificates.

The same image, the same clients and the same workloads as run.py (whose helpers it imports),
restricted to the three rows TLS changes most: nbdcopy sequential read and write, and fio 4 KiB
random read at QD16.  Four servers, one after another:

- ``ferry``: ``ferry serve`` as in run.py;
- ``ferry tls``: the same with ``--tls require --tls-certificates DIR``;
- ``nbdkit``: ``nbdkit file`` as in run.py;
- ``nbdkit tls``: the same with ``--tls=require --tls-certificates=DIR``.

The clients reach the TLS servers at ``nbds://127.0.0.1:P/`` and find the CA (and a client
certificate, which neither server asks for) in ``$HOME/.pki/libnbd``: fio's nbd engine does not
let a URI name a certificate directory, so ``HOME`` points at a directory of the run's own.  The
certificates are made for the run (tests/tls_support.py) and removed with it.  See
benchmarks/README.md.

    python benchmarks/tls.py [--size 1G] [--runtime 10] [--json OUT] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from run import (
    DEFAULT_WORKDIR,
    HOST,
    NOISY_PERCENT,
    REPO_DIR,
    WORKLOADS,
    Bench,
    BenchError,
    GiB,
    ServerProcess,
    ServerReport,
    ServerSetup,
    become_subreaper,
    check_clients,
    conclude,
    create_image,
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
    server_setup,
    shell_join,
    tail,
    tool_version,
    versions,
)

sys.path.insert(0, str(REPO_DIR / "tests"))
from tls_support import make_pki

SERVERS = ("ferry", "ferry tls", "nbdkit", "nbdkit tls")
KEYS = ("seq-read", "seq-write", "randread-4k-qd16")
TLS_WORKLOADS = tuple(work for work in WORKLOADS if work.key in KEYS)
#: (name, numerator, denominator): the ratios the report computes on every row.
RATIOS = (
    ("ferry tls ÷ nbdkit tls", "ferry tls", "nbdkit tls"),
    ("ferry tls ÷ ferry", "ferry tls", "ferry"),
    ("nbdkit tls ÷ nbdkit", "nbdkit tls", "nbdkit"),
)


@dataclass
class TLSSetup(ServerSetup):
    """A server under ``--tls require``: its clients say ``nbds://``."""

    @property
    def uri(self) -> str:
        return f"nbds://{HOST}:{self.port}/{self.export}"


def setup_for(name: str, bench: Bench, port: int, certificates: Path) -> ServerSetup:
    base, _, tls = name.partition(" ")
    plain = server_setup(base, bench.image, port, bench.tmp)
    if not tls:
        return plain
    if base == "ferry":
        extra = ["--tls", "require", "--tls-certificates", str(certificates)]
    else:
        # nbdkit's options go before the plugin name
        plain.argv[1:1] = ["--tls=require", f"--tls-certificates={certificates}"]
        extra = []
    log_path = bench.tmp / f"{base}-tls.log"
    return TLSSetup(name, [*plain.argv, *extra], plain.export, port, log_path)


def bench_server(name: str, bench: Bench, certificates: Path, adopted: bool) -> ServerReport:
    """run.py's bench_server, on this benchmark's servers and rows."""
    report = ServerReport(name)
    log(f"[{name}]")
    setup = setup_for(name, bench, free_port(), certificates)
    report.command, report.uri = shell_join(setup.argv), setup.uri
    server = ServerProcess(setup, adopted)
    log(f"  $ {report.command}")
    try:
        try:
            report.startup_seconds = round(server.start(), 3)
        except BenchError as exc:
            report.error = f"start: {exc}"
            return report
        report.export = probe_export(setup.uri, bench.size)
        for work in TLS_WORKLOADS:
            result = run_workload(work, bench, server)
            report.results[work.key] = result
            if result.error is None:
                cpu = result.server_cpu_percent
                log(f"    {work.key}: {format_value(result.value)} {work.unit}, server CPU {cpu}%")
            else:
                log(f"    {work.key}: error: {result.error}")
            if server.exited():
                report.error = f"died during {work.key}: {tail(setup.log) or 'no output'}"
                break
    except BenchError as exc:
        report.error = str(exc)
    finally:
        report.stop = server.stop()
        log(f"  {report.stop}")
    return report


def ratio(reports: dict[str, ServerReport], key: str, top: str, bottom: str) -> float | None:
    def value(name: str) -> float | None:
        report = reports.get(name)
        result = None if report is None else report.results.get(key)
        return None if result is None else result.value

    over, under = value(top), value(bottom)
    return None if over is None or not under else over / under


def print_report(summary: dict[str, Any], reports: dict[str, ServerReport], out: TextIO) -> None:
    config = summary["config"]
    print(
        f"\nimage: {human_size(config['size'])} of random data, page cache warm; "
        f"fio runtime {config['runtime']} s; TLS 1.3 (both servers' default) with the run's "
        "own certificates (EC P-256)",
        file=out,
    )
    for name, version in summary["versions"].items():
        print(f"  {name}: {version}", file=out)
    print(file=out)
    names = list(reports)
    rows = [["workload", "unit", *names, *(title for title, _, _ in RATIOS)]]
    cpu_rows = [["server CPU, % of one core", *names]]
    other_rows = [["other processes' CPU, % of one core", *names]]
    others: list[float] = []
    for work in TLS_WORKLOADS:
        row = [work.title, work.unit]
        cpu_row = [work.title]
        other_row = [work.title]
        for name in names:
            result = reports[name].results.get(work.key)
            if result is None:
                row.append("-")
                cpu_row.append("-")
                other_row.append("-")
                continue
            row.append("error" if result.error else format_value(result.value))
            cpu_row.append(format_value(result.server_cpu_percent))
            other_row.append(format_value(result.other_cpu_percent))
            if result.other_cpu_percent is not None:
                others.append(result.other_cpu_percent)
        for _, top, bottom in RATIOS:
            found = ratio(reports, work.key, top, bottom)
            row.append("-" if found is None else f"{found:.2f}")
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
            f"\nwarning: other processes used up to {max(others):.0f}% of a core during the "
            "workloads; these figures are not from a quiet machine",
            file=out,
        )
    problems = [f"  {name}: {report.error}" for name, report in reports.items() if report.error]
    problems += [
        f"  {name} {key}: {result.error}"
        for name, report in reports.items()
        for key, result in report.results.items()
        if result.error
    ]
    if problems:
        print("\nerrors:\n" + "\n".join(problems), file=out)


def summary_json(summary: dict[str, Any], reports: dict[str, ServerReport]) -> dict[str, Any]:
    rows = []
    for work in TLS_WORKLOADS:
        rows.append(
            {
                "key": work.key,
                "title": work.title,
                "unit": work.unit,
                "results": {
                    name: report.results[work.key].as_json()
                    for name, report in reports.items()
                    if work.key in report.results
                },
                "ratios": {
                    title: ratio(reports, work.key, top, bottom) for title, top, bottom in RATIOS
                },
            }
        )
    servers = {name: report.as_json() for name, report in reports.items()}
    return {**summary, "servers": servers, "workloads": rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ferry and nbdkit with and without TLS: sequential read and write, QD16 "
        "random read."
    )
    parser.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--copy-timeout", type=float, default=180.0)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_clients()
    except BenchError as exc:
        log(f"tls.py: {exc}")
        return 2
    adopted = become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tls-", dir=args.workdir))
    pki = make_pki(tmp / "pki")
    home = tmp / "home"
    shutil.copytree(pki.node, home / ".pki" / "libnbd")
    os.environ["HOME"] = str(home)  # libnbd's default certificate directory, for every client
    summary: dict[str, Any] = {
        "config": {"size": args.size, "runtime": args.runtime, "servers": list(SERVERS)},
        "machine": machine(args.workdir),
        "versions": {
            **versions(["ferry", "nbdkit"]),
            "openssl (ferry)": tool_version(
                [sys.executable, "-c", "import OpenSSL.SSL as s; print(s.OpenSSL_version(0))"]
            ),
            "gnutls (nbdkit)": tool_version(["sh", "-c", "nbdkit --dump-config | grep tls"]),
        },
    }
    reports: dict[str, ServerReport] = {}
    image = tmp / "image.raw"
    try:
        log(f"creating {human_size(args.size)} of random data in {image}")
        create_image(image, args.size)
        bench = Bench(image, args.size, args.runtime, args.copy_timeout, tmp)
        for name in SERVERS:
            reports[name] = bench_server(name, bench, pki.node, adopted)
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
    return conclude(summary, reports, args.json, report=print_report, to_json=summary_json)


if __name__ == "__main__":
    sys.exit(main())
