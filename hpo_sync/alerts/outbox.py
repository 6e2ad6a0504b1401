"""The ``alert_outbox`` table: write rows inside the sync transaction, read what is due, and
record outcomes. Functions take a connection; the caller owns the transaction."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hpo_sync.config import RuleConfig
from hpo_sync.normalise import format_time, parse_time

from .classify import MASK
from .rules import ChangeLike, ExperimentInfo, build_events, decode_counts, decode_tags, route

PENDING, SENT, DEAD = "pending", "sent", "dead"

#: The experiment name an outbox row ``o`` shows, with ``e`` its experiment: the one written
#: with the row, or (a row from before schema version 6, without one) the current one.
SHOWN_NAME_SQL = "CASE WHEN o.trial_status IS NULL THEN e.name ELSE o.experiment_name END"


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
    # With the name, counts and label the experiment has now, in the transaction that
    # recorded the change: what every attempt at this alert shows (schema version 6).
    conn.executemany(
        "INSERT OR IGNORE INTO alert_outbox (change_id, target, rule, status, attempts,"
        " next_attempt_at, created_at, experiment_name, trial_status, workspace_label)"
        " SELECT c.id, ?, ?, 'pending', 0, ?, ?, e.name, e.trial_status, w.label"
        " FROM changes c JOIN experiments e ON e.experiment_id = c.experiment_id"
        " LEFT JOIN workspaces w ON w.workspace_id = c.workspace_id WHERE c.id = ?",
        [
            (r.target, r.rule, format_time(r.next_attempt_at), created, r.change_id)
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
    #: the message the row was sent in before (see :func:`name_messages`), if any
    message_id: str | None = None


_DUE_SQL = f"""
SELECT o.id, o.target, o.rule, o.attempts, o.created_at, c.id, c.workspace_id,
       c.experiment_id, c.field, c.old_value, c.new_value, c.observed_at,
       -- as written with the row; a row from before schema version 6 shows today's values
       {SHOWN_NAME_SQL},
       coalesce(o.trial_status, e.trial_status),
       CASE WHEN o.trial_status IS NULL THEN w.label ELSE o.workspace_label END,
       t.old_value, t.new_value, o.message_id
FROM alert_outbox o
JOIN changes c ON c.id = o.change_id
LEFT JOIN experiments e ON e.experiment_id = c.experiment_id
LEFT JOIN workspaces w ON w.workspace_id = c.workspace_id
LEFT JOIN changes t ON t.experiment_id = c.experiment_id AND t.field = 'TrialStatus'
     AND t.sync_run_id IS c.sync_run_id AND t.observed_at = c.observed_at
