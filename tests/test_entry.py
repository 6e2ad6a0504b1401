"""The ``hpo-sync`` command's entry point, in processes of its own: signals that come while
the command line's modules import."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

_SIGNAL_AS_CLI_IMPORTS = """
import os, signal, sys

SIG = getattr(signal, sys.argv[1])

class Trip:
    '''Sends a signal to this process as the command line's modules begin to import.'''
    def find_spec(self, name, path=None, target=None):
        if name == "structlog":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), SIG)
        return None

sys.meta_path.insert(0, Trip())
sys.argv = ["hpo-sync", *sys.argv[2:]]
from hpo_sync.entry import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("sig", "argv", "ignored", "returncode"),
    [
        ("SIGHUP", ["run"], False, 2),  # held, then forgotten: the config is broken
        ("SIGTERM", ["sync"], False, 2),
        ("SIGTERM", ["ls"], False, -signal.SIGTERM),  # given back and delivered
        ("SIGHUP", ["sync"], False, -signal.SIGHUP),  # sync takes SIGTERM over only
        ("SIGHUP", ["sync"], True, 2),  # under nohup: ignored it was, ignored it stays
        ("SIGHUP", ["ls"], True, 1),  # (it ran, and found no mirror)
        # a Ctrl-C, given back and delivered: the status a Ctrl-C ends with, no traceback
        ("SIGINT", ["ls"], False, 130),
        ("SIGINT", ["sync"], False, 130),
    ],
)
def test_the_command_holds_signals_before_it_imports_the_command_line(
    tmp_path: Path, sig: str, argv: list[str], ignored: bool, returncode: int
) -> None:
    """A signal while the command line's modules import (~150 ms) used to get its default
    action: a SIGHUP killed `run`. The entry point holds them first; what the command does
    not take over is given back as it was (ignored under `nohup`) and, if it was not
    ignored, delivered as it would have been."""
    broken = tmp_path / "config.toml"
    broken.write_text("[sync]\nhot_interval_s = 'soon'\n", encoding="utf-8")
    signum = getattr(signal, sig)
    child = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AS_CLI_IMPORTS, sig, "--config", str(broken), *argv],
        capture_output=True, text=True, timeout=60,
        preexec_fn=(lambda: signal.signal(signum, signal.SIG_IGN)) if ignored else None,
    )  # fmt: skip
    assert child.returncode == returncode, child.stderr
    assert "Traceback" not in child.stderr
    if returncode == 2:
        assert "config error" in child.stderr


def test_the_installed_command_starts_at_the_entry_point() -> None:
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="hpo-sync")
    assert script.value == "hpo_sync.entry:main"
