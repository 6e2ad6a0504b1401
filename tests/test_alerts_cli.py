"""``hpo-sync alerts test|list|retry`` against the emulated targets and a real mirror."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from hpo_sync import cli
from hpo_sync.alerts.receivers import Receivers
from hpo_sync.alerts.service import AlertWorker
from hpo_sync.config import load
from hpo_sync.normalise import format_time, normalise
from hpo_sync.store import Store

SECRET = "SECcli-secret-value"
TOKEN = "cli-S3CRET-token"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures logging globally, onto the captured stream of this test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers(secrets={TOKEN: SECRET, "wrong-" + TOKEN: "other"}, keywords={TOKEN: "hpo"})
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def config_path(tmp_path: Path, receivers: Receivers, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("T_DING_URL", receivers.url("dingtalk", TOKEN))
    monkeypatch.setenv("T_BAD_URL", receivers.url("dingtalk", "wrong-" + TOKEN))
    monkeypatch.setenv("T_SECRET", SECRET)
    monkeypatch.setenv("T_SLACK_URL", receivers.url("slack", TOKEN))
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[store]
path = "{tmp_path / "mirror.db"}"

[[workspaces]]
id = "ws1"

[alerts]
group_wait_s = 0

[[alerts.targets]]
name = "ding"
type = "dingtalk"
url_env = "T_DING_URL"
secret_env = "T_SECRET"
keyword = "hpo"

[[alerts.targets]]
name = "bad"
type = "dingtalk"
url_env = "T_BAD_URL"
secret_env = "T_SECRET"

[[alerts.targets]]
name = "slack"
type = "slack"
url_env = "T_SLACK_URL"

[[alerts.rules]]
name = "failed"
targets = ["ding", "bad"]
to_status = ["FAILED"]
"""
    )
    return path


async def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(cli.main, args)
    out, err = capsys.readouterr()
    return code, out + err


def assert_no_secret(text: str) -> None:
    for s in (SECRET, TOKEN, "access_token"):
        assert s not in text


