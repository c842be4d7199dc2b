"""The cloud's side of fine-tuning on real parts: a real control plane (SQLite, a
dynamic-security Mosquitto) and a real enrolled `edged run` daemon with a tilted camera. The
operator labels the uncertain samples the device uploaded (`POST /v1/devices/{id}/labels`);
the labels reach the device over MQTT, and after a restart that lost its cursor, through its
poll; the device fine-tunes, installs and reports; switched off by the operator, it goes back
to the cloud's model."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
from tests.support.control_plane import ControlPlaneProcess, edged_enroll, wait_for
from tests.support.daemon import DaemonProcess, render_toml

pytestmark = [pytest.mark.train, pytest.mark.slow]
pytest.importorskip("scipy", reason="scipy (train extra) rotates the drifted digits")

BASE = "1.0.0"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def _if(value: Any, holds: Any) -> Any:
    """`value` when `holds(value)`, else None (for wait_for)."""
    return value if holds(value) else None


def _uploaded(api: Any, device: str) -> list[dict[str, Any]]:
    metas, cursor = [], None
    while True:
        params: dict[str, Any] = {"device_id": device, "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/samples", params=params).json()
        metas += [s["meta"] for s in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return metas


def _config(tmp_path: Path, short_dir: Path, state: Path, bundle: Path) -> Path:
    """A tilted camera at 150 Hz, generous upload budgets, fine-tuning after 250 labels."""
    config = tmp_path / "edged.toml"
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(state), "model": str(bundle)},
                "source": [
                    {
                        "kind": "replay",
                        "name": "camera",
                        "path": str(tmp_path / "camera.npz"),
                        "rate_hz": 150,
                        "loop": True,
                    }
                ],
                "gating": {"budget": {"samples_per_hour": 100000, "class_per_hour": 10000}},
                "update": {"watch_s": 3, "min_watch_samples": 30, "max_latency_ratio": 50.0},
                "finetune": {
                    "enabled": True,
                    "min_labels": 250,
                    "min_new_labels": 250,
                    "min_interval_s": 0,
                    # one job only: a drift-started second one (it would be rejected) could
                    # still run when the test switches personalisation off
                    "on_drift": False,
                },
                "telemetry": {"interval_s": 1},
                "outbox": {"min_free_mb": 0},
                "status": {"socket": str(short_dir / "status.sock")},
            }
        )
    )
    return config


def test_cloud_labels_reach_the_device_it_fine_tunes_and_the_switch_reverts_it(
    tmp_path: Path, short_dir: Path, mosquitto_binary: str, digits_build: Any
) -> None:
    from control_plane.toolchain.datasets import digits_dataset, rotated

    out, report = digits_build
    data = digits_dataset()
    x = rotated(np.concatenate([data.x_train, data.x_val]), 25)
    truth = np.concatenate([data.y_train, data.y_val])
    np.savez(tmp_path / "camera.npz", x=x)
    password = uuid.uuid4().hex
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
        enrolled = edged_enroll(cp.url, cp.enrollment_token("tilted"), state)
        assert enrolled.returncode == 0, enrolled.stderr
        config = _config(tmp_path, short_dir, state, out / report.bundle)
        with cp.api(cp.admin_token) as api:
            with DaemonProcess(config, tmp_path) as daemon:
                daemon.wait_ready()
                device = daemon.status()["device_id"]
                daemon.wait_for(
                    lambda: daemon.status()["counts"]["uploaded"] >= 300, 60, "300 uploads"
                )
                metas = wait_for(
                    lambda: _if(_uploaded(api, device), lambda m: len(m) >= 300), timeout=60
                )
                labels = [
                    {"sample_id": m["id"], "label": str(truth[int(m["ref"])])} for m in metas[:300]
                ]
                # over MQTT: 120 now
                posted = api.post(f"/v1/devices/{device}/labels", json={"labels": labels[:120]})
                assert posted.status_code == 202, posted.text
                assert posted.json() == {"first_seq": 1, "last_seq": 120, "count": 120}
                daemon.wait_for(
                    lambda: daemon.status()["finetune"]["cloud_seq"] == 120,
                    30,
                    "120 labels over MQTT",
                )
                status = daemon.status()["finetune"]
                assert status["labels"] == 120 and status["jobs"] == 0, status
                assert daemon.terminate() == 0
            # the device lost its cursor (and MQTT does not deliver old messages again); the
            # rest are posted while it is down: its poll at start fetches all of them
            (state / "finetune" / "state.json").unlink()
            posted = api.post(f"/v1/devices/{device}/labels", json={"labels": labels[120:]})
            assert posted.json()["last_seq"] == 300
            with DaemonProcess(config, tmp_path) as daemon:
                daemon.wait_ready()
                daemon.wait_for(
                    lambda: (
                        daemon.status()["model"]["base"] == BASE
                        and not daemon.status()["slots"]["trial"]
                    ),
                    300,  # a worker and a trial on a loaded machine
                    "the personalised model committed",
                )
                status = daemon.status()
                assert status["finetune"]["cloud_seq"] == 300
                assert status["finetune"]["labels"] == 300
                assert status["model"]["version"] == f"{BASE}+local.1"
                shown = wait_for(
                    lambda: _if(
                        api.get(f"/v1/devices/{device}/personalisation").json(),
                        lambda p: (p["last_report"] or {}).get("verdict") == "installed",
                    ),
                    timeout=30,
                )
                assert shown["effective"] is True and shown["last_seq"] == 300
                lineage = shown["last_report"]
                assert lineage["base"]["version"] == BASE and lineage["labels"] == 300
                assert lineage["holdout_candidate"] > lineage["holdout_current"]
                registry = wait_for(
                    lambda: _if(
                        api.get(f"/v1/devices/{device}").json(),
                        lambda d: d["model_version"] == f"{BASE}+local.1",
                    ),
                    timeout=30,
                )
                assert registry["model_version"] == f"{BASE}+local.1"

                switched = api.put(f"/v1/devices/{device}/personalisation", json={"enabled": False})
                assert switched.status_code == 200, switched.text
                # the commit is visible in the slots before its report (the commit's event is
                # stored first): wait for both
                daemon.wait_for(
                    lambda: (
                        (s := daemon.status())["model"]["version"] == BASE
                        and s["model"]["base"] is None
                        and not s["slots"]["trial"]
                        and (s["finetune"]["last"] or {}).get("verdict") == "reverted"
                    ),
                    120,
                    "the cloud's model back",
                )
                finetune = daemon.status()["finetune"]
                assert finetune["enabled"] is False and finetune["operator"] is False
                assert finetune["jobs"] == 1, finetune
                assert daemon.terminate() == 0
