"""Rendering query results for people and for scripts: aligned tables, key/value blocks, CSV,
JSON arrays and JSON lines.

Pure: rows in, text out, no I/O and no clock. :mod:`hpo_sync.cli_query` does the reading and
writing. Records for scripts keep the upstream field names (``ExperimentId``, ``Status``,
``TrialStatus`` …, via :func:`hpo_sync.normalise.to_upstream`); the mirror's own columns are
named the same way, in PascalCase (``first_seen_at`` → ``FirstSeenAt``).
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from hpo_sync.normalise import Experiment, parse_time, to_upstream
from hpo_sync.schema import decode_trial_status, row_to_experiment

#: The mirror's own columns appended to every experiment record.
MIRROR_FIELDS: tuple[str, ...] = ("FirstSeenAt", "LastSeenAt", "LastChangedAt")
#: Keys of :func:`experiment_record`, in order (the CSV header).
EXPERIMENT_FIELDS: tuple[str, ...] = (
    "ExperimentId",
    "Name",
    "Status",
    "Creator",
    "WorkspaceId",
    "Accessibility",
    "Description",
    "JobType",
    "GmtCreateTime",
    "GmtModifiedTime",
    "TrialCount",
    "TrialStatus",
    "Deleted",
    "Tags",
    "SearchSpace",
    "ConfigIni",
    "ConfigYml",
    *MIRROR_FIELDS,
)
#: Keys of a ``changes`` record (:func:`pascal_record` of a change row).
CHANGE_FIELDS: tuple[str, ...] = (
    "Id",
    "ExperimentId",
    "WorkspaceId",
    "Field",
    "OldValue",
    "NewValue",
    "ObservedAt",
    "SyncRunId",
    "Baseline",
)
#: Keys of a ``sync_runs`` record.
SYNC_RUN_FIELDS: tuple[str, ...] = (
    "Id",
    "WorkspaceId",
    "Mode",
    "StartedAt",
    "FinishedAt",
    "Status",
    "ApiCalls",
    "Pages",
    "ExperimentsSeen",
    "Changes",
    "Error",
)
#: Experiment statuses in the order tables show them: active first, then how runs ended.
STATUS_ORDER: tuple[str, ...] = (
    "RUNNING",
    "WAITING",
    "CREATED",
    "FINISHED",
    "FAILED",
    "EARLY_STOPPED",
    "USER_CANCELED",
    "SYS_CANCELED",
    "NO_MORE_TRIAL",
    "UNKNOWN",
)
#: How a missing status (NULL) is shown, in tables and as a key of JSON objects.
NO_STATUS = "(none)"
NONE_CELL = "-"
GAP = "  "

# (``absent`` describes an upstream answer, not a row)
_EXPERIMENT_ATTRS = tuple(f.name for f in fields(Experiment) if f.name != "absent")


# --- records for scripts --------------------------------------------------------------------


def pascal_case(column: str) -> str:
    """``first_seen_at`` → ``FirstSeenAt``."""
    return "".join(part[:1].upper() + part[1:] for part in column.split("_"))


def pascal_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A mirror row (``changes``, ``sync_runs``) with its column names in PascalCase and
    ``baseline`` as a bool."""
    out = {pascal_case(k): v for k, v in row.items()}
    if "Baseline" in out:
        out["Baseline"] = bool(out["Baseline"])
    return out


def row_experiment(row: Mapping[str, Any]) -> Experiment:
    """The :class:`Experiment` of an ``experiments`` row, as stored (JSON text) or decoded
    (as :meth:`hpo_sync.store.Store.list_experiments` returns it)."""
    if isinstance(row.get("tags"), str):
        return row_to_experiment(row)
    return Experiment(**{name: row[name] for name in _EXPERIMENT_ATTRS})


def experiment_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """An experiment in the upstream shape and field names, plus the mirror's fields."""
    out = to_upstream(row_experiment(row))
    out["FirstSeenAt"] = row["first_seen_at"]
    out["LastSeenAt"] = row["last_seen_at"]
    out["LastChangedAt"] = row["last_changed_at"]
    return out


