"""sd_notify against real AF_UNIX datagram sockets, as systemd would listen on them."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, named by NOTIFY_SOCKET; no watchdog variables."""
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_ready_sends_ready_and_status(listener: socket.socket) -> None:
    """ready() sends exactly READY=1 and STATUS in one datagram."""
    with Notifier() as notifier:
        notifier.ready("serving model 1.2")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving model 1.2"


def test_status_stopping_and_bare_ready(listener: socket.socket) -> None:
    """status() sends STATUS alone, stopping() STOPPING=1, ready() without status READY=1."""
    with Notifier() as notifier:
        notifier.status("uplink down")
        notifier.stopping("draining outbox")
        notifier.ready()
        assert listener.recv(4096) == b"STATUS=uplink down"
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=draining outbox"
        assert listener.recv(4096) == b"READY=1"


def test_status_newlines_cannot_inject_assignments(listener: socket.socket) -> None:
    """A newline inside a status is flattened, so it cannot smuggle in READY=1 or similar."""
    with Notifier() as notifier:
        notifier.status("bad\nREADY=1")
        assert listener.recv(4096) == b"STATUS=bad READY=1"


def test_reloading_carries_a_monotonic_timestamp(listener: socket.socket) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC taken from CLOCK_MONOTONIC now."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier() as notifier:
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = listener.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name reaches a socket bound in the abstract namespace."""
    name = f"edged-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with Notifier() as notifier:
            notifier.ready("up")
            assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_watchdog_interval_is_half_the_timeout(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG_USEC=30 s with our pid gives a 15 s interval and watchdog() sends WATCHDOG=1."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with Notifier() as notifier:
        assert notifier.watchdog_interval_s == 15.0
        notifier.watchdog()
        assert listener.recv(4096) == b"WATCHDOG=1"


def test_watchdog_without_pid_applies(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without WATCHDOG_PID the watchdog is ours."""
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    with Notifier() as notifier:
        assert notifier.watchdog_interval_s == 2.5


@pytest.mark.parametrize(
    ("usec", "pid"), [("30000000", "1"), ("0", ""), ("-5", ""), ("soon", ""), ("30", "x")]
)
def test_no_watchdog_for_another_pid_or_bad_value(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str, pid: str
) -> None:
    """Another process's WATCHDOG_PID, or a non-positive or garbled value, means no watchdog."""
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", pid)
    with Notifier() as notifier:
        assert notifier.watchdog_interval_s is None
        notifier.watchdog()
        notifier.status("marker")
        assert listener.recv(4096) == b"STATUS=marker"


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET nothing is opened, nothing raises, and there is no watchdog."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    with Notifier() as notifier:
        assert not notifier.enabled and notifier.watchdog_interval_s is None
        notifier.ready("up")
        notifier.status("x")
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()
        assert notifier._sock is None


def test_vanished_socket_logs_once_and_never_raises(
    listener: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When systemd's socket is gone sends are dropped, with one warning for the outage."""
    caplog.set_level(logging.DEBUG, logger="edged.notify")
    with Notifier() as notifier:
        notifier.ready("up")
        listener.close()
        (tmp_path / "n.sock").unlink()
        notifier.status("one")
        notifier.status("two")
        notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "message dropped" in warnings[0].getMessage()
