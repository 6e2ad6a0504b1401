"""The log stream on a disk that fills up and frees again: real write errors, from /dev/full
put under the log file's descriptor (ENOSPC from the kernel, as a full disk gives)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from hpo_sync import logs


@contextmanager
def disk_full(fd: int) -> Iterator[None]:
    """Writes to ``fd`` fail with ENOSPC for as long as the block runs."""
    saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(full)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("lines", [2, 200])  # within the stream's buffer, and well past it
def test_a_full_disk_fails_log_lines_only_while_it_is_full(tmp_path: Path, lines: int) -> None:
    """A log file on a disk that fills up: the lines written meanwhile fail (some may still
    go, late, from the stream's buffer), and once space is free the log goes on, after a
    line that says how many failed. It used to stop for good at the first error."""
    path = tmp_path / "hpo-sync.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with open(fd, "w", buffering=1) as stream:
        logs.configure("info", "json", stream=stream)
        log = structlog.get_logger()
        try:
            log.info("before")
            with disk_full(fd):
                for i in range(lines):
                    log.info("meanwhile", i=i, padding="x" * 100)
            log.info("after")
            log.info("and on")
        finally:
            logs.configure("info", "json")
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    events = [r["event"] for r in records]
    assert events[0] == "before" and events[-3:] == ["log.write_failed", "after", "and on"]
    assert set(events[1:-3]) <= {"meanwhile"}
    assert records[-3]["lines"] == lines and records[-3]["level"] == "warning"
