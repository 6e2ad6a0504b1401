"""The daemon's pure parts: backoff, start-up planning, reload planning, STATUS lines,
sd_notify framing, metrics and the readiness body — fixed times, no scheduler, no sleeping."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hpo_sync.api import alert_backlog, readiness
from hpo_sync.config import Config, SyncConfig, WorkspaceConfig, loads
from hpo_sync.daemon import (
    Backoff,
    ClockStepWatch,
    after_sweep,
    backoff_delay_s,
    counts_as_failure,
    first_full_at,
    make_trigger,
    plan_reload,
    shift_jobs,
    startup_mode,
    status_line,
    wait_before_sweep_s,
)
from hpo_sync.metrics import Metrics
from hpo_sync.notify import (
    Notifier,
    format_message,
    socket_address,
    watchdog_interval_s,
)
from hpo_sync.runtime import WorkspaceHealth
from hpo_sync.store import WorkspaceState

NOW = datetime(2025, 3, 30, 0, 59, 30, tzinfo=UTC)  # an hour before Europe's DST switch


def state(**kw: str | None) -> WorkspaceState:
    base: dict[str, str | None] = dict(
        workspace_id="1",
        label=None,
        baseline_at=None,
        last_full_ok_at=None,
        last_hot_ok_at=None,
        last_error=None,
        last_error_at=None,
        create_watermark=None,
    )
    base.update(kw)
    return WorkspaceState(**base)  # type: ignore[arg-type]


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_delay_is_exponential_and_capped() -> None:
    delays = [backoff_delay_s(n, base_s=30, max_s=900) for n in range(0, 8)]
    assert delays == [0, 0, 60, 120, 240, 480, 900, 900]


def test_backoff_delay_survives_huge_streaks() -> None:
    assert backoff_delay_s(10_000, base_s=30, max_s=900) == 900


def test_a_failure_streak_grows_and_a_success_clears_it() -> None:
    b = Backoff()
    b = after_sweep(b, failed=True, reason="boom", now_s=100, base_s=10, max_s=60)
    assert b == Backoff(1, None, "boom")
    assert wait_before_sweep_s(b, 100) == 0  # one failure: the next tick retries
    b = after_sweep(b, failed=True, reason="boom", now_s=110, base_s=10, max_s=60)
    assert b.consecutive_failures == 2 and b.retry_at_s == 130
    assert wait_before_sweep_s(b, 115) == 15
    assert wait_before_sweep_s(b, 130) == 0
    b = after_sweep(b, failed=True, reason="again", now_s=130, base_s=10, max_s=60)
    assert b.retry_at_s == 170 and b.reason == "again"
    for _ in range(10):
        b = after_sweep(b, failed=True, reason="x", now_s=1000, base_s=10, max_s=60)
    assert b.retry_at_s == 1060  # capped at max_s
    b = after_sweep(b, failed=False, reason=None, now_s=1070, base_s=10, max_s=60)
    assert b == Backoff()
    assert wait_before_sweep_s(b, 0) == 0


@pytest.mark.parametrize(
    ("status", "code", "failed"),
    [
        ("ok", None, False),
        ("failed", None, True),
        ("failed", "SignatureDoesNotMatch", True),
        ("partial", "InternalError", True),  # a page kept failing upstream
        ("partial", None, False),  # the sweep capped its own look-ups
    ],
)
def test_what_counts_as_failure(status: str, code: str | None, failed: bool) -> None:
    assert counts_as_failure(status, code) is failed


# --- start-up --------------------------------------------------------------------------------


def test_startup_is_full_without_a_baseline() -> None:
    assert startup_mode(None, NOW, 3600) == "full"
    assert startup_mode(state(), NOW, 3600) == "full"
    assert first_full_at(None, NOW, 3600) == NOW + timedelta(hours=1)


def test_startup_is_hot_when_the_last_full_sweep_is_recent() -> None:
    s = state(baseline_at="2025-03-29T00:00:00Z", last_full_ok_at="2025-03-30T00:30:00.250Z")
    assert startup_mode(s, NOW, 3600) == "hot"
    # the periodic full sweep keeps its rhythm across the restart
    assert first_full_at(s, NOW, 3600) == datetime(2025, 3, 30, 1, 30, tzinfo=UTC)


def test_a_clock_set_back_does_not_postpone_the_full_sweep() -> None:
    s = state(baseline_at="2025-03-29T00:00:00Z", last_full_ok_at="2025-03-30T05:00:00Z")
    assert startup_mode(s, NOW, 3600) == "hot"
    assert first_full_at(s, NOW, 3600) == NOW + timedelta(hours=1)


def test_startup_is_full_when_the_last_full_sweep_is_overdue() -> None:
    s = state(baseline_at="2025-03-29T00:00:00Z", last_full_ok_at="2025-03-29T23:59:30Z")
    assert startup_mode(s, NOW, 3600) == "full"
    assert first_full_at(s, NOW, 3600) == NOW + timedelta(hours=1)
    s = state(baseline_at="2025-03-29T00:00:00Z")  # baseline, but no full since (odd file)
    assert startup_mode(s, NOW, 3600) == "full"


def test_triggers_fire_on_the_interval_with_bounded_jitter() -> None:
    start = NOW + timedelta(minutes=30)
    exact = make_trigger(3600, 0, start)
    assert exact.get_next_fire_time(None, NOW) == start
    assert exact.get_next_fire_time(start, start) == start + timedelta(hours=1)
    # across Europe's DST switch nothing moves: the daemon schedules in UTC
    assert exact.get_next_fire_time(start, start + timedelta(minutes=5)) == datetime(
        2025, 3, 30, 2, 29, 30, tzinfo=UTC
    )
    jittery = make_trigger(10, 30, start)  # jitter capped at half the interval
    for _ in range(50):
        fire = jittery.get_next_fire_time(start, start)
        assert start + timedelta(seconds=10) <= fire <= start + timedelta(seconds=15)


# --- reload ----------------------------------------------------------------------------------

BASE = """
[upstream]
endpoint = "http://127.0.0.1:1"
[store]
path = "/tmp/m.db"
[sync]
hot_interval_s = 30
[[workspaces]]
id = "1"
[[workspaces]]
id = "2"
label = "two"
"""


def test_reload_plan_workspaces_and_intervals() -> None:
    old = loads(BASE, source=Path("/etc/hpo-sync/config.toml"))
    text = BASE.replace('id = "1"', 'id = "3"').replace('label = "two"', 'label = "deux"')
    new = loads(text.replace("hot_interval_s = 30", "hot_interval_s = 10"), source=old.source)
    plan = plan_reload(old, new)
    assert plan.added == ("3",) and plan.removed == ("1",) and plan.relabelled == ("2",)
    assert plan.intervals_changed and plan.restart_required == ()
    assert plan.config.sync.hot_interval_s == 10


def test_reload_keeps_what_needs_a_restart() -> None:
    old = loads(BASE, source=Path("/x.toml"))
    text = BASE.replace("/tmp/m.db", "/tmp/other.db").replace("127.0.0.1:1", "127.0.0.1:2")
    new = loads(text + '\n[api]\nlisten = "127.0.0.1:9999"\n', source=Path("/x.toml"))
    plan = plan_reload(old, new)
    assert plan.restart_required == ("store", "upstream", "api.listen")
    assert plan.config.store == old.store
    assert plan.config.upstream == old.upstream
    assert plan.config.api.listen == old.api.listen
    assert not plan.intervals_changed and plan.added == plan.removed == ()


def test_reload_plan_of_an_identical_config_is_empty() -> None:
    cfg = Config(workspaces=(WorkspaceConfig("1"),), sync=SyncConfig())
    plan = plan_reload(cfg, replace(cfg))
    assert (plan.added, plan.removed, plan.relabelled, plan.restart_required) == ((),) * 4
    assert not plan.intervals_changed


# --- STATUS ----------------------------------------------------------------------------------


def test_status_line() -> None:
    health = {
        "1": WorkspaceHealth("1", last_outcome="ok"),
        "2": WorkspaceHealth("2", consecutive_failures=3, last_outcome="failed"),
        "3": WorkspaceHealth("3", sweeping=True),
    }
    assert status_line(health, "http://127.0.0.1:8787") == (
        "3 workspaces: 1 ok, 1 failing (2), 1 not synced yet, 1 sweeping; API http://127.0.0.1:8787"
    )
    assert status_line({"1": WorkspaceHealth("1", last_outcome="ok")}, None) == (
        "1 workspace: 1 ok"
    )


# --- sd_notify -------------------------------------------------------------------------------


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@hpo/notify") == b"\0hpo/notify"
    assert socket_address("") is None
    assert socket_address(None) is None
    assert socket_address("vsock:2:1234") is None


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval_s({}, pid=7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, pid=7) is None


def test_format_message() -> None:
    assert format_message({"READY": 1, "STATUS": "two\nlines"}) == b"READY=1\nSTATUS=two lines\n"
    long = format_message({"STATUS": "x" * 500}).decode()
    assert len(long) < 220 and long.endswith("…\n")


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture
def path_receiver() -> Iterator[tuple[str, socket.socket]]:
    """A notify socket at a path (short: AF_UNIX paths are limited to 108 bytes)."""
    path = f"/tmp/hpo-notify-{uuid.uuid4().hex[:8]}.sock"
    sock = _receiver(path)
    try:
        yield path, sock
    finally:
        sock.close()
        os.unlink(path)


def test_notifier_sends_to_a_path_socket(path_receiver: tuple[str, socket.socket]) -> None:
    path, sock = path_receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
    assert n.reloading()
    msg = sock.recv(4096).decode()
    assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
    usec = int(msg.split("MONOTONIC_USEC=")[1].split("\n")[0])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    assert n.stopping() and sock.recv(4096).startswith(b"STOPPING=1\n")
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1\n"
    n.close()


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"hpo-sync-test-{uuid.uuid4().hex}"
    sock = _receiver(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert n.status("syncing")
        assert sock.recv(4096) == b"STATUS=syncing\n"
        n.close()
    finally:
        sock.close()


def _fill(n: Notifier) -> int:
    """Send WATCHDOG=1 until the receiver's queue is full (a supervisor that is behind)."""
    for sent in range(1000):
        if not n.watchdog():
            return sent
    raise AssertionError("the receiver's queue never filled")


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


