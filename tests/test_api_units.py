"""Pure parts of the read API: cursors, parameter validation, freshness, the SQL of the
upstream-compatible route. No server, no database."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict

from hpo_sync.api.compat import compat_sql
from hpo_sync.api.cursor import Cursor, CursorError, filters_hash
from hpo_sync.api.errors import BadParameterError
from hpo_sync.api.openapi import EXPERIMENTS_PARAMS, parse_params
from hpo_sync.api.read import ChangeWatcher, filter_identity, freshness
from hpo_sync.store import ExperimentFilter, WorkspaceState
from hpo_sync.upstream_query import InvalidInputError, parse_query

keys = st.tuples(st.one_of(st.none(), st.text(max_size=40)), st.text(min_size=1, max_size=40))


@given(
    sort=st.sampled_from(["-created", "created", "name"]),
    key=keys,
    fhash=st.text("0123456789abcdef", min_size=16, max_size=16),
)
def test_a_cursor_round_trips_and_is_url_safe(
    sort: str, key: tuple[str | None, str], fhash: str
) -> None:
    cursor = Cursor(sort, fhash, key)
    text = cursor.encode()
    assert text.replace("-", "").replace("_", "").isalnum()
    assert Cursor.decode(text) == cursor
    cursor.check(sort, fhash)


def test_a_key_too_long_to_carry_goes_by_reference_to_its_row() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE experiments (experiment_id TEXT PRIMARY KEY, name TEXT)")
    long_id, long_name = "x" * 600, "名" * 300
    conn.executemany(
        "INSERT INTO experiments VALUES (?, ?)",
        [("short", "a"), ("s2", long_name), (long_id, "b")],
    )
    short = Cursor.after(conn, "name", "f" * 16, ("a", "short"))
    assert short.key == ("a", "short") and short.row is None
    for key in ((long_name, "s2"), ("b", long_id)):
        exp_id = key[1]
        rowid = conn.execute(
            "SELECT rowid FROM experiments WHERE experiment_id = ?", (exp_id,)
        ).fetchone()[0]
        cursor = Cursor.after(conn, "name", "f" * 16, key)
        assert cursor.key is None and cursor.row is not None and cursor.row[0] == rowid
        text = cursor.encode()
        assert len(text) < 200 and Cursor.decode(text) == cursor
        # resumes after the row's key as it is now
        assert (
            cursor.resolve(conn, "name")
            == conn.execute(
                "SELECT name, experiment_id FROM experiments WHERE rowid = ?", (rowid,)
            ).fetchone()
        )
    # a row renumbered (another id at that rowid) or gone: stale, never another position
    # a row renamed since: it sorts elsewhere, and resuming there would skip (or repeat)
    # every row in between
    renamed = Cursor.after(conn, "name", "f" * 16, (long_name, "s2"))
    conn.execute("UPDATE experiments SET name = 'zz' WHERE experiment_id = 's2'")
    with pytest.raises(CursorError, match="renamed"):
        renamed.resolve(conn, "name")
    moved = Cursor.after(conn, "name", "f" * 16, ("b", long_id))
    conn.execute("DELETE FROM experiments WHERE experiment_id = ?", (long_id,))
    conn.execute("INSERT INTO experiments (rowid, experiment_id, name) VALUES (?, 'z', 'z')",
                 (moved.row[0],))  # fmt: skip
    with pytest.raises(CursorError, match="start over"):
        moved.resolve(conn, "name")


@given(st.text(max_size=200))
def test_no_text_decodes_into_anything_but_a_cursor_or_a_cursor_error(text: str) -> None:
    try:
        cursor = Cursor.decode(text)
    except CursorError:
        return
    if cursor.key is not None:
        assert isinstance(cursor.key[1], str) and cursor.key[1]
    else:
        assert cursor.row is not None and isinstance(cursor.row[0], int)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_any_json_payload_is_a_cursor_error_unless_well_formed(payload: object) -> None:
    text = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(CursorError):
        Cursor.decode(text)


@pytest.mark.parametrize("rowid", [2**63, 2**64 - 1, 0, -1, -(2**63) - 1])
def test_a_cursor_by_reference_to_no_possible_rowid_is_a_cursor_error(rowid: int) -> None:
    """SQLite's rowids are 1 … 2**63 - 1; orjson reads integers up to 2**64 - 1, and
    SQLite refused those beyond its range with an OverflowError (a 500 for a forged
    cursor, not the 400 of any other bad cursor)."""
    payload = {"v": 1, "s": "-created", "f": "24aaae00ec1a6f2c", "r": [rowid, "0" * 16]}
    text = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    with pytest.raises(CursorError, match="malformed cursor"):
        Cursor.decode(text)


def test_the_filter_hash_ignores_order_but_not_content() -> None:
    a = ExperimentFilter(
        workspaces=("1", "2"), statuses=("RUNNING", "FAILED"), tags=(("team", "nlp"), ("env", None))
    )
    b = ExperimentFilter(
        workspaces=("2", "1"), statuses=("FAILED", "RUNNING"), tags=(("env", None), ("team", "nlp"))
    )
    assert filters_hash(filter_identity(a)) == filters_hash(filter_identity(b))
    for other in (
        ExperimentFilter(workspaces=("1",), statuses=a.statuses, tags=a.tags),
        ExperimentFilter(
            workspaces=a.workspaces, statuses=a.statuses, tags=(("team", "nlp"), ("env", ""))
        ),
        ExperimentFilter(
            workspaces=a.workspaces, statuses=a.statuses, tags=a.tags, include_deleted=True
        ),
    ):
        assert filters_hash(filter_identity(other)) != filters_hash(filter_identity(a))


def test_parameters_are_converted_and_defaulted() -> None:
    q = parse_params(
        EXPERIMENTS_PARAMS,
        MultiDict(
            [
                ("status", "RUNNING"),
                ("status", "FAILED"),
                ("tag", "team:ml ops"),
                ("tag", "env"),
                ("tag", "k:"),
                ("created_after", "2026-11-01T16:30:00+08:00"),
                ("created_before", "2026-11-02"),
                ("limit", "007"),
            ]
        ),
    )
    assert q["status"] == ["RUNNING", "FAILED"]
    assert q["tag"] == [("team", "ml ops"), ("env", None), ("k", "")]
    assert q["created_after"] == "2026-11-01T08:30:00Z"
    assert q["created_before"] == "2026-11-02T00:00:00Z"
    assert (q["limit"], q["sort"], q["include_deleted"], q["cursor"]) == (
        7,
        "-created",
        False,
        None,
    )


@given(
    st.dictionaries(
        st.sampled_from([p.name for p in EXPERIMENTS_PARAMS] + ["x", "Limit"]),
        st.text(max_size=30),
        max_size=6,
    )
)
def test_any_query_validates_or_names_the_bad_parameter(query: dict[str, str]) -> None:
    try:
        parse_params(EXPERIMENTS_PARAMS, MultiDict(query))
    except BadParameterError as exc:
        assert exc.param in query or exc.param == "query"
        assert exc.status == 400 and exc.message.startswith(f"{exc.param}: ")


def _state(ws: str, full: str | None, hot: str | None) -> WorkspaceState:
    return WorkspaceState(ws, None, None, full, hot, None, None, None)


def test_freshness_is_the_oldest_last_sync_of_the_workspaces_covered() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    states = [
        _state("a", "2026-01-01T11:00:00Z", "2026-01-01T11:59:30.250Z"),
        _state("b", "2026-01-01T10:00:00Z", None),
        _state("c", None, None),
    ]
    f = freshness(states, ["a", "b"], now)
    assert f["workspaces"]["a"] == {"last_sync_at": "2026-01-01T11:59:30.250Z", "age_s": 29.75}
    assert (f["last_sync_at"], f["age_s"]) == ("2026-01-01T10:00:00Z", 7200.0)
    never = freshness(states, [], now)  # all of them; c never synced
    assert never["last_sync_at"] is None and never["age_s"] is None
    assert freshness(states, ["zzz"], now)["workspaces"]["zzz"]["last_sync_at"] is None
    skew = freshness(states, ["a"], now - timedelta(hours=1))
    assert skew["age_s"] == 0.0  # a clock behind the sync time never gives a negative age


def test_the_compatible_route_filters_like_upstream() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE experiments (experiment_id TEXT, workspace_id TEXT, name TEXT,"
        " creator TEXT, status TEXT, accessibility TEXT, tags TEXT, gmt_create_time TEXT,"
        " gmt_modified_time TEXT, deleted INTEGER)"
    )
    rows = [
        (
            "e1",
            "1",
            "Ünïcode BERT",
            "u1",
            "RUNNING",
            "PUBLIC",
            '[{"Key":"team","Value":"nlp"}]',
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            0,
        ),
        (
            "e2",
            "1",
            "bert",
            "u2",
            "FAILED",
            "PRIVATE",
            "[]",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00Z",
            0,
        ),
        (
            "e3",
            "2",
            "resnet",
            "u1",
            "RUNNING",
            "PUBLIC",
            "[]",
            "2026-01-03T00:00:00Z",
            "2026-01-03T00:00:00Z",
            0,
        ),
        (
            "e4",
            "1",
            "bert gone",
            "u1",
            "RUNNING",
            "PUBLIC",
            "[]",
            "2026-01-04T00:00:00Z",
            "2026-01-04T00:00:00Z",
            1,
        ),
    ]
    conn.executemany(f"INSERT INTO experiments VALUES ({','.join('?' * 10)})", rows)
    conn.create_function("hpo_lower", 1, lambda v: v.lower() if isinstance(v, str) else None)

    def ids(params: dict[str, str], workspaces: tuple[str, ...] = ()) -> list[str]:
        where, args, order = compat_sql(parse_query(params), workspaces)
        sql = f"SELECT experiment_id FROM experiments WHERE {where} ORDER BY {order}"
        return [r[0] for r in conn.execute(sql, args)]

    assert ids({}) == ["e3", "e2", "e1"]  # newest first, ties by id descending, no deleted
    assert ids({"Order": "asc"}) == ["e1", "e2", "e3"]
    assert ids({"Name": "ÜNÏ"}) == ["e1"]  # case-insensitive beyond ASCII
    assert ids({"Name": "BeRt", "Order": "ASC"}) == ["e1", "e2"]
    assert ids({"Status": "running", "Accessibility": "public", "Creator": "u1"}) == ["e3", "e1"]
    assert ids({"MaxCreateTime": "2026-01-01"}) == ["e2", "e1"]  # inclusive
    assert ids({"MinCreateTime": "2026-01-02 00:00:00"}) == ["e3"]
    assert ids({"Tag": '[{"Key":"team"}]'}) == ["e1"]
    assert ids({"SortBy": "GmtModifiedTime"}) == ["e3", "e1", "e2"]
    assert ids({"SortBy": "workspace_id", "Order": "DESC"}) == ["e3", "e2", "e1"]
    assert ids({}, ("2",)) == ["e3"]
    # Exact-match ids are trimmed, and an id of blanks alone filters nothing, as an empty one.
    assert ids({"Creator": " u1 ", "Status": "RUNNING"}) == ["e3", "e1"]
    assert ids({"WorkspaceId": " \t"}) == ids({"WorkspaceId": ""}) == ["e3", "e2", "e1"]
    assert parse_query({"WorkspaceId": " 123 "}).workspace_id == "123"
    assert parse_query({"Creator": "   "}).creator is None


@pytest.mark.parametrize(
    "value", ["٢٠٢٧-01-01", "２０２７-01-01", "2027-01-01 ٠٠:00:00", "2027-0１-01"]
)
def test_create_times_take_ascii_digits_only(value: str) -> None:
    """``\\d`` matches every script's digits (and int() reads them): the documented
    ``[0-9]`` format must not read Arabic-Indic or full-width digits as a year."""
    for name in ("MinCreateTime", "MaxCreateTime"):
        with pytest.raises(InvalidInputError, match=name):
            parse_query({name: value})


@pytest.mark.parametrize(
    "tag",
    [
        '[{"Key":"\\ud800"}]',
        '[{"Key":"k","Value":"\\udc00"}]',
        '[{"key":"\\ud83d"}]',
        "[" * 100_000 + "]" * 100_000,
        '[{"Key":' * 50_000,
        '[{"Key":"k","Value":{"x":[[[[1]]]]}}]',
    ],
)
def test_an_upstream_tag_too_deep_or_not_unicode_is_invalid_input(tag: str) -> None:
    with pytest.raises(InvalidInputError, match="Tag") as info:
        parse_query({"Tag": tag})
    assert len(str(info.value)) < 300


@given(st.text(max_size=60) | st.builds(json.dumps, st.recursive(st.text(), st.lists)))
def test_any_upstream_tag_parses_into_utf8_text_or_is_invalid_input(tag: str) -> None:
    try:
        q = parse_query({"Tag": tag})
    except InvalidInputError:
        return
    for key, value in q.tags:
        key.encode("utf-8")
        if value is not None:
            value.encode("utf-8")


async def test_the_change_watcher_follows_ids_that_go_back() -> None:
    """`serve` follows a copy renamed over the mirror (a restored backup) whose change ids
    are lower than the old file's. The watcher kept the old, higher max id, so every wait
    beyond the new file's max ended at once, and each quiet long poll re-read the mirror in
    a tight loop for its whole wait (8,710 reads in a 2 s poll, a CPU pegged)."""
    current = {"max": 3093}
    reads = 0

    async def read_max() -> int:
        nonlocal reads
        reads += 1
        return current["max"]

    watcher = ChangeWatcher(read_max, poll_interval_s=0.05)
    try:
        assert await watcher.wait_beyond(3000, 1.0) == 3093  # the first file's newer change
        current["max"] = 3000  # the older copy: nothing above 3000
        began = time.monotonic()
        assert await watcher.wait_beyond(3000, 0.5) is None  # a timeout, not 3093 at once
        assert time.monotonic() - began >= 0.45
        reads_before = reads
        waiting = asyncio.create_task(watcher.wait_beyond(3000, 5.0))
        await asyncio.sleep(0.2)
        current["max"] = 3001  # a change committed to the new file: seen at the next poll
        assert await waiting == 3001
        assert reads - reads_before < 20  # polled at its interval, not in a loop
    finally:
        await watcher.close()


def test_a_method_a_client_makes_up_adds_no_metrics_series() -> None:
    """The method label came from the client: each made-up one (aiohttp's pure-Python
    parser lets any token through) was a series for good, and anyone who could reach the
    port could grow /metrics at will. Methods outside HTTP's own count as "other"."""
    from prometheus_client import CollectorRegistry

    from hpo_sync.api.read import ApiMetrics

    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    for n in range(300):
        metrics.observe("unmatched", f"X{n:04d}", 405, 0.001)
    metrics.observe("/v1/experiments", "GET", 200, 0.001)
    series = {
        (s.labels["method"], s.labels["status"])
        for m in registry.collect()
        if m.name == "hpo_sync_api_requests"
        for s in m.samples
        if s.name == "hpo_sync_api_requests_total"
    }
    assert series == {("other", "405"), ("GET", "200")}, series
