"""Signals that reach ``hpo-sync run`` or ``sync`` while it starts, before its event loop
handles them.

Importing the daemon's modules, reading the config and opening the mirror take a few hundred
milliseconds (opening waits for another process's write, if one is under way), and until
the loop's handlers are in place a signal gets its default action: a SIGHUP (a reload)
would kill the daemon, a SIGTERM would kill a sync instead of stopping it with exit 143.
:func:`hold`, the first thing ``main`` does for these commands, records them instead, and
the command takes them over with :func:`release` once its own handlers are in place: a stop
then stops it as soon as it has started, a reload re-reads the config once it has (the
file may have changed after it was read). The ``hpo-sync`` command holds them all before it
imports anything else (:mod:`hpo_sync.entry`); only the interpreter's own start (~20-30 ms)
comes before that, and still gets the default action.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_held: list[int] = []
#: Each held signal's handler before it was held: ``SIG_IGN`` under ``nohup`` (SIGHUP) or
#: for a background job of a script (SIGINT), which giving it back must keep.
_previous: dict[int, Any] = {}


def hold(signals: tuple[int, ...] = HELD) -> None:
    """Record ``signals`` (of :data:`HELD`; all of them by default) from now on, until
    something else handles them."""
    for sig in signals:
        current = signal.getsignal(sig)
        if current is not _record:
            _previous[sig] = current
        signal.signal(sig, _record)


def _record(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def _give_back(sig: int) -> Any:
    """Put back the handler ``sig`` had before it was held (its default if that is not
    known); returns it."""
    handler = _previous.pop(sig, None)
    if handler is None:  # (None: one not installed from Python)
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    signal.signal(sig, handler)
    return handler


def restore() -> None:
    """Give the signals still held here the handlers they had back, and forget what was
    recorded (``main`` returned before a daemon took them over)."""
    for sig in HELD:
        if signal.getsignal(sig) is _record:
            _give_back(sig)
    _held.clear()


def let_go(signals: tuple[int, ...] = HELD) -> None:
    """Give ``signals`` the handlers they had back, and deliver again those of them that
    came while they were held (a command that takes none over, stopped as it started),
    unless they were ignored before."""
    came = [sig for sig in dict.fromkeys(_held) if sig in signals]
    given = {sig: _give_back(sig) for sig in signals if signal.getsignal(sig) is _record}
    _held[:] = [sig for sig in _held if sig not in signals]
    for sig in came:
        if given.get(sig, signal.getsignal(sig)) is not signal.SIG_IGN:
            os.kill(os.getpid(), sig)


def release() -> list[int]:
    """The signals recorded so far, each once, in the order they first came. Call it after
    installing the handlers that take over, so that none can fall in between."""
    out = list(dict.fromkeys(_held))
    _held.clear()
    for sig in [s for s in _previous if signal.getsignal(s) is not _record]:
        del _previous[sig]  # taken over
    return out
