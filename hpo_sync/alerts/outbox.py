"""The ``alert_outbox`` table: write rows inside the sync transaction, read what is due, and
record outcomes. Functions take a connection; the caller owns the transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hpo_sync.config import RuleConfig
from hpo_sync.normalise import format_time

from .rules import ChangeLike, ExperimentInfo, build_events, decode_counts, decode_tags, route

PENDING, SENT, DEAD = "pending", "sent", "dead"


def _experiments(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, ExperimentInfo]:
    out: dict[str, ExperimentInfo] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for exp_id, ws, name, status, tags, trials in conn.execute(
            "SELECT experiment_id, workspace_id, name, status, tags, trial_status"
            f" FROM experiments WHERE experiment_id IN ({marks})",
            tuple(chunk),
        ):
            out[exp_id] = ExperimentInfo(
                exp_id, ws, name, status, decode_tags(tags), decode_counts(trials)
            )
    return out


def write_outbox(
    conn: sqlite3.Connection,
    rows: Iterable[ChangeLike],
    rules: Sequence[RuleConfig],
    now: datetime,
) -> int:
    """Write one outbox row per matching (change, target); returns how many were new.

    Call inside the transaction that wrote ``rows`` (:class:`hpo_sync.store.ChangeRow`).
    """
    live = [r for r in rows if not r.baseline]
    if not live or not rules:
        return 0
    exp_ids = sorted({r.experiment_id for r in live})
    events = build_events(live, _experiments(conn, exp_ids))
    created = format_time(now)
    before = conn.total_changes
    conn.executemany(
        "INSERT OR IGNORE INTO alert_outbox (change_id, target, rule, status, attempts,"
        " next_attempt_at, created_at) VALUES (?, ?, ?, 'pending', 0, ?, ?)",
        [
            (r.change_id, r.target, r.rule, format_time(r.next_attempt_at), created)
            for r in route(events, rules, now)
        ],
    )
    return conn.total_changes - before


@dataclass(frozen=True)
class DueRow:
    """A pending outbox row with what a message needs."""

    id: int
    target: str
    rule: str
    attempts: int
    created_at: str
    change_id: int
    workspace_id: str
    experiment_id: str
    field: str
    old_value: str | None
    new_value: str | None
    observed_at: str
    name: str | None
    trial_status: str | None
    workspace_label: str | None
    trial_old: str | None
    trial_new: str | None


_DUE_SQL = """
SELECT o.id, o.target, o.rule, o.attempts, o.created_at, c.id, c.workspace_id,
       c.experiment_id, c.field, c.old_value, c.new_value, c.observed_at, e.name,
       e.trial_status, w.label, t.old_value, t.new_value
FROM alert_outbox o
JOIN changes c ON c.id = o.change_id
LEFT JOIN experiments e ON e.experiment_id = c.experiment_id
LEFT JOIN workspaces w ON w.workspace_id = c.workspace_id
LEFT JOIN changes t ON t.experiment_id = c.experiment_id AND t.field = 'TrialStatus'
     AND t.sync_run_id IS c.sync_run_id AND t.observed_at = c.observed_at
WHERE o.status = 'pending' AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)
ORDER BY o.id
LIMIT ?
"""


def due_rows(conn: sqlite3.Connection, now: datetime, limit: int = 5000) -> list[DueRow]:
    """Pending rows due at ``now``, oldest first."""
    seen: set[int] = set()
    out: list[DueRow] = []
    for r in conn.execute(_DUE_SQL, (format_time(now), limit)):
        if r[0] in seen:  # several TrialStatus rows could join; keep the first
            continue
        seen.add(r[0])
        out.append(DueRow(*r))
    return out


def mark_sent(conn: sqlite3.Connection, ids: Sequence[int], now: datetime) -> None:
    conn.executemany(
        "UPDATE alert_outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
        " last_error = NULL WHERE id = ? AND status = 'pending'",
        [(format_time(now), i) for i in ids],
    )


def mark_retry(conn: sqlite3.Connection, ids: Sequence[int], next_at: datetime, error: str) -> None:
    conn.executemany(
        "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
        " WHERE id = ? AND status = 'pending'",
        [(format_time(next_at), error, i) for i in ids],
    )


def mark_dead(
    conn: sqlite3.Connection, ids: Sequence[int], error: str, *, attempted: bool = True
) -> None:
    conn.executemany(
        "UPDATE alert_outbox SET status = 'dead', last_error = ?,"
        " attempts = attempts + ? WHERE id = ? AND status = 'pending'",
        [(error, 1 if attempted else 0, i) for i in ids],
    )


def expiry_cutoff(now: datetime, max_age_s: float) -> str:
    return format_time(now - timedelta(seconds=max_age_s))


def has_expired(conn: sqlite3.Connection, now: datetime, max_age_s: float) -> bool:
    """Whether :func:`expire` has anything to do (a read, so the worker's idle rounds write
    nothing)."""
    return (
        conn.execute(
            "SELECT 1 FROM alert_outbox WHERE status = 'pending' AND created_at < ? LIMIT 1",
            (expiry_cutoff(now, max_age_s),),
        ).fetchone()
        is not None
    )


def expire(conn: sqlite3.Connection, now: datetime, max_age_s: float) -> dict[str, int]:
    """Dead-letter pending rows created more than ``max_age_s`` ago, reason "expired";
    returns how many per target (call inside a write transaction, so the two agree)."""
    cutoff = expiry_cutoff(now, max_age_s)
    where = "WHERE status = 'pending' AND created_at < ?"
    per_target = {
        str(target): int(n)
        for target, n in conn.execute(
            f"SELECT target, count(*) FROM alert_outbox {where} GROUP BY target", (cutoff,)
        )
    }
    conn.execute(
        f"UPDATE alert_outbox SET status = 'dead', last_error = 'expired' {where}", (cutoff,)
    )
    return per_target


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per status."""
    out = {PENDING: 0, SENT: 0, DEAD: 0}
    for status, n in conn.execute("SELECT status, count(*) FROM alert_outbox GROUP BY status"):
        out[str(status)] = int(n)
    return out


def retry_rows(
    conn: sqlite3.Connection, now: datetime, ids: Sequence[int] = (), *, all_dead: bool = False
) -> int:
    """Put dead rows back in the queue, due now. Their ``created_at`` restarts, so the
    ``max_age_s`` expiry counts from the retry."""
    ts = format_time(now)
    if all_dead:
        cur = conn.execute(
            "UPDATE alert_outbox SET status = 'pending', next_attempt_at = ?, created_at = ?"
            " WHERE status = 'dead'",
            (ts, ts),
        )
        return cur.rowcount
    n = 0
    for i in ids:
        n += conn.execute(
            "UPDATE alert_outbox SET status = 'pending', next_attempt_at = ?, created_at = ?"
            " WHERE id = ? AND status = 'dead'",
            (ts, ts, i),
        ).rowcount
    return n
