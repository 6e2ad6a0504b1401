"""What a chat target's answer means: sent, retry later, or give up (pure)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from yarl import URL

#: When a target says "too fast" without saying for how long.
DEFAULT_RETRY_S = 60.0


@dataclass(frozen=True)
class Sent:
    """Delivered."""


@dataclass(frozen=True)
class Retry:
    """Retryable; ``after_s`` None means "use the backoff"."""

    reason: str
    after_s: float | None = None


@dataclass(frozen=True)
class Dead:
    """Permanent failure: retrying cannot help."""

    reason: str


Outcome = Sent | Retry | Dead

# errcode -> (retryable, explanation)
_DINGTALK = {
    -1: (True, "system busy"),
    130101: (True, "sending too fast (20/min per robot)"),
    310000: (False, "keyword, signature or timestamp check failed"),
    460101: (False, "message too big"),
    300001: (False, "bad access token"),
}
#: How long DingTalk keeps a robot quiet once it has sent too fast (its documented 10-minute
#: limit): a retry sooner is refused again, and each refusal risks a longer ban.
DINGTALK_BAN_S = 600.0
_DINGTALK_WAITS = {130101: DINGTALK_BAN_S}
_FEISHU = {
    19021: (False, "signature or timestamp check failed"),
    19024: (False, "keyword missing"),
    11232: (True, "rate limited"),
    9499: (True, "rate limited"),
}
_WECOM = {
    -1: (True, "system busy"),
    45009: (True, "rate limited (20/min)"),
    40058: (False, "message too long"),
    93000: (False, "invalid webhook URL"),
}


#: Path segments and query values at least this long count as possibly secret: webhook URLs
#: carry their token there (Slack, Discord, Feishu paths; DingTalk, WeCom queries), while
#: shorter pieces are route words ("hook", "v2", "send") whose masking would only hide meaning.
_SECRET_MIN = 8
MASK = "***"


def secret_parts(url: str, *secrets: str | None) -> tuple[str, ...]:
    """The strings an answer from ``url`` must never carry into a log, the outbox or a page:
    the URL, its long path segments and query values (raw and percent-decoded), the
    ``Authorization: Basic`` value its ``user:password@`` becomes, and every given secret.
    Longest first, so a part never survives inside a longer one half-masked."""
    parts = {url, *(s for s in secrets if s)}
    try:
        split = urlsplit(url)
    except ValueError:
        split = None
    if split is not None:
        pieces = split.path.split("/") + [v for _, v in parse_qsl(split.query)]
        pairs = split.query.split("&")
        pieces += [*pairs, *(p.partition("=")[2] for p in pairs), split.netloc.rpartition("@")[0]]
        for piece in pieces:
            for form in (piece, unquote(piece), quote(unquote(piece), safe="")):
                if len(form) >= _SECRET_MIN:
                    parts.add(form)
    parts.update(p for p in _basic_auth_forms(url) if len(p) >= _SECRET_MIN)
    return tuple(sorted(parts, key=len, reverse=True))


def _basic_auth_forms(url: str) -> set[str]:
    """The base64 of the URL's ``user:password`` as a client sends it in ``Authorization:
    Basic``: a receiver that echoes the request's headers in an error page would otherwise
    carry the password in a form no other part matches. aiohttp sends the userinfo
    percent-decoded as yarl decodes it (an invalid escape such as %E9 kept as written), in
    Latin-1; the raw and UTF-8 forms cover other clients and whatever Latin-1 cannot encode."""
    try:
        parsed = URL(url, encoded=True)
        userinfo = urlsplit(url).netloc.rpartition("@")[0]
    except ValueError:
        return set()
    if not userinfo:
        return set()
    user, _, password = userinfo.partition(":")
    pairs = {
        (parsed.raw_user or "", parsed.raw_password or ""),
        (parsed.user or "", parsed.password or ""),
        (unquote(user), unquote(password)),
    }
    forms: set[str] = set()
    for login, secret in pairs:
        for encoding in ("latin-1", "utf-8"):
            try:
                raw = f"{login}:{secret}".encode(encoding)
            except UnicodeEncodeError:
                continue
            forms.add(base64.b64encode(raw).decode("ascii"))
    return forms


def redact(text: str, parts: Iterable[str]) -> str:
    """``text`` with every secret part replaced by ``***``."""
    for part in parts:
        if part and part in text:
            text = text.replace(part, MASK)
    return text


def _snippet(body: bytes, limit: int = 200) -> str:
    return body[:limit].decode("utf-8", "replace").strip()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _seconds(value: object) -> float | None:
    """A wait a target asked for, in seconds: a finite number, at least 0; else None (use
    the backoff). "inf", "nan" or 1e300 would overflow the retry time."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            return _seconds(value)
    return None


