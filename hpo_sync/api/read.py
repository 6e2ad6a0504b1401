"""The read API: ``/v1`` routes over the mirror, the upstream-compatible route, the OpenAPI
document, and the middlewares that guard them all (auth, limits, errors, metrics).

The daemon's ``build_app(runtime)`` calls :func:`setup_read_api` once; ``hpo-sync serve``
does the same for a read-only instance. Handlers never touch SQLite on the event loop: every
query runs in a small thread pool of its own, through the store's per-thread read-only
connections, inside one read transaction (one consistent snapshot for the rows, the counts
and the freshness of a response). In WAL mode readers never wait for the writer, so a sweep
applying a large batch does not hold up a request. Every query runs under a time budget
(a SQLite progress handler aborts it: 503 ``query_timeout``) and every list is LIMITed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import sqlite3
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, unquote_to_bytes

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..config import Config
from ..errors import ShuttingDownError, StoreError
from ..normalise import parse_time

# The store's query builders, so that the API's pages and counts select exactly what
# Store.list_experiments would, with only the columns the API shows.
from ..store import (
    WORKSPACE_STATES_SQL,
    ExperimentFilter,
    PageKey,
    SortOrder,
    Store,
    WorkspaceState,
    count_by_status_sql,
    decode_workspace_states,
    page_sql,
    sort_column,
    status_counts,
)
from .auth import Authenticator, Principal, check_listen_allowed, presented_token
from .cursor import Cursor, CursorError, filters_hash
from .errors import (
    ApiError,
    BadParameterError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
    error_response,
    upstream_error_response,
)
from .openapi import (
    CHANGES_PARAMS,
    EXPERIMENT_CHANGES_PARAMS,
    EXPERIMENT_PARAMS,
    EXPERIMENTS_PARAMS,
    MAX_BODY_BYTES,
    MAX_QUERY_STRING,
    SYNC_PARAMS,
    WORKSPACES_PARAMS,
    build_document,
    parse_params,
)
from .pool import ReadPool

__all__ = [
    "PRINCIPAL",
    "READ_API",
    "ApiMetrics",
    "ChangeWatcher",
    "ReadApi",
    "ReadRuntime",
    "client_gone",
    "freshness",
    "max_change_id",
    "setup_read_api",
    "wait_for_change",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

COMPAT_PATH = "/api/automl/v1/hpo/experiments"
COMPAT_PREFIX = "/api/automl/"
DEFAULT_QUERY_TIMEOUT_S = 5.0
DEFAULT_READ_THREADS = 2
#: How many SQLite VM instructions run between two checks of a read's time budget. Each check
#: is a Python call, so it takes the GIL back: under load, when the event loop's thread holds
#: it, a wait of up to the switch interval (5 ms). A page of 50 rows is ~3,000 instructions
#: and counts by status ~40,000, so they run unchecked; a long scan is checked every few
#: milliseconds of its work, and stopped within a few of its budget.
BUDGET_CHECK_EVERY = 1_000_000
LONG_POLL_INTERVAL_S = 0.5
MAX_LONG_POLLS = 256
#: Long polls one token may hold at once (the rest of its polls answer at once), so that one
#: caller cannot take every place.
MAX_LONG_POLLS_PER_TOKEN = 32
#: How often a waiting long poll looks whether its client is still connected (aiohttp cancels
#: a handler whose client left only with ``handler_cancellation``, which the daemon and
#: ``serve`` leave off).
CLIENT_CHECK_INTERVAL_S = 1.0
MAX_CACHED_SERIES = 512
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Route policies, by canonical path; every other matched route needs a reading token.
PUBLIC, READYZ, FULL_ACCESS, READ, ADMIN = "public", "readyz", "full", "read", "admin"
ROUTE_POLICIES: Mapping[str, str] = {
    "/healthz": PUBLIC,
    "/openapi.json": PUBLIC,
    "/readyz": READYZ,
    "/metrics": FULL_ACCESS,
    "/v1/sync": ADMIN,
}

#: The config texts: in an experiment's JSON only when asked for (``include_config``).
_CONFIG_FIELDS = ("search_space", "config_ini", "config_yml")


# --- what the API needs from its host --------------------------------------------------------


class HasRegistry(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...


class ReadRuntime(Protocol):
    """What the read API uses of the daemon's :class:`~hpo_sync.runtime.Runtime` (``serve``
    provides the same). Optional, looked up with ``getattr``: ``request_sync(ws, mode)``
    (absent: ``POST /v1/sync`` is 503) and ``health`` (``{ws: WorkspaceHealth}``).
    ``config`` is read afresh on every request (a SIGHUP reload replaces it)."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> Store: ...

    @property
    def metrics(self) -> HasRegistry: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...


# --- metrics ----------------------------------------------------------------------------------


