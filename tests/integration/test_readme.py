"""The README stays true: its commands are run here, as they are written."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from ferry.migrate.core.stats import FailureReason
from support import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def fenced_block(heading: str, language: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block under {heading}"
    return match.group(1)


def test_the_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    commands = [
        line.split("#")[0].strip() for line in fenced_block("Quick start", "sh").splitlines()
    ]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_demo_runs_and_verifies_the_copy() -> None:
    env = dict(os.environ, FERRY_SKIP_INSTALL="1")
    result = run(["bash", str(REPO / "scripts" / "demo.sh")], env=env, timeout=120)
    out = result.stdout.decode()
    assert "blocks the client never wrote are byte for byte the same" in out
    assert "the client's connection moved with the image" in out  # the suite runs as root
    assert "connections_moved=1" in out
    assert "state=serving" in out
    assert "ferry stopped cleanly" in out


def test_the_session_in_using_it_runs_as_written(tmp_path: Path) -> None:
    lines = [line[2:] for line in fenced_block("Using it", "console").splitlines()]
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, timeout=120)
    out = result.stdout.decode()
    log = (tmp_path / "ferry.log").read_text()
    assert result.returncode == 0, out + result.stderr.decode() + log
    assert "state=serving" in out
    assert "ab ab ab ab" in out  # ferry read shows what qemu-io wrote
    assert 'ferry_state{export="disk",machine="role",state="serving"} 1.0' in out
    assert out.rstrip().endswith("role disk stopped")
    assert (tmp_path / "disk.img").read_bytes()[4096:4101] == b"hello"


def test_the_watching_session_runs_as_written(tmp_path: Path) -> None:
    """The console block, fed to one bash a line at a time, as someone would type it.

    One thing is added: after starting ``ferry events … &`` the test waits for
    its ``following`` line on stderr, as a reader sees the subscription begin
    before typing the migration.  Each line must succeed.
    """
    import json
    import xml.etree.ElementTree as ET

    from support import Deadline, read_line

    mark = "__readme_line_done__"
    lines = [line[2:] for line in fenced_block("Watching a migration", "console").splitlines()]
    shell = subprocess.Popen(
        ["bash"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so a failure can stop every job it started
    )
    assert shell.stdin is not None and shell.stdout is not None and shell.stderr is not None
    deadline = Deadline(120)
    out: list[str] = []
    err: list[str] = []
    try:
        for line in lines:
            shell.stdin.write(f"{line}\necho {mark} $?\n".encode())
            shell.stdin.flush()
            while not (got := read_line(shell.stdout, deadline).decode()).startswith(mark):
                assert got, f"bash ended during {line!r}: {''.join(out)}"
                out.append(got)
            assert got.split() == [mark, "0"], f"{line!r} failed: {''.join(out)}"
            if line.startswith("ferry events") and line.endswith("&"):
                while not (got := read_line(shell.stderr, deadline).decode()).startswith(
                    "ferry events: following"
                ):
                    assert got, f"ferry events did not subscribe: {''.join(err)}"
                    err.append(got)
        shell.stdin.close()
        assert shell.wait(timeout=deadline.left()) == 0
        err.append(shell.stderr.read().decode())
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    text, errors = "".join(out), "".join(err)
    assert "has control of the image" in text, text + errors
    assert (tmp_path / "copy.img").read_bytes() == (tmp_path / "disk.img").read_bytes()
    trace = (tmp_path / "src.jsonl").read_text().splitlines()
    events = (tmp_path / "events.jsonl").read_text().splitlines()
    assert set(events) <= set(trace) and events[-1] == trace[-1]
    assert any('"handed_off"' in line for line in events)
    assert "ferry events: src.sock: the server is shutting down" in errors
    assert "\nsrc.jsonl: migration disk\n" in text
    svg = ET.parse(tmp_path / "timeline.svg").getroot()
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}g[@class='lane']")) == 5
    log = [json.loads(line) for line in (tmp_path / "src-log.jsonl").read_text().splitlines()]
    assert {event["export"] for event in log} == {"disk"}


def test_the_lease_session_runs_as_written_and_prints_what_the_readme_shows(
    tmp_path: Path,
) -> None:
    """The Leases session as one script; its output is the README's text block exactly,
    but for the host name, the two pids and the directory it ran in."""
    import socket

    lines = [line[2:] for line in fenced_block("Leases", "console").splitlines()]
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # in order: the refusal comes before "refused: 1"
        timeout=60,
    )
    out = result.stdout.decode()
    log = (tmp_path / "ferry.log").read_text()
    assert result.returncode == 0, out + log
    served = re.match(r"pid=(\d+) ", out)
    assert served, out
    expected = (
        re.escape(fenced_block("Leases", "text"))
        .replace("storage1", re.escape(socket.gethostname()))
        .replace("4242", served.group(1))  # the server: its status, its owner
        .replace("4243", r"\d+")  # ferry lock run
        .replace("/home/op", re.escape(str(tmp_path.resolve())))
    )
    assert re.fullmatch(expected, out), out + log


def test_the_readme_diagram_matches_the_generated_one() -> None:
    generated = set((REPO / "statecharts" / "role.mmd").read_text().splitlines())
    shown = fenced_block("State machines and traces", "mermaid").splitlines()
    missing = [line for line in shown if line not in generated]
    assert not missing, f"README diagram lines not in role.mmd: {missing}"
    edges = {line for line in generated if "-->" in line and "shutdown" not in line}
    assert edges <= set(shown), "README diagram lost an edge of role.mmd"


def test_the_dashboard_and_alert_checks_run_as_written() -> None:
    commands = [
        line.split("#")[0].strip()
        for line in fenced_block("Dashboards and alerts", "sh").splitlines()
    ]
    assert len(commands) == 3
    for command in commands:
        result = subprocess.run(command.split(), cwd=REPO, capture_output=True, timeout=120)
        assert result.returncode == 0, command + result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS" in result.stdout  # the last one: promtool test rules


def test_the_metrics_section_names_every_migration_failure_reason() -> None:
    section = README.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    paragraph = section.split("A `reason` is one of ", 1)[1].split(". ", 1)[0]
    assert re.findall(r"`(\w+)`", paragraph) == [reason.value for reason in FailureReason]


def session_script(heading: str) -> str:
    """The README's console block under ``heading`` as one bash script that stops at a failure."""
    lines = [line[2:] for line in fenced_block(heading, "console").splitlines()]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def run_script(
    script: str,
    cwd: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    *,
    merged: bool = False,
) -> tuple[int, str, str]:
    """Run ``script`` in bash (in ``env``, if given); its exit status, stdout and stderr
    (``merged``: stderr interleaved into stdout, as a terminal shows them; then "").

    Into files, not pipes: a job it leaves in the background (a server whose
    sibling failed, so ``set -e`` ended the script early) would hold a pipe
    open until the timeout.  Whatever it leaves is killed.
    """

    with (cwd / ".stdout").open("wb") as out, (cwd / ".stderr").open("wb") as err:
        shell = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            stdout=out,
            stderr=out if merged else err,
            env=env,
            start_new_session=True,
        )
        try:
            code = shell.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    return code, (cwd / ".stdout").read_text(), (cwd / ".stderr").read_text()


