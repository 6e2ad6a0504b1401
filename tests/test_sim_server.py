"""The simulator as a real server on a loopback port: gateway checks, throttling, faults,
drift, the control API, and the official SDK as a client that must not tell the difference."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
import yarl
from simfixtures import ERROR_KEYS, list_ok, send, signed_get, signed_headers

from hpo_sync import signing
from hpo_sync.normalise import normalise
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import (
    API_PATH,
    SimOptions,
    Simulator,
    StsToken,
    add_arguments,
    options_from_args,
    serve_forever,
)

START = datetime(2025, 6, 1, 8, 0, 0, tzinfo=UTC)
UUID_UPPER = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")


class FakeClock:
    """The gateway's wall clock, moved by hand (throttling without sleeping)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def opts(**kw: Any) -> SimOptions:
    base: dict[str, Any] = {"experiments": 600, "workspaces": 3, "seed": 1, "start_time": START}
    base.update(kw)
    return SimOptions(**base)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(opts(drift=False)) as s:
        yield s


def ids(data: dict[str, Any]) -> list[str]:
    return [e["ExperimentId"] for e in data["Experiments"]]


# ---------------------------------------------------------------------- the API


async def test_response_shape(sim: Simulator, session: aiohttp.ClientSession) -> None:
    reply = await signed_get(session, sim.base_url, {"WorkspaceId": "100001"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    data = reply.json()
    assert set(data) == {"RequestId", "TotalCount", "Experiments"}
    assert UUID_UPPER.match(data["RequestId"])
    assert reply.headers["x-acs-request-id"] == data["RequestId"]
    assert data["TotalCount"] == 200
    assert len(data["Experiments"]) == 10
    assert ids(data) == [e["ExperimentId"] for e in sim.world.list({"WorkspaceId": "100001"})[1]]


async def test_awkward_values_survive_the_wire(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    sim.world.mutate(
        create={
            "WorkspaceId": "100002",
            "ExperimentId": "odd1name",
            "Name": "exp a*b~c ü+1 50%",
            "Tags": [{"Key": "team", "Value": "ml ops"}],
            "GmtCreateTime": "2025-05-30T10:00:00Z",
        }
    )
    query = {
        "WorkspaceId": "100002",
        "Name": "A*B~C Ü+1 50%",
        "Tag": json.dumps([{"Key": "team", "Value": "ml ops"}], separators=(",", ":")),
        "MinCreateTime": "2025-05-30 10:00:00",
        "MaxCreateTime": "2025-05-30",
        "IncludeConfigData": "True",
    }
    data = await list_ok(session, sim.base_url, {**query, "MaxCreateTime": "2025-05-31"})
    assert ids(data) == ["odd1name"]
    assert data["Experiments"][0] == sim.world.get("odd1name")
    data = await list_ok(session, sim.base_url, query)  # MaxCreateTime is inclusive at 00:00
    assert data["TotalCount"] == 0


@pytest.mark.parametrize(
    "sort_by", ["GmtCreateTime", "GmtModifiedTime", "Name", "create_time", "update_time",
                "workspace_id", "status", "accessibility"]
)  # fmt: skip
@pytest.mark.parametrize("order", ["ASC", "DESC"])
async def test_sort_orders_over_http(
    sim: Simulator, session: aiohttp.ClientSession, sort_by: str, order: str
) -> None:
    query = {"SortBy": sort_by, "Order": order, "PageSize": "1000"}
    data = await list_ok(session, sim.base_url, query)
    assert ids(data) == [e["ExperimentId"] for e in sim.world.list(query)[1]]
    assert data["TotalCount"] == len(sim.world) == len(data["Experiments"])


async def test_filters_over_http(sim: Simulator, session: aiohttp.ClientSession) -> None:
    truth = sim.world.truth()
    creator = truth[3]["Creator"]
    cases: list[tuple[dict[str, str], Callable[[dict[str, Any]], bool]]] = [
        ({"Status": "FINISHED"}, lambda e: e["Status"] == "FINISHED"),
        ({"Accessibility": "PUBLIC"}, lambda e: e["Accessibility"] == "PUBLIC"),
        ({"Creator": creator}, lambda e: e["Creator"] == creator),
        ({"Name": "Bert"}, lambda e: "bert" in e["Name"].lower()),
        (
            {"Tag": '[{"Key":"env","Value":"prod"}]'},
            lambda e: {"Key": "env", "Value": "prod"} in e["Tags"],
        ),
    ]
    for query, pred in cases:
        data = await list_ok(session, sim.base_url, {**query, "PageSize": "1000"})
        assert sorted(ids(data)) == sorted(e["ExperimentId"] for e in truth if pred(e)), query


async def test_paging_is_stable_and_complete(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    seen: list[str] = []
    page = 1
    while True:
        data = await list_ok(
            session,
            sim.base_url,
            {"SortBy": "GmtCreateTime", "Order": "ASC", "PageSize": "37", "PageNumber": str(page)},
        )
        assert data["TotalCount"] == 600
        if not data["Experiments"]:
            break
        seen.extend(ids(data))
        page += 1
    assert seen == [e["ExperimentId"] for e in sim.world.truth()]


async def test_invalid_input(sim: Simulator, session: aiohttp.ClientSession) -> None:
    for query in (
        {"PageNumber": "0"},
        {"PageSize": "x"},
        {"Tag": "[{"},
        {"Order": "sideways"},
        # JSON that decodes to text no UTF-8 can carry, and JSON too deep to decode
        {"Tag": '[{"Key":"\\ud800"}]'},
        {"Tag": "[" * 2500},
    ):
        reply = await signed_get(session, sim.base_url, query)
        assert reply.status == 400, (reply.status, reply.text[:200])
        body = reply.json()
        assert set(body) == ERROR_KEYS
        assert body["Code"] == "INVALID_INPUT_PARAMS"
        assert body["Message"]


# ---------------------------------------------------------------------- the gateway


async def test_error_body_shape_and_no_authorization(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    reply = await send(session, sim.base_url, {}, "WorkspaceId=100001")
    assert reply.status == 400
    body = reply.json()
    assert set(body) == ERROR_KEYS
    assert body["Code"] == "IncompleteSignature"
    assert UUID_UPPER.match(body["RequestId"])
    assert body["Recommend"].startswith("https://")
    reply = await send(session, sim.base_url, {"Authorization": "Bearer abc"}, "")
    assert (reply.status, reply.code) == (400, "IncompleteSignature")


@pytest.mark.parametrize(
    "dropped",
    [
        "host", "x-acs-date", "x-acs-signature-nonce",
        # every x-acs-* header sent: a security token left unsigned was taken
        "x-acs-security-token", "x-acs-action", "x-acs-content-sha256",
    ],
)  # fmt: skip
async def test_signed_headers_must_cover_the_essentials(
    sim: Simulator, session: aiohttp.ClientSession, dropped: str
) -> None:
    host = yarl.URL(sim.base_url).raw_authority
    headers = {
        "host": host,
        "x-acs-action": "ListHpoExperiments",
        "x-acs-version": "2022-08-28",
        "x-acs-date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": uuid.uuid4().hex,
        "x-acs-content-sha256": signing.EMPTY_SHA256,
        "x-acs-security-token": "token-of-someone-else",
    }
    to_sign = {k: v for k, v in headers.items() if k != dropped}
    signed = signing.sign(
        method="GET",
        path=API_PATH,
        query={},
        headers=to_sign,
        access_key_id=DEFAULT_ACCESS_KEY_ID,
        access_key_secret=DEFAULT_ACCESS_KEY_SECRET,
    )
    reply = await send(
        session, sim.base_url, {**headers, "Authorization": signed.authorization}, ""
    )
    assert (reply.status, reply.code) == (400, "IncompleteSignature")
    assert dropped in reply.json()["Message"]


async def test_unknown_access_key(sim: Simulator, session: aiohttp.ClientSession) -> None:
    reply = await signed_get(session, sim.base_url, {}, access_key_id="LTAI-nobody")
    assert (reply.status, reply.code) == (404, "InvalidAccessKeyId.NotFound")


async def test_wrong_secret(sim: Simulator, session: aiohttp.ClientSession) -> None:
    reply = await signed_get(session, sim.base_url, {"PageSize": "5"}, access_key_secret="nope")
    assert (reply.status, reply.code) == (400, "SignatureDoesNotMatch")
    message = reply.json()["Message"]
    assert message.startswith("Specified signature is not matched with our calculation.")
    assert "server string to sign is:ACS3-HMAC-SHA256\n" in message
    assert sim.stats.signature_failures == 1


async def test_query_on_the_wire_must_be_the_signed_one(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    host = yarl.URL(sim.base_url).raw_authority
    headers = signed_headers(host, {"PageSize": "5"})
    reply = await send(session, sim.base_url, headers, "PageSize=6")
    assert reply.code == "SignatureDoesNotMatch"
    # the same values, encoded differently, are the same request
    query = {"Name": "a b:c*"}
    headers = signed_headers(host, query)
    reply = await send(session, sim.base_url, headers, "Name=a%20b:c*")
    assert reply.status == 200, reply.text


async def test_plus_in_the_query_means_space_like_the_sdks_send_it(
    session: aiohttp.ClientSession,
) -> None:
    query = {"Name": "bert lr", "MinCreateTime": "2025-01-01 00:00:00"}
    wire = "MinCreateTime=2025-01-01+00%3A00%3A00&Name=bert+lr"  # urlencode(), as the SDK
    for plus_as_space, expected in ((True, 200), (False, 400)):
        async with Simulator(opts(query_plus_as_space=plus_as_space)) as sim:
            headers = signed_headers(yarl.URL(sim.base_url).raw_authority, query)
            reply = await send(session, sim.base_url, headers, wire)
            assert reply.status == expected, reply.text
    async with Simulator(opts()) as sim:
        # a literal plus must then be sent as %2B, as canonical_query does
        sim.world.mutate(create={"ExperimentId": "plus1abc", "Name": "c++ tune"})
        data = await list_ok(session, sim.base_url, {"Name": "c++"})
        assert ids(data) == ["plus1abc"]


async def test_date_skew(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with Simulator(opts(), wall_clock=clock) as sim:
        now = datetime.fromtimestamp(int(clock.now), UTC)
        for skew, expected in ((-14, 200), (14, 200), (-16, 400), (16, 400)):
            reply = await signed_get(session, sim.base_url, {}, date=now + timedelta(minutes=skew))
            assert reply.status == expected, (skew, reply.text)
            if expected == 400:
                assert reply.code == "InvalidTimeStamp.Expired"
        reply = await send(
            session,
            sim.base_url,
            {
                **signed_headers(yarl.URL(sim.base_url).raw_authority, {}),
                "x-acs-date": "yesterday",
            },
            "",
        )
        assert reply.code == "InvalidTimeStamp.Format"


async def test_date_is_checked_against_the_wall_clock_not_the_sim_clock(
    session: aiohttp.ClientSession,
) -> None:
    # the sim world starts in 2025; the gateway lives in the present
    async with Simulator(opts()) as sim:
        assert (await signed_get(session, sim.base_url, {})).status == 200
        reply = await signed_get(session, sim.base_url, {}, date=START)
        assert reply.code == "InvalidTimeStamp.Expired"


async def test_nonce_reuse(sim: Simulator, session: aiohttp.ClientSession) -> None:
    nonce = uuid.uuid4().hex
    assert (await signed_get(session, sim.base_url, {}, nonce=nonce)).status == 200
    reply = await signed_get(session, sim.base_url, {}, nonce=nonce)
    assert (reply.status, reply.code) == (400, "SignatureNonceUsed")
    assert (await signed_get(session, sim.base_url, {})).status == 200


async def test_nonces_are_forgotten_after_15_minutes(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with Simulator(opts(), wall_clock=clock) as sim:
        nonce = uuid.uuid4().hex
        date = datetime.fromtimestamp(clock.now, UTC)
        assert (await signed_get(session, sim.base_url, {}, nonce=nonce, date=date)).status == 200
        clock.now += 16 * 60
        date = datetime.fromtimestamp(clock.now, UTC)
        reply = await signed_get(session, sim.base_url, {}, nonce=nonce, date=date)
        assert reply.status == 200
        assert sim.nonces_remembered == 1


async def test_content_hash_must_match_the_body(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    reply = await signed_get(session, sim.base_url, {}, content_sha256="0" * 64)
    assert (reply.status, reply.code) == (400, "SignatureDoesNotMatch")
    assert "x-acs-content-sha256" in reply.json()["Message"]
    body = b'{"x": 1}'
    reply = await signed_get(
        session, sim.base_url, {}, body=body, content_sha256=signing.EMPTY_SHA256
    )
    assert reply.code == "SignatureDoesNotMatch"
    reply = await signed_get(session, sim.base_url, {}, body=body)
    assert reply.status == 200, reply.text
    assert hashlib.sha256(body).hexdigest() != signing.EMPTY_SHA256


async def test_sts_token(session: aiohttp.ClientSession) -> None:
    creds = {"STS.good": "s1", "STS.old": "s2", DEFAULT_ACCESS_KEY_ID: DEFAULT_ACCESS_KEY_SECRET}
    sts = {
        "STS.good": "token-1",
        "STS.old": StsToken("token-2", expires_at=datetime.now(UTC) - timedelta(minutes=1)),
    }
    async with Simulator(opts(credentials=creds, sts_tokens=sts)) as sim:
        ok = await signed_get(
            session,
            sim.base_url,
            {},
            access_key_id="STS.good",
            access_key_secret="s1",
            security_token="token-1",
        )
        assert ok.status == 200
        for token in (None, "token-X"):
            reply = await signed_get(
                session,
                sim.base_url,
                {},
                access_key_id="STS.good",
                access_key_secret="s1",
                security_token=token,
            )
            assert (reply.status, reply.code) == (400, "InvalidSecurityToken.MismatchWithAccessKey")
        reply = await signed_get(
            session,
            sim.base_url,
            {},
            access_key_id="STS.old",
            access_key_secret="s2",
            security_token="token-2",
        )
        assert (reply.status, reply.code) == (403, "InvalidSecurityToken.Expired")
        reply = await signed_get(session, sim.base_url, {}, security_token="stray")
        assert reply.code == "InvalidSecurityToken.MismatchWithAccessKey"


async def test_action_version_and_path(sim: Simulator, session: aiohttp.ClientSession) -> None:
    reply = await signed_get(session, sim.base_url, {}, action="ListHpoTrials")
    assert (reply.status, reply.code) == (404, "InvalidAction.NotFound")
    reply = await signed_get(session, sim.base_url, {}, version="2021-01-01")
    assert (reply.status, reply.code) == (400, "InvalidVersion")
    host = yarl.URL(sim.base_url).raw_authority
    reply = await send(
        session, sim.base_url, signed_headers(host, {}, path="/api/x"), "", path="/api/x"
    )
    assert (reply.status, reply.code) == (404, "InvalidAction.NotFound")


# ---------------------------------------------------------------------- throttling


async def test_throttling(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()  # frozen: the bucket refills only when we move the clock
    async with Simulator(opts(max_qps=5), wall_clock=clock) as sim:
        date = datetime.fromtimestamp(clock.now, UTC)
        replies = [await signed_get(session, sim.base_url, {}, date=date) for _ in range(65)]
        assert [r.status for r in replies[:5]] == [200] * 5  # burst: one second's worth
        throttled = replies[5:]
        statuses = {r.status for r in throttled}
        assert statuses <= {400, 429, 503} and 400 in statuses
        assert sum(r.status == 400 for r in throttled) > len(throttled) / 2
        for r in throttled:
            body = r.json()
            assert set(body) == ERROR_KEYS
            expected_code = {400: "Throttling.User", 429: "Throttling", 503: "Throttling.Api"}
            assert body["Code"] == expected_code[r.status]
        if_code = [r for r in throttled if r.code == "Throttling.User"]
        assert if_code[0].json()["Message"] == "Request was denied due to user flow control."
        waits = [
            int(r.headers["x-acs-retry-after"])
            for r in throttled
            if "x-acs-retry-after" in r.headers
        ]
        assert waits and len(waits) < len(throttled)  # usually, not always
        assert all(w == 200 for w in waits)  # ms until a token: 1 / 5 qps
        assert sim.stats.throttled == 60
        clock.now += 0.2
        assert (await signed_get(session, sim.base_url, {}, date=date)).status == 200
        # 0 means unlimited
        sim.configure(max_qps=0)
        assert all(
            [
                (await signed_get(session, sim.base_url, {}, date=date)).status == 200
                for _ in range(20)
            ]
        )


async def test_throttling_is_per_access_key(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    creds = {"a": "sa", "b": "sb"}
    async with Simulator(opts(max_qps=1, credentials=creds), wall_clock=clock) as sim:
        date = datetime.fromtimestamp(clock.now, UTC)
        a = {"access_key_id": "a", "access_key_secret": "sa", "date": date}
        b = {"access_key_id": "b", "access_key_secret": "sb", "date": date}
        assert (await signed_get(session, sim.base_url, {}, **a)).status == 200
        assert (await signed_get(session, sim.base_url, {}, **a)).code is not None
        assert (await signed_get(session, sim.base_url, {}, **b)).status == 200


# ---------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("internal_error", 500, "InternalError"), ("service_unavailable", 503, "ServiceUnavailable")],
)
async def test_error_faults(
    session: aiohttp.ClientSession, kind: str, status: int, code: str
) -> None:
    async with Simulator(opts(fault_rate=1.0, fault_kinds=(kind,))) as sim:
        for _ in range(3):
            reply = await signed_get(session, sim.base_url, {})
            assert (reply.status, reply.code) == (status, code)
            assert set(reply.json()) == ERROR_KEYS
        assert sim.stats.faults[kind] == 3


async def test_truncated_body(session: aiohttp.ClientSession) -> None:
    async with Simulator(opts(fault_rate=1.0, fault_kinds=("truncated",))) as sim:
        reply = await signed_get(session, sim.base_url, {"PageSize": "20"})
        assert reply.status == 200
        with pytest.raises(ValueError):
            json.loads(reply.text)
        assert reply.text.startswith('{"RequestId"')
        assert sim.stats.faults["truncated"] == 1


async def test_connection_reset(session: aiohttp.ClientSession) -> None:
    async with Simulator(opts(fault_rate=1.0, fault_kinds=("reset",))) as sim:
        url = yarl.URL(sim.base_url)
        headers = signed_headers(url.raw_authority, {})
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {API_PATH} HTTP/1.1\r\n{head}\r\n".encode())
        await writer.drain()
        try:
            received = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            received = b""
        writer.close()
        assert received == b""  # dropped without a single byte of response
        assert sim.stats.faults["reset"] == 1
        # aiohttp quietly re-sends an idempotent GET once on a dropped connection: with the
        # same nonce, so the retry is refused
        try:
            reply = await signed_get(session, sim.base_url, {})
        except aiohttp.ClientError:
            pass
        else:
            assert reply.code == "SignatureNonceUsed"
        sim.configure(fault_rate=0.0)
        assert (await signed_get(session, sim.base_url, {})).status == 200


async def test_fault_rate_is_a_rate(session: aiohttp.ClientSession) -> None:
    kinds = ("internal_error", "service_unavailable", "truncated")
    async with Simulator(opts(fault_rate=0.3, fault_kinds=kinds)) as sim:
        for _ in range(100):
            await signed_get(session, sim.base_url, {})
        assert 15 <= sum(sim.stats.faults.values()) <= 45


# ---------------------------------------------------------------------- drift, zone, latency


async def test_drift_changes_types_not_values(session: aiohttp.ClientSession) -> None:
    async with Simulator(opts()) as sim:
        seen: dict[str, set[type]] = {"Creator": set(), "JobType": set(), "counts": set()}
        formats = set()
        for page in (1, 2, 3):
            query = {"PageSize": "100", "PageNumber": str(page), "IncludeConfigData": "True"}
            data = await list_ok(session, sim.base_url, query)
            for raw in data["Experiments"]:
                seen["Creator"].add(type(raw["Creator"]))
                seen["JobType"].add(type(raw["JobType"]))
                seen["counts"].update(type(v) for v in raw["TrialStatus"].values())
                formats.add("T" in raw["GmtCreateTime"])
                canon = sim.world.get(raw["ExperimentId"])
                assert canon is not None
                assert normalise(raw) == normalise(canon)
        assert seen == {"Creator": {int, str}, "JobType": {int, str}, "counts": {int, str}}
        assert formats == {True, False}
        # truth never drifts
        assert all(isinstance(e["Creator"], str) for e in sim.world.truth())


async def test_no_drift_is_canonical(sim: Simulator, session: aiohttp.ClientSession) -> None:
    data = await list_ok(session, sim.base_url, {"PageSize": "100", "IncludeConfigData": "true"})
    assert data["Experiments"] == [sim.world.get(i) for i in ids(data)]


async def test_time_zone_of_naive_times(session: aiohttp.ClientSession) -> None:
    async with Simulator(opts(time_zone="Asia/Shanghai")) as sim:
        data = await list_ok(session, sim.base_url, {"PageSize": "200"})
        naive = [e for e in data["Experiments"] if "T" not in e["GmtCreateTime"]]
        assert naive
        shanghai = timezone(timedelta(hours=8))
        for raw in naive:
            canon = sim.world.get(raw["ExperimentId"])
            assert canon is not None
            exp = normalise(raw, naive_tz=shanghai)
            assert exp is not None and exp.gmt_create_time == canon["GmtCreateTime"]
        pivot = sim.world.truth()[100]
        local = (
            datetime.strptime(pivot["GmtCreateTime"], "%Y-%m-%dT%H:%M:%SZ") + timedelta(hours=8)
        ).strftime("%Y-%m-%d %H:%M:%S")
        data = await list_ok(
            session, sim.base_url, {"MinCreateTime": local, "MaxCreateTime": local}
        )
        assert pivot["ExperimentId"] in ids(data)


async def test_latency(session: aiohttp.ClientSession) -> None:
    async with Simulator(opts(latency_ms=150)) as sim:
        t0 = time.perf_counter()
        await list_ok(session, sim.base_url, {})
        assert time.perf_counter() - t0 >= 0.15
        sim.configure(latency_ms=0)
        t0 = time.perf_counter()
        await list_ok(session, sim.base_url, {})
        assert time.perf_counter() - t0 < 0.15


# ---------------------------------------------------------------------- clock and control API


async def test_speed_advances_the_world_in_the_background() -> None:
    async with Simulator(opts(speed=600)) as sim:
        await asyncio.sleep(0.5)
        moved = (sim.world.now - START).total_seconds()
        assert 120 <= moved <= 600
        sim.configure(speed=0)
        frozen = sim.world.now
        await asyncio.sleep(0.3)
        assert sim.world.now == frozen


async def test_control_api(sim: Simulator, session: aiohttp.ClientSession) -> None:
    base = sim.base_url
    async with session.post(f"{base}/_sim/advance", json={"seconds": 3600}) as resp:
        assert resp.status == 200
        adv = await resp.json()
    assert adv["now"] == "2025-06-01T09:00:00Z"
    assert adv["count"] == len(adv["events"]) > 0
    assert {"at", "kind", "experiment_id", "workspace_id", "old_status", "new_status"} <= set(
        adv["events"][0]
    )
    async with session.get(f"{base}/_sim/truth", params={"workspace": "100002"}) as resp:
        truth = await resp.json()
    assert truth["now"] == adv["now"]
    assert truth["experiments"] == sim.world.truth("100002")
    assert truth["deleted"] == sim.world.deleted_ids("100002")
    victim = truth["experiments"][0]["ExperimentId"]
    async with session.post(
        f"{base}/_sim/mutate", json={"experiment_id": victim, "status": "SYS_CANCELED"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["events"][0]["new_status"] == "SYS_CANCELED"
    async with session.post(
        f"{base}/_sim/mutate", json={"experiment_id": victim, "delete": True}
    ) as resp:
        assert resp.status == 200
    async with session.get(f"{base}/_sim/truth") as resp:
        assert victim in (await resp.json())["deleted"]
    async with session.post(
        f"{base}/_sim/mutate", json={"create": {"WorkspaceId": "100003", "Name": "hello"}}
    ) as resp:
        made = (await resp.json())["events"][0]
    assert made["kind"] == "created" and made["new_status"] == "CREATED"
    async with session.post(
        f"{base}/_sim/mutate", json={"experiment_id": "nope", "delete": True}
    ) as resp:
        assert resp.status == 404
    async with session.post(f"{base}/_sim/mutate", json={"colour": "red"}) as resp:
        assert resp.status == 400
    # valid JSON, but no answer could carry the name: refused, not served as a 500 later
    lone = b'{"create": {"WorkspaceId": "100003", "Name": "bad\\ud800name"}}'
    async with session.post(
        f"{base}/_sim/mutate", data=lone, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400 and "surrogate" in (await resp.json())["error"]
    async with session.get(f"{base}/_sim/truth", params={"workspace": "100003"}) as resp:
        assert resp.status == 200
    async with session.post(
        f"{base}/_sim/config",
        json={"fault_rate": 0.5, "max_qps": 7, "latency_ms": 1, "drift": True,
              "bump_modified": False, "speed": 0},
    ) as resp:  # fmt: skip
        cfg = await resp.json()
    assert cfg["fault_rate"] == 0.5 and cfg["max_qps"] == 7 and cfg["drift"] is True
    assert sim.world.bump_modified is False
    async with session.post(f"{base}/_sim/config", json={"fault_rate": 2}) as resp:
        assert resp.status == 400
    async with session.post(f"{base}/_sim/config", json={"warp": 9}) as resp:
        assert resp.status == 400
    async with session.post(f"{base}/_sim/advance", json={"seconds": -1}) as resp:
        assert resp.status == 400


async def test_control_api_answers_loopback_only() -> None:
    from unittest import mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    sim = Simulator(opts(experiments=10))
    for peer, allowed in (
        (("127.0.0.1", 5), True),
        (("::1", 5, 0, 0), True),
        (("10.1.2.3", 5), False),
    ):
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None, p=peer: (
            p if name == "peername" else default
        )
        request = make_mocked_request("GET", "/_sim/stats", transport=transport)
        if allowed:
            assert (await sim._ctl_stats(request)).status == 200
        else:
            with pytest.raises(web.HTTPForbidden):
                await sim._ctl_stats(request)


async def test_stats(sim: Simulator, session: aiohttp.ClientSession) -> None:
    await list_ok(session, sim.base_url, {})
    await signed_get(session, sim.base_url, {}, access_key_secret="bad")
    await signed_get(session, sim.base_url, {"PageNumber": "0"})
    async with session.get(f"{sim.base_url}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 3
    assert stats["by_status"] == {"200": 1, "400": 2}
    assert stats["by_code"] == {"SignatureDoesNotMatch": 1, "INVALID_INPUT_PARAMS": 1}
    assert stats["signature_failures"] == 1
    assert stats["throttled"] == 0 and stats["faults_total"] == 0
    assert stats["requests_per_s"] > 0
    async with session.post(f"{sim.base_url}/_sim/stats/reset") as resp:
        assert (await resp.json())["requests"] == 0
    assert sim.stats.requests == 0


async def test_serve_forever_and_cli_helpers(session: aiohttp.ClientSession) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        ["--experiments", "50", "--workspaces", "2", "--seed", "4", "--speed", "0",
         "--no-drift", "--no-modified-bump", "--max-qps", "0", "--latency-ms", "0",
         "--fault-rate", "0", "--access-key-id", "ak", "--access-key-secret", "sk"]
    )  # fmt: skip
    options = options_from_args(ns)
    assert options.port == 0 and options.max_qps is None
    assert options.drift is False and options.bump_modified is False
    assert dict(options.credentials) == {"ak": "sk"}
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_forever(options, on_ready=ready.set_result))
    try:
        base = await asyncio.wait_for(ready, 10)
        data = await list_ok(
            session, base, {"PageSize": "100"}, access_key_id="ak", access_key_secret="sk"
        )
        assert data["TotalCount"] == 50
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_options_are_validated() -> None:
    for bad in (
        {"fault_rate": 1.5},
        {"fault_kinds": ("meteor",)},
        {"max_qps": -1},
        {"time_zone": "Mars/Olympus"},
        {"workspaces": 0},
    ):
        with pytest.raises(ValueError):
            SimOptions(**bad)


# ---------------------------------------------------------------------- the official SDK


def sdk_client(port: int, secret: str = DEFAULT_ACCESS_KEY_SECRET, **kw: Any) -> Any:
    from alibabacloud_paiautoml20220828.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    return Client(
        open_api_models.Config(
            access_key_id=kw.pop("access_key_id", DEFAULT_ACCESS_KEY_ID),
            access_key_secret=secret,
            endpoint=f"127.0.0.1:{port}",
            protocol="http",
            **kw,
        )
    )


def sdk_request(**kw: Any) -> Any:
    from alibabacloud_paiautoml20220828.models import ListHpoExperimentsRequest

    return ListHpoExperimentsRequest(**kw)


async def test_sdk_pages_through_everything_and_matches_truth() -> None:
    async with Simulator(opts(experiments=2000, seed=21)) as sim:
        client = sdk_client(sim.port)
        for ws in sim.world.workspace_ids:
            truth = {e["ExperimentId"]: e for e in sim.world.truth(ws)}
            got: dict[str, Any] = {}
            page = 1
            while True:
                resp = await asyncio.to_thread(
                    client.list_hpo_experiments,
                    sdk_request(
                        workspace_id=ws,
                        page_number=page,
                        page_size=100,
                        sort_by="GmtCreateTime",
                        order="ASC",
                        include_config_data="True",
                    ),
                )
                assert resp.status_code == 200
                assert resp.body.total_count == len(truth)
                if not resp.body.experiments:
                    break
                for item in resp.body.experiments:
                    assert item.experiment_id not in got
                    got[item.experiment_id] = item.to_map()
                page += 1
            assert got.keys() == truth.keys()
            for exp_id, raw in got.items():
                mine, theirs = normalise(raw), normalise(truth[exp_id])
                assert mine is not None and theirs is not None
                # the SDK's model has no Tags field: compare everything else
                assert mine.experiment_id == theirs.experiment_id
                for name in (
                    "name", "status", "creator", "workspace_id", "accessibility", "description",
                    "job_type", "trial_count", "trial_status", "search_space", "config_ini",
                    "config_yml", "gmt_create_time", "gmt_modified_time", "deleted",
                ):  # fmt: skip
                    assert getattr(mine, name) == getattr(theirs, name), (exp_id, name)


async def test_sdk_async_with_awkward_values_and_other_sort_vocabulary() -> None:
    async with Simulator(opts(seed=5)) as sim:
        sim.world.mutate(
            create={
                "WorkspaceId": "100001",
                "ExperimentId": "sdkOdd01",
                "Name": "exp a*b~c ü 50%",
                "GmtCreateTime": "2025-05-31T12:00:00Z",
            }
        )
        client = sdk_client(sim.port)
        resp = await client.list_hpo_experiments_async(
            sdk_request(
                workspace_id="100001",
                name="A*B~C Ü 50",
                min_create_time="2025-05-31 12:00:00",
                max_create_time="2025-05-31 12:00:00",
                sort_by="create_time",
                order="DESC",
            )
        )
        assert [e.experiment_id for e in resp.body.experiments] == ["sdkOdd01"]
        resp = await asyncio.to_thread(
            client.list_hpo_experiments,
            sdk_request(workspace_id="100002", page_size=50, sort_by="update_time", order="DESC"),
        )
        expected = sim.world.list(
            {"WorkspaceId": "100002", "PageSize": "50", "SortBy": "update_time", "Order": "DESC"}
        )[1]
        assert [e.experiment_id for e in resp.body.experiments] == [
            e["ExperimentId"] for e in expected
        ]


async def test_sdk_rejections_carry_the_code() -> None:
    from alibabacloud_tea_openapi.exceptions import ClientException

    async with Simulator(opts(sts_tokens={}, credentials={"STS.k": "s", "plain": "p"})) as sim:
        bad = sdk_client(sim.port, secret="wrong", access_key_id="plain")
        with pytest.raises(ClientException) as info:
            await asyncio.to_thread(bad.list_hpo_experiments, sdk_request(page_size=5))
        assert info.value.code == "SignatureDoesNotMatch"
        assert info.value.status_code == 400
        unknown = sdk_client(sim.port, access_key_id="nobody")
        with pytest.raises(ClientException) as info:
            await asyncio.to_thread(unknown.list_hpo_experiments, sdk_request(page_size=5))
        assert info.value.code == "InvalidAccessKeyId.NotFound"


async def test_sdk_with_sts_token_and_throttling() -> None:
    from alibabacloud_tea_openapi.exceptions import AlibabaCloudException

    creds = {"STS.k": "s"}
    async with Simulator(opts(credentials=creds, sts_tokens={"STS.k": "tok"}, max_qps=1)) as sim:
        client = sdk_client(sim.port, secret="s", access_key_id="STS.k", security_token="tok")
        resp = await asyncio.to_thread(client.list_hpo_experiments, sdk_request(page_size=5))
        assert resp.status_code == 200
        codes = set()
        for _ in range(6):
            try:
                await asyncio.to_thread(client.list_hpo_experiments, sdk_request(page_size=5))
            except AlibabaCloudException as exc:
                codes.add(exc.code)
        assert codes and codes <= {"Throttling.User", "Throttling", "Throttling.Api"}
