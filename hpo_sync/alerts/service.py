"""The alert delivery worker the daemon hosts: drain the outbox, group per target, render,
rate-limit, deliver, classify, record. Never logs a webhook URL or secret (URLs embed
tokens): only target names."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from yarl import URL

from hpo_sync import proxies
from hpo_sync.config import Config, TargetConfig
from hpo_sync.errors import StoreBusyError, StoreError
from hpo_sync.normalise import parse_time
from hpo_sync.store import ChangeRow, Store

from . import outbox
from .classify import Dead, Outcome, Retry, Sent, classify, secret_parts
from .render import AlertItem, Formed, Message, console_link, form_messages, render_notice
from .rules import StallNotice, decode_counts, stall_notices
from .signing import dingtalk_url, feishu_sign, webhook_headers

if TYPE_CHECKING:
    from hpo_sync.runtime import Runtime

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

#: (messages, per seconds) windows each sender keeps under, a little below the documented
#: limits so clock skew against the receiver's window never trips them.
RATE_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "slack": ((1, 1.1),),
    # 5 per 2 s per webhook (documented), and ~30 a minute per channel (seen, not documented)
    "discord": ((4, 2.2), (28, 62.0)),
    "dingtalk": ((19, 62.0),),
    "feishu": ((4, 1.1), (95, 62.0)),
    "lark": ((4, 1.1), (95, 62.0)),
    "wecom": ((19, 62.0),),
    "teams": ((1, 1.1),),
    "webhook": (),
}
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 600.0
#: The longest wait a target's ``Retry-After`` (or Discord's ``retry_after``) is honoured for.
RETRY_AFTER_MAX_S = 3600.0
POLL_S = 1.0
REQUEST_TIMEOUT_S = 10.0
#: How much of a target's answer is read: enough for any chat API's JSON answer (an error
#: code and its message) and the 200 characters shown of it; the rest is not read, so a
#: receiver answering with a huge body (a proxy's error page, a hostile endpoint) cannot
#: make the daemon hold it in memory.
MAX_ANSWER_BYTES = 64 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


def backoff_s(attempts: int) -> float:
    """Capped exponential backoff after ``attempts`` failed attempts (1 → 5 s, 2 → 10 s …)."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def _robot(target: TargetConfig) -> str:
    """What a target's rate limits are counted per: its type and URL (the robot, or the
    webhook). An in-memory key only: it holds the URL's token, and is never shown."""
    return f"{target.type}\n{target.url.reveal()}"


def _log_failure(exc: BaseException, **where: str) -> None:
    """A round's failure. The mirror's write lock held past busy_timeout by the other
    writer (the sweep process, in a long batch) is transient and loses nothing (what was
    not recorded is kept, and tried again next round): a warning, not an error."""
    if isinstance(exc, StoreBusyError):
        log.warning("alert.store_busy", **where, error=str(exc), retry="next round")
    else:
        log.error("alert.worker_failed", **where, error=repr(exc))


