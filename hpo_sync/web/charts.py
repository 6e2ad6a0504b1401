"""The web UI's charts as data (pure: no I/O, no clock — ``now`` comes in).

Templates draw SVG from what these functions return; nothing here knows about HTML. Every
chart is drawn from the ``changes`` history:

- :func:`status_by_day` rebuilds how many experiments were in each status at the end of each
  of the last days, walking back from the current counts through the changes of the window
  (so its cost is the number of changes in the window, not the size of the mirror);
- :func:`status_bands` and :func:`trial_series` turn one experiment's history into status
  bands over time and trial-status counts over time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from ..alerts.rules import decode_counts
from ..normalise import parse_time

#: Chart width and height in SVG user units (the SVG scales to its box; see ui.css).
WIDTH = 720
HEIGHT = 200
PAD_LEFT = 44
PAD_RIGHT = 8
PAD_TOP = 8
PAD_BOTTOM = 24


@dataclass(frozen=True, slots=True)
class WindowChange:
    """Aggregated ``Status``/``Deleted`` changes of one UTC day of the window.

    ``status`` is the experiment's current status, needed for ``Deleted`` rows only."""

    day: str
    field: str
    old_value: str | None
    new_value: str | None
    status: str | None
    count: int


def days_ending(today: date, days: int) -> list[date]:
    """``days`` consecutive dates, oldest first, ending with ``today``."""
    return [today - timedelta(days=n) for n in range(days - 1, -1, -1)]


def status_by_day(
    current: Mapping[str, int], window: Iterable[WindowChange], days: Sequence[date]
) -> list[dict[str, int]]:
    """How many live (not deleted) experiments were in each status at the end of each day
    of ``days`` (oldest first; the last one is today, whose counts are ``current``).

    Walks back from ``current``: undoing a ``Status`` change moves one experiment from its
    new status to its old one (an old value of None: it did not exist yet); undoing a
    deletion puts the experiment back under its status (deleted experiments keep theirs).
    An experiment first seen already deleted has a ``Status`` row (undone as a removal) but
    was never counted, so its ``Deleted`` row gives that one back.
    """
    by_day: dict[str, list[WindowChange]] = {}
    for c in window:
        by_day.setdefault(c.day, []).append(c)
    counts = dict(current)
    out: list[dict[str, int]] = []
    # From today backwards: the end of day d is "now" minus the changes of later days.
    for i in range(len(days) - 1, -1, -1):
        out.append({k: v for k, v in counts.items() if v > 0})
        day_key = days[i].isoformat()
        for c in by_day.get(day_key, ()):
            _undo(counts, c)
    out.reverse()
    return out


def _undo(counts: dict[str, int], c: WindowChange) -> None:
    if c.field == "Status":
        if c.new_value is not None:
            counts[c.new_value] = counts.get(c.new_value, 0) - c.count
        if c.old_value is not None:
            counts[c.old_value] = counts.get(c.old_value, 0) + c.count
    elif c.field == "Deleted" and c.status is not None:
        if c.new_value == "true":
            # Live before its deletion, or (old None) never counted although its Status
            # row is undone: either way, give one back.
            counts[c.status] = counts.get(c.status, 0) + c.count
        elif c.old_value == "true":
            counts[c.status] = counts.get(c.status, 0) - c.count


# --- stacked bars -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    """One segment of a stacked bar: an SVG rect and what it stands for."""

    x: float
    y: float
    width: float
    height: float
    status: str
    count: int
    label: str


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class BarChart:
    width: int
    height: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    statuses: list[str]
    summary: str


def stacked_bars(
    days: Sequence[date], per_day: Sequence[Mapping[str, int]], status_order: Sequence[str]
) -> BarChart:
    """Geometry of a stacked bar chart: one bar per day, one segment per status."""
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    totals = [sum(d.values()) for d in per_day]
    top = _nice_max(max(totals, default=0))
    slot = plot_w / max(1, len(days))
    bar_w = max(2.0, slot * 0.7)
    order = list(status_order) + sorted(
        {s for d in per_day for s in d} - set(status_order), key=str
    )
    bars: list[Bar] = []
    x_ticks: list[Tick] = []
    for i, (day, counts) in enumerate(zip(days, per_day, strict=True)):
        x = PAD_LEFT + i * slot + (slot - bar_w) / 2
        y = float(PAD_TOP + plot_h)
        for status in order:
            n = counts.get(status, 0)
            if n <= 0:
                continue
            h = plot_h * n / top
            y -= h
            bars.append(
                Bar(
                    round(x, 2),
                    round(y, 2),
                    round(bar_w, 2),
                    round(h, 2),
                    status,
                    n,
                    f"{day.isoformat()}: {n:,} {status}",
                )
            )
        if len(days) <= 8 or i % 2 == (len(days) - 1) % 2:
            x_ticks.append(Tick(round(x + bar_w / 2, 2), HEIGHT - 6, day.strftime("%m-%d")))
    y_ticks = [
        Tick(PAD_LEFT - 4, round(PAD_TOP + plot_h * (1 - f), 2), f"{int(top * f):,}")
        for f in (0.0, 0.5, 1.0)
    ]
    used = [s for s in order if any(d.get(s, 0) > 0 for d in per_day)]
    last = per_day[-1] if per_day else {}
    summary = f"Experiments by status at the end of each of the last {len(days)} days; today: " + (
        ", ".join(f"{last[s]:,} {s}" for s in used if last.get(s)) or "none"
    )
    return BarChart(WIDTH, HEIGHT, bars, x_ticks, y_ticks, used, summary)


