"""The words of a takeover after its descriptor exchange, and how long each side waits.

Each note is one kind byte and a text (:func:`ferry.handoff.fdpass.send_note`).
The order, and what each promises, is in the package doc.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ASK_TIMEOUT",
    "DESCRIBE",
    "NO",
    "READY",
    "REQUEST",
    "SERVING",
    "SETTLE_TIMEOUT",
    "STEP_TIMEOUT",
    "YOURS",
]

#: The control socket's methods: what the export is served with, and the takeover itself.
DESCRIBE: Final = "served"
REQUEST: Final = "takeover"

#: taker -> giver: "I checked everything and touch nothing until you say yours".
READY: Final = b"r"
#: either way, instead of the expected note: "no", and why.
NO: Final = b"n"
#: giver -> taker: "I never serve again, unless you end before you say serving".
YOURS: Final = b"y"
#: taker -> giver: "I hold everything and serve from now on".
SERVING: Final = b"s"

#: How long FLUSH and FUA writes already running may take to finish before
#: the giver gives up the takeover (and serves on).
SETTLE_TIMEOUT: Final = 10.0
#: How long either side waits for the other at each step after that.
STEP_TIMEOUT: Final = 10.0
#: How long the taker waits for the offer: the giver settles first.
ASK_TIMEOUT: Final = SETTLE_TIMEOUT + 2 * STEP_TIMEOUT
