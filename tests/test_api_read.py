"""The ``/v1`` routes against a real mirror synced from the simulator: every filter and sort
against a Python reading of the same rows, keyset paging while writes land between pages,
history and the change feed (long-poll included), workspaces, sync requests, errors, the
time budget, metrics, and reads that never wait for a sync."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
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
    mirror_rows,
    new_experiment,
    rig,
)

from hpo_sync.api.cursor import MAX_CURSOR_LEN, Cursor, _id_hash
from hpo_sync.api.openapi import build_document
from hpo_sync.api.read import MAX_LONG_POLLS_PER_TOKEN
from hpo_sync.normalise import format_time
from hpo_sync.runtime import WorkspaceHealth
from hpo_sync.store import Store

__all__ = ["golden_mirror", "rig"]  # fixtures, imported for pytest

Row = dict[str, Any]


def decoded(store: Store, where: str = "1") -> list[Row]:
    rows = mirror_rows(store, where)
    for r in rows:
        r["tags"] = json.loads(r["tags"])
        r["trial_status"] = json.loads(r["trial_status"])
    return rows


SORT_KEYS: dict[str, tuple[Callable[[Row], Any], bool]] = {
    "-created": (lambda r: (r["gmt_create_time"], r["experiment_id"]), True),
    "created": (lambda r: (r["gmt_create_time"], r["experiment_id"]), False),
    "-modified": (lambda r: (r["gmt_modified_time"], r["experiment_id"]), True),
    "modified": (lambda r: (r["gmt_modified_time"], r["experiment_id"]), False),
    "name": (lambda r: (r["name"], r["experiment_id"]), False),
    "-name": (lambda r: (r["name"], r["experiment_id"]), True),
}


def expected_ids(rows: list[Row], pred: Callable[[Row], bool], sort: str = "-created") -> list[str]:
    key, desc = SORT_KEYS[sort]
    return [r["experiment_id"] for r in sorted(filter(pred, rows), key=key, reverse=desc)]


async def walk(
    rig: ApiRig,
    params: list[tuple[str, str]],
    *,
    limit: int = 97,
    token: str = "all",
    between: Callable[[int], Any] | None = None,
) -> list[Row]:
    """Follow next_cursor to the end; ``between(page_no)`` runs between pages."""
    out: list[Row] = []
    cursor: str | None = None
    for page_no in range(10_000):
        p = [*params, ("limit", str(limit))] + ([("cursor", cursor)] if cursor else [])
        body = await rig.ok("/v1/experiments", p, token=token)
        assert len(body["experiments"]) <= limit
        out += body["experiments"]
        cursor = body["next_cursor"]
        if not body["has_more"]:
            assert cursor is None
            return out
        assert cursor
        if between is not None:
            await between(page_no)
    raise AssertionError("the walk did not end")


# --- listing ----------------------------------------------------------------------------------


async def test_default_page_is_50_newest_without_config_texts_and_says_how_fresh(
    rig: ApiRig,
) -> None:
    rows = decoded(rig.store)
    reply = await rig.get("/v1/experiments")
    assert reply.status == 200
    body = reply.body
    ids = [e["experiment_id"] for e in body["experiments"]]
    assert ids == expected_ids(rows, lambda r: not r["deleted"])[:50]
    assert body["has_more"] is True and body["next_cursor"]
    first = body["experiments"][0]
    assert "search_space" not in first and "raw" not in first
    by_id = {r["experiment_id"]: r for r in rows}
    row = by_id[first["experiment_id"]]
    for key in ("name", "status", "creator", "trial_status", "tags", "gmt_create_time"):
        assert first[key] == row[key], key
    # Freshness: the oldest last sync of the workspaces covered (all three here).
    states = rig.store.workspaces()
    last = min(max(s.last_full_ok_at or "", s.last_hot_ok_at or "") for s in states)
    fresh = body["freshness"]
    assert fresh["last_sync_at"] == last
    assert set(fresh["workspaces"]) == {WS1, WS2, WS3}
    now = rig.runtime.clock()
    age = (now - datetime.fromisoformat(last)).total_seconds()
    assert fresh["age_s"] == pytest.approx(age)
    assert fresh["as_of"] == format_time(now)
    assert reply.headers["X-Last-Sync"] == last
    assert reply.headers["X-Data-Age"] == str(int(age))


async def test_every_filter_matches_a_python_reading_of_the_mirror(rig: ApiRig) -> None:
    rows = decoded(rig.store)
    live = [r for r in rows if not r["deleted"]]
    ws1 = [r for r in live if r["workspace_id"] == WS1]
    creator = Counter(r["creator"] for r in ws1).most_common(1)[0][0]
    created = sorted(r["gmt_create_time"] for r in live)
    pivot = created[len(created) // 2]
    pivot_dt = datetime.fromisoformat(pivot)
    pivot_plus8 = pivot_dt.astimezone(timezone(timedelta(hours=8))).isoformat()
    modified_pivot = sorted(r["gmt_modified_time"] for r in live)[-40]
    day = (pivot_dt - timedelta(days=3)).date().isoformat()

    def tag(key: str, value: str | None = None) -> Callable[[Row], bool]:
        return lambda r: any(
            t["Key"] == key and (value is None or t["Value"] == value) for t in r["tags"]
        )

    def alive(pred: Callable[[Row], bool]) -> Callable[[Row], bool]:
        return lambda r: not r["deleted"] and pred(r)

    cases: list[tuple[str, list[tuple[str, str]], Callable[[Row], bool]]] = [
        ("workspace", [("workspace", WS1)], alive(lambda r: r["workspace_id"] == WS1)),
        (
            "two workspaces",
            [("workspace", WS1), ("workspace", WS3)],
            alive(lambda r: r["workspace_id"] in (WS1, WS3)),
        ),
        ("status", [("status", "RUNNING")], alive(lambda r: r["status"] == "RUNNING")),
        (
            "two statuses",
            [("status", "FAILED"), ("status", "USER_CANCELED")],
            alive(lambda r: r["status"] in ("FAILED", "USER_CANCELED")),
        ),
        ("name, any case", [("name", "BERT")], alive(lambda r: "bert" in r["name"].lower())),
        ("creator", [("creator", creator)], alive(lambda r: r["creator"] == creator)),
        ("tag with value", [("tag", "team:ml ops")], alive(tag("team", "ml ops"))),
        ("tag key only", [("tag", "priority")], alive(tag("priority"))),
        (
            "two tags",
            [("tag", "team:nlp"), ("tag", "env")],
            alive(lambda r: tag("team", "nlp")(r) and tag("env")(r)),
        ),
        (
            "created_after (inclusive)",
            [("created_after", pivot)],
            alive(lambda r: r["gmt_create_time"] >= pivot),
        ),
        (
            "created_before (exclusive), +08:00",
            [("created_before", pivot_plus8)],
            alive(lambda r: r["gmt_create_time"] < pivot),
        ),
        (
            "created_after, a date",
            [("created_after", day)],
            alive(lambda r: r["gmt_create_time"] >= f"{day}T00:00:00Z"),
        ),
        (
            "modified_after",
            [("modified_after", modified_pivot)],
            alive(lambda r: r["gmt_modified_time"] >= modified_pivot),
        ),
        ("include_deleted", [("include_deleted", "true")], lambda r: True),
        (
            "everything at once",
            [
                ("workspace", WS2),
                ("status", "FINISHED"),
                ("status", "FAILED"),
                ("tag", "team"),
                ("created_before", pivot),
                ("include_deleted", "false"),
            ],
            alive(
                lambda r: (
                    r["workspace_id"] == WS2
                    and r["status"] in ("FINISHED", "FAILED")
                    and tag("team")(r)
                    and r["gmt_create_time"] < pivot
                )
            ),
        ),
    ]
    for name, params, pred in cases:
        want = expected_ids(rows, pred)
        assert want, f"{name}: the case selects nothing; pick another value"
        got = [e["experiment_id"] for e in await walk(rig, params, limit=211)]
        assert got == want, name
        counted = await rig.ok("/v1/experiments", [*params, ("count", "true"), ("limit", "1")])
        by_status = Counter("null" if r["status"] is None else r["status"] for r in rows if pred(r))
        assert counted["count"] == {"total": len(want), "by_status": dict(by_status)}, name


async def test_fractions_of_a_second_keep_every_time_bound_exact(rig: ApiRig) -> None:
    """Stored times are whole seconds; a bound with a fraction must still mean exactly what
    it says (before: strictly before; after: at or after), in any zone."""
    live = [r for r in decoded(rig.store) if not r["deleted"]]
    # A created time that some experiment has, in the middle (one a second earlier too, if any).
    created = sorted({datetime.fromisoformat(r["gmt_create_time"]) for r in live})
    pivot_dt = next(
        (t for t in created[len(created) // 4 :] if t - timedelta(seconds=1) in created),
        created[len(created) // 2],
    )
    modified = sorted(r["gmt_modified_time"] for r in live)[-40]
    modified_dt = datetime.fromisoformat(modified)
    plus8 = timezone(timedelta(hours=8))

    def at(r: Row, column: str) -> datetime:
        return datetime.fromisoformat(r[column])

    for delta in (-1.5, -0.5, -0.000001, 0.25, 0.999999999, 1.5):
        bound = pivot_dt + timedelta(seconds=delta)
        for shown in (
            bound.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            bound.astimezone(plus8).isoformat(timespec="milliseconds"),
        ):
            if delta == 0.999999999:
                shown = shown.replace(".999", ".999999999").replace(".000000", "")
            before = {r["experiment_id"] for r in live if at(r, "gmt_create_time") < bound}
            after = {r["experiment_id"] for r in live if at(r, "gmt_create_time") >= bound}
            for param, want in (("created_before", before), ("created_after", after)):
                got = await walk(rig, [(param, shown)], limit=500)
                assert {e["experiment_id"] for e in got} == want, (param, shown)
        m_bound = modified_dt + timedelta(seconds=delta)
        m_shown = m_bound.isoformat(timespec="microseconds").replace("+00:00", "Z")
        m_want = {r["experiment_id"] for r in live if at(r, "gmt_modified_time") >= m_bound}
        got = await walk(rig, [("modified_after", m_shown)], limit=500)
        assert {e["experiment_id"] for e in got} == m_want, m_shown
    # The last second there is: rounding up would leave the calendar.
    reply = await rig.get("/v1/experiments", {"created_before": "9999-12-31T23:59:59.5Z"})
    assert reply.status == 400 and reply.body["error"]["param"] == "created_before"


@pytest.mark.parametrize("sort", list(SORT_KEYS))
async def test_every_sort_orders_by_its_key_then_id(rig: ApiRig, sort: str) -> None:
    rows = decoded(rig.store)
    got = [
        e["experiment_id"] for e in await walk(rig, [("sort", sort), ("workspace", WS2)], limit=500)
    ]
    assert got == expected_ids(rows, lambda r: not r["deleted"] and r["workspace_id"] == WS2, sort)


async def test_include_config_adds_the_config_texts(rig: ApiRig) -> None:
    body = await rig.ok("/v1/experiments", {"include_config": "true", "limit": "3"})
    for e in body["experiments"]:
        row = mirror_rows(rig.store, "experiment_id = ?", [e["experiment_id"]])[0]
        assert e["config_yml"] == row["config_yml"] and e["config_yml"]
        assert e["search_space"] == row["search_space"]


@pytest.mark.parametrize("sort", ["-created", "created", "name"])
async def test_paging_while_syncs_write_never_skips_or_repeats_a_row(
    rig: ApiRig, sort: str
) -> None:
    """Between pages: new experiments created before and after the cursor's position, and
    status and trial changes to experiments already served and not yet served."""
    rng = random.Random(sort)
    before = decoded(rig.store, f"workspace_id = '{WS1}' AND deleted = 0")
    times = sorted(r["gmt_create_time"] for r in before)
    run_id = rig.store.begin_run(WS1, "hot", "2030-01-01T00:00:00Z")
    tick = iter(range(1, 10_000))

    async def write(page_no: int) -> None:
        observed = format_time(datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=next(tick)))
        batch = []
        for i in range(4):
            t = datetime.fromisoformat(rng.choice(times)) + timedelta(seconds=rng.choice([-1, 1]))
            name = rng.choice(["aaa", "mmm", "zzz"]) + f"_new_{page_no}_{i}"
            batch.append(new_experiment(WS1, f"new-{sort}-{page_no}-{i}", t, name=name))
        for r in rng.sample(before, 6):
            changed = new_experiment(
                WS1,
                r["experiment_id"],
                datetime.fromisoformat(r["gmt_create_time"]),
                status=rng.choice(["FAILED", "RUNNING", "FINISHED"]),
                name=r["name"],
            )
            batch.append(changed)
        await asyncio.to_thread(
            rig.store.apply, WS1, batch, observed_at=observed, run_id=run_id, baseline=False
        )

    served = await walk(rig, [("workspace", WS1), ("sort", sort)], limit=37, between=write)
    ids = [e["experiment_id"] for e in served]
    assert len(ids) == len(set(ids)), "a row was served twice"
    missing = {r["experiment_id"] for r in before} - set(ids)
    assert not missing, f"{len(missing)} rows present for the whole walk were skipped"
    assert any(i.startswith("new-") for i in ids)  # some inserts landed ahead of the cursor


async def test_a_cursor_is_refused_with_other_filters_another_sort_or_when_malformed(
    rig: ApiRig,
) -> None:
    body = await rig.ok("/v1/experiments", [("status", "FINISHED"), ("limit", "5")])
    cursor = body["next_cursor"]
    ok = await rig.get(
        "/v1/experiments", [("status", "FINISHED"), ("limit", "9"), ("cursor", cursor)]
    )
    assert ok.status == 200  # another limit is fine
    decoded_cursor = Cursor.decode(cursor)
    bad = {
        "other filters": [("status", "FAILED"), ("cursor", cursor)],
        "no filters": [("cursor", cursor)],
        "another sort": [("status", "FINISHED"), ("sort", "created"), ("cursor", cursor)],
        "garbage": [("cursor", "not-a-cursor")],
        "bad characters": [("cursor", "abc$%")],
        "not JSON": [("cursor", "bm90IGpzb24")],
        "wrong version": [
            ("status", "FINISHED"),
            ("cursor", replace(decoded_cursor, sort="-created").encode().replace("A", "B", 1)),
        ],
        "too long": [("cursor", "A" * 1025)],
    }
    for name, params in bad.items():
        reply = await rig.get("/v1/experiments", params)
        assert reply.status == 400, name
        assert reply.body["error"]["param"] == "cursor", (name, reply.body)


async def test_rows_with_keys_too_long_for_a_cursor_are_paged_past_by_reference(
    rig: ApiRig,
) -> None:
    """Upstream bounds neither names nor ids: under sort=name a 300-character CJK name (900
    bytes) or a 2,000-character id cannot ride in a cursor that must fit in a URL. Every
    cursor issued is accepted, the walk serves every row once, in order; a cursor whose row
    is no longer where it was (the file rebuilt) is a 400, never a walk resumed elsewhere."""
    run_id = rig.store.begin_run(WS1, "hot", "2030-01-01T00:00:00Z")
    t = datetime(2030, 1, 1, tzinfo=UTC)
    long_ones = [
        new_experiment(WS1, f"long-name-{i}", t, name="名" * 300 + str(i)) for i in range(3)
    ] + [new_experiment(WS1, "i" * 2000 + str(i), t, name="名" * 300) for i in range(2)]
    rig.store.apply(
        WS1, long_ones, observed_at="2030-01-01T00:00:01Z", run_id=run_id, baseline=False
    )
    issued: list[str] = []
    for sort in ("name", "-name"):
        served: list[Row] = []
        cursor: str | None = None
        while True:
            params = [("workspace", WS1), ("sort", sort), ("limit", "1")]
            body = await rig.ok(
                "/v1/experiments", params + ([("cursor", cursor)] if cursor else [])
            )
            served += body["experiments"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
            assert len(cursor) <= MAX_CURSOR_LEN
            issued.append(cursor)
        ids = [e["experiment_id"] for e in served]
        expected = mirror_rows(rig.store, "workspace_id = ? AND deleted = 0", [WS1])
        assert sorted(ids) == sorted(r["experiment_id"] for r in expected)
        order = [(e["name"], e["experiment_id"]) for e in served]
        assert order == sorted(order, reverse=sort.startswith("-"))
    by_reference = [c for c in issued if Cursor.decode(c).row is not None]
    assert len(by_reference) >= 5
    first = Cursor.decode(by_reference[0])
    assert first.row is not None
    stale = replace(first, row=(10**9, *first.row[1:])).encode()
    params = [("workspace", WS1), ("sort", first.sort), ("cursor", stale)]
    reply = await rig.get("/v1/experiments", params)
    assert reply.status == 400 and reply.body["error"]["param"] == "cursor"
    assert "start over" in reply.body["error"]["message"]
    # A row renamed since its page was served sorts elsewhere now: resumed from there, the
    # walk skipped (or repeated) every row in between. The cursor is stale instead.
    walk = [("workspace", WS1), ("name", "名名名"), ("sort", "name")]  # the long ones alone
    page = await rig.ok("/v1/experiments", [*walk, ("limit", "1")])
    cursor = Cursor.decode(page["next_cursor"])
    assert cursor.row is not None and cursor.row[2]
    (last,) = page["experiments"]
    renamed = new_experiment(WS1, last["experiment_id"], t, name="zz" + "名" * 300)
    rig.store.apply(
        WS1, [renamed], observed_at="2030-01-01T00:00:02Z", run_id=run_id, baseline=False
    )
    params = [*walk, ("cursor", page["next_cursor"])]
    reply = await rig.get("/v1/experiments", params)
    assert reply.status == 400 and reply.body["error"]["param"] == "cursor", reply.body
    assert "renamed" in reply.body["error"]["message"]
    # a cursor made before key hashes (two members) is still taken, as it was
    old_style = replace(cursor, row=(*cursor.row[:2], "")).encode()
    params = [*walk, ("cursor", old_style)]
    assert (await rig.get("/v1/experiments", params)).status == 200


async def test_a_cursor_by_reference_finds_no_row_outside_the_tokens_workspaces(
    rig: ApiRig,
) -> None:
    """A cursor's row reference was looked up in the whole mirror: a token limited to WS1
    could forge one to a row of WS2 and learn from 200 against 400 whether that row held a
    given id, and where it sorted. Outside the query's workspaces it is a stale cursor,
    whatever it points at."""
    run_id = rig.store.begin_run(WS2, "hot", "2030-01-01T00:00:00Z")
    hidden = new_experiment(WS2, "hidden-one", datetime(2030, 1, 1, tzinfo=UTC), name="h" * 600)
    rig.store.apply(WS2, [hidden], observed_at="2030-01-01T00:00:01Z", run_id=run_id,
                    baseline=False)  # fmt: skip
    with sqlite3.connect(rig.store.path) as conn:
        (rowid,) = conn.execute(
            "SELECT rowid FROM experiments WHERE experiment_id = 'hidden-one'"
        ).fetchone()
    conn.close()
    own = await rig.ok("/v1/experiments", [("sort", "name"), ("limit", "1")], token="ws1")
    mine = Cursor.decode(own["next_cursor"])
    forged = replace(mine, key=None, row=(rowid, _id_hash("hidden-one"), "")).encode()
    params = [("sort", "name"), ("limit", "1"), ("cursor", forged)]
    reply = await rig.get("/v1/experiments", params, token="ws1")
    # the same answer as for a row that is not there at all
    assert reply.status == 400 and "start over" in reply.body["error"]["message"]


# --- one experiment and its history -------------------------------------------------------


async def test_one_experiment_with_config_and_deleted_ones_too(rig: ApiRig) -> None:
    row = decoded(rig.store, "deleted = 1")[0]
    body = await rig.ok(f"/v1/experiments/{row['experiment_id']}")
    exp = body["experiment"]
    assert exp["deleted"] is True and exp["config_yml"] == row["config_yml"]
    assert body["freshness"]["workspaces"].keys() == {row["workspace_id"]}
    lean = await rig.ok(f"/v1/experiments/{row['experiment_id']}", {"include_config": "false"})
    assert "config_yml" not in lean["experiment"]
    missing = await rig.get("/v1/experiments/no-such-id")
    assert missing.status == 404 and missing.error_code == "experiment_not_found"
    assert (await rig.get("/v1/experiments/" + "x" * 300)).status == 404


async def test_an_experiments_changes_are_its_history_decoded_and_paged(rig: ApiRig) -> None:
    history = rig.store.history(include_baseline=False)
    exp_id = Counter(c.experiment_id for c in history).most_common(1)[0][0]
    full = rig.store.history(exp_id)
    assert len(full) >= 3
    body = await rig.ok(f"/v1/experiments/{exp_id}/changes")
    assert [c["id"] for c in body["changes"]] == [c.id for c in full]
    assert body["has_more"] is False and body["next_after"] == full[-1].id
    for got, want in zip(body["changes"], full, strict=True):
        assert got["field"] == want.field and got["observed_at"] == want.observed_at
        if want.field == "TrialStatus":
            assert got["new_value"] == json.loads(want.new_value or "{}")
        elif want.field == "Deleted":
            assert got["new_value"] is (want.new_value == "true")
        else:
            assert got["new_value"] == want.new_value
        assert got["baseline"] is want.baseline and got["experiment_name"]
    page = await rig.ok(f"/v1/experiments/{exp_id}/changes", {"limit": "2"})
    assert [c["id"] for c in page["changes"]] == [c.id for c in full[:2]] and page["has_more"]
    rest = await rig.ok(f"/v1/experiments/{exp_id}/changes", {"after": str(page["next_after"])})
    assert [c["id"] for c in rest["changes"]] == [c.id for c in full[2:]]
    statuses = await rig.ok(f"/v1/experiments/{exp_id}/changes", {"field": "Status"})
    assert {c["field"] for c in statuses["changes"]} == {"Status"}
    assert (await rig.get("/v1/experiments/nope/changes")).status == 404


# --- the change feed --------------------------------------------------------------------------


async def test_the_change_feed_walks_every_change_in_id_order(rig: ApiRig) -> None:
    want = [c.id for c in rig.store.history()]
    got: list[int] = []
    after = 0
    while True:
        body = await rig.ok("/v1/changes", {"after": str(after), "limit": "500"})
        got += [c["id"] for c in body["changes"]]
        after = body["next_after"]
        if not body["has_more"]:
            break
    assert got == want
    ws2 = await rig.ok("/v1/changes", {"workspace": WS2, "field": "Deleted", "limit": "500"})
    assert [c["id"] for c in ws2["changes"]] == [
        c.id for c in rig.store.history(workspace=WS2, field="Deleted")
    ]
    assert ws2["freshness"]["workspaces"].keys() == {WS2}
    # Nothing new: next_after jumps to the newest id, so the next poll starts there.
    empty = await rig.ok(
        "/v1/changes", {"after": str(want[-1] - 1), "workspace": WS3, "field": "Deleted"}
    )
    assert empty["changes"] == [] or empty["changes"][0]["id"] == want[-1]
    if not empty["changes"]:
        assert empty["next_after"] == want[-1]


def _apply_change(store: Store, ws: str, exp_id: str, status: str, second: int) -> None:
    row = mirror_rows(store, "experiment_id = ?", [exp_id])[0]
    exp = new_experiment(
        ws, exp_id, datetime.fromisoformat(row["gmt_create_time"]), status=status, name=row["name"]
    )
    observed = format_time(datetime(2031, 1, 1, tzinfo=UTC) + timedelta(seconds=second))
    run = store.begin_run(ws, "hot", observed)
    store.apply(ws, [exp], observed_at=observed, run_id=run, baseline=False)


def _some_id(store: Store, ws: str, status: str = "FINISHED") -> str:
    where = "workspace_id = ? AND status = ? AND deleted = 0"
    return str(mirror_rows(store, where, [ws, status])[0]["experiment_id"])


async def test_long_poll_answers_as_soon_as_a_matching_change_commits(rig: ApiRig) -> None:
    newest = rig.store.history(newest_first=True, limit=1)[0].id
    ws1_id, ws2_id = _some_id(rig.store, WS1), _some_id(rig.store, WS2)

    async def writer() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(_apply_change, rig.store, WS2, ws2_id, "FAILED", 1)
        await asyncio.sleep(0.7)
        await asyncio.to_thread(_apply_change, rig.store, WS1, ws1_id, "FAILED", 2)

    task = asyncio.create_task(writer())
    started = time.monotonic()
    body = await rig.ok(
        "/v1/changes", {"after": str(newest), "wait": "20", "workspace": WS1, "field": "Status"}
    )
    elapsed = time.monotonic() - started
    await task
    assert [(c["experiment_id"], c["new_value"]) for c in body["changes"]] == [(ws1_id, "FAILED")]
    assert 0.9 < elapsed < 5, elapsed  # woke by the WS2 change, kept waiting for WS1's

    newest = rig.store.history(newest_first=True, limit=1)[0].id
    started = time.monotonic()
    quiet = await rig.ok("/v1/changes", {"after": str(newest), "wait": "1"})
    assert quiet["changes"] == [] and 0.9 < time.monotonic() - started < 3
    assert quiet["next_after"] == newest


def _gauge(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


@contextlib.asynccontextmanager
async def served(golden: Path, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """``hpo-sync serve`` in this process over a copy of the mirror: ``(its URL, the copy)``.
    It runs aiohttp as the daemon does: a handler whose client disconnects is not cancelled."""
    import shutil

    from hpo_sync.api.serve import serve

    db = tmp_path / "mirror.db"
    shutil.copy(golden, db)
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(make_config(db), on_ready=ready.set_result, stop=stop))
    try:
        yield await ready, db
    finally:
        stop.set()
        assert await server == 0


async def _waiting(session: Any, url: str) -> float:
    headers = {"Authorization": f"Bearer {TOKENS['all'][0]}"}
    async with session.get(url + "/metrics", headers=headers) as resp:
        return _gauge(await resp.text(), "hpo_sync_api_long_polls_waiting")


async def _until_waiting(session: Any, url: str, n: int) -> None:
    for _ in range(400):  # a generous bound: each look takes a few ms
        if await _waiting(session, url) == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {n} waiting, still {await _waiting(session, url)}")


async def test_a_long_poll_whose_client_went_away_frees_its_place(
    golden_mirror: Path, tmp_path: Path
) -> None:
    """Clients that open long polls and go away must not keep holding places, or the next
    long polls answer at once instead of waiting."""
    async with served(golden_mirror, tmp_path) as (url, db):
        await _long_polls_of_clients_gone(url, db)


async def test_a_feed_poll_of_the_web_ui_whose_client_went_away_frees_its_place(
    golden_mirror: Path, tmp_path: Path
) -> None:
    from hpo_sync.web.ui import COOKIE

    async with served(golden_mirror, tmp_path) as (url, _db), aiohttp.ClientSession() as session:
        async with session.post(
            url + "/ui/login",
            data={"token": TOKENS["ws1"][0], "next": "/ui/"},
            headers={"Origin": url},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            cookie = resp.cookies[COOKIE].value
        host, port = url.removeprefix("http://").rsplit(":", 1)
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /ui/changes/poll?after={2**40}&wait=25 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Cookie: {COOKIE}={cookie}\r\n\r\n".encode()
        )
        await writer.drain()
        await _until_waiting(session, url, 1)
        writer.close()
        await writer.wait_closed()
        await _until_waiting(session, url, 0)


async def _long_polls_of_clients_gone(url: str, db: Path) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    store = Store.open(db)
    newest = store.history(newest_first=True, limit=1)[0].id
    per_token = MAX_LONG_POLLS_PER_TOKEN

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[token][0]}"}

    async with aiohttp.ClientSession() as session:

        async def waiting() -> float:
            return await _waiting(session, url)

        async def until_waiting(n: int) -> None:
            await _until_waiting(session, url, n)

        def poll(token: str) -> asyncio.Task[Any]:
            async def get() -> Any:
                params = {"after": str(newest), "wait": "60"}
                async with session.get(
                    url + "/v1/changes", params=params, headers=auth(token)
                ) as r:
                    assert r.status == 200
                    return await r.json()

            return asyncio.create_task(get())

        # As many long polls as one token may hold, from clients that then go away.
        gone = []
        for _ in range(per_token):
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"GET /v1/changes?after={newest}&wait=60 HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {TOKENS['ws1'][0]}\r\n\r\n".encode()
            )
            await writer.drain()
            gone.append(writer)
        await until_waiting(per_token)
        # The token holds all its places: one more of its polls answers at once (the others
        # still wait: had it waited its 60 s, theirs would have ended too)...
        over = await poll("ws1")
        assert over["changes"] == [] and await waiting() == per_token
        for writer in gone:
            writer.close()
            await writer.wait_closed()
        await until_waiting(0)
        # ...and once they are gone, its next long poll waits for the change that ends it.
        ws1_poll = poll("ws1")
        await until_waiting(1)
        exp_id = _some_id(store, WS1)
        await asyncio.to_thread(_apply_change, store, WS1, exp_id, "FAILED", 31)
        body = await ws1_poll
        assert [c["experiment_id"] for c in body["changes"] if c["field"] == "Status"] == [exp_id]
        await until_waiting(0)
        metrics = await (await session.get(url + "/metrics", headers=auth("all"))).text()
    store.close()
    # The polls whose clients left are counted as such (499), not as answered.
    assert _sample(metrics, "hpo_sync_api_requests_total", route="/v1/changes", status="499") == (
        per_token
    )


# --- workspaces and sync requests ------------------------------------------------------------


async def test_workspaces_show_counts_sync_times_errors_and_age(rig: ApiRig) -> None:
    rig.store.set_workspace_error(WS3, "Throttling.User: slow down", "2030-01-01T00:00:00.500Z")
    body = await rig.ok("/v1/workspaces")
    got = {w["workspace_id"]: w for w in body["workspaces"]}
    assert list(got) == [WS1, WS2, WS3]
    for ws, w in got.items():
        assert w["counts_by_status"] == {
            k: v for k, v in sorted(rig.store.counts_by_status(ws).items()) if k
        }
        assert w["experiments"] == sum(w["counts_by_status"].values())
        assert w["deleted"] == len(mirror_rows(rig.store, "workspace_id = ? AND deleted = 1", [ws]))
        state = rig.store.workspace_state(ws)
        assert state is not None
        assert w["last_full_sync_at"] == state.last_full_ok_at
        assert w["label"] == f"team {ws}" and w["configured"] is True
        assert w["data_age_s"] == body["freshness"]["workspaces"][ws]["age_s"]
    assert got[WS3]["failing"] is True and got[WS3]["last_error"].startswith("Throttling")
    assert got[WS1]["failing"] is False and got[WS1]["last_error"] is None


async def test_a_workspace_whose_failures_the_mirror_could_not_record_shows_failing(
    rig: ApiRig,
) -> None:
    """A sweep that fails because the mirror cannot be written (a full disk) records its
    error nowhere but in the daemon's own health: /v1/workspaces said such a workspace
    was fine (`failing` false, no error) while its sweeps failed in a row."""
    at = datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)
    error = "the sweep could not start: record a sync run failed: database or disk is full"
    rig.runtime.health[WS1] = WorkspaceHealth(
        WS1, consecutive_failures=3, last_error=error, last_sweep_at=at
    )
    got = {w["workspace_id"]: w for w in (await rig.ok("/v1/workspaces"))["workspaces"]}
    assert (got[WS1]["failing"], got[WS1]["last_error"]) == (True, error)
    assert got[WS1]["last_error_at"] == "2030-01-01T00:00:05Z"
    assert got[WS1]["consecutive_failures"] == 3
    rig.runtime.health[WS1] = WorkspaceHealth(WS1, last_error=error, last_sweep_at=at)
    got = {w["workspace_id"]: w for w in (await rig.ok("/v1/workspaces"))["workspaces"]}
    assert (got[WS1]["failing"], got[WS1]["last_error"]) == (False, None)  # recovered


async def test_sync_now_queues_a_sweep_for_admins(rig: ApiRig) -> None:
    reply = await rig.post("/v1/sync", {"workspace": WS2, "mode": "full"}, token="admin")
    assert reply.status == 202 and reply.body["queued"] == {"workspace": WS2, "mode": "full"}
    assert rig.sync_requests == [(WS2, "full")]
    assert (await rig.post("/v1/sync", {"workspace": WS1}, token="admin")).status == 202
    assert rig.sync_requests[-1] == (WS1, "auto")
    unknown = await rig.post("/v1/sync", {"workspace": "999"}, token="admin")
    assert unknown.status == 404 and unknown.error_code == "unknown_workspace"
    bad_mode = await rig.post("/v1/sync", {"workspace": WS1, "mode": "warm"}, token="admin")
    assert bad_mode.status == 400 and bad_mode.body["error"]["param"] == "mode"
    no_ws = await rig.post("/v1/sync", token="admin")
    assert no_ws.status == 400 and no_ws.body["error"]["param"] == "workspace"
    assert (await rig.get("/v1/sync", {"workspace": WS1}, token="admin")).status == 405
    assert len(rig.sync_requests) == 2


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/experiments", {"created_after": "yesterday"}, "created_after"),
        ("/v1/experiments", {"created_before": "2025-13-01"}, "created_before"),
        ("/v1/experiments", {"modified_after": "2025-01-01T25:00:00Z"}, "modified_after"),
        ("/v1/experiments", {"sort": "size"}, "sort"),
        ("/v1/experiments", {"limit": "0"}, "limit"),
        ("/v1/experiments", {"limit": "501"}, "limit"),
        ("/v1/experiments", {"limit": "-1"}, "limit"),
        ("/v1/experiments", {"limit": "1e3"}, "limit"),
        ("/v1/experiments", {"status": "running"}, "status"),
        ("/v1/experiments", {"status": ""}, "status"),
        ("/v1/experiments", {"tag": ":value"}, "tag"),
        ("/v1/experiments", {"include_deleted": "yes"}, "include_deleted"),
        ("/v1/experiments", {"stauts": "RUNNING"}, "stauts"),
        ("/v1/experiments", [("limit", "5"), ("limit", "6")], "limit"),
        ("/v1/experiments", {"name": "x" * 201}, "name"),
        # SQLite's LIKE stops at a NUL: "bert\0zzz" would match every name containing "bert"
        ("/v1/experiments", {"name": "bert\x00zzz"}, "name"),
        ("/v1/experiments", {"name": "bert\x1b[0m"}, "name"),
        ("/v1/experiments", {"name": "bert\x7f"}, "name"),
        ("/v1/experiments", {"creator": "u\x00"}, "creator"),
        ("/v1/experiments", {"tag": "team:nlp\x00"}, "tag"),
        ("/v1/experiments", {"workspace": "a b"}, "workspace"),
        ("/v1/experiments", {"workspace": "9" * 129}, "workspace"),
        ("/v1/changes", {"workspace": "a\tb"}, "workspace"),
        ("/v1/experiments", [("status", "RUNNING")] * 21, "status"),
        ("/v1/changes", {"after": "-5"}, "after"),
        ("/v1/changes", {"after": "99999999999999999999"}, "after"),
        ("/v1/changes", {"wait": "61"}, "wait"),
        ("/v1/changes", {"field": "Name"}, "field"),
        ("/v1/workspaces", {"x": "1"}, "x"),
        # the routes outside /v1 take no parameter either, and say so the same way
        ("/healthz", {"probe": "1"}, "probe"),
        ("/readyz", {"verbose": "1"}, "verbose"),
        ("/metrics", {"name[]": "hpo_sync_up"}, "name[]"),
        ("/openapi.json", {"version": "3"}, "version"),
        ("/v1/experiments/abc", {"include_config": "1"}, "include_config"),
    ],
)
async def test_bad_input_is_a_400_naming_the_parameter(
    rig: ApiRig, path: str, params: Any, param: str
) -> None:
    reply = await rig.get(path, params)
    assert reply.status == 400, reply.text
    assert reply.body["error"]["param"] == param
    assert reply.body["error"]["code"] == "bad_parameter"
    assert param in reply.body["error"]["message"]


_MALFORMED = "has a malformed percent-escape (a % not followed by two hex digits)"


@pytest.mark.parametrize(
    ("query", "param", "problem"),
    [
        ("name=%FF", "name", "is not valid UTF-8"),
        ("creator=%ED%A0%80", "creator", "is not valid UTF-8"),
        ("limit=5&tag=k%C3:v", "tag", "is not valid UTF-8"),
        # (taken as they stand: a search for "%zz", a 200 with nothing in it)
        ("name=%zz", "name", _MALFORMED),
        ("limit=5&name=50%", "name", _MALFORMED),
        ("creator=%4", "creator", _MALFORMED),
    ],
)
async def test_a_value_that_is_not_utf8_is_a_400_not_a_search(
    rig: ApiRig, query: str, param: str, problem: str
) -> None:
    """aiohttp decodes bytes that are not UTF-8 to U+FFFD: without this check, name=%FF was
    a search for that character, a 200 with nothing in it."""
    from yarl import URL

    async def as_written(target: str) -> tuple[int, Any]:
        """(a client's URL encoder would send a lone % as %25)"""
        url = URL(f"http://{rig.server.host}:{rig.server.port}{target}", encoded=True)
        headers = {"Authorization": f"Bearer {TOKENS['all'][0]}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
            return resp.status, await resp.json()

    status, body = await as_written(f"/v1/experiments?{query}")
    assert status == 400, body
    assert body["error"] == {"code": "bad_parameter", "message": f"{param}: {problem}",
                             "param": param}  # fmt: skip
    # the upstream-compatible route, in the upstream's error shape
    status, body = await as_written(
        f"/api/automl/v1/hpo/experiments?{query.replace('name', 'Name')}"
    )
    assert status == 400 and body["Code"] == "INVALID_INPUT_PARAMS", body


@pytest.mark.parametrize("workspace", ["团队/nlp#1", "ws:a.b_c-d", "9" * 128, "a+b%20c", "100001"])
async def test_every_workspace_the_config_takes_can_be_named(rig: ApiRig, workspace: str) -> None:
    """The workspace parameter takes the ids a config takes (printable, no spaces, at most
    128 characters), so no configured workspace is out of the API's reach."""
    from hpo_sync.config import _WORKSPACE_ID_RE

    assert _WORKSPACE_ID_RE.fullmatch(workspace)
    listed = await rig.ok("/v1/experiments", {"workspace": workspace, "limit": "1"})
    assert (listed["experiments"] != []) == (workspace == WS1)
    await rig.ok("/v1/changes", {"workspace": workspace, "limit": "1"})


async def test_an_experiment_with_a_very_long_id_is_reachable(rig: ApiRig) -> None:
    """Upstream bounds no id: what the list serves, the detail routes find; an id that is
    not there is a 404 whose message does not echo it whole."""
    run_id = rig.store.begin_run(WS1, "hot", "2030-01-01T00:00:00Z")
    t = datetime(2030, 1, 1, tzinfo=UTC)
    exp_id = "i" * 2000
    rig.store.apply(
        WS1, [new_experiment(WS1, exp_id, t)], observed_at="2030-01-01T00:00:01Z",
        run_id=run_id, baseline=False,
    )  # fmt: skip
    assert (await rig.ok(f"/v1/experiments/{exp_id}"))["experiment"]["experiment_id"] == exp_id
    history = await rig.ok(f"/v1/experiments/{exp_id}/changes")
    assert history["changes"][0]["field"] == "Status"
    missing = await rig.get(f"/v1/experiments/{exp_id}x")
    assert missing.status == 404 and missing.error_code == "experiment_not_found"
    assert len(missing.body["error"]["message"]) < 200


async def test_a_tag_key_holding_a_colon_can_be_filtered(rig: ApiRig) -> None:
    """``tag=KEY:VALUE`` splits at the first colon, so a key like ``acs:rm:rgId`` (Alibaba
    Cloud's system tags) could not be asked for: a tag whose ``Key:Value`` reads the
    parameter matches, or one whose key is all of it (any value: ``tag=acs:rm:rgId``
    found nothing), and nothing else does."""
    rows = mirror_rows(rig.store, "workspace_id = ? AND deleted = 0", [WS1])[:2]
    with sqlite3.connect(rig.store.path) as conn:
        conn.execute(
            "UPDATE experiments SET tags = ? WHERE experiment_id = ?",
            ('[{"Key":"acs:rm:rgId","Value":"rg-1"}]', rows[0]["experiment_id"]),
        )
        conn.execute(
            "UPDATE experiments SET tags = ? WHERE experiment_id = ?",
            ('[{"Key":"acs","Value":"rm:rgId:rg-10"}]', rows[1]["experiment_id"]),
        )
    found = await rig.ok("/v1/experiments", {"tag": "acs:rm:rgId:rg-1"})
    assert [e["experiment_id"] for e in found["experiments"]] == [rows[0]["experiment_id"]]
    found = await rig.ok("/v1/experiments", {"tag": "acs:rm:rgId:rg-10"})
    assert [e["experiment_id"] for e in found["experiments"]] == [rows[1]["experiment_id"]]
    assert (await rig.ok("/v1/experiments", {"tag": "acs:rm"}))["experiments"] == []
    found = await rig.ok("/v1/experiments", {"tag": "acs:rm:rgId"})  # the key, any value
    assert [e["experiment_id"] for e in found["experiments"]] == [rows[0]["experiment_id"]]


async def test_unknown_routes_methods_and_big_bodies_get_json_errors(rig: ApiRig) -> None:
    missing = await rig.get("/v1/nope")
    assert missing.status == 404 and missing.error_code == "not_found"
    wrong = await rig.request("DELETE", "/v1/experiments")
    assert wrong.status == 405 and wrong.error_code == "method_not_allowed"
    assert "GET" in wrong.headers["Allow"]
    big = await rig.request("POST", "/v1/sync", {"workspace": WS1}, token="admin", data=b"x" * 5000)
    assert big.status == 413 and big.error_code == "payload_too_large"
    long_query = await rig.get("/v1/experiments", {"name": "x" * 5000})
    assert long_query.status == 400
    # CONNECT (a proxy's method) has no body, though aiohttp reads the rest of the
    # connection as one: not a 413, but what any other unknown target gets
    reader, writer = await asyncio.open_connection(rig.server.host, rig.server.port)
    writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert re.match(rb"HTTP/1\.1 40[45] ", head), head


@pytest.fixture
def json_logs() -> Any:
    """The service's logging (``logs.configure``, JSON) into a buffer, restored after."""
    import io
    import logging

    import structlog

    from hpo_sync import logs

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()

    def configure(level: str) -> io.StringIO:
        buffer.seek(0)
        buffer.truncate()
        logs.configure(level, "json", stream=buffer)
        return buffer

    yield configure
    root.handlers[:], level = saved
    root.setLevel(level)
    structlog.reset_defaults()


async def test_requests_the_http_parser_refuses_are_no_server_errors_in_the_log(
    rig: ApiRig, json_logs: Any
) -> None:
    garbage = (
        b"GET /v1/experiments?" + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP at all\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n",
        # refused for what follows a token: the log gives the reason, never the line
        b"GET /v1/experiments?BearerToken=S3CRET-IN-QUERY&name=a b HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer S3CRET-IN-HEADER\x00\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nAuthorization : Bearer S3CRET-IN-HEADER\r\n\r\n",
        # an absolute-form target aiohttp cannot read: its message is the URL itself
        b"GET http://127.0.0.1:99999/v1/experiments?BearerToken=S3CRET-IN-URL HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n\r\n",
        b"GET http://[::1/v1/experiments?BearerToken=S3CRET-IN-URL HTTP/1.1\r\n\r\n",
    )
    for level, shown in (("info", True), ("warning", False)):
        buffer = json_logs(level)
        for request in garbage:
            reader, writer = await asyncio.open_connection(rig.server.host, rig.server.port)
            writer.write(request)
            await writer.drain()
            answer = await reader.read()  # the server answers, then closes
            writer.close()
            await writer.wait_closed()
            assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer[:80]
        records = [json.loads(line) for line in buffer.getvalue().splitlines()]
        assert not [r for r in records if r["level"] in ("error", "critical")], records
        assert not [r for r in records if "exception" in r or "Traceback" in str(r)], records
        refused = [r for r in records if "malformed HTTP request" in r["event"]]
        # (aiohttp logs bytes that are not HTTP at all, TLS say, at debug already)
        assert bool(refused) == shown, records
        assert all(r["level"] == "info" for r in refused)
        assert "S3CRET" not in buffer.getvalue()
        if shown:
            reasons = " | ".join(r["event"] for r in refused)
            assert "Invalid header value char" in reasons and "Bad status line" in reasons


async def test_a_query_over_its_time_budget_is_stopped_with_a_503(
    golden_mirror: Path, tmp_path: Path
) -> None:
    import shutil
    import sqlite3

    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    # Enough rows that the tag filter's scan runs well past one budget check.
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)"
            " INSERT INTO experiments (experiment_id, workspace_id, name, status, tags,"
            " gmt_create_time, first_seen_at, last_seen_at, last_changed_at)"
            " SELECT 'bulk-' || i, ?, 'bulk', 'RUNNING', '[{\"Key\":\"team\",\"Value\":\"cv\"}]',"
            " '2025-01-01T00:00:00Z', '2025-01-01T00:00:00Z', '2025-01-01T00:00:00Z',"
            " '2025-01-01T00:00:00Z' FROM n",
            (WS1,),
        )
    conn.close()
    async with api_rig(db, query_timeout_s=1e-9) as r:
        reply = await r.get("/v1/experiments", {"count": "true", "tag": "team:nlp"})
        assert reply.status == 503 and reply.error_code == "query_timeout"
        assert (await r.get("/healthz")).status == 200
    conn = sqlite3.connect(db)
    nlp = conn.execute(
        "SELECT count(*) FROM experiments WHERE deleted = 0 AND EXISTS (SELECT 1 FROM"
        " json_each(tags) t WHERE json_extract(t.value, '$.Key') = 'team'"
        " AND json_extract(t.value, '$.Value') = 'nlp')"
    ).fetchone()[0]
    conn.close()
    assert nlp > 0
    async with api_rig(db) as r:  # the same query within the default budget
        reply = await r.get("/v1/experiments", {"count": "true", "tag": "team:nlp"})
        assert reply.status == 200 and reply.body["count"]["total"] == nlp


