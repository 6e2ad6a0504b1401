"""Helpers for the simulator tests: sign and send ``ListHpoExperiments`` GETs the way a
careful client does (the wire query is exactly ``signing.canonical_query``)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import yarl

from hpo_sync import signing
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import ACTION, API_PATH, VERSION

ERROR_KEYS = {"RequestId", "Code", "Message", "HostId", "Recommend"}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def code(self) -> str | None:
        try:
            data = self.json()
        except ValueError:
            return None
        return data.get("Code") if isinstance(data, dict) else None


def signed_headers(
    host: str,
    query: Mapping[str, str],
    *,
    access_key_id: str = DEFAULT_ACCESS_KEY_ID,
    access_key_secret: str = DEFAULT_ACCESS_KEY_SECRET,
    date: datetime | None = None,
    nonce: str | None = None,
    action: str = ACTION,
    version: str = VERSION,
    security_token: str | None = None,
    body: bytes = b"",
    content_sha256: str | None = None,
    path: str = API_PATH,
) -> dict[str, str]:
    """Headers (Authorization included) for a signed GET of ``query``."""
    body_sha = hashlib.sha256(body).hexdigest()
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": (date or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": content_sha256 or body_sha,
    }
    if security_token is not None:
        headers["x-acs-security-token"] = security_token
    signed = signing.sign(
        method="GET",
        path=path,
        query=query,
        headers=headers,
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
        body_sha256=content_sha256 or body_sha,
    )
    headers["Authorization"] = signed.authorization
    return headers


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    headers: Mapping[str, str],
    wire_query: str,
    *,
    path: str = API_PATH,
    body: bytes = b"",
) -> Reply:
    """GET ``path?wire_query`` exactly as given (no re-encoding by yarl)."""
    target = f"{base_url}{path}" + (f"?{wire_query}" if wire_query else "")
    url = yarl.URL(target, encoded=True)
    async with session.get(url, headers=dict(headers), data=body or None) as resp:
        text = await resp.text()
        return Reply(resp.status, dict(resp.headers), text)


async def signed_get(
    session: aiohttp.ClientSession,
    base_url: str,
    query: Mapping[str, str] | None = None,
    **sign_kw: Any,
) -> Reply:
    """Sign ``query`` and send it; ``sign_kw`` go to :func:`signed_headers`."""
    query = dict(query or {})
    host = yarl.URL(base_url).raw_authority
    body = sign_kw.get("body", b"")
    headers = signed_headers(host, query, **sign_kw)
    return await send(session, base_url, headers, signing.canonical_query(query), body=body)


async def list_ok(
    session: aiohttp.ClientSession, base_url: str, query: Mapping[str, str], **sign_kw: Any
) -> dict[str, Any]:
    """A signed GET that must succeed; returns the JSON body."""
    reply = await signed_get(session, base_url, query, **sign_kw)
    assert reply.status == 200, (reply.status, reply.text)
    data = reply.json()
    assert isinstance(data, dict)
    return data
