"""``hpo-sync demo``: within seconds the mirror holds the simulated experiments and status
changes scroll by; ``--duration`` and SIGINT both stop it cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import ROOT, cli, daemon_env, query, signal_until_exit

from hpo_sync.demo import command_name, config_text, format_change
from hpo_sync.store import ChangeRow

pytestmark = pytest.mark.timeout(120)

FAST = (
    "--experiments", "300", "--workspaces", "2", "--speed", "120",
    "--hot-interval", "1", "--full-interval", "10", "--api-port", "0",
)  # fmt: skip


def gone(path: Path) -> bool:
    return not path.exists()


def change(field: str, old: str | None, new: str | None) -> ChangeRow:
    return ChangeRow(1, "exp1", "100001", field, old, new, "2025-01-01T00:00:00Z", 1, False)


def test_change_lines() -> None:
    assert format_change(change("Status", "RUNNING", "FAILED"), "bert_lr_sweep_0042") == (
        "ws 100001 · bert_lr_sweep_0042 (exp1) RUNNING → FAILED"
    )
    assert (
        format_change(change("Status", None, "WAITING"), "x") == "ws 100001 · x (exp1) new, WAITING"
    )
    assert format_change(
        change("TrialStatus", '{"RUNNING":2}', '{"FAILED":1,"RUNNING":1}'), None
    ) == ("ws 100001 · ? (exp1) trials running 2 → failed 1 running 1")
    assert format_change(change("Deleted", "false", "true"), "x").endswith("(exp1) deleted")


def test_demo_config_is_valid(tmp_path: Path) -> None:
    from hpo_sync.config import loads

    cfg = loads(
        config_text(
            sim_url="http://127.0.0.1:1234",
            db_path=tmp_path / "mirror.db",
            workspace_ids=["100001", "100002"],
            api_port=0,
            hot_interval_s=5,
            full_interval_s=120,
        )
    )
    assert cfg.workspace_ids() == ("100001", "100002")
    assert cfg.sync.hot_interval_s == 5 and cfg.api.listen == "127.0.0.1:0"


DEAD_PROXY = "http://127.0.0.1:9"


@pytest.mark.slow
def test_demo_runs_for_a_while_and_shows_experiments_and_changes(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    began = time.monotonic()
    proc = subprocess.run(  # --data-dir relative: the config it writes names absolute paths
        [*cli("demo", "--duration", "12", "--data-dir", "demo"), *FAST],
        capture_output=True,
        text=True,
        timeout=90,
        # A proxy in the environment (down, here) is not for the demo's loopback servers
        env=daemon_env(PYTHONPATH=str(ROOT), HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - began < 40
    out = proc.stdout
    assert "simulator  http://127.0.0.1:" in out
    m = re.search(r"API\s+(http://127\.0\.0\.1:\d+)/v1/experiments", out)
    assert m, out
    assert f"web UI     {m.group(1)}/ui/" in out
    assert f"--config {data / 'config.toml'}" in out
    held = re.search(r"mirror holds ([\d,]+) experiments of 2 workspaces", out)
    assert held and int(held.group(1).replace(",", "")) >= 290, out
    changes = [line for line in out.splitlines() if " → " in line or " new, " in line]
    assert changes, out
    assert "stopped; the mirror stays in" in out
    db = data / "mirror.db"
    assert query(db, "SELECT count(*) FROM changes WHERE baseline = 0")[0][0] >= len(changes)
    assert (data / "daemon.log").read_text().count('"sync.finished"') >= 2
    check = subprocess.run(
        [*cli("--config", str(data / "config.toml"), "check-config")],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
@pytest.mark.parametrize("again", [False, True], ids=["once", "pressed-again"])
async def test_demo_stops_on_sigint_and_cleans_up_its_temp_dir(again: bool) -> None:
    """Ctrl-C stops the demo, which removes its temporary directory and exits 0; also when
    Ctrl-C is pressed again and again while it stops (that took the default action: a
    KeyboardInterrupt traceback, and the directory left behind)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hpo_sync.cli",
        "demo",
        *FAST,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=daemon_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "demo ended early"
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        data_dir = Path(lines[0].rsplit("data in ", 1)[1].strip())
        assert (data_dir / "mirror.db").exists()
        began = time.monotonic()
        ended = asyncio.ensure_future(asyncio.wait_for(proc.communicate(), 15))
        if again:
            await signal_until_exit(proc, signal.SIGINT, timeout_s=15)
        else:
            proc.send_signal(signal.SIGINT)
        out, err = await ended
        assert proc.returncode == 0, err.decode()
        assert "Traceback" not in err.decode(), err.decode()
        assert time.monotonic() - began < 10
        assert "stopped; removed" in out.decode()
        assert gone(data_dir)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def demo_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``hpo-sync demo ARGV`` to its end, its temporary directories in ``tmp_path``."""
    return subprocess.run(
        cli("demo", *argv),
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(TMPDIR=str(tmp_path)),
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-port", "99999"], "--api-port must be from 0 (any free port) to 65535"),
        (["--api-port", "-1"], "--api-port must be from 0"),
        (["--data-dir", "{file}"], "is a file, not a directory"),
        (["--data-dir", "{file}/sub"], "cannot create it: Not a directory"),
    ],
)
def test_bad_demo_arguments_exit_2_with_one_message(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a directory\n")
    proc = demo_cli(tmp_path, *(a.format(file=file) for a in argv))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not list(tmp_path.glob("hpo-sync-demo-*"))  # nothing started, nothing left


@pytest.mark.slow
def test_demo_ends_quietly_and_cleans_up_when_its_reader_goes_away(tmp_path: Path) -> None:
    # `hpo-sync demo | head -3`; --duration only bounds a demo that would not notice
    proc = subprocess.Popen(
        [*cli("demo", "--duration", "120"), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon_env(TMPDIR=str(tmp_path)),
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with proc.stderr:
            first = proc.stdout.readline().decode()
            proc.stdout.readline()
            proc.stdout.readline()
            proc.stdout.close()
            assert proc.wait(timeout=100) == 0
            err = proc.stderr.read().decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    data_dir = Path(first.rsplit("data in ", 1)[1].strip())
    assert data_dir.parent == tmp_path
    assert gone(data_dir)


def test_the_banner_names_a_command_that_runs_from_another_shell(tmp_path: Path) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "hpo-sync"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    # not on the PATH (a venv not activated): the full path
    assert command_name(str(script), path=str(tmp_path)) == str(script.resolve())
    # on the PATH, and the same program: the bare name
    assert command_name(str(script), path=str(venv_bin)) == "hpo-sync"
    # another hpo-sync first on the PATH: still ours, by its full path
    other = tmp_path / "other"
    other.mkdir()
    (other / "hpo-sync").write_text("#!/bin/sh\n")
    (other / "hpo-sync").chmod(0o755)
    path = f"{other}{os.pathsep}{venv_bin}"
    assert command_name(str(script), path=path) == str(script.resolve())
    # run as a module
    assert command_name("/x/hpo_sync/cli.py").endswith(" -m hpo_sync.cli")


def test_a_data_dir_of_a_real_daemon_is_refused_and_left_alone(tmp_path: Path) -> None:
    """``demo --data-dir`` naming a daemon's directory replaced its config.toml (a SIGHUP then
    loaded the demo's into the daemon) and synced the simulator into its mirror.db. Both
    are refused, exit 2, and left as they were; a directory an earlier demo made is not."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.toml").write_text('[store]\npath = "mirror.db"\n')
    only_mirror = tmp_path / "mirror-only"
    only_mirror.mkdir()
    (only_mirror / "mirror.db").write_bytes(b"SQLite format 3\x00")
    for data_dir, what in ((real, "config.toml"), (only_mirror, "mirror.db")):
        before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
        proc = demo_cli(tmp_path, "--duration", "1", "--data-dir", str(data_dir))
        assert proc.returncode == 2, proc.stderr
        assert f"holds a {what} the demo did not" in proc.stderr and proc.stdout == ""
        assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    from hpo_sync.demo import DEMO_CONFIG_HEADER, _check_data_dir

    earlier = tmp_path / "earlier-demo"
    earlier.mkdir()
    (earlier / "config.toml").write_text(f"{DEMO_CONFIG_HEADER}: …\n")
    (earlier / "mirror.db").write_bytes(b"")
    _check_data_dir(earlier)  # reused, no error
