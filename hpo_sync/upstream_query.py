"""Validation of PAI AutoML ``ListHpoExperiments`` query parameters, as the upstream does it.

Shared by the simulator (:mod:`hpo_sync.sim.world`, its model of the upstream) and the read
API's upstream-compatible route (:mod:`hpo_sync.api.compat`), so both accept and refuse the
same queries. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Final

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "INVALID_INPUT_PARAMS",
    "MAX_PAGE_SIZE",
    "MAX_TAGS",
    "SORT_FIELDS",
    "InvalidInputError",
    "Query",
    "parse_query",
]

INVALID_INPUT_PARAMS: Final = "INVALID_INPUT_PARAMS"
DEFAULT_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 1000
MAX_TAGS: Final = 20

# SortBy, both vocabularies (the reference's example and the API metadata), case-insensitive.
SORT_FIELDS: Final[Mapping[str, str]] = {
    "gmtcreatetime": "create",
    "create_time": "create",
    "gmtmodifiedtime": "modified",
    "update_time": "modified",
    "name": "name",
    "workspace_id": "workspace",
    "workspaceid": "workspace",
    "status": "status",
    "accessibility": "accessibility",
}


class InvalidInputError(ValueError):
    """A query parameter is invalid; the API answers Code ``INVALID_INPUT_PARAMS``."""

    code = INVALID_INPUT_PARAMS


@dataclass(frozen=True)
class Query:
    """A parsed, validated ``ListHpoExperiments`` query."""

    workspace_id: str | None = None
    name: str | None = None  # lower-cased keyword
    creator: str | None = None
    status: str | None = None
    accessibility: str | None = None
    min_create_ts: int | None = None
    max_create_ts: int | None = None
    tags: tuple[tuple[str, str | None], ...] = ()
    sort_field: str = "create"
    descending: bool = True
    include_config: bool = False
    page_number: int = 1
    page_size: int = DEFAULT_PAGE_SIZE

    def filter_key(self) -> tuple[Any, ...]:
        """Everything but paging and config: the cache key of the sorted id list."""
        return (
            self.workspace_id,
            self.name,
            self.creator,
            self.status,
            self.accessibility,
            self.min_create_ts,
            self.max_create_ts,
            self.tags,
            self.sort_field,
            self.descending,
        )


_INT_RE = re.compile(r"^[0-9]+$")
_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?: (\d{2}):(\d{2}):(\d{2}))?$",
    re.ASCII,  # 0-9 only
)


def _parse_int(name: str, value: str) -> int:
    text = value.strip()
    if not _INT_RE.match(text):
        raise InvalidInputError(f"Invalid '{name}': {value!r} is not an integer.")
    return int(text)


def _parse_create_time(name: str, value: str, tz: tzinfo) -> int:
    m = _DATETIME_RE.match(value.strip())
    if not m:
        raise InvalidInputError(
            f"Invalid '{name}': {value!r}, expected 'yyyy-mm-dd hh:mm:ss' or 'yyyy-mm-dd'."
        )
    y, mo, d, h, mi, sec = (int(p) if p is not None else 0 for p in m.groups())
    try:
        dt = datetime(y, mo, d, h, mi, sec, tzinfo=tz)
    except ValueError as exc:
        raise InvalidInputError(f"Invalid '{name}': {value!r} ({exc}).") from None
    return int(dt.timestamp())


#: How deeply ``Tag`` JSON may nest: a valid one is an array of objects of strings (2), and
#: a deeper one is refused before it is decoded (the decoder recurses once per level).
MAX_TAG_DEPTH: Final = 8
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_JSON_BRACKETS_RE = re.compile(r"[\[\]{}]")


def _shown(value: str, limit: int = 60) -> str:
    """A value quoted for a message: its start only (a parameter can be kilobytes long)."""
    return repr(value[:limit]) + ("…" if len(value) > limit else "")


def _depth(text: str) -> int:
    """How deeply ``text`` nests JSON arrays and objects (brackets inside strings aside)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS_RE.findall(_JSON_STRING_RE.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _is_unicode_text(value: object) -> bool:
    """Can ``value`` be stored and sent as UTF-8? JSON's ``\\ud800`` decodes to a lone
    surrogate, which no UTF-8 text (and no SQLite text) can hold."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_tags(value: str) -> tuple[tuple[str, str | None], ...]:
    if _depth(value) > MAX_TAG_DEPTH:
        raise InvalidInputError(
            f"Invalid 'Tag': JSON nested more than {MAX_TAG_DEPTH} levels deep: {_shown(value)}."
        )
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        raise InvalidInputError(f"Invalid 'Tag': not valid JSON: {_shown(value)}.") from None
    if not isinstance(data, list):
        raise InvalidInputError("Invalid 'Tag': expected a JSON array of {Key, Value}.")
    if len(data) > MAX_TAGS:
        raise InvalidInputError(f"Invalid 'Tag': at most {MAX_TAGS} tags, got {len(data)}.")
    out: list[tuple[str, str | None]] = []
    for item in data:
        if not isinstance(item, dict):
            raise InvalidInputError("Invalid 'Tag': each tag must be an object {Key, Value}.")
        key = item.get("Key", item.get("key"))
        val = item.get("Value", item.get("value"))
        if not isinstance(key, str) or not key:
            raise InvalidInputError("Invalid 'Tag': every tag needs a non-empty string Key.")
        if val is not None and not isinstance(val, str):
            raise InvalidInputError(f"Invalid 'Tag': the Value of {_shown(key)} must be a string.")
        if not (_is_unicode_text(key) and _is_unicode_text(val)):
            raise InvalidInputError(
                "Invalid 'Tag': a Key or Value is not Unicode text (a lone surrogate escape "
                "such as \\ud800)."
            )
        out.append((key, val))
    return tuple(sorted(set(out), key=lambda kv: (kv[0], kv[1] or "")))


def parse_query(
    params: Mapping[str, str],
    *,
    time_zone: tzinfo = UTC,
    default_page_size: int = DEFAULT_PAGE_SIZE,
    max_page_size: int = MAX_PAGE_SIZE,
) -> Query:
    """Validate the query parameters of ``ListHpoExperiments``; unknown names are ignored
    and an empty value counts as absent. ``Status``/``Accessibility`` are compared upper-cased
    and a value outside the vocabulary simply matches nothing. A date-only ``MaxCreateTime``
    means midnight (inclusive). Raises :class:`InvalidInputError`."""

    def get(name: str) -> str | None:
        value = params.get(name)
        return value if value not in (None, "") else None

    page_number = 1
    if (raw := get("PageNumber")) is not None:
        page_number = _parse_int("PageNumber", raw)
        if page_number < 1:
            raise InvalidInputError("Invalid 'PageNumber': pages start from 1.")
    page_size = default_page_size
    if (raw := get("PageSize")) is not None:
        page_size = _parse_int("PageSize", raw)
        if not 1 <= page_size <= max_page_size:
            raise InvalidInputError(
                f"Invalid 'PageSize': {page_size}, must be between 1 and {max_page_size}."
            )
    descending = True
    if (raw := get("Order")) is not None:
        order = raw.strip().upper()  # blanks around it trimmed, as for every other value
        if order not in ("ASC", "DESC"):
            raise InvalidInputError(f"Invalid 'Order': {raw!r}, expected ASC or DESC.")
        descending = order == "DESC"
    sort_field = "create"
    if (raw := get("SortBy")) is not None:
        try:
            sort_field = SORT_FIELDS[raw.strip().lower()]
        except KeyError:
            raise InvalidInputError(f"Invalid 'SortBy': {raw!r}.") from None
    include_config = False
    if (raw := get("IncludeConfigData")) is not None:
        if raw.strip().lower() not in ("true", "false"):
            raise InvalidInputError(f"Invalid 'IncludeConfigData': {raw!r}, expected True/False.")
        include_config = raw.strip().lower() == "true"
    min_ts = max_ts = None
    if (raw := get("MinCreateTime")) is not None:
        min_ts = _parse_create_time("MinCreateTime", raw, time_zone)
    if (raw := get("MaxCreateTime")) is not None:
        max_ts = _parse_create_time("MaxCreateTime", raw, time_zone)
    tags: tuple[tuple[str, str | None], ...] = ()
    if (raw := get("Tag")) is not None:
        tags = _parse_tags(raw)
    name = get("Name")
    status = get("Status")
    accessibility = get("Accessibility")
    # Exact-match filters: blanks around an id are trimmed, as for every other value, and
    # an id of blanks alone counts as absent, as an empty one does.
    workspace_id = (get("WorkspaceId") or "").strip() or None
    creator = (get("Creator") or "").strip() or None
    return Query(
        workspace_id=workspace_id,
        name=name.lower() if name is not None else None,
        creator=creator,
        status=status.strip().upper() if status is not None else None,
        accessibility=accessibility.strip().upper() if accessibility is not None else None,
        min_create_ts=min_ts,
        max_create_ts=max_ts,
        tags=tags,
        sort_field=sort_field,
        descending=descending,
        include_config=include_config,
        page_number=page_number,
        page_size=page_size,
    )
