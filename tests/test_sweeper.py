"""The sweep process (:mod:`hpo_sync.sweeper`) driven from the test's own event loop: a real
child process sweeping a real simulator into a real mirror. What the daemon relies on:
results, metrics and logs come back; a cancelled sweep closes its run and leaves the child
able to sweep again; a reload reaches the child; a child killed mid-sweep fails that sweep
only, and the next sweep starts a new child."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from daemon_harness import (
    assert_history_consistent,
    assert_mirror_matches_truth,
    config_text,
    query,
    sim_post,
    sim_truth,
    wait_db,
)
from structlog.testing import capture_logs

from hpo_sync.config import Config, load
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.metrics import Metrics
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import Store
from hpo_sync.sweeper import SweepProcess, SweepProcessError

pytestmark = pytest.mark.timeout(90)

WS = "100001"
CREDENTIALS = StaticCredentials(CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET))


@dataclasses.dataclass
class Rig:
    sim: Simulator
    config: Config
    store: Store
    metrics: Metrics
    sweeper: SweepProcess


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    latency_ms = getattr(request, "param", 0)
    options = SimOptions(experiments=240, workspaces=1, seed=3, speed=0, latency_ms=latency_ms)
    async with Simulator(options) as sim:
        path = tmp_path / "config.toml"
        path.write_text(
            # 5 a page, 2 in flight: a sweep's first batch is written (after 1 s) mid-listing
            config_text(
                sim_url=sim.base_url,
                db=tmp_path / "mirror.db",
                workspaces=[WS],
                page_size=5,
                upstream="retry_max_attempts = 10",
            ),
            encoding="utf-8",
        )
        config = load(path)
        store = await asyncio.to_thread(Store.open, config.store.path)
        metrics = Metrics()
        sweeper = SweepProcess(config, store, metrics, credentials=CREDENTIALS)
        try:
            yield Rig(sim, config, store, metrics, sweeper)
        finally:
            await sweeper.close()
            await asyncio.to_thread(store.close)


async def _mid_sweep(rig: Rig) -> None:
    """Until the sweep's run has committed some of its changes."""
    sql = "SELECT id FROM sync_runs WHERE status = 'running' AND changes > 0"
    await wait_db(rig.config.store.path, sql, timeout_s=20, poll_s=0.005)


