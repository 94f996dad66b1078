#!/usr/bin/env python3
"""Migration benchmark: ferry serve -> ferry listen, idle and under a writer, vs nbdcopy.

One random image is created once (like run.py's).  Three scenarios run on it:

- ``idle``: ``ferry mirror --action nothing --wait`` from ``ferry serve`` to ``ferry listen``
  on an empty (sparse) destination file, no client.
- ``writer``: the same while benchmarks/writer.py (a libnbd client under /usr/bin/python3)
  writes 4 KiB random blocks at ``--write-rate`` to the source and times each write.
- ``writeblock`` (only when asked for): ``writer``'s migration with ``--copy-mode
  write-blocking``, under a ``--writeblock-rate`` writer (default 100 MB/s).
- ``copy limit``: ``nbdcopy`` of the same image between two qemu-nbd servers, plain and with
  ``--flush`` (ferry's handoff fsyncs the destination, so ``--flush`` is the fair limit).

After each run the source and destination files are compared byte for byte.  With a
writer, whose connection moves with the image at the handoff and goes on writing to the
destination, the comparison is against what was written: the writer records every write
(``WRITER_RECORD``) and every block it wrote must hold its last acknowledged write on the
destination; every other block must be the source's (see :func:`check_writes`).  Each
run also reports the source's and destination's peak RSS (``VmHWM``).  See
benchmarks/README.md.

    python benchmarks/migrate.py [--size 1G] [--write-rate 20M] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
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

from daemon import memory_mib
from run import (
    DEFAULT_WORKDIR,
    HOST,
    BenchError,
    GiB,
    MiB,
    ServerProcess,
    ServerSetup,
    become_subreaper,
    create_image,
    ferry_version,
    find_ferry,
    free_port,
    human_size,
    interrupted,
    log,
    machine,
    machine_busy_seconds,
    output_tail,
    parse_size,
    reap_orphans,
    render_table,
    server_setup,
    shell_join,
    sync_image,
    tail,
    tool_version,
)

BENCH_DIR = Path(__file__).resolve().parent
WRITER = BENCH_DIR / "writer.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings
MIGRATE_TIMEOUT = 600.0
WRITER_WARMUP = 1.0  # seconds the writer runs before the migration starts
TARGET_RATIO = 1.5
TARGET_STALL_MS = 300.0


@dataclass
class Run:
    """One scenario's figures."""

    name: str
    seconds: float | None = None
    passes: int | None = None
    rate_mib_s: float | None = None
    last_downtime_ms: float | None = None
    quiesce_ms: float | None = None  # role quiescing -> handed_off, from the source trace
    writer: dict[str, Any] | None = None
    error_before_handoff: bool | None = None
    identical: bool | None = None
    writes_checked: dict[str, Any] | None = None  # with a writer: check_writes' figures
    source_rss_mib: float | None = None  # peak (VmHWM), read just before it is stopped
    dest_rss_mib: float | None = None
    source_cpu_percent: float | None = None
    dest_cpu_percent: float | None = None
    machine_busy_percent: float | None = None
    argv: list[str] = field(default_factory=list)
    error: str | None = None
    output: str = ""

    def as_json(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "output"}


