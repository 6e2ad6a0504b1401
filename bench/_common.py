"""Shared helpers of the benchmarks: a simulator in its own process, peak memory, tables.

The simulator runs as a separate process (``hpo-sync simulate``) so that its CPU time is not
charged to the client being measured: on a small machine, a server in the same event loop
would make every client look slower than it is.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

READY_PREFIX = "simulator listening on "


@dataclass(frozen=True)
class SimProcess:
    """A running simulator: its base URL (``http://127.0.0.1:PORT``), port and process."""

    base_url: str
    port: int
    process: subprocess.Popen[str]


def _hpo_sync_command() -> list[str]:
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
    argv = [*_hpo_sync_command(), "simulate", *args]
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
