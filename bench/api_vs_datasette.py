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

The read API runs as users run it: the real ``hpo-sync serve`` process, with a config file
holding one bearer token (so every request is authenticated) and its Prometheus metrics on.
The floor is what serving the same rows over aiohttp costs at the least: a handler that runs
the same SQL in a thread pool over per-thread read-only connections and dumps the same JSON
fields (``trial_status`` and ``tags`` decoded) with orjson — no auth, cursor, freshness or
metrics; and the same handler with the SQL on the event loop's own thread (no pool, so no
GIL hand-offs, but nothing else can run while a query does). Datasette runs with as many
SQL threads as the floor's pool (``--threads``).

The load generator is ``wrk`` (a separate process, ``--wrk-threads`` threads,
``--connections`` connections, ``--seconds`` per measurement after ``--warmup-s`` unmeasured
seconds), driven by a small Lua script that adds the ``Authorization`` header and cycles the
look-up ids; its ``done()`` prints the summary and latency percentiles as JSON. Before
measuring, every server's list answer must hold the same 50 ids, or the run fails; any
non-2xx answer or socket error under load fails it too.

``--during-sweep`` adds a measurement of the read API's list latency on a copy of the mirror
while another process writes a full sweep of every experiment into it (the store's write
path, one transaction per ``--sweep-batch`` rows, as the daemon's sweeps batch them): once
as fast as the API answers (32 connections saturate it, so any CPU the sweep takes shows as
latency), once paced at ``--paced-rps`` (default 400 req/s, well below saturation: what is
left is whether a read ever waits for the writer).

    .venv/bin/python bench/api_vs_datasette.py                  # builds the mirror once
    .venv/bin/python bench/api_vs_datasette.py --connections 64 --seconds 20 --during-sweep

Needs ``wrk`` on the PATH and Datasette (``pip install -e '.[bench]'``); without Datasette
that row is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from _common import hpo_sync_command, machine, print_table

LIST_STATUS = "FAILED"
LIST_LIMIT = 50
LOOKUP_IDS = 500
TOKEN_ENV = "HPO_SYNC_BENCH_TOKEN"
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
FLOOR, API, DATASETTE = "bare aiohttp + same SQL (floor)", "hpo-sync read API", "Datasette"
FLOOR_INLINE = "floor, SQL on the loop's thread"


# --- the mirror ---------------------------------------------------------------------------


def add_mirror_arguments(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--experiments``, ``--seed``, ``--rebuild``: what :func:`mirror_file` takes."""
    parser.add_argument("--db", help="the mirror file (built when missing)")
    parser.add_argument("--experiments", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rebuild", action="store_true", help="build the mirror again")


def mirror_file(db: str | None, experiments: int, seed: int, *, rebuild: bool) -> Path:
    """The benchmark's mirror: ``db``, else one kept in the temp dir per size. Built when
    missing (or asked to); a file kept from an older hpo-sync is opened read-write once,
    which upgrades its schema in place (``hpo-sync serve`` opens read-only and refuses an
    older mirror)."""
    path = Path(db) if db else Path(tempfile.gettempdir()) / f"hpo-sync-bench-{experiments}.db"
    if not path.exists() or rebuild:
        build_mirror(path, experiments, seed)
    else:
        from hpo_sync.store import Store

        Store.open(path).close()
    return path


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


def run_sweep_writer(db: Path, experiments: int, seed: int, batch: int) -> None:
    """A full sweep of every workspace into ``db`` through the store's write path, after
    the world has moved on a day (so that many rows change), ``batch`` rows a transaction."""
    from hpo_sync.normalise import normalise
    from hpo_sync.sim.world import World
    from hpo_sync.store import Store

    world = World(seed=seed, experiments=experiments, workspaces=3)
    world.advance(86_400)
    sweeps = []
    for ws in world.workspace_ids:
        sweeps.append((ws, [e for e in (normalise(r) for r in world.truth(ws)) if e is not None]))
    store = Store.open(db)
    print("writing", flush=True)
    started = time.monotonic()
    changes = 0
    try:
        at = "2025-06-02T08:00:00Z"
        for ws, exps in sweeps:
            run = store.begin_run(ws, "full", at)
            seen: list[str] = []
            for i in range(0, len(exps), batch):
                chunk = exps[i : i + batch]
                seen.extend(e.experiment_id for e in chunk)
                last = i + batch >= len(exps)
                result = store.apply(
                    ws,
                    chunk,
                    observed_at=at,
                    run_id=run,
                    baseline=False,
                    complete=last,
                    seen_ids_for_deletion=seen if last else None,
                )
                changes += result.changes
            store.finish_run(
                run, finished_at=at, status="ok", api_calls=0, pages=0, experiments_seen=len(exps)
            )
            store.record_success(ws, "full", at)
    finally:
        store.close()
    rows = sum(len(e) for _, e in sweeps)
    print(f"wrote {rows} {changes} {time.monotonic() - started:.2f}", flush=True)


# --- the floor: a bare aiohttp handler ----------------------------------------------------------


def run_floor_server(db: Path, port: int, threads: int) -> None:
    """The least that serving these rows over aiohttp costs (runs in its own process): the
    same SQL, the same JSON fields, nothing else. ``threads`` 0: the SQL runs on the event
    loop's own thread (no GIL hand-offs; a slow query would stall every other request)."""
    import orjson
    from aiohttp import web

    local = threading.local()
    pool = ThreadPoolExecutor(threads) if threads else None

    def query(sql: str, params: dict[str, str]) -> bytes:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        cur = conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        rows = []
        for values in cur:
            row = dict(zip(names, values, strict=True))
            row["trial_status"] = orjson.loads(row["trial_status"] or "{}")
            row["tags"] = orjson.loads(row["tags"] or "[]")
            row["deleted"] = bool(row["deleted"])
            rows.append(row)
        return orjson.dumps(rows)

    async def run_query(sql: str, params: dict[str, str]) -> bytes:
        if pool is None:
            return query(sql, params)
        return await asyncio.get_running_loop().run_in_executor(pool, query, sql, params)

    async def list_handler(request: web.Request) -> web.Response:
        params = {"ws": request.query["workspace"], "st": request.query["status"]}
        body = await run_query(LIST_SQL, params)
        return web.Response(body=body, content_type="application/json")

    async def get_handler(request: web.Request) -> web.Response:
        params = {"id": request.match_info["id"]}
        body = await run_query(GET_SQL, params)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/list", list_handler)
    app.router.add_get("/get/{id}", get_handler)
    # The event loop hpo-sync's own server runs on (uvloop when installed), so that the floor
    # differs from the API only by what the API does per request.
    from hpo_sync.eventloop import loop_factory

    factory = loop_factory()
    loop = factory() if factory is not None else None
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)


# --- servers under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    argv: Callable[[int], list[str]]  # port -> command line
    list_path: Callable[[str], str]  # workspace -> path and query
    get_path: Callable[[str], str]  # experiment id -> path and query
    list_ids: Callable[[Any], list[str]]
    headers: dict[str, str]
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_config(workdir: Path, db: Path) -> Path:
    """A config as a user writes it: the mirror, its workspaces and one bearer token (from
    the environment) that may read every workspace."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        workspaces = [r[0] for r in conn.execute("SELECT workspace_id FROM workspaces")]
    finally:
        conn.close()
    path = workdir / "serve.toml"
    path.write_text(
        f"[store]\npath = {json.dumps(str(db))}\n\n"
        + "".join(f"[[workspaces]]\nid = {json.dumps(ws)}\n\n" for ws in workspaces)
        + f'[[api.tokens]]\nname = "bench"\ntoken_env = "{TOKEN_ENV}"\n'
    )
    return path


def servers(db: Path, workdir: Path, args: argparse.Namespace) -> list[Server]:
    here = Path(__file__).resolve()
    token = secrets.token_urlsafe(32)
    config = api_config(workdir, db)

    def floor(name: str, threads: int) -> Server:
        return Server(
            name,
            lambda port: [
                sys.executable,
                str(here),
                "--floor-server",
                "--db",
                str(db),
                "--port",
                str(port),
                "--threads",
                str(threads),
            ],
            lambda ws: f"/list?workspace={ws}&status={LIST_STATUS}",
            lambda exp_id: f"/get/{exp_id}",
            lambda body: [r["experiment_id"] for r in body],
            {},
            {},
        )

    out = [
        floor(FLOOR, args.threads),
        floor(FLOOR_INLINE, 0),
        Server(
            API,
            lambda port: [
                *hpo_sync_command(),
                "serve",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
            ],
            lambda ws: f"/v1/experiments?workspace={ws}&status={LIST_STATUS}&limit={LIST_LIMIT}",
            lambda exp_id: f"/v1/experiments/{exp_id}?include_config=false",
            lambda body: [e["experiment_id"] for e in body["experiments"]],
            {"Authorization": f"Bearer {token}"},
            {TOKEN_ENV: token},
        ),
    ]
    datasette = shutil.which("datasette", path=str(Path(sys.executable).parent)) or shutil.which(
        "datasette"
    )
    if not args.no_datasette and datasette:
        dbname = db.stem
        out.append(
            Server(
                DATASETTE,
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
                    str(args.threads),
                    "--setting",
                    "sql_time_limit_ms",
                    "5000",
                ],
                lambda ws: (
                    f"/{dbname}.json?"
                    + urlencode({"sql": LIST_SQL, "ws": ws, "st": LIST_STATUS, "_shape": "array"})
                ),
                lambda exp_id: f"/{dbname}/experiments/{exp_id}.json?_shape=array",
                lambda body: [r["experiment_id"] for r in body],
                {},
                {},
            )
        )
    elif not args.no_datasette:
        print("datasette is not installed (pip install datasette): skipping it", file=sys.stderr)
    return out


def fetch_json(url: str, headers: dict[str, str]) -> Any:
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, headers: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early (status {proc.returncode})")
        try:
            fetch_json(url, headers)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within 60s")


# --- load: wrk ----------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths = {%(paths)s}
local headers = {%(headers)s}
local n = 0
function setup(thread)
  thread:set("offset", math.random(1, #paths))
end
function request()
  n = n + 1
  return wrk.format("GET", paths[((n + offset) %% #paths) + 1], headers)
end
%(delay)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


@dataclass(frozen=True)
class Load:
    requests: int
    errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk(
    base: str,
    paths: Sequence[str],
    headers: dict[str, str],
    seconds: float,
    args: argparse.Namespace,
    *,
    rate: float | None = None,
) -> Load:
    """One wrk run over ``paths`` (cycled), its summary. With ``rate``, paced: each
    connection waits ``connections / rate`` seconds after an answer before its next request
    (wrk's ``delay()``), so that the load offered is about ``rate`` requests/s rather than
    as many as the server can take; latency is still measured per request."""
    pause_ms = args.connections * 1000.0 / rate if rate else None
    script = WRK_SCRIPT % {
        "paths": ", ".join(_lua_string(p) for p in paths),
        "headers": ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()),
        "delay": f"function delay() return {pause_ms:.0f} end" if pause_ms else "",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        proc = subprocess.run(
            [
                "wrk",
                "-t",
                str(args.wrk_threads),
                "-c",
                str(args.connections),
                "-d",
                f"{seconds:g}s",
                "--timeout",
                "10s",
                "-s",
                f.name,
                base,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{proc.stdout}\n{proc.stderr}")
    s = json.loads(line[4:])
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return Load(
        s["requests"],
        errors,
        s["duration_us"] / 1e6,
        s["p50_us"] / 1000,
        s["p99_us"] / 1000,
        s["max_us"] / 1000,
    )


def start(server: Server) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        server.argv(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **server.env},
    )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    server: Server, ws: str, expected: list[str], ids: list[str], args: argparse.Namespace
) -> dict[str, Load]:
    proc, base = start(server)
    try:
        wait_ready(base + server.get_path(ids[0]), server.headers, proc)
        got = server.list_ids(fetch_json(base + server.list_path(ws), server.headers))
        if got != expected:
            raise SystemExit(f"{server.name}: the list query returned other rows: {got[:3]}…")
        out = {}
        for kind, paths in (
            ("list", [server.list_path(ws)]),
            ("get", [server.get_path(i) for i in ids]),
        ):
            wrk(base, paths, server.headers, args.warmup_s, args)
            out[kind] = wrk(base, paths, server.headers, args.seconds, args)
            if out[kind].errors:
                raise SystemExit(f"{server.name}: {out[kind].errors} {kind} requests failed")
        return out
    finally:
        stop(proc)


def measure_during_sweep(
    api: Server,
    db: Path,
    workdir: Path,
    ws: str,
    args: argparse.Namespace,
    *,
    rate: float | None = None,
) -> tuple[Load, Load, str]:
    """The read API's list on a copy of the mirror: quiet, then while a full sweep writes;
    as fast as it answers, or paced at ``rate`` requests/s."""
    copy = workdir / "sweep.db"
    shutil.copy(db, copy)
    here = Path(__file__).resolve()
    swept = Server(
        api.name,
        lambda port: [*api.argv(port), "--db", str(copy)],
        api.list_path,
        api.get_path,
        api.list_ids,
        api.headers,
        api.env,
    )
    proc, base = start(swept)
    writer: subprocess.Popen[str] | None = None
    try:
        wait_ready(base + swept.list_path(ws), swept.headers, proc)
        paths = [swept.list_path(ws)]
        wrk(base, paths, swept.headers, args.warmup_s, args)
        quiet = wrk(base, paths, swept.headers, args.seconds, args, rate=rate)
        writer = subprocess.Popen(
            [
                sys.executable,
                str(here),
                "--sweep-writer",
                "--db",
                str(copy),
                "--experiments",
                str(args.experiments),
                "--seed",
                str(args.seed),
                "--sweep-batch",
                str(args.sweep_batch),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        if writer.stdout.readline().strip() != "writing":
            raise SystemExit("the sweep writer failed before writing")
        began = time.monotonic()
        busy = wrk(base, paths, swept.headers, args.seconds, args, rate=rate)
        measured_s = time.monotonic() - began
        report = writer.stdout.readline().split()
        writer.wait()
        if writer.returncode != 0 or len(report) != 4:
            raise SystemExit("the sweep writer failed")
        rows, changes, write_s = int(report[1]), int(report[2]), float(report[3])
        overlap = min(measured_s, write_s)
        note = (
            f"the sweep wrote {rows:,} experiments ({changes:,} changes) in {write_s:.1f}s, "
            f"{args.sweep_batch:,} a transaction; {overlap:.1f}s of the {measured_s:.1f}s "
            "measured overlapped it"
        )
        if quiet.errors or busy.errors:
            raise SystemExit(f"{quiet.errors + busy.errors} requests failed")
        return quiet, busy, note
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        stop(proc)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    db = mirror_file(args.db, args.experiments, args.seed, rebuild=args.rebuild)
    ws, expected, ids = pick_queries(db)
    if len(expected) != LIST_LIMIT:
        raise SystemExit(f"workspace {ws} has fewer than {LIST_LIMIT} {LIST_STATUS} experiments")
    print(f"mirror {db} ({db.stat().st_size / 2**20:,.0f} MiB); {machine()}")
    print(
        f"list: workspace={ws} status={LIST_STATUS} newest first, {LIST_LIMIT} rows; get: "
        f"{len(ids)} ids; wrk -t{args.wrk_threads} -c{args.connections}, {args.seconds:g}s "
        f"per measurement after {args.warmup_s:g}s of warm-up; load average before: "
        f"{load_average()}\n"
    )
    results: dict[str, dict[str, Load]] = {}
    with tempfile.TemporaryDirectory(prefix="hpo-sync-bench-") as tmp:
        workdir = Path(tmp)
        all_servers = servers(db, workdir, args)
        for server in all_servers:
            print(f"measuring {server.name} …", file=sys.stderr)
            results[server.name] = measure(server, ws, expected, ids, args)
        sweeps: list[tuple[float | None, tuple[Load, Load, str]]] = []
        if args.during_sweep:
            print("measuring the read API during a full sweep …", file=sys.stderr)
            api_server = next(s for s in all_servers if s.name == API)
            for rate in (None, *([args.paced_rps] if args.paced_rps else [])):
                sweeps.append(
                    (rate, measure_during_sweep(api_server, db, workdir, ws, args, rate=rate))
                )
    floor = results[FLOOR]
    ds = results.get(DATASETTE)
    rows: list[Sequence[object]] = []
    for name, res in results.items():
        row: list[object] = [name]
        for kind in ("list", "get"):
            load = res[kind]
            row += [load.rps, load.p50_ms, load.p99_ms]
            row.append(f"{load.rps / ds[kind].rps:.2f}×" if ds else "-")
            row.append(f"{load.rps / floor[kind].rps:.2f}×")
        rows.append(row)
    print_table(
        [
            "server",
            "list req/s",
            "p50 ms",
            "p99 ms",
            "÷ Datasette",
            "÷ floor",
            "get req/s",
            "p50 ms",
            "p99 ms",
            "÷ Datasette",
            "÷ floor",
        ],
        rows,
    )
    api = results.get(API)
    if api and ds:
        print(
            f"\nread API vs Datasette: list {api['list'].rps / ds['list'].rps:.2f}× the "
            f"requests/s (p99 {api['list'].p99_ms:.1f} vs {ds['list'].p99_ms:.1f} ms), "
            f"get {api['get'].rps / ds['get'].rps:.2f}× (p99 {api['get'].p99_ms:.1f} vs "
            f"{ds['get'].p99_ms:.1f} ms)"
        )
    if api:
        inline = results[FLOOR_INLINE]
        print(
            f"read API ÷ floor: list {api['list'].rps / floor['list'].rps:.2f}, "
            f"get {api['get'].rps / floor['get'].rps:.2f}; ÷ the floor with SQL on the loop: "
            f"list {api['list'].rps / inline['list'].rps:.2f}, "
            f"get {api['get'].rps / inline['get'].rps:.2f}"
        )
        # "Within 2×" of the faster of the two floors.
        best = max(floor["list"].rps, inline["list"].rps)
        checks = [
            ("list p99 ≤ 20 ms", api["list"].p99_ms <= 20, f"{api['list'].p99_ms:.1f} ms"),
            (
                "list within 2× of the faster floor",
                api["list"].rps * 2 >= best,
                f"{api['list'].rps / best:.2f}×",
            ),
        ]
        if ds:
            checks.insert(
                0,
                (
                    "list ≥ 5× Datasette",
                    api["list"].rps >= 5 * ds["list"].rps,
                    f"{api['list'].rps / ds['list'].rps:.2f}×",
                ),
            )
        print(
            "targets: "
            + "; ".join(f"{name}: {got} {'PASS' if ok else 'MISS'}" for name, ok, got in checks)
        )
    for rate, (quiet, busy, note) in sweeps:
        load = f"paced at {rate:g} req/s" if rate else "as fast as it answers"
        print(
            f"\nread API list during a full sweep, {load}: {busy.rps:,.0f} req/s, p50 "
            f"{busy.p50_ms:.1f} ms, p99 {busy.p99_ms:.1f} ms, max {busy.max_ms:.0f} ms (quiet: "
            f"{quiet.rps:,.0f} req/s, p50 {quiet.p50_ms:.1f} ms, p99 {quiet.p99_ms:.1f} ms, max "
            f"{quiet.max_ms:.0f} ms); {note}"
        )
    print(f"load average after: {load_average()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_mirror_arguments(parser)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument(
        "--threads", type=int, default=2, help="SQL threads of the floor and of Datasette"
    )
    parser.add_argument("--no-datasette", action="store_true")
    parser.add_argument("--during-sweep", action="store_true")
    parser.add_argument("--sweep-batch", type=int, default=2000)
    parser.add_argument(
        "--paced-rps",
        type=float,
        default=400.0,
        help="with --during-sweep, measure once more at this offered load (0: skip)",
    )
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-writer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_server:
        run_floor_server(Path(args.db), args.port, args.threads)
        return 0
    if args.sweep_writer:
        run_sweep_writer(Path(args.db), args.experiments, args.seed, args.sweep_batch)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
