"""The simulator as a real aiohttp server: ``GET /api/automl/v1/hpo/experiments`` behind a
gateway that checks ACS3-HMAC-SHA256 signatures, throttles per AccessKeyId, injects faults
and drifts types, plus a small loopback-only control API under ``/_sim/``.

Gateway checks run in this order: Authorization present and well-formed, AccessKeyId known,
``x-acs-date`` within 15 minutes of the *wall* clock, body hash, signature, nonce unused,
STS token, action and version; then flow control, then fault injection, then the query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import random
import ssl
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, unquote_plus
from zoneinfo import ZoneInfo

from aiohttp import web

from hpo_sync import signing
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.drift import drift_experiment
from hpo_sync.sim.world import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, InvalidInputError, World

API_PATH: Final = "/api/automl/v1/hpo/experiments"
ACTION: Final = "ListHpoExperiments"
VERSION: Final = "2022-08-28"
PRODUCT_HOST: Final = "paiautoml.cn-hangzhou.aliyuncs.com"
FAULT_KINDS: Final = ("internal_error", "service_unavailable", "truncated", "reset")
MAX_SKEW_S: Final = 15 * 60
NONCE_TTL_S: Final = 15 * 60
MAX_NONCES: Final = 200_000
_REQUIRED_SIGNED: Final = ("host", "x-acs-date", "x-acs-signature-nonce")
_RATE_WINDOW_S: Final = 10.0
_MAX_EVENTS_RETURNED: Final = 10_000
_TICK_S: Final = 0.2
_CONFIG_FIELDS: Final = ("SearchSpace", "ConfigIni", "ConfigYml")
# What json.dumps(obj, ensure_ascii=False) uses, made once rather than per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False)


@dataclass(frozen=True)
class StsToken:
    """A security token that must accompany an AccessKeyId (STS credentials)."""

    token: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class SimOptions:
    """Everything the simulator can be told at start; frozen. Runtime changes go through
    :meth:`Simulator.configure` (or ``POST /_sim/config``)."""

    host: str = "127.0.0.1"
    port: int = 0
    experiments: int = 2000
    workspaces: int = 3
    active_fraction: float = 0.05
    latency_ms: float = 0.0
    max_qps: float | None = None
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    speed: float = 0.0
    drift: bool = True
    bump_modified: bool = True
    credentials: Mapping[str, str] = field(
        default_factory=lambda: {DEFAULT_ACCESS_KEY_ID: DEFAULT_ACCESS_KEY_SECRET}
    )
    sts_tokens: Mapping[str, StsToken | str] = field(default_factory=dict)
    time_zone: str = "UTC"
    start_time: datetime | None = None  # None: the wall clock when the Simulator is made
    default_page_size: int = DEFAULT_PAGE_SIZE
    max_page_size: int = MAX_PAGE_SIZE
    create_per_min: float | None = None  # None: scaled with the world (see World)
    delete_per_min: float | None = None
    restart_per_min: float | None = None
    # The official SDKs send spaces as '+' (urlencode / URLEncoder) while signing '%20', so
    # the gateway must read '+' as a space; False reads '+' literally (urllib's unquote).
    query_plus_as_space: bool = True
    # Workspaces these credentials may not list (a RAM policy that denies them): answered
    # with 403 Forbidden.RAM, as the gateway does.
    forbidden_workspaces: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_runtime(
            fault_rate=self.fault_rate,
            fault_kinds=self.fault_kinds,
            max_qps=self.max_qps,
            latency_ms=self.latency_ms,
            speed=self.speed,
        )
        if self.experiments < 0 or self.workspaces < 1:
            raise ValueError("experiments must be >= 0 and workspaces >= 1")
        _zone(self.time_zone)
        if self.start_time is not None and self.start_time.tzinfo is None:
            raise ValueError("start_time must be timezone-aware")


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError on odd keys
        raise ValueError(f"unknown time zone {name!r}") from exc


def _check_runtime(
    *,
    fault_rate: float,
    fault_kinds: tuple[str, ...],
    max_qps: float | None,
    latency_ms: float,
    speed: float,
) -> None:
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError("fault_rate must be within [0, 1]")
    unknown = set(fault_kinds) - set(FAULT_KINDS)
    if unknown or not fault_kinds:
        raise ValueError(f"fault_kinds must be a non-empty subset of {', '.join(FAULT_KINDS)}")
    if max_qps is not None and max_qps < 0:
        raise ValueError("max_qps must be >= 0 (0 or None: unlimited)")
    if latency_ms < 0:
        raise ValueError("latency_ms must be >= 0")
    if speed < 0:
        raise ValueError("speed must be >= 0")


@dataclass
class RuntimeConfig:
    """What can change while the simulator runs."""

    fault_rate: float
    fault_kinds: tuple[str, ...]
    max_qps: float | None
    latency_ms: float
    drift: bool
    speed: float


class SimStats:
    """Request counters of the API (not of the control API)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.by_code: Counter[str] = Counter()
        self.throttled = 0
        self.faults: Counter[str] = Counter()
        self.signature_failures = 0
        self.events_applied = 0
        self.since = self._clock()
        self._recent: deque[float] = deque()

    def record(self, status: int, code: str | None) -> None:
        now = self._clock()
        self.requests += 1
        self.by_status[str(status)] += 1
        if code:
            self.by_code[code] += 1
        self._recent.append(now)
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    def requests_per_s(self) -> float:
        now = self._clock()
        self._prune(now)
        window = min(_RATE_WINDOW_S, max(now - self.since, 1e-3))
        return len(self._recent) / window

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_code": dict(self.by_code),
            "throttled": self.throttled,
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "signature_failures": self.signature_failures,
            "events_applied": self.events_applied,
            "requests_per_s": round(self.requests_per_s(), 3),
            "since": datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message


