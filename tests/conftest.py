"""What every test gets, however the suite was started."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """SIGINT as a terminal has it, not as a background job inherits it.

    A shell without job control starts its background commands with SIGINT
    ignored, and an ignored signal stays ignored across ``exec``: every
    process the tests start would then shrug off the SIGINT a test sends
    (``sh`` may not even trap it).  A handler here is reset to the default
    in each child instead.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
