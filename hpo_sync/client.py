"""The ListHpoExperiments client: signed, rate-limited, retried, concurrently paged.

One :class:`UpstreamClient` (one aiohttp session) per process. Every attempt is signed
afresh (new ``x-acs-date`` and nonce), the query string on the wire is exactly the canonical
query that was signed (built with ``encoded=True`` so yarl does not re-encode it), and errors
are classified into retryable (throttling at any HTTP status, 5xx, timeouts, resets, broken
bodies, a reused nonce) and fatal (signature, key, access, input) ones.

Throttled attempts are the rate limiter's business, not a sign the page is broken: they wait
for the server's ``x-acs-retry-after`` and do not escalate the exponential backoff or use up
``retry_max_attempts`` (``retry_max_total_s`` and a hard cap still bound them), so a page
unlucky enough to meet both throttling and faults is not given up early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import json
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from http import HTTPStatus
from typing import Any

import aiohttp
import orjson
import structlog
import tenacity
from yarl import URL

from . import __version__, proxies, signing
from .config import UpstreamConfig
from .credentials import CloudCredentials, CredentialsProvider
from .errors import (
    FatalUpstreamError,
    RetriesExhaustedError,
    RetryableUpstreamError,
    ThrottledError,
    UpstreamError,
)
from .normalise import parse_time

PATH = "/api/automl/v1/hpo/experiments"
ACTION = "ListHpoExperiments"
VERSION = "2022-08-28"

log = structlog.get_logger(__name__)

#: The shortest timeout an attempt gets when little of a page's time budget is left.
MIN_ATTEMPT_S = 1.0
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
BACKOFF_JITTER_S = 0.5
THROTTLE_JITTER_S = 0.1
THROTTLED_ATTEMPTS_FACTOR = 4
"""Throttled attempts of one page stop at this multiple of ``retry_max_attempts``."""

_RETRYABLE_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SignatureNonceUsed",  # a send repeated on the way (a proxy's retry) with our nonce
    "ServiceTimeout",
    "RequestTimeout",
    "LastResponseInvalid",
}

_HINTS: tuple[tuple[str, str], ...] = (
    ("SignatureDoesNotMatch", "check the AccessKey secret (and that no proxy rewrites the query)"),
    (
        "IncompleteSignature",
        "the request was not signed completely; check a proxy is not dropping headers",
    ),
    ("InvalidAccessKeyId", "the AccessKey ID is unknown or disabled; check the credentials"),
    ("InvalidTimeStamp", "this machine's clock is more than 15 minutes off; sync it (NTP/chrony)"),
    (
        "InvalidSecurityToken",
        "the STS security token is invalid or expired; refresh the credentials",
    ),
    ("Forbidden", "grant the RAM action paiautoml:ListHpoExperiments to these credentials"),
    ("NoPermission", "grant the RAM action paiautoml:ListHpoExperiments to these credentials"),
    ("AccessDenied", "grant the RAM action paiautoml:ListHpoExperiments to these credentials"),
    (
        "INVALID_INPUT_PARAMS",
        "upstream rejected a query parameter; check upstream.sort_by and page_size",
    ),
    (
        "InvalidParameter",
        "upstream rejected a query parameter; check upstream.sort_by and page_size",
    ),
)


def hint_for(code: str | None) -> str | None:
    if not code:
        return None
    for prefix, hint in _HINTS:
        if code.startswith(prefix):
            return hint
    return None


#: Each SortBy name and the same sort in the other vocabulary (see :meth:`list_page`).
SORT_BY_ALIASES = {
    "GmtCreateTime": "create_time",
    "create_time": "GmtCreateTime",
    "GmtModifiedTime": "update_time",
    "update_time": "GmtModifiedTime",
}


#: Create times that straddle page boundaries read again on their own, at most, per listing:
#: this many, or one every other page boundary of a longer listing. Capped at 20 alone, a
#: workspace of batches created within a second (a tie at ~1 in 4 boundaries) missed rows
#: past the 20th tie in every reading, so its baseline never held: no hot sweeps, no
#: alerts, a listing read twice every interval.
MAX_TIE_WINDOWS = 20
#: The smallest page size a tie window is read in (upstream's documented default page size).
TIE_WINDOW_PAGE_SIZE = 100
#: The largest page size a tie window is read in, for a tie of more rows than
#: TIE_WINDOW_PAGE_SIZE (see :meth:`UpstreamClient._read_straddling_ties`).
MAX_TIE_PAGE_SIZE = 1000
#: How much further a create-time window reaches on both sides than the times it is for: an
#: upstream that reads MinCreateTime/MaxCreateTime as exclusive, or keeps create times finer
#: than the whole seconds it shows, returns nothing for the window [t, t].
WINDOW_EDGE = timedelta(seconds=1)


def _create_time_edges(page: Page, tz: tzinfo) -> tuple[datetime | None, datetime | None]:
    """The GmtCreateTime of a page's first and last experiment, read (``tz`` for a time
    without a zone): the same instant may come in either documented format, and a tie
    between pages is one of instants, not of strings."""
    rows = [r for r in page.experiments if isinstance(r, dict)]
    if not rows:
        return None, None
    first, last = rows[0].get("GmtCreateTime"), rows[-1].get("GmtCreateTime")
    return parse_time(first, naive_tz=tz), parse_time(last, naive_tz=tz)


def _last_before_empty(sizes: Mapping[int, int], first_empty: int) -> int | None:
    """The size of page ``first_empty`` - 1 when pages 1 … ``first_empty`` - 1 were all read
    and no page after the empty one came back with experiments (the listing ends at that
    empty page, if anywhere), else None."""
    if first_empty <= 1 or not all(n in sizes for n in range(1, first_empty)):
        return None
    if any(n > first_empty and got for n, got in sizes.items()):
        return None
    return sizes[first_empty - 1]


def rejects_parameter(exc: UpstreamError) -> bool:
    """Whether upstream refused the request's parameters (not its credentials or access)."""
    code = exc.code or ""
    return code == "INVALID_INPUT_PARAMS" or code.startswith("InvalidParameter")


def is_throttling(code: str | None) -> bool:
    """Whether an error code says "too many requests": PAI's ``Throttling``,
    ``Throttling.User``, ``Throttling.Api`` … and the spellings gateways use
    (``THROTTLING``, ``ThrottlingException``, ``Throttled``, ``TooManyRequests``)."""
    folded = (code or "").casefold()
    return folded.startswith(("throttl", "toomanyrequests", "requestthrottled"))


@dataclass(frozen=True)
class ListQuery:
    """The filters of one ListHpoExperiments listing (paging is the client's business)."""

    workspace_id: str | None = None
    name: str | None = None
    creator: str | None = None
    status: str | None = None
    min_create_time: datetime | str | None = None
    max_create_time: datetime | str | None = None
    accessibility: str | None = None
    include_config_data: bool | None = None
    sort_by: str | None = None
    order: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def params(self, zone: tzinfo = UTC) -> dict[str, str]:
        """The query parameters, times formatted ``yyyy-mm-dd hh:mm:ss`` in ``zone``.

        Naive datetimes are taken as UTC (never as this machine's local time); strings are
        sent as given.
        """
        out: dict[str, str] = {}
        simple = {
            "WorkspaceId": self.workspace_id,
            "Name": self.name,
            "Creator": self.creator,
            "Status": self.status,
            "Accessibility": self.accessibility,
            "SortBy": self.sort_by,
            "Order": self.order,
        }
        out.update({k: v for k, v in simple.items() if v is not None})
        for key, value in (
            ("MinCreateTime", self.min_create_time),
            ("MaxCreateTime", self.max_create_time),
        ):
            if isinstance(value, datetime):
                aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
                t = aware.astimezone(zone)
                # (not strftime: its %Y does not pad years before 1000, and a look-up's
                # window around Go's zero time, year 1, would read "1-01-01 ...")
                out[key] = (
                    f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
                    f" {t.hour:02d}:{t.minute:02d}:{t.second:02d}"
                )
            elif value is not None:
                out[key] = value
        if self.include_config_data is not None:
            out["IncludeConfigData"] = "True" if self.include_config_data else "False"
        if self.tags:
            out["Tag"] = json.dumps(
                [{"Key": k, "Value": v} for k, v in self.tags],
                separators=(",", ":"),
                ensure_ascii=False,
            )
        return out


