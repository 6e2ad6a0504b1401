"""Errors of the read API and the JSON bodies they become.

Handlers raise :class:`ApiError` (or a subclass); the error middleware of
:mod:`hpo_sync.api.read` turns it into ``{"error": {"code", "message", "param"?}}`` on the
``/v1`` routes, and into the upstream shape ``{RequestId, Code, Message}`` on the
upstream-compatible route. Messages say what was wrong and what to do instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..errors import HpoSyncError

__all__ = [
    "ApiError",
    "BadParameterError",
    "ForbiddenError",
    "NotFoundError",
    "UnauthorizedError",
    "UnavailableError",
    "error_body",
    "error_response",
    "new_request_id",
    "upstream_error_response",
]


class ApiError(HpoSyncError):
    """A request the API answers with an error status; ``code`` is machine-readable."""

    status = 500
    code = "internal_error"
    #: The code of the same error in the upstream (PAI) error shape.
    upstream_code = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        upstream_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if upstream_code is not None:
            self.upstream_code = upstream_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})


class BadParameterError(ApiError):
    """A query parameter is missing, malformed, out of range or unknown (400)."""

    status = 400
    code = "bad_parameter"
    upstream_code = "INVALID_INPUT_PARAMS"

    def __init__(self, param: str, why: str, *, code: str | None = None) -> None:
        super().__init__(f"{param}: {why}", code=code, param=param)


class UnauthorizedError(ApiError):
    """No valid bearer token (401, with ``WWW-Authenticate: Bearer``)."""

    status = 401
    code = "unauthorized"
    upstream_code = "InvalidBearerToken"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(
            message,
            code=code,
            headers={"WWW-Authenticate": 'Bearer realm="hpo-sync"'},
        )


class ForbiddenError(ApiError):
    """The token is valid but may not do this (403)."""

    status = 403
    code = "forbidden"
    upstream_code = "Forbidden.Workspace"


class NotFoundError(ApiError):
    """No such experiment (or route) — or none this token may see (404)."""

    status = 404
    code = "not_found"
    upstream_code = "NotFound"


class UnavailableError(ApiError):
    """The mirror cannot answer right now: unreadable, or a query ran too long (503)."""

    status = 503
    code = "unavailable"
    upstream_code = "ServiceUnavailable"


def new_request_id() -> str:
    """An upstream-style RequestId (upper-case UUID)."""
    return str(uuid.uuid4()).upper()


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The ``/v1`` error shape."""
    err: dict[str, Any] = {"code": code, "message": message}
    if param is not None:
        err["param"] = param
    return {"error": err}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(code, message, param), status=status, headers=dict(headers or {})
    )


def upstream_error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The upstream error shape, as PAI's gateway answers (``x-acs-request-id`` too)."""
    rid = request_id or new_request_id()
    return web.json_response(
        {"RequestId": rid, "Code": code, "Message": message},
        status=status,
        headers={**dict(headers or {}), "x-acs-request-id": rid},
    )
