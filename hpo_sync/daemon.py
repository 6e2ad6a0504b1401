"""``hpo-sync run``: the long-running service, and ``hpo-sync backup``.

One asyncio process holds the scheduler (APScheduler 3, two interval jobs per workspace: hot
and full), the HTTP server (:mod:`hpo_sync.api`) and whatever hosted services are installed
(the alert worker: see :class:`DaemonService`). Lifecycle, in order:

1. take the mirror's single-instance lock (a second daemon on the same file exits 1), open
   the mirror, close ``sync_runs`` a killed predecessor left ``running``;
2. listen on ``[api] listen``, start hosted services, start the scheduler, and sweep every
   workspace right away (full when it has no baseline or its last full sweep is overdue);
3. ``READY=1`` to systemd (the mirror is open and the API listens), ``STATUS=`` after every
   sweep, ``WATCHDOG=1`` at half ``$WATCHDOG_USEC`` while the loop and scheduler are healthy;
4. SIGHUP re-reads the config (``RELOADING=1`` … ``READY=1``): workspaces added or removed,
   intervals and alert rules apply at once; an invalid file is refused and the old config
   stays; ``[store]``, ``[upstream]`` and ``api.listen`` need a restart (logged);
5. SIGTERM/SIGINT: ``STOPPING=1``, stop scheduling, cancel sweeps (a store transaction in
   progress commits or rolls back — never half), close the API, the client and the mirror,
   exit 0.

A workspace whose sweeps keep failing backs off exponentially (:func:`backoff_delay_s`) on
its own; the others keep their pace. The decisions are pure functions with the time passed
in, tested without a scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog
from aiohttp import web
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from . import config as config_mod
from . import held_signals
from .config import Config
from .credentials import CredentialsProvider
from .errors import BackupExistsError, ConfigError, HpoSyncError, ShuttingDownError, StoreError
from .metrics import Metrics
from .normalise import format_time, parse_time
from .notify import Notifier
from .runtime import Runtime, SweepMode, WorkspaceHealth
from .store import ChangeRow, Store, StoreLock, WorkspaceState, acquire_lock
from .sweeper import SweepProcess

if TYPE_CHECKING:
    from .sync import SweepResult, SyncEngine

log = structlog.get_logger(__name__)

#: How long a stop waits for cancelled sweeps to wind down (their store transaction included).
STOP_SWEEPS_TIMEOUT_S = 5.0
# How often the daemon looks whether the clock was stepped, and how far it must have moved
# against the monotonic clock to count (see ClockStepWatch).
CLOCK_CHECK_S = 1.0
CLOCK_STEP_S = 2.0
#: aiohttp's graceful shutdown of open connections (its default is 60 s).
API_SHUTDOWN_TIMEOUT_S = 1.0
#: Modules that may provide ``build_service(runtime) -> DaemonService | None``.

ChangeHook = Callable[[sqlite3.Connection, list[ChangeRow]], None]


class DaemonError(HpoSyncError):
    """The daemon cannot start (the mirror's directory, the API's address)."""


# =============================================================================================
# Pure scheduling logic (no I/O, no clock: time comes in)


@dataclass(frozen=True)
class Backoff:
    """A workspace's failure streak. ``retry_at_s`` is on the caller's (monotonic) clock."""

    consecutive_failures: int = 0
    retry_at_s: float | None = None
    reason: str | None = None


def backoff_delay_s(consecutive_failures: int, *, base_s: float, max_s: float) -> float:
    """How long to hold a workspace's sweeps after ``consecutive_failures`` failures.

    One failure changes nothing (the next tick retries: most trouble is a blip); from the
    second on, ``base_s · 2^(n-1)`` (2, 4, 8 … hot intervals), capped at ``max_s``.
    """
    if consecutive_failures <= 1:
        return 0.0
    exponent = min(consecutive_failures - 1, 62)  # 2**62 s is past any cap; avoids overflow
    return float(min(max_s, base_s * 2**exponent))


def after_sweep(
    state: Backoff,
    *,
    failed: bool,
    reason: str | None,
    now_s: float,
    base_s: float,
    max_s: float,
) -> Backoff:
    """The streak after a sweep: a success clears it, a failure extends it."""
    if not failed:
        return Backoff()
    n = state.consecutive_failures + 1
    delay = backoff_delay_s(n, base_s=base_s, max_s=max_s)
    return Backoff(n, now_s + delay if delay > 0 else None, reason)


def wait_before_sweep_s(state: Backoff, now_s: float) -> float:
    """Seconds a scheduled sweep must still wait (0: go ahead)."""
    if state.retry_at_s is None:
        return 0.0
    return max(0.0, state.retry_at_s - now_s)


def counts_as_failure(status: str, error_code: str | None) -> bool:
    """Does a sweep's outcome extend the failure streak?

    ``failed`` does; ``partial`` does when upstream trouble caused it (an error code is set:
    a page kept failing), not when the sweep merely capped its own work.
    """
    return status == "failed" or (status == "partial" and error_code is not None)


def startup_mode(
    state: WorkspaceState | None, now: datetime, full_interval_s: float
) -> Literal["full", "hot"]:
    """The first sweep after start: full without a baseline or when the last full sweep is
    overdue (restarts must not postpone full sweeps forever), else hot."""
    if state is None or not state.baseline_at:
        return "full"
    last_full = parse_time(state.last_full_ok_at)
    if last_full is None or (now - last_full).total_seconds() >= full_interval_s:
        return "full"
    return "hot"


def first_full_at(state: WorkspaceState | None, now: datetime, full_interval_s: float) -> datetime:
    """When the periodic full job first fires: one interval after the last full sweep (the
    one at start, or an earlier one that is not overdue yet)."""
    interval = timedelta(seconds=full_interval_s)
    if startup_mode(state, now, full_interval_s) == "full" or state is None:
        return now + interval
    last_full = parse_time(state.last_full_ok_at) or now
    # min: a last full sweep "in the future" (the clock was set back) must not postpone it
    return min(last_full, now) + interval


@dataclass(frozen=True)
class ReloadPlan:
    """What a new config changes. ``config`` is what takes effect: the new file, except the
    sections listed in ``restart_required``, which keep their running values."""

    config: Config
    added: tuple[str, ...]
    removed: tuple[str, ...]
    relabelled: tuple[str, ...]
    intervals_changed: bool
    restart_required: tuple[str, ...]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare the running config with a freshly loaded one (pure)."""
    restart: list[str] = []
    if new.store != old.store:
        restart.append("store")
    if new.upstream != old.upstream:
        restart.append("upstream")
    if new.api.listen != old.api.listen:
        restart.append("api.listen")
    if new.sync.sweep_process != old.sync.sweep_process:
        restart.append("sync.sweep_process")
    effective = dataclasses.replace(
        new,
        store=old.store,
        upstream=old.upstream,
        api=dataclasses.replace(new.api, listen=old.api.listen),
        sync=dataclasses.replace(new.sync, sweep_process=old.sync.sweep_process),
    )
    old_ws = {w.id: w for w in old.workspaces}
    new_ws = {w.id: w for w in new.workspaces}
    s_old, s_new = old.sync, new.sync
    return ReloadPlan(
        config=effective,
        added=tuple(w for w in new_ws if w not in old_ws),
        removed=tuple(w for w in old_ws if w not in new_ws),
        relabelled=tuple(w for w in new_ws if w in old_ws and new_ws[w].label != old_ws[w].label),
        intervals_changed=(s_old.hot_interval_s, s_old.full_interval_s, s_old.jitter_s)
        != (s_new.hot_interval_s, s_new.full_interval_s, s_new.jitter_s),
        restart_required=tuple(restart),
    )


