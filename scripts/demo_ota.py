"""`make demo`, act 5: a signed model update rolls out stage by stage (scripts/ota_story.py).

The control plane on embedded defaults; `keys init` makes root keys in an offline directory
(the server gets only the online keys) and `root install` trusts root v1; 1.0.0 and its
head-only fine-tune 1.1.0 are uploaded to the registry (signed targets, a zstd delta from
1.0.0). Four daemons enrol (they receive the root), three at tilted sites that see 5-9 and one
upright site that sees 0-4. A rollout of 1.1.0 starts with one tilted canary, then the rest:
each device is told over MQTT, walks the trust chain, fetches the patch, installs into its
inactive slot and runs the health trial. The upright site's confidence falls, so it rolls back
to 1.0.0 and the rollout pauses with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from demo_fleet import _ready, _run, _wait, device_config, enrol_device
from ota_story import MAX_CONFIDENCE_DROP, SITES, site_stream, tilted_update

from control_plane.local_broker import free_port
from edged_formats import read_bundle

BIN = Path(sys.executable).parent
GROUP = "demo-sites"


UPDATE_POLICY = f"""\
[update]
poll_s = 60
watch_s = 4
min_watch_samples = 40
max_confidence_drop = {MAX_CONFIDENCE_DROP}
"""


def ota_act(bundle: Path, test_npz: Path, out: Path) -> None:
    print("\n== signed model updates: keys, registry, staged rollout, health trial", flush=True)
    work = out / "ota"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "EDGED_CP_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'cp.db'}",
        "EDGED_CP_DATA_DIR": str(work / "cp-data"),
        "EDGED_CP_PORT": str(port),
        "EDGED_CP_ROLLOUT_TICK_S": "0.5",
    }
    cp = str(BIN / "edged-control-plane")
    _run(cp, "migrate", env=env)
    admin = _run(cp, "create-token", "--name", "demo-admin", "--role", "admin", env=env)
    offline = work / "offline-keys"
    root = _run(cp, "keys", "init", "--offline-dir", str(offline), env=env)
    _run(cp, "root", "install", root, env=env)
    server_keys = sorted(p.name for p in (work / "cp-data" / "keys").iterdir())
    print(f"  $ edged-control-plane keys init --offline-dir {offline.name}  -> {Path(root).name}")
    print(f"    offline (never on the server): {sorted(p.name for p in offline.iterdir())}")
    print(f"    server key dir: {server_keys}")
    url = f"http://127.0.0.1:{port}"
    daemons: list[subprocess.Popen[bytes]] = []
    with open(work / "control-plane.log", "wb") as cp_log:
        server = subprocess.Popen([cp, "serve"], env=env, stdout=cp_log, stderr=subprocess.STDOUT)
        try:
            api = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30
            )
            _wait(lambda: _ready(url), 30, "the control plane was not ready")
            targets = _publish(api, bundle)
            ids = _enrol_sites(api, url, bundle, test_npz, work, env, daemons)
            _roll_out(api, targets, ids)
        finally:
            for daemon in daemons:
                if daemon.poll() is None:
                    daemon.terminate()
            for daemon in daemons:
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            server.terminate()
            server.wait(20)
    print("  daemons and control plane stopped (SIGTERM)")


def _publish(api: httpx.Client, bundle: Path) -> dict[str, str]:
    base = bundle.read_bytes()
    tuned = tilted_update(base)
    targets = {}
    for data in (base, tuned):
        made = api.post("/v1/models", content=data, params={"channel": "stable"})
        if made.status_code != 201:
            raise SystemExit(f"demo failed: upload refused: {made.text}")
        model = made.json()
        targets[model["version"]] = model["target"]
        print(f"  POST /v1/models ({len(data):,} B) -> 201 {model['target']}")
    name = read_bundle(base).manifest.name
    detail = api.get(f"/v1/models/{name}/1.1.0").json()
    sizes = ", ".join(f"{p['length']:,} B" for p in detail["patches"]) or "none"
    print(
        f"  1.1.0: parent {detail['parent_version']} (head-only fine-tune for tilted cameras), "
        f"delta patch from 1.0.0: {sizes} of {detail['length']:,} B"
    )
    status = api.get("/v1/repository").json()
    roles = ", ".join(
        f"{r} v{status[r]['version']}" for r in ("root", "targets", "snapshot", "timestamp")
    )
    print(f"  GET /v1/repository: {roles}; the server signs {status['online_roles']}")
    return targets


def _enrol_sites(
    api: httpx.Client,
    url: str,
    bundle: Path,
    test_npz: Path,
    work: Path,
    env: dict[str, str],
    daemons: list[subprocess.Popen[bytes]],
) -> list[str]:
    with np.load(test_npz) as npz:
        x, y = npz["x"], npz["y"]
    ids = []
    print(f"\n== four sites enrol ({', '.join(SITES)}) and serve 1.0.0")
    for index, site in enumerate(SITES):
        state = work / f"site-{index}"
        ids.append(enrol_device(api, url, GROUP, [site], state, env))
        stream = work / f"site-{index}.npz"
        np.savez(stream, x=site_stream(site, x, y))
        config = work / f"site-{index}.toml"
        device_config(config, bundle, stream, state, rate_hz=40, sections=UPDATE_POLICY)
        log = open(work / f"site-{index}.log", "wb")  # noqa: SIM115 - lives with the daemon
        daemons.append(
            subprocess.Popen(
                [str(BIN / "edged"), "run", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        root = (state / "ota" / "metadata" / "root.json").exists()
        print(f"  site {index} ({site}): {ids[-1]}, trusted root from enrollment: {root}")
    _wait(
        lambda: all(d["model_version"] for d in _devices(api)) and len(_devices(api)) == 4,
        60,
        "the four devices did not report",
    )
    return ids


def _devices(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/v1/devices", params={"group": GROUP}).json()["items"])


def _roll_out(api: httpx.Client, targets: dict[str, str], ids: list[str]) -> None:
    print("\n== operator: roll 1.1.0 out: the tilted canary first, then everyone")
    made = api.post(
        "/v1/rollouts",
        json={
            "target": targets["1.1.0"],
            "version": "1.1.0",
            "selector": {"group": GROUP},
            "stages": [{"count": 1}, {"percent": 100}],
            "canaries": [ids[0]],
            "criteria": {"soak_s": 2, "max_confidence_drop": MAX_CONFIDENCE_DROP},
            "on_failure": "pause",
        },
    )
    if made.status_code != 201:
        raise SystemExit(f"demo failed: rollout refused: {made.text}")
    rid = made.json()["id"]
    print(f"  POST /v1/rollouts -> 201 {rid}")
    upright = ids[SITES.index("upright")]
    started = time.monotonic()
    last = ""

    def settled(rollout: dict[str, Any], versions: dict[str, str]) -> bool:
        """Paused (or done), nobody mid-install, the upright site back on 1.0.0."""
        stopped = rollout["status"] in ("paused", "completed", "rolled_back")
        return stopped and "installing" not in rollout["states"] and versions[upright] == "1.0.0"

    while time.monotonic() < started + 150:
        rollout = api.get(f"/v1/rollouts/{rid}").json()
        versions = {d["id"]: d["model_version"] for d in _devices(api)}  # as last reported
        line = (
            f"stage {rollout['stage']}/{len(rollout['stages'])} {rollout['status']:<9} "
            f"states {rollout['states']}  models "
            + " ".join(f"{SITES[i][0]}:{versions.get(d)}" for i, d in enumerate(ids))
        )
        if line != last:
            print(f"  {time.monotonic() - started:5.1f}s  {line}", flush=True)
            last = line
        if settled(rollout, versions):
            break
        time.sleep(0.5)
    else:
        raise SystemExit("demo failed: the upright site did not roll back and pause the rollout")
    for reason in rollout["reasons"]:
        print(f"  paused because: {reason}")
    events = api.get("/v1/events", params={"device_id": upright, "limit": 200}).json()["items"]
    for event in events:
        if event["name"].startswith("ota."):
            body = event["body"]
            extra = {
                k: body[k]
                for k in ("via", "bytes", "reason", "confidence_before", "confidence_after")
                if body.get(k) is not None
            }
            print(f"  upright site {event['name']}: {extra}")
    canary = [
        e
        for e in api.get("/v1/events", params={"device_id": ids[0], "limit": 200}).json()["items"]
        if e["name"] == "ota.downloaded"
    ]
    if canary:
        print(f"  canary downloaded via {canary[0]['body']['via']}: {canary[0]['body']['bytes']} B")
    if rollout["status"] != "paused":
        raise SystemExit(f"demo failed: the rollout is {rollout['status']}, not paused")
