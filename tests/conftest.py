"""Settings every test shares."""

import os
from collections.abc import Iterator

import pytest
import structlog

# Everything the tests talk to is on loopback, started by the tests: a forward proxy that the
# machine's environment names (for the package registries, say) must not carry those
# requests (the config reads these variables; the tests that are about them set their own).
for _name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """Each test starts from the structlog configuration the session had: a test that runs
    a command in-process (``cli.main``) configures logging at that command's level, and a
    later test's ``capture_logs()`` then saw no debug events (filtered before capture)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
