"""Who may see what: bearer tokens on every route, workspace isolation on every route (the
upstream-compatible one included), admin routes, /metrics and /readyz, and the open
loopback mode when no token is configured."""

from __future__ import annotations

import asyncio
import hmac
import shutil
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from test_api_rig import (
    START,
    TOKENS,
    WS1,
    WS2,
    WS3,
    ApiRig,
    api_rig,
    golden_mirror,
    make_config,
    make_runtime,
    mirror_rows,
    rig,
    token_configs,
)

from hpo_sync.api import build_app
from hpo_sync.api.auth import Authenticator, host_header_is_loopback, is_loopback_host
from hpo_sync.api.read import READ_API, setup_read_api
from hpo_sync.errors import ConfigError
from hpo_sync.store import Store

__all__ = ["golden_mirror", "rig"]

COMPAT = "/api/automl/v1/hpo/experiments"
PROTECTED = [
    ("GET", "/v1/experiments"),
    ("GET", "/v1/experiments/some-id"),
    ("GET", "/v1/experiments/some-id/changes"),
    ("GET", "/v1/changes"),
    ("GET", "/v1/workspaces"),
    ("POST", "/v1/sync?workspace=100001"),
    ("GET", "/metrics"),
    ("GET", COMPAT),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_protected_route_needs_a_valid_token(
    rig: ApiRig, method: str, path: str
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic eDp5"},
        {"x-acs-bearer-token": "wrong"},
    ):
        reply = await rig.request(method, path, token=None, headers=headers)
        assert reply.status == 401, (headers, reply.text)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        if path.startswith("/api/"):
            assert reply.body["Code"] == "InvalidBearerToken" and reply.body["RequestId"]
        else:
            assert reply.error_code in ("token_required", "invalid_token")


async def test_public_routes_and_the_tokens_three_ways_of_arriving(rig: ApiRig) -> None:
    assert (await rig.get("/healthz", token=None)).status == 200
    assert (await rig.get("/openapi.json", token=None)).status == 200
    value = TOKENS["all"][0]
    assert (
        await rig.get("/v1/workspaces", token=None, headers={"x-acs-bearer-token": value})
    ).status == 200
    assert (
        await rig.get("/v1/workspaces", token=None, headers={"Authorization": f"bearer {value}"})
    ).status == 200
    # The query parameter is the SDK's RPC style: accepted on the upstream route only.
    assert (await rig.get(COMPAT, {"BearerToken": value}, token=None)).status == 200
    assert (await rig.get("/v1/workspaces", {"BearerToken": value}, token=None)).status == 401


async def test_readyz_details_only_for_tokens_that_see_every_workspace(rig: ApiRig) -> None:
    full = await rig.get("/readyz", token="all")
    assert full.status == 200 and set(full.body["workspaces"]) == {WS1, WS2, WS3}
    assert full.body["alerts"] == {
        "pending": 0,
        "oldest_pending_at": None,
        "oldest_pending_age_s": None,
    }
    with sqlite3.connect(rig.store.path) as conn:
        (change_id,) = conn.execute("SELECT max(id) FROM changes").fetchone()
        conn.executemany(
            "INSERT INTO alert_outbox (change_id, target, rule, status, created_at)"
            " VALUES (?, ?, 'r', ?, ?)",
            [
                (change_id, "slack", "pending", "2025-06-01T09:00:00Z"),
                (change_id, "ding", "pending", "2025-06-01T08:00:00Z"),
                (change_id, "teams", "sent", "2025-06-01T07:00:00Z"),
                (change_id, "hook", "dead", "2025-06-01T06:00:00Z"),
            ],
        )
    full = await rig.get("/readyz", token="all")
    # a backlog is told, but it never makes the mirror unready
    assert full.status == 200 and full.body["ready"] is True
    alerts = full.body["alerts"]
    assert alerts["pending"] == 2 and alerts["oldest_pending_at"] == "2025-06-01T08:00:00Z"
    age = (rig.runtime.clock() - datetime(2025, 6, 1, 8, tzinfo=UTC)).total_seconds()
    assert alerts["oldest_pending_age_s"] == pytest.approx(age, abs=5)
    for token in (None, "ws1"):
        reduced = await rig.get("/readyz", token=token)
        assert reduced.status == 200 and reduced.body == {"ready": True, "mirror": "open"}


async def test_metrics_need_a_token_without_a_workspace_limit(rig: ApiRig) -> None:
    assert (await rig.get("/metrics", token="all")).status == 200
    limited = await rig.get("/metrics", token="ws1")
    assert limited.status == 403 and limited.error_code == "full_access_required"


async def test_admin_routes_need_an_admin_token_that_sees_the_workspace(rig: ApiRig) -> None:
    for token in ("all", "ws1"):
        reply = await rig.post("/v1/sync", {"workspace": WS1}, token=token)
        assert reply.status == 403 and reply.error_code == "admin_required"
    other = await rig.post("/v1/sync", {"workspace": WS1}, token="admin-ws2")
    assert other.status == 403 and other.error_code == "workspace_forbidden"
    assert (await rig.post("/v1/sync", {"workspace": WS2}, token="admin-ws2")).status == 202
    assert rig.sync_requests == [(WS2, "auto")]


async def test_a_limited_token_never_sees_another_workspace_on_any_route(rig: ApiRig) -> None:
    own = {r["experiment_id"] for r in mirror_rows(rig.store, "workspace_id = ?", [WS1])}
    other = mirror_rows(rig.store, "workspace_id = ?", [WS2])[0]["experiment_id"]

    # Listing, paged to the end: only WS1, and counts only WS1's.
    seen: set[str] = set()
    cursor = None
    while True:
        params = [("limit", "500"), ("include_deleted", "true"), ("count", "true")]
        body = await rig.ok(
            "/v1/experiments", params + ([("cursor", cursor)] if cursor else []), token="ws1"
        )
        seen |= {e["experiment_id"] for e in body["experiments"]}
        assert body["count"]["total"] == len(own)
        assert set(body["freshness"]["workspaces"]) == {WS1}
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == own
    for params in ({"workspace": WS2}, [("workspace", WS1), ("workspace", WS2)]):
        reply = await rig.get("/v1/experiments", params, token="ws1")
        assert reply.status == 403 and reply.error_code == "workspace_forbidden"
    # One experiment, and its history: as if it did not exist.
    for path in (f"/v1/experiments/{other}", f"/v1/experiments/{other}/changes"):
        reply = await rig.get(path, token="ws1")
        assert reply.status == 404 and "may read" in reply.body["error"]["message"]
    # The change feed.
    feed = await rig.ok("/v1/changes", {"limit": "500", "after": "0"}, token="ws1")
    assert feed["changes"] and {c["workspace_id"] for c in feed["changes"]} == {WS1}
    assert (await rig.get("/v1/changes", {"workspace": WS2}, token="ws1")).status == 403
    # Workspaces.
    spaces = await rig.ok("/v1/workspaces", token="ws1")
    assert [w["workspace_id"] for w in spaces["workspaces"]] == [WS1]
    # The upstream route: without WorkspaceId only WS1, with another one a 403.
    compat = await rig.ok(COMPAT, {"PageSize": "1000"}, token="ws1")
    live = {
        r["experiment_id"]
        for r in mirror_rows(rig.store, "workspace_id = ? AND deleted = 0", [WS1])
    }
    assert compat["TotalCount"] == len(live)
    assert {e["ExperimentId"] for e in compat["Experiments"]} == live
    denied = await rig.get(COMPAT, {"WorkspaceId": WS2}, token="ws1")
    assert denied.status == 403 and denied.body["Code"] == "Forbidden.Workspace"
    # A two-workspace token sees both, and its cursors are not valid for the one-workspace one.
    both = await rig.ok("/v1/experiments", {"limit": "5"}, token="ws12")
    assert {e["workspace_id"] for e in both["experiments"]} <= {WS1, WS2}
    reply = await rig.get(
        "/v1/experiments", {"limit": "5", "cursor": both["next_cursor"]}, token="ws1"
    )
    assert reply.status == 400 and reply.body["error"]["param"] == "cursor"


async def test_a_limited_long_poll_is_not_woken_with_another_workspaces_changes(
    rig: ApiRig,
) -> None:
    from test_api_read import _apply_change, _some_id

    newest = rig.store.history(newest_first=True, limit=1)[0].id
    poll = asyncio.create_task(
        rig.ok("/v1/changes", {"after": str(newest), "wait": "2"}, token="ws1")
    )
    await asyncio.sleep(0.2)
    await asyncio.to_thread(_apply_change, rig.store, WS2, _some_id(rig.store, WS2), "FAILED", 9)
    body = await poll
    assert body["changes"] == []
    # The cursor stays where this token's own changes end: another workspace's activity
    # does not show through it.
    assert body["next_after"] == newest


def _newest_change(store: Any, workspaces: tuple[str, ...] = ()) -> int:
    where = f" WHERE workspace_id IN ({','.join('?' * len(workspaces))})" if workspaces else ""
    with store.reader() as conn:
        return int(conn.execute(f"SELECT max(id) FROM changes{where}", workspaces).fetchone()[0])


async def test_a_limited_feeds_cursor_reveals_nothing_of_other_workspaces(rig: ApiRig) -> None:
    from test_api_read import _apply_change, _some_id

    own, everyone = _newest_change(rig.store, (WS1, WS2)), _newest_change(rig.store)
    assert own < everyone  # WS3 wrote last: the unscoped newest id is another tenant's
    for params in (
        {"after": str(own)},
        {"after": "0", "field": "Deleted", "workspace": WS1},
        {"after": str(own - 1), "field": "Status"},
        {"after": str(own), "wait": "1"},
    ):
        body = await rig.ok("/v1/changes", params, token="ws12")
        visible = {c["id"] for c in body["changes"]}
        assert body["next_after"] in visible | {int(params["after"]), own}, params
        assert body["next_after"] <= own, params
    # Another workspace writes, then one of its own: the cursor never skips nor repeats.
    await asyncio.to_thread(_apply_change, rig.store, WS3, _some_id(rig.store, WS3), "FAILED", 21)
    quiet = await rig.ok("/v1/changes", {"after": str(own)}, token="ws12")
    assert quiet["changes"] == [] and quiet["next_after"] == own
    ws2_id = _some_id(rig.store, WS2)
    await asyncio.to_thread(_apply_change, rig.store, WS2, ws2_id, "FAILED", 22)
    body = await rig.ok("/v1/changes", {"after": str(quiet["next_after"])}, token="ws12")
    assert [c["experiment_id"] for c in body["changes"] if c["field"] == "Status"] == [ws2_id]
    again = await rig.ok("/v1/changes", {"after": str(body["next_after"])}, token="ws12")
    assert again["changes"] == [] and again["next_after"] == body["next_after"]
    # A token that sees everything still skips ahead past what it filtered out.
    spaces = await rig.ok("/v1/changes", {"after": str(own), "workspace": WS1}, token="all")
    assert spaces["changes"] == [] and spaces["next_after"] == _newest_change(rig.store)


async def test_revoked_tokens_stop_working_at_once(rig: ApiRig) -> None:
    assert (await rig.get("/v1/workspaces", token="ws1")).status == 200
    cfg = rig.runtime.config
    rig.runtime.config = replace(
        cfg, api=replace(cfg.api, tokens=tuple(t for t in cfg.api.tokens if t.name != "ws1"))
    )
    assert (await rig.get("/v1/workspaces", token="ws1")).status == 401
    assert (await rig.get("/v1/workspaces", token="all")).status == 200


async def test_a_long_poll_waiting_when_its_token_is_revoked_gets_nothing(rig: ApiRig) -> None:
    """A reload that removes a token revokes it at once: a long poll that token started
    before the reload gets a 401 when the next change wakes it, not the changes committed
    after the revocation. One whose token a reload narrows sees only what it may now."""
    from test_api_read import _apply_change, _some_id

    cfg = rig.runtime.config
    newest = rig.store.history(newest_first=True, limit=1)[0].id
    revoked = asyncio.create_task(
        rig.get("/v1/changes", {"after": str(newest), "wait": "10"}, token="ws1")
    )
    narrowed = asyncio.create_task(
        rig.ok("/v1/changes", {"after": str(newest), "wait": "10"}, token="ws12")
    )
    await asyncio.sleep(0.3)  # both wait
    rig.runtime.config = replace(
        cfg,
        api=replace(
            cfg.api,
            tokens=tuple(
                replace(t, workspaces=(WS1,)) if t.name == "ws12" else t
                for t in cfg.api.tokens
                if t.name != "ws1"
            ),
        ),
    )
    await asyncio.to_thread(_apply_change, rig.store, WS1, _some_id(rig.store, WS1), "FAILED", 31)
    await asyncio.to_thread(_apply_change, rig.store, WS2, _some_id(rig.store, WS2), "FAILED", 32)
    answer = await revoked
    assert answer.status == 401, answer
    body = await narrowed
    assert body["changes"] and {c["workspace_id"] for c in body["changes"]} == {WS1}


async def test_a_long_poll_whose_token_is_revoked_while_nothing_changes_gets_a_401(
    rig: ApiRig,
) -> None:
    """Revoked while it waits, and no change wakes it: when its wait runs out it gets a
    401 (it got an empty 200, and its cursor and the workspaces' freshness with it)."""
    cfg = rig.runtime.config
    newest = rig.store.history(newest_first=True, limit=1)[0].id
    revoked = asyncio.create_task(
        rig.get("/v1/changes", {"after": str(newest), "wait": "1"}, token="ws1")
    )
    await asyncio.sleep(0.3)  # it waits
    rig.runtime.config = replace(
        cfg, api=replace(cfg.api, tokens=tuple(t for t in cfg.api.tokens if t.name != "ws1"))
    )
    answer = await revoked
    assert answer.status == 401, answer


def test_tokens_are_compared_in_constant_time_against_every_token() -> None:
    tokens = token_configs()
    auth = Authenticator()
    real = hmac.compare_digest
    with mock.patch("hpo_sync.api.auth.hmac.compare_digest", side_effect=real) as spy:
        found = auth.match(tokens, TOKENS["all"][0])  # the first token
        assert found is not None and found.name == "all"
        assert spy.call_count == len(tokens)  # no early exit
        spy.reset_mock()
        assert auth.match(tokens, "nope") is None
        assert spy.call_count == len(tokens)
        # Digests of equal length whatever the token's length: no length leak.
        assert {len(c.args[0]) for c in spy.call_args_list} == {32}
    assert auth.match(tokens, "x" * 10_000) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("header", "loopback"),
    [
        ("127.0.0.1:8787", True),
        ("localhost", True),
        ("[::1]:8787", True),
        ("evil.example:8787", False),
        ("127.0.0.1.nip.io", False),
        ("", False),
        (None, False),
        ("[::1", False),
    ],
)
def test_loopback_host_headers(header: str | None, loopback: bool) -> None:
    assert host_header_is_loopback(header) is loopback


