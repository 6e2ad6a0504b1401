"""AdaptiveRateLimiter against a fake clock: no test here sleeps for real.

The simulations run real asyncio tasks on an event loop whose clock is virtual: when every
task is waiting, the loop jumps straight to the next timer instead of sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpo_sync.ratelimit import AdaptiveRateLimiter

T = TypeVar("T")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _JumpingSelector(selectors.SelectSelector):
    """A selector that, instead of blocking for ``timeout``, moves the clock on by it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("deadlock: every task waits and no timer is set")
        if timeout > 0:
            self._clock.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._virtual_clock = clock

    def time(self) -> float:
        return self._virtual_clock()


def run_virtual(clock: FakeClock, main: Coroutine[Any, Any, T]) -> T:
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


async def virtual_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


# --- pacing ------------------------------------------------------------------------------


def test_paces_evenly_at_the_ceiling() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    delays = [limiter.reserve() for _ in range(6)]
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert limiter.rate == limiter.ceiling == 10


def test_sending_at_the_ceiling_for_a_while_keeps_the_spacing() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(4, clock=clock)
    sent = []
    for _ in range(40):
        clock.advance(limiter.reserve())
        sent.append(clock())
        limiter.on_success()
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps == pytest.approx([0.25] * len(gaps))


def test_idle_time_does_not_bank_a_burst() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(5, clock=clock)
    limiter.reserve()
    clock.advance(3600)
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([0.0, 0.2, 0.4])


def test_a_slot_past_the_deadline_is_not_waited_for_and_is_given_back() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock, sleep=virtual_sleep)

    async def main() -> list[tuple[bool, float]]:
        out = []
        for deadline in (None, None, clock() + 0.15, clock() + 0.25, None):
            began = clock()
            out.append((await limiter.acquire(deadline), round(clock() - began, 3)))
        return out

    # slots at +0, +0.1, then +0.2 is past a deadline of +0.15: no wait, and the slot goes
    # to the next caller, who waits for it as if the refused one had never asked
    assert run_virtual(clock, main()) == [
        (True, 0.0), (True, 0.1), (False, 0.0), (True, 0.1), (True, 0.1)
    ]  # fmt: skip


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
def test_rejects_a_non_positive_ceiling(bad: float) -> None:
    with pytest.raises(ValueError, match="max_qps"):
        AdaptiveRateLimiter(bad)


# --- decrease ----------------------------------------------------------------------------


def _send_successes(limiter: AdaptiveRateLimiter, clock: FakeClock, qps: float, s: float) -> None:
    """The application asks for ``qps`` (below the limiter's rate) and every call succeeds."""
    for _ in range(round(qps * s)):
        clock.advance(1 / qps)
        clock.advance(max(0.0, limiter.reserve()))
        limiter.on_success()


def test_throttle_pauses_everyone_for_retry_after() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 2)
    limiter.on_throttle(2.5)
    first = limiter.reserve()
    assert first == pytest.approx(2.5)
    assert limiter.reserve() > first  # everyone after it, paced
    assert limiter.throttle_events == 1


def test_throttle_without_retry_after_waits_one_interval() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 2)
    limiter.on_throttle(None)
    assert limiter.reserve() == pytest.approx(1 / limiter.rate)


def test_throttle_lowers_the_rate_to_about_090_of_recent_goodput() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 4)
    limiter.on_throttle(None)
    assert limiter.rate == pytest.approx(0.9 * 5, rel=0.1)
    assert limiter.limit_estimate == pytest.approx(5, rel=0.1)


def test_throttle_never_raises_the_rate() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(2, clock=clock)
    _send_successes(limiter, clock, 2, 4)  # goodput at the ceiling
    limiter.on_throttle(None)
    assert limiter.rate == pytest.approx(1.8, rel=0.05)


def test_only_one_decrease_per_cooldown() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 4)
    limiter.on_throttle(None)
    after_first = limiter.rate
    for _ in range(5):  # the other in-flight requests of the same overload
        clock.advance(0.1)
        limiter.on_throttle(None)
    assert limiter.rate == after_first
    assert limiter.throttle_events == 6
    clock.advance(1.0)  # past the cooldown and still throttled: another decrease
    limiter.on_throttle(None)
    assert limiter.rate < after_first


def test_rate_never_falls_below_min_qps() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, min_qps=0.5, clock=clock)
    for _ in range(50):
        clock.advance(1.5)
        limiter.on_throttle(None)
    assert limiter.rate == pytest.approx(0.5)


# --- increase ----------------------------------------------------------------------------