def timed(
    run: Run, source: ServerProcess, dest: ServerProcess
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``run.argv`` and record its wall time and the CPU the two servers spent on it."""
    log(f"  $ {shell_join(run.argv)}")
    cpu_before = (cpu_of(source), cpu_of(dest))
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    done = subprocess.run(
        run.argv, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT, check=False
    )
    elapsed = time.perf_counter() - started
    busy = machine_busy_seconds() - busy_before
    run.source_cpu_percent = round(100 * (cpu_of(source) - cpu_before[0]) / elapsed, 1)
    run.dest_cpu_percent = round(100 * (cpu_of(dest) - cpu_before[1]) / elapsed, 1)
    run.machine_busy_percent = round(100 * busy / elapsed, 1)
    return done, elapsed


def ferry_setup(mode: str, name: str, image: Path, port: int, tmp: Path) -> ServerSetup:
    sock, trace = tmp / f"{name}.sock", tmp / f"{name}.trace"
    argv = [find_ferry(), mode, "--addr", HOST, "--port", str(port), "--file", str(image)]
    argv += ["--sock", str(sock), "--trace", str(trace), "--quiet"]
    return ServerSetup(name, argv, "", port, tmp / f"{name}.log")


def status(sock: Path) -> dict[str, str]:
    done = subprocess.run(
        [find_ferry(), "status", "--sock", str(sock), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"ferry status failed: {output_tail(done.stderr + done.stdout)}")
    result: dict[str, str] = json.loads(done.stdout)
    return result


def read_trace(path: Path) -> list[dict[str, Any]]:
    records = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def trace_figures(records: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Passes (bulk + dirty + the final one), quiesce and handoff times from the source trace."""
    migration = [r for r in records if r["machine"] == "migration"]
    passes = sum(1 for r in migration if r["dest"] in ("bulk_pass", "dirty_pass"))
    if any(r["dest"] == "quiescing" for r in migration):
        passes += 1
    role = [r for r in records if r["machine"] == "role"]
    quiesced = next((r["time"] for r in role if r["dest"] == "quiescing"), None)
    handed_off = next((r["time"] for r in role if r["dest"] == "handed_off"), None)
    return {"passes": passes, "quiesced_at": quiesced, "handed_off_at": handed_off}


def make_destination(path: Path, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with path.open("wb") as dest:
        dest.truncate(size)


def cpu_of(server: ServerProcess) -> float:
    return server.cpu_seconds() or 0.0


def migrate_once(
    name: str,
    image: Path,
    size: int,
    tmp: Path,
    adopted: bool,
    write_rate: int | None,
    mirror_args: Sequence[str] = (),
) -> Run:
    """One ferry migration: serve, listen, (writer), mirror --wait, compare."""
    run = Run(name)
    dest_image = tmp / "dest.raw"
    make_destination(dest_image, size)
    sync_image(image)
    source = ServerProcess(ferry_setup("serve", "source", image, free_port(), tmp), adopted)
    dest = ServerProcess(ferry_setup("listen", "dest", dest_image, free_port(), tmp), adopted)
    for trace in (tmp / "source.trace", tmp / "dest.trace"):
        with contextlib.suppress(FileNotFoundError):
            trace.unlink()
    writer: subprocess.Popen[str] | None = None
    stop_file = tmp / "writer.stop"
    record = tmp / "writer.record"
    with contextlib.suppress(FileNotFoundError):
        stop_file.unlink()
    handed_off = None
    try:
        for server in (source, dest):
            log(f"  $ {shell_join(server.setup.argv)}")
            server.start()
        if write_rate is not None:
            argv = [SYSTEM_PYTHON, str(WRITER), source.setup.uri, str(write_rate)]
            argv += [str(MIGRATE_TIMEOUT), str(stop_file)]
            log(f"  $ {shell_join(argv)}")
            writer = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "WRITER_RECORD": str(record)},
            )
            time.sleep(WRITER_WARMUP)
            if writer.poll() is not None:
                errors = writer.stderr.read() if writer.stderr else ""
                raise BenchError(f"the writer exited early: {output_tail(errors)}")
        run.argv = [
            find_ferry(),
            "mirror",
            "--addr",
            HOST,
            "--port",
            str(dest.setup.port),
            "--sock",
            str(tmp / "source.sock"),
            "--action",
            "nothing",
            *mirror_args,
            "--wait",
        ]
        done, elapsed = timed(run, source, dest)
        run.output = done.stdout + done.stderr
        if done.returncode != 0:
            raise BenchError(f"mirror exit status {done.returncode}: {output_tail(run.output)}")
        run.seconds = round(elapsed, 3)
        run.rate_mib_s = round(size / elapsed / MiB, 1)
        if writer is not None:
            stop_file.touch()
            out, err = writer.communicate(timeout=60)
            writer = None
            try:
                run.writer = json.loads(out)
            except ValueError as exc:
                raise BenchError(f"writer output unreadable: {output_tail(out + err)}") from exc
        downtime = status(tmp / "source.sock").get("last_downtime_ms")
        run.last_downtime_ms = None if downtime is None else float(downtime)
        figures = trace_figures(read_trace(tmp / "source.trace"))
        run.passes = int(figures["passes"] or 0)
        quiesced, handed_off = figures["quiesced_at"], figures["handed_off_at"]
        if quiesced is not None and handed_off is not None:
            run.quiesce_ms = round((handed_off - quiesced) * 1000, 1)
        if run.writer is not None:
            error_at = run.writer.get("error_at")
            if error_at is None:
                run.error_before_handoff = False
            else:
                run.error_before_handoff = handed_off is None or error_at < handed_off
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        run.error = str(exc)
    finally:
        if writer is not None:
            writer.kill()
            writer.communicate()
        run.source_rss_mib = memory_mib(source.pid, "VmHWM")
        run.dest_rss_mib = memory_mib(dest.pid, "VmHWM")
        for server in (source, dest):
            server.stop()
    if run.error is None and write_rate is None:
        run.identical = filecmp.cmp(image, dest_image, shallow=False)
        if not run.identical:
            run.error = "source and destination differ"
    elif run.error is None:
        run.writes_checked = check_writes(image, dest_image, record, handed_off)
        run.writes_checked["connection_kept"] = bool(
            run.writer is not None
            and not run.writer.get("error")
            and run.writes_checked["answered_after_handoff"]
        )
        run.identical = not run.writes_checked["wrong_blocks"]
        if not run.identical:
            run.error = (
                f"{run.writes_checked['wrong_blocks']} blocks of the destination are neither "
                "the source's nor what the writer last wrote there"
            )
    if run.error:
        log(
            f"  error: {run.error}; source log: {tail(source.setup.log)}; "
            f"dest log: {tail(dest.setup.log)}"
        )
    return run


