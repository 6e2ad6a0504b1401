"""An adaptive client-side rate limiter.

The upstream's real limit is not known in advance (the configured ``max_qps`` is a ceiling,
not a promise), so the limiter paces requests evenly at a current ``rate`` and adapts it to
the throttled answers it gets.

**Decrease.** A throttled answer means the server's allowance was used up at that moment.
The limiter sets the rate to 0.9× an estimate of the limit (and never above 0.9× the current
rate) and pauses every caller for the server's ``x-acs-retry-after`` (one interval if it
gives none). The estimate depends on where in an *overload episode* the answer falls (an
episode starts with the first throttle after the rate last went up):

* first throttle of an episode: the lower of the current rate (the allowance ran out as the
  rate rose to it) and the recent goodput, successes per second over the last
  ``WINDOW_S`` seconds, stretched to hold ``WINDOW_MIN_SUCCESSES`` at low rates and never
  reaching back before the current busy period began;
* a later throttle of the same episode: the allowance was used up both at the episode's
  first throttle and now, so over that span the server granted between ``n`` and ``n + 1``
  requests' worth, where ``n`` is the successes since. ``(n + 1) / span`` is a sound upper
  bound on the limit that tightens as the episode goes on, whatever burst allowance the
  server has and however the rate moved meanwhile; paused time counts, since the allowance
  keeps accruing during a pause and the successes after it spend it.

Concurrent requests report one overload several times, so there is at most one decrease per
``DECREASE_COOLDOWN_S`` within an episode; a caller whose booked slot was made void by a
decrease, or falls inside the pause, books again instead of sending into the overload.

**Increase.** Once calm (``CALM_AFTER_THROTTLE_S`` past the pause and
``CALM_MIN_SUCCESSES`` successes since the last throttle) the rate climbs quickly back to
just below the estimate, then probes past it at 1 %/s, and beyond 1.25× the estimate
(the limit has evidently risen, e.g. another client sharing it stopped) doubles its pace
every ``PROBE_DOUBLING_S``. Only time spent sending counts: an idle limiter learns nothing,
so it does not drift back to the ceiling between sweeps.

Why this and not the simpler scheme it replaced ("goodput over the last 2 s, then +5 %/s
after 2 s calm"): against a simulated token-bucket server (``tests/test_ratelimit.py``) its
2 s window held one or two successes at limits near 1 request/s, so estimates swung by 2×;
a wall-clock window also counts the stretches spent below the limit after a decrease and
reads the limit low; callers already asleep on a booked slot sent into the pause; and the
steady +5 %/s overshot again within seconds. Over a grid of limits (1-25/s), server burst
allowances (1-3 s), ceilings (up to 50× the limit), concurrency (1-8) and ``retry_after``
(none, 0.5 s, 1 s) it fell to 0.47× the limit with up to 22 % of requests throttled (40 %
at limits below 1/s); this one stays at 0.8-1.0× the limit with at most 7 % throttled.

A hand-written limiter because the well-kept ones (aiolimiter, limits) are fixed-rate: they
cannot learn a limit from the server's answers, which is what being a good citizen at an
unknown limit needs. The clock and sleep are injected so the logic is tested without
sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable


class AdaptiveRateLimiter:
    """Even pacing at an adaptive rate, with a global pause after throttling."""

    DECREASE_FACTOR = 0.9
    DECREASE_COOLDOWN_S = 1.0
    WINDOW_S = 2.0
    WINDOW_MIN_SUCCESSES = 5
    WINDOW_MAX_S = 30.0
    CALM_AFTER_THROTTLE_S = 1.0
    CALM_MIN_SUCCESSES = 3
    FAST_INCREASE_PER_S = 0.20
    PLATEAU = 0.95  # the fast climb stops at this fraction of the estimated limit
    PROBE_INCREASE_PER_S = 0.01
    PROBE_ZONE = 1.25  # gentle probing up to this multiple of the estimate
    PROBE_DOUBLING_S = 5.0
    MAX_INCREASE_PER_S = 0.25
    IDLE_GAP_S = 1.0
    MAX_PAUSE_S = 60.0

    def __init__(
        self,
        max_qps: float,
        *,
        min_qps: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not max_qps > 0:
            raise ValueError(f"max_qps must be positive, got {max_qps}")
        if not min_qps > 0:
            raise ValueError(f"min_qps must be positive, got {min_qps}")
        self.ceiling = float(max_qps)
        self.min_qps = float(min(min_qps, max_qps))
        self.rate = self.ceiling
        #: the limit estimate behind the last decrease (None before the first throttle)
        self.limit_estimate: float | None = None
        self.throttle_events = 0
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._next_slot = now
        self._pause_until = now
        self._last_decrease = -1e18
        self._last_adjust = now
        self._last_booked = -1e18
        self._last_sent = -1e18  # the latest slot a caller was given to send in
        self._busy_since = now
        self._probing_s = 0.0
        self._climbed = False  # has the rate gone up since the last throttled answer?
        self._generation = 0  # bumped by every decrease: slots booked before it are void
        self._success_total = 0
        self._successes_at_throttle = 0
        self._recent: deque[float] = deque()  # times of recent successes
        # (time, successes so far) at the first throttled answer of the current episode
        self._episode: tuple[float, int] | None = None

    # --- pacing ----------------------------------------------------------------------------

    def reserve(self) -> float:
        """Reserve the next send slot; return how long to wait for it (pure bookkeeping)."""
        slot = self._book()
        self._last_sent = max(self._last_sent, slot)
        return slot - self._clock()

    async def acquire(self, deadline: float | None = None) -> bool:
        """Wait for a send slot. A slot booked before a decrease, or one that a later throttle's
        pause now covers, is void: book again at the new rate rather than send into overload.

        With a ``deadline`` (on this limiter's clock), a slot past it is not waited for:
        False, and the slot is given back (a caller whose time is up sends nothing)."""
        while True:
            generation = self._generation
            slot = self._book()
            if deadline is not None and slot > deadline:
                if self._next_slot == slot + 1.0 / self.rate:
                    self._next_slot = slot  # the last one booked: nobody waits behind it
                return False
            delay = slot - self._clock()
            if delay > 0:
                await self._sleep(delay)
            if generation == self._generation and self._pause_until <= slot:
                self._last_sent = max(self._last_sent, slot)
                return True

    def _book(self) -> float:
        now = self._clock()
        if now - max(self._last_booked, self._next_slot) > max(self.IDLE_GAP_S, 2.0 / self.rate):
            # a new busy period: what was granted before the lull says nothing about now
            self._busy_since = now
            self._last_adjust = now
        self._last_booked = now
        self._grow(now)
        slot = max(now, self._next_slot, self._pause_until)
        self._next_slot = slot + 1.0 / self.rate
        return slot

    # --- feedback --------------------------------------------------------------------------

    def on_success(self) -> None:
        now = self._clock()
        self._success_total += 1
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.WINDOW_MAX_S:
            self._recent.popleft()

    def on_throttle(self, retry_after_s: float | None) -> None:
        now = self._clock()
        self.throttle_events += 1
        episode = self._episode
        new_episode = episode is None or self._climbed or episode[0] < self._busy_since
        if episode is None or new_episode:
            episode = self._episode = (now, self._success_total)
            estimate = min(self.rate, self._recent_goodput(now))
        else:
            granted = self._success_total - episode[1]
            span = now - episode[0]
            estimate = min(self.rate, (granted + 1) / span) if span > 0 else self.rate
        self._climbed = False
        self._probing_s = 0.0
        self._successes_at_throttle = self._success_total
        if new_episode or now - self._last_decrease >= self.DECREASE_COOLDOWN_S:
            self._last_decrease = now
            self.limit_estimate = estimate
            target = min(estimate, self.rate) * self.DECREASE_FACTOR
            self.rate = max(self.min_qps, target)
            self._generation += 1
            # Waiting callers re-book at the new spacing, counted from the last request sent:
            # from now, a pause shorter than that spacing (a Retry-After of 10 ms) let the
            # next go out right behind it, past max_qps.
            self._next_slot = max(now, self._last_sent + 1.0 / self.rate)
        pause = retry_after_s if retry_after_s and retry_after_s > 0 else 1.0 / self.rate
        self._pause_until = max(self._pause_until, now + min(pause, self.MAX_PAUSE_S))

    # --- internals -------------------------------------------------------------------------

    def _recent_goodput(self, now: float) -> float:
        window = min(self.WINDOW_MAX_S, max(self.WINDOW_S, self.WINDOW_MIN_SUCCESSES / self.rate))
        start = max(now - window, self._busy_since)
        count = sum(1 for t in self._recent if t >= start)
        # at least one: a throttle says little when nothing was sent lately
        return max(count, 1) / max(now - start, 1.0 / self.ceiling)

    def _grow(self, now: float) -> None:
        # idle time teaches nothing about the limit: count at most a couple of intervals
        dt = min(now - self._last_adjust, max(1.0, 2.0 / self.rate))
        self._last_adjust = now
        if (
            dt <= 0
            or self.rate >= self.ceiling
            or now < self._pause_until + self.CALM_AFTER_THROTTLE_S
            or self._success_total - self._successes_at_throttle < self.CALM_MIN_SUCCESSES
        ):
            return  # not calm yet: the pause is barely over or too little got through since
        estimate = self.limit_estimate
        if estimate is not None and self.rate < self.PLATEAU * estimate:
            new = min(self.rate * (1.0 + self.FAST_INCREASE_PER_S * dt), self.PLATEAU * estimate)
        elif estimate is not None and self.rate < self.PROBE_ZONE * estimate:
            new = self.rate * (1.0 + self.PROBE_INCREASE_PER_S * dt)
        else:
            # well past the estimate and still no throttle: the limit has risen (or was never
            # measured), so speed up, doubling the pace every PROBE_DOUBLING_S of calm sending
            self._probing_s += dt
            per_s = min(
                self.MAX_INCREASE_PER_S,
                self.PROBE_INCREASE_PER_S * 2.0 ** (self._probing_s / self.PROBE_DOUBLING_S),
            )
            new = self.rate * (1.0 + per_s * dt)
        new = min(self.ceiling, new)
        if new > self.rate:
            self._climbed = True
            self.rate = new
