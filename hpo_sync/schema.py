"""The mirror's SQLite schema: forward migrations, column lists and column encodings.

The schema is a public interface (people query the file directly; see ``docs/schema.md``), so
it changes only by appending a migration to :data:`MIGRATIONS`, never by editing one. Each
migration is plain SQL rather than sqlite-utils calls: a migration must produce the same
schema forever, whatever version of sqlite-utils is installed, and sqlite-utils cannot express
``AUTOINCREMENT``, ``CHECK`` constraints or triggers.

The version lives in ``PRAGMA user_version`` and the file is tagged with
``PRAGMA application_id`` so that hpo-sync never "migrates" somebody else's database.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from hpo_sync.errors import SchemaTooNewError, StoreError
from hpo_sync.normalise import Experiment, normalise_tags

#: ``PRAGMA application_id`` of every hpo-sync mirror: ASCII "HPOS".
APPLICATION_ID = 0x48504F53

#: Every column of ``experiments``, in table order.
EXPERIMENT_COLUMNS: tuple[str, ...] = (
    "experiment_id",
    "workspace_id",
    "name",
    "creator",
    "status",
    "job_type",
    "accessibility",
    "description",
    "trial_count",
    "trial_status",
    "tags",
    "search_space",
    "config_ini",
    "config_yml",
    "gmt_create_time",
    "gmt_modified_time",
    "deleted",
    "first_seen_at",
    "last_seen_at",
    "last_changed_at",
    "raw",
)

#: Columns whose change moves ``last_changed_at``: everything upstream tells us, normalised.
TRACKED_CONTENT_COLUMNS: tuple[str, ...] = tuple(
    c
    for c in EXPERIMENT_COLUMNS
    if c not in ("experiment_id", "first_seen_at", "last_seen_at", "last_changed_at", "raw")
)

#: Columns rewritten when an experiment is seen with different content (``raw`` included:
#: it is "the last upstream object", even when only its representation drifted).
CONTENT_COLUMNS: tuple[str, ...] = (*TRACKED_CONTENT_COLUMNS, "raw")

CHANGE_COLUMNS: tuple[str, ...] = (
    "id",
    "experiment_id",
    "workspace_id",
    "field",
    "old_value",
    "new_value",
    "observed_at",
    "sync_run_id",
    "baseline",
)


# --- column encodings (pure) -----------------------------------------------------------


# The stored JSON is the json module's compact output (ensure_ascii=False, default=str); the
# canonical form also sorts keys. Built once: json.dumps() with non-default options constructs
# a new encoder per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_CANONICAL = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str
)
# orjson writes the same bytes several times faster for plain values (see _plain); it is
# most of the JSON cost of applying 100,000 experiments.
_MAX_PLAIN_NODES = 10_000
_SCALAR_TYPES = frozenset((str, int, bool, type(None)))


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only dicts, lists, str, int, bool and None, all of exactly
    those types: then orjson's output equals the json module's, byte for byte (a dict key
    that is not a str makes orjson raise, and _encode falls back to json).

    Floats are not plain: orjson writes ``1e-05`` as ``0.00001`` and ``1e-07`` as ``1e-7``.
    Subclasses (enums, ...) and other types go through ``default=str`` in the json module only.
    """
    scalars = _SCALAR_TYPES
    stack = [value]
    nodes = 0
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            nodes += len(item)
            if nodes > _MAX_PLAIN_NODES:  # huge, or a reference cycle: leave it to json
                return False
            for child in item.values():
                if type(child) not in scalars:
                    stack.append(child)
        elif kind is list:
            nodes += len(item)
            if nodes > _MAX_PLAIN_NODES:
                return False
            stack.extend(item)
        elif kind not in scalars:
            return False
    return True


def _encode(value: Any, option: int, fallback: json.JSONEncoder) -> str:
    if _plain(value):
        try:
            return orjson.dumps(value, option=option).decode()
        except TypeError:  # an integer beyond 64 bits, a lone surrogate: json copes
            pass
    return fallback.encode(value)


