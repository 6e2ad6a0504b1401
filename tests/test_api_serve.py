"""``hpo-sync serve``: the read API alone over an existing mirror, read-only — as a real
process (the CLI path, exit codes, SIGTERM) and in-process (tokens, no syncing)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from daemon_harness import signal_until_exit
from test_api_rig import TOKENS, WS1, golden_mirror, make_config

from hpo_sync.api.serve import serve

__all__ = ["golden_mirror"]

# The CLI, with `serve` registered whether or not cli.py lists it yet.
LAUNCH = """
import sys
from hpo_sync import cli
from hpo_sync.api.serve import register_cli
listed = cli._extra_commands
cli._extra_commands = lambda: [r for r in listed() if r is not register_cli] + [register_cli]
sys.exit(cli.main(sys.argv[1:]))
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_serve_runs_as_a_process_and_never_writes_the_mirror(
    golden_mirror: Path, tmp_path: Path
) -> None:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    before = _digest(db)
    env = {**os.environ, "HPO_SYNC_CONFIG": str(tmp_path / "absent.toml")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LAUNCH,
        "serve",
        "--db",
        str(db),
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("serving ") and "(read-only)" in line, line
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{url}/v1/experiments", params={"workspace": WS1}) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["experiments"] and resp.headers["X-Last-Sync"] != "never"
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 200
            async with session.post(f"{url}/v1/sync", params={"workspace": WS1}) as resp:
                assert resp.status == 403  # no tokens: no admin routes
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert time.monotonic() - started < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert _digest(db) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_repeated_until_serve_exits_still_ends_it_with_0(
    golden_mirror: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """A stop signal sent again and again while serve stops (Ctrl-C pressed twice, a
    supervisor's repeated kill): it exits 0, also when one comes after it removed its
    handlers (the default action then ended it by the signal)."""
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    env = {**os.environ, "HPO_SYNC_CONFIG": str(tmp_path / "absent.toml")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCH, "serve", "--db", str(db), "--listen", "127.0.0.1:0",
        "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("serving "), line
        errors = asyncio.ensure_future(proc.stderr.read())
        sent = await signal_until_exit(proc, sig)
        stderr = (await errors).decode()
        assert await proc.wait() == 0, stderr
        assert sent > 1 and "Traceback" not in stderr, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def test_serve_in_process_leaves_the_signal_dispositions_as_they_were(
    golden_mirror: Path, tmp_path: Path
) -> None:
    """Only the ``serve`` command, whose process ends with it, ignores stop signals once
    it stops; serve() in a process of its caller's leaves them as they were (a process it
    starts later inherits an ignored signal, and could no longer be stopped by it)."""
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    cfg = make_config(db, tokens=())
    stop = asyncio.Event()
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    assert signal.SIG_IGN not in [signal.getsignal(sig) for sig in sigs]
    task = asyncio.create_task(serve(cfg, stop=stop, on_ready=lambda url: stop.set()))
    assert await asyncio.wait_for(task, 30) == 0
    # (the event loop puts back the default handlers, not what was there before it)
    assert signal.SIG_IGN not in [signal.getsignal(sig) for sig in sigs]


def test_serve_refuses_a_wide_address_without_tokens(golden_mirror: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HPO_SYNC_CONFIG": str(tmp_path / "absent.toml")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "serve",
            "--db",
            str(golden_mirror),
            "--listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not a loopback address" in proc.stderr and "[[api.tokens]]" in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", "--db", str(tmp_path / "nope.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 1 and "no mirror at" in missing.stderr
    unconfigured = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert unconfigured.returncode == 2
    assert "absent.toml does not exist" in unconfigured.stderr
    assert "or name the mirror with --db PATH" in unconfigured.stderr


async def test_serve_with_tokens_reads_but_never_syncs(golden_mirror: Path, tmp_path: Path) -> None:
    db = tmp_path / "mirror.db"
    shutil.copy(golden_mirror, db)
    config = make_config(db)
    config = replace(config, api=replace(config.api, listen="127.0.0.1:0"))
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=ready.set_result, stop=stop))
    try:
        url = await asyncio.wait_for(ready, 30)
        auth = {"Authorization": f"Bearer {TOKENS['admin'][0]}"}
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.get(f"{url}/v1/workspaces") as resp:
                assert resp.status == 200
            async with session.post(f"{url}/v1/sync", params={"workspace": WS1}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "read_only"
            async with session.get(f"{url}/metrics") as resp:
                assert "hpo_sync_api_requests_total" in await resp.text()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/workspaces") as resp:
            assert resp.status == 401
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