def test_recovers_towards_the_ceiling_when_calm() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 4)
    limiter.on_throttle(1.0)
    low = limiter.rate
    rates = []
    for _ in range(3000):  # the server now grants everything
        clock.advance(limiter.reserve())
        limiter.on_success()
        rates.append(limiter.rate)
    assert rates == sorted(rates)  # never goes down while calm
    assert max(rates) <= limiter.ceiling
    assert rates[-1] == pytest.approx(limiter.ceiling)
    # quickly back near the old estimate, then gently (no jump straight to the ceiling)
    t_back = next(i for i, r in enumerate(rates) if r >= 0.9 * 5) / 5
    assert t_back < 5
    assert rates[20] < 0.9 * limiter.ceiling
    assert low < rates[-1]


def test_no_increase_right_after_a_throttle() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 4)
    limiter.on_throttle(2.0)
    low = limiter.rate
    clock.advance(limiter.reserve())  # the first slot after the pause
    limiter.on_success()
    assert limiter.reserve() > 0
    assert limiter.rate == low


def test_idle_time_does_not_raise_the_rate() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10, clock=clock)
    _send_successes(limiter, clock, 5, 4)
    limiter.on_throttle(None)
    _send_successes(limiter, clock, 1, 5)  # calm again
    before = limiter.rate
    clock.advance(3600)
    limiter.reserve()
    assert limiter.rate <= before * 1.25


# --- acquire -----------------------------------------------------------------------------


def test_acquire_waits_for_its_slot() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(2, clock=clock, sleep=virtual_sleep)

    async def main() -> list[float]:
        sent = []
        for _ in range(4):
            await limiter.acquire()
            sent.append(clock())
        return sent

    start = clock()
    sent = run_virtual(clock, main())
    assert [t - start for t in sent] == pytest.approx([0.0, 0.5, 1.0, 1.5])


def test_a_caller_already_waiting_does_not_send_into_a_pause() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(1, clock=clock, sleep=virtual_sleep)
    start = clock()

    async def waiter() -> float:
        await limiter.acquire()
        return clock() - start

    async def main() -> float:
        limiter.reserve()  # someone took the slot at t=0
        task = asyncio.ensure_future(waiter())  # books the slot at t=1 and sleeps
        await asyncio.sleep(0.5)
        limiter.on_throttle(3.0)  # at t=0.5: everyone pauses until t=3.5
        return await task

    assert run_virtual(clock, main()) >= 3.5


# --- simulation against a hidden limit ----------------------------------------------------


@dataclass
class Outcome:
    throughput_qps: float
    throttled_share: float
    final_rate: float