# --- reads never wait for a sync --------------------------------------------------------------


async def test_reads_answer_while_a_large_apply_holds_the_write_lock(rig: ApiRig) -> None:
    """A 3,000-experiment batch is applied in a worker thread; its change hook (which runs
    inside the transaction, holding SQLite's write lock and the store's writer lock) blocks
    until the requests below have answered."""
    inside = threading.Event()
    release = threading.Event()

    def hook(_conn: Any, _rows: Any) -> None:
        inside.set()
        assert release.wait(30), "the test never released the writer"

    batch = [new_experiment(WS1, f"bulk-{i}", START + timedelta(seconds=i)) for i in range(3000)]
    run = rig.store.begin_run(WS1, "full", "2032-01-01T00:00:00Z")
    writer = asyncio.create_task(
        asyncio.to_thread(
            rig.store.apply,
            WS1,
            batch,
            observed_at="2032-01-01T00:00:00Z",
            run_id=run,
            baseline=False,
            on_changes=hook,
        )
    )
    try:
        assert await asyncio.to_thread(inside.wait, 30)
        started = time.monotonic()
        lists = await rig.ok("/v1/experiments", {"workspace": WS1, "count": "true"})
        one = await rig.ok(f"/v1/experiments/{lists['experiments'][0]['experiment_id']}")
        feed = await rig.ok("/v1/changes", {"limit": "10"})
        spaces = await rig.ok("/v1/workspaces")
        compat = await rig.ok("/api/automl/v1/hpo/experiments", {"PageSize": "5"})
        elapsed = time.monotonic() - started
        assert not writer.done(), "the apply finished early: the test proves nothing"
        assert elapsed < 2, elapsed
        # The readers saw the snapshot before the batch.
        assert not any(e["experiment_id"].startswith("bulk-") for e in lists["experiments"])
        assert one and feed and spaces and compat
    finally:
        release.set()
        await writer
    assert (await rig.ok("/v1/experiments/bulk-2999"))["experiment"]["workspace_id"] == WS1


