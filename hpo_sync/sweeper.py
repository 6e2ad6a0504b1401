"""The daemon's sweeps, run in a child process of their own.

A full sweep of 100,000 experiments keeps a Python process busy for seconds on end: HTTP,
JSON parsing and normalising on the event loop, and the store's writes (which hold the GIL
while they bind rows) on a worker thread — together ~80 % of the GIL while it lasts. In the
process that also serves the read API that meant list requests waiting their turn: 500–1,100
requests/s at a p99 of 120–250 ms during the baseline, against ~2,200 and ~20 ms otherwise.
So ``hpo-sync run`` hands its sweeps to one long-lived child (``python -m hpo_sync.sweeper``,
started with the daemon and again after it dies), and keeps the scheduler, the read API and
the alert delivery to itself. Readers and the child's writer meet only in the SQLite file,
which WAL mode is built for. ``[sync] sweep_process = false`` keeps sweeps in the daemon.

Why not ``multiprocessing``/``concurrent.futures``: a sweep is a long-running coroutine with
a conversation (cancel it on shutdown, config reloads, metrics and logs while it runs), not
a function call; a pool's workers also outlive a parent killed with SIGKILL. The protocol
here is small: length-prefixed pickles over the child's stdin, and back over a pipe of its
own (a descriptor the child inherits, named on its command line; not its stdout, so a
stray ``print`` cannot corrupt the stream). Both ends are this code; nothing else can write
to those pipes.

What the child does exactly as the daemon would: the same :class:`~hpo_sync.sync.SyncEngine`
on the same store file and config, and, inside each write transaction, the alert outbox
(:func:`hpo_sync.alerts.outbox.write_outbox` with the config's rules), so a change and its
alerts still commit together. What it sends back: each sweep's
:class:`~hpo_sync.sync.SweepResult`, upstream requests and change rows as counts (for
``/metrics``), and its log events, which the daemon renders with its own logging setup.

Lifecycle: the child dies with the daemon (``PR_SET_PDEATHSIG`` on Linux, and EOF on stdin
anywhere), so a daemon killed with SIGKILL leaves no writer behind: its transaction in
flight rolls back, exactly as if the sweep had run in the daemon. SIGTERM (systemd stops the
whole unit) makes it stop as when the daemon asks: sweeps cancelled, their runs closed;
SIGINT (a Ctrl-C on the daemon's terminal) and SIGHUP (a reload, for the whole unit) are
left to the daemon. A child stuck while it stops is killed after ``EXIT_WAIT_S`` when a
sweep wants it. A child that stops or dies on its own fails the sweeps it was running
(``sync.crashed`` in the log); the daemon closes their ``sync_runs`` rows if the child could
not, and starts a new child for the next sweep. One that says nothing for
``HEARTBEAT_TIMEOUT_S`` while it has sweeps to run (it sends word every second from the
moment its event loop runs) is taken for stuck, killed and treated the same way. Until its
first word a child is still starting (an interpreter, imports: seconds on a loaded machine),
and has ``STARTUP_TIMEOUT_S`` for that instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import pickle
import signal
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import structlog

from .errors import HpoSyncError
from .logs import effective_level, redact_secrets, route_stdlib
from .normalise import format_time
from .runtime import SweepMode

if TYPE_CHECKING:
    from .config import Config
    from .credentials import CredentialsProvider
    from .metrics import Metrics
    from .store import ChangeRow, Store
    from .sync import SweepResult

log = structlog.get_logger(__name__)


#: The signals the sweep child ignores (see main).
_CHILD_IGNORES = frozenset({signal.SIGINT, signal.SIGHUP})
_HEADER = struct.Struct("!I")
#: How often the child sends what it counted (upstream requests, change rows), or else word
#: that its event loop is running.
METRICS_FLUSH_S = 1.0
#: A child that sends nothing for this long while it has sweeps to run is killed (and the
#: next sweep starts a new one): its event loop is stuck.
HEARTBEAT_TIMEOUT_S = 60.0
#: How long a new child may take to say its first word (it is starting: a Python interpreter
#: and its imports) before it is killed the same way.
STARTUP_TIMEOUT_S = 60.0
#: How long a cancelled sweep may take to close its run before the daemon stops waiting.
CANCEL_WAIT_S = 5.0
#: How long :meth:`SweepProcess.close` waits for the child to exit before killing it.
EXIT_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1


class SweepProcessError(HpoSyncError):
    """The sweep process died or could not be started."""


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


# =============================================================================================
# The daemon's side


class SweepProcess:
    """Runs sweeps in the child; what the daemon uses of a :class:`~hpo_sync.sync.SyncEngine`
    (``sweep``, ``lock_for``, ``config``), plus :meth:`start` and :meth:`close`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        *,
        credentials: CredentialsProvider | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self._config = config
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._last_heard = 0.0
        self._heard_from = False  # the running child said something: it is past starting
        self._killed_because: str | None = None
        self._store = store
        self._metrics = metrics
        self._credentials = credentials  # None: the child builds the default chain
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        # A sweep's outcome: its result, None when cancelled, a message when it raised.
        self._pending: dict[int, asyncio.Future[SweepResult | str | None]] = {}
        self._next_id = 0
        self._starting = asyncio.Lock()
        self._accepting = False  # the child takes new sweeps (it said nothing of stopping)
        self._closed = False

    # -- what the daemon uses --

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload: the child's engine gets the new config too (before its next sweep)."""
        self._config = config
        self._send(("config", config, effective_level()))

    def lock_for(self, workspace_id: str) -> asyncio.Lock:
        """One sweep of a workspace at a time, hot or full (the child's engine agrees)."""
        return self._locks.setdefault(workspace_id, asyncio.Lock())

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Start the child (sweeps also start it when it is not running)."""
        await self._ensure_running()

    async def sweep(self, workspace_id: str, mode: SweepMode = "auto") -> SweepResult:
        """Run one sweep in the child; its result. Raises SweepProcessError if the child
        dies meanwhile. Cancelling it cancels the sweep in the child and waits (a few
        seconds at most) for the child to close the run, as an in-process sweep would."""
        async with self.lock_for(workspace_id):
            await self._ensure_running()
            self._next_id += 1
            req = self._next_id
            loop = asyncio.get_running_loop()
            future: asyncio.Future[SweepResult | str | None] = loop.create_future()
            self._pending[req] = future
            try:
                # With what the caller bound to its log events (the daemon's trigger): the
                # child binds it around the sweep, so its events say which sweep they are of.
                bound = dict(structlog.contextvars.get_contextvars())
                self._send(("sweep", req, workspace_id, mode, bound))
                try:
                    result = await asyncio.shield(future)
                except asyncio.CancelledError:
                    if not future.done():
                        self._send(("cancel", req))
                        with contextlib.suppress(BaseException):
                            async with asyncio.timeout(CANCEL_WAIT_S):
                                await future
                    raise
            finally:
                self._pending.pop(req, None)
            if isinstance(result, str):  # the engine raised (a bug): the child logged it
                raise SweepProcessError(f"the sweep failed in the sweep process: {result}")
            if result is None:  # cancelled there, not by us: the child was told to stop
                raise SweepProcessError("the sweep process was stopped during the sweep")
            return result

    async def close(self) -> None:
        """Ask the child to stop (it cancels what runs), then wait for it; kill it if it
        does not exit within a few seconds."""
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._send(("stop",))
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                async with asyncio.timeout(EXIT_WAIT_S):
                    await proc.wait()
            except TimeoutError:
                log.warning("sync.process_kill", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader

    # -- the child --

    async def _ensure_running(self) -> None:
        async with self._starting:
            if self._closed:
                raise SweepProcessError("the sweep process is shutting down")
            watcher = self._reader
            if watcher is not None and not watcher.done():
                alive = self._proc is not None and self._proc.returncode is None
                if alive and self._accepting:
                    return  # running
                # It is stopping, or exited and the reader is closing its runs: let it
                # finish first, or the new child's run would be closed as interrupted. A
                # child stuck while stopping (it sends no heartbeat then, and the watchdog
                # only minds children with sweeps to run) is killed after EXIT_WAIT_S, as
                # close() kills one: waited for without end, no sweep ran again.
                try:
                    async with asyncio.timeout(EXIT_WAIT_S):
                        with contextlib.suppress(Exception):
                            await asyncio.shield(watcher)
                except TimeoutError:
                    proc = self._proc
                    if proc is not None and proc.returncode is None:
                        self._killed_because = "stuck while stopping"
                        log.error("sync.process_kill", pid=proc.pid, reason="stuck while stopping")
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                    with contextlib.suppress(Exception):
                        await asyncio.shield(watcher)
            # The child answers on a pipe of its own (pass_fds), not on its stdout.
            read_fd, write_fd = os.pipe()
            # The child starts with SIGINT and SIGHUP blocked (a mask survives fork and exec)
            # and unblocks them once it ignores them (main): a SIGHUP to the whole unit in
            # its first ~0.2 s (the interpreter's start and its imports) killed it, sweep
            # and all. This thread's mask only: another thread of ours takes such a signal.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_IGNORES)
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    __name__,
                    str(write_fd),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=None,
                    stderr=None,
                    pass_fds=(write_fd,),
                )
            except OSError as exc:
                os.close(read_fd)
                raise SweepProcessError(f"cannot start the sweep process: {exc}") from None
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                os.close(write_fd)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=2**20, loop=loop)
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                os.fdopen(read_fd, "rb", buffering=0),
            )
            self._proc = proc
            self._accepting = True
            self._last_heard = loop.time()
            self._heard_from = False
            self._killed_because = None
            self._send(("init", self._config, self._credentials, os.getpid(), effective_level()))
            # A context of its own: copied from the sweep that started this child, the
            # re-emitted events of every later sweep carried that sweep's bound trigger.
            self._reader = asyncio.create_task(
                self._read(proc, reader), name="sweep-process", context=contextvars.Context()
            )
            log.info("sync.process_started", pid=proc.pid)

    def _send(self, message: object) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return  # nothing runs: the next start sends the config anew
        if proc.stdin.is_closing():
            return
        proc.stdin.write(_frame(message))

    async def _read(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    header = await self._read_header(reader, proc)
                    body = await reader.readexactly(_HEADER.unpack(header)[0])
                except asyncio.IncompleteReadError:
                    break
                self._last_heard = asyncio.get_running_loop().time()
                self._heard_from = True
                try:
                    self._dispatch(pickle.loads(body))
                except Exception as exc:  # one bad message must not lose the others
                    log.error("sync.process_message_failed", error=repr(exc))
        finally:
            code = await proc.wait()
            await self._after_exit(proc, code)

    async def _read_header(
        self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process
    ) -> bytes:
        """The next frame's header, while watching that a child with sweeps to run keeps
        talking: one silent for ``heartbeat_timeout_s`` is killed (HEARTBEAT_TIMEOUT_S), or
        for ``startup_timeout_s`` before its first word (STARTUP_TIMEOUT_S)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # readexactly takes nothing from the buffer before it has it all: a timeout
                # that cancels it loses nothing.
                return await asyncio.wait_for(
                    reader.readexactly(_HEADER.size), self._heartbeat_timeout_s / 4
                )
            except TimeoutError:
                pass
            silent_s = loop.time() - self._last_heard
            # A child that has not said a word yet is still starting, not stuck.
            limit = self._heartbeat_timeout_s if self._heard_from else self._startup_timeout_s
            if not self._pending:
                self._last_heard = loop.time()  # silence while idle is fine
            elif silent_s > limit and self._killed_because is None:
                self._killed_because = f"no word from it for {silent_s:.0f} s"
                if not self._heard_from:
                    self._killed_because += " since it started"
                log.error("sync.process_unresponsive", pid=proc.pid, silent_s=round(silent_s))
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            _, level, logger_name, event = message
            name = event.pop("event", "")
            # (structlog knows the standard levels only: a library's own, 25 say, is
            # logged at the standard one below it, not dropped with a KeyError)
            level = max((n for n in (10, 20, 30, 40, 50) if n <= level), default=10)
            structlog.get_logger(logger_name).log(level, name, **event)
        elif kind == "requests":
            for (code, ws), n in message[1].items():
                self._metrics.observe_request(code, ws, n)
        elif kind == "changes":
            for ws, counts in message[1].items():
                self._metrics.count_changes(ws, counts)
        elif kind == "stopping":
            self._accepting = False
        elif kind == "result":
            _, req, result = message
            future = self._pending.get(req)
            if future is not None and not future.done():
                future.set_result(result)

    async def _after_exit(self, proc: asyncio.subprocess.Process, code: int) -> None:
        if self._proc is proc:
            self._proc = None
        orphans = [f for f in self._pending.values() if not f.done()]
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if self._closed and not orphans:
            log.info("sync.process_exited", pid=proc.pid, exit=how)
            return
        log.error("sync.process_died", pid=proc.pid, exit=how, sweeps_lost=len(orphans))
        why = f": killed, {self._killed_because}" if self._killed_because else ""
        died = f"the sweep process (pid {proc.pid}) exited ({how}){why}"
        if orphans:
            # Their sync_runs rows still say "running": close them as any restart would
            # (every sweep of this daemon ran in that child, so none is still running),
            # saying what happened: the daemon itself kept running.
            with contextlib.suppress(HpoSyncError):
                await asyncio.to_thread(
                    self._store.abandon_running_runs,
                    format_time(self._clock()),
                    error=f"interrupted: {died}",
                )
        for future in orphans:
            future.set_exception(SweepProcessError(died))


