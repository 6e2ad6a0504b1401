"""The SQLite mirror, against real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from hpo_sync.diff import replay
from hpo_sync.errors import SchemaTooNewError, StoreError
from hpo_sync.normalise import Experiment, normalise
from hpo_sync.schema import APPLICATION_ID, SCHEMA_VERSION, decode_trial_status, migrate
from hpo_sync.store import ChangeRow, ExperimentFilter, Store, acquire_lock

T0 = "2024-03-01T00:00:00Z"
T1 = "2024-03-01T00:01:00Z"
T2 = "2024-03-01T00:02:00Z"
T3 = "2024-03-01T00:03:00Z"


def exp(exp_id: str, ws: str = "ws1", **fields: Any) -> Experiment:
    raw: dict[str, Any] = {
        "ExperimentId": exp_id,
        "WorkspaceId": ws,
        "Name": f"sweep-{exp_id}",
        "Creator": "alice",
        "Status": "RUNNING",
        "JobType": "DLC",
        "Accessibility": "PRIVATE",
        "TrialCount": 4,
        "TrialStatus": {"RUNNING": 2},
        "Tags": [{"Key": "team", "Value": "ml"}],
        "GmtCreateTime": "2024-02-01T00:00:00Z",
        "GmtModifiedTime": "2024-02-01T00:00:00Z",
        "Deleted": False,
    }
    raw.update(fields)
    out = normalise(raw)
    assert out is not None
    return out


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mirror.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store.open(db_path)
    yield s
    s.close()


def apply(
    store: Store,
    exps: list[Experiment],
    at: str,
    *,
    ws: str = "ws1",
    complete: bool = False,
    baseline: bool = False,
    **kw: Any,
) -> Any:
    run = store.begin_run(ws, "full" if complete else "hot", at)
    return store.apply(
        ws, exps, observed_at=at, run_id=run, complete=complete, baseline=baseline, **kw
    )


def fields(rows: list[ChangeRow]) -> list[tuple[str, str, str | None, str | None]]:
    return [(r.experiment_id, r.field, r.old_value, r.new_value) for r in rows]


# --- schema ---------------------------------------------------------------------------------

SPEC_COLUMNS = {
    "experiments": [
        "experiment_id", "workspace_id", "name", "creator", "status", "job_type",
        "accessibility", "description", "trial_count", "trial_status", "tags", "search_space",
        "config_ini", "config_yml", "gmt_create_time", "gmt_modified_time", "deleted",
        "first_seen_at", "last_seen_at", "last_changed_at", "raw",
    ],
    "changes": [
        "id", "experiment_id", "workspace_id", "field", "old_value", "new_value",
        "observed_at", "sync_run_id", "baseline",
    ],
    "sync_runs": [
        "id", "workspace_id", "mode", "started_at", "finished_at", "status", "api_calls",
        "pages", "experiments_seen", "changes", "error",
    ],
    "workspaces": [
        "workspace_id", "label", "baseline_at", "last_full_ok_at", "last_hot_ok_at",
        "last_error", "last_error_at", "create_watermark", "upstream_learnt",
    ],
    "alert_outbox": [
        "id", "change_id", "target", "rule", "status", "attempts", "next_attempt_at",
        "created_at", "sent_at", "last_error", "message_id", "experiment_name", "trial_status",
        "workspace_label",
    ],
}  # fmt: skip


def test_schema_columns_exactly_as_specified(store: Store, db_path: Path) -> None:
    db = sqlite_utils.Database(db_path)
    for table, columns in SPEC_COLUMNS.items():
        assert [c.name for c in db.table(table).columns] == columns, table
    assert db.table("experiments").pks == ["experiment_id"]
    assert db.table("workspaces").pks == ["workspace_id"]
    schema = db.execute("SELECT sql FROM sqlite_master WHERE name = 'changes'").fetchone()[0]
    assert "AUTOINCREMENT" in schema
    indexes = {tuple(i.columns) for t in ("experiments", "changes") for i in db.table(t).indexes}
    for expected in [
        ("workspace_id", "status", "gmt_create_time", "experiment_id"),
        ("workspace_id", "gmt_create_time", "experiment_id"),
        ("gmt_create_time", "experiment_id"),
        ("gmt_modified_time", "experiment_id"),
        ("name", "experiment_id"),
        ("experiment_id", "id"),
        ("workspace_id", "id"),
    ]:
        assert expected in indexes
    db.close()


def test_pragmas(store: Store, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()
    with store._write("inspect") as w:
        assert w.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert w.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert w.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_changes_are_append_only(store: Store, db_path: Path) -> None:
    apply(store, [exp("a")], T0)
    conn = sqlite3.connect(db_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM changes")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE changes SET new_value = 'x'")
    conn.close()


# --- apply ------------------------------------------------------------------------------------


def test_first_sighting(store: Store) -> None:
    result = apply(store, [exp("a"), exp("b", TrialStatus={})], T0, baseline=True)
    assert (result.inserted, result.updated, result.unchanged, result.changes) == (2, 0, 0, 3)
    assert fields(result.change_rows) == [
        ("a", "Status", None, "RUNNING"),
        ("a", "TrialStatus", None, '{"RUNNING":2}'),
        ("b", "Status", None, "RUNNING"),
    ]
    assert all(r.baseline and r.observed_at == T0 for r in result.change_rows)
    assert store.history() == result.change_rows
    row = store.get_experiment("a")
    assert row is not None
    assert row["trial_status"] == {"RUNNING": 2}
    assert row["tags"] == [{"Key": "team", "Value": "ml"}]
    assert row["deleted"] is False
    assert row["raw"]["ExperimentId"] == "a"
    assert row["first_seen_at"] == row["last_seen_at"] == row["last_changed_at"] == T0
    assert store.sync_runs()[0].changes == 3


def test_reapplying_identical_data_writes_no_change_rows(store: Store, db_path: Path) -> None:
    apply(store, [exp("a"), exp("b")], T0)

    def rows() -> list[Any]:
        with closing(sqlite3.connect(db_path)) as conn:
            return conn.execute("SELECT * FROM experiments").fetchall()

    before = rows()
    again = apply(store, [exp("a"), exp("b")], T0)
    assert (again.unchanged, again.changes, again.updated) == (2, 0, 0)
    assert rows() == before
    # later: only last_seen_at moves
    later = apply(store, [exp("a")], T1)
    assert (later.unchanged, later.changes) == (1, 0)
    row = store.get_experiment("a")
    assert row is not None
    assert (row["last_seen_at"], row["last_changed_at"], row["first_seen_at"]) == (T1, T0, T0)
    assert len(store.history()) == 4


def test_status_and_trial_status_changes(store: Store) -> None:
    apply(store, [exp("a")], T0)
    result = apply(store, [exp("a", Status="FAILED", TrialStatus={"FAILED": "2"})], T1)
    assert (result.updated, result.changes) == (1, 2)
    assert fields(result.change_rows) == [
        ("a", "Status", "RUNNING", "FAILED"),
        ("a", "TrialStatus", '{"RUNNING":2}', '{"FAILED":2}'),
    ]
    assert [r.id for r in result.change_rows] == [3, 4]
    row = store.get_experiment("a")
    assert row is not None
    assert (row["status"], row["last_changed_at"]) == ("FAILED", T1)


def test_other_column_change_updates_row_without_change_rows(store: Store) -> None:
    apply(store, [exp("a")], T0)
    result = apply(store, [exp("a", Description="notes")], T1)
    assert (result.updated, result.changes) == (1, 0)
    row = store.get_experiment("a")
    assert row is not None
    assert (row["description"], row["last_changed_at"]) == ("notes", T1)


def test_a_field_left_out_keeps_its_stored_value(store: Store) -> None:
    """An answer without TrialStatus (or Status, Tags, …) reports nothing about them: no change
    to {} and back, no alert; a field sent as null is a value like any other."""
    apply(store, [exp("a", TrialStatus={"FAILED": 1, "RUNNING": 2}, Description="d")], T0)
    partial = exp("a")
    for key in ("TrialStatus", "Status", "Tags", "Description", "Creator"):
        partial.raw.pop(key, None)
    partial = normalise(partial.raw)
    assert partial is not None
    assert partial.absent == {"trial_status", "status", "tags", "description", "creator",
                              "search_space", "config_ini", "config_yml"}  # fmt: skip
    result = apply(store, [partial], T1)
    assert (result.updated, result.changes) == (1, 0)
    row = store.get_experiment("a")
    assert row is not None
    assert row["trial_status"] == {"FAILED": 1, "RUNNING": 2} and row["status"] == "RUNNING"
    assert (row["tags"], row["description"], row["creator"]) == (
        [{"Key": "team", "Value": "ml"}], "d", "alice",
    )  # fmt: skip
    assert "TrialStatus" not in row["raw"] and row["last_changed_at"] == T0
    # back with every field: nothing happened in between, nothing is recorded
    result = apply(store, [exp("a", TrialStatus={"FAILED": 1, "RUNNING": 2}, Description="d")], T2)
    assert result.changes == 0
    # the same partial answer twice: nothing to write either time
    result = apply(store, [partial], "2024-03-01T00:02:10Z")
    assert (result.updated, result.unchanged, result.changes) == (1, 0, 0)  # raw differs
    result = apply(store, [partial], "2024-03-01T00:02:20Z")
    assert (result.updated, result.unchanged, result.changes) == (0, 1, 0)
    # sent as null: reported as empty
    result = apply(store, [exp("a", TrialStatus=None, Description="d")], T3)
    assert fields(result.change_rows) == [("a", "TrialStatus", '{"FAILED":1,"RUNNING":2}', "{}")]


def test_raw_only_drift_keeps_last_changed_at(store: Store) -> None:
    apply(store, [exp("a")], T0)
    result = apply(store, [exp("a", TrialCount="4", NewUpstreamField=1)], T1)
    assert (result.updated, result.changes) == (1, 0)
    row = store.get_experiment("a")
    assert row is not None
    assert row["raw"]["NewUpstreamField"] == 1
    assert (row["last_seen_at"], row["last_changed_at"]) == (T1, T0)


def test_deletion_only_from_a_complete_listing(store: Store) -> None:
    apply(store, [exp("a"), exp("b")], T0, complete=True)
    apply(store, [exp("x", ws="ws2")], T0, ws="ws2", complete=True)
    assert apply(store, [exp("a")], T1).marked_deleted == 0
    assert store.get_experiment("b")["deleted"] is False  # type: ignore[index]

    result = apply(store, [exp("a")], T2, complete=True)
    assert result.marked_deleted == 1
    assert fields(result.change_rows) == [("b", "Deleted", "false", "true")]
    b = store.get_experiment("b")
    assert b is not None
    assert (b["deleted"], b["last_changed_at"], b["last_seen_at"]) == (True, T2, T0)
    # another workspace is untouched; nothing is ever hard-deleted
    assert store.get_experiment("x")["deleted"] is False  # type: ignore[index]
    assert store.counts_by_status(include_deleted=True) == {"RUNNING": 3}


def test_reappearance_clears_deleted(store: Store) -> None:
    apply(store, [exp("a"), exp("b")], T0, complete=True)
    apply(store, [exp("a")], T1, complete=True)
    result = apply(store, [exp("a"), exp("b", Status="FINISHED")], T2, complete=True)
    assert fields(result.change_rows) == [
        ("b", "Status", "RUNNING", "FINISHED"),
        ("b", "Deleted", "true", "false"),
    ]
    assert store.get_experiment("b")["deleted"] is False  # type: ignore[index]


def test_upstream_deleted_flag_is_tracked(store: Store) -> None:
    apply(store, [exp("a")], T0)
    result = apply(store, [exp("a", Deleted=True)], T1)
    assert fields(result.change_rows) == [("a", "Deleted", "false", "true")]


def test_page_by_page_sweep_marks_deletions_at_the_end(store: Store) -> None:
    apply(store, [exp(i) for i in "abcd"], T0, complete=True)
    run = store.begin_run("ws1", "full", T1)
    for page in (["a"], ["b"]):
        r = store.apply(
            "ws1", [exp(i) for i in page], observed_at=T1, run_id=run, complete=False,
            baseline=False,
        )  # fmt: skip
        assert r.marked_deleted == 0
    final = store.apply(
        "ws1", [exp("c")], observed_at=T2, run_id=run, complete=True, baseline=False,
        seen_ids_for_deletion={"a", "b", "c"}, listing_started_at=T1,
    )  # fmt: skip
    assert fields(final.change_rows) == [("d", "Deleted", "false", "true")]


def test_rows_seen_after_the_listing_began_are_not_marked_deleted(store: Store) -> None:
    apply(store, [exp("a")], T0, complete=True)
    apply(store, [exp("new")], T2)  # a hot sweep during a long full sweep
    r = apply(store, [exp("a")], T3, complete=True, listing_started_at=T1)
    assert r.marked_deleted == 0
    r = apply(store, [exp("a")], T3, complete=True)
    assert fields(r.change_rows) == [("new", "Deleted", "false", "true")]


def test_ids_seen_on_earlier_pages_are_not_marked_deleted(store: Store) -> None:
    """The last batch of a page-by-page listing: experiments its earlier pages returned
    (``seen_ids_for_deletion``) are not deleted, even when last seen before the listing
    began (their pages wrote nothing new, say, in another process's run)."""
    apply(store, [exp(i) for i in "abc"], T0, complete=True)
    r = apply(store, [exp("c")], T2, complete=True, seen_ids_for_deletion={"a"},
              listing_started_at=T1)  # fmt: skip
    assert fields(r.change_rows) == [("b", "Deleted", "false", "true")]
    assert store.get_experiment("a")["deleted"] is False  # type: ignore[index]


def test_a_row_seen_just_as_the_listing_began_is_not_marked_deleted(store: Store) -> None:
    """Seen at the very time the listing began (a hot sweep's observation at the same
    second): the listing may have missed it, as for one seen later."""
    apply(store, [exp("a"), exp("b")], T0, complete=True)
    apply(store, [exp("b")], T1)
    r = apply(store, [exp("a")], T2, complete=True, listing_started_at=T1)
    assert r.marked_deleted == 0
    assert store.get_experiment("b")["deleted"] is False  # type: ignore[index]


def test_a_complete_listing_raises_the_watermark_to_its_newest_never_back(
    store: Store,
) -> None:
    """The create watermark goes to the newest create time of a complete listing, and a
    later complete listing of older experiments only leaves it where it is."""
    newer, older = "2024-02-03T00:00:00Z", "2024-01-01T00:00:00Z"
    apply(store, [exp("a", GmtCreateTime=older), exp("b", GmtCreateTime=newer),
                  exp("c", GmtCreateTime=older)], T0, complete=True)  # fmt: skip
    state = store.workspace_state("ws1")
    assert state is not None and state.create_watermark == newer
    # (one new to the mirror: an unchanged row moves nothing anyway)
    apply(store, [exp("d", GmtCreateTime=older)], T1, complete=True)
    state = store.workspace_state("ws1")
    assert state is not None and state.create_watermark == newer


def test_change_ids_are_the_stored_ones_after_a_gap_in_the_sequence(
    store: Store, db_path: Path
) -> None:
    """AUTOINCREMENT's counter can run ahead of max(id) (rows of a rolled-back
    transaction, say): the change rows an apply returns (and hands to the outbox) carry
    the ids they were stored under."""
    apply(store, [exp("a")], T0)
    with store.write("a gap") as conn:
        before = conn.execute("SELECT max(id) FROM changes").fetchone()[0]
        conn.execute("UPDATE sqlite_sequence SET seq = seq + 10 WHERE name = 'changes'")
    r = apply(store, [exp("a", Status="FAILED"), exp("b")], T1)
    with closing(sqlite3.connect(db_path)) as conn:
        stored = conn.execute(
            "SELECT id, experiment_id, field FROM changes WHERE id > ? ORDER BY id", (before,)
        ).fetchall()
    assert len(stored) == 3 and stored[0][0] > before + 10
    assert [(c.id, c.experiment_id, c.field) for c in r.change_rows] == stored


def test_weigh_suspects_marks_deleted_only_on_a_later_sweeps_word(store: Store) -> None:
    """An experiment gone only by an answer that cannot prove it is suspected first; a
    later run that finds it gone again, once the suspicion is old enough (made at or
    before ``confirm_before``), marks it deleted (the same run does not, nor a later one
    while the suspicion is younger), and a sighting or a deletion in between forgets the
    suspicion."""
    apply(store, [exp("a"), exp("b"), exp("c")], T0)

    def suspects() -> list[tuple[str, int]]:
        with store.reader() as conn:
            rows = conn.execute("SELECT experiment_id, sync_run_id FROM deletion_suspects")
            return sorted((r[0], r[1]) for r in rows)

    first = store.begin_run("ws1", "full", T1)
    applied, suspected, waiting = store.weigh_suspects(
        "ws1", ["a", "b", "c"], observed_at=T1, run_id=first, confirm_before=T0
    )
    assert (applied.marked_deleted, suspected, waiting) == (0, ["a", "b", "c"], [])
    assert suspects() == [("a", first), ("b", first), ("c", first)]
    applied, suspected, waiting = store.weigh_suspects(
        "ws1", ["a"], observed_at=T1, run_id=first, confirm_before=T1
    )
    # its own suspicion is no proof, however old
    assert (applied.marked_deleted, suspected, waiting) == (0, [], ["a"])
    apply(store, [exp("b")], T2)  # seen again
    store.mark_deleted("ws1", ["c"], observed_at=T2, run_id=first)  # proven gone otherwise
    assert suspects() == [("a", first)]
    hot = store.begin_run("ws1", "hot", T2)
    applied, suspected, waiting = store.weigh_suspects(
        "ws1", ["a"], observed_at=T2, run_id=hot, confirm_before=T0
    )
    # a later run, but the suspicion (made at T1) is younger than confirm_before allows
    assert (applied.marked_deleted, suspected, waiting) == (0, [], ["a"])
    assert suspects() == [("a", first)]
    later = store.begin_run("ws1", "hot", T3)
    applied, suspected, waiting = store.weigh_suspects(
        "ws1", ["a", "b"], observed_at=T3, run_id=later, confirm_before=T1
    )
    assert [(c.experiment_id, c.field) for c in applied.change_rows] == [("a", "Deleted")]
    assert (suspected, waiting) == (["b"], []) and suspects() == [("b", later)]
    assert store.get_experiment("a")["deleted"] is True  # type: ignore[index]
    assert store.get_experiment("b")["deleted"] is False  # type: ignore[index]


def test_mark_deleted_explicitly(store: Store) -> None:
    apply(store, [exp("a"), exp("b"), exp("c"), exp("late")], T0)
    apply(store, [exp("late")], T3)
    apply(store, [exp("x", ws="ws2")], T0, ws="ws2")
    run = store.begin_run("ws1", "full", T1)
    result = store.mark_deleted(
        "ws1", ["c", "a", "x", "unknown", "late", "a"], observed_at=T2, run_id=run
    )  # fmt: skip
    # in the caller's order; x (other workspace) and unknown ids ignored; 'late' was seen
    # after the observation, so it is stale
    assert fields(result.change_rows) == [
        ("c", "Deleted", "false", "true"),
        ("a", "Deleted", "false", "true"),
    ]
    assert (result.marked_deleted, result.stale) == (2, 1)
    again = store.mark_deleted("ws1", ["a"], observed_at=T2, run_id=run)
    assert (again.changes, again.unchanged) == (0, 1)
    assert sorted(store.active_experiments("ws1")) == ["b", "late"]
    assert store.active_experiments("ws1")["b"]["trial_status"] == {"RUNNING": 2}
    assert store.get_experiment("x")["deleted"] is False  # type: ignore[index]
    assert store.sync_runs()[0].changes == 2


def test_older_observations_are_stale(store: Store) -> None:
    apply(store, [exp("a", Status="FAILED")], T2)
    result = apply(store, [exp("a", Status="RUNNING"), exp("b")], T1)
    assert (result.stale, result.inserted, result.changes) == (1, 1, 2)  # b: Status, TrialStatus
    assert store.get_experiment("a")["status"] == "FAILED"  # type: ignore[index]


def test_duplicates_in_a_batch_keep_the_later_modification(store: Store) -> None:
    newer = exp("a", Status="FAILED", GmtModifiedTime="2024-02-02T00:00:00Z")
    older = exp("a", Status="RUNNING")
    result = apply(store, [newer, older], T0)
    assert result.inserted == 1
    assert store.get_experiment("a")["status"] == "FAILED"  # type: ignore[index]


def test_batch_with_another_workspace_is_rejected(store: Store) -> None:
    run = store.begin_run("ws1", "hot", T0)
    with pytest.raises(StoreError, match="belongs to workspace ws2"):
        store.apply(
            "ws1", [exp("a"), exp("b", ws="ws2")], observed_at=T0, run_id=run, complete=False,
            baseline=False,
        )  # fmt: skip
    assert store.get_experiment("a") is None


def test_apply_validates_run_and_time(store: Store) -> None:
    with pytest.raises(StoreError, match="no sync run"):
        store.apply("ws1", [exp("a")], observed_at=T0, run_id=99, complete=False, baseline=False)
    run = store.begin_run("ws2", "hot", T0)
    with pytest.raises(StoreError, match="belongs to workspace ws2"):
        store.apply("ws1", [], observed_at=T0, run_id=run, complete=False, baseline=False)
    with pytest.raises(ValueError, match="observed_at"):
        store.apply("ws2", [], observed_at="2024-03-01 00:00", run_id=run, complete=False,
                    baseline=False)  # fmt: skip


def test_on_changes_runs_inside_the_transaction(store: Store, db_path: Path) -> None:
    def to_outbox(conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        conn.executemany(
            "INSERT INTO alert_outbox (change_id, target, rule, created_at) VALUES (?,?,?,?)",
            [(r.id, "slack", "all", r.observed_at) for r in rows if not r.baseline],
        )

    apply(store, [exp("a")], T0, on_changes=to_outbox)
    apply(store, [exp("a", Status="FAILED")], T1, on_changes=to_outbox)
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT change_id, status FROM alert_outbox").fetchall() == [
        (1, "pending"),
        (2, "pending"),
        (3, "pending"),
    ]

    def boom(conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        to_outbox(conn, rows)
        raise RuntimeError("alert rules exploded")

    with pytest.raises(RuntimeError):
        apply(store, [exp("a", Status="FINISHED"), exp("b")], T2, on_changes=boom)
    # all or nothing: no experiment, no change, no outbox row
    assert store.get_experiment("b") is None
    assert store.get_experiment("a")["status"] == "FAILED"  # type: ignore[index]
    assert len(store.history()) == 3
    assert conn.execute("SELECT count(*) FROM alert_outbox").fetchone()[0] == 3
    conn.close()


def test_workspace_state(store: Store) -> None:
    assert store.workspace_state("ws1") is None
    apply(store, [exp("a", GmtCreateTime="2024-02-03T00:00:00Z"), exp("b")], T0)
    apply(store, [exp("c", GmtCreateTime="2024-01-01T00:00:00Z")], T1)
    store.ensure_workspace("ws1", label="Research")
    store.mark_baseline("ws1", T1)
    store.mark_baseline("ws1", T2)  # the baseline never moves
    store.record_success("ws1", "full", T1)
    store.record_success("ws1", "hot", "2024-03-01T00:02:00.250Z")
    state = store.workspace_state("ws1")
    assert state is not None and state.create_watermark is None  # batches do not move it
    run = store.begin_run("ws1", "full", T1)
    store.close_run(
        run, "ws1", "full", finished_at=T1, status="ok", api_calls=1, pages=1,
        experiments_seen=3, raise_watermark=True,  # a listing of what is new, read whole
    )  # fmt: skip
    store.set_workspace_error("ws1", "Throttling.User", T3)
    state = store.workspace_state("ws1")
    assert state is not None
    assert state.label == "Research"
    assert state.create_watermark == "2024-02-03T00:00:00Z"
    assert (state.baseline_at, state.last_full_ok_at) == (T1, T1)
    assert state.last_hot_ok_at == "2024-03-01T00:02:00.250Z"
    assert (state.last_error, state.last_error_at) == ("Throttling.User", T3)
    assert [w.workspace_id for w in store.workspaces()] == ["ws1"]


def test_sync_runs(store: Store) -> None:
    r1 = store.begin_run("ws1", "full", T0)
    store.finish_run(
        r1, finished_at="2024-03-01T00:00:42.500Z", status="ok", api_calls=3, pages=3,
        experiments_seen=250, changes=7,
    )  # fmt: skip
    r2 = store.begin_run("ws1", "hot", T1)
    store.finish_run(
        r2, finished_at=T2, status="failed", api_calls=1, pages=0, experiments_seen=0,
        error="InvalidAccessKeyId.NotFound",
    )  # fmt: skip
    r3 = store.begin_run("ws2", "hot", T3)
    runs = store.sync_runs()
    assert [r.id for r in runs] == [r3, r2, r1]
    assert runs[0].status == "running" and runs[0].duration_s is None
    assert runs[2].duration_s == 42.5 and runs[2].changes == 7
    assert [r.id for r in store.sync_runs(status="failed", since=T1)] == [r2]
    assert [r.id for r in store.sync_runs("ws1", mode="full")] == [r1]
    assert store.abandon_running_runs(T3) == 1
    assert store.sync_runs("ws2")[0].status == "failed"
    with pytest.raises(ValueError):
        store.begin_run("ws1", "lukewarm", T0)
    with pytest.raises(ValueError):
        store.finish_run(r1, finished_at=T1, status="meh", api_calls=0, pages=0,
                         experiments_seen=0)  # fmt: skip


# --- migrations and opening ---------------------------------------------------------------


def test_an_older_mirror_is_upgraded_in_place(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(conn, where=str(db_path), target=1)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.execute("INSERT INTO workspaces (workspace_id) VALUES ('ws1')")
    conn.execute(
        "INSERT INTO experiments (experiment_id, workspace_id, status, first_seen_at,"
        " last_seen_at, last_changed_at) VALUES ('old', 'ws1', 'RUNNING', ?, ?, ?)",
        (T0, T0, T0),
    )
    conn.execute(
        "INSERT INTO changes (experiment_id, workspace_id, field, new_value, observed_at)"
        " VALUES ('old', 'ws1', 'Status', 'RUNNING', ?)",
        (T0,),
    )
    assert "alert_outbox" not in {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    conn.close()

    with Store.open(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.get_experiment("old")["status"] == "RUNNING"  # type: ignore[index]
        result = apply(store, [exp("old", Status="FAILED", TrialStatus={})], T1)
        assert [(r.id, r.old_value) for r in result.change_rows] == [(2, "RUNNING")]
    db = sqlite_utils.Database(db_path)
    assert db["alert_outbox"].exists()
    db.close()
    conn = sqlite3.connect(db_path)
    try:
        # Version 4 rebuilt experiments: its rows, indexes and the keys to it all survive,
        # and api_json is filled in for the rows that were there and the rows written since.
        shown = json.loads(conn.execute("SELECT api_json FROM experiments").fetchone()[0])
        assert shown["experiment_id"] == "old" and shown["status"] == "FAILED"
        assert shown["deleted"] is False and shown["trial_status"] == {}
        indexes = {r[0] for r in conn.execute("SELECT name FROM pragma_index_list('experiments')")}
        assert {"experiments_workspace_status_created", "experiments_deleted"} <= indexes
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # the old table's pages were given back (VACUUM after the rebuild)
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert (
            conn.execute("SELECT count(*) FROM changes WHERE experiment_id = 'old'").fetchone()[0]
            == 2
        )
        conn.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError):  # the key from changes still holds
            conn.execute(
                "INSERT INTO changes (experiment_id, workspace_id, field, observed_at)"
                " VALUES ('nobody', 'ws1', 'Status', ?)",
                (T0,),
            )
    finally:
        conn.close()


def test_a_version_4_mirror_gets_message_ids_and_keeps_its_outbox(db_path: Path) -> None:
    """Version 5 adds ``alert_outbox.message_id`` in place: the outbox rows a version-4 file
    holds, pending, sent and dead, are all still there, unchanged, with no message id; rows
    written afterwards can carry one."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(conn, where=str(db_path), target=4)
    conn.execute("INSERT INTO workspaces (workspace_id) VALUES ('ws1')")
    conn.execute(
        "INSERT INTO experiments (experiment_id, workspace_id, status, first_seen_at,"
        " last_seen_at, last_changed_at) VALUES ('old', 'ws1', 'FAILED', ?, ?, ?)",
        (T0, T0, T0),
    )
    conn.execute(
        "INSERT INTO changes (experiment_id, workspace_id, field, old_value, new_value,"
        " observed_at) VALUES ('old', 'ws1', 'Status', 'RUNNING', 'FAILED', ?)",
        (T0,),
    )
    rows = [
        (1, "slack", "pending", 2, T2, None, "HTTP 500"),
        (1, "hook", "sent", 1, None, T1, None),
        (1, "teams", "dead", 1, None, None, "HTTP 400: bad card"),
    ]
    conn.executemany(
        "INSERT INTO alert_outbox (change_id, target, rule, status, attempts, next_attempt_at,"
        " created_at, sent_at, last_error) VALUES (?, ?, 'failed', ?, ?, ?, ?, ?, ?)",
        [(c, t, st, n, nxt, T0, sent, err) for c, t, st, n, nxt, sent, err in rows],
    )
    columns = "id, change_id, target, rule, status, attempts, next_attempt_at, created_at"
    columns += ", sent_at, last_error"
    before = conn.execute(f"SELECT {columns} FROM alert_outbox ORDER BY id").fetchall()
    assert len(before) == 3
    conn.close()

    with Store.open(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION >= 5
        with store.write("a message") as w:
            w.execute("UPDATE alert_outbox SET message_id = 'hposync_1_1' WHERE id = 1")
    conn = sqlite3.connect(db_path)
    try:
        after = conn.execute(f"SELECT {columns} FROM alert_outbox ORDER BY id").fetchall()
        assert after == before
        assert conn.execute("SELECT id, message_id FROM alert_outbox ORDER BY id").fetchall() == [
            (1, "hposync_1_1"),
            (2, None),
            (3, None),
        ]
        indexes = {r[0] for r in conn.execute("SELECT name FROM pragma_index_list('alert_outbox')")}
        assert {"alert_outbox_due", "alert_outbox_target", "alert_outbox_message"} <= indexes
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM alert_outbox WHERE message_id = 'hposync_1_1'"
        ).fetchall()
        assert "alert_outbox_message" in " ".join(str(r[-1]) for r in plan)
    finally:
        conn.close()


def test_a_version_5_outbox_row_shows_the_current_values_and_new_rows_their_own(
    db_path: Path,
) -> None:
    """Version 6 keeps on each outbox row the name, counts and label its alert shows. A row a
    version-5 file holds has none kept, and shows the experiment as it is now (as version 5
    did); a row written since shows what it was written with, whatever happens later."""
    from datetime import UTC, datetime

    from hpo_sync.alerts import outbox
    from hpo_sync.config import RuleConfig

    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(conn, where=str(db_path), target=5)
    conn.execute("INSERT INTO workspaces (workspace_id, label) VALUES ('ws1', 'Team')")
    conn.execute(
        "INSERT INTO experiments (experiment_id, workspace_id, name, status, trial_status,"
        " first_seen_at, last_seen_at, last_changed_at)"
        " VALUES ('old', 'ws1', 'first', 'FAILED', '{\"FAILED\":1}', ?, ?, ?)",
        (T0, T0, T0),
    )
    conn.execute(
        "INSERT INTO changes (experiment_id, workspace_id, field, old_value, new_value,"
        " observed_at) VALUES ('old', 'ws1', 'Status', 'RUNNING', 'FAILED', ?)",
        (T0,),
    )
    conn.execute(
        "INSERT INTO alert_outbox (change_id, target, rule, next_attempt_at, created_at)"
        " VALUES (1, 'slack', 'failed', ?, ?)",
        (T0, T0),
    )
    conn.close()

    at = datetime(2024, 3, 1, 0, 3, tzinfo=UTC)
    with Store.open(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION >= 6
        rule = RuleConfig("all", ("hook",))
        result = apply(
            store, [exp("old", Name="second", Status="RUNNING", TrialStatus={"RUNNING": 2})], T1
        )
        with store.write("alert") as w:
            assert outbox.write_outbox(w, result.change_rows, [rule], at) == 1
        store.ensure_workspace("ws1", "Renamed")
        apply(store, [exp("old", Name="third", Status="RUNNING", TrialStatus={"RUNNING": 2})], T2)
        with store.reader() as r:
            due = outbox.due_rows(r, at)
    assert [(d.target, d.name, d.trial_status, d.workspace_label) for d in due] == [
        ("slack", "third", '{"RUNNING":2}', "Renamed"),  # version 5's: today's values
        ("hook", "second", '{"RUNNING":2}', "Team"),  # as written
    ]


def test_a_version_6_mirror_upgrades_with_nothing_learnt_about_upstream(db_path: Path) -> None:
    """Version 7 adds ``workspaces.upstream_learnt`` in place: a workspace's state is kept
    as it was, with nothing learnt (a sweep learns it again)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(conn, where=str(db_path), target=6)
    conn.execute(
        "INSERT INTO workspaces (workspace_id, label, baseline_at, create_watermark)"
        " VALUES ('ws1', 'Team', ?, ?)",
        (T0, T1),
    )
    conn.close()
    with Store.open(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION >= 7
        assert store.upstream_learnt("ws1") is None
        state = store.workspace_state("ws1")
        assert state is not None
        assert (state.label, state.baseline_at, state.create_watermark) == ("Team", T0, T1)


def test_readonly_says_an_empty_file_holds_no_mirror_yet(db_path: Path) -> None:
    """Not "schema version 0 ... upgrade it in place" (there is nothing to upgrade)."""
    db_path.write_bytes(b"")
    with pytest.raises(StoreError, match=r"holds no mirror yet — run `hpo-sync sync` first"):
        Store.open(db_path, readonly=True)
    assert db_path.read_bytes() == b""


def test_readonly_refuses_an_old_mirror(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    migrate(conn, where=str(db_path), target=1)
    conn.close()
    with pytest.raises(StoreError, match=r"schema version 1.*upgrade it in place"):
        Store.open(db_path, readonly=True)


def _files(db_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in db_path.parent.iterdir()}


def test_a_newer_mirror_is_refused(db_path: Path) -> None:
    """... and left as it was: it was switched to WAL (its header rewritten) before its
    version was read, a change the newer hpo-sync that made it had not asked for."""
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = _files(db_path)
    for readonly in (False, True):
        with pytest.raises(SchemaTooNewError) as info:
            Store.open(db_path, readonly=readonly)
        message = str(info.value)
        assert "version 99" in message and f"up to {SCHEMA_VERSION}" in message
        assert "Upgrade hpo-sync" in message
    assert _files(db_path) == before


def test_someone_elses_database_is_refused(db_path: Path) -> None:
    """... and left byte for byte as it was: it used to be switched to WAL first, and an
    empty one another application had tagged was taken over as a new mirror."""
    cases = {
        "notes.db": ["CREATE TABLE notes (x)"],
        "tagged-with-tables.db": [
            "CREATE TABLE notes (x)", "PRAGMA application_id = 1234", "PRAGMA user_version = 5",
        ],
        "tagged.db": ["PRAGMA application_id = 1234"],  # no tables yet
    }  # fmt: skip
    for name, statements in cases.items():
        path = db_path.with_name(name)
        with closing(sqlite3.connect(path)) as conn:
            for sql in statements:
                conn.execute(sql)
        before = _files(path)
        with pytest.raises(StoreError, match="not an hpo-sync mirror"):
            Store.open(path)
        assert _files(path) == before, name
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"not a SQLite database|not a database"):
        Store.open(db_path)


def test_readonly_store(db_path: Path) -> None:
    with pytest.raises(StoreError, match="no mirror"):
        Store.open(db_path, readonly=True)
    with Store.open(db_path) as writer:
        apply(writer, [exp("a")], T0)
    with Store.open(db_path, readonly=True) as ro:
        assert ro.get_experiment("a") is not None
        with pytest.raises(StoreError, match="read-only"):
            ro.begin_run("ws1", "hot", T1)


def test_a_read_only_store_follows_its_file_when_it_is_replaced(tmp_path: Path) -> None:
    """``serve`` of copies of a mirror: a new copy renamed over the file (as ``backup
    --overwrite`` delivers it). Each reading thread kept the connection it first opened:
    answers came from the old and the new file in turn, and from a deleted one."""
    from concurrent.futures import ThreadPoolExecutor

    path, other = tmp_path / "served.db", tmp_path / "next.db"
    with Store.open(path) as writer:
        apply(writer, [exp("a")], T0)
    with Store.open(other) as writer:
        apply(writer, [exp("a"), exp("b"), exp("c")], T0)

    def count(ro: Store) -> int:
        with ro.reader() as conn:
            return int(conn.execute("SELECT count(*) FROM experiments").fetchone()[0])

    with Store.open(path, readonly=True) as ro, ThreadPoolExecutor(4) as pool:
        barrier = threading.Barrier(4)

        def every_thread() -> int:  # one read on each of the pool's four threads
            barrier.wait(timeout=10)
            return count(ro)

        assert list(pool.map(lambda _: every_thread(), range(4))) == [1] * 4
        os.replace(other, path)
        assert list(pool.map(lambda _: every_thread(), range(4))) == [3] * 4
        path.unlink()
        with pytest.raises(StoreError, match="is gone"):
            count(ro)


def test_in_memory_store() -> None:
    with Store.open(":memory:") as store:
        apply(store, [exp("a")], T0)
        assert store.list_experiments().rows[0]["experiment_id"] == "a"
        assert [r["experiment_id"] for r in store.iter_export()] == ["a"]


# --- queries ------------------------------------------------------------------------------


@pytest.fixture
def populated(store: Store) -> Store:
    first = [
            exp("a", Name="bert_lr_sweep", Creator="alice", Status="RUNNING",
                GmtCreateTime="2024-01-01T00:00:00Z", GmtModifiedTime="2024-02-05T00:00:00Z",
                Tags=[{"Key": "team", "Value": "nlp"}, {"Key": "prio", "Value": "high"}]),
            exp("b", Name="BERT_wd_sweep", Creator="bob", Status="FAILED",
                GmtCreateTime="2024-01-02T00:00:00Z", GmtModifiedTime="2024-02-01T00:00:00Z",
                Tags=[{"Key": "team", "Value": "nlp"}]),
            exp("c", Name="resnet_100%", Creator="alice", Status="FINISHED",
                GmtCreateTime="2024-01-03T00:00:00Z", GmtModifiedTime="2024-02-03T00:00:00Z",
                Tags=[{"Key": "team", "Value": "vision"}]),
            exp("d", Name="resnet_old", Creator="carol", Status="RUNNING",
                GmtCreateTime="2024-01-04T00:00:00Z", Tags=[]),
    ]  # fmt: skip
    apply(store, first, T0, complete=True)
    apply(store, [exp("z", ws="ws2", Name="other", GmtCreateTime="2024-01-05T00:00:00Z")], T0,
          ws="ws2")  # fmt: skip
    apply(store, first[:3], T1, complete=True)  # marks d deleted
    return store


def ids(store: Store, **kw: Any) -> list[str]:
    sort = kw.pop("sort", "created")
    return [r["experiment_id"] for r in store.list_experiments(ExperimentFilter(**kw), sort).rows]


def test_every_filter_of_list_experiments(populated: Store) -> None:
    s = populated
    assert ids(s) == ["a", "b", "c", "z"]
    assert ids(s, include_deleted=True) == ["a", "b", "c", "d", "z"]
    assert ids(s, workspaces=("ws2",)) == ["z"]
    assert ids(s, workspaces=("ws1", "ws2")) == ["a", "b", "c", "z"]
    assert ids(s, statuses=("RUNNING",)) == ["a", "z"]
    assert ids(s, statuses=("failed", "FINISHED")) == ["b", "c"]
    assert ids(s, name="bert") == ["a", "b"]  # substring, case-insensitive
    assert ids(s, name="100%") == ["c"]  # literal %, not a wildcard
    assert ids(s, name="_") == ["a", "b", "c"]
    assert ids(s, creator="alice") == ["a", "c", "z"]
    assert ids(s, tags=(("team", "nlp"),)) == ["a", "b"]
    assert ids(s, tags=(("team", "nlp"), ("prio", "high"))) == ["a"]
    assert ids(s, tags=(("prio", None),)) == ["a"]
    assert ids(s, tags=(("team", "ml ops"),)) == []
    assert ids(s, created_after="2024-01-02") == ["b", "c", "z"]
    assert ids(s, created_before="2024-01-03T00:00:00Z") == ["a", "b"]
    assert ids(s, created_after="2024-01-02", created_before="2024-01-03 00:00:00") == ["b"]
    assert ids(s, modified_after="2024-02-03T00:00:00Z") == ["a", "c"]
    assert ids(s, statuses=("RUNNING",), include_deleted=True, workspaces=("ws1",)) == ["a", "d"]
    with pytest.raises(ValueError):
        ids(s, created_after="yesterday-ish")


def test_sorts(populated: Store) -> None:
    assert ids(populated, sort="-created") == ["z", "c", "b", "a"]
    # b and z share a modified time: experiment_id breaks the tie
    assert ids(populated, sort="modified") == ["b", "z", "c", "a"]
    assert ids(populated, sort="-modified") == ["a", "c", "z", "b"]
    assert ids(populated, sort="name") == ["b", "a", "z", "c"]  # binary collation
    assert ids(populated, sort="-name") == ["c", "z", "a", "b"]
    with pytest.raises(ValueError):
        populated.list_experiments(sort="size")  # type: ignore[arg-type]


def test_keyset_pages(populated: Store) -> None:
    page = populated.list_experiments(sort="-created", limit=3)
    assert [r["experiment_id"] for r in page.rows] == ["z", "c", "b"]
    assert page.has_more and page.last_key == ("2024-01-02T00:00:00Z", "b")
    page = populated.list_experiments(sort="-created", limit=3, after_key=page.last_key)
    assert [r["experiment_id"] for r in page.rows] == ["a"]
    assert not page.has_more
    empty = populated.list_experiments(sort="-created", limit=3, after_key=page.last_key)
    assert (empty.rows, empty.last_key, empty.has_more) == ([], None, False)


def test_history(populated: Store) -> None:
    s = populated
    everything = s.history()
    assert [c.id for c in everything] == list(range(1, len(everything) + 1))
    assert [(c.field, c.new_value) for c in s.history("d")] == [
        ("Status", "RUNNING"),
        ("TrialStatus", '{"RUNNING":2}'),
        ("Deleted", "true"),
    ]
    assert [c.experiment_id for c in s.history(field="Deleted")] == ["d"]
    assert {c.experiment_id for c in s.history(workspace="ws2")} == {"z"}
    assert [c.experiment_id for c in s.history(since=T1)] == ["d"]
    feed = s.history(after_id=2, limit=2)
    assert [c.id for c in feed] == [3, 4]
    assert s.history(include_baseline=False) == everything  # no baseline sync here


def test_counts_by_status(populated: Store) -> None:
    assert populated.counts_by_status() == {"FAILED": 1, "FINISHED": 1, "RUNNING": 2}
    assert populated.counts_by_status("ws1") == {"FAILED": 1, "FINISHED": 1, "RUNNING": 1}
    assert populated.counts_by_status("ws1", include_deleted=True)["RUNNING"] == 2


def test_iter_export(populated: Store) -> None:
    rows = list(populated.iter_export("experiments"))
    assert [r["experiment_id"] for r in rows] == ["a", "b", "c", "d", "z"]
    assert rows[0]["trial_status"] == {"RUNNING": 2}
    raw_rows = list(populated.iter_export("experiments", workspace="ws2", decode=False))
    assert raw_rows[0]["trial_status"] == '{"RUNNING":2}'
    changes = list(populated.iter_export("changes", batch_size=2))
    assert [c["id"] for c in changes] == [c.id for c in populated.history()]
    assert len(list(populated.iter_export("sync_runs"))) == 3
    with pytest.raises(ValueError):
        list(populated.iter_export("secrets"))  # type: ignore[arg-type]


def test_stats_median_run_time_and_failure_rate(store: Store) -> None:
    def at(minute: int) -> str:
        return f"2024-03-01T{minute // 60:02d}:{minute % 60:02d}:00Z"

    def e(exp_id: str, **kw: Any) -> Experiment:
        return exp(exp_id, GmtCreateTime="2024-03-01T00:00:00Z", **kw)

    # baseline: 'old' is already finished, 'p' already running
    apply(store, [e("old", Status="FINISHED"), e("p")], at(0), baseline=True)
    apply(store, [e("q", Status="CREATED"), e("r", Status="CREATED")], at(1))
    apply(store, [e("q"), e("r")], at(10))
    apply(store, [e("p", Status="FAILED"), e("q", Status="FINISHED")], at(40))
    apply(store, [e("r", Status="FINISHED")], at(70))
    apply(store, [e("x", ws="ws2", Status="FAILED")], at(5), ws="ws2")

    stats = store.stats("2024-03-01T00:00:00Z")
    ws1 = stats["ws1"]
    assert ws1.counts_by_status == {"FAILED": 1, "FINISHED": 3}
    # p: 0 -> 40 (create time, its RUNNING was only seen by the baseline); q: 10 -> 40;
    # r: 10 -> 70; 'old' finished before we looked: not counted. Median of 40, 30, 60 min.
    assert ws1.finished == 3 and ws1.finished_by_status == {"FAILED": 1, "FINISHED": 2}
    assert ws1.failed == 1 and ws1.failure_rate == pytest.approx(1 / 3)
    assert ws1.median_run_time_s == 40 * 60
    assert stats["ws2"].finished == 1 and stats["ws2"].median_run_time_s == 5 * 60

    window = store.stats(at(30), until=at(60), workspace="ws1")
    assert list(window) == ["ws1"]
    assert window["ws1"].finished == 2 and window["ws1"].median_run_time_s == 35 * 60
    empty = store.stats(at(100))["ws1"]
    assert (empty.finished, empty.failure_rate, empty.median_run_time_s) == (0, None, None)

    # 'old' (finished before the baseline) restarted and failed between two syncs, which
    # saw no RUNNING: it ended in the window, as FAILED, with no known start (it used to
    # count for nothing: a failure rate of 0 % with a run that had failed)
    apply(store, [e("old", Status="FAILED")], at(110))
    later = store.stats(at(100))["ws1"]
    assert (later.finished, later.failed, later.failure_rate) == (1, 1, 1.0)
    assert (later.timed, later.median_run_time_s) == (0, None)


# --- concurrency, locking, backup, crash safety ---------------------------------------------


def test_readers_see_a_snapshot_while_a_write_commits(store: Store) -> None:
    apply(store, [exp("a")], T0)
    with store.reader() as conn:
        assert conn.execute("SELECT count(*) FROM experiments").fetchone()[0] == 1
        t = threading.Thread(target=apply, args=(store, [exp("b")], T1))
        t.start()
        t.join()
        # same read transaction: still the old snapshot, and the write did not wait for it
        assert conn.execute("SELECT count(*) FROM experiments").fetchone()[0] == 1
        assert store.get_experiment("b") is None  # re-entrant: same snapshot
    assert store.get_experiment("b") is not None


async def test_writes_off_the_event_loop(store: Store) -> None:
    async def writer(i: int) -> None:
        await asyncio.to_thread(apply, store, [exp(f"e{i}")], f"2024-03-01T00:00:{i:02d}Z")

    async def reader() -> int:
        page = await asyncio.to_thread(store.list_experiments, None, "created", 1000)
        return len(page.rows)

    results = await asyncio.gather(*(writer(i) for i in range(20)), *(reader() for _ in range(20)))
    assert all(isinstance(n, int) for n in results[20:])
    assert len(store.list_experiments(limit=1000).rows) == 20


def test_lock_is_exclusive_across_processes(db_path: Path) -> None:
    code = (
        "import sys\nfrom hpo_sync.store import acquire_lock\nfrom hpo_sync.errors import"
        " StoreError\ntry:\n    acquire_lock(sys.argv[1])\nexcept StoreError as e:\n"
        "    print(e)\n    sys.exit(3)\n"
    )
    lock = acquire_lock(db_path)
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, str(db_path)], capture_output=True, text=True, timeout=30
        )
        assert child.returncode == 3, child.stderr
        assert "in use by another hpo-sync process" in child.stdout
        assert str(__import__("os").getpid()) in child.stdout
        with pytest.raises(StoreError):  # in-process too: flock is per open file
            acquire_lock(db_path)
    finally:
        lock.release()
    child = subprocess.run([sys.executable, "-c", code, str(db_path)], text=True, timeout=30)
    assert child.returncode == 0


def test_the_lock_is_the_file_s_whatever_name_reaches_it(db_path: Path, tmp_path: Path) -> None:
    """A second writer naming the mirror through a symlink (to the file, or to its
    directory) meets the first one's lock: it used to take a lock of its own (two daemons,
    every alert sent twice). One naming it through a hard link is refused, lock or not:
    SQLite keeps a journal per name, and two writers through two names corrupted it."""
    Store.open(db_path).close()
    (tmp_path / "alias").mkdir()
    by_file = tmp_path / "alias" / "mirror.db"
    by_file.symlink_to(db_path)
    by_dir = tmp_path / "dir-alias"
    by_dir.symlink_to(db_path.parent, target_is_directory=True)
    lock = acquire_lock(db_path)
    try:
        for alias in (by_file, by_dir / db_path.name):
            with pytest.raises(StoreError, match="in use by another hpo-sync process"):
                acquire_lock(alias)
    finally:
        lock.release()
    acquire_lock(by_file).release()
    linked = tmp_path / "alias" / "linked.db"
    os.link(db_path, linked)
    for name in (db_path, linked):
        with pytest.raises(StoreError, match="2 names \\(hard links\\)"):
            acquire_lock(name)


def test_a_cursor_of_the_writer_cannot_outlive_its_turn(tmp_path: Path) -> None:
    """Threads take turns at the writer connection; sqlite3 shares a prepared statement
    among the cursors running the same SQL, and a cursor that is freed resets it. One
    freed after its thread let go (``apply``'s ``cur`` outlived the lock until the function
    returned) reset the statement another thread was running: ``executemany`` failed with
    "bad parameter or other API misuse" (1 write in 7 here). Now the cursors made in a
    turn are closed when it ends, and a closed cursor holds no statement."""
    store = Store.open(tmp_path / "mirror.db")
    labels = [(f"ws-{i}",) for i in range(300)]
    with store.write("add workspaces") as conn:
        conn.executemany("INSERT INTO workspaces (workspace_id) VALUES (?)", labels)
        kept = conn.cursor()
    with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
        kept.execute("SELECT 1")

    errors: list[str] = []

    def turns(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            try:
                with store.write("label workspaces") as conn:
                    cur = conn.cursor()
                    cur.executemany(
                        "UPDATE workspaces SET label = ? WHERE workspace_id = ?",
                        [(str(rng.random()), ws) for (ws,) in labels],
                    )
            except StoreError as e:
                errors.append(str(e))
            time.sleep(rng.random() * 0.003)  # this thread's cursor lives on a moment
            del cur

    threads = [threading.Thread(target=turns, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []


def test_backup_is_an_identical_readable_copy(populated: Store, tmp_path: Path) -> None:
    dest = tmp_path / "backup" / "copy.db"
    dest.parent.mkdir()
    populated.backup(dest)
    with pytest.raises(StoreError, match="exists"):
        populated.backup(dest)
    populated.backup(dest, overwrite=True)
    assert [p.name for p in dest.parent.iterdir()] == ["copy.db"]  # no partial file left
    with Store.open(dest, readonly=True) as copy:
        assert list(copy.iter_export("experiments")) == list(populated.iter_export())
        assert copy.history() == populated.history()
    original = sqlite3.connect(populated.path)
    copied = sqlite3.connect(dest)
    assert list(copied.iterdump()) == list(original.iterdump())
    assert copied.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    original.close()
    copied.close()


_BACKUP_CHILD = """
import resource, signal, sys
from hpo_sync.errors import StoreError
from hpo_sync.store import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
store = Store.open(sys.argv[1], readonly=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    store.backup(sys.argv[2])
except StoreError as e:
    print(e)
    sys.exit(3)
"""


def test_a_backup_its_destination_cannot_hold_blames_it_and_leaves_nothing(
    populated: Store, tmp_path: Path
) -> None:
    """The copy cannot be written (as on a full disk: a file-size limit, so the kernel
    refuses the write): the error names the destination, not "reading the mirror", and no
    partial file is left behind beside it."""
    dest = tmp_path / "backup" / "copy.db"
    dest.parent.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _BACKUP_CHILD, populated.path, str(dest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == 3, child.stderr
    assert child.stdout.startswith(f"backing the mirror up failed on {dest}: ")
    assert "reading the mirror" not in child.stdout
    assert list(dest.parent.iterdir()) == []


def test_two_backups_to_one_destination_at_once_never_share_a_file(
    populated: Store, tmp_path: Path
) -> None:
    """Each writes a file of its own: the second used to unlink the first one's partial
    file while it was being written, and both failed. Without overwrite one of them wins
    and the other says the destination exists; with it, the last one's copy stands."""
    dest = tmp_path / "copy.db"

    async def both(overwrite: bool) -> list[BaseException | None]:
        return await asyncio.gather(
            *(asyncio.to_thread(populated.backup, dest, overwrite=overwrite) for _ in range(4)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(both(False))
    assert outcomes.count(None) >= 1
    assert all(o is None or "exists" in str(o) for o in outcomes), outcomes
    assert asyncio.run(both(True)) == [None] * 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db")] == []
    with Store.open(dest, readonly=True) as copy:
        assert copy.history() == populated.history()


_KILLED_BACKUP_CHILD = """
import os, signal, sqlite3, sys
import hpo_sync.store as store_module
store = store_module.Store.open(sys.argv[1], readonly=True)

class KilledWhileWriting:  # the copy is opened, half written, then the process dies
    Error = sqlite3.Error

    @staticmethod
    def connect(path):
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE half (x)")
        conn.execute("INSERT INTO half VALUES (zeroblob(100000))")
        os.kill(os.getpid(), signal.SIGKILL)

store_module.sqlite3 = KilledWhileWriting
store.backup(sys.argv[2])
"""


def test_the_next_backup_removes_what_a_killed_one_left_and_nothing_else(
    populated: Store, tmp_path: Path
) -> None:
    """A backup killed with SIGKILL runs no clean-up: its hidden copy (and the copy's
    journal) stayed beside the destination for good, as big as the mirror, one more per
    killed run. The next backup into that directory removes such a copy once it is
    STALE_COPY_AGE_S old; a copy another backup is still writing (it holds a lock on it),
    one made a moment ago and a hidden file that is no SQLite file are left alone."""
    from hpo_sync.store import STALE_COPY_AGE_S

    backups = tmp_path / "backups"
    backups.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_BACKUP_CHILD, populated.path, str(backups / "copy.db")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    left = sorted(p.name for p in backups.iterdir())
    assert len(left) == 2 and left[1] == f"{left[0]}-journal", left
    assert left[0].startswith(".copy.db.hpo-sync-backup.") and left[0].endswith(".partial")
    dead = backups / left[0]

    populated.backup(backups / "1.db")  # a moment after: it may be a backup just begun
    assert dead.exists()

    aged = dead.stat().st_mtime - STALE_COPY_AGE_S - 1
    os.utime(dead, (aged, aged))
    held = backups / ".2.db.hpo-sync-backup.abcdefgh.partial"  # another backup's, being written
    held.write_bytes(dead.read_bytes())
    notes = backups / ".notes.hpo-sync-backup.abcdefgh.partial"  # not SQLite: not a backup's
    notes.write_text("keep me")
    # another application's database, of a name like a copy's but for the mark: SQLite's
    # locks are not flock's, so an open one looks unheld; only the name tells it apart
    theirs = backups / ".cache.sessions.partial"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    for path in (held, notes, theirs):
        os.utime(path, (aged, aged))
    with held.open("rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        populated.backup(backups / "3.db")
        assert sorted(p.name for p in backups.iterdir()) == sorted(
            [held.name, notes.name, theirs.name, "1.db", "3.db"]
        )
    with Store.open(backups / "3.db", readonly=True) as copy:
        assert copy.history() == populated.history()


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EOPNOTSUPP])
def test_a_backup_to_a_file_system_without_hard_links_is_renamed_into_place(
    populated: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    """vfat, exFAT and some CIFS mounts refuse hard links (no such file system can be
    mounted here, so the refusal is the kernel's errno, raised in os.link's place): the
    copy is renamed into place instead, unless the destination exists by then."""

    def no_links(src: object, dst: object, **kw: object) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "link", no_links)
    dest = tmp_path / "stick" / "copy.db"
    dest.parent.mkdir()
    populated.backup(dest)
    with Store.open(dest, readonly=True) as copy:
        assert copy.history() == populated.history()
    with pytest.raises(StoreError, match="exists"):
        populated.backup(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["copy.db"]


def test_store_errors_are_mapped(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot be opened|unable to open"):
        Store.open(tmp_path / "missing-dir" / "mirror.db")


_CRASH_CHILD = """
import sys
from hpo_sync.normalise import normalise
from hpo_sync.store import Store
store = Store.open(sys.argv[1])
statuses = ["CREATED", "RUNNING", "FAILED", "FINISHED"]
for step in range(1_000_000):
    hh, mm, ss = step // 3600 % 24, step // 60 % 60, step % 60
    at = f"2024-03-{1 + step // 86400:02d}T{hh:02d}:{mm:02d}:{ss:02d}Z"
    run = store.begin_run("ws1", "full", at)
    batch = [
        normalise({"ExperimentId": f"e{i}", "WorkspaceId": "ws1",
                   "Status": statuses[(step + i) % 4], "TrialStatus": {"FAILED": step % 3}})
        for i in range(200) if (step + i) % 7
    ]
    store.apply("ws1", batch, observed_at=at, run_id=run, complete=True, baseline=step == 0)
    if step == 2:
        print("ready", flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_applies_leaves_a_consistent_mirror(db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        threading.Event().wait(0.7)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    with Store.open(db_path) as store:
        with store.reader() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = list(store.iter_export())
        assert rows
        state = replay(store.history())
        for row in rows:
            assert state[row["experiment_id"]] == (
                row["status"],
                decode_trial_status(row["trial_status"]),
                row["deleted"],
            )


def test_write_commits_the_block_or_rolls_it_back_and_refuses_a_read_only_mirror(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "m.db"
    with Store.open(db_path) as store:
        store.ensure_workspace("ws1")
        with store.write("label a workspace") as conn:
            conn.execute("UPDATE workspaces SET label = 'kept' WHERE workspace_id = 'ws1'")
        with pytest.raises(RuntimeError, match="boom"), store.write("label a workspace") as conn:
            conn.execute("UPDATE workspaces SET label = 'lost' WHERE workspace_id = 'ws1'")
            raise RuntimeError("boom")
    with closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("SELECT label FROM workspaces").fetchall() == [("kept",)]
    with (
        Store.open(db_path, readonly=True) as ro,
        pytest.raises(StoreError, match="read-only; cannot re-queue"),
        ro.write("re-queue dead alerts"),
    ):
        pass


def test_non_terminal_experiments_with_no_terminal_status_is_every_live_row(
    store: Store,
) -> None:
    apply(
        store,
        [exp("a", Status="RUNNING"), exp("b", Status="FAILED"), exp("c", Status=None)],
        T1,
        complete=True,
    )
    apply(store, [exp("a", Status="RUNNING"), exp("c", Status=None)], T2, complete=True)
    terminal = ("FINISHED", "FAILED")
    assert set(store.non_terminal_experiments("ws1", terminal)) == {"a", "c"}
    # `terminal_statuses = []` in the config: every status is polled, the deleted "b" not.
    assert set(store.non_terminal_experiments("ws1", ())) == {"a", "c"}
    apply(store, [exp("b", Status="FAILED"), exp("a"), exp("c", Status=None)], T3)
    assert set(store.non_terminal_experiments("ws1", ())) == {"a", "b", "c"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A file system of 2 MiB of its own (tmpfs; needs root, as CI has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def test_a_full_disk_is_named_as_such(small_disk: Path) -> None:
    """Reading a mirror on a disk with no space left fails in SQLite as an I/O error (it
    cannot size the -shm file); the message says the disk is full rather than "check the
    disk"."""
    path = small_disk / "mirror.db"
    with Store.open(path) as store:
        store.ensure_workspace("ws1")
    _fill(small_disk)
    with pytest.raises(StoreError) as failed, Store.open(path, readonly=True) as store:
        store.workspaces()
    assert f"the disk holding {small_disk} is full" in str(failed.value)
