"""The rig of the read API tests, shared by the other ``test_api_*`` modules: a real mirror
synced from the simulator, and the daemon's application (``build_app`` + the read API) on a
real loopback server (aiohttp's TestServer/TestClient)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hpo_sync.api import RUNTIME, add_health_routes
from hpo_sync.api.read import setup_read_api
from hpo_sync.client import UpstreamClient
from hpo_sync.config import (
    ApiConfig,
    Config,
    Secret,
    StoreConfig,
    TokenConfig,
    UpstreamConfig,
    WorkspaceConfig,
)
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.metrics import Metrics
from hpo_sync.normalise import Experiment, format_time, normalise
from hpo_sync.runtime import Runtime
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
from hpo_sync.sim.server import SimOptions, Simulator
from hpo_sync.store import Store
from hpo_sync.sync import SyncEngine

START = datetime(2025, 6, 1, 8, 0, 0, tzinfo=UTC)
WS1, WS2, WS3 = "100001", "100002", "100003"
WORKSPACES = (WS1, WS2, WS3)
#: token name -> (value, workspaces, admin)
TOKENS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "all": ("tok-all-0123456789", (), False),
    "ws1": ("tok-ws1-0123456789", (WS1,), False),
    "ws12": ("tok-ws12-0123456789", (WS1, WS2), False),
    "admin": ("tok-admin-0123456789", (), True),
    "admin-ws2": ("tok-admin-ws2-0123456789", (WS2,), True),
}
GOLDEN_OPTIONS = SimOptions(
    experiments=1500, workspaces=3, seed=7, start_time=START, restart_per_min=0.0
)


def token_configs(names: Sequence[str] | None = None) -> tuple[TokenConfig, ...]:
    return tuple(
        TokenConfig(name, Secret(value, f"test:{name}"), ws, admin)
        for name, (value, ws, admin) in TOKENS.items()
        if names is None or name in names
    )


def make_config(
    db: Path,
    *,
    tokens: tuple[TokenConfig, ...] | None = None,
    listen: str = "127.0.0.1:0",
    endpoint: str | None = None,
    workspaces: Sequence[str] = WORKSPACES,
) -> Config:
    return Config(
        upstream=UpstreamConfig(
            endpoint=endpoint, max_qps=500.0, max_concurrency=4, retry_max_total_s=60.0
        ),
        store=StoreConfig(db),
        workspaces=tuple(WorkspaceConfig(ws, label=f"team {ws}") for ws in workspaces),
        api=ApiConfig(listen=listen, tokens=token_configs() if tokens is None else tokens),
    )


@asynccontextmanager
async def synced(
    db: Path, options: SimOptions, **upstream: Any
) -> AsyncIterator[tuple[Simulator, Store, SyncEngine]]:
    """A simulator, the mirror at ``db`` and an engine whose clock is the world's."""
    async with Simulator(options) as sim:
        config = make_config(db, endpoint=sim.base_url, workspaces=sim.world.workspace_ids)
        if upstream:
            from dataclasses import replace

            config = replace(config, upstream=replace(config.upstream, **upstream))
        store = Store.open(db)
        creds = StaticCredentials(
            CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
        )
        try:
            async with UpstreamClient(config.upstream, creds) as client:
                engine = SyncEngine(config, client, store, clock=lambda: sim.world.now)
                yield sim, store, engine
        finally:
            store.close()


async def build_mirror(db: Path, options: SimOptions = GOLDEN_OPTIONS) -> None:
    """Baseline every workspace, let the world move (hot sweeps record real changes), delete
    a few experiments and let a full sweep notice."""
    async with synced(db, options) as (sim, _store, engine):
        for ws in sim.world.workspace_ids:
            assert (await engine.sweep(ws)).status == "ok"
        for _ in range(3):
            sim.world.advance(120)
            for ws in sim.world.workspace_ids:
                assert (await engine.sweep(ws, "hot")).status == "ok"
        for ws in sim.world.workspace_ids:
            victims = [e["ExperimentId"] for e in sim.world.truth(ws)[:2]]
            for victim in victims:
                sim.world.mutate(victim, delete=True)
            assert (await engine.sweep(ws, "full")).status == "ok"


