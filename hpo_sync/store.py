"""The SQLite mirror: one writer, many readers, one transaction per :meth:`Store.apply`.

Writes are expected to run off the event loop (``asyncio.to_thread``); the one writer
connection is shared between threads behind a lock, while every reading thread gets its own
read-only connection, so WAL lets reads proceed during a write. Every write method is one
``BEGIN IMMEDIATE`` transaction: a crash at any instant leaves the file as it was before or
after the call, never in between, and re-applying the same observations is idempotent, so the
next sweep finishes whatever an interrupted one left undone.

The schema is documented in ``docs/schema.md``; the migrations live in :mod:`hpo_sync.schema`
and the pure diffing rules in :mod:`hpo_sync.diff`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import os
import re
import sqlite3
import stat as stat_mod
import statistics
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import EllipsisType
from typing import Any, Literal, NamedTuple

import orjson

from hpo_sync.diff import (
    DEFAULT_TERMINAL_STATUSES,
    DELETED,
    STATUS,
    TRIAL_STATUS,
    diff_rows,
    finished_runs,
)
from hpo_sync.errors import (
    BackupExistsError,
    SchemaTooOldError,
    StoreBusyError,
    StoreError,
    StoreInUseError,
)
from hpo_sync.normalise import Experiment, format_time, parse_time, upstream_bool
from hpo_sync.schema import (
    CHANGE_COLUMNS,
    CONTENT_COLUMNS,
    EXPERIMENT_COLUMNS,
    SCHEMA_VERSION,
    check_mirror,
    check_version,
    decode_experiment_row,
    encode_deleted,
    experiment_values,
    migrate,
)

__all__ = [
    "WORKSPACE_STATES_SQL",
    "ApplyResult",
    "ChangeHook",
    "ChangeRow",
    "ExperimentFilter",
    "ExperimentPage",
    "OnChanges",
    "PageKey",
    "SortOrder",
    "Store",
    "StoreLock",
    "SyncRun",
    "WorkspaceState",
    "WorkspaceStats",
    "acquire_lock",
    "count_by_status_sql",
    "decode_workspace_states",
    "filter_sql",
    "keyset_sql",
    "page_sql",
    "sort_column",
    "status_counts",
    "tag_condition",
]

#: Ids per ``WHERE experiment_id IN (...)`` query: far below SQLite's variable limit, large
#: enough that 100,000 experiments take 200 queries.
CHUNK_SIZE = 500
DEFAULT_BUSY_TIMEOUT_S = 10.0
WRITER_CACHE_KIB = 16 * 1024
#: Cap on the WAL file size left behind after a checkpoint (a full sweep can grow it).
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
#: Most of the file a read connection maps into memory (address space, not memory).
READER_MMAP_BYTES = 1 << 30
#: Page size of newly created mirror files (see Store.open).
#: WAL frames after which a commit checkpoints: the journal size limit's worth of 16 KiB pages.
WAL_AUTOCHECKPOINT_PAGES = JOURNAL_SIZE_LIMIT_BYTES // 16384
NEW_FILE_PAGE_SIZE = 16384

_ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", re.ASCII)
# Sweep start/finish times may carry fractions: hot sweeps often take less than a second.
_RUN_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$", re.ASCII)

SortOrder = Literal["created", "-created", "modified", "-modified", "name", "-name"]
#: ``(sort column value, experiment_id)`` of a row: the keyset pagination cursor.
PageKey = tuple[str | None, str]

#: Each sort order's ``(column, descending)``; ties are broken by ``experiment_id`` in the same
#: direction. Read it through :func:`sort_column`.
_SORTS: dict[str, tuple[str, bool]] = {
    "created": ("gmt_create_time", False),
    "-created": ("gmt_create_time", True),
    "modified": ("gmt_modified_time", False),
    "-modified": ("gmt_modified_time", True),
    "name": ("name", False),
    "-name": ("name", True),
}

_ERROR_HINTS = (
    (
        "SQLITE_BUSY",
        "another connection held the write lock past busy_timeout: a long write of a sweep"
        " (the daemon's sweep process, on a slow or busy disk), or another program writing"
        " this file",
    ),
    ("SQLITE_LOCKED", "the database is locked by another connection; retry"),
    ("SQLITE_FULL", "the disk is full; free some space and retry"),
    ("SQLITE_READONLY", "the file or its directory is not writable by this user"),
    ("SQLITE_CORRUPT", "the file is damaged; restore it from a backup"),
    ("SQLITE_NOTADB", "the file is not a SQLite database; point the store path elsewhere"),
    ("SQLITE_CANTOPEN", "the file cannot be opened; check the path and its permissions"),
    ("SQLITE_IOERR", "an I/O error occurred; check the disk"),
)


@contextmanager
def _mapped(where: str, action: str) -> Iterator[None]:
    """Map sqlite3 errors onto :class:`StoreError`, saying what failed and what to do."""
    try:
        yield
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", "") or ""
        hint = next((h for prefix, h in _ERROR_HINTS if name.startswith(prefix)), None)
        detail = " ".join(str(e).split())  # one line, whatever the message holds
        folder = os.path.dirname(os.path.abspath(where))
        if name.startswith("SQLITE_IOERR") and _disk_full(where):
            # A full disk often surfaces as an I/O error: SQLite cannot size the -shm file
            # (SQLITE_IOERR_SHMSIZE) even to read, or a write fails on its way to the disk.
            hint = f"the disk holding {folder} is full"
        elif name in ("SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_CANTINIT"):
            # A read of a WAL file that no process has open: SQLite must create its -shm.
            hint = (
                f"reading a mirror that no process has open needs {os.path.basename(where)}"
                f"-shm created beside it, and this user cannot write to {folder}: run as the "
                "user the service runs as, or while it runs, or query a copy (hpo-sync backup)"
            )
        elif not name and detail.startswith("Could not decode to UTF-8 column"):
            # Raised by Python's sqlite3 itself (no SQLite error code), quoting the bytes:
            # say which column, not what it holds.
            detail = detail.split(" with text", 1)[0]
            hint = "a stored text is not UTF-8: the file is damaged; restore it from a backup"
        msg = f"{action} failed on {where}: {detail[:300]}"
        error = StoreBusyError if name.startswith("SQLITE_BUSY") else StoreError
        raise error(f"{msg} — {hint}" if hint else msg) from e


class _WriterConnection(sqlite3.Connection):
    """The writer connection, which threads take turns at behind ``Store._write_lock``:
    every cursor made on it while a thread holds it is closed before the thread lets go.

    Why: sqlite3 shares one prepared statement among the cursors that run the same SQL
    (its statement cache), and a cursor that is freed resets the statement it last ran.
    A cursor that outlived the lock (``Store.apply``'s ``cur`` is freed when the function
    returns, after the ``with`` block; a traceback can keep one for longer) was freed in
    its thread while another thread ran that same statement, and reset it under that
    thread's feet: ``executemany`` then failed with SQLITE_MISUSE ("bad parameter or other
    API misuse"), a sweep every so often on a loaded machine. Closed cursors hold no
    statement. (Turning the cache off would also do, at ~1 ms of parsing per 256-row
    INSERT, on the writer thread's critical path during a baseline.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Those made since a thread last let go that are still alive. Weakly: one freed
        # inside the block resets its statement there, as it always did (a cursor kept
        # alive until the COMMIT would keep its SELECT in progress and fail the COMMIT).
        self._cursors: weakref.WeakSet[sqlite3.Cursor] = weakref.WeakSet()
        self._held = 0

    def cursor(self, factory: Any = sqlite3.Cursor) -> sqlite3.Cursor:  # type: ignore[override]
        cur: sqlite3.Cursor = super().cursor(factory)
        self._cursors.add(cur)
        return cur

    # Connection.execute() makes its cursor in C, without calling cursor(): these do.
    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        return self.cursor().executemany(sql, parameters)

    @contextmanager
    def held(self) -> Iterator[_WriterConnection]:
        """For the thread holding ``Store._write_lock``: closes the cursors made meanwhile
        when the outermost such block ends (the lock is re-entrant)."""
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            if not self._held:
                for cur in list(self._cursors):
                    cur.close()
                self._cursors.clear()


def _place(partial: Path, dest: Path, *, overwrite: bool) -> None:
    """Move the finished copy ``partial`` to ``dest``. Without ``overwrite`` it is linked
    there, which fails if a file came meanwhile (another backup), rather than replacing
    one; a file system without hard links (vfat, exFAT, some CIFS mounts) gets a rename
    after one more look."""
    try:
        if overwrite:
            os.replace(partial, dest)
            return
        try:
            os.link(partial, dest)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if dest.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
            os.replace(partial, dest)
    except FileExistsError:
        raise BackupExistsError(f"{dest} exists; remove it or pass overwrite=True") from None
    except OSError as e:
        raise StoreError(f"cannot write the backup {dest}: {e.strerror}") from e


#: The hidden copy a backup writes beside its destination: ``.DEST.hpo-sync-backup.XXXXXXXX
#: .partial`` (``tempfile.mkstemp``'s 8 random characters). The clean-up below removes only
#: files of this name: "unheld" is told by ``flock``, which SQLite's own (POSIX) locks are
#: not, so another application's open database of a name like ``.x.sessions.partial`` looked
#: unheld, and a looser pattern took it.
_BACKUP_COPY_MARK = ".hpo-sync-backup."
_BACKUP_COPY_RE = re.compile(
    rf"^\..+{re.escape(_BACKUP_COPY_MARK)}[a-z0-9_]{{8}}\.partial$", re.ASCII
)
#: A backup's copy left this long unchanged, and not locked by its writer, is a dead one's.
STALE_COPY_AGE_S = 60.0
_SQLITE_HEADER = b"SQLite format 3\x00"


def _remove_dead_copies(directory: Path) -> None:
    """Remove the copies that backups killed in ``directory`` left behind (SIGKILL, power
    loss: no ``finally`` ran). A backup holds an exclusive ``flock`` on its copy while it
    writes it, so a copy that no process holds, that is an SQLite file (or empty) and that
    has not changed for ``STALE_COPY_AGE_S`` is a dead backup's; the age also spares a
    copy made a moment ago, before its writer took the lock."""
    try:
        names = [e.name for e in os.scandir(directory) if _BACKUP_COPY_RE.match(e.name)]
    except OSError:
        return
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_COPY_AGE_S:
                continue
            if os.pread(fd, len(_SQLITE_HEADER), 0) not in (b"", _SQLITE_HEADER):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a backup in progress
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        except OSError:
            continue
        finally:
            os.close(fd)


def _disk_full(path: str) -> bool:
    """Whether the file system holding ``path`` has no space left for this user."""
    try:
        return os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        return False


def _check_time(value: str, name: str, pattern: re.Pattern[str] = _ISO_RE) -> None:
    # Times are compared as text throughout, which is only chronological for one fixed format.
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{name} must be ISO-8601 UTC 'YYYY-MM-DDTHH:MM:SSZ', got {value!r}")


def _iso(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    dt = parse_time(value)
    if dt is None:
        raise ValueError(f"{name}: cannot parse {value!r} as a time")
    return format_time(dt)


def _chunks(seq: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _workspace_clause(workspace: str | Sequence[str] | None) -> tuple[str, list[Any]]:
    """`` AND workspace_id IN (...)`` and its parameters for one workspace or several
    (None or an empty sequence: every workspace)."""
    wanted = [workspace] if isinstance(workspace, str) else list(workspace or ())
    if not wanted:
        return "", []
    return f" AND workspace_id IN ({_marks(len(wanted))})", wanted


def _marks(n: int) -> str:
    return ",".join("?" * n)


# --- value objects ------------------------------------------------------------------------


class ChangeRow(NamedTuple):
    """One row of ``changes``. A NamedTuple: apply builds one per change, and 100,000 frozen
    dataclasses cost noticeably more."""

    id: int
    experiment_id: str
    workspace_id: str
    field: str
    old_value: str | None
    new_value: str | None
    observed_at: str
    sync_run_id: int | None
    baseline: bool

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ChangeRow:
        """Build from a row selected as ``CHANGE_COLUMNS``."""
        id_, exp_id, ws, field_, old, new, observed_at, run_id, baseline = row
        return cls(id_, exp_id, ws, field_, old, new, observed_at, run_id, bool(baseline))


#: ``on_changes(conn, change_rows)``: called inside :meth:`Store.apply`'s transaction.
OnChanges = Callable[[sqlite3.Connection, list[ChangeRow]], None]
ChangeHook = OnChanges


class RunProgress(NamedTuple):
    """A sweep's counters so far, written with each of its batches: a run killed mid-sweep
    (SIGKILL, a power cut) keeps what it had done in ``sync_runs``, not zeros, once the
    next start closes it as interrupted. The sweep's end writes the final ones."""

    api_calls: int
    pages: int
    experiments_seen: int


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one :meth:`Store.apply` did.

    ``unchanged`` rows had identical content (at most ``last_seen_at`` moved); ``stale``
    experiments were skipped because the mirror already held a newer observation of them.
    """

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    marked_deleted: int = 0
    change_rows: list[ChangeRow] = field(default_factory=list)

    @property
    def changes(self) -> int:
        """Number of change rows written."""
        return len(self.change_rows)


@dataclass(frozen=True, slots=True)
class WorkspaceState:
    """One row of ``workspaces``: the sync state sweeps and health checks need."""

    workspace_id: str
    label: str | None
    baseline_at: str | None
    last_full_ok_at: str | None
    last_hot_ok_at: str | None
    last_error: str | None
    last_error_at: str | None
    create_watermark: str | None


@dataclass(frozen=True, slots=True)
class SyncRun:
    """One row of ``sync_runs``."""

    id: int
    workspace_id: str
    mode: str
    started_at: str
    finished_at: str | None
    status: str
    api_calls: int
    pages: int
    experiments_seen: int
    changes: int
    error: str | None

    @property
    def duration_s(self) -> float | None:
        """Wall time of the sweep, if it finished."""
        t0, t1 = parse_time(self.started_at), parse_time(self.finished_at)
        if t0 is None or t1 is None:
            return None
        # parse_time drops fractions; recover them so sub-second sweeps are not all 0 s.
        return (t1 - t0).total_seconds() + _frac(self.finished_at) - _frac(self.started_at)


def _frac(value: str | None) -> float:
    if value and "." in value:
        return float("0." + value.split(".", 1)[1].rstrip("Z"))
    return 0.0


@dataclass(frozen=True, slots=True)
class ExperimentFilter:
    """Filters of :meth:`Store.list_experiments`; every given filter must match.

    ``tags`` are ``(key, value)`` pairs (value None: the key is present with any value).
    With ``tags_as_text`` (the read API's ``tag=KEY:VALUE``, split at its first colon) a
    pair matches a tag whose ``Key:Value`` reads the same, or whose key is the whole text
    (any value): a key that holds a colon itself (``acs:rm:rgId``) is found too, with a
    value or without. ``created_after`` and ``modified_after`` are inclusive,
    ``created_before`` exclusive.
    Times may be any format :func:`hpo_sync.normalise.parse_time` reads.
    """

    workspaces: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    name: str | None = None
    creator: str | None = None
    tags: tuple[tuple[str, str | None], ...] = ()
    tags_as_text: bool = False
    created_after: str | None = None
    created_before: str | None = None
    modified_after: str | None = None
    include_deleted: bool = False


@dataclass(frozen=True, slots=True)
class ExperimentPage:
    """A page of experiments; pass ``last_key`` as ``after_key`` to get the next page."""

    rows: list[dict[str, Any]]
    last_key: PageKey | None
    has_more: bool


@dataclass(frozen=True, slots=True)
class WorkspaceStats:
    """Per-workspace statistics over a time window (see :meth:`Store.stats`)."""

    workspace_id: str
    counts_by_status: dict[str | None, int]
    finished: int
    finished_by_status: dict[str, int]
    failed: int
    failure_rate: float | None
    median_run_time_s: float | None
    #: the ended runs the median is over: those with a known start (see :meth:`Store.stats`)
    timed: int = 0


# --- single-instance lock -----------------------------------------------------------------


class StoreLock:
    """An exclusive ``flock`` on ``<db>.lock``, held until :meth:`release` (or process exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock. The file is left in place: unlinking it would race."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: The files of a mirror ``<db>``: the file, SQLite's companions, the single-instance lock.
MIRROR_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")


def is_mirror_file(path: str | Path, db: str | Path) -> bool:
    """Whether ``path`` (through symlinks) is the mirror at ``db`` or one of its files."""
    real, mirror = Path(path).resolve(), Path(db).resolve()
    return any(real == Path(f"{mirror}{suffix}") for suffix in MIRROR_FILE_SUFFIXES)


def acquire_lock(db_path: str | Path) -> StoreLock:
    """Take the single-instance lock of the mirror at ``db_path``, or raise StoreError.

    The lock is the file's, whatever name reaches it: ``<db>.lock`` beside the file a
    symlink points to (a second daemon named the mirror through a symlink, took a lock of
    its own and sent every alert a second time). A file of several names (hard links) is
    refused: SQLite keeps a write-ahead log per name, and two writers through two names
    corrupt the file (seen)."""
    real = Path(os.path.realpath(db_path))
    try:
        links = real.stat().st_nlink
    except OSError:
        links = 1  # a new mirror (or one Store.open will say more about)
    if links > 1:
        raise StoreError(
            f"{db_path} is a file of {links} names (hard links): SQLite keeps a journal "
            "per name, so writers through two names would corrupt it; give the mirror one "
            "name (a symlink to it is fine)"
        )
    lock_path = Path(f"{real}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create lock file {lock_path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUseError(
            f"{db_path} is in use by another hpo-sync process (pid {holder}, lock file "
            f"{lock_path}); stop that process first, or give this one its own store path"
        ) from None
    # The pid is only informative (for the message above); the flock is the lock.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StoreLock(lock_path, fd)


# --- the store ------------------------------------------------------------------------------

_EXPERIMENT_SELECT = ", ".join(EXPERIMENT_COLUMNS)
_CHANGE_SELECT = ", ".join(CHANGE_COLUMNS)
_N_CONTENT = len(CONTENT_COLUMNS)
_CONTENT_INDEX = {c: i for i, c in enumerate(CONTENT_COLUMNS)}
_STATUS_I = _CONTENT_INDEX["status"]
_TRIAL_STATUS_I = _CONTENT_INDEX["trial_status"]
_DELETED_I = _CONTENT_INDEX["deleted"]
_DELETED_TRUE = encode_deleted(True)
_MODIFIED_I = _CONTENT_INDEX["gmt_modified_time"]
#: A record whose GmtModifiedTime is older than the stored one by less than this is an
#: older copy of it (see _lagging); a larger gap is more likely a time read in another zone.
LAG_WINDOW_S = 1800.0
# What apply reads of a stored row: id, content (comparable with experiment_values), times.
_STORED_SELECT = ", ".join(("experiment_id", *CONTENT_COLUMNS, "last_seen_at", "last_changed_at"))
_INSERT_EXPERIMENT = (
    "INSERT INTO experiments (experiment_id, "
    + ", ".join(CONTENT_COLUMNS)
    + ", first_seen_at, last_seen_at, last_changed_at)"
    + f" VALUES ({_marks(len(CONTENT_COLUMNS) + 4)})"
)
_INSERT_CHANGE = (
    "INSERT INTO changes (experiment_id, workspace_id, field, old_value, new_value,"
    " observed_at, sync_run_id, baseline) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Rows per multi-row INSERT statement (see _insert_rows), at most; a power of two.
ROWS_PER_INSERT = 256


@functools.lru_cache(maxsize=64)
def _multi_row_sql(single_row_sql: str, rows: int) -> str:
    """``INSERT ... VALUES (?, ...)`` made into ``... VALUES (?, ...), (?, ...), ...``."""
    head, _, row = single_row_sql.partition(" VALUES ")
    return f"{head} VALUES {', '.join([row] * rows)}"


def _insert_rows(cur: sqlite3.Cursor, single_row_sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``cur.executemany(single_row_sql, rows)``, in statements of up to ROWS_PER_INSERT rows.

    Same rows, same order, same outcome. The sqlite3 module releases the GIL around every
    statement step and must take it back before the next one: while the event loop thread
    runs Python (parsing and normalising the next pages), each take-back can wait for its
    switch interval (5 ms), and row-by-row inserts ran several times slower than alone.
    A few hundred rows per step make that wait rare.

    Statements hold on to the values last bound to them (a 256-row statement of experiments,
    about a megabyte) while the connection caches them, so there are few sizes: the rows
    that do not fill a whole statement go in statements of 128, 64, ..., 1 rows.
    """
    if not rows:
        return
    width = len(rows[0])
    limit = cur.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per = 1 << (max(1, min(ROWS_PER_INSERT, limit // width)).bit_length() - 1)
    flat = itertools.chain.from_iterable
    start, end = 0, len(rows)
    while start < end:
        while per > end - start:
            per //= 2
        full = start + (end - start) // per * per
        cur.executemany(
            _multi_row_sql(single_row_sql, per),
            [tuple(flat(rows[i : i + per])) for i in range(start, full, per)],
        )
        start = full


_SYNC_RUN_COLUMNS = (
    "id, workspace_id, mode, started_at, finished_at, status, api_calls, pages,"
    " experiments_seen, changes, error"
)
_WORKSPACE_COLUMNS = (
    "workspace_id, label, baseline_at, last_full_ok_at, last_hot_ok_at, last_error,"
    " last_error_at, create_watermark"
)

#: An SQL expression of every workspace's state (:class:`WorkspaceState`) as one JSON array,
#: for a read that wants the states in the same statement, hence the same snapshot, as its
#: rows (:func:`decode_workspace_states` reads it back).
WORKSPACE_STATES_SQL = (
    f"(SELECT json_group_array(json_array({_WORKSPACE_COLUMNS}))"
    f" FROM (SELECT {_WORKSPACE_COLUMNS} FROM workspaces ORDER BY workspace_id))"
)


def decode_workspace_states(value: str | bytes) -> list[WorkspaceState]:
    """The states :data:`WORKSPACE_STATES_SQL` gave, by workspace id."""
    return [WorkspaceState(*row) for row in orjson.loads(value)]


class Store:
    """The mirror. Create with :meth:`Store.open`; close with :meth:`close`."""

    def __init__(
        self,
        path: str,
        writer: _WriterConnection | None,
        *,
        readonly: bool,
        busy_timeout_s: float,
        any_version: bool = False,
    ) -> None:
        """Use :meth:`Store.open`."""
        self.path = path
        self.readonly = readonly
        self._writer = writer
        self._memory = path == ":memory:"
        self._busy_timeout_s = busy_timeout_s
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._any_version = any_version  # see open()

    # -- lifecycle --

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        readonly: bool = False,
        any_version: bool = False,
        upgrade: bool = True,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> Store:
        """Open the mirror at ``path``, creating it or upgrading its schema in place.

        ``readonly`` opens the file with ``mode=ro`` and never migrates: it fails when the
        file is missing or its schema is older or newer than this code's — unless
        ``any_version`` (for :meth:`backup` alone: a copy before an upgrade, or of a newer
        mirror, needs no schema of this code's). ``upgrade=False`` refuses an older mirror
        (:class:`SchemaTooOldError`) instead of upgrading it, for a writer without the
        single-instance lock: another hpo-sync process may be using the file, perhaps of
        that older version (it would go on writing the old schema). ``":memory:"``
        gives a private in-memory mirror (tests only; readers share the writer connection).
        """
        if any_version and not readonly:
            raise ValueError("any_version is for read-only stores")
        where = str(path)
        if where != ":memory:" and Path(where).is_dir():
            # SQLite would say "disk I/O error" (read-only) or "unable to open": neither
            # says what is wrong.
            raise StoreError(
                f"{where} is a directory, not a mirror file: name the database file itself "
                f"(e.g. {Path(where) / 'mirror.db'})"
            )
        if readonly:
            if where == ":memory:" or not Path(where).exists():
                # (the words every command uses: README, exit status 1)
                raise StoreError(f"no mirror at {where} — run `hpo-sync sync` first")
            store = cls(
                where, None, readonly=True, busy_timeout_s=busy_timeout_s, any_version=any_version
            )
            with _mapped(where, "opening the mirror read-only"):
                conn = store._connect_reader()
                try:
                    _check_readable(conn, where, any_version=any_version)
                finally:
                    conn.close()
            return store
        with _mapped(where, "opening the mirror"):
            conn = sqlite3.connect(
                where,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # shared across threads behind _write_lock
                timeout=busy_timeout_s,
                factory=_WriterConnection,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                # Before anything below changes the file (WAL rewrites its header): a file
                # that is not a mirror, or a newer one, is refused as it was found.
                version = check_version(conn, where)
                if not upgrade and version < SCHEMA_VERSION:
                    raise SchemaTooOldError(
                        f"{where} has schema version {version}, this hpo-sync needs "
                        f"{SCHEMA_VERSION}"
                    )
                # Only takes effect while the file is still empty, i.e. for a new mirror (it
                # must precede the switch to WAL). An experiments row is ~3 KB (raw JSON and
                # config texts): 4 KiB pages hold one row each and waste a quarter of the
                # file; 16 KiB pages make a 100,000-row mirror ~30% smaller and its baseline
                # correspondingly cheaper to write. Existing files keep their page size.
                conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode: a power cut (not a process crash) may drop the last
                # commits, never corrupt the file; the next sweep re-observes what was lost,
                # change rows and outbox rows together.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
                # Checkpoint when the WAL reaches that same size rather than after 1,000
                # pages (16 MiB): a 100,000-experiment baseline then checkpoints (two fsyncs
                # and a copy) a quarter as often, and copies a page written by several
                # batches once. ~10 % of the baseline's SQLite time.
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
                # A page cache that keeps a batch's index pages from spilling mid-transaction.
                # A cap, not an allocation, but it fills up and counts in the daemon's memory:
                # with 16 KiB pages and full sweeps applying ~2,000 rows per transaction, 16
                # MiB is as fast as 64 MiB (measured), even for 100,000 rows in one call.
                conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
                migrate(conn, where=where)
            except BaseException:
                conn.close()
                raise
        return cls(where, conn, readonly=False, busy_timeout_s=busy_timeout_s)

    def close(self) -> None:
        """Close every connection. Further use raises StoreError."""
        if self._closed:
            return
        self._closed = True
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The file's schema version."""
        with self.reader() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- connections --

    def _file_id(self) -> tuple[int, int]:
        """The mirror file's identity (device, inode), following symlinks."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(
                f"the mirror {self.path} is gone (moved or deleted while open)"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read the mirror {self.path}: {exc.strerror}") from None
        return st.st_dev, st.st_ino

    def _connect_reader(self) -> sqlite3.Connection:
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,  # only so close() may run on another thread
            timeout=self._busy_timeout_s,
        )
        # Read the file through a memory map, not a read() and a copy per page: the pages
        # live once, in the OS page cache, for every reading thread. A list of 50 rows from
        # varied queries of a 100,000-experiment mirror: ~115 µs instead of ~195 µs.
        conn.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def reader(self, *, snapshot: bool = True) -> Iterator[sqlite3.Connection]:
        """A read-only connection of the calling thread, inside one read transaction (unless
        ``snapshot=False``).

        Everything read within one ``with`` block sees one consistent snapshot, even while a
        sync writes. Re-entrant within a thread. Rows are :class:`sqlite3.Row`.

        ``snapshot=False`` leaves the transaction out, for work that reads with a single
        statement (each statement is its own snapshot): no ``BEGIN`` and ``COMMIT`` around
        it, two statements fewer — and each statement takes the GIL back when SQLite is
        done, a wait when another thread holds it. Inside an outer block, the outer
        snapshot holds.
        """
        if self._closed:
            raise StoreError(f"the mirror {self.path} is closed")
        if self._memory:
            # One in-memory database, one connection: readers must share the writer.
            with self._write_lock:
                assert self._writer is not None
                with self._writer.held() as shared:
                    shared.row_factory = sqlite3.Row
                    try:
                        yield shared
                    finally:
                        shared.row_factory = None
            return
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        # A read-only store (``serve`` of copies of a mirror, the query commands) may see its
        # file replaced (a backup renamed over it) or moved away. Each thread kept its
        # connection to the file it first opened: answers came from the old and the new
        # file in turn, and from a deleted one. A connection to a file that is no longer at
        # the path is dropped for one to the file that is.
        if (
            conn is not None
            and self.readonly
            and local.depth == 0
            and local.file_id != self._file_id()
        ):
            with self._readers_lock:
                self._readers.remove(conn)
            conn.close()
            conn = local.conn = None
        if conn is None:
            file_id = self._file_id() if self.readonly else None
            with _mapped(self.path, "opening a read connection"):
                conn = self._connect_reader()
                if self.readonly:
                    try:  # the file may have been replaced by one of another version
                        _check_readable(conn, self.path, any_version=self._any_version)
                    except BaseException:
                        conn.close()
                        raise
            with self._readers_lock:
                self._readers.append(conn)
            local.conn = conn
            local.depth = 0
            local.file_id = file_id
        outer = local.depth == 0 and snapshot
        with _mapped(self.path, "reading the mirror"):
            if outer:
                conn.execute("BEGIN")
            local.depth += 1
            try:
                yield conn
            finally:
                local.depth -= 1
                if outer and conn.in_transaction:
                    conn.execute("COMMIT")

    @contextmanager
    def write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``) on the writer connection, for
        modules that keep their own tables in the mirror (the alert outbox): committed when
        the block ends, rolled back if it raises. Serialised with every other write of this
        process. ``action`` names the work in errors ("cannot <action>")."""
        with self._write(action) as conn:
            yield conn

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreError(f"the mirror {self.path} is closed")
        if self._writer is None:
            raise StoreError(f"the mirror {self.path} was opened read-only; cannot {action}")
        with self._write_lock:
            if self._closed:
                # Closed while this write waited for the one before it: each write queued
                # behind one that waits out busy_timeout (another program holds the file's
                # write lock) waited it out in turn, and a stop of the daemon as long.
                raise StoreError(f"the mirror {self.path} is closed")
            with self._writer.held() as conn, _mapped(self.path, action):
                # IMMEDIATE takes the write lock up front: a deferred transaction that
                # upgrades from read to write can fail with SQLITE_BUSY without waiting
                # busy_timeout.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    # -- workspaces and sync runs --

    def ensure_workspace(self, workspace_id: str, label: str | None = None) -> None:
        """Create the workspace's row if missing; set its label when one is given."""
        with self._write("register a workspace") as conn:
            _ensure_workspace(conn, workspace_id)
            if label is not None:
                conn.execute(
                    "UPDATE workspaces SET label = ? WHERE workspace_id = ?", (label, workspace_id)
                )

    def begin_run(self, workspace_id: str, mode: str, started_at: str) -> int:
        """Record the start of a sweep (status ``running``); return its id."""
        if mode not in ("full", "hot"):
            raise ValueError(f"mode must be 'full' or 'hot', got {mode!r}")
        _check_time(started_at, "started_at", _RUN_TIME_RE)
        with self._write("record a sync run") as conn:
            _ensure_workspace(conn, workspace_id)
            cur = conn.execute(
                "INSERT INTO sync_runs (workspace_id, mode, started_at, status)"
                " VALUES (?, ?, ?, 'running')",
                (workspace_id, mode, started_at),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def finish_run(
        self,
        run_id: int,
        *,
        finished_at: str,
        status: str,
        api_calls: int,
        pages: int,
        experiments_seen: int,
        changes: int | None = None,
        error: str | None = None,
    ) -> None:
        """Record the end of a sweep. ``changes`` None keeps the count that
        :meth:`apply` accumulated on the run (exact even when the sweep was interrupted)."""
        with self._write("finish a sync run") as conn:
            _finish_run(
                conn, run_id, finished_at, status, api_calls, pages, experiments_seen, changes,
                error,
            )  # fmt: skip

    def close_run(
        self,
        run_id: int,
        workspace_id: str,
        mode: str,
        *,
        finished_at: str,
        status: str,
        api_calls: int,
        pages: int,
        experiments_seen: int,
        error: str | None = None,
        baseline: bool = False,
        raise_watermark: bool = False,
        upstream_learnt: str | EllipsisType | None = ...,
        succeeded_at: str | None = None,
    ) -> None:
        """The end of a sweep in ONE transaction: :meth:`finish_run` (the run keeps the
        change count its applies accumulated), then the workspace's outcome
        (:meth:`record_success` or :meth:`set_workspace_error`) and, for a baseline that
        succeeded, :meth:`mark_baseline`. In separate transactions a crash between them
        left an ``ok`` baseline run without ``baseline_at``: the next sync was a second
        baseline, whose real changes were flagged baseline and never alerted.

        ``raise_watermark``: the sweep read its listing of what is new whole (a full
        sweep's listing of the workspace, a hot sweep's of what was created since the
        watermark), so the workspace's create watermark moves to the newest create time in
        the mirror, but not past ``finished_at`` (see :func:`_raise_watermark`). Only then:
        hot sweeps list what was created since the watermark (less an overlap), so one
        raised by the later pages of a listing that then failed, or was killed, would hide
        the experiments of its earlier pages from every hot sweep until the next full one.

        ``upstream_learnt``: what the workspace's ``upstream_learnt`` becomes (``...``
        leaves it as it is).

        ``succeeded_at`` (default ``finished_at``): the time recorded as the workspace's last
        success, which says how fresh the mirror is (stall notices, the read API); the
        clock's own, where ``finished_at`` may be held at the newest time recorded before
        (:meth:`hpo_sync.sync.SyncEngine._now`)."""
        if succeeded_at is not None:
            _check_time(succeeded_at, "succeeded_at")
        with self._write("close a sync run") as conn:
            if raise_watermark:
                _raise_watermark(conn, workspace_id, finished_at)
            if upstream_learnt is not ...:
                conn.execute(
                    "UPDATE workspaces SET upstream_learnt = ? WHERE workspace_id = ?"
                    " AND upstream_learnt IS NOT ?",
                    (upstream_learnt, workspace_id, upstream_learnt),
                )
            _finish_run(
                conn, run_id, finished_at, status, api_calls, pages, experiments_seen, None,
                error,
            )  # fmt: skip
            if status == "ok":
                _record_success(conn, workspace_id, mode, succeeded_at or finished_at)
                if baseline and mode == "full":
                    _mark_baseline(conn, workspace_id, finished_at)
            else:
                _set_workspace_error(conn, workspace_id, error, finished_at)

    def abandon_running_runs(
        self, at: str, *, error: str = "interrupted: hpo-sync stopped during the sweep"
    ) -> int:
        """Mark runs still ``running`` (left by a crash) as ``failed``; return how many.

        Call it only while holding :func:`acquire_lock`, or another live process's sweeps
        would be marked too.
        """
        _check_time(at, "at", _RUN_TIME_RE)
        with self._write("close interrupted sync runs") as conn:
            cur = conn.execute(
                "UPDATE sync_runs SET status = 'failed', finished_at = ?, error = ?"
                " WHERE status = 'running'",
                (at, error),
            )
            return cur.rowcount

    def mark_baseline(self, workspace_id: str, at: str) -> None:
        """Record that the workspace's first complete full sweep finished at ``at``.

        Only the first call counts: the baseline never moves later.
        """
        with self._write("mark the baseline") as conn:
            _mark_baseline(conn, workspace_id, at)

    def record_success(self, workspace_id: str, mode: str, at: str) -> None:
        """Record a successful sweep of ``mode`` (``full`` or ``hot``) at ``at``."""
        with self._write("record a successful sweep") as conn:
            _record_success(conn, workspace_id, mode, at)

    def set_workspace_error(self, workspace_id: str, error: str | None, at: str) -> None:
        """Record the workspace's latest sync error. It is kept after recovery: compare
        ``last_error_at`` with ``last_*_ok_at`` to tell whether it is current."""
        with self._write("record a workspace error") as conn:
            _set_workspace_error(conn, workspace_id, error, at)

    # -- apply --

    def apply(
        self,
        workspace_id: str,
        experiments: Sequence[Experiment],
        *,
        observed_at: str,
        run_id: int,
        complete: bool = False,
        baseline: bool,
        seen_ids_for_deletion: Collection[str] | None = None,
        listing_started_at: str | None = None,
        on_changes: OnChanges | None = None,
        contents: Sequence[tuple[Any, ...]] | None = None,
        progress: RunProgress | None = None,
    ) -> ApplyResult:
        """Upsert a batch of one workspace's experiments observed at ``observed_at``, in ONE
        transaction, appending a change row per tracked-field change.

        - Identical content writes nothing but a forward move of ``last_seen_at``.
        - A column in an experiment's ``absent`` (its field left out of the upstream answer)
          keeps its stored value: not reported is not "became empty".
        - An experiment whose stored row holds a newer observation than ``observed_at`` is
          skipped as stale, so replaying old batches never rolls the mirror back.
        - ``complete``: the batch (plus ``seen_ids_for_deletion``, for sweeps that apply page
          by page) is a complete, consistent listing of the workspace. Every experiment of the
          workspace that is not deleted, not in it, and last seen before
          ``listing_started_at`` (default ``observed_at``) is marked deleted, with a
          ``Deleted`` change row. Rows are never hard-deleted.
          Such a batch also raises the workspace's create watermark to its newest create
          time; a batch of a listing that may yet fail does not (see :meth:`close_run`).
        - ``baseline`` flags the change rows of first sightings as written by the
          workspace's baseline sync (alerts ignore them: they describe what already
          existed). A change to a row the mirror already holds is real and never flagged,
          even in a baseline: an earlier attempt at the baseline saw that row (it failed or
          was partial, or the mirror could not record its end), and what happened since
          must alert.
        - ``on_changes(conn, change_rows)`` runs inside the transaction when rows were
          written (the alert outbox's seam); if it raises, nothing is written.
        - ``contents``: ``experiment_values(exp, workspace_id)`` of each of ``experiments``,
          in order, when the caller has computed them already (a full sweep does, on the
          event loop thread, so that the writer thread only writes).
        - ``progress``: the run's API calls, pages and experiments so far, recorded on its
          ``sync_runs`` row in the same transaction (see :class:`RunProgress`).

        Raises StoreError for an experiment of another workspace or an unknown ``run_id``.
        """
        _check_time(observed_at, "observed_at")
        cutoff = listing_started_at or observed_at
        _check_time(cutoff, "listing_started_at")
        batch = _dedupe(workspace_id, experiments)
        ids = list(batch)
        known: dict[int, tuple[Any, ...]] = {}
        if contents is not None:
            if len(contents) != len(experiments):
                raise ValueError("contents must hold one tuple per experiment")
            known = {id(exp): content for exp, content in zip(experiments, contents, strict=True)}
        inserts: list[tuple[Any, ...]] = []
        # Updates grouped by the set of changed columns, so each UPDATE assigns only those:
        # SQLite maintains an index whenever the statement assigns one of its columns.
        updates: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        touches: list[tuple[str, str]] = []
        pending: list[tuple[Any, ...]] = []
        inserted = updated = unchanged = stale = marked = 0
        watermark: str | None = None
        base = 1 if baseline else 0

        with self._write("apply a batch") as conn:
            _check_run(conn, run_id, workspace_id)
            _ensure_workspace(conn, workspace_id)
            cur = conn.cursor()
            cur.row_factory = None  # plain tuples: the fastest rows sqlite3 makes
            for chunk in _chunks(ids, CHUNK_SIZE):
                cur.execute(
                    f"SELECT {_STORED_SELECT} FROM experiments"
                    f" WHERE experiment_id IN ({_marks(len(chunk))})",
                    chunk,
                )
                existing = {row[0]: row for row in cur}
                for exp_id in chunk:
                    exp = batch[exp_id]
                    content = known.get(id(exp)) or experiment_values(exp, workspace_id)
                    stored = existing.get(exp_id)
                    if stored is None:
                        # First sighting: diff_rows(None, new) written out, as a baseline
                        # inserts 100,000 of these.
                        inserted += 1
                        inserts.append((exp_id, *content, observed_at, observed_at, observed_at))
                        ws, trial_status = content[0], content[_TRIAL_STATUS_I]
                        pending.append(
                            (exp_id, ws, STATUS, None, content[_STATUS_I], observed_at, run_id,
                             base)
                        )  # fmt: skip
                        if trial_status != "{}":
                            pending.append(
                                (exp_id, ws, TRIAL_STATUS, None, trial_status, observed_at,
                                 run_id, base)
                            )  # fmt: skip
                        if content[_DELETED_I]:
                            pending.append(
                                (exp_id, ws, DELETED, None, _DELETED_TRUE, observed_at, run_id,
                                 base)
                            )  # fmt: skip
                    else:
                        last_seen, last_changed = stored[_N_CONTENT + 1], stored[_N_CONTENT + 2]
                        if observed_at < max(last_seen, last_changed):
                            stale += 1
                            continue
                        old_values = stored[1 : _N_CONTENT + 1]
                        if _lagging(content[_MODIFIED_I], old_values[_MODIFIED_I], exp.absent):
                            stale += 1
                            continue
                        if exp.absent:
                            # Not reported is not "became empty": an answer that leaves a
                            # field out (TrialStatus, say) would otherwise write a change to
                            # {} and one back when the field returns, and fire alerts.
                            merged = list(content)
                            for column in exp.absent:
                                i = _CONTENT_INDEX[column]
                                merged[i] = old_values[i]
                            content = tuple(merged)
                        # One tuple comparison settles the common case of a full sweep.
                        if old_values == content:
                            unchanged += 1
                            if last_seen < observed_at:
                                touches.append((observed_at, exp_id))
                            continue
                        updated += 1
                        old = dict(zip(CONTENT_COLUMNS, old_values, strict=True))
                        changed = tuple(
                            c
                            for c, a, b in zip(CONTENT_COLUMNS, old_values, content, strict=True)
                            if a != b
                        )
                        # raw alone differing is representation drift, not a data change.
                        changed_at = observed_at if changed != ("raw",) else last_changed
                        updates.setdefault(changed, []).append(
                            (
                                *(content[_CONTENT_INDEX[c]] for c in changed),
                                observed_at,
                                changed_at,
                                exp_id,
                            )
                        )
                        new = {
                            "status": content[_STATUS_I],
                            "trial_status": content[_TRIAL_STATUS_I],
                            "deleted": content[_DELETED_I],
                        }
                        # A change to a row the mirror holds is real, whichever sweep saw
                        # it: never flagged baseline (see the docstring).
                        for ch in diff_rows(old, new):
                            pending.append(
                                (exp_id, content[0], ch.field, ch.old_value, ch.new_value,
                                 observed_at, run_id, 0)
                            )  # fmt: skip
                    if exp.gmt_create_time and (
                        watermark is None or exp.gmt_create_time > watermark
                    ):
                        watermark = exp.gmt_create_time
            # Experiments before changes: changes.experiment_id references them.
            _insert_rows(cur, _INSERT_EXPERIMENT, inserts)
            for columns, params in updates.items():
                assignments = ", ".join(f"{c} = ?" for c in columns)
                cur.executemany(
                    f"UPDATE experiments SET {assignments}, last_seen_at = ?,"
                    " last_changed_at = ? WHERE experiment_id = ?",
                    params,
                )
            cur.executemany(
                "UPDATE experiments SET last_seen_at = ? WHERE experiment_id = ?", touches
            )
            _clear_suspects(cur, workspace_id, ids)
            if complete:
                seen = set(batch)
                if seen_ids_for_deletion is not None:
                    seen.update(seen_ids_for_deletion)
                gone = [
                    exp_id
                    for exp_id, last_seen in cur.execute(
                        "SELECT experiment_id, last_seen_at FROM experiments"
                        " WHERE workspace_id = ? AND deleted = 0",
                        (workspace_id,),
                    ).fetchall()
                    # Seen at or after the listing began (e.g. by a hot sweep during a long
                    # full sweep): the listing may simply have missed it.
                    if exp_id not in seen and last_seen < cutoff
                ]
                pending += _mark_gone(cur, workspace_id, gone, observed_at, run_id)
                marked = len(gone)
            change_rows = _commit_changes(
                conn, cur, pending, workspace_id, run_id, watermark if complete else None,
                on_changes, progress,
            )  # fmt: skip
        return ApplyResult(inserted, updated, unchanged, stale, marked, change_rows)

    def mark_deleted(
        self,
        workspace_id: str,
        experiment_ids: Collection[str],
        *,
        observed_at: str,
        run_id: int,
        on_changes: OnChanges | None = None,
        progress: RunProgress | None = None,
    ) -> ApplyResult:
        """Mark experiments the caller has established are gone upstream as deleted, in one
        transaction, with a ``Deleted`` change row each (the explicit alternative to
        ``apply(complete=True)``, for sweeps that verify absentees themselves).

        Ids that are unknown, of another workspace or already deleted are left alone, and so
        is a row observed after ``observed_at`` (stale, as in :meth:`apply`). A deletion of
        a row the mirror holds is real, so its change row is never flagged baseline (as in
        :meth:`apply`).
        """
        applied, _, _ = self._delete_or_suspect(
            workspace_id, experiment_ids, observed_at, run_id, None, on_changes, progress
        )
        return applied

    def weigh_suspects(
        self,
        workspace_id: str,
        experiment_ids: Collection[str],
        *,
        observed_at: str,
        run_id: int,
        confirm_before: str,
        on_changes: OnChanges | None = None,
        progress: RunProgress | None = None,
    ) -> tuple[ApplyResult, list[str], list[str]]:
        """Experiments a sweep found gone only by an answer that cannot prove it (a look-up
        counting rows it does not return), in one transaction: those an earlier sweep
        suspected at or before ``confirm_before``, and no sweep has seen since (a sighting
        forgets the suspicion, see :meth:`apply`), are marked deleted as
        :meth:`mark_deleted` marks them; those not suspected yet become suspects of run
        ``run_id`` (``deletion_suspects``); a suspicion younger than ``confirm_before``
        stays as it is. Returns the marking's result, the ids suspected now, and those whose
        younger suspicion waits."""
        _check_time(confirm_before, "confirm_before")
        return self._delete_or_suspect(
            workspace_id, experiment_ids, observed_at, run_id, confirm_before, on_changes,
            progress,
        )  # fmt: skip

    def _delete_or_suspect(
        self,
        workspace_id: str,
        experiment_ids: Collection[str],
        observed_at: str,
        run_id: int,
        confirm_before: str | None,
        on_changes: OnChanges | None,
        progress: RunProgress | None,
    ) -> tuple[ApplyResult, list[str], list[str]]:
        """:meth:`mark_deleted` (``confirm_before`` None: every live one is gone) and
        :meth:`weigh_suspects`, in one transaction: the marking's result, the ids suspected
        now and those whose younger suspicion waits."""
        _check_time(observed_at, "observed_at")
        ids = list(dict.fromkeys(experiment_ids))
        with self._write("mark experiments deleted") as conn:
            _check_run(conn, run_id, workspace_id)
            cur = conn.cursor()
            cur.row_factory = None
            rows = _deletion_rows(cur, workspace_id, ids)
            gone: list[str] = []
            suspected: list[str] = []
            waiting: list[str] = []
            stale = unchanged = 0
            for exp_id in ids:  # in the caller's order, so change ids follow it
                if exp_id not in rows:
                    continue
                deleted, last_seen, last_changed, suspected_by, suspected_at = rows[exp_id]
                if observed_at < max(last_seen, last_changed):
                    stale += 1
                elif deleted:
                    unchanged += 1
                elif confirm_before is None:
                    gone.append(exp_id)
                elif suspected_by is None:
                    suspected.append(exp_id)
                elif suspected_by < run_id and suspected_at <= confirm_before:
                    gone.append(exp_id)
                else:
                    waiting.append(exp_id)
            cur.executemany(
                "INSERT INTO deletion_suspects"
                " (experiment_id, workspace_id, sync_run_id, suspected_at) VALUES (?, ?, ?, ?)",
                [(exp_id, workspace_id, run_id, observed_at) for exp_id in suspected],
            )
            pending = _mark_gone(cur, workspace_id, gone, observed_at, run_id)
            change_rows = _commit_changes(
                conn, cur, pending, workspace_id, run_id, None, on_changes, progress
            )
        applied = ApplyResult(
            unchanged=unchanged, stale=stale, marked_deleted=len(gone), change_rows=change_rows
        )
        return applied, suspected, waiting

    def _live_ids(self, workspace_id: str, conn: sqlite3.Connection) -> list[str]:
        """Ids of the workspace's experiments not marked deleted.

        The scan reads every row of the workspace (``deleted`` is in no index). Read
        connections map the file into memory, so on one of them it would leave the whole
        table resident in this process (a 100,000-experiment full sweep's peak RSS: ~400
        MiB instead of ~140), so it runs on the writer connection, whose page cache is
        capped, as a plain read (no write lock), when there is one.
        """
        sql = "SELECT experiment_id FROM experiments WHERE workspace_id = ? AND deleted = 0"
        if self._writer is None or self._memory:
            cur = conn.cursor()
            cur.row_factory = None
            return [r[0] for r in cur.execute(sql, (workspace_id,))]
        with (
            self._write_lock,
            self._writer.held() as writer,
            _mapped(self.path, "reading the mirror"),
        ):
            cur = writer.cursor()
            cur.row_factory = None
            return [r[0] for r in cur.execute(sql, (workspace_id,))]

    def active_experiments(
        self, workspace_id: str, *, exclude: Collection[str] = ()
    ) -> dict[str, dict[str, Any]]:
        """``{experiment_id: row}`` of the workspace's experiments not marked deleted, with the
        columns a sweep plans by: ``name``, ``creator``, ``status``, ``trial_status`` (decoded),
        ``gmt_create_time``, ``gmt_modified_time`` and ``last_seen_at``, and
        ``upstream_create_time``: ``GmtCreateTime`` as upstream last sent it (from ``raw``),
        which says whether ``gmt_create_time`` was read from a time with a zone or from a
        naive one read in ``create_time_zone``.

        ``exclude``: ids to leave out. Only the ids are read for them, so a full sweep looking
        for absentees never holds (or decodes) the whole workspace's rows at once.
        """
        select = (
            "SELECT experiment_id, name, creator, status, trial_status, gmt_create_time,"
            f" gmt_modified_time, last_seen_at, {_UPSTREAM_CREATE_TIME} FROM experiments"
            " WHERE workspace_id = ? AND deleted = 0"
        )
        with self.reader() as conn:
            if not exclude:
                rows = conn.execute(select, (workspace_id,)).fetchall()
            else:
                # The ids first (plain tuples, no decoding), then whole rows of the rest.
                wanted = [i for i in self._live_ids(workspace_id, conn) if i not in exclude]
                rows = []
                for chunk in _chunks(wanted, CHUNK_SIZE):
                    rows += conn.execute(
                        f"{select} AND experiment_id IN ({_marks(len(chunk))})",
                        (workspace_id, *chunk),
                    ).fetchall()
        return {r["experiment_id"]: decode_experiment_row(dict(r)) for r in rows}

    def non_terminal_experiments(
        self, workspace_id: str, terminal_statuses: Collection[str]
    ) -> dict[str, dict[str, Any]]:
        """Like :meth:`active_experiments`, but only the rows whose status is not terminal
        (what a hot sweep plans by: a few percent of a large workspace), each with its
        status as upstream last spelled it (``upstream_status``, from ``raw``).

        Also the rows marked deleted because upstream sends them with ``Deleted`` true
        (soft-deleted: still listed, and their status can still change, a deleted run
        being cancelled) that the workspace's latest successful sweep saw. Not those
        marked deleted because they were gone from upstream's listings, nor soft-deleted
        ones no longer seen (gone since): looking those up every sweep would find
        nothing, every time."""
        # (No terminal statuses: every row. "NOT IN (NULL)" would be NULL, i.e. none.)
        not_terminal = (
            f" AND (status IS NULL OR status NOT IN ({_marks(len(terminal_statuses))}))"
            if terminal_statuses
            else ""
        )
        with self.reader() as conn:
            last_ok = conn.execute(
                "SELECT started_at FROM sync_runs WHERE workspace_id = ? AND status = 'ok'"
                " ORDER BY id DESC LIMIT 1",
                (workspace_id,),
            ).fetchone()
            rows = conn.execute(
                "SELECT experiment_id, name, creator, status, trial_status, gmt_create_time,"
                f" gmt_modified_time, last_seen_at, deleted, {_UPSTREAM_CREATE_TIME},"
                # as upstream spelled it: a hot sweep asks for a status in its spelling
                " json_extract(raw, '$.Status') AS upstream_status,"
                " json_extract(raw, '$.Deleted') AS upstream_deleted FROM experiments"
                f" WHERE workspace_id = ? AND (deleted = 0 OR last_seen_at >= ?){not_terminal}",
                (workspace_id, last_ok[0] if last_ok else "~", *terminal_statuses),
            ).fetchall()
        out = {}
        for row in rows:
            found = dict(row)
            if found.pop("deleted") and not upstream_bool(found["upstream_deleted"]):
                continue
            del found["upstream_deleted"]
            out[found["experiment_id"]] = decode_experiment_row(found)
        return out

    def active_create_times(self, workspace_id: str) -> list[str | None]:
        """``gmt_create_time`` of the workspace's experiments not marked deleted, sorted
        (NULLs first): what :meth:`active_experiments` would say, without the rows."""
        with self.reader() as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT gmt_create_time FROM experiments"
                    " WHERE workspace_id = ? AND deleted = 0 ORDER BY gmt_create_time",
                    (workspace_id,),
                )
            ]

    # -- backup --

    def backup(self, dest_path: str | Path, *, overwrite: bool = False) -> None:
        """Write a consistent copy of the mirror to ``dest_path`` while it stays in use.

        The copy is a self-contained file (rollback journal, not WAL), written to a file of
        its own beside the destination and renamed into place (without ``overwrite``, linked
        there, which fails if a file came meanwhile), so a half-written backup is never left
        behind, not even when the destination's disk fills up, and two backups to one
        destination at once never write the same file. The copies that killed backups left
        in the destination's directory are removed first (:func:`_remove_dead_copies`).
        An error names the file it is about: the destination (its disk full), unless
        SQLite says the mirror is damaged or unreadable.
        """
        dest = Path(dest_path)
        if dest.exists() and not overwrite:
            raise BackupExistsError(f"{dest} exists; remove it or pass overwrite=True")
        if not self._memory and is_mirror_file(dest, Path(self.path)):
            # Its -wal or .lock replaced, the mirror was unreadable, or a second writer got
            # in: the lock is the flock held on that very file.
            raise StoreError(f"cannot back the mirror up onto itself or its files ({dest})")
        try:
            # Only the owner may read the copy, as the mirror (config texts may hold keys):
            # mkstemp makes it 0600 before the first byte goes in, whatever the umask.
            fd, name = tempfile.mkstemp(
                prefix=f".{dest.name}{_BACKUP_COPY_MARK}", suffix=".partial", dir=dest.parent
            )
        except OSError as e:
            raise StoreError(f"cannot write a backup in {dest.parent}: {e.strerror}") from e
        partial = Path(name)
        try:
            # Held until the copy is placed or removed: it tells this backup's copy from a
            # killed one's, for the clean-up of the next backup into this directory (a file
            # system without flock gets no clean-up: nothing there looks unheld either).
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            _remove_dead_copies(dest.parent)
            failed: sqlite3.Error | None = None
            with _mapped(str(dest), "backing the mirror up"):
                target = sqlite3.connect(partial)
            try:
                with self.reader() as source:
                    try:
                        source.backup(target)
                    except sqlite3.Error as e:  # whose it is: below
                        failed = e
                if failed is None:
                    with _mapped(str(dest), "backing the mirror up"):
                        target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
            if failed is not None:
                code = getattr(failed, "sqlite_errorname", "") or ""
                # The copy's trouble (its disk full, its directory not writable) or the
                # mirror's (damaged, unreadable)? SQLite's error does not say which file.
                mine = code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR_READ"))
                with _mapped(self.path if mine else str(dest), "backing the mirror up"):
                    raise failed
            _place(partial, dest, overwrite=overwrite)
        finally:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{partial}{suffix}").unlink(missing_ok=True)
            os.close(fd)

    # -- queries --

    def workspace_state(self, workspace_id: str) -> WorkspaceState | None:
        """The workspace's sync state, or None if it was never synced."""
        with self.reader() as conn:
            row = conn.execute(
                f"SELECT {_WORKSPACE_COLUMNS} FROM workspaces WHERE workspace_id = ?",
                (workspace_id,),
            ).fetchone()
        return WorkspaceState(*row) if row else None

    def newest_record_time(self, workspace_id: str) -> datetime | None:
        """The newest time the mirror holds of the workspace's sweeps: the start and end of
        its last runs, and its last change's observation (None: never synced). Reads a few
        rows by index, however large the mirror."""
        with self.reader(snapshot=False) as conn:
            runs = conn.execute(
                "SELECT started_at, finished_at FROM sync_runs WHERE workspace_id = ?"
                " ORDER BY id DESC LIMIT 10",
                (workspace_id,),
            ).fetchall()
            change = conn.execute(
                "SELECT observed_at FROM changes WHERE workspace_id = ? ORDER BY id DESC LIMIT 1",
                (workspace_id,),
            ).fetchone()
        texts = [t for run in runs for t in run] + list(change or ())
        return max((t for t in map(parse_time, texts) if t is not None), default=None)

    def upstream_learnt(self, workspace_id: str) -> str | None:
        """What sweeps learnt about the workspace's upstream, as they keep it (a JSON
        object, ``docs/schema.md``), or None."""
        with self.reader(snapshot=False) as conn:
            row = conn.execute(
                "SELECT upstream_learnt FROM workspaces WHERE workspace_id = ?", (workspace_id,)
            ).fetchone()
        return row[0] if row else None

    def workspaces(self) -> list[WorkspaceState]:
        """Every workspace's sync state, by id.

        Each reading thread keeps the last answer with its connection's ``PRAGMA
        data_version``, which changes whenever another connection (the writer, another
        process) commits: until then the answer cannot have changed, and the read API asks
        on every request.
        """
        with self.reader() as conn:
            version = None
            if not self._memory:  # in memory, reads share the writer: no version to go by
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                cached: tuple[int, list[WorkspaceState]] | None = getattr(
                    self._local, "workspaces", None
                )
                if cached is not None and cached[0] == version:
                    return list(cached[1])
            rows = conn.execute(
                f"SELECT {_WORKSPACE_COLUMNS} FROM workspaces ORDER BY workspace_id"
            ).fetchall()
        states = [WorkspaceState(*r) for r in rows]
        if version is not None:
            self._local.workspaces = (version, states)
        return list(states)

    def get_experiment(self, experiment_id: str) -> dict[str, Any] | None:
        """One experiment with its JSON columns decoded, or None if the mirror lacks it."""
        with self.reader() as conn:
            row = conn.execute(
                f"SELECT {_EXPERIMENT_SELECT} FROM experiments WHERE experiment_id = ?",
                (experiment_id,),
            ).fetchone()
        return decode_experiment_row(dict(row)) if row else None

    def list_experiments(
        self,
        filters: ExperimentFilter | None = None,
        sort: SortOrder = "-created",
        limit: int = 100,
        after_key: PageKey | Sequence[str | None] | None = None,
    ) -> ExperimentPage:
        """A page of experiments matching ``filters``, in ``sort`` order, after ``after_key``.

        Keyset pagination on ``(sort column, experiment_id)``: a row present for the whole walk
        is returned exactly once, whatever is inserted meanwhile (a row whose sort value
        changes between pages, e.g. under ``modified``, can move across the cursor). NULL sort
        values come first ascending and last descending, as SQLite orders them.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        column, _ = sort_column(sort)
        key: PageKey | None = None
        if after_key is not None:
            key_value, key_id = after_key[0], after_key[1]
            if key_id is None:
                raise ValueError("after_key must end with an experiment_id")
            key = (key_value, key_id)
        sql, params = page_sql(
            _EXPERIMENT_SELECT, filters or ExperimentFilter(), sort, limit + 1, key
        )
        with self.reader() as conn:
            rows = conn.execute(sql, params).fetchall()
        has_more = len(rows) > limit
        page = [decode_experiment_row(dict(r)) for r in rows[:limit]]
        last_key = (page[-1][column], page[-1]["experiment_id"]) if page else None
        return ExperimentPage(page, last_key, has_more)

    def history(
        self,
        experiment_id: str | None = None,
        since: str | None = None,
        field: str | None = None,
        workspace: str | Sequence[str] | None = None,
        after_id: int | None = None,
        limit: int | None = None,
        *,
        include_baseline: bool = True,
        newest_first: bool = False,
        offset: int = 0,
    ) -> list[ChangeRow]:
        """Change rows in ``id`` order; ``after_id`` makes it a change feed with a cursor.

        ``since`` is inclusive on ``observed_at``. ``newest_first`` reverses the order, so
        that with ``limit`` it returns the latest rows. ``workspace``: one or several.
        ``offset`` skips that many rows first: with ``newest_first`` and a small ``limit``,
        the N-th newest row is found without holding the N before it.
        """
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("experiment_id = ?", experiment_id),
            ("observed_at >= ?", _iso(since, "since")),
            ("field = ?", field),
            ("id > ?", after_id),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        ws_clause, ws_params = _workspace_clause(workspace)
        if ws_clause:
            where.append(ws_clause.removeprefix(" AND "))
            params += ws_params
        if not include_baseline:
            where.append("baseline = 0")
        sql = f"SELECT {_CHANGE_SELECT} FROM changes WHERE {' AND '.join(where) or '1'} ORDER BY id"
        if newest_first:
            sql += " DESC"
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
        with self.reader() as conn:
            return [ChangeRow.from_row(r) for r in conn.execute(sql, params)]

    def counts_by_status(
        self, workspace: str | None = None, *, include_deleted: bool = False
    ) -> dict[str | None, int]:
        """``{status: count}`` of the mirror's experiments (None: status unknown)."""
        sql, params = count_by_status_sql(
            ExperimentFilter(
                workspaces=(workspace,) if workspace else (), include_deleted=include_deleted
            )
        )
        with self.reader() as conn:
            return {status: n for status, n in conn.execute(sql, params)}

    def sync_runs(
        self,
        workspace: str | None = None,
        *,
        since: str | None = None,
        status: str | None = None,
        mode: str | None = None,
        limit: int | None = 100,
    ) -> list[SyncRun]:
        """Sweeps, newest first; ``since`` is inclusive on ``started_at``."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("workspace_id = ?", workspace),
            ("started_at >= ?", _iso(since, "since")),
            ("status = ?", status),
            ("mode = ?", mode),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = (
            f"SELECT {_SYNC_RUN_COLUMNS} FROM sync_runs WHERE {' AND '.join(where) or '1'}"
            " ORDER BY id DESC"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self.reader() as conn:
            return [SyncRun(*r) for r in conn.execute(sql, params)]

    def stats(
        self,
        since: str,
        *,
        until: str | None = None,
        workspace: str | Sequence[str] | None = None,
        terminal_statuses: Collection[str] = DEFAULT_TERMINAL_STATUSES,
        failure_statuses: Collection[str] = ("FAILED",),
    ) -> dict[str, WorkspaceStats]:
        """Per workspace: current counts by status, and over ``[since, until)`` the
        experiments that finished (reached a terminal status; each counted once, by its last
        finish in the window), how many of them failed, and their median run time.

        Run time runs from the first observation of ``RUNNING`` (else the create time) to the
        observed terminal status change (see :func:`hpo_sync.diff.finished_runs`). Finishes
        first seen by a baseline sync are not counted: we do not know when they happened.
        """
        since_iso = _iso(since, "since")
        if since_iso is None:
            raise ValueError("since is required")
        until_iso = _iso(until, "until")
        terminal = sorted(terminal_statuses)
        ws_clause, ws_params = _workspace_clause(workspace)
        window = "observed_at >= ?" + (" AND observed_at < ?" if until_iso else "")
        window_params: list[Any] = [since_iso] + ([until_iso] if until_iso else [])
        with self.reader() as conn:
            ws_ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT workspace_id FROM workspaces WHERE 1{ws_clause} ORDER BY 1", ws_params
                )
            ]
            counts: dict[str, dict[str | None, int]] = {w: {} for w in ws_ids}
            for ws, status, n in conn.execute(
                "SELECT workspace_id, status, count(*) FROM experiments"
                f" WHERE deleted = 0{ws_clause} GROUP BY workspace_id, status",
                ws_params,
            ):
                counts.setdefault(ws, {})[status] = n
            # Whole Status histories of the experiments that finished in the window: the
            # start of a run may lie before the window.
            rows = conn.execute(
                "SELECT c.experiment_id, e.workspace_id, e.gmt_create_time, c.new_value,"
                " c.observed_at, c.baseline"
                " FROM changes c JOIN experiments e ON e.experiment_id = c.experiment_id"
                " WHERE c.field = ? AND c.experiment_id IN ("
                "  SELECT experiment_id FROM changes WHERE field = ? AND baseline = 0"
                f"  AND new_value IN ({_marks(len(terminal))}) AND {window}{ws_clause})"
                " ORDER BY c.experiment_id, c.id",
                [STATUS, STATUS, *terminal, *window_params, *ws_params],
            ).fetchall()
        finishes: dict[str, list[tuple[str, float | None]]] = {w: [] for w in counts}
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j][0] == rows[i][0]:
                j += 1
            exp_ws, create_time = rows[i][1], rows[i][2]
            history = [
                {"new_value": r[3], "observed_at": r[4], "baseline": r[5]} for r in rows[i:j]
            ]
            in_window = [
                f
                for f in finished_runs(
                    history, create_time=create_time, terminal_statuses=terminal_statuses
                )
                if f.finished_at >= since_iso and (until_iso is None or f.finished_at < until_iso)
            ]
            if in_window:
                last = in_window[-1]
                finishes.setdefault(exp_ws, []).append((last.status, last.run_time_s))
            i = j
        out: dict[str, WorkspaceStats] = {}
        for ws in sorted(set(counts) | set(finishes)):
            done = finishes.get(ws, [])
            by_status: dict[str, int] = {}
            for status, _ in done:
                by_status[status] = by_status.get(status, 0) + 1
            failed = sum(n for s, n in by_status.items() if s in failure_statuses)
            run_times = [t for _, t in done if t is not None]
            out[ws] = WorkspaceStats(
                workspace_id=ws,
                counts_by_status=counts.get(ws, {}),
                finished=len(done),
                finished_by_status=dict(sorted(by_status.items())),
                failed=failed,
                failure_rate=failed / len(done) if done else None,
                median_run_time_s=statistics.median(run_times) if run_times else None,
                timed=len(run_times),
            )
        return out

    def iter_export(
        self,
        kind: Literal["experiments", "changes", "sync_runs"] = "experiments",
        *,
        workspace: str | Sequence[str] | None = None,
        decode: bool = True,
        batch_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Stream every row of ``kind`` as dicts, from one consistent snapshot.

        The generator holds its own connection (and read transaction) until exhausted or
        closed. ``decode`` parses the JSON columns of experiments.
        """
        tables = {
            "experiments": (_EXPERIMENT_SELECT, "rowid"),
            "changes": (_CHANGE_SELECT, "id"),
            "sync_runs": (_SYNC_RUN_COLUMNS, "id"),
        }
        if kind not in tables:
            raise ValueError(f"kind must be one of {', '.join(tables)}, got {kind!r}")
        columns, order = tables[kind]
        ws_clause, params = _workspace_clause(workspace)
        sql = f"SELECT {columns} FROM {kind} WHERE 1{ws_clause} ORDER BY {order}"
        if self._memory:
            # Cannot open a second connection to a private in-memory database.
            with self.reader() as conn:
                rows = conn.execute(sql, params).fetchall()
            for row in rows:
                yield _export_row(kind, row, decode)
            return
        # Mapped as a whole: a damaged page shows up only when the read reaches it.
        with _mapped(self.path, f"exporting {kind}"):
            conn = self._connect_reader()
            try:
                conn.execute("BEGIN")
                cur = conn.execute(sql, params)
                while batch := cur.fetchmany(batch_size):
                    for row in batch:
                        yield _export_row(kind, row, decode)
            finally:
                conn.close()


def _export_row(kind: str, row: sqlite3.Row, decode: bool) -> dict[str, Any]:
    out = dict(row)
    if kind == "experiments" and decode:
        return decode_experiment_row(out)
    if kind == "changes":
        out["baseline"] = bool(out["baseline"])
    return out


# --- helpers that run inside a transaction -------------------------------------------------


#: ``GmtCreateTime`` as upstream last sent it: ISO with a zone, or naive (see
#: :meth:`Store.active_experiments`).
_UPSTREAM_CREATE_TIME = "json_extract(raw, '$.GmtCreateTime') AS upstream_create_time"


def _deletion_rows(
    cur: sqlite3.Cursor, workspace_id: str, ids: Sequence[str]
) -> dict[str, tuple[Any, ...]]:
    """What deciding on a deletion reads of the workspace's ``ids``: ``{id: (deleted,
    last_seen_at, last_changed_at, suspecting sync_run_id, suspected_at)}``, the last two
    None for an experiment not suspected (``deletion_suspects``)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for chunk in _chunks(ids, CHUNK_SIZE):
        cur.execute(
            "SELECT e.experiment_id, e.deleted, e.last_seen_at, e.last_changed_at,"
            " s.sync_run_id, s.suspected_at"
            " FROM experiments e LEFT JOIN deletion_suspects s"
            " ON s.experiment_id = e.experiment_id WHERE e.workspace_id = ?"
            f" AND e.experiment_id IN ({_marks(len(chunk))})",
            [workspace_id, *chunk],
        )
        rows.update((r[0], r[1:]) for r in cur)
    return rows


def _mark_gone(
    cur: sqlite3.Cursor,
    workspace_id: str,
    gone: list[str],
    observed_at: str,
    run_id: int,
) -> list[tuple[Any, ...]]:
    """Set ``deleted = 1`` on ``gone``; return their pending ``Deleted`` change rows (never
    baseline: the mirror held these rows, so their deletion is news)."""
    cur.executemany(
        "UPDATE experiments SET deleted = 1, last_changed_at = ? WHERE experiment_id = ?",
        [(observed_at, exp_id) for exp_id in gone],
    )
    _clear_suspects(cur, workspace_id, gone)
    old, new = encode_deleted(False), encode_deleted(True)
    return [(exp_id, workspace_id, DELETED, old, new, observed_at, run_id, 0) for exp_id in gone]


def _clear_suspects(cur: sqlite3.Cursor, workspace_id: str, ids: Sequence[str]) -> None:
    """Forget the deletion suspicions of ``ids`` (seen, or marked deleted): one indexed
    look-up when the workspace has none, as it almost always has."""
    if (
        not ids
        or not cur.execute(
            "SELECT 1 FROM deletion_suspects WHERE workspace_id = ? LIMIT 1", (workspace_id,)
        ).fetchone()
    ):
        return
    for chunk in _chunks(ids, CHUNK_SIZE):
        cur.execute(
            f"DELETE FROM deletion_suspects WHERE experiment_id IN ({_marks(len(chunk))})", chunk
        )


def _check_readable(conn: sqlite3.Connection, where: str, *, any_version: bool = False) -> None:
    """A read-only connection's mirror must have this code's schema: a read-only open
    cannot migrate an older one (:func:`check_version` refuses a newer one). With
    ``any_version``, for a copy of the file, a mirror of any version will do."""
    version = check_mirror(conn, where) if any_version else check_version(conn, where)
    if version == 0:  # an empty file, or an empty database: nothing was ever synced into it
        raise StoreError(f"{where} holds no mirror yet — run `hpo-sync sync` first")
    if version < SCHEMA_VERSION and not any_version:
        raise StoreError(
            f"{where} has schema version {version}, this hpo-sync needs {SCHEMA_VERSION}; "
            "open it read-write once (e.g. `hpo-sync sync`) to upgrade it in place"
        )


def _raise_watermark(conn: sqlite3.Connection, workspace_id: str, now: str) -> None:
    """Set the workspace's create watermark to the newest create time in the mirror, but
    never past ``now`` (the end of the sweep, by this machine's clock).

    Past it, one experiment with a create time in the future (a clock upstream off by a
    day, naive times read in the wrong zone) took the watermark there, and every hot sweep
    asked for what was created after that: nothing new was found until the next full
    sweep. Unlike the forward-only move of :func:`_set_watermark`, this one may also go
    back: create times rewritten by a full sweep (``create_time_zone`` corrected) take a
    watermark that was ahead of them back with them. A lower watermark only widens the
    next listing of what is new."""
    newest = conn.execute(
        "SELECT max(gmt_create_time) FROM experiments WHERE workspace_id = ?", (workspace_id,)
    ).fetchone()[0]
    if newest is not None:
        conn.execute(
            "UPDATE workspaces SET create_watermark = ? WHERE workspace_id = ?",
            (min(newest, now), workspace_id),
        )


def _set_watermark(conn: sqlite3.Connection, workspace_id: str, value: str | None) -> None:
    """Move the workspace's create watermark forward to ``value`` (never back)."""
    if value is not None:
        conn.execute(
            "UPDATE workspaces SET create_watermark = ? WHERE workspace_id = ?"
            " AND (create_watermark IS NULL OR create_watermark < ?)",
            (value, workspace_id, value),
        )


def _commit_changes(
    conn: sqlite3.Connection,
    cur: sqlite3.Cursor,
    pending: list[tuple[Any, ...]],
    workspace_id: str,
    run_id: int,
    watermark: str | None,
    on_changes: OnChanges | None,
    progress: RunProgress | None = None,
) -> list[ChangeRow]:
    """The common tail of a write: change rows, the run's counters, the workspace's create
    watermark, then the outbox hook — all still inside the caller's transaction."""
    change_rows = _insert_changes(cur, pending)
    if progress is not None:
        # (never lowered: batches of a full sweep may commit out of the order they were made)
        conn.execute(
            "UPDATE sync_runs SET changes = changes + ?, api_calls = max(api_calls, ?),"
            " pages = max(pages, ?), experiments_seen = max(experiments_seen, ?) WHERE id = ?",
            (len(change_rows), *progress, run_id),
        )
    elif change_rows:
        conn.execute(
            "UPDATE sync_runs SET changes = changes + ? WHERE id = ?", (len(change_rows), run_id)
        )
    _set_watermark(conn, workspace_id, watermark)
    if on_changes is not None and change_rows:
        on_changes(conn, change_rows)
    return change_rows


def _insert_changes(cur: sqlite3.Cursor, pending: list[tuple[Any, ...]]) -> list[ChangeRow]:
    """Append change rows (in order) and return them with their ids."""
    if not pending:
        return []
    before = cur.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]
    _insert_rows(cur, _INSERT_CHANGE, pending)
    after = cur.execute("SELECT max(id) FROM changes").fetchone()[0]
    if after - before == len(pending):
        # n new distinct ids in (before, before + n]: exactly those, in insertion order. Saves
        # reading 100,000 rows back after a baseline.
        new = tuple.__new__  # what ChangeRow._make does, without its per-call overhead
        return [
            new(ChangeRow, (i, e, w, f, o, n, t, r, b == 1))
            for i, (e, w, f, o, n, t, r, b) in enumerate(pending, before + 1)
        ]
    # AUTOINCREMENT skipped ids (its counter ran ahead of max(id)): read them back.
    return [
        ChangeRow.from_row(r)
        for r in cur.execute(
            f"SELECT {_CHANGE_SELECT} FROM changes WHERE id > ? ORDER BY id", (before,)
        )
    ]


def _finish_run(
    conn: sqlite3.Connection,
    run_id: int,
    finished_at: str,
    status: str,
    api_calls: int,
    pages: int,
    experiments_seen: int,
    changes: int | None,
    error: str | None,
) -> None:
    if status not in ("ok", "failed", "partial"):
        raise ValueError(f"status must be 'ok', 'failed' or 'partial', got {status!r}")
    _check_time(finished_at, "finished_at", _RUN_TIME_RE)
    cur = conn.execute(
        "UPDATE sync_runs SET finished_at = ?, status = ?, api_calls = ?, pages = ?,"
        " experiments_seen = ?, changes = coalesce(?, changes), error = ?"
        " WHERE id = ?",
        (finished_at, status, api_calls, pages, experiments_seen, changes, error, run_id),
    )
    if cur.rowcount != 1:
        raise StoreError(f"no sync run with id {run_id}")


def _mark_baseline(conn: sqlite3.Connection, workspace_id: str, at: str) -> None:
    _check_time(at, "at", _RUN_TIME_RE)
    _ensure_workspace(conn, workspace_id)
    conn.execute(
        "UPDATE workspaces SET baseline_at = ? WHERE workspace_id = ? AND baseline_at IS NULL",
        (at, workspace_id),
    )


def _record_success(conn: sqlite3.Connection, workspace_id: str, mode: str, at: str) -> None:
    column = {"full": "last_full_ok_at", "hot": "last_hot_ok_at"}.get(mode)
    if column is None:
        raise ValueError(f"mode must be 'full' or 'hot', got {mode!r}")
    _check_time(at, "at", _RUN_TIME_RE)
    _ensure_workspace(conn, workspace_id)
    conn.execute(f"UPDATE workspaces SET {column} = ? WHERE workspace_id = ?", (at, workspace_id))


def _set_workspace_error(
    conn: sqlite3.Connection, workspace_id: str, error: str | None, at: str
) -> None:
    _check_time(at, "at", _RUN_TIME_RE)
    _ensure_workspace(conn, workspace_id)
    conn.execute(
        "UPDATE workspaces SET last_error = ?, last_error_at = ? WHERE workspace_id = ?",
        (error or "unknown error", at, workspace_id),
    )


def _ensure_workspace(conn: sqlite3.Connection, workspace_id: str) -> None:
    if not workspace_id:
        raise StoreError("workspace_id must not be empty")
    conn.execute("INSERT OR IGNORE INTO workspaces (workspace_id) VALUES (?)", (workspace_id,))


def _check_run(conn: sqlite3.Connection, run_id: int, workspace_id: str) -> None:
    row = conn.execute("SELECT workspace_id FROM sync_runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise StoreError(f"no sync run with id {run_id}; call begin_run() first")
    if row[0] != workspace_id:
        raise StoreError(f"sync run {run_id} belongs to workspace {row[0]}, not {workspace_id}")


def _lagging(modified: str | None, stored: str | None, absent: Collection[str]) -> bool:
    """Whether a record is an older copy of the stored one: its GmtModifiedTime is earlier,
    by less than :data:`LAG_WINDOW_S`. A replica or a cache behind upstream's gateway that
    answered with the record from before a change wrote that change backwards (FINISHED →
    RUNNING) and forwards again at the next sweep, two rows that never happened, and
    alerts. An equal time is no older (some upstreams do not move it on a status change);
    a gap of half an hour or more is taken as a time read in another zone (a naive time
    in one answer, an ISO one in the next, with the wrong ``create_time_zone``), not as an
    old copy: skipping those would freeze the row for hours."""
    if not modified or not stored or "gmt_modified_time" in absent or modified >= stored:
        return False
    new, old = parse_time(modified), parse_time(stored)
    return new is not None and old is not None and (old - new).total_seconds() < LAG_WINDOW_S


def _dedupe(workspace_id: str, experiments: Sequence[Experiment]) -> dict[str, Experiment]:
    """Validate the batch and keep one observation per id.

    Paging can return an experiment twice; the copy with the later ``gmt_modified_time``
    (on a tie, the later one in the batch) is the newer observation.
    """
    out: dict[str, Experiment] = {}
    for exp in experiments:
        if exp.workspace_id is not None and exp.workspace_id != workspace_id:
            raise StoreError(
                f"experiment {exp.experiment_id} belongs to workspace {exp.workspace_id}, "
                f"not {workspace_id}: apply each workspace's experiments separately"
            )
        prev = out.get(exp.experiment_id)
        if prev is None or (exp.gmt_modified_time or "") >= (prev.gmt_modified_time or ""):
            out[exp.experiment_id] = exp
    return out


# --- the read queries of experiments (public: the read API builds its pages with them) -------


def sort_column(sort: str) -> tuple[str, bool]:
    """``(column, descending)`` of a sort order (:data:`SortOrder`); ValueError otherwise."""
    try:
        return _SORTS[sort]
    except KeyError:
        raise ValueError(f"sort must be one of {', '.join(_SORTS)}, got {sort!r}") from None


def filter_sql(f: ExperimentFilter) -> tuple[list[str], list[Any]]:
    """The WHERE conditions (to be joined with AND; none: every row) and their parameters
    that select the experiments ``f`` matches. ValueError for a time it cannot read."""
    where: list[str] = []
    params: list[Any] = []
    if f.workspaces:
        where.append(f"workspace_id IN ({_marks(len(f.workspaces))})")
        params.extend(f.workspaces)
    if f.statuses:
        where.append(f"status IN ({_marks(len(f.statuses))})")
        params.extend(s.upper() for s in f.statuses)
    if f.name:
        # Substring, case-insensitive (ASCII) and literal: % and _ in the input are escaped.
        escaped = f.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("name LIKE ? ESCAPE '\\'")
        params.append(f"%{escaped}%")
    if f.creator is not None:
        where.append("creator = ?")
        params.append(f.creator)
    for key, value in f.tags:
        clause, tag_params = tag_condition(key, value, as_text=f.tags_as_text)
        where.append(clause)
        params.extend(tag_params)
    for clause, value, name in (
        ("gmt_create_time >= ?", f.created_after, "created_after"),
        ("gmt_create_time < ?", f.created_before, "created_before"),
        ("gmt_modified_time >= ?", f.modified_after, "modified_after"),
    ):
        if value is not None:
            where.append(clause)
            params.append(_iso(value, name))
    if not f.include_deleted:
        where.append("deleted = 0")
    return where, params


def tag_condition(key: str, value: str | None, *, as_text: bool = False) -> tuple[str, list[Any]]:
    """SQL (and its parameters) matching experiments carrying tag ``key`` (with ``value``,
    unless None) in their JSON ``tags`` column; ``as_text``: a tag whose ``Key:Value``
    reads ``key:value`` (see :class:`ExperimentFilter`), or whose key is the whole of it
    (any value): ``acs:rm:rgId`` asks for that key, which holds colons itself."""
    if value is not None and as_text:
        tag_where = (
            "(json_extract(t.value, '$.Key') || ':' || json_extract(t.value, '$.Value') = ?"
            " OR json_extract(t.value, '$.Key') = ?)"
        )
        params: list[Any] = [f"{key}:{value}"] * 2
        return f"EXISTS (SELECT 1 FROM json_each(experiments.tags) AS t WHERE {tag_where})", params
    tag_where = "json_extract(t.value, '$.Key') = ?"
    params = [key]
    if value is not None:
        tag_where += " AND json_extract(t.value, '$.Value') = ?"
        params.append(value)
    return f"EXISTS (SELECT 1 FROM json_each(experiments.tags) AS t WHERE {tag_where})", params


def page_sql(
    select: str,
    filters: ExperimentFilter,
    sort: str,
    limit: int,
    after_key: PageKey | None = None,
) -> tuple[str, list[Any]]:
    """``(sql, params)`` of a keyset page: ``SELECT {select} FROM experiments`` where
    ``filters`` match and the row sorts strictly after ``after_key``, in ``sort`` order (ties
    by ``experiment_id``), at most ``limit`` rows. :meth:`Store.list_experiments` and the read
    API both page with it, each with the columns (or expressions) it needs."""
    column, desc = sort_column(sort)
    where, params = filter_sql(filters)
    if after_key is not None:
        clause, key_params = keyset_sql(column, desc, after_key[0], after_key[1])
        where.append(clause)
        params.extend(key_params)
    direction = "DESC" if desc else "ASC"
    sql = (
        f"SELECT {select} FROM experiments WHERE {' AND '.join(where) or '1'}"
        f" ORDER BY {column} {direction}, experiment_id {direction} LIMIT ?"
    )
    return sql, [*params, limit]


def status_counts(
    conn: sqlite3.Connection, workspaces: Sequence[str] = ()
) -> list[tuple[str, str | None, int, int]]:
    """``(workspace, status, live, deleted)`` for every workspace and status in the mirror
    (only ``workspaces``, when given): how many experiments are not marked deleted and how
    many are. Read from two indexes, never the table (``deleted`` is in no other index):
    every row from ``experiments_workspace_status_created``, the deleted ones from the
    partial ``experiments_deleted``."""
    where, params = "1", list(workspaces)
    if workspaces:
        where = f"workspace_id IN ({', '.join('?' * len(workspaces))})"
    group = " GROUP BY workspace_id, status"
    gone = {
        (ws, st): n
        for ws, st, n in conn.execute(
            f"SELECT workspace_id, status, count(*) FROM experiments"
            f" WHERE deleted = 1 AND {where}{group}",
            params,
        )
    }
    out = []
    for ws, st, n in conn.execute(
        f"SELECT workspace_id, status, count(*) FROM experiments WHERE {where}{group}", params
    ):
        dead = gone.get((ws, st), 0)
        out.append((ws, st, n - dead, dead))
    return out


def count_by_status_sql(filters: ExperimentFilter) -> tuple[str, list[Any]]:
    """``(sql, params)`` counting what ``filters`` match by status: rows of
    ``(status, count)`` in status order, over the very WHERE clause a page uses."""
    where, params = filter_sql(filters)
    sql = (
        f"SELECT status, count(*) FROM experiments WHERE {' AND '.join(where) or '1'}"
        " GROUP BY status ORDER BY status"
    )
    return sql, params


def keyset_sql(column: str, desc: bool, value: str | None, exp_id: str) -> tuple[str, list[Any]]:
    """The rows strictly after ``(value, exp_id)`` in ``ORDER BY column, experiment_id``.

    SQLite sorts NULL first ascending and last descending; row-value comparisons are NULL
    (false) when the column is NULL, hence the explicit NULL branches.
    """
    if not desc:
        if value is None:
            return f"(({column} IS NULL AND experiment_id > ?) OR {column} IS NOT NULL)", [exp_id]
        return f"({column}, experiment_id) > (?, ?)", [value, exp_id]
    if value is None:
        return f"({column} IS NULL AND experiment_id < ?)", [exp_id]
    return f"(({column}, experiment_id) < (?, ?) OR {column} IS NULL)", [value, exp_id]