def _track(
    running: dict[str, asyncio.Task[_T]], name: str, work: Coroutine[Any, Any, _T], kind: str
) -> asyncio.Task[_T]:
    """``work`` for target ``name`` as a task, in ``running`` until it ends."""
    task = asyncio.create_task(work, name=f"alerts.{kind}.{name}")
    running[name] = task

    def done(task: asyncio.Task[_T]) -> None:
        if running.get(name) is task:
            del running[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # What it had not recorded stays due: the next round tries again.
            _log_failure(exc, target=name)

    task.add_done_callback(done)
    return task


class RateLimiter:
    """Sliding windows: at most ``n`` acquisitions per ``period_s`` for each window."""

    def __init__(
        self,
        windows: Sequence[tuple[int, float]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.windows = tuple(windows)
        self._clock = clock
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()

    def seed(self, ages_s: Sequence[float]) -> None:
        """Count sends made ``ages_s`` seconds ago (by an earlier process) in the windows."""
        now = self._clock()
        self._sent = deque(sorted([*self._sent, *(now - max(0.0, a) for a in ages_s)]))

    def wait_s(self, now: float) -> float:
        wait = 0.0
        for n, period in self.windows:
            recent = [t for t in self._sent if t > now - period]
            if len(recent) >= n:
                wait = max(wait, recent[-n] + period - now)
        return wait

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                wait = self.wait_s(self._clock())
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            now = self._clock()
            self._sent.append(now)
            longest = max((p for _, p in self.windows), default=0.0)
            while self._sent and self._sent[0] <= now - longest:
                self._sent.popleft()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def send_message(
    session: aiohttp.ClientSession,
    target: TargetConfig,
    payload: dict[str, Any],
    *,
    now: datetime,
    msg_id: str,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Answer:
    """POST one rendered message to ``target``, signed as its type wants. Raises
    aiohttp.ClientError / TimeoutError on transport failure (their text may name the host;
    callers log only the exception's type)."""
    url = target.url.reveal()
    secret = target.secret.reveal() if target.secret else None
    body_obj = dict(payload)
    headers = {"Content-Type": "application/json"}
    if target.type == "dingtalk" and secret:
        url = dingtalk_url(url, secret, int(now.timestamp() * 1000))
    if target.type in ("feishu", "lark") and secret:
        ts = int(now.timestamp())
        body_obj = {"timestamp": str(ts), "sign": feishu_sign(secret, ts), **body_obj}
    body = json.dumps(body_obj, ensure_ascii=False, separators=(",", ":")).encode()
    if target.type == "webhook":
        # webhook-id and webhook-timestamp with or without a secret: a receiver that drops
        # a message id it has processed needs the id whether or not the message is signed
        headers.update(webhook_headers(secret, msg_id, int(now.timestamp()), body))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    proxy_options, proxy_headers = proxies.request_options(
        target.proxy.reveal() if target.proxy else None, urlsplit(url).scheme
    )
    headers.update(proxy_headers)
    # Never follow a redirect: aiohttp would turn the POST into a GET (301/302/303), whose
    # answer says nothing of the message, and would carry the request to another address.
    async with session.post(
        URL(url, encoded=True),
        data=body,
        headers=headers,
        timeout=timeout,
        allow_redirects=False,
        **proxy_options,
    ) as resp:
        return Answer(resp.status, dict(resp.headers), await _read_at_most(resp))


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """The first ``limit`` bytes of ``resp``'s body (the connection is not reused if more
    were sent)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@contextmanager
def _write(store: Store, action: str) -> Iterator[sqlite3.Connection]:
    # Store has no public "run my SQL in a write transaction"; its private helper gives the
    # same BEGIN IMMEDIATE ... COMMIT and error mapping every other write uses.
    with store.write(action) as conn:
        yield conn


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        self.pending = Gauge("hpo_sync_alerts_pending", "Alerts waiting for delivery", registry=r)
        self.sent = Counter("hpo_sync_alerts_sent", "Alerts delivered", ["target"], registry=r)
        self.retried = Counter(
            "hpo_sync_alerts_retried", "Alert delivery attempts to retry", ["target"], registry=r
        )
        self.dead = Counter(
            "hpo_sync_alerts_dead", "Alerts given up (dead-lettered)", ["target"], registry=r
        )


class AlertWorker:
    """Delivers the outbox. Tests call :meth:`run_once` directly with a chosen ``now``."""

    name = "alerts"

    def __init__(
        self,
        store: Store,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], datetime] = _utcnow,
        poll_s: float = POLL_S,
        rate_limits: dict[str, tuple[tuple[int, float], ...]] | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.poll_s = poll_s
        self.request_timeout_s = request_timeout_s
        self.metrics = AlertMetrics(registry)
        self._rate_limits = rate_limits if rate_limits is not None else RATE_LIMITS
        self._limiters: dict[str, RateLimiter] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = clock()
        #: per target, the workspaces it was told are stalled (in memory: after a restart a
        #: stall still going on is announced again)
        self._stalled: dict[str, set[str]] = {}
        #: per target, the delivery running for it (see :meth:`run_once`)
        self._busy: dict[str, asyncio.Task[int]] = {}
        #: per target, its stall notices going out (see :meth:`check_stalls`)
        self._announcing: dict[str, asyncio.Task[None]] = {}
        #: per target, when a stall notice may go again: after the wait it asked for (429,
        #: 130101…), else after the backoff of its notices that failed in a row
        self._notice_wait: dict[str, datetime] = {}
        self._notice_failures: dict[str, int] = {}
        #: per robot (:func:`_robot`), the end of a wait one of its targets asked for in
        #: answer to a stall notice: the alerts of every target of that robot wait for it
        #: too (DingTalk bans a bot that sends on after 130101)
        self._asked_wait: dict[str, datetime] = {}
        # The outbox rows whose outcome was recorded lately (monotonic time): see
        # clock_stepped.
        self._recorded_at: dict[int, float] = {}
        self._recorded_lock = threading.Lock()
        #: per target, the outcomes of its sends that the mirror could not record (a full
        #: disk, a lock held too long), oldest first: the target gets nothing more until
        #: they are recorded (see :meth:`_record`)
        self._unrecorded: dict[str, list[_Unrecorded]] = {}

    # --- the daemon's seam ---------------------------------------------------------------

    def on_changes(self, conn: sqlite3.Connection, rows: list[ChangeRow]) -> None:
        """Inside the sync transaction: one outbox row per matching (change, target)."""
        outbox.write_outbox(conn, rows, self.config.alerts.rules, self.clock())

    async def start(self) -> None:
        await asyncio.to_thread(self._redact_stored_errors)
        self._task = asyncio.create_task(self._loop(), name="alerts.worker")

    def _redact_stored_errors(self) -> None:
        """Mask each configured target's secrets in the errors its rows hold (rows an older
        version recorded before it masked them): they are shown by `alerts list` and the
        web UI. At start and on reload (a target's URL may be new)."""
        for target in self.config.alerts.targets:
            with _write(self.store, "redact alert errors") as conn:
                n = outbox.redact_errors(conn, target.name, target_secrets(target))
            if n:
                log.info("alert.errors_redacted", target=target.name, rows=n)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        busy = [*self._busy.values(), *self._announcing.values()]
        for task in busy:  # what they had not recorded stays pending for the next start
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        await self.close()

    async def reload(self, config: Config) -> None:
        self.config = config
        # A limiter stays while a target of its robot (type and URL, and so its limits)
        # does: one made a DingTalk target in the reload gets DingTalk's, counting what
        # the outbox says its robot was sent in them.
        robots = {_robot(t) for t in config.alerts.targets}
        self._limiters = {key: lim for key, lim in self._limiters.items() if key in robots}
        await asyncio.to_thread(self._redact_stored_errors)

    async def clock_stepped(self, step_s: float) -> None:
        """The machine's clock just stepped by ``step_s`` (the daemon's clock watch): move
        the waits kept on the wall clock by as much, so that each ends as long after now as
        it would have without the step: the pending outbox rows' (:func:`outbox.shift_waits`),
        the stall notices' waits and the retries of outcomes not yet recorded."""
        step = timedelta(seconds=step_s)
        now = self.clock()
        self._notice_wait = {name: at + step for name, at in self._notice_wait.items()}
        self._asked_wait = {robot: at + step for robot, at in self._asked_wait.items()}
        fresh_from = now - timedelta(seconds=outbox.STEP_WINDOW_S)
        fresh_to = now + timedelta(seconds=1)
        for entries in self._unrecorded.values():
            # (one made since the step is on the new clock already, as in shift_waits)
            entries[:] = [
                e if fresh_from <= e.now <= fresh_to else replace(e, now=e.now + step)
                for e in entries
            ]
        # (the rows whose outcome this worker recorded since the step may have come: their
        # due times are the new clock's)
        since = time.monotonic() - outbox.STEP_WINDOW_S
        with self._recorded_lock:
            recorded = [i for i, at in self._recorded_at.items() if at >= since]

        def shift() -> int:
            with _write(self.store, "move alert retries after a clock step") as conn:
                return outbox.shift_waits(
                    conn, step_s, now, recorded=recorded, max_wait_s=RETRY_AFTER_MAX_S
                )

        moved = await asyncio.to_thread(shift)
        log.info("alert.clock_stepped", step_s=round(step_s, 1), alerts_moved=moved)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the work --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once(wait=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep delivering whatever one round's trouble was
                _log_failure(exc)
            await asyncio.sleep(self.poll_s)

    def _target(self, name: str) -> TargetConfig | None:
        return next((t for t in self.config.alerts.targets if t.name == name), None)

    async def _limiter(self, target: TargetConfig) -> RateLimiter:
        """The limiter of the target's robot (its type and URL): the limits are per robot
        (DingTalk's and WeCom's 20 a minute), and two targets of one URL (two rules'
        formats, say) each sent 19 a minute, and got the robot banned. A new one counts
        what the robot's targets were sent in its longest window before (by the process
        before a restart, or by the previous one-shot sync): kept in memory only, a limit
        started afresh with every process, and two `hpo-sync sync` runs back to back sent
        WeCom 20 messages within two seconds."""
        key = _robot(target)
        lim = self._limiters.get(key)
        if lim is not None:
            return lim
        windows = self._rate_limits.get(target.type, ())
        longest = max((p for _, p in windows), default=0.0)
        ages: list[float] = []
        if longest:
            now = self.clock()
            names = [t.name for t in self.config.alerts.targets if _robot(t) == key]

            def read() -> list[datetime]:
                with self.store.reader() as conn:
                    return outbox.recent_sends(
                        conn, names or [target.name], now - timedelta(seconds=longest)
                    )

            # sent_at is kept to the second: each is taken as late in its second as it can be
            ages = [(now - t).total_seconds() - 1 for t in await asyncio.to_thread(read)]
        lim = self._limiters.get(key)  # made meanwhile by another task
        if lim is None:
            lim = self._limiters[key] = RateLimiter(windows)
            lim.seed(ages)
        return lim

    def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def run_once(
        self,
        *,
        now: datetime | None = None,
        flush: bool = False,
        wait: bool = True,
        stalls: bool = True,
    ) -> int:
        """One round: expire, read due rows, deliver every target whose group is ready
        (oldest row older than ``group_wait_s``, or ``flush``), then (``stalls``) tell the
        targets of workspaces that stopped syncing. Returns messages sent.

        Each target's delivery is a task of its own, and a target still delivering from an
        earlier round is left to finish (its new rows wait for the round after): a target
        that waits out its rate limit (DingTalk: ~a minute) or a slow answer never holds
        the others up. ``wait=False`` (the worker's loop) starts the deliveries and returns
        0 without waiting for them."""
        now = now or self.clock()
        cfg = self.config.alerts
        # (the targets with a delivery under way: their rows are neither expired nor, when
        # a reload removed the target, dead-lettered until it has recorded its outcome)
        running = frozenset(name for name, task in self._busy.items() if not task.done())
        # A target with outcomes still to record is held as if busy: its rows neither go
        # again (a message it has would be sent once more every round) nor expire.
        held = frozenset(name for name, left in self._unrecorded.items() if left)
        busy = running | held
        rows, pending = await asyncio.to_thread(self._due, now, cfg.max_age_s, busy)
        self.metrics.pending.set(pending)
        by_target: dict[str, list[outbox.DueRow]] = {}
        for row in rows:
            by_target.setdefault(row.target, []).append(row)
        ready: list[tuple[TargetConfig, list[outbox.DueRow]]] = []
        for name, group in by_target.items():
            if name in busy:
                continue
            target = self._target(name)
            if target is not None and self._asked_to_wait(target, now):
                continue  # it asked a stall notice to wait: its alerts wait as long
            if target is None:
                await self._record(
                    name,
                    [r.id for r in group],
                    Dead(f"no target named {name!r} is configured"),
                    now,
                    0,
                )
                continue
            group_wait = timedelta(seconds=cfg.group_wait_s)
            if flush or any(
                r.attempts > 0 or (parse_time(r.created_at) or now) + group_wait <= now
                for r in group
            ):
                ready.append((target, group))
        started = [
            _track(self._busy, name, self._record_held(name), "record")
            for name in sorted(held - running)
        ]
        for target, group in ready:
            if target.name in self._busy:
                continue
            started.append(
                _track(self._busy, target.name, self._deliver(target, group, now), "deliver")
            )
        if stalls:
            await self.check_stalls(now, wait=wait)
        if not wait:
            return 0
        return sum(await asyncio.gather(*started))

    async def check_stalls(self, now: datetime, *, wait: bool = True) -> None:
        """Tell every target when a configured workspace has not synced successfully for
        ``stalled_after_s``, and when it recovers. Best effort, not through the outbox (a
        stall is not a change): a notice a target did not accept is tried again next round.

        Each target's notices go in a task of their own, one at a time per target, so that
        a slow or rate-limited target holds up neither the others nor the delivery rounds
        (``wait=False``, the daemon's loop); ``wait`` waits for those started now."""
        ids = self.config.workspace_ids()
        if not ids or not self.config.alerts.targets:
            return
        states = await asyncio.to_thread(self.store.workspaces)
        by_id = {s.workspace_id: s for s in states}
        last: dict[str, datetime | None] = {}
        for ws in ids:
            st = by_id.get(ws)
            times = [t for t in (st.last_full_ok_at, st.last_hot_ok_at) if t] if st else []
            parsed = [p for p in (parse_time(t) for t in times) if p is not None]
            last[ws] = max(parsed, default=None)
        labels = {w.id: w.label for w in self.config.workspaces}
        waiting = await asyncio.to_thread(self._waiting, now)
        # (a wait holds every target of the robot it was asked for: see outbox.due_rows)
        waiting_robots = {_robot(t) for t in self.config.alerts.targets if t.name in waiting}
        started = []
        for target in self.config.alerts.targets:
            if target.name in self._announcing:
                continue  # its notices of an earlier round are still going out
            if (
                target.name in waiting
                or _robot(target) in waiting_robots
                or self._notices_wait(target.name, now)
                or self._asked_to_wait(target, now)
            ):
                continue  # it asked to wait (or its alerts wait a backoff): later
            told = self._stalled.setdefault(target.name, set())
            notices = stall_notices(
                last, labels, told, now, self.config.alerts.stalled_after_s, self._since
            )
            if not notices:
                continue
            announce = self._announce_all(target, notices, told)
            started.append(_track(self._announcing, target.name, announce, "stall"))
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)

    async def _announce_all(
        self, target: TargetConfig, notices: Sequence[StallNotice], told: set[str]
    ) -> None:
        failed = False
        for notice in notices:
            outcome = await self._announce(target, notice)
            if isinstance(outcome, Sent):
                if notice.state == "stalled":
                    told.add(notice.workspace_id)
                else:
                    told.discard(notice.workspace_id)
                self._notice_failures.pop(target.name, None)
                continue
            asked = outcome.after_s if isinstance(outcome, Retry) else None
            if asked:  # the rest go after that wait, and its alerts too
                wait_s = min(asked, RETRY_AFTER_MAX_S)
                until = self.clock() + timedelta(seconds=wait_s)
                self._notice_wait[target.name] = self._asked_wait[_robot(target)] = until
                return
            # The others are tried this round all the same (it may refuse this workspace's
            # notice alone), then the backoff holds the next.
            failed = True
        if failed:
            # Not the next round (every second): a target that is down, or that refuses
            # notices (a wrong secret), got them again every round for as long as the stall
            # lasted, each with a warning. The alerts' backoff, over rounds that failed.
            rounds = self._notice_failures[target.name] = (
                self._notice_failures.get(target.name, 0) + 1
            )
            wait_s = backoff_s(rounds)
            self._notice_wait[target.name] = self.clock() + timedelta(seconds=wait_s)
            log.info("alert.stall_notices_backoff", target=target.name, retry_in_s=wait_s)

    @property
    def stalled(self) -> set[str]:
        """Workspaces some target was told are stalled (and not yet that they recovered)."""
        return set().union(*self._stalled.values())

    async def _announce(self, target: TargetConfig, notice: StallNotice) -> Outcome:
        last = notice.last_success_at
        last_text = last.strftime("%Y-%m-%dT%H:%M:%SZ") if last else None
        payload = render_notice(
            target.type,
            notice.workspace_id,
            notice.label,
            notice.state,
            last_text,
            keyword=target.keyword,
        )
        msg_id = f"hposync_{notice.workspace_id}_{notice.state}_{last_text or 'never'}"
        outcome = await self._send(target, Message(payload, (0,)), msg_id)
        event = f"alert.workspace_{notice.state}"
        if isinstance(outcome, Sent):
            log.info(event, target=target.name, workspace=notice.workspace_id)
            self._notice_wait.pop(target.name, None)
        else:
            reason = getattr(outcome, "reason", "")
            log.warning(event, target=target.name, workspace=notice.workspace_id, reason=reason)
        return outcome

    def _notices_wait(self, target: str, at: datetime) -> bool:
        """Whether ``target``'s stall notices wait, at ``at``: for a wait it asked for, or
        the backoff of rounds of them that failed."""
        return at < self._notice_wait.get(target, at)

    def _waiting(self, now: datetime) -> set[str]:
        with self.store.reader() as conn:
            return outbox.waiting_targets(conn, now)

    def _asked_to_wait(self, target: TargetConfig, now: datetime) -> bool:
        """Whether the target's robot (any target of its type and URL) asked a stall notice
        to wait past ``now``."""
        return now < self._asked_wait.get(_robot(target), now)

    def _due(
        self, now: datetime, max_age_s: float, busy: frozenset[str] = frozenset()
    ) -> tuple[list[outbox.DueRow], int]:
        with self.store.reader() as conn:
            stale = outbox.has_expired(conn, now, max_age_s, busy)
        expired: dict[str, int] = {}
        if stale:
            with _write(self.store, "expire old alerts") as conn:
                expired = outbox.expire(conn, now, max_age_s, busy)
        for target, n in sorted(expired.items()):  # dead letters, counted as every other
            self.metrics.dead.labels(target).inc(n)
            log.error("alert.dead", target=target, alerts=n, reason="expired")
        with self.store.reader() as conn:
            robots = {t.name: _robot(t) for t in self.config.alerts.targets}
            return outbox.due_rows(conn, now, robots=robots), outbox.counts(conn)[outbox.PENDING]

    def _item(self, row: outbox.DueRow) -> AlertItem:
        old = decode_counts(row.trial_old)
        new = decode_counts(row.trial_new)
        trial_status = new if row.trial_new is not None else decode_counts(row.trial_status)
        if row.field == "TrialStatus":
            old, new = decode_counts(row.old_value), decode_counts(row.new_value)
            trial_status = new
        return AlertItem(
            outbox_id=row.id,
            rule=row.rule,
            workspace_id=row.workspace_id,
            experiment_id=row.experiment_id,
            name=row.name,
            field=row.field,
            old_value=row.old_value,
            new_value=row.new_value,
            observed_at=row.observed_at,
            trial_status=trial_status,
            failed_delta=new.get("FAILED", 0) - old.get("FAILED", 0),
            workspace_label=row.workspace_label,
            console_url=console_link(
                self.config.alerts.console_url,
                self.config.upstream.region,
                row.workspace_id,
                row.experiment_id,
            ),
        )

    async def _deliver(
        self, target: TargetConfig, group: list[outbox.DueRow], round_start: datetime
    ) -> int:
        now = round_start
        formed = form_messages(
            target.type,
            [self._item(r) for r in group],
            {r.id: r.message_id for r in group},
            keyword=target.keyword,
        )
        names = await asyncio.to_thread(self._name, formed)
        messages = [f.message for f in formed]
        attempts = {r.id: r.attempts for r in group}
        sent = 0
        refused: Dead | None = None
        started = time.monotonic()
        for i, (message, msg_id) in enumerate(zip(messages, names, strict=True)):
            outcome = await self._send(target, message, msg_id)
            n = max(attempts[x] for x in message.outbox_ids) + 1
            # The round's time at this answer: a wait it asks for runs from here, not from
            # the start of the round (sends are paced by the limiter, up to a minute apart).
            now = round_start + timedelta(seconds=time.monotonic() - started)
            await self._record(target.name, message.outbox_ids, outcome, now, n)
            if isinstance(outcome, Sent):
                sent += 1
            elif isinstance(outcome, Retry):
                # Whatever is left of this digest waits as long as this message does: the
                # messages after it, and the alerts no message of this round holds (past
                # its cap), which would otherwise go next round, to a target that just
                # asked to wait, ahead of older alerts.
                held = {x for m in messages[: i + 1] for x in m.outbox_ids}
                rest = [r.id for r in group if r.id not in held]
                if rest:
                    await self._record(target.name, rest, outcome, now, n)
                break
            else:
                refused = outcome
        else:
            if refused is not None:
                # A target that refused a message (a bad token or URL refuses them all)
                # gets the alerts past this round's cap after a backoff, not a round later:
                # a long backlog must not become a request a second to a dead end. They
                # go as soon as the backoff ends, e.g. once a reload fixed the target.
                held = {x for m in messages for x in m.outbox_ids}
                rest = [r.id for r in group if r.id not in held]
                if rest:
                    n = max(attempts[x] for x in rest) + 1
                    reason = f"held back: the target refused a message ({refused.reason})"
                    await self._record(target.name, rest, Retry(reason), now, n)
        return sent

    def _name(self, formed: list[Formed]) -> list[str]:
        """Every message's id: a new message's is recorded on its rows first, all in one
        transaction, so that a retry or a restart sends it again as it is."""
        new = [f.message.outbox_ids for f in formed if f.message_id is None]
        names: list[str] = []
        if new:
            with _write(self.store, "name alert messages") as conn:
                names = outbox.name_messages(conn, new)
        fresh = iter(names)
        return [f.message_id or next(fresh) for f in formed]

    async def _send(self, target: TargetConfig, message: Message, msg_id: str) -> Outcome:
        await (await self._limiter(target)).acquire()
        try:
            answer = await send_message(
                self._session_get(),
                target,
                message.payload,
                now=self.clock(),
                msg_id=msg_id,
                timeout_s=self.request_timeout_s,
            )
        except TimeoutError:
            return Retry("timed out")
        except aiohttp.ClientHttpProxyError as exc:  # (its text quotes the proxy's password)
            return Retry(f"the proxy answered HTTP {exc.status} ({type(exc).__name__})")
        except aiohttp.ClientConnectorCertificateError as exc:
            return Retry(f"the TLS certificate was not trusted ({type(exc).__name__})")
        except aiohttp.ClientError as exc:
            return Retry(f"connection failed ({type(exc).__name__})")
        except ValueError as exc:  # a URL yarl refuses; its message would quote the URL
            return Dead(f"cannot send to this URL ({type(exc).__name__})")
        return classify(
            target.type, answer.status, answer.headers, answer.body, target_secrets(target)
        )

    async def _record(
        self, target: str, ids: Sequence[int], outcome: Outcome, now: datetime, attempts: int
    ) -> None:
        """Record ``outcome`` on rows ``ids`` of ``target`` (sent, to retry, dead).

        When the mirror cannot take it (the disk is full), the outcome is kept in memory and
        the error raised: the target is then held (:meth:`run_once`) until the outcome is
        recorded, a round at a time. Left pending as they are, its rows would go again the
        next round, ~1/s for as long as the disk stays full (a message the target had, sent
        again and again), or a failing target would be asked again without its backoff. A
        restart meanwhile forgets it: the rows go again once, as at-least-once promises."""
        delay = 0.0
        if isinstance(outcome, Retry):
            # (a wait of 0 is no wait: the message would go again every round, ~1/s)
            delay = (
                min(outcome.after_s, RETRY_AFTER_MAX_S) if outcome.after_s else backoff_s(attempts)
            )
        entry = _Unrecorded(tuple(ids), outcome, now, attempts, delay, self.clock())
        try:
            await asyncio.to_thread(self._write_outcome, entry)
        except StoreError:
            self._unrecorded.setdefault(target, []).append(entry)
            raise
        self._count_outcome(target, entry)

    async def _record_held(self, target: str) -> int:
        """Record the outcomes kept for ``target`` since the mirror could not take them, in
        order; the first that fails again stays, with those after it. Sends nothing."""
        left = self._unrecorded.get(target, [])
        while left:
            await asyncio.to_thread(self._write_outcome, left[0])
            self._count_outcome(target, left.pop(0))
        self._unrecorded.pop(target, None)
        log.info("alert.outcomes_recorded", target=target)
        return 0

    def _write_outcome(self, entry: _Unrecorded) -> None:
        ids, outcome = entry.ids, entry.outcome
        with _write(self.store, "record alert deliveries") as conn:
            at = time.monotonic()
            with self._recorded_lock:  # (written in worker threads, read on the loop)
                self._recorded_at = {
                    i: t for i, t in self._recorded_at.items() if t >= at - outbox.STEP_WINDOW_S
                }
                self._recorded_at.update(dict.fromkeys(ids, at))
            if isinstance(outcome, Sent):
                outbox.mark_sent(conn, ids, entry.answered_at)
            elif isinstance(outcome, Retry):
                next_at = entry.now + timedelta(seconds=entry.delay_s)
                if outcome.after_s and next_at.microsecond:
                    # A wait the target asked for (Retry-After, DingTalk's ban) ends no
                    # earlier than asked: due times are kept to the second, and cut there
                    # it could end up to a second early.
                    next_at = next_at.replace(microsecond=0) + timedelta(seconds=1)
                outbox.mark_retry(conn, ids, next_at, outcome.reason)
            else:
                outbox.mark_dead(conn, ids, outcome.reason, attempted=entry.attempts > 0)

    def _count_outcome(self, target: str, entry: _Unrecorded) -> None:
        ids, outcome, attempts, delay = entry.ids, entry.outcome, entry.attempts, entry.delay_s
        if isinstance(outcome, Sent):
            self.metrics.sent.labels(target).inc(len(ids))
            log.info("alert.sent", target=target, alerts=len(ids))
        elif isinstance(outcome, Retry):
            self.metrics.retried.labels(target).inc(len(ids))
            log.warning(
                "alert.retry",
                target=target,
                alerts=len(ids),
                reason=outcome.reason,
                attempts=attempts,
                retry_in_s=delay,
            )
        else:
            self.metrics.dead.labels(target).inc(len(ids))
            log.error("alert.dead", target=target, alerts=len(ids), reason=outcome.reason)


@dataclass(frozen=True)
class _Unrecorded:
    """An outcome of a send to record on its rows (see :meth:`AlertWorker._record`)."""

    ids: tuple[int, ...]
    outcome: Outcome
    now: datetime  # the round's time at the answer: a retry's wait runs from here
    attempts: int
    delay_s: float  # a retry's wait
    answered_at: datetime  # a sent message's sent_at


def target_secrets(target: TargetConfig) -> tuple[str, ...]:
    """What an answer from ``target`` must have masked before anyone sees it: its URL's and
    secret's parts, and its proxy's (a proxy's error page may quote the request, its
    ``Proxy-Authorization`` too)."""
    parts = secret_parts(target.url.reveal(), target.secret.reveal() if target.secret else None)
    if target.proxy is None:
        return parts
    both = {*parts, *secret_parts(target.proxy.reveal())}
    return tuple(sorted(both, key=len, reverse=True))


def build_service(runtime: Runtime) -> AlertWorker:
    """The daemon's hook (see :func:`hpo_sync.daemon.discover_service_factories`)."""
    registry = getattr(getattr(runtime, "metrics", None), "registry", None)
    return AlertWorker(runtime.store, runtime.config, registry=registry, clock=runtime.clock)
