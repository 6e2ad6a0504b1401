"""ACS3-HMAC-SHA256 (Alibaba Cloud signature V3), as pure functions.

Used by the client to sign and by the simulator to verify. The canonical forms follow the
official SDK (``alibabacloud_tea_openapi.utils.Utils.get_authorization``), which the tests
use as the oracle.
"""

from __future__ import annotations

import hashlib
import hmac
import re
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
    return "&".join(f"{percent_encode(k)}={percent_encode(query[k])}" for k in sorted(query))


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """Return (canonical header block, SignedHeaders) for the headers that must be signed:
    ``host``, ``content-type`` and every ``x-acs-*`` header.

    Names are lowercased and values trimmed; should two names differ only in case, their
    values are sorted and joined with ``,`` as the official SDK does.
    """
    picked: dict[str, list[str]] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in ("host", "content-type") or low.startswith("x-acs-"):
            picked.setdefault(low, []).append(value.strip())
    names = sorted(picked)
    block = "".join(f"{n}:{','.join(sorted(picked[n]))}\n" for n in names)
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


_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")


def parse_authorization(value: str) -> ParsedAuthorization | None:
    """Parse an ``Authorization: ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…``
    header; None when it is not of that form (missing or repeated field, empty credential or
    header list, a signature that is not 64 hex digits)."""
    algo, _, rest = value.strip().partition(" ")
    if algo != ALGORITHM or not rest.strip():
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k in fields:
            return None
        fields[k] = v.strip()
    credential = fields.get("Credential", "")
    names = tuple(fields.get("SignedHeaders", "").split(";"))
    sig = fields.get("Signature", "")
    if not credential or not all(names) or not _SIGNATURE_RE.fullmatch(sig):
        return None
    return ParsedAuthorization(credential, names, sig)


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
    does, and compare in constant time.

    False as well when a header named as signed is absent, or when ``host`` or an
    ``x-acs-*`` header that was sent is not among the signed ones: such a request would let
    those headers be changed in transit.
    """
    lower: dict[str, list[str]] = {}
    for k, v in headers.items():
        lower.setdefault(k.lower(), []).append(v.strip())
    names = tuple(n.lower() for n in signed_header_names)
    if any(n not in lower for n in names):
        return False
    must_sign = {n for n in lower if n == "host" or n.startswith("x-acs-")}
    if not must_sign <= set(names):
        return False
    block = "".join(f"{n}:{','.join(sorted(lower[n]))}\n" for n in names)
    canon = canonical_request(method, path, query, block, ";".join(names), body_sha256)
    expected = signature(access_key_secret, string_to_sign(canon))
    if not claimed_signature.isascii():
        return False  # compare_digest refuses non-ASCII str; it cannot match a hex digest
    return hmac.compare_digest(expected, claimed_signature)
