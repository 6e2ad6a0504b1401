"""The default credentials chain's adapter: one caller at a time, and the credentials
library's own logging routed through ours (no network: the chain's client is stood in for,
or only its logger is used)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog

from hpo_sync import logs
from hpo_sync.credentials import DefaultChainCredentials, _tame_library_logging
from hpo_sync.errors import CredentialsError
from hpo_sync.logs import CREDENTIALS_LOGGER


class SlowChain:
    """Stands in for ``alibabacloud_credentials.client.Client``: counts callers in flight."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.in_flight = 0
        self.most = 0
        self.calls = 0

    async def get_credential_async(self) -> SimpleNamespace:
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            if self.fail:
                raise RuntimeError("unable to load credentials from any of the providers")
            return SimpleNamespace(access_key_id="AK", access_key_secret="SK", security_token=None)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("fail", [False, True])
async def test_concurrent_callers_ask_the_chain_one_at_a_time(fail: bool) -> None:
    creds = DefaultChainCredentials()
    chain = SlowChain(fail)
    creds._client = chain
    results = await asyncio.gather(*(creds.get() for _ in range(6)), return_exceptions=True)
    assert chain.calls == 6 and chain.most == 1
    if fail:
        assert all(isinstance(r, CredentialsError) for r in results)
        assert "no Alibaba Cloud credentials found" in str(results[0])
    else:
        assert {(r.access_key_id, r.access_key_secret) for r in results} == {("AK", "SK")}  # type: ignore[union-attr]


@pytest.fixture
def library_logger() -> Iterator[logging.Logger]:
    # Importing a provider module adds the library's own stderr handler to its logger.
    import alibabacloud_credentials.provider.refreshable  # noqa: F401

    logger = logging.getLogger(CREDENTIALS_LOGGER)
    assert any(type(h) is logging.StreamHandler for h in logger.handlers)
    root = logging.getLogger()
    saved = (list(logger.handlers), logger.level, list(root.handlers), root.level)
    filters = list(logger.filters)
    yield logger
    logger.handlers[:], level, root.handlers[:], root_level = saved
    logger.filters[:] = filters
    logger.setLevel(level)
    root.setLevel(root_level)
    structlog.reset_defaults()


def test_the_library_logs_through_our_handler_and_only_at_debug(
    library_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json")
    _tame_library_logging()
    assert not any(type(h) is logging.StreamHandler for h in library_logger.handlers)
    library_logger.warning("Refresh credentials failed, cached value is None")
    library_logger.error("Failed to get RAM session credentials", exc_info=ValueError("x"))
    assert capsys.readouterr().err == ""

    # A reload to debug (logs.configure again, the chain already in use) lets them through.
    logs.configure("debug", "json")
    library_logger.warning("Refresh credentials failed, cached value is None")
    err = capsys.readouterr().err.strip().splitlines()
    # once, as our JSON: not also through the library's own plain handler
    assert len(err) == 1 and '"event": "Refresh credentials failed' in err[0]

    logs.configure("info", "json")  # and a reload back to info silences them again
    library_logger.warning("Refresh credentials failed, cached value is None")
    assert capsys.readouterr().err == ""


def test_provider_modules_imported_later_do_not_let_the_library_log(
    library_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chain imports its provider modules as it first runs, after logging is set up;
    each sets the logger's level to INFO again and adds its own stderr handler: every
    failed sweep then logged the library's warning and a traceback at info."""
    logs.configure("info", "json")
    _tame_library_logging()
    library_logger.setLevel(logging.INFO)  # what importing a provider module does
    library_logger.addHandler(logging.StreamHandler())
    library_logger.warning("Refresh credentials failed, cached value is None")
    library_logger.error("Failed to get RAM session credentials", exc_info=ValueError("x"))
    assert capsys.readouterr().err == ""


def test_the_chains_error_keeps_every_providers_reason() -> None:
    """Cut at 300 characters, the error stopped before the provider that said what was
    wrong (an unsupported type in credentials.ini)."""
    from hpo_sync.credentials import _first_line

    reasons = [
        "EnvironmentVariableCredentialsProvider: Environment variable accessKeyId cannot be empty",
        "OIDCRoleArnCredentialsProvider: roleArn or environment variable "
        "ALIBABA_CLOUD_ROLE_ARN cannot be empty",
        "CLIProfileCredentialsProvider: unable to open credentials file: /root/.aliyun/config.json",
        "ProfileCredentialsProvider: unsupported credential type weird from credentials file "
        "/root/.alibabacloud/credentials.ini",
        "EcsRamRoleCredentialsProvider: Failed to get RAM session credentials from ECS metadata",
    ]
    message = f"unable to get credentials from any of the providers in the chain: {reasons}"
    assert len(message) > 500
    assert "unsupported credential type weird" in _first_line(RuntimeError(message))


_ASK_THE_CHAIN = """
import asyncio
from hpo_sync.credentials import DefaultChainCredentials
from hpo_sync.errors import CredentialsError
try:
    asyncio.run(DefaultChainCredentials().get())
except CredentialsError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    "ini",
    [
        # a secret wrapped onto a line of its own: "Source contains parsing errors … [line 6]"
        "[default]\ntype = access_key\naccess_key_id = sim-id\naccess_key_secret =\n\n{secret}\n",
        # a key before any section: "File contains no section headers … line: 1"
        "access_key_secret = {secret}\n[default]\n",
        # the same two with the secret in double quotes (repr then escapes the quote)
        '[default]\ntype = access_key\naccess_key_id = sim-id\naccess_key_secret =\n\n"{secret}"\n',
        'access_key_secret = "{secret}"\n[default]\n',
        # a secret holding a "%": an interpolation error quotes what follows it
        "[default]\ntype = access_key\naccess_key_id = sim-id\naccess_key_secret = ab%{secret}\n",
    ],
    ids=["wrapped-line", "no-section", "wrapped-quoted", "no-section-quoted", "percent"],
)
def test_a_malformed_credentials_file_never_quotes_its_secret(ini: str, tmp_path: Path) -> None:
    """The real chain, in a process of its own (the library reads HOME when imported), on a
    malformed ~/.alibabacloud/credentials.ini: its parse error quoted the line it could not
    read, the secret itself here, and that text went to the terminal, the log,
    ``sync_runs.error`` and the read API. It says which line instead."""
    secret = "q7Hk2SUPERSECRETvAlUe9Xz"
    (tmp_path / ".alibabacloud").mkdir()
    (tmp_path / ".alibabacloud" / "credentials.ini").write_text(ini.format(secret=secret))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET")
    }
    env.update(HOME=str(tmp_path), ALIBABA_CLOUD_ECS_METADATA_DISABLED="true")
    done = subprocess.run(
        [sys.executable, "-c", _ASK_THE_CHAIN],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    message = done.stdout
    assert "ProfileCredentialsProvider" in message, message
    assert "is not shown: it may hold a secret" in message, message
    assert secret not in message and secret not in done.stderr


def test_a_value_after_a_key_named_like_a_secret_is_masked() -> None:
    from hpo_sync.credentials import _first_line

    text = "['SomeProvider: bad entry access_key_secret=abc123XYZ, security_token: t0k3n']"
    shown = _first_line(RuntimeError(text))
    assert "abc123XYZ" not in shown and "t0k3n" not in shown and "access_key_secret=***" in shown