# --- the open loopback mode ---------------------------------------------------------------------


@pytest.fixture
async def open_rig(golden_mirror: Path, tmp_path: Path) -> Any:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    async with api_rig(db, tokens=()) as r:
        yield r


async def test_without_tokens_loopback_callers_read_without_one(open_rig: ApiRig) -> None:
    body = await open_rig.ok("/v1/experiments", {"limit": "2"}, token=None)
    assert len(body["experiments"]) == 2
    assert (await open_rig.get("/metrics", token=None)).status == 200
    ready = await open_rig.get("/readyz", token=None)
    assert "workspaces" in ready.body  # full details: everyone here sees everything
    assert (await open_rig.get(COMPAT, token=None)).status == 200


async def test_without_tokens_admin_routes_are_refused(open_rig: ApiRig) -> None:
    reply = await open_rig.post("/v1/sync", {"workspace": WS1}, token=None)
    assert reply.status == 403 and reply.error_code == "admin_required"
    assert open_rig.sync_requests == []


async def test_without_tokens_a_foreign_host_header_is_refused(open_rig: ApiRig) -> None:
    """A web page whose name was rebound to 127.0.0.1 sends its own Host header."""
    reply = await open_rig.get(
        "/v1/experiments", token=None, headers={"Host": "attacker.example:8787"}
    )
    assert reply.status == 403 and reply.error_code == "loopback_only"


