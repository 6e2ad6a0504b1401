"""The query commands (``ls``, ``show``, ``history``, ``export``, ``stats``) against real mirror
files: one built by hand with fixed times (exact expectations), one written by a real sync
against the simulator. Output is parsed back and checked, not just exit codes."""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from hpo_sync import cli, cli_query, render
from hpo_sync import store as store_mod
from hpo_sync.errors import ConfigError, StoreError
from hpo_sync.normalise import Experiment, normalise, to_upstream
from hpo_sync.store import Store

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

T0 = "2024-03-01T00:00:00Z"  # baselines
T1 = "2024-03-02T06:00:00Z"  # ws-a changes
T2 = "2024-03-03T00:00:00Z"  # ws-b changes
LONG_NAME = "hyperparameter-search-" + "x" * 150 + "-end"
BULK = 1234  # > 2 pages of cli_query.PAGE_SIZE, all created at the same second


def raw(
    exp_id: str,
    ws: str,
    name: str,
    status: str,
    created: str,
    *,
    creator: str = "1001",
    tags: dict[str, str] | None = None,
    trials: dict[str, int] | None = None,
    deleted: bool = False,
    modified: str | None = None,
) -> Experiment:
    exp = normalise(
        {
            "ExperimentId": exp_id,
            "WorkspaceId": ws,
            "Name": name,
            "Status": status,
            "Creator": creator,
            "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()],
            "TrialStatus": trials or {},
            "TrialCount": sum((trials or {}).values()) or None,
            "GmtCreateTime": created,
            "GmtModifiedTime": modified or created,
            "Deleted": deleted,
            "Accessibility": "PRIVATE",
            "SearchSpace": '{"lr": {"_type": "loguniform"}}' if exp_id == "hpo-a1" else None,
        }
    )
    assert exp is not None
    return exp


def sweep(
    store: Store, ws: str, at: str, exps: list[Experiment], *, baseline: bool, complete: bool
) -> None:
    run = store.begin_run(ws, "full" if baseline else "hot", at)
    store.apply(ws, exps, observed_at=at, run_id=run, baseline=baseline, complete=complete)
    store.finish_run(run, finished_at=at, status="ok", api_calls=1, pages=1, experiments_seen=1)


def build_mirror(path: Path) -> None:
    nlp, cv = {"team": "nlp"}, {"team": "cv"}
    with Store.open(path) as store:
        ws_a = [
            raw("hpo-a1", "ws-a", "bert-sweep", "RUNNING", "2024-02-28T10:00:00Z",
                tags=nlp, trials={"RUNNING": 2, "SUCCEEDED": 3}),
            raw("hpo-a2", "ws-a", "resnet-lr", "FINISHED", "2024-02-20T00:00:00Z",
                creator="1002", tags=cv, trials={"SUCCEEDED": 10}),
            raw("hpo-a3", "ws-a", "bert-large", "RUNNING", "2024-02-29T12:00:00Z",
                tags={"team": "nlp", "env": "prod"}, trials={"RUNNING": 1}),
            raw("hpo-a4", "ws-a", "old-thing", "FAILED", "2024-01-01T00:00:00Z", deleted=True),
            raw("hpo-a5", "ws-a", LONG_NAME, "CREATED", "2024-02-25T00:00:00Z", creator="1002"),
            raw("hpo-a7", "ws-a", "中文实验", "WAITING", "2024-02-26T00:00:00Z"),
        ]  # fmt: skip
        sweep(store, "ws-a", T0, ws_a, baseline=True, complete=True)
        ws_b = [
            raw("hpo-b1", "ws-b", "gpt-tune", "RUNNING", "2024-02-27T00:00:00Z", tags=nlp),
            raw("hpo-b2", "ws-b", "mixed_100%", "FAILED", "2024-02-10T00:00:00Z"),
        ]
        sweep(store, "ws-b", T0, ws_b, baseline=True, complete=True)
        bulk = [
            raw(f"hpo-bulk-{i:05d}", "ws-bulk", f"bulk {i}", "FINISHED", "2024-01-15T00:00:00Z")
            for i in range(BULK)
        ]
        sweep(store, "ws-bulk", T0, bulk, baseline=True, complete=True)
        # After the baselines: real transitions.
        changed_a = [
            raw("hpo-a1", "ws-a", "bert-sweep", "FAILED", "2024-02-28T10:00:00Z",
                tags=nlp, trials={"FAILED": 3, "SUCCEEDED": 3}, modified=T1),
            raw("hpo-a3", "ws-a", "bert-large", "FINISHED", "2024-02-29T12:00:00Z",
                tags={"team": "nlp", "env": "prod"}, trials={"SUCCEEDED": 1}, modified=T1),
            raw("hpo-a6", "ws-a", "vit-new", "RUNNING", "2024-03-02T05:00:00Z"),
        ]  # fmt: skip
        sweep(store, "ws-a", T1, changed_a, baseline=False, complete=False)
        changed_b = [
            raw("hpo-b1", "ws-b", "gpt-tune", "FAILED", "2024-02-27T00:00:00Z",
                tags=nlp, trials={"FAILED": 1}, modified=T2),
        ]  # fmt: skip
        sweep(store, "ws-b", T2, changed_b, baseline=False, complete=False)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mirror") / "mirror.db"
    build_mirror(path)
    return path


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The commands configure logging onto the (captured) stderr of the test that ran them;
    put it back so later tests do not log into a closed capture."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


