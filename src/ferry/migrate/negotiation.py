"""An attempt's handshake: the destination's hello, its answer to the migration, its size.

The destination has ``hello_timeout`` to say hello.  Its answer to
``FERRY_OPT_MIGRATE`` says what it is: a ferry listener (ACK: the migration
ends in a handoff) or a plain NBD server (ERR_UNSUP: a mirror that ends in
FLUSH and DISC).  Then its export is judged (:func:`refusal_of`): a
destination that cannot take this migration is refused before a byte is
copied, with flexnbd's words (what ``mirror`` answers) and the reason (what
the log says): another size, a read-only export, a plain NBD server asked to
take control, a read-only source asked to hand control over.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from ferry.clock import cancel_call
from ferry.migrate.attempt import Attempt, Driver
from ferry.migrate.options import (
    NO_HELLO,
    REJECTED,
    SIZE_MISMATCH,
    FinishAction,
    MirrorOptions,
)
from ferry.nbd.constants import (
    FERRY_OPT_CONNECTIONS,
    FERRY_OPT_MIGRATE,
    FERRY_REP_LANDING,
    OptionReply,
    TransmissionFlag,
)
from ferry.nbd.events import ConnectionLanding, Negotiated, OptionAnswered, OptionData
from ferry.storage import Image

__all__ = ["Negotiation", "refusal_of"]

_log = Logger()


class NegotiationDriver(Driver, Protocol):
    """What the handshake needs of the source besides what every part does."""

    def accepted(self, attempt: Attempt, negotiated: Negotiated) -> None:
        """The destination can take this migration: the passes begin."""
        ...


class Negotiation:
    """Judges each attempt's handshake for the source."""

    def __init__(self, driver: NegotiationDriver) -> None:
        self._driver = driver

    def wait_for_hello(self, attempt: Attempt) -> None:
        """Connected: the hello must come within ``hello_timeout``."""
        timeout = self._driver.options.hello_timeout
        attempt.hello_timer = self._driver.clock.call_later(timeout, self._no_hello, attempt)

    def _no_hello(self, attempt: Attempt) -> None:
        attempt.hello_timer = None
        if self._driver.current(attempt) and attempt.negotiated is None:
            timeout = self._driver.options.hello_timeout
            self._driver.fail(attempt, NO_HELLO, f"no hello within {timeout} s")

    def option_answered(self, attempt: Attempt, event: OptionAnswered) -> None:
        if event.option == FERRY_OPT_CONNECTIONS:
            self._landing(attempt, event)
            return
        if event.option != FERRY_OPT_MIGRATE:
            return
        if event.reply == OptionReply.ACK:
            attempt.plain = False
        elif event.reply == OptionReply.ERR_UNSUP:
            attempt.plain = True
        else:
            detail = f"{event.reply.name}: {event.message}" if event.message else event.reply.name
            why = f"the destination refused the migration: {detail}"
            self._driver.fail(attempt, REJECTED, why)

    def option_data(self, attempt: Attempt, event: OptionData) -> None:
        """A reply with data before an option's answer: FERRY_OPT_CONNECTIONS' landing."""
        if event.option != FERRY_OPT_CONNECTIONS or event.reply != FERRY_REP_LANDING:
            return  # a reply type this source does not know: ignored, as NBD_REP_INFO's are
        try:
            attempt.offered_landing = ConnectionLanding.from_bytes(event.payload)
        except ValueError as error:
            _log.warn(
                "mirror of {export}: cannot read the destination's FERRY_REP_LANDING "
                "({error}): its clients will be disconnected",
                export=self._driver.export.name,
                error=error,
            )

    def _landing(self, attempt: Attempt, event: OptionAnswered) -> None:
        """The destination's answer to FERRY_OPT_CONNECTIONS: may the clients come along?"""
        name = self._driver.export.name
        if event.reply != OptionReply.ACK:
            _log.info(
                "mirror of {export}: the destination takes no client connections: {why}",
                export=name,
                why=event.message or event.reply.name,
            )
            return
        attempt.landing = attempt.offered_landing
        if attempt.landing is None:
            _log.warn(
                "mirror of {export}: the destination acknowledged FERRY_OPT_CONNECTIONS "
                "without a readable FERRY_REP_LANDING: its clients will be disconnected",
                export=name,
            )

    def negotiated(self, attempt: Attempt, negotiated: Negotiated) -> None:
        cancel_call(attempt.hello_timer)
        attempt.hello_timer = None
        driver = self._driver
        refusal = refusal_of(driver.options, driver.image, negotiated, plain=attempt.plain)
        if refusal is not None:
            driver.fail(attempt, *refusal)
            return
        plain = attempt.plain if attempt.plain is not None else True  # oldstyle: no options
        attempt.plain = plain and not driver.options.flexnbd
        driver.accepted(attempt, negotiated)



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
