"""Normalise raw ListHpoExperiments objects into typed records (pure; no I/O, no clock).

Upstream types drift between documents and responses: ``Creator`` and ``JobType`` arrive as
strings or numbers, ``TrialStatus`` counts as ints or strings, ``Deleted`` as bool, 0/1 or
"true", and times as ``2023-03-31T10:29:30Z`` or ``2024-01-01 08:30:11``. Everything is made
one shape here; the raw object is kept whole so that fields added upstream are not lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # strftime form of format_time (which also pads years < 1000)

_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2}))?(?:[.,](\d+))?)?"
    r"\s*(Z|z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)?$",
    re.ASCII,
)


# The two forms upstream actually sends: ISO UTC ``2023-03-31T10:29:30Z`` and naive
# ``2024-01-01 08:30:11``. parse_time() and iso_time() read them (when the zone is UTC) without
# the general regex and offset arithmetic; _TIME_RE accepts both, and fromisoformat() rejects
# the same impossible dates, so the fast path returns exactly what the general one would.
_CANONICAL_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}Z?", re.ASCII)


def parse_time(value: Any, *, naive_tz: tzinfo = UTC) -> datetime | None:
    """Parse an upstream time (ISO-8601 with or without zone, ``yyyy-mm-dd hh:mm:ss``,
    ``yyyy-mm-dd``, epoch seconds or milliseconds, or a datetime) into an aware UTC
    datetime, truncated to the second.

    A time without a zone is taken to be in ``naive_tz``. Returns None for empty or
    unparseable input, never raises.
    """
    # the forms upstream sends (and the mirror stores): no regex groups, no offset maths
    fast = type(value) is str and _CANONICAL_RE.fullmatch(value)
    if fast and (value[19:] == "Z" or naive_tz is UTC):
        try:
            return datetime.fromisoformat(value[:19]).replace(tzinfo=UTC)
        except ValueError:
            return None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=naive_tz)
        return _to_utc(dt)
    if isinstance(value, int | float):
        try:
            seconds = value / 1000 if abs(value) > 10**11 else value  # epoch ms past 1973
            return datetime.fromtimestamp(seconds, UTC).replace(microsecond=0)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return parse_time(int(text), naive_tz=naive_tz) if len(text) <= 20 else None
    m = _TIME_RE.match(text)
    if not m:
        return None
    year, month, day, hh, mm, ss, _frac, zone = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hh or 0), int(mm or 0), int(ss or 0))
        if zone is None:
            zone_info: tzinfo = naive_tz
        elif zone.upper() in ("Z", "UTC", "GMT"):
            zone_info = UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            digits = zone[1:].replace(":", "")
            if int(digits[2:] or 0) >= 60:  # +08:99 is no offset (not +09:39)
                return None
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            zone_info = timezone(sign * offset)  # ValueError beyond ±24 h
    except ValueError:
        return None
    return _to_utc(dt.replace(tzinfo=zone_info))


def time_has_zone(value: Any) -> bool | None:
    """Whether an upstream time says its zone (``2023-03-31T10:29:30Z``, an offset, epoch
    seconds): True; is naive (``2024-01-01 08:30:11``, read in whatever zone the reader
    assumes): False; None when :func:`parse_time` would not read it.

    Times of one form order as upstream's do whatever zone naive ones are read in; a naive
    time read in the wrong zone against a zoned one does not."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return True
    if isinstance(value, datetime):
        return value.tzinfo is not None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return True if len(text) <= 20 else None
    m = _TIME_RE.match(text)
    if m is None:
        return None
    return m.group(8) is not None


_FRACTION_RE = re.compile(r"\d{2}:\d{2}:\d{2}[.,](\d+)", re.ASCII)


def round_up_fraction(dt: datetime, text: str) -> datetime:
    """``dt`` read from ``text`` by :func:`parse_time` (which drops a fraction of a second),
    as a filter bound against stored whole seconds: a non-zero fraction rounds up, so that
    ``< 10:00:00.5`` means ``< 10:00:01`` and ``>= 10:00:00.5`` means ``>= 10:00:01`` for
    them. Raises OverflowError past the last representable time."""
    fraction = _FRACTION_RE.search(text)
    if fraction is not None and fraction.group(1).strip("0"):
        return dt + timedelta(seconds=1)
    return dt


def _to_utc(dt: datetime) -> datetime | None:
    try:
        return dt.astimezone(UTC).replace(microsecond=0)
    except (OverflowError, ValueError):  # year 1 or 9999 pushed past the edge by the offset
        return None


def format_time(dt: datetime) -> str:
    """An aware datetime as ISO-8601 UTC ``YYYY-MM-DDTHH:MM:SSZ`` (years zero-padded)."""
    u = dt.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


