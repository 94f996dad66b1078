"""A plain wheel carries the statecharts, so `pip install ferry` finds its machines."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from support import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_every_statechart(tmp_path: Path) -> None:
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ferry-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    charts = sorted(p.name for p in (REPO / "statecharts").glob("*.yaml"))
    assert charts, "no statecharts in the checkout"
    for chart in charts:
        assert f"ferry/statechart_data/{chart}" in names
    assert "ferry/cli/__init__.py" in names
