"""Match changes against alert rules, and quiet hours (pure: no I/O, no clock)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Protocol

from hpo_sync.config import RuleConfig

STATUS = "Status"
TRIAL_STATUS = "TrialStatus"
DELETED = "Deleted"


@dataclass(frozen=True)
class ExperimentInfo:
    """What rules and messages need of an experiment (its row in ``experiments``)."""

    experiment_id: str
    workspace_id: str
    name: str | None
    status: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    trial_status: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ChangeEvent:
    """The tracked-field changes of one experiment seen by one sweep, taken together.

    ``change_id`` is the row the outbox refers to: the ``Status`` change if there is one,
    else the ``TrialStatus`` change, else the ``Deleted`` change. Without a status change,
    ``status_from == status_to`` is the experiment's current status.
    """

    change_id: int
    experiment: ExperimentInfo
    status_from: str | None
    status_to: str | None
    status_changed: bool
    trials_from: Mapping[str, int]
    trials_to: Mapping[str, int]
    trials_changed: bool
    deleted: bool | None = None

    @property
    def failed_delta(self) -> int:
        return int(self.trials_to.get("FAILED", 0)) - int(self.trials_from.get("FAILED", 0))


@dataclass(frozen=True)
class Route:
    """One outbox row to write."""

    change_id: int
    target: str
    rule: str
    next_attempt_at: datetime


class ChangeLike(Protocol):
    """The attributes of :class:`hpo_sync.store.ChangeRow` this module reads."""

    @property
    def id(self) -> int: ...
    @property
    def experiment_id(self) -> str: ...
    @property
    def field(self) -> str: ...
    @property
    def old_value(self) -> str | None: ...
    @property
    def new_value(self) -> str | None: ...
    @property
    def baseline(self) -> bool: ...


def decode_counts(value: str | None) -> dict[str, int]:
    """A ``TrialStatus`` value (JSON text) as a dict; ``{}`` for NULL or junk."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, int] = {}
    for k, v in data.items():
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def decode_tags(value: str | None) -> dict[str, str]:
    """The ``experiments.tags`` JSON list as a ``{key: value}`` dict."""
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    out: dict[str, str] = {}
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and "Key" in item:
                out[str(item["Key"])] = str(item.get("Value", ""))
    elif isinstance(data, dict):
        out = {str(k): str(v) for k, v in data.items()}
    return out


def build_events(
    rows: Iterable[ChangeLike], experiments: Mapping[str, ExperimentInfo]
) -> list[ChangeEvent]:
    """Group non-baseline change rows per experiment into events (baseline rows never alert)."""
    grouped: dict[str, list[ChangeLike]] = {}
    for row in rows:
        if row.baseline or row.experiment_id not in experiments:
            continue
        grouped.setdefault(row.experiment_id, []).append(row)
    events: list[ChangeEvent] = []
    for exp_id, changes in grouped.items():
        exp = experiments[exp_id]
        status = next((c for c in changes if c.field == STATUS), None)
        trials = next((c for c in changes if c.field == TRIAL_STATUS), None)
        deleted = next((c for c in changes if c.field == DELETED), None)
        anchor = status or trials or deleted
        if anchor is None:
            continue
        events.append(
            ChangeEvent(
                change_id=anchor.id,
                experiment=exp,
                status_from=status.old_value if status else exp.status,
                status_to=status.new_value if status else exp.status,
                status_changed=status is not None,
                trials_from=decode_counts(trials.old_value) if trials else exp.trial_status,
                trials_to=decode_counts(trials.new_value) if trials else exp.trial_status,
                trials_changed=trials is not None,
                deleted=(deleted.new_value == "true") if deleted else None,
            )
        )
    return events


def matches(rule: RuleConfig, event: ChangeEvent) -> bool:
    """Whether every condition of ``rule`` holds for ``event``.

    With ``trial_failures_rose`` the status conditions apply to the experiment's status
    before and after (equal when only trials changed); without it, naming ``from_status`` or
    ``to_status`` asks for a change of status.
    """
    exp = event.experiment
    if rule.workspaces and exp.workspace_id not in rule.workspaces:
        return False
    if rule.experiments and not any(fnmatchcase(exp.name or "", g) for g in rule.experiments):
        return False
    if any(exp.tags.get(k) != v for k, v in rule.tags):
        return False
    if rule.trial_failures_rose:
        if not event.trials_changed or event.failed_delta < rule.trial_failures_min:
            return False
    elif (rule.from_status or rule.to_status) and not event.status_changed:
        return False
    if rule.from_status and event.status_from not in rule.from_status:
        return False
    return not (rule.to_status and event.status_to not in rule.to_status)


def parse_quiet_hours(spec: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as (start, end) minutes after midnight UTC."""
    start, end = spec.split("-")
    sh, sm = start.split(":")
    eh, em = end.split(":")
    return int(sh) * 60 + int(sm), int(eh) * 60 + int(em)


def quiet_until(spec: str | None, now: datetime) -> datetime | None:
    """The end of the quiet window ``now`` (aware, UTC) falls in, else None.

    The window is ``[start, end)``; it wraps midnight when ``end < start``; ``start == end``
    is empty.
    """
    if not spec:
        return None
    start, end = parse_quiet_hours(spec)
    if start == end:
        return None
    minute = now.hour * 60 + now.minute
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if start < end:
        if start <= minute < end:
            return midnight + timedelta(minutes=end)
        return None
    if minute >= start:
        return midnight + timedelta(days=1, minutes=end)
    if minute < end:
        return midnight + timedelta(minutes=end)
    return None


def route(events: Iterable[ChangeEvent], rules: Sequence[RuleConfig], now: datetime) -> list[Route]:
    """The outbox rows for ``events``: one per (event, target). When several rules send the
    same change to one target, the one due first wins (then the first in the config)."""
    routes: list[Route] = []
    for event in events:
        chosen: dict[str, Route] = {}
        for rule in rules:
            if not matches(rule, event):
                continue
            due = quiet_until(rule.quiet_hours, now) or now
            for target in rule.targets:
                current = chosen.get(target)
                if current is None or due < current.next_attempt_at:
                    chosen[target] = Route(event.change_id, target, rule.name, due)
        routes.extend(chosen.values())
    return routes


@dataclass(frozen=True)
class StallNotice:
    """A workspace stopped syncing (``stalled``) or synced again (``recovered``)."""

    workspace_id: str
    label: str | None
    state: str
    last_success_at: datetime | None


def stall_notices(
    last_success: Mapping[str, datetime | None],
    labels: Mapping[str, str | None],
    stalled: set[str],
    now: datetime,
    stalled_after_s: float,
    since: datetime,
) -> list[StallNotice]:
    """What changed since the ``stalled`` set was last updated. A workspace never synced
    counts from ``since`` (when the worker started)."""
    out: list[StallNotice] = []
    for ws, last in sorted(last_success.items()):
        age_s = (now - (last or since)).total_seconds()
        is_stalled = age_s > stalled_after_s
        if is_stalled and ws not in stalled:
            out.append(StallNotice(ws, labels.get(ws), "stalled", last))
        elif not is_stalled and ws in stalled:
            out.append(StallNotice(ws, labels.get(ws), "recovered", last))
    return out
