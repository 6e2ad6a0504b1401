"""Helpers for tests that run ``hpo-sync run`` as a real process against the simulator.

The simulator runs in the test's event loop, so everything here that waits does it with
``asyncio`` (never ``time.sleep``): a blocked loop would stall the daemon's upstream calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from hpo_sync.diff import replay
from hpo_sync.schema import decode_trial_status
from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET

ROOT = Path(__file__).resolve().parent.parent


def config_text(
    *,
    sim_url: str,
    db: Path,
    workspaces: Iterable[str],
    hot_interval_s: float = 1,
    full_interval_s: float = 10,
    page_size: int = 20,
    retry_max_total_s: float = 10,
    upstream: str = "",
    sync: str = "",
) -> str:
    ws = "".join(f'\n[[workspaces]]\nid = "{w}"\n' for w in workspaces)
    return f"""
[upstream]
endpoint = "{sim_url}"
page_size = {page_size}
max_qps = 1000
max_concurrency = 2
timeout_s = 5
retry_max_total_s = {retry_max_total_s}
{upstream}

[store]
path = "{db}"

[sync]
hot_interval_s = {hot_interval_s}
full_interval_s = {full_interval_s}
jitter_s = 0.2
failure_backoff_max_s = 5
{sync}
{ws}
[api]
listen = "127.0.0.1:0"
"""


def short_tmpdir() -> Path:
    """A short directory for AF_UNIX socket paths (at most 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="hpo-", dir="/tmp"))


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIBABA_CLOUD_", "NOTIFY_"))}
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=DEFAULT_ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=DEFAULT_ACCESS_KEY_SECRET,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpo_sync.cli", *args]


class DaemonProcess:
    """One ``hpo-sync run`` process with its own NOTIFY_SOCKET and a JSON log file."""

    def __init__(
        self, proc: asyncio.subprocess.Process, log_path: Path, sock: socket.socket, sockdir: Path
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.sock = sock
        self._sockdir = sockdir
        self.notifications: list[str] = []
        self.started_at = time.monotonic()

    @classmethod
    async def start(
        cls, config: Path, log_path: Path, *, watchdog_usec: int | None = None
    ) -> DaemonProcess:
        sockdir = short_tmpdir()
        sock_path = sockdir / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.setblocking(False)
        extra = {"NOTIFY_SOCKET": str(sock_path)}
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        log = log_path.open("ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *cli("--config", str(config), "--log-format", "json", "run"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=daemon_env(**extra),
                cwd=ROOT,
            )
        finally:
            log.close()
        return cls(proc, log_path, sock, sockdir)

    # --- logs ----------------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    async def wait_event(
        self,
        name: str,
        timeout_s: float = 15,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        skip: int = 0,
    ) -> dict[str, Any]:
        """The first event ``name`` matching ``where`` after the first ``skip`` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            matching = [e for e in self.events(name) if where(e)]
            if len(matching) > skip:
                return matching[skip]
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} event within {timeout_s}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")

    # --- sd_notify -----------------------------------------------------------------------

    async def wait_notify(self, key: str, timeout_s: float = 15, skip: int = 0) -> str:
        """The first datagram holding ``key=`` (after ``skip`` such), e.g. ``READY``."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            hits = [
                m
                for m in self.notifications
                if any(line.startswith(f"{key}=") for line in m.splitlines())
            ]
            if len(hits) > skip:
                return hits[skip]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {key}= notification within {timeout_s}s; got {self.notifications}"
                )
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), min(0.2, remaining))
            except TimeoutError:
                self.check_alive()
                continue
            self.notifications.append(data.decode())

    # --- the API -------------------------------------------------------------------------

    async def api_url(self) -> str:
        return str((await self.wait_event("api.listening"))["url"])

    async def get(self, path: str) -> tuple[int, Any]:
        url = await self.api_url()
        async with aiohttp.ClientSession() as session, session.get(url + path) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    # --- stopping ------------------------------------------------------------------------

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10) -> tuple[int, float]:
        """Send ``sig`` and wait; returns (exit status, seconds it took)."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        return code, time.monotonic() - began

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)


class Daemons:
    """Starts daemons and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[DaemonProcess] = []

    async def start(self, config: Path, name: str = "daemon", **kw: int | None) -> DaemonProcess:
        d = await DaemonProcess.start(config, self.tmp_path / f"{name}.log", **kw)
        self.started.append(d)
        return d

    async def cleanup(self) -> None:
        for d in self.started:
            await d.kill()
            d.close()


# --- the mirror --------------------------------------------------------------------------------


async def signal_until_exit(
    proc: asyncio.subprocess.Process, sig: int, *, timeout_s: float = 20.0
) -> int:
    """Send ``sig`` to ``proc``, then again every millisecond or so until it has exited (a
    stop signal repeated: Ctrl-C pressed twice, a supervisor's repeated kill); returns how
    many were sent. Whoever reads the process's pipes must be reading them meanwhile.

    (os.kill, not send_signal: that polls first, and a poll that reaps the child leaves
    asyncio's own wait for it nothing, returncode 255.)"""
    proc.send_signal(sig)
    sent = 1
    async with asyncio.timeout(timeout_s):
        while proc.returncode is None:
            await asyncio.sleep(0.001)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
                sent += 1
    return sent


