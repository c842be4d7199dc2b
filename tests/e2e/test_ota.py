"""Signed model updates on real parts: a control plane with a signed repository and the rollout
engine, its supervised Mosquitto, and enrolled `edged run` daemons that update themselves.

The story is scripts/ota_story.py: 1.1.0 is a head-only fine-tune for tilted cameras that
forgot the digits 0-4; the tilted sites commit it, the upright site's health trial rolls it
back, and the rollout pauses. Then every step of an update is interrupted with a real kill -9,
and a tampered artifact on the server is refused while the device keeps serving."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_plane.local_broker import DynsecBootstrap, MosquittoBroker
from edged.ota.slots import FAULT_ENV
from scripts.ota_story import MAX_CONFIDENCE_DROP, SITES, site_stream, tilted_update
from tests.support.control_plane import (
    ControlPlaneProcess,
    child_bundle,
    edged_enroll,
    init_repository,
    wait_for,
)
from tests.support.daemon import DaemonProcess, render_toml

pytestmark = [pytest.mark.slow, pytest.mark.train]


@dataclass
class Fleet:
    cp: ControlPlaneProcess
    root: Path
    v1: Path
    v2_target: str
    v3_target: str
    streams: dict[str, Path]

    def api(self) -> Any:
        return self.cp.api(self.cp.admin_token)

    def rollout(self, devices: list[str], version: str = "1.1.0", **body: Any) -> str:
        target = self.v2_target if version == "1.1.0" else self.v3_target
        payload = {
            "target": target,
            "version": version,
            "selector": {"devices": devices},
            "stages": [{"percent": 100}],
            "criteria": {"soak_s": 0, "max_confidence_drop": MAX_CONFIDENCE_DROP},
            **body,
        }
        with self.api() as api:
            response = api.post("/v1/rollouts", json=payload)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def rollout_state(self, rid: str) -> dict[str, Any]:
        with self.api() as api:
            return dict(api.get(f"/v1/rollouts/{rid}").json())

    def events(self, device: str) -> list[dict[str, Any]]:
        with self.api() as api:
            answer = api.get("/v1/events", params={"device_id": device, "limit": 500})
        assert answer.status_code == 200, answer.text
        return [{**e["body"], "name": e["name"]} for e in answer.json()["items"]]


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: str, digits_build: Any
) -> Iterator[Fleet]:
    """A control plane whose registry holds 1.0.0 (the factory model), 1.1.0 (with a patch
    from 1.0.0) and 1.2.0 (a patch from 1.1.0 only: a 1.0.0 device downloads it whole), signed
    by online keys under a root whose keys stay in a test directory."""
    work = tmp_path_factory.mktemp("ota-e2e")
    out, report = digits_build
    v1 = out / report.bundle
    password = uuid.uuid4().hex
    with (
        MosquittoBroker(
            binary=mosquitto_binary,
            workdir=work / "broker",
            dynsec=DynsecBootstrap("cp-admin", password),
        ) as broker,
        ControlPlaneProcess(
            f"sqlite+aiosqlite:///{work / 'cp.db'}",
            broker,
            "cp-admin",
            password,
            work / "cp",
            rollout_tick_s="0.3",
            rollout_event_lag_s="5",
        ) as cp,
    ):
        root = init_repository(cp, work / "offline")
        with cp.api(cp.admin_token) as api:
            targets = []
            v2 = tilted_update(v1.read_bytes())
            for bundle in (v1.read_bytes(), v2, child_bundle(v2, "1.2.0")):
                uploaded = api.post("/v1/models", content=bundle)
                assert uploaded.status_code == 201, uploaded.text
                targets.append(uploaded.json()["target"])
        with np.load(out / "digits-test.npz") as npz:
            x, y = npz["x"], npz["y"]
        streams = {}
        for site in set(SITES):
            streams[site] = work / f"{site}.npz"
            np.savez(streams[site], x=site_stream(site, x, y))
        yield Fleet(cp, root, v1, targets[1], targets[2], streams)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edged-") as d:
        yield Path(d)


def device_config(fleet: Fleet, state: Path, sockets: Path, site: str) -> Path:
    config = state.parent / f"{state.name}.toml"
    config.write_text(
        render_toml(
            {
                "device": {"state_dir": str(state), "model": str(fleet.v1)},
                "source": [
                    {
                        "kind": "replay",
                        "name": "camera",
                        "path": str(fleet.streams[site]),
                        "rate_hz": 40,
                        "loop": True,
                    }
                ],
                "update": {
                    "poll_s": 10,
                    "watch_s": 3,
                    "min_watch_samples": 40,
                    "max_confidence_drop": MAX_CONFIDENCE_DROP,
                    "max_latency_ratio": 50.0,  # the confidence is on trial here, not speed
                },
                "telemetry": {"interval_s": 1},
                "outbox": {"min_free_mb": 0},
                "status": {"socket": str(sockets / f"{state.name}.sock")},
            }
        )
    )
    return config


def enrolled(fleet: Fleet, state: Path, group: str) -> str:
    result = edged_enroll(fleet.cp.url, fleet.cp.enrollment_token(group), state)
    assert result.returncode == 0, result.stderr
    assert (state / "ota" / "metadata" / "root.json").read_bytes() == fleet.root.read_bytes()
    return str(json.loads((state / "enrollment.json").read_text())["device_id"])


def serving(daemon: DaemonProcess) -> tuple[str, dict[str, Any]]:
    status = daemon.status()
    return status["model"]["version"], status["slots"]


def consistent(state: Path, version: str) -> None:
    """Exactly one model serves: active is known good, no trial, and its file verifies."""
    slots = json.loads((state / "models" / "slots.json").read_text())
    assert slots["active"] == slots["known_good"] and slots.get("trial") is None, slots
    held = slots["slots"][slots["active"]]
    bundle = (state / "models" / slots["active"] / "bundle.edb").read_bytes()
    assert hashlib.sha256(bundle).hexdigest() == held["sha256"] and held["version"] == version


def test_rollout_commits_on_tilted_sites_and_pauses_on_the_upright_one(
    fleet: Fleet, tmp_path: Path, short_dir: Path
) -> None:
    """Stage 1 (a tilted canary) commits 1.1.0, stage 2 includes the upright site whose trial
    sees confidence fall and rolls back to 1.0.0; the rollout pauses with that reason, and the
    devices that committed keep 1.1.0 through a restart."""
    group = f"sites-{uuid.uuid4().hex[:6]}"
    daemons, ids = [], []
    try:
        for number, site in enumerate(SITES):
            state = tmp_path / f"site{number}"
            ids.append(enrolled(fleet, state, group))
            daemons.append(DaemonProcess(device_config(fleet, state, short_dir, site), tmp_path))
            daemons[-1].start()
        for daemon in daemons:
            daemon.wait_ready()
        rid = fleet.rollout(
            ids,
            selector={"group": group},
            stages=[{"count": 1}, {"percent": 100}],
            canaries=[ids[0]],
        )
        paused = wait_for(
            lambda: (r := fleet.rollout_state(rid))["status"] == "paused" and r, 120, 0.5
        )
        assert paused["stage"] == 2, paused
        assert paused["reasons"][0] == "stage 2: 1 of 3 devices rolled back (at most 0)", paused
        with fleet.api() as api:
            failed = api.get(f"/v1/rollouts/{rid}/devices", params={"state": "failed"}).json()
        (row,) = failed["items"]
        assert row["device_id"] == ids[SITES.index("upright")] and "confidence" in row["reason"]
        versions = [serving(d)[0] for d in daemons]
        upright = SITES.index("upright")
        assert versions[upright] == "1.0.0"
        committed = [v for i, v in enumerate(versions) if i != upright]
        assert committed.count("1.1.0") >= 2  # the canary, and whoever reported before the pause
        rolled = [e for e in fleet.events(ids[upright]) if e["name"] == "ota.rolled_back"]
        assert rolled and "confidence" in rolled[0]["reason"], rolled
        assert (
            rolled[0]["rollout"] == rid
            and rolled[0]["confidence_after"] < rolled[0]["confidence_before"]
        )
        downloads = [e for e in fleet.events(ids[0]) if e["name"] == "ota.downloaded"]
        assert (
            downloads[0]["via"] == "patch" and downloads[0]["bytes"] < 0.1 * fleet.v1.stat().st_size
        )
        # the canary keeps its committed model through a restart
        daemons[0].terminate()
        daemons[0] = DaemonProcess(daemons[0].config, tmp_path).start()
        daemons[0].wait_ready()
        assert serving(daemons[0])[0] == "1.1.0"
        consistent(tmp_path / "site0", "1.1.0")
    finally:
        for daemon in daemons:
            daemon.close()


STEPS = ("download", "patch", "stage.written", "staged", "switched", "swapped", "committed")


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_every_step_leaves_one_verified_model(
    fleet: Fleet, tmp_path: Path, short_dir: Path, step: str
) -> None:
    """The daemon freezes at `step` of an update and is killed with SIGKILL; the next start
    serves one consistent, verified model and the update completes."""
    state = tmp_path / "device"
    device = enrolled(fleet, state, f"kill-{uuid.uuid4().hex[:6]}")
    config = device_config(fleet, state, short_dir, "tilted")
    # 1.2.0 has no patch from the factory 1.0.0: the whole artifact is downloaded
    wanted = "1.2.0" if step == "download" else "1.1.0"
    with DaemonProcess(config, tmp_path, env={FAULT_ENV: step}) as daemon:
        daemon.wait_ready()
        fleet.rollout([device], version=wanted)
        assert daemon.process is not None
        pid = daemon.process.pid
        daemon.wait_for(lambda: _stopped(pid), 60, f"a freeze at {step}")
        os.kill(pid, signal.SIGKILL)
        daemon.process.wait(10)
    with DaemonProcess(config, tmp_path) as daemon:
        daemon.wait_ready()
        version, slots = serving(daemon)
        assert version in ("1.0.0", wanted) and slots["active"]["slot"] in ("a", "b")
        daemon.wait_for(
            lambda: serving(daemon)[0] == wanted and serving(daemon)[1]["trial"] is None,
            90,
            "the update to finish after the restart",
        )
        consistent(state, wanted)
        daemon.wait_for(
            lambda: not any((state / "ota" / "downloads").iterdir()), 30, "downloads pruned"
        )


def test_tampered_artifact_on_the_server_is_refused_and_nothing_changes(
    fleet: Fleet, tmp_path: Path, short_dir: Path
) -> None:
    """Bytes swapped under the repository (a compromised disk) fail the hash: the device
    reports ota.refused, keeps serving 1.0.0, and its slots are untouched."""
    state = tmp_path / "device"
    device = enrolled(fleet, state, f"tamper-{uuid.uuid4().hex[:6]}")
    config = device_config(fleet, state, short_dir, "tilted")
    repository = Path(fleet.cp.env["EDGED_CP_DATA_DIR"]) / "repository"
    served = [p for p in repository.rglob("*") if p.is_file() and p.name.endswith("1.1.0.edb")]
    patches = [p for p in repository.rglob("*") if p.is_file() and "patches" in p.parts]
    originals = {p: p.read_bytes() for p in served + patches}
    try:
        for path, data in originals.items():
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        with DaemonProcess(config, tmp_path) as daemon:
            daemon.wait_ready()
            before = {p.name: p.read_bytes() for p in (state / "models").rglob("*") if p.is_file()}
            rid = fleet.rollout([device])
            refused = wait_for(
                lambda: [e for e in fleet.events(device) if e["name"] == "ota.refused"], 60, 0.5
            )
            assert refused[0]["rollout"] == rid and "sha256" in refused[0]["reason"], refused
            assert serving(daemon)[0] == "1.0.0"
            after = {p.name: p.read_bytes() for p in (state / "models").rglob("*") if p.is_file()}
            assert after == before
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
