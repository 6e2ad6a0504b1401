"""Full and hot sweeps: how the mirror is kept equal to upstream.

Full sweep (the safety net): page through everything of a workspace, sorted by create time
ascending, applying pages in batches as they arrive: a batch goes to the store once it holds
``FULL_BATCH_ROWS`` experiments or ``FULL_BATCH_AGE_S`` after its first page arrived, one
batch being written while the next fills (memory stays bounded by the pages in flight and
two batches). Each batch is one :meth:`~hpo_sync.store.Store.apply`: atomic and idempotent,
so an interrupted sweep leaves whole batches behind and the next one completes them.
Experiments the mirror holds that the listing did not return are *absentees*; they are
looked up (see below) before any is marked deleted, because paging by page number over a
list that changes underneath can skip a row even when the counts add up (one deletion and
one creation during the sweep). Only when there are too many absentees to look up do
complete, consistent listings decide alone: two of them, the second read at least
``MASS_DELETION_WAIT_S`` after the first, must both miss an experiment, and a few of the
missing, looked up as above, must be gone too (a glitch of a few answers, or of a few
seconds, must not delete a workspace); anything less is ``partial`` and deletes nothing.

Hot sweep (every ``hot_interval_s``): asks only for what can have changed recently —

1. experiments created since the workspace's create-time watermark minus an overlap (new
   experiments, whatever their status);
2. one listing per non-terminal status that the mirror currently holds experiments in
   (their current Status and TrialStatus, so trial-count changes are caught too);
3. every experiment the mirror holds as non-terminal that none of those listings returned
   has necessarily left its status (a status that the mirror held is listed in full): it is
   looked up, which yields its new status — or, if it is gone, marks it deleted. That takes
   in experiments upstream sends with ``Deleted`` true (soft-deleted, still listed: a
   deleted run is cancelled a moment later) that the last successful sweep saw;
4. a "recently modified" feed (sort by modified time, descending, read until the previous
   hot sweep's time) — one call that *may* catch changes of terminal experiments if upstream
   bumps ``GmtModifiedTime``; never relied on, and dropped for a workspace once upstream is
   seen changing an experiment without bumping it (for :data:`LEARNT_KEEP`, then tried
   again).

An upstream seen to ignore the Status filter (each listing of 2. is the whole workspace)
gets one listing of the whole workspace instead of 1. and 2.; one seen to ignore
MinCreateTime (1. is the whole workspace) gets 1. newest first, read until the watermark
(:meth:`SyncEngine._newest_first`). The sweep that sees it stops the listings concerned at
the page that shows it and reads the other way at once.

Look-ups: missing experiments are grouped into create-time windows planned from the
mirror's own create times so that each window holds about one page (:func:`plan_windows`):
a handful of calls for many experiments that finished around the same time; each window
reaches to the mirror's next experiment on either side. One still missing after a window
that adds up and returned experiments created before and after it is gone: upstream read a
range holding its create time, whatever zone it read the bounds in. Before and after are
judged only among create times of its own form (with a zone, or naive and read in
``create_time_zone``): a naive time read in the wrong zone is off by hours against a zoned
one, and across forms a window read far away seemed to hold an experiment that is there.
One not so bracketed is looked up by name in a ±14 h window (any zone upstream may read
times in), and one its name does not find either (renamed meanwhile) by its creator in the
same window, one look-up per creator and stretch of time, before it is declared deleted.
An upstream seen to ignore MinCreateTime gets no windows (each would be the whole
workspace): names and creators. A look-up by name that comes back with fewer experiments
than its TotalCount (``"Experiments": []`` under a positive count) proves nothing within one
sweep: a glitch answers so, and so does an upstream that counts soft-deleted experiments for
one really deleted. Where the workspace's own full listing counts as many rows more than it
returns, upstream is one that counts hidden rows, and the experiment is marked deleted at
once. Elsewhere a sweep only suspects it (``deletion_suspects``); a later sweep, hot or
full, that finds it gone the same way at least ``SUSPECT_CONFIRM_S`` (10 minutes) after the
suspicion marks it deleted, and one that sees it in between clears the suspicion (see
:meth:`_weigh_doubted`).

Why a hot sweep cannot miss a status change of a non-terminal experiment: such an experiment
is either still in one of the listed statuses (step 2 returns it with its current fields; an
item that shifts between pages while a listing is read shows up as missing and step 3 finds
it), or it is not, and then step 3 looks it up. A listing that fails makes the sweep
``partial`` and skips step 3, so nothing is concluded from incomplete data.

What it leaves to the full sweep: changes of experiments the mirror holds as terminal (trials
restarted) unless the modified feed shows them, deletions of terminal experiments, and
anything when a hot sweep was partial.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import itertools
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import orjson
import structlog

from .client import (
    WINDOW_EDGE,
    Listing,
    ListQuery,
    Page,
    Tally,
    UpstreamClient,
    rejects_parameter,
)
from .config import Config
from .errors import FatalUpstreamError, HpoSyncError, StoreError, UpstreamError
from .normalise import Experiment, format_time, normalise_all, parse_time, time_has_zone
from .schema import experiment_values
from .store import ChangeHook, RunProgress, Store, WorkspaceState

log = structlog.get_logger(__name__)

Mode = Literal["full", "hot"]
_T = TypeVar("_T")

# Beyond this many absentees, looking each one up costs more than it is worth: a complete,
# consistent listing decides alone (and an inconsistent one deletes nothing).
MAX_LOOKUPS = 200
# ... confirmed by a second reading this long after the first: an upstream that answers
# "nothing" for a moment (TotalCount 0 and no experiments, in two answers a second apart)
# made both readings agree, and every experiment of the workspace was marked deleted.
MASS_DELETION_WAIT_S = 30.0
# ... and this many of the missing, spread over their create times, looked up one by one:
# an upstream that answers "nothing" to a few requests in a row, whenever they come, made
# two readings agree however far apart (the look-ups are other queries, and come later).
MASS_DELETION_SAMPLE = 3
# An experiment a look-up counted but did not return is only suspected gone (see
# _weigh_doubted); a look-up by a later sweep at least this long after the suspicion, still
# answering so, confirms it: a glitch that answers so does not last ten minutes, and an
# upstream that counts soft-deleted experiments has its deletions marked that much later.
SUSPECT_CONFIRM_S = 600.0
# Before concluding that an experiment is gone, it is looked up by name in a create-time
# window this wide on both sides: any zone offset upstream might read times in.
WIDE_WINDOW = timedelta(hours=14)
MODIFIED_FEED_MAX_PAGES = 3
# What sweeps learn about a workspace's upstream (it ignores a filter, refuses one, does not
# bump GmtModifiedTime) is kept this long from when it was first learnt, in the process and
# in the mirror (``workspaces.upstream_learnt``), then forgotten and learnt anew: an
# upstream fixed meanwhile gets the cheaper listings back within a day, and a one-shot
# ``sync`` from cron does not pay to learn it again every run.
LEARNT_KEEP = timedelta(hours=24)
# A full sweep applies pages in batches of about this many experiments: one transaction per
# page of 100 spends most of a 100,000-experiment baseline committing (index pages written
# again and again, WAL checkpoints); batches of ~2,000 write each page about once.
FULL_BATCH_ROWS = 2000
# ... or this long after the batch's first page arrived, so that slow pages (throttling,
# retries) do not keep what already arrived out of the mirror.
FULL_BATCH_AGE_S = 1.0
# During a full sweep the youngest generation is collected once this many more container
# objects were made than freed, rather than 700 (see _full_sweep_gc). Two batches in flight
# hold ~100,000 of them (pages, experiments, rows, change rows): at 50,000 each batch set
# off collections that walked them all again, ~0.6 CPU-s of a 100,000-experiment baseline
# in the writer thread (measured with gc.callbacks). A call to upstream leaves no cycles
# behind (client._break_cycle), so collecting this rarely does not let garbage pile up.
FULL_SWEEP_GC_GEN0 = 500_000


@dataclass
class SweepResult:
    """The outcome of one sweep of one workspace (also written as a ``sync_runs`` row)."""

    workspace_id: str
    mode: Mode
    #: its ``sync_runs`` row; None when the mirror could not record the sweep's start
    run_id: int | None
    status: Literal["ok", "partial", "failed"] = "ok"
    api_calls: int = 0
    pages: int = 0
    retries: int = 0
    throttled: int = 0
    experiments_seen: int = 0
    changes: int = 0
    marked_deleted: int = 0
    lookups: int = 0
    skipped_records: int = 0
    #: ``error`` is about the skipped records (the notes then do not repeat them)
    error_tells_skipped: bool = False
    baseline: bool = False
    #: the sweep's listing of what is new (a full sweep's whole listing, a hot sweep's of
    #: what was created since the watermark) was read whole: the watermark may move
    listed_new: bool = False
    #: a full sweep's listing of the workspace came back whole, under one TotalCount, with
    #: this many ids fewer than it counts: rows upstream counts and does not return
    hidden_counted: int = 0
    duration_s: float = 0.0
    error: str | None = None
    error_code: str | None = None
    notes: list[str] = field(default_factory=list)
    #: the sweep's running count of calls and pages (its batches record it as they commit)
    tally: Tally = field(default_factory=Tally, repr=False, compare=False)

    def progress(self, experiments: int = 0) -> RunProgress:
        """The counters so far, ``experiments`` more applied: see :class:`RunProgress`."""
        return RunProgress(
            self.tally.api_calls, self.tally.pages, self.experiments_seen + experiments
        )

    @property
    def run(self) -> int:
        """The run's id: a sweep does its work only once its run is recorded."""
        assert self.run_id is not None
        return self.run_id

    def summary(self) -> str:
        text = (
            f"{self.workspace_id}: {self.mode} {self.status} — "
            f"{_count(self.api_calls, 'API call')}, {_count(self.experiments_seen, 'experiment')}, "
            f"{_count(self.changes, 'change')}"
            f"{self._baseline_note()}, {self.duration_s:.1f}s"
        )
        if self.error:
            text += f" — {self.error}"
        for note in self.all_notes():
            text += f"; {note}"
        return text

    def _baseline_note(self) -> str:
        # A baseline that failed or was partial is not recorded: the next full sweep is one.
        if not self.baseline:
            return ""
        return " (baseline)" if self.status == "ok" else " (baseline not made)"

    def all_notes(self) -> list[str]:
        """What the sweep noticed without failing for it (records it could not read, upstream
        counts that were off, ...), beside its error."""
        notes = list(self.notes)
        if self.skipped_records and not self.error_tells_skipped:
            notes.insert(0, f"{self.skipped_records} records without a readable ExperimentId")
        return notes


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 change", "0 changes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


