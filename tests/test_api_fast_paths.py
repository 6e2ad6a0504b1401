"""The read API's fast paths answer exactly what the plain ones did: experiments serialised
by SQLite, pages spliced from those bytes, the per-thread cache of workspace states, the
cached principal of a token, and the pieces shared with the simulator and ``serve``."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_sync.api import healthz, metrics, readyz
from hpo_sync.api.auth import Authenticator
from hpo_sync.api.read import _spliced, select_experiment, select_experiments
from hpo_sync.config import Secret, TokenConfig
from hpo_sync.schema import EXPERIMENT_COLUMNS
from hpo_sync.store import ExperimentFilter, Store

WS = "100001"
AT = "2025-06-01T08:00:00Z"
SHOWN = [
    c for c in EXPERIMENT_COLUMNS if c not in ("search_space", "config_ini", "config_yml", "raw")
]


def _plain(row: dict[str, Any], *, include_config: bool) -> dict[str, Any]:
    """What the API answered before SQLite wrote its JSON: the row, JSON columns decoded."""
    columns = SHOWN + (["search_space", "config_ini", "config_yml"] if include_config else [])
    out = {c: row[c] for c in columns}
    out["trial_status"] = json.loads(out["trial_status"]) if out["trial_status"] else {}
    out["tags"] = json.loads(out["tags"]) if out["tags"] else []
    out["deleted"] = bool(out["deleted"])
    return out


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fast") / "mirror.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO workspaces (workspace_id) VALUES (?)", (WS,))
    conn.commit()
    conn.close()
    return path


texts = st.one_of(st.none(), st.text(max_size=30))
json_texts = st.one_of(
    st.just(""),
    st.dictionaries(st.text(max_size=8), st.integers(0, 10**12), max_size=4).map(
        lambda d: json.dumps(d, ensure_ascii=False)
    ),
    st.lists(
        st.fixed_dictionaries({"Key": st.text(max_size=8), "Value": st.text(max_size=8)}),
        max_size=3,
    ).map(lambda t: json.dumps(t)),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=texts,
    description=texts,
    creator=texts,
    trial_count=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    trial_status=json_texts,
    tags=json_texts,
    deleted=st.booleans(),
    config=texts,
)
def test_sqlite_serialises_an_experiment_as_python_did(
    mirror: Path,
    name: str | None,
    description: str | None,
    creator: str | None,
    trial_count: int | None,
    trial_status: str,
    tags: str,
    deleted: bool,
    config: str | None,
) -> None:
    row = {
        "experiment_id": "e1",
        "workspace_id": WS,
        "name": name,
        "creator": creator,
        "status": "FAILED",
        "job_type": "1",
        "accessibility": "PRIVATE",
        "description": description,
        "trial_count": trial_count,
        "trial_status": trial_status,
        "tags": tags,
        "search_space": config,
        "config_ini": config,
        "config_yml": None,
        "gmt_create_time": AT,
        "gmt_modified_time": None,
        "deleted": int(deleted),
        "first_seen_at": AT,
        "last_seen_at": AT,
        "last_changed_at": AT,
        "raw": "{}",
    }
    conn = sqlite3.connect(mirror, isolation_level=None)
    try:
        conn.execute("DELETE FROM experiments")
        conn.execute(
            f"INSERT INTO experiments ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )
        for include_config in (False, True):
            found = select_experiment(conn, "e1", include_config=include_config)
            assert found is not None and found[1] == WS and found[2][0].workspace_id == WS
            assert orjson.loads(found[0]) == _plain(row, include_config=include_config)
            page = select_experiments(
                conn,
                ExperimentFilter(workspaces=(WS,), include_deleted=True),
                "-created",
                5,
                None,
                include_config=include_config,
            )
            assert page.rows() == [_plain(row, include_config=include_config)]
            assert page.last_key is None and not page.has_more
    finally:
        conn.close()


SORTS = ("created", "-created", "modified", "-modified", "name", "-name")
stamps = st.sampled_from([None, AT, "2025-06-02T08:00:00Z", "2025-06-03T08:00:00Z"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([None, "a", "b", "B", "é", "a b"]),  # ties and NULLs in every sort
            st.sampled_from([AT, "2025-06-02T08:00:00Z"]),
            stamps,
            st.booleans(),
            st.text(max_size=40),  # descriptions of every size: the page is cut by bytes
        ),
        max_size=14,
    ),
    limit=st.integers(1, 6),
    include_deleted=st.booleans(),
)
def test_a_page_in_one_step_is_the_stores_page(
    mirror: Path,
    rows: list[tuple[str | None, str, str | None, bool, str]],
    limit: int,
    include_deleted: bool,
) -> None:
    """Walked to the end in every sort, the one-row pages hold the store's rows, in its
    order, with its next-page keys: no row skipped, repeated or cut."""
    conn = sqlite3.connect(mirror, isolation_level=None)
    store = Store.open(mirror)
    try:
        conn.execute("DELETE FROM experiments")
        for i, (name, created, modified, deleted, description) in enumerate(rows):
            conn.execute(
                "INSERT INTO experiments (experiment_id, workspace_id, name, status,"
                " description, gmt_create_time, gmt_modified_time, deleted, first_seen_at,"
                " last_seen_at, last_changed_at) VALUES (?, ?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?, ?)",
                (f"e{i:02d}", WS, name, description, created, modified, int(deleted), AT, AT, AT),
            )
        filters = ExperimentFilter(workspaces=(WS,), include_deleted=include_deleted)
        for sort in SORTS:
            after = None
            seen: list[str] = []
            while True:
                want = store.list_experiments(filters, sort, limit, after)  # type: ignore[arg-type]
                got = select_experiments(
                    conn,
                    filters,
                    sort,  # type: ignore[arg-type]
                    limit,
                    after,
                    include_config=False,
                    with_states=True,
                )
                assert got.states == store.workspaces()  # the freshness, from the same read
                decoded = got.rows()
                assert [r["experiment_id"] for r in decoded] == [
                    r["experiment_id"] for r in want.rows
                ]
                assert [r["description"] for r in decoded] == [r["description"] for r in want.rows]
                assert got.has_more == want.has_more
                seen += [r["experiment_id"] for r in decoded]
                if not got.has_more:
                    break
                assert got.last_key == want.last_key
                after = got.last_key
            expected = sum(1 for r in rows if include_deleted or not r[3])
            assert len(seen) == len(set(seen)) == expected
    finally:
        store.close()
        conn.close()


@given(
    items=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    rest=st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.booleans(), st.text())),
)
def test_a_spliced_page_is_the_json_of_the_whole(
    items: list[dict[str, str]], rest: dict[str, Any]
) -> None:
    rest.pop("experiments", None)
    body = _spliced("experiments", b",".join(orjson.dumps(i) for i in items), rest)
    assert orjson.loads(body) == {"experiments": items, **rest}
    assert list(orjson.loads(body)) == ["experiments", *rest]  # the order of the members


def test_workspace_states_are_cached_until_another_connection_commits(tmp_path: Path) -> None:
    path = tmp_path / "mirror.db"
    writer = Store.open(path)
    try:
        writer.ensure_workspace(WS)
        assert writer.workspaces()[0].last_full_ok_at is None
        writer.record_success(WS, "full", AT)  # the writer's connection, not the reader's
        assert writer.workspaces()[0].last_full_ok_at == AT
        reader = Store.open(path, readonly=True)
        try:
            first = reader.workspaces()
            assert reader.workspaces() == first  # from the cache
            writer.record_success(WS, "hot", "2025-06-01T09:00:00Z")
            assert reader.workspaces()[0].last_hot_ok_at == "2025-06-01T09:00:00Z"
            # Each reading thread has its own connection, and so its own cache.
            seen: list[str | None] = []
            thread = threading.Thread(
                target=lambda: seen.append(reader.workspaces()[0].last_hot_ok_at)
            )
            thread.start()
            thread.join()
            assert seen == ["2025-06-01T09:00:00Z"]
            # A caller may change the list it gets without touching the cache.
            reader.workspaces().clear()
            assert len(reader.workspaces()) == 1
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_token_resolves_to_one_principal_per_token_table() -> None:
    auth = Authenticator()
    tokens = (
        TokenConfig("a", Secret("token-a-123456789", "test"), ("1",), False),
        TokenConfig("b", Secret("token-b-123456789", "test"), (), True),
    )
    kwargs: dict[str, Any] = {"listen_host": "127.0.0.1", "peer": "127.0.0.1", "host_header": None}
    a = auth.resolve(tokens, "token-a-123456789", **kwargs)
    assert a is auth.resolve(tokens, "token-a-123456789", **kwargs)
    assert a.workspaces == frozenset({"1"}) and not a.admin
    b = auth.resolve(tokens, "token-b-123456789", **kwargs)
    assert b.full_access and b.admin
    assert auth.match(tokens, "token-b-123456789") is tokens[1]
    assert auth.match(tokens, "token-c-123456789") is None


def test_the_simulator_and_the_api_share_one_upstream_query_parser() -> None:
    from hpo_sync import upstream_query
    from hpo_sync.api import compat
    from hpo_sync.sim import world

    assert world.parse_query is upstream_query.parse_query is compat.parse_query
    assert world.InvalidInputError is upstream_query.InvalidInputError


def test_serve_and_the_daemon_share_the_health_routes(mirror: Path) -> None:
    from hpo_sync.api.serve import ServeRuntime, build_serve_app
    from hpo_sync.config import Config

    store = Store.open(mirror, readonly=True)
    try:
        app = build_serve_app(ServeRuntime(config=Config(), store=store))
        handlers = {
            r.resource.canonical: r.handler
            for r in app.router.routes()
            if r.resource is not None and r.method == "GET"
        }
        assert handlers["/healthz"] is healthz
        assert handlers["/readyz"] is readyz
        assert handlers["/metrics"] is metrics
    finally:
        store.close()


async def test_the_read_pool_runs_work_off_the_loop_and_hands_back_results() -> None:
    import asyncio

    from hpo_sync.api.pool import ReadPool

    pool = ReadPool(2, "test-read")
    try:
        names = await asyncio.gather(
            *(pool.run(lambda: threading.current_thread().name) for _ in range(20))
        )
        assert set(names) <= {"test-read_0", "test-read_1"}
        assert threading.current_thread().name not in names

        def boom() -> None:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            await pool.run(boom)
        # Work whose request went away before its turn is skipped.
        gate, ran = threading.Event(), []
        blockers = [asyncio.ensure_future(pool.run(gate.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        skipped = asyncio.ensure_future(pool.run(lambda: ran.append(1)))
        await asyncio.sleep(0)
        skipped.cancel()
        gate.set()
        await asyncio.gather(*blockers)
        assert await pool.run(lambda: 42) == 42 and ran == []
    finally:
        pool.shutdown()
    with pytest.raises(RuntimeError):
        await pool.run(lambda: 1)
