"""Cloud credentials: the Alibaba Cloud default chain, via the official package.

``alibabacloud-credentials`` implements the whole chain (environment, OIDC/RRSA, the CLI
profile ``~/.aliyun/config.json``, ``~/.alibabacloud/credentials.ini``, the ECS RAM role with
IMDSv2) and refreshes STS credentials before they expire; hpo-sync only adapts it to a small
protocol so the client can be handed static credentials in tests and the demo.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import CredentialsError
from .logs import CREDENTIALS_LOGGER


@dataclass(frozen=True)
class CloudCredentials:
    access_key_id: str
    access_key_secret: str
    security_token: str | None = None

    def __repr__(self) -> str:
        return f"CloudCredentials(access_key_id={self.access_key_id!r}, secret=***)"


class CredentialsProvider(Protocol):
    async def get(self) -> CloudCredentials: ...


class StaticCredentials:
    """Fixed credentials (tests, the demo, the simulator)."""

    def __init__(self, creds: CloudCredentials) -> None:
        self._creds = creds

    async def get(self) -> CloudCredentials:
        return self._creds


class DefaultChainCredentials:
    """The Alibaba Cloud default credentials chain.

    The chain's refreshable providers (STS, OIDC, ECS role) cache what they fetch and refresh
    it shortly before expiry, so asking per request costs nothing but a check.
    """

    def __init__(self) -> None:
        self._client: Any = None
        # One caller at a time: the library refreshes under a lock of its own that makes
        # concurrent callers wait ~5 s each (blocking their thread) when a refresh fails, so
        # a hot sweep's six concurrent listings took 30 s to report missing credentials.
        self._lock = asyncio.Lock()

    async def get(self) -> CloudCredentials:
        async with self._lock:
            return await self._get()

    async def _get(self) -> CloudCredentials:
        try:
            if self._client is None:
                from alibabacloud_credentials.client import Client

                _tame_library_logging()
                self._client = Client()
            model = await self._client.get_credential_async()
        except Exception as exc:  # the chain raises its own CredentialException and more
            raise CredentialsError(
                "no Alibaba Cloud credentials found: set ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET (or use OIDC, ~/.aliyun/config.json, "
                f"~/.alibabacloud/credentials.ini or an ECS RAM role) — {_first_line(exc)}"
            ) from None
        if not model.access_key_id or not model.access_key_secret:
            raise CredentialsError("the credentials chain returned an empty AccessKey")
        return CloudCredentials(
            model.access_key_id, model.access_key_secret, model.security_token or None
        )


def _tame_library_logging() -> None:
    """The credentials library adds a stderr handler of its own to its ``credentials``
    logger (one per provider module it imports) and logs each provider that fails while
    the chain is being tried, with a traceback: on a machine that is not an ECS instance,
    ~190 lines before our own one-line error, bypassing the configured log format. Its
    records go through our handler (the root's) instead; :func:`hpo_sync.logs.route_stdlib`
    lets them through at debug level only."""
    logger = logging.getLogger(CREDENTIALS_LOGGER)
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)


#: configparser's quote of a line it could not parse, in the chain's (repr'd) text:
#: ``[line  6]: 'q7Hk…\\n'`` and, before any section, ``line: 1\\n'access_key_secret = …'``.
#: A second net behind _PARSER_ERROR, which cuts such quotes whole: for a configparser
#: that words the error before them otherwise.
_QUOTED_LINE = re.compile(
    r"(\[line\s+\d+\]:|line: \d+(?:\\n|\n))\s*('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
)
#: configparser's errors, which quote the file's text after them (a line it could not parse,
#: a value it could not interpolate), in whatever quoting: what follows one, up to the next
#: provider's entry in the chain's list, is left out.
_PARSER_ERROR = re.compile(
    r"(Source contains parsing errors|File contains no section headers"
    r"|'%' must be followed by|[Bb]ad value substitution|[Ii]nterpolation\w*Error)"
)
_NEXT_ENTRY = re.compile(r"""['"], ['"]\w+Provider:|['"]\]\s*$""")
#: ``secret = value``, ``token: value`` and the like, wherever a library quotes them.
_KEYED_SECRET = re.compile(
    r"((?:secret|token|password|passwd)[\w.-]*\s*[=:]\s*)([^\s'\",\]\\]+)", re.IGNORECASE
)


def _first_line(exc: BaseException) -> str:
    """The chain's error, on one line, with nothing in it that may be a secret. It lists
    every provider it tried, the one that is wrong last but one (the ECS role's comes
    last): cut at 300 characters, it never said what was wrong with a credentials file.
    2,000 hold every provider's reason.

    The profile provider's parse errors quote the line they could not read, which can be
    the secret itself (a value wrapped onto a line of its own): that text went to the
    terminal, the log, ``sync_runs.error`` and the read API. Quoted lines are left out,
    and a value after a key named like a secret is masked."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = _cut_parser_quotes(text[0])
    line = _QUOTED_LINE.sub(r"\1 (the line is not shown: it may hold a secret)", line)
    return _KEYED_SECRET.sub(r"\1***", line)[:2000]


def _cut_parser_quotes(text: str) -> str:
    """``text`` without what follows each configparser error up to the next provider's
    entry: the quotes of the file's text there come in too many forms (a line holding a
    ``"``, a ``%`` in a value) for a pattern of the quote itself to catch them all."""
    out, at = [], 0
    while (m := _PARSER_ERROR.search(text, at)) is not None:
        out.append(text[at : m.end()])
        out.append(" (the file's text is not shown: it may hold a secret)")
        nxt = _NEXT_ENTRY.search(text, m.end())
        at = nxt.start() if nxt is not None else len(text)
    out.append(text[at:])
    return "".join(out)