def test_the_tls_session_runs_as_written(tmp_path: Path) -> None:
    from tls_support import make_pki

    pki = make_pki(tmp_path / "made")
    (pki.node).rename(tmp_path / "pki")  # the five files of a test CA, as the README says
    code, out, err = run_script(session_script("TLS"), tmp_path)
    logs = "".join((tmp_path / name).read_text() for name in ("src.log", "dst.log"))
    assert code == 0, out + err + logs
    assert (tmp_path / "senders").read_text() == "CN=source,O=ferry tests\n"
    assert "server requires TLS encryption first" in err
    assert "refused: 1" in out
    assert str(64 << 20) in out  # nbdinfo over TLS sees the export
    assert "migration completed: 127.0.0.1:10816 has control of the image" in out
    assert out.rstrip().endswith("ab ab ab ab")
    assert "TLS with 127.0.0.1: CN=source,O=ferry tests" in (tmp_path / "dst.log").read_text()
    assert (tmp_path / "copy.img").read_bytes() == (tmp_path / "disk.img").read_bytes()


def test_the_takeover_session_runs_as_written(tmp_path: Path) -> None:
    # nbdsh runs `python3 -m nbd`: here that must be Debian's Python, which has the bindings
    # (on a stock Debian it is the first python3 on PATH anyway).
    debian = tmp_path / "debian-python"
    debian.mkdir()
    (debian / "python3").symlink_to("/usr/bin/python3")
    env = dict(os.environ, PATH=f"{debian}:{os.environ['PATH']}")
    script = session_script("Upgrading in place (--takeover)")
    code, out, err = run_script(script, tmp_path, env=env)
    logs = [tmp_path / name for name in ("old.log", "new.log")]
    old_log, new_log = (log.read_text() if log.exists() else "" for log in logs)
    assert code == 0, out + err + old_log + new_log
    assert "the old ferry exited 0" in out
    before, status = (line for line in out.splitlines() if line.startswith("pid="))
    assert before.split()[0] != status.split()[0]  # another process answers on ctl.sock
    assert "state=serving" in status and "num_clients=1" in status, status
    assert "connections_moved=1" in status, status  # the client's connection moved
    assert "the client was never disconnected" in out
    assert "handed export 'disk' over (confirmed)" in old_log
    assert "took disk over from process" in new_log


