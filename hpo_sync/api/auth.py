"""Who is asking: bearer tokens from ``[[api.tokens]]``, and the open loopback mode.

Decisions (documented in the README, "Read API"):

- **Tokens configured**: every route but ``/healthz``, ``/readyz`` and ``/openapi.json``
  needs a valid token. It is read from ``Authorization: Bearer <token>`` or
  ``x-acs-bearer-token: <token>`` (what the official Alibaba Cloud SDK sends when configured
  with ``bearer_token``); the upstream-compatible route also reads the ``BearerToken`` query
  parameter (the SDK's RPC style). Tokens are compared in constant time: the SHA-256 of the
  presented token against the SHA-256 of *every* configured token with
  :func:`hmac.compare_digest`, without stopping at a match (so neither the length nor the
  position of a match leaks through timing).
- A token's ``workspaces`` limit what it sees on every route; ``[]`` means every workspace.
  ``/metrics`` and the details of ``/readyz`` carry every workspace's figures, so they need a
  token without limits. Admin routes need ``admin = true``.
- **No tokens configured**: open access, but only on loopback. The API refuses to start
  (:class:`~hpo_sync.errors.ConfigError`) when it would listen elsewhere, and every request
  must come from a loopback peer with a loopback ``Host`` header (a web page cannot reach the
  API through DNS rebinding). Admin routes are refused in this mode: "sync now" needs an
  admin token, so that no local process or web page can make the daemon call upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ..config import TokenConfig
from ..errors import ConfigError
from .errors import ForbiddenError, UnauthorizedError

__all__ = [
    "Authenticator",
    "Principal",
    "check_listen_allowed",
    "host_header_is_loopback",
    "is_loopback_host",
    "presented_token",
]

ACS_BEARER_HEADER = "x-acs-bearer-token"
BEARER_QUERY_PARAM = "BearerToken"
#: Tokens longer than this are not compared at all (no configured token is this long).
MAX_TOKEN_LEN = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a configured token, or the anonymous caller of the open loopback mode."""

    name: str
    #: Workspaces it may see; None: every workspace.
    workspaces: frozenset[str] | None
    admin: bool
    #: Authenticated by a token (False: the open loopback mode).
    by_token: bool

    @property
    def full_access(self) -> bool:
        """May see every workspace (and so /metrics and the details of /readyz)."""
        return self.workspaces is None

    def can_see(self, workspace_id: str | None) -> bool:
        return self.workspaces is None or (
            workspace_id is not None and workspace_id in self.workspaces
        )

    def scope(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The workspaces a query may cover: ``requested`` (each must be visible), else the
        token's own list, else ``()`` meaning all. Raises :class:`ForbiddenError`."""
        for ws in requested:
            if not self.can_see(ws):
                raise ForbiddenError(
                    f"token {self.name!r} may not read workspace {ws!r}",
                    code="workspace_forbidden",
                )
        if requested:
            return tuple(dict.fromkeys(requested))
        if self.workspaces is not None:
            return tuple(sorted(self.workspaces))
        return ()

    @classmethod
    def from_token(cls, token: TokenConfig) -> Principal:
        return cls(
            name=token.name,
            workspaces=frozenset(token.workspaces) if token.workspaces else None,
            admin=token.admin,
            by_token=True,
        )


ANONYMOUS = Principal(
    name="anonymous (loopback, no tokens configured)", workspaces=None, admin=False, by_token=False
)


def is_loopback_host(host: str) -> bool:
    """Is ``host`` (an address or ``localhost``, brackets allowed) a loopback address?"""
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def host_header_is_loopback(host_header: str | None) -> bool:
    """Does a ``Host`` header (``name[:port]``, ``[v6][:port]``) name a loopback host?"""
    if not host_header:
        return False
    value = host_header.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return False
        return is_loopback_host(value[1:end])
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return is_loopback_host(value)


def check_listen_allowed(listen_host: str, tokens: Collection[TokenConfig]) -> None:
    """Refuse to serve without tokens anywhere but on loopback (:class:`ConfigError`)."""
    if not tokens and not is_loopback_host(listen_host):
        raise ConfigError(
            f"the API would listen on {listen_host}, which is not a loopback address, with no "
            "[[api.tokens]] configured: add a token (token_env or token_file), or listen on "
            "127.0.0.1 / [::1]",
            key="api.listen",
        )


def presented_token(
    headers: Mapping[str, str], query: Mapping[str, str], *, allow_query: bool
) -> str | None:
    """The bearer token a request presents, if any: ``Authorization: Bearer``, else
    ``x-acs-bearer-token``, else (``allow_query``) the ``BearerToken`` query parameter."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    acs = headers.get(ACS_BEARER_HEADER)
    if acs and acs.strip():
        return acs.strip()
    if allow_query:
        q = query.get(BEARER_QUERY_PARAM)
        if q:
            return q
    return None


class Authenticator:
    """Resolves requests to a :class:`Principal` against the tokens in force.

    The token table is re-derived whenever the configured tuple changes (a SIGHUP reload
    replaces the config), so revoked tokens stop working at once.
    """

    def __init__(self) -> None:
        self._tokens: tuple[TokenConfig, ...] | None = None
        self._table: list[tuple[bytes, TokenConfig, Principal]] = []

    def _digests(
        self, tokens: tuple[TokenConfig, ...]
    ) -> list[tuple[bytes, TokenConfig, Principal]]:
        if tokens is not self._tokens:
            self._table = [(_digest(t.token.reveal()), t, Principal.from_token(t)) for t in tokens]
            self._tokens = tokens
        return self._table

    def _match(
        self, tokens: tuple[TokenConfig, ...], presented: str
    ) -> tuple[TokenConfig, Principal] | None:
        if len(presented) > MAX_TOKEN_LEN:
            return None
        digest = _digest(presented)
        found: tuple[TokenConfig, Principal] | None = None
        for candidate, token, principal in self._digests(tokens):
            # No early exit: every token is compared whatever matched.
            if hmac.compare_digest(digest, candidate) and found is None:
                found = (token, principal)
        return found

    def match(self, tokens: tuple[TokenConfig, ...], presented: str) -> TokenConfig | None:
        """The configured token equal to ``presented``, compared in constant time."""
        found = self._match(tokens, presented)
        return found[0] if found is not None else None

    def resolve(
        self,
        tokens: tuple[TokenConfig, ...],
        presented: str | None,
        *,
        listen_host: str,
        peer: str | None,
        host_header: str | None,
    ) -> Principal:
        """The caller, or :class:`UnauthorizedError` / :class:`ForbiddenError`."""
        if not tokens:
            if not is_loopback_host(listen_host):
                raise UnauthorizedError(
                    "no [[api.tokens]] are configured and the API listens on a non-loopback "
                    "address: add a token to the config and reload",
                    code="no_tokens_configured",
                )
            if peer is None or not is_loopback_host(peer):
                raise ForbiddenError(
                    "without [[api.tokens]] only loopback clients are served",
                    code="loopback_only",
                )
            if not host_header_is_loopback(host_header):
                raise ForbiddenError(
                    "without [[api.tokens]] the Host header must name a loopback address "
                    "(localhost, 127.0.0.1, [::1]); this guards against DNS rebinding",
                    code="loopback_only",
                )
            return ANONYMOUS
        if presented is None:
            raise UnauthorizedError(
                "a bearer token is required: send 'Authorization: Bearer <token>' (or "
                "'x-acs-bearer-token: <token>')",
                code="token_required",
            )
        found = self._match(tokens, presented)
        if found is None:
            raise UnauthorizedError("the bearer token is not valid", code="invalid_token")
        return found[1]  # made once per token table (Principal is frozen)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
