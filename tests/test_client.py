"""The ListHpoExperiments client against real servers on loopback: a tiny capture server
(raw request target and headers, scripted answers) for wire-level checks, and the simulator
for the gateway's own checks, throttling, faults and the issue's acceptance listings."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import gzip
import itertools
import json
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from hook_server import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from structlog.testing import capture_logs

from hpo_sync import signing
from hpo_sync.client import Listing, ListQuery, Page, Tally, UpstreamClient
from hpo_sync.config import UpstreamConfig
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.errors import FatalUpstreamError, HpoSyncError, RetriesExhaustedError
from hpo_sync.normalise import Experiment, normalise, parse_time
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import API_PATH, SimOptions, Simulator

SIGNED_ALWAYS = {
    "host",
    "x-acs-action",
    "x-acs-version",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-content-sha256",
}
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# ---------------------------------------------------------------------- capture server

Action = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as it arrived: the raw request target and the headers."""

    raw_path: str
    headers: CIMultiDictProxy[str]
    at: float  # time.monotonic() on arrival

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def raw_query(self) -> str:
        return self.raw_path.partition("?")[2]

    @property
    def nonce(self) -> str:
        return self.headers["x-acs-signature-nonce"]


def api_error(
    status: int, code: str, *, headers: Mapping[str, str] | None = None, request_id: str = ""
) -> Action:
    async def act(request: web.Request) -> web.StreamResponse:
        body = {
            "RequestId": request_id or f"REQ-{code}",
            "Code": code,
            "Message": f"{code} (from the capture server)",
            "HostId": request.host,
        }
        return web.json_response(body, status=status, headers=dict(headers or {}))

    return act


def raw_reply(status: int, body: bytes, content_type: str = "application/json") -> Action:
    async def act(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)

    return act