# =============================================================================================
# The child's side


class _Channel:
    """Frames to the daemon, from any thread (log events come from the writer thread)."""

    def __init__(self, fd: int) -> None:
        self._out: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self.broken = False

    def send(self, message: object) -> None:
        data = _frame(message)
        with self._lock:
            if self.broken:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[self._out.write(view) or 0 :]
            except OSError:
                self.broken = True  # the daemon is gone; PDEATHSIG or EOF ends us soon


class _Counts:
    """What the daemon's metrics need, counted between flushes (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._changes: dict[str, Counter[tuple[str, bool]]] = {}

    def request(self, code: str, workspace: str) -> None:
        with self._lock:
            self._requests[(code, workspace)] += 1

    def changes(self, rows: list[ChangeRow]) -> None:
        with self._lock:
            for row in rows:
                self._changes.setdefault(row.workspace_id, Counter())[
                    (row.field, row.baseline)
                ] += 1

    def flush(self, channel: _Channel) -> None:
        with self._lock:
            requests, self._requests = self._requests, Counter()
            changes, self._changes = self._changes, {}
        if requests:
            channel.send(("requests", dict(requests)))
        if changes:
            channel.send(("changes", {ws: dict(c) for ws, c in changes.items()}))
        if not requests and not changes:
            channel.send(("alive",))


def _forwarder(channel: _Channel) -> Callable[[Any, str, Any], Any]:
    def forward(logger: Any, method: str, event: Any) -> Any:
        name = getattr(logger, "name", None) or event.pop("logger", None) or "hpo_sync.sweeper"
        event.pop("level", None)
        event.pop("timestamp", None)
        channel.send(("log", _level(method), name, {k: _plain(v) for k, v in event.items()}))
        raise structlog.DropEvent

    return forward


def _level(method: str) -> int:
    value = logging.getLevelName(method.upper())
    return value if isinstance(value, int) else logging.INFO


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class _StdlibForwarder(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: dict[str, Any] = {"event": record.getMessage()}
            if record.exc_info:
                event["exception"] = logging.Formatter().formatException(record.exc_info)
            self._channel.send(("log", record.levelno, record.name, event))
        except Exception:
            self.handleError(record)


def _configure_logging(channel: _Channel, numeric: int) -> None:
    """Log events go to the daemon, which renders them (and redacts secrets) its own way;
    levels are filtered here too, so that debug events are not pickled for nothing."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            redact_secrets,
            structlog.processors.format_exc_info,
            _forwarder(channel),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    route_stdlib(_StdlibForwarder(channel), numeric)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the daemon dies (Linux), so that no orphan keeps writing the mirror."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(1)