class ApiMetrics:
    """The API's Prometheus metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "hpo_sync_api_requests",
            "Read API requests by route (its path template; 'unmatched' for unknown paths), "
            "method and HTTP status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "hpo_sync_api_request_duration_seconds",
            "Read API request latency by route (long polls included)",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.long_polls = Gauge(
            "hpo_sync_api_long_polls_waiting",
            "GET /v1/changes requests waiting for new changes (wait=N)",
            registry=registry,
        )

        # Label look-ups cost more than the updates: keep each series' child.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, duration_s: float) -> None:
        # A method outside HTTP's own is "other": the method comes from the client, and each
        # new one made a series that stayed for good (aiohttp's pure-Python parser lets any
        # token through), so anyone who could reach the port could grow /metrics at will.
        if method not in _METHODS:
            method = "other"
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route=route, method=method, status=str(status)),
                self.latency.labels(route=route),
            )
            if len(self._children) < MAX_CACHED_SERIES:  # methods come from clients
                self._children[key] = children
        children[0].inc()
        children[1].observe(duration_s)


_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ApiMetrics] = weakref.WeakKeyDictionary()


def api_metrics(registry: CollectorRegistry) -> ApiMetrics:
    """The API metrics of ``registry``, created on first use (a registry refuses a metric
    registered twice, and one daemon may build its app more than once in tests)."""
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = ApiMetrics(registry)
    return found


# --- long-poll support -----------------------------------------------------------------------


class ChangeWatcher:
    """Wakes long-polling requests when ``changes`` grows.

    One shared poller per app, running only while somebody waits: it reads
    ``max(changes.id)`` (an index look-up) every :data:`LONG_POLL_INTERVAL_S`. Polling, not a
    notification from the writer: by default the daemon's sweeps write from another process
    (``sweep_process``), and ``serve`` reads a mirror another process writes.
    """

    def __init__(
        self,
        read_max_id: Callable[[], Awaitable[int]],
        *,
        poll_interval_s: float = LONG_POLL_INTERVAL_S,
        max_waiters: int = MAX_LONG_POLLS,
        max_waiters_per_caller: int = MAX_LONG_POLLS_PER_TOKEN,
        client_check_interval_s: float = CLIENT_CHECK_INTERVAL_S,
        on_waiters: Callable[[int], None] | None = None,
    ) -> None:
        self._read_max_id = read_max_id
        self._poll_interval_s = poll_interval_s
        self._max_waiters = max_waiters
        self._max_per_caller = max_waiters_per_caller
        self._client_check_interval_s = client_check_interval_s
        self._on_waiters = on_waiters
        self._latest = 0
        self._polls = 0  # readings of the max id so far
        self._waiters = 0
        self._by_caller: dict[str, int] = {}
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def waiters(self) -> int:
        return self._waiters

    async def wait_beyond(
        self,
        known_max_id: int,
        timeout_s: float,
        *,
        caller: str | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> int | None:
        """Wait until some change has an id above ``known_max_id``; its max id, or None on
        timeout, as soon as ``gone()`` says the client went away (looked at every
        :data:`CLIENT_CHECK_INTERVAL_S`), or at once when too many requests already wait
        (in all, or of this ``caller``)."""
        if timeout_s <= 0 or self._waiters >= self._max_waiters:
            return None
        if caller is not None and self._by_caller.get(caller, 0) >= self._max_per_caller:
            return None
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._set_waiters(self._waiters + 1)
        if caller is not None:
            self._by_caller[caller] = self._by_caller.get(caller, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="api-change-watcher")
        # Only a reading made after the wait began counts: one made before may be of
        # another file (`serve` follows a copy renamed over the mirror, whose ids can be
        # lower), and every wait would then end at once, the long polls re-reading the
        # mirror in a tight loop until their time ran out.
        start = self._polls
        try:
            async with cond:
                while self._polls == start or self._latest <= known_max_id:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or (gone is not None and gone()):
                        return None
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(remaining, self._client_check_interval_s)):
                            await cond.wait()
                return self._latest
        finally:
            self._set_waiters(self._waiters - 1)
            if caller is not None:
                left = self._by_caller[caller] - 1
                if left:
                    self._by_caller[caller] = left
                else:
                    del self._by_caller[caller]

    def _set_waiters(self, n: int) -> None:
        self._waiters = n
        if self._on_waiters is not None:
            self._on_waiters(n)

    async def _poll(self) -> None:
        while self._waiters > 0:
            await asyncio.sleep(self._poll_interval_s)
            try:
                latest = await self._read_max_id()
            except Exception as exc:  # the mirror unreadable for a moment: keep watching
                log.warning("api.change_watcher_failed", error=str(exc))
                await asyncio.sleep(self._poll_interval_s)
                continue
            # The id as the file has it now, lower too (an older copy renamed over it); the
            # waiters look again after every reading.
            self._latest = latest
            self._polls += 1
            if self._cond is not None:
                async with self._cond:
                    self._cond.notify_all()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


# --- freshness (pure) ------------------------------------------------------------------------


def _last_sync(state: WorkspaceState | None) -> datetime | None:
    if state is None:
        return None
    return _last_sync_of(state.last_full_ok_at, state.last_hot_ok_at)[0]


@functools.lru_cache(maxsize=1024)
def _last_sync_of(full_ok_at: str | None, hot_ok_at: str | None) -> tuple[datetime | None, str]:
    """The later of two stored sweep times, and it as the API shows it (parsed once per
    sweep, not once per request)."""
    times = [t for t in (_when(full_ok_at), _when(hot_ok_at)) if t]
    last = max(times) if times else None
    return last, _iso(last) if last else ""


def _when(value: str | None) -> datetime | None:
    """A stored time; sweep times may carry fractions of a second."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return parse_time(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _iso(dt: datetime) -> str:
    """ISO-8601 UTC, with milliseconds when there are fractions (as_of: once per request)."""
    u = dt.astimezone(UTC)
    return u.isoformat(timespec="milliseconds" if u.microsecond else "seconds")[:-6] + "Z"


def freshness(
    states: Iterable[WorkspaceState], workspaces: Sequence[str], now: datetime
) -> dict[str, Any]:
    """How fresh the data covering ``workspaces`` (all of ``states`` when empty) is: per
    workspace its last successful sync and age, and overall the *oldest* of them (null when
    one never synced) — the data is at least that fresh."""
    by_id = {s.workspace_id: s for s in states}
    covered = list(workspaces) if workspaces else sorted(by_id)
    per: dict[str, Any] = {}
    oldest: tuple[datetime | None, str] = (None, "")
    never = not covered
    for ws in covered:
        state = by_id.get(ws)
        last, shown = (
            _last_sync_of(state.last_full_ok_at, state.last_hot_ok_at) if state else (None, "")
        )
        per[ws] = {"last_sync_at": shown or None, "age_s": _age_s(now, last)}
        if last is None:
            never = True
        elif oldest[0] is None or last < oldest[0]:
            oldest = (last, shown)
    overall, shown = (None, "") if never else oldest
    return {
        "as_of": _iso(now),
        "last_sync_at": shown or None,
        "age_s": _age_s(now, overall),
        "workspaces": per,
    }