def migrate_writeblock(image: Path, size: int, tmp: Path, adopted: bool, write_rate: int) -> Run:
    """``ferry mirror --copy-mode write-blocking`` under a writer (default 100 MB/s): each
    write to what is copied waits for the destination, so it completes however fast the
    writer goes; what it costs shows in the writer's latency."""
    name = f"write-blocking + {write_rate / 1e6:g} MB/s writer"
    return migrate_once(
        name, image, size, tmp, adopted, write_rate, ("--copy-mode", "write-blocking")
    )
def check_writes(
    source: Path, dest: Path, record: Path, handed_off: float | None
) -> dict[str, Any]:
    """The destination against the source and the writer's record, 4 KiB block by block.

    A block the writer wrote must hold the last write issued to it if that write was
    acknowledged and issued after every earlier one to the block was answered: the client
    was told it is there.  Where writes to one block overlapped in time or one was never
    answered, any of them, or the source's block, is allowed (NBD orders no concurrent
    writes), and the block is counted as ``ambiguous_blocks``.  Every block the writer did
    not write must equal the source's: the source file holds the original image and the
    writes before the handoff, the destination the image and every write.
    """
    block_size = 4096
    pool_bytes = Path(f"{record}.pool").read_bytes()
    writes: dict[int, list[dict[str, Any]]] = {}
    total = answered = after = 0
    for line in record.read_text().splitlines():
        write = json.loads(line)
        writes.setdefault(write["offset"], []).append(write)
        total += 1
        if write["answered"] is not None:
            answered += 1
            if handed_off is not None and write["answered"] > handed_off:
                after += 1

    def data(write: dict[str, Any]) -> bytes:
        return pool_bytes[write["block"] * block_size : (write["block"] + 1) * block_size]

    wrong = ambiguous = 0
    chunk_size = 1 << 20
    with source.open("rb") as src, dest.open("rb") as dst:
        base = 0
        while True:
            theirs = src.read(chunk_size)
            ours = dst.read(chunk_size)
            if not theirs and not ours:
                break
            expected = bytearray(theirs)
            for at in range(0, len(ours), block_size):
                history = writes.get(base + at)
                if history is None:
                    continue
                found = ours[at : at + block_size]
                last = history[-1]
                settled = last["answered"] is not None and all(
                    w["answered"] is not None and w["answered"] <= last["issued"]
                    for w in history[:-1]
                )
                if settled:
                    allowed = [data(last)]
                else:
                    ambiguous += 1
                    allowed = [data(w) for w in history] + [theirs[at : at + block_size]]
                wrong += found not in allowed
                expected[at : at + block_size] = found  # counted here, if wrong, and only here
            if bytes(expected) != ours:
                # Blocks the writer never touched differ from the source's.
                wrong += sum(
                    expected[at : at + block_size] != ours[at : at + block_size]
                    for at in range(0, len(ours), block_size)
                )
            base += len(ours)
    return {
        "writes": total,
        "answered": answered,
        "answered_after_handoff": after,
        "blocks_written": len(writes),
        "ambiguous_blocks": ambiguous,
        "wrong_blocks": wrong,
    }


