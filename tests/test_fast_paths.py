"""The performance shortcuts must not change a single result: orjson where it writes and reads
what the json module would, the time fast path, and full sweeps applied in batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
from collections.abc import AsyncIterator
from datetime import UTC, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpo_sync import normalise as normalise_mod
from hpo_sync import sync as sync_mod
from hpo_sync.client import UpstreamClient, _loads
from hpo_sync.config import Config, StoreConfig, UpstreamConfig, WorkspaceConfig
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.errors import StoreError
from hpo_sync.normalise import iso_time, parse_time
from hpo_sync.schema import _CANONICAL, _COMPACT, encode_json, encode_raw, encode_trial_status
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import Store
from hpo_sync.sync import SyncEngine

# --- JSON ---------------------------------------------------------------------------------

# every code point, surrogates included: orjson refuses lone surrogates, json writes them
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)


@given(values)
@settings(max_examples=400)
def test_encoders_write_what_the_json_module_writes(value: Any) -> None:
    assert encode_raw(value) == _CANONICAL.encode(value)
    assert encode_json(value) == _COMPACT.encode(value)


@given(st.dictionaries(any_text, st.integers(min_value=-(2**70), max_value=2**70)))
def test_trial_status_encoding_is_unchanged(counts: dict[str, int]) -> None:
    expected = _CANONICAL.encode({str(k): int(v) for k, v in counts.items() if v})
    assert encode_trial_status(counts) == expected


def test_odd_values_fall_back_to_json() -> None:
    import datetime
    import enum

    class Level(enum.IntEnum):
        HIGH = 1

    for value in (
        {"lr": 1e-05, "small": 1.5e-07},  # orjson would write 0.00001 and 1.5e-7
        {"nan": float("nan"), "inf": float("inf")},
        {"big": 2**64, "neg": -(2**63) - 1},
        {"s": "\ud800"},
        {1: "int key"},
        {"level": Level.HIGH, "at": datetime.datetime(2024, 1, 1)},
    ):
        assert encode_raw(value) == _CANONICAL.encode(value)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError, match="Circular"):
        encode_raw(cycle)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@given(values)
@settings(max_examples=400)
def test_response_bodies_parse_as_json_parses_them(value: Any) -> None:
    body = json.dumps({"Experiments": [value]}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        expected = _json_loads(body)
    except ValueError:  # a lone surrogate is not UTF-8: both must refuse it
        with pytest.raises(ValueError):
            _loads(body)
        return
    assert _same(_loads(body), expected)


@pytest.mark.parametrize(
    "body",
    [
        b'{"Creator": 123456789012345678901234567890}',  # beyond 64 bits: stays an int
        b'{"n": -9223372036854775809, "m": 18446744073709551616}',
        b'{"x": NaN, "y": Infinity}',
        '\ufeff{"bom": 1}'.encode(),
        '{"utf16": 1}'.encode("utf-16"),
        b'{"pair": "\\ud83d\\ude00"}',
    ],
)
def test_bodies_orjson_would_read_differently_go_to_json(body: bytes) -> None:
    assert _same(_loads(body), _json_loads(body))


def _json_loads(body: bytes) -> Any:
    """What ``_loads`` reads: ``json.loads``, but NaN and the infinities (not JSON, which
    no SQLite JSON function reads back) as null."""
    return json.loads(body, parse_constant=lambda _: None)


def test_a_lone_surrogate_escape_reads_as_the_replacement_character() -> None:
    """json reads ``"\\ud800"`` as a lone surrogate, which no UTF-8 (no SQLite text) can
    hold: it becomes U+FFFD, in keys too; a pair stays the character it encodes."""
    body = b'{"esc": "a\\ud800b", "\\udc00": ["\\ud83d\\ude00", 1]}'
    assert _same(_loads(body), {"esc": "a\ufffdb", "\ufffd": ["\U0001f600", 1]})


# --- times --------------------------------------------------------------------------------

digits = st.integers(min_value=0, max_value=99).map(lambda n: f"{n:02d}")
shaped_times = st.builds(
    lambda y, mo, d, sep, h, mi, s, z: f"{y:04d}-{mo}-{d}{sep}{h}:{mi}:{s}{z}",
    st.integers(min_value=0, max_value=9999),
    digits,
    digits,
    st.sampled_from(["T", " ", "t"]),
    digits,
    digits,
    digits,
    st.sampled_from(["Z", "", "z", " Z"]),
)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=8)), ZoneInfo("Asia/Shanghai"), ZoneInfo("UTC")]
)


class _Never:
    def fullmatch(self, value: str) -> None:
        return None


@given(shaped_times, zones)
@settings(max_examples=600)
def test_time_fast_path_matches_the_general_parser(text: str, tz: tzinfo) -> None:
    fast = (parse_time(text, naive_tz=tz), iso_time(text, naive_tz=tz))
    saved: Any = normalise_mod._CANONICAL_RE
    normalise_mod._CANONICAL_RE = _Never()  # type: ignore[assignment]
    try:
        general = (parse_time(text, naive_tz=tz), iso_time(text, naive_tz=tz))
    finally:
        normalise_mod._CANONICAL_RE = saved
    assert fast == general


# --- full sweeps in batches ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def _engine(tmp_path: Path, sim: Simulator, **upstream: Any) -> AsyncIterator[SyncEngine]:
    config = Config(
        upstream=UpstreamConfig(endpoint=sim.base_url, max_qps=500.0, **upstream),
        store=StoreConfig(tmp_path / "mirror.db"),
        workspaces=tuple(WorkspaceConfig(ws) for ws in sim.world.workspace_ids),
    )
    creds = StaticCredentials(CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET))
    with Store.open(config.store.path) as store:
        async with UpstreamClient(config.upstream, creds) as client:
            yield SyncEngine(config, client, store, clock=lambda: sim.world.now)


def _count_applies(
    engine: SyncEngine, monkeypatch: pytest.MonkeyPatch, started: threading.Event | None = None
) -> list[int]:
    sizes: list[int] = []
    apply = engine.store.apply

    def counting(workspace_id: str, experiments: Any, **kw: Any) -> Any:
        sizes.append(len(experiments))
        if started is not None:
            started.set()
        return apply(workspace_id, experiments, **kw)

    monkeypatch.setattr(engine.store, "apply", counting)
    return sizes


async def test_a_full_sweep_applies_whole_batches_and_mirrors_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_mod, "FULL_BATCH_ROWS", 250)
    monkeypatch.setattr(sync_mod, "FULL_BATCH_AGE_S", 60.0)
    async with Simulator(SimOptions(experiments=1000, workspaces=1, seed=5)) as sim:
        ws = sim.world.workspace_ids[0]
        async with _engine(tmp_path, sim, page_size=40, max_concurrency=4) as engine:
            sizes = _count_applies(engine, monkeypatch)
            result = await engine.sweep(ws, "full")
            assert (result.status, result.experiments_seen) == ("ok", 1000), result.error
            # 25 pages of 40 in batches of at least 250 (the last one: the rest); pages that
            # arrive while a batch is written join the next one, up to the pages in flight
            assert sum(sizes) == 1000 and len(sizes) >= 2
            assert all(n >= 250 for n in sizes[:-1])
            assert max(sizes) <= 250 + 2 * 4 * 40
            with engine.store.reader() as conn:
                n = conn.execute("SELECT count(*) FROM experiments").fetchone()[0]
            assert n == 1000 and result.changes > 1000


async def test_pages_that_come_slowly_are_applied_without_waiting_for_a_full_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_mod, "FULL_BATCH_AGE_S", 0.05)
    options = SimOptions(experiments=300, workspaces=1, seed=6, latency_ms=40)
    async with Simulator(options) as sim:
        ws = sim.world.workspace_ids[0]
        async with _engine(tmp_path, sim, page_size=20, max_concurrency=1) as engine:
            sizes = _count_applies(engine, monkeypatch)
            result = await engine.sweep(ws, "full")
            assert result.status == "ok" and sum(sizes) == 300
            # never 2,000 rows buffered: every page or two went in as it aged
            assert len(sizes) >= 5 and max(sizes) < 300


async def test_a_store_error_in_a_batch_fails_the_sweep_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_mod, "FULL_BATCH_ROWS", 100)
    async with Simulator(SimOptions(experiments=1000, workspaces=1, seed=7)) as sim:
        ws = sim.world.workspace_ids[0]
        async with _engine(tmp_path, sim, page_size=50, max_concurrency=4) as engine:
            calls = _count_applies(engine, monkeypatch)
            apply = engine.store.apply

            def failing(workspace_id: str, experiments: Any, **kw: Any) -> Any:
                if len(calls) >= 1:  # the second batch fails
                    raise StoreError("the disk is full; free some space and retry")
                return apply(workspace_id, experiments, **kw)

            monkeypatch.setattr(engine.store, "apply", failing)
            result = await asyncio.wait_for(engine.sweep(ws, "full"), 60)
            assert result.status == "failed"
            assert result.error is not None and re.search("disk is full", result.error)
            # the batches before the failure stay applied; nothing is marked deleted
            with engine.store.reader() as conn:
                rows = conn.execute("SELECT count(*), sum(deleted) FROM experiments").fetchone()
            assert 0 < rows[0] < 1000 and not rows[1]


async def test_a_cancelled_full_sweep_finishes_the_batch_it_was_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync_mod, "FULL_BATCH_ROWS", 200)
    options = SimOptions(experiments=2000, workspaces=1, seed=8, latency_ms=20)
    async with Simulator(options) as sim:
        ws = sim.world.workspace_ids[0]
        async with _engine(tmp_path, sim, page_size=50, max_concurrency=2) as engine:
            started = threading.Event()
            sizes = _count_applies(engine, monkeypatch, started)
            task = asyncio.create_task(engine.sweep(ws, "full"))
            assert await asyncio.to_thread(started.wait, 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            run = engine.store.sync_runs(ws)[0]
            assert run.status == "failed" and "cancelled" in (run.error or "")
            with engine.store.reader() as conn:
                n = conn.execute("SELECT count(*) FROM experiments").fetchone()[0]
            # whole batches only: what was being written when the cancel came is there too
            assert n == sum(sizes) and 0 < n < 2000