def query(db: Path, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, tuple(params)).fetchall()
    finally:
        conn.close()


async def wait_db(
    db: Path,
    sql: str,
    params: Iterable[Any] = (),
    timeout_s: float = 20,
    poll_s: float = 0.05,
    daemon: DaemonProcess | None = None,
) -> list[sqlite3.Row]:
    """Poll ``sql`` until it returns rows (failing early if ``daemon`` exits)."""
    deadline = time.monotonic() + timeout_s
    params = tuple(params)
    while True:
        rows = _rows_if_any(db, sql, params)
        if rows:
            return rows
        if daemon is not None:
            daemon.check_alive()
        if time.monotonic() > deadline:
            tail = f"\n{daemon.tail()}" if daemon is not None else ""
            raise AssertionError(f"no rows for {sql} {params} within {timeout_s}s{tail}")
        await asyncio.sleep(poll_s)


def _rows_if_any(db: Path, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
    if not db.exists():
        return []
    try:
        return query(db, sql, params)
    except sqlite3.OperationalError:
        return []  # the schema is being created


def now_run_time() -> str:
    """For ``started_at >= ?``: the next whole second, as ``sync_runs`` times are written.

    They have whole seconds: a run that started earlier within this second reads the same
    as one that starts later in it, so only the next second is surely after now."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(time.time()) + 1))


async def wait_full_ok_since(
    db: Path,
    workspaces: Iterable[str],
    since: str,
    timeout_s: float,
    daemon: DaemonProcess | None = None,
) -> None:
    for ws in workspaces:
        await wait_db(
            db,
            "SELECT id FROM sync_runs WHERE workspace_id = ? AND mode = 'full' AND status = 'ok'"
            " AND started_at >= ?",
            (ws, since),
            timeout_s=timeout_s,
            daemon=daemon,
        )


async def sim_truth(sim_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{sim_url}/_sim/truth") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def sim_post(sim_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(sim_url + path, json=body) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


def assert_mirror_matches_truth(db: Path, truth: dict[str, Any], workspaces: Iterable[str]) -> int:
    """The mirror's tracked fields of the given workspaces equal the simulator's truth: every
    live experiment with its status and trial counts, not deleted; every other row deleted.
    Returns how many experiments were compared."""
    wanted = set(workspaces)
    rows = {
        r["experiment_id"]: r
        for r in query(
            db,
            "SELECT experiment_id, workspace_id, status, trial_status, deleted FROM experiments",
        )
        if r["workspace_id"] in wanted
    }
    live = {e["ExperimentId"]: e for e in truth["experiments"] if e["WorkspaceId"] in wanted}
    problems = []
    for exp_id, exp in live.items():
        row = rows.get(exp_id)
        if row is None:
            problems.append(f"{exp_id}: missing from the mirror")
            continue
        trials = {k: int(v) for k, v in (exp.get("TrialStatus") or {}).items() if int(v)}
        got = (row["status"], decode_trial_status(row["trial_status"]), bool(row["deleted"]))
        if got != (exp["Status"], trials, False):
            problems.append(f"{exp_id}: mirror {got} != truth {(exp['Status'], trials, False)}")
    deleted = set(truth["deleted"])
    for exp_id, row in rows.items():
        if exp_id not in live and not (row["deleted"] and exp_id in deleted):
            problems.append(f"{exp_id}: not live upstream but deleted={row['deleted']}")
    assert not problems, f"{len(problems)} differences, e.g. {problems[:5]}"
    return len(live)


FIELD_START = {"Status": (None,), "TrialStatus": (None, "{}"), "Deleted": (None, "false")}


def assert_history_consistent(db: Path) -> int:
    """``changes`` replays to the mirror's state, and per experiment and field every row
    continues the previous one (old = previous new, new != old): nothing lost, nothing
    doubled. Returns the number of change rows."""
    changes = [
        dict(r)
        for r in query(
            db,
            "SELECT id, experiment_id, field, old_value, new_value FROM changes ORDER BY id",
        )
    ]
    state = replay(changes)
    rows = query(db, "SELECT experiment_id, status, trial_status, deleted FROM experiments")
    problems = []
    for r in rows:
        s = state.get(r["experiment_id"])
        want = (r["status"], decode_trial_status(r["trial_status"]), bool(r["deleted"]))
        if s is None or (s.status, s.trial_status, s.deleted) != want:
            problems.append(f"{r['experiment_id']}: replay {s} != mirror {want}")
    last: dict[tuple[str, str], str | None] = {}
    for c in changes:
        key = (c["experiment_id"], c["field"])
        if key in last:
            if c["old_value"] != last[key]:
                problems.append(f"change {c['id']}: old {c['old_value']!r} != prev {last[key]!r}")
        elif c["old_value"] not in FIELD_START.get(c["field"], (None,)):
            problems.append(f"change {c['id']}: first {c['field']} row starts at {c['old_value']}")
        if c["new_value"] == c["old_value"]:
            problems.append(f"change {c['id']}: no-op {c['old_value']!r} -> {c['new_value']!r}")
        last[key] = c["new_value"]
    assert not problems, f"{len(problems)} history problems, e.g. {problems[:5]}"
    return len(changes)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """A sample's value from Prometheus text (labels must match exactly those given)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name + (f"{{{want}}}" if want else ""):
            return float(value)
    return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
