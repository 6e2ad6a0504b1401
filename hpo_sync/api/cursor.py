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
same query without a cursor would not. A row referred to (below) is looked up within the
query's workspaces only.

A key too long to carry (a very long name under ``sort=name``, a very long id: upstream
bounds neither, and a cursor must fit in a URL) goes by reference instead: ``"r": [ROWID,
ID_HASH, KEY_HASH]``, the last row's SQLite rowid, a hash of its id and a hash of its key, in
place of ``"k"``. The next page looks the row's key up again (:meth:`Cursor.resolve`); a row
that is no longer there (the file was rebuilt, renumbering rows), or whose key changed (it
was renamed, under ``sort=name``), makes the cursor stale, a 400 that says to start over —
never a walk silently resumed elsewhere (resumed from the renamed row's new place, it skipped
or repeated every row in between).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["CURSOR_VERSION", "MAX_CURSOR_LEN", "Cursor", "CursorError", "filters_hash"]

CURSOR_VERSION = 1
#: Longer than any cursor this module makes; a bound on what is decoded.
MAX_CURSOR_LEN = 1024
#: A key whose JSON is longer than this goes by reference (see the module's docstring).
MAX_KEY_BYTES = 512
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HASH_LEN = 16


class CursorError(ValueError):
    """A cursor that cannot be used: malformed, or made for another query."""


def _id_hash(experiment_id: str) -> str:
    return hashlib.sha256(experiment_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


def _key_hash(key: tuple[str | None, str]) -> str:
    return hashlib.sha256(orjson.dumps(list(key))).hexdigest()[:_HASH_LEN]


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
    #: the last row's ``(sort value, experiment_id)``; None when it goes by reference
    key: tuple[str | None, str] | None
    #: the last row's ``(rowid, id hash, key hash)``, for a key too long to carry (a cursor
    #: of an older version has no key hash: "")
    row: tuple[int, str, str] | None = None

    @classmethod
    def after(
        cls, conn: sqlite3.Connection, sort: str, filters_hash: str, key: tuple[str | None, str]
    ) -> Cursor:
        """The cursor of a page whose last row has ``key``: the key itself, or, if it is too
        long to carry, a reference to its row (looked up on ``conn``, the page's snapshot)."""
        if len(orjson.dumps(key)) <= MAX_KEY_BYTES:
            return cls(sort, filters_hash, key)
        (rowid,) = conn.execute(
            "SELECT rowid FROM experiments WHERE experiment_id = ?", (key[1],)
        ).fetchone()
        return cls(sort, filters_hash, None, (int(rowid), _id_hash(key[1]), _key_hash(key)))

    def resolve(
        self, conn: sqlite3.Connection, column: str, workspaces: tuple[str, ...] = ()
    ) -> tuple[str | None, str]:
        """The key to resume after: carried, or looked up by reference (``column``: the
        sort's column) among the rows of ``workspaces`` (the query's, its token's scope
        included; ``()``: all). Raises :class:`CursorError` for a row that is no longer
        there. Looked up anywhere, a forged reference told a token limited to one workspace
        whether a row of another held a given id (200 against 400), and where it sorted."""
        if self.key is not None:
            return self.key
        assert self.row is not None
        rowid, id_hash, key_hash = self.row
        scoped = f" AND workspace_id IN ({', '.join('?' * len(workspaces))})" if workspaces else ""
        found = conn.execute(
            f"SELECT {column}, experiment_id FROM experiments WHERE rowid = ?{scoped}",
            (rowid, *workspaces),
        ).fetchone()
        if found is None or _id_hash(found[1]) != id_hash:
            raise CursorError(
                "this cursor points at a row that is no longer where it was (the mirror "
                "was rebuilt): drop the cursor to start over"
            )
        if key_hash and _key_hash((found[0], found[1])) != key_hash:
            raise CursorError(
                "the row this cursor resumes after changed where it sorts (it was renamed, "
                "say) since the page was served: drop the cursor to start over"
            )
        return found[0], found[1]

    def encode(self) -> str:
        payload: dict[str, Any] = {"v": CURSOR_VERSION, "s": self.sort, "f": self.filters_hash}
        if self.key is not None:
            payload["k"] = list(self.key)
        else:
            rowid, id_hash, key_hash = self.row or (0, "", "")
            payload["r"] = [rowid, id_hash, key_hash] if key_hash else [rowid, id_hash]
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
        if not isinstance(data, dict) or set(data) not in (
            {"v", "s", "f", "k"},
            {"v", "s", "f", "r"},
        ):
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        if data["v"] != CURSOR_VERSION:
            raise CursorError("cursor from another version of hpo-sync: start the walk again")
        sort, fhash = data["s"], data["f"]
        if not isinstance(sort, str) or not isinstance(fhash, str):
            raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
        if "r" in data:
            row = data["r"]
            if (
                not isinstance(row, list)
                or len(row) not in (2, 3)  # (2: made before the key hash was added)
                or type(row[0]) is not int
                or not 0 < row[0] < 2**63  # a rowid SQLite can hold (orjson reads 2**64 - 1)
                or not all(isinstance(h, str) and len(h) == _HASH_LEN for h in row[1:])
            ):
                raise CursorError("malformed cursor: pass next_cursor exactly as it was returned")
            return cls(sort, fhash, None, (row[0], row[1], row[2] if len(row) == 3 else ""))
        key = data["k"]
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
