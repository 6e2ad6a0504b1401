"""The pure alert core: rules, quiet hours, rendering, signing vectors, answer classification."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hpo_sync.alerts.classify import Dead, Retry, Sent, classify, redact, secret_parts
from hpo_sync.alerts.render import (
    LIMITS,
    MAX_NAME_CHARS,
    AlertItem,
    console_link,
    form_messages,
    render,
    render_message,
    render_notice,
    size_of,
)
from hpo_sync.alerts.rules import (
    ChangeEvent,
    ExperimentInfo,
    StallNotice,
    build_events,
    matches,
    quiet_until,
    route,
    stall_notices,
)
from hpo_sync.alerts.signing import (
    dingtalk_sign,
    dingtalk_url,
    feishu_sign,
    verify_webhook,
    webhook_headers,
    webhook_signature,
)
from hpo_sync.config import RuleConfig
from hpo_sync.store import ChangeRow

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


# --- signing -------------------------------------------------------------------------------


def test_dingtalk_vector() -> None:
    assert (
        dingtalk_sign("SECexample", 1700000000000) == "uroalHrWHORz59talE1o26b8HuX2kOp8WlAN91F9Pj0="
    )


def test_dingtalk_url_encodes_sign_once() -> None:
    url = dingtalk_url(
        "https://oapi.dingtalk.com/robot/send?access_token=t", "SECexample", 1700000000000
    )
    assert "sign=uroalHrWHORz59talE1o26b8HuX2kOp8WlAN91F9Pj0%3D" in url
    q = parse_qs(urlsplit(url).query)
    assert q["timestamp"] == ["1700000000000"]
    assert q["sign"] == ["uroalHrWHORz59talE1o26b8HuX2kOp8WlAN91F9Pj0="]
    assert q["access_token"] == ["t"]


def test_feishu_vector() -> None:
    assert feishu_sign("example", 1700000000) == "IDYtqgwsyU5irwQ/8nvd4ncBjc/KPCpVGkxbLfWDsyg="


def test_standard_webhooks_vector() -> None:
    # The vector published with the Standard Webhooks specification.
    sig = webhook_signature(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_standard_webhooks_round_trip_plain_secret() -> None:
    h = webhook_headers("plain-key", "id1", 1000, b"{}")
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert verify_webhook("plain-key", h, b"{}", now_s=1001)
    assert not verify_webhook("other", h, b"{}", now_s=1001)
    assert not verify_webhook("plain-key", h, b"{}", now_s=5000)
    # a timestamp from the future is as stale as one from the past
    assert not verify_webhook("plain-key", h, b"{}", now_s=400)
    assert verify_webhook("plain-key", h, b"{}", now_s=750)
    # unsigned (no secret): the id and the time still go, for a receiver that deduplicates
    assert webhook_headers(None, "id1", 1000, b"{}") == {
        "webhook-id": "id1",
        "webhook-timestamp": "1000",
    }


# --- classification ------------------------------------------------------------------------


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("ttype", "status", "headers", "body", "expected"),
    [
        ("dingtalk", 200, {}, _j({"errcode": 0, "errmsg": "ok"}), Sent),
        ("dingtalk", 200, {}, _j({"errcode": 130101, "errmsg": "send too fast"}), Retry),
        ("dingtalk", 200, {}, _j({"errcode": 310000, "errmsg": "sign not match"}), Dead),
        ("dingtalk", 200, {}, _j({"errcode": 460101, "errmsg": "too long"}), Dead),
        ("dingtalk", 200, {}, _j({"errcode": 300001, "errmsg": "token is not exist"}), Dead),
        ("dingtalk", 500, {}, b"oops", Retry),
        ("feishu", 200, {}, _j({"code": 0, "msg": "success"}), Sent),
        ("lark", 200, {}, _j({"StatusCode": 0, "StatusMessage": "success"}), Sent),
        ("feishu", 200, {}, _j({"code": 19021, "msg": "sign match fail"}), Dead),
        ("feishu", 200, {}, _j({"code": 19024, "msg": "Key Words Not Found"}), Dead),
        ("feishu", 200, {}, _j({"code": 11232, "msg": "frequency limited"}), Retry),
        ("lark", 200, {}, _j({"code": 9499, "msg": "too many request"}), Retry),
        ("wecom", 200, {}, _j({"errcode": 0, "errmsg": "ok"}), Sent),
        ("wecom", 200, {}, _j({"errcode": 45009, "errmsg": "api freq out of limit"}), Retry),
        ("wecom", 200, {}, _j({"errcode": 40058, "errmsg": "too long"}), Dead),
        ("wecom", 200, {}, _j({"errcode": 93000, "errmsg": "invalid webhook url"}), Dead),
        # "system busy, retry later" on both
        ("dingtalk", 200, {}, _j({"errcode": -1, "errmsg": "系统繁忙"}), Retry),
        ("wecom", 200, {}, _j({"errcode": -1, "errmsg": "system busy"}), Retry),
        ("slack", 200, {}, b"ok", Sent),
        ("slack", 400, {}, b"invalid_payload", Dead),
        ("slack", 404, {}, b"no_service", Dead),
        ("slack", 429, {"Retry-After": "7"}, b"rate_limited", Retry),
        ("slack", 503, {}, b"", Retry),
        ("discord", 204, {}, b"", Sent),
        ("discord", 200, {}, _j({"id": "1"}), Sent),
        ("discord", 429, {}, _j({"retry_after": 1.5, "global": False}), Retry),
        ("discord", 400, {}, _j({"code": 50035}), Dead),
        ("teams", 202, {}, b"", Sent),
        ("teams", 400, {}, b"bad", Dead),
        ("webhook", 200, {}, b"", Sent),
        ("webhook", 204, {}, b"", Sent),
        ("webhook", 429, {"retry-after": "3"}, b"", Retry),
        ("webhook", 502, {}, b"", Retry),
        ("webhook", 410, {}, b"gone", Dead),
        # a request timeout is the receiver's to try again, for every kind
        ("webhook", 408, {}, b"", Retry),
        ("teams", 408, {}, b"timeout", Retry),
        ("discord", 408, {}, b"", Retry),
        ("slack", 408, {}, b"", Retry),  # (was dead-lettered: Slack's branch refused all)
    ],
)
def test_classify(
    ttype: str, status: int, headers: dict[str, str], body: bytes, expected: type
) -> None:
    assert isinstance(classify(ttype, status, headers, body), expected)


def test_secret_parts_mask_every_form_of_the_token() -> None:
    url = "https://oapi.dingtalk.com/robot/send?access_token=ab%2Fcd1234567&x=1"
    parts = secret_parts(url, "SECsigning", None)
    for leaked in (url, "ab%2Fcd1234567", "ab/cd1234567", "SECsigning"):
        assert redact(f"bad: {leaked}!", parts) == "bad: ***!"
    slack = "https://hooks.slack.com/services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX"
    text = redact("POST /services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX failed", secret_parts(slack))
    assert "XXXXXXXX" not in text and "failed" in text and "/B0002/" in text
    # a value as sent ('+' for a space) is masked as well as decoded
    plus = secret_parts("https://x.example/send?key=abc+defghij")
    assert redact("key abc+defghij and abc defghij", plus) == "key *** and ***"
    # the answer is judged as it came: a secret that happens to be in a success body
    # changes nothing
    ok = b'{"errcode":0,"errmsg":"ok"}'
    assert classify("dingtalk", 200, {}, ok, secret_parts(url, "errcode")) == Sent()
    # the mask works before the snippet is cut, so no half-token survives at the edge
    body = ("x" * 190 + "XXXXXXXXXXXXXXXXXXXXXXXX").encode()
    assert "XXXX" not in classify("slack", 404, {}, body, secret_parts(slack)).reason  # type: ignore[union-attr]


def test_classify_retry_after_and_reasons() -> None:
    assert classify("slack", 429, {"Retry-After": "7"}, b"rate_limited") == Retry(
        "HTTP 429: rate_limited", 7.0
    )
    r = classify("discord", 429, {}, _j({"retry_after": 1.5}))
    assert isinstance(r, Retry) and r.after_s == 1.5
    assert classify("webhook", 503, {"Retry-After": "2"}, b"").after_s == 2.0  # type: ignore[union-attr]
    d = classify("dingtalk", 200, {}, _j({"errcode": 310000, "errmsg": "keywords not in content"}))
    assert isinstance(d, Dead) and "310000" in d.reason and "keywords not in content" in d.reason
    r2 = classify("dingtalk", 200, {}, _j({"errcode": 130101, "errmsg": "x"}))
    # DingTalk keeps a robot quiet for 10 minutes past its limit: no retry within them
    assert isinstance(r2, Retry) and r2.after_s == 600.0


# --- rules ---------------------------------------------------------------------------------


EXP = ExperimentInfo("e1", "ws1", "bert_lr_sweep", "FAILED", {"team": "nlp"}, {"FAILED": 4})


def _event(**kw: object) -> ChangeEvent:
    base: dict[str, object] = dict(
        change_id=1,
        experiment=EXP,
        status_from="RUNNING",
        status_to="FAILED",
        status_changed=True,
        trials_from={"FAILED": 1, "RUNNING": 3},
        trials_to={"FAILED": 4},
        trials_changed=True,
    )
    base.update(kw)
    return ChangeEvent(**base)  # type: ignore[arg-type]


def test_rule_conditions() -> None:
    ev = _event()
    assert matches(RuleConfig("r", ("t",)), ev)
    assert matches(RuleConfig("r", ("t",), workspaces=("ws1",)), ev)
    assert not matches(RuleConfig("r", ("t",), workspaces=("ws2",)), ev)
    assert matches(RuleConfig("r", ("t",), experiments=("bert_*",)), ev)
    assert not matches(RuleConfig("r", ("t",), experiments=("gpt_*", "*_x")), ev)
    assert matches(RuleConfig("r", ("t",), tags=(("team", "nlp"),)), ev)
    assert not matches(RuleConfig("r", ("t",), tags=(("team", "cv"),)), ev)
    # every tag of the rule must match, not any one of them
    two = _event(experiment=replace(EXP, tags={"a": "1", "b": "3"}))
    assert not matches(RuleConfig("r", ("t",), tags=(("a", "1"), ("b", "2"))), two)
    assert matches(RuleConfig("r", ("t",), tags=(("a", "1"), ("b", "3"))), two)
    assert matches(RuleConfig("r", ("t",), from_status=("RUNNING",), to_status=("FAILED",)), ev)
    assert not matches(RuleConfig("r", ("t",), to_status=("FINISHED",)), ev)
    assert not matches(RuleConfig("r", ("t",), from_status=("WAITING",)), ev)
    assert matches(RuleConfig("r", ("t",), trial_failures_rose=True, trial_failures_min=3), ev)
    assert not matches(RuleConfig("r", ("t",), trial_failures_rose=True, trial_failures_min=4), ev)


def test_status_rule_needs_a_status_change_but_trial_rule_does_not() -> None:
    trials_only = _event(status_from="RUNNING", status_to="RUNNING", status_changed=False)
    assert not matches(RuleConfig("r", ("t",), to_status=("RUNNING",)), trials_only)
    rule = RuleConfig(
        "r", ("t",), from_status=("RUNNING",), to_status=("RUNNING",), trial_failures_rose=True
    )
    assert matches(rule, trials_only)
    no_rise = _event(trials_from={"FAILED": 4}, trials_to={"FAILED": 4, "RUNNING": 1})
    assert not matches(RuleConfig("r", ("t",), trial_failures_rose=True), no_rise)


def _row(
    id_: int, field: str, old: str | None, new: str | None, baseline: bool = False
) -> ChangeRow:
    return ChangeRow(id_, "e1", "ws1", field, old, new, "2024-03-01T12:00:00Z", 1, baseline)


def test_build_events_groups_and_skips_baseline() -> None:
    rows = [
        _row(10, "Status", "RUNNING", "FAILED"),
        _row(11, "TrialStatus", '{"FAILED":1}', '{"FAILED":4}'),
        _row(12, "Status", None, "RUNNING", baseline=True),
    ]
    (ev,) = build_events(rows, {"e1": EXP})
    assert ev.change_id == 10 and ev.failed_delta == 3 and ev.status_changed
    assert build_events([rows[2]], {"e1": EXP}) == []
    (trial_ev,) = build_events([rows[1]], {"e1": EXP})
    assert trial_ev.change_id == 11 and trial_ev.status_from == trial_ev.status_to == "FAILED"


@pytest.mark.parametrize(
    ("spec", "now", "until"),
    [
        (
            "22:00-07:00",
            datetime(2024, 3, 1, 23, 30, tzinfo=UTC),
            datetime(2024, 3, 2, 7, 0, tzinfo=UTC),
        ),
        (
            "22:00-07:00",
            datetime(2024, 3, 1, 3, 0, tzinfo=UTC),
            datetime(2024, 3, 1, 7, 0, tzinfo=UTC),
        ),
        ("22:00-07:00", datetime(2024, 3, 1, 7, 0, tzinfo=UTC), None),
        ("22:00-07:00", datetime(2024, 3, 1, 21, 59, tzinfo=UTC), None),
        (
            "22:00-07:00",
            datetime(2024, 12, 31, 22, 0, tzinfo=UTC),
            datetime(2025, 1, 1, 7, 0, tzinfo=UTC),
        ),
        (
            "09:00-17:30",
            datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
            datetime(2024, 3, 1, 17, 30, tzinfo=UTC),
        ),
        ("09:00-17:30", datetime(2024, 3, 1, 17, 30, tzinfo=UTC), None),
        ("09:00-09:00", datetime(2024, 3, 1, 9, 0, tzinfo=UTC), None),
        (None, NOW, None),
    ],
)
def test_quiet_hours(spec: str | None, now: datetime, until: datetime | None) -> None:
    assert quiet_until(spec, now) == until


def test_route_once_per_target_earliest_rule_wins() -> None:
    quiet = RuleConfig("quiet", ("slack", "ding"), quiet_hours="11:00-13:00")
    loud = RuleConfig("loud", ("slack",), to_status=("FAILED",))
    routes = route([_event()], [quiet, loud], NOW)
    by_target = {r.target: r for r in routes}
    assert len(routes) == 2
    assert by_target["slack"].rule == "loud" and by_target["slack"].next_attempt_at == NOW
    assert by_target["ding"].rule == "quiet"
    assert by_target["ding"].next_attempt_at == datetime(2024, 3, 1, 13, 0, tzinfo=UTC)


# --- rendering -----------------------------------------------------------------------------


def _item(i: int, name: str = "bert_lr_sweep") -> AlertItem:
    return AlertItem(
        outbox_id=i,
        rule="experiment failed",
        workspace_id="12345",
        experiment_id=f"exp-{i}",
        name=name,
        field="Status",
        old_value="RUNNING",
        new_value="FAILED",
        observed_at="2024-03-01T12:00:00Z",
        trial_status={"FAILED": 3, "SUCCEEDED": 5},
        failed_delta=2,
        workspace_label="nlp-research",
        console_url=f"https://pai.console.aliyun.com/?regionId=cn-hangzhou&workspaceId=12345#/automl/hpo/exp-{i}",
    )


def test_render_shapes() -> None:
    items = [_item(1)]
    (slack,) = render("slack", items)
    assert set(slack.payload) == {"text"}
    text = slack.payload["text"]
    for part in (
        "bert_lr_sweep",
        "exp-1",
        "RUNNING → FAILED",
        "FAILED 3",
        "12345",
        "nlp-research",
        "2024-03-01T12:00:00Z",
        "<https://pai.console.aliyun.com/",
    ):
        assert part in text
    (discord,) = render("discord", items)
    assert discord.payload["allowed_mentions"] == {"parse": []}  # nobody pinged, ever
    assert set(discord.payload) == {"content", "allowed_mentions"}
    (ding,) = render("dingtalk", items, keyword="hpo-alarm")
    assert ding.payload["msgtype"] == "markdown"
    assert set(ding.payload["markdown"]) == {"title", "text"}
    assert "hpo-alarm" in ding.payload["markdown"]["text"]
    assert "[console](https://pai" in ding.payload["markdown"]["text"]
    (feishu,) = render("feishu", items, keyword="kw")
    assert feishu.payload["msg_type"] == "interactive" and "kw" in json.dumps(feishu.payload)
    (wecom,) = render("wecom", items)
    assert wecom.payload == {
        "msgtype": "markdown",
        "markdown": {"content": wecom.payload["markdown"]["content"]},
    }
    (teams,) = render("teams", items)
    assert teams.payload["type"] == "message"
    att = teams.payload["attachments"][0]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert att["content"]["type"] == "AdaptiveCard"
    (hook,) = render("webhook", items)
    assert hook.payload["type"] == "hpo-sync.changes"
    assert hook.payload["alerts"][0] == {
        "workspace": "12345",
        "experiment_id": "exp-1",
        "name": "bert_lr_sweep",
        "field": "Status",
        "from": "RUNNING",
        "to": "FAILED",
        "trial_status": {"FAILED": 3, "SUCCEEDED": 5},
        "observed_at": "2024-03-01T12:00:00Z",
        "console_url": items[0].console_url,
        "rule": "experiment failed",
    }


@pytest.mark.parametrize(
    "ttype", ["slack", "discord", "dingtalk", "feishu", "lark", "wecom", "teams"]
)
def test_render_respects_limits_and_leaves_the_rest_for_later_rounds(ttype: str) -> None:
    """At most 3 messages a round, each within the target's limit, holding the oldest alerts
    in order; the rest are in no message (they stay pending), never summed up as "… and N
    more": round after round, every alert goes out listed, exactly once."""
    items = [_item(i, name="实验_" + "x" * 40) for i in range(1, 801)]
    limit, _ = LIMITS[ttype]
    rest, rounds, listed = items, 0, []
    while rest:
        messages = render(ttype, rest, keyword="kw")
        assert 1 <= len(messages) <= 3
        rounds += 1
        for m in messages:
            assert size_of(ttype, m.payload) <= limit
            text = json.dumps(m.payload, ensure_ascii=False)
            assert "… and " not in text
            listed += [int(n) for n in re.findall(r"\(exp-(\d+)\)", text)]
        ids = [i for m in messages for i in m.outbox_ids]
        assert ids == [i.outbox_id for i in rest[: len(ids)]]
        rest = rest[len(ids) :]
    assert listed == list(range(1, 801))
    assert rounds > 1  # 800 alerts fit 3 messages of no chat target