async def test_alerts_test_prints_the_exact_answer(
    config_path: Path, receivers: Receivers, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await run_cli(["alerts", "test", "ding", "--config", str(config_path)], capsys)
    assert code == 0, out
    assert "ding (dingtalk): HTTP 200" in out
    assert '{"errcode": 0, "errmsg": "ok"}' in out and "=> sent" in out
    assert len(receivers.of(TOKEN)) == 1
    assert_no_secret(out)

    code, out = await run_cli(["alerts", "test", "bad", "--config", str(config_path)], capsys)
    assert code == 1
    assert '"errcode": 310000' in out and "=> dead" in out
    assert_no_secret(out)

    code, out = await run_cli(["alerts", "test", "nope", "--config", str(config_path)], capsys)
    assert code == 2 and "no target named 'nope'" in out


async def test_alerts_test_masks_a_url_echoed_in_the_answer(
    config_path: Path, receivers: Receivers, capsys: pytest.CaptureFixture[str]
) -> None:
    receivers.fail(TOKEN, mode="echo", times=2)
    for target in ("ding", "slack"):
        code, out = await run_cli(["alerts", "test", target, "--config", str(config_path)], capsys)
        assert code == 1 and "HTTP 404" in out and "no route for POST" in out, out
        assert "***" in out
        assert_no_secret(out)


async def test_alerts_test_target_down(
    config_path: Path, receivers: Receivers, capsys: pytest.CaptureFixture[str]
) -> None:
    await receivers.stop()
    code, out = await run_cli(["alerts", "test", "slack", "--config", str(config_path)], capsys)
    assert code == 1 and "no answer" in out
    assert_no_secret(out)


def record_statuses(
    store: Store, worker: AlertWorker, statuses: tuple[str, ...], name: str = "bert"
) -> None:
    """Experiment e1 seen with each status in turn, a second apart (the first sighting is the
    baseline), with the worker's outbox hook in every write."""
    t = datetime.now(UTC) - timedelta(seconds=30)
    for i, status in enumerate(statuses):
        e = normalise({"ExperimentId": "e1", "WorkspaceId": "ws1", "Name": name, "Status": status})
        assert e is not None
        at = format_time(t + timedelta(seconds=i))
        run = store.begin_run("ws1", "hot", at)
        store.apply(
            "ws1", [e], observed_at=at, run_id=run, baseline=i == 0, on_changes=worker.on_changes
        )


async def test_alerts_list_and_retry(
    config_path: Path, receivers: Receivers, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load(config_path)
    store = Store.open(cfg.store.path)
    worker = AlertWorker(store, cfg, rate_limits={})
    record_statuses(store, worker, ("RUNNING", "FAILED"))
    with capture_logs() as logs:
        await worker.run_once()
        await worker.close()
    assert {e["event"] for e in logs} == {"alert.sent", "alert.dead"}
    assert_no_secret(repr(logs))
    store.close()

    code, out = await run_cli(["alerts", "list", "--config", str(config_path)], capsys)
    assert code == 0 and "sent" in out and "dead" in out and "bert (e1)" in out
    assert "310000" in out
    assert_no_secret(out)
    code, out = await run_cli(["alerts", "list", "--dead", "--config", str(config_path)], capsys)
    assert "dead" in out and "sent " not in out
    code, out = await run_cli(
        ["alerts", "list", "--pending", "--format", "json", "--config", str(config_path)], capsys
    )
    assert out == "[]\n"
    # A table with no rows prints nothing on stdout; the note goes to stderr, as ls's does.
    await asyncio.to_thread(cli.main, ["alerts", "list", "--pending", "--config", str(config_path)])
    assert capsys.readouterr() == ("", "hpo-sync: no alert deliveries\n")
    code, out = await run_cli(
        ["alerts", "list", "--format", "json", "--config", str(config_path)], capsys
    )
    # every delivery went out (one sent, one dead-lettered): each names its message
    listed = json.loads(out)
    assert len(listed) == 2 and all(r["message_id"] for r in listed), listed
    conn = sqlite3.connect(cfg.store.path)
    stored = dict(conn.execute("SELECT id, message_id FROM alert_outbox").fetchall())
    conn.close()
    assert {r["id"]: r["message_id"] for r in listed} == stored

    conn = sqlite3.connect(cfg.store.path)
    (dead_id,) = conn.execute("SELECT id FROM alert_outbox WHERE status = 'dead'").fetchone()
    conn.close()
    code, out = await run_cli(
        ["alerts", "retry", str(dead_id), "--config", str(config_path)], capsys
    )
    assert code == 0 and "re-queued 1 dead alert delivery" in out
    # pending now, and an id that does not exist: nothing re-queued, exit 1 (a typo shows)
    code, out = await run_cli(
        ["alerts", "retry", str(dead_id), "999999", "--config", str(config_path)], capsys
    )
    assert code == 1 and "re-queued 0" in out, out
    assert "2 of the 2 ids given are not dead-lettered deliveries" in out
    code, out = await run_cli(
        ["alerts", "retry", "--all-dead", "--config", str(config_path)], capsys
    )
    assert code == 0 and "re-queued 0" in out  # nothing dead: nothing to do
    code, out = await run_cli(["alerts", "list", "--pending", "--config", str(config_path)], capsys)
    assert f"{dead_id:>6}  pending" in out
    code, out = await run_cli(["alerts", "retry", "--config", str(config_path)], capsys)
    assert code == 2
    for bad in (str(10**30), "0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["alerts", "retry", bad, "--config", str(config_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"{bad!r} is not an alert id" in err, err


async def test_alerts_list_keeps_whole_names_in_a_pipe_and_cuts_them_to_fit_columns(
    config_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `ls` does: whole names in a pipe or a file (they were cut at 28 characters, with
    no sign of it: a grep for the whole name found nothing), cut with … to fit $COLUMNS."""
    name = "llama2_7b_dropout_search_0533_with_a_long_tail"
    cfg = load(config_path)
    store = Store.open(cfg.store.path)
    worker = AlertWorker(store, cfg, rate_limits={})
    record_statuses(store, worker, ("RUNNING", "FAILED"), name=name)
    await worker.close()
    store.close()
    base = ["alerts", "list", "--config", str(config_path)]
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out = await run_cli(base, capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["ID", "STATUS", "TARGET", "TRIES", "EXPERIMENT"]
    assert len(lines) == 3 and all(f"{name} (e1)" in line for line in lines[1:])
    assert all("Status RUNNING → FAILED" in line for line in lines[1:])
    monkeypatch.setenv("COLUMNS", "80")
    code, out = await run_cli(base, capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and name not in out and "…" in out
    assert all(len(line) <= 80 for line in lines), lines


async def test_alerts_list_formats_and_limits_match_the_query_commands(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load(config_path)
    store = Store.open(cfg.store.path)
    worker = AlertWorker(store, cfg, rate_limits={})
    record_statuses(store, worker, ("RUNNING", "FAILED") * 3)
    await worker.close()  # nothing sent: every delivery stays pending
    store.close()
    base = ["alerts", "list", "--config", str(config_path)]
    # the rule's two targets ("ding", "bad") for each of the 3 changes to FAILED
    code, out = await run_cli([*base, "--format", "json"], capsys)
    rows = json.loads(out)  # one JSON array, as `ls` and `history` write
    assert code == 0 and len(rows) == 6 and {r["status"] for r in rows} == {"pending"}
    assert {r["message_id"] for r in rows} == {None}  # never sent: in no message yet
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    code, out = await run_cli([*base, "--format", "jsonl"], capsys)
    assert [json.loads(line) for line in out.splitlines()] == rows
    code, out = await run_cli([*base, "--format", "json", "--limit", "0"], capsys)
    assert json.loads(out) == rows  # 0: all, as in `ls --limit 0`
    code = await asyncio.to_thread(cli.main, [*base, "--format", "json", "--limit", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out) == rows[:3]
    assert err == "hpo-sync: showing the newest 3; --limit N for more, --limit 0 for all\n"
    code = await asyncio.to_thread(cli.main, [*base, "--format", "json", "--limit", "6"])
    out, err = capsys.readouterr()
    assert json.loads(out) == rows and err == ""  # exactly all: nothing more to say
    for bad, message in (
        ("-1", "must be 0 (no limit) or more"),
        (str(10**30), "must be at most"),
        ("many", "expected a whole number"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main([*base, "--limit", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument --limit: {message}" in err, err
        assert "Traceback" not in err


async def test_each_test_send_has_an_id_of_its_own(
    config_path: Path, receivers: Receivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `alerts test` used to send webhook-id hposync_test: a receiver that drops
    repeated ids dropped every test after the first while the CLI said "sent"."""
    import io
    from datetime import UTC, datetime

    from hpo_sync import config as config_mod
    from hpo_sync.alerts import cli as alerts_cli

    ids: list[str] = []
    real = alerts_cli.send_message

    async def spy(*args: Any, msg_id: str, **kwargs: Any) -> Any:
        ids.append(msg_id)
        return await real(*args, msg_id=msg_id, **kwargs)

    monkeypatch.setattr(alerts_cli, "send_message", spy)
    cfg = config_mod.load(config_path)
    (ding,) = [t for t in cfg.alerts.targets if t.name == "ding"]
    for _ in range(2):
        assert await alerts_cli.try_target(ding, cfg, io.StringIO(), datetime.now(UTC)) == 0
    assert len(ids) == len(set(ids)) == 2 and all(i.startswith("hposync_test_") for i in ids)


async def test_alerts_retry_upgrades_an_older_mirror_only_when_no_daemon_uses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`alerts retry` writes beside a running daemon (no single-instance lock). It used to
    upgrade an older mirror under an older daemon that held the lock, which then went on
    writing rows of the old schema into the new one (outbox rows without trial_status).
    It now upgrades only when it can take the lock, and otherwise says why it cannot."""
    from hpo_sync.schema import SCHEMA_VERSION, migrate
    from hpo_sync.store import acquire_lock

    db = tmp_path / "mirror.db"
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn, where=str(db), target=5)
    conn.close()
    before = db.read_bytes()

    daemon = acquire_lock(db)  # as a running daemon of version 5 holds it
    try:
        code, err = await run_cli(["alerts", "retry", "--all-dead", "--db", str(db)], capsys)
        assert code == 1, err
        assert f"schema version 5, this hpo-sync needs {SCHEMA_VERSION}" in err
        assert "in use by another hpo-sync process" in err
        assert db.read_bytes() == before
    finally:
        daemon.release()

    code, out = await run_cli(["alerts", "retry", "--all-dead", "--db", str(db)], capsys)
    assert code == 0 and "re-queued 0" in out
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)

    daemon = acquire_lock(db)  # a daemon of this version: retry writes beside it
    try:
        code, out = await run_cli(["alerts", "retry", "--all-dead", "--db", str(db)], capsys)
        assert code == 0 and "re-queued 0" in out
    finally:
        daemon.release()


def test_alerts_list_spells_out_trial_counts_as_history_does() -> None:
    """A TrialStatus delivery's change was shown as its stored JSON; `history` and `show`
    spell the counts out."""
    import io

    from hpo_sync.alerts.cli import print_rows

    row = {
        "id": 7, "status": "pending", "target": "ops", "attempts": 0, "name": "bert",
        "experiment_id": "e1", "field": "TrialStatus", "from": '{"RUNNING":2}',
        "to": '{"FAILED":1,"RUNNING":1}', "last_error": None,
    }  # fmt: skip
    out = io.StringIO()
    print_rows([row], "table", out)
    assert "TrialStatus RUNNING 2 → FAILED 1, RUNNING 1" in out.getvalue(), out.getvalue()