async def reset(request: web.Request) -> web.StreamResponse:
    """Drop the connection without an answer."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response(status=500)  # never reaches the client


def sleep_then(seconds: float, then: Action) -> Action:
    async def act(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request)

    return act


@dataclass
class Capture:
    """Records every request; answers from ``script`` first, then from a small listing of
    ``experiments`` (``fail_pages`` always answer 500). Like the gateway, a nonce it has seen
    before is answered ``SignatureNonceUsed`` (unless ``check_nonces`` is off)."""

    base_url: str = ""
    seen: list[Seen] = field(default_factory=list)
    script: deque[Action] = field(default_factory=deque)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    fail_pages: set[int] = field(default_factory=set)
    fatal_pages: set[int] = field(default_factory=set)
    max_page_size: int = 1000
    check_nonces: bool = True
    # "count": the real one; "page": the page's own size; "absent": no key; else this value
    total_count: Any = "count"
    ignore_page_number: bool = False
    repeat_last_page: bool = False  # a page number past the end gets the last page again
    first_page_past_end: bool = False  # a page number past the end gets page 1 again
    refuse_past_end: bool = False  # a page number past the end is INVALID_INPUT_PARAMS
    _nonces: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.raw_path, request.headers, time.monotonic()))
        nonce = request.headers.get("x-acs-signature-nonce", "")
        if self.check_nonces and nonce in self._nonces:
            return await api_error(400, "SignatureNonceUsed")(request)
        self._nonces.add(nonce)
        if self.script:
            return await self.script.popleft()(request)
        return await self.listing(request)

    async def listing(self, request: web.Request) -> web.StreamResponse:
        number = int(request.query.get("PageNumber", "1"))
        size = min(self.max_page_size, int(request.query.get("PageSize", "100")))
        if number in self.fail_pages:
            return await api_error(500, "InternalError")(request)
        if number in self.fatal_pages:
            return await api_error(403, "Forbidden.RAM")(request)
        if self.ignore_page_number:
            number = 1
        if self.refuse_past_end and number > max(1, math.ceil(len(self.experiments) / size)):
            return await api_error(400, "INVALID_INPUT_PARAMS")(request)
        if self.repeat_last_page and self.experiments:
            number = min(number, math.ceil(len(self.experiments) / size))
        if self.first_page_past_end and number > math.ceil(len(self.experiments) / size):
            number = 1
        page = self.experiments[(number - 1) * size : number * size]
        body: dict[str, Any] = {"RequestId": f"OK-{len(self.seen)}"}
        if self.total_count == "count":
            body["TotalCount"] = len(self.experiments)
        elif self.total_count == "page":  # a server that counts the page, not the listing
            body["TotalCount"] = len(page)
        elif self.total_count != "absent":
            body["TotalCount"] = self.total_count
        return web.json_response({**body, "Experiments": page})


@pytest.fixture
async def capture() -> AsyncIterator[Capture]:
    cap = Capture(experiments=[{"ExperimentId": f"e{i:03d}", "Name": f"x{i}"} for i in range(3)])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", cap.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    cap.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield cap
    await runner.cleanup()


def creds(
    access_key_id: str = DEFAULT_ACCESS_KEY_ID,
    secret: str = DEFAULT_ACCESS_KEY_SECRET,
    token: str | None = None,
) -> StaticCredentials:
    return StaticCredentials(CloudCredentials(access_key_id, secret, token))


def make_client(
    endpoint: str,
    credentials: StaticCredentials | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
    **config: Any,
) -> UpstreamClient:
    settings_: dict[str, Any] = {"max_qps": 1000.0, "max_concurrency": 4, "timeout_s": 5.0}
    settings_.update(config)
    kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return UpstreamClient(
        UpstreamConfig(endpoint=endpoint, **settings_), credentials or creds(), **kw
    )


def parse_wire_query(raw_query: str) -> dict[str, str]:
    """Decode a raw query the strict RFC 3986 way ('+' stays '+')."""
    out: dict[str, str] = {}
    for part in raw_query.split("&"):
        if part:
            name, _, value = part.partition("=")
            out[unquote(name)] = unquote(value)
    return out


def check_signed(seen: Seen, secret: str = DEFAULT_ACCESS_KEY_SECRET) -> dict[str, str]:
    """The raw query is the canonical query, and the signature verifies over the raw bytes
    and the headers that arrived. Returns the decoded parameters."""
    params = parse_wire_query(seen.raw_query)
    assert seen.raw_query == signing.canonical_query(params)
    auth = signing.parse_authorization(seen.headers["Authorization"])
    assert auth is not None
    assert set(auth.signed_headers) >= SIGNED_ALWAYS
    assert signing.verify(
        method="GET",
        path=seen.path,
        query=params,
        headers=dict(seen.headers),
        signed_header_names=auth.signed_headers,
        access_key_secret=secret,
        claimed_signature=auth.signature,
        body_sha256=signing.EMPTY_SHA256,
    )
    return params


def ok_listing(total: int = 1) -> Action:
    body = {"RequestId": "OK", "TotalCount": total, "Experiments": [{"ExperimentId": "e1"}]}
    return raw_reply(200, json.dumps(body).encode())


# ---------------------------------------------------------------------- the wire

AWKWARD = [
    ListQuery(workspace_id="12345", name="exp a*b~c"),
    ListQuery(name="实验 α/β+γ 50% ü", creator="1557702098194904"),
    ListQuery(name="a+b c/d*e~f'g(h)!", tags=(("team", "ml ops"),)),
    ListQuery(tags=(("team", "ml ops"), ("项目", "a+b/c*d~e"))),
    ListQuery(workspace_id="w", name="  leading and trailing  ", status="RUNNING"),
]


@pytest.mark.parametrize("query", AWKWARD, ids=lambda q: repr(q.name or q.tags))
async def test_the_bytes_on_the_wire_are_the_bytes_signed(
    capture: Capture, query: ListQuery
) -> None:
    async with make_client(capture.base_url) as client:
        await client.list_page(query, 1, 50)
    (seen,) = capture.seen
    assert seen.path == API_PATH
    assert seen.headers["Host"] == capture.base_url.removeprefix("http://")
    params = check_signed(seen)
    assert params == {**query.params(), "PageNumber": "1", "PageSize": "50"}


async def test_tag_is_one_compact_json_parameter(capture: Capture) -> None:
    async with make_client(capture.base_url) as client:
        await client.list_page(ListQuery(tags=(("team", "ml ops"),)), 1)
    (seen,) = capture.seen
    params = check_signed(seen)
    assert params["Tag"] == '[{"Key":"team","Value":"ml ops"}]'
    assert "Tag=%5B%7B%22Key%22%3A%22team%22%2C%22Value%22%3A%22ml%20ops%22%7D%5D" in (
        seen.raw_query
    )


text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=text, creator=text, tags=st.lists(st.tuples(text, text), max_size=3))
async def test_any_text_goes_on_the_wire_as_signed(
    capture: Capture, name: str, creator: str, tags: list[tuple[str, str]]
) -> None:
    query = ListQuery(name=name, creator=creator, tags=tuple(tags))
    async with make_client(capture.base_url) as client:
        await client.list_page(query, 2, 7)
    params = check_signed(capture.seen[-1])
    assert params == {**query.params(), "PageNumber": "2", "PageSize": "7"}


async def test_every_parameter_has_its_name_and_format(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # this machine's own zone must play no part
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    query = ListQuery(
        workspace_id="12345",
        name="bert lr",
        creator="1557702098194904",
        status="RUNNING",
        min_create_time=datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC),
        max_create_time=datetime(2024, 6, 30, 16, 0, 0),  # naive: taken as UTC
        accessibility="PRIVATE",
        include_config_data=True,
        sort_by="GmtCreateTime",
        order="ASC",
        tags=(("team", "ml ops"),),
    )
    async with make_client(capture.base_url, create_time_zone="Asia/Shanghai") as client:
        await client.list_page(query, 3, 50)
        await client.list_page(
            ListQuery(
                include_config_data=False,
                min_create_time="2024-12-31",
                max_create_time=datetime(2025, 1, 1, 12, 30, 5, tzinfo=UTC),
            ),
            1,
        )
    first, second = (check_signed(s) for s in capture.seen)
    assert first == {
        "WorkspaceId": "12345",
        "Name": "bert lr",
        "Creator": "1557702098194904",
        "Status": "RUNNING",
        "MinCreateTime": "2024-01-01 08:00:00",  # in the configured zone, UTC+8
        "MaxCreateTime": "2024-07-01 00:00:00",
        "Accessibility": "PRIVATE",
        "IncludeConfigData": "True",
        "SortBy": "GmtCreateTime",
        "Order": "ASC",
        "Tag": '[{"Key":"team","Value":"ml ops"}]',
        "PageNumber": "3",
        "PageSize": "50",
    }
    assert second == {
        "IncludeConfigData": "False",
        "MinCreateTime": "2024-12-31",  # a string is sent as given
        "MaxCreateTime": "2025-01-01 20:30:05",
        "PageNumber": "1",
        "PageSize": "100",  # the configured default
    }
    # a window around Go's zero time keeps four-digit years (strftime's %Y would not)
    early = ListQuery(
        min_create_time=datetime(1, 1, 1, tzinfo=UTC),
        max_create_time=datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
    )
    assert early.params() == {
        "MinCreateTime": "0001-01-01 00:00:00",
        "MaxCreateTime": "0999-12-31 23:59:59",
    }
    monkeypatch.undo()
    time.tzset()
    headers = capture.seen[0].headers
    assert headers["x-acs-action"] == "ListHpoExperiments"
    assert headers["x-acs-version"] == "2022-08-28"
    assert headers["x-acs-content-sha256"] == signing.EMPTY_SHA256
    assert "x-acs-security-token" not in headers


async def test_an_endpoint_path_prefix_is_sent_but_not_signed(capture: Capture) -> None:
    async with make_client(f"{capture.base_url}/proxy/pai/") as client:
        await client.list_page(ListQuery(name="a b"), 1)
    (seen,) = capture.seen
    assert seen.path == f"/proxy/pai{API_PATH}"
    params = parse_wire_query(seen.raw_query)
    auth = signing.parse_authorization(seen.headers["Authorization"])
    assert auth is not None
    assert signing.verify(
        method="GET",
        path=API_PATH,  # what the gateway behind the prefix-stripping proxy checks
        query=params,
        headers=dict(seen.headers),
        signed_header_names=auth.signed_headers,
        access_key_secret=DEFAULT_ACCESS_KEY_SECRET,
        claimed_signature=auth.signature,
        body_sha256=signing.EMPTY_SHA256,
    )


async def test_sts_token_is_sent_and_signed(capture: Capture) -> None:
    async with make_client(capture.base_url, creds("STS.k", "s", "tok-123")) as client:
        await client.list_page(ListQuery(), 1)
    (seen,) = capture.seen
    assert seen.headers["x-acs-security-token"] == "tok-123"
    auth = signing.parse_authorization(seen.headers["Authorization"])
    assert auth is not None and "x-acs-security-token" in auth.signed_headers
    assert auth.access_key_id == "STS.k"
    check_signed(seen, secret="s")


async def test_sts_credentials_are_accepted_by_the_gateway() -> None:
    options = SimOptions(
        experiments=30, workspaces=1, credentials={"STS.k": "s"}, sts_tokens={"STS.k": "tok"}
    )
    async with Simulator(options) as sim:
        async with make_client(sim.base_url, creds("STS.k", "s", "tok")) as client:
            page = await client.list_page(ListQuery(), 1, 10)
            assert page.total_count == 30 and len(page.experiments) == 10
        async with make_client(sim.base_url, creds("STS.k", "s", None)) as client:
            with pytest.raises(FatalUpstreamError) as info:
                await client.list_page(ListQuery(), 1)
            assert info.value.code == "InvalidSecurityToken.MismatchWithAccessKey"
            assert client.stats.api_calls == 1


async def test_a_clock_in_another_zone_still_sends_utc() -> None:
    shanghai = lambda: datetime.now(ZoneInfo("Asia/Shanghai"))  # noqa: E731
    async with (
        Simulator(SimOptions(experiments=5, workspaces=1)) as sim,
        make_client(sim.base_url, clock=shanghai) as client,
    ):
        page = await client.list_page(ListQuery(), 1)
    assert page.total_count == 5


def ticking_clock(step: timedelta = timedelta(seconds=1)) -> Callable[[], datetime]:
    start = datetime.now(UTC)
    counter = itertools.count()
    return lambda: start + next(counter) * step


async def test_every_attempt_has_a_fresh_nonce_and_date(capture: Capture) -> None:
    capture.script.extend([api_error(500, "InternalError"), api_error(503, "ServiceUnavailable")])
    async with make_client(capture.base_url, clock=ticking_clock()) as client:
        page = await client.list_page(ListQuery(workspace_id="w1"), 1)
    assert page.experiments
    assert len(capture.seen) == 3
    assert len({s.nonce for s in capture.seen}) == 3
    dates = [datetime.strptime(s.headers["x-acs-date"], DATE_FORMAT) for s in capture.seen]
    assert dates == sorted(set(dates))
    for seen in capture.seen:
        check_signed(seen)  # each attempt re-signed, not a replay of the first signature


# ---------------------------------------------------------------------- retries

RETRYABLE: dict[str, Action] = {
    "500": api_error(500, "InternalError"),
    "500-unknown-code": api_error(500, "SomethingElse"),  # any 5xx, whatever its code
    "503": api_error(503, "ServiceUnavailable"),
    "408-html": raw_reply(408, b"<html>request timeout</html>", "text/html"),
    "502-html": raw_reply(502, b"<html>bad gateway</html>", "text/html"),
    "truncated-json": raw_reply(200, b'{"RequestId": "x", "TotalCount": 3, "Experi'),
    "SignatureNonceUsed": api_error(400, "SignatureNonceUsed"),
}


@pytest.mark.parametrize("fault", list(RETRYABLE))
async def test_retryable_failures_are_retried(capture: Capture, fault: str) -> None:
    capture.script.append(RETRYABLE[fault])
    tally = Tally()
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1, tally=tally)
        assert page.total_count == 3
        assert client.stats.api_calls == 2 and client.stats.retries == 1
    assert tally.api_calls == 2 and tally.retries == 1 and tally.pages == 1
    assert capture.seen[0].nonce != capture.seen[1].nonce


async def test_connection_reset_resent_by_aiohttp_goes_signed_anew(capture: Capture) -> None:
    # aiohttp sends an idempotent GET once more, by itself, when the connection drops: that
    # send carries a new nonce and signature (the gateway refuses a nonce it has seen), and
    # counts as a call
    capture.script.append(reset)
    tally = Tally()
    async with make_client(capture.base_url, retry_max_attempts=1) as client:
        page = await client.list_page(ListQuery(), 1, tally=tally)
        assert page.total_count == 3
        assert "SignatureNonceUsed" not in client.stats.by_code
        assert client.stats.api_calls == 2 and client.stats.retries == 0
    assert tally.api_calls == 2
    assert len(capture.seen) == 2 and capture.seen[0].nonce != capture.seen[1].nonce
    check_signed(capture.seen[1])


async def test_connection_reset_twice_is_a_retried_connection_error(capture: Capture) -> None:
    capture.script.extend([reset, reset])  # the request and aiohttp's own re-send
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3
        assert client.stats.by_code.get("ConnectionError") == 1
        assert client.stats.api_calls == 3  # the two sends of the attempt, and the retry
    assert len({s.nonce for s in capture.seen}) == 3


async def test_a_timeout_is_retried(capture: Capture) -> None:
    capture.script.append(sleep_then(1.5, ok_listing()))
    async with make_client(capture.base_url, timeout_s=0.3) as client:
        started = time.monotonic()
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3
        assert client.stats.by_code.get("Timeout") == 1
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("status", "code", "header", "value", "wait_s"),
    [
        (400, "Throttling.User", "x-acs-retry-after", "400", 0.4),  # milliseconds
        (429, "Throttling", "x-acs-retry-after", "300", 0.3),
        (503, "Throttling.Api", "x-acs-retry-after", "250", 0.25),
        (429, "Throttling", "Retry-After", "1", 1.0),  # the standard header: seconds
    ],
)
async def test_throttling_waits_as_told_and_slows_the_limiter(
    capture: Capture, status: int, code: str, header: str, value: str, wait_s: float
) -> None:
    capture.script.append(api_error(status, code, headers={header: value}))
    async with make_client(capture.base_url, max_qps=50.0) as client:
        assert client.limiter_rate == 50.0
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3
        assert client.stats.throttled == 1 and client.stats.by_code[code] == 1
        assert client.limiter_rate < 50.0
    first, second = capture.seen
    assert second.at - first.at >= wait_s
    assert second.at - first.at < wait_s + 1.0


async def test_a_429_is_throttling_whatever_code_its_body_gives(capture: Capture) -> None:
    """HTTP 429 with an API-shaped body whose Code is not ``Throttling*``: throttling all
    the same (the limiter slows down, the page is retried), not a fatal error."""
    capture.script.append(api_error(429, "TooManyRequests"))
    async with make_client(capture.base_url, max_qps=50.0) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3
        assert client.stats.throttled == 1 and client.stats.by_code["TooManyRequests"] == 1
        assert client.stats.api_calls == 2 and client.limiter_rate < 50.0


async def test_throttled_attempts_do_not_use_up_the_attempt_budget(capture: Capture) -> None:
    throttle = api_error(400, "Throttling.User", headers={"x-acs-retry-after": "20"})
    capture.script.extend([throttle, throttle, throttle, api_error(500, "InternalError")])
    async with make_client(capture.base_url, retry_max_attempts=3) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3
        assert client.stats.api_calls == 5 and client.stats.throttled == 3


async def test_exhausting_attempts_raises(capture: Capture) -> None:
    capture.fail_pages = {1}
    async with make_client(capture.base_url, retry_max_attempts=3) as client:
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(workspace_id="w9"), 1)
        assert client.stats.api_calls == 3
    err = info.value
    assert (err.code, err.http_status, err.workspace_id) == ("InternalError", 500, "w9")
    assert err.request_id == "REQ-InternalError"
    assert "gave up after 3 attempts" in str(err)


async def test_a_gateway_page_that_keeps_failing_is_reported_by_its_status(
    capture: Capture,
) -> None:
    """A 503 in HTML, again and again: the error (and the per-code count) says HTTP 503, what
    went wrong, not that a body was malformed; a 200 cut short is the malformed body."""
    page = raw_reply(503, b"<html>service unavailable</html>", "text/html")
    capture.script.extend([page, page, page])
    async with make_client(capture.base_url, retry_max_attempts=3) as client:
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(workspace_id="w9"), 1)
        assert client.stats.by_code == {"HTTP503": 3}
    err = info.value
    assert (err.code, err.http_status) == ("HTTP503", 503)
    assert "HTTP 503 Service Unavailable with a body that is not valid JSON" in str(err)
    assert "MalformedBody" not in str(err)

    capture.script.append(RETRYABLE["truncated-json"])
    async with make_client(capture.base_url) as client:
        await client.list_page(ListQuery(), 1)
        assert client.stats.by_code == {"MalformedBody": 1, "OK": 1}


async def test_a_slow_last_attempt_is_cut_to_the_time_budget(capture: Capture) -> None:
    """retry_max_total_s bounds the attempts too: one started near the end of the budget
    times out with it, not a whole timeout_s later."""
    capture.script.extend([api_error(500, "InternalError"), sleep_then(30, ok_listing())])
    async with make_client(
        capture.base_url, timeout_s=20.0, retry_max_total_s=2.0, retry_max_attempts=5
    ) as client:
        started = time.monotonic()
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(), 1)
        spent_s = time.monotonic() - started
    assert spent_s < 10, spent_s  # 20 s and more without the cut
    assert client.stats.api_calls == 2
    # the time the attempt had, not timeout_s (20 s, which it never waited)
    said = re.search(r"timed out after ([0-9.]+)s", str(info.value))
    assert said and float(said.group(1)) < 2.0, str(info.value)


async def test_a_wait_past_the_time_budget_is_named_when_giving_up(capture: Capture) -> None:
    """A 503 asking for a day's wait ends the page after one attempt (the wait cannot fit
    its retry budget); the error said only "gave up after 1 attempts", as if the client had
    not tried. It names the wait and the budget."""
    capture.script.append(api_error(503, "ServiceUnavailable", headers={"Retry-After": "86400"}))
    async with make_client(capture.base_url, retry_max_total_s=30.0) as client:
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(), 1)
    assert client.stats.api_calls == 1
    message = str(info.value)
    assert "gave up after 1 attempt (0 throttled)" in message, message
    assert "upstream asking to wait 86400s more (past retry_max_total_s = 30s)" in message
    assert "longer pause than the retry budget" in (info.value.hint or "")


async def test_the_time_budget_runs_from_the_first_attempt_not_the_wait_for_a_slot(
    capture: Capture,
) -> None:
    """A page that waited longer than its whole retry budget for the client's only slot
    still gets its retries: waiting its turn is not retrying."""
    capture.script.extend([sleep_then(2.8, ok_listing()), api_error(500, "InternalError")])
    async with make_client(
        capture.base_url, max_concurrency=1, timeout_s=5.0, retry_max_total_s=3.0
    ) as client:
        first = asyncio.create_task(client.list_page(ListQuery(), 1))
        await asyncio.sleep(0.2)  # it holds the slot for 2.8 s; a retry waits 0.2 s or more
        page = await client.list_page(ListQuery(), 1)  # waits, fails once, then succeeds
        await first
    assert page.experiments and client.stats.api_calls == 3 and client.stats.retries == 1


async def test_endless_throttling_is_bounded(capture: Capture) -> None:
    throttle = api_error(400, "Throttling.User", headers={"x-acs-retry-after": "10"})
    capture.script.extend([throttle] * 100)
    async with make_client(capture.base_url, retry_max_attempts=2) as client:
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(), 1)
        assert info.value.code == "Throttling.User"
        assert client.stats.api_calls == 8  # THROTTLED_ATTEMPTS_FACTOR x retry_max_attempts
    capture.script.clear()
    capture.script.extend([api_error(400, "Throttling", headers={"x-acs-retry-after": "300"})] * 20)
    async with make_client(capture.base_url, retry_max_total_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(RetriesExhaustedError):
            await client.list_page(ListQuery(), 1)
        assert time.monotonic() - started < 1.5  # stops before a wait past the budget


async def test_no_retry_starts_past_the_time_budget_after_waiting_for_the_limiter(
    capture: Capture,
) -> None:
    """Throttled on every attempt, the adaptive limiter slows the client down, and a retry
    waits for its send slot after its backoff: that wait counts against retry_max_total_s
    too. No attempt starts past the budget (one used to start 3 s past a 4 s one)."""
    throttle = api_error(429, "Throttling", headers={"x-acs-retry-after": "300"})
    capture.script.extend([throttle] * 60)
    async with make_client(
        capture.base_url, retry_max_total_s=4.0, retry_max_attempts=15, max_qps=50.0
    ) as client:
        with pytest.raises(RetriesExhaustedError) as info:
            await client.list_page(ListQuery(), 1)
    arrivals = [seen.at for seen in capture.seen]
    assert len(arrivals) >= 3
    assert arrivals[-1] - arrivals[0] <= 4.0 + 0.25, [round(a - arrivals[0], 2) for a in arrivals]
    assert f"gave up after {len(arrivals)} attempts ({len(arrivals)} throttled)" in str(info.value)


def test_a_server_error_that_asks_for_a_wait_gets_at_least_that() -> None:
    """A 503 (not throttling) with ``Retry-After: 2``: the backoff, ~0.2 s after a first
    failure, is stretched to the wait the server asked for."""
    from hpo_sync.client import _retry_after_s, _retry_wait
    from hpo_sync.errors import RetryableUpstreamError

    hinted = _retry_after_s(None, "2")
    assert hinted == 2.0
    exc = RetryableUpstreamError("busy", code="ServiceUnavailable", http_status=503,
                                 retry_after_s=hinted)  # fmt: skip
    for failures in (1, 2, 3):
        assert 2.0 <= _retry_wait(exc, failures) <= 4.0


def test_a_throttled_attempt_without_a_hint_waits_only_the_jitter() -> None:
    """The limiter has slowed every caller down already: a throttled page's own wait is
    the jitter, however many of its attempts failed, never the escalating backoff."""
    from hpo_sync.client import THROTTLE_JITTER_S, _retry_wait
    from hpo_sync.errors import ThrottledError

    exc = ThrottledError("slow down", code="Throttling.User", http_status=400)
    for failures in (1, 2, 5, 10):
        assert 0.0 <= _retry_wait(exc, failures) <= THROTTLE_JITTER_S


def test_ids_beyond_the_count_do_not_add_up() -> None:
    """Three distinct ids under a single TotalCount of 2 is no consistent listing (more
    rows than counted: the count is off, or the ids are not what they seem)."""
    listing = Listing(total_count=2, pages_expected=1, pages_read=1, totals_seen={2},
                      seen_ids={"a", "b", "c"})  # fmt: skip
    assert listing.complete and not listing.consistent
    assert Listing(total_count=3, pages_expected=1, pages_read=1, totals_seen={3},
                   seen_ids={"a", "b", "c"}).consistent  # fmt: skip


async def test_an_id_on_two_pages_is_kept_once_and_counted_as_a_duplicate(
    capture: Capture,
) -> None:
    """Rows moved while the pages were read: e001 is on page 1 and again on page 2."""
    capture.experiments = [{"ExperimentId": i} for i in ("e000", "e001", "e001", "e002")]
    seen_on_pages: list[str] = []

    async def on_page(page: Page) -> None:
        seen_on_pages.extend(e["ExperimentId"] for e in page.experiments)

    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(), page_size=2, on_page=on_page)
    assert [e["ExperimentId"] for e in listing.experiments] == ["e000", "e001", "e002"]
    assert seen_on_pages == ["e000", "e001", "e002"]
    assert listing.duplicates == 1 and listing.seen_ids == {"e000", "e001", "e002"}
    assert listing.complete and not listing.consistent  # 3 ids against a count of 4


async def test_a_page_that_always_fails_leaves_the_listing_incomplete(capture: Capture) -> None:
    capture.experiments = [{"ExperimentId": f"e{i:02d}"} for i in range(10)]
    capture.fail_pages = {3}
    async with make_client(capture.base_url, retry_max_attempts=2) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=2)
    assert not listing.complete and not listing.consistent
    assert isinstance(listing.error, RetriesExhaustedError)
    assert listing.error.code == "InternalError"
    assert (listing.pages_expected, listing.pages_read) == (5, 4)
    kept = [e["ExperimentId"] for e in listing.experiments]
    assert sorted(kept) == ["e00", "e01", "e02", "e03", "e06", "e07", "e08", "e09"]
    assert listing.seen_ids == set(kept)


async def test_a_silently_capped_page_size_still_lists_everything(capture: Capture) -> None:
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.max_page_size = 40
    async with make_client(capture.base_url) as client:
        with capture_logs() as logs:
            listing = await client.list_all(ListQuery(), page_size=100)
    assert listing.complete and listing.consistent
    assert listing.pages_expected == 7 and len(listing.seen_ids) == 250
    capped = [e for e in logs if e["event"] == "upstream.page_size_capped"]
    assert [(e["asked"], e["got"]) for e in capped] == [(100, 40)]


async def test_experiments_created_while_paging_are_read_from_the_pages_they_add(
    capture: Capture,
) -> None:
    """Sorted by create time ascending, experiments created during a listing land past the
    pages planned from page 1; the later pages count them, and those pages are read too."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(300)]

    async def page_one_then_grow(request: web.Request) -> web.StreamResponse:
        answer = await capture.listing(request)
        capture.experiments += [{"ExperimentId": f"n{i:03d}"} for i in range(50)]
        return answer

    capture.script.append(page_one_then_grow)
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(), page_size=100)
    assert listing.complete and listing.consistent is False  # two counts: 300, then 350
    assert (listing.pages_expected, listing.pages_read, len(listing.seen_ids)) == (4, 4, 350)