@pytest.mark.parametrize(
    "ttype", ["slack", "discord", "dingtalk", "feishu", "lark", "wecom", "teams"]
)
@pytest.mark.parametrize(
    "name",
    ["实验" * 3000, '"' * 20_000, "\x01" * 20_000, "x" * 60_000],
    ids=["cjk", "quotes", "control", "ascii"],
)
def test_render_cuts_one_oversized_alert_to_the_limit_as_the_target_counts(
    ttype: str, name: str
) -> None:
    """A single alert too big for one message is cut to fit the target's limit in the unit
    the target counts (UTF-8 bytes, JSON-escaped bytes), not to a number of characters: a
    CJK name cut to 2,000 characters is still 6,000 bytes, past WeCom's 4,096."""
    (message,) = render(ttype, [_item(1, name=name)], keyword="kw")
    limit, _ = LIMITS[ttype]
    assert size_of(ttype, message.payload) <= limit
    assert message.outbox_ids == (1,)
    assert any("kw" in text for text in _strings(message.payload))
    # the name is cut, the rest of the alert stays: its id, what changed and its link
    shown = name[: MAX_NAME_CHARS - 1] + "…"
    text = "\n".join(_strings(message.payload))
    assert shown in text and name not in text
    assert all(part in text for part in ("(exp-1)", "RUNNING → FAILED", "console"))


