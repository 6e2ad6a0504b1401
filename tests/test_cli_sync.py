"""``hpo-sync sync`` as a real process: exit codes, summaries, and SIGKILL mid-sweep."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import signal
import socket
import sqlite3
import struct
import sys
import termios
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hpo_sync.alerts.receivers import Receivers
from hpo_sync.normalise import normalise
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator

ENV = {
    **os.environ,
    "ALIBABA_CLOUD_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEFAULT_ACCESS_KEY_SECRET,
    # keep the credentials chain from probing the ECS metadata service
    "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
}


def write_config(path: Path, endpoint: str, workspaces: list[str], **upstream: object) -> Path:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in upstream.items())
    ws = "".join(f'[[workspaces]]\nid = "{w}"\n' for w in workspaces)
    path.write_text(
        f'[upstream]\nendpoint = "{endpoint}"\nmax_qps = 200\n{extra}\n'
        f'[store]\npath = "{path.parent / "mirror.db"}"\n\n{ws}'
    )
    return path


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hpo_sync.cli",
        *args,
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    options = SimOptions(
        experiments=400, workspaces=2, seed=3, forbidden_workspaces=("100002",), latency_ms=1
    )
    async with Simulator(options) as s:
        yield s


async def test_sync_exit_codes_and_summaries(sim: Simulator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001", "100002"])
    code, out, err = await run_cli("sync", "--config", str(cfg), "--log-format", "json")
    assert code == 1, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    ok = next(line for line in lines if line.startswith("100001"))
    bad = next(line for line in lines if line.startswith("100002"))
    assert "full ok" in ok and "200 experiments" in ok and "(baseline)" in ok
    assert "failed" in bad and "Forbidden.RAM" in bad and "paiautoml:ListHpoExperiments" in bad
    # (its baseline was tried, not made: the next sync of it is a full sweep again)
    assert "(baseline not made)" in bad and "(baseline)" not in bad
    assert DEFAULT_ACCESS_KEY_SECRET not in out + err
    # the ok workspace has its baseline: the next sync of it is hot and exits 0
    code, out, _ = await run_cli("--config", str(cfg), "sync", "--workspace", "100001")
    assert code == 0 and "100001: hot ok" in out
    code, out, _ = await run_cli("--config", str(cfg), "sync", "--full", "--workspace", "100001")
    assert code == 0 and "100001: full ok" in out and "0 changes" in out
    # a workspace named twice is synced once
    code, out, _ = await run_cli("sync", "--config", str(cfg), *["--workspace", "100001"] * 2)
    assert code == 0 and out.count("100001:") == 1, out


async def test_on_a_terminal_sync_draws_a_progress_line_that_fits_it(
    sim: Simulator, tmp_path: Path
) -> None:
    """stderr on a pseudo-terminal 60 columns wide: the progress line is redrawn in place
    (``\\r``, clear line) and never wider than the terminal, so it never wraps; stdout
    still gets the summaries alone."""
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001"], page_size=20)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hpo_sync.cli", "sync", "--config", str(cfg),
            "--workspace", "100001", env={**ENV, "COLUMNS": "60"},
            stdout=asyncio.subprocess.PIPE, stderr=slave,
        )  # fmt: skip
    finally:
        os.close(slave)
    drawn = bytearray()
    reader = asyncio.get_running_loop().run_in_executor(None, _drain, master, drawn)
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
        await reader
    os.close(master)
    assert proc.returncode == 0 and out.decode().startswith("100001: full ok"), drawn
    text = drawn.decode()
    assert text.endswith("\r\x1b[2K"), text  # the line is cleared at the end
    frames = [f for f in text.split("\r\x1b[2K") if f]
    bars = [f for f in frames if "sync.finished" not in f]
    logs = [f for f in frames if "sync.finished" in f]
    assert len(bars) >= 3 and all(b.startswith("100001 [") for b in bars), frames
    assert "100001 [####################] 10/10" in bars
    assert all(len(b) < 60 for b in bars), bars
    # the log line starts on a cleared line (never on the end of the progress line)
    # and ends with its newline; the progress line is drawn again below it
    assert len(logs) == 1 and "/10" not in logs[0] and logs[0].endswith("\n"), logs


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: every writer closed the terminal
            return
        if not chunk:
            return
        into.extend(chunk)


def test_the_progress_line_shrinks_to_fit_the_terminal() -> None:
    from hpo_sync.cli import progress_line

    state = {"100001": (5, 10), "100002": (0, 0)}
    assert progress_line(state, 120) == (
        "100001 [##########..........] 5/10  100002 [....................] 0/?"
    )
    assert progress_line(state, 60) == "100001 [#####.....] 5/10  100002 [..........] 0/?"
    assert progress_line(state, 30) == "100001 5/10  100002 0/?"
    long = {"w" * 128: (1, 4)}
    line = progress_line(long, 80)
    assert len(line) == 79 and line.endswith("…")
    assert progress_line({"a": (12, 10)}, 80) == "a [####################] 12/10"


async def test_a_closed_pipe_keeps_the_exit_status_of_sync(sim: Simulator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001", "100002"])
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read the summaries
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hpo_sync.cli", "sync", "--config", str(cfg), env=ENV,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    async with asyncio.timeout(120):
        _, err = await proc.communicate()
    assert proc.returncode == 1, err.decode()  # 100002 is forbidden: failed, pipe or not
    assert "Traceback" not in err.decode()


async def test_sync_usage_and_config_errors_exit_2(sim: Simulator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001"])
    code, _, err = await run_cli("sync", "--config", str(cfg), "--workspace", "nope")
    assert code == 2 and "'nope' is not configured" in err
    broken = tmp_path / "broken.toml"
    broken.write_text(cfg.read_text() + "\n[sync]\nhot_interval_s = 'soon'\n")
    code, _, err = await run_cli("sync", "--config", str(broken))
    assert code == 2 and "sync.hot_interval_s" in err and "line" in err
    assert "Traceback" not in err
    for endpoint in ("http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1"):
        bad = write_config(tmp_path / "bad.toml", endpoint, ["100001"])
        code, _, err = await run_cli("sync", "--config", str(bad))
        assert code == 2 and "upstream.endpoint (line 2)" in err, err
        assert "Traceback" not in err


async def test_a_mirror_directory_that_cannot_be_made_is_one_clear_error(
    sim: Simulator, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001"])
    (tmp_path / "a-file").write_text("not a directory\n")
    mirror = tmp_path / "a-file" / "sub" / "mirror.db"
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "mirror.db"), str(mirror)))
    code, out, err = await run_cli("sync", "--config", str(cfg))
    assert (code, out) == (1, ""), err
    assert "store.path: cannot create the mirror's directory" in err and str(mirror.parent) in err
    assert "Traceback" not in err


async def test_a_mirror_directory_that_is_made_is_said(sim: Simulator, tmp_path: Path) -> None:
    """A missing directory is made (the first run of a fresh install), with a warning: a
    mistyped path silently started a second, empty mirror."""
    cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001"])
    mirror = tmp_path / "new" / "sub" / "mirror.db"
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "mirror.db"), str(mirror)))
    code, _, err = await run_cli("sync", "--config", str(cfg), "--log-format", "json")
    assert code == 0 and mirror.exists(), err
    made = [json.loads(line) for line in err.splitlines() if "store.directory_created" in line]
    assert len(made) == 1 and made[0]["path"] == str(mirror.parent)
    code, _, err = await run_cli("sync", "--config", str(cfg), "--log-format", "json")
    assert code == 0 and "store.directory_created" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "simulate: --port must be from 0 (any free port) to 65535"),
        (["--port", "-1"], "simulate: --port must be from 0"),
        (["--host", "bad host"], "simulate: --host 'bad host' is not an address or a known"),
        (["--host", "192.0.2.1"], "simulate: --host '192.0.2.1' is not an address of this"),
    ],
)
async def test_simulate_cannot_listen_there_exit_2(argv: list[str], message: str) -> None:
    code, out, err = await run_cli("simulate", *argv)
    assert code == 2 and out == ""
    assert err.startswith("hpo-sync: simulate: ") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


async def test_simulate_on_a_port_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_cli("simulate", "--port", str(port))
    assert code == 1 and out == ""
    assert err == (
        f"hpo-sync: simulate: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "is another process using the port?\n"
    )


async def test_simulate_listens_until_interrupted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hpo_sync.cli", "simulate", "--experiments", "10", env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            first = (await proc.stdout.readline()).decode()
            assert first.startswith("simulator listening on http://127.0.0.1:"), first
            proc.send_signal(signal.SIGINT)
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def sync_until_rows(
    cfg: Path, db: Path, rows: int, output: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """``hpo-sync sync`` as a process, returned once the mirror holds ``rows`` experiments
    (and the sync is still running)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hpo_sync.cli", "--config", str(cfg), "sync", env=ENV,
        stdout=output, stderr=output,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    seen = 0
    while seen < rows and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        try:  # (no file yet, or no table yet: OperationalError)
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                seen = conn.execute("SELECT count(*) FROM experiments").fetchone()[0]
        except sqlite3.OperationalError:
            continue
    if proc.returncode is not None:
        raise AssertionError("the sync finished before it could be stopped")
    return proc


