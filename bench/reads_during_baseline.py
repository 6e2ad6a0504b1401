"""Benchmark: the read API of ``hpo-sync run`` while the daemon writes its own baseline.

``hpo-sync run`` sweeps in a child process (``[sync] sweep_process = true``, the default)
so that a full sweep does not slow its read API down. This measures that against the same
daemon with its sweeps in its own process (``sweep_process = false``, the peer a user would
otherwise run), side by side in one run:

1. start the simulator (``hpo-sync simulate``, its own process: ``--experiments`` in one
   workspace, ``--latency-ms`` per answer, frozen world);
2. for each variant, ``--repeat`` times, interleaved: start ``hpo-sync run`` on an empty
   mirror (one bearer token, metrics on, full sweep of 8 pages in flight), wait until it
   answers ``/healthz``, then drive the list query (the workspace, ``status=FAILED``, newest
   first, 50 rows) with ``wrk`` for ``--seconds`` while the baseline runs; check that the
   baseline was still running when ``wrk`` stopped (otherwise the run says so and fails);
   wait for the baseline to finish and drive the same query again, "after";
3. report requests/s and p50/p99 latency during and after, the baseline's own duration, and
   the ratios between the variants. Any non-2xx answer or socket error fails the run.

The list query's answer grows while the mirror fills (early on, few FAILED experiments are
stored yet), which is why "during" can be faster than "after": compare variants within a
column, not columns.

    .venv/bin/python bench/reads_during_baseline.py                 # ~2 minutes on 2 CPUs
    .venv/bin/python bench/reads_during_baseline.py --repeat 3 --seconds 6
    .venv/bin/python bench/reads_during_baseline.py --paced-rps 400   # below saturation

Needs ``wrk`` on the PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import hpo_sync_command, machine, print_table, simulator
from api_vs_datasette import Load, free_port, wrk

from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET

WORKSPACE = "100001"
TOKEN_ENV = "HPO_SYNC_BENCH_TOKEN"
CHILD, INPROC = "sweep_process = true (default)", "sweep_process = false"
VARIANTS = {CHILD: True, INPROC: False}


def config(path: Path, *, endpoint: str, db: Path, port: int, sweep_process: bool) -> Path:
    path.write_text(
        "[upstream]\n"
        f'endpoint = "{endpoint}"\n'
        "page_size = 100\nmax_concurrency = 8\nmax_qps = 10000\n\n"
        f'[store]\npath = "{db}"\n\n'
        f"[sync]\nsweep_process = {'true' if sweep_process else 'false'}\n\n"
        f'[api]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[[api.tokens]]\nname = "bench"\ntoken_env = "{TOKEN_ENV}"\n\n'
        '[logging]\nlevel = "warning"\n\n'
        f'[[workspaces]]\nid = "{WORKSPACE}"\n'
    )
    return path


def get_json(url: str, token: str) -> object:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def workspace(base: str, token: str) -> dict[str, Any]:
    """The benchmark workspace's entry of ``GET /v1/workspaces``."""
    data = get_json(f"{base}/v1/workspaces", token)
    assert isinstance(data, dict)
    return next(w for w in data["workspaces"] if w["workspace_id"] == WORKSPACE)


