"""``hpo-sync backup``: an online, consistent copy of the mirror, also while the daemon writes."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_harness import (
    Daemons,
    assert_history_consistent,
    cli,
    config_text,
    daemon_env,
    query,
    wait_db,
)

from hpo_sync.sim.server import SimOptions, Simulator


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        await ds.cleanup()


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cli(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=daemon_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_backup_while_the_daemon_writes(tmp_path: Path, daemons: Daemons) -> None:
    # An evolving world and 1 s hot sweeps: the mirror is written to all the time.
    async with Simulator(SimOptions(experiments=300, workspaces=2, seed=9, speed=120)) as sim:
        db = tmp_path / "mirror.db"
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            config_text(sim_url=sim.base_url, db=db, workspaces=["100001", "100002"]),
            encoding="utf-8",
        )
        d = await daemons.start(cfg)
        await wait_db(db, "SELECT 1 FROM workspaces WHERE baseline_at IS NOT NULL", daemon=d)
        await wait_db(db, "SELECT 1 FROM changes WHERE baseline = 0", daemon=d)
        copies = []
        for i in range(3):
            dest = tmp_path / f"copy{i}.db"
            code, out, err = await run_cli("--config", str(cfg), "backup", str(dest))
            assert code == 0, err
            assert f"to {dest}" in out and "integrity ok" in out
            copies.append(dest)
            await asyncio.sleep(0.5)
        d.check_alive()
        for dest in copies:
            conn = sqlite3.connect(dest)
            try:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            finally:
                conn.close()
            assert query(dest, "SELECT count(*) FROM experiments")[0][0] >= 300
            assert_history_consistent(dest)  # one snapshot: history and state agree

        # A directory as DEST gets a time-stamped file; an existing file needs --overwrite.
        backups = tmp_path / "backups"
        backups.mkdir()
        code, out, err = await run_cli("--config", str(cfg), "backup", str(backups))
        assert code == 0, err
        (made,) = backups.iterdir()
        assert made.name.startswith("mirror-") and made.suffix == ".db"
        code, _, err = await run_cli("--config", str(cfg), "backup", str(copies[0]))
        assert code == 2 and "--overwrite" in err
        code, _, err = await run_cli("--config", str(cfg), "backup", "--overwrite", str(made))
        assert code == 0, err
        code, _ = await d.stop()
        assert code == 0


async def test_backup_without_a_mirror_says_so(tmp_path: Path) -> None:
    code, _, err = await run_cli("backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "x"))
    assert code == 1
    # the words of every command that needs a mirror (README: exit status 1)
    assert f"no mirror at {tmp_path / 'none.db'} — run `hpo-sync sync` first" in err
    code, _, err = await run_cli("backup", "--db", str(tmp_path / "none.db"), "/no/such/dir/x.db")
    assert code == 2 and "does not exist" in err
    code, _, err = await run_cli("backup", "--db", str(tmp_path / "none.db"), f"{tmp_path}/new/")
    assert code == 2 and "does not exist" in err


def test_a_backup_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The copy holds what the mirror holds (config texts may carry keys): mode 0600
    whatever the umask, also when it replaces an older, readable backup."""
    from hpo_sync.store import Store

    store = Store.open(tmp_path / "mirror.db")
    old = os.umask(0o022)
    try:
        dest = tmp_path / "copy.db"
        dest.write_text("an older backup")
        dest.chmod(0o644)
        store.backup(dest, overwrite=True)
    finally:
        os.umask(old)
        store.close()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)


