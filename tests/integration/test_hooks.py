"""Hooks on real ferry processes: a veto cancels the migration, the others only tell.

A ``pre-switchover`` hook runs with the clients held and the last pass
flushed (it asks ``ferry status`` itself and finds the role ``quiescing``,
so the reactor answers while it runs).  Exiting 1, or hanging past its
timeout, it cancels the migration with the reason ``hook``: the writing
libnbd client never sees an error, the source serves on with every
acknowledged write, the destination listens again.  A ``pre-migrate`` veto
answers the ``mirror`` command itself.  Hooks that approve let the
migration through, byte for byte, and ``post-handoff`` / ``post-takeover``
run on each side; ``lease-lost`` and ``fenced`` run when the lock file goes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from ferry.control.client import line_command
from ferry.status import parse_line
from support import (
    FERRY,
    FerryProcess,
    Writers,
    check_acked,
    mirror_command,
    random_file,
    run,
    serve,
    sparse_file,
    status,
    wait_until,
)
from workload import BLOCK

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 32 * MiB
BLOCKS = 2048



def hook(path: Path, body: str) -> Path:
    """An executable shell script that first records its environment and what it was told.

    The record appears whole (written aside, then renamed), so a test that
    waits for it never reads half of it."""
    path.write_text(
        "#!/bin/sh\n"
        f"env | grep '^FERRY_' | sort > {path}.env.part && mv {path}.env.part {path}.env\n"
        f"{body}\n"
    )
    path.chmod(0o755)
    return path


def env_of(script: Path) -> dict[str, str]:
    lines = Path(f"{script}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


class Pair:
    """A serving source under a writing client, and a listening destination."""

    def __init__(self, tmp_path: Path, *source_extra: str, dest_extra: tuple[str, ...] = ()):
        locks = tmp_path / "locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        self.space = f"local:{locks}"
        self.source_image = random_file(tmp_path / "source.img", SIZE, seed=3)
        self.original = self.source_image.read_bytes()
        self.dest_image = sparse_file(tmp_path / "dest.img", SIZE)
        self.source_sock = tmp_path / "source.sock"
        self.dest_sock = tmp_path / "dest.sock"
        self.source = serve(
            self.source_image,
            "--name",
            "disk",
            "--sock",
            str(self.source_sock),
            "--lockspace",
            self.space,
            *source_extra,
        )
        self.dest = serve(
            self.dest_image,
            "--name",
            "disk",
            "--sock",
            str(self.dest_sock),
            "--lockspace",
            self.space,
            *dest_extra,
            mode="listen",
        )
        self.writers = Writers({"disk": self.source.uri("disk")}, BLOCKS, tmp_path / "stop")
        self.report: dict[str, object] = {}
        wait_until(
            "the writer connected", lambda: status(self.source_sock)["num_clients"] == "1"
        )

    def mirror(self, *extra: str, check: bool = True) -> tuple[int, str, str]:
        result = run(
            mirror_command(self.dest.port, self.source_sock, "--action", "nothing", *extra),
            timeout=300,
            check=check,
        )
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    def stop_writers(self) -> dict[str, object]:
        if not self.report:
            self.report = self.writers.stop()["disk"]
        return self.report

    def stop(self) -> None:
        self.stop_writers()
        for process in (self.source, self.dest):
            process.stop()


def check_kept(image: bytes, original: bytes, report: dict[str, object]) -> None:
    """Every acknowledged write is in ``image``; every other block is ``original``'s."""
    check_acked(report, image)
    written = {int(o) for part in ("acked", "unanswered") for o in report[part]}  # type: ignore[attr-defined]
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert image[offset : offset + BLOCK] == original[offset : offset + BLOCK], offset


def assert_cancelled_and_serving_on(
    pair: Pair, stderr: str, why: str, by: str = "hook: hook pre-switchover"
) -> None:
    assert f"migration ended cancelled: {by}" in stderr, stderr
    assert why in stderr, stderr
    source = status(pair.source_sock)
    assert (source["state"], source["has_control"], source["is_migrating"]) == (
        "serving",
        "true",
        "false",
    )
    assert source["migration_last_failure"] == "hook"
    wait_until(
        "the destination listening again", lambda: status(pair.dest_sock)["state"] == "listening"
    )
    report = pair.stop_writers()
    assert report["ended"] == "stopped", report  # held, released, never an error
    assert report["writes"]
    pair.stop()
    check_kept(pair.source_image.read_bytes(), pair.original, report)


