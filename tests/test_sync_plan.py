"""The pure look-up planner: create-time windows that hold about one page each."""

from __future__ import annotations

import bisect
import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from hpo_sync.sync import plan_windows

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_close_targets_share_a_window_and_distant_ones_do_not() -> None:
    population = [at(s) for s in range(0, 1000, 2)]  # 500 experiments, one every 2 s
    targets = [at(10), at(20), at(30), at(900)]
    assert plan_windows(targets, population, capacity=100) == [(at(10), at(30)), (at(900), at(900))]


def test_no_targets_no_windows() -> None:
    assert plan_windows([], [at(1)], capacity=10) == []


@given(
    pop=st.lists(st.integers(0, 10_000), max_size=300),
    picks=st.lists(st.integers(0, 10_000), max_size=40),
    capacity=st.integers(1, 50),
)
def test_windows_cover_every_target_in_order_within_capacity(
    pop: list[int], picks: list[int], capacity: int
) -> None:
    population = sorted(at(s) for s in pop + picks)  # targets come from the mirror
    targets = sorted(at(s) for s in picks)
    windows = plan_windows(targets, population, capacity)
    for t in targets:
        assert any(lo <= t <= hi for lo, hi in windows)
    for (_, hi), (lo, _) in itertools.pairwise(windows):
        assert hi < lo
    for lo, hi in windows:
        assert lo <= hi
        inside = bisect.bisect_right(population, hi) - bisect.bisect_left(population, lo)
        # a window only ever grows while it holds at most a page; a lone target may exceed
        # it when many experiments share its very second
        assert inside <= capacity or lo == hi