@pytest.mark.slow
async def test_sigkill_mid_sweep_then_resume_loses_and_doubles_nothing(tmp_path: Path) -> None:
    options = SimOptions(experiments=6000, workspaces=1, seed=8, latency_ms=25)
    async with Simulator(options) as sim:
        ws = sim.world.workspace_ids[0]
        cfg = write_config(tmp_path / "c.toml", sim.base_url, [ws], page_size=20, max_concurrency=2)
        db = tmp_path / "mirror.db"
        proc = await sync_until_rows(cfg, db, 1500)
        try:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            partial = conn.execute("SELECT count(*) FROM experiments").fetchone()[0]
            assert 0 < partial < 6000
            assert conn.execute("SELECT status FROM sync_runs").fetchall() == [("running",)]

        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0, err
        assert "full ok" in out  # still no baseline: the resumed sync is full again
        sim.world.advance(120)
        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0 and "hot ok" in out, err

        truth = {e["ExperimentId"]: normalise(e) for e in sim.world.truth(ws)}
        with sqlite3.connect(db) as conn:
            rows = {
                r[0]: (r[1], json.loads(r[2]))
                for r in conn.execute(
                    "SELECT experiment_id, status, trial_status FROM experiments WHERE deleted = 0"
                )
            }
            first_sightings = Counter(
                r[0]
                for r in conn.execute(
                    "SELECT experiment_id FROM changes WHERE field = 'Status' AND old_value IS NULL"
                )
            )
            statuses = conn.execute(
                "SELECT experiment_id, old_value, new_value FROM changes"
                " WHERE field = 'Status' ORDER BY id"
            ).fetchall()
            runs = [r[0] for r in conn.execute("SELECT status FROM sync_runs ORDER BY id")]
        for exp_id, exp in truth.items():
            assert exp is not None
            assert rows.get(exp_id) == (exp.status, exp.trial_status), exp_id
        # every experiment first seen exactly once, and each transition chains on the last
        assert set(first_sightings) >= set(truth)
        assert max(first_sightings.values()) == 1
        last: dict[str, str] = {}
        for exp_id, old, new in statuses:
            assert old == last.get(exp_id), exp_id
            assert old != new
            last[exp_id] = new
        assert runs == ["failed", "ok", "ok"]  # the killed run was closed, not left running


