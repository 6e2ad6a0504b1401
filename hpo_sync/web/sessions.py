"""Server-side sessions of the web UI.

A session id is 256 random bits (:func:`secrets.token_urlsafe`), sent only as an HttpOnly,
SameSite=Strict cookie; the server keeps, per id, *which token* signed in — as the SHA-256
of the token, never the token itself — and when. Every request re-checks that the token is
still configured (a SIGHUP reload may have removed it), so revoking a token ends its
sessions at once. Sessions live in memory: a restart signs everybody out, which is the safe
direction. Time is passed in (``now``, monotonic seconds), so expiry is tested without
sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import TokenConfig

#: A session ends this long after sign-in, whatever happens.
SESSION_MAX_AGE_S = 12 * 3600
#: ... or after this long without a request.
SESSION_IDLE_S = 2 * 3600
#: At most this many sessions are kept; past it the oldest are dropped.
MAX_SESSIONS = 10_000
#: ... and at most this many of one token; past it that token's oldest are dropped. Without
#: it one token's sign-ins (a script, any token, one workspace's) filled the store and
#: signed every other user out.
MAX_SESSIONS_PER_TOKEN = 100


def token_digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


@dataclass(slots=True)
class Session:
    id: str
    token_digest: bytes
    token_name: str
    created_s: float
    last_used_s: float


class SessionStore:
    """Sessions by id, with absolute and idle expiry."""

    def __init__(
        self,
        *,
        max_age_s: float = SESSION_MAX_AGE_S,
        idle_s: float = SESSION_IDLE_S,
        max_sessions: int = MAX_SESSIONS,
        max_per_token: int = MAX_SESSIONS_PER_TOKEN,
    ) -> None:
        self.max_age_s = max_age_s
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_per_token = max_per_token
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token: TokenConfig, now_s: float) -> Session:
        """A new session for ``token`` (already checked by the caller)."""
        digest = token_digest(token.token.reveal())
        own = [s for s in self._sessions.values() if s.token_digest == digest]
        if len(own) >= self.max_per_token:
            own.sort(key=lambda s: s.last_used_s)
            for old in own[: len(own) - self.max_per_token + 1]:
                del self._sessions[old.id]
        if len(self._sessions) >= self.max_sessions:
            self.purge(now_s)
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.last_used_s)
            del self._sessions[oldest.id]
        session = Session(secrets.token_urlsafe(32), digest, token.name, now_s, now_s)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, now_s: float) -> Session | None:
        """The live session ``session_id`` (its idle clock restarted), or None."""
        if not session_id or len(session_id) > 128:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self.expired(session, now_s):
            del self._sessions[session_id]
            return None
        session.last_used_s = now_s
        return session

    def expired(self, session: Session, now_s: float) -> bool:
        return (
            now_s - session.created_s >= self.max_age_s
            or now_s - session.last_used_s >= self.idle_s
        )

    def delete(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def purge(self, now_s: float) -> int:
        """Drop expired sessions; how many."""
        dead = [sid for sid, s in self._sessions.items() if self.expired(s, now_s)]
        for sid in dead:
            del self._sessions[sid]
        return len(dead)


def current_token(tokens: Sequence[TokenConfig], digest: bytes) -> TokenConfig | None:
    """The configured token whose SHA-256 is ``digest`` (constant time, no early exit), or
    None: the token was removed or changed by a reload."""
    found: TokenConfig | None = None
    for token in tokens:
        if hmac.compare_digest(token_digest(token.token.reveal()), digest) and found is None:
            found = token
    return found
