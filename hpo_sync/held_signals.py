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

HELD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_held: list[int] = []


def hold(signals: tuple[int, ...] = HELD) -> None:
    """Record ``signals`` (of :data:`HELD`; all of them by default) from now on, until
    something else handles them."""
    for sig in signals:
        signal.signal(sig, _record)


def _record(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def restore() -> None:
    """Give the signals still recorded here their default action back, and forget what
    was recorded (``main`` returned before a daemon took them over)."""
    for sig in HELD:
        if signal.getsignal(sig) is _record:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default)
    _held.clear()


def let_go(signals: tuple[int, ...] = HELD) -> None:
    """Give ``signals`` their default action back, and deliver again those of them that
    came while they were held (a command that takes none over, stopped as it started)."""
    came = [sig for sig in dict.fromkeys(_held) if sig in signals]
    for sig in signals:
        if signal.getsignal(sig) is _record:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default)
    _held[:] = [sig for sig in _held if sig not in signals]
    for sig in came:
        os.kill(os.getpid(), sig)


def release() -> list[int]:
    """The signals recorded so far, each once, in the order they first came. Call it after
    installing the handlers that take over, so that none can fall in between."""
    out = list(dict.fromkeys(_held))
    _held.clear()
    return out
