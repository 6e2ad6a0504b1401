"""Throughput of Store.apply at the scale the design promises (100,000 experiments)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hpo_sync.normalise import Experiment
from hpo_sync.store import Store

N = 100_000
STATUSES = ["CREATED", "RUNNING", "FAILED", "FINISHED"]


def experiments(n: int, *, flip: bool = False) -> list[Experiment]:
    config = "trialConcurrency: 4\nmaxTrialNumber: 50\n" * 4
    out = []
    for i in range(n):
        status = STATUSES[(i + flip) % 4]
        created = f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z"
        raw: dict[str, Any] = {
            "ExperimentId": f"hpo-{i * 7919 % 1_000_003:07d}",  # not in insertion order
            "WorkspaceId": "ws1",
            "Name": f"sweep_{i}",
            "Status": status,
            "TrialStatus": {"RUNNING": 2, "SUCCEEDED": i % 5},
            "GmtCreateTime": created,
            "ConfigYml": config,
        }
        out.append(
            Experiment(
                experiment_id=f"hpo-{i * 7919 % 1_000_003:07d}",
                workspace_id="ws1",
                name=f"sweep_{i}",
                creator="1234567",
                status=status,
                job_type="DLC",
                accessibility="PRIVATE",
                description="lr sweep",
                trial_count=20,
                trial_status={k: v for k, v in {"RUNNING": 2, "SUCCEEDED": i % 5}.items() if v},
                tags=[{"Key": "team", "Value": "ml"}],
                search_space='{"lr": {"_type": "loguniform", "_value": [1e-05, 0.1]}}',
                config_ini=None,
                config_yml=config,
                gmt_create_time=created,
                gmt_modified_time=created,
                deleted=False,
                raw=raw,
            )
        )
    return out


@pytest.mark.slow
def test_apply_100k_experiments(tmp_path: Path) -> None:
    exps = experiments(N)
    with Store.open(tmp_path / "mirror.db") as store:
        run = store.begin_run("ws1", "full", "2024-03-01T00:00:00Z")
        t0 = time.perf_counter()
        first = store.apply(
            "ws1", exps, observed_at="2024-03-01T00:00:00Z", run_id=run, complete=True,
            baseline=True,
        )  # fmt: skip
        insert_s = time.perf_counter() - t0
        assert first.inserted == N and first.changes == N + sum(1 for e in exps if e.trial_status)

        t0 = time.perf_counter()
        again = store.apply(
            "ws1", exps, observed_at="2024-03-01T01:00:00Z", run_id=run, complete=True,
            baseline=False,
        )  # fmt: skip
        reapply_s = time.perf_counter() - t0
        assert (again.unchanged, again.changes, again.marked_deleted) == (N, 0, 0)
        print(
            f"\ninsert {N / insert_s:,.0f} rows/s; identical re-apply {N / reapply_s:,.0f} rows/s"
        )
        # A gross-regression guard only: the design target is a few seconds on a workstation.
        assert insert_s < 60 and reapply_s < 60
