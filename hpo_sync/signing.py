"""ACS3-HMAC-SHA256 (Alibaba Cloud signature V3), as pure functions.

Used by the client to sign and by the simulator to verify. The canonical forms follow the
official SDK (``alibabacloud_tea_openapi.utils.Utils.get_authorization``), which the tests
use as the oracle.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

ALGORITHM = "ACS3-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def percent_encode(value: str) -> str:
    """RFC 3986 encoding: keep ``A-Za-z0-9-_.~``, everything else as %XX of its UTF-8 bytes."""
    return quote(value, safe="~", encoding="utf-8")


def canonical_query(query: Mapping[str, str]) -> str:
    """Sorted ``k=v`` pairs, names and values percent-encoded, joined by ``&``.

    This exact string is also what goes on the wire, so that what the server sees is what was
    signed.
    """
    return "&".join(
        f"{percent_encode(k)}={percent_encode(query[k])}" for k in sorted(query)
    )


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """Return (canonical header block, SignedHeaders) for the headers that must be signed:
    ``host``, ``content-type`` and every ``x-acs-*`` header."""
    picked: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in ("host", "content-type") or low.startswith("x-acs-"):
            picked[low] = value.strip()
    names = sorted(picked)
    block = "".join(f"{n}:{picked[n]}\n" for n in names)
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    query: Mapping[str, str],
    signed_block: str,
    signed_names: str,
    body_sha256: str = EMPTY_SHA256,
) -> str:
    return "\n".join(
        [
            method.upper(),
            path or "/",
            canonical_query(query),
            signed_block,
            signed_names,
            body_sha256,
        ]
    )


def string_to_sign(canonical: str) -> str:
    return f"{ALGORITHM}\n{hashlib.sha256(canonical.encode('utf-8')).hexdigest()}"


def signature(secret: str, to_sign: str) -> str:
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Signed:
    """The outcome of signing one request: what to send and how it was derived."""

    authorization: str
    canonical_request: str
    signature: str
    signed_headers: str


def sign(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    access_key_id: str,
    access_key_secret: str,
    body_sha256: str = EMPTY_SHA256,
) -> Signed:
    """Sign a request whose ``headers`` already hold host, x-acs-date, nonce and the rest."""
    block, names = canonical_headers(headers)
    canon = canonical_request(method, path, query, block, names, body_sha256)
    sig = signature(access_key_secret, string_to_sign(canon))
    auth = f"{ALGORITHM} Credential={access_key_id},SignedHeaders={names},Signature={sig}"
    return Signed(authorization=auth, canonical_request=canon, signature=sig, signed_headers=names)


@dataclass(frozen=True)
class ParsedAuthorization:
    access_key_id: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization | None:
    """Parse an ``Authorization: ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…``
    header; None when it is not of that form."""
    algo, _, rest = value.strip().partition(" ")
    if algo != ALGORITHM or not rest:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep:
            return None
        fields[k] = v
    try:
        names = tuple(n for n in fields["SignedHeaders"].split(";") if n)
        return ParsedAuthorization(fields["Credential"], names, fields["Signature"])
    except KeyError:
        return None


def verify(
    *,
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    signed_header_names: tuple[str, ...],
    access_key_secret: str,
    claimed_signature: str,
    body_sha256: str,
) -> bool:
    """Recompute the signature from the headers the client says it signed, as the gateway
    does, and compare in constant time."""
    lower = {k.lower(): v for k, v in headers.items()}
    block = "".join(f"{n}:{lower.get(n, '').strip()}\n" for n in signed_header_names)
    canon = canonical_request(
        method, path, query, block, ";".join(signed_header_names), body_sha256
    )
    expected = signature(access_key_secret, string_to_sign(canon))
    return hmac.compare_digest(expected, claimed_signature)