def status_line(health: Mapping[str, WorkspaceHealth], api_url: str | None) -> str:
    """systemd's one-line STATUS=: how many workspaces are fine, failing, sweeping."""
    total = len(health)
    synced = sum(1 for h in health.values() if h.last_outcome is not None)
    failing = sorted(w for w, h in health.items() if h.consecutive_failures)
    sweeping = sum(1 for h in health.values() if h.sweeping)
    parts = [f"{total} workspace{'s' if total != 1 else ''}: {synced - len(failing)} ok"]
    if failing:
        parts.append(f"{len(failing)} failing ({', '.join(failing[:3])})")
    if synced < total:
        parts.append(f"{total - synced} not synced yet")
    if sweeping:
        parts.append(f"{sweeping} sweeping")
    text = ", ".join(parts)
    return f"{text}; API {api_url}" if api_url else text


def job_id(workspace_id: str, kind: Literal["hot", "full"]) -> str:
    return f"{kind}:{workspace_id}"


class _NoMaxInstancesText(logging.Filter):
    """Drops APScheduler's free-text warning that a tick was skipped because the job's
    previous run is still going: the daemon reports that tick as a ``sync.skipped`` event
    with its workspace and kind instead (:meth:`Daemon._on_tick_skipped`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(
            'Execution of job "%s" skipped: maximum number of running instances'
        )


def scheduler_logger() -> logging.Logger:
    """The daemon's scheduler's logger: a child of ``apscheduler`` (so the level the
    logging setup gives that applies), less the warning :class:`_NoMaxInstancesText`
    drops. Only this scheduler's: the credentials chain runs one of its own."""
    logger = logging.getLogger("apscheduler.scheduler.daemon")
    if not any(isinstance(f, _NoMaxInstancesText) for f in logger.filters):
        logger.addFilter(_NoMaxInstancesText())
    return logger


