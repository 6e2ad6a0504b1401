"""The web UI's own SQL (runs in the read API's pool, inside one snapshot per page).

The experiment list reuses the read API's queries (:func:`hpo_sync.api.read.select_experiments`
and :func:`~hpo_sync.api.read.count_by_status`); what is here is what only the pages need.
Each query is chosen to use the schema's existing indexes:

- counts by workspace and status: a scan of the *covering* index
  ``experiments_workspace_status_created`` (no table rows read). Deleted experiments are
  then taken out using ``changes``: every deleted experiment has a ``Deleted`` row there
  (see :mod:`hpo_sync.diff`), so only those few experiments are looked up by primary key —
  reading ``experiments.deleted`` for every row would read every row;
- the last sweep of a workspace: ``sync_runs_workspace (workspace_id, id)``;
- the chart's window of history: ``changes_observed (observed_at)``, a range scan whose cost
  is the number of changes in the window;
- one experiment's history: ``changes_experiment (experiment_id, id)``;
- the feed: ``changes``' primary key, newest first (``changes_workspace`` with a scope).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..alerts.outbox import SHOWN_NAME_SQL
from ..store import status_counts
from .charts import HistoryRow, WindowChange

#: Rows the outbox and feed pages show at most.
PAGE_ROWS = 100
#: History rows of one experiment drawn at most (the newest are kept).
MAX_HISTORY_ROWS = 5000


def _in(column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
    if not values:
        return "1", []
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


@dataclass(frozen=True, slots=True)
class LastRun:
    workspace_id: str
    id: int
    mode: str
    started_at: str
    finished_at: str | None
    status: str
    changes: int
    error: str | None


def live_counts(conn: sqlite3.Connection, scope: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{workspace: {status: n}}`` of experiments not deleted upstream."""
    out: dict[str, dict[str, int]] = {}
    for ws, status, live, _ in status_counts(conn, scope):
        per = out.setdefault(ws, {})
        if live:
            per[status or "null"] = live
    return out


def last_runs(conn: sqlite3.Connection, workspaces: Sequence[str]) -> dict[str, LastRun]:
    """Each workspace's latest sweep (running, ok or failed)."""
    out: dict[str, LastRun] = {}
    for ws in workspaces:
        row = conn.execute(
            "SELECT workspace_id, id, mode, started_at, finished_at, status, changes, error"
            " FROM sync_runs WHERE workspace_id = ? ORDER BY id DESC LIMIT 1",
            (ws,),
        ).fetchone()
        if row is not None:
            out[ws] = LastRun(*row)
    return out


def window_changes(
    conn: sqlite3.Connection, since: str, scope: Sequence[str]
) -> dict[str, list[WindowChange]]:
    """Per workspace, the ``Status``/``Deleted`` changes observed at or after ``since``,
    aggregated per UTC day (see :func:`hpo_sync.web.charts.status_by_day`)."""
    where, params = _in("c.workspace_id", scope)
    out: dict[str, list[WindowChange]] = {}
    for ws, day, field_name, old, new, status, n in conn.execute(
        "SELECT c.workspace_id, substr(c.observed_at, 1, 10), c.field, c.old_value,"
        " c.new_value, CASE WHEN c.field = 'Deleted' THEN e.status END, count(*)"
        " FROM changes c LEFT JOIN experiments e"
        " ON c.field = 'Deleted' AND e.experiment_id = c.experiment_id"
        f" WHERE c.observed_at >= ? AND c.field IN ('Status', 'Deleted') AND {where}"
        " GROUP BY 1, 2, 3, 4, 5, 6",
        [since, *params],
    ):
        out.setdefault(ws, []).append(WindowChange(day, field_name, old, new, status, n))
    return out


def experiment_history(conn: sqlite3.Connection, experiment_id: str) -> list[sqlite3.Row]:
    """One experiment's changes, oldest first (the newest :data:`MAX_HISTORY_ROWS`)."""
    rows = conn.execute(
        "SELECT id, field, old_value, new_value, observed_at, sync_run_id, baseline"
        " FROM changes WHERE experiment_id = ? ORDER BY id DESC LIMIT ?",
        (experiment_id, MAX_HISTORY_ROWS),
    ).fetchall()
    rows.reverse()
    return rows


def history_rows(rows: Sequence[sqlite3.Row]) -> list[HistoryRow]:
    return [HistoryRow(r["field"], r["old_value"], r["new_value"], r["observed_at"]) for r in rows]


_FEED_SELECT = (
    "SELECT c.id, c.experiment_id, e.name, c.workspace_id, c.field, c.old_value,"
    " c.new_value, c.observed_at, c.sync_run_id, c.baseline"
    " FROM changes c LEFT JOIN experiments e ON e.experiment_id = c.experiment_id"
)


def latest_changes(
    conn: sqlite3.Connection,
    scope: Sequence[str],
    *,
    limit: int = PAGE_ROWS,
    field_name: str | None = None,
) -> list[sqlite3.Row]:
    """The newest ``limit`` changes in scope, newest first."""
    where, params = _in("c.workspace_id", scope)
    if field_name is not None:
        where += " AND c.field = ?"
        params.append(field_name)
    return conn.execute(
        f"{_FEED_SELECT} WHERE {where} ORDER BY c.id DESC LIMIT ?", [*params, limit]
    ).fetchall()


def outbox(
    conn: sqlite3.Connection, status: str, scope: Sequence[str], limit: int = PAGE_ROWS
) -> list[sqlite3.Row]:
    """Outbox deliveries in ``status``, newest first, with the change they carry."""
    where, params = _in("c.workspace_id", scope)
    return conn.execute(
        "SELECT o.id, o.target, o.rule, o.status, o.attempts, o.next_attempt_at, o.created_at,"
        " o.last_error, o.message_id, c.workspace_id, c.experiment_id,"
        f" {SHOWN_NAME_SQL} AS name, c.field, c.old_value, c.new_value, c.observed_at"
        " FROM alert_outbox o JOIN changes c ON c.id = o.change_id"
        " LEFT JOIN experiments e ON e.experiment_id = c.experiment_id"
        f" WHERE o.status = ? AND {where} ORDER BY o.id DESC LIMIT ?",
        [status, *params, limit],
    ).fetchall()


def outbox_counts(conn: sqlite3.Connection, scope: Sequence[str]) -> dict[str, int]:
    """Deliveries per outbox status (pending, sent, dead) in scope."""
    params: list[Any] = []
    if not scope:
        sql = "SELECT status, count(*) FROM alert_outbox GROUP BY status"
    else:
        where, params = _in("c.workspace_id", scope)
        sql = (
            "SELECT o.status, count(*) FROM alert_outbox o JOIN changes c ON c.id = o.change_id"
            f" WHERE {where} GROUP BY o.status"
        )
    return {status: n for status, n in conn.execute(sql, params)}