def _age_s(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else round(max(0.0, (now - then).total_seconds()), 3)


def freshness_headers(fresh: Mapping[str, Any]) -> dict[str, str]:
    headers = {"X-Last-Sync": fresh["last_sync_at"] or "never"}
    if fresh["age_s"] is not None:
        headers["X-Data-Age"] = str(int(fresh["age_s"]))
    return headers


# --- the API's state ---------------------------------------------------------------------------


@dataclass
class ReadApi:
    """Everything the handlers share; one per application (``app[READ_API]``)."""

    runtime: ReadRuntime
    listen_host: str
    metrics: ApiMetrics
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S
    read_threads: int = DEFAULT_READ_THREADS
    auth: Authenticator = field(default_factory=Authenticator)
    pool: ReadPool = field(init=False)
    watcher: ChangeWatcher = field(init=False)
    _document: bytes | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.pool = ReadPool(self.read_threads, "api-read")
        self.watcher = ChangeWatcher(self._max_change_id, on_waiters=self.metrics.long_polls.set)

    @property
    def store(self) -> Store:
        return self.runtime.store

    async def read(self, work: Callable[[sqlite3.Connection], T], *, snapshot: bool = True) -> T:
        """Run ``work(conn)`` in the read pool, in one snapshot, under the time budget.
        ``snapshot=False``: work that reads with one statement (see :meth:`Store.reader`)."""
        return await self.pool.run(functools.partial(self._run, work, snapshot))

    def _run(self, work: Callable[[sqlite3.Connection], T], snapshot: bool) -> T:
        fired = False
        deadline = time.monotonic() + self.query_timeout_s

        def progress() -> int:
            nonlocal fired
            if time.monotonic() > deadline:
                fired = True
                return 1  # SQLite aborts the statement: "interrupted"
            return 0

        try:
            with self.store.reader(snapshot=snapshot) as conn:
                conn.set_progress_handler(progress, BUDGET_CHECK_EVERY)
                try:
                    return work(conn)
                finally:
                    conn.set_progress_handler(None, 0)
        except (StoreError, sqlite3.Error) as exc:
            if fired:
                raise UnavailableError(
                    f"the query ran longer than {self.query_timeout_s:g}s and was stopped; "
                    "narrow the filters (a workspace, a status, a time range)",
                    code="query_timeout",
                ) from None
            log.error("api.mirror_unreadable", error=str(exc))
            raise UnavailableError(
                f"the mirror cannot be read: {exc}", code="mirror_unavailable"
            ) from None

    async def _max_change_id(self) -> int:
        return await self.read(max_change_id)

    def document(self) -> bytes:
        if self._document is None:
            self._document = json.dumps(build_document(), indent=1).encode()
        return self._document

    async def close(self, _app: web.Application | None = None) -> None:
        await self.watcher.close()
        self.pool.shutdown()


READ_API: web.AppKey[ReadApi] = web.AppKey("hpo_sync.read_api", ReadApi)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("hpo_sync.principal", Principal)
#: The caller as the tokens in force now say (ApiError: no longer allowed): a long poll asks
#: again each time it wakes, since a reload may have revoked or narrowed its token meanwhile.
REAUTHORIZE: web.RequestKey[Callable[[], Principal]] = web.RequestKey("hpo_sync.reauthorize")


# --- setup --------------------------------------------------------------------------------


def setup_read_api(
    app: web.Application,
    runtime: ReadRuntime,
    *,
    listen_host: str | None = None,
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
    read_threads: int = DEFAULT_READ_THREADS,
) -> None:
    """Add the read API's routes and middlewares to ``app`` (idempotent).

    Raises :class:`~hpo_sync.errors.ConfigError` when no tokens are configured and the API
    would listen on a non-loopback address (``listen_host``, default ``[api] listen``).
    """
    if READ_API in app:
        return
    host = listen_host if listen_host is not None else runtime.config.api.host_port[0]
    check_listen_allowed(host, runtime.config.api.tokens)
    api = ReadApi(
        runtime,
        host,
        api_metrics(runtime.metrics.registry),
        query_timeout_s=query_timeout_s,
        read_threads=read_threads,
    )
    app[READ_API] = api
    from .compat import list_hpo_experiments

    r = app.router
    r.add_get("/openapi.json", openapi_document)
    r.add_get("/v1/experiments", list_experiments)
    r.add_get("/v1/experiments/{id}", get_experiment)
    r.add_get("/v1/experiments/{id}/changes", get_experiment_changes)
    r.add_get("/v1/changes", list_changes)
    r.add_get("/v1/workspaces", list_workspaces)
    r.add_post("/v1/sync", request_sync)
    r.add_get(COMPAT_PATH, list_hpo_experiments)
    # Outermost first: metrics see the final status of every request, errors included.
    app.middlewares.extend([metrics_middleware, error_middleware, guard_middleware])
    app.on_cleanup.append(api.close)


# --- middlewares ---------------------------------------------------------------------------


def _route_of(request: web.Request) -> str | None:
    """The path template of the matched route, or None (unknown path, wrong method)."""
    if request.match_info.http_exception is not None:
        return None
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


async def _metrics_route(request: web.Request) -> str:
    """The route label of a request: its path template, also when the method is wrong (a
    405 comes from a known path); ``unmatched`` only for a path no route has."""
    route = _route_of(request)
    if route is not None:
        return route
    exc = request.match_info.http_exception
    if exc is not None and exc.status == 405:
        for resource in request.app.router.resources():
            _, allowed = await resource.resolve(request)
            if allowed:  # the path is this resource's; the method is not
                return resource.canonical
    return "unmatched"


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    api = request.app[READ_API]
    started = time.perf_counter()
    route = await _metrics_route(request)
    status = 500
    try:
        response = await handler(request)
        # A long poll whose client left still returns its (undeliverable) answer.
        status = response.status if not client_gone(request) else 499
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away, or the server is stopping
        raise
    finally:
        api.metrics.observe(route, request.method, status, time.perf_counter() - started)


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    upstream = request.path.startswith(COMPAT_PREFIX)
    try:
        return await handler(request)
    except ApiError as exc:
        if upstream:
            return upstream_error_response(
                exc.status, exc.upstream_code, exc.message, headers=exc.headers
            )
        return error_response(
            exc.status, exc.code, exc.message, param=exc.param, headers=exc.headers
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        if exc.status == 404:
            message = f"no route {request.path}; see /openapi.json"
        elif exc.status == 405:
            message = f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow')}"
        else:
            message = exc.reason
        code = _STATUS_CODES.get(exc.status, "http_error")
        if upstream:
            # PAI's gateway (and the simulator) call an API that is not there, by path or
            # method, InvalidAction.NotFound; a tool reading the code sees the same here.
            if exc.status in (404, 405):
                code = "InvalidAction.NotFound"
            return upstream_error_response(exc.status, code, message, headers=headers)
        return error_response(exc.status, code, message, headers=headers)
    except Exception:
        log.exception("api.unhandled_error", method=request.method, path=request.path)
        if upstream:
            return upstream_error_response(500, "InternalError", "internal error")
        return error_response(500, "internal_error", "internal error; see the daemon's log")


class PayloadTooLargeError(ApiError):
    """A request body over :data:`MAX_BODY_BYTES` (413)."""

    status = 413
    code = "payload_too_large"
    upstream_code = "InvalidParameter.BodyTooLarge"


@web.middleware
async def guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Size limits, then who is asking, by route policy."""
    length = request.content_length
    # (CONNECT has no body: aiohttp takes the rest of the connection for one; the router
    # answers it as any other method and target it does not serve)
    if request.method == "CONNECT":
        return await _guard(request, handler)
    if (length is not None and length > MAX_BODY_BYTES) or (length is None and request.body_exists):
        raise PayloadTooLargeError(
            f"request bodies over {MAX_BODY_BYTES} bytes (or of unknown length) are refused; "
            "no route reads a body: pass parameters in the query string"
        )
    return await _guard(request, handler)


def undecodable_parameter(raw_query: str) -> tuple[str, str] | None:
    """The name of the first parameter of ``raw_query`` (percent-encoded, as sent) whose
    bytes are not UTF-8 or that holds a ``%`` not followed by two hex digits, and what is
    wrong with it; or None. aiohttp decodes such bytes to U+FFFD, and takes a malformed
    escape as it stands, which a filter would then go and look for: ``name=%FF`` or
    ``name=%zz`` would be a search, not the mistake it is."""
    if "%" not in raw_query:
        return None
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        for text in (name, value):
            if "%" not in text:
                continue
            if _MALFORMED_ESCAPE.search(text):
                problem = "has a malformed percent-escape (a % not followed by two hex digits)"
                return unquote(name.replace("+", " "), errors="replace"), problem
            try:
                unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                return unquote(name.replace("+", " "), errors="replace"), "is not valid UTF-8"
    return None


_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if len(request.query_string) > MAX_QUERY_STRING:
        raise BadParameterError("query", f"longer than {MAX_QUERY_STRING} characters")
    undecodable = undecodable_parameter(request.rel_url.raw_query_string)
    if undecodable is not None:
        raise BadParameterError(*undecodable)
    route = _route_of(request)
    if route is None:
        return await handler(request)  # the router's 404 / 405
    policy = ROUTE_POLICIES.get(route, READ)
    if policy == PUBLIC:
        return await handler(request)
    api = request.app[READ_API]

    def resolve() -> Principal:
        presented = presented_token(
            request.headers, request.query, allow_query=request.path.startswith(COMPAT_PREFIX)
        )
        return api.auth.resolve(
            api.runtime.config.api.tokens,  # those in force at each call (see REAUTHORIZE)
            presented,
            listen_host=api.listen_host,
            peer=request.remote,
            host_header=request.headers.get("Host"),
        )

    if policy == READYZ:
        try:
            principal: Principal | None = resolve()
        except ApiError:
            principal = None
        response = await handler(request)
        if principal is not None and principal.full_access:
            return response
        return _reduced_readiness(response)
    principal = resolve()
    if policy == FULL_ACCESS and not principal.full_access:
        raise ForbiddenError(
            f"{route} shows every workspace: it needs a token without a workspace limit",
            code="full_access_required",
        )
    if policy == ADMIN and not principal.admin:
        why = (
            "an admin token (admin = true in [[api.tokens]])"
            if principal.by_token
            else "an admin token; without [[api.tokens]] admin routes are disabled"
        )
        raise ForbiddenError(f"{route} needs {why}", code="admin_required")
    request[PRINCIPAL] = principal
    request[REAUTHORIZE] = resolve
    return await handler(request)


def _reduced_readiness(response: web.StreamResponse) -> web.StreamResponse:
    """``/readyz`` for callers who may not see every workspace: the verdict only."""
    if not isinstance(response, web.Response) or response.body is None:
        return response
    try:
        body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return response
    if not isinstance(body, dict):
        return response
    reduced = {k: body[k] for k in ("ready", "mirror") if k in body}
    return web.json_response(reduced, status=response.status)


# --- serialisation (pure) ----------------------------------------------------------------


def change_value(field_name: str, value: str | None) -> Any:
    """A stored change value as the API (and the web UI) shows it: ``TrialStatus`` as a
    mapping, ``Deleted`` as a bool, ``Status`` as text."""
    if value is None:
        return None
    if field_name == "Deleted":
        return value == "true"
    if field_name == "TrialStatus":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def change_json(row: Sequence[Any]) -> dict[str, Any]:
    id_, exp_id, name, ws, field_name, old, new, observed_at, run_id, baseline = row
    return {
        "id": id_,
        "experiment_id": exp_id,
        "experiment_name": name,
        "workspace_id": ws,
        "field": field_name,
        "old_value": change_value(field_name, old),
        "new_value": change_value(field_name, new),
        "observed_at": observed_at,
        "sync_run_id": run_id,
        "baseline": bool(baseline),
    }


def filter_identity(f: ExperimentFilter) -> dict[str, Any]:
    """The filters as canonical data, for the cursor's hash (order-insensitive)."""
    return {
        "workspaces": sorted(set(f.workspaces)),
        "statuses": sorted(set(f.statuses)),
        "name": f.name,
        "creator": f.creator,
        "tags": sorted({(k, v) for k, v in f.tags}, key=lambda kv: (kv[0], kv[1] is None, kv[1])),
        "created_after": f.created_after,
        "created_before": f.created_before,
        "modified_after": f.modified_after,
        "include_deleted": f.include_deleted,
    }


JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def _json_response(
    body: dict[str, Any], fresh: Mapping[str, Any], *, status: int = 200
) -> web.Response:
    body["freshness"] = fresh
    return _bytes_response(orjson.dumps(body), fresh, status=status)


def _bytes_response(body: bytes, fresh: Mapping[str, Any], *, status: int = 200) -> web.Response:
    headers = freshness_headers(fresh)
    headers["Content-Type"] = JSON_CONTENT_TYPE
    return web.Response(body=body, status=status, headers=headers)


def _spliced(key: str, items: bytes, rest: Mapping[str, Any]) -> bytes:
    """``{key: [items], **rest}`` as JSON, where ``items`` is already JSON objects joined by
    commas (made by SQLite: see :func:`select_experiments`), never parsed again."""
    tail = orjson.dumps(rest)  # b'{...}': its members follow the array
    sep = b"," if len(tail) > 2 else b""
    return b"{" + orjson.dumps(key) + b":[" + items + b"]" + sep + tail[1:]


# --- SQL (runs in the read pool) -----------------------------------------------------------


_CHANGE_SELECT = (
    "SELECT c.id, c.experiment_id, e.name, c.workspace_id, c.field, c.old_value,"
    " c.new_value, c.observed_at, c.sync_run_id, c.baseline"
    " FROM changes c LEFT JOIN experiments e ON e.experiment_id = c.experiment_id"
)


def max_change_id(conn: sqlite3.Connection, workspaces: Sequence[str] = ()) -> int:
    """The newest change id (0: none) of ``workspaces``, or of all when empty: one index
    look-up per workspace (``changes_workspace``)."""
    if not workspaces:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0])
    rows = ",".join(["(?)"] * len(workspaces))
    sql = (
        "SELECT coalesce(max((SELECT max(id) FROM changes WHERE workspace_id = w.column1)), 0)"
        f" FROM (VALUES {rows}) AS w"
    )
    return int(conn.execute(sql, list(workspaces)).fetchone()[0])