def test_render_splits_before_truncating() -> None:
    items = [_item(i) for i in range(1, 21)]
    messages = render("discord", items)
    assert len(messages) > 1
    assert sorted(i for m in messages for i in m.outbox_ids) == list(range(1, 21))


def test_a_message_rendered_again_from_its_alerts_is_the_same() -> None:
    """Every message of a split digest is rendered from its own alerts alone (its heading
    counts them), so a retry, rendered from the message's rows, sends the same text."""
    items = [_item(i) for i in range(1, 41)]
    messages = render("discord", items)
    assert len(messages) == 3
    by_id = {i.outbox_id: i for i in items}
    for m in messages:
        assert render_message("discord", [by_id[i] for i in m.outbox_ids]) == m
        assert f"{len(m.outbox_ids)} changes" in m.payload["content"]


def test_form_messages_sends_a_stored_message_again_and_new_alerts_apart() -> None:
    items = [_item(i) for i in range(1, 6)]
    stored = {1: "hposync_1_2", 2: "hposync_1_2", 4: "hposync_4_1"}
    formed = form_messages("webhook", items, stored)
    assert [(f.message_id, f.message.outbox_ids) for f in formed] == [
        ("hposync_1_2", (1, 2)),
        (None, (3, 5)),
        ("hposync_4_1", (4,)),
    ]
    assert formed[0].message == render("webhook", items[:2])[0]