class Run:
    def __init__(self, capsys: pytest.CaptureFixture[str], db: Path) -> None:
        self.capsys, self.db = capsys, db

    def __call__(self, *argv: str, db: Path | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main([*argv, "--db", str(db or self.db)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--format", "json"))

    def ids(self, *argv: str) -> list[str]:
        return [e["ExperimentId"] for e in self.json("ls", *argv)]

    def usage_error(self, *argv: str) -> str:
        """argv must be rejected by argparse: exit 2, one message."""
        self.capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--db", str(self.db)])
        assert exc.value.code == 2
        err = self.capsys.readouterr().err
        assert "Traceback" not in err
        return err


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], db: Path) -> Run:
    return Run(capsys, db)


# --- ls -------------------------------------------------------------------------------------


def test_ls_default_is_newest_first_without_deleted_and_limited(run: Run) -> None:
    code, out, err = run("ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "STATUS", "NAME", "ID", "WORKSPACE", "TRIALS", "CREATED", "MODIFIED",
    ]  # fmt: skip
    assert len(lines) == 1 + cli_query.DEFAULT_LIMIT
    assert "hpo-a6" in lines[1]  # created last
    assert "hpo-a4" not in out  # deleted
    assert "showing the first 50" in err and "--limit 0" in err
    # scripts' formats are cut at the same limit, and told so on stderr, not in the data
    for fmt in ("json", "jsonl", "csv"):
        code, out, err = run("ls", "--format", fmt)
        assert code == 0 and "wrote the first 50; --limit N for more" in err, fmt
        assert "wrote" not in out
        code, out, err = run("ls", "--format", fmt, "--limit", "0")
        assert code == 0 and err == "", err


def test_ls_table_cells(run: Run) -> None:
    out = run.ok("ls", "--workspace", "ws-a", "--sort", "created")
    lines = out.splitlines()
    by_id = {re.search(r"hpo-\w+", line)[0]: line for line in lines[1:]}  # type: ignore[index]
    assert list(by_id) == ["hpo-a2", "hpo-a5", "hpo-a7", "hpo-a1", "hpo-a3", "hpo-a6"]
    assert re.fullmatch(
        r"FAILED\s+bert-sweep\s+hpo-a1\s+ws-a\s+6 \(3 failed\)"
        r"\s+2024-02-28 10:00\s+2024-03-02 06:00",
        by_id["hpo-a1"],
    )
    assert re.search(
        r"FINISHED\s+resnet-lr\s+hpo-a2\s+ws-a\s+10\s+2024-02-20 00:00", by_id["hpo-a2"]
    )
    assert re.search(r"RUNNING\s+vit-new\s+hpo-a6\s+ws-a\s+-\s", by_id["hpo-a6"])
    assert LONG_NAME in out  # not a terminal: names are whole
    # Aligned in terminal columns (the CJK name is 4 characters wide, 8 columns).
    starts = {render.display_width(line[: line.index("hpo-")]) for line in lines[1:]}
    assert starts == {render.display_width(lines[0][: lines[0].index("ID")])}


def test_ls_truncates_names_to_the_terminal_width(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    out = run.ok("ls", "--workspace", "ws-a")
    assert LONG_NAME not in out
    # (where it is cut depends on the other columns: STATUS is sized for every status)
    assert re.search(r"  hyperparameter-\S*…  hpo-a5", out)
    assert all(render.display_width(line) <= 100 for line in out.splitlines())
    lines = out.splitlines()
    starts = {render.display_width(line[: line.index("hpo-")]) for line in lines[1:]}
    assert len(starts) == 1


def build_late_wide_mirror(path: Path) -> None:
    """More than a page of experiments whose widest cells come last, in ``ls`` order
    (newest first) and in history order (id): a long name, a deleted USER_CANCELED one and
    its TrialStatus change."""
    later = [
        raw(f"hpo-w{i:04d}", "ws-w", f"w {i}", "RUNNING", f"2024-02-{1 + i % 28:02d}T00:00:00Z")
        for i in range(cli_query.PAGE_SIZE + 100)
    ]
    last = [
        raw("hpo-wcanc", "ws-w", "w c", "USER_CANCELED", "2023-01-02T00:00:00Z",
            trials={"FAILED": 7, "SUCCEEDED": 1234567}, deleted=True),
        raw("hpo-wlong", "ws-w", LONG_NAME, "RUNNING", "2023-01-01T00:00:00Z"),
    ]  # fmt: skip
    with Store.open(path) as store:
        sweep(store, "ws-w", T0, later + last, baseline=True, complete=True)


def test_piped_tables_keep_whole_cells_first_met_after_the_first_page(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Widths come from the first page (the table streams). Piped, a longer cell met later
    is not cut to them; columns whose widest cell is known (STATUS, FIELD) are sized for it."""
    db = tmp_path / "wide.db"
    build_late_wide_mirror(db)
    code, out, _ = run("ls", "--limit", "0", "--include-deleted", db=db)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 1 + cli_query.PAGE_SIZE + 102
    assert "hpo-wlong" in lines[-1] and LONG_NAME in lines[-1] and "…" not in out
    # Every row but the long name's lines up with the header, the deleted one included.
    assert lines[-2].startswith("USER_CANCELED (deleted)  w c ")
    starts = {line.index("hpo-") for line in lines[1:-1]}
    assert starts == {lines[0].index("ID")}

    code, out, _ = run("history", "--limit", "0", db=db)
    assert code == 0
    lines = out.splitlines()
    assert LONG_NAME in out and "…" not in out
    assert "(none) → FAILED 7, SUCCEEDED 1234567" in out
    late = lines[1 + cli_query.PAGE_SIZE :]
    assert all(any(f"  {field}  " in line for line in late) for field in ("TrialStatus", "Deleted"))
    change_starts = {
        m.end()
        for line in lines[1:]
        if "hpo-wlong" not in line and (m := re.search(r"  (Status|TrialStatus|Deleted) +", line))
    }
    assert change_starts == {lines[0].index("CHANGE")}

    # On a terminal (or with $COLUMNS) names are still cut to fit.
    monkeypatch.setenv("COLUMNS", "100")
    for argv in (["ls", "--include-deleted"], ["history"]):
        code, out, _ = run(*argv, "--limit", "0", db=db)
        assert code == 0 and LONG_NAME not in out and "…" in out, argv
        long = [line for line in out.splitlines() if "hpo-wlong" in line]
        assert long and all(render.display_width(line) <= 100 for line in long), argv

    # The change itself is never cut, however narrow the terminal: the new status is what
    # these tables are read for (it was: "RUNNING → F…", FAILED or FINISHED?).
    monkeypatch.setenv("COLUMNS", "60")
    for argv in (["history", "--limit", "0"], ["show", "hpo-wcanc"]):
        code, out, _ = run(*argv, db=db)
        assert code == 0 and "(none) → FAILED 7, SUCCEEDED 1234567" in out, argv
        assert "USER_CANCELED" in out and "→ …" not in out and "USER_CANC…" not in out, argv


def test_ls_filters(run: Run) -> None:
    assert run.ids("--workspace", "ws-b") == ["hpo-b1", "hpo-b2"]
    assert set(run.ids("--workspace", "ws-a", "--workspace", "ws-b")) == {
        "hpo-a1", "hpo-a2", "hpo-a3", "hpo-a5", "hpo-a6", "hpo-a7", "hpo-b1", "hpo-b2",
    }  # fmt: skip
    assert run.ids("--status", "failed") == ["hpo-a1", "hpo-b1", "hpo-b2"]
    assert run.ids("--status", "FAILED", "--status", "RUNNING") == [
        "hpo-a6", "hpo-a1", "hpo-b1", "hpo-b2",
    ]  # fmt: skip
    assert run.ids("--name", "BERT") == ["hpo-a3", "hpo-a1"]
    assert run.ids("--name", "_100%") == ["hpo-b2"]  # literal, not a LIKE pattern
    assert run.ids("--name", "中文") == ["hpo-a7"]
    assert run.ids("--creator", "1002") == ["hpo-a5", "hpo-a2"]
    assert run.ids("--tag", "team=nlp") == ["hpo-a3", "hpo-a1", "hpo-b1"]
    assert run.ids("--tag", "team=nlp", "--tag", "env=prod") == ["hpo-a3"]
    assert run.ids("--tag", "team=") == []
    assert run.ids("--created-after", "2024-02-28", "--created-before", "2024-03-01") == [
        "hpo-a3", "hpo-a1",
    ]  # fmt: skip
    # Inclusive after, exclusive before; datetimes with a zone are converted to UTC.
    assert run.ids("--created-after", "2024-02-28T10:00:00Z", "--workspace", "ws-a") == [
        "hpo-a6", "hpo-a3", "hpo-a1",
    ]  # fmt: skip
    assert run.ids("--created-before", "2024-02-28T18:00+08:00", "--workspace", "ws-a") == [
        "hpo-a7", "hpo-a5", "hpo-a2",
    ]  # fmt: skip
    assert "hpo-a4" not in run.ids("--workspace", "ws-a")
    with_deleted = run.json("ls", "--workspace", "ws-a", "--include-deleted")
    assert [e["Deleted"] for e in with_deleted if e["ExperimentId"] == "hpo-a4"] == [True]
    table = run.ok("ls", "--workspace", "ws-a", "--include-deleted")
    assert re.search(r"FAILED \(deleted\)\s+old-thing\s+hpo-a4", table)


def test_ls_sorts(run: Run) -> None:
    ws = ("--workspace", "ws-a")
    assert run.ids(*ws, "--sort", "created") == [
        "hpo-a2", "hpo-a5", "hpo-a7", "hpo-a1", "hpo-a3", "hpo-a6",
    ]  # fmt: skip
    assert run.ids(*ws) == list(reversed(run.ids(*ws, "--sort", "created")))
    assert run.ids(*ws, "--sort", "-modified")[:3] == ["hpo-a3", "hpo-a1", "hpo-a6"]
    assert run.ids(*ws, "--sort", "modified")[0] == "hpo-a2"
    names = [e["Name"] for e in run.json("ls", *ws, "--sort", "name")]
    assert names == sorted(names)
    assert run.ids(*ws, "--sort", "-name") == list(reversed(run.ids(*ws, "--sort", "name")))


def test_ls_json_keeps_upstream_field_names(run: Run, db: Path) -> None:
    [a1] = [e for e in run.json("ls", "--workspace", "ws-a") if e["ExperimentId"] == "hpo-a1"]
    assert list(a1) == list(render.EXPERIMENT_FIELDS)
    assert a1["Name"] == "bert-sweep"
    assert a1["Status"] == "FAILED"
    assert a1["TrialStatus"] == {"FAILED": 3, "SUCCEEDED": 3}
    assert a1["TrialCount"] == 6
    assert a1["Tags"] == [{"Key": "team", "Value": "nlp"}]
    assert a1["Deleted"] is False
    assert a1["SearchSpace"] == '{"lr": {"_type": "loguniform"}}'
    assert (a1["FirstSeenAt"], a1["LastSeenAt"], a1["LastChangedAt"]) == (T0, T1, T1)
    with Store.open(db, readonly=True) as store:
        row = store.get_experiment("hpo-a1")
    assert row is not None
    assert {k: a1[k] for k in to_upstream(render.row_experiment(row))} == to_upstream(
        render.row_experiment(row)
    )


def test_ls_jsonl_and_csv_agree_with_json(run: Run) -> None:
    args = ("ls", "--workspace", "ws-a", "--include-deleted")
    as_json = run.json(*args)
    as_jsonl = [json.loads(line) for line in run.ok(*args, "--format", "jsonl").splitlines()]
    assert as_jsonl == as_json
    rows = list(csv.DictReader(io.StringIO(run.ok(*args, "--format", "csv"))))
    assert list(rows[0]) == list(render.EXPERIMENT_FIELDS)
    assert [r["ExperimentId"] for r in rows] == [e["ExperimentId"] for e in as_json]
    a1 = next(r for r in rows if r["ExperimentId"] == "hpo-a1")
    assert json.loads(a1["TrialStatus"]) == {"FAILED": 3, "SUCCEEDED": 3}
    assert json.loads(a1["Tags"]) == [{"Key": "team", "Value": "nlp"}]
    assert (a1["Deleted"], a1["TrialCount"], a1["ConfigYml"]) == ("false", "6", "")
    assert next(r for r in rows if r["ExperimentId"] == "hpo-a4")["Deleted"] == "true"
    assert next(r for r in rows if r["ExperimentId"] == "hpo-a7")["Name"] == "中文实验"


def test_ls_empty_result(run: Run) -> None:
    code, out, err = run("ls", "--name", "no-such-name")
    assert (code, out) == (0, "")
    assert "no experiments match" in err
    assert run.json("ls", "--name", "no-such-name") == []
    csv_out = run.ok("ls", "--name", "no-such-name", "--format", "csv")
    assert csv_out == ",".join(render.EXPERIMENT_FIELDS) + "\n"
    assert run.ok("ls", "--name", "no-such-name", "--format", "jsonl") == ""


def test_ls_unknown_workspace_warns(run: Run) -> None:
    code, out, err = run("ls", "--workspace", "ws-typo", "--format", "json")
    assert (code, json.loads(out)) == (0, [])
    assert "workspace 'ws-typo' is not in the mirror" in err and "ws-a" in err


def test_ls_unknown_status_warns(run: Run, db: Path, tmp_path: Path) -> None:
    code, out, err = run("ls", "--status", "FAILD", "--format", "json")
    assert (code, json.loads(out)) == (0, [])
    assert "status 'FAILD' is not one PAI uses" in err and "did you mean FAILED?" in err
    assert "RUNNING" in err  # the known statuses are listed
    code, _, err = run("ls", "--status", "failed", "--status", "running", "--format", "json")
    assert code == 0 and err == ""  # known statuses, any case: no note
    # a status PAI may add later is no typo once the mirror holds it
    newer = tmp_path / "newer.db"
    store = Store.open(newer)
    sweep(
        store, "ws-n", T0, [raw("hpo-n1", "ws-n", "n", "PAUSED", T0)], baseline=True, complete=True
    )
    store.close()
    code, out, err = run("ls", "--status", "paused", "--format", "json", db=newer)
    assert code == 0 and err == "" and [e["Status"] for e in json.loads(out)] == ["PAUSED"]


def test_ls_status_with_blanks_around_it_matches_like_the_note_assumes(run: Run) -> None:
    """The typo note reads ' failed ' as FAILED (and so says nothing); the filter must too,
    or the listing is silently empty."""
    want = run.ids("--status", "FAILED", "--include-deleted")
    assert want
    code, out, err = run("ls", "--status", " failed ", "--include-deleted", "--format", "json")
    assert code == 0 and err == ""
    assert [e["ExperimentId"] for e in json.loads(out)] == want


def test_ls_limit_zero_streams_every_row_in_keyset_pages(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = Store.list_experiments

    def spy(self: Store, *args: Any, **kwargs: Any) -> Any:
        page = real(self, *args, **kwargs)
        sizes.append(len(page.rows))
        return page

    monkeypatch.setattr(Store, "list_experiments", spy)
    lines = run.ok("ls", "--limit", "0", "--workspace", "ws-bulk", "--format", "jsonl")
    ids = [json.loads(line)["ExperimentId"] for line in lines.splitlines()]
    # All created in the same second: the pages are cut on experiment_id, without repeats.
    assert sorted(ids, reverse=True) == ids
    assert len(set(ids)) == len(ids) == BULK
    assert max(sizes) <= cli_query.PAGE_SIZE and len(sizes) == -(-BULK // cli_query.PAGE_SIZE)
    sizes.clear()
    out = run.ok("ls", "--limit", "0")
    assert len(out.splitlines()) == 1 + BULK + 8  # header, bulk, ws-a and ws-b live rows
    assert max(sizes) <= cli_query.PAGE_SIZE
    sizes.clear()
    assert len(run.ids("--limit", "501", "--workspace", "ws-bulk")) == 501
    assert sizes == [500, 1]


@pytest.mark.parametrize("sort", ["modified", "-modified"])
def test_ls_pages_are_one_snapshot_while_a_sync_moves_rows(
    run: Run, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sort: str
) -> None:
    """A sync that bumps modified times between two pages of `ls --limit 0 --sort
    modified` used to have the moved rows listed twice."""
    mirror = tmp_path / "copy.db"
    shutil.copy(db, mirror)
    real = Store.list_experiments
    moved: list[str] = []

    def sync_between_pages(self: Store, *args: Any, **kwargs: Any) -> Any:
        page = real(self, *args, **kwargs)
        if not moved:
            moved.extend(row["experiment_id"] for row in page.rows[:5])
            later = "2999-01-01T00:00:00Z" if sort == "modified" else "1999-01-01T00:00:00Z"
            with sqlite3.connect(mirror) as writer:
                writer.executemany(
                    "UPDATE experiments SET gmt_modified_time = ? WHERE experiment_id = ?",
                    [(later, exp_id) for exp_id in moved],
                )
        return page

    monkeypatch.setattr(Store, "list_experiments", sync_between_pages)
    code, out, err = run(
        "ls", "--limit", "0", "--workspace", "ws-bulk", "--sort", sort, "--format", "jsonl",
        db=mirror,
    )  # fmt: skip
    assert code == 0, err
    ids = [json.loads(line)["ExperimentId"] for line in out.splitlines()]
    assert len(moved) == 5
    assert len(ids) == len(set(ids)) == BULK


# --- show and history -----------------------------------------------------------------------


def test_show_prints_every_field_and_the_history(run: Run) -> None:
    out = run.ok("show", "hpo-a1")
    block = out.split("\n\n")[0].splitlines()
    fields = {line.split()[0]: line.split(None, 1)[1] for line in block}
    assert set(fields) == set(render.EXPERIMENT_FIELDS)
    assert fields["Status"] == "FAILED"
    assert fields["TrialStatus"] == "FAILED 3, SUCCEEDED 3"
    assert fields["Tags"] == "team=nlp"
    assert fields["LastChangedAt"] == T1
    history = out.split("\n\n", 1)[1].splitlines()
    assert history[0] == "History (4 changes, UTC)"
    assert history[1].split() == ["OBSERVED", "FIELD", "CHANGE", "RUN"]
    assert re.search(r"Status\s+\(none\) → RUNNING\s+#1 baseline$", history[2])
    assert re.search(r"TrialStatus\s+\(none\) → RUNNING 2, SUCCEEDED 3\s+#1 baseline", history[3])
    assert re.search(r"^2024-03-02T06:00:00Z\s+Status\s+RUNNING → FAILED\s+#4$", history[4])
    assert "RUNNING 2, SUCCEEDED 3 → FAILED 3, SUCCEEDED 3" in history[5]


def test_show_prints_tags_as_tag_takes_them_back(run: Run, tmp_path: Path) -> None:
    """The key ``a=b`` of the value ``c=d`` was shown ``a=b=c=d``, which ``--tag`` reads as
    the key ``a``: the experiment could not be found by what ``show`` printed."""
    db = tmp_path / "tags.db"
    tags = {"a=b": "c=d", "k\\": "x", "team": "ml=ops"}
    with Store.open(db) as store:
        sweep(store, "ws-t", T0, [raw("hpo-t1", "ws-t", "t", "RUNNING", T0, tags=tags)],
              baseline=True, complete=True)  # fmt: skip
    code, out, _ = run("show", "hpo-t1", db=db)
    assert code == 0
    shown = next(line for line in out.splitlines() if line.startswith("Tags"))
    assert shown.split(None, 1)[1] == "a\\=b=c=d, k\\\\=x, team=ml=ops"
    for text in shown.split(None, 1)[1].split(", "):
        code, out, _ = run("ls", "--tag", text, "--format", "json", db=db)
        assert code == 0 and [e["ExperimentId"] for e in json.loads(out)] == ["hpo-t1"], text


def test_show_reads_the_experiment_and_its_history_in_one_snapshot(
    run: Run, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync committing between the two reads showed a status that the history's last row
    did not reach (or history beyond it)."""
    copy = tmp_path / "copy.db"
    conn = sqlite3.connect(db)
    conn.execute("VACUUM INTO ?", (str(copy),))
    conn.close()
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # as a mirror is: a writer beside readers
    original = Store.get_experiment

    def then_a_sync_commits(self: Store, experiment_id: str) -> Any:
        row = original(self, experiment_id)
        with contextlib.closing(sqlite3.connect(copy)) as writer, writer:
            writer.execute(
                "INSERT INTO changes (experiment_id, workspace_id, field, old_value, new_value,"
                " observed_at) VALUES (?, 'ws-a', 'Status', 'FAILED', 'RUNNING', ?)",
                (experiment_id, T2),
            )
        return row

    monkeypatch.setattr(Store, "get_experiment", then_a_sync_commits)
    code, out, _ = run("show", "hpo-a1", "--format", "json", db=copy)
    assert code == 0
    shown = json.loads(out)
    assert shown["Status"] == "FAILED"
    assert [h["NewValue"] for h in shown["History"] if h["Field"] == "Status"][-1] == "FAILED"


def test_show_json(run: Run) -> None:
    record = run.json("show", "hpo-a1")
    assert record["ExperimentId"] == "hpo-a1" and record["Status"] == "FAILED"
    assert [list(h) for h in record["History"]] == [list(render.CHANGE_FIELDS)] * 4
    history = record["History"]
    assert [(h["Field"], h["OldValue"], h["NewValue"], h["Baseline"]) for h in history] == [
        ("Status", None, "RUNNING", True),
        ("TrialStatus", None, '{"RUNNING":2,"SUCCEEDED":3}', True),
        ("Status", "RUNNING", "FAILED", False),
        ("TrialStatus", '{"RUNNING":2,"SUCCEEDED":3}', '{"FAILED":3,"SUCCEEDED":3}', False),
    ]  # fmt: skip


def test_show_csv_is_the_ls_csv_record(run: Run) -> None:
    """``show ID --format csv``: the experiment as one record, the very header and cells of
    ``ls --format csv``; its history is ``history ID --format csv``."""
    for exp_id, ls_argv in (("hpo-a1", ["--workspace", "ws-a"]), ("hpo-a4", ["--include-deleted"])):
        out = run.ok("show", exp_id, "--format", "csv")
        header, *lines = out.splitlines()
        listed = run.ok("ls", *ls_argv, "--format", "csv", "--limit", "0").splitlines()
        assert header == listed[0] == ",".join(render.EXPERIMENT_FIELDS)
        assert len(lines) == 1 and lines[0] in listed[1:]
        assert next(csv.DictReader(io.StringIO(out)))["ExperimentId"] == exp_id
    help_text = " ".join(dict(subcommands())["show"].format_help().split())
    assert "hpo-sync history ID --format csv" in help_text


def test_show_deleted_experiment(run: Run) -> None:
    record = run.json("show", "hpo-a4")
    assert record["Deleted"] is True
    assert [h["Field"] for h in record["History"]] == ["Status", "Deleted"]


def test_show_and_history_of_an_unknown_id_fail_with_exit_1(run: Run) -> None:
    for cmd in ("show", "history"):
        code, out, err = run(cmd, "hpo-nope")
        assert (code, out) == (1, "")
        assert err.startswith("hpo-sync: no experiment 'hpo-nope' in the mirror")
        assert "hpo-sync ls" in err and len(err.splitlines()) == 1


def test_history_shows_everything_in_id_order_by_default(run: Run, db: Path) -> None:
    with Store.open(db, readonly=True) as store:
        every = store.history()
    jsonl = run.ok("history", "--limit", "0", "--format", "jsonl")
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["Id"] for r in records] == [c.id for c in every]
    assert any(r["Baseline"] for r in records) and not all(r["Baseline"] for r in records)
    # --limit N: the latest N, still oldest first.
    latest = run.json("history", "--limit", "3")
    assert [r["Id"] for r in latest] == [c.id for c in every[-3:]]
    _, out, err = run("history")
    assert len(out.splitlines()) == 1 + cli_query.DEFAULT_LIMIT
    assert "showing the latest 50" in err
    for fmt in ("json", "csv"):
        code, _, err = run("history", "--format", fmt)
        assert code == 0 and "wrote the latest 50; --limit N for more" in err, fmt
    assert run("history", "--format", "json", "--limit", "0")[2] == ""


def test_history_limit_streams_in_keyset_pages(
    run: Run, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--limit N`` shows the latest N oldest first without holding them: the mirror is
    asked for at most a page of rows at a time, however large N is."""
    with Store.open(db, readonly=True) as store:
        every = [c.id for c in store.history()]
    assert len(every) > 2 * cli_query.PAGE_SIZE
    fetched: list[int] = []
    real = Store.history

    def spy(self: Store, *args: Any, **kwargs: Any) -> Any:
        rows = real(self, *args, **kwargs)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(Store, "history", spy)
    n = len(every) - 7  # more than two pages, and some left out
    code, out, err = run("history", "--limit", str(n), "--format", "jsonl")
    assert code == 0 and f"wrote the latest {n}; --limit N for more" in err
    assert [json.loads(line)["Id"] for line in out.splitlines()] == every[-n:]
    assert fetched and max(fetched) <= cli_query.PAGE_SIZE, fetched
    fetched.clear()
    code, out, err = run("history", "--limit", str(cli_query.MAX_LIMIT), "--format", "jsonl")
    assert code == 0 and err == ""
    assert [json.loads(line)["Id"] for line in out.splitlines()] == every
    assert max(fetched) <= cli_query.PAGE_SIZE, fetched
    # The same rows as before for a filtered selection, and exactly N of them.
    fetched.clear()
    ids = [r["Id"] for r in run.json("history", "--workspace", "ws-bulk", "--limit", "501")]
    assert ids == [i for i in every if i in set(ids)][-501:] and len(ids) == 501
    assert max(fetched) <= cli_query.PAGE_SIZE, fetched


def test_history_filters(run: Run) -> None:
    def fields(*argv: str) -> list[tuple[str, str, str | None, str | None]]:
        return [
            (r["ExperimentId"], r["Field"], r["OldValue"], r["NewValue"])
            for r in run.json("history", *argv)
        ]

    non_baseline = fields("--no-baseline", "--limit", "0")
    assert non_baseline == [
        ("hpo-a1", "Status", "RUNNING", "FAILED"),
        ("hpo-a1", "TrialStatus", '{"RUNNING":2,"SUCCEEDED":3}', '{"FAILED":3,"SUCCEEDED":3}'),
        ("hpo-a3", "Status", "RUNNING", "FINISHED"),
        ("hpo-a3", "TrialStatus", '{"RUNNING":1}', '{"SUCCEEDED":1}'),
        ("hpo-a6", "Status", None, "RUNNING"),
        ("hpo-b1", "Status", "RUNNING", "FAILED"),
        ("hpo-b1", "TrialStatus", "{}", '{"FAILED":1}'),
    ]
    assert fields("hpo-a3", "--no-baseline") == non_baseline[2:4]
    assert [f[0] for f in fields("--field", "status", "--no-baseline")] == [
        "hpo-a1", "hpo-a3", "hpo-a6", "hpo-b1",
    ]  # fmt: skip
    assert fields("--field", "Deleted") == [("hpo-a4", "Deleted", None, "true")]
    assert fields("--since", "2024-03-02T06:00:00Z") == non_baseline
    assert fields("--since", "2024-03-03") == non_baseline[5:]
    assert fields("--workspace", "ws-b", "--no-baseline") == non_baseline[5:]
    assert fields("--workspace", "ws-b", "--limit", "0")[0] == ("hpo-b1", "Status", None, "RUNNING")


def test_history_since_an_age_is_relative_to_now(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_query, "utc_now", lambda: datetime(2024, 3, 3, 12, tzinfo=UTC))
    assert [r["ExperimentId"] for r in run.json("history", "--since", "1d")] == ["hpo-b1"] * 2
    assert len(run.json("history", "--since", "36h")) == 7
    assert run.json("history", "--since", "36H") == run.json("history", "--since", "36h")
    err = run.usage_error("history", "--since", "5M")
    assert "m is minutes (M is not read); for months give a date" in err
    # "5 days ago" written with a minus sign, as its own word or joined: what to write instead
    for argv in (["--since", "-5d"], ["--since=-5d"]):
        err = run.usage_error("history", *argv)
        assert "'-5d': an age counts back from now, without a sign: write 5d" in err, argv
    err = run.usage_error("ls", "--created-after", "-5d")
    assert "cannot read '-5d' as a time" in err


def test_text_arguments_that_are_not_utf8_are_usage_errors(run: Run) -> None:
    """Bytes that are not UTF-8 in a text argument (Python holds them as lone surrogates):
    exit 2 naming the argument, not a traceback from the query that meets them."""
    bad = os.fsdecode(b"a\xff")
    for argv, named in (
        (["ls", "--name", bad], "--name"),
        (["ls", "--tag", f"{bad}=v"], "--tag"),
        (["ls", f"--status={bad}"], "--status"),
        (["history", "--workspace", bad], "--workspace"),
        (["show", bad], "ID"),
        (["stats", "--workspace", bad], "--workspace"),
        (["export", "--workspace", bad], "--workspace"),
    ):
        code, out, err = run(*argv)
        assert code == 2 and out == "", argv
        assert err.startswith(f"hpo-sync: {named} a\\xff") and "not valid UTF-8" in err, err
        assert "Traceback" not in err


def test_history_table(run: Run) -> None:
    out = run.ok("history", "--no-baseline")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "OBSERVED", "EXPERIMENT", "NAME", "WORKSPACE", "FIELD", "CHANGE", "RUN",
    ]  # fmt: skip
    assert re.search(
        r"2024-03-02 06:00\s+hpo-a1\s+bert-sweep\s+ws-a\s+Status\s+RUNNING → FAILED\s+#4$",
        lines[1],
    )
    assert "RUNNING 2, SUCCEEDED 3 → FAILED 3, SUCCEEDED 3" in lines[2]
    assert len(lines) == 8


def test_history_csv(run: Run) -> None:
    rows = list(csv.DictReader(io.StringIO(run.ok("history", "--format", "csv", "hpo-b1"))))
    assert [(r["Field"], r["OldValue"], r["NewValue"], r["Baseline"]) for r in rows] == [
        ("Status", "", "RUNNING", "true"),
        ("Status", "RUNNING", "FAILED", "false"),
        ("TrialStatus", "{}", '{"FAILED":1}', "false"),
    ]


# --- export ---------------------------------------------------------------------------------


def test_export_experiments_jsonl_includes_deleted(run: Run) -> None:
    out = run.ok("export")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == BULK + 9  # every row, deleted ones too
    by_id = {r["ExperimentId"]: r for r in records}
    assert by_id["hpo-a4"]["Deleted"] is True
    assert by_id["hpo-a1"] == next(
        e for e in run.json("ls", "--workspace", "ws-a") if e["ExperimentId"] == "hpo-a1"
    )


def test_export_changes_csv_to_a_file(run: Run, db: Path, tmp_path: Path) -> None:
    dest = tmp_path / "changes.csv"
    code, out, err = run("export", "--kind", "changes", "--format", "csv", "--output", str(dest))
    assert (code, out) == (0, "")
    assert f"exported {BULK + 19} changes rows to {dest}" in err
    with dest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with Store.open(db, readonly=True) as store:
        every = store.history()
    assert [int(r["Id"]) for r in rows] == [c.id for c in every]
    assert list(rows[0]) == list(render.CHANGE_FIELDS)
    assert not list(tmp_path.glob(".*partial"))


def test_export_never_replaces_the_mirror_nor_what_is_not_a_regular_file(
    run: Run, db: Path, tmp_path: Path
) -> None:
    mirror = tmp_path / "copy.db"
    shutil.copy(db, mirror)
    before = hashlib.sha256(mirror.read_bytes()).hexdigest()
    link = tmp_path / "to-the-mirror.jsonl"
    link.symlink_to(mirror)
    for target in (mirror, Path(f"{mirror}-wal"), Path(f"{mirror}.lock"), link):
        code, out, err = run("export", "--output", str(target), db=mirror)
        assert (code, out) == (2, "") and "is the mirror's own file" in err, err
    assert hashlib.sha256(mirror.read_bytes()).hexdigest() == before
    expected = run.ok("export")

    # through a symlink: its target gets the export, the link stays a link
    target = tmp_path / "target.jsonl"
    target.write_text("old\n")
    alias = tmp_path / "alias.jsonl"
    alias.symlink_to(target)
    assert run("export", "--output", str(alias))[0] == 0
    assert alias.is_symlink() and target.read_text() == expected

    # a FIFO is written into, not replaced by a file
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert run("export", "--output", str(fifo))[0] == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and got == [expected]

    err = run.usage_error("export", "--output", str(tmp_path))
    assert f"{tmp_path} is a directory" in err


def test_export_by_workspace_and_sync_runs(run: Run) -> None:
    ws_b = [json.loads(x) for x in run.ok("export", "--workspace", "ws-b").splitlines()]
    assert [r["ExperimentId"] for r in ws_b] == ["hpo-b1", "hpo-b2"]
    changes = run.ok("export", "--kind", "changes", "--workspace", "ws-b", "--format", "jsonl")
    assert {json.loads(x)["WorkspaceId"] for x in changes.splitlines()} == {"ws-b"}
    runs_csv = run.ok("export", "--kind", "sync_runs", "--format", "csv")
    runs = list(csv.DictReader(io.StringIO(runs_csv)))
    assert [(r["WorkspaceId"], r["Mode"], r["Status"]) for r in runs] == [
        ("ws-a", "full", "ok"), ("ws-b", "full", "ok"), ("ws-bulk", "full", "ok"),
        ("ws-a", "hot", "ok"), ("ws-b", "hot", "ok"),
    ]  # fmt: skip
    assert list(runs[0]) == list(render.SYNC_RUN_FIELDS)


def test_a_repeated_workspace_selects_each_in_history_export_and_stats(run: Run) -> None:
    """--workspace given twice used to keep only the last one, silently; as in ls, each
    repeat adds one."""
    both = ("--workspace", "ws-a", "--workspace", "ws-b")
    history = run.json("history", "--limit", "0", *both)
    assert {r["WorkspaceId"] for r in history} == {"ws-a", "ws-b"}
    every = run.json("history", "--limit", "0")
    assert len(history) == len([r for r in every if r["WorkspaceId"] in ("ws-a", "ws-b")])
    exported = [json.loads(x) for x in run.ok("export", *both).splitlines()]
    assert sorted({r["WorkspaceId"] for r in exported}) == ["ws-a", "ws-b"]
    runs = run.ok("export", "--kind", "sync_runs", "--format", "csv", *both)
    assert {r["WorkspaceId"] for r in csv.DictReader(io.StringIO(runs))} == {"ws-a", "ws-b"}
    stats = run.json("stats", "--since", "2024-03-01", *both)
    assert [w["WorkspaceId"] for w in stats["Workspaces"]] == ["ws-a", "ws-b"]
    alone = run.json("stats", "--since", "2024-03-01", "--workspace", "ws-b")
    assert alone["Workspaces"] == stats["Workspaces"][1:]


# --- stats ----------------------------------------------------------------------------------


def test_stats_json(run: Run) -> None:
    data = run.json("stats", "--since", "2024-03-01")
    assert data["Since"] == T0
    by_ws = {w["WorkspaceId"]: w for w in data["Workspaces"]}
    assert list(by_ws) == ["ws-a", "ws-b", "ws-bulk"]
    a = by_ws["ws-a"]
    assert a["CountsByStatus"] == {
        "RUNNING": 1, "WAITING": 1, "CREATED": 1, "FINISHED": 2, "FAILED": 1,
    }  # fmt: skip
    assert a["Experiments"] == 6
    # hpo-a1 ran 68 h (from its create time: RUNNING was first seen by the baseline), hpo-a3 42 h.
    assert (a["Ended"], a["Failed"], a["FailureRate"]) == (2, 1, 0.5)
    assert a["EndedByStatus"] == {"FAILED": 1, "FINISHED": 1}
    assert a["MedianRunTimeS"] == 55 * 3600 and a["RunsTimed"] == 2
    b = by_ws["ws-b"]
    assert (b["Ended"], b["Failed"], b["FailureRate"]) == (1, 1, 1.0)
    assert b["MedianRunTimeS"] == 120 * 3600
    # Baseline finishes are not counted: nobody knows when they happened.
    assert by_ws["ws-bulk"]["Ended"] == 0 and by_ws["ws-bulk"]["FailureRate"] is None
    only_b = run.json("stats", "--since", "2024-03-01", "--workspace", "ws-b")
    assert [w["WorkspaceId"] for w in only_b["Workspaces"]] == ["ws-b"]
    later = run.json("stats", "--since", "2024-03-02T12:00:00Z")
    assert [w["Ended"] for w in later["Workspaces"]] == [0, 1, 0]


def test_stats_says_which_ended_runs_its_median_leaves_out(run: Run, tmp_path: Path) -> None:
    """A restart that no sync saw RUNNING (seen FINISHED, then NO_MORE_TRIAL, then FINISHED)
    has no known start: it ended, and counts so, but has no run time. The median was over
    fewer runs than ENDED, and nothing said so."""
    db = tmp_path / "restarted.db"
    created = "2024-02-01T00:00:00Z"
    with Store.open(db) as store:
        sweep(store, "ws-u", T0, [raw("hpo-u1", "ws-u", "u", "FINISHED", created),
                                  raw("hpo-u2", "ws-u", "v", "RUNNING", created)],
              baseline=True, complete=True)  # fmt: skip
        sweep(store, "ws-u", "2024-03-01T01:00:00Z",
              [raw("hpo-u1", "ws-u", "u", "NO_MORE_TRIAL", created)],
              baseline=False, complete=False)  # fmt: skip
        sweep(store, "ws-u", "2024-03-01T02:00:00Z",
              [raw("hpo-u1", "ws-u", "u", "FINISHED", created),
               raw("hpo-u2", "ws-u", "v", "FAILED", created)],
              baseline=False, complete=False)  # fmt: skip
    code, out, _ = run("stats", "--since", T0, "--format", "json", db=db)
    assert code == 0
    (u,) = json.loads(out)["Workspaces"]
    assert (u["Ended"], u["RunsTimed"]) == (2, 1)
    assert u["MedianRunTimeS"] == (29 * 24 + 2) * 3600  # hpo-u2, from its create time
    code, table, _ = run("stats", "--since", T0, db=db)
    assert code == 0
    assert "The median leaves out runs with no known start" in table and "ws-u 1 of 2" in table
    assert "leaves out" not in run.ok("stats", "--since", T0)  # every run there is timed


def test_stats_default_window_is_the_last_7_days(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_query, "utc_now", lambda: datetime(2024, 3, 8, 3, tzinfo=UTC))
    data = run.json("stats")
    assert data["Since"] == "2024-03-01T03:00:00Z"
    assert [w["Ended"] for w in data["Workspaces"]] == [2, 1, 0]
    monkeypatch.setattr(cli_query, "utc_now", lambda: datetime(2024, 3, 11, tzinfo=UTC))
    assert [w["Ended"] for w in run.json("stats")["Workspaces"]] == [0, 0, 0]


def test_stats_of_an_unknown_workspace_names_it_and_not_an_empty_mirror(run: Run) -> None:
    code, out, err = run("stats", "--workspace", "ws-typo")
    assert (code, out) == (0, "")
    assert "workspace 'ws-typo' is not in the mirror (it has: ws-a, ws-b, ws-bulk)" in err
    assert "no workspaces yet" not in err  # the mirror has three
    assert run.json("stats", "--workspace", "ws-typo")["Workspaces"] == []


def test_stats_table(run: Run) -> None:
    out = run.ok("stats", "--since", "2024-03-01")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["WORKSPACE", "TOTAL", "RUNNING", "WAITING"]
    assert lines[0].endswith("ENDED  ENDED FAILED  FAILURE RATE  MEDIAN RUN")
    assert re.search(r"^ws-a\s+6\s+1\s+1\s+1\s+2\s+1\s+2\s+1\s+50\.0%\s+2d 7h$", lines[1])
    assert re.search(r"^ws-b\s+2\s+0\s+0\s+0\s+0\s+2\s+1\s+1\s+100\.0%\s+5d 0h$", lines[2])
    assert re.search(rf"^ws-bulk\s+{BULK}\s.*\s0\s+0\s+-\s+-$", lines[3])
    assert "Since 2024-03-01T00:00:00Z: the runs that ENDED" in out


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls", "--created-after", "soon"], "argument --created-after: cannot read 'soon'"),
        (["ls", "--created-before", "2024-13-01"], "cannot read '2024-13-01' as a time"),
        (["ls", "--created-after", "20240301"], "cannot read '20240301'"),
        (["ls", "--tag", "team"], "argument --tag: expected KEY=VALUE, got 'team'"),
        (["ls", "--tag", "=nlp"], "expected KEY=VALUE"),
        (["ls", "--sort", "size"], "argument --sort: invalid choice: 'size'"),
        (["ls", "--limit", "-1"], "argument --limit: must be 0 (no limit) or more"),
        (["ls", "--limit", "ten"], "argument --limit: expected a whole number"),
        (["ls", "--limit", str(10**30)], "argument --limit: must be at most 1,000,000,000"),
        (["history", "--limit", str(10**30)], "argument --limit: must be at most"),
        (["history", "--limit", "1" * 5000], "argument --limit: must be at most"),
        (["history", "--since", "800000d"], "argument --since: the age '800000d' reaches back"),
        (["history", "--since", "9" * 5000 + "d"], "reaches back too far"),
        (["stats", "--since", "800000d"], "argument --since: the age '800000d' reaches back"),
        (["stats", "--since", "99999999999999999999w"], "give a date for an earlier time"),
        (["ls", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["history", "--since", "7"], "cannot read '7' as a time"),
        (["history", "--since", "7y"], "or an age such as 12h, 7d, 2w"),
        (["history", "--field", "Name"], "argument --field: invalid choice: 'Name'"),
        (["stats", "--since", "last week"], "argument --since: cannot read 'last week'"),
        (["export", "--format", "json"], "argument --format: invalid choice: 'json'"),
        (["export", "--kind", "workspaces"], "argument --kind: invalid choice"),
        (["export", "--output", "/no/such/dir/x.csv"], "directory /no/such/dir does not exist"),
        (["export", "--output", ""], "--output: empty path; name a file, or - for standard output"),
        (["show"], "the following arguments are required: ID"),
        (
            ["ls", "--name", "a" * 60_000],
            "argument --name: at most 1,000 bytes of UTF-8, got 60,000",
        ),
        (["ls", "--name", "中" * 16_700], "argument --name: at most 1,000 bytes of UTF-8"),
        (["ls", "--name", "_" * 25_000], "argument --name: at most 1,000 bytes of UTF-8"),
        (["ls", "--name", "_" * 1001], "argument --name: at most 1,000 bytes of UTF-8, got 1,001"),
    ],
)
def test_bad_arguments_exit_2_with_one_message(run: Run, argv: list[str], message: str) -> None:
    err = run.usage_error(*argv)
    assert message in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_an_output_through_a_dangling_symlink_names_the_missing_directory(
    run: Run, tmp_path: Path
) -> None:
    """It named the link's own directory, which exists."""
    link = tmp_path / "latest.jsonl"
    link.symlink_to(tmp_path / "gone" / "deeper" / "x.jsonl")
    err = run.usage_error("export", "--output", str(link))
    assert f"directory {tmp_path / 'gone' / 'deeper'} does not exist" in err


def test_missing_mirror_exits_1(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    for argv in (["ls"], ["show", "x"], ["history"], ["export"], ["stats"]):
        code, out, err = run(*argv, db=missing)
        assert (code, out) == (1, "")
        hint = "run `hpo-sync sync` first (or pass --db PATH)"
        assert err == f"hpo-sync: no mirror at {missing} — {hint}\n"
    assert not missing.exists()  # read-only: nothing is created


def test_a_path_too_long_for_the_file_system_is_a_usage_error_not_a_traceback(
    run: Run, tmp_path: Path
) -> None:
    too_long = tmp_path / ("a" * 5000)
    for argv in (["ls"], ["show", "x"], ["history"], ["export"], ["stats"], ["alerts", "list"]):
        code, out, err = run(*argv, db=too_long)
        assert (code, out) == (2, ""), argv
        assert err.startswith("hpo-sync: File name too long: ") and "(5" in err, err[:300]
        assert "Traceback" not in err and len(err) < 300
    code, out, err = run("export", "--output", str(too_long))
    assert code == 2 and "File name too long" in err and "Traceback" not in err


def test_an_empty_db_is_a_usage_error_not_the_configs_mirror(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--db "$DB"` with DB unset used to read whatever mirror the config names, exit 0."""
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{run.db}"\n')
    monkeypatch.setenv("HPO_SYNC_CONFIG", str(config))
    commands = (
        ["ls"],
        ["show", "x"],
        ["history"],
        ["export"],
        ["stats"],
        ["backup", "x.db"],
        ["serve"],
    )
    for argv in commands:
        run.capsys.readouterr()
        code = cli.main([*argv, "--db", " "])
        out, err = run.capsys.readouterr()
        assert (code, out) == (2, ""), err
        assert err == "hpo-sync: --db: empty path; name the mirror's file\n"


def test_a_directory_given_as_the_mirror_is_named_as_such(run: Run, tmp_path: Path) -> None:
    """Not 'an I/O error occurred; check the disk': nothing is wrong with the disk. A usage
    error (2), as a config's ``[store] path`` naming a directory is a config error (2)."""
    for argv in (["ls"], ["show", "x"], ["history"], ["export"], ["stats"]):
        code, out, err = run(*argv, db=tmp_path)
        assert (code, out) == (2, "")
        assert f"--db: {tmp_path} is a directory, not a mirror file" in err
        assert "check the disk" not in err and "Traceback" not in err
    for argv in (["alerts", "list"], ["backup", str(tmp_path / "copy.db")], ["serve"]):
        run.capsys.readouterr()
        assert cli.main([*argv, "--db", str(tmp_path)]) == 2
        out, err = run.capsys.readouterr()
        assert out == "" and f"--db: {tmp_path} is a directory, not a mirror file" in err


def test_a_file_that_is_not_a_mirror_exits_1(run: Run, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello\n" * 100)
    code, out, err = run("ls", db=bogus)
    assert (code, out) == (1, "")
    assert err.startswith("hpo-sync: ") and "Traceback" not in err


def damaged_copy(db: Path, dest: Path) -> Path:
    """A copy of the mirror whose schema reads fine but whose table pages are garbage."""
    conn = sqlite3.connect(db)
    conn.execute("VACUUM INTO ?", (str(dest),))
    first = min(
        root
        for (root,) in conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name IN ('experiments', 'changes')"
        )
    )
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    data = bytearray(dest.read_bytes())
    start = (first - 1) * page_size
    data[start:] = bytes((i * 7) % 251 for i in range(len(data) - start))
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("kind", ["experiments", "changes"])
def test_export_of_a_damaged_mirror_exits_1_without_a_traceback(
    run: Run, db: Path, tmp_path: Path, kind: str
) -> None:
    bad = damaged_copy(db, tmp_path / "damaged.db")
    code, _, err = run("export", "--kind", kind, db=bad)
    assert code == 1
    assert err.startswith(f"hpo-sync: exporting {kind} failed on {bad}: ")
    assert "restore it from a backup" in err and "Traceback" not in err
    dest = tmp_path / "out.jsonl"
    code, _, err = run("export", "--kind", kind, "--output", str(dest), db=bad)
    assert code == 1 and "restore it from a backup" in err
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # nor a partial one


def test_a_stored_text_that_is_not_utf8_is_one_line_naming_the_column_not_its_bytes(
    run: Run, db: Path, tmp_path: Path
) -> None:
    """Python's sqlite3 raises this itself (no SQLite error code), quoting the stored text,
    newlines and all: four lines of someone's config text, and no word of damage."""
    bad = tmp_path / "bad-text.db"
    conn = sqlite3.connect(db)
    conn.execute("VACUUM INTO ?", (str(bad),))
    conn.close()
    conn = sqlite3.connect(bad)
    conn.execute(
        "UPDATE experiments SET config_ini = CAST(x'5b6a6f625d0a7365637265743d310aff' AS TEXT)"
    )
    conn.commit()
    conn.close()
    for argv in (["ls", "--limit", "0", "--format", "json"], ["export"]):
        code, _, err = run(*argv, db=bad)
        assert code == 1, argv
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "'config_ini'" in err and "restore it from a backup" in err, err
        assert "secret" not in err and "[job]" not in err, err


def test_a_read_that_cannot_create_the_shm_file_says_why() -> None:
    """A WAL mirror no process has open, in a directory this user cannot write (the
    service's, while it is stopped): SQLite must create the -shm file to read it. The error
    spoke of a read-only database, to a command that only reads."""
    error = sqlite3.OperationalError("attempt to write a readonly database")
    error.sqlite_errorname = "SQLITE_READONLY_DIRECTORY"  # type: ignore[attr-defined]
    with pytest.raises(StoreError) as caught, store_mod._mapped("/srv/m/mirror.db", "reading"):
        raise error
    message = str(caught.value)
    assert "mirror.db-shm" in message and "cannot write to /srv/m" in message


def test_without_db_the_config_store_path_is_used(
    capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HPO_SYNC_CONFIG", raising=False)
    args = argparse.Namespace(db=None, config=str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="or name the mirror with --db PATH"):
        cli_query._open_store(args)
    assert cli.main(["ls", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "--db PATH" in capsys.readouterr().err


def test_read_only_open_leaves_the_mirror_untouched(run: Run, db: Path) -> None:
    before = db.stat().st_mtime_ns, db.read_bytes()
    run.ok("ls", "--limit", "0")
    run.ok("export", "--kind", "changes")
    assert (db.stat().st_mtime_ns, db.read_bytes()) == before


# --- as a real process ----------------------------------------------------------------------


def hpo_sync(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HPO_SYNC_CONFIG", None)
    if "stdout" not in kw:
        kw["capture_output"] = True
    return subprocess.run(
        [sys.executable, "-m", "hpo_sync.cli", *argv],
        text=True, timeout=60, env=env, check=False, **kw,
    )  # fmt: skip


def test_exit_codes_of_a_real_process(db: Path, tmp_path: Path) -> None:
    proc = hpo_sync("ls", "--db", str(db), "--status", "FAILED", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert [e["ExperimentId"] for e in json.loads(proc.stdout)] == ["hpo-a1", "hpo-b1", "hpo-b2"]
    proc = hpo_sync("ls", "--db", str(db), "--tag", "team")
    assert proc.returncode == 2 and "expected KEY=VALUE" in proc.stderr and not proc.stdout
    proc = hpo_sync("show", "hpo-nope", "--db", str(db))
    assert proc.returncode == 1 and "no experiment 'hpo-nope'" in proc.stderr
    proc = hpo_sync("stats", "--db", str(tmp_path / "absent.db"))
    assert proc.returncode == 1 and "run `hpo-sync sync` first" in proc.stderr


def test_config_warnings_never_reach_a_commands_output(db: Path, tmp_path: Path) -> None:
    token = tmp_path / "api-token"
    token.write_text("a-token-value\n")
    token.chmod(0o644)  # warned about while the config loads
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\npath = "{db}"\n[[workspaces]]\nid = "ws1"\n'
        f'[[api.tokens]]\nname = "t"\ntoken_file = "{token}"\n'
    )
    proc = hpo_sync("--config", str(config), "check-config")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.split("\n", 1)[1])["store"]["path"] == str(db)
    assert "config.secret_file_exposed" in proc.stderr and "a-token-value" not in proc.stderr
    # a read command reads the config's [store] and nothing else: not the secret file
    proc = hpo_sync("--config", str(config), "ls", "--format", "json", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 2
    assert "secret" not in proc.stderr and "a-token-value" not in proc.stderr


def test_a_config_error_is_one_line_without_the_secret(db: Path, tmp_path: Path) -> None:
    """A literal url's warning waits for a config that loads; a secret pasted into url_env is
    not echoed in the error."""
    config = tmp_path / "c.toml"
    target = '[[alerts.targets]]\nname = "t"\ntype = "slack"\n'
    base = f'[store]\npath = "{db}"\n[[workspaces]]\nid = "ws1"\n{target}'
    canary = "https://hooks.slack.com/services/T0/B0/CANARYSLACKHOOK01xyz"
    config.write_text(f'{base}url = "{canary}"\n[[alerts.rules]]\nname = "r"\ntargets = ["x"]\n')
    proc = hpo_sync("--config", str(config), "check-config")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr == (
        "hpo-sync: config error: alerts.rules[0].targets (line 11): no target named 'x'\n"
    )
    config.write_text(f'{base}url_env = "{canary}"\n')
    proc = hpo_sync("--config", str(config), "check-config")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.startswith("hpo-sync: config error: alerts.targets[0].url_env (line 8): ")
    assert proc.stderr.count("\n") == 1 and "CANARY" not in proc.stderr


def test_a_store_path_naming_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """check-config used to call it OK, then sync, run and serve exited 1 without naming
    the key."""
    config = tmp_path / "c.toml"
    config.write_text(f'[store]\npath = "{tmp_path}"\n[[workspaces]]\nid = "ws1"\n')
    for command in ("check-config", "sync"):
        proc = hpo_sync("--config", str(config), command)
        assert proc.returncode == 2 and not proc.stdout, proc.stderr
        assert proc.stderr == (
            f"hpo-sync: config error: store.path (line 2): {tmp_path} is a directory, not a "
            f"mirror file: name the database file itself (e.g. {tmp_path / 'mirror.db'})\n"
        )


def test_check_config_refuses_what_run_refuses(db: Path, tmp_path: Path) -> None:
    """An API listening beyond loopback without tokens: `run` exits 2 on it, so
    `check-config` must not call the same file OK."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\npath = "{db}"\n[[workspaces]]\nid = "ws1"\n[api]\nlisten = "0.0.0.0:8787"\n'
    )
    proc = hpo_sync("--config", str(config), "check-config")
    assert proc.returncode == 2 and "api.listen (line 6): " in proc.stderr, proc.stderr
    assert "OK" not in proc.stdout
    # `run` refuses it the same way, before it starts anything (no sweep process)
    proc = hpo_sync("--config", str(config), "run", "--log-format", "json")
    assert proc.returncode == 2 and "api.listen (line 6): " in proc.stderr, proc.stderr
    assert "sync.process_started" not in proc.stderr
    # `serve` names the flag when the address came from it
    proc = hpo_sync("serve", "--db", str(db), "--listen", "0.0.0.0:0")
    assert proc.returncode == 2 and "--listen: " in proc.stderr, proc.stderr
    config.write_text(config.read_text().replace("0.0.0.0", "127.0.0.1"))
    assert hpo_sync("--config", str(config), "check-config").returncode == 0


def test_read_commands_need_only_the_configs_store_section(db: Path, tmp_path: Path) -> None:
    """An operator queries the production mirror without the daemon's environment: the
    token and webhook variables it names are not set here."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\npath = "{db}"\n[[workspaces]]\nid = "ws1"\n'
        '[[api.tokens]]\nname = "t"\ntoken_env = "HPO_SYNC_TEST_UNSET_TOKEN"\n'
        '[alerts]\n[[alerts.targets]]\nname = "s"\ntype = "slack"\n'
        'url_env = "HPO_SYNC_TEST_UNSET_URL"\n'
    )
    for argv in (("ls", "--limit", "1"), ("history", "--limit", "1"), ("stats",),
                 ("alerts", "list")):  # fmt: skip
        proc = hpo_sync("--config", str(config), *argv)
        assert proc.returncode == 0, (argv, proc.stderr)
    proc = hpo_sync("--config", str(config), "sync")  # the daemon's side needs them all
    assert proc.returncode == 2 and "HPO_SYNC_TEST_UNSET" in proc.stderr
    # [store] itself is still checked, and named
    config.write_text('[store]\npath = ""\n')
    proc = hpo_sync("--config", str(config), "ls")
    assert proc.returncode == 2 and "store.path" in proc.stderr, proc.stderr
    config.write_text('[stores]\npath = "x"\n')
    proc = hpo_sync("--config", str(config), "ls")
    assert proc.returncode == 2 and "stores" in proc.stderr, proc.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "command", [("ls", "--limit", "0"), ("history", "--format", "csv"), ("export",)]
)
def test_a_full_disk_on_standard_output_is_one_clear_error(
    db: Path, command: tuple[str, ...]
) -> None:
    with open("/dev/full", "w") as full:
        proc = hpo_sync(*command, "--db", str(db), stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1
    assert proc.stderr == "hpo-sync: cannot write standard output: No space left on device\n"


@pytest.mark.parametrize(
    "command", [("ls", "--workspace", "ws-a"), ("show", "hpo-a7", "--format", "json"), ("export",)]
)
def test_a_standard_output_that_cannot_encode_a_name_is_one_clear_error(
    db: Path, command: tuple[str, ...]
) -> None:
    """Standard output in a locale's encoding that lacks a character of the mirror (a CJK
    name on a Latin-1 terminal) ended in a traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "latin-1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hpo_sync.cli", *command, "--db", str(db)],
        capture_output=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    err = proc.stderr.decode("latin-1")
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert err == (
        "hpo-sync: cannot write standard output: its encoding (latin-1) has no U+4E2D; "
        "use a UTF-8 locale, or set PYTHONIOENCODING=utf-8\n"
    )


@pytest.mark.parametrize(
    ("command", "read"),
    [
        (("export", "--kind", "changes"), 100),  # like `| head -c 100`
        (("ls", "--limit", "0", "--format", "json"), 10),  # a walk stopped mid-page
        (("ls", "--limit", "0", "--format", "jsonl"), 10),
        (("ls", "--limit", "0", "--format", "csv"), 10),
        (("ls", "--help"), 0),  # gone before the first line
        (("check-config",), 0),
    ],
)
def test_a_closed_pipe_ends_the_command_quietly(
    db: Path, tmp_path: Path, command: tuple[str, ...], read: int
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = tmp_path / "c.toml"
    config.write_text(f'[store]\npath = "{db}"\n[[workspaces]]\nid = "1"\n')
    args = [*command, "--config", str(config)]
    if command[0] == "export" or "--limit" in command:
        args = [*command, "--db", str(db)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo_sync.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    with proc, proc.stderr:
        if read:
            proc.stdout.read(read)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


# --- against a mirror written by a real sync ------------------------------------------------


async def test_queries_of_a_mirror_synced_from_the_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpo_sync.client import UpstreamClient
    from hpo_sync.config import Config, StoreConfig, UpstreamConfig, WorkspaceConfig
    from hpo_sync.credentials import CloudCredentials, StaticCredentials
    from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
    from hpo_sync.sim.server import SimOptions, Simulator
    from hpo_sync.sync import SyncEngine

    path = tmp_path / "mirror.db"
    start = datetime(2026, 11, 2, 8, tzinfo=UTC)
    options = SimOptions(experiments=400, workspaces=2, seed=7, start_time=start)
    async with Simulator(options) as sim:
        config = Config(
            upstream=UpstreamConfig(endpoint=sim.base_url, max_qps=500.0, max_concurrency=4),
            store=StoreConfig(path),
            workspaces=tuple(WorkspaceConfig(ws) for ws in sim.world.workspace_ids),
        )
        creds = StaticCredentials(
            CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
        )
        with Store.open(path) as store:
            async with UpstreamClient(config.upstream, creds) as client:
                engine = SyncEngine(config, client, store, clock=lambda: sim.world.now)
                for ws in sim.world.workspace_ids:
                    await engine.sweep(ws, "full")
                for _ in range(3):
                    sim.world.advance(1800)
                    for ws in sim.world.workspace_ids:
                        await engine.sweep(ws)
                for ws in sim.world.workspace_ids:  # hot sweeps leave some deletions to it
                    await engine.sweep(ws, "full")
            all_changes = store.history()
        truth = {e["ExperimentId"]: e for e in sim.world.truth()}

    def query(*argv: str) -> str:
        capsys.readouterr()
        assert cli.main([*argv, "--db", str(path)]) == 0
        return capsys.readouterr().out

    listed = [json.loads(x) for x in query("ls", "--limit", "0", "--format", "jsonl").splitlines()]
    assert {e["ExperimentId"] for e in listed} == set(truth)
    for e in listed:
        assert e["Status"] == truth[e["ExperimentId"]]["Status"]
    ws = sim.world.workspace_ids[0]
    running = json.loads(
        query("ls", "--workspace", ws, "--status", "RUNNING", "--limit", "0", "--format", "json")
    )
    assert {e["ExperimentId"] for e in running} == {
        i for i, e in truth.items() if e["WorkspaceId"] == ws and e["Status"] == "RUNNING"
    }
    changes = query("export", "--kind", "changes", "--format", "csv")
    assert len(list(csv.DictReader(io.StringIO(changes)))) == len(all_changes)
    stats = json.loads(query("stats", "--since", "2026-11-01", "--format", "json"))
    assert sum(w["Experiments"] for w in stats["Workspaces"]) == len(truth)
    ended = sum(w["Ended"] for w in stats["Workspaces"])
    finished_changes = {
        c.experiment_id
        for c in all_changes
        if c.field == "Status" and not c.baseline and c.new_value in {"FINISHED", "FAILED"}
    }
    assert ended >= len(finished_changes) > 0
    some = next(iter(finished_changes))
    shown = json.loads(query("show", some, "--format", "json"))
    assert [h["Id"] for h in shown["History"]] == [
        c.id for c in all_changes if c.experiment_id == some
    ]
    assert query("history", "--since", format_minus(sim.world.now, hours=1), "--format", "json")


def format_minus(now: datetime, *, hours: int) -> str:
    return (now - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- pure pieces ----------------------------------------------------------------------------


def test_parse_time_arg() -> None:
    now = datetime(2024, 3, 10, 12, 30, tzinfo=UTC)
    parse = cli_query.parse_time_arg
    assert parse("2024-03-01").resolve(now) == "2024-03-01T00:00:00Z"
    assert parse("2024-03-01T08:30").resolve(now) == "2024-03-01T08:30:00Z"
    assert parse("2024-03-01T08:30:00+08:00").resolve(now) == "2024-03-01T00:30:00Z"
    assert parse("7d", relative=True).resolve(now) == "2024-03-03T12:30:00Z"
    assert parse("90m", relative=True).resolve(now) == "2024-03-10T11:00:00Z"
    assert parse("2w", relative=True).resolve(now) == "2024-02-25T12:30:00Z"
    # a fraction of a second rounds up, as in the API: stored times are whole seconds
    assert parse("2024-03-01T08:30:00.5Z").resolve(now) == "2024-03-01T08:30:01Z"
    assert parse("2024-03-01T08:30:00,000Z").resolve(now) == "2024-03-01T08:30:00Z"
    with pytest.raises(ValueError, match="rounds up past"):
        parse("9999-12-31T23:59:59.5Z")
    for bad in ("7d", "", "0", "2024-02-30", "soon", "2024-03-01T08:30.5Z"):
        with pytest.raises(ValueError, match="cannot read"):
            parse(bad)
    # the longest age, and its limit in every unit
    assert parse("36525d", relative=True).resolve(now) == "1924-03-10T12:30:00Z"
    for too_far in ("36526d", "5218w", "876601h", f"{36525 * 1440 + 1}m", "9" * 20 + "s"):
        with pytest.raises(ValueError, match="reaches back too far"):
            parse(too_far, relative=True)


def test_parse_limit() -> None:
    assert cli_query.parse_limit("0") == 0
    assert cli_query.parse_limit(" 50 ") == 50
    assert cli_query.parse_limit("+7") == 7
    assert cli_query.parse_limit(str(cli_query.MAX_LIMIT)) == cli_query.MAX_LIMIT
    for bad, message in (
        (str(cli_query.MAX_LIMIT + 1), "at most"),
        ("0" * 30 + "5", None),
        ("-1", "0 (no limit) or more"),
        ("-" + "9" * 40, "0 (no limit) or more"),
        ("1.5", "whole number"),
        ("٥", "whole number"),
    ):
        if message is None:
            assert cli_query.parse_limit(bad) == 5
            continue
        with pytest.raises(ValueError, match=re.escape(message)):
            cli_query.parse_limit(bad)


def test_the_oldest_since_reads_the_whole_history(run: Run, db: Path) -> None:
    everything = run.json("history", "--limit", "0")
    assert run.json("history", "--limit", "0", "--since", "36525d") == everything
    assert run.json("stats", "--since", "36525d")["Workspaces"]


def test_parse_tag() -> None:
    assert cli_query.parse_tag("team=nlp") == ("team", "nlp")
    assert cli_query.parse_tag("expr=a=b") == ("expr", "a=b")
    assert cli_query.parse_tag("team=") == ("team", "")
    # a key holding "=" (it ended at the first one: no such tag could be asked for)
    assert cli_query.parse_tag("k\\=x=v") == ("k=x", "v")
    assert cli_query.parse_tag("a\\\\=v") == ("a\\", "v")
    assert cli_query.parse_tag("dom\\user=x\\=y") == ("dom\\user", "x\\=y")
    for bad in ("team", "=x", " =x", "k\\=x"):
        with pytest.raises(ValueError):
            cli_query.parse_tag(bad)


def test_experiment_fields_follow_to_upstream() -> None:
    exp = normalise({"ExperimentId": "x"})
    assert exp is not None
    assert (*to_upstream(exp), *render.MIRROR_FIELDS) == render.EXPERIMENT_FIELDS


def test_render_cells() -> None:
    assert render.trials_cell(12, {"FAILED": 3, "SUCCEEDED": 9}) == "12 (3 failed)"
    assert render.trials_cell(5, {"SUCCEEDED": 5}) == "5"
    assert render.trials_cell(None, {"RUNNING": 2}) == "2"
    assert render.trials_cell(None, {}) == "-"
    assert render.duration_text(59.6) == "1m 0s"
    assert render.duration_text(45) == "45s"
    assert render.duration_text(2 * 3600 + 13 * 60) == "2h 13m"
    assert render.duration_text(3 * 86400 + 4 * 3600) == "3d 4h"
    assert render.rate_text(0.25) == "25.0%" and render.rate_text(None) == "-"
    assert render.change_text("TrialStatus", None, '{"RUNNING":2}') == "(none) → RUNNING 2"
    assert render.change_text("TrialStatus", "not json", "{}") == "not json → (none)"
    assert render.ordered_statuses({None, "ZED", "FAILED", "RUNNING"}) == [
        "RUNNING", "FAILED", "ZED", None,
    ]  # fmt: skip


def test_table_times_keep_four_digit_years(run: Run, tmp_path: Path) -> None:
    """Upstream's "no time" can be Go's zero time, 0001-01-01T00:00:00Z: strftime's %Y
    does not pad, and the table showed it as ``1-01-01 00:00``."""
    assert render.short_time("0001-01-01T00:00:00Z") == "0001-01-01 00:00"
    assert render.short_time("0999-12-31T23:59:59Z") == "0999-12-31 23:59"
    db = tmp_path / "mirror.db"
    with Store.open(db) as store:
        exp = raw("hpo-z", "ws-z", "zero-time", "RUNNING", "0001-01-01T00:00:00Z")
        sweep(store, "ws-z", T0, [exp], baseline=True, complete=True)
    code, out, _ = run("ls", db=db)
    assert code == 0
    assert re.search(r"hpo-z\s+ws-z\s+-\s+0001-01-01 00:00\s+0001-01-01 00:00$", out), out


def test_tables_leave_out_controls_that_would_reorder_the_row(run: Run, tmp_path: Path) -> None:
    """A name holding U+202E (right-to-left override) printed as is showed the rest of its
    table row reversed, ids and times included; escapes and newlines were already
    blanked. Bidirectional controls are left out of tables (JSON keeps the name whole)."""
    name = "sweep\u202eesrever\u2066iso\u2069\x1b[31m\nred"
    db = tmp_path / "mirror.db"
    with Store.open(db) as store:
        exp = raw("hpo-x", "ws-x", name, "RUNNING", "2024-02-28T10:00:00Z")
        sweep(store, "ws-x", T0, [exp], baseline=True, complete=True)
    for argv in (("ls",), ("show", "hpo-x"), ("history",)):
        code, out, _ = run(*argv, db=db)
        assert code == 0
        assert not {"\u202e", "\u2066", "\u2069", "\x1b", "\r"} & set(out), (argv, out)
        if argv[0] != "history":  # (show keeps a field's lines)
            assert "sweepesreveriso [31m" in out, out
    code, out, _ = run("show", "hpo-x", "--format", "json", db=db)
    assert code == 0 and json.loads(out)["Name"] == name


def test_render_text_width() -> None:
    assert render.display_width("中文") == 4
    assert render.display_width("e\u0301") == 1
    assert render.truncate("中文实验", 5) == "中文…"
    assert render.truncate("abcdef", 4) == "abc…"
    assert render.truncate("abc", 3) == "abc"
    assert render.clean("a\x1b[31mb\nc") == "a [31mb c"
    lines = render.format_table(
        [
            render.Column("A"),
            render.Column("NAME", shrink=True, min_width=4),
            render.Column("N", align="right"),
        ],
        [["x", "a-very-long-name", "1"], ["yy", "中文", "10"]],
        max_width=14,
    )
    assert lines == ["A   NAME     N", "x   a-ver…   1", "yy  中文    10"]


def test_json_and_csv_chunks() -> None:
    assert "".join(render.json_array_chunks([])) == "[]\n"
    assert json.loads("".join(render.json_array_chunks([{"a": 1}, {"a": "é"}]))) == [
        {"a": 1}, {"a": "é"},
    ]  # fmt: skip
    text = "".join(render.csv_chunks(["a", "b"], [{"a": [1], "b": None}, {"a": True, "b": "x,y"}]))
    assert text == 'a,b\n[1],\ntrue,"x,y"\n'


# --- the README documents the whole command line ---------------------------------------------


def subcommands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_and_option_is_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    missing = []
    for name, parser in subcommands():
        if not re.search(rf"`hpo-sync {re.escape(name)}\b", readme):
            missing.append(f"command `hpo-sync {name}`")
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and not mentions(readme, option):
                    missing.append(f"`{name} {option}`")
    assert not missing, "undocumented in README.md: " + ", ".join(missing)


@pytest.mark.parametrize("name", ["ls", "show", "history", "export", "stats"])
def test_query_commands_have_a_readme_section_naming_each_option(name: str) -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Querying the mirror", 1)[1].split("\n## ", 1)[0]
    assert f"### `hpo-sync {name}" in section, name
    body = section.split(f"### `hpo-sync {name}", 1)[1].split("\n### ", 1)[0]
    parser = dict(subcommands())[name]
    common = {"--help", "--config", "--log-level", "--log-format"}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in common:
                assert mentions(body, option), f"{name} {option}"


@pytest.mark.parametrize("path", ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"])
def test_export_to_dev_stdout_appends_where_the_shell_appends_and_feeds_a_pipe(
    db: Path, tmp_path: Path, path: str
) -> None:
    """`export --output /dev/stdout >> file` used to rename its export over the file (what
    it held was lost), and `| cmd` failed: the path is the descriptor the shell opened."""
    expected = hpo_sync("export", "--db", str(db)).stdout
    assert expected.count("\n") > 5
    log = tmp_path / "append.txt"
    log.write_text("precious\n")
    with log.open("a") as out:
        proc = hpo_sync(
            "export", "--db", str(db), "--output", path, stdout=out, stderr=subprocess.PIPE
        )
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == "precious\n" + expected
    piped = hpo_sync("export", "--db", str(db), "--output", path)
    assert (piped.returncode, piped.stdout) == (0, expected), piped.stderr


def test_export_to_another_descriptor_writes_through_it(db: Path, tmp_path: Path) -> None:
    expected = hpo_sync("export", "--db", str(db), "--format", "csv").stdout
    log = tmp_path / "other.csv"
    log.write_text("kept\n")
    with log.open("a", newline="") as other:
        fd = other.fileno()
        proc = hpo_sync(
            "export", "--db", str(db), "--format", "csv", "--output", f"/dev/fd/{fd}",
            pass_fds=(fd,),
        )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    assert log.read_bytes() == b"kept\n" + expected.encode()


def test_a_closed_stdout_or_stderr_is_no_traceback(db: Path) -> None:
    """`hpo-sync ls >&-` (cron, say) used to die with AttributeError on None.isatty."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HPO_SYNC_CONFIG", None)
    cmd = f"{shlex.quote(sys.executable)} -m hpo_sync.cli"
    for shell, code in (
        (f"{cmd} ls --db {shlex.quote(str(db))} >&-", 0),
        (f"{cmd} ls --db {shlex.quote(str(db))} --format json >&-", 0),
        (f"{cmd} history --db {shlex.quote(str(db))} --limit 0 >&- 2>&-", 0),
        (f"{cmd} ls --db {shlex.quote(str(db))} --limit -1 2>&-", 2),
    ):
        proc = subprocess.run(
            ["sh", "-c", shell], capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert proc.returncode == code, (shell, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("column", "value", "field", "shown"),
    [
        ("tags", "[1, 2]", "Tags", []),
        ("tags", '{"team": "ml"}', "Tags", [{"Key": "team", "Value": "ml"}]),
        ("trial_status", '{"FAILED": "x", "RUNNING": 2}', "TrialStatus", {"RUNNING": 2}),
    ],
)
def test_a_hand_edited_json_column_of_another_shape_is_read_not_a_crash(
    run: Run, db: Path, tmp_path: Path, column: str, value: str, field: str, shown: Any
) -> None:
    """Valid JSON the generated api_json column accepts, but not the shape the mirror
    writes: show, ls and export used to fail with a traceback."""
    mirror = tmp_path / "edited.db"
    shutil.copy(db, mirror)
    with sqlite3.connect(mirror) as conn:
        conn.execute(
            f"UPDATE experiments SET {column} = ? WHERE experiment_id = 'hpo-a1'", (value,)
        )
    code, out, err = run("show", "hpo-a1", "--format", "json", db=mirror)
    assert code == 0, err
    assert json.loads(out)[field] == shown
    for argv in (
        ["ls", "--format", "csv"],
        ["ls", "--format", "json"],
        ["export"],
        ["show", "hpo-a1"],
    ):
        code, out, err = run(*argv, db=mirror)
        assert code == 0 and "Traceback" not in err, (argv, err)


def test_export_into_a_fifo_whose_reader_left_ends_quietly(run: Run, tmp_path: Path) -> None:
    """As `export | head` does: the reader has what it wanted (it used to be exit 1,
    "Broken pipe")."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def read_a_little() -> None:
        with fifo.open("rb") as f:
            f.read(10)

    reader = threading.Thread(target=read_a_little, daemon=True)
    reader.start()
    code, out, err = run("export", "--kind", "changes", "--output", str(fifo))
    reader.join(timeout=30)
    assert (code, out, err) == (0, "", "")
