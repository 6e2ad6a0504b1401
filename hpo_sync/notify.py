"""systemd's notification protocol (``sd_notify``) without a dependency.

A notification is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd the
variable is unset and every call is a no-op, so the daemon runs the same from a shell.
Sending never raises: a service must not die because its supervisor is gone.

The socket is non-blocking (a supervisor that stops reading must not stall the event loop),
and the kernel queues only a few datagrams for a reader that is behind
(``net.unix.max_dgram_qlen``, 10 by default): a send then fails with ``EAGAIN``. libsystemd's
``sd_notify`` blocks until there is room instead. Here a message that changes the unit's
state (``READY=1``, ``RELOADING=1``, ``STOPPING=1``: a lost ``READY=1`` times the start out
and fails the unit) is kept and sent again, in order and ahead of any later message, from
the event loop with a growing delay, and for up to a second when the notifier is closed.
``WATCHDOG=1`` and ``STATUS=`` alone are superseded by the next one: dropped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
#: systemd cuts STATUS= at a line; keep it readable in ``systemctl status``.
MAX_STATUS_CHARS = 200
#: The keys of a message that must not be lost to a full socket queue (module docstring).
STATE_KEYS = frozenset({"READY", "RELOADING", "STOPPING"})
#: A kept message is sent again after this long, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
#: How long close() may wait in all for the supervisor to take what is still kept, trying
#: again this often.
CLOSE_FLUSH_S = 1.0
CLOSE_RETRY_S = 0.02


def socket_address(value: str | None) -> str | bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if it is unusable.

    ``@name`` is the abstract namespace (a leading NUL byte); a path must be absolute.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not for a local service


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled
    advises; None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    raw = env.get(WATCHDOG_USEC_ENV, "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """``KEY=VALUE`` lines; newlines in a value (a STATUS line) become spaces."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        if key == "STATUS" and len(text) > MAX_STATUS_CHARS:
            text = text[: MAX_STATUS_CHARS - 1] + "…"
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to systemd; a no-op when not started by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get(NOTIFY_SOCKET_ENV))
        self.watchdog_interval_s = watchdog_interval_s(env, os.getpid())
        self._sock: socket.socket | None = None
        self._warned = False
        # State messages the socket refused (EAGAIN), oldest first, and the retry timer.
        self._pending: list[bytes] = []
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay_s = RETRY_FIRST_S

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; True if it was handed to the socket now.

        A state message the socket cannot take now is kept and sent later (module
        docstring); any message waits behind those kept."""
        if self.address is None:
            return False
        message = format_message(fields)
        state = not STATE_KEYS.isdisjoint(fields)
        if self._pending and not self._flush():
            if state:
                self._pending.append(message)
                self._schedule_retry()
            return False
        sent = self._sendto(message)
        if sent is None and state:
            self._pending.append(message)
            self._schedule_retry()
            log.warning("notify.deferred", reason="supervisor's socket queue is full")
        return bool(sent)

    def _sendto(self, message: bytes) -> bool | None:
        """True if sent, None if the socket's queue is full (EAGAIN), False on any other
        error (warned about once: a vanished supervisor would otherwise flood the log)."""
        assert self.address is not None
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except BlockingIOError:
            return None
        except OSError as exc:
            if not self._warned:
                log.warning("notify.failed", error=str(exc), socket=str(self.address))
                self._warned = True
            return False
        return True

    def _flush(self) -> bool:
        """Send the kept messages in order; True once none is left. One that fails for
        another reason than a full queue is dropped (the supervisor is gone)."""
        while self._pending:
            if self._sendto(self._pending[0]) is None:
                return False
            del self._pending[0]
        self._retry_delay_s = RETRY_FIRST_S
        return True

    def _schedule_retry(self) -> None:
        if self._retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next send, or close(), tries again
        self._retry = loop.call_later(self._retry_delay_s, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        if not self._flush():
            self._retry_delay_s = min(self._retry_delay_s * 2, RETRY_MAX_S)
            self._schedule_retry()

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="reloading config")

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping")

    def close(self) -> None:
        """Hand over what is kept (waiting up to CLOSE_FLUSH_S in all), then close."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._pending and self._sock is not None:
            # Tried again every CLOSE_RETRY_S, never by a blocking send with a timeout: poll()
            # says an unconnected datagram socket is writable even while the peer's queue is
            # full, so such a send spins at full CPU for its timeout, and for each message.
            deadline = time.monotonic() + CLOSE_FLUSH_S
            while not self._flush():
                if time.monotonic() >= deadline:
                    log.warning("notify.lost", messages=len(self._pending))
                    self._pending.clear()
                    break
                time.sleep(CLOSE_RETRY_S)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