async def test_a_count_of_a_billion_plans_no_billion_requests(capture: Capture) -> None:
    """Page 1 counts 10^9 experiments; there are 250. A few workers share the page
    numbers, and the short page 3 then the empty page 4 end the listing: complete, but its
    ids do not add up to the count (the sweeps weigh that)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.total_count = 10**9
    async with make_client(capture.base_url, max_concurrency=2) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert len(listing.seen_ids) == 250 and listing.complete and not listing.consistent
    assert client.stats.api_calls < 20  # pages 1-3, then a few empty ones in flight


async def test_an_empty_page_after_a_full_one_twice_ends_the_listing(capture: Capture) -> None:
    """200 experiments under a count of 500 (one that takes in 300 soft-deleted rows): two
    full pages, then an empty one. Asked for once more, page 3 is empty again: the listing's
    end, complete but short of its count (the sweeps weigh that), not an incomplete listing
    that would leave every sweep of such a workspace partial for good."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(200)]
    capture.total_count = 500
    async with make_client(capture.base_url, max_concurrency=2) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert len(listing.seen_ids) == 200 and listing.complete and not listing.consistent
    asked = [
        (q["PageNumber"][0], q["PageSize"][0])
        for q in (parse_qs(s.raw_query) for s in capture.seen)
    ]
    assert asked.count(("3", "100")) == 2
    assert asked.count(("1", "100")) == asked.count(("2", "100")) == 1
    assert len(asked) == 6  # pages 1-5, and page 3 once more


async def test_an_empty_page_after_a_full_one_that_has_rows_again_leaves_the_listing_incomplete(
    capture: Capture,
) -> None:
    """300 experiments under a count of 500: page 3 glitches (empty once), and the pages
    past the end are empty too. Asked for once more, page 3 has rows: no end, the listing
    stays incomplete."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(300)]
    capture.total_count = 500
    asked: list[str] = []

    async def empty_page_3_once(request: web.Request) -> web.StreamResponse:
        number = request.query.get("PageNumber", "")
        asked.append(number)
        if number == "3" and asked.count("3") == 1:
            return web.json_response({"RequestId": "r", "TotalCount": 500, "Experiments": []})
        return await capture.listing(request)

    capture.script.extend([empty_page_3_once] * 10)
    async with make_client(capture.base_url, max_concurrency=1) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert asked.count("3") == 2  # asked again: rows this time
    assert not listing.complete
    assert listing.error is not None and listing.error.code == "ShortListing"


async def test_a_full_page_then_an_empty_one_under_a_count_that_moved_is_no_end(
    capture: Capture,
) -> None:
    """Rows deleted while the pages are read shift later rows onto pages read already: page
    2 comes back full and page 3 empty, and stays empty when asked again, but the count
    moved (400, then 200): no end, the listing stays incomplete (e100-e299 were missed)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(400)]

    async def delete_after_page_1(request: web.Request) -> web.StreamResponse:
        answer = await capture.listing(request)
        del capture.experiments[:200]  # e200-e299 move to page 1, read already
        return answer

    capture.script.append(delete_after_page_1)
    async with make_client(capture.base_url, max_concurrency=1) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert not listing.complete and len(listing.seen_ids) < 400
    assert listing.error is not None and listing.error.code == "ShortListing"


