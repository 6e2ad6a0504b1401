"""The web UI without a browser (aiohttp test clients over the golden mirror): sign-in and
sessions, headers, escaping, workspace isolation on every page, the API's parameter errors,
the feed's long poll, and the pure parts (charts, sessions, filters)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from test_api_rig import (
    START,
    TOKENS,
    WS1,
    WS2,
    WS3,
    ApiRig,
    api_rig,
    golden_mirror,
    mirror_rows,
    new_experiment,
    token_configs,
)

from hpo_sync.api import RUNTIME
from hpo_sync.config import Secret, TokenConfig
from hpo_sync.normalise import format_time
from hpo_sync.web import WEB_UI, setup_web_ui
from hpo_sync.web.charts import (
    HistoryRow,
    WindowChange,
    _short,
    stacked_bars,
    status_by_day,
    timeline,
)
from hpo_sync.web.sessions import SessionStore, current_token
from hpo_sync.web.ui import CSP, human_age, safe_next, same_origin, status_class

__all__ = ["golden_mirror"]

XSS = "<script>alert(1)</script>"
PAGES = ("/ui/", "/ui/experiments", "/ui/changes", "/ui/outbox")


def _prepare(app: web.Application) -> None:
    setup_web_ui(app, app[RUNTIME])
    app[WEB_UI].sign_in_failure_delay_s = 0.0


@pytest.fixture
async def ui(golden_mirror: Path, tmp_path: Path) -> AsyncIterator[ApiRig]:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    async with api_rig(db, prepare=_prepare) as r:
        yield r


@pytest.fixture
async def open_ui(golden_mirror: Path, tmp_path: Path) -> AsyncIterator[ApiRig]:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    async with api_rig(db, tokens=(), prepare=_prepare) as r:
        yield r


def origin(rig: ApiRig) -> dict[str, str]:
    return {"Origin": rig.base_url}


async def sign_in(
    rig: ApiRig,
    token: str = "all",
    client: TestClient[Any, Any] | None = None,
    *,
    next_: str = "/ui/",
    to: str = "/ui/",
) -> Any:
    """Sign in with ``next_``, which must redirect to ``to``; returns the reply's headers."""
    c = client or rig.client
    async with c.post(
        "/ui/login",
        data={"token": TOKENS[token][0], "next": next_},
        headers=origin(rig),
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == to
        return resp.headers


async def page(rig: ApiRig, path: str, params: Any = (), **kw: Any) -> tuple[int, str, Any]:
    async with rig.client.get(path, params=params, allow_redirects=False, **kw) as resp:
        return resp.status, await resp.text(), resp.headers


def _cookie_header(headers: Any) -> str:
    cookies = headers.getall("Set-Cookie")
    assert len(cookies) == 1
    return str(cookies[0])


# --- sign-in and sessions ---------------------------------------------------------------


async def test_nothing_is_reachable_without_signing_in(ui: ApiRig) -> None:
    for path in (*PAGES, "/ui/experiments/whatever", "/ui/changes/poll", "/ui/nope"):
        status, _text, headers = await page(ui, path)
        if path == "/ui/changes/poll":
            assert status == 401
        else:
            assert status == 303, path
            assert headers["Location"].startswith("/ui/login?next=")
    # A bearer token is no way in either: the UI knows sessions only.
    status, _, _ = await page(ui, "/ui/", headers={"Authorization": f"Bearer {TOKENS['all'][0]}"})
    assert status == 303
    # The sign-in page, its stylesheet and the root redirect are public.
    assert (await page(ui, "/ui/login"))[0] == 200
    assert (await page(ui, "/ui/static/ui.css"))[0] == 200
    status, _, headers = await page(ui, "/")
    assert status == 302 and headers["Location"] == "/ui/"


async def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_it(ui: ApiRig) -> None:
    cookie = _cookie_header(await sign_in(ui, next_="/ui/outbox", to="/ui/outbox"))
    assert cookie.startswith("hpo_sync_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback here; set behind TLS
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert len(sid) >= 43 and TOKENS["all"][0] not in cookie
    for path in PAGES:
        status, text, _ = await page(ui, path)
        assert status == 200, (path, text[:500])
        assert "Sign out" in text
    # Sign-out needs our own origin too, then the session is gone server-side.
    async with ui.client.post("/ui/logout", allow_redirects=False) as resp:
        assert resp.status == 403
    async with ui.client.post("/ui/logout", headers=origin(ui), allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
    assert len(ui.app[WEB_UI].sessions) == 0
    ui.client.session.cookie_jar.update_cookies({"hpo_sync_session": sid})
    assert (await page(ui, "/ui/"))[0] == 303


async def test_a_next_with_a_line_break_signs_in_to_the_overview(ui: ApiRig) -> None:
    """A crafted sign-in link whose ``next`` holds CR/LF: the reply is a redirect to the
    overview, not a dropped connection (no header can carry a line break)."""
    assert "X-Evil" not in await sign_in(ui, next_="/ui/\r\nX-Evil: 1", to="/ui/")
    status, text, _ = await page(ui, "/ui/login?next=/ui/%0d%0aX-Evil:%201")
    assert status in (200, 303), text[:300]


async def test_behind_a_tls_proxy_the_session_cookie_is_secure(ui: ApiRig) -> None:
    """hpo-sync speaks plain HTTP; behind the TLS-terminating proxy the docs recommend,
    the proxy's word (X-Forwarded-Proto or Forwarded) gets the cookie its Secure flag."""
    for proxy in ({"X-Forwarded-Proto": "https"}, {"Forwarded": "for=1.2.3.4;proto=https"}):
        async with ui.client.post(
            "/ui/login",
            data={"token": TOKENS["all"][0], "next": "/ui/"},
            headers={**origin(ui), **proxy},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303 and "Secure" in _cookie_header(resp.headers), proxy


async def test_a_wrong_token_or_a_foreign_origin_does_not_sign_in(ui: ApiRig) -> None:
    async with ui.client.post(
        "/ui/login", data={"token": "nope", "next": "/ui/"}, headers=origin(ui)
    ) as resp:
        assert resp.status == 401
        assert "That token is not valid." in await resp.text()
        assert "Set-Cookie" not in resp.headers
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {},
        {"Sec-Fetch-Site": "cross-site", "Origin": ui.base_url},
        {"Sec-Fetch-Site": "same-site"},
    ):
        async with ui.client.post(
            "/ui/login",
            data={"token": TOKENS["all"][0]},
            headers=headers,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 403, headers
            assert "Set-Cookie" not in resp.headers
    # Without Origin, a same-origin fetch metadata header is accepted (older form posts).
    async with ui.client.post(
        "/ui/login",
        data={"token": TOKENS["all"][0]},
        headers={"Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
    assert len(ui.app[WEB_UI].sessions) == 1


async def test_a_body_that_is_no_form_is_a_400_not_a_server_error(ui: ApiRig) -> None:
    token = TOKENS["all"][0].encode()
    for content_type, body, extra in (
        ("multipart/form-data; boundary=xyz", b"garbage", {}),
        ("multipart/form-data", b"token=x", {}),
        ("application/x-www-form-urlencoded; charset=bogus", b"token=" + token, {}),
        ("application/x-www-form-urlencoded; charset=utf-16", b"token=x", {}),
        ("application/x-www-form-urlencoded", b"token=" + token + b"&next=/ui/\xff", {}),
        ("application/x-www-form-urlencoded", b"not gzip", {"Content-Encoding": "gzip"}),
    ):
        headers = {**origin(ui), "Content-Type": content_type, **extra}
        with capture_logs() as logs:
            async with ui.client.post(
                "/ui/login", data=body, headers=headers, allow_redirects=False
            ) as resp:
                assert resp.status == 400, (content_type, extra)
                assert "The sign-in form could not be read." in await resp.text()
                assert "Set-Cookie" not in resp.headers
        assert not [e for e in logs if e["log_level"] == "error"], (content_type, logs)
    assert len(ui.app[WEB_UI].sessions) == 0


def test_aiohttp_s_error_over_an_undecodable_body_becomes_one_info_line() -> None:
    """aiohttp logs the body it could not decode once more, as an unhandled error with a
    traceback, when it drains the request after the handler answered: the client's fault,
    so one info line with the reason (as for a request its parser refuses)."""
    import logging
    import sys

    from aiohttp.web_protocol import RequestPayloadError

    from hpo_sync.logs import ClientGarbageFilter

    try:
        raise RequestPayloadError("400, message:\n  Can not decode content-encoding: gzip")
    except RequestPayloadError:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", None,
            sys.exc_info(),
        )  # fmt: skip
    ClientGarbageFilter().filter(record)
    assert (record.levelno, record.exc_info) == (logging.INFO, None)
    assert record.getMessage() == (
        "refused a malformed HTTP request: RequestPayloadError"
        " (Can not decode content-encoding: gzip)"
    )


async def test_after_sign_in_only_ui_paths_are_targets(ui: ApiRig) -> None:
    for target in ("https://evil.example/", "//evil.example/ui", "/v1/experiments", "/ui\\x"):
        async with ui.client.post(
            "/ui/login",
            data={"token": TOKENS["all"][0], "next": target},
            headers=origin(ui),
            allow_redirects=False,
        ) as resp:
            assert resp.headers["Location"] == "/ui/", target


async def test_sessions_expire_and_die_with_their_token(ui: ApiRig) -> None:
    web_ui = ui.app[WEB_UI]
    clock = [1000.0]
    web_ui.monotonic = lambda: clock[0]
    await sign_in(ui)
    assert (await page(ui, "/ui/"))[0] == 200
    clock[0] += web_ui.sessions.idle_s - 1
    assert (await page(ui, "/ui/"))[0] == 200  # in use: the idle clock restarts
    clock[0] += web_ui.sessions.idle_s + 1
    assert (await page(ui, "/ui/"))[0] == 303  # idle too long
    await sign_in(ui)
    for _ in range(int(web_ui.sessions.max_age_s // (web_ui.sessions.idle_s / 2)) + 1):
        clock[0] += web_ui.sessions.idle_s / 2
        status = (await page(ui, "/ui/"))[0]
    assert status == 303  # however busy, a session ends after max_age_s
    # A reload that removes the token ends its sessions at once.
    await sign_in(ui, "ws1")
    assert (await page(ui, "/ui/"))[0] == 200
    runtime = ui.app[RUNTIME]
    runtime.config = replace(
        runtime.config,
        api=replace(runtime.config.api, tokens=token_configs(["all", "ws12"])),
    )
    assert (await page(ui, "/ui/"))[0] == 303
    assert len(web_ui.sessions) == 0


async def test_a_reload_that_narrows_a_token_narrows_its_session(ui: ApiRig) -> None:
    await sign_in(ui, "ws12")
    assert "/ui/experiments?workspace=100002" in (await page(ui, "/ui/"))[1]
    runtime = ui.app[RUNTIME]
    value, _ws, admin = TOKENS["ws12"]
    narrowed = TokenConfig("ws12", Secret(value, "test"), (WS1,), admin)
    runtime.config = replace(runtime.config, api=replace(runtime.config.api, tokens=(narrowed,)))
    status, text, _ = await page(ui, "/ui/")
    assert status == 200
    assert "workspace=100002" not in text and "workspace=100001" in text


# --- headers and escaping -------------------------------------------------------------------


async def test_every_ui_response_carries_the_security_headers(ui: ApiRig) -> None:
    responses = [await page(ui, "/ui/login"), await page(ui, "/ui/")]
    await sign_in(ui)
    for path in (*PAGES, "/ui/nope", "/ui/experiments/nope", "/ui/static/ui.css"):
        responses.append(await page(ui, path))
    responses.append(await page(ui, "/ui/experiments", {"limit": "0"}))
    for _status, text, headers in responses:
        assert headers["Content-Security-Policy"] == CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Frame-Options"] == "DENY"
        if headers.get("Content-Type", "").startswith("text/html"):
            assert headers["Cache-Control"] == "no-store"
            # No inline script or style anywhere: the CSP would block them.
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), text
            assert " style=" not in text and "<style" not in text
            assert re.search(r"\son[a-z]+=", text) is None


def _put(rig: ApiRig, ws: str, exp_id: str, name: str, *, status: str = "RUNNING") -> None:
    exp = new_experiment(ws, exp_id, START, status=status, name=name)
    exp = replace(exp, description=f"desc {XSS}", config_yml=f"yml: '{XSS}'")
    observed = format_time(START + timedelta(minutes=30))
    run = rig.store.begin_run(ws, "hot", observed)
    rig.store.apply(ws, [exp], observed_at=observed, run_id=run, baseline=False)


async def test_upstream_strings_are_escaped_on_every_page(ui: ApiRig) -> None:
    _put(ui, WS1, "exp-xss-1", XSS)
    await sign_in(ui)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for path, params in (
        ("/ui/experiments", {"name": "script"}),
        ("/ui/experiments/exp-xss-1", {}),
        ("/ui/changes", {}),
    ):
        status, text, _ = await page(ui, path, params)
        assert status == 200
        assert XSS not in text, path
        assert escaped in text, path
    # A bad parameter's message quotes the value: escaped too.
    status, text, _ = await page(ui, "/ui/experiments", {"status": XSS})
    assert status == 400 and XSS not in text
    # The feed's long poll renders the same escaped rows.
    async with ui.client.get("/ui/changes/poll", params={"after": "0", "limit": "500"}) as resp:
        body = await resp.json()
    assert XSS not in body["html"]


# --- isolation -------------------------------------------------------------------------------


def _outbox_row(rig: ApiRig, ws: str, error: str) -> None:
    with sqlite3.connect(rig.store.path) as conn:
        change_id = conn.execute(
            "SELECT id FROM changes WHERE workspace_id = ? ORDER BY id DESC LIMIT 1", (ws,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO alert_outbox (change_id, target, rule, status, attempts, created_at,"
            " last_error, message_id) VALUES (?, ?, 'r', 'dead', 3, '2025-06-01T09:00:00Z', ?, ?)",
            (change_id, f"target-{ws}", error, f"hposync_{ws}_1"),
        )


async def test_a_limited_token_sees_only_its_workspaces_on_every_page(ui: ApiRig) -> None:
    _outbox_row(ui, WS1, "dead in ws1: 310000 keyword missing")
    _outbox_row(ui, WS2, "dead in ws2: secret reason")
    other = mirror_rows(ui.store, "workspace_id = ? AND deleted = 0", [WS2])[0]
    mine = mirror_rows(ui.store, "workspace_id = ? AND deleted = 0", [WS1])[0]
    await sign_in(ui, "ws1")
    status, text, _ = await page(ui, "/ui/")
    assert status == 200 and "team 100001" in text and "100002" not in text
    status, text, _ = await page(ui, "/ui/experiments", {"limit": "500"})
    assert status == 200 and WS2 not in text and WS3 not in text and mine["experiment_id"] in text
    status, text, _ = await page(ui, "/ui/experiments", {"workspace": WS2})
    assert status == 403 and "may not read workspace" in text
    status, text, _ = await page(ui, f"/ui/experiments/{other['experiment_id']}")
    assert status == 404 and other["name"] not in text
    assert (await page(ui, f"/ui/experiments/{mine['experiment_id']}"))[0] == 200
    status, text, _ = await page(ui, "/ui/changes")
    assert status == 200 and f'<td data-label="Workspace">{WS2}' not in text
    assert (await page(ui, "/ui/changes", {"workspace": WS2}))[0] == 403
    status, text, _ = await page(ui, "/ui/outbox")
    assert status == 200 and "310000 keyword missing" in text and "secret reason" not in text
    assert f"hposync_{WS1}_1" in text and f"hposync_{WS2}_1" not in text  # the webhook-id
    async with ui.client.get("/ui/changes/poll", params={"after": "0", "limit": "500"}) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["count"] > 0 and WS2 not in body["html"]
    async with ui.client.get("/ui/changes/poll", params={"workspace": WS2}) as resp:
        assert resp.status == 403


async def test_open_loopback_mode_needs_no_sign_in_but_a_loopback_host(open_ui: ApiRig) -> None:
    for path in PAGES:
        status, text, _ = await page(open_ui, path)
        assert status == 200, path
        assert "open loopback mode" in text and "Sign out" not in text
    status, _, headers = await page(open_ui, "/ui/login")
    assert status == 303 and headers["Location"] == "/ui/"
    status, text, _ = await page(open_ui, "/ui/", headers={"Host": "attacker.example:8787"})
    assert status == 403 and "DNS rebinding" in text


# --- parameters, errors, pages ---------------------------------------------------------------


async def test_a_query_value_that_is_not_utf8_is_a_400_page(ui: ApiRig) -> None:
    """As on the read API: ``name=%FF`` is a mistake, not a search for U+FFFD (the page used
    to list what matched that character: nothing)."""
    await sign_in(ui)
    for path in ("/ui/experiments?name=%FF", "/ui/changes?experiment=%ED%A0%80"):
        status, text, _ = await page(ui, path)
        assert status == 400, (path, text[:200])
        assert "is not valid UTF-8" in text and 'role="alert"' in text


async def test_bad_filters_are_a_400_page_with_the_apis_wording(ui: ApiRig) -> None:
    await sign_in(ui)
    for params in (
        {"status": "running"},
        {"created_after": "yesterday"},
        {"sort": "size"},
        {"limit": "0"},
        {"cursor": "garbage"},
        {"bogus": "1"},
    ):
        status, text, _ = await page(ui, "/ui/experiments", params)
        api = await ui.get("/v1/experiments", params)
        assert status == 400 and api.status == 400, params
        message = api.body["error"]["message"]
        assert web_escape(message) in text, (params, message)
        assert 'role="alert"' in text


def web_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("'", "&#39;")
    )


async def test_blank_form_fields_redirect_to_a_clean_shareable_url(ui: ApiRig) -> None:
    await sign_in(ui)
    status, _, headers = await page(
        ui, "/ui/experiments?name=&status=FAILED&creator=&sort=-created&limit=25"
    )
    assert status == 303
    assert headers["Location"] == "/ui/experiments?status=FAILED&sort=-created&limit=25"


async def test_the_list_pages_like_the_api(ui: ApiRig) -> None:
    await sign_in(ui)
    params = {"workspace": WS1, "status": "FINISHED", "limit": "25", "sort": "name"}
    api_ids: list[str] = []
    cursor = None
    while True:
        body = await ui.ok("/v1/experiments", {**params, **({"cursor": cursor} if cursor else {})})
        api_ids += [e["experiment_id"] for e in body["experiments"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ui_ids: list[str] = []
    url: str | None = "/ui/experiments?" + "&".join(f"{k}={v}" for k, v in params.items())
    pages = 0
    while url is not None:
        status, text, _ = await page(ui, url.replace("&amp;", "&"))
        assert status == 200
        ui_ids += re.findall(r'href="/ui/experiments/([^"]+)"', text)
        found = re.search(r'href="([^"]+)" rel="next"', text)
        url = found.group(1) if found else None
        pages += 1
    assert pages > 1
    assert ui_ids == api_ids
    assert f"{len(api_ids):,} matching" in text


async def test_unknown_pages_and_experiments_are_404_pages(ui: ApiRig) -> None:
    await sign_in(ui)
    for path in ("/ui/nope", "/ui/experiments/nope", "/ui/static/nope.js"):
        status, text, headers = await page(ui, path)
        assert status == 404 and headers["Content-Type"].startswith("text/html"), path
        assert "<h1>404" in text
    async with ui.client.put("/ui/experiments", allow_redirects=False) as resp:
        assert resp.status == 405 and "GET" in resp.headers["Allow"]
    # The API's own routes keep their JSON errors.
    assert (await ui.get("/v1/nope")).error_code == "not_found"


async def test_the_experiment_page_shows_fields_config_and_timeline(ui: ApiRig) -> None:
    with ui.store.reader() as conn:
        exp_id = conn.execute(
            "SELECT experiment_id FROM changes WHERE field = 'TrialStatus'"
            " GROUP BY experiment_id HAVING count(*) > 1 LIMIT 1"
        ).fetchone()[0]
    await sign_in(ui)
    status, text, _ = await page(ui, f"/ui/experiments/{exp_id}")
    assert status == 200
    assert '<svg class="chart timeline"' in text and 'role="img"' in text
    assert "<polyline" in text and 'class="fill band' in text
    assert text.count("<details") == 3 and "<summary>SearchSpace" in text
    with sqlite3.connect(ui.store.path) as conn:  # empty text reads as missing, not blank
        conn.execute("UPDATE experiments SET creator = '' WHERE experiment_id = ?", (exp_id,))
    status, text, _ = await page(ui, f"/ui/experiments/{exp_id}")
    assert status == 200 and "<dt>Creator</dt><dd>—</dd>" in text


async def test_the_overview_counts_match_the_api(ui: ApiRig) -> None:
    await sign_in(ui)
    status, text, _ = await page(ui, "/ui/")
    assert status == 200
    body = await ui.ok("/v1/workspaces")
    for ws in body["workspaces"]:
        assert f"{ws['experiments']:,}" in text
        for st, n in ws["counts_by_status"].items():
            assert f"status={st}" in text and f"{n:,}" in text
    assert text.count('<svg class="chart"') == 3


async def test_statuses_pai_may_add_and_none_at_all_have_working_links(ui: ApiRig) -> None:
    """The mirror keeps a status as upstream sent it: one that PAI added (here PAUSED) is
    counted, linked and filterable, in the UI and the API; experiments without a status
    are counted, with nothing to filter by, so no link leads to a 400."""
    with sqlite3.connect(ui.store.path) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT experiment_id FROM experiments WHERE workspace_id = ? AND deleted = 0"
            " ORDER BY experiment_id LIMIT 2", (WS1,)
        )]  # fmt: skip
        conn.execute("UPDATE experiments SET status = 'PAUSED' WHERE experiment_id = ?", ids[:1])
        conn.execute("UPDATE experiments SET status = NULL WHERE experiment_id = ?", ids[1:])
    await sign_in(ui)
    status, text, _ = await page(ui, "/ui/")
    assert status == 200 and "status=PAUSED" in text and "status=null" not in text
    status, text, _ = await page(ui, "/ui/experiments", {"workspace": WS1, "status": "PAUSED"})
    assert status == 200 and ids[0] in text
    assert 'value="PAUSED" checked' in text  # the filter form keeps it
    body = await ui.ok("/v1/experiments", {"status": "PAUSED"})
    assert [e["experiment_id"] for e in body["experiments"]] == ids[:1]
    assert (await ui.get("/v1/experiments", {"status": "paused"})).status == 400
    # a page size from a shared link that the form does not offer is kept, not changed
    status, text, _ = await page(ui, "/ui/experiments", {"limit": "10"})
    assert status == 200 and '<option value="10" selected>' in text


async def _poll_across_a_change(
    ui: ApiRig, token: str = "all", *, before_change: Callable[[], None] | None = None
) -> tuple[int, Any, int]:
    """Sign in, open the feed and start its long poll; 0.3 s later (``before_change``, then)
    an experiment of WS1 is cancelled. The poll's status and body, and where it started."""
    await sign_in(ui, token)
    status, text, _ = await page(ui, "/ui/changes")
    assert status == 200
    after = int(re.search(r'data-after="(\d+)"', text).group(1))  # type: ignore[union-attr]
    exp = mirror_rows(ui.store, "workspace_id = ? AND deleted = 0", [WS1])[0]

    async def later() -> None:
        await asyncio.sleep(0.3)
        if before_change is not None:
            before_change()
        _put(ui, WS1, exp["experiment_id"], exp["name"], status="USER_CANCELED")

    task = asyncio.create_task(later())
    async with ui.client.get(
        "/ui/changes/poll", params={"after": str(after), "wait": "10"}
    ) as resp:
        body = await resp.json()
    await task
    return resp.status, body, after


async def test_the_feed_long_poll_answers_when_a_change_commits(ui: ApiRig) -> None:
    status, body, after = await _poll_across_a_change(ui)
    assert status == 200 and body["count"] >= 1
    assert body["next_after"] > after and "USER_CANCELED" in body["html"]


async def test_a_feed_poll_waiting_when_a_reload_ends_its_session_gets_nothing(
    ui: ApiRig,
) -> None:
    """A reload that removes the token ends its sessions at once: the feed's poll that was
    already waiting answers "signed out" when the next change wakes it, not that change."""

    def reload_without_ws1() -> None:
        runtime = ui.app[RUNTIME]
        runtime.config = replace(
            runtime.config,
            api=replace(runtime.config.api, tokens=token_configs(["all", "ws12"])),
        )

    status, body, _ = await _poll_across_a_change(ui, "ws1", before_change=reload_without_ws1)
    assert status == 401 and body["error"] == "signed_out"
    assert "USER_CANCELED" not in str(body)


async def test_a_feed_poll_whose_session_a_reload_ends_while_nothing_changes_gets_nothing(
    ui: ApiRig,
) -> None:
    """Ended while it waits, and no change wakes it: when its wait runs out the poll
    answers "signed out" (it answered an empty 200, and the page polled on)."""
    await sign_in(ui, "ws1")
    status, text, _ = await page(ui, "/ui/changes")
    assert status == 200
    after = int(re.search(r'data-after="(\d+)"', text).group(1))  # type: ignore[union-attr]

    async def reload_without_ws1() -> None:
        await asyncio.sleep(0.3)
        runtime = ui.app[RUNTIME]
        runtime.config = replace(
            runtime.config,
            api=replace(runtime.config.api, tokens=token_configs(["all", "ws12"])),
        )

    task = asyncio.create_task(reload_without_ws1())
    async with ui.client.get("/ui/changes/poll", params={"after": str(after), "wait": "1"}) as resp:
        body = await resp.json()
    await task
    assert resp.status == 401 and body["error"] == "signed_out"


async def test_the_feeds_cursor_shows_nothing_of_other_workspaces(ui: ApiRig) -> None:
    with sqlite3.connect(ui.store.path) as conn:
        own = conn.execute("SELECT max(id) FROM changes WHERE workspace_id = ?", (WS1,))
        newest_own = int(own.fetchone()[0])
        assert conn.execute("SELECT max(id) FROM changes").fetchone()[0] > newest_own
    await sign_in(ui, "ws1")
    status, text, _ = await page(ui, "/ui/changes")
    assert status == 200
    assert re.search(r'data-after="(\d+)"', text).group(1) == str(newest_own)  # type: ignore[union-attr]
    for params in ({"after": str(newest_own)}, {"after": str(newest_own), "wait": "1"}):
        async with ui.client.get("/ui/changes/poll", params=params) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["count"] == 0
        assert body["next_after"] == newest_own


# --- pure parts ------------------------------------------------------------------------------


def test_status_by_day_walks_back_through_history() -> None:
    days = [date(2025, 6, d) for d in (1, 2, 3)]
    window = [
        # day 1: two experiments appear RUNNING (first sightings)
        WindowChange("2025-06-01", "Status", None, "RUNNING", None, 2),
        # day 2: one fails
        WindowChange("2025-06-02", "Status", "RUNNING", "FAILED", None, 1),
        # day 3: the failed one is deleted, a new one appears already deleted
        WindowChange("2025-06-03", "Deleted", "false", "true", "FAILED", 1),
        WindowChange("2025-06-03", "Status", None, "FINISHED", None, 1),
        WindowChange("2025-06-03", "Deleted", None, "true", "FINISHED", 1),
    ]
    current = {"RUNNING": 1}
    assert status_by_day(current, window, days) == [
        {"RUNNING": 2},
        {"RUNNING": 1, "FAILED": 1},
        {"RUNNING": 1},
    ]
    chart = stacked_bars(days, status_by_day(current, window, days), ["RUNNING", "FAILED"])
    assert {b.status for b in chart.bars} == {"RUNNING", "FAILED"}
    assert "today: 1 RUNNING" in chart.summary


def test_chart_times_keep_four_digit_years() -> None:
    """A band's tooltip and an axis label of a year before 1000 (Go's zero time, year 1, as
    a create time) read 0001-..., not 1-... as strftime's %Y writes it."""
    assert _short(datetime(1, 1, 1, 0, 5, tzinfo=UTC)) == "0001-01-01 00:05"
    assert _short(datetime(2024, 3, 1, 8, 30, tzinfo=UTC)) == "2024-03-01 08:30"


def test_timeline_bands_and_trial_lines() -> None:
    rows = [
        HistoryRow("Status", None, "RUNNING", "2025-06-01T08:00:00Z"),
        HistoryRow("TrialStatus", None, '{"RUNNING":2}', "2025-06-01T08:00:00Z"),
        HistoryRow(
            "TrialStatus", '{"RUNNING":2}', '{"FAILED":1,"SUCCEEDED":1}', "2025-06-01T09:00:00Z"
        ),
        HistoryRow("Status", "RUNNING", "FAILED", "2025-06-01T09:00:00Z"),
    ]
    now = datetime(2025, 6, 1, 10, tzinfo=UTC)
    tl = timeline(rows, now, ["RUNNING", "SUCCEEDED", "FAILED"])
    assert tl is not None
    assert [b.status for b in tl.bands] == ["RUNNING", "FAILED"]
    assert tl.bands[0].width == pytest.approx(tl.bands[1].width, abs=0.1)
    assert [s.status for s in tl.series] == ["RUNNING", "SUCCEEDED", "FAILED"]
    assert [s.last for s in tl.series] == [0, 1, 1]
    assert timeline([], now, []) is None


def test_sessions_expire_and_are_bounded() -> None:
    tokens = token_configs()
    store = SessionStore(max_age_s=100, idle_s=10, max_sessions=2)
    a = store.create(tokens[0], 0)
    assert store.get(a.id, 9) is a
    assert store.get(a.id, 18) is a
    assert store.get(a.id, 29) is None  # idle
    b = store.create(tokens[0], 30)
    store.create(tokens[1], 31)
    store.create(tokens[1], 32)  # a third: the least recently used goes
    assert len(store) == 2 and store.get(b.id, 33) is None
    assert store.get("x" * 500, 0) is None and store.get(None, 0) is None
    assert current_token(tokens, store.create(tokens[2], 40).token_digest) is tokens[2]
    assert current_token(tokens[:2], store.create(tokens[2], 41).token_digest) is None


def test_one_token_s_sign_ins_sign_no_other_token_out() -> None:
    """Past the store's bound the least recently used session went, whoever's: a script
    signing in with any token (one workspace's) over and over signed every admin out. One
    token's sessions are bounded on their own now, and its sign-ins drop only its own."""
    tokens = token_configs()
    store = SessionStore(max_age_s=1e6, idle_s=1e6, max_sessions=50, max_per_token=5)
    admin = store.create(tokens[0], 0)
    mine = [store.create(tokens[1], 1 + n) for n in range(200)]
    assert store.get(admin.id, 300) is admin
    assert len(store) == 6  # the admin's one and the newest five of the other token's
    assert all(store.get(s.id, 300) is s for s in mine[-5:])
    assert all(store.get(s.id, 300) is None for s in mine[:-5])


def test_small_helpers() -> None:
    assert human_age(None) == "never" and human_age(5) == "5 s" and human_age(7200) == "2 h"
    assert status_class("EARLY_STOPPED") == "st-early-stopped"
    assert status_class('x" onmouseover="1') == "st-other"
    assert safe_next("/ui/experiments?status=FAILED") == "/ui/experiments?status=FAILED"
    assert safe_next("//evil") == "/ui/" and safe_next(None) == "/ui/"
    assert safe_next("/ui/\r\nX-Evil: 1") == "/ui/" and safe_next("/ui/\x00") == "/ui/"
    assert same_origin({"Origin": "http://h:1"}, "h:1")
    assert not same_origin({"Origin": "http://h:1"}, "h:2")
    assert not same_origin({}, "h:1")
    assert same_origin({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, "h:1")
    assert not same_origin({"Origin": "http://h:1", "Sec-Fetch-Site": "cross-site"}, "h:1")
