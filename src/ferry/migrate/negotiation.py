"""Which destinations can take which migration: judged once the destination's hello is in.

A destination that cannot take this migration is refused before a byte is
copied, with flexnbd's words (what ``mirror`` answers) and the reason (what
the log says): another size, a read-only export, a plain NBD server asked to
take control, a read-only source asked to hand control over.
"""

from __future__ import annotations

from ferry.migrate.options import REJECTED, SIZE_MISMATCH, FinishAction, MirrorOptions
from ferry.nbd.constants import TransmissionFlag
from ferry.nbd.events import Negotiated
from ferry.storage import Image

__all__ = ["refusal_of"]


def refusal_of(
    options: MirrorOptions, image: Image, negotiated: Negotiated, *, plain: bool | None
) -> tuple[str, str] | None:
    """Why this destination cannot take this migration: flexnbd's words, and the detail.

    ``plain`` is what the answer to ``FERRY_OPT_MIGRATE`` said (None: there
    was no option, an oldstyle hello, which is a plain server unless the
    source speaks flexnbd's stream).
    """
    plain = True if plain is None else plain
    if options.flexnbd:
        if not negotiated.oldstyle:
            return REJECTED, "not a flexnbd listener: its hello is not oldstyle"
        plain = False  # flexnbd's listener takes control at the DISC
    if negotiated.size != image.size:
        return SIZE_MISMATCH, f"destination has {negotiated.size} bytes, this image {image.size}"
    if negotiated.transmission_flags & TransmissionFlag.READ_ONLY:
        return REJECTED, "the destination export is read-only"
    if not plain and image.read_only:
        return (
            REJECTED,
            "a read-only export cannot hand control over (its lease is read-only): "
            "mirror it into a plain NBD server, or serve it read-write to migrate it",
        )
    if plain and options.action is not FinishAction.NOTHING:
        return (
            REJECTED,
            "the destination is a plain NBD server: it cannot take control, "
            f"so action {options.action.value} is refused (use nothing)",
        )
    return None