def copy_limit(name: str, image: Path, size: int, tmp: Path, adopted: bool, flush: bool) -> Run:
    """nbdcopy of the image between two qemu-nbd servers."""
    run = Run(name, passes=1)
    dest_image = tmp / "dest.raw"
    make_destination(dest_image, size)
    sync_image(image)
    source = ServerProcess(server_setup("qemu-nbd", image, free_port(), tmp), adopted)
    dest_setup = server_setup("qemu-nbd", dest_image, free_port(), tmp)
    dest_setup.log = tmp / "qemu-nbd-dest.log"
    dest = ServerProcess(dest_setup, adopted)
    try:
        for server in (source, dest):
            log(f"  $ {shell_join(server.setup.argv)}")
            server.start()
        run.argv = [
            "nbdcopy",
            *(["--flush"] if flush else []),
            "--",
            source.setup.uri,
            dest.setup.uri,
        ]
        done, elapsed = timed(run, source, dest)
        if done.returncode != 0:
            raise BenchError(f"nbdcopy exit status {done.returncode}: {output_tail(done.stderr)}")
        run.seconds = round(elapsed, 3)
        run.rate_mib_s = round(size / elapsed / MiB, 1)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        run.error = str(exc)
    finally:
        for server in (source, dest):
            server.stop()
    if run.error is None:
        run.identical = filecmp.cmp(image, dest_image, shallow=False)
        if not run.identical:
            run.error = "source and destination differ"
    if run.error:
        log(f"  error: {run.error}")
    return run


# ---------------------------------------------------------------------------- report


def cell(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value}{unit}"


def print_report(summary: dict[str, Any], runs: list[Run], limit: Run | None) -> None:
    info = summary["machine"]
    print()
    print(
        f"machine: nproc {info['nproc']}, {info['kernel']}, {info['cpu_model']}, "
        f"{info['memory_gib']} GiB RAM, image on {info['workdir_filesystem']}"
    )
    for name, version in summary["versions"].items():
        print(f"  {name}: {version}")
    config = summary["config"]
    print(
        f"image: {human_size(config['size'])} of random data, page cache warm; "
        f"writer {config['write_rate'] / 1e6:g} MB/s of 4 KiB random writes"
    )
    print()
    header = [
        "run",
        "time s",
        "passes",
        "MiB/s",
        "÷ copy limit",
        "last_downtime_ms",
        "quiesce→handoff ms",
        "writer MB/s",
        "longest stall ms",
        "error before handoff",
        "identical",
        "CPU src/dst/all %",
        "peak RSS src/dst MiB",
    ]
    rows = [header]
    for run in runs:
        ratio = None
        if limit is not None and limit.seconds and run.seconds:
            ratio = f"{run.seconds / limit.seconds:.2f}"
        writer = run.writer or {}
        rows.append(
            [
                run.name,
                cell(run.seconds),
                cell(run.passes),
                cell(run.rate_mib_s),
                cell(ratio),
                cell(run.last_downtime_ms),
                cell(run.quiesce_ms),
                cell(writer.get("rate_mb_s")),
                cell(writer.get("longest_stall_ms")),
                cell(run.error_before_handoff),
                cell(run.identical) if run.error is None else "error",
                f"{cell(run.source_cpu_percent)}/{cell(run.dest_cpu_percent)}"
                f"/{cell(run.machine_busy_percent)}",
                f"{cell(run.source_rss_mib)}/{cell(run.dest_rss_mib)}",
            ]
        )
    render_table(rows, sys.stdout)
    for run in runs:
        checked = run.writes_checked
        if checked is not None:
            print(
                f"\n{run.name}: {checked['answered']} of {checked['writes']} writes answered "
                f"({checked['answered_after_handoff']} after the handoff, by the destination), "
                f"{checked['blocks_written']} blocks written, {checked['wrong_blocks']} wrong "
                f"({checked['ambiguous_blocks']} written concurrently or unanswered); "
                f"the writer's connection was {'kept' if checked['connection_kept'] else 'lost'}"
            )
    if limit is not None:
        print(
            f"\ncopy limit: {limit.name} ({limit.seconds} s); targets: migration time "
            f"≤ {TARGET_RATIO} x the copy limit, longest stall ≤ {TARGET_STALL_MS:g} ms"
        )
    failed = [f"  {run.name}: {run.error}" for run in runs if run.error]
    if failed:
        print("\nerrors:")
        print("\n".join(failed))


