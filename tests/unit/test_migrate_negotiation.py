"""The source's half of FERRY_OPT_CONNECTIONS: a FERRY_REP_LANDING, then the ACK that counts.

The destination answers as NBD_OPT_GO answers with NBD_REP_INFO: the data
in a reply of its own, then a plain ACK (``ferry.nbd.constants``).  The
landing counts only once the ACK has followed it; anything else leaves the
attempt without one, and the source disconnects its clients at the handoff
as it would for a plain listener.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from ferry.migrate.attempt import Attempt
from ferry.migrate.negotiation import Negotiation
from ferry.nbd.constants import OptionReply
from ferry.nbd.events import ConnectionLanding, OptionAnswered, OptionData

# From ferry's extension as documented, not from its constants module.
OPT_CONNECTIONS = 0x46455202
REP_LANDING = 0x46455202
OPT_MIGRATE = 0x46455201
LANDING = ConnectionLanding("boot/net:7", "10.0.0.5/24@eth0")


def negotiation() -> Negotiation:
    driver: Any = SimpleNamespace(export=SimpleNamespace(name="disk"))
    return Negotiation(driver)


def answer(attempt: Attempt, *events: OptionData | OptionAnswered) -> None:
    """Feed ``events`` to the negotiation as the source's wire would."""
    judge = negotiation()
    for event in events:
        if isinstance(event, OptionData):
            judge.option_data(attempt, event)
        else:
            judge.option_answered(attempt, event)


def test_a_landing_then_the_ack_is_where_the_clients_may_go() -> None:
    attempt = Attempt(1)
    answer(
        attempt,
        OptionData(OPT_CONNECTIONS, REP_LANDING, LANDING.to_bytes()),
        OptionAnswered(OPT_CONNECTIONS, OptionReply.ACK),
    )
    assert attempt.landing == LANDING


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([OptionAnswered(OPT_CONNECTIONS, OptionReply.ACK)], id="ACK alone"),
        pytest.param(
            [
                OptionData(OPT_CONNECTIONS, REP_LANDING, LANDING.to_bytes()),
                OptionAnswered(OPT_CONNECTIONS, OptionReply.ERR_UNSUP, "no CAP_NET_ADMIN"),
            ],
            id="a landing, then an error",
        ),
        pytest.param(
            [
                OptionData(OPT_CONNECTIONS, REP_LANDING, LANDING.to_bytes()[:-1]),
                OptionAnswered(OPT_CONNECTIONS, OptionReply.ACK),
            ],
            id="a landing cut short",
        ),
        pytest.param(
            [
                OptionData(OPT_CONNECTIONS, REP_LANDING, b"\0\1\xff\0\0"),
                OptionAnswered(OPT_CONNECTIONS, OptionReply.ACK),
            ],
            id="a landing no UTF-8",
        ),
        pytest.param(
            [
                OptionData(OPT_CONNECTIONS, 0x46455299, LANDING.to_bytes()),
                OptionAnswered(OPT_CONNECTIONS, OptionReply.ACK),
            ],
            id="another reply type",
        ),
        pytest.param(
            [
                OptionData(OPT_MIGRATE, REP_LANDING, LANDING.to_bytes()),
                OptionAnswered(OPT_MIGRATE, OptionReply.ACK),
            ],
            id="a landing for another option",
        ),
    ],
)
def test_without_a_landing_acknowledged_the_clients_stay(
    events: list[OptionData | OptionAnswered],
) -> None:
    attempt = Attempt(1)
    answer(attempt, *events)
    assert attempt.landing is None