async def test_notifier_keeps_state_messages_a_full_queue_refused(
    path_receiver: tuple[str, socket.socket],
) -> None:
    # The kernel queues ~10 datagrams for a reader that is behind; READY=1 / RELOADING=1 sent
    # then must still arrive, in order and after what was queued; WATCHDOG=1 may be dropped.
    path, sock = path_receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    queued = _fill(n)
    assert queued >= 1
    assert not n.ready("up")  # kept, not handed over
    assert not n.watchdog()  # behind the kept one: dropped
    assert not n.reloading()  # kept too, after READY
    await asyncio.sleep(0.3)  # retries while the queue is still full change nothing
    assert _drain(sock) == [b"WATCHDOG=1\n"] * queued
    for _ in range(100):  # the retry delay grew to at most RETRY_MAX_S
        await asyncio.sleep(0.05)
        if not n._pending:
            break
    assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
    assert sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert n.status("later") and sock.recv(4096) == b"STATUS=later\n"
    n.close()


def test_notifier_hands_over_kept_messages_when_closed(
    path_receiver: tuple[str, socket.socket],
) -> None:
    # No event loop to retry from: close() sends what is kept once the reader caught up,
    # and gives up (with a warning, never raising) after CLOSE_FLUSH_S when it does not.
    path, sock = path_receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    queued = _fill(n)
    assert not n.stopping()
    assert len(_drain(sock)) == queued
    n.close()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping\n"

    # A reader that never catches up: close() gives up after CLOSE_FLUSH_S in all, not per
    # kept message, and waits rather than spins (a blocking send with a timeout spun at
    # full CPU: poll() calls a datagram socket writable while the peer's queue is full).
    stuck = Notifier({"NOTIFY_SOCKET": path})
    _fill(stuck)
    assert not stuck.ready() and not stuck.reloading() and not stuck.stopping()
    began, cpu = time.monotonic(), time.process_time()
    stuck.close()
    waited, spent = time.monotonic() - began, time.process_time() - cpu
    assert 0.5 < waited < 2.5, waited
    assert spent < waited / 2, (spent, waited)
    assert stuck._pending == []