def test_form_messages_keeps_a_digest_as_it_was_split() -> None:
    """A split digest retried with new alerts: its messages go again as they were; the
    alerts no message held yet (past the round's 3) and the new ones go in new messages."""
    items = [_item(i) for i in range(1, 41)]
    first = form_messages("discord", items, {})
    assert len(first) == 3 and all(f.message_id is None for f in first)
    names = {i: f"m{n}" for n, f in enumerate(first) for i in f.message.outbox_ids}
    waiting = [i for i in range(1, 44) if i not in names]
    assert waiting[0] > max(names) and waiting[-3:] == [41, 42, 43]
    again = form_messages("discord", [*items, *(_item(i) for i in range(41, 44))], names)
    assert [f.message for f in again[:3]] == [f.message for f in first]
    assert [f.message_id for f in again[:3]] == ["m0", "m1", "m2"]
    fresh = [i for f in again[3:] for i in f.message.outbox_ids]
    assert all(f.message_id is None for f in again[3:])
    assert fresh == waiting[: len(fresh)] and fresh


def test_form_messages_keeps_a_stored_message_whole_after_a_type_change() -> None:
    """A message formed for a generic webhook, retried after the target became a Discord
    one: still one message under its id, what does not fit counted in "… and N more"."""
    items = [_item(i) for i in range(1, 41)]
    (formed,) = form_messages("discord", items, dict.fromkeys(range(1, 41), "hposync_1_40"))
    assert formed.message_id == "hposync_1_40"
    assert formed.message.outbox_ids == tuple(range(1, 41))
    assert size_of("discord", formed.message.payload) <= LIMITS["discord"][0]
    assert "… and " in formed.message.payload["content"]


