"""Benchmark: the web UI's overview page over a 100,000-experiment mirror.

The mirror is the one ``bench/api_vs_datasette.py`` builds (``build_mirror``: the
simulator's world written through ``Store.apply``, config texts included), kept in ``--db``
for later runs. ``hpo-sync serve`` runs in its own process (no tokens: the open loopback
mode, so no sign-in) and ``GET /ui/`` is requested ``--renders`` times, one at a time, after
a warm-up; the table gives the median, p95 and worst time of a whole render through HTTP.

Side by side, what a user would otherwise open: the read API's ``/v1/workspaces`` (the same
per-workspace counts as JSON) and, when Datasette is installed, its HTML table page of
``experiments`` filtered by workspace (``pip install datasette``; without it that row is
skipped).

    .venv/bin/python bench/ui_overview.py                # builds the mirror once (~20 s)
    .venv/bin/python bench/ui_overview.py --renders 200
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from _common import hpo_sync_command, machine, print_table
from api_vs_datasette import add_mirror_arguments, mirror_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


async def timed_gets(url: str, renders: int, warmup: int) -> tuple[list[float], int]:
    """Seconds per GET of ``url`` (sequential, one connection), and the body size."""
    out: list[float] = []
    size = 0
    async with aiohttp.ClientSession() as session:
        for i in range(warmup + renders):
            started = time.perf_counter()
            async with session.get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}: {body[:300]!r}")
            if i >= warmup:
                out.append(time.perf_counter() - started)
            size = len(body)
    return out, size


async def measure(
    name: str, argv: list[str], path: str, renders: int, warmup: int, check: str | None = None
) -> list[object]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *[a.replace("{port}", str(port)) for a in argv],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(base + "/", proc)
        if check is not None:
            async with aiohttp.ClientSession() as session, session.get(base + path) as resp:
                text = await resp.text()
            if check not in text:
                raise RuntimeError(f"{name}: {path} does not contain {check!r}")
        times, size = await timed_gets(base + path, renders, warmup)
    finally:
        proc.terminate()
        await proc.wait()
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return [
        name,
        len(times),
        f"{statistics.median(times) * 1000:.1f}",
        f"{p95 * 1000:.1f}",
        f"{max(times) * 1000:.1f}",
        f"{size / 1024:.1f}",
    ]


async def run(args: argparse.Namespace) -> int:
    db = mirror_file(args.db, args.experiments, args.seed, rebuild=args.rebuild)
    print(f"mirror {db} ({db.stat().st_size / 2**20:,.0f} MiB); {machine()}")
    print(f"{args.renders} sequential renders per row after {args.warmup} warm-up requests\n")
    serve = [
        *hpo_sync_command(),
        "serve",
        "--db",
        str(db),
        "--listen",
        "127.0.0.1:{port}",
        "--log-level",
        "warning",
    ]
    rows = [
        await measure(
            "hpo-sync web UI: GET /ui/ (overview)",
            serve,
            "/ui/",
            args.renders,
            args.warmup,
            check="Last 14 days",
        ),
        await measure(
            "hpo-sync read API: GET /v1/workspaces (JSON)",
            serve,
            "/v1/workspaces",
            args.renders,
            args.warmup,
        ),
    ]
    datasette = shutil.which("datasette", path=str(Path(sys.executable).parent)) or shutil.which(
        "datasette"
    )
    if datasette and not args.no_datasette:
        import sqlite3

        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        ws = conn.execute("SELECT workspace_id FROM workspaces ORDER BY 1 LIMIT 1").fetchone()[0]
        conn.close()
        rows.append(
            await measure(
                f"Datasette: experiments table page, workspace_id={ws} (HTML)",
                [
                    datasette,
                    "serve",
                    str(db),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--setting",
                    "sql_time_limit_ms",
                    "5000",
                ],
                f"/{db.stem}/experiments?workspace_id={ws}",
                args.renders,
                args.warmup,
            )
        )
    elif not args.no_datasette:
        print("datasette is not installed (pip install datasette): skipping it\n", file=sys.stderr)
    print_table(["page", "renders", "median ms", "p95 ms", "max ms", "KiB"], rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_mirror_arguments(parser)
    parser.add_argument("--renders", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-datasette", action="store_true")
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