def _code_body(
    body: bytes,
    shown: bytes,
    key: str,
    table: dict[int, tuple[bool, str]],
    msg_key: str,
    waits: Mapping[int, float] | None = None,
) -> Outcome:
    data = _json(body)
    if not isinstance(data, dict) or key not in data:
        # Feishu answers some successes as {"StatusCode":0,...}
        if isinstance(data, dict) and data.get("StatusCode") == 0:
            return Sent()
        return Retry(f"unexpected answer: {_snippet(shown)}")
    try:
        code = int(data[key])
    except (TypeError, ValueError):
        return Retry(f"unexpected answer: {_snippet(shown)}")
    if code == 0:
        return Sent()
    msg = str(data.get(msg_key, ""))
    retryable, meaning = table.get(code, (False, "rejected"))
    reason = f"{key} {code}: {meaning} ({msg})" if msg else f"{key} {code}: {meaning}"
    if not retryable:
        return Dead(reason)
    return Retry(reason, (waits or {}).get(code, DEFAULT_RETRY_S))


def classify(
    target_type: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Iterable[str] = (),
) -> Outcome:
    """Map a target's HTTP answer to an outcome (see the target table in DESIGN.md).

    The answer is judged as it came; the reason quotes at most a snippet of it, with the
    ``secrets`` (see :func:`secret_parts`) masked before it is cut: an error page that
    echoes the request URL would otherwise carry the webhook's token into the log, the
    outbox and the UI."""
    parts = tuple(secrets)
    shown = redact(body.decode("utf-8", "replace"), parts).encode() if parts else body
    outcome = _classify(target_type, status, headers, body, shown)
    if parts and isinstance(outcome, Retry | Dead):
        # (a reason may also quote a message field of the answer)
        reason = redact(outcome.reason, parts)
        if isinstance(outcome, Retry):
            return Retry(reason, outcome.after_s)
        return Dead(reason)
    return outcome


def _classify(
    target_type: str, status: int, headers: Mapping[str, str], body: bytes, shown: bytes
) -> Outcome:
    if status == 429:
        after = _retry_after(headers)
        if after is None:
            data = _json(body)
            if isinstance(data, dict) and isinstance(data.get("retry_after"), int | float):
                after = _seconds(data["retry_after"])
        return Retry(f"HTTP 429: {_snippet(shown) or 'rate limited'}", after)
    if status >= 500:
        return Retry(f"HTTP {status}: {_snippet(shown)}", _retry_after(headers))
    if 300 <= status < 400:
        # Redirects are not followed (a POST would arrive as a GET); where to is not quoted:
        # the Location may carry the token.
        return Dead(f"HTTP {status}: the webhook URL redirects; configure the URL it leads to")
    if target_type == "dingtalk" and status == 200:
        return _code_body(body, shown, "errcode", _DINGTALK, "errmsg", _DINGTALK_WAITS)
    if target_type in ("feishu", "lark") and status == 200:
        return _code_body(body, shown, "code", _FEISHU, "msg")
    if target_type == "wecom" and status == 200:
        return _code_body(body, shown, "errcode", _WECOM, "errmsg")
    if target_type == "slack" and status == 200:
        return Sent() if body.strip() in (b"ok", b"") else Dead(f"HTTP 200: {_snippet(shown)}")
    if target_type == "discord" and status in (200, 204):
        return Sent()
    if target_type == "teams" and status in (200, 202):
        return Sent()
    if target_type == "webhook" and 200 <= status < 300:
        return Sent()
    if status == 408:
        return Retry(f"HTTP {status}: {_snippet(shown)}", _retry_after(headers))
    return Dead(f"HTTP {status}: {_snippet(shown)}")