def test_notifier_is_a_no_op_outside_systemd_and_never_raises() -> None:
    assert not Notifier({}).ready()
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    assert gone.enabled and not gone.ready() and not gone.watchdog()
    gone.close()


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_live_in_their_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("OK", "1")
    a.observe_request("Throttling.User", "1")
    a.observe_sweep("1", "hot", "ok", 0.3, retries=2, throttled=1, finished_at_s=1700000000)
    a.observe_changes("1", [("Status", False), ("Status", False), ("TrialStatus", True)])
    a.set_failures("1", 0, 0)
    text = a.render().decode()
    assert 'hpo_sync_upstream_requests_total{code="OK",workspace="1"} 1.0' in text
    assert 'hpo_sync_sweeps_total{mode="hot",outcome="ok",workspace="1"} 1.0' in text
    assert 'hpo_sync_upstream_retries_total{workspace="1"} 2.0' in text
    assert 'hpo_sync_changes_total{baseline="false",field="Status",workspace="1"} 2.0' in text
    assert 'hpo_sync_last_success_timestamp_seconds{workspace="1"} 1.7e+09' in text
    assert "hpo_sync_sweep_duration_seconds_bucket" in text
    assert 'workspace="1"' not in b.render().decode()
    a.forget_workspace("1")
    assert 'hpo_sync_consecutive_failures{workspace="1"}' not in a.render().decode()


