"""The web UI's routes, its sign-in and its guard (see :mod:`hpo_sync.web` for the design).

Every ``/ui`` request goes through :func:`ui_middleware`, which sits right inside the read
API's metrics middleware: UI requests are counted like API requests, but answered as HTML
pages (never the API's JSON errors) and authenticated by the session cookie instead of a
bearer token. Pages read the mirror through the read API's pool (:meth:`ReadApi.read`: one
snapshot per page, the same time budget) with the API's own parameter tables and queries.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDict, MultiMapping

from .. import __version__
from ..api.auth import Principal
from ..api.errors import ApiError, BadParameterError, NotFoundError
from ..api.openapi import (
    CHANGE_FIELDS,
    CHANGES_PARAMS,
    EXPERIMENTS_PARAMS,
    SORTS,
    parse_params,
)
from ..api.read import (
    PRINCIPAL,
    READ_API,
    ListRequest,
    ReadRuntime,
    change_json,
    change_value,
    count_by_status,
    freshness,
    max_change_id,
    select_changes,
    select_experiment,
    select_experiments,
    undecodable_parameter,
    wait_for_change,
)
from ..config import EXPERIMENT_STATUSES
from ..store import WorkspaceState
from . import charts, queries
from .sessions import SESSION_MAX_AGE_S, SessionStore, current_token

__all__ = ["COOKIE", "CSP", "WEB_UI", "WebUi", "setup_routes", "ui_middleware"]

log = structlog.get_logger(__name__)

COOKIE = "hpo_sync_session"
COOKIE_PATH = "/ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: Days the overview's chart covers (today included).
CHART_DAYS = 14
#: A feed poll waits at most this long for a new change (below common proxy timeouts).
FEED_WAIT_S = 25
MAX_BODY_BYTES = 4096
MAX_QUERY_STRING = 4096
#: A failed sign-in answers after this delay (slows down guessing; tokens are long anyway).
SIGN_IN_FAILURE_DELAY_S = 0.3
TRIAL_ORDER = (
    "WAITING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "EARLY_STOPPED",
    "USER_CANCELED",
    "SYS_CANCELED",
    "UNKNOWN",
)
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript"}
LIMITS = (25, 50, 100, 200, 500)

# Routes reachable without a session.
_PUBLIC = frozenset({"/", "/ui", "/ui/login", "/ui/static/{name}"})
_POLL = "/ui/changes/poll"


@dataclass
class WebUi:
    """What the UI's handlers share; one per application (``app[WEB_UI]``)."""

    runtime: ReadRuntime
    templates: jinja2.Environment
    static: dict[str, tuple[bytes, str]]
    sessions: SessionStore = field(default_factory=SessionStore)
    #: Monotonic seconds, for session expiry (tests replace it).
    monotonic: Callable[[], float] = time.monotonic
    sign_in_failure_delay_s: float = SIGN_IN_FAILURE_DELAY_S


WEB_UI: web.AppKey[WebUi] = web.AppKey("hpo_sync.web_ui", WebUi)


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("hpo_sync.web", "templates"),
        autoescape=True,  # every upstream string is user input
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = human_age
    env.filters["when"] = short_time
    env.filters["status_class"] = status_class
    env.filters["trials"] = trials_text
    env.filters["change_value"] = change_value_text
    env.filters["segment"] = path_segment
    env.globals["statuses"] = EXPERIMENT_STATUSES
    env.globals["version"] = __version__
    return env