def _metric(metrics: Metrics, line_start: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_results_metrics_and_logs_come_back(rig: Rig) -> None:
    with capture_logs() as logs:
        result = await rig.sweeper.sweep(WS, "auto")
        assert result.mode == "full" and result.status == "ok" and result.baseline
        assert result.experiments_seen == 240 and result.api_calls == 48
        again = await rig.sweeper.sweep(WS)
        assert again.mode == "hot" and again.status == "ok" and again.changes == 0
        assert again.api_calls >= 2
    pid = rig.sweeper.pid
    assert pid is not None and pid != os.getpid()
    # the child's own events, re-emitted by this process (once each)
    finished = [e for e in logs if e["event"] == "sync.finished"]
    assert [(e["mode"], e["changes"]) for e in finished] == [("full", 477), ("hot", 0)]
    assert [e["event"] for e in logs].count("sync.process_started") == 1
    # the mirror is this process's to read: the child wrote it
    truth = await sim_truth(rig.sim.base_url)
    assert assert_mirror_matches_truth(rig.config.store.path, truth, [WS]) == 240
    assert assert_history_consistent(rig.config.store.path) >= 240
    # counted here, from the child's counts
    requests = _metric(
        rig.metrics, f'hpo_sync_upstream_requests_total{{code="OK",workspace="{WS}"}}'
    )
    assert requests == result.api_calls + again.api_calls
    statuses = _metric(
        rig.metrics,
        f'hpo_sync_changes_total{{baseline="true",field="Status",workspace="{WS}"}}',
    )
    assert statuses == 240


@pytest.mark.parametrize("rig", [60], indirect=True)  # 60 ms a page: a baseline takes ~1.5 s
async def test_a_cancelled_sweep_closes_its_run_and_the_child_sweeps_again(rig: Rig) -> None:
    task = asyncio.create_task(rig.sweeper.sweep(WS, "full"))
    await _mid_sweep(rig)
    pid = rig.sweeper.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    run = rig.store.sync_runs(limit=1)[0]
    assert run.status == "failed" and run.error == "cancelled (shutting down)"
    assert rig.sweeper.pid == pid  # the child lives on
    result = await rig.sweeper.sweep(WS)
    assert result.status == "ok" and result.mode == "full" and result.baseline
    assert rig.sweeper.pid == pid


async def test_a_sweep_cancelled_before_the_child_started_it_still_gets_an_answer(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "sweep" and "cancel" read back to back (a SIGTERM right after the daemon started
    its sweeps): the child cancelled a task that had not begun, whose body, which sends the
    answer, then never ran. The daemon waited CANCEL_WAIT_S (5 s) for every such sweep
    before it could stop; here that wait is a minute, and the answer must come at once."""
    from hpo_sync import sweeper as sweeper_mod

    await rig.sweeper.sweep(WS)  # the child runs, and the baseline is done
    monkeypatch.setattr(sweeper_mod, "CANCEL_WAIT_S", 60.0)
    pid = rig.sweeper.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # as busy starting: it reads both messages at once
    try:
        task = asyncio.create_task(rig.sweeper.sweep(WS))
        for _ in range(10_000):  # until "sweep" is sent
            if rig.sweeper._pending:
                break
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.2)  # "cancel" is sent too
    finally:
        os.kill(pid, signal.SIGCONT)
    done, _ = await asyncio.wait({task}, timeout=20)  # bounds a hang only
    assert done and task.cancelled()
    result = await rig.sweeper.sweep(WS)  # and the child sweeps on
    assert result.status == "ok" and result.mode == "hot"


async def test_a_reload_reaches_the_child(rig: Rig) -> None:
    await rig.sweeper.sweep(WS)  # the baseline
    before = await rig.sweeper.sweep(WS, "hot")
    # Some answers fail and are retried: "upstream.retry" is a debug event.
    await sim_post(rig.sim.base_url, "/_sim/config", {"fault_rate": 0.3})
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        rig.sweeper.config = rig.config  # the daemon's level goes with every config
        info_logs = await _retried_hot_sweep_logs(rig)
        # The reload: every status polled (none is terminal), and debug logging.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        rig.sweeper.config = dataclasses.replace(
            rig.config, sync=dataclasses.replace(rig.config.sync, terminal_statuses=())
        )
        debug_logs = await _retried_hot_sweep_logs(rig)
    finally:
        structlog.reset_defaults()
    assert not [e for e in info_logs if e["event"] == "upstream.retry"]
    assert [e for e in debug_logs if e["event"] == "upstream.retry"]
    await sim_post(rig.sim.base_url, "/_sim/config", {"fault_rate": 0.0})
    after = await rig.sweeper.sweep(WS, "hot")
    assert before.status == after.status == "ok"
    # The frozen world is the same: one more listing per status that was terminal.
    held = {r[0] for r in query(rig.config.store.path, "SELECT DISTINCT status FROM experiments")}
    terminal = held & set(rig.config.sync.terminal_statuses)
    assert terminal and after.api_calls >= before.api_calls + len(terminal)


async def _retried_hot_sweep_logs(rig: Rig) -> list[MutableMapping[str, Any]]:
    """The logs of hot sweeps until one had an answer retried (at most five sweeps)."""
    with capture_logs() as logs:
        for _ in range(5):
            if (await rig.sweeper.sweep(WS, "hot")).retries:
                return logs
    raise AssertionError("five hot sweeps without a retry at a 30 % fault rate")


@pytest.mark.parametrize("rig", [60], indirect=True)
@pytest.mark.parametrize(
    ("sig", "raised", "run_error", "exit", "lost"),
    [
        # killed: the daemon's side closes the run, as a restart would
        (signal.SIGKILL, r"exited \(signal 9\)",
         r"interrupted: the sweep process \(pid \d+\) exited \(signal 9\)", "signal 9", 1),
        # stopped (systemd stopping the unit): the child closes its run itself, exits cleanly
        (signal.SIGTERM, "was stopped during the sweep", r"cancelled \(shutting down\)",
         "status 0", 0),
    ],
    ids=["sigkill", "sigterm"],
)  # fmt: skip
async def test_a_child_killed_or_stopped_mid_sweep_fails_that_sweep_and_the_next_starts_anew(
    rig: Rig, sig: int, raised: str, run_error: str, exit: str, lost: int
) -> None:
    task = asyncio.create_task(rig.sweeper.sweep(WS, "full"))
    await _mid_sweep(rig)
    first = rig.sweeper.pid
    assert first is not None
    with capture_logs() as logs:
        os.kill(first, sig)
        with pytest.raises(SweepProcessError, match=raised):
            await task
        run = rig.store.sync_runs(limit=1)[0]
        assert run.status == "failed" and re.fullmatch(run_error, run.error or ""), run.error
        result = await rig.sweeper.sweep(WS)
    assert result.status == "ok" and result.mode == "full"
    assert rig.sweeper.pid not in (None, first)
    died = [e for e in logs if e["event"] == "sync.process_died"]
    assert [(e["pid"], e["exit"], e["sweeps_lost"]) for e in died] == [(first, exit, lost)]
    truth = await sim_truth(rig.sim.base_url)
    assert assert_mirror_matches_truth(rig.config.store.path, truth, [WS]) == 240
    assert assert_history_consistent(rig.config.store.path) >= 240


#: Three times the child's word every second (METRICS_FLUSH_S): a running child keeps well
#: inside it on a loaded machine too. Its start-up (seconds there) is not counted against
#: it: a child has STARTUP_TIMEOUT_S for its first word.
SHORT_HEARTBEAT_S = 3.0


def short_heartbeat_sweeper(rig: Rig) -> SweepProcess:
    return SweepProcess(
        rig.config,
        rig.store,
        rig.metrics,
        credentials=CREDENTIALS,
        heartbeat_timeout_s=SHORT_HEARTBEAT_S,
    )


@pytest.mark.parametrize("rig", [60], indirect=True)
async def test_a_child_that_stops_answering_is_killed_and_replaced(rig: Rig) -> None:
    sweeper = short_heartbeat_sweeper(rig)
    try:
        await sweeper.sweep(WS)  # the baseline; silence while idle is fine
        await asyncio.sleep(SHORT_HEARTBEAT_S + 0.5)
        task = asyncio.create_task(sweeper.sweep(WS, "full"))
        await wait_db(
            rig.config.store.path,
            "SELECT id FROM sync_runs WHERE status = 'running'",
            timeout_s=60,
            poll_s=0.005,
        )
        stuck = sweeper.pid
        assert stuck is not None
        os.kill(stuck, signal.SIGSTOP)  # alive, but says nothing any more
        silent = r"killed, no word from it for \d+ s"
        with capture_logs() as logs, pytest.raises(SweepProcessError, match=silent):
            await asyncio.wait_for(task, 60)
        assert [e["pid"] for e in logs if e["event"] == "sync.process_unresponsive"] == [stuck]
        result = await sweeper.sweep(WS)
        assert result.status == "ok" and sweeper.pid not in (None, stuck)
    finally:
        await sweeper.close()


async def test_a_child_slower_to_start_than_its_heartbeat_is_not_taken_for_stuck(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up (an interpreter and its imports: seconds on a loaded machine) is not
    silence: the heartbeat counts from the child's first word."""
    slow_python = tmp_path / "slow-python"
    slow_python.write_text(
        f'#!/bin/sh\nsleep {SHORT_HEARTBEAT_S + 1}\nexec "{sys.executable}" "$@"\n',
        encoding="utf-8",
    )
    slow_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow_python))
    sweeper = short_heartbeat_sweeper(rig)
    try:
        with capture_logs() as logs:
            result = await sweeper.sweep(WS)
        assert result.status == "ok" and result.baseline
        assert not [e for e in logs if e["event"] == "sync.process_unresponsive"]
    finally:
        await sweeper.close()