def test_a_pre_switchover_hook_that_exits_1_cancels_with_clients_held(tmp_path: Path) -> None:
    seen = tmp_path / "status-in-hook"
    veto = hook(
        tmp_path / "veto.sh",
        f"'{sys.executable}' -m ferry status --sock '{tmp_path / 'source.sock'}' > '{seen}'\n"
        "echo not now >&2\nexit 1",
    )
    pair = Pair(tmp_path, "--hook", f"pre-switchover={veto}", "--metrics", "127.0.0.1:0")
    try:
        code, _, stderr = pair.mirror("--wait", check=False)
        assert code == 1
        held = parse_line(seen.read_text())
        assert held["state"] == "quiescing"  # clients held, while the reactor answers
        env = env_of(veto)
        assert env["FERRY_STAGE"] == "pre-switchover"
        assert env["FERRY_EXPORT"] == "disk"
        assert env["FERRY_FILE"] == str(pair.source_image)
        assert env["FERRY_PEER"] == f"127.0.0.1:{pair.dest.port}"
        assert int(env["FERRY_LEASE_TOKEN"]) >= 1
        metrics = run(["curl", "-s", pair.source.metrics_url()]).stdout.decode()
        assert 'ferry_migration_failures_total{export="disk",reason="hook"} 1.0' in metrics
        assert (
            'ferry_hook_runs_total{export="disk",outcome="failed",stage="pre-switchover"} 1.0'
            in metrics
        )
        assert_cancelled_and_serving_on(pair, stderr, "exited 1")
    finally:
        pair.stop()
    assert "not now" in pair.source.stderr_text()  # the hook's output is logged


def test_a_pre_switchover_hook_that_hangs_is_killed_at_its_timeout(tmp_path: Path) -> None:
    hang = hook(tmp_path / "hang.sh", "exec sleep 600")
    pair = Pair(tmp_path, "--hook", f"pre-switchover={hang}", "--hook-timeout", "1")
    try:
        code, _, stderr = pair.mirror("--wait", check=False)
        assert code == 1
        assert_cancelled_and_serving_on(pair, stderr, "did not exit within 1.0 s")
    finally:
        pair.stop()


def test_a_pre_migrate_veto_answers_the_mirror_command(tmp_path: Path) -> None:
    veto = hook(tmp_path / "no.sh", "exit 3")
    pair = Pair(tmp_path, "--hook", f"pre-migrate={veto}")
    try:
        answer = line_command(str(pair.source_sock), ["mirror", "127.0.0.1", str(pair.dest.port)])
        assert answer == (
            1,
            f"Mirror was cancelled: hook: hook pre-migrate {veto} exited 3",
        )
        assert env_of(veto)["FERRY_STAGE"] == "pre-migrate"
        assert status(pair.source_sock)["state"] == "serving"
        assert status(pair.dest_sock)["state"] == "listening"  # never connected
    finally:
        pair.stop()
    assert pair.report["ended"] == "stopped"


def test_approving_hooks_let_it_through_and_the_others_tell(tmp_path: Path) -> None:
    pre_migrate = hook(tmp_path / "pre-migrate.sh", "exit 0")
    pre_switch = hook(tmp_path / "pre-switch.sh", "exit 0")
    handed = hook(tmp_path / "handed.sh", "exit 0")
    taken = hook(tmp_path / "taken.sh", "exit 7")  # a telling hook that fails changes nothing
    pair = Pair(
        tmp_path,
        "--hook",
        f"pre-migrate={pre_migrate}",
        "--hook",
        f"pre-switchover={pre_switch}",
        "--hook",
        f"post-handoff={handed}",
        dest_extra=("--hook", f"post-takeover={taken}"),
    )
    try:
        _, out, _ = pair.mirror("--wait")
        assert out.rstrip().endswith("has control of the image"), out
        wait_until("post-handoff ran", lambda: Path(f"{handed}.env").exists())
        wait_until("post-takeover ran", lambda: Path(f"{taken}.env").exists())
        assert env_of(handed)["FERRY_PEER"] == f"127.0.0.1:{pair.dest.port}"
        assert env_of(taken)["FERRY_STAGE"] == "post-takeover"
        assert status(pair.dest_sock)["state"] == "serving"
        report = pair.stop_writers()
        assert report["ended"] == "stopped"  # the connection moved with the image
    finally:
        pair.stop()
    check_kept(pair.dest_image.read_bytes(), pair.original, pair.report)
    wait_until("the failing hook logged", lambda: "post-takeover failed" in pair.dest.stderr_text())