def select_changes(
    conn: sqlite3.Connection,
    *,
    after: int,
    limit: int,
    workspaces: Sequence[str] = (),
    experiment_id: str | None = None,
    field_name: str | None = None,
) -> list[sqlite3.Row]:
    where = ["c.id > ?"]
    params: list[Any] = [after]
    if workspaces:
        where.append(f"c.workspace_id IN ({','.join('?' * len(workspaces))})")
        params.extend(workspaces)
    if experiment_id is not None:
        where.append("c.experiment_id = ?")
        params.append(experiment_id)
    if field_name is not None:
        where.append("c.field = ?")
        params.append(field_name)
    params.append(limit)
    sql = f"{_CHANGE_SELECT} WHERE {' AND '.join(where)} ORDER BY c.id LIMIT ?"
    return conn.execute(sql, params).fetchall()


# How the API shows an experiment, as an SQL expression of one JSON object: the ``api_json``
# column (schema v4), which SQLite writes with the row — every column but the config texts
# and ``raw``, the JSON columns decoded, ``deleted`` a boolean — and, when the config texts
# are asked for, that object with them appended as three more members. As a BLOB: the UTF-8
# bytes as SQLite stored them, never decoded into a str (and ``length()`` of a BLOB is its
# size in bytes, which cuts a page's extra row).
_EXPERIMENT_JSON = {
    False: "CAST(api_json AS BLOB)",
    True: "CAST(substr(api_json, 1, length(api_json) - 1)"
    + "".join(f" || ',\"{c}\":' || json_quote({c})" for c in _CONFIG_FIELDS)
    + " || '}' AS BLOB)",
}


