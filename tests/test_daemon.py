"""``hpo-sync run`` as a real process against the simulator: readiness over sd_notify and
``/readyz``, SIGHUP reloads, the single-instance lock, SIGTERM, SIGKILL mid-sweep and a
flaky upstream. The simulator is frozen (speed 0) and moved with ``/_sim/advance``, so the
ground truth is fixed whenever the mirror is compared with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_harness import (
    Daemons,
    assert_history_consistent,
    assert_mirror_matches_truth,
    cli,
    config_text,
    daemon_env,
    metric_sum,
    metric_value,
    now_run_time,
    query,
    signal_until_exit,
    sim_post,
    sim_truth,
    wait_db,
    wait_full_ok_since,
)

from hpo_sync.sim.server import SimOptions, Simulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        await ds.cleanup()


async def test_ready_reload_second_instance_and_clean_stop(
    tmp_path: Path, daemons: Daemons
) -> None:
    async with Simulator(SimOptions(experiments=240, workspaces=3, seed=3, speed=0)) as sim:
        db, cfg = write_config(tmp_path, sim.base_url, workspaces=["100001", "100002"])
        d = await daemons.start(cfg, watchdog_usec=1_000_000)

        ready = await d.wait_notify("READY", timeout_s=20)
        assert "STATUS=2 workspaces" in ready
        assert await d.wait_notify("WATCHDOG", timeout_s=5) == "WATCHDOG=1\n"
        status, health = await d.get("/healthz")
        assert status == 200 and health["status"] == "ok"
        for _ in range(200):
            status, body = await d.get("/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body
        assert set(body["workspaces"]) == {"100001", "100002"}
        assert all(w["synced"] for w in body["workspaces"].values())
        status, metrics = await d.get("/metrics")
        assert status == 200
        assert metric_sum(metrics, "hpo_sync_sweeps_total", outcome="ok") >= 2
        assert metric_sum(metrics, "hpo_sync_upstream_requests_total", code="OK") >= 2
        assert metric_sum(metrics, "hpo_sync_changes_total", baseline="true") > 0

        # A second daemon on the same mirror refuses, with a message saying why.
        second = await asyncio.create_subprocess_exec(
            *cli("--config", str(cfg), "run"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=daemon_env(),
        )
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 1, err
        assert b"in use by another hpo-sync process" in err

        # SIGHUP with a workspace added: applied without a restart, and it is synced.
        cfg.write_text(
            config_text(sim_url=sim.base_url, db=db, workspaces=["100001", "100002", "100003"]),
            encoding="utf-8",
        )
        d.proc.send_signal(signal.SIGHUP)
        reloading = await d.wait_notify("RELOADING")
        assert "MONOTONIC_USEC=" in reloading
        await d.wait_event("config.reloaded", where=lambda e: e["added"] == ["100003"])
        await d.wait_notify("READY", skip=1)
        await wait_db(
            db,
            "SELECT id FROM sync_runs WHERE workspace_id = '100003' AND status = 'ok'",
            timeout_s=20,
        )
        status, body = await d.get("/readyz")
        assert status == 200 and "100003" in body["workspaces"]

        # SIGHUP with a broken file: refused, the running config stays, syncing goes on.
        cfg.write_text("[sync]\nhot_interval_s = 'soon'\n", encoding="utf-8")
        d.proc.send_signal(signal.SIGHUP)
        rejected = await d.wait_event("config.reload_rejected")
        assert "hot_interval_s" in rejected["error"] or "workspaces" in rejected["error"]
        assert "rejected" in await d.wait_notify("READY", skip=2)
        seen = len(d.events("sync.finished"))
        await d.wait_event("sync.finished", skip=seen, where=lambda e: True)
        assert (await d.get("/healthz"))[0] == 200

        code, took = await d.stop(signal.SIGTERM)
        assert code == 0, d.tail()
        assert took < 10
        await d.wait_notify("STOPPING")
        assert d.events("daemon.stopped")
        assert not query(db, "SELECT id FROM sync_runs WHERE status = 'running'")


async def test_sigkill_mid_sweep_then_restart_equals_the_truth(
    tmp_path: Path, daemons: Daemons
) -> None:
    options = SimOptions(experiments=400, workspaces=2, seed=5, speed=0, latency_ms=25)
    workspaces = ["100001", "100002"]
    async with Simulator(options) as sim:
        db, cfg = write_config(tmp_path, sim.base_url, workspaces=workspaces, page_size=10)
        first = await daemons.start(cfg, name="first")
        await wait_full_ok_since(db, workspaces, "", timeout_s=30, daemon=first)
        child = (await first.wait_event("sync.process_started"))["pid"]
        assert process_alive(child)

        # Move the world on and kill -9 while a sweep has committed some of its changes.
        killed_run = None
        for _ in range(10):
            await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
            try:
                rows = await wait_db(
                    db,
                    "SELECT id FROM sync_runs WHERE status = 'running' AND changes > 0",
                    timeout_s=3,
                    poll_s=0.005,
                )
            except AssertionError:
                continue
            first.proc.kill()
            await first.proc.wait()
            killed_run = rows[0]["id"]
            break
        assert killed_run is not None, "never caught a sweep in the act"
        # The sweep process dies with the daemon: no writer is left behind.
        await wait_until(lambda: not process_alive(child), timeout_s=5, what=f"pid {child} gone")
        assert query(db, "SELECT status FROM sync_runs WHERE id = ?", (killed_run,))[0][0] == (
            "running"
        )

        # The world moves on while the daemon is down; a restart must catch up exactly.
        await sim_post(sim.base_url, "/_sim/advance", {"seconds": 1800})
        since = now_run_time()
        await asyncio.sleep(1)  # (since is the next whole second: no run may start before it)
        second = await daemons.start(cfg, name="second")
        await second.wait_event("daemon.interrupted_runs_closed")
        await wait_full_ok_since(db, workspaces, since, timeout_s=30, daemon=second)
        interrupted = query(db, "SELECT status, error FROM sync_runs WHERE id = ?", (killed_run,))
        assert interrupted[0]["status"] == "failed"
        assert "interrupted" in interrupted[0]["error"]

        truth = await sim_truth(sim.base_url)
        assert assert_mirror_matches_truth(db, truth, workspaces) > 300
        assert assert_history_consistent(db) > 0
        non_baseline = query(db, "SELECT count(*) FROM changes WHERE baseline = 0")[0][0]
        assert non_baseline > 0
        code, took = await second.stop()
        assert code == 0 and took < 10


async def test_sweep_process_killed_mid_sweep_then_the_next_sweep_catches_up(
    tmp_path: Path, daemons: Daemons
) -> None:
    # 150 ms a page: the listing outlasts a batch's 1 s age, so the baseline commits a batch
    # mid-listing (at 40 ms a loaded machine could finish it in one batch at the very end,
    # and the moment to kill it in was a few milliseconds)
    options = SimOptions(experiments=300, workspaces=1, seed=9, speed=0, latency_ms=150)
    workspaces = ["100001"]
    async with Simulator(options) as sim:
        db, cfg = write_config(
            tmp_path,
            sim.base_url,
            workspaces=workspaces,
            page_size=10,
            hot_interval_s=2,
            full_interval_s=60,
        )
        d = await daemons.start(cfg)
        child = (await d.wait_event("sync.process_started"))["pid"]
        # The baseline (30 pages, 2 in flight, 150 ms each) is under way: kill its process.
        await wait_db(
            db,
            "SELECT id FROM sync_runs WHERE status = 'running' AND changes > 0",
            timeout_s=15,
            poll_s=0.005,
            daemon=d,
        )
        # This second, not the next (now_run_time): one failure holds nothing back, so the
        # next hot tick may start the catch-up sweep within the kill's second (it did, on a
        # loaded machine). The killed run failed: no earlier run of this second is "ok".
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.kill(child, signal.SIGKILL)
        died = await d.wait_event("sync.process_died")
        assert died["pid"] == child and died["exit"] == "signal 9" and died["sweeps_lost"] == 1
        crashed = await d.wait_event("sync.crashed")
        assert "SweepProcessError" in crashed["error"] and str(child) in crashed["error"]
        # Its run is closed, not left "running"; the daemon itself never stopped serving.
        await wait_db(db, "SELECT id FROM sync_runs WHERE status = 'failed'", timeout_s=5)
        assert (await d.get("/healthz"))[0] == 200

        # The next sweep (the backoff is one hot interval) starts a new process and
        # finishes the baseline: the mirror equals the truth, its history is whole.
        second = (await d.wait_event("sync.process_started", skip=1, timeout_s=20))["pid"]
        assert second != child
        await wait_full_ok_since(db, workspaces, since, timeout_s=40, daemon=d)
        assert not query(db, "SELECT id FROM sync_runs WHERE status = 'running'")
        truth = await sim_truth(sim.base_url)
        assert assert_mirror_matches_truth(db, truth, workspaces) == 300
        assert assert_history_consistent(db) > 0
        code, _ = await d.stop()
        assert code == 0
        await wait_until(lambda: not process_alive(second), timeout_s=5, what="child exit")


async def test_sigterm_to_daemon_and_sweep_process_at_once_closes_the_run(
    tmp_path: Path, daemons: Daemons
) -> None:
    """What systemd does on stop (SIGTERM to every process of the unit) during a sweep."""
    options = SimOptions(experiments=300, workspaces=1, seed=9, speed=0, latency_ms=60)
    async with Simulator(options) as sim:
        db, cfg = write_config(tmp_path, sim.base_url, workspaces=["100001"], page_size=5)
        d = await daemons.start(cfg)
        # Deadlines that only bound a hang: two Python start-ups take seconds when loaded.
        child = (await d.wait_event("sync.process_started", timeout_s=60))["pid"]
        await wait_db(
            db, "SELECT id FROM sync_runs WHERE status = 'running'", timeout_s=60, daemon=d
        )
        os.kill(child, signal.SIGTERM)
        code, took = await d.stop(signal.SIGTERM)
        assert code == 0 and took < 10
        assert not process_alive(child)
        # A stop, not a fault: nothing logged as an error (the child's pipe from the daemon
        # must not be fed after the SIGTERM ended its reading).
        assert not [e for e in d.events() if e.get("level") == "error"], d.tail()
        runs = query(db, "SELECT status, error FROM sync_runs")
        assert runs and all(r["status"] == "failed" for r in runs), [dict(r) for r in runs]
        assert {r["error"] for r in runs} <= {
            "cancelled (shutting down)",
            "interrupted: hpo-sync stopped during the sweep",
        }


async def test_a_sighup_while_the_daemon_starts_is_applied_once_it_has_started(
    tmp_path: Path, daemons: Daemons
) -> None:
    """A SIGHUP as soon as the process handles one at all: while it imports its modules,
    reads its config, opens the mirror and starts its sweep process. It neither dies of it
    (the default action, until the event loop's handler) nor loses it (a reload asked for
    before the daemon had started was dropped): once started, it re-reads the config."""
    async with Simulator(SimOptions(experiments=60, workspaces=1, seed=5, speed=0)) as sim:
        db, cfg = write_config(tmp_path, sim.base_url, workspaces=["100001"])
        d = await daemons.start(cfg)
        await wait_until(
            lambda: handles(d.proc.pid, signal.SIGHUP), timeout_s=30, what="a SIGHUP handler"
        )
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_event("config.reloaded", timeout_s=60)
        names = [e["event"] for e in d.events()]
        assert names.index("daemon.ready") < names.index("config.reloading")
        assert names.count("config.reloading") == 1
        await wait_db(db, "SELECT id FROM sync_runs WHERE status = 'ok'", timeout_s=30, daemon=d)
        code, _ = await d.stop(signal.SIGTERM)
        assert code == 0, d.tail()


@pytest.mark.parametrize("sweep_process", [True, False], ids=["sweep_process", "in_process"])
async def test_a_sync_requested_while_the_daemon_stops_is_refused(
    tmp_path: Path, daemons: Daemons, sweep_process: bool
) -> None:
    """``POST /v1/sync`` between SIGTERM and the API's close (the daemon cancels its sweeps
    first): 503, no sweep. One started then ran past the cancellation: in the sweep process
    until that was stopped under it (``sync.crashed``, an error, for a stop), in the daemon
    after the mirror was closed under it (its run left ``running`` after an exit 0)."""
    async with Simulator(SimOptions(experiments=120, workspaces=1, seed=3, speed=0)) as sim:
        db, cfg = write_config(
            tmp_path,
            sim.base_url,
            workspaces=["100001"],
            hot_interval_s=60,
            full_interval_s=600,
            sync="" if sweep_process else "sweep_process = false",
        )
        token = tmp_path / "token"
        token.write_text("admin-token\n", encoding="utf-8")
        token.chmod(0o600)
        with cfg.open("a", encoding="utf-8") as f:
            f.write(f'\n[[api.tokens]]\nname = "ops"\ntoken_file = "{token}"\nadmin = true\n')
        d = await daemons.start(cfg)
        await d.wait_event("sync.finished", where=lambda e: e["status"] == "ok", timeout_s=60)
        url = f"{await d.api_url()}/v1/sync?workspace=100001&mode=full"
        answers: list[tuple[int, str | None]] = []

        async def ask() -> None:
            headers = {"Authorization": "Bearer admin-token"}
            async with aiohttp.ClientSession(headers=headers) as session:
                while d.proc.returncode is None:
                    try:
                        async with session.post(url) as resp:
                            body = await resp.json()
                            answers.append((resp.status, body.get("error", {}).get("code")))
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.002)  # the API closed; the process exits

        askers = [asyncio.create_task(ask()) for _ in range(3)]
        try:
            await wait_until(lambda: (202, None) in answers, timeout_s=10, what="a 202")
            code, took = await d.stop(signal.SIGTERM)
        finally:
            await asyncio.gather(*askers)
        assert code == 0 and took < 10, d.tail()
        # The requests kept coming while it stopped: those after the stop were refused.
        assert (503, "shutting_down") in answers, sorted(set(answers))
        assert {a for a in answers if a[0] != 202} == {(503, "shutting_down")}
        assert not [e for e in d.events() if e.get("level") == "error"], d.tail()
        assert not query(db, "SELECT id FROM sync_runs WHERE status = 'running'")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_repeated_until_the_daemon_exits_still_ends_it_with_0(
    tmp_path: Path, daemons: Daemons, sig: signal.Signals
) -> None:
    """A stop signal sent again and again (Ctrl-C pressed twice, a supervisor's or an
    operator's repeated ``kill``) while the daemon stops: the first stops it, the others
    change nothing, and it exits 0 — also those that come once it has stopped and removed
    its handlers (they took the default action then: the process ended by the signal)."""
    async with Simulator(SimOptions(experiments=60, workspaces=1, seed=3, speed=0)) as sim:
        _, cfg = write_config(tmp_path, sim.base_url, workspaces=["100001"])
        d = await daemons.start(cfg)
        await d.wait_event("sync.finished", where=lambda e: e["status"] == "ok", timeout_s=60)
        sent = await signal_until_exit(d.proc, sig)
        assert await d.proc.wait() == 0, d.tail()
        assert sent > 1 and d.events("daemon.stopped")
        assert "Traceback" not in d.log_path.read_text(encoding="utf-8"), d.tail()


async def test_a_stop_while_another_program_holds_the_write_lock_waits_one_busy_timeout(
    tmp_path: Path, daemons: Daemons
) -> None:
    """Another program holds the mirror's write lock (``BEGIN IMMEDIATE`` in a shell) while
    the sweeps of four workspaces run in the daemon (``sweep_process = false``): each one's
    first write waits for it, behind the one before. A stop waited each of them out in
    turn, a busy timeout (10 s) each — 40 s, past systemd's TimeoutStopSec=30 — where the
    writes still queued once the mirror is closed now give up at once."""
    workspaces = ["100001", "100002", "100003", "100004"]
    async with Simulator(SimOptions(experiments=120, workspaces=4, seed=3, speed=0)) as sim:
        db, cfg = write_config(
            tmp_path, sim.base_url, workspaces=workspaces, sync="sweep_process = false"
        )
        d = await daemons.start(cfg)
        await wait_full_ok_since(db, workspaces, "", timeout_s=60, daemon=d)
        holder = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            async with asyncio.timeout(10):
                while not holder.in_transaction:
                    with contextlib.suppress(sqlite3.OperationalError):  # a sweep writes
                        holder.execute("BEGIN IMMEDIATE")
                    await asyncio.sleep(0.01)
            # Every workspace's hot sweep is stuck at its first write: its next tick skips.
            await wait_until(
                lambda: {e["workspace"] for e in d.events("sync.skipped")} == set(workspaces),
                timeout_s=20,
                what="every workspace's sweep waiting for the write lock",
            )
            code, took = await d.stop(signal.SIGTERM, timeout_s=60)
        finally:
            holder.close()  # (rolls back: the lock is let go)
        assert code == 0, d.tail()
        assert took < 20, f"the stop took {took:.1f}s"
        assert query(db, "PRAGMA integrity_check")[0][0] == "ok"
        assert not query(db, "SELECT id FROM sync_runs WHERE status = 'running'")


async def test_a_reload_under_way_when_the_daemon_stops_starts_no_sweep(
    tmp_path: Path, daemons: Daemons
) -> None:
    """A SIGHUP that adds a workspace, then a SIGTERM before the reload is done: the stop
    ends the reload; the new workspace is never swept. The reload went on while the stop
    waited for the cancelled sweeps, and started the new workspace's sweep after them,
    in a sweep process about to be stopped (an error: ``sync.crashed``; in the daemon's
    own process, one left ``running`` over a closed mirror). Here the reload waits on its
    config's token file (a FIFO) and the sweep process is held (SIGSTOP), which make the
    few milliseconds of a real stop last until the reload is let through."""
    async with Simulator(SimOptions(experiments=60, workspaces=2, seed=3, speed=0)) as sim:
        token = tmp_path / "token"
        os.mkfifo(token, 0o600)

        def feed() -> None:  # blocks until the daemon opens the FIFO to read it
            token.write_text("admin-token\n", encoding="utf-8")

        def write(workspaces: list[str]) -> None:
            text = config_text(sim_url=sim.base_url, db=db, workspaces=workspaces)
            tokens = f'\n[[api.tokens]]\nname = "ops"\ntoken_file = "{token}"\nadmin = true\n'
            cfg.write_text(text + tokens, encoding="utf-8")

        db, cfg = tmp_path / "mirror.db", tmp_path / "config.toml"
        write(["100001"])
        fed = asyncio.create_task(asyncio.to_thread(feed))
        d = await daemons.start(cfg)
        await asyncio.wait_for(fed, 60)
        await d.wait_event("sync.finished", where=lambda e: e["status"] == "ok", timeout_s=60)
        child = (await d.wait_event("sync.process_started"))["pid"]
        os.kill(child, signal.SIGSTOP)  # (SIGKILLed by the stop, which it never answers)
        # A sweep waits for the held process: the next tick of its job finds it running.
        await d.wait_event("sync.skipped", timeout_s=20)

        write(["100001", "100002"])
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_event("config.reloading")  # and reading the token file, blocked
        d.proc.send_signal(signal.SIGTERM)
        await d.wait_event("daemon.stopping")
        await asyncio.wait_for(asyncio.to_thread(feed), 10)  # the reload may go on now
        code = await asyncio.wait_for(d.proc.wait(), 30)
        assert code == 0, d.tail()
        names = [e["event"] for e in d.events()]
        assert "config.reloaded" not in names[names.index("daemon.stopping") :], d.tail()
        assert not [e for e in d.events() if e.get("workspace") == "100002"], d.tail()
        assert not [e for e in d.events() if e.get("level") == "error"], d.tail()


def handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``sig`` (``SigCgt``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (sig - 1) & 1)


def write_config(tmp_path: Path, sim_url: str, **options: Any) -> tuple[Path, Path]:
    """The mirror's path and a config file for it (``config_text`` with ``options``)."""
    db, cfg = tmp_path / "mirror.db", tmp_path / "config.toml"
    cfg.write_text(config_text(sim_url=sim_url, db=db, **options), encoding="utf-8")
    return db, cfg


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


async def test_flaky_upstream_backs_off_records_failures_and_catches_up(
    tmp_path: Path, daemons: Daemons
) -> None:
    workspaces = ["100001", "100002"]
    async with Simulator(SimOptions(experiments=300, workspaces=2, seed=7, speed=0)) as sim:
        db, cfg = write_config(
            tmp_path,
            sim.base_url,
            workspaces=workspaces,
            upstream="retry_max_attempts = 2",
            retry_max_total_s=2,
        )
        d = await daemons.start(cfg)
        await wait_full_ok_since(db, workspaces, "", timeout_s=30, daemon=d)

        # Everything fails: the workspaces back off, saying why in logs, metrics and runs.
        await sim_post(sim.base_url, "/_sim/config", {"fault_rate": 1.0})
        backoff = await d.wait_event("sync.backoff", timeout_s=20)
        assert backoff["consecutive_failures"] >= 2 and backoff["reason"]
        _, metrics = await d.get("/metrics")
        streak = metric_value(
            metrics, "hpo_sync_consecutive_failures", workspace=backoff["workspace"]
        )
        assert streak is not None and streak >= 2
        codes = metric_sum(metrics, "hpo_sync_upstream_requests_total") - metric_sum(
            metrics, "hpo_sync_upstream_requests_total", code="OK"
        )
        assert codes > 0
        noted = await wait_db(
            db, "SELECT error FROM sync_runs WHERE error LIKE '%backing off%'", timeout_s=10
        )
        assert "consecutive failures" in noted[0]["error"]
        status, ready = await d.get("/readyz")
        assert status == 200  # synced once: still serving its (ageing) mirror
        assert any(w["consecutive_failures"] for w in ready["workspaces"].values())

        # 30% of requests fail while the world moves: the daemon keeps going.
        await sim_post(sim.base_url, "/_sim/config", {"fault_rate": 0.3})
        await sim_post(sim.base_url, "/_sim/advance", {"seconds": 3600})
        await asyncio.sleep(4)
        d.check_alive()
        assert (await d.get("/healthz"))[0] == 200
        failed = query(db, "SELECT count(*) FROM sync_runs WHERE status IN ('failed', 'partial')")
        assert failed[0][0] > 0

        # Faults stop: every workspace recovers by itself and equals the truth again.
        await sim_post(sim.base_url, "/_sim/config", {"fault_rate": 0.0})
        since = now_run_time()
        await wait_full_ok_since(db, workspaces, since, timeout_s=40, daemon=d)
        for ws in workspaces:
            await wait_db(
                db,
                "SELECT id FROM sync_runs WHERE workspace_id = ? AND status = 'ok'"
                " AND started_at >= ? AND mode = 'hot'",
                (ws, since),
                timeout_s=20,
            )
        truth = await sim_truth(sim.base_url)
        assert_mirror_matches_truth(db, truth, workspaces)
        assert_history_consistent(db)
        _, metrics = await d.get("/metrics")
        for ws in workspaces:
            assert metric_value(metrics, "hpo_sync_consecutive_failures", workspace=ws) == 0
        assert d.events("sync.recovered")
        code, _ = await d.stop()
        assert code == 0


async def test_a_daemon_whose_log_reader_left_still_stops_on_sigterm(tmp_path: Path) -> None:
    """`hpo-sync run 2>&1 | head`: once the pipe's reader is gone, log lines are dropped;
    SIGTERM still stops the daemon cleanly (it used to raise BrokenPipeError from the log
    call before the stop was set, and run on until SIGKILL)."""
    async with Simulator(SimOptions(experiments=60, workspaces=1, seed=3, speed=0)) as sim:
        _, cfg = write_config(tmp_path, sim.base_url, workspaces=["100001"])
        proc = await asyncio.create_subprocess_exec(
            *cli("--config", str(cfg), "--log-format", "json", "run"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=daemon_env(),
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while b"sync.finished" not in await proc.stdout.readline():
                    pass
            proc.stdout.feed_eof()
            transport = proc._transport  # type: ignore[attr-defined]
            transport.get_pipe_transport(1).close()  # the reader leaves
            await asyncio.sleep(2.5)  # hot sweeps go on, logging into the closed pipe
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_the_daemon_s_sweeps_go_through_the_configured_proxy(
    tmp_path: Path, daemons: Daemons
) -> None:
    """``upstream.proxy`` reaches the sweeps, which run in a child process of the daemon
    (``sweep_process``, the default): every request the simulator gets came through the
    proxy, and the proxy's password is nowhere in the log."""
    from forward_proxy import ForwardProxy

    password = "pr0xy-Pw"
    async with (
        ForwardProxy(credentials=("alice", password)) as proxy,
        Simulator(SimOptions(experiments=60, workspaces=1, seed=4, speed=0)) as sim,
    ):
        db, cfg = write_config(
            tmp_path,
            sim.base_url,
            workspaces=["100001"],
            upstream=f'proxy = "{proxy.url_with("alice", password)}"',
        )
        d = await daemons.start(cfg)
        await d.wait_event("sync.finished", where=lambda e: e["status"] == "ok", timeout_s=30)
        await d.wait_event("sync.finished", where=lambda e: e["mode"] == "hot", timeout_s=30)
        await d.stop()
        assert query(db, "SELECT count(*) FROM experiments")[0][0] == 60
        assert proxy.carried and not proxy.refused
        assert sim.stats.requests == len(proxy.carried)
        assert all(c.target.startswith(sim.base_url) for c in proxy.carried)
        log = d.log_path.read_text(encoding="utf-8")
        assert '"config.literal_secret"' in log and password not in log