async def _read_frames(reader: asyncio.StreamReader) -> Any:
    header = await reader.readexactly(_HEADER.size)
    return pickle.loads(await reader.readexactly(_HEADER.unpack(header)[0]))


async def child_main(channel: _Channel) -> int:
    from .alerts import outbox
    from .client import UpstreamClient
    from .credentials import DefaultChainCredentials
    from .store import Store
    from .sync import SyncEngine

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20, loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sys.stdin.buffer
    )
    asked_to_stop = False

    def on_sigterm() -> None:
        """systemd stopping the unit, or an operator: stop as when the daemon asks,
        cancelling what runs so that its runs are closed."""
        nonlocal asked_to_stop
        asked_to_stop = True
        # The daemon, stopped at the same moment, still writes to us ("stop", cancels):
        # bytes fed to the reader after its EOF would be a fatal protocol error. Stop
        # reading instead of closing, so that the daemon's writes never meet a broken pipe.
        transport.pause_reading()
        reader.feed_eof()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        kind, config, credentials, parent_pid, level = await _read_frames(reader)
    except asyncio.IncompleteReadError:
        return 0
    assert kind == "init"
    _die_with_parent(parent_pid)
    _configure_logging(channel, level)
    counts = _Counts()

    async def flush_counts() -> None:
        while True:
            counts.flush(channel)
            await asyncio.sleep(METRICS_FLUSH_S)

    # Word at once (the daemon holds us to its heartbeat from our first word on), and every
    # second from now on, opening the mirror included.
    flusher = asyncio.create_task(flush_counts())
    store = await asyncio.to_thread(Store.open, config.store.path)
    client = UpstreamClient(
        config.upstream, credentials or DefaultChainCredentials(), observer=counts.request
    )

    def on_changes(conn: Any, rows: list[ChangeRow]) -> None:
        """What the daemon's own hook does inside the transaction: count, then the outbox."""
        counts.changes(rows)
        outbox.write_outbox(conn, rows, engine.config.alerts.rules, datetime.now(UTC))

    engine = SyncEngine(config, client, store, on_changes=on_changes)
    sweeps: dict[int, asyncio.Task[None]] = {}

    def unstarted(req: int, task: asyncio.Task[None]) -> None:
        # A task cancelled before it began ("sweep" and "cancel" read back to back, as when
        # the daemon is stopped right after it started its sweeps) never runs its body,
        # whose ``finally`` answers and forgets it: still in ``sweeps``, it is answered
        # here, or the daemon waits CANCEL_WAIT_S for the answer.
        if sweeps.pop(req, None) is not None:
            channel.send(("result", req, None))

    async def run(req: int, workspace_id: str, mode: SweepMode, bound: dict[str, Any]) -> None:
        outcome: SweepResult | str | None = None  # None: cancelled
        try:
            with structlog.contextvars.bound_contextvars(**bound):
                outcome = await engine.sweep(workspace_id, mode)
        except Exception as exc:  # the engine promises not to raise; say so if it does
            log.error("sync.process_error", workspace=workspace_id, mode=mode, exc_info=exc)
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            counts.flush(channel)
            channel.send(("result", req, outcome))
            sweeps.pop(req, None)

    try:
        while True:
            try:
                message = await _read_frames(reader)
            except asyncio.IncompleteReadError:
                if not asked_to_stop:
                    # The daemon died (it says "stop" before it closes our stdin): go as it
                    # did, at once, and leave the transaction in flight to roll back, like
                    # a SIGKILL. PR_SET_PDEATHSIG may be a moment behind the pipe's EOF.
                    os._exit(70)
                break
            if message[0] == "sweep":
                _, req, workspace_id, mode, bound = message
                sweeps[req] = asyncio.create_task(run(req, workspace_id, mode, bound))
                sweeps[req].add_done_callback(functools.partial(unstarted, req))
            elif message[0] == "cancel":
                task = sweeps.get(message[1])
                if task is not None:
                    task.cancel()
            elif message[0] == "config":
                engine.config = message[1]
                _configure_logging(channel, message[2])
            elif message[0] == "stop":
                asked_to_stop = True
                break
    finally:
        channel.send(("stopping",))  # before any result of a sweep it cancels
        for task in list(sweeps.values()):
            task.cancel()
        if sweeps:
            await asyncio.wait(list(sweeps.values()), timeout=CANCEL_WAIT_S)
        flusher.cancel()
        counts.flush(channel)
        await client.close()
        await asyncio.to_thread(store.close)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    channel = _Channel(int(args[0]))
    # The daemon stops us through the protocol (or by dying): a Ctrl-C on its terminal
    # reaches us too, and must not cut a transaction short before the daemon asks. Nor
    # must SIGHUP ("reload" to the daemon, which passes the new config on): a hangup of
    # its terminal, `kill -HUP -PGID` or `systemctl kill -s HUP` (every process of the
    # unit) reaches us as well, and its default action killed us mid-sweep.
    for signum in _CHILD_IGNORES:
        signal.signal(signum, signal.SIG_IGN)
    # (started with them blocked, see SweepProcess: one that came meanwhile is dropped now)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_IGNORES)
    from .eventloop import run

    return run(child_main(channel))


if __name__ == "__main__":
    sys.exit(main())