def _experiment_json(include_config: bool) -> str:
    """The SQL expression of an experiment as the API shows it, one JSON object (UTF-8).

    SQLite wrote it with the row (or appends the config texts while the statement runs, with
    the GIL released): a page costs no decode of JSON columns and no encode of any field.
    """
    return _EXPERIMENT_JSON[include_config]


@dataclass(frozen=True, slots=True)
class JsonPage:
    """A page of experiments as JSON (UTF-8): ``items`` is the objects joined by commas, the
    inside of an array; ``last_key`` (the last row's sort key, only when there is a next
    page) makes the next cursor."""

    items: bytes
    last_key: PageKey | None
    has_more: bool
    #: Every workspace's sync state, read by the same statement (``with_states``).
    states: list[WorkspaceState] | None = None

    def rows(self) -> list[Any]:
        """The experiments, decoded."""
        return orjson.loads(b"[" + self.items + b"]")  # type: ignore[no-any-return]


def select_experiments(
    conn: sqlite3.Connection,
    filters: ExperimentFilter,
    sort: SortOrder,
    limit: int,
    after_key: PageKey | None,
    *,
    include_config: bool,
    with_states: bool = False,
) -> JsonPage:
    """:meth:`Store.list_experiments`'s page (same WHERE, same keyset, same order:
    :func:`~hpo_sync.store.page_sql`) with only the columns the API shows, as JSON: the
    stored ``raw`` object (the whole upstream record, config texts included) is never read.

    The page comes back as one row, made by one ``sqlite3_step``: the objects already
    joined, and each row's size and sort key. Python's sqlite3 lets go of the GIL around
    every step and must take it back after, and under load the event loop's thread holds
    it: a step's wait for it can last up to the interpreter's switch interval (5 ms), so a
    page fetched row by row (51 steps) spent most of its time waiting for the GIL, not in
    SQLite (measured: bench/README.md). The aggregate reads the page's rows in the order the
    ordered, limited subquery yields them (SQLite runs such a subquery as a co-routine and
    does not reorder it; tests compare every sort with :meth:`Store.list_experiments`).
    ``length()`` of a BLOB is its size in bytes, so the extra row is cut off by size.
    ``with_states`` adds every workspace's sync state (``page.states``), from the same
    statement: the freshness of a page in the page's own snapshot, with no transaction.
    """
    column, _ = sort_column(sort)
    select = f"{_experiment_json(include_config)} AS obj, {column} AS k, experiment_id AS id"
    inner, params = page_sql(select, filters, sort, limit + 1, after_key)
    states_sql = f", {WORKSPACE_STATES_SQL}" if with_states else ""
    items, meta, *more = conn.execute(
        "SELECT CAST(coalesce(group_concat(obj, ','), '') AS BLOB),"
        f" json_group_array(json_array(length(obj), k, id)){states_sql} FROM ({inner})",
        params,
    ).fetchone()
    states = decode_workspace_states(more[0]) if with_states else None
    keys: list[list[Any]] = orjson.loads(meta)  # [bytes of the object, sort key, id] a row
    if len(keys) <= limit:
        return JsonPage(items, None, False, states)
    # One row more than the page: it says there is a next page, and is cut off again.
    extra = keys[limit][0]
    last_key = (keys[limit - 1][1], keys[limit - 1][2])
    return JsonPage(items[: -extra - 1], last_key, True, states)


