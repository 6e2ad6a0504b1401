"""The event loop the long-running commands run on.

``hpo-sync run``, ``serve`` and ``demo`` spend most of their CPU in the event loop itself
(socket reads and writes, polling) once the read API is busy, so they run on uvloop — a
libuv-based drop-in for asyncio's default loop — when it is installed (it is a dependency
on Linux and macOS). Everything here uses only the asyncio API, so the default loop works
too: set ``HPO_SYNC_EVENT_LOOP=asyncio`` to choose it (e.g. to rule uvloop out when
debugging).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV_VAR = "HPO_SYNC_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default (not installed, or opted out)."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like :func:`asyncio.run`, on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