async def test_a_mirror_of_another_version_is_backed_up_as_it_is(tmp_path: Path) -> None:
    """The copy to keep before an upgrade (docs/schema.md) is of a mirror this hpo-sync
    would upgrade: `backup` used to refuse it ("open it read-write once to upgrade it"),
    so the command could not make the copy the docs ask for. A newer mirror is copied
    too; a database that is no mirror is still refused. The source is left as it was."""
    from hpo_sync.schema import SCHEMA_VERSION, migrate

    for version in (1, SCHEMA_VERSION - 1, 99):
        db = tmp_path / f"v{version}.db"
        conn = sqlite3.connect(db, isolation_level=None)
        migrate(conn, where=str(db), target=min(version, SCHEMA_VERSION))
        conn.execute("INSERT INTO workspaces (workspace_id) VALUES ('ws-old')")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.close()
        before = db.read_bytes()
        dest = tmp_path / f"copy-v{version}.db"
        code, out, err = await run_cli("backup", "--db", str(db), str(dest))
        assert code == 0, err
        assert "integrity ok" in out
        assert db.read_bytes() == before
        with sqlite3.connect(dest) as copy:
            assert copy.execute("PRAGMA user_version").fetchone() == (version,)
            assert copy.execute("SELECT workspace_id FROM workspaces").fetchall() == [("ws-old",)]

    notes = tmp_path / "notes.db"
    with sqlite3.connect(notes) as conn:
        conn.execute("CREATE TABLE notes (x)")
    code, _, err = await run_cli("backup", "--db", str(notes), str(tmp_path / "notes-copy.db"))
    assert code == 1 and "not an hpo-sync mirror" in err
    assert not (tmp_path / "notes-copy.db").exists()
    # an empty file (a mistyped --db) is no mirror of any version: no "backup" of nothing
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    code, _, err = await run_cli("backup", "--db", str(empty), str(tmp_path / "empty-copy.db"))
    assert code == 1 and "holds no mirror yet" in err, err
    assert not (tmp_path / "empty-copy.db").exists()


async def test_a_backup_onto_the_mirrors_own_files_is_refused(tmp_path: Path) -> None:
    """``backup --overwrite`` onto ``mirror.db.lock`` replaced the daemon's lock file (the
    lock is the flock on that very file): a second writer got in. Onto ``mirror.db-wal``,
    the mirror read as "file is not a database" while the daemon ran. Every file of the
    mirror, through a symlink too, is refused as a usage error, and left as it was."""
    from hpo_sync.store import Store, acquire_lock

    db = tmp_path / "mirror.db"
    lock = acquire_lock(db)  # as the running daemon holds it
    store = Store.open(db)  # its writer: the -wal and -shm exist
    try:
        (tmp_path / "link").symlink_to(f"{db}.lock")
        for dest in (f"{db}.lock", f"{db}-wal", f"{db}-shm", str(db), str(tmp_path / "link")):
            before = {s: os.stat(f"{db}{s}").st_ino for s in ("", "-wal", "-shm", ".lock")}
            code, out, err = await run_cli("backup", "--db", str(db), dest, "--overwrite")
            assert (code, out) == (2, ""), err
            assert "is the mirror's own file" in err
            assert {s: os.stat(f"{db}{s}").st_ino for s in before} == before
        with pytest.raises(Exception, match="onto itself or its files"):
            store.backup(f"{db}-wal", overwrite=True)
    finally:
        store.close()
        lock.release()


async def test_backups_into_one_directory_at_once_each_get_a_file_of_their_own(
    tmp_path: Path,
) -> None:
    """DEST a directory: the file is named by the time, to the second. Two backups in the
    same second failed ("… exists; pass --overwrite", a file the user never named, which
    --overwrite would have clobbered). Each now gets a name of its own (``-2``, ``-3``)."""
    from hpo_sync.store import Store

    db = tmp_path / "mirror.db"
    Store.open(db).close()
    backups = tmp_path / "backups"
    backups.mkdir()
    results = await asyncio.gather(
        *(run_cli("backup", "--db", str(db), f"{backups}/") for _ in range(3))
    )
    assert [code for code, _, _ in results] == [0, 0, 0], results
    made = sorted(p.name for p in backups.iterdir())
    assert len(made) == 3 and all(re.fullmatch(r"mirror-\d{8}T\d{6}Z(-\d)?\.db", m) for m in made)
    for name in made:
        with sqlite3.connect(backups / name) as conn:
            assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
