"""Opaque keyset-pagination cursors of ``GET /v1/experiments`` (pure: no I/O).

A cursor is base64url (no padding) of compact JSON ``{"v": 1, "s": SORT, "f": FILTER_HASH,
"k": [SORT_VALUE, EXPERIMENT_ID]}``: the sort it was made for, a hash of the effective
filters (the token's workspace scope included), and the ``(sort value, experiment_id)`` of the
last row served. The next page is ``WHERE (sort column, experiment_id) > key`` — never
``OFFSET`` — so a row present for the whole walk is served exactly once, whatever is written
meanwhile. A cursor used with other filters or another sort is refused (400): its key means
nothing there.

Cursors are not signed: the key only says where to resume, and the filters (including the
workspace scope) are re-applied on every page, so a forged cursor can show nothing that the
same query without a cursor would not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["CURSOR_VERSION", "MAX_CURSOR_LEN", "Cursor", "CursorError", "filters_hash"]

CURSOR_VERSION = 1
#: Longer than any cursor this module makes for sane keys; a bound on what is decoded.
MAX_CURSOR_LEN = 1024
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HASH_LEN = 16


class CursorError(ValueError):
    """A cursor that cannot be used: malformed, or made for another query."""


def filters_hash(filters: Mapping[str, Any]) -> str:
    """A short, stable hash of a query's effective filters (canonical JSON, SHA-256)."""
    # orjson writes what json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # does for these values (strings, lists, booleans, null), several times faster.
    canonical = orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:_HASH_LEN]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a walk through one sorted, filtered listing stands."""

    sort: str
    filters_hash: str
    key: tuple[str | None, str]

    def encode(self) -> str:
        payload = {"v": CURSOR_VERSION, "s": self.sort, "f": self.filters_hash, "k": list(self.key)}
        raw = orjson.dumps(payload)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse a cursor; raises :class:`CursorError` saying what is wrong with it."""
        if not text or len(text) > MAX_CURSOR_LEN or not _B64URL_RE.match(text):
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = orjson.loads(raw)
        except (binascii.Error, ValueError):  # orjson.JSONDecodeError (bad UTF-8 too)
            raise CursorError(
                "malformed cursor: pass next_cursor exactly as it was returned"
            ) from None
        if not isinstance(data, dict) or set(data) != {"v", "s", "f", "k"}:
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        if data["v"] != CURSOR_VERSION:
            raise CursorError("cursor from another version of hpo-sync: start the walk again")
        sort, fhash, key = data["s"], data["f"], data["k"]
        if not isinstance(sort, str) or not isinstance(fhash, str):
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        if (
            not isinstance(key, list)
            or len(key) != 2
            or not (key[0] is None or isinstance(key[0], str))
            or not isinstance(key[1], str)
            or not key[1]
        ):
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        return cls(sort, fhash, (key[0], key[1]))

    def check(self, sort: str, fhash: str) -> None:
        """Refuse a cursor made for another sort or other filters."""
        if self.sort != sort:
            raise CursorError(
                f"this cursor was made for sort={self.sort}, not sort={sort}: repeat the "
                "query with the same sort and filters, or drop the cursor to start over"
            )
        if self.filters_hash != fhash:
            raise CursorError(
                "this cursor was made for other filters (or another token's workspaces): "
                "repeat the query with the same filters, or drop the cursor to start over"
            )