WHERE o.status = 'pending' AND {{where}}
ORDER BY o.id
LIMIT ?
"""


def _read_due(
    conn: sqlite3.Connection, where: str, params: tuple[object, ...], out: dict[int, DueRow]
) -> None:
    for r in conn.execute(_DUE_SQL.format(where=where), params):
        if r[0] not in out:  # several TrialStatus rows could join; keep the first
            out[r[0]] = DueRow(*r)


def due_rows(
    conn: sqlite3.Connection,
    now: datetime,
    limit: int = 1000,
    robots: Mapping[str, str] | None = None,
) -> list[DueRow]:
    """Pending rows due at ``now``, oldest first, at most ``limit`` per target, and every
    pending row of a message one of them was sent in before (``limit`` may cut a message: it
    goes again whole or not at all, since a receiver that got a message's id once drops
    whatever comes later under it).

    The limit is per target: a target working through a long backlog at its rate limit
    (WeCom: 20 messages a minute) never keeps the others' newer alerts from being read.

    None of a target's rows is due while one of them waits after an attempt (a retry after
    a backoff or the wait it asked for: 429 and Retry-After, DingTalk's 130101): newer ones
    would reach it inside that wait (DingTalk bans a bot that sends on), and ahead of older
    alerts; older ones (a row whose rule's quiet hours just ended) inside it too. They go
    with it, oldest first, once it is due. (A row that waits for the end of its rule's
    quiet hours, never attempted, holds nothing back.)

    ``robots`` maps target names to their robot (:func:`hpo_sync.alerts.service._robot`):
    a wait holds every target of the robot it was asked for (two targets of one DingTalk
    URL: the second sent into the first one's ban)."""
    out: dict[int, DueRow] = {}
    at = format_time(now)
    due = "(o.next_attempt_at IS NULL OR o.next_attempt_at <= ?)"
    robot = (robots or {}).get
    waiting = {robot(t, t) for t in _oldest_waiting(conn, at)}
    targets = conn.execute("SELECT DISTINCT target FROM alert_outbox WHERE status = ?", (PENDING,))
    for (target,) in targets.fetchall():
        if robot(target, target) not in waiting:
            _read_due(conn, f"o.target = ? AND {due}", (target, at, limit), out)
    messages = sorted({r.message_id for r in out.values() if r.message_id is not None})
    for start in range(0, len(messages), 500):
        chunk = tuple(messages[start : start + 500])
        where = f"o.message_id IN ({','.join('?' * len(chunk))})"
        _read_due(conn, where, (*chunk, -1), out)  # a negative LIMIT is no limit
    return sorted(out.values(), key=lambda r: r.id)


def message_id(outbox_ids: Sequence[int]) -> str:
    """A new name for a message of these rows: ``hposync_<first row>_<rows>_<random>``.

    The random part (64 bits) makes it unique beyond this mirror: receivers drop a
    ``webhook-id`` they have processed, and ids from the rows alone repeat across the
    mirrors of several daemons (each numbers its rows from 1) and after a mirror is
    restored from a backup (its rows numbered again from there), so a new message could
    come under an id the receiver already had, and be dropped."""
    return f"hposync_{outbox_ids[0]}_{len(outbox_ids)}_{secrets.token_hex(8)}"


def name_messages(conn: sqlite3.Connection, messages: Sequence[Sequence[int]]) -> list[str]:
    """Name each new message (its rows' ids, in order) and record the name on its rows;
    returns the names.

    Call once for all the new messages of a delivery round, in one write transaction, before
    the first is sent: whatever happens to the attempt (a timeout after the receiver took
    it, a kill -9 before its rows are marked sent), the rows go again as this message under
    this name. A name is :func:`message_id`, drawn again in the (unlikely) event that other
    rows hold it: one name never stands for two different sets of alerts."""
    names: list[str] = []
    for ids in messages:
        name = message_id(ids)
        while conn.execute("SELECT 1 FROM alert_outbox WHERE message_id = ?", (name,)).fetchone():
            name = message_id(ids)
        conn.executemany(
            "UPDATE alert_outbox SET message_id = ? WHERE id = ?", [(name, i) for i in ids]
        )
        names.append(name)
    return names


def recent_sends(
    conn: sqlite3.Connection, targets: Collection[str], since: datetime
) -> list[datetime]:
    """The send time (to the second) of each message sent to one of ``targets`` since
    ``since``."""
    names = sorted(targets)
    return [
        t
        for (sent_at,) in conn.execute(
            "SELECT max(sent_at) FROM alert_outbox WHERE status = 'sent' AND sent_at >= ?"
            f" AND target IN ({','.join('?' * len(names))}) GROUP BY target, message_id",
            (format_time(since), *names),
        )
        if (t := parse_time(sent_at)) is not None
    ]


def waiting_targets(conn: sqlite3.Connection, now: datetime) -> set[str]:
    """The targets with a pending row attempted and not due again before ``now`` (see
    :func:`due_rows`)."""
    return set(_oldest_waiting(conn, format_time(now)))


def _oldest_waiting(conn: sqlite3.Connection, at: str) -> dict[str, int]:
    """Per target, its oldest pending row attempted and not due again before ``at``."""
    rows = conn.execute(
        "SELECT target, min(id) FROM alert_outbox WHERE status = ? AND attempts > 0"
        " AND next_attempt_at > ? GROUP BY target",
        (PENDING, at),
    )
    return {target: oldest for target, oldest in rows}


def mark_sent(conn: sqlite3.Connection, ids: Sequence[int], now: datetime) -> None:
    conn.executemany(
        "UPDATE alert_outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
        " last_error = NULL WHERE id = ? AND status = 'pending'",
        [(format_time(now), i) for i in ids],
    )


#: How long before a clock step is seen the step may have come (the daemon looks every
#: second): a row stamped that recently may be on the new clock already.
STEP_WINDOW_S = 5.0


def shift_waits(
    conn: sqlite3.Connection,
    step_s: float,
    now: datetime,
    *,
    recorded: Collection[int] = (),
    max_wait_s: float = 3600.0,
) -> int:
    """Move the times of the pending rows by ``step_s``, the step the machine's clock just
    made, so that each wait ends as long after now as it would have without the step;
    returns how many rows moved. The times are wall-clock times: after a step back of an
    hour, a retry due in ten seconds (or an alert in its group wait) would have waited an
    hour more, and after a step forward a target that asked for a minute's wait (DingTalk
    bans a bot that sends on) would have been sent to at once, and alerts queued a minute
    ago expired as too old.

    ``created_at`` moves on every pending row (the group wait and the expiry run from it),
    ``next_attempt_at`` on rows waiting after an attempt and on rows due when queued. A row
    never attempted whose due time is later than its queue time waits for the end of its
    rule's quiet hours, a time of day on the wall clock: that stays.

    What was stamped after the step, before it was seen, is on the new clock already and
    stays: a row queued within :data:`STEP_WINDOW_S` before ``now`` (the new clock's time),
    and the due time of a row in ``recorded`` (its outcome was recorded in that window)
    that is a wait of at most ``max_wait_s`` from ``now``.
    Moved again, an alert queued then expired unsent after a step back of two days, or
    waited a day after a step forward. (An older row whose queue time, on the old clock,
    falls in that window stays too: it then waits or expires up to that window early or
    late, not a day.)"""
    rows = conn.execute(
        "SELECT id, attempts, created_at, next_attempt_at FROM alert_outbox WHERE status = ?",
        (PENDING,),
    ).fetchall()
    step = timedelta(seconds=step_s)
    fresh_from, fresh_to = now - timedelta(seconds=STEP_WINDOW_S), now + timedelta(seconds=1)
    fresh = set(recorded)
    latest = now + timedelta(seconds=max_wait_s + 1)
    moved: list[tuple[str | None, str | None, int]] = []
    for i, attempts, created_text, due_text in rows:
        created, due = parse_time(created_text), parse_time(due_text)
        if created is not None and fresh_from <= created <= fresh_to:
            continue  # queued since the step: its times are the new clock's
        quiet = attempts == 0 and due is not None and created is not None and due > created
        keep_due = quiet or (i in fresh and due is not None and fresh_from <= due <= latest)
        moved.append(
            (
                format_time(created + step) if created is not None else created_text,
                format_time(due + step) if due is not None and not keep_due else due_text,
                i,
            )
        )
    conn.executemany(
        "UPDATE alert_outbox SET created_at = ?, next_attempt_at = ? WHERE id = ?", moved
    )
    return len(moved)


def mark_retry(conn: sqlite3.Connection, ids: Sequence[int], next_at: datetime, error: str) -> None:
    conn.executemany(
        "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
        " WHERE id = ? AND status = 'pending'",
        [(format_time(next_at), error, i) for i in ids],
    )


def redact_errors(conn: sqlite3.Connection, target: str, parts: Sequence[str]) -> int:
    """Mask ``parts`` (the target's secrets, longest first, as ``classify.redact`` takes
    them) in the ``last_error`` of the target's rows; returns how many rows changed. Errors
    are masked as they are recorded; this cleans rows an older version recorded unmasked (a
    webhook's error page quoting its URL)."""
    changed = 0
    for part in parts:
        if part:
            changed += conn.execute(
                "UPDATE alert_outbox SET last_error = replace(last_error, ?, ?)"
                " WHERE target = ? AND last_error IS NOT NULL AND instr(last_error, ?) > 0",
                (part, MASK, target, part),
            ).rowcount
    return changed


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


def _expired_where(
    now: datetime, max_age_s: float, busy: Collection[str]
) -> tuple[str, list[object]]:
    where = "WHERE status = 'pending' AND created_at < ?"
    params: list[object] = [expiry_cutoff(now, max_age_s)]
    if busy:
        where += f" AND target NOT IN ({','.join('?' * len(busy))})"
        params.extend(sorted(busy))
    return where, params


def has_expired(
    conn: sqlite3.Connection, now: datetime, max_age_s: float, busy: Collection[str] = ()
) -> bool:
    """Whether :func:`expire` has anything to do (a read, so the worker's idle rounds write
    nothing)."""
    where, params = _expired_where(now, max_age_s, busy)
    found = conn.execute(f"SELECT 1 FROM alert_outbox {where} LIMIT 1", params).fetchone()
    return found is not None


def expire(
    conn: sqlite3.Connection, now: datetime, max_age_s: float, busy: Collection[str] = ()
) -> dict[str, int]:
    """Dead-letter pending rows created more than ``max_age_s`` ago, reason "expired";
    returns how many per target (call inside a write transaction, so the two agree).

    Not those of the targets in ``busy``, whose delivery is under way: the message may be
    with the target already (an answer that takes its time, a wait for the rate limit), and
    a row it took must end up ``sent``, not dead (from where `alerts retry` would send it
    again). What the delivery leaves pending expires in the round after it."""
    where, params = _expired_where(now, max_age_s, busy)
    per_target = {
        str(target): int(n)
        for target, n in conn.execute(
            f"SELECT target, count(*) FROM alert_outbox {where} GROUP BY target", params
        )
    }
    conn.execute(f"UPDATE alert_outbox SET status = 'dead', last_error = 'expired' {where}", params)
    return per_target


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per status."""
    out = {PENDING: 0, SENT: 0, DEAD: 0}
    for status, n in conn.execute("SELECT status, count(*) FROM alert_outbox GROUP BY status"):
        out[str(status)] = int(n)
    return out


def next_attempt(conn: sqlite3.Connection) -> datetime | None:
    """When the earliest pending delivery is due (one never attempted: its queue time), or
    None when none waits."""
    (due,) = conn.execute(
        "SELECT min(coalesce(next_attempt_at, created_at)) FROM alert_outbox WHERE status = ?",
        (PENDING,),
    ).fetchone()
    return parse_time(due) if due else None


def backlog(conn: sqlite3.Connection) -> tuple[int, str | None]:
    """Deliveries waiting (``pending``) and when the oldest of them was queued (``None``
    when none waits). It reads the partial index of pending rows (``alert_outbox_due``),
    so it stays cheap however many rows were sent."""
    n, oldest = conn.execute(
        "SELECT count(*), min(created_at) FROM alert_outbox WHERE status = ?", (PENDING,)
    ).fetchone()
    return int(n), oldest


def retry_rows(
    conn: sqlite3.Connection, now: datetime, ids: Sequence[int] = (), *, all_dead: bool = False
) -> int:
    """Put dead rows back in the queue, due now. Their ``created_at`` restarts, so the
    ``max_age_s`` expiry counts from the retry.

    Rows that go back together with every other row of their message keep its id: the
    message is sent again whole under the same ``webhook-id``, so a receiver that took it
    after all (one that answered too late until the alerts expired) can tell. A row going
    back without the rest of its message is put in a new message instead: under the old id
    a receiver that had it would drop the row unseen."""
    if all_dead:
        dead = conn.execute(
            "SELECT id, message_id FROM alert_outbox WHERE status = 'dead'"
        ).fetchall()
    else:
        dead = [
            row
            for i in dict.fromkeys(ids)
            for row in conn.execute(
                "SELECT id, message_id FROM alert_outbox WHERE id = ? AND status = 'dead'", (i,)
            )
        ]
    going = {i for i, _ in dead}
    split = {
        name
        for name in {m for _, m in dead if m is not None}
        if any(
            i not in going
            for (i,) in conn.execute("SELECT id FROM alert_outbox WHERE message_id = ?", (name,))
        )
    }
    ts = format_time(now)
    conn.executemany(
        "UPDATE alert_outbox SET status = 'pending', next_attempt_at = ?, created_at = ?,"
        " message_id = CASE WHEN ? THEN NULL ELSE message_id END"
        " WHERE id = ? AND status = 'dead'",
        [(ts, ts, name in split, i) for i, name in dead],
    )
    return len(dead)
