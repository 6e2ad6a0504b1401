"""Diff a stored experiment against a fresh observation, and replay history (pure; no I/O).

Three fields are *tracked* and produce ``changes`` rows: ``Status``, ``TrialStatus`` (compared
as parsed JSON, so formatting never counts as a change) and ``Deleted``. The first sighting of
an experiment is a ``Status`` row with ``old_value`` None, followed by a ``TrialStatus`` row
when it already has trial counts and a ``Deleted`` row when it is already deleted — enough
for :func:`replay` to rebuild every experiment's tracked state from ``changes`` alone.

Every other column is compared with :func:`changed_columns`: the store rewrites a row only
when one of them differs, so re-applying identical data writes no change rows and does not
move ``last_changed_at`` (only ``last_seen_at`` moves forward).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hpo_sync.normalise import Experiment, parse_time
from hpo_sync.schema import (
    CONTENT_COLUMNS,
    decode_trial_status,
    encode_deleted,
    encode_trial_status,
)

STATUS = "Status"
TRIAL_STATUS = "TrialStatus"
DELETED = "Deleted"
#: The ``changes.field`` vocabulary. Readers should ignore values they do not know: later
#: versions may track more fields.
TRACKED_FIELDS: tuple[str, ...] = (STATUS, TRIAL_STATUS, DELETED)

#: No status is documented as terminal; this is the default of the ``terminal_statuses``
#: setting.
DEFAULT_TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"FINISHED", "FAILED", "EARLY_STOPPED", "USER_CANCELED", "SYS_CANCELED"}
)


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One tracked field's change, with values encoded as they are stored in ``changes``."""

    field: str
    old_value: str | None
    new_value: str | None


def diff(old: Mapping[str, Any] | None, new: Experiment) -> list[FieldChange]:
    """The tracked-field changes from the stored row ``old`` (None: never seen) to ``new``.

    ``old`` is the row as stored (``trial_status`` as JSON text or a mapping, ``deleted`` as
    0/1 or a bool).
    """
    return diff_rows(
        old,
        {
            "status": new.status,
            "trial_status": encode_trial_status(new.trial_status),
            "deleted": new.deleted,
        },
    )


def diff_rows(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[FieldChange]:
    """:func:`diff` between two rows in stored form (``status``, ``trial_status``,
    ``deleted``), e.g. ``new`` from :func:`hpo_sync.schema.experiment_content`."""
    new_ts = new.get("trial_status")
    if not isinstance(new_ts, str):
        new_ts = encode_trial_status(decode_trial_status(new_ts))
    new_deleted = bool(new.get("deleted"))
    if old is None:
        out = [FieldChange(STATUS, None, new.get("status"))]
        if new_ts != "{}":
            out.append(FieldChange(TRIAL_STATUS, None, new_ts))
        if new_deleted:
            out.append(FieldChange(DELETED, None, encode_deleted(True)))
        return out
    out = []
    if old.get("status") != new.get("status"):
        out.append(FieldChange(STATUS, old.get("status"), new.get("status")))
    old_ts = old.get("trial_status")
    # Equal text is the common case; otherwise compare parsed, so formatting is no change.
    if old_ts != new_ts:
        old_parsed, new_parsed = decode_trial_status(old_ts), decode_trial_status(new_ts)
        if old_parsed != new_parsed:
            out.append(
                FieldChange(
                    TRIAL_STATUS, encode_trial_status(old_parsed), encode_trial_status(new_parsed)
                )
            )
    old_deleted = bool(old.get("deleted"))
    if old_deleted != new_deleted:
        out.append(FieldChange(DELETED, encode_deleted(old_deleted), encode_deleted(new_deleted)))
    return out


def changed_columns(
    old: Mapping[str, Any], new_content: Mapping[str, Any], columns: Iterable[str] = CONTENT_COLUMNS
) -> list[str]:
    """The ``columns`` whose stored value in ``old`` differs from ``new_content``.

    Both sides are in stored form (see :func:`hpo_sync.schema.experiment_content`), so this is
    a plain equality test per column.
    """
    return [c for c in columns if old.get(c) != new_content.get(c)]


class ReplayState(NamedTuple):
    """An experiment's tracked state as rebuilt from its history."""

    status: str | None
    trial_status: dict[str, int]
    deleted: bool


def _get(change: Any, name: str) -> Any:
    return change[name] if isinstance(change, Mapping) else getattr(change, name)


def replay(changes: Iterable[Any]) -> dict[str, ReplayState]:
    """Fold ``changes`` rows (mappings or objects with ``experiment_id``, ``field`` and
    ``new_value``; in ``id`` order) into ``{experiment_id: (status, trial_status, deleted)}``.

    Unknown fields are ignored, so history written by a later version still replays.
    """
    state: dict[str, ReplayState] = {}
    for change in changes:
        exp_id = _get(change, "experiment_id")
        current = state.get(exp_id, ReplayState(None, {}, False))
        field, value = _get(change, "field"), _get(change, "new_value")
        if field == STATUS:
            current = current._replace(status=value)
        elif field == TRIAL_STATUS:
            current = current._replace(trial_status=decode_trial_status(value))
        elif field == DELETED:
            current = current._replace(deleted=value == "true")
        else:
            continue
        state[exp_id] = current
    return state


@dataclass(frozen=True, slots=True)
class FinishedRun:
    """An experiment's entry into a terminal status, as observed."""

    status: str
    finished_at: str
    run_time_s: float | None


def finished_runs(
    status_changes: Sequence[Any],
    *,
    create_time: str | None,
    terminal_statuses: Collection[str] = DEFAULT_TERMINAL_STATUSES,
) -> list[FinishedRun]:
    """Each time one experiment entered a terminal status, with how long that run took.

    ``status_changes`` are the experiment's ``Status`` rows in ``id`` order (mappings or
    objects with ``new_value``, ``observed_at`` and ``baseline``). A run starts at the first
    non-baseline observation of ``RUNNING`` after the previous terminal status, or — for the
    first run only — at ``create_time`` when no such observation exists. Entries observed by a
    baseline sync are left out: their time is when we first looked, not when they finished.
    A change from one terminal status to another (``FINISHED`` → ``FAILED``) is a finish too:
    the experiment was restarted and ended again between two syncs, which saw no
    ``RUNNING`` — a run of unknown start (``run_time_s`` None), as the README says.
    """
    out: list[FinishedRun] = []
    run_started: str | None = None
    first_run = True
    previous: str | None = None
    for change in status_changes:
        status = _get(change, "new_value")
        observed_at = _get(change, "observed_at")
        baseline = bool(_get(change, "baseline"))
        is_terminal = status in terminal_statuses
        if is_terminal and status != previous:
            if not baseline:
                start = run_started or (create_time if first_run else None)
                out.append(FinishedRun(status, observed_at, _seconds_between(start, observed_at)))
            run_started, first_run = None, False
        elif status == "RUNNING" and run_started is None and not baseline:
            run_started = observed_at
        previous = status
    return out


def _seconds_between(start: str | None, end: str) -> float | None:
    t0, t1 = parse_time(start), parse_time(end)
    if t0 is None or t1 is None:
        return None
    return max(0.0, (t1 - t0).total_seconds())
