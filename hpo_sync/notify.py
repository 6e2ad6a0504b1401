"""systemd's notification protocol (``sd_notify``) without a dependency.

A notification is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named
by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd the
variable is unset and every call is a no-op, so the daemon runs the same from a shell.
Sending never raises: a service must not die because its supervisor is gone.
"""

from __future__ import annotations

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

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; True if it was handed to the socket."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(format_message(fields), self.address)
        except OSError as exc:
            if not self._warned:  # once: a vanished supervisor would otherwise flood the log
                log.warning("notify.failed", error=str(exc), socket=str(self.address))
                self._warned = True
            return False
        return True

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
        if self._sock is not None:
            self._sock.close()
            self._sock = None