async def test_a_short_page_1_under_a_larger_count_asks_page_2_alone(capture: Capture) -> None:
    """7 experiments under a count of 22 (soft-deleted rows counted too) at a page size of
    10: page 1 looks like a server that caps the page size at 7, which would plan four
    pages at once. Page 2 is asked for alone first; it is empty, so page 1 was the whole
    listing: two calls."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(7)]
    capture.total_count = 22
    async with make_client(capture.base_url, max_concurrency=4) as client:
        with capture_logs() as logs:
            listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
    assert listing.complete and not listing.consistent and len(listing.seen_ids) == 7
    assert client.stats.api_calls == 2
    # no server that caps the page size after all: nothing to warn about
    assert not [e for e in logs if e["event"] == "upstream.page_size_capped"]


@pytest.mark.parametrize("refused", [False, True], ids=["empty", "refused"])
@pytest.mark.parametrize("total", ["absent", None, "many", -1, 3, True])
async def test_without_a_readable_total_count_pages_until_empty(
    capture: Capture, total: Any, refused: bool
) -> None:
    """No TotalCount, an unreadable one or one below the page's own size: the listing pages
    until an empty page, is complete, but never counts as consistent. A server that refuses
    the page number past the end (INVALID_INPUT_PARAMS) ends it the same way (the listing
    used to fail, and with it every sync)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.total_count = total
    capture.refuse_past_end = refused
    pages_read = 3 if refused else 4  # the empty page is a page read; a refusal is not
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(), page_size=100)
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert listing.complete and not listing.consistent and listing.uncounted
    assert len(listing.seen_ids) == 250 and listing.pages_read == pages_read
    assert [len(p.experiments) for p in pages] == [100, 100, 50, 0][:pages_read]
    # a capped page size is followed too: the server pages by its own size
    capture.max_page_size = 40
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(), page_size=100)
    assert listing.complete and len(listing.seen_ids) == 250
    assert listing.pages_read == pages_read + 4


@pytest.mark.parametrize("rows", [250, 200], ids=["short-page-then", "full-page-then"])
async def test_a_planned_page_refused_as_past_the_end_is_an_empty_page(
    capture: Capture, rows: int
) -> None:
    """A count higher than the rows (soft-deleted ones counted, or rows deleted while the
    pages were read) plans pages past the end, which this server refuses: each refusal is
    taken as an empty page. After a short page that is the listing's end; after a full one
    too, once the page is refused again when asked for once more. Neither raises (the sync
    used to fail)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(rows)]
    capture.total_count = 380
    capture.refuse_past_end = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert len(listing.seen_ids) == rows and listing.complete
    assert not listing.consistent


async def test_a_count_of_the_page_not_the_listing_is_not_trusted(capture: Capture) -> None:
    """TotalCount equal to a full page's own size: page 2 tells whether it counts the listing.
    A server that counts each page gets paged until an empty page, as one with no count;
    one that really holds one page costs one call more and stays consistent."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.total_count = "page"
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert len(listing.seen_ids) == 250 and listing.pages_read == 4  # 100, 100, 50, empty
    assert listing.complete and listing.uncounted and not listing.consistent
    assert [len(p.experiments) for p in pages] == [100, 100, 50, 0]

    capture.experiments = capture.experiments[:100]  # exactly one page, really
    capture.total_count = "count"
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        assert client.stats.api_calls == 2
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert listing.complete and listing.consistent and len(listing.seen_ids) == 100
    assert [len(p.experiments) for p in pages] == [100, 0]


async def test_a_capped_page_size_with_a_count_of_the_page_is_found_out_when_asked(
    capture: Capture,
) -> None:
    """A server that caps PageSize at 50 and counts each page answers page 1 of 130 rows
    just as an honest one answers a listing of 50: a short page whose count is its own
    size. Asked to check (``check_short``, the listing of a whole workspace), page 2 tells;
    the client then trusts no count of that server again, in listings that were not asked
    to check too (a hot sweep's, or the pages of a feed)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(130)]
    capture.max_page_size = 50
    capture.total_count = "page"
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        assert len(listing.seen_ids) == 50 and listing.consistent  # what it cannot tell
        assert not client.counts_pages
        listing = await client.list_all(
            ListQuery(workspace_id="w1"), page_size=100, check_short=True
        )
        assert len(listing.seen_ids) == 130 and listing.complete
        assert listing.uncounted and not listing.consistent
        assert client.counts_pages
        again = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert len(again.seen_ids) == 130 and again.complete and again.uncounted
    assert [len(p.experiments) for p in pages] == [50, 50, 30, 0]


async def test_a_listing_that_grew_between_page_1_and_page_2_keeps_its_count(
    capture: Capture,
) -> None:
    """Exactly one full page, counted, then an experiment is created before page 2 is
    asked: page 2 holds it and counts 101. That is the listing's count, grown, not a server
    that counts pages; taking it for one made the client trust no count for the rest of
    the process, and every later listing of every workspace was paged until an empty page
    and never added up."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(100)]

    async def first_then_grow(request: web.Request) -> web.StreamResponse:
        answer = await capture.listing(request)
        capture.experiments.append({"ExperimentId": "e100"})
        return answer

    capture.script.append(first_then_grow)
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        assert client.stats.api_calls == 2 and not client.counts_pages
        assert listing.complete and not listing.uncounted and len(listing.seen_ids) == 101
        assert listing.totals_seen == {100, 101}  # (so it does not add up: it moved)
        again = await client.list_all(ListQuery(workspace_id="w2"), page_size=100)
    assert again.consistent and not again.uncounted and len(again.seen_ids) == 101


@pytest.mark.parametrize(
    "past_end", ["an empty page", "repeats the last page", "refuses the page number"]
)
async def test_a_short_single_page_checked_costs_one_call_and_stays_counted(
    capture: Capture, past_end: str
) -> None:
    """An honest listing of 30 rows in pages of 100, checked: page 2, however the server
    answers past the end, shows that page 1 was all there is. A server that answers the
    last page again is told from one that ignores PageNumber by page 2 at half page 1's
    rows (at half the size asked for, 50, it would answer all 30 again)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(30)]
    capture.repeat_last_page = past_end == "repeats the last page"
    capture.refuse_past_end = past_end == "refuses the page number"
    async with make_client(capture.base_url) as client:
        with capture_logs() as logs:
            listing = await client.list_all(
                ListQuery(workspace_id="w1"), page_size=100, check_short=True
            )
        assert client.stats.api_calls == (3 if capture.repeat_last_page else 2)
        assert not client.counts_pages
    assert listing.complete and listing.consistent and len(listing.seen_ids) == 30
    events = {e["event"] for e in logs}
    assert ("upstream.page_past_end_repeats" in events) == capture.repeat_last_page
    assert "upstream.paging_ignored" not in events


async def test_a_server_that_does_not_page_at_all_is_taken_at_its_count(
    capture: Capture,
) -> None:
    """The same rows whatever PageNumber and PageSize say, counted: that is the listing."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(7)]
    capture.ignore_page_number = True
    capture.max_page_size = 1000

    async def whole(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"RequestId": "r", "TotalCount": 7, "Experiments": capture.experiments}
        )

    capture.script.extend([whole, whole, whole])
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(
            ListQuery(workspace_id="w1"), page_size=100, check_short=True
        )
        assert client.stats.api_calls == 3 and not client.counts_pages
    assert listing.complete and listing.consistent and len(listing.seen_ids) == 7


@pytest.mark.parametrize("past_end", ["repeats the last page", "refuses the page number"])
async def test_a_single_full_page_ends_however_the_server_answers_past_it(
    capture: Capture, past_end: str
) -> None:
    """Exactly one full page, counted: page 2 tells whether the count is the listing's. Past
    the end a server may answer an empty page, the last page again (page numbers clamped)
    or INVALID_INPUT_PARAMS; each ends the listing complete and consistent, feeds too."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(100)]
    capture.repeat_last_page = past_end == "repeats the last page"
    capture.refuse_past_end = past_end == "refuses the page number"
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert listing.error is None and listing.complete and listing.consistent
    assert len(listing.seen_ids) == 100 and not listing.uncounted
    assert [len(p.experiments) for p in pages] == [100]


async def test_a_server_that_ignores_page_numbers_is_not_taken_for_one_that_clamps_them(
    capture: Capture,
) -> None:
    """Page 2 equal to page 1 is also what a server that ignores PageNumber answers; with a
    count of the page, the listing may be far longer. Page 2 at half the size tells: here
    it is page 1's first half again, so the listing is paged as uncounted and ends
    incomplete (a full sweep then deletes nothing)."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.ignore_page_number = True
    capture.total_count = "page"
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert not listing.complete and listing.error is not None
    assert listing.error.code == "NoTotalCount"


async def test_an_uncounted_listing_that_repeats_itself_ends_incomplete(
    capture: Capture,
) -> None:
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(10)]
    capture.total_count = "absent"
    capture.ignore_page_number = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=5)
    assert not listing.complete and listing.error is not None
    assert listing.error.code == "NoTotalCount" and "repeats" in str(listing.error)
    assert len(listing.seen_ids) == 5 and listing.pages_read == 2


async def test_an_uncounted_listing_ends_where_the_short_last_page_comes_again(
    capture: Capture,
) -> None:
    """No TotalCount, and a page number past the end answered with the last page again:
    that repeat of the short last page ends the listing, complete, as an empty page would."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(250)]
    capture.total_count = "absent"
    capture.repeat_last_page = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert listing.complete and listing.error is None and not listing.consistent
    assert len(listing.seen_ids) == 250 and listing.pages_read == 4


@pytest.mark.parametrize(
    ("experiments", "page_size", "calls"),
    [
        (200, 100, 4),  # full last page again: row 200 at a page size of one tells
        (5, 10, 3),  # one short page: row 5 at a page size of one
        (1, 10, 2),  # one page of one row, asked in pages of ten: the listing
    ],
)
async def test_an_uncounted_listing_ends_where_a_full_or_only_page_comes_again(
    capture: Capture, experiments: int, page_size: int, calls: int
) -> None:
    """No TotalCount, page numbers past the end clamped to the last page, and that page is
    full, or the only one: the listing used to end incomplete, so such a workspace never
    got a baseline and a hot sweep whose status listing fits one page was always partial.
    One call more (the last row, at a page size of one) shows the page numbers work."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(experiments)]
    capture.total_count = "absent"
    capture.repeat_last_page = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=page_size)
        assert client.stats.api_calls == calls
    assert listing.complete and listing.error is None and not listing.consistent
    assert len(listing.seen_ids) == experiments