def _nice_max(value: int) -> int:
    """A round axis maximum at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * magnitude)
        if top >= value:
            return top
    return value


# --- one experiment's timeline --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One ``changes`` row of an experiment (values as stored)."""

    field: str
    old_value: str | None
    new_value: str | None
    observed_at: str


@dataclass(frozen=True, slots=True)
class Band:
    x: float
    width: float
    status: str
    label: str


@dataclass(frozen=True, slots=True)
class Series:
    status: str
    points: str  # an SVG polyline's points attribute
    last: int


@dataclass(frozen=True, slots=True)
class Timeline:
    width: int
    height: int
    band_y: float
    band_h: float
    bands: list[Band]
    series: list[Series]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    plot_top: float
    plot_bottom: float
    deleted_x: float | None
    summary: str
    trials_summary: str


def _at(value: str) -> datetime | None:
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return parse_time(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def timeline(
    history: Sequence[HistoryRow], now: datetime, trial_order: Sequence[str]
) -> Timeline | None:
    """Status bands (top strip) and trial-status counts (step lines) of one experiment, from
    its first observation to ``now``. None without any dated history."""
    dated = [(t, r) for r in history if (t := _at(r.observed_at)) is not None]
    if not dated:
        return None
    start = dated[0][0]
    end = max(now, dated[-1][0])
    span = max((end - start).total_seconds(), 1.0)
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    band_y, band_h = float(PAD_TOP), 22.0
    plot_top = band_y + band_h + 10
    plot_bottom = float(HEIGHT - PAD_BOTTOM)

    def x_of(t: datetime) -> float:
        return round(PAD_LEFT + plot_w * (t - start).total_seconds() / span, 2)

    # Status bands: each status from its observation to the next one (or now).
    statuses = [(t, r.new_value) for t, r in dated if r.field == "Status" and r.new_value]
    bands: list[Band] = []
    for i, (t, status) in enumerate(statuses):
        t_end = statuses[i + 1][0] if i + 1 < len(statuses) else end
        x0, x1 = x_of(t), x_of(t_end)
        bands.append(
            Band(
                x0,
                max(round(x1 - x0, 2), 1.0),
                str(status),
                f"{status} from {_short(t)} to {_short(t_end) if i + 1 < len(statuses) else 'now'}",
            )
        )
    deleted_x = None
    for t, r in dated:
        if r.field == "Deleted" and r.new_value == "true":
            deleted_x = x_of(t)

    # Trial counts: a step line per trial status that ever had trials.
    steps: list[tuple[datetime, dict[str, int]]] = [
        (t, decode_counts(r.new_value)) for t, r in dated if r.field == "TrialStatus"
    ]
    keys = {k for _, c in steps for k in c}
    order = [s for s in trial_order if s in keys] + sorted(keys - set(trial_order))
    top = _nice_max(max((v for _, c in steps for v in c.values()), default=0))
    plot_h = plot_bottom - plot_top

    def y_of(n: int) -> float:
        return round(plot_bottom - plot_h * n / top, 2)

    series: list[Series] = []
    for key in order:
        pts: list[str] = []
        prev: int | None = None
        for t, c in steps:
            n = c.get(key, 0)
            x = x_of(t)
            if prev is not None:
                pts.append(f"{x},{y_of(prev)}")
            pts.append(f"{x},{y_of(n)}")
            prev = n
        if prev is not None:
            pts.append(f"{x_of(end)},{y_of(prev)}")
        series.append(Series(key, " ".join(pts), prev or 0))
    x_ticks = [
        Tick(x_of(start + (end - start) * f), HEIGHT - 6, _short(start + (end - start) * f))
        for f in (0.0, 0.5, 1.0)
    ]
    y_ticks = [Tick(PAD_LEFT - 4, y_of(int(top * f)), f"{int(top * f):,}") for f in (0.0, 1.0)]
    summary = "Status over time: " + (
        "; ".join(b.label for b in bands) if bands else "no status recorded"
    )
    trials_summary = "Trials by status over time; now: " + (
        ", ".join(f"{s.last} {s.status}" for s in series if s.last) or "none"
    )
    return Timeline(
        WIDTH,
        HEIGHT,
        band_y,
        band_h,
        bands,
        series,
        x_ticks,
        y_ticks,
        plot_top,
        plot_bottom,
        deleted_x,
        summary,
        trials_summary,
    )


def _short(t: datetime) -> str:
    u = t.astimezone(UTC)  # (not strftime: its %Y does not pad years before 1000)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d} {u.hour:02d}:{u.minute:02d}"
