"""Prometheus metrics of one daemon, in its own registry (never the global one, so tests and
several daemons in one process stay apart). ``GET /metrics`` serves :meth:`Metrics.render`.

Other parts add their own metrics to :attr:`Metrics.registry` (the read API, the alert worker).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from . import __version__

#: Sweeps run from well under a second (a hot sweep) to many minutes (a first full sweep).
SWEEP_DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric of the sync daemon; make one per daemon."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge(
            "hpo_sync_info", "Version of hpo-sync (always 1)", ["version"], registry=r
        )
        self.info.labels(version=__version__).set(1)
        self.start_time = Gauge(
            "hpo_sync_start_time_seconds", "When the daemon started (Unix time)", registry=r
        )
        self.start_time.set(time.time())
        self.sweeps = Counter(
            "hpo_sync_sweeps",
            "Sweeps by workspace, mode (full/hot) and outcome (ok/partial/failed)",
            ["workspace", "mode", "outcome"],
            registry=r,
        )
        self.sweep_duration = Histogram(
            "hpo_sync_sweep_duration_seconds",
            "Wall time of sweeps",
            ["workspace", "mode"],
            buckets=SWEEP_DURATION_BUCKETS_S,
            registry=r,
        )
        self.upstream_requests = Counter(
            "hpo_sync_upstream_requests",
            "ListHpoExperiments attempts by outcome code (OK or the error code)",
            ["workspace", "code"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "hpo_sync_upstream_retries",
            "Upstream attempts that were retries of a failed attempt",
            ["workspace"],
            registry=r,
        )
        self.upstream_throttled = Counter(
            "hpo_sync_upstream_throttled",
            "Upstream attempts answered with Throttling*",
            ["workspace"],
            registry=r,
        )
        self.changes = Counter(
            "hpo_sync_changes",
            "Change rows written, by tracked field; baseline=true for a workspace's first sync",
            ["workspace", "field", "baseline"],
            registry=r,
        )
        self.last_success = Gauge(
            "hpo_sync_last_success_timestamp_seconds",
            "When the workspace's last successful sweep finished (Unix time)",
            ["workspace"],
            registry=r,
        )
        self.consecutive_failures = Gauge(
            "hpo_sync_consecutive_failures",
            "Failed sweeps of the workspace since its last success",
            ["workspace"],
            registry=r,
        )
        self.backoff = Gauge(
            "hpo_sync_backoff_seconds",
            "Seconds the workspace waits before its next attempt because it keeps failing",
            ["workspace"],
            registry=r,
        )
        self.reloads = Counter(
            "hpo_sync_config_reloads",
            "Config reloads (SIGHUP) by outcome (applied/rejected)",
            ["outcome"],
            registry=r,
        )

    # --- feeding --------------------------------------------------------------------------

    def observe_request(self, code: str, workspace: str, count: int = 1) -> None:
        """The upstream client's observer: called once per attempt (``count``: for that
        many, counted by the sweep process)."""
        self.upstream_requests.labels(workspace=workspace or "-", code=code or "unknown").inc(count)

    def observe_sweep(
        self,
        workspace: str,
        mode: str,
        outcome: str,
        duration_s: float,
        *,
        retries: int = 0,
        throttled: int = 0,
        finished_at_s: float | None = None,
    ) -> None:
        self.sweeps.labels(workspace=workspace, mode=mode, outcome=outcome).inc()
        self.sweep_duration.labels(workspace=workspace, mode=mode).observe(duration_s)
        if retries:
            self.upstream_retries.labels(workspace=workspace).inc(retries)
        if throttled:
            self.upstream_throttled.labels(workspace=workspace).inc(throttled)
        if outcome == "ok":
            self.last_success.labels(workspace=workspace).set(
                time.time() if finished_at_s is None else finished_at_s
            )

    def observe_changes(self, workspace: str, fields: Iterable[tuple[str, bool]]) -> None:
        """Count change rows given as ``(field, baseline)`` pairs."""
        self.count_changes(workspace, collections.Counter(fields))

    def count_changes(self, workspace: str, counts: Mapping[tuple[str, bool], int]) -> None:
        """Count change rows given as ``{(field, baseline): n}``."""
        for (field, baseline), n in counts.items():
            self.changes.labels(
                workspace=workspace, field=field, baseline="true" if baseline else "false"
            ).inc(n)

    def set_failures(self, workspace: str, consecutive: int, backoff_s: float) -> None:
        self.consecutive_failures.labels(workspace=workspace).set(consecutive)
        self.backoff.labels(workspace=workspace).set(backoff_s)

    def init_workspace(self, workspace: str) -> None:
        """Create the workspace's series at zero, so dashboards see it before its first sweep."""
        self.set_failures(workspace, 0, 0.0)

    def forget_workspace(self, workspace: str) -> None:
        """Drop the gauges of a workspace removed from the config (counters keep their
        history until the process restarts, as Prometheus expects of counters)."""
        for gauge in (self.last_success, self.consecutive_failures, self.backoff):
            with contextlib.suppress(KeyError):
                gauge.remove(workspace)

    # --- exposing -------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in the registry."""
        return generate_latest(self.registry)
