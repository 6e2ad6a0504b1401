"""Shared helpers of the benchmarks: a simulator in its own process, its control API,
child processes measured one by one (wall time, peak memory), tables.

The simulator runs as a separate process (``hpo-sync simulate``) so that its CPU time is not
charged to the client being measured: on a small machine, a server in the same event loop
would make every client look slower than it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo_sync.sim import DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET

READY_PREFIX = "simulator listening on "


@dataclass(frozen=True)
class SimProcess:
    """A running simulator: its base URL (``http://127.0.0.1:PORT``), port and process."""

    base_url: str
    port: int
    process: subprocess.Popen[str]


def hpo_sync_command() -> list[str]:
    """How to run the ``hpo-sync`` command of this environment."""
    script = Path(sys.executable).with_name("hpo-sync")
    if script.exists():
        return [str(script)]
    found = shutil.which("hpo-sync")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from hpo_sync.cli import main; sys.exit(main())"]


@contextlib.contextmanager
def simulator(args: Sequence[str], *, ready_timeout_s: float = 120.0) -> Iterator[SimProcess]:
    """Start ``hpo-sync simulate ARGS`` (on a free port unless ARGS name one), wait for its
    ``simulator listening on URL`` line, and stop it (SIGINT, then SIGKILL) on exit."""
    argv = [*hpo_sync_command(), "simulate", *args]
    if "--port" not in args:
        argv += ["--port", "0"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
    )
    try:
        url = _wait_ready(proc, ready_timeout_s)
        yield SimProcess(url, int(url.rsplit(":", 1)[1]), proc)
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the simulator exited early (status {proc.wait()})")
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
    raise RuntimeError(f"the simulator did not report ready within {timeout_s:g}s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the CLI stops cleanly on KeyboardInterrupt
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def sim_control(base_url: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
    """Call the simulator's loopback control API (``/_sim/...``): POST ``payload`` as JSON,
    or GET when it is None; return the decoded answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())


# ---------------------------------------------------------------------- child processes


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, output, wall time, its own peak RSS and the
    CPU time (user + system, all its threads) it used."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float
    cpu_s: float = 0.0


def run_child(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 900.0
) -> ChildRun:
    """Run ``argv`` to completion and measure it alone: wall time from spawn to exit, and the
    peak RSS of that one process (``wait4``'s ``ru_maxrss``, not the maximum over every child
    this process ever had, which ``RUSAGE_CHILDREN`` would give). Output goes to temporary
    files, so a chatty child cannot block on a full pipe; it is returned as text."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=dict(env or os.environ))
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall_s = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        return ChildRun(
            tuple(argv),
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            wall_s,
            usage.ru_maxrss * scale / 2**20,
            usage.ru_utime + usage.ru_stime,
        )


def process_cpu_s(pid: int) -> float | None:
    """CPU time (user + system) a running process has used so far (Linux ``/proc``), or
    None where that cannot be read: for charging another process, such as the simulator,
    with its share of a run."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs``); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory in MiB of ``pid`` (default: this process) since start or since
    :func:`reset_peak_rss`."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    if pid is None:
        # ru_maxrss is KiB on Linux, bytes on macOS; never reset
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return float("nan")


# ---------------------------------------------------------------------- output


def machine() -> str:
    """One line about where the numbers were measured."""
    cpus = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    py = platform.python_version()
    return f"{cpus} CPUs{f' ({model})' if model else ''}, {platform.system()}, Python {py}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain side-by-side table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def sdk_client(port: int) -> Any:
    """The official SDK's client, pointed at a simulator on loopback with its test keys."""
    from alibabacloud_paiautoml20220828.client import Client  # type: ignore[import-untyped]
    from alibabacloud_tea_openapi import models as open_api_models  # type: ignore[import-untyped]

    return Client(
        open_api_models.Config(
            access_key_id=DEFAULT_ACCESS_KEY_ID,
            access_key_secret=DEFAULT_ACCESS_KEY_SECRET,
            endpoint=f"127.0.0.1:{port}",
            protocol="http",
        )
    )
