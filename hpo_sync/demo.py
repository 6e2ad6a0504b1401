"""``hpo-sync demo``: the whole product on loopback, no cloud account needed.

One process, one asyncio loop: the built-in simulator of the PAI API (experiments evolving
``--speed`` times faster than real time) and the real daemon (:class:`~hpo_sync.daemon.Daemon`:
scheduler, mirror, HTTP API) pointed at it, with a config file written into the data
directory. In-process rather than two processes because it starts in a second, stops as one
on Ctrl-C, and the terminal stays free for what a newcomer wants to see — the daemon's JSON
log goes to ``daemon.log`` in the data directory, while the terminal shows what is running,
what to try, and every change the mirror records (a tail of its ``changes`` table).

The data directory is temporary (removed on exit) unless ``--data-dir`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from . import config as config_mod
from .credentials import CloudCredentials, StaticCredentials
from .daemon import Daemon
from .notify import Notifier
from .store import ChangeRow, Store

DEFAULT_API_PORT = 8787
#: A module that may provide ``async start_demo_extra(data_dir) -> DemoExtra`` (the alerts
#: issue's local chat receiver).
TAIL_INTERVAL_S = 0.5


class DemoExtra(Protocol):
    """Something more the demo runs (e.g. a local chat receiver for alerts)."""

    #: TOML appended to the demo's config file (e.g. ``[[alerts.targets]]`` and rules).
    config_toml: str
    #: Lines printed in the banner (what it is, where to look).
    banner: list[str]

    async def stop(self) -> None: ...


@dataclass
class DemoOptions:
    data_dir: Path | None = None
    duration_s: float | None = None
    experiments: int = 2000
    workspaces: int = 3
    speed: float = 30.0
    seed: int = 0
    api_port: int = DEFAULT_API_PORT
    hot_interval_s: float = 5.0
    full_interval_s: float = 120.0
    fault_rate: float = 0.0
    all_changes: bool = False
    extras: list[DemoExtra] = field(default_factory=list)


def register_cli(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "demo",
        "run the simulator and the daemon on loopback and watch changes arrive (no cloud "
        "account needed)",
        cmd_demo,
    )
    d = DemoOptions()
    p.add_argument(
        "--data-dir", metavar="DIR", help="keep the mirror and config here (default: a temp dir)"
    )
    p.add_argument("--duration", type=float, metavar="S", help="stop by itself after S seconds")
    p.add_argument(
        "--experiments",
        type=int,
        default=d.experiments,
        help="experiments in the simulated world at start, across its workspaces (%(default)s)",
    )
    p.add_argument(
        "--workspaces", type=int, default=d.workspaces, help="workspaces to sync (%(default)s)"
    )
    p.add_argument(
        "--speed", type=float, default=d.speed, help="sim seconds per second (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the simulated world's seed")
    p.add_argument(
        "--api-port",
        type=int,
        default=d.api_port,
        help="API port (%(default)s; any free port if taken; 0: any)",
    )
    p.add_argument(
        "--hot-interval",
        type=float,
        default=d.hot_interval_s,
        metavar="S",
        help="seconds between hot sweeps (%(default)s)",
    )
    p.add_argument(
        "--full-interval",
        type=float,
        default=d.full_interval_s,
        metavar="S",
        help="seconds between full sweeps (%(default)s)",
    )
    p.add_argument(
        "--fault-rate",
        type=float,
        default=d.fault_rate,
        help="share of upstream requests the simulator fails (%(default)s)",
    )
    p.add_argument(
        "--all-changes",
        action="store_true",
        help="print every trial-count change too (default: one summary line per poll)",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .cli import UsageError

    if args.experiments < 1 or args.workspaces < 1:
        raise UsageError("--experiments and --workspaces must be at least 1")
    if args.speed < 0 or not 0 <= args.fault_rate <= 1:
        raise UsageError("--speed must be >= 0 and --fault-rate within [0, 1]")
    if args.hot_interval < 1 or args.full_interval < max(10, args.hot_interval):
        raise UsageError("--hot-interval must be >= 1 and --full-interval >= 10 and >= it")
    if not 0 <= args.api_port <= 65535:
        raise UsageError(f"--api-port must be from 0 (any free port) to 65535, got {args.api_port}")
    if args.data_dir:
        _check_data_dir(Path(args.data_dir))
    options = DemoOptions(
        data_dir=Path(args.data_dir) if args.data_dir else None,
        duration_s=args.duration,
        experiments=args.experiments,
        workspaces=args.workspaces,
        speed=args.speed,
        seed=args.seed,
        api_port=args.api_port,
        hot_interval_s=args.hot_interval,
        full_interval_s=args.full_interval,
        fault_rate=args.fault_rate,
        all_changes=args.all_changes,
    )
    from .eventloop import run

    return run(run_demo(options, exiting=True))


#: The first line of the config the demo writes: how it knows a --data-dir it made.
DEMO_CONFIG_HEADER = "# Written by `hpo-sync demo`"


def _check_data_dir(path: Path) -> None:
    """``--data-dir`` must be a directory, or a path where one can be made."""
    from .cli import UsageError

    if "\0" in str(path):
        raise UsageError("--data-dir cannot contain a NUL character")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--data-dir {path} is a file, not a directory; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--data-dir {path}: cannot create it: {exc.strerror or exc}") from None
    # A directory of a real daemon's (its config and mirror) is not the demo's to write: the
    # demo replaced the config (which a SIGHUP then loaded into that daemon) and synced the
    # simulator into the mirror. One an earlier demo made is reused.
    config, mirror = path / "config.toml", path / "mirror.db"
    ours = False
    if config.exists():
        try:
            with config.open("rb") as f:
                ours = f.readline().startswith(DEMO_CONFIG_HEADER.encode())
        except OSError:
            ours = False
        if not ours:
            raise UsageError(
                f"--data-dir {path} holds a config.toml the demo did not write; name an empty"
                " directory (the demo writes its own config and mirror there)"
            )
    if mirror.exists() and not ours:
        raise UsageError(
            f"--data-dir {path} holds a mirror.db the demo did not make; name an empty directory"
        )


def config_text(
    *,
    sim_url: str,
    db_path: Path,
    workspace_ids: list[str],
    api_port: int,
    hot_interval_s: float,
    full_interval_s: float,
    extra_toml: str = "",
) -> str:
    """The demo's config file (pure)."""
    workspaces = "\n".join(
        f'[[workspaces]]\nid = "{ws}"\nlabel = "demo workspace {i}"\n'
        for i, ws in enumerate(workspace_ids, 1)
    )
    return f"""\
{DEMO_CONFIG_HEADER}: the daemon syncing the built-in simulator on loopback.
# To run the daemon on it yourself (while the simulator runs), pass the simulator's test
# credentials: ALIBABA_CLOUD_ACCESS_KEY_ID=sim-access-key-id
# ALIBABA_CLOUD_ACCESS_KEY_SECRET=sim-access-key-secret hpo-sync --config THIS run

[upstream]
endpoint = "{sim_url}"
# the simulator is on loopback: no proxy the environment names
proxy = ""
page_size = 100
max_qps = 50

[store]
path = {json.dumps(str(db_path))}

[sync]
hot_interval_s = {hot_interval_s:g}
full_interval_s = {full_interval_s:g}
jitter_s = 1
failure_backoff_max_s = 60

{workspaces}
[api]
listen = "127.0.0.1:{api_port}"

[logging]
level = "info"
format = "json"
{extra_toml}"""