class ClockStepWatch:
    """Tells when this machine's clock was stepped (set, not slewed): the wall clock moved
    against the monotonic one by ``threshold_s`` or more since the last look. Slewing (NTP
    nudging the rate) moves them apart by far less between two looks a second apart."""

    def __init__(
        self,
        threshold_s: float = CLOCK_STEP_S,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold_s, self._wall, self._monotonic = threshold_s, wall, monotonic
        self._offset = wall() - monotonic()

    def step_s(self) -> float:
        """The step since the last look (negative: back), 0.0 for none."""
        offset = self._wall() - self._monotonic()
        step, self._offset = offset - self._offset, offset
        return step if abs(step) >= self._threshold_s else 0.0


def shift_jobs(scheduler: AsyncIOScheduler, step_s: float) -> int:
    """Move every job's next run by ``step_s`` (the clock's step), so that it comes as long
    after now as it would have without the step; returns how many moved.

    APScheduler keeps next run times on the wall clock and sleeps until the next one on the
    event loop's monotonic clock: after a step back of ten minutes (an NTP step after boot,
    an operator's ``date -s``) every sweep waited ten minutes more, and the wait, once
    computed, outlasted the clock being set right again. Modifying a job wakes the
    scheduler, which computes its wait afresh."""
    moved = 0
    for job in scheduler.get_jobs():
        if job.next_run_time is not None:
            job.modify(next_run_time=job.next_run_time + timedelta(seconds=step_s))
            moved += 1
    return moved


def make_trigger(
    interval_s: float, jitter_s: float, start: datetime | None = None
) -> IntervalTrigger:
    """Every ``interval_s`` from ``start`` (default: one interval from now), each firing
    delayed by up to ``jitter_s`` (never more than half an interval) to spread workspaces."""
    jitter = min(jitter_s, interval_s / 2)
    return IntervalTrigger(
        seconds=interval_s,
        start_date=start,
        jitter=jitter if jitter > 0 else None,
        timezone=UTC,
    )


# =============================================================================================
# Hosted services (the alert worker's seam)


class DaemonService(Protocol):
    """Something the daemon hosts beside the scheduler and the API (e.g. the alert worker).

    List its factory in :func:`discover_service_factories`:
    ``build_service(runtime) -> DaemonService | None`` (None: nothing to run with this
    config), or pass it to :class:`Daemon` directly.
    """

    name: str

    async def start(self) -> None:
        """Called once the mirror is open and the API listens, before the first sweep."""

    async def stop(self) -> None:
        """Called on shutdown, after sweeps stopped; return within a couple of seconds."""

    async def reload(self, config: Config) -> None:
        """Called after a SIGHUP with the config now in force (alert rules may change)."""

    # Optional: ``async def clock_stepped(self, step_s: float) -> None``, called when the
    # machine's clock stepped by ``step_s`` (see :func:`shift_jobs`), for a service that
    # keeps waits on the wall clock (the alert worker's retries).

    def on_changes(self, conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        """Called inside the store transaction that wrote ``rows`` (in a worker thread):
        write outbox rows with ``conn``; raising rolls the whole batch back. Only while
        sweeps run in the daemon's process (``[sync] sweep_process = false``): a sweep
        process writes the alert outbox in its transactions itself
        (:mod:`hpo_sync.sweeper`)."""


ServiceFactory = Callable[[Runtime], "DaemonService | None"]


def discover_service_factories() -> list[ServiceFactory]:
    """The services the daemon runs beside the scheduler and the API."""
    from .alerts.service import build_service

    return [build_service]


# =============================================================================================
# The daemon


@dataclass(frozen=True)
class _Outcome:
    """What the daemon needs of a sweep's result (also made up when a sweep crashed)."""

    workspace_id: str
    mode: str
    status: str
    duration_s: float
    error: str | None = None
    error_code: str | None = None
    retries: int = 0
    throttled: int = 0
    run_id: int | None = None

    @classmethod
    def of(cls, r: SweepResult) -> _Outcome:
        return cls(
            r.workspace_id,
            r.mode,
            r.status,
            r.duration_s,
            r.error,
            r.error_code,
            r.retries,
            r.throttled,
            r.run_id,
        )


@dataclass
class _WorkspaceSlot:
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    full_pending: bool = False
    running: int = 0


class Daemon:
    """The service. ``await Daemon(config).run()`` runs until :meth:`request_stop`.

    ``credentials`` defaults to the Alibaba Cloud default chain; ``notifier`` to systemd's
    ``$NOTIFY_SOCKET`` (a no-op outside systemd). ``services`` None discovers them.
    ``sweep_process`` (default: ``[sync] sweep_process``) runs the sweeps in a child process
    (:mod:`hpo_sync.sweeper`); ``credentials`` must then pickle, and services'
    ``on_changes`` hooks are not called: the child writes the alert outbox itself.
    """

    def __init__(
        self,
        config: Config,
        *,
        credentials: CredentialsProvider | None = None,
        notifier: Notifier | None = None,
        services: Sequence[DaemonService] | None = None,
        on_reload_logging: Callable[[Config], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sweep_process: bool | None = None,
    ) -> None:
        self.config = config
        self._sweep_process = config.sync.sweep_process if sweep_process is None else sweep_process
        self._credentials = credentials
        self.notifier = notifier if notifier is not None else Notifier()
        self._given_services = list(services) if services is not None else None
        self.services: list[DaemonService] = []
        self._on_reload_logging = on_reload_logging
        self._monotonic = monotonic
        self._clock = clock
        self.metrics = Metrics()
        self.runtime: Runtime | None = None
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._slots: dict[str, _WorkspaceSlot] = {}
        self._health: dict[str, WorkspaceHealth] = {}
        self._sweeps: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self._scheduler: AsyncIOScheduler | None = None
        self._store: Store | None = None
        self._engine: SyncEngine | SweepProcess | None = None
        self.api_url: str | None = None

    @property
    def engine(self) -> SyncEngine | SweepProcess:
        if self._engine is None:
            raise RuntimeError("the daemon has not started")
        return self._engine

    # --- control ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()  # first: whatever logging does, the stop is under way
            log.info("daemon.stop_requested")

    def request_reload(self) -> None:
        self._track(asyncio.create_task(self.reload(), name="reload"))

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT stop, SIGHUP reloads; returns a function that removes them once
        the daemon has stopped, and ignores those signals for the rest of the exit."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        for sig in held_signals.release():  # those that came while ``run`` was starting
            log.info("daemon.signal_while_starting", signal=signal.Signals(sig).name)
            (self.request_reload if sig == signal.SIGHUP else self.request_stop)()

        def remove() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
                # The loop's removal puts the default action back, and the exit goes on for
                # a while yet (systemd's last notifications, the event loop's close): a
                # second Ctrl-C or SIGTERM there (the stop is done: a repeated one does
                # nothing before) ended the process by the signal, not with its exit 0.
                signal.signal(sig, signal.SIG_IGN)

        return remove

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until a stop is requested, then shut everything down in order."""
        began = self._monotonic()
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            self.started.set()
            await self._stop.wait()
            stopping_at = self._monotonic()
            self.notifier.stopping()
            log.info("daemon.stopping")
        log.info(
            "daemon.stopped",
            uptime_s=round(stopping_at - began, 3),
            shutdown_s=round(self._monotonic() - stopping_at, 3),
        )

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        from .client import UpstreamClient
        from .credentials import DefaultChainCredentials
        from .sync import SyncEngine

        cfg = self.config
        db_path = cfg.store.path
        try:
            if not db_path.parent.exists():  # said, so that a mistyped path shows
                db_path.parent.mkdir(parents=True, exist_ok=True)
                log.warning("store.directory_created", path=str(db_path.parent))
        except OSError as exc:
            raise DaemonError(
                f"cannot create the mirror's directory {db_path.parent}: {exc.strerror}"
            ) from None
        lock: StoreLock = acquire_lock(db_path)
        stack.callback(lock.release)
        store = await asyncio.to_thread(Store.open, db_path)
        stack.push_async_callback(asyncio.to_thread, store.close)
        self._store = store
        now = self._clock()
        abandoned = await asyncio.to_thread(store.abandon_running_runs, format_time(now))
        if abandoned:
            log.warning("daemon.interrupted_runs_closed", count=abandoned)
        for wcfg in cfg.workspaces:
            await asyncio.to_thread(store.ensure_workspace, wcfg.id, wcfg.label)

        engine: SyncEngine | SweepProcess
        if self._sweep_process:
            engine = SweepProcess(
                cfg, store, self.metrics, credentials=self._credentials, clock=self._clock
            )
            # Closed after the sweeps are cancelled (pushed before _cancel_sweeps below).
            stack.push_async_callback(engine.close)
            await engine.start()
        else:
            client = UpstreamClient(
                cfg.upstream,
                self._credentials or DefaultChainCredentials(),
                observer=self.metrics.observe_request,
            )
            stack.push_async_callback(client.close)
            engine = SyncEngine(cfg, client, store, on_changes=self._on_changes)
        self._engine = engine
        for ws in cfg.workspace_ids():
            self._add_slot(ws)
        runtime = Runtime(
            config=cfg,
            store=store,
            engine=engine,
            metrics=self.metrics,
            started_at=now,
            request_sync=self.request_sync,
            health=self._health,
            clock=self._clock,
        )
        self.runtime = runtime

        from .api import build_app

        runner = web.AppRunner(
            build_app(runtime),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=API_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        host, port = cfg.api.host_port
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise DaemonError(
                f"cannot listen on {cfg.api.listen} ([api] listen): {exc.strerror}; "
                "is another process using the port?"
            ) from None
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self.api_url = runtime.api_url = f"http://{shown}:{bound_port}"
        log.info("api.listening", url=self.api_url, host=bound_host, port=bound_port)

        factories = discover_service_factories() if self._given_services is None else []
        self.services = list(self._given_services or [])
        for factory in factories:
            service = factory(runtime)
            if service is not None:
                self.services.append(service)
        for service in self.services:
            await service.start()
            stack.push_async_callback(self._stop_service, service)

        # Cancel sweeps before the services, the API, the client and the store go away.
        stack.push_async_callback(self._cancel_sweeps)

        scheduler = AsyncIOScheduler(timezone=UTC, logger=scheduler_logger())
        scheduler.add_listener(self._on_tick_skipped, EVENT_JOB_MAX_INSTANCES)
        scheduler.start()
        self._scheduler = scheduler
        stack.callback(self._shutdown_scheduler)
        for ws in cfg.workspace_ids():
            state = await asyncio.to_thread(store.workspace_state, ws)
            self._schedule_jobs(ws, state, now)
            mode = startup_mode(state, now, cfg.sync.full_interval_s)
            self._spawn_sweep(ws, mode, trigger="startup")

        if self.notifier.watchdog_interval_s:
            task = asyncio.create_task(
                self._watchdog(self.notifier.watchdog_interval_s), name="watchdog"
            )
            self._track(task)
            stack.callback(task.cancel)
        clock_task = asyncio.create_task(self._watch_clock(), name="clock-step-watch")
        self._track(clock_task)
        stack.callback(clock_task.cancel)
        log.info(
            "daemon.ready",
            workspaces=list(cfg.workspace_ids()),
            mirror=str(db_path),
            api=self.api_url,
            hot_interval_s=cfg.sync.hot_interval_s,
            full_interval_s=cfg.sync.full_interval_s,
            watchdog_s=self.notifier.watchdog_interval_s,
            pid=os.getpid(),
        )
        self.notifier.ready(status_line(self._health, self.api_url))

    def _shutdown_scheduler(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    async def _stop_service(self, service: DaemonService) -> None:
        try:
            await asyncio.wait_for(service.stop(), timeout=STOP_SWEEPS_TIMEOUT_S)
        except Exception as exc:  # one service's trouble must not block the others' stop
            log.error("daemon.service_stop_failed", service=service.name, error=repr(exc))

    async def _cancel_sweeps(self) -> None:
        # The background tasks first: a reload still under way would otherwise go on while
        # the sweeps are waited for, and start its new workspaces' sweeps after them.
        for task in list(self._background):
            task.cancel()
        pending = [t for t in self._sweeps if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, still = await asyncio.wait(pending, timeout=STOP_SWEEPS_TIMEOUT_S)
            log.info("daemon.sweeps_cancelled", count=len(pending), unfinished=len(still))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 while the loop runs this task on time and the scheduler is up; a
        blocked loop or a dead scheduler stops the pings and systemd restarts us."""
        while True:
            await asyncio.sleep(interval_s)
            if self._scheduler is not None and self._scheduler.running:
                self.notifier.watchdog()
            else:
                log.error("daemon.unhealthy", reason="scheduler not running")

    async def _watch_clock(self) -> None:
        """Keep the sweeps' schedule through a step of the clock (:func:`shift_jobs`)."""
        watch = ClockStepWatch()
        while True:
            await asyncio.sleep(CLOCK_CHECK_S)
            step_s = watch.step_s()
            if step_s and self._scheduler is not None and self._scheduler.running:
                moved = shift_jobs(self._scheduler, step_s)
                log.warning("daemon.clock_stepped", step_s=round(step_s, 1), jobs_moved=moved)
                for service in self.services:
                    # Optional (a service with no waits on the wall clock has none).
                    hook = getattr(service, "clock_stepped", None)
                    if hook is None:
                        continue
                    try:
                        await hook(step_s)
                    except Exception as exc:  # one service's trouble must not stop the watch
                        log.error(
                            "daemon.service_clock_step_failed",
                            service=service.name,
                            error=repr(exc),
                        )

    # --- scheduling ------------------------------------------------------------------------

    def _add_slot(self, ws: str) -> None:
        self._slots[ws] = _WorkspaceSlot()
        self._health[ws] = WorkspaceHealth(workspace_id=ws)
        self.metrics.init_workspace(ws)

    def _schedule_jobs(self, ws: str, state: WorkspaceState | None, now: datetime) -> None:
        assert self._scheduler is not None
        s = self.config.sync
        self._scheduler.add_job(
            self._scheduled,
            self._trigger(s.hot_interval_s),
            args=[ws, "hot"],
            id=job_id(ws, "hot"),
            name=f"hot sweep of {ws}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(s.hot_interval_s)),
            replace_existing=True,
        )
        self._scheduler.add_job(
            self._scheduled,
            self._trigger(s.full_interval_s, start=first_full_at(state, now, s.full_interval_s)),
            args=[ws, "full"],
            id=job_id(ws, "full"),
            name=f"full sweep of {ws}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(s.full_interval_s)),
            replace_existing=True,
        )

    def _on_tick_skipped(self, event: JobSubmissionEvent) -> None:
        """A tick the scheduler skipped: the sweep the job's previous tick started is still
        running (``max_instances=1``), so the sweeps of this workspace take longer than
        their interval. A warning, as it means the interval is shorter than the work."""
        kind, _, ws = event.job_id.partition(":")
        interval_s = (
            self.config.sync.hot_interval_s if kind == "hot" else self.config.sync.full_interval_s
        )
        log.warning(
            "sync.skipped",
            workspace=ws,
            kind=kind,
            reason="still_running",
            interval_s=interval_s,
            hint=f"the previous {kind} sweep of this workspace is still running;"
            " it takes longer than its interval",
        )

    def _trigger(self, interval_s: float, start: datetime | None = None) -> IntervalTrigger:
        return make_trigger(interval_s, self.config.sync.jitter_s, start)

    async def _scheduled(self, ws: str, kind: Literal["hot", "full"]) -> None:
        """A job tick. Skips while the workspace backs off (a skipped full sweep is made up
        by the next allowed tick) and, for hot ticks, while a sweep of it is running."""
        slot = self._slots.get(ws)
        if slot is None or self._stop.is_set():
            return
        wait_s = wait_before_sweep_s(slot.backoff, self._monotonic())
        if wait_s > 0:
            if kind == "full":
                slot.full_pending = True
            log.debug("sync.skipped", workspace=ws, kind=kind, reason="backoff", wait_s=wait_s)
            return
        if kind == "hot" and self.engine.lock_for(ws).locked():
            log.debug("sync.skipped", workspace=ws, kind=kind, reason="busy")
            return
        mode: SweepMode = "full" if kind == "full" or slot.full_pending else "auto"
        task = self._spawn_sweep(ws, mode, trigger=kind)
        if kind == "hot" and mode == "full":
            # A full sweep made up by a hot tick: the hot ticks meanwhile find it running
            # (busy, above). Waited for here, each would be skipped by the scheduler as
            # behind a hot sweep that outlasts its interval (:meth:`_on_tick_skipped`).
            return
        # Shielded: the scheduler cancels its jobs on shutdown, while the daemon itself
        # cancels and awaits sweeps (so their transactions finish first). A crash was logged
        # as sync.crashed already.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(task)

    def request_sync(
        self, workspace_id: str, mode: SweepMode = "auto"
    ) -> asyncio.Task[SweepResult]:
        """Sweep a configured workspace now, whatever its backoff (an operator asked).

        Refused once a stop is requested (:class:`ShuttingDownError`): the sweeps have been
        cancelled, or are being cancelled, and one started now would run past that — in
        the sweep process until it is stopped under it, or in this process after the
        mirror was closed under it, its run left ``running``."""
        if workspace_id not in self._slots:
            raise KeyError(workspace_id)
        if self._stop.is_set():
            raise ShuttingDownError("the daemon is stopping; it starts no sweep any more")
        return self._spawn_sweep(workspace_id, mode, trigger="request")

    def _spawn_sweep(self, ws: str, mode: SweepMode, *, trigger: str) -> asyncio.Task[SweepResult]:
        if mode == "full":
            self._slots[ws].full_pending = False
        task = asyncio.create_task(self._sweep(ws, mode, trigger), name=f"sweep:{ws}:{mode}")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)
        task.add_done_callback(
            _retrieve
        )  # a crash is logged as sync.crashed, not "never retrieved"
        return task

    async def _sweep(self, ws: str, mode: SweepMode, trigger: str) -> SweepResult:
        slot = self._slots[ws]
        health = self._health[ws]
        slot.running += 1
        health.sweeping = True
        began = self._monotonic()
        try:
            with structlog.contextvars.bound_contextvars(trigger=trigger):
                result = await self.engine.sweep(ws, mode)
        except Exception as exc:
            # The engine promises not to raise; if it does anyway, the workspace counts it as
            # a failure (and backs off) instead of the daemon losing track of it.
            log.error("sync.crashed", workspace=ws, mode=mode, error=repr(exc), exc_info=exc)
            await self._record(
                _Outcome(
                    ws,
                    mode,
                    "failed",
                    self._monotonic() - began,
                    error=f"internal error: {type(exc).__name__}: {exc}",
                    error_code="InternalError",
                )
            )
            raise
        finally:
            slot.running -= 1
            health.sweeping = slot.running > 0
        await self._record(_Outcome.of(result))
        return result

    async def _record(self, outcome: _Outcome) -> None:
        ws = outcome.workspace_id
        slot = self._slots.get(ws)
        health = self._health.get(ws)
        self.metrics.observe_sweep(
            ws,
            outcome.mode,
            outcome.status,
            outcome.duration_s,
            retries=outcome.retries,
            throttled=outcome.throttled,
        )
        if slot is None or health is None:  # removed by a reload while it ran
            return
        failed = counts_as_failure(outcome.status, outcome.error_code)
        before = slot.backoff.consecutive_failures
        now_s, now = self._monotonic(), self._clock()
        slot.backoff = after_sweep(
            slot.backoff,
            failed=failed,
            reason=outcome.error,
            now_s=now_s,
            base_s=self.config.sync.hot_interval_s,
            max_s=self.config.sync.failure_backoff_max_s,
        )
        if failed and outcome.mode == "full":
            slot.full_pending = True  # the next allowed attempt is a full sweep again
        wait_s = wait_before_sweep_s(slot.backoff, now_s)
        health.consecutive_failures = slot.backoff.consecutive_failures
        health.retry_at = now + timedelta(seconds=wait_s) if wait_s > 0 else None
        health.last_outcome = outcome.status
        health.last_error = outcome.error if outcome.status != "ok" else None
        health.last_sweep_at = now
        self.metrics.set_failures(ws, slot.backoff.consecutive_failures, wait_s)
        if failed and wait_s > 0:
            log.warning(
                "sync.backoff",
                workspace=ws,
                consecutive_failures=slot.backoff.consecutive_failures,
                retry_in_s=round(wait_s, 1),
                reason=outcome.error,
                error_code=outcome.error_code,
            )
            if outcome.run_id is not None:
                await self._note_backoff(
                    ws, outcome.run_id, slot.backoff.consecutive_failures, wait_s
                )
        elif not failed and before:
            log.info("sync.recovered", workspace=ws, after_failures=before)
        self.notifier.status(status_line(self._health, self.api_url))

    async def _note_backoff(self, ws: str, run_id: int, failures: int, wait_s: float) -> None:
        """Append the backoff decision to the failed run's ``sync_runs.error``."""
        store = self._store
        if store is None:
            return
        note = f"backing off: no sweep for {wait_s:.0f}s after {failures} consecutive failures"
        try:
            await asyncio.to_thread(_annotate_run, store, ws, run_id, note)
        except StoreError as exc:  # informative only
            log.debug("sync.backoff_note_failed", error=str(exc))

    def _on_changes(self, conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        """Runs inside the store transaction (a worker thread): count, then hand to services."""
        by_ws: dict[str, list[tuple[str, bool]]] = {}
        for row in rows:
            by_ws.setdefault(row.workspace_id, []).append((row.field, row.baseline))
        for ws, fields in by_ws.items():
            self.metrics.observe_changes(ws, fields)
        for service in self.services:
            hook = getattr(service, "on_changes", None)
            if hook is not None:
                hook(conn, rows)

    # --- reload ----------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and apply it; False (old config kept) if it is invalid."""
        async with self._reload_lock:
            if not self.started.is_set():
                # A SIGHUP while the daemon starts: applied once it has started (stopping
                # first drops it), not lost, nor run against a daemon half started.
                await _first_of(self.started.wait(), self._stop.wait())
            if self._stop.is_set() or self.runtime is None:
                return False
            path = self.config.source
            self.notifier.reloading()
            log.info("config.reloading", path=str(path))
            try:
                if path is None:
                    raise ConfigError("the running config was not read from a file")
                new = await asyncio.to_thread(config_mod.load, path)
                # What check-config and run refuse: an API off loopback without tokens; and
                # the API keeps listening where it started (api.listen needs a restart).
                from .api.auth import check_listen_allowed
                from .cli import check_listen

                check_listen(new)
                check_listen_allowed(self.config.api.host_port[0], new.api.tokens)
            except ConfigError as exc:
                self._reject_reload(path, exc, "fix the file and reload again")
                return False
            plan = plan_reload(self.config, new)
            try:
                await self._apply(plan)
            except HpoSyncError as exc:
                # The mirror refused what the new config needs written (a write lock held
                # past the busy timeout, a full disk), before any of it took effect: the
                # reload used to end there, half applied (the new config in force, its new
                # workspaces never swept), with systemd left waiting in "reloading".
                self._reject_reload(path, exc, "reload again once the mirror takes writes")
                return False
            except Exception as exc:  # a defect: said, and the daemon told ready again
                self.metrics.reloads.labels(outcome="rejected").inc()
                log.exception("config.reload_failed", path=str(path), error=repr(exc))
                self.notifier.ready(f"config reload failed: {exc!r}")
                return False
            self.metrics.reloads.labels(outcome="applied").inc()
            log.info(
                "config.reloaded",
                path=str(path),
                added=list(plan.added),
                removed=list(plan.removed),
                intervals_changed=plan.intervals_changed,
                restart_required=list(plan.restart_required),
            )
            if plan.restart_required:
                log.warning(
                    "config.restart_required",
                    sections=list(plan.restart_required),
                    hint="these settings keep their running values until hpo-sync restarts",
                )
            self.notifier.ready(status_line(self._health, self.api_url))
            return True

    def _reject_reload(self, path: Path | None, exc: Exception, hint: str) -> None:
        self.metrics.reloads.labels(outcome="rejected").inc()
        log.error(
            "config.reload_rejected",
            path=str(path),
            error=str(exc),
            hint=f"the running config stays in force; {hint}",
        )
        self.notifier.ready(f"config reload rejected: {exc}")

    async def _apply(self, plan: ReloadPlan) -> None:
        assert self._scheduler is not None and self._store is not None
        cfg = plan.config
        # The mirror's part first, which can fail (StoreError): then none of the new config
        # is in force yet, and the reload is rejected whole.
        labels = {w.id: w.label for w in cfg.workspaces}
        for ws in (*plan.relabelled, *plan.added):
            await asyncio.to_thread(self._store.ensure_workspace, ws, labels[ws])
        kept = [ws for ws in self._slots if ws not in plan.removed]
        read = [*(kept if plan.intervals_changed else ()), *plan.added]
        states = {ws: await asyncio.to_thread(self._store.workspace_state, ws) for ws in read}
        old = self.config
        self.config = cfg
        if self._on_reload_logging is not None and cfg.logging != old.logging:
            self._on_reload_logging(cfg)
        self.engine.config = cfg  # after the logging: a sweep process takes its level too
        assert self.runtime is not None
        self.runtime.config = cfg
        for ws in plan.removed:
            for kind in ("hot", "full"):
                with contextlib.suppress(Exception):  # JobLookupError: already gone
                    self._scheduler.remove_job(job_id(ws, kind))
            self._slots.pop(ws, None)
            self._health.pop(ws, None)
            self.metrics.forget_workspace(ws)
        now = self._clock()
        if plan.intervals_changed:
            for ws in self._slots:
                self._schedule_jobs(ws, states[ws], now)
        for ws in plan.added:
            self._add_slot(ws)
            state = states[ws]
            self._schedule_jobs(ws, state, now)
            self._spawn_sweep(
                ws, startup_mode(state, now, cfg.sync.full_interval_s), trigger="reload"
            )
        for service in self.services:
            try:
                await service.reload(cfg)
            except Exception as exc:  # keep the daemon (and the other services) going
                log.error("daemon.service_reload_failed", service=service.name, error=repr(exc))


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _annotate_run(store: Store, ws: str, run_id: int, note: str) -> None:
    for run in store.sync_runs(ws, limit=20):
        if run.id == run_id and run.finished_at:
            error = f"{run.error} — {note}" if run.error else note
            store.finish_run(
                run_id,
                finished_at=run.finished_at,
                status=run.status,
                api_calls=run.api_calls,
                pages=run.pages,
                experiments_seen=run.experiments_seen,
                error=error,
            )
            return


# =============================================================================================
# Commands


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def register_cli(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    command(
        "run",
        "run the daemon: scheduled syncs, the HTTP API and alerts, until SIGTERM",
        cmd_run,
    )
    p = command(
        "backup",
        "write a consistent copy of the mirror (safe while the daemon runs)",
        cmd_backup,
    )
    p.add_argument("dest", metavar="DEST", help="file to write, or a directory to write into")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.add_argument("--db", metavar="PATH", help="the mirror (default: [store] path)")


def cmd_run(args: argparse.Namespace) -> int:
    from . import cli

    cfg = cli.load_config(args)
    cli.check_listen(cfg)  # before the sweep process, the scheduler or anything else starts
    cli.setup_logging(args, cfg)
    overrides = (getattr(args, "log_level", None), getattr(args, "log_format", None))

    def relog(new: Config) -> None:
        from . import logs

        logs.configure(overrides[0] or new.logging.level, overrides[1] or new.logging.format)

    from .eventloop import run

    return run(_serve(Daemon(cfg, on_reload_logging=relog)))


async def _serve(daemon: Daemon) -> int:
    remove = daemon.install_signal_handlers()
    try:
        await daemon.run()
    finally:
        remove()
        daemon.notifier.close()
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from . import cli
    from .cli import UsageError

    db = cli.default_db_path(args)
    cli.setup_logging(args)
    dest = Path(args.dest)
    if args.dest.endswith("/") and not dest.is_dir():
        raise UsageError(f"directory {dest} does not exist")
    started = time.monotonic()
    if dest.is_dir():
        dest, size, check = _backup_into(db, dest)
    else:
        size, check = backup(db, dest, overwrite=args.overwrite)
    print(
        f"backed up {db} to {dest} ({size:,} bytes, {time.monotonic() - started:.1f}s, "
        f"integrity {check})"
    )
    return 0


def _backup_into(db: Path, directory: Path) -> tuple[Path, int, str]:
    """Back up into a time-stamped file of its own in ``directory``: ``<mirror>-<UTC time>``,
    then ``-2``, ``-3``… when a backup in the same second (another, at once) has that name.
    Never over another backup, whatever ``--overwrite`` says: the user named no file."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in itertools.count(1):
        dest = directory / f"{db.stem}-{stamp}{'' if n == 1 else f'-{n}'}{db.suffix or '.db'}"
        if dest.exists():
            continue
        try:
            size, check = backup(db, dest)
        except BackupExistsError:  # taken by another backup in the meantime
            continue
        return dest, size, check
    raise AssertionError("unreachable")  # (itertools.count never ends)


def backup(db: Path, dest: Path, *, overwrite: bool = False) -> tuple[int, str]:
    """Copy the mirror at ``db`` to ``dest`` through SQLite's online backup (a consistent
    snapshot even while the daemon writes) and check the copy; returns (bytes, check)."""
    from .cli import UsageError
    from .store import is_mirror_file

    if is_mirror_file(dest, db):
        raise UsageError(f"{dest} is the mirror's own file ({dest.resolve()}); name another")
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} exists; pass --overwrite to replace it")
    if not dest.parent.is_dir():
        raise UsageError(f"directory {dest.parent} does not exist")
    # A mirror of any version: the copy to keep before an upgrade is of an older one.
    store = Store.open(db, readonly=True, any_version=True)
    try:
        store.backup(dest, overwrite=overwrite)
    finally:
        store.close()
    conn = sqlite3.connect(f"file:{dest}?mode=ro", uri=True)
    try:
        check = str(conn.execute("PRAGMA quick_check").fetchone()[0])
    finally:
        conn.close()
    if check != "ok":
        raise StoreError(f"the copy at {dest} failed its integrity check: {check}")
    return dest.stat().st_size, check


__all__ = (
    "Backoff",
    "Daemon",
    "DaemonError",
    "DaemonService",
    "ReloadPlan",
    "after_sweep",
    "backoff_delay_s",
    "backup",
    "counts_as_failure",
    "first_full_at",
    "plan_reload",
    "startup_mode",
    "status_line",
    "wait_before_sweep_s",
)
