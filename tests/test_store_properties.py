"""Property tests of the mirror: idempotent replays, history that rebuilds the state, and
keyset pagination that never skips or repeats a row."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_sync.diff import replay
from hpo_sync.normalise import Experiment
from hpo_sync.schema import decode_trial_status
from hpo_sync.store import ExperimentFilter, Store

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IDS = [f"e{i}" for i in range(6)]
STATUSES = ["CREATED", "RUNNING", "FAILED", "FINISHED", None]
TIMES = [None, "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z"]


@contextmanager
def temp_store() -> Iterator[Store]:
    # Hypothesis runs many examples per test function: a fresh directory per example.
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(Path(d) / "mirror.db")
        try:
            yield store
        finally:
            store.close()


def at(step: int) -> str:
    return f"2024-03-01T{step // 3600:02d}:{step // 60 % 60:02d}:{step % 60:02d}Z"


@st.composite
def experiments(draw: st.DrawFn, ws: str) -> Experiment:
    trial_status = draw(
        st.dictionaries(st.sampled_from(["RUNNING", "FAILED", "SUCCEEDED"]), st.integers(0, 2))
    )
    clean = {k: v for k, v in sorted(trial_status.items()) if v}
    return Experiment(
        experiment_id=draw(st.sampled_from(IDS)),
        workspace_id=ws,
        name=draw(st.sampled_from(["a", "b"])),
        creator="alice",
        status=draw(st.sampled_from(STATUSES)),
        job_type=None,
        accessibility=None,
        description=draw(st.sampled_from([None, "x"])),
        trial_count=None,
        trial_status=clean,
        tags=[],
        search_space=None,
        config_ini=None,
        config_yml=None,
        gmt_create_time=draw(st.sampled_from(TIMES)),
        gmt_modified_time=draw(st.sampled_from(TIMES)),
        deleted=draw(st.booleans()),
        raw={"v": draw(st.integers(0, 1))},
    )


Batch = tuple[str, list[Experiment], bool, bool, list[str]]


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    # Two workspaces share the id pool's names but not ids: a workspace prefix keeps ids apart.
    ws = draw(st.sampled_from(["ws1", "ws2"]))
    exps = [
        Experiment(**{**e.__dict__, "experiment_id": f"{ws}-{e.experiment_id}"})
        for e in draw(st.lists(experiments(ws), max_size=6))
    ]
    # ids the sweep then "verified gone" and marks deleted explicitly (mark_deleted)
    gone = [f"{ws}-{i}" for i in draw(st.lists(st.sampled_from(IDS), max_size=2))]
    return ws, exps, draw(st.booleans()), draw(st.booleans()), gone


def dump(store: Store) -> tuple[list[Any], list[Any]]:
    conn = sqlite3.connect(store.path)
    try:
        exps = conn.execute("SELECT * FROM experiments ORDER BY experiment_id").fetchall()
        # sync_run_id left out: a re-run is, rightly, a different run
        changes = conn.execute(
            "SELECT id, experiment_id, workspace_id, field, old_value, new_value, observed_at,"
            " baseline FROM changes ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return exps, changes


def run_sequence(store: Store, sequence: list[Batch]) -> int:
    written = 0
    for step, (ws, exps, complete, baseline, gone) in enumerate(sequence):
        run = store.begin_run(ws, "full" if complete else "hot", at(2 * step))
        result = store.apply(
            ws, exps, observed_at=at(2 * step), run_id=run, complete=complete, baseline=baseline
        )
        written += result.changes
        marked = store.mark_deleted(ws, gone, observed_at=at(2 * step + 1), run_id=run)
        written += marked.changes
    return written


def assert_history_rebuilds_state(store: Store) -> None:
    state = replay(store.history())
    rows = list(store.iter_export("experiments"))
    assert set(state) == {r["experiment_id"] for r in rows}
    for row in rows:
        assert state[row["experiment_id"]] == (
            row["status"],
            decode_trial_status(row["trial_status"]),
            row["deleted"],
        )


@SETTINGS
@given(st.lists(batches(), min_size=1, max_size=8))
def test_replaying_a_sequence_adds_nothing_and_history_rebuilds_state(
    sequence: list[Batch],
) -> None:
    with temp_store() as store:
        run_sequence(store, sequence)
        assert_history_rebuilds_state(store)
        before = dump(store)
        # the same observations again (a crashed sweep re-run, a duplicated delivery...)
        assert run_sequence(store, sequence) == 0
        assert dump(store) == before


@SETTINGS
@given(st.lists(batches(), min_size=1, max_size=8), st.integers(0, 7))
def test_a_re_run_from_any_point_finishes_the_job_without_duplicates(
    sequence: list[Batch], crash_after: int
) -> None:
    # A crash after `crash_after` applies, then the whole sequence from the start: the
    # result is the same as one clean run.
    with temp_store() as clean:
        run_sequence(clean, sequence)
        expected = dump(clean)
    with temp_store() as crashed:
        run_sequence(crashed, sequence[:crash_after])
        run_sequence(crashed, sequence)
        assert dump(crashed) == expected
        assert_history_rebuilds_state(crashed)


# --- keyset pagination ------------------------------------------------------------------------

SORT_COLUMN = {
    "created": "gmt_create_time",
    "-created": "gmt_create_time",
    "modified": "gmt_modified_time",
    "-modified": "gmt_modified_time",
    "name": "name",
    "-name": "name",
}


def sort_key(row: dict[str, Any], sort: str) -> tuple[int, str, str]:
    value = row[SORT_COLUMN[sort]]
    # SQLite: NULL sorts first ascending (and so last descending)
    return (0 if value is None else 1, value or "", row["experiment_id"])


row_strategy = st.fixed_dictionaries(
    {
        "name": st.sampled_from([None, "a", "b", "B"]),
        "created": st.sampled_from(TIMES),
        "modified": st.sampled_from(TIMES),
        "deleted": st.booleans(),
    }
)


def make(exp_id: str, spec: dict[str, Any]) -> Experiment:
    return Experiment(
        experiment_id=exp_id,
        workspace_id="ws1",
        name=spec["name"],
        creator=None,
        status="RUNNING",
        job_type=None,
        accessibility=None,
        description=None,
        trial_count=None,
        trial_status={},
        tags=[],
        search_space=None,
        config_ini=None,
        config_yml=None,
        gmt_create_time=spec["created"],
        gmt_modified_time=spec["modified"],
        deleted=spec["deleted"],
        raw={},
    )


@SETTINGS
@given(
    initial=st.lists(row_strategy, max_size=25),
    sort=st.sampled_from(list(SORT_COLUMN)),
    limit=st.integers(1, 6),
    include_deleted=st.booleans(),
    data=st.data(),
)
def test_keyset_pagination_never_skips_or_repeats(
    initial: list[dict[str, Any]],
    sort: str,
    limit: int,
    include_deleted: bool,
    data: st.DataObject,
) -> None:
    with temp_store() as store:
        run = store.begin_run("ws1", "hot", at(0))
        exps = [make(f"i{n:02d}", spec) for n, spec in enumerate(initial)]
        store.apply("ws1", exps, observed_at=at(0), run_id=run, complete=False, baseline=False)
        expected = {e.experiment_id for e in exps if include_deleted or not e.deleted}
        filters = ExperimentFilter(include_deleted=include_deleted)
        seen: list[str] = []
        keys: list[tuple[int, str, str]] = []
        after = None
        for page_no in range(1, 100):
            page = store.list_experiments(filters, sort, limit, after)  # type: ignore[arg-type]
            seen += [r["experiment_id"] for r in page.rows]
            keys += [sort_key(r, sort) for r in page.rows]
            if not page.has_more:
                break
            after = page.last_key
            # rows arrive between pages, on both sides of the cursor
            extra = data.draw(st.lists(row_strategy, max_size=3), label="inserted")
            store.apply(
                "ws1",
                [make(f"n{page_no:02d}-{k}", spec) for k, spec in enumerate(extra)],
                observed_at=at(page_no),
                run_id=run,
                complete=False,
                baseline=False,
            )
        assert len(seen) == len(set(seen)), "a row was repeated"
        assert expected <= set(seen), "a row was skipped"
        ordered = sorted(keys, reverse=sort.startswith("-"))
        assert keys == ordered
