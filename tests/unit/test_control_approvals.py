"""The approver of an export's migration steps, on one JSON connection: questions, answers,
refusals, timeouts and a lost connection (ferry.control.approvals)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock as TaskClock

from ferry.clock import ReactorClock
from ferry.control.approvals import Approvals
from ferry.hooks import HookOutcome, Stage


class Out:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


class Export:
    name = "disk"


class Mirrors:
    def __init__(self) -> None:
        self.export = Export()
        self.approver: Any = None


def make() -> tuple[Approvals, Out, Mirrors, TaskClock]:
    out, mirrors, clock = Out(), Mirrors(), TaskClock()

    def find(name: str | None) -> Any:
        if name not in (None, "disk"):
            raise LookupError(f"no export named {name!r}")
        return mirrors

    approvals = Approvals(out, ReactorClock(clock), find)  # type: ignore[arg-type]
    return approvals, out, mirrors, clock


def outcome_of(approvals: Approvals, stage: Stage) -> list[HookOutcome]:
    got: list[HookOutcome] = []
    approvals.ask(stage, "127.0.0.1:1").addCallback(got.append)
    return got


def test_a_registered_approver_is_asked_and_its_answers_decide() -> None:
    approvals, out, mirrors, _ = make()
    answer = approvals.request(1, "approver", {"export": "disk", "timeout": 5})
    assert answer == {"id": 1, "result": {"approver": "disk", "timeout": 5.0}}
    assert mirrors.approver is approvals
    yes = outcome_of(approvals, Stage.PRE_MIGRATE)
    no = outcome_of(approvals, Stage.PRE_SWITCHOVER)
    asked = [message["approve"] for message in out.sent]
    assert [(q["id"], q["stage"], q["export"]) for q in asked] == [
        (1, "pre-migrate", "disk"),
        (2, "pre-switchover", "disk"),
    ]
    assert approvals.request(7, "approval", {"id": 1, "approve": True})["result"]["approve"]
    approvals.request(8, "approval", {"id": 2, "approve": False, "reason": "freeze"})
    assert yes == [HookOutcome(True)]
    assert no == [HookOutcome(False, "approver vetoed pre-switchover: freeze")]
    again = approvals.request(9, "approval", {"id": 2, "approve": True})
    assert again["error"]["message"] == "approval: no question 2 waits for an answer"


def test_no_answer_in_time_or_a_lost_connection_is_a_veto() -> None:
    approvals, _, mirrors, clock = make()
    approvals.request(1, "approver", {"timeout": 2})
    late = outcome_of(approvals, Stage.PRE_SWITCHOVER)
    clock.advance(1.9)
    assert late == []
    clock.advance(0.2)
    assert late == [HookOutcome(False, "approver gave no answer to pre-switchover in 2 s")]
    gone = outcome_of(approvals, Stage.PRE_MIGRATE)
    approvals.stop()
    assert gone == [HookOutcome(False, "approver went away before answering pre-migrate")]
    assert mirrors.approver is None
    clock.advance(10)  # its timer was cancelled: nothing fires twice


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("approver", {"export": "nosuch"}, "approver: no export named 'nosuch'"),
        ("approver", {"timeout": 0}, "approver: timeout must be seconds above 0"),
        ("approver", {"timeout": True}, "approver: timeout must be seconds above 0"),
        ("approver", {"export": ""}, "approver: export must be a name"),
        ("approver", {"who": 1}, "approver takes only 'export' and 'timeout'"),
        ("approver", [], "approver: params must be an object"),
        ("approval", {"id": "1", "approve": True}, "approval takes 'id' (a number), 'approve'"),
        ("approval", {"id": 1, "approve": "yes"}, "approval takes 'id' (a number), 'approve'"),
        ("approval", {"id": 1, "approve": False, "reason": 3}, "approval: reason must be a string"),
    ],
)
def test_bad_requests_are_refused_in_one_line(method: str, params: Any, message: str) -> None:
    approvals, _, mirrors, _ = make()
    answer = approvals.request(4, method, params)
    assert answer == {"id": 4, "error": {"code": answer["error"]["code"], "message": message}}
    assert mirrors.approver is None


def test_one_approver_per_export_and_per_connection() -> None:
    first, _, mirrors, _ = make()
    first.request(1, "approver", {})
    assert first.request(2, "approver", {})["error"]["message"] == (
        "this connection already approves an export"
    )
    second = Approvals(Out(), ReactorClock(TaskClock()), lambda name: mirrors)  # type: ignore[arg-type]
    assert second.request(3, "approver", {})["error"]["message"] == (
        "export disk has an approver already"
    )