def one_run(
    sim_url: str, work: Path, sweep_process: bool, args: argparse.Namespace
) -> tuple[Load, Load, float]:
    db = work / "mirror.db"
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    port = free_port()
    cfg = config(work / "run.toml", endpoint=sim_url, db=db, port=port, sweep_process=sweep_process)
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        TOKEN_ENV: token,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEFAULT_ACCESS_KEY_SECRET,
    }
    base = f"http://127.0.0.1:{port}"
    path = f"/v1/experiments?workspace={WORKSPACE}&status=FAILED&limit=50"
    headers = {"Authorization": f"Bearer {token}"}
    began = time.monotonic()
    proc = subprocess.Popen(
        [*hpo_sync_command(), "--config", str(cfg), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(f"{base}/healthz", token)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("hpo-sync run did not start") from None
                time.sleep(0.05)
        during = wrk(base, [path], headers, args.seconds, args, rate=args.paced_rps)
        if not workspace(base, token)["sweeping"]:
            raise SystemExit(
                f"the baseline ended before wrk did ({args.seconds:g} s): use fewer --seconds "
                "or more --experiments"
            )
        while not workspace(base, token)["last_full_sync_at"]:  # the baseline's end
            if proc.poll() is not None:
                raise SystemExit("hpo-sync run exited during the baseline")
            time.sleep(0.1)
        swept_s = time.monotonic() - began
        after = wrk(base, [path], headers, args.seconds, args, rate=args.paced_rps)
        for label, load in (("during", during), ("after", after)):
            if load.errors:
                raise SystemExit(f"{label}: {load.errors} requests failed")
        return during, after, swept_s
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=6.0, help="per wrk measurement")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant (median shown)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument(
        "--paced-rps",
        type=float,
        help="offer about this many requests/s (wrk pauses between requests) rather than "
        "as many as the API answers",
    )
    args = parser.parse_args(argv)
    print(machine())
    print(
        f"\n## `hpo-sync run` list reads during its own baseline: {args.experiments:,} "
        f"experiments, {args.latency_ms:g} ms latency, wrk -c{args.connections}"
        f"{f' paced at {args.paced_rps:g} req/s' if args.paced_rps else ''}, "
        f"{args.seconds:g} s per measurement, median of {args.repeat}"
    )
    sim_args = [
        "--experiments", str(args.experiments), "--workspaces", "1",
        "--latency-ms", f"{args.latency_ms:g}", "--speed", "0", "--log-level", "warning",
    ]  # fmt: skip
    results: dict[str, list[tuple[Load, Load, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, simulator(sim_args) as sim:
        for i in range(args.repeat):
            for name, flag in VARIANTS.items():
                r = one_run(sim.base_url, Path(tmp), flag, args)
                results[name].append(r)
                print(
                    f"  run {i + 1}/{args.repeat} {name:30s} during {r[0].rps:7,.0f} req/s "
                    f"p99 {r[0].p99_ms:6.1f} ms | after {r[1].rps:7,.0f} req/s "
                    f"p99 {r[1].p99_ms:6.1f} ms | baseline {r[2]:5.1f} s",
                    flush=True,
                )

    def med(name: str, pick: str) -> float:
        runs = results[name]
        values = {
            "d_rps": [r[0].rps for r in runs],
            "d_p50": [r[0].p50_ms for r in runs],
            "d_p99": [r[0].p99_ms for r in runs],
            "a_rps": [r[1].rps for r in runs],
            "a_p50": [r[1].p50_ms for r in runs],
            "a_p99": [r[1].p99_ms for r in runs],
            "swept": [r[2] for r in runs],
        }[pick]
        return statistics.median(values)

    rows = [
        [
            name,
            f"{med(name, 'd_rps'):,.0f}",
            f"{med(name, 'd_p50'):.1f}",
            f"{med(name, 'd_p99'):.1f}",
            f"{med(name, 'a_rps'):,.0f}",
            f"{med(name, 'a_p50'):.1f}",
            f"{med(name, 'a_p99'):.1f}",
            f"{med(name, 'swept'):.1f}",
        ]
        for name in VARIANTS
    ]
    print()
    print_table(
        [
            "hpo-sync run",
            "during req/s",
            "during p50 ms",
            "during p99 ms",
            "after req/s",
            "after p50 ms",
            "after p99 ms",
            "start to baseline done, s",
        ],
        rows,
    )
    print(
        f"\nsweeps in a child process: {med(CHILD, 'd_rps') / med(INPROC, 'd_rps'):.2f}x the "
        f"requests/s during the baseline, p99 {med(CHILD, 'd_p99'):.1f} vs "
        f"{med(INPROC, 'd_p99'):.1f} ms ({med(INPROC, 'd_p99') / med(CHILD, 'd_p99'):.2f}x "
        f"lower); baseline {med(CHILD, 'swept') / med(INPROC, 'swept'):.2f}x the time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
