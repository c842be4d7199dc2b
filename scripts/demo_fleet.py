"""`make demo`, act 4: the fleet. The control plane on embedded defaults (SQLite, the local
disk, a supervised Mosquitto with dynamic security on loopback); an operator issues
enrollment tokens over REST; three `edged run` daemons enrol through the real flow (`edged
enroll`) and stream digits, one of them rotated; their telemetry, health and drift events
arrive through ingest and are read back through the API. Then the access rules: a viewer is
refused and audited, a quarantined device's data is counted and not stored, a decommissioned
device is dropped by the broker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from nacl.signing import SigningKey

from control_plane.local_broker import free_port
from control_plane.toolchain.datasets import rotated
from edged_formats.enrollment import prove_possession

BIN = Path(sys.executable).parent
GROUP = "demo-lab"
TELEMETRY_S = 2


def device_config(
    path: Path,
    bundle: Path,
    stream: Path,
    state: Path,
    *,
    rate_hz: float = 60,
    sections: str = "[drift]\nwindow = 100\nhop = 25\n",
) -> None:
    """A demo device's edged.toml: one looping replay camera, the status socket in its state
    directory; `sections` adds whole tables (the fleet's drift window, the update policy)."""
    path.write_text(
        f"""\
[device]
state_dir = {json.dumps(str(state))}
model = {json.dumps(str(bundle))}

[[source]]
kind = "replay"
name = "camera"
path = {json.dumps(str(stream))}
rate_hz = {rate_hz}
loop = true

{sections}
[outbox]
min_free_mb = 0

[telemetry]
interval_s = {TELEMETRY_S}

[status]
socket = {json.dumps(str(state / "status.sock"))}
"""
    )


def _streams(test_npz: Path, work: Path) -> list[Path]:
    x = np.load(test_npz)["x"]
    turned = rotated(x, 30)
    paths = []
    for name, data in (("clean", x), ("clean", x), ("rotated", np.concatenate([x[:150], turned]))):
        path = work / f"{name}-{len(paths)}.npz"
        np.savez(path, x=data)
        paths.append(path)
    return paths


def read_status(path: Path) -> dict[str, Any] | None:
    """What `edged status --json` prints: the daemon's answer on its unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            data = b"".join(iter(lambda: sock.recv(65536), b""))
    except OSError:
        return None
    status: dict[str, Any] = json.loads(data)
    return status


def enrol_device(
    api: httpx.Client, url: str, group: str, tags: list[str], state: Path, env: dict[str, str]
) -> str:
    """A one-time enrollment token from the API, then `edged enroll`; the new device id."""
    token = api.post("/v1/enrollment-tokens", json={"group": group, "tags": tags})
    _run(
        str(BIN / "edged"),
        "enroll",
        "--url",
        url,
        "--token",
        token.json()["token"],
        "--state-dir",
        str(state),
        env=env,
    )
    return str(json.loads((state / "enrollment.json").read_text())["device_id"])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"demo failed: {what} within {timeout:.0f} s")


def _run(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo step failed: {' '.join(args)}")
    return result.stdout.strip()


def fleet_act(bundle: Path, test_npz: Path, out: Path) -> None:
    print(
        "\n== cloud: edged-control-plane on embedded defaults (SQLite, local disk, a "
        "supervised Mosquitto with dynamic security)",
        flush=True,
    )
    work = out / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "EDGED_CP_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'cp.db'}",
        "EDGED_CP_DATA_DIR": str(work / "cp-data"),
        "EDGED_CP_PORT": str(port),
    }
    cp_bin = str(BIN / "edged-control-plane")
    print("  $ edged-control-plane migrate")
    print("  " + _run(cp_bin, "migrate", env=env))
    admin = _run(cp_bin, "create-token", "--name", "demo-admin", "--role", "admin", env=env)
    print("  $ edged-control-plane create-token --name demo-admin --role admin   -> edcp_…")
    url = f"http://127.0.0.1:{port}"
    daemons: list[subprocess.Popen[bytes]] = []
    with open(work / "control-plane.log", "wb") as cp_log:
        server = subprocess.Popen(
            [cp_bin, "serve"], env=env, stdout=cp_log, stderr=subprocess.STDOUT
        )
        try:
            api = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=10
            )
            ready = _wait(lambda: _ready(url), 30, "the control plane was not ready")
            print(f"  $ edged-control-plane serve   -> {url}/readyz: {ready}")
            _enrol_and_run(api, url, bundle, _streams(test_npz, work), work, env, daemons)
            _watch(api)
            _access_rules(api, url, daemons)
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


def _ready(url: str) -> str | None:
    try:
        response = httpx.get(f"{url}/readyz", timeout=1)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _enrol_and_run(
    api: httpx.Client,
    url: str,
    bundle: Path,
    streams: list[Path],
    work: Path,
    env: dict[str, str],
    daemons: list[subprocess.Popen[bytes]],
) -> None:
    print("\n== operator: one-time enrollment tokens; three devices enrol and start")
    for index, stream in enumerate(streams):
        grant = api.post(
            "/v1/enrollment-tokens", json={"group": GROUP, "tags": [f"cam-{index}"], "ttl_s": 600}
        )
        token = grant.json()["token"]
        state = work / f"device-{index}"
        print(f"  POST /v1/enrollment-tokens -> {grant.status_code}, expires in 600 s")
        shown = _run(
            str(BIN / "edged"),
            "enroll",
            "--url",
            url,
            "--token",
            token,
            "--state-dir",
            str(state),
            env=env,
        )
        print(f"  device {index}: $ edged enroll --url {url} --token edenr_…\n    {shown}")
        config = work / f"device-{index}.toml"
        device_config(config, bundle, stream, state)
        log = open(work / f"device-{index}.log", "wb")  # noqa: SIM115 - lives with the daemon
        daemons.append(
            subprocess.Popen(
                [str(BIN / "edged"), "run", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        print(f"    $ edged run --config {config.name}   ({stream.stem.split('-')[0]} digits)")
    intruder = SigningKey.generate()  # a second device trying the last token again
    reused = httpx.post(
        f"{url}/v1/enroll",
        json={
            "token": token,
            "public_key": bytes(intruder.verify_key).hex(),
            "proof": prove_possession(intruder, token).hex(),
        },
    )
    print(
        f"  the last token again, from another key: {reused.status_code} {reused.json()['detail']}"
    )


def _devices(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/v1/devices", params={"group": GROUP}).json()["items"])


def _watch(api: httpx.Client) -> None:
    print(f"\n== the fleet through the API (telemetry every {TELEMETRY_S} s per device)")
    _wait(
        lambda: all(d["last_health_at"] for d in _devices(api)) and len(_devices(api)) == 3,
        60,
        "telemetry from all three devices did not arrive",
    )
    since = time.time() - 60
    for _ in range(4):
        time.sleep(TELEMETRY_S)
        cells = []
        for device in _devices(api):
            series = api.get(
                f"/v1/devices/{device['id']}/telemetry",
                params={"metric": "uncertain_share", "since": since, "bucket_s": 3600},
            ).json()["points"]
            rate = api.get(
                f"/v1/devices/{device['id']}/telemetry",
                params={"metric": "rate_per_s", "since": time.time() - 10, "bucket_s": 10},
            ).json()["points"]
            drift = api.get(f"/v1/devices/{device['id']}/drift").json()
            psi = (drift["summary"] or {}).get("confidence_psi", 0.0)
            now_rate = rate[-1]["avg"] if rate else 0.0
            share = series[-1]["avg"] if series else 0.0
            cells.append(
                f"{device['id'][-6:]} {'on ' if device['online'] else 'off'} "
                f"{now_rate:5.1f}/s unc {share:4.0%} psi {psi:5.2f} "
                f"ev {len(drift['events'])}"
            )
        print("  " + " | ".join(cells), flush=True)
    devices = _devices(api)
    first = devices[0]
    health = api.get(f"/v1/devices/{first['id']}/health").json()["health"]
    print(
        f"  GET /v1/devices/{first['id']}: model {first['model_name']} "
        f"{first['model_version']}, software {first['software_version']}, online "
        f"{first['online']}; health rss {health['proc_rss_mb']} MB, cpu "
        f"{health['proc_cpu_percent']} %"
    )
    drift_events = _wait(
        lambda: api.get("/v1/events", params={"group": GROUP, "name": "drift"}).json()["items"],
        60,
        "no drift event arrived",
    )
    event = drift_events[0]
    print(
        f"  GET /v1/events?name=drift: {len(drift_events)} from "
        f"{sorted({e['device_id'][-6:] for e in drift_events})}; first: "
        f"{event['body']['kind']} score {event['body']['score']} after "
        f"{event['body']['samples']} samples"
    )


def _access_rules(api: httpx.Client, url: str, daemons: list[subprocess.Popen[bytes]]) -> None:
    print("\n== access: roles, scope, quarantine, decommission")
    devices = _devices(api)
    viewer = api.post("/v1/tokens", json={"name": "auditor", "role": "viewer"}).json()["token"]
    refused = httpx.post(
        f"{url}/v1/devices/{devices[0]['id']}/quarantine",
        headers={"Authorization": f"Bearer {viewer}"},
    )
    print(f"  viewer POST .../quarantine -> {refused.status_code} {refused.json()['detail']}")
    entry = api.get("/v1/audit", params={"outcome": "denied", "limit": 1}).json()["items"][0]
    print(
        f"  audit: {entry['actor']} {entry['action']} -> {entry['outcome']} from {entry['source']}"
    )
    target = devices[1]["id"]
    before = _stored(api, target)
    api.post(f"/v1/devices/{target}/quarantine")
    rejected = _wait(
        lambda: {
            r["reason"]: r["count"]
            for r in api.get("/v1/ingest/rejections", params={"device_id": target}).json()["items"]
        }.get("quarantined"),
        30,
        "no quarantined message was counted",
    )
    after = _stored(api, target)
    print(
        f"  quarantine {target}: {rejected} telemetry message(s) refused and counted; rows "
        f"stored before {before}, after {after}"
    )
    gone = devices[2]["id"]
    api.post(f"/v1/devices/{gone}/decommission")
    time.sleep(TELEMETRY_S + 1)
    listed = api.get(f"/v1/devices/{gone}").json()
    print(
        f"  decommission {gone}: status {listed['status']}, online {listed['online']}; its "
        "broker account is deleted (the session is dropped, logins refused)"
    )


def _stored(api: httpx.Client, device: str) -> int:
    points = api.get(
        f"/v1/devices/{device}/telemetry", params={"since": time.time() - 3600, "bucket_s": 3600}
    ).json()["points"]
    return sum(p["count"] for p in points)
