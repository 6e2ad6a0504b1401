"""The ``hpo-sync`` command line.

Exit status: 0 success, 1 a workspace (or the command's work) failed, 2 a config or usage
error — always one clear message, never a traceback; ``sync`` adds 3 (some sweep was
partial) and 143 (stopped by SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from . import __version__, held_signals
from . import config as config_mod
from .errors import ConfigError, HpoSyncError, StoreError, short_path

if TYPE_CHECKING:  # the alert worker is imported only by the commands that use it
    from .alerts.service import AlertWorker

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: ``sync``: no workspace failed, but some sweep was partial (a listing incomplete, look-ups
#: capped, a baseline that did not add up; the next sync finishes the job). rsync's "partial
#: transfer" has its own code for the same reason: a script should be able to tell "not all"
#: from "nothing" and from "all".
EXIT_PARTIAL = 3
#: Stopped by a signal: 128 + its number, as a shell reports it.
EXIT_SIGTERM = 128 + signal.SIGTERM

Handler = Callable[[argparse.Namespace], int]


class UsageError(HpoSyncError):
    """The command line asks for something that cannot be done."""


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # --config is accepted before and after the command; SUPPRESS keeps a sub-parser's
    # absent flag from overwriting the one given before the command.
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="config file (default: $HPO_SYNC_CONFIG, else /etc/hpo-sync/config.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default,
        help="override [logging] level",
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=default,
        help="override [logging] format",
    )


# Commands defined in this module. For one of these, main() builds a parser with that command
# alone: importing every other command's module (daemon, API, alerts, queries, simulator)
# would add most of a second to `hpo-sync sync`.
_OWN_COMMANDS = ("check-config", "sync", "simulate")


def _command_word(argv: Sequence[str] | None) -> str | None:
    """The command named on the command line (unchecked), or None."""
    pre = argparse.ArgumentParser(add_help=False)
    _common(pre, top=True)
    pre.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # let the full parser report the error
        return None
    rest = known.rest
    return str(rest[0]) if rest else None


def _own_command(word: str | None) -> str | None:
    """``word`` (see :func:`_command_word`) when it is one of _OWN_COMMANDS, else None."""
    return word if word in _OWN_COMMANDS else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; ``only``: just that one of the commands defined here."""
    parser = argparse.ArgumentParser(
        prog="hpo-sync",
        description="A local, queryable history of PAI AutoML HPO experiments.",
    )
    parser.add_argument("--version", action="version", version=f"hpo-sync {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p, top=False)
        p.set_defaults(handler=handler)
        return p

    if only in (None, "check-config"):
        command(
            "check-config",
            "validate the config and print it with secrets redacted",
            cmd_check_config,
        )

    if only in (None, "sync"):
        p = command(
            "sync", "sync the mirror once (hot where a baseline exists, else full)", cmd_sync
        )
        p.add_argument("--full", action="store_true", help="full sweep of every workspace")
        p.add_argument(
            "--workspace",
            action="append",
            metavar="ID",
            default=[],
            help="only this workspace (repeatable; default: all configured)",
        )

    if only in (None, "simulate"):
        from .sim import server as sim_server

        p = command(
            "simulate", "run the built-in simulator of the ListHpoExperiments API", cmd_simulate
        )
        sim_server.add_arguments(p)

    if only is None:
        for register in _extra_commands():
            register(sub, command)
    return parser


def _extra_commands() -> list[Callable[..., None]]:
    """Commands that live in their own modules (queries, daemon, demo, API, alerts).

    Imported here, not at the top: ``hpo-sync ls`` should not pay for importing the daemon."""
    from . import cli_query, daemon, demo
    from .alerts import cli as alerts_cli
    from .api import serve

    return [m.register_cli for m in (cli_query, daemon, demo, serve, alerts_cli)]


def load_config(args: argparse.Namespace) -> config_mod.Config:
    path = config_mod.resolve_path(getattr(args, "config", None))
    return config_mod.load(path)


def setup_logging(
    args: argparse.Namespace, cfg: config_mod.Config | None = None, stream: Any = None
) -> None:
    from . import logs

    level = getattr(args, "log_level", None) or (cfg.logging.level if cfg else "info")
    fmt = getattr(args, "log_format", None) or (cfg.logging.format if cfg else "auto")
    logs.configure(level, fmt, stream)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _held_main(argv)
    except KeyboardInterrupt:
        # A Ctrl-C that came while hpo_sync.entry held SIGINT is delivered again as it is
        # let go, or one comes before _main's own handling starts (the parser's imports):
        # an exit status, not a traceback.
        return 130


def _held_main(argv: Sequence[str] | None) -> int:
    word = _command_word(argv)
    if word == "run":
        held_signals.hold()  # until the daemon's event loop handles them
    elif word == "sync":
        # Until _sync_once handles it. Not SIGINT: asyncio.run makes Ctrl-C cancel the
        # sync only where SIGINT still has Python's default handler.
        held_signals.hold((signal.SIGTERM,))
        held_signals.let_go((signal.SIGINT, signal.SIGHUP))  # (held by hpo_sync.entry)
    else:
        held_signals.let_go()  # what hpo_sync.entry held: no command of these takes them
        return _main(argv, word)
    try:
        return _main(argv, word)
    finally:
        held_signals.restore()  # (returned before it took them over: a bad config, say)


def _main(argv: Sequence[str] | None, word: str | None) -> int:
    _open_closed_streams()
    parser = build_parser(_own_command(word))
    try:
        words = _signed_values(argv)
        args = parser.parse_args(words)  # (--help writes to stdout too)
        _check_text_arguments(args, words)
        handler: Handler = args.handler
        # Until a command sets logging up from its config, events (the config's own
        # warnings among them) go to stderr, redacted: never into a command's output.
        setup_logging(args)
        return handler(args)
    except ConfigError as exc:
        print(f"hpo-sync: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"hpo-sync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HpoSyncError as exc:
        print(f"hpo-sync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``hpo-sync ls | head``): it has what it wanted, so stop
        # quietly.
        _quiet_stdout()
        return EXIT_OK
    except OSError as exc:
        # A path the system refuses before any command's own checks can (a name longer than
        # the file system allows, say): what and where, not a traceback.
        print(f"hpo-sync: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_USAGE if exc.errno == errno.ENAMETOOLONG else EXIT_FAILED


def _os_error_text(exc: OSError) -> str:
    """``exc`` as one line: its reason and its file name, a long name shortened."""
    reason = exc.strerror or type(exc).__name__
    name = exc.filename
    if name is None:
        return reason
    shown = short_path(os.fsdecode(name) if isinstance(name, bytes) else str(name))
    return f"{reason}: {shown!r}"


#: Options whose value may begin with a minus sign (a mistaken ``--since -5d``).
_SIGNED_VALUE_OPTIONS = frozenset({"--since", "--created-after", "--created-before"})
_SIGNED_VALUE_RE = re.compile(r"-\d")


def _signed_values(argv: Sequence[str] | None) -> list[str]:
    """``argv`` with ``--since -5d`` as ``--since=-5d``: argparse takes a value beginning
    with ``-`` for an option and says only "expected one argument"; so joined, the value
    reaches the option's own check, which says what to write instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        following = args[i + 1] if i + 1 < len(args) else ""
        if arg in _SIGNED_VALUE_OPTIONS and _SIGNED_VALUE_RE.match(following):
            out.append(f"{arg}={following}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


#: Arguments that are file paths: any bytes a file name may hold are theirs to carry.
_PATH_ARGUMENTS = frozenset({"config", "db", "output", "dest", "data_dir"})


def _check_text_arguments(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Refuse a text argument that is not UTF-8 (Python carries the bytes it cannot decode
    as lone surrogates, which nothing downstream can encode): a usage error naming it, not a
    traceback from the first query that meets it."""
    for key, value in vars(args).items():
        if key in _PATH_ARGUMENTS:
            continue
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            texts = item if isinstance(item, tuple) else (item,)  # --tag's (key, value)
            for text in texts:
                if not isinstance(text, str) or text.isascii():
                    continue
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    option = "--" + key.replace("_", "-")
                    given = any(a == option or a.startswith(option + "=") for a in argv)
                    shown = os.fsencode(text).decode("ascii", "backslashreplace")
                    if not given:  # a positional one (show's, history's experiment ID)
                        option = "ID" if key.endswith("id") else key.upper()
                    raise UsageError(f"{option} {shown}: not valid UTF-8") from None


def _open_closed_streams() -> None:
    """Started with stdout or stderr closed (``hpo-sync sync >&-`` from cron), Python has
    None for it and every print would raise: such a stream writes to /dev/null instead,
    as if its reader had gone away (which ``| head`` already makes a quiet success)."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115


def _quiet_stdout() -> None:
    quiet_stream(sys.stdout)


def quiet_stream(stream: TextIO) -> None:
    """Point ``stream`` (stdout) at /dev/null, so that Python's final flush, and whatever
    else still prints, does not complain about a pipe whose reader went away. A stream
    without a file descriptor (a test's) is left as it is."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


# ---------------------------------------------------------------------------------------------


def check_listen(cfg: config_mod.Config, *, key: str = "api.listen") -> None:
    """What `run` and `serve` refuse to start with beyond the config's own rules (and what
    `check-config` therefore reports): an API listening anywhere but on loopback with no
    tokens. A :class:`ConfigError` naming ``key`` and, for the config's own key, its line;
    `run` checks before it starts anything."""
    from .api.auth import check_listen_allowed

    try:
        check_listen_allowed(cfg.api.host_port[0], cfg.api.tokens)
    except ConfigError as exc:
        line = None
        if key == "api.listen" and cfg.source is not None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                line = config_mod.index_lines(cfg.source.read_text()).get(key)
        raise ConfigError(exc.bare_message, key=key, line=line) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    setup_logging(args)
    cfg = load_config(args)
    check_listen(cfg)
    print(f"# {cfg.source}: OK")
    print(json.dumps(config_mod.redacted(cfg), indent=2, ensure_ascii=False))
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    # On a terminal a progress line shows the pages read; log lines go through it, so that
    # they never land on the end of the line it draws (it clears itself, then redraws).
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    setup_logging(args, cfg, stream=bar)
    # each workspace once, in the order asked (--workspace A --workspace A syncs A once)
    wanted = list(dict.fromkeys(args.workspace or cfg.workspace_ids()))
    unknown = [w for w in wanted if w not in cfg.workspace_ids()]
    if unknown:
        configured = ", ".join(cfg.workspace_ids())
        raise UsageError(f"workspace {unknown[0]!r} is not configured (configured: {configured})")
    try:
        results, queued = asyncio.run(_sync_once(cfg, wanted, full=args.full, bar=bar))
    except asyncio.CancelledError:  # SIGTERM: the sweeps closed their runs as cancelled
        print("hpo-sync: sync stopped by SIGTERM", file=sys.stderr)
        return EXIT_SIGTERM
    if any(r.status == "failed" for r in results):
        code = EXIT_FAILED
    else:
        code = EXIT_PARTIAL if any(r.status == "partial" for r in results) else EXIT_OK
    try:
        for result in results:
            print(result.summary(), flush=True)
    except BrokenPipeError:  # the reader left; the outcome stands
        _quiet_stdout()
    if queued:
        print(
            f"hpo-sync: {queued} alert{'s' if queued != 1 else ''} still queued: the next "
            "sync or `hpo-sync run` sends them (`hpo-sync alerts list --pending`)",
            file=sys.stderr,
        )
    return code


#: How long a one-shot sync goes on delivering the alerts it queued (rounds of at most three
#: messages a target, paced by each target's rate limit) before it leaves the rest queued.
SYNC_ALERTS_BUDGET_S = 30.0
#: ... looking again at least this long after a round that sent nothing.
SYNC_ALERTS_POLL_S = 0.5


async def _sync_once(
    cfg: config_mod.Config,
    workspaces: list[str],
    *,
    full: bool,
    bar: _ProgressBar | None = None,
) -> tuple[list[Any], int]:
    """Sweep ``workspaces``; then deliver the alerts queued (by these sweeps or before),
    for up to :data:`SYNC_ALERTS_BUDGET_S`. Returns the results and the alerts still
    queued."""
    from datetime import UTC, datetime

    from .alerts.service import AlertWorker
    from .client import UpstreamClient
    from .credentials import DefaultChainCredentials
    from .normalise import format_time
    from .store import Store, acquire_lock
    from .sync import SyncEngine

    try:
        if not cfg.store.path.parent.exists():  # said, so that a mistyped path shows
            cfg.store.path.parent.mkdir(parents=True, exist_ok=True)
            log.warning("store.directory_created", path=str(cfg.store.path.parent))
    except OSError as exc:
        raise StoreError(
            f"store.path: cannot create the mirror's directory {cfg.store.path.parent}: "
            f"{exc.strerror or exc}"
        ) from None
    # The same lock as the daemon's: a one-shot sync next to a running daemon would race its
    # sweeps, and only the lock holder may close runs a killed process left "running".
    lock = acquire_lock(cfg.store.path)
    store = await asyncio.to_thread(Store.open, cfg.store.path)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    # SIGTERM stops the sweeps as Ctrl-C does (asyncio.run cancels on SIGINT): a batch being
    # written commits or rolls back whole, and the runs are closed below, not left "running".
    # Only the first one: a supervisor repeating it must not cancel the closing of the runs
    # and the mirror, nor (with the handler gone) kill the process before it exits 143.
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            main.cancel()

    # A handler of Python's own, as asyncio.run's for SIGINT, not loop.add_signal_handler:
    # removing that one puts the default action back, and a SIGTERM repeated in the moment
    # before it is ignored below killed the process instead of letting it exit 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: loop.call_soon_threadsafe(stop))
    if signal.SIGTERM in held_signals.release():  # it came while the sync was starting
        stop()
    try:
        await asyncio.to_thread(store.abandon_running_runs, format_time(datetime.now(UTC)))
        for wcfg in cfg.workspaces:  # as the daemon does: their labels, for alerts and the API
            await asyncio.to_thread(store.ensure_workspace, wcfg.id, wcfg.label)
        # The changes a sync records alert as the daemon's do: their outbox rows are written
        # in the same transaction, so none is lost whether or not they are sent below.
        alerts = AlertWorker(store, cfg)
        async with UpstreamClient(cfg.upstream, DefaultChainCredentials()) as client:
            engine = SyncEngine(
                cfg,
                client,
                store,
                on_changes=alerts.on_changes,
                progress=bar.update if bar is not None else None,
            )
            results = await asyncio.gather(
                *(engine.sweep(ws, "full" if full else "auto") for ws in workspaces)
            )
            await engine.close_unclosed()  # (a run the mirror could not close: once more)
        if bar is not None:
            bar.close()
            bar = None
        queued = await _deliver_alerts(alerts) if cfg.alerts.targets else 0
    except asyncio.CancelledError:
        # Each sweep closes its run when cancelled; this catches one cancelled before its
        # first await. We hold the lock, so every run still "running" is one of ours.
        await asyncio.to_thread(store.abandon_running_runs, format_time(datetime.now(UTC)))
        raise
    finally:
        if bar is not None:
            bar.close()
        await asyncio.to_thread(store.close)
        lock.release()
        # On the way out with 143, a later SIGTERM has nothing left to stop: ignored, in one
        # swap from the handler above (never the default action in between).
        signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping else previous)
    return list(results), queued


async def _deliver_alerts(alerts: AlertWorker) -> int:
    """Deliver what is due, round after round, for up to :data:`SYNC_ALERTS_BUDGET_S`:
    after a round that sent nothing, a retry due within the budget (a target's 503 or
    refused connection is retried 5 s later) is waited for, else it stops. Returns the
    alerts still pending. Stall notices are the daemon's: a sync run from cron would
    announce the same stall every time."""
    from .alerts import outbox

    loop = asyncio.get_running_loop()
    deadline = loop.time() + SYNC_ALERTS_BUDGET_S
    try:
        while (left := deadline - loop.time()) > 0:
            # A round can wait in a target's limiter for up to a minute (DingTalk, WeCom):
            # the budget cuts it short; what it had not recorded stays pending.
            try:
                if await asyncio.wait_for(alerts.run_once(flush=True, stalls=False), left):
                    continue
            except TimeoutError:
                break
            with alerts.store.reader() as conn:
                due = outbox.next_attempt(conn)
            if due is None:
                break
            wait_s = max(SYNC_ALERTS_POLL_S, (due - alerts.clock()).total_seconds())
            if wait_s >= deadline - loop.time():
                break  # (a rate limit's quiet time, a longer backoff: the next sync's)
            await asyncio.sleep(wait_s)
    finally:
        await alerts.stop()
    with alerts.store.reader() as conn:
        return int(outbox.counts(conn)[outbox.PENDING])


def progress_line(state: Mapping[str, tuple[int, int]], columns: int) -> str:
    """The progress line of ``state`` (pages done and planned, per workspace) in fewer than
    ``columns`` characters: a line that wraps cannot be redrawn in place (``\\r`` goes back
    to the start of its last row only). Bars shrink, then go; what still does not fit is cut
    with an ellipsis."""
    limit = max(columns - 1, 10)
    line = ""
    for width in (20, 10, 0):
        parts = []
        for ws, (d, t) in state.items():
            filled = min(width, int(width * d / t)) if t else 0
            bar = f" [{'#' * filled}{'.' * (width - filled)}]" if width else ""
            parts.append(f"{ws}{bar} {d}/{t or '?'}")
        line = "  ".join(parts)
        if len(line) <= limit:
            return line
    return line[: limit - 1] + "…"


class _ProgressBar:
    """One status line on a terminal (``out``): pages read per workspace.

    It is also the stream the log writes to while it runs: a log line first clears the
    progress line, and once the log line is complete the progress line is drawn again
    below it. A log line being written (its text, then its newline: two writes, perhaps
    from a worker thread) is never cut into by a redraw."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.state: dict[str, tuple[int, int]] = {}
        self._lock = threading.RLock()
        self._shown = False  # the progress line is on the screen
        self._mid_line = False  # a log line has begun and not yet ended
        self._closed = False

    def update(self, workspace: str, done: int, total: int) -> None:
        with self._lock:
            self.state[workspace] = (done, total)
            self._draw()

    def _draw(self) -> None:
        if self._closed or self._mid_line or not self.state:
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        self.out.write("\r\x1b[2K" + progress_line(self.state, columns))
        self.out.flush()
        self._shown = True

    def write(self, text: str) -> int:
        with self._lock:
            if self._shown:
                self.out.write("\r\x1b[2K")
                self._shown = False
            self.out.write(text)
            self._mid_line = not text.endswith("\n")
            if not self._mid_line:
                self._draw()
            return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def close(self) -> None:
        with self._lock:
            if self._shown:
                self.out.write("\r\x1b[2K")
                self.out.flush()
            self._shown, self._closed = False, True


def cmd_simulate(args: argparse.Namespace) -> int:
    from .sim import server as sim_server

    setup_logging(args)
    try:
        options = sim_server.options_from_args(args)
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None

    listening = False

    def ready(url: str) -> None:
        nonlocal listening
        listening = True
        ak, secret = next(iter(options.credentials.items()))
        print(f"simulator listening on {url}", flush=True)
        print(
            f"  {options.experiments} experiments in {options.workspaces} workspaces; "
            f"AccessKey id {ak!r}, secret {secret!r} (test credentials)",
            flush=True,
        )
        print(f"  ground truth: {url}/_sim/truth   stats: {url}/_sim/stats", flush=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(sim_server.serve_forever(options, on_ready=ready))
    except OSError as exc:
        if listening:
            raise
        raise _listen_error(options.host, options.port, exc) from None
    return EXIT_OK


def _listen_error(host: str, port: int, exc: OSError) -> HpoSyncError:
    """What binding ``host:port`` failing means: a host that is no address of this machine
    is a usage error (exit 2); a port that is taken or not allowed is not (exit 1)."""
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
    if isinstance(exc, socket.gaierror):
        return UsageError(f"simulate: --host {host!r} is not an address or a known host name")
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"simulate: --host {host!r} is not an address of this machine")
    shown = f"[{host}]" if ":" in host else host
    hint = "; is another process using the port?" if exc.errno == errno.EADDRINUSE else ""
    return HpoSyncError(f"simulate: cannot listen on {shown}:{port}: {reason}{hint}")


def db_arg(args: argparse.Namespace) -> str | None:
    """``--db`` if given. Given empty (``--db "$DB"`` with DB unset) it is a usage error,
    not the config's mirror read in its place."""
    db: str | None = getattr(args, "db", None)
    if db is not None and not db.strip():
        raise UsageError("--db: empty path; name the mirror's file")
    if db and os.path.isdir(db):  # a usage error (2), as a config's [store] path naming one is
        raise UsageError(
            f"--db: {db} is a directory, not a mirror file: name the database file itself"
            f" (e.g. {Path(db) / 'mirror.db'})"
        )
    return db


def default_db_path(args: argparse.Namespace) -> Path:
    """The mirror for read-only commands: ``--db`` beats the config's ``[store] path`` (the
    only part of the config read: see :func:`config.load_store`)."""
    db = db_arg(args)
    if db:
        return Path(db)
    return config_mod.load_store(config_mod.resolve_path(getattr(args, "config", None))).path


log = structlog.get_logger(__name__)

if __name__ == "__main__":  # pragma: no cover
    # Run hpo_sync.cli's own main: as __main__ this module's classes (UsageError) would be
    # copies that commands importing hpo_sync.cli do not raise.
    from hpo_sync.cli import main as _real_main

    sys.exit(_real_main())