def iso_time(value: Any, *, naive_tz: tzinfo = UTC) -> str | None:
    """:func:`parse_time` then :func:`format_time`; None when the value is not a time."""
    if type(value) is str and _CANONICAL_RE.fullmatch(value):
        # 2023-03-31T10:29:30Z (zone given) or, read in UTC, 2024-01-01 08:30:11: already
        # the stored form once the date is known to be valid (fromisoformat checks ranges).
        utc = value[19:] == "Z"
        if (utc or naive_tz is UTC) and (value[10] == "T") == utc:
            try:
                datetime.fromisoformat(value[:19])
            except ValueError:
                return None
            return value if utc else f"{value[:10]}T{value[11:]}Z"
    dt = parse_time(value, naive_tz=naive_tz)
    return format_time(dt) if dt else None


def _text(value: Any) -> str | None:
    if type(value) is str:  # the common case first
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, str):
            text = value.strip()
            if not text.isascii():
                return None
            try:
                return int(text)
            except ValueError:
                value = float(text)  # "3.0", "1e3"
        return int(value)  # floats truncate; NaN and infinities raise
    except (TypeError, ValueError, OverflowError):
        return None


# SQLite's INTEGER: a count past it (1e19 from a broken upstream) failed every write of
# its batch, and so every sweep of its workspace, with OverflowError. Stored NULL; ``raw``
# keeps what upstream sent.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int64(value: Any) -> int | None:
    n = _int(value)
    return n if n is not None and _INT64_MIN <= n <= _INT64_MAX else None


def upstream_bool(value: Any) -> bool:
    """A flag as upstream sends it (``Deleted``): a bool, 0/1, or a string such as
    ``"true"``; anything else is false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0 and value == value  # NaN is not "deleted"
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "y", "t")
    return False


def normalise_trial_status(value: Any) -> dict[str, int]:
    """``{trial-status: count}`` with int counts, sorted keys and zero counts dropped.

    Accepts a dict, a JSON string of one, or a list of ``{Status, Count}`` objects.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    items: Iterable[tuple[Any, Any]]
    if type(value) is dict or isinstance(value, Mapping):  # ABC checks are slow: dict first
        items = value.items()
    elif isinstance(value, list):
        items = (
            (v.get("Status") or v.get("status"), v.get("Count") or v.get("count"))
            for v in value
            if isinstance(v, Mapping)
        )
    else:
        return {}
    out: dict[str, int] = {}
    for k, v in items:
        n = v if type(v) is int else _int(v)
        if k is None or n is None or n <= 0:
            continue  # zero (and nonsensical negative) counts carry no information
        key = str(k).strip().upper()
        if key:
            out[key] = out.get(key, 0) + n
    return dict(sorted(out.items()))


def normalise_tags(value: Any) -> list[dict[str, str]]:
    """Tags as a list of ``{"Key", "Value"}`` with string values, in upstream order."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if isinstance(value, Mapping):
        value = [{"Key": k, "Value": v} for k, v in value.items()]
    if not isinstance(value, list):
        return []
    out = []
    for tag in value:
        if type(tag) is dict or isinstance(tag, Mapping):
            key = tag["Key"] if "Key" in tag else tag.get("key")
            if key is None:
                continue
            val = _text(tag["Value"] if "Value" in tag else tag.get("value"))
            out.append({"Key": _text(key) or "", "Value": val or ""})
    return out


#: Upstream field -> the column it fills, for the fields whose absence from an answer keeps
#: the stored value (:attr:`Experiment.absent`). Not Deleted (left out for every live
#: experiment), WorkspaceId (the workspace queried) or ExperimentId (the key).
_REPORTED_FIELDS = {
    "Name": "name",
    "Creator": "creator",
    "Status": "status",
    "JobType": "job_type",
    "Accessibility": "accessibility",
    "Description": "description",
    "TrialCount": "trial_count",
    "TrialStatus": "trial_status",
    "Tags": "tags",
    "SearchSpace": "search_space",
    "ConfigIni": "config_ini",
    "ConfigYml": "config_yml",
    "GmtCreateTime": "gmt_create_time",
    "GmtModifiedTime": "gmt_modified_time",
}
_NONE_ABSENT: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Experiment:
    """One experiment, normalised. Field names are the mirror's column names."""

    experiment_id: str
    workspace_id: str | None
    name: str | None
    creator: str | None
    status: str | None
    job_type: str | None
    accessibility: str | None
    description: str | None
    trial_count: int | None
    trial_status: dict[str, int]
    tags: list[dict[str, str]]
    search_space: str | None
    config_ini: str | None
    config_yml: str | None
    gmt_create_time: str | None
    gmt_modified_time: str | None
    deleted: bool
    raw: dict[str, Any] = field(compare=False, repr=False)
    #: The columns whose upstream field the answer left out (not: sent as null). The store
    #: keeps their stored values: not reported is not "became empty".
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


