"""The :class:`~hpo_sync.daemon.Daemon` in the test's own event loop, next to the simulator:
the seams other parts build on (``request_sync``, hosted services and their change hook,
``reload``), checked without a process boundary."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from daemon_harness import config_text
from locking import write_locked
from structlog.testing import capture_logs

from hpo_sync.config import Config, load
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.daemon import Daemon, job_id
from hpo_sync.notify import Notifier
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import ChangeRow
from hpo_sync.sweeper import SweepProcess

pytestmark = pytest.mark.timeout(60)


class RecordingService:
    """A stand-in for the alert worker: records what the daemon hands it."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.rows: list[ChangeRow] = []
        self.in_transaction: list[bool] = []
        self.configs: list[Config] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")

    async def reload(self, config: Config) -> None:
        self.calls.append("reload")
        self.configs.append(config)

    def on_changes(self, conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        self.in_transaction.append(conn.in_transaction)
        self.rows.extend(rows)


@pytest.mark.parametrize("sweep_process", [False, True], ids=["in-process", "sweep-process"])
async def test_daemon_seams(tmp_path: Path, sweep_process: bool) -> None:
    async with Simulator(SimOptions(experiments=120, workspaces=3, seed=4, speed=0)) as sim:
        cfg_path = tmp_path / "config.toml"
        db = tmp_path / "mirror.db"
        cfg_path.write_text(
            config_text(sim_url=sim.base_url, db=db, workspaces=["100001", "100002"]),
            encoding="utf-8",
        )
        service = RecordingService()
        daemon = Daemon(
            load(cfg_path),
            credentials=StaticCredentials(
                CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
            ),
            notifier=Notifier({}),
            services=[service],
            sweep_process=sweep_process,
        )
        run = asyncio.create_task(daemon.run())
        try:
            started = asyncio.create_task(daemon.started.wait())
            await asyncio.wait({run, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                run.result()  # raises what stopped it
            assert daemon.started.is_set()
            runtime = daemon.runtime
            assert runtime is not None and runtime.api_url == daemon.api_url
            assert service.calls == ["start"]

            result = await daemon.request_sync("100001", "full")
            assert result.status == "ok" and result.mode == "full"
            assert runtime.health["100001"].last_outcome == "ok"
            with pytest.raises(KeyError):
                daemon.request_sync("999")
            text = daemon.metrics.render().decode()
            assert 'hpo_sync_changes_total{baseline="true",field="Status",workspace="100001"}' in (
                text
            )
            # counted once each, wherever the sweep ran: 40 experiments, 40 first statuses
            assert (
                'hpo_sync_changes_total{baseline="true",field="Status",workspace="100001"} 40.0'
                in text
            )
            assert 'hpo_sync_upstream_requests_total{code="OK",workspace="100001"} 4.0' in text
            if sweep_process:
                # the child ran it; the hosted services' hooks are the in-process seam only
                assert isinstance(daemon.engine, SweepProcess) and daemon.engine.pid
                assert service.rows == []
            else:
                # every change row went through the hook, inside its transaction
                assert service.rows and all(service.in_transaction)
                assert {r.workspace_id for r in service.rows} <= {"100001", "100002"}

            # reload: one workspace out, one in, new intervals
            cfg_path.write_text(
                config_text(
                    sim_url=sim.base_url,
                    db=db,
                    workspaces=["100002", "100003"],
                    hot_interval_s=2,
                    full_interval_s=20,
                ),
                encoding="utf-8",
            )
            assert await daemon.reload()
            assert runtime.config.workspace_ids() == ("100002", "100003")
            assert daemon.engine.config is runtime.config
            assert service.calls == ["start", "reload"]
            assert set(runtime.health) == {"100002", "100003"}
            scheduler = daemon._scheduler
            assert scheduler is not None
            ids = {job.id for job in scheduler.get_jobs()}
            assert ids == {job_id(w, k) for w in ("100002", "100003") for k in ("hot", "full")}
            assert scheduler.get_job(job_id("100002", "hot")).trigger.interval.total_seconds() == 2
            assert (
                'workspace="100001"'
                not in daemon.metrics.render().decode().split("hpo_sync_consecutive_failures")[-1]
            )
            result = await daemon.request_sync("100003")
            assert result.status == "ok"

            # an invalid file is refused and changes nothing
            cfg_path.write_text("[[workspaces]]\nid = ''\n", encoding="utf-8")
            assert not await daemon.reload()
            assert runtime.config.workspace_ids() == ("100002", "100003")
            # so is one check-config and run refuse: the API off loopback with no tokens
            good = config_text(sim_url=sim.base_url, db=db, workspaces=["100001"])
            cfg_path.write_text(
                good.replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"'), encoding="utf-8"
            )
            with capture_logs() as logs:
                assert not await daemon.reload()
            (rejected,) = [e for e in logs if e["event"] == "config.reload_rejected"]
            assert "not a loopback address" in rejected["error"]
            assert runtime.config.workspace_ids() == ("100002", "100003")
            # a secret pasted into a *_env key is not echoed into the log
            canary = "https://hooks.slack.com/services/T0/B0/CANARYSLACKHOOK01xyz"
            cfg_path.write_text(
                f'{good}\n[[alerts.targets]]\nname = "t"\ntype = "slack"\nurl_env = "{canary}"\n',
                encoding="utf-8",
            )
            with capture_logs() as logs:
                assert not await daemon.reload()
            (rejected,) = [e for e in logs if e["event"] == "config.reload_rejected"]
            assert "url_env" in rejected["error"] and "CANARY" not in repr(logs)
            # A reload the mirror refuses to record (its write lock held past the busy
            # timeout) is rejected whole, and systemd hears READY=1 again: it used to end
            # half applied (the new config in force, the added workspace never swept) and
            # leave systemd waiting in "reloading".
            store = daemon._store
            assert store is not None and store._writer is not None
            store._writer.execute("PRAGMA busy_timeout = 200")
            readies: list[str] = []
            daemon.notifier.ready = readies.append  # type: ignore[method-assign]
            added = config_text(sim_url=sim.base_url, db=db, workspaces=["100002", "100004"])
            cfg_path.write_text(added, encoding="utf-8")
            with capture_logs() as logs, write_locked(db):
                assert not await daemon.reload()
            (rejected,) = [e for e in logs if e["event"] == "config.reload_rejected"]
            assert "locked" in rejected["error"] or "busy" in rejected["error"], rejected
            assert len(readies) == 1 and "reload rejected" in readies[0]
            assert runtime.config.workspace_ids() == ("100002", "100003")
            assert set(runtime.health) == {"100002", "100003"}
            assert await daemon.reload()  # once the mirror takes writes, it applies whole
            assert runtime.config.workspace_ids() == ("100002", "100004")
            assert set(runtime.health) == {"100002", "100004"}
        finally:
            daemon.request_stop()
            await asyncio.wait_for(run, 10)
        assert service.calls == ["start", "reload", "reload", "stop"]


class StepRecordingService(RecordingService):
    """A service with the optional ``clock_stepped`` hook (the alert worker's)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[float] = []

    async def clock_stepped(self, step_s: float) -> None:
        self.steps.append(step_s)


async def test_a_step_of_the_clock_moves_the_running_daemons_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon watches the clock while it runs and moves its scheduled sweeps by a step
    (:func:`hpo_sync.daemon.shift_jobs`), and tells the services that have waits of their
    own on the wall clock; here the watch reports a step back of 3 s once (the full sweep,
    every 10 s, stays due in the future)."""
    from hpo_sync import daemon as daemon_mod

    class OneStepBack:
        def __init__(self) -> None:
            self.steps = [-3.0]

        def step_s(self) -> float:
            return self.steps.pop() if self.steps else 0.0

    monkeypatch.setattr(daemon_mod, "ClockStepWatch", OneStepBack)
    monkeypatch.setattr(daemon_mod, "CLOCK_CHECK_S", 0.3)
    async with Simulator(SimOptions(experiments=30, workspaces=1, seed=4, speed=0)) as sim:
        cfg_path = tmp_path / "config.toml"
        cfg_path.write_text(
            config_text(sim_url=sim.base_url, db=tmp_path / "mirror.db", workspaces=["100001"]),
            encoding="utf-8",
        )
        daemon = Daemon(
            load(cfg_path),
            credentials=StaticCredentials(
                CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
            ),
            notifier=Notifier({}),
            services=[stepped := StepRecordingService(), plain := RecordingService()],
            sweep_process=False,
        )
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            try:
                await asyncio.wait_for(daemon.started.wait(), timeout=10)
                assert daemon._scheduler is not None
                job = daemon._scheduler.get_job(job_id("100001", "full"))
                assert job is not None
                before = job.next_run_time
                for _ in range(50):
                    if any(e["event"] == "daemon.clock_stepped" for e in logs):
                        break
                    await asyncio.sleep(0.1)
                moved = daemon._scheduler.get_job(job_id("100001", "full")).next_run_time
                assert (before - moved).total_seconds() == pytest.approx(3.0, abs=0.01)
            finally:
                daemon.request_stop()
                await asyncio.wait_for(run, timeout=10)
        (event,) = [e for e in logs if e["event"] == "daemon.clock_stepped"]
        assert event["step_s"] == -3.0 and event["jobs_moved"] >= 2
        # told once; a service without the hook is left alone (and the daemon went on)
        assert stepped.steps == [-3.0] and plain.calls == ["start", "stop"]
        assert not [e for e in logs if e["event"] == "daemon.service_clock_step_failed"]


def hourly_full_sweeps_daemon(tmp_path: Path, sim: Simulator) -> Daemon:
    """A daemon of workspace 100001 in this process: hot sweeps every second, a full one
    an hour (none but the startup baseline in a test), no services."""
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(
        config_text(
            sim_url=sim.base_url,
            db=tmp_path / "mirror.db",
            workspaces=["100001"],
            full_interval_s=3600,
        ),
        encoding="utf-8",
    )
    return Daemon(
        load(cfg_path),
        credentials=StaticCredentials(
            CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
        ),
        notifier=Notifier({}),
        services=[],
        sweep_process=False,
    )


async def test_a_tick_skipped_behind_a_long_sweep_is_a_named_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hot sweeps that take longer than the hot interval (each page answered after 0.7 s, a
    1 s interval): APScheduler skips the ticks that come while one runs. The daemon reports
    each as a ``sync.skipped`` event with its workspace and kind, not as APScheduler's own
    free-text warning."""
    import logging

    async with Simulator(
        SimOptions(experiments=30, workspaces=1, seed=4, speed=0, latency_ms=700)
    ) as sim:
        daemon = hourly_full_sweeps_daemon(tmp_path, sim)
        caplog.set_level(logging.WARNING, logger="apscheduler")
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            try:
                await asyncio.wait_for(daemon.started.wait(), timeout=10)
                for _ in range(150):
                    if any(e.get("reason") == "still_running" for e in logs):
                        break
                    await asyncio.sleep(0.1)
            finally:
                daemon.request_stop()
                await asyncio.wait_for(run, timeout=20)
    skipped = [e for e in logs if e.get("reason") == "still_running"]
    assert skipped, [e["event"] for e in logs]
    assert skipped[0]["event"] == "sync.skipped"
    assert skipped[0]["log_level"] == "warning"
    assert (skipped[0]["workspace"], skipped[0]["kind"]) == ("100001", "hot")
    assert skipped[0]["interval_s"] == 1
    assert not [r for r in caplog.records if "maximum number of running instances" in r.message]


async def test_a_full_sweep_a_hot_tick_made_up_is_not_reported_as_a_slow_hot_sweep(
    tmp_path: Path,
) -> None:
    """After a full sweep failed or was postponed, the next hot tick runs a full sweep
    (``full_pending``). The hot ticks while it runs are skipped as busy (debug), not as
    "the previous hot sweep is still running; it takes longer than its interval": a warning
    that was not true, and would have had an operator lengthen the hot interval."""
    async with Simulator(SimOptions(experiments=300, workspaces=1, seed=4, speed=0)) as sim:
        daemon = hourly_full_sweeps_daemon(tmp_path, sim)
        with capture_logs() as logs:
            run = asyncio.create_task(daemon.run())
            try:
                await asyncio.wait_for(daemon.started.wait(), timeout=10)
                for _ in range(100):  # the startup baseline
                    if any(e["event"] == "sync.finished" for e in logs):
                        break
                    await asyncio.sleep(0.1)
                mark = len(logs)
                sim.configure(latency_ms=250)  # a full sweep of 15 pages: ~2 s, 2 in flight
                daemon._slots["100001"].full_pending = True  # as after a failed full sweep
                for _ in range(150):
                    if any(
                        e["event"] == "sync.finished" and e.get("mode") == "full"
                        for e in logs[mark:]
                    ):
                        break
                    await asyncio.sleep(0.1)
            finally:
                daemon.request_stop()
                await asyncio.wait_for(run, timeout=30)
    after = logs[mark:]
    end = next(
        i for i, e in enumerate(after) if e["event"] == "sync.finished" and e.get("mode") == "full"
    )
    assert not [e for e in after[:end] if e.get("reason") == "still_running"]
    assert [e for e in after[:end] if e.get("reason") == "busy"]
