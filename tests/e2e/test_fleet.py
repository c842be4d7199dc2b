"""The fleet loop on real parts: a real control plane (SQLite, a dynamic-security Mosquitto),
a real `edged run` daemon enrolled with `edged enroll`, and its telemetry read back through
the REST API; decommissioning cuts the daemon off at the broker."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
from tests.support.control_plane import ControlPlaneProcess, edged_enroll, wait_for
from tests.support.daemon import DaemonProcess, render_toml


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def test_enrolled_daemon_reports_through_the_api(
    tmp_path: Path, short_dir: Path, mosquitto_binary: str, tf_bundles, tf_reference
) -> None:
    """`edged enroll` then `edged run`: telemetry, model and health arrive through ingest and
    the API; after decommission the broker drops the daemon and refuses it."""
    import numpy as np

    password = uuid.uuid4().hex
    stream = tmp_path / "stream.npz"
    np.savez(stream, x=tf_reference["x"])
    with (
        MosquittoBroker(
            binary=mosquitto_binary,
            workdir=tmp_path / "broker",
            dynsec=DynsecBootstrap("cp-admin", password),
        ) as broker,
        ControlPlaneProcess(
            f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}",
            broker,
            "cp-admin",
            password,
            tmp_path / "cp",
        ) as cp,
    ):
        state = tmp_path / "state"
        token = cp.enrollment_token("e2e", tags=["bench-1"])
        enrolled = edged_enroll(cp.url, token, state)
        assert enrolled.returncode == 0, enrolled.stderr
        config = tmp_path / "edged.toml"
        config.write_text(
            render_toml(
                {
                    "device": {
                        "state_dir": str(state),
                        "model": str(tf_bundles["digits_int8_io_float"]),
                    },
                    "source": [
                        {
                            "kind": "replay",
                            "name": "digits",
                            "path": str(stream),
                            "rate_hz": 100,
                            "loop": True,
                        }
                    ],
                    "telemetry": {"interval_s": 1},
                    "outbox": {"min_free_mb": 0},
                    "status": {"socket": str(short_dir / "status.sock")},
                }
            )
        )
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            with cp.api(cp.admin_token) as api:
                device = wait_for(
                    lambda: next(
                        (
                            d
                            for d in api.get("/v1/devices", params={"group": "e2e"}).json()["items"]
                            if d["last_health_at"]
                        ),
                        None,
                    ),
                    timeout=30,
                )
                assert device["tags"] == ["bench-1"] and device["online"]
                assert device["model_name"] == "digits-int8-io-float"
                assert device["software_version"] == "0.1.0"
                health = api.get(f"/v1/devices/{device['id']}/health").json()["health"]
                assert health["proc_rss_mb"] > 10
                rate = wait_for(
                    lambda: [
                        p
                        for p in api.get(
                            f"/v1/devices/{device['id']}/telemetry",
                            params={"metric": "rate_per_s", "bucket_s": 3600},
                        ).json()["points"]
                        if p["max"] and p["max"] > 50
                    ],
                    timeout=30,
                )
                assert rate[0]["count"] >= 1
                gone = api.post(f"/v1/devices/{device['id']}/decommission")
                assert gone.status_code == 200
            status = wait_for(
                lambda: (s := daemon.status())["uplink"]["state"] != "connected" and s, timeout=15
            )
            assert status["uplink"]["state"] != "connected"
            assert daemon.terminate() == 0