def encode_trial_status(trial_status: Mapping[str, int]) -> str:
    """``{trial-status: count}`` as compact JSON with sorted keys and zero counts dropped."""
    counts = {str(k): int(v) for k, v in trial_status.items() if v}
    try:
        return orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode()  # plain, see _plain
    except TypeError:  # a count beyond 64 bits, a lone surrogate in a key
        return _CANONICAL.encode(counts)


def decode_trial_status(value: str | Mapping[str, Any] | None) -> dict[str, int]:
    """The inverse of :func:`encode_trial_status`; tolerant of hand-edited or NULL values."""
    if value is None or value == "":
        return {}
    data: Any = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        return {}
    out: dict[str, int] = {}
    for k, v in sorted(data.items()):
        try:
            n = int(v)
        except (TypeError, ValueError, OverflowError):
            continue  # a hand-edited count that is no number
        if n:
            out[str(k)] = n
    return out


def encode_deleted(deleted: bool) -> str:
    """``Deleted`` change values are the JSON literals ``"true"`` / ``"false"``."""
    return "true" if deleted else "false"


def encode_json(value: Any) -> str:
    """Compact JSON for the ``tags`` column (upstream order kept)."""
    return _encode(value, 0, _COMPACT)


def encode_raw(raw: Mapping[str, Any]) -> str:
    """The raw upstream object as canonical JSON (sorted keys), so equal objects compare equal."""
    return _encode(raw, orjson.OPT_SORT_KEYS, _CANONICAL)


def experiment_values(exp: Experiment, workspace_id: str) -> tuple[Any, ...]:
    """The ``CONTENT_COLUMNS`` of ``exp``, in that order, exactly as they are stored.

    ``workspace_id`` fills in an experiment whose upstream object did not name its workspace.
    A tuple, so that the store can compare it with a stored row in one step.
    """
    return (
        exp.workspace_id or workspace_id,
        exp.name,
        exp.creator,
        exp.status,
        exp.job_type,
        exp.accessibility,
        exp.description,
        exp.trial_count,
        encode_trial_status(exp.trial_status),
        encode_json(exp.tags),
        exp.search_space,
        exp.config_ini,
        exp.config_yml,
        exp.gmt_create_time,
        exp.gmt_modified_time,
        1 if exp.deleted else 0,
        encode_raw(exp.raw),
    )


def experiment_content(exp: Experiment, workspace_id: str) -> dict[str, Any]:
    """:func:`experiment_values` as a ``{column: value}`` dict."""
    return dict(zip(CONTENT_COLUMNS, experiment_values(exp, workspace_id), strict=True))