class TokenBucketServer:
    """The upstream's hidden limit: ``limit_qps`` tokens a second, ``burst`` at most."""

    def __init__(self, clock: FakeClock, limit_qps: float, burst: float) -> None:
        self.clock = clock
        self.limit_qps = limit_qps
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.last = clock()

    def admit(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.limit_qps)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def simulate(
    *,
    limit_qps: float,
    ceiling_qps: float,
    requests: int = 300,
    workers: int = 4,
    latency_s: float = 0.1,
    burst_s: float = 1.0,
    retry_after_s: float | None = None,
) -> Outcome:
    """``workers`` concurrent tasks make ``requests`` calls, retrying throttled ones, as the
    client does; the server answers after ``latency_s`` (decided half way)."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(ceiling_qps, clock=clock, sleep=virtual_sleep)
    server = TokenBucketServer(clock, limit_qps, limit_qps * burst_s)
    todo = list(range(requests))
    attempts = throttled = 0

    async def worker() -> None:
        nonlocal attempts, throttled
        while todo:
            todo.pop()
            while True:
                await limiter.acquire()
                attempts += 1
                await asyncio.sleep(latency_s / 2)
                ok = server.admit()
                await asyncio.sleep(latency_s / 2)
                if ok:
                    limiter.on_success()
                    break
                throttled += 1
                limiter.on_throttle(retry_after_s)

    async def main() -> float:
        start = clock()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return clock() - start

    elapsed = run_virtual(clock, main())
    return Outcome(requests / elapsed, throttled / attempts, limiter.rate)


SCENARIOS = [
    # limit, ceiling, workers, latency, burst, retry_after
    (3, 10, 4, 0.1, 1.0, None),
    (8, 20, 4, 0.1, 1.0, 0.5),
    (2, 50, 8, 0.4, 1.0, None),
    (1, 10, 1, 0.05, 1.0, 1.0),
    (15, 30, 8, 0.2, 3.0, None),
    (25, 50, 8, 0.1, 1.0, 1.0),
    (5, 6, 4, 0.1, 1.0, None),
]


@pytest.mark.parametrize(("limit", "ceiling", "workers", "latency", "burst", "retry"), SCENARIOS)
def test_converges_below_a_hidden_limit(
    limit: float,
    ceiling: float,
    workers: int,
    latency: float,
    burst: float,
    retry: float | None,
) -> None:
    out = simulate(
        limit_qps=limit,
        ceiling_qps=ceiling,
        workers=workers,
        latency_s=latency,
        burst_s=burst,
        retry_after_s=retry,
    )
    assert out.throughput_qps >= 0.8 * limit
    assert out.throttled_share <= 0.25
    assert out.final_rate <= 1.5 * limit


def test_runs_at_the_ceiling_when_the_limit_is_higher() -> None:
    out = simulate(limit_qps=50, ceiling_qps=5)
    assert out.throttled_share == 0
    assert out.throughput_qps == pytest.approx(5, rel=0.02)
    assert out.final_rate == 5


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    limit=st.floats(1, 25),
    ceiling_factor=st.floats(0.5, 20),
    workers=st.integers(1, 8),
    latency=st.sampled_from([0.02, 0.1, 0.3]),
    burst=st.floats(1, 3),
    retry=st.sampled_from([None, 0.2, 0.5, 1.0]),
)
def test_converges_for_any_hidden_limit(
    limit: float,
    ceiling_factor: float,
    workers: int,
    latency: float,
    burst: float,
    retry: float | None,
) -> None:
    ceiling = limit * ceiling_factor
    workers = max(workers, int(2 * limit * latency) + 1)  # enough concurrency to reach it
    out = simulate(
        limit_qps=limit,
        ceiling_qps=ceiling,
        workers=workers,
        latency_s=latency,
        burst_s=burst,
        retry_after_s=retry,
    )
    reachable = min(limit, ceiling)
    assert out.throughput_qps >= 0.8 * reachable
    assert out.throttled_share <= 0.25


def test_follows_a_limit_that_drops_and_comes_back() -> None:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(20, clock=clock, sleep=virtual_sleep)
    server = TokenBucketServer(clock, 8, 8)
    start = clock()
    granted: list[float] = []
    attempts = 0

    async def worker() -> None:
        nonlocal attempts
        while clock() - start < 200:
            elapsed = clock() - start
            server.limit_qps = 2 if 60 <= elapsed < 120 else 8
            await limiter.acquire()
            attempts += 1
            await asyncio.sleep(0.05)
            ok = server.admit()
            await asyncio.sleep(0.05)
            if ok:
                limiter.on_success()
                granted.append(clock() - start)
            else:
                limiter.on_throttle(None)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(4)))

    run_virtual(clock, main())

    def qps(a: float, b: float) -> float:
        return sum(1 for t in granted if a <= t < b) / (b - a)

    assert qps(20, 60) >= 0.8 * 8
    assert qps(70, 120) >= 0.8 * 2  # followed the drop within seconds
    assert qps(160, 200) >= 0.8 * 8  # and found the limit again within a minute
    assert 1 - len(granted) / attempts <= 0.1


def _most_in_a_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    most = start = 0
    for i, t in enumerate(times):
        while times[start] <= t - window + 1e-9:  # (a half-open window: float sums)
            start += 1
        most = max(most, i - start + 1)
    return most


def test_a_throttle_with_a_short_retry_after_does_not_let_a_send_through_too_soon() -> None:
    """max_qps 10, three callers, ~200 ms round trips; the answer to the request sent at
    t = 1.0 is Throttling with a Retry-After of 10 ms. The decrease re-booked the waiting
    callers from now, forgetting the request sent a moment before: the next went out 15 ms
    after it, 11 in one second. The new spacing counts from the last request sent."""
    clock = FakeClock(0.0)
    limiter = AdaptiveRateLimiter(10, clock=clock, sleep=virtual_sleep)
    sends: list[float] = []

    async def caller() -> None:
        for _ in range(8):
            await limiter.acquire()
            sent = clock()
            sends.append(sent)
            await asyncio.sleep(0.205)
            if abs(sent - 1.0) < 1e-9:
                limiter.on_throttle(0.01)
            else:
                limiter.on_success()

    async def main() -> None:
        await asyncio.gather(*(caller() for _ in range(3)))

    run_virtual(clock, main())
    assert len(sends) == 24
    gaps = [b - a for a, b in zip(sorted(sends), sorted(sends)[1:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9, gaps
    assert _most_in_a_window(sends) <= 10