def test_lease_lost_and_fenced_hooks_run_when_the_lock_file_goes(tmp_path: Path) -> None:
    lost = hook(tmp_path / "lost.sh", "exit 0")
    fenced = hook(tmp_path / "fenced.sh", "exit 0")
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    image = sparse_file(tmp_path / "disk.img", SIZE)
    process: FerryProcess = serve(
        image,
        "--name",
        "disk",
        "--sock",
        str(tmp_path / "s.sock"),
        "--lockspace",
        f"local:{locks}",
        "--hook",
        f"lease-lost={lost}",
        "--hook",
        f"fenced={fenced}",
    )
    try:
        (lock_file,) = locks.glob("*.lock")
        os.unlink(lock_file)
        wait_until("lease-lost ran", lambda: Path(f"{lost}.env").exists())
        wait_until("fenced ran", lambda: Path(f"{fenced}.env").exists())
        assert env_of(fenced)["FERRY_STAGE"] == "fenced"
        assert status(tmp_path / "s.sock")["state"] == "fenced"
    finally:
        process.stop()


def test_a_bad_hook_is_a_usage_error(tmp_path: Path) -> None:
    image = sparse_file(tmp_path / "disk.img", SIZE)
    for hook_arg, words in (
        ("pre-flight=/bin/true", "no stage 'pre-flight'"),
        (f"pre-migrate={tmp_path / 'missing'}", "no such file"),
        (f"pre-migrate={image}", "not executable"),
        ("pre-migrate", "expected STAGE=PATH"),
    ):
        result = run(
            [
                *FERRY,
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                "0",
                "--file",
                str(image),
                "--hook",
                hook_arg,
            ],
            check=False,
        )
        assert result.returncode == 2, result
        assert words in result.stderr.decode()


class ApproverClient:
    """A JSON-lines client registered as the approver of ``disk``: answers each question
    with ``policy(stage)`` (True, False, or None: no answer), in a thread of its own."""

    def __init__(self, sock: Path, policy: Any, timeout: float = 30.0) -> None:
        import json
        import socket
        import threading

        self.stages: list[str] = []
        self._json = json
        self._policy = policy
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(str(sock))
        self._file = self._socket.makefile("rwb")
        register = {"id": 1, "method": "approver", "params": {"export": "disk", "timeout": timeout}}
        self._send(register)
        self.registered = json.loads(self._file.readline())
        self._thread = threading.Thread(target=self._answer_all, daemon=True)
        self._thread.start()

    def _send(self, message: dict[str, Any]) -> None:
        self._file.write(self._json.dumps(message).encode() + b"\n")
        self._file.flush()

    def _answer_all(self) -> None:
        for line in self._file:
            message = self._json.loads(line)
            question = message.get("approve")
            if question is None:
                continue
            self.stages.append(question["stage"])
            verdict = self._policy(question["stage"])
            if verdict is not None:
                params = {"id": question["id"], "approve": verdict, "reason": "change freeze"}
                self._send({"id": 2, "method": "approval", "params": params})

    def close(self) -> None:
        self._socket.close()


def test_an_approver_that_vetoes_the_switchover_cancels_with_clients_held(
    tmp_path: Path,
) -> None:
    pair = Pair(tmp_path)
    approver = ApproverClient(pair.source_sock, lambda stage: stage == "pre-migrate")
    try:
        assert approver.registered["result"] == {"approver": "disk", "timeout": 30.0}
        code, _, stderr = pair.mirror("--wait", check=False)
        assert code == 1
        assert approver.stages == ["pre-migrate", "pre-switchover"]
        assert "hook: approver vetoed pre-switchover: change freeze" in stderr, stderr
        assert_cancelled_and_serving_on(pair, stderr, "change freeze", by="hook: approver vetoed")
    finally:
        approver.close()
        pair.stop()


def test_an_approver_that_does_not_answer_in_time_vetoes(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    approver = ApproverClient(
        pair.source_sock, lambda stage: True if stage == "pre-migrate" else None, timeout=1
    )
    try:
        code, _, stderr = pair.mirror("--wait", check=False)
        assert code == 1
        assert "approver gave no answer to pre-switchover in 1 s" in stderr, stderr
        assert_cancelled_and_serving_on(pair, stderr, "no answer", by="hook: approver gave")
    finally:
        approver.close()
        pair.stop()


def test_an_approver_that_approves_lets_the_migration_complete(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    approver = ApproverClient(pair.source_sock, lambda stage: True)
    try:
        code, out, stderr = pair.mirror("--wait", check=False)
        assert code == 0, stderr
        assert out.rstrip().endswith("has control of the image"), out
        assert approver.stages == ["pre-migrate", "pre-switchover"]
        report = pair.stop_writers()
        assert report["ended"] == "stopped", report
    finally:
        approver.close()
        pair.stop()
    check_kept(pair.dest_image.read_bytes(), pair.original, report)