# --- readiness -------------------------------------------------------------------------------


def test_alert_backlog_tells_the_oldest_pending_delivery_and_its_age() -> None:
    assert alert_backlog(0, None, NOW) == {
        "pending": 0,
        "oldest_pending_at": None,
        "oldest_pending_age_s": None,
    }
    assert alert_backlog(3, "2025-03-30T00:58:05Z", NOW) == {
        "pending": 3,
        "oldest_pending_at": "2025-03-30T00:58:05Z",
        "oldest_pending_age_s": 85.0,
    }
    # a row stamped by a clock slightly ahead has waited 0 s, not a negative time
    assert alert_backlog(1, "2025-03-30T01:00:00Z", NOW)["oldest_pending_age_s"] == 0.0


def test_readiness_needs_every_workspace_synced_once() -> None:
    states = [
        state(workspace_id="1", last_hot_ok_at="2025-03-30T00:59:00.500Z"),
        state(workspace_id="2"),
    ]
    health = {"2": WorkspaceHealth("2", consecutive_failures=2, last_error="boom")}
    body = readiness(["1", "2"], states, health, NOW)
    assert body["ready"] is False
    assert body["workspaces"]["1"]["synced"] and body["workspaces"]["1"]["age_s"] == 30.0
    assert body["workspaces"]["2"] == {
        "synced": False,
        "baseline_at": None,
        "last_success_at": None,
        "age_s": None,
        "consecutive_failures": 2,
        "backoff_until": None,
        "last_error": "boom",
        "sweeping": False,
        "stalled": False,
    }
    assert readiness(["1"], states, {}, NOW)["ready"] is True
    assert readiness(["3"], states, {}, NOW)["ready"] is False  # configured, never seen


def test_readiness_without_the_daemons_state_tells_the_mirrors_last_error() -> None:
    """Under `serve` (no daemon), or a daemon restarted and not yet failing again, the
    error the mirror recorded after the last success is shown (it was always null, where
    /v1/workspaces showed the workspace failing); one older than a success is not."""
    states = [
        state(
            workspace_id="1", last_error="Forbidden.RAM: no", last_error_at="2025-03-30T00:59:00Z"
        ),
        state(
            workspace_id="2",
            last_hot_ok_at="2025-03-30T00:59:30Z",
            last_error="old trouble",
            last_error_at="2025-03-30T00:58:00Z",
        ),
        state(
            workspace_id="3",
            last_hot_ok_at="2025-03-30T00:58:00Z",
            last_error="Throttling",
            last_error_at="2025-03-30T00:59:00Z",
        ),
    ]
    body = readiness(["1", "2", "3"], states, {}, NOW)["workspaces"]
    assert [body[w]["last_error"] for w in ("1", "2", "3")] == [
        "Forbidden.RAM: no",
        None,
        "Throttling",
    ]
    live = {"3": WorkspaceHealth("3", consecutive_failures=1, last_error="Timeout")}
    assert readiness(["3"], states, live, NOW)["workspaces"]["3"]["last_error"] == "Timeout"


