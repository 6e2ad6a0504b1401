"""Fixtures of the browser tests: where screenshots go, and a line at the end of the run
saying where they are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The shared helpers (daemon_harness, simfixtures) live one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_written: list[Path] = []


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$HPO_SYNC_SCREENSHOTS``, else ``screenshots`` under pytest's base temp dir."""
    env = os.environ.get("HPO_SYNC_SCREENSHOTS")
    path = Path(env) if env else tmp_path_factory.getbasetemp() / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    _written.append(path)
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in _written:
        shots = sorted(path.glob("*.png"))
        if shots:
            terminalreporter.write_line(f"web UI screenshots ({len(shots)}): {path}")
