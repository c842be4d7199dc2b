"""The systemd notify protocol (sd_notify) for a `Type=notify` / `Type=notify-reload` unit.

Messages are `KEY=value` lines in one datagram sent to `$NOTIFY_SOCKET`: a filesystem path,
or a name in Linux's abstract namespace written with a leading '@'. Without NOTIFY_SOCKET
(run from a shell, under tests) every method is a cheap no-op. A failed send never raises
into the daemon: the first failure of an outage is logged at warning, the rest at debug.

The watchdog applies when WATCHDOG_USEC is a positive integer and WATCHDOG_PID is unset or
this process's pid; ping it every `watchdog_interval_s` (half the timeout, as systemd
recommends). After `reloading()` the daemon must call `ready()` again once the reload is
done, or systemd (>= 253, `Type=notify-reload`) considers the reload still running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    """A value may not contain a newline: it would start a new KEY=value assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify datagrams over one socket kept open for the daemon's lifetime."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = self._parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = self._parse_watchdog(env)
        self._sock: socket.socket | None = None
        self._failing = False

    @staticmethod
    def _parse_address(value: str) -> str | None:
        if value.startswith("/"):
            return value
        if value.startswith("@") and len(value) > 1:
            return "\0" + value[1:]
        if value:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", value)
        return None

    @staticmethod
    def _parse_watchdog(env: Mapping[str, str]) -> int | None:
        pid = env.get("WATCHDOG_PID", "")
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            if pid and int(pid) != os.getpid():
                return None
        except ValueError:
            return None
        return usec if usec > 0 else None

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given at all."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog()`: half of WATCHDOG_USEC, or None without a watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """A one-line human status shown by `systemctl status`."""
        self._send(None, text)

    def watchdog(self) -> None:
        """Keep-alive ping; a no-op when the unit has no watchdog for this process."""
        if self.watchdog_interval_s is not None:
            self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> None:
        """A reload (SIGHUP) has begun; stamped with CLOCK_MONOTONIC as systemd >= 253 wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; a later message reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, state: str | None, status: str | None) -> None:
        if self._address is None:
            return
        lines = [state] if state else []
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a stuck systemd must never stall the loop
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "systemd notify failed, message dropped: %s", exc)
            self._failing = True
        else:
            self._failing = False