@dataclass(frozen=True)
class Page:
    #: None when the answer has no readable TotalCount (or one below its own page's size).
    total_count: int | None
    experiments: list[dict[str, Any]]
    request_id: str | None
    #: Page 1 came without its rows (``Experiments`` null or missing) under a positive
    #: count: what it lacks proves no absence (a glitch that answered so for a whole sweep
    #: had its look-ups mark a workspace deleted).
    rows_missing: bool = False


@dataclass
class Listing:
    """Every page of one query, deduplicated by ExperimentId."""

    experiments: list[dict[str, Any]] = field(default_factory=list)
    total_count: int = 0
    pages_expected: int = 0
    pages_read: int = 0
    duplicates: int = 0
    skipped: int = 0
    totals_seen: set[int] = field(default_factory=set)
    seen_ids: set[str] = field(default_factory=set)
    error: UpstreamError | None = None
    #: Some page had no readable TotalCount: the listing was paged until an empty page, and
    #: nothing can say its ids add up.
    uncounted: bool = False
    #: Page 1 came without its rows under a positive count (:attr:`Page.rows_missing`).
    rows_missing: bool = False

    @property
    def complete(self) -> bool:
        """Every page was read."""
        return self.error is None and self.pages_read == self.pages_expected

    @property
    def consistent(self) -> bool:
        """Complete, every page reported the same TotalCount, and the ids add up to it."""
        return (
            self.complete
            and not self.uncounted
            and len(self.totals_seen) <= 1
            and len(self.seen_ids) == self.total_count
        )


@dataclass
class ClientStats:
    api_calls: int = 0
    retries: int = 0
    throttled: int = 0
    by_code: dict[str, int] = field(default_factory=dict)

    def count(self, code: str) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1


@dataclass
class Tally:
    """What one sweep cost: attempts sent (retries included) and pages read."""

    api_calls: int = 0
    pages: int = 0
    retries: int = 0
    throttled: int = 0


RequestObserver = Callable[[str, str], None]
"""Called once per attempt with (outcome code — "OK" or the error code, workspace id)."""