@pytest.mark.parametrize(("experiments", "calls"), [(250, 4), (300, 5)])
async def test_an_uncounted_listing_ends_where_the_first_page_comes_again(
    capture: Capture, experiments: int, calls: int
) -> None:
    """No TotalCount, and a page number past the end answered with page 1 again: that
    ends the listing after a short last page, or after a full one when row 300 at a page
    size of one shows the page numbers work. Such a workspace never got a baseline (every
    full sweep partial, NoTotalCount). Feeds stop there too."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(experiments)]
    capture.total_count = "absent"
    capture.first_page_past_end = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
        assert client.stats.api_calls == calls
        pages = [p async for p in client.iter_pages(ListQuery(), page_size=100)]
    assert listing.complete and listing.error is None and not listing.consistent
    assert len(listing.seen_ids) == experiments
    assert sum(len(p.experiments) for p in pages) == experiments


async def test_a_server_that_ignores_page_numbers_and_caps_the_page_size_ends_incomplete(
    capture: Capture,
) -> None:
    """Page 2 the same short page as page 1, from a server that ignores PageNumber and
    serves 5 where 10 were asked: the row the probe asks for is the first again, so the
    listing (12 experiments, not 5) is not taken for complete."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(12)]
    capture.total_count = "absent"
    capture.ignore_page_number = True
    capture.max_page_size = 5
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
    assert not listing.complete and listing.error is not None
    assert listing.error.code == "NoTotalCount" and len(listing.seen_ids) == 5


async def test_a_fatal_page_fails_the_whole_listing(capture: Capture) -> None:
    capture.experiments = [{"ExperimentId": f"e{i:02d}"} for i in range(10)]
    capture.fatal_pages = {4}
    async with make_client(capture.base_url) as client:
        with pytest.raises(FatalUpstreamError) as info:
            await client.list_all(ListQuery(workspace_id="w1"), page_size=2)
    assert info.value.code == "Forbidden.RAM"


# ---------------------------------------------------------------------- answers' shapes


def json_reply(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Action:
    async def act(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=dict(headers or {}))

    return act


@pytest.mark.parametrize(
    ("body", "code"),
    [
        # an error reported in a 200, with an empty listing's fields beside it
        (
            {"RequestId": "R1", "Code": "Forbidden.RAM", "Message": "no", "TotalCount": 0,
             "Experiments": []},
            "Forbidden.RAM",
        ),
        (
            {"requestId": "R1", "code": "INVALID_INPUT_PARAMS", "message": "bad"},
            "INVALID_INPUT_PARAMS",
        ),
        ({}, "HTTP200"),  # no RequestId, no listing: not an API answer at all
        ({"RequestId": "R1", "Success": False}, "HTTP200"),  # failed, and no code to say why
        ({"Experiments": {"a": 1}, "RequestId": "R1"}, "HTTP200"),
        # a listing in another shape: wrapped, or its members in camelCase
        (
            {"RequestId": "R1", "Data": {"TotalCount": 1, "Experiments": [{"ExperimentId": "e"}]}},
            "HTTP200",
        ),
        ({"RequestId": "R1", "totalCount": 1, "experiments": [{"ExperimentId": "e"}]}, "HTTP200"),
        ({"RequestId": "R1", "Items": []}, "HTTP200"),
    ],
)  # fmt: skip
async def test_an_error_in_a_200_answer_is_never_an_empty_listing(
    capture: Capture, body: dict[str, Any], code: str
) -> None:
    """Read as an empty listing, such an answer would let a full sweep mark every
    experiment of the workspace deleted."""
    capture.script.append(json_reply(200, body))
    async with make_client(capture.base_url) as client:
        err = await expect_fatal(client, ListQuery(workspace_id="w1"))
    assert (err.code, err.http_status) == (code, 200)
    if "Code" in body or "code" in body:
        assert err.request_id == "R1" and err.upstream_message in ("no", "bad")
    else:  # what it held instead, for whoever reads the error
        assert err.upstream_message.startswith("a 200 answer that is no listing (members: ")
        assert all(name in err.upstream_message for name in body)


@pytest.mark.parametrize(
    "body",
    [
        {"RequestId": "T", "Code": "Throttling.User", "TotalCount": 0, "Experiments": []},
        {"requestId": "T", "code": "Throttling.User", "message": "slow down"},  # lower case
    ],
)
@pytest.mark.parametrize("status", [200, 400])
async def test_throttling_is_read_from_the_body_in_either_case_and_status(
    capture: Capture, body: dict[str, Any], status: int
) -> None:
    capture.script.append(json_reply(status, body))
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3 and len(page.experiments) == 3
        assert client.stats.throttled == 1 and client.stats.by_code["Throttling.User"] == 1


ONE = {"ExperimentId": "e"}


@pytest.mark.parametrize(
    ("body", "total", "rows"),
    [
        ({"RequestId": "R", "Code": "200", "TotalCount": 1, "Experiments": [ONE]}, 1, 1),
        ({"RequestId": "R", "Code": 0, "TotalCount": "1", "Experiments": [ONE]}, 1, 1),
        ({"RequestId": "R", "Code": "OK", "Success": True}, 0, 0),
        ({"RequestId": "R"}, 0, 0),  # a server that leaves out empty fields: empty listing
        # ... with the envelope's other members, in either case
        (
            {"RequestId": "R", "Code": "OK", "Message": "", "success": True,
             "HttpStatusCode": 200, "HostId": "h", "PageNumber": 4, "pageSize": 100},
            0, 0,
        ),
        ({"RequestId": "R", "Experiments": None}, 0, 0),
        ({"RequestId": "R", "TotalCount": 7}, 7, 0),
    ],
)  # fmt: skip
async def test_success_answers_in_every_shape(
    capture: Capture, body: dict[str, Any], total: int, rows: int
) -> None:
    capture.script.append(json_reply(200, body))
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert client.stats.api_calls == 1
    assert (page.total_count, len(page.experiments), page.request_id) == (total, rows, "R")


async def test_pages_sent_together_wait_for_the_first_to_learn_the_sort_name(
    capture: Capture,
) -> None:
    """Two listings started together with the configured SortBy, which upstream refuses:
    both were refused and both asked again (a hot sweep's five or six listings, in every
    new process). The second waits for the first page's answer and is sent in the name
    upstream took; once a name is taken as it is, pages no longer wait for one another."""
    refuse = api_error(400, "INVALID_INPUT_PARAMS")
    refused: list[str] = []

    async def by_sort_name(request: web.Request) -> web.StreamResponse:
        """Refuses GmtCreateTime (slowly: the second page is sent meanwhile if it does not
        wait); answers the other name."""
        if parse_wire_query(request.raw_path.partition("?")[2]).get("SortBy") != "GmtCreateTime":
            return await capture.listing(request)
        refused.append(request.raw_path)
        return await sleep_then(0.3, refuse)(request)

    capture.script.extend([by_sort_name] * 4)
    query = ListQuery(workspace_id="w1", sort_by="GmtCreateTime")
    async with make_client(capture.base_url) as client:
        first, second = await asyncio.gather(client.list_page(query, 1), client.list_page(query, 1))
        assert len(first.experiments) == len(second.experiments) == 3
        assert client.stats.api_calls == 3
        later = await client.list_page(query, 1)  # learned: one call, in the other name
        assert len(later.experiments) == 3 and client.stats.api_calls == 4
        assert client.sort_names == {"GmtCreateTime": "create_time"}
    sorts = [parse_wire_query(s.raw_query).get("SortBy") for s in capture.seen]
    assert sorts == ["GmtCreateTime"] + ["create_time"] * 3
    assert len(refused) == 1


async def test_pages_sorted_by_a_name_upstream_takes_go_together_once_it_is_taken(
    capture: Capture,
) -> None:
    """The wait is for a name upstream has not answered yet: the first page's answer
    settles it, and later pages are in flight together again."""
    in_flight = peak = 0
    three = asyncio.Event()

    async def counting(request: web.Request) -> web.StreamResponse:
        """Held until three are in flight together (or for a second, alone)."""
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 3:
            three.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(three.wait(), 1.0)
            return await capture.listing(request)
        finally:
            in_flight -= 1

    capture.script.extend([counting] * 4)
    query = ListQuery(workspace_id="w1", sort_by="GmtCreateTime")
    async with make_client(capture.base_url, max_concurrency=4) as client:
        await client.list_page(query, 1)
        assert peak == 1
        await asyncio.gather(*(client.list_page(query, 1) for _ in range(3)))
    assert peak == 3


async def test_a_sort_name_learnt_and_then_refused_gives_way_to_the_configured_one(
    capture: Capture,
) -> None:
    """The name learnt (here recalled from an earlier process) is refused now, and the
    configured one taken: an upstream fixed, another gateway behind the endpoint. The
    learnt name stood, and every listing failed on it, in every process that recalled it."""
    refused: list[str | None] = []

    async def takes_only_the_configured(request: web.Request) -> web.StreamResponse:
        sort = parse_wire_query(request.raw_path.partition("?")[2]).get("SortBy")
        if sort == "create_time":
            refused.append(sort)
            return await api_error(400, "INVALID_INPUT_PARAMS")(request)
        return await capture.listing(request)

    capture.script.extend([takes_only_the_configured] * 4)
    query = ListQuery(workspace_id="w1", sort_by="GmtCreateTime")
    async with make_client(capture.base_url) as client:
        client.learn_sort_names({"GmtCreateTime": "create_time"})
        with capture_logs() as logs:
            first = await client.list_page(query, 1)
        assert len(first.experiments) == 3 and client.stats.api_calls == 2
        assert client.sort_names == {}
        switched = [e for e in logs if e["event"] == "upstream.sort_by_switched"]
        assert [(e["configured"], e["using"]) for e in switched] == [
            ("GmtCreateTime", "GmtCreateTime")
        ]
        await client.list_page(query, 2)  # in the configured name from the start
        assert client.stats.api_calls == 3
    assert refused == ["create_time"]
    sorts = [parse_wire_query(s.raw_query).get("SortBy") for s in capture.seen]
    assert sorts == ["create_time", "GmtCreateTime", "GmtCreateTime"]


async def test_a_throttling_answer_that_is_not_json_waits_as_told(capture: Capture) -> None:
    """A proxy's 429 page (HTML) with Retry-After: throttled, and waited out as asked."""
    capture.script.append(
        lambda request: _html(429, {"Retry-After": "1"}),
    )
    async with make_client(capture.base_url, max_qps=50.0) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 3 and client.stats.throttled == 1
        assert client.limiter_rate < 50.0
    first, second = capture.seen
    assert 1.0 <= second.at - first.at < 2.0


async def _html(status: int, headers: Mapping[str, str]) -> web.StreamResponse:
    return web.Response(
        status=status, body=b"<html>slow down</html>", content_type="text/html", headers=headers
    )


# ---------------------------------------------------------------------- fatal errors


async def expect_fatal(client: UpstreamClient, query: ListQuery) -> FatalUpstreamError:
    with pytest.raises(FatalUpstreamError) as info:
        await client.list_page(query, 1)
    assert client.stats.api_calls == 1 and client.stats.retries == 0
    return info.value


async def test_fatal_gateway_rejections_are_not_retried() -> None:
    options = SimOptions(experiments=20, workspaces=1, credentials={"ak": "right"})
    query = ListQuery(workspace_id="100001")
    async with Simulator(options) as sim:
        async with make_client(sim.base_url, creds("ak", "wrong")) as client:
            err = await expect_fatal(client, query)
        assert (err.code, err.http_status) == ("SignatureDoesNotMatch", 400)
        assert err.hint is not None and "secret" in err.hint

        async with make_client(sim.base_url, creds("nobody", "right")) as client:
            err = await expect_fatal(client, query)
        assert (err.code, err.http_status) == ("InvalidAccessKeyId.NotFound", 404)
        assert err.hint is not None and "AccessKey ID" in err.hint

        skewed = lambda: datetime.now(UTC) - timedelta(minutes=20)  # noqa: E731
        async with make_client(sim.base_url, creds("ak", "right"), clock=skewed) as client:
            err = await expect_fatal(client, query)
        assert (err.code, err.http_status) == ("InvalidTimeStamp.Expired", 400)
        assert err.hint is not None and "clock" in err.hint
        assert sim.stats.requests == 3  # exactly one attempt each

        async with make_client(sim.base_url, creds("ak", "right")) as client:
            await client.list_page(query, 1)  # and the right ones pass

    assert err.request_id and len(err.request_id) == 36
    assert err.workspace_id == "100001"
    text = str(err)
    assert "workspace 100001" in text and "InvalidTimeStamp.Expired" in text
    assert err.request_id in text and "NTP" in text


@pytest.mark.parametrize("code", ["Forbidden.RAM", "NoPermission", "AccessDenied"])
async def test_access_denied_is_fatal_with_a_ram_hint(capture: Capture, code: str) -> None:
    capture.script.append(api_error(403, code, request_id="RID-403"))
    async with make_client(capture.base_url) as client:
        err = await expect_fatal(client, ListQuery(workspace_id="w2"))
    assert (err.code, err.http_status, err.request_id) == (code, 403, "RID-403")
    assert err.hint is not None and "paiautoml:ListHpoExperiments" in err.hint
    assert len(capture.seen) == 1


async def test_a_non_api_4xx_answer_is_fatal(capture: Capture) -> None:
    capture.script.append(raw_reply(404, b"<html>not here</html>", "text/html"))
    async with make_client(capture.base_url) as client:
        err = await expect_fatal(client, ListQuery())
    assert (err.code, err.http_status) == ("HTTP404", 404)
    assert err.hint is not None and "upstream.endpoint" in err.hint


@contextlib.asynccontextmanager
async def raw_server(*answers: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server on loopback that reads each request's head and writes the next of
    ``answers`` (the last one again once they run out), then closes. Yields its http:// URL
    and the heads it read."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answers[min(len(heads), len(answers)) - 1])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("answer", "shown", "hint"),
    [
        # an http:// endpoint on a port that speaks something else (TLS, SSH)
        (b"\x15\x03\x01\x00\x02\x02\x50", "Bad status line", "https://"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "Bad status line", "https://"),
        # an encoding the client did not ask for (it accepts gzip and deflate)
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nabcd",
            "content-encoding",
            "asked for",
        ),
    ],
    ids=["tls-alert", "ssh", "brotli"],
)
async def test_an_answer_that_is_not_http_is_fatal_at_once(
    answer: bytes, shown: str, hint: str
) -> None:
    async with raw_server(answer) as (url, heads), make_client(url, retry_max_total_s=30.0) as c:
        err = await expect_fatal(c, ListQuery(workspace_id="w1"))
    assert err.code == "ProtocolError" and shown in str(err)
    assert err.hint is not None and hint in err.hint
    assert len(heads) == 1  # one attempt: the next ones would get the same