def test_stall_notices() -> None:
    old = NOW - timedelta(hours=2)
    last = {"ws1": old, "ws2": NOW - timedelta(seconds=10), "ws3": None}
    labels = {"ws1": "nlp", "ws2": None, "ws3": None}
    started = NOW - timedelta(seconds=30)
    got = stall_notices(last, labels, set(), NOW, 1800, started)
    assert got == [StallNotice("ws1", "nlp", "stalled", old)]
    assert stall_notices(last, labels, {"ws1"}, NOW, 1800, started) == []
    recovered = stall_notices({"ws1": NOW}, labels, {"ws1"}, NOW, 1800, started)
    assert recovered == [StallNotice("ws1", "nlp", "recovered", NOW)]
    never = stall_notices({"ws3": None}, labels, set(), NOW, 10, started)
    assert [n.state for n in never] == ["stalled"]


@pytest.mark.parametrize("ttype", ["slack", "discord", "dingtalk", "feishu", "wecom", "teams"])
def test_render_notice(ttype: str) -> None:
    payload = render_notice(ttype, "12345", "nlp", "stalled", "2024-03-01T10:00:00Z", keyword="kw")
    text = json.dumps(payload, ensure_ascii=False)
    assert "workspace stalled" in text and "nlp (12345)" in text and "2024-03-01T10:00:00Z" in text
    assert "kw" in text
    never = render_notice(ttype, "12345", None, "stalled", None)
    assert "has not synced successfully yet" in json.dumps(never) and "never" not in str(never)