async def test_an_incomplete_listing_exits_3(tmp_path: Path) -> None:
    """Every workspace synced, one page never came: exit 3, 'partial' in the summary."""
    async with Simulator(SimOptions(experiments=300, workspaces=1, seed=5)) as sim:
        ws = sim.world.workspace_ids[0]
        cfg = write_config(tmp_path / "c.toml", sim.base_url, [ws], page_size=50)
        cfg.write_text(
            cfg.read_text().replace("max_qps = 200\n", "max_qps = 200\nretry_max_attempts = 1\n")
        )
        original = sim.world.list

        def page_3_fails(params: Any) -> Any:
            if params.get("PageNumber") == "3":
                raise RuntimeError("page 3 is unavailable")
            return original(params)

        sim.world.list = page_3_fails  # type: ignore[method-assign]
        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 3, err
        assert f"{ws}: full partial" in out and "deletions skipped" in out
        with sqlite3.connect(tmp_path / "mirror.db") as conn:
            assert conn.execute("SELECT status FROM sync_runs").fetchall() == [("partial",)]


@pytest.mark.parametrize("repeated", [False, True], ids=["once", "repeated"])
async def test_sigterm_mid_sweep_closes_the_run_and_exits_143(
    tmp_path: Path, repeated: bool
) -> None:
    """SIGTERM mid-sweep: the run is closed as cancelled and the sync exits 143. Sent again
    and again while the sync is stopping (a supervisor repeating it), it ends the same way:
    not killed half-way through closing the runs and the mirror."""
    options = SimOptions(experiments=4000, workspaces=1, seed=8, latency_ms=25)
    async with Simulator(options) as sim:
        ws = sim.world.workspace_ids[0]
        cfg = write_config(tmp_path / "c.toml", sim.base_url, [ws], page_size=20, max_concurrency=2)
        db = tmp_path / "mirror.db"
        proc = await sync_until_rows(cfg, db, 200, output=asyncio.subprocess.PIPE)
        reading = asyncio.ensure_future(proc.communicate())
        try:
            async with asyncio.timeout(30):
                # (os.kill, not send_signal(): its poll() would reap the child under asyncio)
                os.kill(proc.pid, signal.SIGTERM)
                while repeated and proc.returncode is None and not reading.done():
                    await asyncio.sleep(0.002)
                    try:
                        os.kill(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        break
                _, err = await reading
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 143, err.decode()
        assert "stopped by SIGTERM" in err.decode() and "Traceback" not in err.decode()
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            runs = conn.execute("SELECT status, finished_at, error FROM sync_runs").fetchall()
        ((status, finished_at, error),) = runs
        assert status == "failed" and finished_at and "cancelled" in error


def lock_holder(db: Path) -> str | None:
    """The pid the mirror's single-instance lock file names, if any."""
    try:
        return Path(f"{db}.lock").read_text().strip()
    except FileNotFoundError:
        return None


async def test_sigterm_while_the_sync_starts_is_held_until_it_can_stop(tmp_path: Path) -> None:
    """A SIGTERM that comes before the sync's event loop handles it (here: while the sync
    waits for another connection's write lock to open the mirror) is held, not the death of
    the process, and stops the sync once it has started: exit 143, no run left running."""
    from hpo_sync.store import Store

    cfg = write_config(tmp_path / "c.toml", "http://127.0.0.1:9", ["100001"])
    db = tmp_path / "mirror.db"
    Store.open(db).close()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hpo_sync.cli", "sync", "--config", str(cfg),
        env=ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    reading = asyncio.ensure_future(proc.communicate())
    try:
        async with asyncio.timeout(60):
            # The single-instance lock names the process once it holds it: it opens the
            # mirror next, and waits there for the blocker's write lock.
            while lock_holder(db) != str(proc.pid):
                assert not reading.done(), (await reading)[1].decode()
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert not reading.done()  # waiting still, with the signal held
            blocker.execute("COMMIT")
            _, err = await reading
    finally:
        blocker.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 143, err.decode()
    assert "stopped by SIGTERM" in err.decode() and "Traceback" not in err.decode()
    with sqlite3.connect(db) as conn:
        # stopped before its first sweep began: no run to close
        assert conn.execute("SELECT count(*) FROM sync_runs").fetchone() == (0,)


async def test_a_sync_alerts_on_the_changes_it_records_and_sends_them(
    sim: Simulator, tmp_path: Path
) -> None:
    """A one-shot sync (from cron, say, with no daemon) writes the outbox rows of the
    changes it records, in the same transaction, and delivers them before it exits; what a
    target does not take stays queued, never lost, and stderr says so."""
    receivers = Receivers()
    await receivers.start()
    try:
        cfg = write_config(tmp_path / "c.toml", sim.base_url, ["100001"])
        hook = receivers.url("slack", "tok-slack-0123456789")
        cfg.write_text(
            cfg.read_text()
            + f'\n[alerts]\n[[alerts.targets]]\nname = "team"\ntype = "slack"\nurl = "{hook}"\n'
            '\n[[alerts.rules]]\nname = "all"\ntargets = ["team"]\n'
        )
        code, _, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0, err
        assert receivers.received == []  # the baseline never alerts
        running = [
            e["ExperimentId"]
            for e in sim.world.truth("100001")
            if e["Status"] in ("RUNNING", "WAITING", "CREATED")
        ]
        sim.world.mutate(running[0], status="FAILED")
        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0 and "hot ok" in out, err
        (got,) = receivers.of("tok-slack-0123456789")
        assert running[0] in got.body["text"] and "FAILED" in got.body["text"]
        assert "queued" not in err
        with sqlite3.connect(tmp_path / "mirror.db") as conn:
            assert conn.execute("SELECT status FROM alert_outbox").fetchall() == [("sent",)]
        # The target fails once (HTTP 500): its retry, 5 s later, is within the sync's
        # 30 s for alerts, and goes out before it exits (the sync used to exit at once).
        receivers.fail("tok-slack-0123456789", times=1)
        sim.world.mutate(running[2], status="FAILED")
        started = time.monotonic()
        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0 and "queued" not in err, err
        assert time.monotonic() - started >= 4.0
        assert running[2] in receivers.of("tok-slack-0123456789")[-1].body["text"]
        with sqlite3.connect(tmp_path / "mirror.db") as conn:
            rows = conn.execute("SELECT status, attempts FROM alert_outbox ORDER BY id").fetchall()
        assert rows == [("sent", 1), ("sent", 2)]
        # The target is down: it is retried within those 30 s, then the alert stays
        # queued, and stderr says so.
        await receivers.stop()
        sim.world.mutate(running[1], status="FAILED")
        code, out, err = await run_cli("--config", str(cfg), "sync")
        assert code == 0 and "1 alert still queued" in err, err
        with sqlite3.connect(tmp_path / "mirror.db") as conn:
            rows = conn.execute("SELECT status, attempts FROM alert_outbox ORDER BY id").fetchall()
        assert rows[:2] == [("sent", 1), ("sent", 2)] and rows[2][0] == "pending"
        assert rows[2][1] >= 2
    finally:
        await receivers.stop()


async def test_a_syncs_alert_round_waiting_in_a_limiter_is_cut_at_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round can wait a minute in a DingTalk or WeCom limiter: a one-shot sync used to
    overrun its alert budget by that much (63 s where 30 were promised)."""
    from hpo_sync import cli
    from hpo_sync.alerts.service import AlertWorker
    from hpo_sync.config import Config, StoreConfig
    from hpo_sync.store import Store

    store = Store.open(tmp_path / "mirror.db")
    worker = AlertWorker(store, Config(store=StoreConfig(tmp_path / "mirror.db")))
    rounds: list[int] = []

    async def waits_a_minute(**kwargs: Any) -> int:
        rounds.append(1)
        await asyncio.sleep(60)  # in a target's limiter, say
        return 1

    monkeypatch.setattr(worker, "run_once", waits_a_minute)
    monkeypatch.setattr(cli, "SYNC_ALERTS_BUDGET_S", 0.5)
    try:
        assert await asyncio.wait_for(cli._deliver_alerts(worker), 20) == 0
    finally:
        store.close()
    assert rounds == [1]


async def test_a_sync_records_the_configured_labels(sim: Simulator, tmp_path: Path) -> None:
    """docs/schema.md: `workspaces.label` is the human name from the configuration. Only the
    daemon wrote it: after `hpo-sync sync` it stayed NULL, and so did the label of the alerts
    such a sync queues (`alert_outbox.workspace_label`)."""
    cfg = write_config(tmp_path / "c.toml", sim.base_url, [])
    cfg.write_text(cfg.read_text() + '[[workspaces]]\nid = "100001"\nlabel = "vision team"\n')
    code, out, err = await run_cli("sync", "--config", str(cfg))
    assert code == 0, out + err
    with sqlite3.connect(tmp_path / "mirror.db") as conn:
        rows = conn.execute("SELECT workspace_id, label FROM workspaces").fetchall()
    assert rows == [("100001", "vision team")]