async def test_an_answer_cut_short_is_still_retried() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"
    body = json.dumps({"RequestId": "r", "TotalCount": 1, "Experiments": [{"ExperimentId": "e"}]})
    whole = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    ).encode()
    async with raw_server(cut, whole) as (url, heads), make_client(url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert page.total_count == 1 and client.stats.retries == 1
    assert len(heads) == 2


async def test_an_https_endpoint_on_a_plain_http_port_is_fatal_at_once(capture: Capture) -> None:
    endpoint = capture.base_url.replace("http://", "https://")
    async with make_client(endpoint, retry_max_total_s=30.0) as client:
        err = await expect_fatal(client, ListQuery())
    assert err.code == "TLSError" and "does not speak TLS" in str(err)
    assert err.hint is not None and "http://" in err.hint
    assert capture.seen == []  # the handshake failed: no request reached it


# ---------------------------------------------------------------------- listings


async def test_list_all_without_keeping_records_and_iter_pages() -> None:
    async with Simulator(SimOptions(experiments=250, workspaces=1, seed=4)) as sim:
        (ws,) = sim.world.workspace_ids
        truth_ids = {e["ExperimentId"] for e in sim.world.truth(ws)}
        streamed: list[str] = []

        async def on_page(page: Page) -> None:
            streamed.extend(e["ExperimentId"] for e in page.experiments)

        query = ListQuery(workspace_id=ws, sort_by="GmtCreateTime", order="ASC")
        async with make_client(sim.base_url) as client:
            listing = await client.list_all(query, page_size=30, on_page=on_page, keep=False)
            pages = [p async for p in client.iter_pages(query, page_size=100)]
        assert listing.complete and listing.consistent and listing.experiments == []
        assert sorted(streamed) == sorted(truth_ids) == sorted(listing.seen_ids)
        assert [len(p.experiments) for p in pages] == [100, 100, 50]


def normalised(records: list[dict[str, Any]]) -> dict[str, Experiment]:
    out: dict[str, Experiment] = {}
    for raw in records:
        exp = normalise(raw)
        assert exp is not None
        assert exp.experiment_id not in out, f"{exp.experiment_id} listed twice"
        out[exp.experiment_id] = exp
    return out


def assert_same_records(
    got: Mapping[str, Experiment], want: Mapping[str, Experiment], skip: tuple[str, ...] = ()
) -> None:
    assert got.keys() == want.keys()
    names = [f.name for f in fields(Experiment) if f.compare and f.name not in skip]
    for exp_id, mine in got.items():
        theirs = want[exp_id]
        for name in names:
            assert getattr(mine, name) == getattr(theirs, name), (exp_id, name)


async def list_workspaces(
    client: UpstreamClient, workspace_ids: list[str], page_size: int = 100
) -> dict[str, Listing]:
    async def one(ws: str) -> tuple[str, Listing]:
        query = ListQuery(
            workspace_id=ws, sort_by="GmtCreateTime", order="ASC", include_config_data=True
        )
        return ws, await client.list_all(query, page_size=page_size)

    return dict(await asyncio.gather(*(one(ws) for ws in workspace_ids)))


@pytest.mark.slow
async def test_acceptance_20000_experiments_with_faults_and_throttling() -> None:
    """DESIGN.md's acceptance check: 20,000 experiments in 4 workspaces, 20 % faults, an
    upstream limit of 25 requests/s under a client configured for 100: every workspace's
    listing holds each experiment exactly once and equals the truth, field by field."""
    options = SimOptions(experiments=20_000, workspaces=4, fault_rate=0.2, max_qps=25, seed=7)
    async with Simulator(options) as sim:
        workspaces = list(sim.world.workspace_ids)
        assert len(workspaces) == 4
        async with make_client(sim.base_url, max_qps=100.0, max_concurrency=8) as client:
            started = time.monotonic()
            listings = await list_workspaces(client, workspaces)
            elapsed_s = time.monotonic() - started
            stats = client.stats
        total = 0
        for ws, listing in listings.items():
            assert listing.complete and listing.consistent, (ws, listing.error)
            assert listing.duplicates == 0 and listing.skipped == 0
            truth = sim.world.truth(ws)
            ids = [e["ExperimentId"] for e in listing.experiments]
            assert len(ids) == len(set(ids)) == len(truth)  # each exactly once
            assert_same_records(normalised(listing.experiments), normalised(truth))
            total += len(truth)
        assert total == 20_000
        assert sum(sim.stats.faults.values()) > 0 and sim.stats.throttled > 0
        assert stats.by_code["OK"] == 200
        print(
            f"acceptance: 200 pages in {elapsed_s:.1f}s, {stats.api_calls} calls, "
            f"{stats.throttled} throttled, faults {dict(sim.stats.faults)}"
        )


def sdk_client(port: int, secret: str = DEFAULT_ACCESS_KEY_SECRET) -> Any:
    from alibabacloud_paiautoml20220828.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    return Client(
        open_api_models.Config(
            access_key_id=DEFAULT_ACCESS_KEY_ID,
            access_key_secret=secret,
            endpoint=f"127.0.0.1:{port}",
            protocol="http",
        )
    )


def sdk_list_all(client: Any, workspace_id: str) -> list[dict[str, Any]]:
    """The plain loop a user of the official SDK writes."""
    from alibabacloud_paiautoml20220828.models import ListHpoExperimentsRequest

    out: list[dict[str, Any]] = []
    for number in itertools.count(1):
        request = ListHpoExperimentsRequest(
            workspace_id=workspace_id,
            page_number=number,
            page_size=100,
            sort_by="GmtCreateTime",
            order="ASC",
            include_config_data="True",
        )
        body = client.list_hpo_experiments(request).body
        out.extend(item.to_map() for item in body.experiments or [])
        if not body.experiments or number * 100 >= body.total_count:
            return out
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.mark.slow
async def test_official_sdk_lists_the_same_20000() -> None:
    from alibabacloud_tea_openapi.exceptions import ClientException

    async with Simulator(SimOptions(experiments=20_000, workspaces=4, seed=7)) as sim:
        workspaces = list(sim.world.workspace_ids)
        async with make_client(sim.base_url, max_concurrency=8) as client:
            ours = await list_workspaces(client, workspaces)
        sdk = sdk_client(sim.port)
        seen = 0
        for ws in workspaces:
            theirs = normalised(await asyncio.to_thread(sdk_list_all, sdk, ws))
            mine = normalised(ours[ws].experiments)
            truth = normalised(sim.world.truth(ws))
            assert_same_records(mine, truth)
            # the SDK's response model has no Tags field: compare everything else
            assert_same_records(theirs, mine, skip=("tags",))
            seen += len(theirs)
        assert seen == 20_000

        with pytest.raises(ClientException) as info:
            await asyncio.to_thread(sdk_list_all, sdk_client(sim.port, "wrong"), workspaces[0])
        assert info.value.code == "SignatureDoesNotMatch"


@pytest.mark.slow
async def test_adaptive_limit_finds_the_upstream_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """Upstream allows 10 requests/s; the client is configured for 100 with 8 in flight."""
    limit_qps = 10.0
    page_size = 50
    pages = 300
    options = SimOptions(
        experiments=pages * page_size, workspaces=1, max_qps=limit_qps, latency_ms=20, seed=11
    )
    async with Simulator(options) as sim:
        (ws,) = sim.world.workspace_ids
        async with make_client(
            sim.base_url, max_qps=100.0, max_concurrency=8, page_size=page_size
        ) as client:
            started = time.monotonic()
            listing = await client.list_all(ListQuery(workspace_id=ws, order="ASC"))
            elapsed_s = time.monotonic() - started
            throttled = client.stats.throttled
            rate = client.limiter_rate
        assert listing.complete and listing.consistent
        assert listing.seen_ids == {e["ExperimentId"] for e in sim.world.truth(ws)}
        achieved = pages / elapsed_s
        with capsys.disabled():
            print(
                f"\nadaptive limit: {pages} pages in {elapsed_s:.1f}s = {achieved:.2f} pages/s "
                f"against an upstream limit of {limit_qps:g}/s ({achieved / limit_qps:.0%}); "
                f"throttled {throttled} ({throttled / pages:.1%} of pages); "
                f"limiter ends at {rate:.2f}/s"
            )
        assert throttled <= 0.25 * pages
        assert achieved >= 0.6 * limit_qps


Rows = list[dict[str, Any]]


async def _list_all_from(
    rows: Rows,
    arrange: Callable[[dict[str, str], Rows], Rows],
    query: ListQuery,
    size: int,
    *,
    max_page_size: int = 1000,
) -> Listing:
    """``list_all(query)`` against a server holding ``rows``, which filters them by create
    time as upstream does and lets ``arrange(query string, rows)`` order each query's. It
    pages by at most ``max_page_size`` rows, whatever the size asked."""

    async def answer(request: web.Request) -> web.Response:
        q = dict(request.query)
        lo, hi = parse_time(q.get("MinCreateTime")), parse_time(q.get("MaxCreateTime"))
        chosen = arrange(
            q,
            [
                r
                for r in rows
                if (lo is None or lo <= (parse_time(r["GmtCreateTime"]) or lo))
                and (hi is None or hi >= (parse_time(r["GmtCreateTime"]) or hi))
            ],
        )
        number, page_size = int(q.get("PageNumber", "1")), int(q.get("PageSize", "100"))
        page_size = min(page_size, max_page_size)
        page = chosen[(number - 1) * page_size : number * page_size]
        return web.json_response({"RequestId": "r", "TotalCount": len(chosen), "Experiments": page})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner, port = await serve(app)
    try:
        async with make_client(f"http://127.0.0.1:{port}") as client:
            return await client.list_all(query, page_size=size)
    finally:
        await runner.cleanup()


def _rows_a_second_apart(n: int) -> Rows:
    return [
        {"ExperimentId": f"e{i:03d}", "GmtCreateTime": f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}Z"}
        for i in range(n)
    ]


def _tie_order(
    tie: str, windows: list[dict[str, str]], *, stable_windows: bool = False
) -> Callable[[dict[str, str], Rows], Rows]:
    """An ``arrange`` for :func:`_list_all_from`: every query orders the rows of create time
    ``tie`` its own way (the same query, the same way), as MySQL's ``ORDER BY … LIMIT`` may.
    The queries of a tie's window (with MaxCreateTime) are recorded in ``windows``; with
    ``stable_windows`` they keep one order for all their pages."""
    import random

    def arrange(q: dict[str, str], chosen: Rows) -> Rows:
        if "MaxCreateTime" in q:
            windows.append(q)
            if stable_windows:
                return chosen
        tied = [r for r in chosen if r["GmtCreateTime"] == tie]
        random.Random(repr(sorted(q.items()))).shuffle(tied)
        before = [r for r in chosen if r["GmtCreateTime"] < tie]
        return [*before, *tied, *(r for r in chosen if r["GmtCreateTime"] > tie)]

    return arrange


@pytest.mark.parametrize("formats", ["one", "both"])
async def test_rows_of_one_create_time_that_straddle_pages_are_read_once_more(
    formats: str,
) -> None:
    """A database ordering equal create times differently from one query to the next
    (MySQL's ORDER BY … LIMIT): six experiments share a create time across the boundary of
    pages 1 and 2, and each page's query orders them so that one shows on neither. The
    listing falls one short of its count; that create time is read again on its own, and
    the listing ends whole (and consistent). Also when the tie's rows give that time in
    both documented formats (page 1 ends on one, page 2 starts with the other)."""
    rows = _rows_a_second_apart(150)
    tie = "2024-01-01T00:01:37Z"
    for i in range(97, 103):  # e097 … e102: the last 3 of page 1, the first 3 of page 2
        rows[i]["GmtCreateTime"] = tie
        if formats == "both" and i in (99, 100):  # page 1 ends with e099, page 2 starts
            rows[i]["GmtCreateTime"] = "2024-01-01 00:01:37"  # with e097 (see below)
    queries: list[dict[str, str]] = []

    def arrange(q: dict[str, str], chosen: Rows) -> Rows:
        queries.append(q)
        if "MinCreateTime" not in q and q.get("PageNumber") == "2":
            # this query orders the tie e099 e101 e102 | e097 e098 e100: page 2 starts with
            # two rows page 1 showed already, and e101 and e102 show on neither page
            g = rows[97:103]
            return [*rows[:97], g[2], g[4], g[5], g[0], g[1], g[3], *rows[103:]]
        return chosen

    listing = await _list_all_from(rows, arrange, ListQuery(workspace_id="w"), 100)
    assert listing.complete and listing.consistent
    assert listing.seen_ids == {r["ExperimentId"] for r in rows}
    windows = [q for q in queries if "MinCreateTime" in q]
    assert len(windows) == 1 and windows[0]["MinCreateTime"] < tie.replace("T", " ")


async def test_ties_at_more_than_twenty_page_boundaries_are_all_read_again() -> None:
    """A workspace of batches created within a second: a tie straddles 30 of a listing's
    59 page boundaries, each query ordering ties its own way. Capped at 20 tie windows, the
    rows the later ties lost were lost in every reading: a baseline never held."""
    import random

    rows = _rows_a_second_apart(600)
    for boundary in range(1, 60, 2):  # 30 boundaries: rows 10k-2 … 10k+1 share a second
        tie = rows[boundary * 10 - 2]["GmtCreateTime"]
        for i in range(boundary * 10 - 1, boundary * 10 + 2):
            rows[i]["GmtCreateTime"] = tie

    def arrange(q: dict[str, str], chosen: Rows) -> Rows:
        if "MaxCreateTime" in q:
            return chosen  # (a window: one order for all its pages)
        rng = random.Random(repr(sorted(q.items())))
        groups: dict[str, Rows] = {}
        for r in chosen:
            groups.setdefault(r["GmtCreateTime"], []).append(r)
        for group in groups.values():
            rng.shuffle(group)
        return [r for t in sorted(groups) for r in groups[t]]

    listing = await _list_all_from(rows, arrange, ListQuery(workspace_id="w"), 10)
    assert listing.complete and listing.consistent
    assert listing.seen_ids == {r["ExperimentId"] for r in rows}


@pytest.mark.parametrize("since", [None, datetime(2024, 1, 1, 0, 0, 3, tzinfo=UTC)])
async def test_a_tie_larger_than_a_page_is_read_again_in_one_page(since: datetime | None) -> None:
    """25 experiments of one create time (a batch submitted at once) at a page size of 10,
    each page's query ordering them its own way: rows fall between pages, and the tie's own
    window, read in pages of 10, would lose some again. It is read in pages of at least
    100 (upstream's default), one page that nothing can fall between: the listing ends
    whole. So does a hot sweep's listing of what was created ``since`` a time."""
    rows = _rows_a_second_apart(40)
    tie = "2024-01-01T00:00:05Z"
    for i in range(5, 30):
        rows[i]["GmtCreateTime"] = tie
    windows: list[dict[str, str]] = []
    query = ListQuery(workspace_id="w", min_create_time=since)
    listing = await _list_all_from(rows, _tie_order(tie, windows), query, 10)
    assert listing.complete and listing.consistent
    first = 3 if since else 0  # e003's create time onwards
    assert listing.seen_ids == {r["ExperimentId"] for r in rows[first:]}
    assert [q["PageSize"] for q in windows] == ["100"]  # the tie's, at the larger page size


async def test_a_tie_larger_than_the_tie_window_page_is_read_in_one_page_of_its_count() -> None:
    """150 experiments of one create time (a batch of hundreds submitted at once) at the
    default page size of 100, each query ordering them its own way: the tie's window, read
    in pages of 100, would lose rows in the same way every time. Its count says 150, so it
    is read once more as one page of 150, which nothing can fall between."""
    rows = _rows_a_second_apart(260)
    tie = "2024-01-01T00:00:50Z"
    for i in range(50, 200):
        rows[i]["GmtCreateTime"] = tie
    windows: list[dict[str, str]] = []
    listing = await _list_all_from(rows, _tie_order(tie, windows), ListQuery(workspace_id="w"), 100)
    assert listing.complete and listing.consistent
    assert listing.seen_ids == {r["ExperimentId"] for r in rows}
    assert [q["PageSize"] for q in windows] == [
        "100",
        "151",
    ]  # its window (the tie and the row a second before) at once


async def test_a_tie_window_of_a_server_that_caps_the_page_size_is_read_page_by_page() -> None:
    """80 experiments of one create time, which the listing's pages of 30 order each their
    own way; the tie's window asks for 100 a page, and this server gives 50 at most: the
    window's count says there is more, and its next page is read too (the window's own
    order is stable here), so the listing ends whole."""
    rows = _rows_a_second_apart(120)
    tie = "2024-01-01T00:00:20Z"
    for i in range(20, 100):
        rows[i]["GmtCreateTime"] = tie
    windows: list[dict[str, str]] = []
    arrange = _tie_order(tie, windows, stable_windows=True)
    listing = await _list_all_from(rows, arrange, ListQuery(workspace_id="w"), 30, max_page_size=50)
    assert listing.complete and listing.consistent
    assert listing.seen_ids == {r["ExperimentId"] for r in rows}
    assert ("2", "100") in [(q["PageNumber"], q["PageSize"]) for q in windows]


async def test_a_bounded_listing_that_does_not_add_up_is_read_again_as_one_page() -> None:
    """A look-up's listing (a create-time window, so no tie windows) of 149 experiments of
    one create time, each query ordering them its own way: its two pages of 100 lose rows
    between them, the same way every time. Its count says 149, so it is read once more as
    one page of 149, which nothing can fall between: the listing adds up."""
    import random

    rows = _rows_a_second_apart(149)
    tie = "2024-01-01T00:00:30Z"
    for r in rows:
        r["GmtCreateTime"] = tie
    sizes: list[str] = []

    def arrange(q: dict[str, str], chosen: Rows) -> Rows:
        sizes.append(q["PageSize"])
        shuffled = list(chosen)
        random.Random(repr(sorted(q.items()))).shuffle(shuffled)
        return shuffled

    at = datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC)
    query = ListQuery(
        workspace_id="w",
        min_create_time=at - timedelta(hours=1),
        max_create_time=at + timedelta(hours=1),
    )
    listing = await _list_all_from(rows, arrange, query, 100)
    assert listing.complete and listing.consistent
    assert listing.seen_ids == {r["ExperimentId"] for r in rows}
    assert sizes == ["100", "100", "149"]