def load_static() -> dict[str, tuple[bytes, str]]:
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("hpo_sync.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return out


# --- filters (pure) ------------------------------------------------------------------------


def human_age(seconds: float | None) -> str:
    """``42 s``, ``5 min``, ``3 h``, ``2 d``; ``never`` for None."""
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{s // 60} min"
    if s < 36 * 3600:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def short_time(value: str | None) -> str:
    """A stored ISO time as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``—``."""
    if not value:
        return "—"
    return value.replace("T", " ").removesuffix("Z")[:19]


def status_class(status: str | None) -> str:
    """A CSS class for a status: ``st-running`` … (``st-other`` for anything unknown)."""
    if status in EXPERIMENT_STATUSES or status in TRIAL_ORDER:
        return "st-" + str(status).lower().replace("_", "-")
    return "st-other"


def trials_text(exp: Mapping[str, Any]) -> str:
    count = exp.get("trial_count")
    failed = (exp.get("trial_status") or {}).get("FAILED", 0)
    if count is None:
        return "—"
    return f"{count} ({failed} failed)" if failed else str(count)


def change_value_text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return "deleted" if value else "not deleted"
    return str(value)


def path_segment(value: Any) -> str:
    """A value quoted as one URL path segment (``/`` included)."""
    return quote(str(value), safe="")


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of the UI, never another site."""
    if not value or not value.startswith("/ui") or value.startswith("//") or "\\" in value:
        return "/ui/"
    if not value.isprintable() or not value.isascii():  # CR/LF: no header can carry it
        return "/ui/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/ui/"
    return value


def same_origin(headers: Mapping[str, str], host: str | None) -> bool:
    """Is a state-changing request from our own pages? Browsers send ``Sec-Fetch-Site``
    (which no page can forge) with every request: it must say ``same-origin``. Without it,
    ``Origin`` must name this host. (``Origin`` alone is not enough: under
    ``Referrer-Policy: no-referrer`` Chromium sends ``Origin: null`` with form posts.)"""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("Origin")
    if not origin or origin == "null" or host is None:
        return False
    return urlsplit(origin).netloc == host


# --- the guard -----------------------------------------------------------------------------


def is_ui_path(path: str) -> bool:
    return path in ("/", "/ui") or path.startswith("/ui/")


@web.middleware
async def ui_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not is_ui_path(request.path):
        return await handler(request)
    try:
        response = await _dispatch(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(SECURITY_HEADERS)
            raise
        response = error_page(request, exc.status, exc.reason)
    except ApiError as exc:
        response = error_page(request, exc.status, exc.message)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("ui.unhandled_error", method=request.method, path=request.path)
        response = error_page(request, 500, "Something went wrong; see the daemon's log.")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.match_info.route.resource is None or not request.path.startswith("/ui/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _dispatch(request: web.Request) -> web.StreamResponse:
    ui = request.app[WEB_UI]
    length = request.content_length
    if (length is not None and length > MAX_BODY_BYTES) or (length is None and request.body_exists):
        return error_page(request, 413, f"Request bodies over {MAX_BODY_BYTES} bytes are refused.")
    if len(request.query_string) > MAX_QUERY_STRING:
        return error_page(request, 400, f"query: longer than {MAX_QUERY_STRING} characters")
    undecodable = undecodable_parameter(request.rel_url.raw_query_string)
    if undecodable is not None:  # else a filter for U+FFFD, as the read API says too
        return error_page(request, 400, f"{undecodable[0]}: {undecodable[1]}")
    match = request.match_info
    resource = match.route.resource if match.http_exception is None else None
    route = resource.canonical if resource is not None else None
    if route in _PUBLIC:
        return await match.handler(request)
    principal = _principal(request, ui)
    if principal is None:
        if route == _POLL:
            return web.json_response(_SIGNED_OUT, status=401)
        target = request.path_qs if request.method == "GET" else "/ui/"
        return redirect(str(request.app.router["ui_login"].url_for().with_query(next=target)))
    request[PRINCIPAL] = principal
    if match.http_exception is not None:
        exc = match.http_exception
        if exc.status == 404:
            return error_page(request, 404, f"There is no page {request.path}.")
        return error_page(request, exc.status, exc.reason, headers=exc.headers)
    return await match.handler(request)


#: The feed poll's answer once its session has ended (the page then offers to sign in).
_SIGNED_OUT = {"error": "signed_out", "message": "your session ended; sign in again"}


def _principal(request: web.Request, ui: WebUi) -> Principal | None:
    """The signed-in caller (None: not signed in). Without tokens configured, the API's
    open loopback rules apply and no sign-in exists (ApiError when they refuse)."""
    api = request.app[READ_API]
    tokens = api.runtime.config.api.tokens
    if not tokens:
        return api.auth.resolve(
            tokens,
            None,
            listen_host=api.listen_host,
            peer=request.remote,
            host_header=request.headers.get("Host"),
        )
    session = ui.sessions.get(request.cookies.get(COOKIE), ui.monotonic())
    if session is None:
        return None
    token = current_token(tokens, session.token_digest)
    if token is None:  # removed (or changed) by a reload: the session ends with it
        ui.sessions.delete(session.id)
        return None
    return Principal.from_token(token)


# --- rendering -----------------------------------------------------------------------------


def render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> web.Response:
    ui = request.app[WEB_UI]
    principal = request.get(PRINCIPAL)
    tokens = request.app[READ_API].runtime.config.api.tokens
    text = ui.templates.get_template(template).render(
        principal=principal,
        signed_in=principal is not None and principal.by_token,
        open_mode=not tokens,
        path=request.path,
        **context,
    )
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=dict(headers or {}),
    )


def redirect(location: str, *, status: int = 303) -> web.Response:
    """A redirect (303 See Other by default: after a POST, and to canonical URLs)."""
    return web.Response(status=status, headers={"Location": location})


def error_page(
    request: web.Request,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    titles = {
        400: "Bad request",
        401: "Not signed in",
        403: "Forbidden",
        404: "Not found",
        405: "Method not allowed",
        413: "Request too large",
        503: "Unavailable",
    }
    keep = {k: v for k, v in (headers or {}).items() if k.lower() == "allow"}
    return render(
        request,
        "error.html",
        status=status,
        headers=keep,
        title=titles.get(status, "Error"),
        status_code=status,
        message=message,
    )


# --- handlers: sign-in ---------------------------------------------------------------------


async def root(request: web.Request) -> web.StreamResponse:
    return redirect("/ui/", status=302)


async def static(request: web.Request) -> web.StreamResponse:
    found = request.app[WEB_UI].static.get(request.match_info["name"])
    if found is None:
        return error_page(request, 404, "No such file.")
    body, content_type = found
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def login_form(request: web.Request) -> web.StreamResponse:
    if not request.app[READ_API].runtime.config.api.tokens:
        return redirect("/ui/")
    ui = request.app[WEB_UI]
    if _principal(request, ui) is not None:
        return redirect(safe_next(request.query.get("next")))
    return render(request, "login.html", next=safe_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    ui = request.app[WEB_UI]
    if not same_origin(request.headers, request.host):
        return error_page(request, 403, "Sign-in is accepted only from this site's own form.")
    try:
        form = await request.post()
    except (ValueError, LookupError, HttpProcessingError, RequestPayloadError):
        # a body that is no form: a broken multipart boundary, an unknown charset, bytes
        # that do not decode, a Content-Encoding it does not have (the client's fault)
        return error_page(request, 400, "The sign-in form could not be read.")
    tokens = api.runtime.config.api.tokens
    next_path = safe_next(str(form.get("next", "")) or None)
    if not tokens:
        return redirect(next_path)
    presented = str(form.get("token", "")).strip()
    token = api.auth.match(tokens, presented) if presented else None
    if token is None:
        await asyncio.sleep(ui.sign_in_failure_delay_s)
        log.info("ui.sign_in_failed", peer=request.remote)
        return render(
            request, "login.html", status=401, next=next_path, error="That token is not valid."
        )
    ui.sessions.delete(request.cookies.get(COOKIE))
    session = ui.sessions.create(token, ui.monotonic())
    log.info("ui.signed_in", token=token.name, sessions=len(ui.sessions))
    response = redirect(next_path)
    response.set_cookie(
        COOKIE,
        session.id,
        path=COOKIE_PATH,
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="Strict",
        secure=served_over_https(request),
    )
    return response


def served_over_https(request: web.Request) -> bool:
    """Did the browser reach us over HTTPS? Directly (``request.secure``), or through the
    TLS-terminating proxy the docs recommend, which says so in ``X-Forwarded-Proto`` or
    ``Forwarded: proto=https``. Trusting the header is safe here: it only adds ``Secure``
    to the session cookie, which a client that forged it merely fails to send back over
    plain HTTP."""
    if request.secure:
        return True
    if request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https":
        return True
    forwarded = request.headers.get("Forwarded", "").split(",")[0]
    return any(
        part.strip().lower() in ("proto=https", 'proto="https"') for part in forwarded.split(";")
    )


async def logout(request: web.Request) -> web.StreamResponse:
    if not same_origin(request.headers, request.host):
        return error_page(request, 403, "Sign-out is accepted only from this site's own pages.")
    ui = request.app[WEB_UI]
    ui.sessions.delete(request.cookies.get(COOKIE))
    response = redirect("/ui/login")
    response.del_cookie(COOKIE, path=COOKIE_PATH)
    return response


# --- handlers: pages -----------------------------------------------------------------------


def _visible_workspaces(
    principal: Principal, states: Sequence[WorkspaceState], configured: Sequence[str]
) -> list[str]:
    ids = {s.workspace_id for s in states} | set(configured)
    return sorted(w for w in ids if principal.can_see(w))


async def overview(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    if request.query:
        parse_params((), request.query)
    scope = principal.scope([])
    now = api.runtime.clock()
    days = charts.days_ending(now.astimezone(UTC).date(), CHART_DAYS)
    since = days[0].isoformat()
    store = api.store
    config = api.runtime.config

    def work(conn: sqlite3.Connection) -> dict[str, Any]:
        states = store.workspaces()
        ids = _visible_workspaces(principal, states, config.workspace_ids())
        return {
            "states": states,
            "ids": ids,
            "counts": queries.live_counts(conn, scope),
            "runs": queries.last_runs(conn, ids),
            "window": queries.window_changes(conn, since, scope),
            "outbox": queries.outbox_counts(conn, scope),
        }

    data = await api.read(work)
    states: list[WorkspaceState] = data["states"]
    by_id = {s.workspace_id: s for s in states}
    fresh = freshness(states, data["ids"], now)
    labels = {w.id: w.label for w in config.workspaces}
    health: Mapping[str, Any] = getattr(api.runtime, "health", None) or {}
    cards = []
    for ws in data["ids"]:
        state = by_id.get(ws)
        counts = data["counts"].get(ws, {})
        per_day = charts.status_by_day(counts, data["window"].get(ws, []), days)
        h = health.get(ws)
        cards.append(
            {
                "id": ws,
                "label": (state.label if state and state.label else None) or labels.get(ws),
                "configured": ws in config.workspace_ids(),
                "counts": sorted(counts.items(), key=lambda kv: _status_rank(kv[0])),
                "total": sum(counts.values()),
                "fresh": fresh["workspaces"].get(ws, {}),
                "run": data["runs"].get(ws),
                "state": state,
                "failures": getattr(h, "consecutive_failures", 0) or 0,
                "chart": charts.stacked_bars(days, per_day, EXPERIMENT_STATUSES),
            }
        )
    return render(
        request,
        "overview.html",
        cards=cards,
        fresh=fresh,
        outbox=data["outbox"],
        days=CHART_DAYS,
    )


def _status_rank(status: str) -> int:
    return EXPERIMENT_STATUSES.index(status) if status in EXPERIMENT_STATUSES else 99


def _cleaned(query: MultiMapping[str]) -> MultiDict[str]:
    """The query without the empty values a GET form submits for blank fields."""
    return MultiDict((k, v) for k, v in query.items() if v != "")


async def experiments(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    query = _cleaned(request.query)
    if len(query) != len(request.query):  # a canonical, shareable URL
        return redirect(str(request.rel_url.with_query(query)))
    store = api.store
    config = api.runtime.config
    try:
        q = parse_params(EXPERIMENTS_PARAMS, query)
        scope = principal.scope(q["workspace"])
    except BadParameterError as exc:
        states = await api.read(lambda _conn: store.workspaces())
        return render(
            request,
            "experiments.html",
            status=400,
            error=exc.message,
            q=_form_values(query),
            workspaces=_visible_workspaces(principal, states, config.workspace_ids()),
            rows=[],
            counts=None,
            next_url=None,
            first_url=None,
            sorts=SORTS,
            limits=LIMITS,
            fresh=None,
        )
    lr = ListRequest.of(q, scope)
    filters = lr.filters

    def work(
        conn: sqlite3.Connection,
    ) -> tuple[Any, str | None, dict[str, int], list[WorkspaceState]]:
        start = lr.after_key(conn)
        page = select_experiments(conn, filters, lr.sort, lr.limit, start, include_config=False)
        token = lr.next_cursor(conn, page)
        return page, token, count_by_status(conn, filters), store.workspaces()

    page, token, counts, states = await api.read(work)
    next_url = None
    if token is not None:
        nq = MultiDict((k, v) for k, v in query.items() if k != "cursor")
        nq["cursor"] = token
        next_url = str(request.rel_url.with_query(nq))
    first_url = None
    if q["cursor"] is not None:
        first_url = str(
            request.rel_url.with_query(MultiDict((k, v) for k, v in query.items() if k != "cursor"))
        )
    return render(
        request,
        "experiments.html",
        error=None,
        q=_form_values(query),
        workspaces=_visible_workspaces(principal, states, config.workspace_ids()),
        rows=page.rows(),  # the API's own JSON of each row
        counts={
            "total": sum(counts.values()),
            "by_status": sorted(counts.items(), key=lambda kv: _status_rank(kv[0])),
        },
        next_url=next_url,
        first_url=first_url,
        sorts=SORTS,
        limits=LIMITS,
        fresh=freshness(states, scope, api.runtime.clock()),
    )


def _form_values(query: MultiDict[str]) -> dict[str, Any]:
    """What the filter form shows: the request's own values, valid or not."""
    return {
        "workspace": query.getall("workspace", []),
        "status": query.getall("status", []),
        "name": query.get("name", ""),
        "creator": query.get("creator", ""),
        "tag": query.getall("tag", []),
        "created_after": query.get("created_after", ""),
        "created_before": query.get("created_before", ""),
        "modified_after": query.get("modified_after", ""),
        "include_deleted": query.get("include_deleted", "") == "true",
        "sort": query.get("sort", "-created"),
        "limit": query.get("limit", "50"),
    }


async def experiment(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    if request.query:
        parse_params((), request.query)
    exp_id = request.match_info["id"]

    def work(
        conn: sqlite3.Connection,
    ) -> tuple[dict[str, Any] | None, list[sqlite3.Row], list[WorkspaceState]]:
        found = select_experiment(conn, exp_id, include_config=True)
        if found is None or not principal.can_see(found[1]):
            return None, [], []
        row: dict[str, Any] = json.loads(found[0])  # the API's own JSON of the experiment
        return row, queries.experiment_history(conn, exp_id), found[2]

    row, history, states = await api.read(work)
    if row is None:
        raise NotFoundError(f"The mirror holds no experiment {exp_id[:200]!r} that you may see.")
    now = api.runtime.clock()
    changes = [
        {
            "id": r["id"],
            "field": r["field"],
            "old": change_value(r["field"], r["old_value"]),
            "new": change_value(r["field"], r["new_value"]),
            "observed_at": r["observed_at"],
            "sync_run_id": r["sync_run_id"],
            "baseline": bool(r["baseline"]),
        }
        for r in reversed(history)
    ]
    return render(
        request,
        "experiment.html",
        exp=row,
        changes=changes,
        timeline=charts.timeline(queries.history_rows(history), now, TRIAL_ORDER),
        fresh=freshness(states, [row["workspace_id"]], now),
        config_texts=[
            ("SearchSpace", row.get("search_space")),
            ("ConfigIni", row.get("config_ini")),
            ("ConfigYml", row.get("config_yml")),
        ],
    )


async def changes_page(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    query = _cleaned(request.query)
    if len(query) != len(request.query):
        return redirect(str(request.rel_url.with_query(query)))
    q = parse_params(CHANGES_PARAMS, query)
    scope = principal.scope(q["workspace"])
    store = api.store
    config = api.runtime.config

    visible = principal.scope([])

    def work(conn: sqlite3.Connection) -> tuple[list[sqlite3.Row], int, list[WorkspaceState]]:
        rows = queries.latest_changes(
            conn, scope, limit=min(q["limit"], queries.PAGE_ROWS), field_name=q["field"]
        )
        # The feed starts after the newest change this caller may see (not another's).
        return rows, max_change_id(conn, visible), store.workspaces()

    rows, max_id, states = await api.read(work)
    poll_query = MultiDict((k, v) for k, v in query.items() if k in ("workspace", "field"))
    return render(
        request,
        "changes.html",
        changes=[change_json(r) for r in rows],
        after=max_id,
        poll_url=str(request.app.router["ui_poll"].url_for().with_query(poll_query)),
        workspaces=_visible_workspaces(principal, states, config.workspace_ids()),
        selected=q["workspace"],
        field=q["field"],
        fields=CHANGE_FIELDS,
        fresh=freshness(states, scope, api.runtime.clock()),
    )


def _poll_error(exc: ApiError) -> web.Response:
    return web.json_response({"error": exc.code, "message": exc.message}, status=exc.status)


async def changes_poll(request: web.Request) -> web.StreamResponse:
    """The feed's long poll: changes after ``after`` as rendered table rows (JSON)."""
    api = request.app[READ_API]
    ui = request.app[WEB_UI]
    principal = request[PRINCIPAL]
    try:
        q = parse_params(CHANGES_PARAMS, request.query)
        scope = principal.scope(q["workspace"])
    except ApiError as exc:
        return _poll_error(exc)
    after: int = q["after"]
    limit = min(q["limit"], queries.PAGE_ROWS)
    wait_s = min(q["wait"], FEED_WAIT_S)

    visible = principal.scope([])

    def work(conn: sqlite3.Connection) -> tuple[list[sqlite3.Row], int, int]:
        rows = select_changes(
            conn, after=after, limit=limit, workspaces=scope, field_name=q["field"]
        )
        # As the API's feed: the watcher's id (every workspace) and the caller's own newest.
        max_id = max_change_id(conn)
        return rows, max_id, max_change_id(conn, visible) if visible else max_id

    rows, max_id, seen_id = await api.read(work)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not rows and (remaining := deadline - loop.time()) > 0:
        woke = await wait_for_change(request, max(max_id, after), remaining)
        # The session as it stands now, woken or timed out: a reload meanwhile may have
        # ended it (its token removed) or narrowed it; the changes committed since are not
        # for the old one, and an empty answer would keep a signed-out page polling.
        try:
            current = _principal(request, ui)
            if current is None:
                return web.json_response(_SIGNED_OUT, status=401)
            scope, visible = current.scope(q["workspace"]), current.scope([])
        except ApiError as exc:
            return _poll_error(exc)
        rows, max_id, seen_id = await api.read(work)
        if not woke:
            break
    next_after = rows[-1][0] if rows else max(after, seen_id)
    newest_first = [change_json(r) for r in reversed(rows)]
    html = ui.templates.get_template("_change_rows.html").render(changes=newest_first, fresh=True)
    return web.json_response(
        {"html": html, "count": len(rows), "next_after": next_after},
        dumps=lambda o: json.dumps(o, ensure_ascii=False),
    )


async def outbox_page(request: web.Request) -> web.StreamResponse:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    if request.query:
        parse_params((), request.query)
    scope = principal.scope([])

    def work(conn: sqlite3.Connection) -> dict[str, Any]:
        return {
            "pending": [dict(r) for r in queries.outbox(conn, "pending", scope)],
            "dead": [dict(r) for r in queries.outbox(conn, "dead", scope)],
            "counts": queries.outbox_counts(conn, scope),
        }

    data = await api.read(work)
    for rows in (data["pending"], data["dead"]):
        for r in rows:
            r["old"] = change_value_text(change_value(r["field"], r["old_value"]))
            r["new"] = change_value_text(change_value(r["field"], r["new_value"]))
    return render(request, "outbox.html", page_rows=queries.PAGE_ROWS, **data)


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", root)
    r.add_get("/ui", root)
    r.add_get("/ui/", overview, name="ui_overview")
    r.add_get("/ui/login", login_form, name="ui_login")
    r.add_post("/ui/login", login)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui/experiments", experiments, name="ui_experiments")
    r.add_get("/ui/experiments/{id}", experiment, name="ui_experiment")
    r.add_get("/ui/changes", changes_page, name="ui_changes")
    r.add_get(_POLL, changes_poll, name="ui_poll")
    r.add_get("/ui/outbox", outbox_page, name="ui_outbox")
    r.add_get("/ui/static/{name}", static, name="ui_static")
