"""``GET /api/automl/v1/hpo/experiments``: PAI's ``ListHpoExperiments``, answered from the
mirror, so that tools written for PAI — the official SDK configured with ``bearer_token``
included — work offline against the cache.

The upstream's contract, kept: the same query parameters and validation (the parser the
simulator uses too, :func:`hpo_sync.upstream_query.parse_query`: unknown names are
ignored, an empty value counts as absent, ``SortBy`` in both vocabularies, ``Order``,
``IncludeConfigData`` and ``Status`` in any case, ``Tag`` as one JSON parameter, times in the
upstream time zone ``[upstream] create_time_zone``), the same sort (ties broken by
``ExperimentId`` in the same direction), the response shape ``{RequestId, TotalCount,
Experiments}`` with the upstream field names (fields upstream added that hpo-sync does not
know yet passed through from ``raw``), and errors as ``{RequestId, Code, Message}``.
Paging is by page number, hence ``LIMIT``/``OFFSET``: that is the upstream's contract (the
``/v1`` routes use keyset cursors). Experiments marked deleted are left out, as upstream
leaves them out of its listings. A token limited to some workspaces sees only those: with
``WorkspaceId`` naming another one the answer is 403 ``Forbidden.Workspace``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..normalise import Experiment, format_time, to_upstream
from ..schema import EXPERIMENT_COLUMNS, row_to_experiment
from ..store import WorkspaceState, tag_condition
from ..upstream_query import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    InvalidInputError,
    Query,
    parse_query,
)
from .errors import ApiError, new_request_id
from .read import PRINCIPAL, READ_API, freshness, freshness_headers

__all__ = ["compat_sql", "list_hpo_experiments"]

_SORT_COLUMNS = {
    "create": "gmt_create_time",
    "modified": "gmt_modified_time",
    "name": "name",
    "workspace": "workspace_id",
    "status": "status",
    "accessibility": "accessibility",
}
_SELECT = ", ".join(EXPERIMENT_COLUMNS)


class InvalidInputParamsError(ApiError):
    """A query parameter the upstream would refuse (400 ``INVALID_INPUT_PARAMS``)."""

    status = 400
    code = "bad_parameter"
    upstream_code = "INVALID_INPUT_PARAMS"


def _iso(ts: int) -> str:
    return format_time(datetime.fromtimestamp(ts, UTC))


def compat_sql(q: Query, workspaces: Sequence[str]) -> tuple[str, list[Any], str]:
    """``(WHERE clause, params, ORDER BY clause)`` of a parsed upstream query (pure).

    ``Name`` matches like upstream's keyword (case-insensitive substring, Unicode-aware via
    the ``hpo_lower`` SQL function the caller registers); ``MaxCreateTime`` is inclusive.
    """
    where = ["deleted = 0"]
    params: list[Any] = []
    if workspaces:
        where.append(f"workspace_id IN ({','.join('?' * len(workspaces))})")
        params.extend(workspaces)
    for clause, value in (
        ("creator = ?", q.creator),
        ("status = ?", q.status),
        ("accessibility = ?", q.accessibility),
        ("gmt_create_time >= ?", _iso(q.min_create_ts) if q.min_create_ts is not None else None),
        ("gmt_create_time <= ?", _iso(q.max_create_ts) if q.max_create_ts is not None else None),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    if q.name is not None:
        where.append("instr(hpo_lower(name), ?) > 0")
        params.append(q.name)
    for key, value in q.tags:
        clause, tag_params = tag_condition(key, value)
        where.append(clause)
        params.extend(tag_params)
    direction = "DESC" if q.descending else "ASC"
    order = f"{_SORT_COLUMNS[q.sort_field]} {direction}, experiment_id {direction}"
    return " AND ".join(where), params, order


#: Upstream fields the listing carries only with ``IncludeConfigData=True``.
_CONFIG_FIELDS = frozenset({"SearchSpace", "ConfigIni", "ConfigYml"})


def _upstream(exp: Experiment, include_config: bool) -> dict[str, Any]:
    """The experiment as upstream lists it: the fields hpo-sync knows, with normalised
    types, then any field upstream added that it does not know yet, as upstream last sent it
    (from ``raw``), so that a tool reading such a field works against the cache too."""
    out = to_upstream(exp, include_config=include_config)
    for key, value in exp.raw.items():
        if key not in out and key not in _CONFIG_FIELDS:
            out[key] = value
    return out


def _lower(value: object) -> str | None:
    return value.lower() if isinstance(value, str) else None


async def list_hpo_experiments(request: web.Request) -> web.Response:
    api = request.app[READ_API]
    principal = request[PRINCIPAL]
    request_id = new_request_id()
    params = {name: request.query.getone(name) for name in request.query}
    try:
        q = parse_query(
            params,
            time_zone=api.runtime.config.upstream.tz,
            default_page_size=DEFAULT_PAGE_SIZE,
            max_page_size=MAX_PAGE_SIZE,
        )
    except InvalidInputError as exc:
        raise InvalidInputParamsError(str(exc)) from None
    except (ValueError, OverflowError) as exc:  # a date the zone cannot convert
        raise InvalidInputParamsError(f"Invalid time parameter: {exc}.") from None
    scope = principal.scope([q.workspace_id] if q.workspace_id else [])
    try:
        where, sql_params, order = compat_sql(q, scope)
    except (ValueError, OverflowError) as exc:  # a time outside what datetime can hold
        raise InvalidInputParamsError(f"Invalid time parameter: {exc}.") from None
    offset = (q.page_number - 1) * q.page_size
    store = api.store

    def work(conn: sqlite3.Connection) -> tuple[int, list[sqlite3.Row], list[WorkspaceState]]:
        conn.create_function("hpo_lower", 1, _lower, deterministic=True)
        total = int(
            conn.execute(f"SELECT count(*) FROM experiments WHERE {where}", sql_params).fetchone()[
                0
            ]
        )
        rows: list[sqlite3.Row] = []
        if offset < total:  # also keeps a huge PageNumber from overflowing OFFSET
            rows = conn.execute(
                f"SELECT {_SELECT} FROM experiments WHERE {where} ORDER BY {order}"
                " LIMIT ? OFFSET ?",
                [*sql_params, q.page_size, offset],
            ).fetchall()
        return total, rows, store.workspaces()

    total, rows, states = await api.read(work)
    experiments = [_upstream(row_to_experiment(dict(r)), q.include_config) for r in rows]
    fresh = freshness(states, scope, api.runtime.clock())
    return web.json_response(
        {"RequestId": request_id, "TotalCount": total, "Experiments": experiments},
        headers={**freshness_headers(fresh), "x-acs-request-id": request_id},
    )