async def test_calls_leave_no_reference_cycles_behind(capture: Capture) -> None:
    """A full sweep runs the cyclic collector rarely (sync._full_sweep_gc): what a call leaves
    in reference cycles (tenacity's per-call state) would pile up, ~7 MB per 1,000 pages.
    Retried calls, refused ones and ones given up on included."""

    async def calls(client: UpstreamClient) -> None:
        await client.list_page(ListQuery(), 1)
        capture.script.append(RETRYABLE["503"])
        await client.list_page(ListQuery(), 1)  # answered on the second attempt
        capture.script.append(api_error(400, "Forbidden.RAM"))
        with pytest.raises(HpoSyncError):
            await client.list_page(ListQuery(), 1)  # refused: not retried
        capture.script.extend([RETRYABLE["503"]] * 2)
        with pytest.raises(RetriesExhaustedError):
            await client.list_page(ListQuery(), 1)  # given up after its retries

    async with make_client(capture.base_url, retry_max_attempts=2) as client:
        await calls(client)  # what a first call sets up once is not garbage
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await calls(client)
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    tenacity_types = {
        "AsyncRetrying", "AttemptManager", "RetryCallState", "IterState", "Future",
        "Condition", "RLock", "retry_if_exception_type", "ClientResponse",
    }  # fmt: skip
    assert not tenacity_types & set(left), sorted(set(left))


