"""The read API's thread pool: a few threads that run blocking reads for the event loop.

Under load the event loop's thread is the API's bottleneck (profiled: see bench/README.md),
and ``loop.run_in_executor`` costs it, per call, a ``concurrent.futures.Future``, a work
item, a semaphore and two chained-future callbacks. This pool hands work over on a
:class:`queue.SimpleQueue` and gives each result back with one ``call_soon_threadsafe``:
the same one hop per request, with a third of the bookkeeping on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ReadPool"]

T = TypeVar("T")

_Item = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class ReadPool:
    """``threads`` daemon threads, started on first use, named ``{name}_{i}``."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("a pool needs at least one thread")
        self._size = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` in a pool thread; its result, or its exception raised here."""
        if self._closed:
            raise RuntimeError("the read pool is shut down")
        if len(self._threads) < self._size:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((work, future, loop))
        return await future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self._size:
                t = threading.Thread(
                    target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            work, future, loop = item
            if future.cancelled():  # the request went away before its turn
                continue
            try:
                result = work()
            except BaseException as exc:  # handed to the awaiting request, as executors do
                _call_soon(loop, _set_exception, future, exc)
            else:
                _call_soon(loop, _set_result, future, result)

    def shutdown(self) -> None:
        """Stop the threads once the work already queued is done; cancel nothing running."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    # The loop closed meanwhile (RuntimeError): nobody awaits the result any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