async def test_without_tokens_the_api_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    store = Store.open(db)
    try:
        for listen in ("0.0.0.0:8787", "[::]:8787", "192.0.2.10:8787"):
            config = make_config(db, tokens=(), listen=listen)
            runtime = make_runtime(config, store, now=START, sync_requests=[])
            with pytest.raises(ConfigError, match=r"api\.listen.*not a loopback") as info:
                setup_read_api(build_app(runtime), runtime)
            assert "[[api.tokens]]" in str(info.value)
        # With tokens it may listen anywhere.
        config = make_config(db, listen="0.0.0.0:8787")
        runtime = make_runtime(config, store, now=START, sync_requests=[])
        app = build_app(runtime)
        setup_read_api(app, runtime)
        assert app[READ_API].listen_host == "0.0.0.0"
        await app[READ_API].close()
    finally:
        store.close()


async def test_tokens_removed_by_a_reload_on_a_wide_listener_lock_everything(
    golden_mirror: Path, tmp_path: Path
) -> None:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    async with api_rig(db, listen_host="0.0.0.0") as r:
        assert (await r.get("/v1/workspaces")).status == 200
        r.runtime.config = replace(r.runtime.config, api=replace(r.runtime.config.api, tokens=()))
        reply = await r.get("/v1/workspaces", token=None)
        assert reply.status == 401 and reply.error_code == "no_tokens_configured"