def decode_experiment_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored ``experiments`` row with JSON columns parsed and ``deleted`` as a bool.

    Idempotent: columns that are already decoded are left as they are."""
    out = dict(row)
    if isinstance(out.get("trial_status"), str | None) and "trial_status" in out:
        out["trial_status"] = decode_trial_status(out["trial_status"])
    if isinstance(out.get("tags"), str | None) and "tags" in out:
        # as upstream's tags are read: a hand-edited value of another shape ([1, 2], an
        # object) is made a list of {Key, Value} rather than failing whoever reads it
        out["tags"] = normalise_tags(json.loads(out["tags"])) if out["tags"] else []
    if isinstance(out.get("raw"), str | None) and "raw" in out:
        out["raw"] = json.loads(out["raw"]) if out["raw"] else {}
    if "deleted" in out:
        out["deleted"] = bool(out["deleted"])
    return out


def row_to_experiment(row: Mapping[str, Any]) -> Experiment:
    """Rebuild the :class:`Experiment` a stored row holds (e.g. to serve the upstream shape)."""
    d = decode_experiment_row(row)
    return Experiment(
        experiment_id=d["experiment_id"],
        workspace_id=d["workspace_id"],
        name=d["name"],
        creator=d["creator"],
        status=d["status"],
        job_type=d["job_type"],
        accessibility=d["accessibility"],
        description=d["description"],
        trial_count=d["trial_count"],
        trial_status=d["trial_status"],
        tags=d["tags"],
        search_space=d["search_space"],
        config_ini=d["config_ini"],
        config_yml=d["config_yml"],
        gmt_create_time=d["gmt_create_time"],
        gmt_modified_time=d["gmt_modified_time"],
        deleted=d["deleted"],
        raw=d["raw"],
    )


# --- migrations ---------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _run(conn: sqlite3.Connection, statements: list[str]) -> None:
    # Not executescript(): it COMMITs first, which would split a migration from the
    # user_version bump that records it.
    for sql in statements:
        conn.execute(sql)


#: The columns of ``experiments`` as version 1 made them. Frozen, like the migrations: version
#: 4 makes the table again with these and ``api_json``.
_EXPERIMENTS_V1_COLUMNS = """
                experiment_id     TEXT PRIMARY KEY NOT NULL,
                workspace_id      TEXT NOT NULL REFERENCES workspaces (workspace_id),
                name              TEXT,
                creator           TEXT,
                status            TEXT,
                job_type          TEXT,
                accessibility     TEXT,
                description       TEXT,
                trial_count       INTEGER,
                trial_status      TEXT NOT NULL DEFAULT '{}',
                tags              TEXT NOT NULL DEFAULT '[]',
                search_space      TEXT,
                config_ini        TEXT,
                config_yml        TEXT,
                gmt_create_time   TEXT,
                gmt_modified_time TEXT,
                deleted           INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1)),
                first_seen_at     TEXT NOT NULL,
                last_seen_at      TEXT NOT NULL,
                last_changed_at   TEXT NOT NULL,
                raw               TEXT NOT NULL DEFAULT '{}'"""


def _m1_core(conn: sqlite3.Connection) -> None:
    """Version 1: workspaces, experiments, changes, sync_runs."""
    _run(
        conn,
        [
            """
            CREATE TABLE workspaces (
                workspace_id     TEXT PRIMARY KEY NOT NULL,
                label            TEXT,
                baseline_at      TEXT,
                last_full_ok_at  TEXT,
                last_hot_ok_at   TEXT,
                last_error       TEXT,
                last_error_at    TEXT,
                create_watermark TEXT
            )""",
            f"""
            CREATE TABLE experiments ({_EXPERIMENTS_V1_COLUMNS}
            )""",
            # experiment_id is appended to every sort index: it is the keyset tie-breaker,
            # and a rowid table's indexes do not carry the (text) primary key implicitly.
            "CREATE INDEX experiments_workspace_status_created"
            " ON experiments (workspace_id, status, gmt_create_time, experiment_id)",
            "CREATE INDEX experiments_workspace_created"
            " ON experiments (workspace_id, gmt_create_time, experiment_id)",
            "CREATE INDEX experiments_created ON experiments (gmt_create_time, experiment_id)",
            "CREATE INDEX experiments_modified ON experiments (gmt_modified_time, experiment_id)",
            "CREATE INDEX experiments_name ON experiments (name, experiment_id)",
            """
            CREATE TABLE sync_runs (
                id               INTEGER PRIMARY KEY AUTOINCREMENT,
                workspace_id     TEXT NOT NULL REFERENCES workspaces (workspace_id),
                mode             TEXT NOT NULL,
                started_at       TEXT NOT NULL,
                finished_at      TEXT,
                status           TEXT NOT NULL DEFAULT 'running',
                api_calls        INTEGER NOT NULL DEFAULT 0,
                pages            INTEGER NOT NULL DEFAULT 0,
                experiments_seen INTEGER NOT NULL DEFAULT 0,
                changes          INTEGER NOT NULL DEFAULT 0,
                error            TEXT
            )""",
            "CREATE INDEX sync_runs_workspace ON sync_runs (workspace_id, id)",
            "CREATE INDEX sync_runs_started ON sync_runs (started_at)",
            # sync_run_id is deliberately not a foreign key: old sync_runs rows may be pruned
            # one day, while history must stay.
            """
            CREATE TABLE changes (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                experiment_id TEXT NOT NULL REFERENCES experiments (experiment_id),
                workspace_id  TEXT NOT NULL,
                field         TEXT NOT NULL,
                old_value     TEXT,
                new_value     TEXT,
                observed_at   TEXT NOT NULL,
                sync_run_id   INTEGER,
                baseline      INTEGER NOT NULL DEFAULT 0 CHECK (baseline IN (0, 1))
            )""",
            "CREATE INDEX changes_experiment ON changes (experiment_id, id)",
            "CREATE INDEX changes_workspace ON changes (workspace_id, id)",
            "CREATE INDEX changes_observed ON changes (observed_at)",
            # History is append-only, for people writing SQL by hand too.
            """
            CREATE TRIGGER changes_no_update BEFORE UPDATE ON changes
            BEGIN SELECT RAISE(ABORT, 'changes is append-only'); END""",
            """
            CREATE TRIGGER changes_no_delete BEFORE DELETE ON changes
            BEGIN SELECT RAISE(ABORT, 'changes is append-only'); END""",
            f"PRAGMA application_id = {APPLICATION_ID}",
        ],
    )


def _m2_alert_outbox(conn: sqlite3.Connection) -> None:
    """Version 2: the alert outbox, written in the same transaction as the change rows."""
    _run(
        conn,
        [
            """
            CREATE TABLE alert_outbox (
                id              INTEGER PRIMARY KEY AUTOINCREMENT,
                change_id       INTEGER NOT NULL REFERENCES changes (id),
                target          TEXT NOT NULL,
                rule            TEXT NOT NULL,
                status          TEXT NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'sent', 'dead')),
                attempts        INTEGER NOT NULL DEFAULT 0,
                next_attempt_at TEXT,
                created_at      TEXT NOT NULL,
                sent_at         TEXT,
                last_error      TEXT,
                -- one delivery per (change, target, rule), however often a sweep is replayed
                UNIQUE (change_id, target, rule)
            )""",
            "CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at)"
            " WHERE status = 'pending'",
            "CREATE INDEX alert_outbox_target ON alert_outbox (target, status, id)",
        ],
    )


def _m3_deleted_index(conn: sqlite3.Connection) -> None:
    """Version 3: a partial index of the experiments marked deleted (few), so that counts
    that leave them out read two indexes instead of every row (``deleted`` is in no other
    index): ``/v1/workspaces`` on a 100,000-experiment mirror went from a table scan to two
    index reads."""
    _run(
        conn,
        [
            "CREATE INDEX experiments_deleted ON experiments (workspace_id, status)"
            " WHERE deleted = 1",
        ],
    )


def _m4_api_json(conn: sqlite3.Connection) -> None:
    """Version 4: ``experiments.api_json``, the experiment as the read API shows it (config
    texts and ``raw`` left out), a stored generated column: SQLite writes it with the row,
    so a page of the API is the rows' stored JSON joined, not 50 objects built per request
    (~60 µs instead of ~200 µs for 50 rows of a 100,000-experiment mirror; bench/README.md).

    A stored generated column cannot be added to a table, so the table is rebuilt (SQLite's
    12-step procedure: :func:`migrate` turns foreign keys off around it, and the keys are
    checked before the commit) and its indexes made again from their stored SQL."""
    shown = (
        "experiment_id", "workspace_id", "name", "creator", "status", "job_type",
        "accessibility", "description", "trial_count", "trial_status", "tags",
        "gmt_create_time", "gmt_modified_time", "deleted", "first_seen_at", "last_seen_at",
        "last_changed_at",
    )  # fmt: skip
    as_json = {
        "trial_status": "json(coalesce(nullif(trial_status, ''), '{}'))",
        "tags": "json(coalesce(nullif(tags, ''), '[]'))",
        "deleted": "json(CASE WHEN deleted THEN 'true' ELSE 'false' END)",
    }
    members = ", ".join(f"'{c}', {as_json.get(c, c)}" for c in shown)
    # Every column the table has (version 1's), copied across by name.
    columns = ", ".join(
        name for (name,) in conn.execute("SELECT name FROM pragma_table_info('experiments')")
    )
    indexes = [
        sql
        for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'experiments'"
            " AND sql IS NOT NULL ORDER BY name"
        )
    ]
    _run(
        conn,
        [
            f"""
            CREATE TABLE experiments_v4 ({_EXPERIMENTS_V1_COLUMNS},
                api_json          TEXT GENERATED ALWAYS AS (json_object({members})) STORED
            )""",
            f"INSERT INTO experiments_v4 ({columns}) SELECT {columns} FROM experiments",
            "DROP TABLE experiments",
            "ALTER TABLE experiments_v4 RENAME TO experiments",
            # The indexes the table had (versions 1 and 3 made them), as they were.
            *indexes,
        ],
    )
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StoreError(f"rebuilding experiments broke {len(broken)} foreign keys: {broken[:3]}")


def _m5_alert_message_id(conn: sqlite3.Connection) -> None:
    """Version 5: ``alert_outbox.message_id``, the message a row was first sent in (NULL until
    the worker forms it). A retry sends the same rows again under the same id, so a receiver
    that deduplicates by ``webhook-id`` can tell a redelivery; the index finds a message's
    rows and keeps new ids unique. Rows of an older file start without one."""
    _run(
        conn,
        [
            "ALTER TABLE alert_outbox ADD COLUMN message_id TEXT",
            "CREATE INDEX alert_outbox_message ON alert_outbox (message_id)",
        ],
    )


def _m6_alert_shown(conn: sqlite3.Connection) -> None:
    """Version 6: what an alert shows besides its change, as it was when the change was
    recorded: ``alert_outbox.experiment_name``, ``trial_status`` and ``workspace_label``,
    written with the row, so that a retry renders the very message the first attempt sent
    (a rename or a later count in between changes nothing in it). Rows of an older file have
    NULL ``trial_status`` (never NULL on a row written since) and show the current values,
    as before."""
    _run(
        conn,
        [
            "ALTER TABLE alert_outbox ADD COLUMN experiment_name TEXT",
            "ALTER TABLE alert_outbox ADD COLUMN trial_status TEXT",
            "ALTER TABLE alert_outbox ADD COLUMN workspace_label TEXT",
        ],
    )


def _m7_upstream_learnt(conn: sqlite3.Connection) -> None:
    """Version 7: ``workspaces.upstream_learnt``, what sweeps learnt about how the
    workspace's upstream behaves (it ignores the Status filter, does not bump
    GmtModifiedTime, ...), as JSON, so that the next process starts from it rather than
    paying again to learn it: a one-shot ``sync`` from cron learnt it anew every run (the
    wasted listings each time). NULL: nothing learnt (every row of an older file)."""
    _run(conn, ["ALTER TABLE workspaces ADD COLUMN upstream_learnt TEXT"])


def _m8_deletion_suspects(conn: sqlite3.Connection) -> None:
    """Version 8: ``deletion_suspects``, experiments a sweep found gone only by a look-up
    whose TotalCount counts rows it does not return (``"Experiments": []`` under a positive
    count): a glitch answers so, and so does an upstream that counts soft-deleted
    experiments for one really deleted. Such an experiment is marked deleted only when a
    later sweep finds it gone again, long enough after (see sync.SUSPECT_CONFIRM_S); a
    sweep that sees it removes its row. Empty in an older file."""
    _run(
        conn,
        [
            """
            CREATE TABLE deletion_suspects (
                experiment_id TEXT PRIMARY KEY NOT NULL
                              REFERENCES experiments (experiment_id),
                workspace_id  TEXT NOT NULL REFERENCES workspaces (workspace_id),
                sync_run_id   INTEGER NOT NULL,
                suspected_at  TEXT NOT NULL
            )""",
            "CREATE INDEX deletion_suspects_workspace ON deletion_suspects (workspace_id)",
        ],
    )


#: Forward migrations, in order; migration ``i`` (0-based) takes the file to version ``i + 1``.
#: Append only. Never edit or reorder a released migration.
MIGRATIONS: tuple[Migration, ...] = (
    _m1_core,
    _m2_alert_outbox,
    _m3_deleted_index,
    _m4_api_json,
    _m5_alert_message_id,
    _m6_alert_shown,
    _m7_upstream_learnt,
    _m8_deletion_suspects,
)

#: Migrations that copy a whole table: the old copy's pages are left free inside the file
#: (a 100,000-experiment mirror: ~300 MiB), so :func:`migrate` gives them back afterwards.
_REBUILDS: frozenset[Migration] = frozenset({_m4_api_json})

#: The schema version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


def read_version(conn: sqlite3.Connection) -> int:
    """The file's ``PRAGMA user_version``."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, where: str) -> int:
    """Refuse a file that is not a mirror or is newer than this code; return its version."""
    version = check_mirror(conn, where)
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"{where} has schema version {version}, but this hpo-sync only knows versions "
            f"up to {SCHEMA_VERSION}: it was written by a newer hpo-sync. Upgrade hpo-sync, "
            "or restore a backup made before the upgrade"
        )
    return version


