"""The systemd notify protocol (``sd_notify(3)``), without a dependency.

A :class:`Notifier` is built from an environment mapping. When systemd started the process
with ``Type=notify`` it sets ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Each
message is one datagram of ``KEY=VALUE`` lines on an ``AF_UNIX``/``SOCK_DGRAM`` socket.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op. Sending never raises: a
missing or broken socket is logged at DEBUG on the ``relay.sdnotify`` logger and the call
returns ``False``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("relay.sdnotify")

# A datagram to systemd is tiny; never let a stuck receiver block the event loop for long.
_SEND_TIMEOUT = 1.0


def _socket_address(value: str | None) -> str | None:
    """The address to ``sendto``: an absolute path, or ``\\0name`` for ``@name``."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    # systemd >= 253 may also hand out vsock: addresses; this relay does not speak them.
    log.debug("NOTIFY_SOCKET %r is neither a path nor an abstract @name; notifications are off", value)
    return None


def _one_line(text: str) -> str:
    """Keep a value on one line so it cannot smuggle in other ``KEY=`` assignments."""
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


class Notifier:
    """Tell systemd about readiness, status, watchdog liveness and shutdown.

    ``environ`` is the process environment (the caller passes ``os.environ``); it is read once
    here. ``pid`` defaults to this process's id and is compared with ``WATCHDOG_PID``.
    """

    def __init__(self, environ: Mapping[str, str], *, pid: int | None = None) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET"))
        self._pid = os.getpid() if pid is None else pid
        self._watchdog_usec = environ.get("WATCHDOG_USEC")
        self._watchdog_pid = environ.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given (i.e. systemd is listening)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the watchdog timeout), or ``None``.

        ``None`` when the watchdog is off, ``WATCHDOG_USEC`` is not a positive integer, or
        ``WATCHDOG_PID`` names another process.
        """
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.debug("ignoring WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != self._pid:
                    return None
            except ValueError:
                log.debug("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", self._watchdog_pid)
                return None
        return usec / 2 / 1_000_000

    def ready(self, status: str) -> bool:
        """``READY=1`` with a status line: start-up is complete."""
        return self.notify(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """``STATUS=...``: a free-form line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive and healthy."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1")

    def notify(self, message: str) -> bool:
        """Send one raw message; ``True`` if it was handed to the socket."""
        if self._address is None:
            return False
        data = message.encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(_SEND_TIMEOUT)
                    self._sock = sock
                self._sock.sendto(data, self._address)
            except OSError as exc:
                log.debug("sd_notify %r to %r failed: %s", message, self._address, exc)
                self._close_locked()
                return False
        return True

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled}, watchdog_interval={self.watchdog_interval()})"