# --- metrics and the document -----------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_by_route_and_status_and_time_them(rig: ApiRig) -> None:
    before = (await rig.get("/metrics")).text
    for _ in range(3):
        await rig.get("/v1/experiments", {"limit": "1"})
    await rig.get("/v1/experiments", {"limit": "0"})
    await rig.get("/v1/nope")
    await rig.get("/v1/workspaces", token=None)
    after = (await rig.get("/metrics")).text
    name = "hpo_sync_api_requests_total"

    def delta(**labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta(route="/v1/experiments", method="GET", status="200") == 3
    assert delta(route="/v1/experiments", method="GET", status="400") == 1
    assert delta(route="unmatched", method="GET", status="404") == 1
    assert delta(route="/v1/workspaces", method="GET", status="401") == 1
    count = "hpo_sync_api_request_duration_seconds_count"
    assert (
        _sample(after, count, route="/v1/experiments")
        - _sample(before, count, route="/v1/experiments")
        == 4
    )
    assert "hpo_sync_sweeps" in after  # the daemon's own registry, shared


async def test_a_wrong_method_on_a_known_route_is_counted_under_that_route(rig: ApiRig) -> None:
    """The README: the route label is the path template, 'unmatched' only for unknown
    paths. A 405 comes from a known path, so it is counted there (and an operator can see
    which route gets the POSTs)."""
    before = (await rig.get("/metrics")).text
    assert (await rig.request("POST", "/v1/experiments")).status == 405
    assert (await rig.request("DELETE", "/v1/experiments/some-id")).status == 405
    assert (await rig.request("GET", "/v1/sync")).status == 405
    assert (await rig.request("POST", "/v1/nope")).status in (404, 405)
    after = (await rig.get("/metrics")).text
    name = "hpo_sync_api_requests_total"

    def delta(**labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    def count(text: str, route: str, method: str) -> float:  # a route may hold braces
        series = f'{name}{{method="{method}",route="{route}",status="405"}} '
        found = [ln for ln in text.splitlines() if ln.startswith(series)]
        return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

    assert delta(route="/v1/experiments", method="POST", status="405") == 1
    id_route = "/v1/experiments/{id}"
    assert count(after, id_route, "DELETE") - count(before, id_route, "DELETE") == 1
    assert delta(route="/v1/sync", method="GET", status="405") == 1
    assert delta(route="unmatched", method="POST") == 1


async def test_the_openapi_document_describes_every_route_and_parameter(rig: ApiRig) -> None:
    doc = await rig.ok("/openapi.json", token=None)
    assert doc == json.loads(json.dumps(build_document()))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in rig.app.router.routes()
        if route.resource is not None
    }
    documented = {
        (method, re.sub(r"\{(\w+)\}", r"{\1}", path))
        for path, ops in doc["paths"].items()
        for method in ops
    }
    assert served == documented  # HEAD included: aiohttp answers it on every GET route
    # Every status the server gives an operation is documented for it: a plain call, one
    # without a token, an over-long query string, a body, and another method on its path.
    for path, ops in doc["paths"].items():
        url = path.replace("{id}", "nope")
        for method, op in ops.items():
            probes: list[tuple[str, Any, bytes | None, str | None, str]] = [
                (method, (), None, "admin", "plain"),
                (method, (), None, None, "no token"),
                (method, {"q": "x" * 5000}, None, "admin", "long query"),
                (method, (), b"x" * 2048, "admin", "body"),
                ("PATCH", (), None, "admin", "another method"),
            ]
            for verb, params, data, token, what in probes:
                reply = await rig.request(verb.upper(), url, params, token=token, data=data)
                assert str(reply.status) in op["responses"], (method, path, what, reply.status)
                if reply.status == 405:
                    assert "Allow" in op["responses"]["405"].get("headers", {}), path
    # Every documented parameter of a /v1 GET is accepted (not an "unknown parameter").
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1/") or "get" not in ops:
            continue
        url = path.replace("{id}", "nope")
        for p in ops["get"].get("parameters", []):
            if p["in"] != "query":
                continue
            reply = await rig.get(url, {p["name"]: "\x01"})
            if reply.status == 400:
                assert "unknown parameter" not in reply.body["error"]["message"], p["name"]