def check_mirror(conn: sqlite3.Connection, where: str) -> int:
    """Refuse a file that is not a mirror (of whatever version); return its version."""
    version = read_version(conn)
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    # Another application's tag, even on a database without tables yet: not ours to take.
    if (version > 0 or app_id != 0) and app_id != APPLICATION_ID:
        raise StoreError(
            f"{where} is not an hpo-sync mirror (application_id {app_id:#x}, "
            f"user_version {version}); point the store path at another file"
        )
    if version == 0:
        tables = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchone()[0]
        if tables:
            raise StoreError(
                f"{where} already holds tables but is not an hpo-sync mirror; "
                "point the store path at a new or existing mirror file"
            )
    return version


def migrate(conn: sqlite3.Connection, *, where: str, target: int = SCHEMA_VERSION) -> int:
    """Bring the file up to ``target`` in place; return the version it had before.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Each migration runs in its
    own ``BEGIN IMMEDIATE`` transaction together with the ``user_version`` bump, so a crash
    leaves the file at a well-defined version, and a second process opening the file at the
    same time waits and then finds nothing left to do. Foreign keys are off while migrations
    run (a migration may rebuild a referenced table), and the file is vacuumed once after an
    upgrade that copied a table (:data:`_REBUILDS`).
    """
    start = check_version(conn, where)
    # A migration may rebuild a table that others reference (SQLite's 12-step procedure):
    # foreign keys must be off for that, and can only be switched outside a transaction.
    # Such a migration runs PRAGMA foreign_key_check itself before it commits.
    keys_on = bool(conn.execute("PRAGMA foreign_keys").fetchone()[0])
    if keys_on and start < target:
        conn.execute("PRAGMA foreign_keys = OFF")
    rebuilt = False
    try:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another process may have migrated meanwhile.
                version = check_version(conn, where)
                if version >= target:
                    conn.execute("COMMIT")
                    break
                MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
                # A new file (version 0) has no old copy to give back.
                rebuilt = rebuilt or (start > 0 and MIGRATIONS[version] in _REBUILDS)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    finally:
        if keys_on:
            conn.execute("PRAGMA foreign_keys = ON")
    if rebuilt:
        # Once, after an upgrade that copied a table: the file shrinks back to its data.
        # Best effort — a reader of another process may hold it up; the free pages are then
        # reused by later writes instead.
        with contextlib.suppress(sqlite3.OperationalError):
            conn.execute("VACUUM")
    return start