def select_experiment(
    conn: sqlite3.Connection, experiment_id: str, *, include_config: bool
) -> tuple[bytes, str, list[WorkspaceState]] | None:
    """``(the experiment as JSON, its workspace, every workspace's sync state)`` from one
    statement (one snapshot, no transaction: see :func:`select_experiments`), or None."""
    row = conn.execute(
        f"SELECT {_experiment_json(include_config)}, workspace_id, {WORKSPACE_STATES_SQL}"
        " FROM experiments WHERE experiment_id = ?",
        (experiment_id,),
    ).fetchone()
    return (row[0], row[1], decode_workspace_states(row[2])) if row is not None else None


def count_by_status(conn: sqlite3.Connection, f: ExperimentFilter) -> dict[str, int]:
    """Counts by status of everything ``f`` matches: the very WHERE clause the listing uses."""
    sql, params = count_by_status_sql(f)
    return {("null" if s is None else s): n for s, n in conn.execute(sql, params)}


# --- handlers ---------------------------------------------------------------------------------


async def openapi_document(request: web.Request) -> web.Response:
    parse_params((), request.query)
    body = request.app[READ_API].document()
    return web.Response(body=body, content_type="application/json")


@dataclass(frozen=True, slots=True)
class ListRequest:
    """A parsed ``/v1/experiments`` query (``EXPERIMENTS_PARAMS``) over the workspaces a
    caller may see: the filters, the order, the page size and where the page starts.
    The web UI's experiment list uses it too, so both read the same query the same way."""

    filters: ExperimentFilter
    sort: SortOrder
    limit: int
    #: :func:`~hpo_sync.api.cursor.filters_hash` of the filters, bound into cursors.
    fhash: str
    #: where the page starts: after the row of this cursor (checked for this query)
    cursor: Cursor | None

    @classmethod
    def of(cls, q: Mapping[str, Any], scope: tuple[str, ...]) -> ListRequest:
        """From ``parse_params(EXPERIMENTS_PARAMS, …)``'s result; a cursor that is
        malformed or was made for another sort or other filters is a
        :class:`BadParameterError` on ``cursor``."""
        filters = ExperimentFilter(
            workspaces=scope,
            statuses=tuple(q["status"]),
            name=q["name"],
            creator=q["creator"],
            tags=tuple(q["tag"]),
            tags_as_text=True,
            created_after=q["created_after"],
            created_before=q["created_before"],
            modified_after=q["modified_after"],
            include_deleted=q["include_deleted"],
        )
        sort: SortOrder = q["sort"]
        fhash = filters_hash(filter_identity(filters))
        cursor: Cursor | None = None
        if q["cursor"] is not None:
            try:
                cursor = Cursor.decode(q["cursor"])
                cursor.check(sort, fhash)
            except CursorError as exc:
                raise BadParameterError("cursor", str(exc)) from None
        return cls(filters, sort, q["limit"], fhash, cursor)

    def after_key(self, conn: sqlite3.Connection) -> PageKey | None:
        """The key the page starts after (looked up on ``conn`` for a cursor that carries
        its row by reference); a stale cursor is a :class:`BadParameterError`."""
        if self.cursor is None:
            return None
        try:
            return self.cursor.resolve(
                conn, sort_column(self.sort)[0], tuple(self.filters.workspaces)
            )
        except CursorError as exc:
            raise BadParameterError("cursor", str(exc)) from None

    def next_cursor(self, conn: sqlite3.Connection, page: JsonPage) -> str | None:
        """The cursor of the page after ``page`` (read on ``conn``), if there is one."""
        if not page.has_more or page.last_key is None:
            return None
        return Cursor.after(conn, self.sort, self.fhash, page.last_key).encode()