Progress = Callable[[str, int, int], None]
"""Called with (workspace id, pages read, pages expected) as a listing proceeds."""


class SyncEngine:
    """Runs sweeps of configured workspaces against one client and one store."""

    def __init__(
        self,
        config: Config,
        client: UpstreamClient,
        store: Store,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_changes: ChangeHook | None = None,
        progress: Progress | None = None,
        mass_deletion_wait_s: float = MASS_DELETION_WAIT_S,
    ) -> None:
        self.config = config
        self.client = client
        self.store = store
        self.clock = clock
        self.on_changes = on_changes
        self.progress = progress
        self.mass_deletion_wait_s = mass_deletion_wait_s
        self._locks: dict[str, asyncio.Lock] = {}
        # Per workspace: whether upstream was seen to bump GmtModifiedTime when an experiment
        # changes (None: not known yet). Without bumping, the modified feed is a wasted call.
        self._bumps: dict[str, bool] = {}
        # Workspaces whose upstream refused the modified feed's query (its SortBy).
        self._feed_refused: set[str] = set()
        # Workspaces whose upstream refused a Creator filter (not asked again).
        self._creator_refused: set[str] = set()
        # Per workspace, the statuses upstream refused as a Status filter.
        self._status_refused: dict[str, set[str]] = {}
        # Workspaces whose upstream was seen to ignore the Status filter (warned once): their
        # hot sweeps list the workspace once instead of once per status.
        self._status_filter_ignored: set[str] = set()
        # Workspaces whose upstream was seen to ignore MinCreateTime (warned once): their hot
        # sweeps read what is new newest first instead (_newest_first).
        self._min_create_ignored: set[str] = set()
        # Workspaces whose last full listing came back whole under one TotalCount with fewer
        # ids than it counted: an upstream that counts rows it does not return (soft-deleted
        # experiments). Its look-ups that count an experiment and return none answer so for
        # a deleted one, so they prove a deletion there (see _weigh_doubted).
        self._hidden_counted: set[str] = set()
        # Per workspace, when the first of the facts above was learnt, here or by an
        # earlier process (see _recall): all are forgotten LEARNT_KEEP after it.
        self._learnt_at: dict[str, datetime] = {}
        # Per workspace, a sweep whose end the mirror could not record (a full disk), with
        # the time it ended: its run is closed before the workspace's next sweep starts.
        self._unclosed: dict[str, tuple[SweepResult, str]] = {}
        # Per workspace, the newest time its sweeps recorded (see _now): read from the
        # mirror before its first sweep here, then kept as sweeps record.
        self._recorded: dict[str, datetime | None] = {}
        # Workspaces whose sweeps record held times now (the clock is behind): warned once.
        self._clock_behind: set[str] = set()

    def lock_for(self, workspace_id: str) -> asyncio.Lock:
        """One sweep of a workspace at a time, hot or full."""
        return self._locks.setdefault(workspace_id, asyncio.Lock())

    async def sweep(self, workspace_id: str, mode: Mode | Literal["auto"] = "auto") -> SweepResult:
        """Sweep one workspace. ``auto``: hot once the workspace has its baseline, else full.

        Never raises for upstream or store trouble: the result (and its ``sync_runs`` row) says
        what went wrong.
        """
        async with self.lock_for(workspace_id):
            started = time.monotonic()
            # (until the state is read: auto is reported as hot, so that a sweep that could
            # not start does not make the daemon's next one full)
            chosen: Mode = "full" if mode == "full" else "hot"
            try:
                await self._close_unclosed(workspace_id)
                state = await asyncio.to_thread(self.store.workspace_state, workspace_id)
                await self._recall(workspace_id)
                if workspace_id not in self._recorded:
                    self._recorded[workspace_id] = await asyncio.to_thread(
                        self.store.newest_record_time, workspace_id
                    )
            except StoreError as exc:
                return self._not_started(workspace_id, chosen, exc, started)
            has_baseline = bool(state and state.baseline_at)
            # Without a baseline only a full sweep makes sense, whatever was asked.
            chosen = "hot" if mode != "full" and has_baseline else "full"
            started_at = self._now(workspace_id)
            begin = asyncio.ensure_future(
                asyncio.to_thread(self.store.begin_run, workspace_id, chosen, started_at)
            )
            try:
                run_id = await _to_the_end(begin)
            except StoreError as exc:
                return self._not_started(workspace_id, chosen, exc, started)
            except asyncio.CancelledError:
                if begin.exception() is not None:
                    raise
                # Cancelled while its row was being written: close that row as cancelled too.
                result = SweepResult(
                    workspace_id, chosen, begin.result(), baseline=not has_baseline
                )
                result.status, result.error = "failed", "cancelled (shutting down)"
                await self._finish(result, started)
                raise
            result = SweepResult(workspace_id, chosen, run_id, baseline=not has_baseline)
            try:
                if chosen == "full":
                    with _full_sweep_gc():
                        await self._full(result)
                else:
                    assert state is not None  # a baseline implies a workspace row
                    await self._hot(result, state)
            except FatalUpstreamError as exc:
                result.status, result.error, result.error_code = "failed", str(exc), exc.code
            except UpstreamError as exc:
                result.status, result.error, result.error_code = "failed", str(exc), exc.code
            except HpoSyncError as exc:
                result.status, result.error = "failed", str(exc)
                _trace_misuse(result, exc)
            except BaseExceptionGroup as group:
                # A TaskGroup (concurrent listings, look-ups) wraps what its tasks raised.
                first = _first_hpo_error(group)
                if first is not None:
                    result.status, result.error = "failed", str(first)
                    result.error_code = first.code if isinstance(first, UpstreamError) else None
                    _trace_misuse(result, first)
                else:
                    defects, rest = group.split(Exception)
                    if rest is not None or defects is None:
                        raise
                    _defect(result, _leaves(defects)[0])
            except asyncio.CancelledError:
                result.status, result.error = "failed", "cancelled (shutting down)"
                await self._finish(result, started)
                raise
            except Exception as exc:
                _defect(result, exc)
            await self._finish(result, started)
            return result

    async def _finish(self, result: SweepResult, started: float) -> None:
        """Close the sweep's run (and record its outcome) even if cancelled meanwhile, and
        raise CancelledError afterwards if it was. A stop can come twice (systemd signals the
        daemon and the sweep process at once: the daemon's "cancel" and the child's own
        SIGTERM each cancel the sweep): a second cancellation must not cut these writes
        short, or the run would read "running" until the next start of the daemon."""
        await _to_the_end(asyncio.ensure_future(self._record(result, started)))

    async def _record(self, result: SweepResult, started: float) -> None:
        tally = result.tally
        result.api_calls, result.pages = tally.api_calls, tally.pages
        result.retries, result.throttled = tally.retries, tally.throttled
        result.duration_s = time.monotonic() - started
        finished_at = self._now(result.workspace_id)
        # One transaction: the run, the workspace's outcome and its baseline. The run's
        # change count is the one its applies kept in their own transactions: a batch still
        # committing when a stop cancelled the sweep is not in result.changes yet.
        try:
            await asyncio.to_thread(
                self.store.close_run,
                result.run,
                result.workspace_id,
                result.mode,
                finished_at=finished_at,
                status=result.status,
                api_calls=result.api_calls,
                pages=result.pages,
                experiments_seen=result.experiments_seen,
                error=result.error,
                baseline=result.baseline,
                raise_watermark=result.listed_new,
                upstream_learnt=self._kept_learnt(result.workspace_id),
                # The clock's own time, not a held one: a success recorded at a time held a
                # day ahead looked fresh for that day, and stall notices never came.
                succeeded_at=format_time(self.clock().astimezone(UTC).replace(microsecond=0)),
            )
        except StoreError as exc:
            # What the sweep applied stays applied (each batch committed whole), but the
            # workspace's success, its baseline and its watermark are not recorded: it
            # failed, as the mirror sees it. Its own error stays first.
            note = f"recording the end of the sweep failed: {exc}"
            result.error = f"{result.error}; {note}" if result.error else note
            result.status, result.error_code = "failed", result.error_code or "StoreError"
            self._unclosed[result.workspace_id] = (result, finished_at)
        _log_finished(result)

    def _now(self, workspace_id: str) -> str:
        """The time a sweep of ``workspace_id`` records now (its run's start and end, what
        it observed): the clock's, but never before the newest the workspace's sweeps
        recorded.

        A row observed later than a batch is skipped as stale (:meth:`Store.apply`), so
        that replaying old data never rolls the mirror back. With the clock's own time, a
        step back of the clock (NTP after boot, ``date -s``), or a clock that ran ahead and
        was set right, made every row the mirror held stale for as long as the step: the
        sweeps said ``ok`` and wrote nothing, no change, no alert, no deletion, until the
        clock caught up (a day, for a clock a day ahead). Held at the newest instead, the
        times stand still until the clock catches up and everything is written, in order.

        The newest is read from the mirror before the workspace's first sweep here (its
        last runs and its last change, :meth:`Store.newest_record_time`): what a sweep
        killed mid-way touched after its start without changing is not in those, so for
        that sweep's length such rows can still be skipped, if the clock also stepped back.
        """
        now = self.clock().astimezone(UTC).replace(microsecond=0)
        newest = self._recorded.get(workspace_id)
        if newest is not None and now < newest:
            if workspace_id not in self._clock_behind:
                self._clock_behind.add(workspace_id)
                log.warning(
                    "sync.clock_behind",
                    workspace=workspace_id,
                    clock=format_time(now),
                    held_at=format_time(newest),
                    note="times this workspace's sweeps record are held at the newest"
                    " they recorded until the clock catches up",
                )
            return format_time(newest)
        self._clock_behind.discard(workspace_id)
        if workspace_id in self._recorded:  # (not before the mirror's newest is read)
            self._recorded[workspace_id] = now
        return format_time(now)

    # --- what was learnt about upstream ------------------------------------------------------

    def _flags(self) -> tuple[tuple[str, set[str]], ...]:
        """The yes/no facts about a workspace's upstream: the mirror's key, and the set of
        workspaces it holds for."""
        return (
            ("modified_feed_refused", self._feed_refused),
            ("creator_filter_refused", self._creator_refused),
            ("status_filter_ignored", self._status_filter_ignored),
            ("min_create_time_ignored", self._min_create_ignored),
            ("hidden_rows_counted", self._hidden_counted),
        )

    def _learnt(self, workspace_id: str) -> dict[str, Any]:
        """What this process knows of the workspace's upstream, as the mirror keeps it."""
        ws = workspace_id
        facts: dict[str, Any] = {key: True for key, flags in self._flags() if ws in flags}
        if ws in self._bumps:
            facts["modified_time_bumped"] = self._bumps[ws]
        if self._status_refused.get(ws):
            facts["status_values_refused"] = sorted(self._status_refused[ws])
        return facts

    def _forget(self, workspace_id: str) -> None:
        # (the client's SortBy names too, for every workspace: kept with each workspace's
        # facts, they were written again with a new time by every sweep, never forgotten)
        self.client.forget_sort_names()
        self._bumps.pop(workspace_id, None)
        self._status_refused.pop(workspace_id, None)
        self._learnt_at.pop(workspace_id, None)
        for _, flags in self._flags():
            flags.discard(workspace_id)

    async def _recall(self, workspace_id: str) -> None:
        """At the start of a sweep: forget what was learnt about the workspace's upstream
        :data:`LEARNT_KEEP` after it was first learnt, and when this process knows nothing
        of it, start from what the mirror keeps (learnt by an earlier process, if it is not
        older than that either). A kept text this code cannot read is no knowledge."""
        now = self.clock()
        at = self._learnt_at.get(workspace_id)
        if at is not None and not _fresh(at, now):
            forgotten = self._learnt(workspace_id)
            self._forget(workspace_id)
            # (an upstream that behaves as it should, seen to bump GmtModifiedTime, is no news)
            quirks = {k: v for k, v in forgotten.items() if k != "modified_time_bumped" or not v}
            (log.info if quirks else log.debug)(
                "sync.upstream_relearnt", workspace=workspace_id, learnt_at=format_time(at),
                **forgotten,
            )  # fmt: skip
        if workspace_id in self._learnt_at or self._learnt(workspace_id):
            return
        text = await asyncio.to_thread(self.store.upstream_learnt, workspace_id)
        try:
            kept = orjson.loads(text) if text else {}
            at = parse_time(kept.get("learnt_at")) if isinstance(kept, dict) else None
        except orjson.JSONDecodeError:
            at = None
        if at is None:
            if text:
                log.warning("sync.upstream_learnt_unreadable", workspace=workspace_id)
            return
        if not _fresh(at, now):
            return  # the sweep's end writes what this process learns instead
        if isinstance(bumped := kept.get("modified_time_bumped"), bool):
            self._bumps[workspace_id] = bumped
        for key, flags in self._flags():
            if kept.get(key) is True:
                flags.add(workspace_id)
        if isinstance(names := kept.get("sort_by_names"), dict):
            self.client.learn_sort_names({str(k): str(v) for k, v in names.items()})
        refused = kept.get("status_values_refused")
        if isinstance(refused, list) and refused:
            self._status_refused[workspace_id] = {str(s) for s in refused}
        self._learnt_at[workspace_id] = at
        log.debug("sync.upstream_recalled", workspace=workspace_id, **self._learnt(workspace_id),
                 sort_by_names=self.client.sort_names, learnt_at=format_time(at))  # fmt: skip

    def _kept_learnt(self, workspace_id: str) -> str | None:
        """What the mirror is to keep of the workspace's upstream at the end of a sweep (a
        JSON object, ``learnt_at`` the first fact's time), or None: nothing learnt."""
        facts = self._learnt(workspace_id)
        # (the client's, for every workspace: the names it was first refused in, with the
        # other vocabulary's that upstream took; a process keeps them while it runs)
        if sort_names := self.client.sort_names:
            facts["sort_by_names"] = sort_names
        if not facts:
            return None
        at = self._learnt_at.setdefault(workspace_id, self.clock())
        return orjson.dumps(
            {"learnt_at": format_time(at), **facts}, option=orjson.OPT_SORT_KEYS
        ).decode()

    def _not_started(
        self, workspace_id: str, mode: Mode, exc: StoreError, started: float
    ) -> SweepResult:
        """The result of a sweep that could not start: the mirror refused to record it (a
        full disk, a lock held past the busy timeout). It has no run to close."""
        result = SweepResult(workspace_id, mode, None, status="failed", error_code="StoreError")
        result.error = f"the sweep could not start: {exc}"
        result.duration_s = time.monotonic() - started
        _log_finished(result)
        return result

    async def close_unclosed(self) -> None:
        """Close, as :meth:`_close_unclosed` does before a workspace's next sweep, every run
        whose end the mirror could not record (a one-shot sync, which has no next sweep, at
        its end). Best effort: one it still cannot close stays open, and the next process
        to take the mirror's lock closes it as interrupted."""
        for workspace_id in list(self._unclosed):
            try:
                await self._close_unclosed(workspace_id)
            except StoreError as exc:
                log.warning("sync.run_left_open", workspace=workspace_id, error=str(exc))

    async def _close_unclosed(self, workspace_id: str) -> None:
        """Close the run of the workspace's last sweep if the mirror could not when it
        ended (as failed, with its error; the workspace's error then names it too)."""
        unclosed = self._unclosed.get(workspace_id)
        if unclosed is None:
            return
        result, finished_at = unclosed
        await asyncio.to_thread(
            self.store.close_run,
            result.run,
            workspace_id,
            result.mode,
            finished_at=finished_at,
            status="failed",
            api_calls=result.api_calls,
            pages=result.pages,
            experiments_seen=result.experiments_seen,
            error=result.error,
        )
        del self._unclosed[workspace_id]

    # --- applying ------------------------------------------------------------------------

    async def _apply(
        self,
        result: SweepResult,
        raws: Iterable[Mapping[str, Any]],
        *,
        seen: set[str],
        previous: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[Experiment]:
        """Normalise ``raws`` and apply those not in ``seen`` in one transaction."""
        mine = self._normalise(result, raws)
        return await self._apply_normalised(result, mine, seen=seen, previous=previous)

    def _normalise(
        self, result: SweepResult, raws: Iterable[Mapping[str, Any]]
    ) -> list[Experiment]:
        """The workspace's experiments among ``raws``, normalised; the rest is counted."""
        normalised = normalise_all(raws, naive_tz=self.config.upstream.tz)
        result.skipped_records += normalised.skipped
        mine = [e for e in normalised.experiments if e.workspace_id in (None, result.workspace_id)]
        foreign = len(normalised.experiments) - len(mine)
        if foreign:
            result.notes.append(f"{foreign} experiments of other workspaces ignored")
        # An experiment whose WorkspaceId upstream left out belongs to the workspace queried.
        return [e if e.workspace_id else _with_workspace(e, result.workspace_id) for e in mine]

    async def _apply_normalised(
        self,
        result: SweepResult,
        mine: Sequence[Experiment],
        *,
        seen: set[str],
        previous: Mapping[str, Mapping[str, Any]] | None = None,
        contents: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[Experiment]:
        fresh_contents: list[tuple[Any, ...]] | None = None
        if contents is None:
            fresh = [e for e in mine if e.experiment_id not in seen]
        else:
            pairs = [
                (e, c) for e, c in zip(mine, contents, strict=True) if e.experiment_id not in seen
            ]
            fresh = [e for e, _ in pairs]
            fresh_contents = [c for _, c in pairs]
        if previous is not None:
            self._learn_bumping(result.workspace_id, fresh, previous)
        seen.update(e.experiment_id for e in mine)
        if fresh:
            applied = await asyncio.to_thread(
                self.store.apply,
                result.workspace_id,
                fresh,
                observed_at=self._now(result.workspace_id),
                run_id=result.run,
                baseline=result.baseline,
                on_changes=self.on_changes,
                contents=fresh_contents,
                progress=result.progress(len(fresh)),
            )
            result.experiments_seen += len(fresh)  # in the mirror now, not before
            result.changes += applied.changes
        return fresh

    def _check_status_filter(self, workspace_id: str, asked: str, page: Page) -> None:
        """Warn (once per workspace) when a listing of one status returns experiments of
        others: upstream ignores the Status filter. Nothing is lost (every row returned is
        applied), but each status listing is the whole workspace: the sweep's status
        listings stop, and it and later hot sweeps list the workspace once instead (see
        :meth:`_hot`)."""
        wanted = asked.strip().upper()
        # A blank status is none (as normalise reads it), not another one: one such record
        # took a listing of RUNNING for the whole workspace, for as long as this is learnt.
        others = sorted(
            {
                status
                for raw in page.experiments
                if isinstance(raw, dict)
                and raw.get("Status") is not None
                and (status := str(raw.get("Status")).strip().upper())
                and status != wanted
            }
        )
        if others:
            self._status_filter_ignored.add(workspace_id)
            log.warning(
                "upstream.status_filter_ignored",
                workspace=workspace_id,
                asked=asked,
                returned=others[:5],
                hint="hot sweeps list the whole workspace from now on; check the upstream",
            )

    def _times(self, rows: Iterable[Any], field: str = "GmtCreateTime") -> list[datetime]:
        """The readable times ``field`` of upstream's ``rows``, in their order (a time
        without a zone read in ``create_time_zone``, as everywhere)."""
        zone = self.config.upstream.tz
        return [
            t
            for raw in rows
            if isinstance(raw, dict)
            and (t := parse_time(raw.get(field), naive_tz=zone)) is not None
        ]

    def _check_min_create(self, workspace_id: str, since: datetime, page: Page) -> None:
        """Warn (once per workspace) when the listing of what was created since ``since``
        returns experiments created well before it (more than any zone offset upstream may
        read the time in): upstream ignores MinCreateTime, so that listing is the whole
        workspace. Later hot sweeps read what is new newest first (:meth:`_newest_first`)."""
        floor = since - WIDE_WINDOW
        older = [t for t in self._times(page.experiments) if t < floor]
        if older:
            self._min_create_ignored.add(workspace_id)
            log.warning(
                "upstream.min_create_time_ignored",
                workspace=workspace_id,
                asked=format_time(since),
                returned=[format_time(t) for t in older[:3]],
                hint="hot sweeps read new experiments newest first from now on",
            )

    def _learn_bumping(
        self,
        workspace_id: str,
        fresh: Iterable[Experiment],
        previous: Mapping[str, Mapping[str, Any]],
    ) -> None:
        for exp in fresh:
            old = previous.get(exp.experiment_id)
            absent = exp.absent  # a field left out is no change (the store keeps it)
            if (
                old is None
                or "gmt_modified_time" in absent
                or (
                    ("status" in absent or old.get("status") == exp.status)
                    and ("trial_status" in absent or old.get("trial_status") == exp.trial_status)
                )
            ):
                continue
            bumped = (exp.gmt_modified_time or "") > (old.get("gmt_modified_time") or "")
            if self._bumps.get(workspace_id) != bumped:
                log.info("sync.modified_feed", workspace=workspace_id, upstream_bumps=bumped)
            self._bumps[workspace_id] = bumped

    async def _mark_deleted(self, result: SweepResult, ids: Collection[str]) -> None:
        if not ids:
            return
        applied = await asyncio.to_thread(
            self.store.mark_deleted,
            result.workspace_id,
            list(ids),
            observed_at=self._now(result.workspace_id),
            run_id=result.run,
            on_changes=self.on_changes,
            progress=result.progress(),
        )
        result.changes += applied.changes
        result.marked_deleted += applied.marked_deleted

    # --- full ----------------------------------------------------------------------------

    async def _full(self, result: SweepResult) -> None:
        ws = result.workspace_id
        seen: set[str] = set()
        listing_pages_expected = [0]
        query = ListQuery(
            workspace_id=ws,
            sort_by=self.config.upstream.sort_by,
            order="ASC",
            include_config_data=True,
        )

        def expect(page: Page) -> None:
            size = self.config.upstream.page_size
            if page.total_count is not None:  # without one, progress has no end to show
                listing_pages_expected[0] = max(1, -(-page.total_count // size))

        async def read() -> Listing:
            """One listing of the whole workspace, applied batch by batch as it arrives
            (what an earlier pass of this sweep applied is not applied again)."""
            batches = _Batches(self, result, seen)

            async def on_page(page: Page) -> None:
                if not listing_pages_expected[0]:
                    expect(page)
                await batches.add(page.experiments)
                if self.progress is not None:
                    self.progress(ws, result.tally.pages, listing_pages_expected[0])

            try:
                listing = await self.client.list_all(
                    query, on_page=on_page, tally=result.tally, keep=False, check_short=True
                )
            except asyncio.CancelledError:
                await batches.close(apply_rest=False)  # shutting down: finish only what runs
                raise
            except BaseException:
                try:
                    await batches.close(apply_rest=True)  # what arrived before it is valid
                except HpoSyncError as exc:  # the listing's error is the one to report
                    log.warning("sync.apply_failed", workspace=ws, error=str(exc))
                raise
            await batches.close(apply_rest=True)
            return listing

        listing = await read()
        listed_at = time.monotonic()

        async def read_again(event: str, missing: int) -> Listing:
            """The workspace read once more, MASS_DELETION_WAIT_S after the first reading
            (logged as ``event``, with the wait)."""
            wait_s = max(0.0, listed_at + self.mass_deletion_wait_s - time.monotonic())
            log.info(event, workspace=ws, missing=missing, wait_s=round(wait_s, 1))
            await asyncio.sleep(wait_s)
            return await read()

        if not listing.complete:
            _incomplete(result, listing)
            return
        # Every page applied: nothing older is missing. Unless the count moved and the ids
        # fell short of it: a row shifted onto a page already read may be one created since
        # the last sweep (nothing the mirror holds, so nothing to look up), and a watermark
        # raised past it hid it from every hot sweep until the next full one.
        result.listed_new = not _fell_short(listing)
        self._weigh_count(result, listing)
        result.skipped_records += listing.skipped
        if _unreadable(result):
            return
        _note_count_moved(result, listing)
        seen_ids, counts_add_up = listing.seen_ids, listing.consistent
        if result.baseline and not counts_add_up and not listing.uncounted:
            # Ids that do not add up to TotalCount: rows moved while the pages were read (a
            # deletion shifts every later row one place up, so one is never returned), or
            # upstream orders equal sort keys differently from one page to the next. Later
            # full sweeps look up what the mirror holds and a listing skipped; the baseline
            # has nothing to look up, so it reads the workspace once more.
            log.info(
                "sync.listing_reread",
                workspace=ws,
                distinct=len(listing.seen_ids),
                total_counts=sorted(listing.totals_seen),
            )
            again = await read()
            if _second_reading_stops(result, again):
                return
            _note_count_moved(result, again)
            seen_ids = listing.seen_ids | again.seen_ids
            if not _baseline_holds(listing, again, seen_ids):
                totals = sorted(again.totals_seen)
                why = (
                    f"its TotalCount moved from {totals[0]} to {totals[-1]} while it was read "
                    "again: experiments were created or deleted meanwhile"
                    if len(totals) > 1
                    else f"{len(seen_ids)} experiments in both readings against a TotalCount "
                    f"of {totals[0]}"
                )
                result.status = "partial"
                result.error = (
                    f"the listing did not add up twice ({why}): some may be missing, so this "
                    "is no baseline; the next sync reads the workspace whole again"
                )
                return
            result.listed_new = True  # the two readings hold every experiment
            if not again.consistent and again.seen_ids == listing.seen_ids:
                result.notes.append(
                    f"TotalCount {again.total_count} but {len(seen_ids)} experiments, the same "
                    "ones twice: taken as upstream's count being off"
                )
            # Mass deletions still need a listing that adds up on its own (below).
            counts_add_up = again.consistent
        # Only the absentees are read whole: the rest of the workspace may be 100,000 rows.
        absentees = await asyncio.to_thread(self.store.active_experiments, ws, exclude=seen_ids)
        if not absentees:
            return
        if not seen_ids and len(absentees) <= MAX_LOOKUPS:
            # A listing that returned nothing at all: the look-ups below would come straight
            # after it, inside a moment in which upstream answers "nothing" to every query
            # (TotalCount 0; or a count without its rows, `[]`, which an upstream that counts
            # soft-deleted experiments sends too), and a workspace of a few experiments was
            # marked deleted whole. As for a mass deletion, a second reading, apart from the
            # first by more than such a moment lasts, must miss them too.
            again = await read_again("sync.empty_listing_reread", len(absentees))
            if _second_reading_stops(result, again):
                return
            absentees = {i: r for i, r in absentees.items() if i not in again.seen_ids}
            if not absentees:
                return
        if len(absentees) > MAX_LOOKUPS:
            if counts_add_up:
                # Too many to look up, so one answer would decide alone; one glitch (an
                # empty or short listing that still adds up, e.g. TotalCount 0) would mark
                # the whole workspace deleted and alert on every row. A second reading,
                # apart from the first by more than such a glitch lasts, must miss them too.
                again = await read_again("sync.mass_deletion_reread", len(absentees))
                if not again.complete or not again.consistent or again.skipped:
                    result.status = "partial"
                    result.error = (
                        f"{len(absentees)} experiments missing from a listing, and reading "
                        "it again did not add up; deletions left to the next full sweep"
                    )
                    return
                missing = {i: r for i, r in absentees.items() if i not in again.seen_ids}
                if not await self._mass_deletion_holds(result, missing, seen):
                    return
                await self._mark_deleted(result, [i for i in missing if i not in seen])
            else:
                result.status = "partial"
                result.error = (
                    f"{len(absentees)} experiments missing from a listing whose counts did not "
                    "add up; deletions left to the next full sweep"
                )
            return
        population = await asyncio.to_thread(self.store.active_create_times, ws)
        await self._resolve_missing(result, absentees, seen, population)

    async def _mass_deletion_holds(
        self,
        result: SweepResult,
        missing: Mapping[str, Mapping[str, Any]],
        seen: set[str],
    ) -> bool:
        """Whether :data:`MASS_DELETION_SAMPLE` of ``missing`` (two readings' absentees,
        too many to look up), spread over their create times, are gone when looked up one
        by one (:meth:`_resolve_missing`: those found are applied, those gone marked). One
        found means the readings were upstream's glitch: the sweep is ``partial`` and
        nothing else is deleted."""
        if not missing:
            return True
        ordered = sorted(missing, key=lambda i: (missing[i].get("gmt_create_time") or "", i))
        step = len(ordered) / min(MASS_DELETION_SAMPLE, len(ordered))
        sample = {ordered[int(k * step)] for k in range(min(MASS_DELETION_SAMPLE, len(ordered)))}
        population = await asyncio.to_thread(self.store.active_create_times, result.workspace_id)
        doubted = await self._resolve_missing(
            result, {i: missing[i] for i in sorted(sample)}, seen, population
        )
        found = sorted(i for i in sample if i in seen)
        if not found and doubted:
            # not proven gone: the rest are not marked on their word
            result.status = "partial"
            result.error = (
                f"{len(missing)} experiments missing from two readings, but {len(doubted)} of "
                f"{len(sample)} looked up were counted and not returned, which proves no "
                "deletion; deletions left to the next full sweep"
            )
            return False
        if not found:
            return True
        log.warning(
            "sync.mass_deletion_refuted", workspace=result.workspace_id, missing=len(missing),
            found=found,
        )  # fmt: skip
        result.status = "partial"
        result.error = (
            f"{len(missing)} experiments missing from two readings, but {len(found)} of "
            f"{len(sample)} looked up are there ({', '.join(found)}): upstream's listings "
            "glitched; deletions left to the next full sweep"
        )
        return False

    async def _resolve_missing(
        self,
        result: SweepResult,
        missing: Mapping[str, Mapping[str, Any]],
        seen: set[str],
        population: Iterable[str | None],
    ) -> list[str]:
        """Find experiments a listing did not return: first by create-time windows planned
        from the mirror (a few calls for many experiments), then each one still missing by
        name in a window wide enough for any zone; apply what is found and mark deleted what
        complete listings do not return.

        A window reaches to the mirror's next experiment on each side. When its listing adds
        up and returns experiments created before and after a missing one, upstream read a
        range that holds that one's create time, in whatever zone it reads the bounds (the
        bounds move together): it is gone, with no look-up by name or creator (those are for
        a window that upstream read elsewhere, ~3 calls an experiment). An upstream seen to
        ignore MinCreateTime gets no windows: each would be the whole workspace.

        One whose look-up by name came back with fewer rows than its TotalCount (the
        answer of a glitch, and of an upstream counting soft-deleted experiments for one
        really deleted) is only *suspected* gone: see :meth:`_weigh_doubted`. Returns those
        of ``missing`` left neither found nor marked deleted that way."""
        if not missing:
            return []
        unreadable = 0  # records without a readable ExperimentId the windows returned
        times = sorted(t for t in (parse_time(v) for v in population) if t)
        dated = {i: parse_time(row.get("gmt_create_time")) for i, row in missing.items()}
        zoned = {i: time_has_zone(row.get("upstream_create_time")) for i, row in missing.items()}
        targets = sorted(t for t in dated.values() if t)
        windows = (
            []
            if result.workspace_id in self._min_create_ignored
            else plan_windows(targets, times, max(1, self.config.upstream.page_size - 2))
        )
        bracketed: set[str] = set()
        for low, high in windows:
            result.lookups += 1
            before, after = bisect.bisect_left(times, low), bisect.bisect_right(times, high)
            reach_low = times[before - 1] if before else low
            reach_high = times[after] if after < len(times) else high
            # WINDOW_EDGE more on each side: else an upstream with exclusive bounds answers
            # nothing for the window [t, t] of one experiment, and the look-up by name after
            # it misses one renamed meanwhile, which would then be taken for deleted.
            listing = await self.client.list_all(
                self._query(
                    result.workspace_id,
                    min_create_time=reach_low - WINDOW_EDGE,
                    max_create_time=reach_high + WINDOW_EDGE,
                ),
                tally=result.tally,
            )
            if not listing.complete:
                raise listing.error or UpstreamError("look-up incomplete")
            unreadable += listing.skipped
            await self._apply(result, listing.experiments, seen=seen)
            if listing.consistent and not listing.skipped and not listing.rows_missing:
                bracketed.update(self._bracketed(listing, dated, zoned, low, high))
        proven = sorted(i for i in bracketed if i not in seen)
        still = {i: row for i, row in missing.items() if i not in seen and i not in bracketed}
        gone: list[str] = []
        doubtful: set[str] = set()

        async def look(exp_id: str, row: Mapping[str, Any]) -> None:
            found = await self._lookup(result, exp_id, row, dated.get(exp_id), doubtful)
            if found is None:
                gone.append(exp_id)
            else:
                await self._apply(result, [found], seen=seen)

        async with asyncio.TaskGroup() as group:
            for exp_id, row in still.items():
                group.create_task(look(exp_id, row))
        if gone:
            gone = await self._by_creator(result, gone, missing, dated, seen)
        gone = proven + gone
        if gone and unreadable:
            # a window around them returned records that could be them, renamed
            result.skipped_records += unreadable
            result.error_tells_skipped = True
            raise UpstreamError(
                f"the look-ups of {len(gone)} missing experiments returned {unreadable} "
                "records without a readable ExperimentId: they may be among them, so none "
                "is marked deleted",
                code="UnreadableRecords",
                workspace_id=result.workspace_id,
            )
        await self._mark_deleted(result, [i for i in gone if i not in doubtful])
        return await self._weigh_doubted(result, [i for i in gone if i in doubtful])

    def _weigh_count(self, result: SweepResult, listing: Listing) -> None:
        """What a full sweep's whole, complete listing says of upstream's TotalCount: under
        one count, fewer ids than it counts are rows upstream counts and does not return
        (learnt, see _hidden_counted); exactly as many, that it counts what it returns."""
        if listing.uncounted or len(listing.totals_seen) != 1:
            return  # a count that moved says nothing of what upstream counts
        if not listing.seen_ids:
            # No rows at all under a positive count (`"Experiments": []`): the shape of the
            # glitch that answers every query so. Learnt from it, its own look-ups' answers
            # proved the whole workspace deleted at once, however long the glitch lasted.
            return
        if listing.skipped:
            # Records without a readable ExperimentId are rows it returned, not hidden ones:
            # the ids fall short of the count by them.
            return
        if listing.duplicates:
            # A row returned twice under one count: rows shifted between pages (upstream
            # ordered equal create times differently on each), and as many were never
            # returned, there and not hidden (their look-ups find them).
            return
        ws = result.workspace_id
        hidden = listing.total_count - len(listing.seen_ids)
        result.hidden_counted = max(hidden, 0)
        if hidden > 0 and ws not in self._hidden_counted:
            log.info("sync.hidden_rows_counted", workspace=ws, hidden=hidden)
            self._hidden_counted.add(ws)
        elif hidden == 0:
            self._hidden_counted.discard(ws)

    async def _weigh_doubted(self, result: SweepResult, ids: Sequence[str]) -> list[str]:
        """Experiments gone only by a look-up whose TotalCount counts rows it did not
        return. Within one sweep that cannot be told from a glitch that answers so for
        longer than any wait, and a false deletion alerts: a sweep marks one deleted only
        when an earlier sweep suspected it at least SUSPECT_CONFIRM_S before and no sweep
        has seen it since (:meth:`Store.weigh_suspects`), and otherwise suspects it (or
        leaves a younger suspicion as it is). Hot sweeps weigh too: a non-terminal
        experiment deleted upstream is marked within minutes, not at the next full sweep.

        Except where upstream is known to count rows it does not return: this full sweep's
        listing of the workspace counted at least as many more than it returned, or (for a
        hot sweep) the last full sweep's did (_hidden_counted). Such an upstream answers a
        look-up of a deleted experiment so every time, and a glitch confined to look-ups
        would not make the workspace's own listing over-count: they are marked at once.
        Returns those neither found nor marked deleted."""
        if not ids:
            return []
        ws = result.workspace_id
        if (
            result.hidden_counted >= len(ids)
            if result.mode == "full"
            else ws in self._hidden_counted
        ):
            await self._mark_deleted(result, ids)
            return []
        now = self._now(ws)
        at = parse_time(now)
        assert at is not None  # _now gives the stored form
        applied, suspected, waiting = await asyncio.to_thread(
            self.store.weigh_suspects,
            ws,
            list(ids),
            observed_at=now,
            run_id=result.run,
            confirm_before=format_time(at - timedelta(seconds=SUSPECT_CONFIRM_S)),
            on_changes=self.on_changes,
            progress=result.progress(),
        )
        result.changes += applied.changes
        result.marked_deleted += applied.marked_deleted
        if suspected:
            log.warning(
                "sync.deletion_suspected", workspace=ws, ids=suspected[:5], count=len(suspected)
            )
        left = suspected + waiting
        if left:
            result.notes.append(
                f"{_count(len(left), 'experiment')} looked up, counted but not returned: not "
                f"marked deleted until a sweep {SUSPECT_CONFIRM_S / 60:.0f} minutes after the "
                "first such answer misses them too"
            )
        return left

    def _bracketed(
        self,
        listing: Listing,
        dated: Mapping[str, datetime | None],
        zoned: Mapping[str, bool | None],
        low: datetime,
        high: datetime,
    ) -> Iterator[str]:
        """The experiments of ``dated`` created in ``[low, high]`` that ``listing`` (a
        window's, complete and adding up) returned experiments created strictly before and
        strictly after: whatever zone upstream read the window's bounds in, its range held
        their create times. (Strictly: an upstream keeping finer times than the whole
        seconds it shows may hold an equal one on either side.)

        Only times of the missing one's own form count (``zoned``: whether upstream last
        sent its create time with a zone, see :func:`time_has_zone`; None, unknown, counts
        for neither): a naive time is read in ``create_time_zone``, and where that is wrong
        it is off by the difference, while a zoned one is not. Across forms, a naive time
        truly before the missing one reads as after it, and a window upstream read hours
        away from it "bracketed" an experiment that is there. Within one form every time
        is off by the same amount, so their order is upstream's."""
        by_form: dict[bool, list[datetime]] = {}
        for raw in listing.experiments:
            value = raw.get("GmtCreateTime")
            form = time_has_zone(value)
            if form is None:
                continue
            created = parse_time(value, naive_tz=self.config.upstream.tz)
            if created is not None:
                by_form.setdefault(form, []).append(created)
        for exp_id, created in dated.items():
            form = zoned.get(exp_id)
            returned = by_form.get(form) if form is not None else None
            if created is None or not returned or not low <= created <= high:
                continue
            if min(returned) < created < max(returned):
                yield exp_id

    def _query(self, workspace_id: str, **filters: Any) -> ListQuery:
        return ListQuery(
            workspace_id=workspace_id,
            include_config_data=True,
            sort_by=self.config.upstream.sort_by,
            order="ASC",
            **filters,
        )

    async def _lookup(
        self,
        result: SweepResult,
        exp_id: str,
        row: Mapping[str, Any],
        created: datetime | None,
        doubtful: set[str] | None = None,
    ) -> dict[str, Any] | None:
        """One experiment by name, in a create-time window of ±14 h (whatever the zone
        upstream reads times in); None when a complete listing does not return it (and
        ``exp_id`` added to ``doubtful`` if that listing counted rows it did not return)."""
        found = await self._search(
            result,
            [exp_id],
            self._query(result.workspace_id, name=row.get("name") or None, **_wide(created)),
            doubtful=doubtful,
        )
        return found.get(exp_id)

    async def _by_creator(
        self,
        result: SweepResult,
        gone: Sequence[str],
        missing: Mapping[str, Mapping[str, Any]],
        dated: Mapping[str, datetime | None],
        seen: set[str],
    ) -> list[str]:
        """Of the experiments neither their create-time window nor their name found, those
        still not found by their creator in the same ±14 h (applied if found).

        The create-time window misses an experiment when upstream reads MinCreateTime and
        MaxCreateTime in another zone than ``create_time_zone`` says, and the name misses
        one renamed since the mirror saw it: both at once would have been taken for a
        deletion. A creator does not change, and this window holds for any zone; one
        look-up per creator and stretch of time serves all of theirs (a call more per
        sweep that finds experiments gone). Those without a creator or a create time are
        not looked up again."""
        if result.workspace_id in self._creator_refused:
            return list(gone)  # as before there was this look-up
        by_creator: dict[str, list[str]] = {}
        for exp_id in gone:
            creator = missing[exp_id].get("creator")
            if creator and dated.get(exp_id):
                by_creator.setdefault(str(creator), []).append(exp_id)
        asked = {i for ids in by_creator.values() for i in ids}
        still = [i for i in gone if i not in asked]
        for creator, ids in by_creator.items():
            for low, high in _merged_wide([t for i in ids if (t := dated[i])]):
                wanted = [i for i in ids if i not in seen and (t := dated[i]) and low <= t <= high]
                query = self._query(
                    result.workspace_id,
                    creator=creator,
                    min_create_time=low - WIDE_WINDOW,
                    max_create_time=high + WIDE_WINDOW,
                )
                try:
                    # Only what it finds counts: the name look-up before it decided the
                    # rest, and a listing of a creator's whole day that does not add up
                    # (no usable TotalCount, say) must not make every such sweep fail.
                    found = await self._search(result, wanted, query, proves=False)
                except FatalUpstreamError as exc:
                    if not rejects_parameter(exc):
                        raise
                    # Creator is documented, but an upstream that will not filter by it
                    # costs this look-up (as before it existed), not every sweep that
                    # finds an experiment gone.
                    self._creator_refused.add(result.workspace_id)
                    log.warning("sync.creator_filter_refused",
                                workspace=result.workspace_id, error=str(exc))  # fmt: skip
                    return [i for i in gone if i not in seen]
                if found:
                    log.info("sync.found_by_creator", workspace=result.workspace_id,
                             count=len(found))  # fmt: skip
                    await self._apply(result, list(found.values()), seen=seen)
            still.extend(i for i in ids if i not in seen)
        return still

    async def _search(
        self,
        result: SweepResult,
        ids: Sequence[str],
        query: ListQuery,
        *,
        proves: bool = True,
        doubtful: set[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Those of ``ids`` that a listing of ``query`` returns. The rest are proven absent
        from it, or this raises: the listing was incomplete, did not add up over pages
        (a row may have fallen between them), or held records without a readable id.
        ``proves=False``: what it found, whatever the rest. ``doubtful``: where the rest
        are absent only from rows fewer than the listing's TotalCount (a count of rows it
        does not return), they are added to it."""
        result.lookups += 1
        listing = await self.client.list_all(query, tally=result.tally)
        wanted = set(ids)
        found = {
            key: raw
            for raw in listing.experiments
            if (key := str(raw.get("ExperimentId"))) in wanted
        }
        if len(found) == len(wanted) or not proves:
            return found
        what = f"the look-up of {', '.join(ids)}"
        if not listing.complete:
            raise listing.error or UpstreamError("look-up incomplete")
        if not listing.consistent and (
            len(listing.seen_ids) >= self.config.upstream.page_size or listing.rows_missing
        ):
            # Pages that do not add up to their count can have dropped it between them (rows
            # of one create time in another order on each page's query): no proof of absence.
            # Fewer rows than a page came on a short page 1, all there was: that one decides,
            # unless page 1 came without its rows under a positive count.
            why = (
                "had no usable TotalCount to be checked against"
                if listing.uncounted
                else f"came without their Experiments under a TotalCount of {listing.total_count}"
                if listing.rows_missing
                else (
                    "gave TotalCounts of "
                    + ", ".join(str(n) for n in sorted(listing.totals_seen))
                    + " as they were read"
                )
                if len(listing.totals_seen) > 1
                else f"did not add up to their TotalCount {listing.total_count}"
            )
            raise UpstreamError(
                f"{what} read {listing.pages_read} pages whose "
                f"{len(listing.seen_ids)} experiments {why}: it may have fallen between "
                "pages, so it is not marked deleted",
                code="LookupInconclusive",
                workspace_id=result.workspace_id,
            )
        if listing.skipped:
            result.skipped_records += listing.skipped
            result.error_tells_skipped = True
            raise UpstreamError(
                f"{what} returned {listing.skipped} records without a "
                "readable ExperimentId: it may be one of them, so it is not marked deleted",
                code="UnreadableRecords",
                workspace_id=result.workspace_id,
            )
        if (
            doubtful is not None
            and not listing.uncounted
            and listing.total_count > len(listing.seen_ids)
        ):
            # Fewer rows than counted (`"Experiments": []` under a positive count, for one
            # missing experiment): a glitch answers so, and so does an upstream that counts
            # soft-deleted experiments, for one really deleted.
            doubtful.update(i for i in wanted if i not in found)
        return found

    # --- hot -----------------------------------------------------------------------------

    async def _hot(self, result: SweepResult, state: WorkspaceState) -> None:
        ws = result.workspace_id
        non_terminal = await asyncio.to_thread(
            self.store.non_terminal_experiments, ws, self.config.sync.terminal_statuses
        )
        # A row without a status has no filter to find it by (sending one would ask for
        # Status "None"): the "new" listing or a look-up by create time finds it instead.
        statuses = sorted({str(s) for row in non_terminal.values() if (s := row.get("status"))})
        spelled = _upstream_spellings(non_terminal.values())
        seen: set[str] = set()
        overlap = timedelta(seconds=self.config.sync.create_time_overlap_s)
        watermark = parse_time(state.create_watermark)
        since = (watermark - overlap) if watermark else None

        async def on_page(page: Page) -> None:
            await self._apply(result, page.experiments, seen=seen, previous=non_terminal)

        listings: dict[str, Any] = {}
        refused = self._status_refused.setdefault(ws, set())

        async def run(label: str, query: ListQuery) -> None:
            async def checked(page: Page) -> None:
                if query.status is not None and ws not in self._status_filter_ignored:
                    self._check_status_filter(ws, query.status, page)
                if query.status is not None and ws in self._status_filter_ignored:
                    # Learnt now, by this listing or another: each status listing would be
                    # the whole workspace (the first sweep to learn it cost several full
                    # sweeps). They stop here; the workspace is listed once instead, below.
                    raise _FilterIgnored
                if since is not None and label == "new" and ws not in self._min_create_ignored:
                    self._check_min_create(ws, since, page)
                    if ws in self._min_create_ignored:
                        raise _FilterIgnored  # what is new is read newest first, below
                await on_page(page)

            try:
                listings[label] = await self.client.list_all(
                    query, on_page=checked, tally=result.tally, keep=False
                )
            except _FilterIgnored:
                return
            except FatalUpstreamError as exc:
                if query.status is None or not rejects_parameter(exc):
                    raise
                # An upstream that does not take this value as a Status filter (one its
                # API version lacks, say): its experiments are looked up by create time
                # below, as those that left their status are, from now on without asking.
                refused.add(query.status.strip().upper())
                log.warning(
                    "sync.status_filter_refused", workspace=ws, status=query.status, error=str(exc)
                )

        async def newest_first(since: datetime) -> None:
            listings["new"] = await self._newest_first(result, since, on_page)

        # An upstream seen to ignore the Status filter answers each status listing with the
        # whole workspace: one listing of it instead, which holds what is new too.
        whole = ws in self._status_filter_ignored
        async with asyncio.TaskGroup() as group:
            if whole:
                group.create_task(run("all", self._query(ws)))
            elif since is not None and ws in self._min_create_ignored:
                group.create_task(newest_first(since))
            else:
                group.create_task(run("new", self._query(ws, min_create_time=since)))
            for status in (s for s in statuses if s not in refused and not whole):
                query = self._query(ws, status=spelled.get(status, status))
                group.create_task(run(f"status:{status}", query))
            if self._bumps.get(ws) is not False and ws not in self._feed_refused:
                group.create_task(self._modified_feed(result, state, on_page))
        if not whole and ws in self._status_filter_ignored:  # learnt by this sweep
            listings.pop("new", None)  # (the listing of the whole workspace holds it)
            await run("all", self._query(ws))
        elif since is not None and "new" not in listings and ws in self._min_create_ignored:
            await newest_first(since)  # learnt by this sweep: its listing stopped
        # Records without a readable ExperimentId: the listings left them out of the pages
        # they handed on, and counted them (the feed's pages count theirs as applied;
        # the largest count of one listing: the same record can come in several of them)
        result.skipped_records += max((listing.skipped for listing in listings.values()), default=0)
        # Not when the count moved and the ids fell short of it (as in a full sweep): a row
        # shifted onto a page already read may be a new one, and a watermark raised past it
        # hid it from every hot sweep until the next full one.
        result.listed_new = any(
            listings[label].complete and not _fell_short(listings[label])
            for label in ("new", "all")
            if label in listings
        )
        incomplete = [label for label, listing in listings.items() if not listing.complete]
        if incomplete:
            result.status = "partial"
            first = listings[incomplete[0]].error
            result.error = f"{', '.join(incomplete)} incomplete: {first}"
            result.error_code = first.code if first else None
            return
        vanished = {i: row for i, row in non_terminal.items() if i not in seen}
        # Those of a status no listing could ask for: looked up every sweep, past the cap
        # (which is for a burst of changes, not for a status upstream cannot filter by).
        unlisted = {i: row for i, row in vanished.items() if row.get("status") in refused}
        vanished = {i: row for i, row in vanished.items() if i not in unlisted}
        if len(vanished) > MAX_LOOKUPS:
            result.notes.append(f"{len(vanished)} left their status; capped look-ups")
            result.status = "partial"
            result.error = (
                f"{len(vanished)} non-terminal experiments were in no listing of their "
                f"status; looked up the {MAX_LOOKUPS} seen longest ago, the next sweep goes "
                "on with the rest"
            )
            # Those seen longest ago first: a look-up that finds one marks it seen, so the
            # next sweep looks up the others. In the mirror's order it looked up the same
            # ones every sweep when they never left their status (an upstream that filters
            # by another spelling of it), and the rest were never looked up.
            oldest = sorted(
                vanished.items(), key=lambda kv: (kv[1].get("last_seen_at") or "", kv[0])
            )
            vanished = dict(oldest[:MAX_LOOKUPS])
        vanished.update(unlisted)
        await self._resolve_missing(
            result,
            vanished,
            seen,
            await asyncio.to_thread(self.store.active_create_times, ws) if vanished else (),
        )

    async def _newest_first(
        self,
        result: SweepResult,
        since: datetime,
        on_page: Callable[[Page], Any],
    ) -> Listing:
        """What was created since ``since``, for an upstream that ignores MinCreateTime:
        sorted by create time, newest first, read until a page reaches below ``since``.

        Experiments created while it pages push the others down a page: one may be read
        twice, none is missed (one created after page 1 was read is the next sweep's, which
        the create-time overlap covers). Upstream's order is checked as the pages come: an
        upstream that ignores ``Order`` too is read to the end, which is the whole workspace
        but misses nothing. A failing page leaves the listing incomplete, as in
        :meth:`UpstreamClient.list_all`."""
        query = ListQuery(
            workspace_id=result.workspace_id,
            sort_by=self.config.upstream.sort_by,
            order="DESC",
            include_config_data=True,
        )
        listing = Listing()
        newest_first, previous = True, None
        try:
            async for page in self.client.iter_pages(query, tally=result.tally):
                listing.pages_read += 1
                await on_page(page)
                times = self._times(page.experiments)
                chain = ([previous] if previous else []) + times
                newest_first = newest_first and all(a >= b for a, b in itertools.pairwise(chain))
                previous = times[-1] if times else previous
                if newest_first and times and times[-1] < since:
                    break
        except FatalUpstreamError:
            raise  # credentials, access: every other listing fails the same way
        except UpstreamError as exc:
            listing.error = exc
        listing.pages_expected = listing.pages_read + (listing.error is not None)
        return listing

    async def _modified_feed(
        self,
        result: SweepResult,
        state: WorkspaceState,
        on_page: Callable[[Page], Any],
    ) -> None:
        """Recently modified experiments, newest first, until the previous hot sweep.

        Best effort: upstream does not document that every change bumps GmtModifiedTime, so a
        failure here is logged and does not make the sweep partial; nor does an upstream
        that refuses its SortBy (``INVALID_INPUT_PARAMS``) in both vocabularies (the client
        tries the other one): the feed is then dropped.
        """
        last = parse_time(state.last_hot_ok_at or state.last_full_ok_at)
        if last is None:
            return
        horizon = last - timedelta(seconds=self.config.sync.create_time_overlap_s)
        query = ListQuery(
            workspace_id=result.workspace_id,
            sort_by=self.config.upstream.sort_by_modified,
            order="DESC",
            include_config_data=True,
        )
        try:
            pages = 0
            async for page in self.client.iter_pages(query, tally=result.tally):
                pages += 1
                await on_page(page)
                oldest = min(self._times(page.experiments, "GmtModifiedTime"), default=None)
                if oldest is None or oldest < horizon or pages >= MODIFIED_FEED_MAX_PAGES:
                    return
        except FatalUpstreamError as exc:
            if not rejects_parameter(exc):
                raise  # credentials, access: every other listing fails the same way
            # Only this feed sorts by modified time, a SortBy value documented nowhere for
            # certain (GmtModifiedTime / update_time): an upstream that refuses it costs the
            # feed, not the sweep. Not asked again by this process.
            self._feed_refused.add(result.workspace_id)
            log.warning(
                "sync.modified_feed_refused",
                workspace=result.workspace_id,
                sort_by=self.config.upstream.sort_by_modified,
                error=str(exc),
            )
        except UpstreamError as exc:
            log.info("sync.modified_feed_skipped", workspace=result.workspace_id, error=str(exc))


class _Batches:
    """A full sweep's pages, applied in batches (see the module docstring).

    Pages are normalised as they arrive (on the event loop, a page at a time) and buffered.
    A batch is handed to the store when ``rows`` experiments are buffered, or ``age_s`` after
    the first page of the batch arrived; at most one batch is being applied (in a worker
    thread) at any time, and batches are applied in arrival order. A page that fills the
    buffer while the previous batch is still being applied waits for it, which holds the
    listing back rather than letting pages pile up in memory.
    """

    def __init__(
        self,
        engine: SyncEngine,
        result: SweepResult,
        seen: set[str],
        *,
        rows: int | None = None,
        age_s: float | None = None,
    ) -> None:
        self._engine = engine
        self._result = result
        self._seen = seen
        self._rows = FULL_BATCH_ROWS if rows is None else rows
        self._age_s = FULL_BATCH_AGE_S if age_s is None else age_s
        self._buffer: list[Experiment] = []
        self._contents: list[tuple[Any, ...]] = []  # each buffered row's stored form
        self._applying: asyncio.Task[list[Experiment]] | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False

    async def add(self, raws: Iterable[Mapping[str, Any]]) -> None:
        """Buffer one page; apply a batch when it is full (waiting for the previous one).

        The rows' stored form is computed here, on the event loop's thread, which mostly
        waits for pages, rather than by the writer thread, the busier one in a full sweep;
        and a page at a time: for a whole batch at once (2,000 rows, ~40 ms) the loop would
        stop answering the read API meanwhile. The buffer then holds a row's stored form
        beside its experiment, ~1.5 KB more a buffered row (~3 MB for a batch)."""
        page = self._engine._normalise(self._result, raws)
        ws = self._result.workspace_id
        contents = [experiment_values(e, ws) for e in page]  # before either list grows
        self._buffer.extend(page)
        self._contents.extend(contents)
        if len(self._buffer) >= self._rows:
            async with self._lock:
                # (another page may have taken it, or seen the batch before it fail: no
                # batch goes after a failed one, as in close())
                if len(self._buffer) >= self._rows and not self._failed:
                    await self._wait()
                    self._start()
        elif self._buffer and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._age_s, self._on_timer)

    async def close(self, *, apply_rest: bool) -> None:
        """Wait for the batch being applied, then (``apply_rest``) apply what is left.
        Raises the error of a failed apply, unless one was raised already."""
        self._cancel_timer()
        async with self._lock:
            await self._wait()
            if apply_rest and self._buffer and not self._failed:
                self._start()
                await self._wait()
            self._buffer, self._contents = [], []

    def _on_timer(self) -> None:
        self._timer = None
        if not self._buffer or self._failed:
            return
        running = self._applying is not None and not self._applying.done()
        if running or self._lock.locked():
            # the batch being applied goes first; try again a little later
            self._timer = asyncio.get_running_loop().call_later(self._age_s, self._on_timer)
            return
        done = self._applying
        if done is not None and (done.cancelled() or done.exception() is not None):
            return  # its error is raised by the next add() or close()
        self._applying = None
        self._start()

    def _start(self) -> None:
        """Hand the buffer to the store (the caller made sure no batch is being applied)."""
        self._cancel_timer()
        batch, self._buffer = self._buffer, []
        contents, self._contents = self._contents, []
        self._applying = asyncio.create_task(
            self._engine._apply_normalised(self._result, batch, seen=self._seen, contents=contents)
        )

    async def _wait(self) -> None:
        task = self._applying
        if task is None:
            return
        try:
            # Shielded: a page cancelled while it waits (the listing failed elsewhere) must
            # not cancel the batch; close() then waits for it.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise
            self._applying, self._failed = None, True
            raise
        except BaseException:
            self._applying, self._failed = None, True
            raise
        self._applying = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _log_finished(result: SweepResult) -> None:
    """The ``sync.finished`` event of a sweep, whichever way it ended."""
    event = log.info if result.status == "ok" else log.warning
    event(
        "sync.finished",
        workspace=result.workspace_id,
        mode=result.mode,
        status=result.status,
        api_calls=result.api_calls,
        pages=result.pages,
        retries=result.retries,
        throttled=result.throttled,
        experiments=result.experiments_seen,
        changes=result.changes,
        deleted=result.marked_deleted,
        lookups=result.lookups,
        baseline=result.baseline,
        duration_s=round(result.duration_s, 3),
        error=result.error,
        error_code=result.error_code,
        skipped=result.skipped_records,
        notes=result.all_notes() or None,
    )


def _upstream_spellings(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Per (normalised) status, how upstream spells it most often among ``rows``: the
    mirror keeps statuses in capitals, and an upstream that sends ``Running`` may filter by
    ``Running`` only (asked for ``RUNNING``, it answered nothing, and every experiment of
    the status was looked up instead, each hot sweep)."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        status, raw = row.get("status"), row.get("upstream_status")
        if status:
            spelling = (
                raw.strip() if isinstance(raw, str) and raw.strip().upper() == status else status
            )
            counts.setdefault(str(status), Counter())[spelling] += 1
    # the most frequent spelling of each (the mirror's own on a tie)
    return {
        status: max(spellings, key=lambda s: (spellings[s], s == status))
        for status, spellings in counts.items()
    }


def _second_reading_stops(result: SweepResult, again: Listing) -> bool:
    """Whether a full sweep's second reading of its workspace stops it: it was incomplete
    (recorded so), or it held records without a readable ExperimentId (:func:`_unreadable`;
    counted once with the first reading's: the same records again, most likely)."""
    if not again.complete:
        _incomplete(result, again)
        return True
    result.skipped_records = max(result.skipped_records, again.skipped)
    return _unreadable(result)


def _unreadable(result: SweepResult) -> bool:
    """Whether a full sweep's listing held records without a readable ExperimentId (a
    missing or empty id, a record that is not an object) that stop it here, as partial;
    what could be read is applied either way.

    - After the baseline, any experiment of the mirror could be among them: the sweep
      deletes nothing (it used to look the "missing" ones up, meet only more unreadable
      records, and mark them deleted).
    - A baseline deletes nothing anyway; a few such records among many readable ones are
      upstream's junk, and it holds (the run notes them). As many as the readable ones is a
      listing in a shape this version cannot read: a baseline of it would report every
      experiment as new once they can be read, so it is none.
    """
    skipped, readable = result.skipped_records, result.experiments_seen
    if not skipped or (result.baseline and skipped < readable):
        return False
    result.status, result.error_tells_skipped = "partial", True
    if result.baseline:
        result.error = (
            f"{skipped} records of the listing had no readable ExperimentId, against "
            f"{readable} that had one: this is no baseline; the next sync reads the "
            "workspace whole again"
        )
    else:
        result.error = (
            f"{skipped} records of the listing had no readable ExperimentId; any experiment "
            "could be among them, so deletions are skipped"
        )
    return True


def _incomplete(result: SweepResult, listing: Listing) -> None:
    """A full sweep's listing that missed pages: partial, and nothing is marked deleted."""
    result.status = "partial"
    result.error = f"listing incomplete, deletions skipped: {listing.error}"
    result.error_code = listing.error.code if listing.error else None


def _note_count_moved(result: SweepResult, listing: Listing) -> None:
    """Note a full sweep's listing whose TotalCount moved while its pages were read (once).

    Experiments created meanwhile come after the last page planned, and the listing reads
    on to them; but a deletion shifts every later row one place up, and the row that
    crosses onto a page already read is on no page. One the mirror holds is looked up as
    missing; one it does not hold yet (new since the last sweep) is read by the next sweep
    (a hot sweep's listing of what is new, or of its status; else the next full sweep).
    Reading the workspace again to rule that out would double every such sweep, so the
    run says so instead of a plain ``ok`` — when its ids fall short of the largest count:
    creations alone, read on to, leave nothing out. Nor is the create watermark raised
    (:func:`_fell_short`)."""
    if _fell_short(listing) and not any(n.startswith(_COUNT_MOVED) for n in result.notes):
        totals = sorted(listing.totals_seen)
        result.notes.append(
            f"{_COUNT_MOVED} between {totals[0]} and {totals[-1]} while the pages were read: "
            "an experiment new since the last sweep may be read only by the next one"
        )


_COUNT_MOVED = "TotalCount varied"


class _FilterIgnored(Exception):
    """A hot sweep's listing stops: upstream ignores its filter (Status, MinCreateTime), and
    the sweep reads what it was for another way (see _hot)."""


def _fell_short(listing: Listing) -> bool:
    """The listing's TotalCount moved while its pages were read and its ids fall short of
    the largest count: a row may have shifted onto a page already read."""
    return len(listing.totals_seen) > 1 and len(listing.seen_ids) < max(listing.totals_seen)


def _baseline_holds(first: Listing, again: Listing, seen_ids: Collection[str]) -> bool:
    """Whether a baseline read twice (the first reading did not add up) has every experiment:
    the second reading adds up on its own; or both readings together saw as many
    experiments as any page of either counted, or as the second counted throughout if its
    count held still; or both readings saw exactly the same experiments under the same
    count (a stable listing: upstream's count is off, e.g. it counts a record without an
    ExperimentId).

    The second rule holds in a busy workspace too, whose count moves while it is read: a
    creation lands past the last page (the listing is in create order), where the union
    of two readings has it, so asking for a count that stands still would leave such a
    workspace without a baseline for as long as it stays busy (every sync full, no
    alerts). What it cannot rule out is a row a deletion pushed off a page in both
    readings while creations made up the count: the next full sweep reads that one, as a
    first sighting."""
    if again.consistent:
        return True
    if len(seen_ids) >= max(first.totals_seen | again.totals_seen, default=0):
        return True
    return len(again.totals_seen) == 1 and (
        len(seen_ids) >= again.total_count  # the second reading's count held still
        or (
            first.totals_seen == again.totals_seen
            and first.seen_ids == again.seen_ids
            and not (first.rows_missing or again.rows_missing)  # no rows is no listing
        )
    )


_gc_sweeps = 0
_gc_saved_threshold: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def _full_sweep_gc() -> Iterator[None]:
    """Make the cyclic garbage collector cheap while full sweeps run.

    A full sweep allocates millions of short-lived objects (parsed pages, normalised
    experiments, rows) that reference counting frees, while the process holds a few hundred
    thousand long-lived ones (modules, the event loop, aiohttp) that every collection of the
    oldest generation scans again: ~2 s of a 100,000-experiment baseline. So, while any full
    sweep runs, what exists at its start is frozen out of collections (``gc.freeze``) and
    the youngest generation is collected less often. Both are undone when the last
    concurrent full sweep ends; cyclic garbage made meanwhile is still collected.
    """
    global _gc_sweeps, _gc_saved_threshold
    if _gc_sweeps == 0:
        _gc_saved_threshold = gc.get_threshold()
        gen0, gen1, gen2 = _gc_saved_threshold
        gc.freeze()
        if gen0:  # 0: automatic collection is off, and stays off
            gc.set_threshold(max(gen0, FULL_SWEEP_GC_GEN0), gen1, gen2)
    _gc_sweeps += 1
    try:
        yield
    finally:
        _gc_sweeps -= 1
        if _gc_sweeps == 0:
            gc.set_threshold(*_gc_saved_threshold)
            gc.unfreeze()


def plan_windows(
    targets: Sequence[datetime], population: Sequence[datetime], capacity: int
) -> list[tuple[datetime, datetime]]:
    """Group sorted create times to look up into as few create-time windows as possible,
    each holding at most ``capacity`` of the mirror's experiments (``population``, sorted),
    i.e. one page. Pure; windows are inclusive at both ends, as upstream reads them."""
    windows: list[tuple[datetime, datetime]] = []
    start = end = None
    for t in targets:
        if start is None:
            start = end = t
            continue
        if end is not None and t <= end:
            continue  # already inside the current window
        inside = bisect.bisect_right(population, t) - bisect.bisect_left(population, start)
        if inside <= capacity:
            end = t
        else:
            windows.append((start, end))  # type: ignore[arg-type]
            start = end = t
    if start is not None:
        windows.append((start, end))  # type: ignore[arg-type]
    return windows


async def _to_the_end(future: asyncio.Future[_T]) -> _T:
    """``future``'s result, waited for even if the caller is cancelled meanwhile; then
    CancelledError if it was. For the store writes that open and close a sweep's run: the
    writer thread goes on whatever happens to its awaiter, so the run's row must be known,
    and closed, whenever the sweep is cancelled."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break  # done, with its error: raised below, unless the caller was cancelled
    if cancelled:  # (the caller reads the future's outcome if it needs it)
        raise asyncio.CancelledError
    return future.result()


def _defect(result: SweepResult, exc: BaseException) -> None:
    """A sweep that failed on a defect, not on upstream or store trouble: logged with its
    traceback, and its run still closed as failed saying what, rather than left "running"
    until the next start (and the workspace's error left empty)."""
    log.error("sync.internal_error", workspace=result.workspace_id, mode=result.mode, exc_info=exc)
    result.status, result.error = "failed", f"internal error: {type(exc).__name__}: {exc}"


def _trace_misuse(result: SweepResult, exc: HpoSyncError) -> None:
    """A store error that SQLite or the sqlite3 module raised for misuse of their API
    (InterfaceError, ProgrammingError) is a defect of this code, not trouble of the file:
    logged with its traceback, as :func:`_defect` does, so that it can be found from the
    log (its message alone, "bad parameter or other API misuse", says nothing of where)."""
    if isinstance(exc, StoreError) and isinstance(
        exc.__cause__, sqlite3.InterfaceError | sqlite3.ProgrammingError
    ):
        log.error(
            "sync.internal_error", workspace=result.workspace_id, mode=result.mode, exc_info=exc
        )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every exception of a (nested) group, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _first_hpo_error(group: BaseExceptionGroup[BaseException]) -> HpoSyncError | None:
    """The first hpo-sync error in a (nested) exception group, fatal ones first."""
    leaves = _leaves(group)
    ours = [e for e in leaves if isinstance(e, HpoSyncError)]
    if len(ours) != len(leaves):
        return None  # something else went wrong too: let it surface
    fatal = [e for e in ours if isinstance(e, FatalUpstreamError)]
    return (fatal or ours or [None])[0]


def _wide(created: datetime | None) -> dict[str, datetime]:
    """The create-time filters of a window of ±:data:`WIDE_WINDOW` around ``created``."""
    if created is None:
        return {}
    return {"min_create_time": created - WIDE_WINDOW, "max_create_time": created + WIDE_WINDOW}


def _merged_wide(times: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    """``times`` grouped into stretches of at most twice :data:`WIDE_WINDOW`: the first
    and last time of each (one look-up each, widened by the window on both sides)."""
    out: list[tuple[datetime, datetime]] = []
    for t in sorted(times):
        # (a stretch spans 28 h at most: a creator's deletions spread over months must not
        # make one listing of everything they made in that time)
        if out and t - out[-1][0] <= 2 * WIDE_WINDOW:
            out[-1] = (out[-1][0], t)
        else:
            out.append((t, t))
    return out


def _fresh(learnt_at: datetime, now: datetime) -> bool:
    """Whether what was learnt at ``learnt_at`` is still to be trusted (a time ahead of the
    clock, after it was set back, by no more than :data:`LEARNT_KEEP`)."""
    return abs(now - learnt_at) < LEARNT_KEEP


def _with_workspace(exp: Experiment, workspace_id: str) -> Experiment:
    from dataclasses import replace

    return replace(exp, workspace_id=workspace_id)
