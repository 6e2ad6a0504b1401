"""Benchmark: list every experiment with hpo-sync's client and with the official SDK.

Starts ``hpo-sync simulate`` as a separate process (frozen world, no faults, no throttling,
``--latency-ms`` added to every answer) and, in one run, lists all of its experiments with:

  (a) ``UpstreamClient.list_all`` — page 1, then the rest concurrently (``--concurrency``);
  (b) the official SDK (``alibabacloud_paiautoml20220828``) in the plain sequential loop a
      user would write;
  (c) the SDK's async API with ``--concurrency`` pages in flight (asyncio.gather under a
      semaphore) — what a user who wants speed could write by hand (``--no-sdk-async`` skips).

With ``--upstream-qps Q`` the simulator throttles above Q requests/s and only (a) runs (the
SDK variants do not retry throttled calls): the run reports the pages/s reached against Q
and the share of throttled answers — how well the adaptive limiter finds an unknown limit.

Every variant asks for the same query (all experiments, ``SortBy=GmtCreateTime``,
``Order=ASC``, ``IncludeConfigData=True``, ``--page-size`` per page) and must return the same
set of ExperimentIds, or the run fails. Run from the repository root:

    .venv/bin/python bench/list_vs_sdk.py --experiments 20000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import machine, peak_rss_mb, print_table, reset_peak_rss, sdk_client, simulator

from hpo_sync.client import ListQuery, UpstreamClient
from hpo_sync.config import UpstreamConfig
from hpo_sync.credentials import CloudCredentials, StaticCredentials
from hpo_sync.logs import configure as configure_logging
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET

SORT_BY = "GmtCreateTime"


@dataclass(frozen=True)
class Outcome:
    """What one variant listed."""

    pages: int
    requests: int
    ids: frozenset[str]
    total_count: int
    throttled: int = 0


@dataclass(frozen=True)
class Measured:
    name: str
    wall_s: float
    peak_mb: float
    outcome: Outcome


def sdk_request(page_number: int, page_size: int) -> Any:
    from alibabacloud_paiautoml20220828.models import (  # type: ignore[import-untyped]
        ListHpoExperimentsRequest,
    )

    return ListHpoExperimentsRequest(
        page_number=page_number,
        page_size=page_size,
        sort_by=SORT_BY,
        order="ASC",
        include_config_data="True",
    )


def run_sdk_sequential(port: int, page_size: int) -> Outcome:
    """The loop a user of the official SDK writes: one page after another."""
    client = sdk_client(port)
    ids: set[str] = set()
    total = 0
    for number in itertools.count(1):
        body = client.list_hpo_experiments(sdk_request(number, page_size)).body
        total = body.total_count
        ids.update(item.experiment_id for item in body.experiments or [])
        if not body.experiments or number * page_size >= total:
            return Outcome(number, number, frozenset(ids), total)
    raise AssertionError("unreachable")


async def run_sdk_async(port: int, page_size: int, concurrency: int) -> Outcome:
    """The SDK's async API: page 1 for TotalCount, then the rest ``concurrency`` at a time."""
    client = sdk_client(port)
    first = (await client.list_hpo_experiments_async(sdk_request(1, page_size))).body
    total = first.total_count
    pages = max(1, -(-total // page_size))
    ids = {item.experiment_id for item in first.experiments or []}
    gate = asyncio.Semaphore(concurrency)

    async def one(number: int) -> list[str]:
        async with gate:
            resp = await client.list_hpo_experiments_async(sdk_request(number, page_size))
        return [item.experiment_id for item in resp.body.experiments or []]

    for chunk in await asyncio.gather(*(one(n) for n in range(2, pages + 1))):
        ids.update(chunk)
    return Outcome(pages, pages, frozenset(ids), total)


async def run_client(base_url: str, page_size: int, concurrency: int, max_qps: float) -> Outcome:
    config = UpstreamConfig(
        endpoint=base_url, page_size=page_size, max_concurrency=concurrency, max_qps=max_qps
    )
    creds = StaticCredentials(CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET))
    async with UpstreamClient(config, creds) as client:
        query = ListQuery(sort_by=SORT_BY, order="ASC", include_config_data=True)
        listing = await client.list_all(query)
        if not listing.complete:
            raise RuntimeError(f"the listing is incomplete: {listing.error}")
        ids = frozenset(str(e["ExperimentId"]) for e in listing.experiments)
        stats = client.stats
        return Outcome(
            listing.pages_read, stats.api_calls, ids, listing.total_count, stats.throttled
        )


def measure(name: str, repeat: int, run: Callable[[], Outcome]) -> Measured:
    """Median wall time of ``repeat`` runs; peak RSS of the process over them."""
    walls: list[float] = []
    outcome: Outcome | None = None
    gc.collect()
    reset_peak_rss()
    for _ in range(repeat):
        started = time.perf_counter()
        outcome = run()
        walls.append(time.perf_counter() - started)
    assert outcome is not None
    return Measured(name, statistics.median(walls), peak_rss_mb(), outcome)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8, help="pages in flight (a, c)")
    parser.add_argument("--max-qps", type=float, default=1000.0, help="the client's ceiling")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-sdk-async", action="store_true", help="skip variant (c)")
    parser.add_argument(
        "--upstream-qps",
        type=float,
        default=0.0,
        help="throttle the simulator above this rate and run only variant (a)",
    )
    args = parser.parse_args(argv)
    limited = args.upstream_qps > 0
    configure_logging("warning", stream=sys.stderr)  # no per-retry debug lines in the table

    sim_args = [
        "--experiments", str(args.experiments),
        "--workspaces", "1",
        "--latency-ms", f"{args.latency_ms:g}",
        "--seed", str(args.seed),
        "--speed", "0",
        "--max-qps", f"{args.upstream_qps:g}",
        "--log-level", "warning",
    ]  # fmt: skip
    limit = f"throttling above {args.upstream_qps:g}/s" if limited else "no throttling"
    print(f"machine: {machine()}")
    print(
        f"simulator: {args.experiments:,} experiments in one workspace, "
        f"{args.latency_ms:g} ms latency, no faults, {limit}; listing all of them, "
        f"{args.page_size} per page, IncludeConfigData=True"
    )
    with simulator(sim_args) as sim:
        results = [
            measure(
                f"hpo-sync list_all ({args.concurrency} in flight)",
                args.repeat,
                lambda: asyncio.run(
                    run_client(sim.base_url, args.page_size, args.concurrency, args.max_qps)
                ),
            ),
        ]
        if not limited:
            results.append(
                measure(
                    "official SDK, sequential loop",
                    args.repeat,
                    lambda: run_sdk_sequential(sim.port, args.page_size),
                )
            )
        if not limited and not args.no_sdk_async:
            results.append(
                measure(
                    f"official SDK async ({args.concurrency} in flight)",
                    args.repeat,
                    lambda: asyncio.run(run_sdk_async(sim.port, args.page_size, args.concurrency)),
                )
            )
        sim_peak_mb = peak_rss_mb(sim.process.pid)

    expected = results[0].outcome
    for r in results:
        if r.outcome.ids != expected.ids or len(r.outcome.ids) != r.outcome.total_count:
            print(f"MISMATCH: {r.name} listed {len(r.outcome.ids)} of {r.outcome.total_count}")
            return 1
    if limited:
        return report_limited(results[0], args.upstream_qps)
    baseline = results[1].wall_s
    print()
    print_table(
        ["variant", "wall s", "pages", "requests", "pages/s", "experiments/s", "vs SDK loop",
         "peak RSS MiB"],
        [
            [
                r.name,
                r.wall_s,
                r.outcome.pages,
                r.outcome.requests,
                r.outcome.pages / r.wall_s,
                len(r.outcome.ids) / r.wall_s,
                f"{baseline / r.wall_s:.2f}x",
                r.peak_mb,
            ]
            for r in results
        ],
    )  # fmt: skip
    print(f"\nevery variant listed the same {len(expected.ids):,} ExperimentIds")
    print(f"simulator process peak RSS: {sim_peak_mb:.0f} MiB")
    return 0


def report_limited(run: Measured, limit_qps: float) -> int:
    out = run.outcome
    achieved = out.pages / run.wall_s
    print()
    print_table(
        ["variant", "wall s", "pages", "requests", "throttled", "pages/s", "limit/s",
         "of limit"],
        [[run.name, run.wall_s, out.pages, out.requests, out.throttled, achieved, limit_qps,
          f"{achieved / limit_qps:.0%}"]],
    )  # fmt: skip
    print(f"\nthrottled answers: {out.throttled / out.pages:.1%} of pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