_new_object = object.__new__
_set_attribute = object.__setattr__  # past the frozen class's own __setattr__


def normalise(raw: Mapping[str, Any], *, naive_tz: tzinfo = UTC) -> Experiment | None:
    """Normalise one raw upstream experiment; None when it has no ``ExperimentId``."""
    get = raw.get
    # The _text calls written out for str values, the type upstream sends almost always:
    # 100,000 experiments make 1.4 million of these calls.
    text = _text
    value = get("ExperimentId")
    exp_id = (value if type(value) is str else text(value) or "").strip()
    if not exp_id:
        return None
    status = get("Status")
    status = status if type(status) is str else text(status)
    ws = get("WorkspaceId")
    name = get("Name")
    creator = get("Creator")
    job_type = get("JobType")
    accessibility = get("Accessibility")
    description = get("Description")
    space = get("SearchSpace")
    ini = get("ConfigIni")
    yml = get("ConfigYml")
    trial_count = get("TrialCount")
    deleted = get("Deleted")
    # The instance's attributes set as one dict: a frozen dataclass's __init__ assigns each
    # of its 19 fields through object.__setattr__, ~5 µs an experiment (a baseline builds
    # 100,000 on the event loop's thread) against ~1 µs. A test keeps the keys in step
    # with the class's fields.
    exp = _new_object(Experiment)
    _set_attribute(
        exp,
        "__dict__",
        {
            "experiment_id": exp_id,
            # blank (or padded): the workspace queried, as when the field is left out
            "workspace_id": (ws if type(ws) is str else text(ws) or "").strip() or None,
            "name": name if type(name) is str else text(name),
            "creator": creator if type(creator) is str else text(creator),
            "status": (status.strip().upper() or None) if status else None,
            "job_type": job_type if type(job_type) is str else text(job_type),
            "accessibility": (accessibility if type(accessibility) is str else text(accessibility)),
            "description": description if type(description) is str else text(description),
            "trial_count": (
                trial_count
                if type(trial_count) is int and _INT64_MIN <= trial_count <= _INT64_MAX
                else _int64(trial_count)
            ),
            "trial_status": normalise_trial_status(get("TrialStatus")),
            "tags": normalise_tags(get("Tags")),
            "search_space": space if type(space) is str else text(space),
            "config_ini": ini if type(ini) is str else text(ini),
            "config_yml": yml if type(yml) is str else text(yml),
            "gmt_create_time": iso_time(get("GmtCreateTime"), naive_tz=naive_tz),
            "gmt_modified_time": iso_time(get("GmtModifiedTime"), naive_tz=naive_tz),
            "deleted": deleted if type(deleted) is bool else upstream_bool(deleted),
            "raw": dict(raw),
            # One C-level subset test in the usual case of an answer with every field.
            "absent": (
                _NONE_ABSENT
                if raw.keys() >= _REPORTED_FIELDS.keys()
                else frozenset(c for k, c in _REPORTED_FIELDS.items() if k not in raw)
            ),
        },
    )
    return exp


@dataclass
class NormaliseResult:
    experiments: list[Experiment]
    skipped: int


def normalise_all(raws: Iterable[Any], *, naive_tz: tzinfo = UTC) -> NormaliseResult:
    """Normalise many; records without ``ExperimentId`` (or not objects) are counted as skipped."""
    out: list[Experiment] = []
    skipped = 0
    for raw in raws:
        is_mapping = type(raw) is dict or isinstance(raw, Mapping)
        exp = normalise(raw, naive_tz=naive_tz) if is_mapping else None
        if exp is None:
            skipped += 1
        else:
            out.append(exp)
    return NormaliseResult(out, skipped)


def to_upstream(exp: Experiment, *, include_config: bool = True) -> dict[str, Any]:
    """The experiment in the upstream response shape and field names, with normalised types."""
    out: dict[str, Any] = {
        "ExperimentId": exp.experiment_id,
        "Name": exp.name,
        "Status": exp.status,
        "Creator": exp.creator,
        "WorkspaceId": exp.workspace_id,
        "Accessibility": exp.accessibility,
        "Description": exp.description,
        "JobType": exp.job_type,
        "GmtCreateTime": exp.gmt_create_time,
        "GmtModifiedTime": exp.gmt_modified_time,
        "TrialCount": exp.trial_count,
        "TrialStatus": dict(exp.trial_status),
        "Deleted": exp.deleted,
        "Tags": [dict(t) for t in exp.tags],
    }
    if include_config:
        out["SearchSpace"] = exp.search_space
        out["ConfigIni"] = exp.config_ini
        out["ConfigYml"] = exp.config_yml
    return out
