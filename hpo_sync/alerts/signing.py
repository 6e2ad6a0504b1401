"""Webhook signatures: DingTalk, Feishu/Lark and Standard Webhooks (pure; time passed in)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """base64(HMAC-SHA256(key=secret, msg=f"{ts}\\n{secret}"))."""
    msg = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def dingtalk_url(url: str, secret: str, timestamp_ms: int) -> str:
    """``url`` with ``timestamp`` and ``sign`` query parameters, URL-encoded once."""
    sign = quote(dingtalk_sign(secret, timestamp_ms), safe="")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}timestamp={timestamp_ms}&sign={sign}"


def feishu_sign(secret: str, timestamp_s: int) -> str:
    """base64(HMAC-SHA256(key=f"{ts}\\n{secret}", msg=b""))."""
    key = f"{timestamp_s}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_<base64>`` decoded, else the text.
    A ``whsec_`` secret that is not base64 is a ValueError (``binascii.Error``); the config
    refuses it with this function when it loads."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :], validate=True)
    return secret.encode()


def webhook_signature(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<b64 HMAC-SHA256(key, id.ts.body)>``."""
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(webhook_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(
    secret: str | None, msg_id: str, timestamp_s: int, body: bytes
) -> dict[str, str]:
    """The Standard Webhooks headers: ``webhook-id`` and ``webhook-timestamp``, and with a
    ``secret`` ``webhook-signature``."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp_s)}
    if secret:
        headers["webhook-signature"] = webhook_signature(secret, msg_id, timestamp_s, body)
    return headers


def verify_webhook(
    secret: str, headers: dict[str, str], body: bytes, *, now_s: int, tolerance_s: int = 300
) -> bool:
    """Check Standard Webhooks headers (any of several space-separated signatures)."""
    try:
        msg_id = headers["webhook-id"]
        ts = int(headers["webhook-timestamp"])
        sigs = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(now_s - ts) > tolerance_s:
        return False
    expected = webhook_signature(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in sigs)