def status_key(status: str | None) -> str:
    return NO_STATUS if status is None else status


def ordered_statuses(statuses: Iterable[str | None]) -> list[str | None]:
    """Statuses in :data:`STATUS_ORDER`, unknown ones after them by name, None last."""
    known = set(statuses)
    rest = sorted(s for s in known if s is not None and s not in STATUS_ORDER)
    out: list[str | None] = [s for s in STATUS_ORDER if s in known]
    out += rest
    if None in known:
        out.append(None)
    return out


# --- JSON and CSV ---------------------------------------------------------------------------


def json_line(record: Mapping[str, Any]) -> str:
    """One record as one line of JSON (UTF-8 kept readable), newline included."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_document(record: Mapping[str, Any]) -> str:
    """One object for people and scripts alike: indented, UTF-8 kept readable."""
    return json.dumps(record, ensure_ascii=False, indent=2) + "\n"


def json_array_chunks(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """One JSON array, one element per line, produced element by element (constant memory)."""
    first = True
    for record in records:
        yield ("[\n" if first else ",\n") + json.dumps(record, ensure_ascii=False)
        first = False
    yield "[]\n" if first else "\n]\n"


def csv_cell(value: Any) -> str:
    """A CSV cell: empty for None, ``true``/``false``, nested values as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def csv_chunks(header: Sequence[str], records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """A header row, then one row per record (keys outside ``header`` are dropped)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for record in records:
        writer.writerow([csv_cell(record.get(key)) for key in header])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    if buf.tell():  # no records: the header alone
        yield buf.getvalue()


# --- text cells -----------------------------------------------------------------------------

# Control characters (C0, DEL, C1) and line/paragraph separators: a name must not move the
# cursor or inject terminal escapes, nor break a table row.
_CONTROL: dict[int, str | None] = {
    c: " " for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}
# Bidirectional controls (embeddings, overrides, isolates, marks): a name holding U+202E
# shown the rest of its table row reversed, ids and times included. Dropped: they have no
# width of their own.
_CONTROL.update(
    dict.fromkeys((0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)))
)


def clean(text: str) -> str:
    """``text`` on one line, with control characters shown as spaces and bidirectional
    controls left out."""
    return text.translate(_CONTROL)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes (CJK characters count two)."""
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, ending in ``…`` when it was cut."""
    if display_width(text) <= width:
        return text
    if width <= 0:
        return ""
    out: list[str] = []
    used = 0
    for ch in text:
        w = _char_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(text: str, width: int, *, right: bool = False) -> str:
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def short_time(value: str | None) -> str:
    """A stored UTC time for a table: ``2024-03-01 08:30``."""
    if not value:
        return NONE_CELL
    dt = parse_time(value)
    if dt is None:
        return value
    # (not strftime: its %Y does not pad years before 1000, e.g. Go's zero time, year 1)
    return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} {dt.hour:02d}:{dt.minute:02d}"


def trial_status_text(trial_status: Mapping[str, int]) -> str:
    """``{"FAILED": 3, "SUCCEEDED": 11}`` → ``FAILED 3, SUCCEEDED 11``."""
    return ", ".join(f"{k} {v}" for k, v in trial_status.items()) or NONE_CELL


def trials_cell(trial_count: int | None, trial_status: Mapping[str, int]) -> str:
    """``12 (3 failed)``: the trial count, and the failed trials when there are any."""
    total = trial_count if trial_count is not None else sum(trial_status.values())
    if trial_count is None and not trial_status:
        return NONE_CELL
    failed = trial_status.get("FAILED", 0)
    return f"{total} ({failed} failed)" if failed else str(total)


def status_cell(status: str | None, deleted: bool = False) -> str:
    text = status or NO_STATUS
    return f"{text} (deleted)" if deleted else text


def tags_text(tags: Sequence[Mapping[str, str]]) -> str:
    """``key=value, …``, each as ``--tag`` takes it back: in the key a backslash is written
    ``\\\\`` and a ``=`` ``\\=`` (the key ``a=b`` of the value ``c=d`` is ``a\\=b=c=d``)."""
    return (
        ", ".join(f"{_tag_key(t.get('Key', ''))}={t.get('Value', '')}" for t in tags) or NONE_CELL
    )


def _tag_key(key: str) -> str:
    return key.replace("\\", "\\\\").replace("=", "\\=")


def duration_text(seconds: float | None) -> str:
    """``45s``, ``12m 5s``, ``2h 13m``, ``3d 4h``."""
    if seconds is None:
        return NONE_CELL
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def rate_text(rate: float | None) -> str:
    return NONE_CELL if rate is None else f"{rate:.1%}"


def change_value_text(field: str, value: str | None) -> str:
    """A ``changes`` value for people: trial counts spelled out, NULL as ``(none)``."""
    if value is None:
        return NO_STATUS
    if field == "TrialStatus":
        try:
            trial_status = decode_trial_status(value)
        except (ValueError, TypeError):
            return value
        return trial_status_text(trial_status) if trial_status else NO_STATUS
    return value


def change_text(field: str, old: str | None, new: str | None) -> str:
    """``RUNNING → FAILED``."""
    return f"{change_value_text(field, old)} → {change_value_text(field, new)}"


def run_cell(sync_run_id: int | None, baseline: bool) -> str:
    """Which sweep saw a change: ``#12``, ``#3 baseline``."""
    run = NONE_CELL if sync_run_id is None else f"#{sync_run_id}"
    return f"{run} baseline" if baseline else run


# --- tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One table column. ``shrink`` columns give up width (their cells are truncated with
    ``…``) when the table is wider than the terminal; the others never do.

    ``widest`` is the widest cell the column can hold, where that is known in advance (a
    status, a time): a streamed table takes its widths from its first page, and a column
    sized this way still lines up when a wider cell first appears on a later page."""

    header: str
    align: Literal["left", "right"] = "left"
    shrink: bool = False
    min_width: int = 12
    widest: int = 0


def fit_widths(
    columns: Sequence[Column], rows: Iterable[Sequence[str]], max_width: int | None = None
) -> list[int]:
    """Column widths for ``rows``; with ``max_width``, shrink columns are narrowed to fit."""
    widths = [max(display_width(c.header), c.widest) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], display_width(clean(cell)))
    if max_width is None:
        return widths
    excess = sum(widths) + len(GAP) * (len(columns) - 1) - max_width
    for i, column in enumerate(columns):
        if excess <= 0:
            break
        if column.shrink:
            floor = max(column.min_width, display_width(column.header))
            cut = min(excess, widths[i] - floor)
            if cut > 0:
                widths[i] -= cut
                excess -= cut
    return widths


def format_row(
    columns: Sequence[Column], widths: Sequence[int], cells: Sequence[str], *, cut: bool = True
) -> str:
    """One table line. A cell of a non-shrink column wider than its width pushes the rest of
    that line right rather than being cut (ids are never truncated). ``cut=False`` treats
    shrink columns the same way: without a terminal to fit, a name longer than the widths
    measured on a streamed table's first page is kept whole, not cut to them."""
    parts = []
    for column, width, cell in zip(columns, widths, cells, strict=True):
        text = clean(cell)
        if column.shrink and cut:
            text = truncate(text, width)
        parts.append(pad(text, width, right=column.align == "right"))
    return GAP.join(parts).rstrip()


def format_header(columns: Sequence[Column], widths: Sequence[int]) -> str:
    return format_row(columns, widths, [c.header for c in columns])


def format_table(
    columns: Sequence[Column], rows: Sequence[Sequence[str]], max_width: int | None = None
) -> list[str]:
    """A whole table (header first) as lines."""
    widths = fit_widths(columns, rows, max_width)
    return [format_header(columns, widths), *(format_row(columns, widths, r) for r in rows)]


def format_fields(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``label  value`` lines, labels aligned; a multi-line value continues indented."""
    width = max((display_width(label) for label, _ in pairs), default=0)
    out = []
    for label, value in pairs:
        lines = value.splitlines() or [""]
        out.append(f"{pad(label, width)}{GAP}{clean(lines[0])}".rstrip())
        out += [f"{' ' * width}{GAP}{clean(line)}".rstrip() for line in lines[1:]]
    return out