async def test_a_child_stuck_while_it_stops_is_killed_when_a_sweep_wants_it(rig: Rig) -> None:
    """The child got SIGTERM while idle (systemd, an operator), said it was stopping, and
    froze before it exited (SIGSTOP, as the heartbeat test models "stuck"). It sends no
    heartbeat then, and the watchdog only minds a child with sweeps to run: the next sweep
    waited for it without end, and no sweep of any workspace ran again. It is killed after
    EXIT_WAIT_S and a new child runs the sweep."""
    sweeper = short_heartbeat_sweeper(rig)
    pid = None
    try:
        assert (await sweeper.sweep(WS)).status == "ok"
        pid = sweeper.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        for _ in range(1000):  # until the daemon has heard "stopping"
            if not sweeper._accepting:
                break
            await asyncio.sleep(0.01)
        assert not sweeper._accepting
        os.kill(pid, signal.SIGSTOP)
        with capture_logs() as logs:
            result = await asyncio.wait_for(sweeper.sweep(WS), 30)
        assert result.status == "ok", result.error
        assert sweeper.pid not in (None, pid)
        killed = [e for e in logs if e["event"] == "sync.process_kill"]
        assert killed and killed[0]["reason"] == "stuck while stopping"
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(sweeper.close(), 15)


@pytest.mark.parametrize("rig", [60], indirect=True)
async def test_a_sighup_to_the_whole_unit_does_not_kill_the_child_mid_sweep(rig: Rig) -> None:
    """SIGHUP is the daemon's reload. `systemctl kill -s HUP` (every process of the unit),
    `kill -HUP -PGID` or a hangup of the daemon's terminal reach the child too: its default
    action killed it, failing its sweep (exited, signal 1)."""
    task = asyncio.create_task(rig.sweeper.sweep(WS, "full"))
    await _mid_sweep(rig)
    pid = rig.sweeper.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    result = await task
    assert result.status == "ok", result.error
    assert rig.sweeper.pid == pid


