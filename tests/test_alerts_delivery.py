"""Delivery end to end: a real SQLite file, the outbox written inside Store.apply, the worker,
and the emulated chat targets on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hook_server import Hook, serve
from locking import write_locked
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from hpo_sync.alerts import outbox as queue
from hpo_sync.alerts.classify import Dead, Retry, Sent
from hpo_sync.alerts.cli import list_rows, print_rows
from hpo_sync.alerts.receivers import Receivers
from hpo_sync.alerts.service import RATE_LIMITS, AlertWorker, backoff_s
from hpo_sync.alerts.signing import dingtalk_sign
from hpo_sync.config import (
    AlertsConfig,
    Config,
    RuleConfig,
    Secret,
    StoreConfig,
    TargetConfig,
    WorkspaceConfig,
)
from hpo_sync.errors import StoreError
from hpo_sync.normalise import Experiment, format_time, normalise, parse_time
from hpo_sync.store import Store

DING_SECRET = "SECding-secret-value"
FEISHU_SECRET = "feishu-secret-value"
HOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KINDS = ("slack", "discord", "dingtalk", "feishu", "lark", "wecom", "teams", "webhook")
SECRETS = {
    "dingtalk": DING_SECRET,
    "feishu": FEISHU_SECRET,
    "lark": FEISHU_SECRET,
    "webhook": HOOK_SECRET,
}


def token(kind: str) -> str:
    return f"tok-{kind}-S3CRETTOKEN"


def exp(exp_id: str, status: str = "RUNNING", trials: dict[str, int] | None = None) -> Experiment:
    out = normalise(
        {
            "ExperimentId": exp_id,
            "WorkspaceId": "ws1",
            "Name": f"bert_{exp_id}",
            "Status": status,
            "TrialStatus": trials if trials is not None else {"RUNNING": 2},
            "Tags": [{"Key": "team", "Value": "nlp"}],
            "GmtCreateTime": "2024-02-01T00:00:00Z",
            "GmtModifiedTime": "2024-02-01T00:00:00Z",
        }
    )
    assert out is not None
    return out


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers(
        secrets={token(k): v for k, v in SECRETS.items()},
        keywords={token("dingtalk"): "hpo-sync", token("feishu"): "hpo-sync"},
    )
    await r.start()
    yield r
    await r.stop()


def make_config(db: Path, r: Receivers, kinds: tuple[str, ...] = KINDS, **alerts: Any) -> Config:
    targets = tuple(
        TargetConfig(
            name=f"t-{k}",
            type=k,
            url=Secret(r.url(k, token(k)), "test"),
            secret=Secret(SECRETS[k], "test") if k in SECRETS else None,
            keyword="hpo-sync" if k in ("dingtalk", "feishu") else None,
        )
        for k in kinds
    )
    rule = RuleConfig("failed", tuple(t.name for t in targets), to_status=("FAILED",))
    cfg = AlertsConfig(group_wait_s=5, targets=targets, rules=(rule,), **alerts)
    return Config(store=StoreConfig(db), alerts=cfg)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "mirror.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store.open(db)
    yield s
    s.close()


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class World:
    """Experiments that change, with the worker's hook inside each apply."""

    def __init__(self, store: Store, worker: AlertWorker, n: int) -> None:
        self.store, self.worker = store, worker
        self.t = now() - timedelta(seconds=60)
        self.ids = [f"e{i:04d}" for i in range(n)]
        self._apply([exp(i) for i in self.ids], baseline=True)

    def _apply(self, exps: list[Experiment], baseline: bool = False) -> None:
        self.t += timedelta(seconds=1)
        at = format_time(self.t)
        run = self.store.begin_run("ws1", "hot", at)
        self.store.apply(
            "ws1",
            exps,
            observed_at=at,
            run_id=run,
            baseline=baseline,
            on_changes=self.worker.on_changes,
        )

    def fail(self, ids: list[str]) -> None:
        self._apply([exp(i, "FAILED", {"FAILED": 2}) for i in ids])