def test_render_notice_webhook() -> None:
    assert render_notice("webhook", "12345", None, "recovered", None) == {
        "type": "hpo-sync.workspace",
        "workspace": "12345",
        "state": "recovered",
        "last_success_at": None,
    }


_names = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


#: Any chat target, up to 60 alerts with any names, with or without a keyword.
render_cases = given(
    ttype=st.sampled_from(["slack", "discord", "dingtalk", "feishu", "wecom", "teams"]),
    names=st.lists(_names, min_size=1, max_size=60),
    keyword=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
)


@render_cases
@example(ttype="discord", names=[""] * 22, keyword=None)  # more than three messages hold
@settings(max_examples=60, deadline=None)
def test_render_property_fits_and_accounts_for_every_alert(
    ttype: str, names: list[str], keyword: str | None
) -> None:
    items = [_item(i, name=n) for i, n in enumerate(names, 1)]
    messages = render(ttype, items, keyword=keyword)
    assert 1 <= len(messages) <= 3
    # The alerts in order, each in one message at most; those past the third message stay
    # for the next round (never summed up as "... and N more"), so only when three are full.
    sent = [i for m in messages for i in m.outbox_ids]
    assert sent == list(range(1, len(sent) + 1)) and sent
    assert len(sent) == len(names) or len(messages) == 3
    limit, _ = LIMITS[ttype]
    for m in messages:
        assert size_of(ttype, m.payload) <= limit
        if keyword:
            assert any(keyword in text for text in _strings(m.payload))


