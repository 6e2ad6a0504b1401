"""The one exception tree of hpo-sync.

Every error the product raises on purpose derives from :class:`HpoSyncError`; errors of
aiohttp, sqlite3 and the TOML parser are mapped onto it at the boundary where they occur.
"""

from __future__ import annotations

#: How much of an upstream's message (or of a library's error about its answer) an error
#: keeps, and of a request id: errors go to one summary line, the log, ``sync_runs.error``.
MAX_MESSAGE_CHARS = 500
MAX_REQUEST_ID_CHARS = 100

_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\t": " "})


def _one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters: line breaks become
    spaces, other control characters (a terminal's escape sequences among them) are
    shown escaped, and what is past the limit is cut, marked with an ellipsis. An
    upstream's message reached the terminal raw (an ESC[2J cleared it) and could fill
    ``sync_runs.error`` with kilobytes."""
    text = text.translate(_LINE_BREAKS)
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_path(path: object, limit: int = 80) -> str:
    """A file name for a message: as it is, or past ``limit`` characters its start and end
    and its length (a path of thousands of characters filled the terminal)."""
    text = str(path)
    if len(text) > limit:
        return f"{text[:40]}…{text[-30:]} ({len(text)} characters)"
    return text


class HpoSyncError(Exception):
    """Base class of every error hpo-sync raises on purpose."""


class ConfigError(HpoSyncError):
    """The configuration file or command line is invalid; the message names the key."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        self.key = key
        self.line = line
        where = ""
        if key:
            where = f"{key}: "
        if line is not None:
            where = f"{where[:-2]} (line {line}): " if key else f"line {line}: "
        super().__init__(f"{where}{message}")
        self.bare_message = message


class CredentialsError(HpoSyncError):
    """No usable Alibaba Cloud credentials could be found or refreshed."""


class UpstreamError(HpoSyncError):
    """A call to the ListHpoExperiments API failed."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        workspace_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.code = code
        self.http_status = http_status
        self.workspace_id = workspace_id
        self.hint = hint
        self.upstream_message = _one_line(message, MAX_MESSAGE_CHARS)
        self.request_id = _one_line(request_id, MAX_REQUEST_ID_CHARS) if request_id else None
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.workspace_id:
            parts.append(f"workspace {self.workspace_id}")
        if self.code:
            parts.append(self.code)
        if self.http_status is not None:
            parts.append(f"HTTP {self.http_status}")
        head = ", ".join(parts)
        text = f"{head}: {self.upstream_message}" if head else self.upstream_message
        if self.request_id:
            text += f" (RequestId {self.request_id})"
        if self.hint:
            text += f" — {self.hint}"
        return text


class RetryableUpstreamError(UpstreamError):
    """A failure worth retrying: throttling, 5xx, timeouts, resets, malformed bodies."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ThrottledError(RetryableUpstreamError):
    """The gateway said Throttling*: slow the whole client down, then retry."""


class RetriesExhaustedError(UpstreamError):
    """A retryable failure went on past the retry budget (attempts or total time)."""


class FatalUpstreamError(UpstreamError):
    """A failure that retrying cannot fix: bad signature, unknown key, access denied, bad input."""


class StoreError(HpoSyncError):
    """The SQLite mirror cannot be opened, migrated or written."""


class StoreBusyError(StoreError):
    """A write waited ``busy_timeout`` for another connection's write lock (SQLITE_BUSY):
    transient, unlike most store errors; the work can simply be tried again."""


class BackupExistsError(StoreError):
    """A backup's destination exists (and was not to be replaced)."""


class StoreInUseError(StoreError):
    """Another hpo-sync process holds the mirror's single-instance lock."""


class SchemaTooOldError(StoreError):
    """The mirror's schema is older than this code's, and the open was not to upgrade it."""


class SchemaTooNewError(StoreError):
    """The mirror was written by a newer hpo-sync whose schema this version does not know."""


class DeliveryError(HpoSyncError):
    """A chat webhook delivery failed."""


class ShuttingDownError(HpoSyncError):
    """The daemon is stopping: it starts no sweep any more (``POST /v1/sync`` answers 503)."""
