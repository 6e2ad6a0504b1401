"""The daemon's HTTP server: health, readiness and metrics (the read API plugs in here too).

:func:`build_app` makes the :class:`aiohttp.web.Application`; every handler finds the daemon's
:class:`~hpo_sync.runtime.Runtime` as ``request.app[RUNTIME]`` and must read
``runtime.config`` afresh (a SIGHUP reload replaces it). Store reads run off the event loop
(``asyncio.to_thread``), so a sync in progress never stalls a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from .. import __version__
from ..alerts import outbox
from ..config import AlertsConfig, Config
from ..errors import StoreError
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..normalise import format_time, parse_time
from ..runtime import Runtime, WorkspaceHealth
from ..store import Store, WorkspaceState
from .openapi import parse_params

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


class _Renders(Protocol):
    def render(self) -> bytes: ...


class HostRuntime(Protocol):
    """What the health routes use of their host: the daemon's :class:`Runtime`, or
    ``hpo-sync serve``'s. Optional, looked up with ``getattr``: ``health``
    (``{ws: WorkspaceHealth}``; absent: nothing syncs here)."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def metrics(self) -> _Renders: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...

    @property
    def started_at(self) -> datetime: ...


HOST: web.AppKey[HostRuntime] = web.AppKey("hpo_sync.host_runtime")


def build_app(runtime: Runtime) -> web.Application:
    """The daemon's application. Extend it by adding routes (or sub-apps) to what this
    returns, or here, next to :func:`add_health_routes`."""
    app = web.Application()
    app[RUNTIME] = runtime
    add_health_routes(app)
    from .read import setup_read_api

    setup_read_api(app, runtime)
    from ..web import setup_web_ui

    setup_web_ui(app, runtime)
    return app


def add_health_routes(app: web.Application, runtime: HostRuntime | None = None) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics`` of ``runtime`` (default: ``app[RUNTIME]``),
    for the daemon and ``hpo-sync serve`` alike."""
    app[HOST] = runtime if runtime is not None else app[RUNTIME]
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers: 200 (400 for a query parameter, as on every route:
    none is taken here)."""
    parse_params((), request.query)
    runtime = request.app[HOST]
    now = runtime.clock()
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "started_at": format_time(runtime.started_at),
            "uptime_s": round((now - runtime.started_at).total_seconds(), 3),
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when the mirror is open and every configured workspace (every
    workspace of the mirror, for ``serve`` without a config) has synced successfully at
    least once (ever: a restarted daemon serves its mirror at once), else 503. The body
    tells each workspace's data age and failure state. It takes no query parameter."""
    parse_params((), request.query)
    runtime = request.app[HOST]
    store = runtime.store

    def read() -> tuple[list[WorkspaceState], tuple[int, str | None]]:
        with store.reader() as conn:  # one snapshot for both
            return store.workspaces(), outbox.backlog(conn)

    try:
        states, (pending, oldest) = await asyncio.to_thread(read)
    except StoreError as exc:
        return web.json_response(
            {"ready": False, "mirror": "unavailable", "error": str(exc)}, status=503
        )
    workspace_ids = runtime.config.workspace_ids() or tuple(s.workspace_id for s in states)
    health: Mapping[str, WorkspaceHealth] = getattr(runtime, "health", None) or {}
    now = runtime.clock()
    body = readiness(
        workspace_ids,
        states,
        health,
        now,
        stalled_after_s=runtime.config.alerts.stalled_after_s,
        since=runtime.started_at,
    )
    body["alerts"] = alert_backlog(pending, oldest, now)
    return web.json_response(body, status=200 if body["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the daemon's registry (no query parameter: the whole
    registry, always)."""
    parse_params((), request.query)
    runtime = request.app[HOST]
    payload = await asyncio.to_thread(runtime.metrics.render)
    return web.Response(body=payload, headers={"Content-Type": METRICS_CONTENT_TYPE})


DEFAULT_STALLED_AFTER_S = AlertsConfig().stalled_after_s


def _stalled(last: datetime | None, now: datetime, after_s: float) -> bool:
    return last is not None and (now - last).total_seconds() > after_s


def alert_backlog(pending: int, oldest: str | None, now: datetime) -> dict[str, Any]:
    """The ``alerts`` part of ``/readyz`` (pure): deliveries waiting in the outbox and how
    long the oldest has waited. It does not change the verdict: a chat target that is down
    makes alerts late, not the mirror unready (``hpo_sync_alerts_pending`` is the metric to
    alert on)."""
    oldest_at = parse_time(oldest) if oldest else None
    return {
        "pending": pending,
        "oldest_pending_at": format_time(oldest_at) if oldest_at else None,
        "oldest_pending_age_s": (
            round(max(0.0, (now - oldest_at).total_seconds()), 1) if oldest_at else None
        ),
    }


def readiness(
    workspace_ids: Sequence[str],
    states: Iterable[WorkspaceState],
    health: Mapping[str, WorkspaceHealth],
    now: datetime,
    *,
    stalled_after_s: float = DEFAULT_STALLED_AFTER_S,
    since: datetime | None = None,
) -> dict[str, Any]:
    """The ``/readyz`` body (pure): per configured workspace, when it last synced OK and how
    old that makes its data, whether it is failing now, and whether it is ``stalled``: no
    success for ``stalled_after_s`` (``[alerts]``), counted from ``since`` (the start) for
    one never synced, as the stall notices count. Stalled does not change the verdict:
    stale data is still served."""
    by_id = {s.workspace_id: s for s in states}
    out: dict[str, Any] = {}
    ready = True
    for ws in workspace_ids:
        state = by_id.get(ws)
        oks = [
            t
            for t in (
                parse_time(state.last_full_ok_at) if state else None,
                parse_time(state.last_hot_ok_at) if state else None,
            )
            if t is not None
        ]
        last_ok = max(oks) if oks else None
        h = health.get(ws)
        # The daemon's own error while it is failing; else the mirror's last recorded one,
        # if no success came after it (serve has no daemon; a restarted daemon, until its
        # first sweep, had shown null): what /v1/workspaces shows.
        err_at = parse_time(state.last_error_at) if state and state.last_error else None
        recorded = (
            state.last_error if state and err_at and (last_ok is None or err_at > last_ok) else None
        )
        entry: dict[str, Any] = {
            "synced": last_ok is not None,
            "baseline_at": state.baseline_at if state else None,
            "last_success_at": format_time(last_ok) if last_ok else None,
            "age_s": round((now - last_ok).total_seconds(), 1) if last_ok else None,
            "consecutive_failures": h.consecutive_failures if h else 0,
            "backoff_until": format_time(h.retry_at) if h and h.retry_at else None,
            "last_error": (h.last_error if h else None) or recorded,
            "sweeping": h.sweeping if h else False,
            "stalled": _stalled(last_ok or since, now, stalled_after_s),
        }
        ready = ready and last_ok is not None
        out[ws] = entry
    return {"ready": ready, "mirror": "open", "workspaces": out}