def test_the_daemon_session_runs_as_written(tmp_path: Path) -> None:
    """The daemon's file as the README shows it, then its console block as one script."""
    (tmp_path / "ferry.toml").write_text(fenced_block("A daemon of many exports", "toml"))
    code, out, _ = run_script(session_script("A daemon of many exports"), tmp_path, merged=True)
    log = (tmp_path / "daemon.log").read_text()
    assert code == 0, out + log
    assert "state=serving" in out
    assert 'export="vm1":\n' in out and 'export="vm2":\n' in out, out  # nbdinfo --list
    assert 'export="vm3":\n' not in out  # listening: no client could use it yet
    listed = [line.split()[0] for line in out.splitlines() if " state=" in line and "mode=" in line]
    assert listed == ["vm2", "vm3", "vm4"], out
    assert 'ferry_state{export="vm4",machine="role",state="serving"} 1.0' in out
    assert "ready: 3 exports on 127.0.0.1:10819" in log
    assert (tmp_path / "vm1.img").read_bytes()[: 1 << 20] == b"\xcd" * (1 << 20)


def test_the_isolation_figures_are_the_code_s() -> None:
    from ferry.node import WORKER_THREADS
    from ferry.serve.lanes import JOBS_PER_EXPORT
    from ferry.serve.limits import MAX_CLIENTS, MAX_CONNECTIONS_PER_ADDRESS

    section = README.split("## A daemon of many exports\n", 1)[1].split("\n## ", 1)[0]
    words = " ".join(section.split())  # however the paragraph is wrapped
    assert f"each export gets at most {JOBS_PER_EXPORT} of them" in words
    assert f"holds {JOBS_PER_EXPORT} threads" in words
    assert f"(the node has {WORKER_THREADS})" in words
    limits = f"limits on connections, {MAX_CLIENTS} in all and {MAX_CONNECTIONS_PER_ADDRESS}"
    assert limits + " from one address" in words


def test_the_simulation_session_runs_as_written(tmp_path: Path) -> None:
    """The simulator's console block as one script, and the line the README says it prints."""
    section = "Deterministic simulation"
    lines = [line[2:] for line in fenced_block(section, "console").splitlines()]
    script = "set -uo pipefail\n" + "\n".join(lines) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, timeout=300)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert re.search(r"^20 seeds from 0: 0 failed; ", out, re.MULTILINE), out
    assert "exit status 1" in out
    assert fenced_block(section, "text").strip() in out
    failed = (tmp_path / "failed.txt").read_text()
    assert "replays identically" in failed and "DOES NOT REPLAY" not in failed
    assert "replay: python -m ferry.sim --seeds 1 --from 4 --bug skip-last-pass" in failed
    trace = (tmp_path / "trace.txt").read_text().splitlines()
    assert trace[0].startswith("0.000000 cluster lockspace ")
    assert len(trace) > 100


def test_the_simulation_section_names_every_fault_and_bug() -> None:
    from ferry.sim.bugs import BUGS
    from ferry.sim.faults import FAULTS

    section = README.split("## Deterministic simulation\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if "| `--" in line}
    assert re.findall(r"`([a-z-]+)`", rows["`--faults LIST`"].split("some of", 1)[1]) == list(
        FAULTS
    )
    assert re.findall(r"`([a-z-]+)`", rows["`--bug NAME`"].split(":", 1)[1]) == list(BUGS)


def test_the_transports_session_runs_as_written(tmp_path: Path) -> None:
    """unix: then exec:, as the README shows them; the image arrives whole at the third node."""
    # exec: starts a listener in the script's session: it is killed with it.
    code, out, _ = run_script(session_script("Transports: unix: and exec:"), tmp_path, merged=True)
    assert code == 0, out + (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "migration completed: unix:b.nbd has control of the image" in out, out
    assert "migration completed: exec:ferry listen " in out, out
    last = out.rstrip().splitlines()[-1]
    assert "state=serving" in last and "has_control=true" in last, out


def test_the_drain_session_runs_as_written(tmp_path: Path) -> None:
    """Blocked, vm2 stays and the first drain says so; unblocked, the second moves it."""
    code, out, _ = run_script(session_script("Draining a daemon"), tmp_path, merged=True)
    assert code == 0, out + (tmp_path / "old.log").read_text()
    assert "vm2: blocked: nightly backup; left serving here" in out, out
    assert "drain: 1 of 2 exports moved; left serving here: vm2 (blocked: nightly backup)" in out
    assert "something was left" in out
    assert "drain: 1 of 1 exports moved" in out, out
    listed = [line.split()[0] for line in out.splitlines() if " state=" in line and "mode=" in line]
    assert sorted(listed) == ["spare", "vm1", "vm2"], out
