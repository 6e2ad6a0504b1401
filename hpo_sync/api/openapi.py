"""The read API's contract: its query parameters, response schemas and OpenAPI 3 document.

Parameters are declared once, as :class:`Param` tables; the handlers validate requests with
:func:`parse_params` against the very same tables that :func:`build_document` describes, so
the document cannot drift from what the server accepts. Validation is strict: an unknown
parameter, a repeated single-valued one, an empty value, a value out of range or not in its
vocabulary is a 400 naming the parameter and why.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from multidict import MultiMapping

from .. import __version__
from ..config import EXPERIMENT_STATUSES, WORKSPACE_ID_CHARS, WORKSPACE_ID_MAX_LEN
from ..normalise import format_time, parse_time, round_up_fraction
from .errors import BadParameterError

__all__ = [
    "CHANGES_PARAMS",
    "EXPERIMENTS_PARAMS",
    "EXPERIMENT_CHANGES_PARAMS",
    "EXPERIMENT_PARAMS",
    "SYNC_PARAMS",
    "WORKSPACES_PARAMS",
    "Param",
    "build_document",
    "parse_params",
]

ParamKind = Literal["string", "integer", "boolean", "enum", "time", "tag"]

#: Values of every parameter of one request, all names together.
MAX_QUERY_VALUES = 64
#: A query string longer than this is refused (400) before any route reads it.
MAX_QUERY_STRING = 4096
#: No route reads a request body; anything bigger than this is refused (413).
MAX_BODY_BYTES = 1024
MAX_SQLITE_INT = 2**63 - 1
SORTS = ("-created", "created", "-modified", "modified", "name", "-name")
CHANGE_FIELDS = ("Status", "TrialStatus", "Deleted")
SYNC_MODES = ("auto", "hot", "full")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_WAIT_S = 60

# The same pattern serves Python (re.fullmatch) and JSON Schema (ECMA-262): ASCII classes only.
TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,9})?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?$"
)
#: Control characters (C0, DEL, C1): no name, creator or tag holds one, and SQLite's LIKE
#: reads its pattern only up to a NUL, so a filter holding one is refused.
CONTROL_CHARS = r"\u0000-\u001F\u007F-\u009F"
TEXT_PATTERN = rf"^[^{CONTROL_CHARS}]*$"
TAG_PATTERN = rf"^[^:{CONTROL_CHARS}]+(:[^{CONTROL_CHARS}]*)?$"
#: A status: PAI's are upper-case words joined by "_"; one it adds later is taken as well.
STATUS_PATTERN = r"^[A-Z][A-Z0-9_]*$"
#: A workspace id as the config takes one (printable, no spaces): every configured workspace
#: can be named.
WORKSPACE_PATTERN = rf"^{WORKSPACE_ID_CHARS}+$"


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter: how it is validated and how the document describes it."""

    name: str
    kind: ParamKind
    description: str
    repeatable: bool = False
    required: bool = False
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    max_length: int = 200
    max_items: int = 20
    default: Any = None
    pattern: str | None = None

    def schema(self) -> dict[str, Any]:
        item: dict[str, Any]
        if self.kind == "integer":
            item = {"type": "integer"}
            if self.minimum is not None:
                item["minimum"] = self.minimum
            if self.maximum is not None:
                item["maximum"] = self.maximum
        elif self.kind == "boolean":
            item = {"type": "boolean"}
        elif self.kind == "enum":
            item = {"type": "string", "enum": list(self.enum)}
        else:
            item = {"type": "string", "minLength": 1, "maxLength": self.max_length}
            pattern = self.pattern or {
                "time": TIME_PATTERN,
                "tag": TAG_PATTERN,
                "string": TEXT_PATTERN,
            }.get(self.kind)
            if pattern:
                item["pattern"] = pattern
        if self.default is not None and not self.repeatable:
            item["default"] = self.default
        if self.repeatable:
            return {"type": "array", "items": item, "maxItems": self.max_items}
        return item

    def openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": "query",
            "description": self.description,
            "required": self.required,
            "schema": self.schema(),
        }
        if self.repeatable:
            out["style"] = "form"
            out["explode"] = True
        return out

    def convert(self, value: str) -> Any:
        """One value, validated and converted; raises :class:`BadParameterError`."""
        if value == "":
            raise BadParameterError(self.name, "must not be empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadParameterError(self.name, "is not valid UTF-8") from None
        if self.kind == "integer":
            if not _regex(r"[0-9]{1,19}").fullmatch(value):
                raise BadParameterError(self.name, f"expected a whole number, got {value!r}")
            number = int(value)
            lo = self.minimum if self.minimum is not None else 0
            hi = self.maximum if self.maximum is not None else MAX_SQLITE_INT
            if not lo <= number <= hi:
                raise BadParameterError(self.name, f"must be between {lo} and {hi}, got {number}")
            return number
        if self.kind == "boolean":
            if value not in ("true", "false"):
                raise BadParameterError(self.name, f"expected true or false, got {value!r}")
            return value == "true"
        if self.kind == "enum":
            if value not in self.enum:
                raise BadParameterError(
                    self.name, f"expected one of {', '.join(self.enum)}, got {value!r}"
                )
            return value
        if len(value) > self.max_length:
            raise BadParameterError(self.name, f"longer than {self.max_length} characters")
        if (control := _regex(f"[{CONTROL_CHARS}]").search(value)) is not None:
            raise BadParameterError(
                self.name, f"must not hold control characters, got {control.group()!r}"
            )
        if self.kind == "time":
            dt = parse_time(value) if _regex(TIME_PATTERN).fullmatch(value) else None
            if dt is None:
                raise BadParameterError(
                    self.name,
                    f"expected an ISO-8601 date or time (2026-11-01, 2026-11-01T08:30:00Z, "
                    f"2026-11-01T16:30:00+08:00; UTC when no zone is given), got {value!r}",
                )
            try:
                dt = round_up_fraction(dt, value)  # (stored times are whole seconds)
            except OverflowError:
                raise BadParameterError(
                    self.name, f"{value!r} rounds up past the last representable time"
                ) from None
            return format_time(dt)
        if self.kind == "tag":
            key, sep, tag_value = value.partition(":")
            if not key:
                raise BadParameterError(
                    self.name, f"expected KEY:VALUE (or KEY for any value), got {value!r}"
                )
            return (key, tag_value if sep else None)
        if self.pattern and not _regex(self.pattern).fullmatch(value):
            raise BadParameterError(self.name, f"{value!r} is not a valid {self.name}")
        return value


#: Compiled once (``re.fullmatch`` with a string looks its cache up on every call).
_regex = functools.cache(re.compile)


def parse_params(
    params: Sequence[Param], query: MultiMapping[str], *, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Validate a request's query against ``params``: ``{name: value}`` (a list for a
    repeatable parameter, the default when absent). Raises :class:`BadParameterError`."""
    by_name = {p.name: p for p in params}
    if len(query) > MAX_QUERY_VALUES:
        raise BadParameterError("query", f"more than {MAX_QUERY_VALUES} parameter values")
    for name in query:
        if name not in by_name and name not in ignore:
            known = ", ".join(p.name for p in params) or "none"
            raise BadParameterError(name, f"unknown parameter (this route takes: {known})")
    out: dict[str, Any] = {}
    for p in params:
        values = query.getall(p.name, [])
        if not values:
            if p.required:
                raise BadParameterError(p.name, "is required")
            out[p.name] = [] if p.repeatable else p.default
            continue
        if not p.repeatable and len(values) > 1:
            raise BadParameterError(p.name, "given more than once")
        if p.repeatable and len(values) > p.max_items:
            raise BadParameterError(p.name, f"given more than {p.max_items} times")
        converted = [p.convert(v) for v in values]
        out[p.name] = converted if p.repeatable else converted[0]
    return out


# --- the parameters of each route ---------------------------------------------------------

_WORKSPACE = Param(
    "workspace",
    "string",
    "Only this workspace; repeat for several. A token limited to some workspaces may name "
    "only those (403 otherwise) and sees only those when none is named.",
    repeatable=True,
    max_length=WORKSPACE_ID_MAX_LEN,
    pattern=WORKSPACE_PATTERN,
)

_FRACTIONS = (
    "A fraction of a second rounds up to the next whole second (stored times are whole "
    "seconds, so the bound keeps its exact meaning)."
)

EXPERIMENTS_PARAMS: tuple[Param, ...] = (
    _WORKSPACE,
    Param(
        "status",
        "string",
        "Only this status (exact, upper case); repeat for several. PAI's: "
        + ", ".join(EXPERIMENT_STATUSES)
        + "; others it may add are taken too (the mirror keeps a status as upstream sent it).",
        repeatable=True,
        max_length=64,
        max_items=20,
        pattern=STATUS_PATTERN,
    ),
    Param("name", "string", "The name contains this text (case-insensitive for ASCII)."),
    Param("creator", "string", "Created by this user (exact)."),
    Param(
        "tag",
        "tag",
        "Has this tag: KEY:VALUE (a tag whose key, a colon and its value read so; a key may "
        "hold colons itself), or KEY for any value (a text with colons matches a tag whose "
        "key is all of it, too). Repeat: all must match.",
        repeatable=True,
        max_length=400,
    ),
    Param(
        "created_after",
        "time",
        f"Created at or after this time. {_FRACTIONS}",
        max_length=40,
    ),
    Param(
        "created_before",
        "time",
        f"Created strictly before this time. {_FRACTIONS}",
        max_length=40,
    ),
    Param(
        "modified_after",
        "time",
        f"Modified at or after this time. {_FRACTIONS}",
        max_length=40,
    ),
    Param(
        "include_deleted",
        "boolean",
        "Also experiments deleted upstream.",
        default=False,
    ),
    Param(
        "include_config",
        "boolean",
        "Include the config texts (search_space, config_ini, config_yml).",
        default=False,
    ),
    Param(
        "sort",
        "enum",
        "Order: created or modified time, or name; '-' for descending. Ties are broken by "
        "experiment_id in the same direction.",
        enum=SORTS,
        default="-created",
    ),
    Param(
        "limit",
        "integer",
        f"Rows per page (1-{MAX_LIMIT}).",
        minimum=1,
        maximum=MAX_LIMIT,
        default=DEFAULT_LIMIT,
    ),
    Param(
        "cursor",
        "string",
        "next_cursor of the previous page. Only valid with the same sort and filters.",
        max_length=1024,
        pattern=r"^[A-Za-z0-9_-]+$",
    ),
    Param(
        "count",
        "boolean",
        "Add the total and the counts by status of the whole filtered set (not just the page).",
        default=False,
    ),
)

EXPERIMENT_PARAMS: tuple[Param, ...] = (
    Param(
        "include_config",
        "boolean",
        "Include the config texts (search_space, config_ini, config_yml).",
        default=True,
    ),
)

_AFTER = Param(
    "after",
    "integer",
    "Only changes with an id greater than this (the next_after of the previous page).",
    minimum=0,
    maximum=MAX_SQLITE_INT,
    default=0,
)
_FIELD = Param("field", "enum", "Only changes of this field.", enum=CHANGE_FIELDS)

EXPERIMENT_CHANGES_PARAMS: tuple[Param, ...] = (
    _AFTER,
    _FIELD,
    Param(
        "limit",
        "integer",
        f"Changes per page (1-{MAX_LIMIT}).",
        minimum=1,
        maximum=MAX_LIMIT,
        default=100,
    ),
)

CHANGES_PARAMS: tuple[Param, ...] = (
    _AFTER,
    Param(
        "workspace",
        "string",
        "Only this workspace's changes; repeat for several (limited tokens: only theirs).",
        repeatable=True,
        max_length=WORKSPACE_ID_MAX_LEN,
        pattern=WORKSPACE_PATTERN,
    ),
    _FIELD,
    Param(
        "limit",
        "integer",
        f"Changes per page (1-{MAX_LIMIT}).",
        minimum=1,
        maximum=MAX_LIMIT,
        default=100,
    ),
    Param(
        "wait",
        "integer",
        f"Long-poll: when nothing is newer than `after`, wait up to this many seconds "
        f"(0-{MAX_WAIT_S}) for new changes before answering.",
        minimum=0,
        maximum=MAX_WAIT_S,
        default=0,
    ),
)

WORKSPACES_PARAMS: tuple[Param, ...] = ()

SYNC_PARAMS: tuple[Param, ...] = (
    Param(
        "workspace",
        "string",
        "The configured workspace to sweep.",
        required=True,
        max_length=WORKSPACE_ID_MAX_LEN,
        pattern=WORKSPACE_PATTERN,
    ),
    Param(
        "mode",
        "enum",
        "full (page through everything), hot (only what can have changed), or auto (hot "
        "once the workspace has a baseline).",
        enum=SYNC_MODES,
        default="auto",
    ),
)

#: The upstream route's parameters (validated by the upstream's own rules, see compat.py).
# Upstream reads values leniently: surrounding blanks are trimmed, an empty value is absent.
_COMPAT_TIME = r"^(\s*[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2})?\s*)?$"

COMPAT_PARAMS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("WorkspaceId", {"type": "string"}, "Only this workspace."),
    ("Name", {"type": "string"}, "The name contains this keyword (case-insensitive)."),
    ("Creator", {"type": "string"}, "Created by this user (exact)."),
    ("Status", {"type": "string"}, "Only this status (any case)."),
    ("Accessibility", {"type": "string"}, "PRIVATE or PUBLIC (any case)."),
    (
        "PageNumber",
        {"type": "string", "pattern": r"^(\s*0*[1-9][0-9]*\s*)?$"},
        "Page, from 1 (a whole number; upstream reads integers leniently).",
    ),
    (
        "PageSize",
        {"type": "string", "pattern": r"^(\s*0*([1-9][0-9]{0,2}|1000)\s*)?$"},
        "Rows per page, 1-1000 (default 10).",
    ),
    (
        "MinCreateTime",
        {"type": "string", "pattern": _COMPAT_TIME},
        "Created at or after: 'yyyy-mm-dd hh:mm:ss' or 'yyyy-mm-dd', in the upstream time zone.",
    ),
    (
        "MaxCreateTime",
        {"type": "string", "pattern": _COMPAT_TIME},
        "Created at or before (inclusive), same formats.",
    ),
    (
        "IncludeConfigData",
        {"type": "string", "pattern": r"^(\s*([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])\s*)?$"},
        "True to include SearchSpace, ConfigIni and ConfigYml.",
    ),
    (
        "SortBy",
        {"type": "string"},
        "GmtCreateTime / create_time (default), GmtModifiedTime / update_time, Name, "
        "WorkspaceId / workspace_id, Status, Accessibility (any case).",
    ),
    (
        "Order",
        {"type": "string", "pattern": r"^(\s*([Aa][Ss][Cc]|[Dd][Ee][Ss][Cc])\s*)?$"},
        "ASC or DESC (default).",
    ),
    (
        "Tag",
        {"type": "string"},
        'Compact JSON array of up to 20 {"Key", "Value"} objects; all must match.',
    ),
)


# --- the document -------------------------------------------------------------------------

_NSTR: dict[str, Any] = {"type": "string", "nullable": True}
_NINT: dict[str, Any] = {"type": "integer", "nullable": True}
_NNUM: dict[str, Any] = {"type": "number", "nullable": True}
_TIME: dict[str, Any] = {"type": "string", "description": "ISO-8601 UTC"}
_NTIME: dict[str, Any] = {"type": "string", "nullable": True, "description": "ISO-8601 UTC"}
_TAGS: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"Key": {"type": "string"}, "Value": {"type": "string"}},
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: Mapping[str, Any], required: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(props),
        "required": list(props if required is None else required),
    }


def _schemas() -> dict[str, Any]:
    workspace_freshness = _obj({"last_sync_at": _NTIME, "age_s": _NNUM})
    experiment_props: dict[str, Any] = {
        "experiment_id": {"type": "string"},
        "workspace_id": {"type": "string"},
        "name": _NSTR,
        "creator": _NSTR,
        "status": _NSTR,
        "job_type": _NSTR,
        "accessibility": _NSTR,
        "description": _NSTR,
        "trial_count": _NINT,
        "trial_status": {"type": "object", "additionalProperties": {"type": "integer"}},
        "tags": _TAGS,
        "gmt_create_time": _NTIME,
        "gmt_modified_time": _NTIME,
        "deleted": {"type": "boolean"},
        "first_seen_at": _TIME,
        "last_seen_at": _TIME,
        "last_changed_at": _TIME,
        "search_space": {**_NSTR, "description": "only with include_config"},
        "config_ini": {**_NSTR, "description": "only with include_config"},
        "config_yml": {**_NSTR, "description": "only with include_config"},
    }
    experiment_required = [
        k for k in experiment_props if k not in ("search_space", "config_ini", "config_yml")
    ]
    upstream_experiment = _obj(
        {
            "ExperimentId": {"type": "string"},
            "Name": _NSTR,
            "Status": _NSTR,
            "Creator": _NSTR,
            "WorkspaceId": _NSTR,
            "Accessibility": _NSTR,
            "Description": _NSTR,
            "JobType": _NSTR,
            "GmtCreateTime": _NSTR,
            "GmtModifiedTime": _NSTR,
            "TrialCount": _NINT,
            "TrialStatus": {"type": "object", "additionalProperties": {"type": "integer"}},
            "Deleted": {"type": "boolean"},
            "Tags": _TAGS,
            "SearchSpace": _NSTR,
            "ConfigIni": _NSTR,
            "ConfigYml": _NSTR,
        },
        required=["ExperimentId", "Status", "TrialStatus"],
    )
    upstream_experiment["description"] = (
        "PAI's field names. A field upstream added that this hpo-sync does not know yet is"
        " passed through as upstream last sent it."
    )
    return {
        "Error": _obj(
            {
                "error": _obj(
                    {"code": {"type": "string"}, "message": {"type": "string"}, "param": _NSTR},
                    required=["code", "message"],
                )
            }
        ),
        "UpstreamError": _obj(
            {
                "RequestId": {"type": "string"},
                "Code": {"type": "string"},
                "Message": {"type": "string"},
            }
        ),
        "Freshness": {
            **_obj(
                {
                    "as_of": _TIME,
                    "last_sync_at": {
                        **_NTIME,
                        "description": "the oldest last successful sync among the "
                        "workspaces the response covers (null: one never synced)",
                    },
                    "age_s": _NNUM,
                    "workspaces": {"type": "object", "additionalProperties": workspace_freshness},
                }
            ),
            "description": "How fresh the data is: the last successful sync (full or hot) of "
            "each workspace the response covers.",
        },
        "Experiment": _obj(experiment_props, required=experiment_required),
        "Change": _obj(
            {
                "id": {"type": "integer"},
                "experiment_id": {"type": "string"},
                "experiment_name": _NSTR,
                "workspace_id": {"type": "string"},
                "field": {"type": "string"},
                "old_value": {
                    "nullable": True,
                    "description": "Status: text; TrialStatus: {status: count}; Deleted: bool",
                },
                "new_value": {"nullable": True},
                "observed_at": _TIME,
                "sync_run_id": _NINT,
                "baseline": {"type": "boolean"},
            }
        ),
        "ExperimentPage": _obj(
            {
                "experiments": {"type": "array", "items": _ref("Experiment")},
                "next_cursor": {
                    **_NSTR,
                    "description": "pass as cursor for the next page; null on the last page",
                },
                "has_more": {"type": "boolean"},
                "count": {
                    **_obj(
                        {
                            "total": {"type": "integer"},
                            "by_status": {
                                "type": "object",
                                "additionalProperties": {"type": "integer"},
                                "description": "key 'null': experiments without a status",
                            },
                        }
                    ),
                    "description": "only with count=true",
                },
                "freshness": _ref("Freshness"),
            },
            required=["experiments", "next_cursor", "has_more", "freshness"],
        ),
        "ExperimentDetail": _obj(
            {"experiment": _ref("Experiment"), "freshness": _ref("Freshness")}
        ),
        "ChangePage": _obj(
            {
                "changes": {"type": "array", "items": _ref("Change")},
                "next_after": {
                    "type": "integer",
                    "description": "pass as after for the next page: the last id served. "
                    "With nothing served: on /v1/changes the newest change id among the "
                    "workspaces this token may see (or the after given, when larger), on an "
                    "experiment's history the after given. Never the id of a change in a "
                    "workspace the token may not see.",
                },
                "has_more": {"type": "boolean"},
                "freshness": _ref("Freshness"),
            }
        ),
        "Workspace": _obj(
            {
                "workspace_id": {"type": "string"},
                "label": _NSTR,
                "configured": {"type": "boolean"},
                "experiments": {"type": "integer", "description": "not deleted"},
                "deleted": {"type": "integer"},
                "counts_by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
                "baseline_at": _NTIME,
                "last_full_sync_at": _NTIME,
                "last_hot_sync_at": _NTIME,
                "last_sync_at": _NTIME,
                "data_age_s": _NNUM,
                "last_error": _NSTR,
                "last_error_at": _NTIME,
                "failing": {
                    "type": "boolean",
                    "description": "the last error is newer than the last success",
                },
                "sweeping": {"type": "boolean", "nullable": True},
                "consecutive_failures": _NINT,
            }
        ),
        "WorkspaceList": _obj(
            {
                "workspaces": {"type": "array", "items": _ref("Workspace")},
                "freshness": _ref("Freshness"),
            }
        ),
        "SyncQueued": _obj(
            {
                "queued": _obj({"workspace": {"type": "string"}, "mode": {"type": "string"}}),
                "freshness": _ref("Freshness"),
            }
        ),
        "UpstreamExperiment": upstream_experiment,
        "UpstreamList": _obj(
            {
                "RequestId": {"type": "string"},
                "TotalCount": {"type": "integer"},
                "Experiments": {"type": "array", "items": _ref("UpstreamExperiment")},
            }
        ),
        "Health": _obj(
            {
                "status": {"type": "string"},
                "version": {"type": "string"},
                "started_at": _TIME,
                "uptime_s": {"type": "number"},
            }
        ),
        "Readiness": {
            **_obj(
                {
                    "ready": {"type": "boolean"},
                    "mirror": {"type": "string"},
                    "workspaces": {"type": "object", "additionalProperties": {"type": "object"}},
                    "alerts": _obj(
                        {
                            "pending": {"type": "integer"},
                            "oldest_pending_at": _NTIME,
                            "oldest_pending_age_s": _NNUM,
                        }
                    ),
                    "error": {"type": "string"},
                },
                required=["ready"],
            ),
            "description": "Callers without a token that sees every workspace get only "
            "`ready` (and `mirror`).",
        },
    }


_FRESH_HEADERS: dict[str, Any] = {
    "X-Last-Sync": {
        "description": "the oldest last successful sync among the workspaces covered, "
        "ISO-8601 UTC, or 'never'",
        "schema": {"type": "string"},
    },
    "X-Data-Age": {
        "description": "seconds since X-Last-Sync (absent when a workspace never synced)",
        "schema": {"type": "integer"},
    },
}


def _json(schema: str, description: str, *, fresh: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if fresh:
        out["headers"] = _FRESH_HEADERS
    return out


def _errors(*statuses: int, upstream: bool = False) -> dict[str, Any]:
    text = {
        400: "a bad parameter (named in the body), or a query string over "
        f"{MAX_QUERY_STRING} characters",
        401: "no valid bearer token",
        403: "the token may not do this",
        404: "no such experiment, or not one this token may see",
        405: "this path does not take the method used (Allow lists those it takes)",
        413: f"a request body (none is read: over {MAX_BODY_BYTES} bytes, or of unknown "
        "length, it is refused)",
        503: "the mirror cannot answer now (unreadable, or the query ran too long)",
    }
    schema = "UpstreamError" if upstream else "Error"
    out = {str(s): _json(schema, text[s]) for s in statuses}
    if "405" in out:
        out["405"]["headers"] = {
            "Allow": {"description": "the methods this path takes", "schema": {"type": "string"}}
        }
    return out


#: What every route may answer, whatever it does: the request guard's 400 (query string too
#: long) and 413 (a body), and the router's 405 (another method on the same path).
_EVERY_ROUTE = (400, 405, 413)


def _with_every_route_error(op: dict[str, Any], *, upstream: bool) -> dict[str, Any]:
    responses = op["responses"]
    for status, response in _errors(*_EVERY_ROUTE, upstream=upstream).items():
        responses.setdefault(status, response)
    op["responses"] = dict(sorted(responses.items()))
    return op


def _head_of(get: dict[str, Any]) -> dict[str, Any]:
    """aiohttp answers HEAD on every GET route: the same statuses and headers, no body."""
    head = {k: v for k, v in get.items() if k not in ("responses", "operationId", "summary")}
    head["summary"] = f"{get['summary']} (HEAD: the headers only)"
    head["operationId"] = f"{get['operationId']}Head"
    head["responses"] = {
        status: {k: v for k, v in response.items() if k != "content"}
        for status, response in get["responses"].items()
    }
    return head


def _params(params: Sequence[Param]) -> list[dict[str, Any]]:
    return [p.openapi() for p in params]


def build_document(version: str = __version__) -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route the daemon serves."""
    read_errors = (400, 401, 403, 503)
    id_param = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "ExperimentId",
        "schema": {"type": "string", "minLength": 1},
    }
    bearer: list[dict[str, list[str]]] = [{"bearer": []}, {"acsBearer": []}]
    compat_params = [
        {"name": name, "in": "query", "required": False, "description": desc, "schema": schema}
        for name, schema, desc in COMPAT_PARAMS
    ]
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "operationId": "healthz",
                "security": [],
                "responses": {"200": _json("Health", "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the mirror is open and every workspace synced once",
                "operationId": "readyz",
                "security": [],
                "responses": {
                    "200": _json("Readiness", "ready"),
                    "503": _json("Readiness", "not ready"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (a token that sees every workspace)",
                "operationId": "metrics",
                "security": bearer,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 403),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.0 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/experiments": {
            "get": {
                "summary": "List experiments (filtered, sorted, keyset-paged)",
                "operationId": "listExperiments",
                "security": bearer,
                "parameters": _params(EXPERIMENTS_PARAMS),
                "responses": {
                    "200": _json("ExperimentPage", "a page", fresh=True),
                    **_errors(*read_errors),
                },
            }
        },
        "/v1/experiments/{id}": {
            "get": {
                "summary": "One experiment (deleted ones too)",
                "operationId": "getExperiment",
                "security": bearer,
                "parameters": [id_param, *_params(EXPERIMENT_PARAMS)],
                "responses": {
                    "200": _json("ExperimentDetail", "the experiment", fresh=True),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/v1/experiments/{id}/changes": {
            "get": {
                "summary": "One experiment's history, oldest first",
                "operationId": "getExperimentChanges",
                "security": bearer,
                "parameters": [id_param, *_params(EXPERIMENT_CHANGES_PARAMS)],
                "responses": {
                    "200": _json("ChangePage", "its changes", fresh=True),
                    **_errors(400, 401, 403, 404, 503),
                },
            }
        },
        "/v1/changes": {
            "get": {
                "summary": "The change feed, in id order; long-polls with wait",
                "operationId": "listChanges",
                "security": bearer,
                "parameters": _params(CHANGES_PARAMS),
                "responses": {
                    "200": _json("ChangePage", "changes after `after`", fresh=True),
                    **_errors(*read_errors),
                },
            }
        },
        "/v1/workspaces": {
            "get": {
                "summary": "Per workspace: counts by status, sync times, errors, data age",
                "operationId": "listWorkspaces",
                "security": bearer,
                "parameters": _params(WORKSPACES_PARAMS),
                "responses": {
                    "200": _json("WorkspaceList", "the workspaces this token sees", fresh=True),
                    **_errors(*read_errors),
                },
            }
        },
        "/v1/sync": {
            "post": {
                "summary": "Queue a sweep of a workspace now (admin tokens only)",
                "operationId": "requestSync",
                "security": bearer,
                "parameters": _params(SYNC_PARAMS),
                "responses": {
                    "202": _json("SyncQueued", "queued", fresh=True),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
            }
        },
        "/api/automl/v1/hpo/experiments": {
            "get": {
                "summary": "PAI's ListHpoExperiments, answered from the mirror",
                "description": "The upstream route, parameters and response shape (for "
                "tools written for PAI, including the official SDK configured with "
                "bearer_token). Unknown parameters are ignored, as upstream does. Pages "
                "by number (LIMIT/OFFSET), as upstream does. Deleted experiments are left "
                "out. Errors come in the upstream shape.",
                "operationId": "ListHpoExperiments",
                "security": [*bearer, {"acsBearerQuery": []}],
                "parameters": compat_params,
                "responses": {
                    "200": {
                        **_json("UpstreamList", "a page, upstream shape"),
                        "headers": _FRESH_HEADERS,
                    },
                    **_errors(400, 401, 403, 503, upstream=True),
                },
            }
        },
    }
    for path, ops in paths.items():
        for op in ops.values():
            _with_every_route_error(op, upstream=path.startswith("/api/automl/"))
        if "get" in ops:
            ops["head"] = _head_of(ops["get"])
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "hpo-sync read API",
            "version": version,
            "description": "A local mirror of PAI AutoML HPO experiments and their history. "
            "Every data response says how fresh it is (`freshness` in the body, "
            "`X-Last-Sync` / `X-Data-Age` headers). Errors: "
            '`{"error": {"code", "message", "param"}}` (`param` where one parameter is at '
            "fault). Without [[api.tokens]] the API is "
            "open on loopback only; with tokens, every route but /healthz, /readyz and "
            "/openapi.json needs one. Every route answers HEAD as GET (without a body), 405 "
            f"to another method, 413 to a request body and 400 to a query string over "
            f"{MAX_QUERY_STRING} characters. A request line over 8 KiB, or a malformed "
            "request, is refused by the HTTP parser with a 400 before any route sees it.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "acsBearer": {"type": "apiKey", "in": "header", "name": "x-acs-bearer-token"},
                "acsBearerQuery": {"type": "apiKey", "in": "query", "name": "BearerToken"},
            },
        },
    }
