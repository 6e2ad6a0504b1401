"""The shortcuts a full sweep takes for speed give exactly what the plain paths give: multi-row
inserts, precomputed row contents, the simulator's page encoding, the CLI's lazy parser and
the garbage collector settings of a full sweep."""

from __future__ import annotations

import gc
import json
import random
import sqlite3
import subprocess
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from hpo_sync import store as store_mod
from hpo_sync.cli import _command_word, _own_command, build_parser
from hpo_sync.normalise import Experiment, normalise
from hpo_sync.schema import experiment_values
from hpo_sync.sim.drift import _space_time, drift_experiment
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.sim.world import World
from hpo_sync.store import Store, _insert_rows
from hpo_sync.sync import _full_sweep_gc


def _exp(i: int, **fields: Any) -> Experiment:
    raw: dict[str, Any] = {
        "ExperimentId": f"exp-{i:05d}",
        "WorkspaceId": "ws1",
        "Name": f"sweep {i} ✓",
        "Status": "RUNNING" if i % 3 else "FINISHED",
        "TrialCount": i % 7,
        "TrialStatus": {"SUCCEEDED": i % 7} if i % 7 else {},
        "Tags": [{"Key": "team", "Value": "ml ops"}],
        "GmtCreateTime": "2024-02-01T00:00:00Z",
        "GmtModifiedTime": "2024-02-01 08:00:00",
        "Deleted": i % 11 == 0,
        "ConfigYml": "a: 'quote\"d'\nb: \\n",
    }
    raw.update(fields)
    out = normalise(raw)
    assert out is not None
    return out


@pytest.mark.parametrize("n", [0, 1, 5, 255, 256, 257, 700])
def test_multi_row_inserts_write_what_executemany_writes(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "ROWS_PER_INSERT", 64)
    sql = "INSERT INTO t (a, b, c) VALUES (?, ?, ?)"
    rows = [(i, f"text {i}\x00 ✓" if i % 5 else None, i * 0.5) for i in range(n)]
    out = []
    for write in ("plain", "multi"):
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, a, b, c)")
        if write == "plain":
            conn.executemany(sql, rows)
        else:
            _insert_rows(conn.cursor(), sql, rows)
        out.append(conn.execute("SELECT * FROM t ORDER BY id").fetchall())
    assert out[0] == out[1]
    assert [r[1:] for r in out[1]] == rows


def test_a_failing_multi_row_insert_writes_nothing_of_its_statement() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (a PRIMARY KEY)")
    conn.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError):
        _insert_rows(conn.cursor(), "INSERT INTO t (a) VALUES (?)", [(1,), (2,), (1,)])
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def _dump(db: Path) -> dict[str, list[Any]]:
    conn = sqlite3.connect(db)
    try:
        return {
            "experiments": conn.execute("SELECT * FROM experiments ORDER BY rowid").fetchall(),
            "changes": conn.execute("SELECT * FROM changes ORDER BY id").fetchall(),
        }
    finally:
        conn.close()


def test_apply_with_precomputed_contents_is_apply_without(tmp_path: Path) -> None:
    first = [_exp(i) for i in range(600)]
    # the second batch: some new, some changed, some the same, one twice (dedupe)
    second = [_exp(i, Status="FAILED") for i in range(0, 900, 3)] + [_exp(5, Status="WAITING")]
    dumps, results = [], []
    for precompute in (False, True):
        db = tmp_path / f"m{precompute}.db"
        store = Store.open(db)
        try:
            for at, batch in (("2024-03-01T00:00:00Z", first), ("2024-03-02T00:00:00Z", second)):
                run = store.begin_run("ws1", "full", at)
                contents = [experiment_values(e, "ws1") for e in batch] if precompute else None
                applied = store.apply(
                    "ws1", batch, observed_at=at, run_id=run, baseline=False, contents=contents
                )
                results.append((applied.inserted, applied.updated, applied.unchanged))
                results.append([tuple(r) for r in applied.change_rows])
        finally:
            store.close()
        dumps.append(_dump(db))
    assert dumps[0] == dumps[1]
    assert results[:4] == results[4:]


def test_apply_refuses_contents_that_do_not_match(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "m.db")
    try:
        run = store.begin_run("ws1", "full", "2024-03-01T00:00:00Z")
        with pytest.raises(ValueError):
            store.apply(
                "ws1",
                [_exp(1), _exp(2)],
                observed_at="2024-03-01T00:00:00Z",
                run_id=run,
                baseline=True,
                contents=[experiment_values(_exp(1), "ws1")],
            )
    finally:
        store.close()


