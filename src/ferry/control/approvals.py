"""A JSON-lines connection as the approver of an export's migration steps (CRIU's RPC notify).

A client sends ``{"method": "approver", "params": {"export": NAME, "timeout":
SECONDS}}`` and keeps the connection open: from then on each veto-able step
of that export's migrations (``pre-migrate``, ``pre-switchover``, after
the stage's hook, if any, approved) waits for it.  ferry sends
``{"approve": {"id": N, "export": ..., "stage": ..., "peer": ...,
"timeout": ...}}``; the client answers ``{"method": "approval", "params":
{"id": N, "approve": true}}`` or ``{"approve": false, "reason": "..."}``.
No answer within the timeout, or the connection gone, is a veto, as a hook
that hangs or fails is one: the source's veto path (``MirrorSource.veto``)
cancels the migration, releases the clients and serves on.  One approver
per export; it goes with its connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.internet.defer import Deferred

from ferry.clock import Clock, DelayedCall, cancel_call
from ferry.control.jsonlines import JsonLines
from ferry.hooks import HookOutcome, Stage
from ferry.migrate.manager import MirrorManager

__all__ = ["APPROVAL_METHODS", "DEFAULT_APPROVAL_TIMEOUT", "Approvals"]

APPROVAL_METHODS: Final = frozenset({"approver", "approval"})
#: Seconds an approver has to answer, unless it registered with another timeout.
DEFAULT_APPROVAL_TIMEOUT: Final = 30.0
_BAD_PARAMS: Final = -32602


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}


class Approvals:
    """One JSON connection's side: its registration, the questions it has not answered."""

    def __init__(
        self, out: JsonLines, clock: Clock, find: Callable[[str | None], MirrorManager]
    ) -> None:
        self._out = out
        self._clock = clock
        self._find = find  # the MirrorManager of an export (LookupError: no such export)
        self._mirrors: MirrorManager | None = None
        self._export = ""
        self._timeout = DEFAULT_APPROVAL_TIMEOUT
        self._asked = 0
        self._pending: dict[int, tuple[Stage, Deferred[HookOutcome], DelayedCall]] = {}

    def request(self, request_id: Any, method: str, params: object) -> dict[str, Any]:
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            return _error(request_id, _BAD_PARAMS, f"{method}: params must be an object")
        if method == "approver":
            return self._register(request_id, params)
        return self._answer(request_id, params)

    def _register(self, request_id: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - {"export", "timeout"})
        if unknown:
            return _error(request_id, _BAD_PARAMS, "approver takes only 'export' and 'timeout'")
        name = params.get("export")
        timeout = params.get("timeout", DEFAULT_APPROVAL_TIMEOUT)
        if name is not None and (not isinstance(name, str) or not name):
            return _error(request_id, _BAD_PARAMS, "approver: export must be a name")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            return _error(request_id, _BAD_PARAMS, "approver: timeout must be seconds above 0")
        if self._mirrors is not None:
            return _error(request_id, 1, "this connection already approves an export")
        try:
            mirrors = self._find(name)
        except LookupError as error:
            return _error(request_id, 1, f"approver: {error}")
        if mirrors.approver is not None:
            return _error(request_id, 1, f"export {mirrors.export.name} has an approver already")
        self._mirrors, self._export, self._timeout = mirrors, mirrors.export.name, float(timeout)
        mirrors.approver = self
        return {"id": request_id, "result": {"approver": self._export, "timeout": self._timeout}}

    def _answer(self, request_id: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        number, approve = params.get("id"), params.get("approve")
        reason = params.get("reason", "")
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(approve, bool):
            return _error(request_id, _BAD_PARAMS, "approval takes 'id' (a number), 'approve'")
        if not isinstance(reason, str):
            return _error(request_id, _BAD_PARAMS, "approval: reason must be a string")
        question = self._pending.pop(number, None)
        if question is None:
            return _error(request_id, 1, f"approval: no question {number} waits for an answer")
        stage, answered, timer = question
        cancel_call(timer)
        if approve:
            answered.callback(HookOutcome(True))
        else:
            why = reason or "no reason given"
            answered.callback(HookOutcome(False, f"approver vetoed {stage}: {why}"))
        return {"id": request_id, "result": {"id": number, "approve": approve}}

    # -- ferry.hooks.Approver -------------------------------------------------------------

    def ask(self, stage: Stage, peer: str) -> Deferred[HookOutcome]:
        self._asked += 1
        number = self._asked
        answered: Deferred[HookOutcome] = Deferred()
        timer = self._clock.call_later(self._timeout, self._expired, number)
        self._pending[number] = (stage, answered, timer)
        question = {
            "id": number,
            "export": self._export,
            "stage": stage.value,
            "peer": peer,
            "timeout": self._timeout,
        }
        self._out.send({"approve": question})
        return answered

    def _expired(self, number: int) -> None:
        question = self._pending.pop(number, None)
        if question is not None:
            stage = question[0]
            question[1].callback(
                HookOutcome(False, f"approver gave no answer to {stage} in {self._timeout:g} s")
            )

    def stop(self) -> None:
        """The connection is gone: no longer the approver; what it did not answer is vetoed."""
        if self._mirrors is not None and self._mirrors.approver is self:
            self._mirrors.approver = None
        self._mirrors = None
        pending, self._pending = self._pending, {}
        for stage, answered, timer in pending.values():
            cancel_call(timer)
            answered.callback(HookOutcome(False, f"approver went away before answering {stage}"))