@render_cases
@settings(max_examples=60, deadline=None)
def test_render_property_each_message_is_its_alerts_rendered_alone(
    ttype: str, names: list[str], keyword: str | None
) -> None:
    items = [_item(i, name=n) for i, n in enumerate(names, 1)]
    by_id = {i.outbox_id: i for i in items}
    for m in render(ttype, items, keyword=keyword):
        assert render_message(ttype, [by_id[i] for i in m.outbox_ids], keyword=keyword) == m


@given(
    start=st.integers(0, 1439),
    end=st.integers(0, 1439),
    minute=st.integers(0, 1439),
)
def test_quiet_until_property(start: int, end: int, minute: int) -> None:
    spec = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    now = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(minutes=minute, seconds=30)
    until = quiet_until(spec, now)
    wraps = start > end
    inside = (start <= minute < end) if not wraps else (minute >= start or minute < end)
    assert (until is not None) == inside
    if until is not None:
        assert now < until <= now + timedelta(days=1)
        assert until.hour * 60 + until.minute == end and until.second == 0


def test_one_message_a_round_counts_only_the_alerts_it_holds() -> None:
    """A round capped at one message that cannot hold every alert: its heading counts the
    alerts it lists (the rest wait for the next round), as it reads when sent again."""
    items = [_item(i) for i in range(1, 41)]
    (message,) = render("discord", items, max_messages=1)
    held = len(message.outbox_ids)
    assert 0 < held < 40
    assert message == render_message("discord", items[:held])
    assert f"{held} changes" in message.payload["content"]


HOSTILE = (
    "x` <!channel> <@U024BE7LH> @everyone <at id=all></at> <@all> [click](http://evil)\n### fake"
    " ![x](http://evil/t.png) **BOLD** ~~s~~"
)


@pytest.mark.parametrize(
    "ttype", ["slack", "discord", "dingtalk", "feishu", "lark", "wecom", "teams"]
)
def test_data_in_an_alert_is_never_markup(ttype: str) -> None:
    """An experiment's name (or id, or status) used to close its code span and mention a
    whole channel (Slack's <!channel>, Discord's @everyone, Feishu's <at id=all>, WeCom's
    <@all>), or start a heading of its own: what upstream sends is shown, never obeyed."""
    item = replace(
        _item(1, name=HOSTILE), experiment_id="id`<!here>[link](https://evil.example)",
        new_value="FAILED<@all>",
        trial_status={"<at id=all></at>": 1},
    )  # fmt: skip
    (message,) = render(ttype, [item])
    text = "\n".join(_strings(message.payload))
    for markup in ("<!channel>", "<@U024BE7LH>", "@everyone", "<at id=all>", "<@all>", "<!here>"):
        assert markup not in text, markup
    assert "\n### fake" not in text and "`x`" not in text
    assert text.count("`") % 2 == 0  # every code span that opens closes
    assert "x\u02cb \u2039!channel\u203a" in text  # shown as look-alikes
    # no link or image of its own (DingTalk and Teams have no code span to hold a name, and
    # the id is outside one everywhere), no bold or struck-through text
    for markup in ("[click](http://evil)", "](http://evil)", "![", "**BOLD**", "~~s~~"):
        assert markup not in text, markup
    assert "\uff3bclick\uff3d(http://evil)" in text
    assert "\uff3blink\uff3d(https://evil.example)" in text  # the id's


def test_slack_shows_ampersands_as_written() -> None:
    """Slack reads &amp; &lt; &gt; as entities: a name holding "&lt;" would show "<"."""
    (message,) = render("slack", [_item(1, name="a &lt; b & c")])
    assert "a &amp;lt; b &amp; c" in message.payload["text"]


def test_console_links_percent_encode_the_ids() -> None:
    link = console_link("https://c/{region}/{workspace}/{experiment_id}", "r", "w s", "a|b>c")
    assert link == "https://c/r/w%20s/a%7Cb%3Ec"