async def test_a_server_that_answers_page_1_to_every_page_number_is_read_as_one_page(
    capture: Capture,
) -> None:
    """PageNumber ignored, an honest count: page 2 is page 1 again. That listing used to end
    "complete" with page 1's rows alone (a baseline of 10 experiments of 45, every later
    sweep "ok", the rest never mirrored). One page of the count reads them all."""
    capture.experiments = [{"ExperimentId": f"e{i:02d}"} for i in range(45)]
    capture.ignore_page_number = True
    async with make_client(capture.base_url) as client:
        with capture_logs() as logs:
            listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
        assert client.stats.api_calls == 6  # pages 1-5, then one page of 45
    assert listing.complete and listing.consistent and len(listing.seen_ids) == 45
    assert [e["event"] for e in logs].count("upstream.page_number_ignored") == 1


async def test_a_server_that_answers_page_1_to_every_page_number_past_one_page_is_incomplete(
    capture: Capture,
) -> None:
    """The same server with more experiments than one page may hold (1,000): what lies
    past that cannot be reached, and the listing says so (a full sweep then deletes nothing
    and records a partial run)."""
    capture.experiments = [{"ExperimentId": f"e{i:04d}"} for i in range(1500)]
    capture.ignore_page_number = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert not listing.complete and listing.error is not None
    assert listing.error.code == "PageNumberIgnored" and "TotalCount of 1500" in str(listing.error)
    assert len(listing.seen_ids) == 1000


async def test_page_1_past_the_end_under_a_count_that_is_off_is_still_the_listing(
    capture: Capture,
) -> None:
    """Page 2 equal to page 1 from a server that answers a page number past the end with
    page 1, under a count too high (one taking in soft-deleted rows): one page of the count
    holds page 1's rows only, so that is the listing, complete and not adding up, as
    before; no warning about page numbers."""
    capture.experiments = [{"ExperimentId": f"e{i:02d}"} for i in range(10)]
    capture.first_page_past_end = True
    capture.total_count = 25
    async with make_client(capture.base_url) as client:
        with capture_logs() as logs:
            listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
    assert listing.complete and not listing.consistent and listing.error is None
    assert len(listing.seen_ids) == 10
    assert "upstream.page_number_ignored" not in {e["event"] for e in logs}


@pytest.mark.parametrize("rows", [None, "missing", []])
async def test_page_1_without_rows_under_a_positive_count(capture: Capture, rows: Any) -> None:
    """``Experiments: null`` (or no member at all) on page 1 under a TotalCount of 3: an
    answer that lost its rows, or a count of rows the listing leaves out. The listing says
    so (``rows_missing``): a look-up must not take it for proof of absence (a glitch that
    answered so for a whole sweep marked a workspace deleted). ``[]`` is an empty page."""
    capture.experiments = [{"ExperimentId": f"e{i}"} for i in range(3)]

    async def lost(request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = {"RequestId": "r", "TotalCount": 3}
        if rows != "missing":
            body["Experiments"] = rows
        return web.json_response(body)

    capture.script.append(lost)
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
    assert listing.complete and not listing.consistent and len(listing.seen_ids) == 0
    assert listing.rows_missing == (rows != [])


async def test_page_1_again_with_a_record_without_an_id_is_still_found_out(
    capture: Capture,
) -> None:
    """Page 2 repeats page 1, one record of which has no readable ExperimentId: the
    repeat is judged by the ids it can read, on both pages."""
    capture.experiments = [{"ExperimentId": f"e{i:02d}"} for i in range(45)]
    capture.experiments[3] = {"Name": "no id"}
    capture.ignore_page_number = True
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=10)
    assert listing.complete and len(listing.seen_ids) == 44 and listing.skipped


async def test_page_1_again_from_a_server_that_also_caps_the_page_size_is_incomplete(
    capture: Capture,
) -> None:
    """PageNumber ignored and PageSize capped at 100: one page of the count holds no more
    than page 1 did, as a listing whose count is off would. Page 2 of one row tells them
    apart (here: page 1's first row again), and the listing stays incomplete rather than
    page 1 alone taken for the workspace."""
    capture.experiments = [{"ExperimentId": f"e{i:03d}"} for i in range(450)]
    capture.ignore_page_number = True
    capture.max_page_size = 100
    async with make_client(capture.base_url) as client:
        listing = await client.list_all(ListQuery(workspace_id="w1"), page_size=100)
    assert not listing.complete and listing.error is not None
    assert listing.error.code == "PageNumberIgnored"


async def test_an_answer_past_the_size_limit_is_refused_not_read_whole(capture: Capture) -> None:
    """A gzip body that expands a thousandfold (here 1 MiB of gzip, 96 MiB inflated) was
    read whole, decompressed: gigabytes of memory, a MemoryError from a body that never
    ends. Past MAX_RESPONSE_BYTES the answer is refused, once, as no PAI answer."""
    from hpo_sync.client import MAX_RESPONSE_BYTES

    inflated = MAX_RESPONSE_BYTES + 32 * 2**20
    packed = gzip.compress(b"{" + b" " * inflated, compresslevel=9)

    async def bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    capture.script.extend([bomb] * 3)
    async with make_client(capture.base_url, retry_max_attempts=3) as client:
        with pytest.raises(FatalUpstreamError) as failed:
            await client.list_page(ListQuery(), 1)
        assert client.stats.api_calls == 1
    assert failed.value.code == "ResponseTooLarge"
    # (a real page can be that large too: experiments with megabytes of config text each)
    assert "lower upstream.page_size" in (failed.value.hint or "")


async def test_an_answer_that_never_ends_is_refused_at_the_size_limit(capture: Capture) -> None:
    """A chunked body that never ends (it raised MemoryError, gigabytes later)."""

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"Experiments": [')
        chunk = b'{"ExperimentId": "e"}, ' * 40_000
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(chunk)
        return resp

    capture.script.append(endless)
    async with make_client(capture.base_url) as client:
        with pytest.raises(FatalUpstreamError) as failed:
            await client.list_page(ListQuery(), 1)
    assert failed.value.code == "ResponseTooLarge"


@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_after_given_as_an_http_date_is_waited_for(
    capture: Capture, status: int
) -> None:
    """`Retry-After: <HTTP date>` (RFC 9110's other form) was ignored: a throttled page went
    again at once, 32 times in 105 s where the server asked for a few. It is the wait
    until that date now."""
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    code = "Throttling.User" if status == 429 else "ServiceUnavailable"
    capture.script.append(api_error(status, code, headers={"Retry-After": when}))
    async with make_client(capture.base_url, retry_max_total_s=30.0) as client:
        page = await client.list_page(ListQuery(), 1)
    assert len(page.experiments) == 3
    first, second = capture.seen[0].at, capture.seen[1].at
    assert second - first >= 1.5  # (the date has whole seconds: 2-3 s from the answer)


@pytest.mark.parametrize(
    "code", ["THROTTLING", "throttling.user", "ThrottlingException", "Throttled", "TooManyRequests"]
)
async def test_throttling_in_other_spellings_is_throttling(capture: Capture, code: str) -> None:
    """Gateways spell it their own way, at HTTP 400: each failed the sweep as a fatal
    error. They are throttling: waited for, and asked again."""
    capture.script.append(api_error(400, code))
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert client.stats.throttled == 1
    assert len(page.experiments) == 3


async def test_an_answer_that_gives_a_deciding_member_twice_is_no_listing(
    capture: Capture,
) -> None:
    """The listing followed by `"Experiments": [], "TotalCount": 0` in the same object: any
    JSON parser keeps the last, an empty listing, and a full sweep marked the workspace
    deleted. An answer that says two things is malformed (asked again)."""
    rows = json.dumps(capture.experiments)

    async def twice(request: web.Request) -> web.StreamResponse:
        text = f'{{"RequestId": "r", "TotalCount": 3, "Experiments": {rows}, '
        text += '"Experiments": [], "TotalCount": 0}'
        return web.Response(text=text, content_type="application/json")

    capture.script.append(twice)
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert client.stats.by_code.get("MalformedBody") == 1
    assert page.total_count == 3 and len(page.experiments) == 3


async def test_a_name_holding_a_member_s_name_is_no_duplicate(capture: Capture) -> None:
    capture.experiments = [{"ExperimentId": "e1", "Name": '"Experiments": [] "TotalCount"'}]
    async with make_client(capture.base_url) as client:
        page = await client.list_page(ListQuery(), 1)
        assert client.stats.api_calls == 1
    assert page.experiments[0]["Name"] == '"Experiments": [] "TotalCount"'


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_fatal_and_says_where_to(capture: Capture, status: int) -> None:
    """An http:// endpoint the gateway sends to https://: asked 8 times every sweep as a
    5xx would be, with a message that did not say where it pointed. Fatal at once, naming
    the target without its query."""

    async def moved(request: web.Request) -> web.StreamResponse:
        target = "https://pai.example.com/api/v1/automl/hpo/experiments?secret=x"
        return web.Response(status=status, headers={"Location": target}, text="moved")

    capture.script.append(moved)
    async with make_client(capture.base_url) as client:
        with pytest.raises(FatalUpstreamError) as failed:
            await client.list_page(ListQuery(), 1)
        assert client.stats.api_calls == 1
    assert "redirects to https://pai.example.com/api/v1/automl/hpo/experiments" in str(failed.value)
    assert "secret" not in str(failed.value)


async def test_an_upstream_message_is_one_printable_line_of_bounded_length(
    capture: Capture,
) -> None:
    """An upstream's Message with line breaks, a terminal's escape sequences and 5,000
    characters reached the summary line (ESC[2J cleared the terminal) and sync_runs.error
    whole."""
    message = "line1\nline2\r\n\x1b[2J\x1b[31mred" + "Z" * 5000

    async def noisy(request: web.Request) -> web.StreamResponse:
        body = {"RequestId": "r\n" + "R" * 500, "Code": "Forbidden.RAM", "Message": message}
        return web.json_response(body, status=403)

    capture.script.append(noisy)
    async with make_client(capture.base_url) as client:
        with pytest.raises(FatalUpstreamError) as failed:
            await client.list_page(ListQuery(), 1)
    text = str(failed.value)
    assert text.isprintable() and "\x1b" not in text and "\n" not in text
    assert "line1 line2  \\x1b[2J\\x1b[31mred" in text
    assert len(text) < 1000 and "…" in text
