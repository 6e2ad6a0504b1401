"""A write lock on the mirror held by another connection: every write of the code under test
fails once its busy timeout passes, as on a full disk, but only while the block runs."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_locked(db: str | Path) -> Iterator[None]:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()