def test_readiness_tells_stalled_workspaces_without_changing_the_verdict() -> None:
    """No success for ``stalled_after_s``: stalled; a workspace never synced counts from
    the start, as the stall notices do. Stale data is still served: still ready."""
    states = [
        state(workspace_id="1", last_hot_ok_at="2025-03-30T00:59:00Z"),  # 30 s before NOW
        state(workspace_id="2"),
    ]
    started = NOW - timedelta(seconds=100)
    body = readiness(["1", "2"], states, {}, NOW, stalled_after_s=60, since=started)
    assert body["workspaces"]["1"]["stalled"] is False
    assert body["workspaces"]["2"]["stalled"] is True
    body = readiness(["1"], states, {}, NOW, stalled_after_s=20, since=started)
    assert body["ready"] is True and body["workspaces"]["1"]["stalled"] is True
    assert not readiness(["2"], states, {}, NOW, stalled_after_s=200, since=started)["workspaces"][
        "2"
    ]["stalled"]


def test_signals_held_while_run_starts_get_their_default_action_back_if_it_fails(
    tmp_path: Path,
) -> None:
    """``main`` holds SIGTERM, SIGINT and SIGHUP from its first line for ``run``; a run that
    returns before its daemon took them over (a broken config: exit 2) gives them back, so
    a process calling ``main`` goes on with its handlers as they were."""
    import signal

    from hpo_sync import held_signals
    from hpo_sync.cli import main

    before = {sig: signal.getsignal(sig) for sig in held_signals.HELD}
    broken = tmp_path / "config.toml"
    broken.write_text("[sync]\nhot_interval_s = 'soon'\n", encoding="utf-8")
    assert main(["--config", str(broken), "run"]) == 2
    assert {sig: signal.getsignal(sig) for sig in held_signals.HELD} == before


def test_a_step_of_the_clock_is_told_from_slewing() -> None:
    wall, mono = [1000.0], [50.0]
    watch = ClockStepWatch(threshold_s=2.0, wall=lambda: wall[0], monotonic=lambda: mono[0])
    wall[0], mono[0] = 1001.01, 51.0  # slewed: 10 ms in a second
    assert watch.step_s() == 0.0
    wall[0], mono[0] = 402.0, 52.0  # set back ten minutes
    assert watch.step_s() == pytest.approx(-600.01)
    wall[0], mono[0] = 403.0, 53.0  # then on as before: no new step
    assert watch.step_s() == 0.0
    wall[0], mono[0] = 1004.0, 54.0  # set right again
    assert watch.step_s() == pytest.approx(600.0)


async def test_jobs_moved_by_a_step_back_of_the_clock_run_when_they_were_due() -> None:
    """After the clock was set back ten minutes, APScheduler's next run times (wall clock)
    lay ten minutes further off, and the wait it had computed (monotonic) outlasted the
    clock being set right: every sweep stopped for ten minutes. Moved by the step, a job
    due in half a second runs in half a second."""
    import asyncio

    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    ran = asyncio.Event()

    async def job() -> None:
        ran.set()

    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.start()
    try:
        # as the schedule stands just after a step back of 600 s, 0.5 s before the run
        due = datetime.now(UTC) + timedelta(seconds=600.5)
        scheduler.add_job(job, make_trigger(3600, 0), next_run_time=due, id="hot:ws")
        await asyncio.sleep(0.2)  # the scheduler has computed its wait: ~600 s
        assert not ran.is_set()
        assert shift_jobs(scheduler, -600.0) == 1
        await asyncio.wait_for(ran.wait(), timeout=5)
    finally:
        scheduler.shutdown(wait=False)