async def list_experiments(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    q = parse_params(EXPERIMENTS_PARAMS, request.query)
    scope = principal.scope(q["workspace"])
    lr = ListRequest.of(q, scope)
    filters, sort, limit = lr.filters, lr.sort, lr.limit
    clock = api.runtime.clock

    # The response is made in the read pool too: under load the event loop's thread is the
    # bottleneck, and the cursor, the freshness and the body are CPU work it need not do.
    def work(conn: sqlite3.Connection) -> web.Response:
        page = select_experiments(
            conn,
            filters,
            sort,
            limit,
            lr.after_key(conn),
            include_config=q["include_config"],
            with_states=True,
        )
        counts = count_by_status(conn, filters) if q["count"] else None
        assert page.states is not None
        rest: dict[str, Any] = {
            "next_cursor": lr.next_cursor(conn, page),
            "has_more": page.has_more,
        }
        if counts is not None:
            rest["count"] = {"total": sum(counts.values()), "by_status": counts}
        fresh = rest["freshness"] = freshness(page.states, scope, clock())
        return _bytes_response(_spliced("experiments", page.items, rest), fresh)

    # One statement, unless the counts are asked for: then a snapshot holds the two.
    return await api.read(work, snapshot=q["count"])


def _experiment_id(request: web.Request) -> str:
    # No length limit of its own: upstream bounds no id, and every id the mirror holds must
    # be reachable (the request line's limit, 8 KiB, bounds what can be asked).
    return request.match_info["id"]


def _not_found(exp_id: str, principal: Principal) -> NotFoundError:
    where = "" if principal.full_access else " in the workspaces this token may read"
    shown = repr(exp_id) if len(exp_id) <= 100 else f"{exp_id[:100]!r}…"
    return NotFoundError(
        f"the mirror holds no experiment {shown}{where}", code="experiment_not_found"
    )


async def get_experiment(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    q = parse_params(EXPERIMENT_PARAMS, request.query)
    exp_id = _experiment_id(request)
    clock = api.runtime.clock

    def work(conn: sqlite3.Connection) -> web.Response:  # in the pool: see list_experiments
        found = select_experiment(conn, exp_id, include_config=q["include_config"])
        if found is None or not principal.can_see(found[1]):
            raise _not_found(exp_id, principal)
        experiment, ws, states = found
        fresh = freshness(states, [ws], clock())
        body = b'{"experiment":' + experiment + b',"freshness":' + orjson.dumps(fresh) + b"}"
        return _bytes_response(body, fresh)

    return await api.read(work, snapshot=False)  # one statement


async def get_experiment_changes(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    q = parse_params(EXPERIMENT_CHANGES_PARAMS, request.query)
    exp_id = _experiment_id(request)
    store = api.store

    def work(
        conn: sqlite3.Connection,
    ) -> tuple[str | None, list[sqlite3.Row], list[WorkspaceState]]:
        found = conn.execute(
            "SELECT workspace_id FROM experiments WHERE experiment_id = ?", (exp_id,)
        ).fetchone()
        if found is None or not principal.can_see(found[0]):
            return None, [], []
        rows = select_changes(
            conn,
            after=q["after"],
            limit=q["limit"] + 1,
            experiment_id=exp_id,
            field_name=q["field"],
        )
        return found[0], rows, store.workspaces()

    ws, rows, states = await api.read(work)
    if ws is None:
        raise _not_found(exp_id, principal)
    has_more = len(rows) > q["limit"]
    rows = rows[: q["limit"]]
    fresh = freshness(states, [ws], api.runtime.clock())
    body = {
        "changes": [change_json(r) for r in rows],
        "next_after": rows[-1][0] if rows else q["after"],
        "has_more": has_more,
    }
    return _json_response(body, fresh)


async def list_changes(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    q = parse_params(CHANGES_PARAMS, request.query)
    scope = principal.scope(q["workspace"])
    visible = principal.scope([])
    after: int = q["after"]
    limit: int = q["limit"]
    store = api.store

    def work(
        conn: sqlite3.Connection,
    ) -> tuple[list[sqlite3.Row], int, int, list[WorkspaceState]]:
        rows = select_changes(
            conn, after=after, limit=limit + 1, workspaces=scope, field_name=q["field"]
        )
        # The newest id of all (what the watcher compares with: it watches every workspace)
        # and of those this caller may see (its cursor: no other workspace's activity).
        max_id = max_change_id(conn)
        return rows, max_id, max_change_id(conn, visible) if visible else max_id, store.workspaces()

    rows, max_id, seen_id, states = await api.read(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + q["wait"]
    while not rows and (remaining := deadline - loop.time()) > 0:
        woke = await wait_for_change(request, max(max_id, after), remaining)
        # Its token as it stands now, woken or timed out: a reload meanwhile may have
        # revoked it (a 401, not the changes committed since, nor an empty 200) or narrowed
        # it (read reads the new scope).
        principal = request[REAUTHORIZE]()
        scope, visible = principal.scope(q["workspace"]), principal.scope([])
        rows, max_id, seen_id, states = await api.read(work)
        if not woke:
            break
    has_more = len(rows) > limit
    rows = rows[:limit]
    # With no rows: nothing matched up to seen_id in this snapshot, and ids are assigned in
    # commit order (one writer), so the next poll may start there.
    next_after = rows[-1][0] if rows else max(after, seen_id)
    fresh = freshness(states, scope, api.runtime.clock())
    body = {
        "changes": [change_json(r) for r in rows],
        "next_after": next_after,
        "has_more": has_more,
    }
    return _json_response(body, fresh)


def client_gone(request: web.BaseRequest) -> bool:
    """Has the client of ``request`` closed its connection?"""
    transport = request.transport
    return transport is None or transport.is_closing()


def long_poll_caller(principal: Principal) -> str | None:
    """Whose long polls count together against :data:`MAX_LONG_POLLS_PER_TOKEN`: a token's
    (None in the open loopback mode, where every caller is the same anonymous one)."""
    return principal.name if principal.by_token else None


async def wait_for_change(request: web.Request, beyond: int, timeout_s: float) -> bool:
    """One wait of a long poll (the change feed's, and the UI's feed poll): True once some
    change has an id above ``beyond``; False on timeout, when the client went away, or when
    too many polls (of this token, or in all) already wait."""
    newer = await request.app[READ_API].watcher.wait_beyond(
        beyond,
        timeout_s,
        caller=long_poll_caller(request[PRINCIPAL]),
        gone=functools.partial(client_gone, request),
    )
    return newer is not None


async def list_workspaces(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    parse_params(WORKSPACES_PARAMS, request.query)
    store = api.store

    def work(
        conn: sqlite3.Connection,
    ) -> tuple[list[WorkspaceState], list[tuple[str, str | None, int, int]]]:
        return store.workspaces(), status_counts(conn)

    states, counts = await api.read(work)
    config = api.runtime.config
    configured = set(config.workspace_ids())
    labels = {w.id: w.label for w in config.workspaces}
    health: Mapping[str, Any] = getattr(api.runtime, "health", None) or {}
    now = api.runtime.clock()
    by_id = {s.workspace_id: s for s in states}
    ids = sorted(w for w in set(by_id) | configured if principal.can_see(w))
    per_status: dict[str, dict[str, int]] = {w: {} for w in ids}
    deleted: dict[str, int] = dict.fromkeys(ids, 0)
    for ws, status, live, dead in counts:
        if ws not in per_status:
            continue
        deleted[ws] += dead
        if live:
            per_status[ws]["null" if status is None else status] = live
    out = []
    for ws in ids:
        state = by_id.get(ws)
        last = _last_sync(state)
        err_at = _when(state.last_error_at) if state else None
        h = health.get(ws)
        # The daemon's own count of failures in a row: a sweep failing because the mirror
        # cannot be written (a full disk) records its error nowhere but there.
        live_error = (
            getattr(h, "last_error", None) if getattr(h, "consecutive_failures", 0) else None
        )
        live_at = getattr(h, "last_sweep_at", None) if live_error else None
        out.append(
            {
                "workspace_id": ws,
                "label": (state.label if state and state.label else None) or labels.get(ws),
                "configured": ws in configured,
                "experiments": sum(per_status[ws].values()),
                "deleted": deleted[ws],
                "counts_by_status": dict(sorted(per_status[ws].items())),
                "baseline_at": state.baseline_at if state else None,
                "last_full_sync_at": state.last_full_ok_at if state else None,
                "last_hot_sync_at": state.last_hot_ok_at if state else None,
                "last_sync_at": _iso(last) if last else None,
                "data_age_s": _age_s(now, last),
                "last_error": live_error or (state.last_error if state else None),
                "last_error_at": (
                    _iso(live_at) if live_at else (state.last_error_at if state else None)
                ),
                "failing": bool(live_error)
                or (err_at is not None and (last is None or err_at > last)),
                "sweeping": getattr(h, "sweeping", None),
                "consecutive_failures": getattr(h, "consecutive_failures", None),
            }
        )
    fresh = freshness(states, ids, now)
    return _json_response({"workspaces": out}, fresh)


async def request_sync(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    q = parse_params(SYNC_PARAMS, request.query)
    ws: str = q["workspace"]
    mode: str = q["mode"]
    principal.scope([ws])
    requester = getattr(api.runtime, "request_sync", None)
    if requester is None:
        raise UnavailableError(
            "this instance only reads the mirror (hpo-sync serve); sync from the daemon",
            code="read_only",
        )
    try:
        future = requester(ws, mode)
    except KeyError:
        raise NotFoundError(
            f"workspace {ws!r} is not configured", code="unknown_workspace"
        ) from None
    except ShuttingDownError as exc:
        raise UnavailableError(str(exc), code="shutting_down") from None
    if isinstance(future, asyncio.Future):
        future.add_done_callback(_consume)
    log.info("api.sync_requested", workspace=ws, mode=mode, token=principal.name)
    store = api.store

    def work(_conn: sqlite3.Connection) -> list[WorkspaceState]:
        return store.workspaces()

    states = await api.read(work)
    fresh = freshness(states, [ws], api.runtime.clock())
    return _json_response({"queued": {"workspace": ws, "mode": mode}}, fresh, status=202)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a requested sweep's outcome so a failure is not reported as unretrieved
    (the daemon records and logs sweeps itself)."""
    if not future.cancelled():
        future.exception()
