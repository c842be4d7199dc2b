"""`edged-control-plane serve` on embedded defaults: it supervises its own Mosquitto, which
never outlives it, whether it is stopped (SIGTERM) or killed (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from control_plane.local_broker import free_port
from tests.support.control_plane import CP, wait_for


def _broker_pids(data_dir: Path) -> list[int]:
    """Mosquitto processes running on this control plane's own config file."""
    config = str(data_dir / "broker" / "mosquitto.conf")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\x00")
            except OSError:
                continue
            if config.encode() in argv:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_supervised_broker_dies_with_the_control_plane(
    tmp_path: Path, mosquitto_binary: str, stop: signal.Signals
) -> None:
    """The local broker serves ingest while the control plane runs and is gone after it."""
    port = free_port()
    env = {
        **os.environ,
        "EDGED_CP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}",
        "EDGED_CP_DATA_DIR": str(tmp_path / "data"),
        "EDGED_CP_PORT": str(port),
    }
    subprocess.run([*CP, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([*CP, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30)
        assert len(_broker_pids(tmp_path / "data")) == 1
        server.send_signal(stop)
        code = server.wait(20)
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        wait_for(lambda: not _broker_pids(tmp_path / "data"), timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
        for pid in _broker_pids(tmp_path / "data"):
            os.kill(pid, signal.SIGKILL)