def outbox(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM alert_outbox ORDER BY id")]
    finally:
        conn.close()


def one_target_worker(
    store: Store, db: Path, kind: str, url: str, *, secret: str | None = None, **worker: Any
) -> AlertWorker:
    """A worker with one target of ``kind`` at ``url``, one rule for every change, no
    grouping wait and no rate limit."""
    target = TargetConfig("t", kind, Secret(url, "t"), Secret(secret, "t") if secret else None)
    cfg = Config(
        store=StoreConfig(db),
        alerts=AlertsConfig(group_wait_s=0, targets=(target,), rules=(RuleConfig("r", ("t",)),)),
    )
    return AlertWorker(store, cfg, rate_limits={}, **worker)


async def test_every_target_gets_one_signed_digest(
    receivers: Receivers, store: Store, db: Path
) -> None:
    worker = AlertWorker(store, make_config(db, receivers), rate_limits={})
    world = World(store, worker, 3)
    assert outbox(db) == []  # the baseline never alerts
    with capture_logs() as logs:
        world.fail(["e0000", "e0001"])
        rows = outbox(db)
        assert len(rows) == 2 * len(KINDS)
        assert await worker.run_once() == 0  # still inside group_wait_s
        assert await worker.run_once(now=now() + timedelta(seconds=6)) == len(KINDS)
        assert await worker.run_once(now=now() + timedelta(seconds=60)) == 0
        await worker.close()
    assert receivers.rejected == []
    assert {r["status"] for r in outbox(db)} == {"sent"}
    for kind in KINDS:
        (got,) = receivers.of(token(kind))
        text = json.dumps(got.body, ensure_ascii=False)
        assert "bert_e0000" in text and "e0001" in text
        assert "RUNNING → FAILED" in text or kind == "webhook"
    ding = receivers.of(token("dingtalk"))[0]
    assert ding.query["sign"] == dingtalk_sign(DING_SECRET, int(ding.query["timestamp"]))
    assert ding.body["msgtype"] == "markdown" and "hpo-sync" in ding.body["markdown"]["text"]
    feishu = receivers.of(token("feishu"))[0]
    assert {"timestamp", "sign", "msg_type", "card"} <= set(feishu.body)
    hook = receivers.of(token("webhook"))[0]
    assert hook.body["type"] == "hpo-sync.changes" and len(hook.body["alerts"]) == 2
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= {
        k.lower() for k in hook.headers
    }
    assert {e["event"] for e in logs} >= {"alert.sent"}
    dumped = repr(logs)
    for secret in (*SECRETS.values(), *(token(k) for k in KINDS), "127.0.0.1"):
        assert secret not in dumped


async def test_a_huge_answer_is_read_only_as_far_as_it_matters() -> None:
    """A receiver that answers 200 with 8 MiB (a proxy's error page, a hostile endpoint):
    the daemon reads the first 64 KiB, not the whole body into memory (a 300 MB answer
    took a daemon from 60 MB to 1 GB). A short answer is read whole."""
    from hpo_sync.alerts.service import MAX_ANSWER_BYTES, send_message

    huge = b"x" * (8 * 1024 * 1024)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        body = huge if request.path == "/huge" else b"ok"
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            for path, expected in (("/huge", huge[:MAX_ANSWER_BYTES]), ("/ok", b"ok")):
                url = Secret(f"http://127.0.0.1:{port}{path}", "t")
                got = await send_message(
                    session, TargetConfig("t", "teams", url), {"text": "hi"}, now=now(),
                    msg_id="m1",
                )  # fmt: skip
                assert got.status == 200 and got.body == expected
    finally:
        await runner.cleanup()


async def test_receiver_down_then_up_delivers_exactly_once(
    receivers: Receivers, store: Store, db: Path
) -> None:
    kinds = ("slack", "webhook", "dingtalk")
    worker = AlertWorker(store, make_config(db, receivers, kinds), rate_limits={})
    world = World(store, worker, 4)
    port = receivers.port
    await receivers.stop()
    with capture_logs() as logs:
        world.fail(world.ids)
        t = now() + timedelta(seconds=6)
        assert await worker.run_once(now=t) == 0
        rows = outbox(db)
        assert {r["status"] for r in rows} == {"pending"}
        assert {r["attempts"] for r in rows} == {1}
        assert all("connection failed" in r["last_error"] for r in rows)
        await receivers.start(port=port)
        assert await worker.run_once(now=t + timedelta(seconds=1)) == 0  # backoff not over
        assert await worker.run_once(now=t + timedelta(seconds=10)) == len(kinds)
        assert await worker.run_once(now=t + timedelta(seconds=1000)) == 0
        await worker.close()
    assert any(e["event"] == "alert.retry" for e in logs)
    for kind in kinds:
        got = receivers.of(token(kind))
        assert len(got) == 1
        assert sorted(json.dumps(got[0].body).count(f"e000{i}") > 0 for i in range(4)) == [True] * 4
    assert {r["status"] for r in outbox(db)} == {"sent"}


async def test_http_500_is_retried(receivers: Receivers, store: Store, db: Path) -> None:
    worker = AlertWorker(store, make_config(db, receivers, ("teams",)), rate_limits={})
    world = World(store, worker, 1)
    receivers.fail(token("teams"), times=1)
    world.fail(world.ids)
    t = now() + timedelta(seconds=6)
    assert await worker.run_once(now=t) == 0
    (row,) = outbox(db)
    assert row["status"] == "pending" and row["last_error"].startswith("HTTP 500")
    assert await worker.run_once(now=t + timedelta(seconds=30)) == 1
    await worker.close()
    assert outbox(db)[0]["status"] == "sent"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_answer_echoing_the_url_never_leaks_the_token(
    kind: str, receivers: Receivers, store: Store, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error page that quotes the request URL (as a misrouting proxy's does) is recorded
    and logged with the URL's secret parts masked: not in the outbox, not in the log."""
    worker = AlertWorker(store, make_config(db, receivers, (kind,)), rate_limits={})
    world = World(store, worker, 1)
    receivers.fail(token(kind), mode="echo", times=1)
    world.fail(world.ids)
    with capture_logs() as logs:
        assert await worker.run_once(now=now() + timedelta(seconds=6)) == 0
        await worker.close()
    (row,) = outbox(db)
    assert row["status"] == "dead" and row["last_error"].startswith("HTTP 404: 404 Not Found")
    assert "***" in row["last_error"]
    seen = row["last_error"] + repr(logs) + "".join(capsys.readouterr())
    assert any(e["event"] == "alert.dead" for e in logs)
    for secret in (token(kind), SECRETS.get(kind, token(kind))):
        assert secret not in seen


@pytest.mark.parametrize(
    "userinfo",
    ["hook-user:PASSWORD-S3cret", "us%40er:p%3Ass%C3%A9-S3cret", "hook-user:p%E9-S3cret"],
    ids=["plain", "percent-encoded", "invalid-escape"],
)
async def test_an_answer_echoing_basic_auth_never_leaks_the_password(
    userinfo: str, store: Store, db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """aiohttp sends a URL's user:password as ``Authorization: Basic <base64>`` (decoded as
    yarl decodes it); a receiver that echoes the request's headers in its error page must
    not carry that form of the password into the log, the outbox or `alerts list`."""
    sent: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        sent.append(request.headers.get("Authorization", ""))
        return web.Response(status=500, text=f"upstream error; request had: {sent[-1]}")

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner, port = await serve(app)
    target = TargetConfig(
        "t-basic", "webhook", Secret(f"http://{userinfo}@127.0.0.1:{port}/h", "t")
    )
    rule = RuleConfig("failed", ("t-basic",), to_status=("FAILED",))
    cfg = Config(
        store=StoreConfig(db), alerts=AlertsConfig(group_wait_s=5, targets=(target,), rules=(rule,))
    )
    worker = AlertWorker(store, cfg, rate_limits={})
    world = World(store, worker, 1)
    world.fail(world.ids)
    try:
        with capture_logs() as logs:
            assert await worker.run_once(now=now() + timedelta(seconds=6)) == 0
            await worker.close()
    finally:
        await runner.cleanup()
    (auth,) = sent
    assert auth.startswith("Basic ")
    (row,) = outbox(db)
    assert row["status"] == "pending" and row["last_error"].startswith("HTTP 500: upstream error")
    assert row["last_error"].endswith("request had: Basic ***")
    listing = io.StringIO()
    print_rows(list_rows(store, None, 0), "table", listing)
    assert "Basic ***" in listing.getvalue()
    assert any(e["event"] == "alert.retry" for e in logs)
    seen = row["last_error"] + repr(logs) + listing.getvalue() + "".join(capsys.readouterr())
    assert auth.removeprefix("Basic ") not in seen and "S3cret" not in seen


def test_the_alert_table_shows_upstream_text_as_ls_does() -> None:
    """``alerts list`` printed a name (upstream's) and a last error (a target's answer) as
    they were: an escape sequence, a NUL, a right-to-left override reached the terminal."""
    row = {
        "id": 7, "status": "pending", "target": "hook", "attempts": 2,
        "name": "ctl\x00\x1b[31mred\u202eevil", "experiment_id": "e\u2066x",
        "field": "Status", "from": "RUNNING", "to": "FAILED\x1b[2J",
        "last_error": "HTTP 500: \x1b]0;pwned\x07 down",
    }  # fmt: skip
    listing = io.StringIO()
    print_rows([row], "table", listing)
    text = listing.getvalue()
    assert not {"\x00", "\x1b", "\x07", "\u202e", "\u2066"} & set(text), repr(text)
    assert "ctl  [31mredevil (ex)" in text and "HTTP 500:  ]0;pwned  down" in text


async def test_dingtalk_130101_retried_then_310000_dead(
    receivers: Receivers, store: Store, db: Path
) -> None:
    worker = AlertWorker(store, make_config(db, receivers, ("dingtalk",)), rate_limits={})
    world = World(store, worker, 2)
    receivers.fail(token("dingtalk"), errcode=130101, times=1)
    world.fail(["e0000"])
    t = now() + timedelta(seconds=6)
    with capture_logs() as logs:
        assert await worker.run_once(now=t) == 0
        (row,) = outbox(db)
        assert row["status"] == "pending" and "130101" in row["last_error"]
        # DingTalk keeps the robot quiet for 10 minutes: no retry within them
        assert await worker.run_once(now=t + timedelta(seconds=599)) == 0
        assert await worker.run_once(now=t + timedelta(seconds=601)) == 1
        assert outbox(db)[0]["status"] == "sent"
        receivers.fail(token("dingtalk"), errcode=310000, times=1)
        world.fail(["e0001"])
        assert await worker.run_once(now=t + timedelta(seconds=800)) == 0
        await worker.close()
    dead = outbox(db)[1]
    assert dead["status"] == "dead" and "310000" in dead["last_error"]
    assert any(e["event"] == "alert.dead" and "310000" in e["reason"] for e in logs)
    assert DING_SECRET not in repr(logs) and token("dingtalk") not in repr(logs)


async def test_wrong_signing_secret_is_dead_lettered(
    receivers: Receivers, store: Store, db: Path
) -> None:
    cfg = make_config(db, receivers, ("dingtalk", "feishu"))
    bad = tuple(
        TargetConfig(t.name, t.type, t.url, Secret("wrong", "test"), t.keyword)
        for t in cfg.alerts.targets
    )
    cfg = Config(
        store=cfg.store, alerts=AlertsConfig(group_wait_s=5, targets=bad, rules=cfg.alerts.rules)
    )
    worker = AlertWorker(store, cfg, rate_limits={})
    world = World(store, worker, 1)
    world.fail(world.ids)
    await worker.run_once(now=now() + timedelta(seconds=6))
    await worker.close()
    errors = sorted(r["last_error"] for r in outbox(db))
    assert [r["status"] for r in outbox(db)] == ["dead", "dead"]
    assert "19021" in errors[0] and "310000" in errors[1]


def _listed(got: list[Any]) -> list[str]:
    """The experiment ids the received messages list, in order."""
    return [
        m for r in got for m in re.findall(r"\((e\d{4})\)", json.dumps(r.body, ensure_ascii=False))
    ]


async def test_burst_at_a_20_per_minute_target(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """A round sends at most 3 messages a target, the oldest alerts listed in full; what
    they do not hold stays pending for the next round, not summed up as sent."""
    worker = AlertWorker(store, make_config(db, receivers, ("dingtalk", "wecom")))
    world = World(store, worker, 500)
    world.fail(world.ids)
    assert len(outbox(db)) == 1000
    assert await worker.run_once(now=now() + timedelta(seconds=6)) <= 6
    await worker.close()
    assert receivers.rejected == []
    rows = outbox(db)
    for kind in ("dingtalk", "wecom"):
        got = receivers.of(token(kind))
        assert 1 <= len(got) <= 3
        listed = _listed(got)
        assert listed == world.ids[: len(listed)]
        mine = [r for r in rows if r["target"] == f"t-{kind}"]
        assert [r["status"] for r in mine] == ["sent"] * len(listed) + ["pending"] * (
            500 - len(listed)
        )
        assert all(r["message_id"] is None for r in mine[len(listed) :])
        assert "… and" not in json.dumps(got, default=vars, ensure_ascii=False)


async def test_a_backlog_goes_out_whole_over_later_rounds_at_the_rate_limit(
    store: Store, db: Path
) -> None:
    """Hundreds of alerts at 20-a-minute targets: round after round, every alert is listed
    in exactly one message, in order, and the receivers (which enforce the documented
    limits) refuse none. Both clocks run 200 times fast: a minute is 0.3 s."""
    speed = 200.0
    r = Receivers(
        secrets={token(k): v for k, v in SECRETS.items()},
        keywords={token("dingtalk"): "hpo-sync"},
        clock=lambda: time.monotonic() * speed,
    )
    await r.start()
    try:
        limits = {k: tuple((n, p / speed) for n, p in w) for k, w in RATE_LIMITS.items()}
        worker = AlertWorker(store, make_config(db, r, ("dingtalk", "wecom")), rate_limits=limits)
        world = World(store, worker, 600)
        world.fail(world.ids)
        at = now() + timedelta(seconds=6)
        rounds = 0
        while any(row["status"] == "pending" for row in outbox(db)):
            rounds += 1
            assert rounds <= 100, "the backlog does not drain"
            await worker.run_once(now=at)
        await worker.close()
    finally:
        await r.stop()
    assert r.rejected == [] and rounds > 1
    assert {row["status"] for row in outbox(db)} == {"sent"}
    for kind in ("dingtalk", "wecom"):
        assert _listed(r.of(token(kind))) == world.ids
    assert len(r.of(token("wecom"))) > 20  # past a minute's limit: the limiter paced them


async def test_a_target_that_asks_to_wait_holds_the_rest_of_its_backlog_too(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """Rate limited on the first message of a round: the alerts no message of that round
    held wait as long, rather than go next round to a target that asked to wait."""
    worker = AlertWorker(store, make_config(db, receivers, ("wecom",)), rate_limits={})
    world = World(store, worker, 200)
    world.fail(world.ids)
    receivers.fail(token("wecom"), errcode=45009, times=1)
    at = now() + timedelta(seconds=6)
    assert await worker.run_once(now=at) == 0
    assert await worker.run_once(now=at + timedelta(seconds=1)) == 0
    await worker.close()
    assert len(receivers.rejected) == 1 and receivers.received == []
    rows = outbox(db)
    assert {(row["status"], row["attempts"]) for row in rows} == {("pending", 1)}
    assert len({row["next_attempt_at"] for row in rows}) == 1


async def test_a_target_that_refuses_messages_gets_the_rest_of_its_backlog_after_a_backoff(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """A bad URL refuses every message: this round's are dead-lettered, the alerts past the
    round's cap wait out a backoff (not a request a second), then go once the target takes
    messages again."""
    worker = AlertWorker(store, make_config(db, receivers, ("wecom",)), rate_limits={})
    world = World(store, worker, 200)
    world.fail(world.ids)
    receivers.fail(token("wecom"), errcode=93000)
    at = now() + timedelta(seconds=6)
    assert await worker.run_once(now=at) == 0
    assert await worker.run_once(now=at + timedelta(seconds=1)) == 0
    refused = len(receivers.rejected)
    assert 1 <= refused <= 3  # the first round's only
    rows = outbox(db)
    dead = [r for r in rows if r["status"] == "dead"]
    held = [r for r in rows if r["status"] == "pending"]
    assert dead and held and len(dead) + len(held) == 200
    assert all("93000" in r["last_error"] for r in dead)
    assert all(r["attempts"] == 1 and "held back" in r["last_error"] for r in held)
    receivers.fail(token("wecom"), "ok")  # the target was fixed
    later = at + timedelta(seconds=backoff_s(1) + 1)
    assert await worker.run_once(now=later) >= 1
    await worker.close()
    assert receivers.received and len(receivers.rejected) == refused


def test_the_due_limit_is_per_target(store: Store, db: Path) -> None:
    """One target's long backlog never keeps another's newer alerts from being read."""
    r = Receivers()
    ding = AlertWorker(store, make_config(db, r, ("dingtalk",)), rate_limits={})
    world = World(store, ding, 5)
    world.fail(world.ids[:3])  # rows 1-3: dingtalk's backlog
    world.worker = AlertWorker(store, make_config(db, r, ("dingtalk", "wecom")), rate_limits={})
    world.fail(world.ids[3:])  # rows 4-7: dingtalk, wecom, dingtalk, wecom
    with store.reader() as conn:
        due = queue.due_rows(conn, now(), limit=2)
    assert [(r.target, r.id) for r in due] == [
        ("t-dingtalk", 1), ("t-dingtalk", 2), ("t-wecom", 5), ("t-wecom", 7)
    ]  # fmt: skip


async def test_restart_resumes_pending_and_does_not_resend(receivers: Receivers, db: Path) -> None:
    cfg = make_config(db, receivers, ("webhook",))
    store = Store.open(db)
    worker = AlertWorker(store, cfg, rate_limits={})
    world = World(store, worker, 2)
    world.fail(["e0000"])
    assert await worker.run_once(now=now() + timedelta(seconds=6)) == 1
    world.fail(["e0001"])  # pending when the "process" goes away
    await worker.close()
    store.close()

    store2 = Store.open(db)
    worker2 = AlertWorker(store2, cfg, rate_limits={})
    try:
        assert await worker2.run_once(now=now() + timedelta(seconds=6)) == 1
        assert await worker2.run_once(now=now() + timedelta(seconds=60)) == 0
    finally:
        await worker2.close()
        store2.close()
    got = receivers.of(token("webhook"))
    assert len(got) == 2
    assert "e0000" in json.dumps(got[0].body) and "e0000" not in json.dumps(got[1].body)
    assert {r["status"] for r in outbox(db)} == {"sent"}


async def test_old_alerts_expire(receivers: Receivers, store: Store, db: Path) -> None:
    registry = CollectorRegistry()
    worker = AlertWorker(
        store,
        make_config(db, receivers, ("slack",), max_age_s=60),
        rate_limits={},
        registry=registry,
    )
    world = World(store, worker, 1)
    receivers.fail(token("slack"))
    world.fail(world.ids)
    await worker.run_once(now=now() + timedelta(seconds=6))
    receivers.fail(token("slack"), "ok")
    with capture_logs() as logs:
        await worker.run_once(now=now() + timedelta(seconds=3600))
    await worker.close()
    (row,) = outbox(db)
    assert row["status"] == "dead" and row["last_error"] == "expired"
    assert receivers.received == []
    # An expired alert is a dead letter like any other: counted per target, logged by name.
    dead = registry.get_sample_value("hpo_sync_alerts_dead_total", {"target": "t-slack"})
    assert dead == 1
    assert [e for e in logs if e["event"] == "alert.dead"] == [
        {
            "event": "alert.dead",
            "log_level": "error",
            "target": "t-slack",
            "alerts": 1,
            "reason": "expired",
        }
    ]
    assert registry.get_sample_value("hpo_sync_alerts_pending") == 0


async def delivery_under_way(worker: AlertWorker, hook: Hook, at: datetime) -> None:
    """Start a delivery round at ``at`` and wait until the target has its message (the
    hook holds its answer)."""
    await worker.run_once(now=at, wait=False, stalls=False)
    for _ in range(1000):
        if hook.got:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the delivery never reached the target")


async def test_rows_in_flight_do_not_expire_under_the_delivery(store: Store, db: Path) -> None:
    """A delivery still waiting for its answer when its rows pass max_age_s: the next round
    leaves them be, and the target's 204 makes them sent. (They used to be dead-lettered as
    expired meanwhile, the 204 then ignored: a message the target had, marked dead, from
    where `alerts retry --all-dead` would have sent it again.)"""
    answer = asyncio.Event()
    hook = Hook(HOOK_SECRET, held={0: answer})
    runner, url = await hook.serve()
    try:
        worker = one_target_worker(store, db, "webhook", url, secret=HOOK_SECRET)
        alerts = dataclasses.replace(worker.config.alerts, max_age_s=60)
        worker.config = dataclasses.replace(worker.config, alerts=alerts)
        world = World(store, worker, 1)
        world.fail(world.ids)
        t = now()
        await delivery_under_way(worker, hook, t + timedelta(seconds=30))
        await worker.run_once(now=t + timedelta(seconds=120), wait=False, stalls=False)
        assert [r["status"] for r in outbox(db)] == ["pending"]
        answer.set()
        await asyncio.gather(*worker._busy.values())
        (row,) = outbox(db)
        assert (row["status"], row["last_error"]) == ("sent", None) and row["sent_at"]
        await worker.close()
    finally:
        await runner.cleanup()


async def test_a_reload_that_changes_a_target_s_type_gives_it_that_type_s_limits(
    store: Store, db: Path
) -> None:
    """A target renamed in place from `webhook` (no limit) to `dingtalk` (20 a minute): its
    limiter is made anew with DingTalk's windows, not kept with none."""
    hook = TargetConfig("ops", "webhook", Secret("http://127.0.0.1:9/h", "t"))
    cfg = Config(
        store=StoreConfig(db),
        alerts=AlertsConfig(targets=(hook,), rules=(RuleConfig("r", ("ops",)),)),
    )
    worker = AlertWorker(store, cfg)
    assert (await worker._limiter(hook)).windows == ()
    ding = TargetConfig(
        "ops", "dingtalk", Secret("http://127.0.0.1:9/robot/send?access_token=abcdefgh", "t")
    )
    await worker.reload(
        dataclasses.replace(cfg, alerts=dataclasses.replace(cfg.alerts, targets=(ding,)))
    )
    assert (await worker._limiter(ding)).windows == RATE_LIMITS["dingtalk"]
    await worker.close()


async def test_an_unsigned_webhook_gets_the_message_id_too(store: Store, db: Path) -> None:
    """A `webhook` target without a secret (allowed; the example config has one) still gets
    `webhook-id` and `webhook-timestamp`, the same id again on a retry: at-least-once
    delivery needs the id to drop a repeat by, signed or not."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items() if k.startswith("webhook")})
        return web.Response(status=503 if len(seen) == 1 else 204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner, port = await serve(app)
    try:
        worker = one_target_worker(store, db, "webhook", f"http://127.0.0.1:{port}/hook")
        world = World(store, worker, 1)
        world.fail(world.ids)
        t = now()
        await worker.run_once(now=t, stalls=False)
        await worker.run_once(now=t + timedelta(seconds=10), stalls=False)
        await worker.close()
    finally:
        await runner.cleanup()
    ((message_id,),) = {(r["message_id"],) for r in outbox(db)}
    assert [sorted(h) for h in seen] == [["webhook-id", "webhook-timestamp"]] * 2
    assert [h["webhook-id"] for h in seen] == [message_id] * 2


async def test_quiet_hours_delay_delivery(receivers: Receivers, store: Store, db: Path) -> None:
    t = now()
    start = (t - timedelta(hours=1)).strftime("%H:%M")
    end = (t + timedelta(hours=1)).strftime("%H:%M")
    cfg = make_config(db, receivers, ("slack",))
    rule = RuleConfig("quiet", ("t-slack",), quiet_hours=f"{start}-{end}")
    cfg = Config(
        store=cfg.store,
        alerts=AlertsConfig(group_wait_s=5, targets=cfg.alerts.targets, rules=(rule,)),
    )
    worker = AlertWorker(store, cfg, rate_limits={})
    world = World(store, worker, 1)
    world.fail(world.ids)
    assert await worker.run_once(now=t + timedelta(seconds=10)) == 0
    assert await worker.run_once(now=t + timedelta(hours=1, minutes=1)) == 1
    await worker.close()


async def test_stalled_and_recovered_workspace(
    receivers: Receivers, store: Store, db: Path
) -> None:
    cfg = make_config(db, receivers, ("webhook", "slack"), stalled_after_s=60)
    cfg = Config(store=cfg.store, alerts=cfg.alerts, workspaces=(WorkspaceConfig("ws1", "nlp"),))
    t = now()
    store.record_success("ws1", "hot", format_time(t - timedelta(seconds=600)))
    worker = AlertWorker(store, cfg)
    with capture_logs() as logs:
        await worker.run_once(now=t)
        await worker.run_once(now=t + timedelta(seconds=1))  # announced once
        store.record_success("ws1", "full", format_time(t + timedelta(seconds=2)))
        await worker.run_once(now=t + timedelta(seconds=3))
        await worker.close()
    hooks = [r.body for r in receivers.of(token("webhook"))]
    assert [(h["workspace"], h["state"]) for h in hooks] == [
        ("ws1", "stalled"),
        ("ws1", "recovered"),
    ]
    slack = [r.body["text"] for r in receivers.of(token("slack"))]
    assert len(slack) == 2 and "nlp (ws1)" in slack[0] and "stalled" in slack[0]
    assert worker.stalled == set()
    events = [e["event"] for e in logs]
    assert events.count("alert.workspace_stalled") == 2
    assert events.count("alert.workspace_recovered") == 2


async def test_stall_notices_wait_as_long_as_the_target_asked(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stall notice answered with a wait (429 and Retry-After 40 s) was tried again the
    next round, a second later, and every round after; nor did notices wait for a target
    whose alerts wait a backoff. They go once the wait is over."""
    cfg = make_config(db, receivers, ("slack",), stalled_after_s=60)
    cfg = Config(store=cfg.store, alerts=cfg.alerts, workspaces=(WorkspaceConfig("ws1", "nlp"),))
    t = now()
    store.record_success("ws1", "hot", format_time(t - timedelta(seconds=600)))
    worker = AlertWorker(store, cfg, clock=lambda: t)
    calls: list[str] = []
    answers = iter([Retry("HTTP 429", after_s=40.0)])

    async def scripted(target: Any, message: Any, msg_id: str) -> Any:
        calls.append(msg_id)
        return next(answers, Sent())

    monkeypatch.setattr(worker, "_send", scripted)
    for second in (0, 1, 20, 39):
        await worker.run_once(now=t + timedelta(seconds=second))
    assert len(calls) == 1 and worker.stalled == set()
    await worker.run_once(now=t + timedelta(seconds=41))
    assert len(calls) == 2 and worker.stalled == {"ws1"}
    await worker.close()


def _two_stalled_workspaces(
    receivers: Receivers, store: Store, db: Path
) -> tuple[AlertWorker, datetime, list[datetime]]:
    """A worker telling Slack of two workspaces that last synced 10 minutes ago (stalled
    after 60 s), on a clock the test moves: ``(worker, start, [now])``."""
    cfg = make_config(db, receivers, ("slack",), stalled_after_s=60)
    workspaces = (WorkspaceConfig("ws1", "nlp"), WorkspaceConfig("ws2", "cv"))
    cfg = Config(store=cfg.store, alerts=cfg.alerts, workspaces=workspaces)
    t = now()
    for ws in ("ws1", "ws2"):
        store.record_success(ws, "hot", format_time(t - timedelta(seconds=600)))
    clock = [t]
    return AlertWorker(store, cfg, clock=lambda: clock[0]), t, clock


@pytest.mark.parametrize("answer", ["down", "refused"])
async def test_stall_notices_a_target_fails_back_off(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """A target that is down (503 without Retry-After) or that refuses the notices (a wrong
    secret: dead) got them again every round, a second apart, with a warning each, for as
    long as the stall lasted. The alerts' backoff holds them, over rounds that failed; the
    notice of every stalled workspace is tried in each round that goes."""
    worker, t, clock = _two_stalled_workspaces(receivers, store, db)
    calls: list[float] = []
    failing = [True]

    async def scripted(target: Any, message: Any, msg_id: str) -> Any:
        calls.append((clock[0] - t).total_seconds())
        if not failing[0]:
            return Sent()
        return Retry("HTTP 503") if answer == "down" else Dead("errcode 310000: sign not match")

    monkeypatch.setattr(worker, "_send", scripted)
    for second in range(0, 40):
        clock[0] = t + timedelta(seconds=second)
        await worker.run_once(now=clock[0])
    # rounds at 0, 5 (backoff 5 s), 15 (10 s), 35 (20 s): both workspaces' notices each
    assert calls == [0, 0, 5, 5, 15, 15, 35, 35], calls
    assert backoff_s(1) == 5 and backoff_s(4) == 40
    failing[0] = False
    clock[0] = t + timedelta(seconds=75)
    await worker.run_once(now=clock[0])
    assert worker.stalled == {"ws1", "ws2"}
    await worker.close()


async def test_a_wait_asked_for_once_does_not_stop_later_notices(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workspaces stall; the first one's notice is answered with a wait of 40 s, then
    with 502s. After the wait, the second one's notice must still go: a wait that was over
    used to end every round at the first notice that failed."""
    worker, t, clock = _two_stalled_workspaces(receivers, store, db)
    answers = iter([Retry("HTTP 429", after_s=40.0)])
    calls: list[str] = []

    async def scripted(target: Any, message: Any, msg_id: str) -> Any:
        calls.append(msg_id)
        if "_ws1_" in msg_id:
            return next(answers, Retry("HTTP 502"))
        return Sent()

    monkeypatch.setattr(worker, "_send", scripted)
    for second in (0, 41, 42, 43):
        clock[0] = t + timedelta(seconds=second)
        await worker.run_once(now=clock[0])
    assert any("_ws2_" in c for c in calls), calls
    assert worker.stalled == {"ws2"}
    await worker.close()


async def test_a_round_without_stalls_sends_no_stall_notice(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """``stalls=False`` (a one-shot sync's rounds): alerts only; a stall is the daemon's
    to announce, once, not every cron run's."""
    cfg = make_config(db, receivers, ("webhook",), stalled_after_s=60)
    cfg = Config(store=cfg.store, alerts=cfg.alerts, workspaces=(WorkspaceConfig("ws1", "nlp"),))
    t = now()
    store.record_success("ws1", "hot", format_time(t - timedelta(seconds=600)))
    worker = AlertWorker(store, cfg)
    await worker.run_once(now=t, stalls=False)
    assert receivers.received == [] and worker.stalled == set()
    await worker.run_once(now=t)
    await worker.close()
    assert [r.body["state"] for r in receivers.of(token("webhook"))] == ["stalled"]


async def test_receivers_enforce_the_real_rate_limits(receivers: Receivers) -> None:
    async def post(kind: str, body: dict[str, Any]) -> tuple[int, str, dict[str, str]]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(receivers.url(kind, f"rl-{kind}"), json=body) as r,
        ):
            return r.status, await r.text(), dict(r.headers)

    md = {"msgtype": "markdown", "markdown": {"title": "t", "text": "x", "content": "x"}}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("slack", {"text": "x"}, 1, "rate_limited"),
        ("discord", {"content": "x"}, 5, '"retry_after"'),
        ("dingtalk", md, 20, '"errcode": 130101'),
        ("feishu", {"msg_type": "text", "content": {"text": "x"}}, 5, '"code": 11232'),
        ("wecom", md, 20, '"errcode": 45009'),
    ]
    for kind, body, limit, error in cases:
        answers = [await post(kind, body) for _ in range(limit + 1)]
        assert all(error not in text for _, text, _ in answers[:limit]), kind
        status, text, headers = answers[limit]
        assert error in text, (kind, text)
        if kind in ("slack", "discord"):
            assert status == 429 and "Retry-After" in headers


async def test_discord_429_is_retried_after_its_retry_after(
    receivers: Receivers, store: Store, db: Path
) -> None:
    worker = AlertWorker(store, make_config(db, receivers, ("discord",)), rate_limits={})
    world = World(store, worker, 1)
    world.fail(world.ids)
    for _ in range(5):  # someone else used up the webhook's window
        receivers._rate_ok("discord", token("discord"))
    t = now() + timedelta(seconds=6)
    assert await worker.run_once(now=t) == 0
    (row,) = outbox(db)
    assert row["status"] == "pending" and row["last_error"].startswith("HTTP 429")
    # Retry-After 1 s from the answer (a moment after t), rounded up to the second
    assert row["next_attempt_at"] == format_time(t + timedelta(seconds=2))
    await asyncio.sleep(2.1)
    assert await worker.run_once(now=t + timedelta(seconds=2)) == 1
    await worker.close()


async def test_one_oversized_alert_is_cut_to_fit_and_accepted(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """An experiment whose name alone overflows a message (CJK text: 3 bytes a character)
    is cut to what the target accepts, not sent over its byte limit and dead-lettered as
    "too long" (WeCom 40058, DingTalk 460101)."""
    kinds = ("wecom", "dingtalk", "feishu")
    worker = AlertWorker(store, make_config(db, receivers, kinds), rate_limits={})
    world = World(store, worker, 1)
    big = exp("e0000", "FAILED", {"FAILED": 2})
    big = dataclasses.replace(big, name="超参数搜索" * 1500)
    world._apply([big])
    sent = await worker.run_once(now=now() + timedelta(seconds=6))
    await worker.close()
    assert [(r["target"], r["status"]) for r in outbox(db)] == [(f"t-{k}", "sent") for k in kinds]
    assert sent == len(kinds)
    assert receivers.rejected == []


@pytest.mark.parametrize(
    ("kind", "status", "headers", "body"),
    [
        ("webhook", 429, {"Retry-After": "inf"}, "slow down"),
        ("webhook", 503, {"Retry-After": "1e300"}, "maintenance"),
        ("discord", 429, {}, json.dumps({"message": "rate limited", "retry_after": 1e300})),
        ("webhook", 429, {"Retry-After": "0"}, "now"),
        ("discord", 429, {}, json.dumps({"message": "rate limited", "retry_after": 0})),
    ],
    ids=["inf", "huge", "discord-json", "zero", "discord-zero"],
)
async def test_an_absurd_retry_after_waits_a_bounded_time(
    kind: str, status: int, headers: dict[str, str], body: str, store: Store, db: Path
) -> None:
    """A target asking to wait "inf" or 1e300 seconds is retried after a bounded wait. Such a
    value used to overflow the retry time: the round failed before recording the attempt, so
    the worker posted the message again every second, forever. A wait of 0 gets the
    backoff: taken literally, the message went again every round until it expired."""
    hits: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=status, text=body, headers=headers)

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner, port = await serve(app)
    try:
        worker = one_target_worker(store, db, kind, f"http://127.0.0.1:{port}/hook/S3CRET-path")
        world = World(store, worker, 1)
        world.fail(world.ids)
        t = now()
        await worker.run_once(now=t)
        await worker.run_once(now=t + timedelta(seconds=1))
        await worker.close()
    finally:
        await runner.cleanup()
    assert len(hits) == 1  # not again a second later
    (row,) = outbox(db)
    assert row["status"] == "pending" and row["attempts"] == 1
    wait = datetime.fromisoformat(row["next_attempt_at"]) - t
    # (an hour at most from the answer, a moment after t, rounded up to the second)
    assert timedelta(seconds=1) < wait <= timedelta(hours=1, seconds=1)


@pytest.mark.parametrize("kind", ["webhook", "slack", "teams"])
@pytest.mark.parametrize("status", [301, 302, 307])
async def test_a_redirecting_webhook_is_not_taken_for_delivered(
    kind: str, status: int, store: Store, db: Path
) -> None:
    """A webhook URL that redirects (an http:// URL moved to https://, a retired hook) is
    dead-lettered with the reason, not followed: aiohttp turns a redirected POST into a GET
    whose "200 ok" said the message was delivered when nobody received it."""
    got: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        got.append(f"POST {request.path}")
        return web.Response(status=status, headers={"Location": "/landing?token=S3CRET-token"})

    async def landing(request: web.Request) -> web.Response:
        got.append(f"{request.method} {request.path}")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook/{tail:.*}", moved)
    app.router.add_route("*", "/landing", landing)
    runner, port = await serve(app)
    try:
        worker = one_target_worker(store, db, kind, f"http://127.0.0.1:{port}/hook/S3CRET-path")
        world = World(store, worker, 1)
        world.fail(world.ids)
        assert await worker.run_once(now=now()) == 0
        await worker.close()
    finally:
        await runner.cleanup()
    assert got == ["POST /hook/S3CRET-path"]
    (row,) = outbox(db)
    assert row["status"] == "dead" and row["last_error"].startswith(f"HTTP {status}")
    assert "S3CRET" not in row["last_error"]


async def test_a_target_waiting_on_its_rate_limit_holds_no_other_target_up(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """The worker's loop: DingTalk waits out its rate limit (here one message a minute)
    while Slack keeps delivering every new alert; the waiting rows stay pending and are
    not lost when the worker stops."""
    cfg = make_config(db, receivers, ("dingtalk", "slack"))
    cfg = dataclasses.replace(cfg, alerts=dataclasses.replace(cfg.alerts, group_wait_s=0))
    limits = {**RATE_LIMITS, "dingtalk": ((1, 60.0),)}
    worker = AlertWorker(store, cfg, rate_limits=limits, poll_s=0.05)
    world = World(store, worker, 3)
    slack, ding = token("slack"), token("dingtalk")

    async def until(done: Any, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
            await asyncio.sleep(0.02)

    await worker.start()
    try:
        world.fail(["e0000"])
        await until(lambda: len(receivers.of(slack)) == len(receivers.of(ding)) == 1)
        world.fail(["e0001"])  # DingTalk now waits ~a minute for its next message
        await until(lambda: len(receivers.of(slack)) == 2)
        world.fail(["e0002"])
        await until(lambda: len(receivers.of(slack)) == 3)
        # the receiver has it; the worker records it a moment later (a stop before that
        # leaves it pending, to go again under its id)
        await until(
            lambda: {r["status"] for r in outbox(db) if r["target"] == "t-slack"} == {"sent"}
        )
        assert len(receivers.of(ding)) == 1
    finally:
        await worker.stop()
    rows = outbox(db)
    assert {r["status"] for r in rows if r["target"] == "t-slack"} == {"sent"}
    waiting = [r for r in rows if r["target"] == "t-dingtalk" and r["status"] == "pending"]
    assert len(waiting) == 2 and {r["attempts"] for r in waiting} == {0}
    assert receivers.rejected == []


async def test_a_retried_message_keeps_its_webhook_id_and_its_alerts(
    store: Store, db: Path
) -> None:
    """A receiver that took a message but answered after the worker stopped waiting gets it
    again with the same ``webhook-id`` and the same alerts, though new alerts came in
    meanwhile: those go in a message of their own. (The retry used to regroup whatever was
    due under a new id: the receiver could not tell the alerts it had from the new ones.)
    Its bytes are the same too: the name and label an alert shows are kept on its outbox
    row, so a rename and a new label in between change nothing in it."""
    hook = Hook(HOOK_SECRET, delays_s={0: 1.0})
    runner, url = await hook.serve()
    try:
        worker = one_target_worker(
            store, db, "webhook", url, secret=HOOK_SECRET, request_timeout_s=0.3
        )
        world = World(store, worker, 3)
        world.fail(["e0000", "e0001"])
        t = now()
        assert await worker.run_once(now=t) == 0
        rows = outbox(db)
        assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [
            ("pending", 1, "timed out")
        ] * 2
        world.fail(["e0002"])  # due, like the retry, in the next round
        renamed = dataclasses.replace(exp("e0000", "FAILED", {"FAILED": 2}), name="v2")
        world._apply([renamed])  # no tracked field changed: no alert of its own
        store.ensure_workspace("ws1", "Renamed team")
        assert await worker.run_once(now=t + timedelta(seconds=10)) == 2
        await worker.close()
    finally:
        await runner.cleanup()
    first, again, new = hook.got
    assert first.experiments == ["e0000", "e0001"]
    assert again.webhook_id == first.webhook_id
    assert again.body == first.body  # the same alerts, rendered the same
    assert [a["name"] for a in again.alerts] == ["bert_e0000", "bert_e0001"]
    assert new.experiments == ["e0002"] and new.webhook_id != first.webhook_id
    assert [(r["status"], r["message_id"]) for r in outbox(db)] == [
        ("sent", first.webhook_id),
        ("sent", first.webhook_id),
        ("sent", new.webhook_id),
    ]
    # `alerts list` names each delivery's experiment as its alert did
    assert [r["name"] for r in list_rows(store, None, 0)] == [
        "bert_e0002",
        "bert_e0001",
        "bert_e0000",
    ]


async def test_a_message_is_read_whole_past_the_due_limit(store: Store, db: Path) -> None:
    """A message sent before goes again with all of its rows even when the due query's
    limit cuts it: sent in part under its id, the rest would later come under an id the
    receiver already has, and be dropped."""
    worker = one_target_worker(store, db, "webhook", "http://127.0.0.1:9/unused")
    world = World(store, worker, 4)
    world.fail(world.ids)
    t = now()
    with store.write("name and retry") as conn:
        ids = [r.id for r in queue.due_rows(conn, t)]
        assert len(ids) == 4
        (name,) = queue.name_messages(conn, [ids[1:]])
        assert re.fullmatch(rf"hposync_{ids[1]}_3_[0-9a-f]{{16}}", name), name
        queue.mark_retry(conn, ids, t, "timed out")
    with store.reader() as conn:
        assert [r.id for r in queue.due_rows(conn, t, limit=2)] == ids
        assert [(r.id, r.message_id) for r in queue.due_rows(conn, t, limit=1)] == [(ids[0], None)]


async def test_a_message_id_is_unique_beyond_its_mirror(tmp_path: Path) -> None:
    """Receivers drop a ``webhook-id`` they have processed. Two daemons, each with its own
    mirror (or one mirror restored from a backup), number their outbox rows alike: their
    messages were named alike from the rows alone (``hposync_1_1`` twice), so the second
    daemon's first alert was dropped as a repeat of the first's."""
    names = []
    for n in (1, 2):
        db = tmp_path / f"mirror-{n}.db"
        store = Store.open(db)
        try:
            worker = one_target_worker(store, db, "webhook", "http://127.0.0.1:9/unused")
            world = World(store, worker, 2)
            world.fail(world.ids)
            with store.write("name") as conn:
                a, b = (r.id for r in queue.due_rows(conn, now()))
                names += queue.name_messages(conn, [[a], [b]])
            assert [r["message_id"] for r in outbox(db)] == names[-2:]
        finally:
            store.close()
    assert len(set(names)) == 4
    assert [name.rsplit("_", 1)[0] for name in names] == ["hposync_1_1", "hposync_2_1"] * 2


async def test_rows_put_back_by_alerts_retry_go_without_a_second_group_wait(
    store: Store, db: Path
) -> None:
    """Rows that were attempted already (dead, then put back by ``alerts retry``, which
    restarts their created_at) were grouped once: they go in the next round, not
    ``group_wait_s`` later."""
    hook = Hook(HOOK_SECRET, statuses={0: 400})
    runner, url = await hook.serve()
    try:
        worker = one_target_worker(store, db, "webhook", url, secret=HOOK_SECRET)
        worker.config = dataclasses.replace(
            worker.config, alerts=dataclasses.replace(worker.config.alerts, group_wait_s=60)
        )
        world = World(store, worker, 2)
        world.fail(world.ids)
        t = now() + timedelta(seconds=61)
        assert await worker.run_once(now=t) == 0
        assert {(r["status"], r["attempts"]) for r in outbox(db)} == {("dead", 1)}
        with store.write("alerts retry") as conn:
            assert queue.retry_rows(conn, t, all_dead=True) == 2
        assert await worker.run_once(now=t + timedelta(seconds=1)) == 1
        await worker.close()
    finally:
        await runner.cleanup()
    assert [d.experiments for d in hook.got] == [["e0000", "e0001"]] * 2
    assert {r["status"] for r in outbox(db)} == {"sent"}


async def test_alerts_retry_keeps_the_webhook_id_of_a_whole_message(store: Store, db: Path) -> None:
    """A dead message put back in the queue whole goes again under its ``webhook-id`` (a
    receiver that took it after all can tell); an alert put back without the rest of its
    message goes in a new message (under the old id a receiver that had the message would
    drop it unseen)."""
    hook = Hook(HOOK_SECRET, statuses={0: 400})
    runner, url = await hook.serve()
    try:
        worker = one_target_worker(store, db, "webhook", url, secret=HOOK_SECRET)
        world = World(store, worker, 3)
        world.fail(world.ids)
        t = now()
        assert await worker.run_once(now=t) == 0
        rows = outbox(db)
        assert {r["status"] for r in rows} == {"dead"}
        with store.write("re-queue one") as conn:
            assert queue.retry_rows(conn, t, [rows[0]["id"], rows[0]["id"]]) == 1
        assert await worker.run_once(now=t + timedelta(seconds=1)) == 1
        with store.write("re-queue the rest") as conn:
            assert queue.retry_rows(conn, t, all_dead=True) == 2
        assert await worker.run_once(now=t + timedelta(seconds=2)) == 1
        await worker.close()
    finally:
        await runner.cleanup()
    dead, alone, rest = hook.got
    assert dead.experiments == ["e0000", "e0001", "e0002"]
    assert alone.experiments == ["e0000"] and alone.webhook_id != dead.webhook_id
    assert rest.experiments == ["e0001", "e0002"] and rest.webhook_id == dead.webhook_id
    assert {r["status"] for r in outbox(db)} == {"sent"}


async def test_errors_an_older_version_stored_unmasked_are_masked_at_start_and_reload(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """`alerts list` and the web UI show last_error: a webhook URL an older version kept
    in it (quoted by a misrouting proxy's error page) is masked when the worker starts,
    and again on reload, for every configured target."""
    cfg = make_config(db, receivers, ("wecom",))
    worker = AlertWorker(store, cfg, rate_limits={})
    world = World(store, worker, 2)
    world.fail(world.ids)
    url = receivers.url("wecom", token("wecom"))
    with store.write("an older version's rows") as conn:
        conn.execute("UPDATE alert_outbox SET status = 'dead', last_error = ?", (f"404: {url}",))
    with capture_logs() as logs:
        await worker.start()
        await worker.stop()
    errors = {r["last_error"] for r in outbox(db)}
    assert len(errors) == 1 and token("wecom") not in errors.pop()
    assert [e["rows"] for e in logs if e["event"] == "alert.errors_redacted"] == [2]
    with store.write("again") as conn:
        conn.execute("UPDATE alert_outbox SET last_error = ?", (f"HTTP 404: {token('wecom')}",))
    await worker.reload(cfg)
    assert all(token("wecom") not in r["last_error"] for r in outbox(db))


async def test_a_wait_asked_for_runs_from_the_answer_not_the_start_of_the_round(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends within a round are paced by the target's limiter (up to a minute apart): a
    Retry-After of 3 s counted from the round's start had a message retried ~1 s after
    the answer that asked for 3."""
    worker = AlertWorker(store, make_config(db, receivers, ("slack",)), rate_limits={})
    world = World(store, worker, 1)
    world.fail(world.ids)

    async def slow_then_wait(*args: Any) -> Retry:
        await asyncio.sleep(1.5)  # the limiter's pacing, say
        return Retry("HTTP 429", after_s=3.0)

    monkeypatch.setattr(worker, "_send", slow_then_wait)
    t = now() + timedelta(seconds=6)  # past the digest's grouping window
    assert await worker.run_once(now=t) == 0
    (row,) = outbox(db)
    waited = datetime.fromisoformat(row["next_attempt_at"]) - t
    # 1.5 s of pacing, then the 3 s asked: 4.5 s, kept to the second by rounding up (cut
    # to 4 s, the retry could go half a second inside the wait asked for).
    assert waited >= timedelta(seconds=4.5), waited
    await worker.close()


async def test_a_target_that_asked_to_wait_gets_no_newer_alert_first(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 with Retry-After 40 s held back only the rows it refused: an alert raised 12 s
    later went out inside that wait (for DingTalk, sending on after 130101 is what gets a
    bot banned), and ahead of the older alert (of the same experiment, it may be). Newer
    rows of a target wait behind its oldest waiting row; then all go, oldest first."""
    worker = AlertWorker(store, make_config(db, receivers, ("slack",)), rate_limits={})
    world = World(store, worker, 2)
    world.fail(world.ids[:1])  # alert A
    sent: list[tuple[int, ...]] = []
    answers = iter([Retry("HTTP 429", after_s=40.0)])

    async def scripted(target: Any, message: Any, msg_id: str) -> Any:
        answer = next(answers, None)
        if answer is None:
            sent.append(tuple(message.outbox_ids))
            return Sent()
        return answer

    monkeypatch.setattr(worker, "_send", scripted)
    t = now() + timedelta(seconds=6)
    assert await worker.run_once(now=t, flush=True) == 0
    world.fail(world.ids[1:])  # alert B, 12 s later
    assert await worker.run_once(now=t + timedelta(seconds=12), flush=True) == 0
    assert sent == []
    assert await worker.run_once(now=t + timedelta(seconds=41), flush=True) >= 1
    ids = [i for message in sent for i in message]
    assert ids == sorted(r["id"] for r in outbox(db)) and len(ids) >= 2
    assert all(r["status"] == "sent" for r in outbox(db))
    await worker.close()


async def test_an_alert_waiting_for_quiet_hours_to_end_holds_no_other_back(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """Quiet hours also put an alert off (its next attempt is the end of the window), but
    it was never attempted: the target did not ask anyone to wait, and an urgent alert of
    another rule raised later goes at once, not hours later."""
    t = now()
    window = f"{(t - timedelta(hours=1)):%H:%M}-{(t + timedelta(hours=1)):%H:%M}"
    cfg = make_config(db, receivers, ("slack",))
    quiet = RuleConfig("finished", ("t-slack",), to_status=("FINISHED",), quiet_hours=window)
    loud = RuleConfig("failed", ("t-slack",), to_status=("FAILED",))
    alerts = AlertsConfig(group_wait_s=0, targets=cfg.alerts.targets, rules=(quiet, loud))
    worker = AlertWorker(store, Config(store=cfg.store, alerts=alerts), rate_limits={})
    world = World(store, worker, 2)
    world._apply([exp(world.ids[0], "FINISHED")])  # put off to the end of quiet hours
    world.fail(world.ids[1:])
    assert await worker.run_once(now=t + timedelta(seconds=10)) == 1
    await worker.close()
    assert [(r["rule"], r["status"]) for r in outbox(db)] == [
        ("finished", "pending"),
        ("failed", "sent"),
    ]


async def test_a_slow_target_s_stall_notices_hold_up_no_other_target(
    receivers: Receivers, store: Store, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stall notices went out one after another inside the delivery round: a target that
    did not answer held every other target's alerts up (7-20 s where 2 were usual)."""
    cfg = make_config(db, receivers, ("webhook", "slack"), stalled_after_s=60)
    cfg = Config(store=cfg.store, alerts=cfg.alerts, workspaces=(WorkspaceConfig("ws1", "nlp"),))
    t = now() + timedelta(seconds=6)
    store.record_success("ws1", "hot", format_time(t - timedelta(seconds=600)))
    worker = AlertWorker(store, cfg)
    world = World(store, worker, 1)
    world.fail(world.ids)
    release = asyncio.Event()
    real = worker._announce

    async def stuck(target: Any, notice: Any) -> bool:
        if target.type == "webhook":
            await release.wait()  # a webhook that does not answer
        return await real(target, notice)

    monkeypatch.setattr(worker, "_announce", stuck)
    await asyncio.wait_for(worker.run_once(now=t, wait=False), 10)  # the daemon's rounds
    for _ in range(100):  # the alert, meanwhile, by the delivery the round started
        slack = [r.body["text"] for r in receivers.of(token("slack"))]
        if any("stalled" in s for s in slack) and any("→ FAILED" in s for s in slack):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"slack got only {slack}")
    assert receivers.of(token("webhook")) == [] or all(
        r.body.get("type") != "hpo-sync.workspace" for r in receivers.of(token("webhook"))
    )
    release.set()
    await worker.stop()


async def test_a_new_worker_counts_what_the_last_one_sent_in_the_target_s_window(
    receivers: Receivers, store: Store, db: Path
) -> None:
    """Limits were kept in memory only: every one-shot sync (and every restart) started a
    target's window afresh, and two syncs back to back went past WeCom's 20 a minute."""
    # A webhook target (its receiver enforces no limit of its own, so no real-time pacing
    # decides the outcome), limited to 2 a minute for the test.
    cfg = make_config(db, receivers, ("webhook",))
    limits = {"webhook": ((2, 60.0),)}
    first = AlertWorker(store, cfg, rate_limits=limits)
    world = World(store, first, 2)
    t = now() + timedelta(seconds=6)
    world.fail(world.ids[:1])
    assert await first.run_once(now=t) == 1
    world.fail(world.ids[1:])
    assert await first.run_once(now=t + timedelta(seconds=6)) == 1
    await first.close()
    assert len(receivers.of(token("webhook"))) == 2
    second = AlertWorker(store, cfg, rate_limits=limits)  # the next process
    target = cfg.alerts.targets[0]
    limiter = await second._limiter(target)
    assert limiter.wait_s(time.monotonic()) > 50  # both sends are within the minute
    await second.close()


@contextlib.asynccontextmanager
async def _answer_held(
    db: Path, *, alerts: int, statuses: dict[int, int] | None = None
) -> AsyncIterator[tuple[AlertWorker, Hook, asyncio.Event]]:
    """A worker whose one webhook holds its answer (``statuses`` by request, else 204) to
    the first message until the yielded event is set, with ``alerts`` experiments failed
    and their alerts due; the mirror opened with a short busy timeout, so that a write it
    cannot take fails at once."""
    answer = asyncio.Event()
    hook = Hook(HOOK_SECRET, statuses=statuses or {}, held={0: answer})
    runner, url = await hook.serve()
    store = Store.open(db, busy_timeout_s=0.05)
    try:
        worker = one_target_worker(store, db, "webhook", url, secret=HOOK_SECRET)
        world = World(store, worker, alerts)
        world.fail(world.ids)
        yield worker, hook, answer
        await worker.close()
    finally:
        store.close()
        await runner.cleanup()


async def test_a_sent_message_the_mirror_cannot_record_is_not_sent_again(db: Path) -> None:
    """The target took the message but marking its rows sent failed (the disk is full, or
    as here the write lock is held): the rows stay pending. They used to go again every
    round, ~1/s, for as long as the writes failed (16 copies in 15 s). The outcome is kept
    and recorded once the mirror takes it; meanwhile the target gets nothing."""
    async with _answer_held(db, alerts=2) as (worker, hook, answer):
        t = now()
        with capture_logs() as logs:
            await delivery_under_way(worker, hook, t)
            with write_locked(db):
                answer.set()
                await asyncio.gather(*worker._busy.values(), return_exceptions=True)
                for i in range(1, 6):  # rounds while the mirror still refuses writes
                    with pytest.raises(StoreError, match="record alert deliveries"):
                        await worker.run_once(now=t + timedelta(seconds=i), stalls=False)
                assert len(hook.got) == 1
                assert [r["status"] for r in outbox(db)] == ["pending"] * 2
            assert await worker.run_once(now=t + timedelta(seconds=7), stalls=False) == 0
            rows = outbox(db)
            assert [(r["status"], r["attempts"]) for r in rows] == [("sent", 1)] * 2
            assert await worker.run_once(now=t + timedelta(seconds=8), stalls=False) == 0
        assert len(hook.got) == 1
        assert [e["event"] for e in logs].count("alert.sent") == 1
        # The lock held by another connection is transient: a warning that says so, not
        # an error that suspects a second hpo-sync.
        busy = [e for e in logs if e["event"] == "alert.store_busy"]
        assert busy and all(e["log_level"] == "warning" for e in busy)
        assert "past busy_timeout" in busy[0]["error"] and "second" not in busy[0]["error"]
        assert not any(e["event"] == "alert.worker_failed" for e in logs)


async def test_a_retry_the_mirror_cannot_record_still_waits_its_backoff(db: Path) -> None:
    """The target answered 500 and recording the retry failed: it is not asked again every
    round while the writes fail, and once the retry is recorded the message waits its
    backoff from the answer, then goes."""
    async with _answer_held(db, alerts=1, statuses={0: 500}) as (worker, hook, answer):
        t = now()
        await delivery_under_way(worker, hook, t)
        with write_locked(db):
            answer.set()
            await asyncio.gather(*worker._busy.values(), return_exceptions=True)
            for i in range(1, 4):
                with pytest.raises(StoreError, match="record alert deliveries"):
                    await worker.run_once(now=t + timedelta(seconds=i), stalls=False)
            assert len(hook.got) == 1
        assert await worker.run_once(now=t + timedelta(seconds=4), stalls=False) == 0
        (row,) = outbox(db)
        assert (row["status"], row["attempts"]) == ("pending", 1)
        assert row["next_attempt_at"] == format_time(t + timedelta(seconds=backoff_s(1)))
        assert await worker.run_once(now=t + timedelta(seconds=4), stalls=False) == 0
        assert len(hook.got) == 1
        assert await worker.run_once(now=t + timedelta(seconds=backoff_s(1)), stalls=False) == 1
        assert len(hook.got) == 2 and outbox(db)[0]["status"] == "sent"


async def test_a_step_of_the_clock_moves_the_retries_waits(db: Path) -> None:
    """The target answered 500 and the retry waits its backoff; then the machine's clock
    steps back an hour. Due times are wall-clock times: unmoved, the retry would wait an
    hour more. The daemon's clock watch calls ``clock_stepped``, which moves the pending
    rows' times: a retry's due time, a queued alert's queue time (its group wait and expiry
    run from it) and due time, but not the due time of a row waiting for the end of its
    rule's quiet hours (a time of day)."""
    async with _answer_held(db, alerts=1, statuses={0: 500}) as (worker, hook, answer):
        t = now()
        answer.set()
        assert await worker.run_once(now=t, stalls=False) == 0
        (row,) = outbox(db)
        due = t + timedelta(seconds=backoff_s(1))
        assert (row["attempts"], row["next_attempt_at"]) == (1, format_time(due))
        # Two rows never attempted, each for a target of its own (neither configured, so
        # neither is sent here): one queued in quiet hours, due at their end; one due at once.
        queued = t - timedelta(seconds=1)
        conn = sqlite3.connect(db)
        with conn:
            for target, due_at in (("quiet", t + timedelta(hours=8)), ("soon", queued)):
                conn.execute(
                    "INSERT INTO alert_outbox (target, rule, change_id, status, attempts,"
                    " next_attempt_at, created_at) SELECT ?, rule, change_id, status, 0, ?, ?"
                    " FROM alert_outbox WHERE id = ?",
                    (target, format_time(due_at), format_time(queued), row["id"]),
                )
        conn.close()
        step = timedelta(hours=-1)
        real_clock = worker.clock
        worker.clock = lambda: datetime.now(UTC) + step  # the machine's clock, stepped
        with capture_logs() as logs:
            await worker.clock_stepped(step.total_seconds())
        worker.clock = real_clock  # (the receiver checks signature times on the real one)
        assert [(e["event"], e["alerts_moved"]) for e in logs] == [("alert.clock_stepped", 3)]
        retry, quiet, soon = outbox(db)
        assert retry["next_attempt_at"] == format_time(due + step)
        created = parse_time(row["created_at"])
        assert created is not None and retry["created_at"] == format_time(created + step)
        assert quiet["next_attempt_at"] == format_time(t + timedelta(hours=8))
        assert quiet["created_at"] == soon["created_at"] == format_time(queued + step)
        assert soon["next_attempt_at"] == format_time(queued + step)
        # Due as long after the step as it was before it: not an hour later.
        assert await worker.run_once(now=due + step - timedelta(seconds=1), stalls=False) == 0
        assert len(hook.got) == 1
        assert await worker.run_once(now=due + step, stalls=False) == 1
        assert len(hook.got) == 2 and outbox(db)[0]["status"] == "sent"


@pytest.mark.parametrize("days", [1, -2], ids=["forward", "back"])
async def test_what_is_stamped_between_a_step_and_its_sight_is_not_moved(
    tmp_path: Path, days: int
) -> None:
    """The clock steps; before the daemon's watch sees it (it looks every second) a sweep
    queues an alert, stamped on the new clock, and a delivery's retry is recorded on it.
    Moving those by the step as well made the alert wait a day (a step forward) or expire
    unsent (two days back, past max_age_s), and the retry go at once or a day late. What
    was queued before the step still moves."""
    db = tmp_path / "mirror.db"
    store = Store.open(db)
    receivers = Receivers()
    await receivers.start()
    before = datetime.now(UTC).replace(microsecond=0)
    clock = [before]
    worker = AlertWorker(
        store, make_config(db, receivers, ("slack",)), rate_limits={}, clock=lambda: clock[0]
    )
    try:
        world = World(store, worker, 3)
        world.fail([world.ids[0]])  # queued before the step
        step = timedelta(days=days)
        clock[0] += step
        world.fail([world.ids[1]])  # queued on the new clock, before the watch saw the step
        old, new = outbox(db)
        await worker.clock_stepped(step.total_seconds())
        moved, kept = outbox(db)
        assert moved["created_at"] == format_time(parse_time(old["created_at"]) + step)
        assert kept["created_at"] == new["created_at"]
        # both due (group_wait_s = 5 s), neither expired: one message of two alerts
        assert await worker.run_once(now=clock[0] + timedelta(seconds=10), stalls=False) == 1
        assert [r["status"] for r in outbox(db)] == ["sent", "sent"]
        if days < 0:
            return  # (after a step back, a row queued before it is not due until it moved)
        # Queued, then the clock steps again, then a delivery's retry is recorded on the new
        # clock (the target answered 500) before the watch sees the step: the row's queue
        # time moves, the retry's due time stays.
        world.fail([world.ids[2]])
        (queued,) = [r for r in outbox(db) if r["status"] == "pending"]
        clock[0] += step
        receivers.fail(token("slack"), times=1)
        assert await worker.run_once(now=clock[0], flush=True, stalls=False) == 0
        (retry,) = [r for r in outbox(db) if r["status"] == "pending"]
        assert retry["attempts"] == 1
        await worker.clock_stepped(step.total_seconds())
        (after,) = [r for r in outbox(db) if r["status"] == "pending"]
        assert after["created_at"] == format_time(parse_time(queued["created_at"]) + step)
        assert after["next_attempt_at"] == retry["next_attempt_at"]
    finally:
        await worker.close()
        await receivers.stop()
        store.close()


async def test_a_ban_asked_in_answer_to_a_stall_notice_holds_the_alerts_too(
    store: Store, db: Path
) -> None:
    """DingTalk answered a stall notice 130101 (sent too fast: a ban of ~10 minutes, longer
    for a bot that sends on). The notices waited, but an alert due 5 s later went out
    inside the ban: the wait was kept for the notices alone. It holds the alerts of every
    target of that robot (here routed to a second target of its URL)."""
    receivers, tok, targets = await _one_robot_two_targets()
    worker = None
    try:
        cfg = Config(
            store=StoreConfig(db),
            workspaces=(WorkspaceConfig("ws1", "nlp"),),
            alerts=AlertsConfig(
                group_wait_s=0,
                stalled_after_s=60,
                targets=targets,
                rules=(RuleConfig("r", ("ding-team",)),),
            ),
        )
        t = datetime.now(UTC).replace(microsecond=0)
        store.record_success("ws1", "hot", format_time(t - timedelta(seconds=600)))
        worker = AlertWorker(store, cfg, rate_limits={})
        receivers.fail(tok, errcode=130101, times=1)
        await worker.run_once(now=t)  # the stall notices: one of the two answered 130101
        assert [x.answer for x in receivers.rejected] and "130101" in receivers.rejected[0].answer
        notices = len(receivers.received)
        world = World(store, worker, 1)
        world.fail(world.ids)
        await worker.run_once(now=t + timedelta(seconds=5), stalls=False)
        assert len(receivers.received) == notices  # held: not 5 s into the ban
        (row,) = outbox(db)
        assert (row["status"], row["target"], row["attempts"]) == ("pending", "ding-team", 0)
    finally:
        if worker is not None:
            await worker.close()
        await receivers.stop()


async def test_a_ban_holds_an_older_alert_whose_quiet_hours_end_inside_it(
    store: Store, db: Path
) -> None:
    """Two alerts for one DingTalk robot: the older waits for the end of its rule's quiet
    hours (two minutes), the newer goes at once and is answered 130101 (a ban of ~10
    minutes). Only rows newer than the waiting one were held, so the older went out when
    its quiet hours ended, inside the ban."""
    tok = "tok-ding-S3CRETTOKEN"
    receivers = Receivers()
    await receivers.start()
    real = datetime.now(UTC)
    start = real.replace(second=0, microsecond=0)
    end = start + timedelta(minutes=2)
    target = TargetConfig("ding", "dingtalk", Secret(receivers.url("dingtalk", tok), "t"))
    rules = (
        RuleConfig(
            "night",
            ("ding",),
            experiments=("bert_e0000",),
            quiet_hours=f"{start:%H:%M}-{end:%H:%M}",
        ),
        RuleConfig("loud", ("ding",), experiments=("bert_e0001",)),
    )
    cfg = Config(
        store=StoreConfig(db), alerts=AlertsConfig(group_wait_s=0, targets=(target,), rules=rules)
    )
    worker = AlertWorker(store, cfg, rate_limits={})
    try:
        world = World(store, worker, 2)
        world.fail(["e0000"])  # row 1: waits for the end of the quiet hours
        world.fail(["e0001"])  # row 2: due now
        receivers.fail(tok, errcode=130101, times=1)
        await worker.run_once(now=real)
        quiet, banned = outbox(db)
        assert (quiet["attempts"], banned["attempts"]) == (0, 1)
        assert "130101" in banned["last_error"]
        await worker.run_once(now=end)  # the quiet hours are over; the ban is not
        assert receivers.received == []
        ban_ends = datetime.fromisoformat(banned["next_attempt_at"])
        # then both: the newer again as the message it went in, the older in one of its own
        assert await worker.run_once(now=ban_ends) == 2
        assert [r["status"] for r in outbox(db)] == ["sent", "sent"]
    finally:
        await worker.close()
        await receivers.stop()


async def _one_robot_two_targets() -> tuple[Receivers, str, tuple[TargetConfig, ...]]:
    """Started receivers, a DingTalk robot's token, and two targets of that robot's URL:
    ``ding-oncall`` and ``ding-team``."""
    tok = "tok-ding-S3CRETTOKEN"
    receivers = Receivers()
    await receivers.start()
    url = receivers.url("dingtalk", tok)
    targets = (
        TargetConfig("ding-oncall", "dingtalk", Secret(url, "t")),
        TargetConfig("ding-team", "dingtalk", Secret(url, "t")),
    )
    return receivers, tok, targets


async def test_two_targets_of_one_robot_share_its_rate_limit(store: Store, db: Path) -> None:
    """Two targets of one DingTalk URL (two rules' routes to one robot, say): the limit is
    the robot's (20 a minute), but each target had a limiter of its own, so together they
    sent it 38 a minute and got it banned. Here with a limit of 2 per 1.5 s: six messages,
    three per target, take at least two windows past the first when they share one."""
    receivers, _, targets = await _one_robot_two_targets()
    rules = (
        RuleConfig("failed", ("ding-oncall",), to_status=("FAILED",)),
        RuleConfig("all", ("ding-team",)),
    )
    cfg = Config(
        store=StoreConfig(db), alerts=AlertsConfig(group_wait_s=0, targets=targets, rules=rules)
    )
    worker = AlertWorker(store, cfg, rate_limits={"dingtalk": ((2, 1.5),)})
    try:
        world = World(store, worker, 3)
        began = time.monotonic()
        for i in world.ids:  # one change a round, each round flushed: a message per target
            world.fail([i])
            assert await worker.run_once(flush=True, stalls=False) == 2
        elapsed = time.monotonic() - began
        assert len(receivers.received) == 6 and not receivers.rejected
        assert elapsed >= 2.9, elapsed  # separately limited: ~1.5 s
        assert len(worker._limiters) == 1
    finally:
        await worker.close()
        await receivers.stop()


async def test_a_wait_one_target_of_a_robot_was_asked_holds_its_other_targets(
    store: Store, db: Path
) -> None:
    """DingTalk bans a robot (130101) for one target of its URL: its other target sent into
    that ban 5 s later (waits were kept per target name), which makes a ban longer. Now
    nothing goes to the robot until the wait is over; then both targets' alerts go."""
    receivers, tok, two = await _one_robot_two_targets()
    other = receivers.url("dingtalk", "other")
    targets = (*two, TargetConfig("elsewhere", "dingtalk", Secret(other, "t")))
    rules = (
        RuleConfig("a", ("ding-oncall",), experiments=("bert_e0000",)),
        RuleConfig("b", ("ding-team", "elsewhere"), experiments=("bert_e0001",)),
    )
    cfg = Config(
        store=StoreConfig(db), alerts=AlertsConfig(group_wait_s=0, targets=targets, rules=rules)
    )
    worker = AlertWorker(store, cfg, rate_limits={})
    try:
        world = World(store, worker, 2)
        t = datetime.now(UTC).replace(microsecond=0)
        world.fail(["e0000"])
        receivers.fail(tok, errcode=130101, times=1)
        await worker.run_once(now=t, stalls=False)
        assert "130101" in outbox(db)[0]["last_error"]
        world.fail(["e0001"])
        assert await worker.run_once(now=t + timedelta(seconds=5), stalls=False) == 1
        assert [r.token for r in receivers.received] == ["other"]  # another robot: not held
        due = parse_time(outbox(db)[0]["next_attempt_at"])
        assert due is not None and due > t + timedelta(seconds=5)
        assert await worker.run_once(now=due + timedelta(seconds=1), stalls=False) == 2
        assert sorted(r.token for r in receivers.received) == ["other", tok, tok]
    finally:
        await worker.close()
        await receivers.stop()


@pytest.mark.parametrize("days", [1, -2], ids=["forward", "back"])
async def test_a_clock_step_moves_only_the_outcomes_kept_from_before_it(
    store: Store, db: Path, days: int
) -> None:
    """Outcomes the mirror could not record yet are kept with the time of their attempt: an
    old one moves with the step, one made since the step (on the new clock) stays."""
    from hpo_sync.alerts.service import _Unrecorded

    step = timedelta(days=days)
    before = datetime.now(UTC).replace(microsecond=0)
    clock = [before + step]
    worker = AlertWorker(
        store, make_config(db, Receivers(), ("slack",)), rate_limits={}, clock=lambda: clock[0]
    )
    old = _Unrecorded((1,), Retry("500"), before - timedelta(seconds=30), 1, 5.0, before)
    new = _Unrecorded((2,), Retry("500"), clock[0], 1, 5.0, clock[0])
    worker._unrecorded["t-slack"] = [old, new]
    await worker.clock_stepped(step.total_seconds())
    moved, kept = worker._unrecorded["t-slack"]
    assert moved.now == old.now + step and kept.now == new.now
    await worker.close()