def pick_port(preferred: int) -> int:
    """``preferred`` if it is free on loopback, else 0 (the OS picks)."""
    if preferred == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def format_change(change: ChangeRow, name: str | None) -> str:
    """One line per change, e.g. ``ws 100001 · bert_lr_sweep_0042 (exp-1a2b) RUNNING →
    FAILED`` (pure)."""
    who = f"ws {change.workspace_id} · {name or '?'} ({change.experiment_id})"
    if change.field == "Status":
        if change.old_value is None:
            return f"{who} new, {change.new_value or 'no status'}"
        return f"{who} {change.old_value} → {change.new_value or 'no status'}"
    if change.field == "TrialStatus":
        return f"{who} trials {_trials(change.old_value)} → {_trials(change.new_value)}"
    if change.field == "Deleted":
        return f"{who} {'deleted' if change.new_value == 'true' else 'undeleted'}"
    return f"{who} {change.field} {change.old_value} → {change.new_value}"


def _trials(value: str | None) -> str:
    try:
        counts = json.loads(value) if value else {}
    except ValueError:
        return str(value)
    if not isinstance(counts, dict) or not counts:
        return "none"
    return " ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))


def command_name(argv0: str | None = None, path: str | None = None) -> str:
    """How to run hpo-sync from another terminal: ``hpo-sync`` when that name on the PATH is
    this very program, else its full path (the README's ``.venv/bin/hpo-sync`` is not on the
    PATH of a shell that has not activated the venv), else ``python -m hpo_sync.cli``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == "hpo-sync":
        mine = Path(argv0).resolve()
        found = shutil.which("hpo-sync", path=path)
        return "hpo-sync" if found and Path(found).resolve() == mine else str(mine)
    return f"{sys.executable} -m hpo_sync.cli"


def _available_commands() -> set[str]:
    from . import cli

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _discover_extras() -> list[Callable[[Path], Any]]:
    """What the demo starts beside the simulator and the daemon (the chat receivers)."""
    from .alerts.demo import start_demo_extra

    return [start_demo_extra]


class _Out:
    """Prints lines to the terminal. When its reader goes away (``hpo-sync demo | head``),
    calls ``on_closed`` once (the demo stops, cleaning up) and prints nothing more."""

    def __init__(self, stream: TextIO, on_closed: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.on_closed = on_closed
        self.closed = False

    def __call__(self, text: str = "") -> None:
        if self.closed:
            return
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            from .cli import quiet_stream

            self.closed = True
            quiet_stream(self.stream)  # what else prints (the alert receivers) too
            if self.on_closed is not None:
                self.on_closed()


async def run_demo(
    options: DemoOptions, out: TextIO | None = None, *, exiting: bool = False
) -> int:
    """Run the demo until Ctrl-C, SIGTERM or ``duration_s``; returns the exit status.
    ``exiting``: the process ends when this returns (the ``demo`` command), so those
    signals are ignored once the stop is under way; in-process, the process keeps its own
    dispositions (and the processes it starts later inherit them)."""
    from . import logs
    from .sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET
    from .sim.server import SimOptions, Simulator

    stop = asyncio.Event()
    say = _Out(out or sys.stdout, on_closed=stop.set)
    temporary = options.data_dir is None
    data_dir = (
        Path(tempfile.mkdtemp(prefix="hpo-sync-demo-"))
        if options.data_dir is None
        # absolute: the config written there names files in it, and a config's relative
        # paths are read from the config's own directory
        else options.data_dir.absolute()
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path = (data_dir / "mirror.db").resolve()
    log_path = data_dir / "daemon.log"
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = Simulator(
        SimOptions(
            experiments=options.experiments,
            workspaces=options.workspaces,
            speed=options.speed,
            seed=options.seed,
            fault_rate=options.fault_rate,
        )
    )
    log_file = log_path.open("a", encoding="utf-8")
    daemon: Daemon | None = None
    run_task: asyncio.Task[None] | None = None
    extras: list[DemoExtra] = list(options.extras)
    try:
        sim_url = await sim.start()
        for start_extra in _discover_extras():
            extras.append(await start_extra(data_dir))
        config_path = data_dir / "config.toml"
        config_path.write_text(
            config_text(
                sim_url=sim_url,
                db_path=db_path,
                workspace_ids=list(sim.world.workspace_ids),
                api_port=pick_port(options.api_port),
                hot_interval_s=options.hot_interval_s,
                full_interval_s=options.full_interval_s,
                extra_toml="".join(e.config_toml for e in extras),
            ),
            encoding="utf-8",
        )
        cfg = config_mod.load(config_path)
        logs.configure(cfg.logging.level, "json", stream=log_file)
        daemon = Daemon(
            cfg,
            credentials=StaticCredentials(
                CloudCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET)
            ),
            notifier=Notifier({}),
        )
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        run_task = asyncio.create_task(daemon.run(), name="daemon")
        started = asyncio.create_task(daemon.started.wait())
        await asyncio.wait({run_task, started}, return_when=asyncio.FIRST_COMPLETED)
        if run_task.done():
            started.cancel()
            await run_task  # raises what stopped it
            return 1
        _banner(say, options, data_dir, config_path, db_path, log_path, sim_url, daemon, extras)
        await _tail(say, db_path, stop, options.duration_s, options.workspaces, options.all_changes)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            if not exiting:  # in-process: the process keeps its own dispositions
                continue
            # A second Ctrl-C while the demo stops (its daemon's stop is bounded, a few
            # seconds at most) took the default action: a KeyboardInterrupt traceback, the
            # simulator left running in the loop's teardown and the temporary directory
            # left behind. The stop under way is what it would ask for.
            signal.signal(sig, signal.SIG_IGN)
        say("stopping…")
        if daemon is not None:
            daemon.request_stop()
        if run_task is not None:
            with contextlib.suppress(Exception):
                await run_task
        for extra in extras:
            with contextlib.suppress(Exception):
                await extra.stop()
        await sim.stop()
        log_file.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
            say(f"stopped; removed {data_dir} (pass --data-dir DIR to keep the mirror)")
        else:
            say(f"stopped; the mirror stays in {db_path}")


def _banner(
    say: _Out,
    options: DemoOptions,
    data_dir: Path,
    config_path: Path,
    db_path: Path,
    log_path: Path,
    sim_url: str,
    daemon: Daemon,
    extras: list[DemoExtra],
) -> None:
    api = daemon.api_url
    cfg = f"{command_name()} --config {config_path}"
    commands = _available_commands()
    say(f"hpo-sync demo — everything on loopback, data in {data_dir}")
    say(
        f"  simulator  {sim_url}  ({options.experiments:,} experiments in "
        f"{options.workspaces} workspaces, running {options.speed:g}x real time)"
    )
    say(
        f"  daemon     hot sweep every {options.hot_interval_s:g}s, full every "
        f"{options.full_interval_s:g}s; log: {log_path}"
    )
    say(f"  web UI     {api}/ui/  (open in a browser on this machine)")
    say(f"  API        {api}/v1/experiments   {api}/v1/changes   {api}/openapi.json")
    say(f"  mirror     {db_path}")
    for extra in extras:
        for line in extra.banner:
            say(f"  {line}")
    say()
    say("Try, in another terminal:")
    say(f"  curl -s {api}/readyz")
    say(f"  curl -s '{api}/v1/experiments?status=RUNNING&limit=5'")
    say(f"  curl -s '{api}/v1/changes?wait=30'")
    if "ls" in commands:
        say(f"  {cfg} ls --status RUNNING")
    if "history" in commands:
        say(f"  {cfg} history --no-baseline --field Status --limit 20")
    if "stats" in commands:
        say(f"  {cfg} stats --since 1h")
    say(f'  sqlite3 {db_path} "SELECT status, count(*) FROM experiments GROUP BY status"')
    say(
        f'  sqlite3 {db_path} "SELECT observed_at, experiment_id, old_value, new_value '
        "FROM changes WHERE field = 'Status' AND baseline = 0 ORDER BY id DESC LIMIT 10\""
    )
    say(f"  {cfg} backup {data_dir / 'copy.db'}")
    say()
    say("Ctrl-C stops everything. Changes, as the mirror records them:")


async def _tail(
    say: _Out,
    db_path: Path,
    stop: asyncio.Event,
    duration_s: float | None,
    workspaces: int,
    all_changes: bool,
) -> None:
    """Print the mirror's progress and its new (non-baseline) change rows until stopped;
    trial-count changes (many) are summed up per workspace unless ``all_changes``."""
    started = time.monotonic()
    deadline = started + duration_s if duration_s is not None else None
    store = await asyncio.to_thread(Store.open, db_path, readonly=True)
    try:
        last_id = await asyncio.to_thread(_max_change_id, store)
        baseline_done = False
        names: dict[str, str | None] = {}
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not baseline_done:
                states = await asyncio.to_thread(store.workspaces)
                if len(states) >= workspaces and all(s.baseline_at for s in states):
                    baseline_done = True
                    counts = await asyncio.to_thread(store.counts_by_status)
                    total = sum(counts.values())
                    by_status = ", ".join(f"{k} {v}" for k, v in counts.items() if k)
                    say(
                        f"  ✓ mirror holds {total:,} experiments of {len(states)} workspaces "
                        f"after {time.monotonic() - started:.1f}s ({by_status})"
                    )
            rows = await asyncio.to_thread(
                store.history, after_id=last_id, include_baseline=False, limit=500
            )
            trial_changes: dict[str, int] = {}
            stamp = ""
            for row in rows:
                last_id = row.id
                stamp = row.observed_at[11:19]
                if row.field == "TrialStatus" and not all_changes:
                    trial_changes[row.workspace_id] = trial_changes.get(row.workspace_id, 0) + 1
                    continue
                if row.experiment_id not in names:
                    exp = await asyncio.to_thread(store.get_experiment, row.experiment_id)
                    names[row.experiment_id] = exp.get("name") if exp else None
                say(f"  {stamp}  {format_change(row, names[row.experiment_id])}")
            for ws, n in sorted(trial_changes.items()):
                say(f"  {stamp}  ws {ws} · trial counts changed in {n} experiment(s)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TAIL_INTERVAL_S)
    finally:
        await asyncio.to_thread(store.close)


def _max_change_id(store: Store) -> int:
    with store.reader() as conn:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0])
