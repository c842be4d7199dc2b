"""A real `edged run` process under test, with systemd's side of the notify protocol.

    with DaemonProcess(config_path, tmp_path, watchdog_s=2) as daemon:
        daemon.wait_ready()
        daemon.status()                # over the daemon's unix socket, as `edged status` does
        daemon.terminate()             # SIGTERM; returns the exit code

The harness binds the NOTIFY_SOCKET datagram socket itself and records every notification
(READY=1, STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1), as systemd would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["DaemonProcess", "render_toml"]

EDGED = [sys.executable, "-m", "edged.cli"]


class DaemonProcess:
    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        watchdog_s: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config, self.workdir = config, workdir
        # unix socket paths are limited to 107 bytes: pytest's tmp_path may be longer
        self._sockdir = Path(tempfile.mkdtemp(prefix="edged-notify-"))
        self.notify_path = self._sockdir / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.notify_path))
        self._sock.settimeout(0.2)
        self.notifications: list[tuple[float, str]] = []
        self._lock = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": str(self.notify_path)}
        self.env.pop("JOURNAL_STREAM", None)
        self.env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT dumps every thread's stack into the log
        if watchdog_s is not None:
            self.env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [*EDGED, "run", "--config", str(self.config)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                for line in data.decode().splitlines():
                    self.notifications.append((time.monotonic(), line))
                self._lock.notify_all()

    # -- waiting ----------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"edged exited ({self.process.returncode}) before {what}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def notified(self, prefix: str) -> list[str]:
        with self._lock:
            return [line for _, line in self.notifications if line.startswith(prefix)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda: bool(self.notified("READY=1")), timeout, "READY=1")

    def status(self) -> dict[str, Any]:
        path = self._status_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path)
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        return json.loads(data)  # type: ignore[no-any-return]

    def _status_socket(self) -> str:
        import tomllib

        config = tomllib.loads(self.config.read_text())
        return str(config["status"]["socket"])

    # -- signals ----------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code; a daemon that does not stop within `timeout`
        fails the test with its threads' stacks and the end of its log."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(10)
            raise AssertionError(
                f"edged did not stop within {timeout:g} s of SIGTERM:\n{self.log()[-12000:]}"
            ) from None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._closed = True
        self._sock.close()
        self._reader.join(2)
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_toml(config: dict[str, Any], prefix: str = "") -> str:
    """A TOML document from nested dicts; lists of dicts become arrays of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not _is_table(v)]
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += ["", f"[{name}]", render_toml(value, f"{name}.")]
        elif _is_table(value):
            for item in value:
                lines += ["", f"[[{name}]]", render_toml(item, f"{name}.")]
    return "\n".join(lines).strip() + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )
