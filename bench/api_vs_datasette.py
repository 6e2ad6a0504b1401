"""Benchmark: the read API against Datasette and against a bare aiohttp handler (the floor).

One mirror file of ``--experiments`` experiments (100,000 by default, with their config
texts, as the daemon's sweeps store them), written once through ``Store.apply`` from the
simulator's world and kept in ``--db`` for later runs. Each server runs in its own process
on a loopback port and is measured in turn with the same two requests:

- **list**: one workspace, one status, newest first, 50 rows — ``GET /v1/experiments?
  workspace=W&status=FAILED&limit=50`` here, the same SQL through Datasette's ``?sql=`` JSON
  endpoint, and the same SQL in the bare handler;
- **get**: one experiment by id (cycling through 500 ids) — ``GET /v1/experiments/{id}``,
  Datasette's row endpoint, and a primary-key SELECT in the bare handler.

The floor is what serving that SQL over aiohttp costs at the least: a handler that runs the
query in a 4-thread pool over per-thread read-only connections and dumps the rows as JSON.
Datasette runs with 4 SQL threads to match. The load generator is an aiohttp client in this
process with ``--concurrency`` connections, stopping after ``--requests`` requests or
``--seconds`` seconds, whichever comes first, after ``--warmup`` unmeasured requests. Before
measuring, every server's list answer must hold the same 50 ids, or the run fails.

    .venv/bin/python bench/api_vs_datasette.py                  # builds the mirror once
    .venv/bin/python bench/api_vs_datasette.py --concurrency 32 --requests 5000

Needs Datasette (``pip install datasette``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _common import machine, print_table
from aiohttp import web

LIST_STATUS = "FAILED"
LIST_LIMIT = 50
LOOKUP_IDS = 500
COLUMNS = (
    "experiment_id, workspace_id, name, creator, status, job_type, accessibility, description,"
    " trial_count, trial_status, tags, gmt_create_time, gmt_modified_time, deleted,"
    " first_seen_at, last_seen_at, last_changed_at"
)
LIST_SQL = (
    f"SELECT {COLUMNS} FROM experiments WHERE workspace_id = :ws AND status = :st"
    " AND deleted = 0 ORDER BY gmt_create_time DESC, experiment_id DESC LIMIT 50"
)
GET_SQL = f"SELECT {COLUMNS} FROM experiments WHERE experiment_id = :id"
# The CLI with `serve` registered whether or not cli.py lists it.
SERVE_LAUNCHER = """
import sys
from hpo_sync import cli
from hpo_sync.api.serve import register_cli
listed = cli._extra_commands
cli._extra_commands = lambda: [r for r in listed() if r is not register_cli] + [register_cli]
sys.exit(cli.main(sys.argv[1:]))
"""


# --- the mirror ---------------------------------------------------------------------------


def build_mirror(path: Path, experiments: int, seed: int) -> None:
    """Write the world's experiments through the store, one full sweep per workspace."""
    from hpo_sync.normalise import normalise
    from hpo_sync.sim.world import World
    from hpo_sync.store import Store

    started = time.monotonic()
    world = World(seed=seed, experiments=experiments, workspaces=3)
    partial = path.with_name(path.name + ".partial")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{partial}{suffix}").unlink(missing_ok=True)
    store = Store.open(partial)
    try:
        at = "2025-06-01T08:00:00Z"
        for ws in world.workspace_ids:
            exps = [e for e in (normalise(raw) for raw in world.truth(ws)) if e is not None]
            run = store.begin_run(ws, "full", at)
            store.apply(ws, exps, observed_at=at, run_id=run, baseline=True, complete=True)
            store.finish_run(
                run, finished_at=at, status="ok", api_calls=0, pages=0, experiments_seen=len(exps)
            )
            store.record_success(ws, "full", at)
    finally:
        store.close()
    os.replace(partial, path)
    size_mb = path.stat().st_size / 2**20
    print(
        f"built {path}: {experiments:,} experiments, {size_mb:,.0f} MiB, "
        f"{time.monotonic() - started:.1f}s"
    )


def pick_queries(path: Path) -> tuple[str, list[str], list[str]]:
    """The workspace of the list query, its expected 50 ids, and ids to look up."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ws = conn.execute("SELECT workspace_id FROM workspaces ORDER BY 1 LIMIT 1").fetchone()[0]
        expected = [r[0] for r in conn.execute(LIST_SQL, {"ws": ws, "st": LIST_STATUS})]
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT experiment_id FROM experiments ORDER BY random() LIMIT ?", (LOOKUP_IDS,)
            )
        ]
    finally:
        conn.close()
    return ws, expected, ids


# --- the floor: a bare aiohttp handler ----------------------------------------------------------


def run_floor_server(db: Path, port: int) -> None:
    """The least that serving this SQL over aiohttp costs (runs in its own process)."""
    import threading

    local = threading.local()
    pool = ThreadPoolExecutor(4)

    def query(sql: str, params: dict[str, str]) -> bytes:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(sql, params)]
        return json.dumps(rows).encode()

    async def list_handler(request: web.Request) -> web.Response:
        params = {"ws": request.query["workspace"], "st": request.query["status"]}
        body = await asyncio.get_running_loop().run_in_executor(pool, query, LIST_SQL, params)
        return web.Response(body=body, content_type="application/json")

    async def get_handler(request: web.Request) -> web.Response:
        params = {"id": request.match_info["id"]}
        body = await asyncio.get_running_loop().run_in_executor(pool, query, GET_SQL, params)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/list", list_handler)
    app.router.add_get("/get/{id}", get_handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- servers under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    argv: Callable[[int], list[str]]  # port -> command line
    list_url: Callable[[str, int, str], str]  # (base, i, ws) -> url
    get_url: Callable[[str, str], str]  # (base, id) -> url
    list_ids: Callable[[Any], list[str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def servers(db: Path, *, with_datasette: bool) -> list[Server]:
    from urllib.parse import urlencode

    here = Path(__file__).resolve()
    dbname = db.stem
    out = [
        Server(
            "bare aiohttp + same SQL (floor)",
            lambda port: [
                sys.executable,
                str(here),
                "--floor-server",
                "--db",
                str(db),
                "--port",
                str(port),
            ],
            lambda base, _i, ws: f"{base}/list?workspace={ws}&status={LIST_STATUS}",
            lambda base, exp_id: f"{base}/get/{exp_id}",
            lambda body: [r["experiment_id"] for r in body],
        ),
        Server(
            "hpo-sync read API",
            lambda port: [
                sys.executable,
                "-c",
                SERVE_LAUNCHER,
                "serve",
                "--db",
                str(db),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
            ],
            lambda base, _i, ws: (
                f"{base}/v1/experiments?workspace={ws}&status={LIST_STATUS}&limit={LIST_LIMIT}"
            ),
            lambda base, exp_id: f"{base}/v1/experiments/{exp_id}?include_config=false",
            lambda body: [e["experiment_id"] for e in body["experiments"]],
        ),
    ]
    datasette = shutil.which("datasette", path=str(Path(sys.executable).parent)) or shutil.which(
        "datasette"
    )
    if with_datasette and datasette:
        out.append(
            Server(
                "Datasette",
                lambda port: [
                    datasette,
                    "serve",
                    str(db),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--setting",
                    "num_sql_threads",
                    "4",
                    "--setting",
                    "sql_time_limit_ms",
                    "5000",
                ],
                lambda base, _i, ws: (
                    f"{base}/{dbname}.json?"
                    + urlencode({"sql": LIST_SQL, "ws": ws, "st": LIST_STATUS, "_shape": "array"})
                ),
                lambda base, exp_id: f"{base}/{dbname}/experiments/{exp_id}.json?_shape=array",
                lambda body: [r["experiment_id"] for r in body],
            )
        )
    elif with_datasette:
        print("datasette is not installed (pip install datasette): skipping it", file=sys.stderr)
    return out


async def wait_ready(url: str, proc: asyncio.subprocess.Process, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"the server exited early (status {proc.returncode})")
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g}s")


# --- load ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    requests: int
    errors: int
    wall_s: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def pct_ms(self, p: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def load(
    session: aiohttp.ClientSession,
    url_of: Callable[[int], str],
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> Load:
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= max_requests:
                return
            started = time.perf_counter()
            async with session.get(url_of(i)) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(len(latencies), errors, time.perf_counter() - began, latencies)


async def measure(
    server: Server, db: Path, ws: str, expected: list[str], ids: list[str], args: argparse.Namespace
) -> dict[str, Load]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *server.argv(port), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(server.get_url(base, ids[0]), proc)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(server.list_url(base, 0, ws)) as resp:
                body = await resp.json(content_type=None)
                got = server.list_ids(body)
            if got != expected:
                raise SystemExit(f"{server.name}: the list query returned other rows: {got[:3]}…")
            out = {}
            for kind, url_of in (
                ("list", lambda i: server.list_url(base, i, ws)),
                ("get", lambda i: server.get_url(base, ids[i % len(ids)])),
            ):
                await load(
                    session,
                    url_of,
                    concurrency=args.concurrency,
                    max_requests=args.warmup,
                    max_seconds=10,
                )
                out[kind] = await load(
                    session,
                    url_of,
                    concurrency=args.concurrency,
                    max_requests=args.requests,
                    max_seconds=args.seconds,
                )
                if out[kind].errors:
                    raise SystemExit(f"{server.name}: {out[kind].errors} {kind} requests failed")
            return out
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run(args: argparse.Namespace) -> int:
    db = (
        Path(args.db)
        if args.db
        else Path(tempfile.gettempdir()) / (f"hpo-sync-bench-{args.experiments}.db")
    )
    if not db.exists() or args.rebuild:
        build_mirror(db, args.experiments, args.seed)
    ws, expected, ids = pick_queries(db)
    if len(expected) != LIST_LIMIT:
        raise SystemExit(f"workspace {ws} has fewer than {LIST_LIMIT} {LIST_STATUS} experiments")
    print(f"mirror {db} ({db.stat().st_size / 2**20:,.0f} MiB); {machine()}")
    print(
        f"list: workspace={ws} status={LIST_STATUS} newest first, {LIST_LIMIT} rows; get: "
        f"{len(ids)} ids; {args.concurrency} connections, up to {args.requests:,} requests "
        f"or {args.seconds:g}s per measurement\n"
    )
    results: list[tuple[Server, dict[str, Load]]] = []
    for server in servers(db, with_datasette=not args.no_datasette):
        print(f"measuring {server.name} …", file=sys.stderr)
        results.append((server, await measure(server, db, ws, expected, ids, args)))
    floor = results[0][1]
    rows: list[Sequence[object]] = []
    for server, res in results:
        rows.append(
            [
                server.name,
                res["list"].rps,
                res["list"].pct_ms(50),
                res["list"].pct_ms(99),
                f"{res['list'].rps / floor['list'].rps:.2f}×",
                res["get"].rps,
                res["get"].pct_ms(50),
                res["get"].pct_ms(99),
                f"{res['get'].rps / floor['get'].rps:.2f}×",
            ]
        )
    print_table(
        [
            "server",
            "list req/s",
            "p50 ms",
            "p99 ms",
            "of floor",
            "get req/s",
            "p50 ms",
            "p99 ms",
            "of floor",
        ],
        rows,
    )
    by_name = {s.name: r for s, r in results}
    api, ds = by_name.get("hpo-sync read API"), by_name.get("Datasette")
    if api and ds:
        print(
            f"\nread API vs Datasette: list {api['list'].rps / ds['list'].rps:.2f}× the "
            f"requests/s (p99 {api['list'].pct_ms(99):.1f} vs {ds['list'].pct_ms(99):.1f} ms), "
            f"get {api['get'].rps / ds['get'].rps:.2f}× (p99 {api['get'].pct_ms(99):.1f} vs "
            f"{ds['get'].pct_ms(99):.1f} ms)"
        )
    total = sum(len(r[k].latencies_s) for _, r in results for k in r)
    print(
        f"{total:,} measured requests; medians of latency: "
        + ", ".join(
            f"{s.name.split(' ')[0]} {statistics.median(r['list'].latencies_s) * 1000:.1f} ms"
            for s, r in results
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--db", help="the mirror file (built when missing)")
    parser.add_argument("--experiments", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rebuild", action="store_true", help="build the mirror again")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000, help="per measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-datasette", action="store_true")
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_server:
        run_floor_server(Path(args.db), args.port)
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
