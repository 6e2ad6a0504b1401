"""Logging: structlog events, JSON for services and pipes, readable on a terminal.

Everything goes through one ``configure()``; stdlib logging (aiohttp, APScheduler) is routed
into the same renderer so journald gets one format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO, cast

import structlog

#: The logger the credentials library (alibabacloud-credentials) logs to.
CREDENTIALS_LOGGER = "credentials"

_SECRET_KEYS = ("secret", "token", "password", "authorization", "signature")


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """Last line of defence: values of keys that name a secret are never rendered."""
    for key in list(event):
        low = key.lower()
        if any(s in low for s in _SECRET_KEYS) and event[key] is not None:
            event[key] = "***"
    return event


def effective_level() -> int:
    """The level structlog filters at now (``--log-level`` or ``[logging] level``)."""
    level: int = structlog.get_logger().bind().get_effective_level()
    return level


class _Outliving:
    """A log stream that outlives its reader. Once its reader is gone (the pipe's reader
    left, as in ``hpo-sync run 2>&1 | head``; the file was closed), log lines are dropped
    instead of every log call raising wherever it is made: a stop request, a sweep, a
    request handler. Any other write error (a full disk: ENOSPC, EIO) fails that line only,
    and the next are tried again (a full disk used to silence the log for good, however
    soon space was freed): the first line after such failures is preceded by one that says
    how many failed (the stream's buffer may still have written some of them, late)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._broken = False
        self._failures = 0  # lines whose writing failed, not yet told
        self._line_failed = False
        #: set by :func:`configure`: the notice is a JSON line where the log is JSON
        self.json = False

    def write(self, text: str) -> int:
        if self._broken:
            return len(text)
        try:
            if self._failures or self._line_failed:
                # Still failing? Then this line fails too, without piling up in the buffer.
                self._stream.flush()
                if self._failures:
                    self._stream.write(self._failure_notice())
                    self._failures = 0
            self._stream.write(text)
        except (BrokenPipeError, ConnectionError, ValueError):
            self._broken = True  # the reader is gone (ValueError: the file was closed)
        except OSError:
            self._line_failed = True
        if self._line_failed and "\n" in text:  # print() writes a line's end on its own
            self._failures += 1
            self._line_failed = False
        return len(text)

    def _failure_notice(self) -> str:
        event, now = "log.write_failed", datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if self.json:
            notice = {"event": event, "level": "warning", "lines": self._failures}
            return json.dumps({**notice, "timestamp": now}) + "\n"
        return f"{now} [warning  ] {event} lines={self._failures}\n"

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionError, ValueError):
                self._broken = True
            except OSError:
                pass  # what the buffer holds goes with a later flush

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging. ``fmt``: auto (console on a TTY), json, console."""
    outliving = _Outliving(stream or sys.stderr)
    stream = cast(TextIO, outliving)
    use_json = outliving.json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=shared,
        )
    )
    route_stdlib(handler, numeric)


#: Where the parser's reason ends and its excerpt of the request (``b'GET /…'``) begins.
_RAW_EXCERPT_RE = re.compile(r"""\s*b['"]""")
_STATUS_PREFIX_RE = re.compile(r"^\d{3}, message:\s*")
_QUOTED_RE = re.compile(r"""['"?]""")


class ClientGarbageFilter(logging.Filter):
    """aiohttp's server logs a request its HTTP parser refuses (a malformed request line or
    header, a line over 8 KiB, TLS or random bytes on the port) at error level with a
    traceback, although the client is at fault and gets its 400. Such records become one
    info line with the reason; the server's own errors stay as they are.

    The reason only: the parser's message goes on to quote the offending line, which can be
    a request line with ``BearerToken=…`` in its query or an ``Authorization`` header."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
        from aiohttp.web_protocol import RequestPayloadError  # a body it cannot decode

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | RequestPayloadError) and (
            record.levelno > logging.INFO
        ):
            if isinstance(exc, InvalidURLError):
                # Its message is the request target itself, BearerToken=… and all.
                text = "a request target that is not a URL"
            else:
                text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
            reason = _STATUS_PREFIX_RE.sub("", _RAW_EXCERPT_RE.split(str(text), maxsplit=1)[0])
            # Nor a value a message goes on to quote, nor anything past a query's start.
            reason = _QUOTED_RE.split(reason, maxsplit=1)[0]
            record.msg = "refused a malformed HTTP request: %s (%s)"
            record.args = (type(exc).__name__, " ".join(reason.split())[:200])
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class _DebugOnly(logging.Filter):
    """Lets a logger's records through only while the log level is debug."""

    enabled = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.enabled


def route_stdlib(handler: logging.Handler, level: int) -> None:
    """Send stdlib logging (libraries) to ``handler`` at ``level``, minus their chatter."""
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.INFO) if level < logging.INFO else level)
    # aiohttp's access log is noisy at info; the API logs its own request events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Requests the HTTP parser refuses are the client's fault: info, not error.
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientGarbageFilter) for f in server.filters):
        server.addFilter(ClientGarbageFilter())
    # APScheduler: the daemon's scheduler, and the one the credentials chain starts.
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))
    # The credentials library logs every provider that fails while the chain is tried, with
    # a traceback; the chain's outcome is ours to report (CredentialsError), so its records
    # show only at debug. Set here, so that a reload to or from debug applies to it too.
    credentials = logging.getLogger(CREDENTIALS_LOGGER)
    credentials.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL + 1)
    # ... but its provider modules, imported as the chain first runs, set that level to INFO
    # again (and add handlers of their own): a filter on the logger itself, which the
    # library does not touch, decides instead.
    debug_only = next((f for f in credentials.filters if isinstance(f, _DebugOnly)), None)
    if debug_only is None:
        debug_only = _DebugOnly()
        credentials.addFilter(debug_only)
    debug_only.enabled = level <= logging.DEBUG
