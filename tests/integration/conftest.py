"""What every integration test gets: no ferry process outlives the test that started it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from support import FerryProcess


@pytest.fixture(autouse=True)
def ferry_processes_are_reaped() -> Iterator[None]:
    """A test that fails before stopping its ferries would leave them holding ports,
    leases and network namespaces for the tests after it."""
    before = len(FerryProcess.started)  # a wider fixture's processes, started first, stay
    yield
    for command in FerryProcess.reap(before):
        warnings.warn(f"killed a ferry the test left running: {command}", stacklevel=1)
