"""Property/fuzz test: schemathesis drives every route of the API from its own OpenAPI
document, with valid and deliberately invalid input (negative mode), against a live server
over a real mirror. No input may produce a 5xx; every answer must conform to the document
(status code, content type, body schema, headers), and input the document calls invalid
must be refused with a 4xx."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from test_api_rig import START, TOKENS, api_rig, golden_mirror

from hpo_sync.api.openapi import build_document

schemathesis = pytest.importorskip(
    "schemathesis", reason="the fuzz test needs schemathesis (the test extras list it)"
)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

__all__ = ["golden_mirror"]

schema = schemathesis.openapi.from_dict(build_document())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=25,
    deterministic=True,
)
#: aiohttp's limit on the request line (its ``max_line_size``), method and version included.
MAX_REQUEST_LINE = 8190 - len("GET  HTTP/1.1")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@dataclass
class LiveApi:
    url: str


@pytest.fixture(scope="module")
def live_api(golden_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    """The API on a real loopback port, served from its own thread and event loop (the
    schemathesis client is synchronous)."""
    db = tmp_path_factory.mktemp("fuzz") / "mirror.db"
    shutil.copy(golden_mirror, db)
    ready = threading.Event()
    stop: dict[str, Any] = {}
    url: dict[str, str] = {}

    async def run() -> None:
        stop["event"] = asyncio.Event()
        stop["loop"] = asyncio.get_running_loop()
        async with api_rig(db, now=START + timedelta(hours=1)) as r:
            url["base"] = r.base_url
            ready.set()
            await stop["event"].wait()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield LiveApi(url["base"])
    stop["loop"].call_soon_threadsafe(stop["event"].set)
    thread.join(10)


def _no_long_polls(case: Any) -> None:
    """A valid ``wait`` would hold the request for up to a minute: make it 0 (the long poll
    has its own tests); invalid values are left for the API to refuse."""
    query = case.query or {}
    wait = query.get("wait")
    if isinstance(wait, bool) or not isinstance(wait, int | str):
        return
    if str(wait).isascii() and str(wait).isdigit() and 0 < int(wait) <= 60:
        query["wait"] = 0


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=25)
def test_no_input_breaks_the_api_or_its_contract(case: Any, live_api: LiveApi) -> None:
    _no_long_polls(case)
    headers = {"Authorization": f"Bearer {TOKENS['admin'][0]}"}
    response = case.call(base_url=live_api.url, headers=headers, timeout=30)
    if len(response.request.url) > MAX_REQUEST_LINE:
        # aiohttp's HTTP parser refuses the request line before the app sees it.
        assert response.status_code == 400
        return
    case.validate_response(response, checks=CHECKS, headers=headers)