async def test_a_sighup_while_the_child_starts_does_not_kill_it(rig: Rig) -> None:
    """The child ignored SIGHUP only once its interpreter had started and imported what it
    needs (~0.2 s): a SIGHUP to the whole unit in that time (a reload by `systemctl kill -s
    HUP`, a hangup) killed it, and the sweep with it. It starts with SIGHUP and SIGINT
    blocked now, and drops one that came meanwhile once it ignores them."""
    task = asyncio.create_task(rig.sweeper.sweep(WS, "full"))
    for _ in range(5000):
        if rig.sweeper.pid is not None:
            break
        await asyncio.sleep(0.001)
    pid = rig.sweeper.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)  # the child is still starting
    os.kill(pid, signal.SIGINT)
    result = await task
    assert result.status == "ok", result.error
    assert rig.sweeper.pid == pid
    # and the daemon's own thread has them unblocked again
    assert not {signal.SIGHUP, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


async def test_the_childs_events_carry_the_trigger_of_their_own_sweep(rig: Rig) -> None:
    """The daemon binds ``trigger`` around each sweep. The reader that re-emits the child's
    events was made inside whichever sweep started the child, so it stamped every later
    sweep's events with that one's trigger (``request`` on a hot sweep's sync.finished).
    The child now binds each sweep's own."""
    from structlog.testing import LogCapture

    capture = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        with structlog.contextvars.bound_contextvars(trigger="request"):
            await rig.sweeper.sweep(WS)  # starts the child
        capture.entries.clear()
        with structlog.contextvars.bound_contextvars(trigger="hot"):
            await rig.sweeper.sweep(WS, "hot")
        await rig.sweeper.sweep(WS, "hot")  # nothing bound
        finished = [e for e in capture.entries if e["event"] == "sync.finished"]
        assert [e.get("trigger") for e in finished] == ["hot", None]
    finally:
        structlog.reset_defaults()