class UpstreamClient:
    """Client of ``ListHpoExperiments``. Use as an async context manager or call close()."""

    def __init__(
        self,
        config: UpstreamConfig,
        credentials: CredentialsProvider,
        *,
        session: aiohttp.ClientSession | None = None,
        observer: RequestObserver | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        from .ratelimit import AdaptiveRateLimiter

        self.config = config
        self._credentials = credentials
        self._base = URL(config.base_url)
        # Found when the config was read (config.proxy; proxies.py says why not aiohttp's
        # trust_env); its user and password go in Proxy-Authorization alone.
        self._proxy_options, self._proxy_headers = proxies.request_options(
            config.proxy.reveal() if config.proxy else None, self._base.scheme
        )
        self._session = session
        self._own_session = session is None
        self._limiter = AdaptiveRateLimiter(config.max_qps)
        self._concurrency = asyncio.Semaphore(config.max_concurrency)
        self._observer = observer
        self._clock = clock
        #: SortBy names upstream refused, with the other vocabulary's name that it took
        self._sort_names: dict[str, str] = {}
        #: SortBy names upstream has answered in this process: taken as they are, or (those
        #: in _sort_names) in the other vocabulary; a name recalled from an earlier process
        #: is not in it until upstream takes it. Per name not yet answered, the lock its
        #: first page holds (list_page).
        self._sort_answered_names: set[str] = set()
        self._sort_probes: dict[str, asyncio.Lock] = {}
        #: Learned from a listing: upstream's TotalCount counts the page, not the listing, so
        #: from then on no count plans pages (every listing is paged until an empty page).
        self.counts_pages = False
        self.stats = ClientStats()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def limiter_rate(self) -> float:
        return self._limiter.rate

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(8, self.config.max_concurrency * 2)),
                headers={"User-Agent": f"hpo-sync/{__version__}"},
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()

    # --- one request ---------------------------------------------------------------------

    def _url(self, query: str) -> URL:
        """The URL to send: the endpoint's path prefix (a proxy's, if any) + the API path +
        the canonical query, ``encoded=True`` so that yarl sends the signed bytes untouched."""
        prefix = self._base.raw_path.rstrip("/")
        target = f"{self._base.origin()}{prefix}{PATH}"
        return URL(f"{target}?{query}" if query else target, encoded=True)

    def _signed_headers(self, params: Mapping[str, str], creds: CloudCredentials) -> dict[str, str]:
        """The ACS3 headers of one send of ``params``: a new date and nonce, and their
        signature (``Authorization``)."""
        headers = {
            "host": self._base.raw_authority,
            "x-acs-action": ACTION,
            "x-acs-version": VERSION,
            "x-acs-date": self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": signing.EMPTY_SHA256,
        }
        if creds.security_token:
            headers["x-acs-security-token"] = creds.security_token
        # The gateway checks the API path: a path prefix of the endpoint belongs to a proxy
        # in between, which strips it, so it is sent but not signed.
        headers["Authorization"] = signing.sign(
            method="GET",
            path=PATH,
            query=params,
            headers=headers,
            access_key_id=creds.access_key_id,
            access_key_secret=creds.access_key_secret,
        ).authorization
        return headers

    async def _attempt(
        self,
        params: Mapping[str, str],
        workspace_id: str | None,
        tally: Tally | None,
        timeout_s: float,
    ) -> Page:
        """One signed attempt, given ``timeout_s`` in all. Raises
        Retryable/Throttled/FatalUpstreamError."""
        creds = await self._credentials.get()
        query = signing.canonical_query(params)
        sends = 0  # the sends aiohttp made of this attempt, the first signed below

        def signed() -> dict[str, str]:
            """A fresh date, nonce and signature; a send counted."""
            self.stats.api_calls += 1
            if tally is not None:
                tally.api_calls += 1
            return self._signed_headers(params, creds)

        async def resign(
            request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
        ) -> aiohttp.ClientResponse:
            # aiohttp sends an idempotent request once more, by itself, when the connection
            # drops under it (a kept-alive one the server closed): with the headers of the
            # first send the gateway refused the nonce it had seen (SignatureNonceUsed), and
            # the send went uncounted. This runs before every send aiohttp makes.
            nonlocal sends
            sends += 1
            if sends > 1:
                request.headers.update(signed())
            return await handler(request)

        headers = signed()
        headers["Accept"] = "application/json"
        headers.update(self._proxy_headers)  # (not signed: the proxy takes it off)
        session = self._get_session()
        try:
            async with session.get(
                self._url(query),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
                middlewares=(resign,),
                **self._proxy_options,
            ) as resp:
                body = await _read_capped(resp, workspace_id)
                status = resp.status
                retry_after = _retry_after_s(
                    resp.headers.get("x-acs-retry-after"), resp.headers.get("Retry-After")
                )
                header_request_id = resp.headers.get("x-acs-request-id")
                location = resp.headers.get("Location")
        except TimeoutError:
            self._observe("Timeout", workspace_id)
            raise RetryableUpstreamError(
                # the attempt's own time: shorter than timeout_s when the page's retry budget
                # had less left
                f"timed out after {timeout_s:.3g}s",
                code="Timeout",
                workspace_id=workspace_id,
            ) from None
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc, workspace_id) from None
        first_page = params.get("PageNumber") == "1"
        return self._parse(
            status, body, retry_after, workspace_id, header_request_id, first_page, location
        )

    def _transport_error(self, exc: aiohttp.ClientError, workspace_id: str | None) -> UpstreamError:
        """What a failure below HTTP (or a proxy's refusal of the tunnel) means. A certificate
        that is not trusted and a proxy that refuses the tunnel stay so until the config or
        the host changes: failing at once with what to do beats ``retry_max_total_s`` of
        retries (2 minutes by default) ending on a connection error."""
        kw: dict[str, Any] = {"workspace_id": workspace_id}
        proxy = f"the proxy {self._proxy_options.get('proxy', '')}".rstrip()
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            self._observe("CertificateError", workspace_id)
            why = exc.certificate_error
            return FatalUpstreamError(
                f"the TLS certificate of {exc.host} was not trusted: "
                f"{getattr(why, 'verify_message', None) or why}",
                code="CertificateError",
                hint="behind a TLS-inspecting proxy or with a private CA, point SSL_CERT_FILE at "
                "a CA bundle that holds its CA; else check upstream.endpoint's host name",
                **kw,
            )
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            code = "ProxyAuthenticationRequired" if exc.status == 407 else f"Proxy{exc.status}"
            self._observe(code, workspace_id)
            message = f"{proxy} answered HTTP {exc.status}{_reason(exc.status)} to the tunnel"
            if 400 <= exc.status < 500 and exc.status not in (408, 429):
                return FatalUpstreamError(
                    message,
                    code=code,
                    http_status=exc.status,
                    hint="check the proxy's user and password (upstream.proxy or the "
                    "environment's HTTPS_PROXY: http://user:password@host:port)"
                    if exc.status == 407
                    else "the proxy does not let this host through; ask its administrators, "
                    "or set NO_PROXY if the endpoint is reachable without it",
                    **kw,
                )
            return RetryableUpstreamError(message, code=code, http_status=exc.status, **kw)
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            self._observe("ProxyConnectionError", workspace_id)
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return RetryableUpstreamError(
                f"cannot connect to {proxy}: {reason}", code="ProxyConnectionError", **kw
            )
        if (
            isinstance(exc, aiohttp.ClientConnectorSSLError)
            and getattr(exc.os_error, "reason", None) == "WRONG_VERSION_NUMBER"
        ):
            # The far end answered the TLS handshake with something else: plain HTTP on that
            # port (an https:// endpoint for an http:// service). Other TLS failures (a reset
            # mid-handshake) may pass, and stay retryable.
            self._observe("TLSError", workspace_id)
            return FatalUpstreamError(
                f"{exc.host}:{exc.port} does not speak TLS ({exc.os_error})",
                code="TLSError",
                hint="check upstream.endpoint: an http:// service, or the wrong port",
                **kw,
            )
        if type(exc) is aiohttp.ClientResponseError:
            # aiohttp raises the bare class when it cannot read an answer's head: a status
            # line that is not HTTP (an http:// endpoint for a TLS or other service) or a
            # Content-Encoding it was not asked for. The same endpoint will answer the same
            # way: failing now beats retry_max_total_s of retries ending on a connection error.
            self._observe("ProtocolError", workspace_id)
            first = exc.message.splitlines()[0].rstrip(":") if exc.message else ""
            return FatalUpstreamError(
                f"upstream's answer was not HTTP that this client reads: {first or exc}",
                code="ProtocolError",
                hint="check upstream.endpoint: its scheme (https:// for a TLS service) and port"
                if "status line" in first
                else "upstream, or a proxy in between, sent what no request of this client "
                "asked for",
                **kw,
            )
        self._observe("ConnectionError", workspace_id)
        return RetryableUpstreamError(
            f"connection failed: {type(exc).__name__}: {exc}", code="ConnectionError", **kw
        )

    def _observe(self, code: str, workspace_id: str | None) -> None:
        self.stats.count(code)
        if self._observer is not None:
            self._observer(code, workspace_id or "")

    def _parse(
        self,
        status: int,
        body: bytes,
        retry_after_s: float | None,
        workspace_id: str | None,
        header_request_id: str | None = None,
        first_page: bool = False,
        location: str | None = None,
    ) -> Page:
        if 300 <= status < 400:
            # Not the API's answer, and asking again will not change it: most often an
            # http:// endpoint that the gateway sends to https://.
            self._observe(f"HTTP{status}", workspace_id)
            raise FatalUpstreamError(
                f"HTTP {status}{_reason(status)}: upstream redirects"
                + (f" to {_where(location)}" if location else ""),
                code=f"HTTP{status}",
                http_status=status,
                request_id=header_request_id,
                workspace_id=workspace_id,
                hint="set upstream.endpoint to where it redirects",
            )
        try:
            data = _loads(body)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            duplicated = _duplicate_members(body)
            if duplicated:
                raise ValueError(f"members given twice: {', '.join(duplicated)}")
        except ValueError as exc:
            # A 200 that is not JSON is a listing cut short (MalformedBody); an error status
            # with a body that is not JSON is a gateway's or proxy's own page (a 503 in
            # HTML, say), reported by its status, which is what went wrong.
            code = "MalformedBody" if status == 200 else f"HTTP{status}"
            self._observe(code, workspace_id)
            twice = str(exc).startswith("members given twice")
            message = (
                f"HTTP {status}{_reason(status)} with a body that is not valid JSON"
                f" ({len(body)} bytes)"
                if not twice
                else f"HTTP {status}{_reason(status)} with an ambiguous body ({exc})"
            )
            if 400 <= status < 500 and status not in (408, 429):
                # not the API's error shape: something else (a wrong endpoint, a proxy, a
                # firewall) answered, and asking again will not change its mind
                raise FatalUpstreamError(
                    message,
                    code=code,
                    http_status=status,
                    request_id=header_request_id,
                    workspace_id=workspace_id,
                    hint="the proxy asks for a user and password: give them in upstream.proxy "
                    "or the environment's HTTP(S)_PROXY (http://user:password@host:port)"
                    if status == 407
                    else "this is not a PAI API answer; check upstream.endpoint and any proxy",
                ) from None
            # a 200 cut short, a gateway's 5xx page or a 429 from a proxy: worth another
            # try, after the wait it asked for (Retry-After) if it did
            kind = ThrottledError if status == 429 else RetryableUpstreamError
            raise kind(
                message,
                code=code,
                http_status=status,
                request_id=header_request_id,
                workspace_id=workspace_id,
                retry_after_s=retry_after_s,
            ) from None
        # The official SDK reads ``code``/``requestId``/``message`` too when the capitalised
        # keys are missing (alibabacloud_tea_openapi's error path); so does this.
        code = _field(data, "Code", "code")
        request_id = _field(data, "RequestId", "requestId") or header_request_id
        experiments = data.get("Experiments")
        if (
            status == 200
            and _is_success_code(code)
            and _field(data, "Success", "success") is not False
            and isinstance(experiments, list | type(None))
            # An API answer says what it is: a listing (Experiments, TotalCount) or, from a
            # server that leaves out empty fields, just its RequestId: an empty listing.
            # Anything else in a 200 (``{}``, a proxy's JSON, a listing in another shape:
            # ``{"RequestId", "Data": {...}}``, camelCase members) is not a listing, and
            # reading it as an empty one would let a full sweep mark the workspace deleted.
            and ("Experiments" in data or "TotalCount" in data or _only_envelope(data))
        ):
            rows = experiments or []
            total = _total_count(
                data.get("TotalCount", 0 if experiments is None else None), len(rows)
            )
            self._observe("OK", workspace_id)
            # An empty page 1 under a positive count: a count of rows the listing leaves out
            # (soft-deleted ones), or an answer that lost its rows, which null (or no member)
            # rather than [] says louder. Not read as "none" (see Page.rows_missing).
            missing = experiments is None and bool(total) and first_page
            return Page(total, rows, request_id, rows_missing=missing)
        hint: str | None
        if code is not None and not _is_success_code(code):
            # an error, whatever the HTTP status: some gateways answer 200 with Code/Message
            code = str(code)
            hint = hint_for(code)
        else:
            code = f"HTTP{status}"
            hint = "this is not a PAI API answer; check upstream.endpoint and any proxy"
        message = str(_field(data, "Message", "message") or f"HTTP {status}")
        if status == 200 and code == "HTTP200":
            members = ", ".join(sorted(map(str, data))[:8]) or "none"
            message = f"a 200 answer that is no listing (members: {members})"
        self._observe(code, workspace_id)
        kw: dict[str, Any] = dict(
            code=code, http_status=status, request_id=request_id, workspace_id=workspace_id
        )
        if is_throttling(code) or status == 429:
            raise ThrottledError(message, retry_after_s=retry_after_s, **kw)
        if code in _RETRYABLE_CODES or status >= 500:
            raise RetryableUpstreamError(message, retry_after_s=retry_after_s, **kw)
        raise FatalUpstreamError(message, hint=hint, **kw)

    async def list_page(
        self,
        query: ListQuery,
        page_number: int,
        page_size: int | None = None,
        *,
        tally: Tally | None = None,
    ) -> Page:
        """One page, with rate limiting and retries.

        ``SortBy`` has two vocabularies (DESIGN: the seed document's ``GmtCreateTime``, the
        published metadata's ``create_time``; likewise ``GmtModifiedTime`` /
        ``update_time``), and which one an upstream takes is documented nowhere for
        certain. A page refused with ``INVALID_INPUT_PARAMS`` (or ``InvalidParameter*``)
        whose ``SortBy`` has a name in the other vocabulary is asked once more with that
        name; if that is taken, this client sends it from then on (logged once,
        ``upstream.sort_by_switched``). If it is refused too, the first refusal is raised.
        A name so learnt that upstream refuses later gives way to the configured one the
        same way.

        Until upstream has answered a name either way, pages sorted by it wait for the
        first one in flight: the concurrent listings of a hot sweep in a new process (one
        per status, what is new) each had their first page refused and asked again, six
        calls more for a one-shot ``sync`` instead of one.
        """
        async with self._sort_probe(query.sort_by):
            params = query.params(self.config.tz)
            params["PageNumber"] = str(page_number)
            params["PageSize"] = str(page_size or self.config.page_size)
            configured = query.sort_by
            if configured is not None and configured in self._sort_names:
                params["SortBy"] = self._sort_names[configured]
            try:
                page = await self._call(params, query.workspace_id, tally)
            except FatalUpstreamError as exc:
                sent = params.get("SortBy", "")
                learned = self._sort_names.get(configured) if configured is not None else None
                if learned is None:
                    other = SORT_BY_ALIASES.get(sent)
                elif learned != sent:  # another page learned the name meanwhile
                    other = learned
                else:
                    # The name learnt is refused now (upstream changed, or another gateway
                    # behind the same endpoint, or it was recalled from an earlier process):
                    # the configured one may be taken again. Else every sweep failed on it.
                    other = configured
                if other is None or other == sent or not rejects_parameter(exc):
                    raise
                try:
                    page = await self._call({**params, "SortBy": other}, query.workspace_id, tally)
                except FatalUpstreamError:
                    raise exc from None
                if configured is not None:
                    self._sort_answered(configured, other, query.workspace_id, exc.code)
            else:
                if configured is not None:
                    self._sort_answered_names.add(configured)
            if tally is not None:
                tally.pages += 1
            return page

    @contextlib.asynccontextmanager
    async def _sort_probe(self, name: str | None) -> AsyncIterator[None]:
        """Held around a page sorted by ``name`` while upstream has not yet answered that
        name either way (see :meth:`list_page`)."""
        if name is None or self._sort_settled(name):
            yield
            return
        async with self._sort_probes.setdefault(name, asyncio.Lock()):
            if not self._sort_settled(name):
                yield
                return
        yield

    def _sort_settled(self, name: str) -> bool:
        return name in self._sort_answered_names

    def _sort_answered(
        self, configured: str, taken: str, workspace_id: str | None, refused: str | None
    ) -> None:
        """Upstream took ``taken`` for the configured SortBy name after refusing the other."""
        self._sort_answered_names.add(configured)
        if taken == configured:
            if self._sort_names.pop(configured, None) is None:
                return
        elif self._sort_names.get(configured) == taken:
            return
        else:
            self._sort_names[configured] = taken
        log.warning(
            "upstream.sort_by_switched",
            configured=configured,
            using=taken,
            workspace=workspace_id,
            refused=refused,
        )

    def forget_sort_names(self) -> None:
        """Forget which SortBy names upstream takes: the next page sorted by one asks
        again (what sweeps learn is forgotten after a while)."""
        self._sort_names.clear()
        self._sort_answered_names.clear()

    @property
    def sort_names(self) -> dict[str, str]:
        """The SortBy names upstream refused, with the name of the other vocabulary it
        took instead (a copy)."""
        return dict(self._sort_names)

    def learn_sort_names(self, names: Mapping[str, str]) -> None:
        """Take SortBy names learnt by an earlier process (:attr:`sort_names`), where this
        one has not answered them itself; only pairs of the two vocabularies count."""
        for configured, other in names.items():
            # (unconfirmed: the first page sorted by it goes alone, and upstream's answer
            # settles it for the others; see list_page)
            if SORT_BY_ALIASES.get(configured) == other and not self._sort_settled(configured):
                self._sort_names[configured] = other

    async def _call(
        self, params: Mapping[str, str], workspace_id: str | None, tally: Tally | None
    ) -> Page:
        started = time.monotonic()
        attempt = 0
        throttled = 0  # attempts of this page answered with Throttling*
        max_attempts = self.config.retry_max_attempts
        budget_s = self.config.retry_max_total_s

        # The time budget runs from the first attempt, not from the call: waiting for a
        # slot (the client's concurrency, the rate limiter) before it is not retrying.
        first_attempt_at: float | None = None

        def stop(state: tenacity.RetryCallState) -> bool:
            # stop before a wait that would end past the time budget, not after it
            since_first = time.monotonic() - first_attempt_at if first_attempt_at else 0.0
            spent_s = since_first + state.upcoming_sleep
            return (
                state.attempt_number - throttled >= max_attempts
                or state.attempt_number >= max_attempts * THROTTLED_ATTEMPTS_FACTOR
                or spent_s > self.config.retry_max_total_s
            )

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return _retry_wait(exc, state.attempt_number - throttled)

        state: tenacity.RetryCallState | None = None
        last_error: RetryableUpstreamError | None = None
        retrying = tenacity.AsyncRetrying(
            retry=_RETRY_ON,
            stop=stop,
            wait=wait,
            reraise=True,
            before_sleep=lambda state: self._before_retry(state, tally),
        )
        try:
            async for try_ in retrying:
                state = try_.retry_state
                with try_:
                    attempt += 1
                    async with self._concurrency:
                        # A retry's wait for a slot counts against the time budget too: none
                        # is waited for, nor an attempt started, past it.
                        budget_ends = (
                            first_attempt_at + self.config.retry_max_total_s
                            if first_attempt_at is not None
                            else None
                        )
                        if not await self._limiter.acquire(budget_ends):
                            assert last_error is not None  # a retry: an attempt failed
                            raise _BudgetSpent(last_error)
                        try:
                            now = time.monotonic()
                            if first_attempt_at is None:
                                first_attempt_at = now
                            # An attempt may not run past the page's time budget either
                            # (a slow answer would): its timeout is what is left of it.
                            left_s = self.config.retry_max_total_s - (now - first_attempt_at)
                            timeout_s = min(self.config.timeout_s, max(left_s, MIN_ATTEMPT_S))
                            page = await self._attempt(params, workspace_id, tally, timeout_s)
                        except ThrottledError as exc:
                            last_error = exc
                            throttled += 1
                            self.stats.throttled += 1
                            if tally is not None:
                                tally.throttled += 1
                            self._limiter.on_throttle(exc.retry_after_s)
                            raise
                        except RetryableUpstreamError as exc:
                            last_error = exc
                            if exc.http_status is not None:
                                # it got past the gateway's flow control: for the limiter's
                                # goodput it counts like a success
                                self._limiter.on_success()
                            raise
                    self._limiter.on_success()
                    return page
        except _BudgetSpent as spent:
            # (attempt counted the one that was not started)
            raise _exhausted(
                spent.last, attempt - 1, throttled, started, workspace_id, budget_s
            ) from _unlinked(spent.last)
        except RetryableUpstreamError as exc:
            raise _exhausted(
                exc, attempt, throttled, started, workspace_id, budget_s
            ) from _unlinked(exc)
        finally:
            _break_cycle(retrying, state)
            last_error = None  # an exception held by this frame: a reference cycle
        raise AssertionError("unreachable")  # pragma: no cover

    def _before_retry(self, state: tenacity.RetryCallState, tally: Tally | None) -> None:
        self.stats.retries += 1
        if tally is not None:
            tally.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.debug(
            "upstream.retry",
            attempt=state.attempt_number,
            code=getattr(exc, "code", None),
            workspace=getattr(exc, "workspace_id", None),
            wait_s=round(state.upcoming_sleep, 3),
        )

    # --- listings ------------------------------------------------------------------------

    async def list_all(
        self,
        query: ListQuery,
        *,
        page_size: int | None = None,
        on_page: Callable[[Page], Awaitable[None]] | None = None,
        tally: Tally | None = None,
        keep: bool = True,
        check_short: bool = False,
    ) -> Listing:
        """Every page of ``query``: page 1 first (for TotalCount), then the rest concurrently.

        Fatal errors raise. A page that keeps failing past the retry budget leaves the
        listing incomplete (``error`` set) rather than losing what the other pages returned.
        ``on_page`` is awaited for every page as it arrives, with only the experiments not
        seen before in this listing; with ``keep=False`` the listing keeps only their ids, so
        memory stays bounded by the pages in flight, not the size of the workspace.

        ``check_short``: a short page 1 whose TotalCount is its own size is checked against
        page 2, as a full one is (below), for one call more. A server that caps PageSize
        below the size asked for *and* counts each page answers page 1 of any listing just
        as an honest server answers a listing of one short page; for the listing of a whole
        workspace (a baseline, a full sweep, whose end decides what is missing) that call
        is worth it, for the many short listings of a hot sweep it is not. Once seen, the
        client remembers it (:attr:`counts_pages`) and trusts no count again.
        """
        size = page_size or self.config.page_size
        listing = Listing()
        seen: set[str] = set()

        async def take(page: Page, *, counted: bool = True) -> None:
            listing.rows_missing = listing.rows_missing or page.rows_missing
            if counted:  # not the pages of a tie window (below): their counts are theirs
                listing.pages_read += 1
                if page.total_count is None:
                    listing.uncounted = True
                else:
                    listing.totals_seen.add(page.total_count)
                    listing.total_count = max(listing.total_count, page.total_count)
            fresh: list[dict[str, Any]] = []
            for raw in page.experiments:
                exp_id = raw.get("ExperimentId") if isinstance(raw, dict) else None
                if exp_id is None or exp_id == "":
                    listing.skipped += 1
                    continue
                key = str(exp_id)
                if key in seen:
                    listing.duplicates += 1
                    continue
                seen.add(key)
                fresh.append(raw)
            if keep:
                listing.experiments.extend(fresh)
            if on_page is not None:
                await on_page(Page(page.total_count, fresh, page.request_id))

        first = await self.list_page(query, 1, size, tally=tally)
        if first.total_count is None or self.counts_pages:
            if not self.counts_pages:
                log.warning("upstream.total_count_missing", workspace=query.workspace_id)
            await self._page_until_empty(query, [first], size, tally, listing, take, seen)
            return listing
        got = len(first.experiments)
        grew: Page | None = None
        if first.total_count == got and (got == size or (check_short and got)):
            # A full page whose count is its own size: the workspace holds exactly one page,
            # or the server counts the page rather than the listing (then trusting it would
            # read page 1 only, and a full sweep would call the rest deleted). Page 2 tells
            # which, for one call more in this one case (and for a short page 1 when asked).
            second = await self._past_the_only_page(query, first, size, tally)
            if second is not None and second.total_count is not None and second.total_count > got:
                # Page 2 counts more than page 1 held: the listing's count after all, which
                # grew between the two calls (an experiment created meanwhile). Not a server
                # that counts pages: that page is the listing's second, read on from there.
                grew = second
            elif second is not None:
                self.counts_pages = True
                log.warning(
                    "upstream.total_count_per_page", workspace=query.workspace_id, count=got
                )
                await self._page_until_empty(
                    query, [first, second], size, tally, listing, take, seen
                )
                return listing
        capped = 0 < got < size and first.total_count > got
        if capped:
            # No page-size maximum is documented: a server that silently caps PageSize
            # still pages by its own size, so plan the page count with that. (Or its count
            # takes in rows the listing leaves out, soft-deleted ones say: then page 2 comes
            # back empty, and page 1 was the whole listing; see below.)
            asked, size = size, got
        listing.pages_expected = max(1, math.ceil(first.total_count / size))
        await take(first)
        if grew is not None:
            await take(grew)
            listing.pages_expected = max(2, math.ceil(listing.total_count / size))

        # A few workers share the page numbers: they bound the pages fetched but not yet
        # handed to on_page (a slow consumer cannot make pages pile up in memory), and a
        # count of a billion plans no billion tasks. The client's own concurrency limit
        # still decides how many requests are in flight.
        workers = self.config.max_concurrency * 2
        first_empty = math.inf  # the first page that came back empty too early
        sizes = {1: got}  # experiments per page number read
        tz = self.config.tz
        edges = {1: _create_time_edges(first, tz)}  # each page's first and last create time
        if grew is not None:
            sizes[2], edges[2] = len(grew.experiments), _create_time_edges(grew, tz)
        short_listing: UpstreamError | None = None
        first_ids = _readable_ids(first)
        repeats_first = False  # page 2 came back as page 1 again (its readable ids)

        async def fetch(numbers: Iterator[int]) -> None:
            nonlocal first_empty, short_listing, repeats_first
            for number in numbers:
                if number > first_empty:
                    return  # past an empty page: the count promised pages that are not there
                try:
                    page = await self.list_page(query, number, size, tally=tally)
                except FatalUpstreamError as exc:
                    if not rejects_parameter(exc):
                        raise
                    # Page 1 was taken with the same filters: what is refused is the page
                    # number, past the end after all (the count was too high, or rows were
                    # deleted meanwhile). An empty page, as other servers answer it.
                    log.info("upstream.page_past_end_refused", workspace=query.workspace_id,
                             page=number)  # fmt: skip
                    page = Page(listing.total_count, [], None)
                except UpstreamError as exc:
                    listing.error = listing.error or exc
                    continue
                sizes[number] = len(page.experiments)
                edges[number] = _create_time_edges(page, tz)
                if number == 2 and first_ids and _readable_ids(page) == first_ids:
                    repeats_first = True
                if not page.experiments and number < listing.pages_expected:
                    first_empty = min(first_empty, number)
                    listing.error = listing.error or UpstreamError(
                        f"page {number} came back empty before the last page its count "
                        f"planned ({listing.pages_expected})",
                        code="ShortListing",
                        workspace_id=query.workspace_id,
                    )
                    short_listing = short_listing or listing.error
                await take(page)

        first_page, rounds = (2 if grew is None else 3), 0
        if capped and listing.pages_expected > 2:
            # The cap is a guess from page 1 alone, and a count that takes in rows the
            # listing leaves out makes the same guess (a hot sweep's listing of one status,
            # say, under a count of soft-deleted rows too): page 2 alone first, so that such
            # a listing costs one call more, not a round of pages in flight past its end.
            await fetch(iter([2]))
            first_page = 3
        while listing.pages_expected >= first_page:
            numbers = iter(range(first_page, listing.pages_expected + 1))
            # TaskGroup cancels the other pages as soon as one fails fatally.
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(workers, listing.pages_expected - first_page + 1)):
                        group.create_task(fetch(numbers))
            except BaseExceptionGroup as group_error:
                errors: list[BaseException] = list(group_error.exceptions)
                fatal = [e for e in errors if isinstance(e, FatalUpstreamError)]
                raise (fatal or errors)[0] from None
            # Experiments created while the pages were read: sorted by create time
            # ascending they are past the last page planned, and later pages count them.
            # Read those pages too: a few rounds at most (a workspace may grow forever), each
            # at most doubling the pages (one page's absurd TotalCount must not plan 10^7).
            grown = min(max(1, math.ceil(listing.total_count / size)), 2 * listing.pages_expected)
            rounds += 1
            if listing.error is not None or grown <= listing.pages_expected or rounds > 3:
                break
            first_page, listing.pages_expected = listing.pages_expected + 1, grown
        if repeats_first and listing.error is None and listing.total_count > got:
            await self._page_one_again(query, listing, first, tally, take)
        ended = False
        # the cap guessed from page 1 alone, refuted: page 1 was short after all
        refuted = capped and first_empty == 2 and not any(sizes[n] for n in sizes if n > 2)
        if capped and sizes.get(2):  # borne out: page 2 has rows of its own
            log.warning("upstream.page_size_capped", asked=asked, got=got)
        if listing.error is not None and listing.error is short_listing:
            last = _last_before_empty(sizes, int(first_empty))
            # A short page, then an empty one: the listing's natural end, before the end
            # its count planned. So is a refuted cap. A full page, then an empty one: the
            # end too, under a count that takes in rows the listing leaves out, when the
            # listing's rows fill whole pages — or a page that glitched (asked for once
            # more, it has rows), or rows deleted while the pages were read, which shift
            # later rows onto pages read already (the count moved: no end, whatever the
            # empty page says when asked again).
            ended = (
                (last is not None and last < size)
                or refuted
                or (
                    last is not None
                    and len(listing.totals_seen) == 1
                    and await self._empty_again(query, int(first_empty), size, tally)
                )
            )
        if ended:
            # A count that is too high (one that counts soft-deleted rows, or rows deleted
            # while the pages were read) would otherwise leave every listing incomplete,
            # and every full sweep partial, for good. The listing is complete; its ids do
            # not add up to the count, which the sweeps weigh as for any listing that does
            # not add up (a baseline reads it twice; nothing is deleted unlooked-up).
            log.info(
                "upstream.listing_ended_early",
                workspace=query.workspace_id,
                page=int(first_empty) - 1,
                pages_planned=listing.pages_expected,
                total_count=listing.total_count,
            )
            listing.error = None
            listing.pages_expected = listing.pages_read
        if listing.complete and len(seen) < listing.total_count:
            if query.max_create_time is None:
                # (a hot sweep's listing of what is new has a lower bound only: a tie window
                # around a create time it returned lies within it, or a second below)
                await self._read_straddling_ties(query, edges, size, tally, take)
            elif listing.pages_read > 1 and listing.total_count <= MAX_TIE_PAGE_SIZE:
                # a window (a look-up's): its ties may reach past it, so it is read whole
                await self._read_as_one_page(query, listing.total_count, tally, take)
        listing.seen_ids = seen
        return listing

    async def _page_one_again(
        self,
        query: ListQuery,
        listing: Listing,
        first: Page,
        tally: Tally | None,
        take: Callable[..., Awaitable[None]],
    ) -> None:
        """Page 2 came back as page 1 again, row for row, under a count of more than page 1
        held. Either the listing is page 1 and its count is off (a server that answers a page
        number past the end with page 1), or the server ignores PageNumber and answers page 1
        to every page: then only page 1 was read, and trusting it would leave the rest of the
        workspace out of the mirror for good, every sweep "ok".

        One page of the count (at most :data:`MAX_TIE_PAGE_SIZE`) with more rows than page 1
        held tells the second, and is the listing when it holds the count. When it holds no
        more (the server caps or refuses the size), page 2 of one row tells: a server whose
        page numbers work answers page 1's second row, one that ignores them its first.
        Unless the listing can be read whole, it stays incomplete."""
        got, first_ids = len(first.experiments), _readable_ids(first)
        asked = min(listing.total_count, MAX_TIE_PAGE_SIZE)
        whole = await self._read_as_one_page(query, asked, tally, take)
        held = len(whole.experiments) if whole is not None else 0
        if held <= got:
            if len(first_ids) < 2:
                return  # nothing to tell them apart by: page 1 is taken as all there is
            try:
                probe = await self.list_page(query, 2, 1, tally=tally)
            except UpstreamError:
                probe = None
            if probe is None or _readable_ids(probe)[:1] != first_ids[:1]:
                return  # page numbers work: page 1 is all there is, the count is off
        log.warning(
            "upstream.page_number_ignored",
            workspace=query.workspace_id,
            total_count=listing.total_count,
            read_as_one_page=held,
        )
        if held < listing.total_count:
            listing.error = UpstreamError(
                "upstream answers every page number with page 1 (page 2 repeated it under a "
                f"TotalCount of {listing.total_count}); one page of {asked} held {held}, "
                "and the rest cannot be reached",
                code="PageNumberIgnored",
                workspace_id=query.workspace_id,
            )

    async def _read_as_one_page(
        self,
        query: ListQuery,
        count: int,
        tally: Tally | None,
        take: Callable[..., Awaitable[None]],
    ) -> Page | None:
        """``query`` read once more as one page of ``count`` rows (at most
        :data:`MAX_TIE_PAGE_SIZE`), which no row can fall between, its new rows handed on;
        the page, or None when it could not be read. For a listing of a few pages whose ids
        fall short of its count where each page's query orders rows of one create time its
        own way: a look-up by a name that a batch submitted in one second shares, or a tie
        window larger than its pages. One call more, best effort: a server that caps the
        page size, or refuses the size, leaves the listing as it was read, and so does a
        count that takes in rows the listing leaves out."""
        try:
            page = await self.list_page(query, 1, count, tally=tally)
        except FatalUpstreamError as exc:
            if not rejects_parameter(exc):
                raise
            return None
        except UpstreamError as exc:
            log.info("upstream.one_page_failed", workspace=query.workspace_id, error=str(exc))
            return None
        await take(page, counted=False)
        return page

    async def _empty_again(
        self, query: ListQuery, number: int, size: int, tally: Tally | None
    ) -> bool:
        """Whether page ``number`` of ``query``, which came back empty after a full page, is
        empty (or refused as past the end) when asked for once more."""
        try:
            page = await self.list_page(query, number, size, tally=tally)
        except FatalUpstreamError as exc:
            if not rejects_parameter(exc):
                raise
            return True
        except UpstreamError:
            return False
        return not page.experiments

    async def _read_straddling_ties(
        self,
        query: ListQuery,
        edges: Mapping[int, tuple[datetime | None, datetime | None]],
        size: int,
        tally: Tally | None,
        take: Callable[..., Awaitable[None]],
    ) -> None:
        """A listing whose ids fall short of its count, where a page ends on the create time
        the next page starts with: rows of equal create time straddle that boundary, and a
        database that orders equal keys differently from one query to the next (MySQL's
        ORDER BY … LIMIT does) can show a row on neither page. Each such create time is
        read once more on its own, in a window of a second around it; what was missed is
        handed on like any page's new rows (a few calls, only for a listing that does not
        add up; at most :data:`MAX_TIE_WINDOWS`, or one every other page of a longer one)."""
        ties = sorted(
            {
                last
                for number, (_, last) in edges.items()
                if last is not None and edges.get(number + 1, (None, None))[0] == last
            }
        )[: max(MAX_TIE_WINDOWS, len(edges) // 2)]
        for at in ties:
            window = dataclasses.replace(
                query, min_create_time=at - WINDOW_EDGE, max_create_time=at + WINDOW_EDGE
            )
            try:
                # In pages of at least the documented default: a tie larger than the
                # listing's own pages would otherwise be split again, and lose rows again.
                tie_size = max(size, TIE_WINDOW_PAGE_SIZE)
                first = await self.list_page(window, 1, tie_size, tally=tally)
                await take(first, counted=False)
                count, got = first.total_count, len(first.experiments)
                # (without a count, a full page may have more behind it)
                rest = got == tie_size if count is None else count > got
                if count is not None and rest and got == tie_size:
                    # Larger still (a batch of hundreds submitted at once): one page at a
                    # size that holds all of it, as far as the server pages that large.
                    whole = await self._read_as_one_page(
                        window, min(count, MAX_TIE_PAGE_SIZE), tally, take
                    )
                    rest = whole is None or len(whole.experiments) < count
                if rest:
                    # Beyond that size, or a server that caps the size or refuses it (or a
                    # short page 1 under a larger count): in pages of tie_size after all.
                    async for page in self.iter_pages(window, page_size=tie_size, tally=tally):
                        await take(page, counted=False)
            except FatalUpstreamError:
                raise
            except UpstreamError as exc:  # best effort: the listing stands as it was read
                log.info("upstream.tie_window_failed", workspace=query.workspace_id, error=str(exc))
                return
        if ties:
            log.info("upstream.tie_windows", workspace=query.workspace_id, windows=len(ties))

    async def _past_the_only_page(
        self, query: ListQuery, first: Page, size: int, tally: Tally | None
    ) -> Page | None:
        """Page 2 of a listing whose page 1 counts just itself, or None if the listing is
        that one page.

        Past the end, servers answer an empty page (the usual), refuse the page number
        (``INVALID_INPUT_PARAMS``), or answer the last page again. That last answer is also
        what a server that ignores PageNumber gives, and there the count would be the
        page's, not the listing's: page 2 at half page 1's rows tells them apart (the second
        half of page 1 where page numbers work, its first half again where they do not).
        Half the size asked for would not do for a short page 1: past its end, a server
        that clamps page numbers answers all of it again."""
        try:
            second = await self.list_page(query, 2, size, tally=tally)
        except FatalUpstreamError as exc:
            if not rejects_parameter(exc):
                raise
            log.info("upstream.page_past_end_refused", workspace=query.workspace_id, page=2)
            return None
        if not second.experiments:
            return None
        ids = _ids(first)
        if _ids(second) == ids:
            half = len(ids) // 2
            if not half:  # one row, asked in pages of more: the whole listing either way
                return None if size > 1 else second
            probe = await self.list_page(query, 2, half, tally=tally)
            if _ids(probe) == ids[half : 2 * half]:
                log.info("upstream.page_past_end_repeats", workspace=query.workspace_id)
                return None
            if _ids(probe) == ids:
                # All of page 1 again, whatever the page number and size: a server that
                # does not page at all, and whose count says that this is all there is.
                log.info("upstream.paging_ignored", workspace=query.workspace_id)
                return None
        return second

    async def _page_until_empty(
        self,
        query: ListQuery,
        read: Sequence[Page],
        size: int,
        tally: Tally | None,
        listing: Listing,
        take: Callable[[Page], Awaitable[None]],
        seen: set[str],
    ) -> None:
        """The listing when TotalCount cannot plan the pages (none is readable, or it counts
        a page rather than the listing), given the pages ``read`` so far, from page 1: pages
        one after another until one comes back empty (one call more than needed, but the
        only end that needs no count, and it holds even when the server caps the page size).
        A page with nothing new, or a listing past :data:`MAX_UNCOUNTED_PAGES`, ends it
        incomplete: a server that repeats itself must not page forever. One exception: the
        last page again, or the first one after pages that brought rows of their own, is
        how some servers answer a page number past the end; it ends the listing as an empty
        page would after a short last page (an earlier page was longer), or when one call
        more shows that the server's page numbers work (:meth:`_clamped_past`)."""
        listing.uncounted = True
        pending = iter(read)
        page: Page | None = None
        number, longest = 0, 0
        first_ids: list[Any] = []
        while page is None or page.experiments:
            previous = page
            if previous is not None:
                longest = max(longest, len(previous.experiments))
            number += 1
            page = next(pending, None)
            if page is None:
                if number > MAX_UNCOUNTED_PAGES:
                    number -= 1
                    listing.error = UpstreamError(
                        f"no usable TotalCount and still not at the end after {number} pages",
                        code="NoTotalCount",
                        workspace_id=query.workspace_id,
                    )
                    break
                try:
                    page = await self.list_page(query, number, size, tally=tally)
                except FatalUpstreamError as exc:
                    if number == 1 or not rejects_parameter(exc):
                        raise
                    # The pages before it were taken with the same filters: what is refused
                    # is the page number, past the end (how some servers answer it).
                    log.info("upstream.page_past_end_refused", workspace=query.workspace_id,
                             page=number)  # fmt: skip
                    number -= 1
                    break
                except UpstreamError as exc:
                    listing.error = exc
                    break
            before = len(seen)
            await take(page)
            if number == 1:
                first_ids = _ids(page)
            if number > 1 and page.experiments and len(seen) == before:
                assert previous is not None
                ids = _ids(page)
                # The last page again, or (pages 2 on having brought rows of their own, so
                # page numbers work) the first one: how some servers answer past the end.
                if (ids == _ids(previous) or (number > 2 and ids == first_ids)) and (
                    len(previous.experiments) < longest  # after a short last page
                    or await self._clamped_past(query, number - 1, previous, size, tally)
                ):
                    break  # past the end
                listing.error = UpstreamError(
                    f"page {number} repeats earlier pages and there is no usable TotalCount",
                    code="NoTotalCount",
                    workspace_id=query.workspace_id,
                )
                break
        listing.pages_expected = number
        listing.total_count = len(seen)
        listing.seen_ids = seen

    async def _clamped_past(
        self, query: ListQuery, pages: int, last: Page, size: int, tally: Tally | None
    ) -> bool:
        """Whether page ``pages + 1`` of an uncounted listing, the same as page ``pages``
        (``last``, as long as any before it), is a page number past the end answered with
        the last page again, rather than a server that ignores PageNumber (whose listing
        may be far longer). Row number ``pages * rows``, asked for at a page size of one,
        tells: the last row of ``last`` where page numbers work, the first row of the
        listing again where they do not. One page of one row, asked in pages of more, is
        the whole listing either way."""
        rows = len(last.experiments)
        if pages == 1 and rows == 1:
            return size > 1
        try:
            probe = await self.list_page(query, pages * rows, 1, tally=tally)
        except FatalUpstreamError as exc:
            if not rejects_parameter(exc):
                raise
            return False
        except UpstreamError:
            return False
        if _ids(probe) != _ids(last)[-1:]:
            return False
        log.info("upstream.page_past_end_repeats", workspace=query.workspace_id, page=pages + 1)
        return True

    async def iter_pages(
        self, query: ListQuery, *, page_size: int | None = None, tally: Tally | None = None
    ) -> AsyncIterator[Page]:
        """Pages one after another (for feeds read until a condition holds); without a
        usable TotalCount, until an empty page. A full page 1 that counts just itself may be
        a count of the page, not the listing (see :meth:`list_all`): then counts are not
        trusted and page 2 tells."""
        size = page_size or self.config.page_size
        number, counted, read = 1, True, 0
        previous: list[Any] | None = None
        first_ids: list[Any] = []
        while True:
            try:
                page = await self.list_page(query, number, size, tally=tally)
            except FatalUpstreamError as exc:
                if number == 1 or not rejects_parameter(exc):
                    raise
                return  # a page number past the end, refused (see _past_the_only_page)
            ids = _ids(page)
            if ids and (ids == previous or (number > 2 and ids == first_ids)):
                return  # the last page again, or the first: past the end
            if number == 1:
                first_ids = ids
            yield page
            count, got = page.total_count, len(page.experiments)
            read += got
            if number == 1 and (count == got == size or self.counts_pages):
                counted = False
            # The rows read, not the pages: a server that caps the page size pages by its
            # own size, and the count says when they are all there.
            if not got or (counted and count is not None and read >= count):
                return
            number += 1
            previous = ids


async def _read_capped(resp: aiohttp.ClientResponse, workspace_id: str | None) -> bytes:
    """The answer's body, decompressed, refused past :data:`MAX_RESPONSE_BYTES` (a page of
    100 experiments with their config texts is well under a megabyte). Read whole, a body
    that never ends or a compressed one that expands a thousandfold (a gateway's fault, a
    hostile endpoint) filled the process's memory, up to a page in flight each."""
    declared = resp.content_length
    if declared is None or declared <= MAX_RESPONSE_BYTES:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    raise FatalUpstreamError(
        f"an answer larger than {MAX_RESPONSE_BYTES // 2**20} MiB (HTTP {resp.status})",
        code="ResponseTooLarge",
        http_status=resp.status,
        workspace_id=workspace_id,
        # A page of experiments whose config texts are megabytes each can be this large
        # too: a smaller page is the way out there.
        hint=(
            "lower upstream.page_size if the experiments' config texts are that large;"
            " otherwise check upstream.endpoint and any proxy"
        ),
    )


#: A body of this size is no listing page (see _read_capped).
MAX_RESPONSE_BYTES = 64 * 2**20

#: Members of an answer that decide what it says: one given twice (the last wins in any JSON
#: parser) makes the answer ambiguous, e.g. a listing followed by "Experiments": [].
_DECIDING_MEMBERS = (b'"Experiments"', b'"TotalCount"', b'"Code"', b'"Success"')


def _duplicate_members(body: bytes) -> list[str]:
    """The deciding members the answer's top-level object holds more than once. The bytes
    are searched first (a name's text in a string has its quotes escaped); only a body that
    has one twice is parsed again, keeping every pair."""
    if not any(body.count(name) > 1 for name in _DECIDING_MEMBERS):
        return []
    top: list[list[tuple[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        top[:] = [items]  # objects are made innermost first: the last is the top level
        return dict(items)

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(body, object_pairs_hook=pairs)
    names = [name for name, _ in (top[0] if top else [])]
    deciding = {name.decode().strip('"') for name in _DECIDING_MEMBERS}
    return sorted({n for n in names if n in deciding and names.count(n) > 1})


def _where(location: str) -> str:
    """A redirect's target as it may be shown: its scheme, host, port and path (no query,
    no user or password: a redirect may echo what it was asked with)."""
    try:
        url = URL(location)
        shown = url.with_user(None).with_query(None).with_fragment(None)
        return str(shown)[:200]
    except (ValueError, TypeError):
        return "an address that is no URL"


def _readable_ids(page: Page) -> list[Any]:
    """The page's ExperimentIds, leaving out the records without a readable one."""
    return [i for i in _ids(page) if i is not None and i != ""]


def _ids(page: Page) -> list[Any]:
    return [raw.get("ExperimentId") for raw in page.experiments if isinstance(raw, dict)]


#: Without a TotalCount a listing pages until an empty page; past this many it stops,
#: incomplete (10,000 pages of 100 is a million experiments, far beyond any workspace).
MAX_UNCOUNTED_PAGES = 10_000


#: ``Code`` values a successful answer may carry (most carry none): anything else in a 200
#: is an error reported in the body, never an (empty) listing.
_SUCCESS_CODES = frozenset({"", "0", "200", "ok", "success"})


def _is_success_code(code: Any) -> bool:
    return code is None or (
        not isinstance(code, bool) and str(code).strip().lower() in _SUCCESS_CODES
    )


#: The members, besides a listing's, that a PAI answer may carry (lower-cased).
_ENVELOPE_MEMBERS = frozenset(
    ("requestid", "code", "message", "success", "httpstatuscode", "hostid", "pagenumber",
     "pagesize")
)  # fmt: skip


def _only_envelope(data: Mapping[str, Any]) -> bool:
    """A RequestId and nothing but the envelope's members: an empty listing from a server
    that leaves out empty fields (Experiments, TotalCount)."""
    return bool(_field(data, "RequestId")) and all(
        isinstance(k, str) and k.lower() in _ENVELOPE_MEMBERS for k in data
    )


def _field(data: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` in ``data`` that is present and not empty, else None."""
    for name in names:
        value = data.get(name)
        if value is not None and value != "":
            return value
    return None


def _total_count(value: Any, on_page: int) -> int | None:
    """TotalCount as a number (it drifts between number and string), or None when it is
    missing, unreadable or smaller than the page it came with: then nothing can plan the
    pages from it, and a listing that trusted it would stop after page 1 (and a full sweep
    would then mark everything it did not see deleted)."""
    if isinstance(value, bool):
        return None
    try:
        total = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return total if total >= on_page else None


_DIGIT_RUNS = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_NUMBER = b"0" * 19  # -9223372036854775809 and 18446744073709551616 have 19+ digits


#: One predicate for every call: it holds no state, and one per call would be one more
#: object in the cycle that _break_cycle undoes.
_RETRY_ON = tenacity.retry_if_exception_type(RetryableUpstreamError)


def _exhausted(
    last: RetryableUpstreamError,
    attempts: int,
    throttled: int,
    started: float,
    workspace_id: str | None,
    budget_s: float,
) -> RetriesExhaustedError:
    spent_s = time.monotonic() - started
    asked = last.retry_after_s
    # A wait upstream asked for that the budget cannot hold ends the call at once (tenacity
    # stops before a sleep past the budget): say so, or "gave up after 1 attempt" reads as
    # a client that did not try.
    too_long = asked is not None and spent_s + asked > budget_s
    return RetriesExhaustedError(
        f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} ({throttled} "
        f"throttled) in {spent_s:.1f}s"
        + (
            f", upstream asking to wait {asked:g}s more (past retry_max_total_s = {budget_s:g}s)"
            if too_long
            else ""
        )
        + f": {last.upstream_message}",
        code=last.code,
        http_status=last.http_status,
        request_id=last.request_id,
        workspace_id=workspace_id,
        hint=(
            "upstream asks for a longer pause than the retry budget; the next sweep will try again"
            if too_long
            else "upstream kept failing; the next sweep will try again"
        ),
    )


def _unlinked(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and context: the frames of tenacity's retry loop, which
    the traceback holds, hold its RetryError, which holds ``exc`` again (a reference cycle
    per call that gave up, left to the cyclic collector; see :func:`_break_cycle`). Its
    message, code and request id, all a caller reads, stay."""
    exc.__context__ = None
    return exc.with_traceback(None)


class _BudgetSpent(Exception):
    """A retry's time budget ran out waiting for a send slot (not retried: ends the call)."""

    def __init__(self, last: RetryableUpstreamError) -> None:
        super().__init__(str(last))
        self.last = last


def _break_cycle(retrying: tenacity.AsyncRetrying, state: tenacity.RetryCallState | None) -> None:
    """Undo the reference cycle tenacity leaves behind each call (the retrying object, its
    thread-local iteration state holding its own bound methods, the call state pointing
    back at it, and the outcome's ``concurrent.futures.Future`` with its lock), so that
    reference counting frees it at once. Left to the cyclic collector, which a full sweep
    runs rarely (see ``sync._full_sweep_gc``), ~40 objects a page would pile up: ~7 MB
    over 1,000 pages. Only tenacity's public attributes are touched, and a version
    without them leaves the cycle to the collector, as before."""
    with contextlib.suppress(AttributeError):
        retrying.iter_state.reset()
        if state is not None:
            state.retry_object = None  # type: ignore[assignment]
            state.outcome = None


def _loads(body: bytes) -> Any:
    """Parse a response body as ``json.loads`` would, with orjson where that is the same.

    orjson is several times faster, but it reads integers beyond 64 bits as floats where json
    keeps them exact: a body holding a run of 19 or more digits anywhere goes to json, as does
    anything orjson refuses and json accepts (NaN, a BOM, lone surrogates, UTF-16).

    A lone surrogate escape (``"\\ud800"``, half of a pair) is valid JSON but no Unicode
    text: no UTF-8, so no SQLite text, can hold it, and one such name would fail every
    write of its batch. Each becomes U+FFFD, the replacement character, as a UTF-8 decoder
    replaces what it cannot read.

    ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, but what Python's and JavaScript's
    encoders send for such floats) are read, as null: kept as floats they made ``raw``
    invalid JSON, which fails every SQLite JSON function over the whole table, and the
    API's answers that pass ``raw`` on.
    """
    if _LONG_NUMBER not in body.translate(_DIGIT_RUNS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    value = json.loads(body, parse_constant=_non_finite)
    if _SURROGATE_ESCAPE.search(body):  # paired escapes match too; json joined those
        value = _replace_lone_surrogates(value)
    return value


def _non_finite(constant: str) -> None:
    """``NaN``/``Infinity``/``-Infinity`` read as null (see :func:`_loads`)."""
    return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(value: Any) -> Any:
    """``value`` (parsed JSON) with every lone surrogate of its strings, keys included,
    replaced by U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


def _reason(status: int) -> str:
    """`` Service Unavailable`` for 503: the standard phrase of an HTTP status, or ''."""
    try:
        return f" {HTTPStatus(status).phrase}"
    except ValueError:
        return ""


def _retry_after_s(acs_ms: str | None, http_s: str | None = None) -> float | None:
    """The server's wait hint in seconds: ``x-acs-retry-after`` is in milliseconds (as the
    official SDK reads it), a standard ``Retry-After`` in seconds or an HTTP date (the wait
    until then; a date past is no wait)."""
    for value, scale in ((acs_ms, 1000.0), (http_s, 1.0)):
        if not value:
            continue
        with contextlib.suppress(ValueError):
            number = float(value)
            if number > 0 and math.isfinite(number):
                return number / scale
            continue
        if scale == 1.0:
            with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                when = email.utils.parsedate_to_datetime(value)
                if when.tzinfo is not None:
                    wait = (when - datetime.now(UTC)).total_seconds()
                    return wait if wait > 0 else None
    return None


def _retry_wait(exc: BaseException | None, failures: int) -> float:
    """How long to wait before the next attempt of a page.

    Throttled: the server's hint plus a little jitter (the limiter has already paused every
    caller and slowed down; the backoff must not escalate). Otherwise capped exponential
    backoff with jitter over the page's ``failures`` that were not throttling, never shorter
    than the server asked.
    """
    hinted = exc.retry_after_s if isinstance(exc, RetryableUpstreamError) else None
    if isinstance(exc, ThrottledError):
        return (hinted or 0.0) + random.uniform(0, THROTTLE_JITTER_S)
    exponent = max(0, failures - 1)
    base = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0**exponent)
    base += random.uniform(0, BACKOFF_JITTER_S)
    if hinted:
        return max(hinted + random.uniform(0, 0.05), min(base, hinted * 2))
    return base