def print_writer_latency(runs: list[Run]) -> None:
    """What the writer saw of each run with one: from each write's due time (the schedule's
    backlog included) and from when it was sent (the server's own time)."""
    rows = [
        [
            "run",
            "writer MB/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "sent→answered p50 ms",
            "p99 ms",
            "max ms",
        ]
    ]
    for run in runs:
        writer = run.writer
        if not writer:
            continue
        rows.append(
            [
                run.name,
                cell(writer.get("rate_mb_s")),
                cell(writer.get("p50_ms")),
                cell(writer.get("p99_ms")),
                cell(writer.get("longest_stall_ms")),
                cell(writer.get("service_p50_ms")),
                cell(writer.get("service_p99_ms")),
                cell(writer.get("service_max_ms")),
            ]
        )
    if len(rows) > 1:
        print("\nwrite latency:")
        render_table(rows, sys.stdout)


# ---------------------------------------------------------------------------- main


def parse_rate(text: str) -> int:
    """`20M` -> 20 000 000 bytes per second (decimal, like MB/s)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (examples: 20M, 5000000)") from exc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark ferry's live migration.")
    parser.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    parser.add_argument(
        "--write-rate",
        type=parse_rate,
        default=20 * 10**6,
        help="the writer's rate, bytes/s (default 20M = 20 MB/s)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument(
        "--runs",
        default="idle,writer,copy",
        help="which of idle,writer,copy,writeblock to run (default idle,writer,copy)",
    )
    parser.add_argument(
        "--writeblock-rate",
        type=parse_rate,
        default=100 * 10**6,
        help="the writer's rate in the writeblock run, bytes/s (default 100M = 100 MB/s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {name.strip() for name in args.runs.split(",")}
    unknown = wanted - {"idle", "writer", "copy", "writeblock"}
    if unknown:
        names = "idle, writer, copy, writeblock"
        log(f"migrate.py: unknown run(s) {', '.join(sorted(unknown))}: use {names}")
        return 2
    for tool in ("nbdcopy", "qemu-nbd"):
        if shutil.which(tool) is None and "copy" in wanted:
            log(f"migrate.py: `{tool}` is not installed")
            return 2
    adopted = become_subreaper()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="migrate-", dir=args.workdir))
    image = tmp / "image.raw"
    summary: dict[str, Any] = {
        "config": {"size": args.size, "write_rate": args.write_rate},
        "machine": machine(args.workdir),
        "versions": {
            "ferry": ferry_version(),
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbdcopy": tool_version(["nbdcopy", "--version"]),
        },
    }
    runs: list[Run] = []
    limit: Run | None = None
    try:
        log(f"creating {human_size(args.size)} of random data in {image}")
        create_image(image, args.size)
        if "idle" in wanted:
            log("[idle migration]")
            runs.append(migrate_once("ferry idle", image, args.size, tmp, adopted, None))
        if "writer" in wanted:
            log("[migration with a writer]")
            runs.append(
                migrate_once("ferry + writer", image, args.size, tmp, adopted, args.write_rate)
            )
        if "writeblock" in wanted:
            log("[write-blocking migration with a writer]")
            runs.append(migrate_writeblock(image, args.size, tmp, adopted, args.writeblock_rate))
        if "copy" in wanted:
            log("[copy limit]")
            runs.append(copy_limit("nbdcopy qemu→qemu", image, args.size, tmp, adopted, False))
            limit = copy_limit("nbdcopy --flush", image, args.size, tmp, adopted, True)
            runs.append(limit)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        reap_orphans()
    print_report(summary, runs, limit)
    print_writer_latency(runs)
    if args.json is not None:
        result = {
            **summary,
            "copy_limit": None if limit is None else limit.name,
            "runs": [run.as_json() for run in runs],
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