class _Bucket:
    """Token bucket: ``rate`` tokens a second, holding at most one second's worth."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = max(1.0, rate)
        self.last = now

    def take(self, now: float, rate: float) -> float:
        """Take a token; 0.0 on success, else the seconds until one is available."""
        capacity = max(1.0, rate)
        self.tokens = min(capacity, self.tokens + (now - self.last) * rate)
        self.last = now
        self.rate = rate
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class Simulator:
    """The ListHpoExperiments simulator. ``async with Simulator(opts) as sim:`` starts it
    on ``sim.base_url``; ``sim.world`` is the model behind it."""

    def __init__(
        self,
        options: SimOptions | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        world: World | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.options = options or SimOptions()
        # Serve HTTPS with this context (the tests of TLS and of proxy tunnels), else HTTP.
        self._ssl_context = ssl_context
        opts = self.options
        self._clock = wall_clock
        self.time_zone = _zone(opts.time_zone)
        start = opts.start_time or datetime.fromtimestamp(int(wall_clock()), UTC)
        self.world = world or World(
            seed=opts.seed,
            experiments=opts.experiments,
            workspaces=opts.workspaces,
            active_fraction=opts.active_fraction,
            start_time=start,
            bump_modified=opts.bump_modified,
            create_per_min=opts.create_per_min,
            delete_per_min=opts.delete_per_min,
            restart_per_min=opts.restart_per_min,
            time_zone=self.time_zone,
            default_page_size=opts.default_page_size,
            max_page_size=opts.max_page_size,
        )
        self.config = RuntimeConfig(
            fault_rate=opts.fault_rate,
            fault_kinds=tuple(opts.fault_kinds),
            max_qps=opts.max_qps,
            latency_ms=opts.latency_ms,
            drift=opts.drift,
            speed=opts.speed,
        )
        self.stats = SimStats(wall_clock)
        self._credentials = dict(opts.credentials)
        self._sts = {
            ak: tok if isinstance(tok, StsToken) else StsToken(tok)
            for ak, tok in opts.sts_tokens.items()
        }
        self._fault_rng = random.Random(opts.seed + 1)
        self._throttle_rng = random.Random(opts.seed + 2)
        self._drift_rng = random.Random(opts.seed + 3)
        # experiment id -> (its config texts, their encoded JSON members); see _page_json
        self._config_json: dict[str, tuple[tuple[str, str, str], str]] = {}
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._buckets: dict[str, _Bucket] = {}
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.base_url = ""
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Start serving; returns the base URL ``http://HOST:PORT`` (``https://`` with an
        SSL context)."""
        if self._runner is not None:
            return self.base_url
        app = web.Application()
        app.router.add_post("/_sim/advance", self._ctl_advance)
        app.router.add_get("/_sim/truth", self._ctl_truth)
        app.router.add_get("/_sim/config", self._ctl_get_config)
        app.router.add_post("/_sim/config", self._ctl_config)
        app.router.add_post("/_sim/mutate", self._ctl_mutate)
        app.router.add_get("/_sim/stats", self._ctl_stats)
        app.router.add_post("/_sim/stats/reset", self._ctl_stats_reset)
        app.router.add_route("*", "/{tail:.*}", self._api)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(
            runner, self.options.host, self.options.port, ssl_context=self._ssl_context
        )
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = int(port)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        scheme = "https" if self._ssl_context else "http"
        self.base_url = f"{scheme}://{shown}:{self.port}"
        self._ticker = asyncio.create_task(self._run_clock())
        return self.base_url

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(_TICK_S)
            now = loop.time()
            elapsed, last = now - last, now
            if self.config.speed > 0:
                events = self.world.advance(elapsed * self.config.speed)
                self.stats.events_applied += len(events)

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change runtime settings: fault_rate, fault_kinds, max_qps, latency_ms, drift,
        bump_modified, speed. Returns the current settings. Raises ValueError."""
        allowed = {f for f in asdict(self.config)} | {"bump_modified"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        bump = changes.pop("bump_modified", None)
        if "fault_kinds" in changes:
            changes["fault_kinds"] = tuple(changes["fault_kinds"])
        if changes.get("max_qps") == 0:
            changes["max_qps"] = None
        for key in ("fault_rate", "latency_ms", "speed"):
            if key in changes:
                changes[key] = float(changes[key])
        if changes.get("max_qps") is not None:
            changes["max_qps"] = float(changes["max_qps"])
        if "drift" in changes and not isinstance(changes["drift"], bool):
            raise ValueError("drift must be true or false")
        if bump is not None and not isinstance(bump, bool):
            raise ValueError("bump_modified must be true or false")
        new = replace(self.config, **changes)
        _check_runtime(
            fault_rate=new.fault_rate,
            fault_kinds=new.fault_kinds,
            max_qps=new.max_qps,
            latency_ms=new.latency_ms,
            speed=new.speed,
        )
        self.config = new
        if bump is not None:
            self.world.bump_modified = bump
        return self.settings()

    def settings(self) -> dict[str, Any]:
        out = asdict(self.config)
        out["fault_kinds"] = list(self.config.fault_kinds)
        out["bump_modified"] = self.world.bump_modified
        return out

    # ------------------------------------------------------------------ the API

    def _error(
        self,
        request: web.Request,
        status: int,
        code: str,
        message: str,
        request_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body = {
            "RequestId": request_id,
            "Code": code,
            "Message": message,
            "HostId": request.headers.get("Host", PRODUCT_HOST),
            "Recommend": (
                f"https://api.aliyun.com/troubleshoot?q={code}"
                f"&product=PaiAutoML&requestId={request_id}"
            ),
        }
        resp = web.json_response(body, status=status, headers=dict(headers or {}))
        resp.headers["x-acs-request-id"] = request_id
        return resp

    def _decode(self, text: str) -> str:
        return unquote_plus(text) if self.options.query_plus_as_space else unquote(text)

    def _raw_query(self, raw_query: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in raw_query.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            out[self._decode(name)] = self._decode(value)
        return out

    def _authenticate(
        self, request: web.Request, path: str, query: Mapping[str, str], body: bytes
    ) -> str:
        """The gateway's checks; returns the AccessKeyId or raises _Reject."""
        auth = request.headers.get("Authorization")
        parsed = signing.parse_authorization(auth) if auth else None
        if parsed is None or not parsed.access_key_id or not parsed.signature:
            raise _Reject(
                400,
                "IncompleteSignature",
                "The request signature does not conform to Aliyun standards.",
            )
        # Every x-acs-* header sent must be signed (the gateway's rule): a security token
        # left out of SignedHeaders was taken, so a client that stopped signing it would
        # have passed every test against the simulator.
        sent_acs = sorted(
            name.lower() for name in request.headers if name.lower().startswith("x-acs-")
        )
        missing = [
            h
            for h in dict.fromkeys([*_REQUIRED_SIGNED, *sent_acs])
            if h not in parsed.signed_headers
        ]
        if missing:
            raise _Reject(
                400,
                "IncompleteSignature",
                "The request signature does not conform to Aliyun standards. "
                f"SignedHeaders must include {', '.join(missing)}.",
            )
        secret = self._credentials.get(parsed.access_key_id)
        if secret is None:
            raise _Reject(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        date = request.headers.get("x-acs-date", "")
        try:
            sent = datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise _Reject(
                400,
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
            ) from None
        if abs(sent.timestamp() - self._clock()) > MAX_SKEW_S:
            raise _Reject(
                400,
                "InvalidTimeStamp.Expired",
                f"Specified time stamp or date value is expired. x-acs-date {date} is more "
                "than 15 minutes away from the server time.",
            )
        body_sha = hashlib.sha256(body).hexdigest()
        claimed_sha = request.headers.get("x-acs-content-sha256")
        if claimed_sha is not None and claimed_sha.strip().lower() != body_sha:
            raise _Reject(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation. "
                f"x-acs-content-sha256 {claimed_sha} is not the SHA-256 of the request body "
                f"({body_sha}).",
            )
        block = "".join(
            f"{name}:{','.join(sorted(v.strip() for v in request.headers.getall(name, [''])))}\n"
            for name in parsed.signed_headers
        )
        canonical = signing.canonical_request(
            request.method, path, query, block, ";".join(parsed.signed_headers), body_sha
        )
        to_sign = signing.string_to_sign(canonical)
        expected = signing.signature(secret, to_sign)
        if not hmac.compare_digest(expected, parsed.signature.strip().lower()):
            raise _Reject(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation. "
                f"server string to sign is:{to_sign}",
            )
        nonce = request.headers.get("x-acs-signature-nonce", "")
        if not self._remember_nonce(nonce):
            raise _Reject(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
        self._check_sts(parsed.access_key_id, request.headers.get("x-acs-security-token"))
        action = request.headers.get("x-acs-action")
        if action != ACTION:
            raise _Reject(
                404,
                "InvalidAction.NotFound",
                f"Specified api is not found, please check your url and method. "
                f"(x-acs-action {action!r})",
            )
        version = request.headers.get("x-acs-version")
        if version != VERSION:
            raise _Reject(
                400, "InvalidVersion", f"Specified parameter Version {version!r} is not valid."
            )
        return parsed.access_key_id

    @property
    def nonces_remembered(self) -> int:
        """How many nonces the gateway holds (each for 15 minutes, at most MAX_NONCES)."""
        return len(self._nonces)

    def _remember_nonce(self, nonce: str) -> bool:
        now = self._clock()
        while self._nonces:
            oldest, expires = next(iter(self._nonces.items()))
            if expires > now and len(self._nonces) < MAX_NONCES:
                break
            del self._nonces[oldest]
        if not nonce or nonce in self._nonces:
            return False
        self._nonces[nonce] = now + NONCE_TTL_S
        return True

    def _check_sts(self, access_key_id: str, sent: str | None) -> None:
        expected = self._sts.get(access_key_id)
        if expected is None and sent is None:
            return
        if expected is None or sent is None:
            raise _Reject(
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
                "Specified SecurityToken mismatch with the AccessKey."
                if sent is not None
                else "SecurityToken is mandatory for this AccessKey.",
            )
        if not hmac.compare_digest(expected.token, sent):
            raise _Reject(
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
                "Specified SecurityToken mismatch with the AccessKey.",
            )
        if expected.expires_at is not None and expected.expires_at.timestamp() <= self._clock():
            raise _Reject(
                403, "InvalidSecurityToken.Expired", "Specified SecurityToken is expired."
            )

    def _throttle(self, access_key_id: str) -> float:
        rate = self.config.max_qps
        if not rate:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(access_key_id)
        if bucket is None:
            bucket = self._buckets[access_key_id] = _Bucket(rate, now)
        return bucket.take(now, rate)

    def _throttled_response(
        self, request: web.Request, wait_s: float, request_id: str
    ) -> web.Response:
        r = self._throttle_rng.random()
        if r < 0.8:
            status, code, msg = (
                400,
                "Throttling.User",
                "Request was denied due to user flow control.",
            )
        elif r < 0.9:
            status, code, msg = 429, "Throttling", "Request was denied due to request throttling."
        else:
            status, code, msg = 503, "Throttling.Api", "Request was denied due to api flow control."
        headers = {}
        if self._throttle_rng.random() < 0.8:
            headers["x-acs-retry-after"] = str(max(1, math.ceil(wait_s * 1000)))
        return self._error(request, status, code, msg, request_id, headers)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4()).upper()
        resp: web.Response | None
        try:
            resp = await self._api_inner(request, request_id)
        except _Reject as rej:
            self.stats.signature_failures += 1
            resp = self._error(request, rej.status, rej.code, rej.message, request_id)
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000.0)
        if resp is None:  # the "reset" fault: drop the connection without an answer
            self.stats.record(0, "ConnectionReset")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client: the socket is gone
        self.stats.record(resp.status, _code_of(resp) if resp.status >= 400 else None)
        return resp

    async def _api_inner(self, request: web.Request, request_id: str) -> web.Response | None:
        path, _, raw_query = request.raw_path.partition("?")
        raw_query = raw_query.partition("#")[0]
        if path != API_PATH or request.method != "GET":
            return self._error(
                request,
                404,
                "InvalidAction.NotFound",
                "Specified api is not found, please check your url and method.",
                request_id,
            )
        query = self._raw_query(raw_query)
        body = await request.read()
        access_key_id = self._authenticate(request, path, query, body)
        if query.get("WorkspaceId") in self.options.forbidden_workspaces:
            return self._error(
                request,
                403,
                "Forbidden.RAM",
                "User not authorized to operate on the specified resource, or this API "
                "doesn't support RAM.",
                request_id,
            )
        wait_s = self._throttle(access_key_id)
        if wait_s > 0:
            self.stats.throttled += 1
            return self._throttled_response(request, wait_s, request_id)
        fault = self._pick_fault()
        if fault is not None:
            self.stats.faults[fault] += 1
            if fault == "internal_error":
                return self._error(
                    request,
                    500,
                    "InternalError",
                    "The request processing has failed due to some unknown error, exception "
                    "or failure.",
                    request_id,
                )
            if fault == "service_unavailable":
                return self._error(
                    request,
                    503,
                    "ServiceUnavailable",
                    "The request has failed due to a temporary failure of the server.",
                    request_id,
                )
            if fault == "reset":
                return None
        try:
            total, page = self.world.list(query)
        except InvalidInputError as exc:
            return self._error(request, 400, exc.code, str(exc), request_id)
        payload = self._page_json(request_id, total, page).encode("utf-8")
        if fault == "truncated":
            payload = payload[: len(payload) // 2]
        resp = web.Response(
            body=payload,
            status=200,
            content_type="application/json",
            charset="utf-8",
        )
        resp.headers["x-acs-request-id"] = request_id
        return resp

    def _page_json(self, request_id: str, total: int, page: list[dict[str, Any]]) -> str:
        """The answer: exactly ``json.dumps({"RequestId", "TotalCount", "Experiments"},
        ensure_ascii=False)`` of the (drifted) experiments. The config texts, most of a
        page's bytes and never drifted, are encoded once per experiment and remembered while
        they stay the same."""
        encode = _ENCODER.encode
        drift = self.config.drift
        items = []
        for exp in page:
            config = _config_of(exp)
            if drift:
                head = drift_experiment(exp, self._drift_rng, self.time_zone)
            elif config is not None:
                head = dict(exp)
            else:
                head = exp
            if config is None:
                items.append(encode(head))
                continue
            for name in _CONFIG_FIELDS:
                del head[name]
            exp_id = head.get("ExperimentId")
            hit = self._config_json.get(exp_id) if type(exp_id) is str else None
            if hit is None or hit[0] != config:
                fragment = "".join(
                    f", {encode(name)}: {encode(value)}"
                    for name, value in zip(_CONFIG_FIELDS, config, strict=True)
                )
                hit = (config, fragment)
                if type(exp_id) is str:
                    self._config_json[exp_id] = hit
            items.append(f"{encode(head)[:-1]}{hit[1]}}}")
        return (
            f'{{"RequestId": {encode(request_id)}, "TotalCount": {encode(total)}, '
            f'"Experiments": [{", ".join(items)}]}}'
        )

    def _pick_fault(self) -> str | None:
        rate = self.config.fault_rate
        if rate <= 0 or self._fault_rng.random() >= rate:
            return None
        return self._fault_rng.choice(self.config.fault_kinds)

    # ------------------------------------------------------------------ control API

    @staticmethod
    def _loopback(request: web.Request) -> bool:
        remote = request.remote or ""
        return remote.startswith("127.") or remote in ("::1", "localhost")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body is not JSON"}), content_type="application/json"
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body must be a JSON object"}),
                content_type="application/json",
            )
        try:  # a lone surrogate escape ("\ud800") parses, but no answer could carry it
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise web.HTTPBadRequest(
                text=json.dumps(
                    {"error": "body holds text that is not Unicode (a lone surrogate)"}
                ),
                content_type="application/json",
            ) from None
        return data

    def _guard(self, request: web.Request) -> None:
        if not self._loopback(request):
            raise web.HTTPForbidden(
                text=json.dumps({"error": "the control API answers loopback clients only"}),
                content_type="application/json",
            )

    async def _ctl_advance(self, request: web.Request) -> web.Response:
        self._guard(request)
        data = await self._json_body(request)
        try:
            seconds = float(data.get("seconds", 0))
            if seconds < 0 or not math.isfinite(seconds):
                raise ValueError
        except (TypeError, ValueError):
            return _bad("seconds must be a finite number >= 0")
        events = self.world.advance(seconds)
        self.stats.events_applied += len(events)
        return web.json_response(
            {
                "now": _iso(self.world.now),
                "count": len(events),
                "events": [e.to_dict() for e in events[:_MAX_EVENTS_RETURNED]],
            }
        )

    async def _ctl_truth(self, request: web.Request) -> web.Response:
        self._guard(request)
        ws = request.query.get("workspace") or None
        return web.json_response(
            {
                "now": _iso(self.world.now),
                "experiments": self.world.truth(ws),
                "deleted": self.world.deleted_ids(ws),
            },
            dumps=_dumps,
        )

    async def _ctl_get_config(self, request: web.Request) -> web.Response:
        self._guard(request)
        return web.json_response(self.settings())

    async def _ctl_config(self, request: web.Request) -> web.Response:
        self._guard(request)
        data = await self._json_body(request)
        try:
            return web.json_response(self.configure(**data))
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))

    async def _ctl_mutate(self, request: web.Request) -> web.Response:
        self._guard(request)
        data = await self._json_body(request)
        unknown = set(data) - {"experiment_id", "status", "trial_status", "delete", "create"}
        if unknown:
            return _bad(f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            events = self.world.mutate(
                data.get("experiment_id"),
                status=data.get("status"),
                trial_status=data.get("trial_status"),
                delete=bool(data.get("delete", False)),
                create=data.get("create"),
            )
        except KeyError:
            return web.json_response(
                {"error": f"no experiment {data.get('experiment_id')!r}"}, status=404
            )
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return web.json_response(
            {"now": _iso(self.world.now), "events": [e.to_dict() for e in events]}
        )

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        self._guard(request)
        return web.json_response(self.stats.snapshot())

    async def _ctl_stats_reset(self, request: web.Request) -> web.Response:
        self._guard(request)
        self.stats.reset()
        return web.json_response(self.stats.snapshot())


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config_of(exp: dict[str, Any]) -> tuple[str, str, str] | None:
    """The config texts of a rendered experiment when they are its last three fields (as
    the world renders them; then its JSON is the rest's plus theirs), else None."""
    if len(exp) <= len(_CONFIG_FIELDS) or "ConfigYml" not in exp:
        return None
    last = reversed(exp)
    if (next(last), next(last), next(last)) != _CONFIG_FIELDS[::-1]:
        return None
    texts = (exp["SearchSpace"], exp["ConfigIni"], exp["ConfigYml"])
    return texts if all(type(t) is str for t in texts) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def _code_of(resp: web.Response) -> str | None:
    body = resp.body
    if not isinstance(body, bytes | bytearray):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    code = data.get("Code") if isinstance(data, dict) else None
    return code if isinstance(code, str) else None


async def serve_forever(
    options: SimOptions, *, on_ready: Callable[[str], object] | None = None
) -> None:
    """Run a simulator until cancelled; ``on_ready(base_url)`` once it listens."""
    async with Simulator(options) as sim:
        if on_ready is not None:
            result = on_ready(sim.base_url)
            if asyncio.iscoroutine(result):
                await result
        await asyncio.Event().wait()


# ---------------------------------------------------------------------- CLI helpers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``simulate`` command's flags."""
    d = SimOptions()
    parser.add_argument("--host", default=d.host, help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=d.port, help="port (default %(default)s: any free port)"
    )
    parser.add_argument(
        "--experiments", type=int, default=d.experiments, help="experiments at start"
    )
    parser.add_argument("--workspaces", type=int, default=d.workspaces, help="workspaces")
    parser.add_argument(
        "--latency-ms", type=float, default=d.latency_ms, help="added to every API response"
    )
    parser.add_argument(
        "--max-qps",
        type=float,
        default=0.0,
        help="requests per second per AccessKeyId before throttling (0: unlimited)",
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=d.fault_rate,
        help="share of requests that fail (500, 503, truncated body, reset)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed")
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="sim seconds per wall second (0: frozen; default %(default)s)",
    )
    parser.add_argument(
        "--no-drift", action="store_true", help="always send canonical types and ISO times"
    )
    parser.add_argument(
        "--no-modified-bump",
        action="store_true",
        help="leave GmtModifiedTime alone when an experiment changes",
    )
    parser.add_argument("--time-zone", default=d.time_zone, help="zone of naive times")
    parser.add_argument(
        "--forbid-workspace",
        action="append",
        default=[],
        metavar="ID",
        help="answer listings of this workspace with 403 Forbidden.RAM (repeatable)",
    )
    parser.add_argument(
        "--access-key-id",
        default=DEFAULT_ACCESS_KEY_ID,
        help="the AccessKey ID it accepts (default %(default)s, as the demo configs use)",
    )
    parser.add_argument(
        "--access-key-secret",
        default=DEFAULT_ACCESS_KEY_SECRET,
        help="the AccessKey secret it checks signatures with (default: the demo configs')",
    )


def options_from_args(ns: argparse.Namespace) -> SimOptions:
    """SimOptions from the flags of :func:`add_arguments`; raises ValueError."""
    if not 0 <= ns.port <= 65535:
        raise ValueError(f"--port must be from 0 (any free port) to 65535, got {ns.port}")
    return SimOptions(
        host=ns.host,
        port=ns.port,
        experiments=ns.experiments,
        workspaces=ns.workspaces,
        latency_ms=ns.latency_ms,
        max_qps=ns.max_qps or None,
        fault_rate=ns.fault_rate,
        seed=ns.seed,
        speed=ns.speed,
        drift=not ns.no_drift,
        bump_modified=not ns.no_modified_bump,
        time_zone=ns.time_zone,
        forbidden_workspaces=tuple(ns.forbid_workspace),
        credentials={ns.access_key_id: ns.access_key_secret},
    )