@pytest.mark.parametrize("drift", [True, False])
@pytest.mark.parametrize("zone", ["UTC", "Asia/Shanghai"])
def test_simulator_pages_are_exactly_json_dumps(drift: bool, zone: str) -> None:
    """The server encodes config texts once per experiment; the bytes must stay those of
    json.dumps(..., ensure_ascii=False) over the drifted page, with the same RNG draws."""
    sim = Simulator(SimOptions(experiments=400, workspaces=2, seed=9, time_zone=zone, drift=drift))
    plain = World(seed=9, experiments=400, workspaces=2, time_zone=sim.time_zone,
                  start_time=sim.world.now)  # fmt: skip
    rng = random.Random(9 + 3)  # the server's drift RNG: seed + 3
    queries: list[dict[str, str]] = [
        {"WorkspaceId": "100001", "PageSize": "30", "SortBy": "GmtCreateTime", "Order": "ASC",
         "IncludeConfigData": "True"},
        {"PageSize": "50", "IncludeConfigData": "False"},
        {"Status": "RUNNING", "PageSize": "7", "IncludeConfigData": "true"},
        {"Name": "no such name", "PageSize": "5"},
    ]  # fmt: skip
    for _ in range(2):
        for query in queries:
            for number in range(1, 5):
                params = {**query, "PageNumber": str(number)}
                total, page = plain.list(params)
                if drift:
                    page = [drift_experiment(e, rng, sim.time_zone) for e in page]
                expected = json.dumps(
                    {"RequestId": "R", "TotalCount": total, "Experiments": page},
                    ensure_ascii=False,
                )
                assert sim._page_json("R", *sim.world.list(params)) == expected
        plain.advance(900)
        sim.world.advance(900)


def test_page_json_of_experiments_shaped_otherwise() -> None:
    sim = Simulator(SimOptions(experiments=0, workspaces=1, drift=False))
    page: list[dict[str, Any]] = [
        {"ExperimentId": "a", "ConfigYml": "y", "SearchSpace": "s", "ConfigIni": "i"},
        {"SearchSpace": "s", "ConfigIni": "i", "ConfigYml": "y"},
        {"ExperimentId": 7, "Name": "n", "SearchSpace": "s", "ConfigIni": "i", "ConfigYml": 1},
        {"ExperimentId": "b", "Name": "n", "SearchSpace": "s", "ConfigIni": "i", "ConfigYml": "y"},
        {"ExperimentId": "b", "Name": "n", "SearchSpace": "t", "ConfigIni": "i", "ConfigYml": "y"},
    ]
    expected = json.dumps(
        {"RequestId": "R", "TotalCount": 5, "Experiments": page}, ensure_ascii=False
    )
    assert sim._page_json("R", 5, [dict(e) for e in page]) == expected


def test_space_time_matches_strptime() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    def slow(iso: str, tz: Any) -> str:
        dt = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return dt.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")

    for tz in (UTC, ZoneInfo("Asia/Shanghai"), ZoneInfo("America/New_York")):
        for iso in ("2024-02-29T23:59:59Z", "2024-3-1T1:2:3Z", "0999-06-01T00:00:00Z",
                    "1970-01-01T00:00:00Z", "2038-01-19T03:14:08Z"):  # fmt: skip
            assert _space_time(iso, tz) == slow(iso, tz)


def test_own_commands_get_a_parser_of_their_own() -> None:
    def own(argv: list[str]) -> str | None:
        return _own_command(_command_word(argv))

    assert own(["--config", "x.toml", "sync", "--full"]) == "sync"
    assert own(["sync"]) == "sync"
    assert own(["--log-level", "debug", "simulate", "--port", "0"]) == "simulate"
    assert own(["ls"]) is None
    assert own(["--help"]) is None
    assert own([]) is None
    args = build_parser("sync").parse_args(["--config", "c.toml", "sync", "--full"])
    assert args.full and args.config == "c.toml"


def test_sync_does_not_import_the_other_commands() -> None:
    code = (
        "import sys\n"
        "from hpo_sync.cli import build_parser, _command_word, _own_command\n"
        "word = _command_word(['sync', '--full'])\n"
        "build_parser(_own_command(word)).parse_args(['sync', '--full'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('hpo_sync.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("hpo_sync.daemon", "hpo_sync.api", "hpo_sync.cli_query", "hpo_sync.sim.server"):
        assert f"'{heavy}'" not in out


def test_full_sweep_gc_settings_are_undone() -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    with _full_sweep_gc():
        assert gc.get_threshold()[0] >= before[0]
        with _full_sweep_gc():  # a second workspace's sweep at the same time
            pass
        assert gc.get_freeze_count() >= frozen
        assert gc.get_threshold()[0] >= before[0]
    assert gc.get_threshold() == before
    gc.collect()