@pytest.fixture(scope="session")
def golden_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mirror per test session (copied per test: tests may write to theirs)."""
    db = tmp_path_factory.mktemp("golden") / "mirror.db"
    asyncio.run(build_mirror(db))
    return db


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]
    text: str

    @property
    def error_code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return str(code) if code is not None else None
        return None


@dataclass
class ApiRig:
    server: TestServer
    client: TestClient[web.Request, web.Application]
    runtime: Runtime
    store: Store
    app: web.Application
    sync_requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] | Mapping[str, str] = (),
        *,
        token: str | None = "all",
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {TOKENS[token][0]}")
        async with self.client.request(
            method, path, params=params, headers=hdrs, data=data
        ) as resp:
            text = await resp.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = None
            return Reply(resp.status, body, dict(resp.headers), text)

    async def get(self, path: str, params: Any = (), **kw: Any) -> Reply:
        return await self.request("GET", path, params, **kw)

    async def post(self, path: str, params: Any = (), **kw: Any) -> Reply:
        return await self.request("POST", path, params, **kw)

    async def ok(self, path: str, params: Any = (), **kw: Any) -> Any:
        reply = await self.get(path, params, **kw)
        assert reply.status == 200, (reply.status, reply.text)
        return reply.body


def make_runtime(
    config: Config, store: Store, *, now: datetime, sync_requests: list[tuple[str, str]]
) -> Runtime:
    def request_sync(ws: str, mode: str = "auto") -> asyncio.Future[Any]:
        if ws not in config.workspace_ids():
            raise KeyError(ws)
        sync_requests.append((ws, mode))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    return Runtime(
        config=config,
        store=store,
        engine=cast(Any, None),  # the read API never uses the engine
        metrics=Metrics(),
        started_at=now - timedelta(minutes=5),
        request_sync=request_sync,  # type: ignore[arg-type]
        clock=lambda: now,
    )


@asynccontextmanager
async def api_rig(
    db: Path,
    *,
    tokens: tuple[TokenConfig, ...] | None = None,
    now: datetime | None = None,
    store: Store | None = None,
    prepare: Callable[[web.Application], None] | None = None,
    **setup_kw: Any,
) -> AsyncIterator[ApiRig]:
    """The daemon's app (its health routes) plus the read API, over the mirror at ``db``."""
    own_store = store is None
    store = store or Store.open(db)
    config = make_config(db, tokens=tokens)
    requests: list[tuple[str, str]] = []
    runtime = make_runtime(
        config, store, now=now or START + timedelta(hours=1), sync_requests=requests
    )
    # What the daemon's build_app does, spelled out so that setup_kw (a short query budget,
    # another listen address) applies even once build_app calls setup_read_api itself.
    app = web.Application()
    app[RUNTIME] = runtime
    add_health_routes(app)
    setup_read_api(app, runtime, **setup_kw)
    if prepare is not None:
        prepare(app)
    server = TestServer(app, host="127.0.0.1", port=0)
    client = TestClient(server)
    await client.start_server()
    try:
        yield ApiRig(server, client, runtime, store, app, requests)
    finally:
        await client.close()
        if own_store:
            store.close()


@pytest.fixture
async def rig(golden_mirror: Path, tmp_path: Path) -> AsyncIterator[ApiRig]:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    async with api_rig(db) as r:
        yield r


def mirror_rows(store: Store, where: str = "1", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    with store.reader() as conn:
        return [
            dict(r)
            for r in conn.execute(f"SELECT * FROM experiments WHERE {where}", params).fetchall()
        ]


def new_experiment(
    ws: str, exp_id: str, created: datetime, *, status: str = "RUNNING", name: str = "w"
) -> Experiment:
    exp = normalise(
        {
            "ExperimentId": exp_id,
            "WorkspaceId": ws,
            "Name": name,
            "Status": status,
            "Creator": "writer",
            "GmtCreateTime": format_time(created),
            "GmtModifiedTime": format_time(created),
            "TrialCount": 1,
            "TrialStatus": {"RUNNING": 1},
            "Tags": [{"Key": "team", "Value": "nlp"}],
        }
    )
    assert exp is not None
    return exp


def test_the_golden_mirror_has_history_deletions_and_three_workspaces(
    golden_mirror: Path,
) -> None:
    store = Store.open(golden_mirror, readonly=True)
    try:
        counts = {ws: store.counts_by_status(ws, include_deleted=True) for ws in WORKSPACES}
        assert all(sum(c.values()) > 300 for c in counts.values())
        assert mirror_rows(store, "deleted = 1")
        assert store.history(include_baseline=False)
        assert all(s.last_full_ok_at for s in store.workspaces())
    finally:
        store.close()
