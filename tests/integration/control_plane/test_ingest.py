"""Ingest against a real broker, control plane and database: stored once, queryable, and
every bad message counted and refused while the consumer keeps going."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2

from edged_formats.wire import SIGNATURE_CONTEXT
from tests.support.control_plane import ControlPlaneProcess, DeviceClient, run_sql, wait_for


def _get(cp: ControlPlaneProcess, path: str, **params: Any) -> Any:
    with cp.api(cp.admin_token) as api:
        response = api.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def _telemetry_count(cp: ControlPlaneProcess, device: str, since: float) -> int:
    series = _get(cp, f"/v1/devices/{device}/telemetry", since=since, bucket_s=3600)
    return sum(p["count"] for p in series["points"])


def _rejections(cp: ControlPlaneProcess, device: str) -> dict[str, int]:
    rows = _get(cp, "/v1/ingest/rejections", device_id=device)["items"]
    return {r["reason"]: r["count"] for r in rows}


def _connected(cp: ControlPlaneProcess, path: Path, group: str) -> DeviceClient:
    device = cp.enroll(path, group)
    assert not device.connect().is_failure
    return device


def _signed(device: DeviceClient, topic: str, payload: dict[str, Any]) -> bytes:
    raw = cbor2.dumps(payload, canonical=True)
    signature = device.identity.signing_key.sign(
        SIGNATURE_CONTEXT + topic.encode() + b"\x00" + raw
    ).signature
    return cbor2.dumps({"p": raw, "s": signature}, canonical=True)


def test_telemetry_is_stored_once_and_downsampled(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Redelivered messages are stored once; the query buckets them server-side."""
    device = _connected(cp, tmp_path, group)
    start = time.time() - 100
    try:
        bodies = [
            {
                "rate_per_s": float(i),
                "health": {"proc_rss_mb": 40.0 + i, "temp_c": 50.0},
                "model": {"name": "digits", "version": "1.2.0"},
                "software_version": "9.9",
            }
            for i in range(20)
        ]
        first = device.message("telemetry", bodies[:10], created=start + 10)
        second = device.message("telemetry", bodies[10:], created=start + 70)
        topic = f"edged/v1/{device.device_id}/telemetry"
        for payload in (first, first, second, first, second):  # redeliveries
            assert device.publish_raw(topic, payload) == 0
        wait_for(lambda: _telemetry_count(cp, device.device_id, start) == 20)
        time.sleep(0.3)
        assert _telemetry_count(cp, device.device_id, start) == 20
        series = _get(
            cp,
            f"/v1/devices/{device.device_id}/telemetry",
            metric="rate_per_s",
            since=start,
            until=start + 120,
            bucket_s=60,
        )
        assert [(p["count"], p["min"], p["max"]) for p in series["points"]] == [
            (10, 0.0, 9.0),
            (10, 10.0, 19.0),
        ]
        assert series["points"][0]["avg"] == 4.5
        group_series = _get(
            cp,
            f"/v1/groups/{group}/telemetry",
            metric="rss_mb",
            since=start,
            until=start + 120,
            bucket_s=120,
        )
        assert sum(p["count"] for p in group_series["points"]) == 20  # epoch-aligned buckets
        registry = _get(cp, f"/v1/devices/{device.device_id}")
        assert (registry["model_name"], registry["model_version"]) == ("digits", "1.2.0")
        assert registry["software_version"] == "9.9" and registry["online"]
        health = _get(cp, f"/v1/devices/{device.device_id}/health")
        assert health["health"]["proc_rss_mb"] == 59.0
    finally:
        device.close()


def test_events_samples_and_presence(cp: ControlPlaneProcess, group: str, tmp_path: Path) -> None:
    """Drift events, uploaded samples and the online/offline state land where the API shows."""
    device = _connected(cp, tmp_path, group)
    try:
        device.publish("events", [{"name": "drift", "kind": "psi", "score": 0.4}])
        device.publish(
            "samples",
            [
                {
                    "id": 7,
                    "verdict": "uncertain",
                    "model": "digits 1",
                    "input": b"\x01\x02\x03",
                    "probabilities": [0.5, 0.5],
                }
            ],
        )
        device.publish("telemetry", [{"drift": {"psi": 0.31, "psi_alarm": True}}])
        wait_for(lambda: _get(cp, f"/v1/devices/{device.device_id}/drift")["events"])
        drift = _get(cp, f"/v1/devices/{device.device_id}/drift")
        assert drift["events"][0]["body"]["score"] == 0.4
        wait_for(lambda: _get(cp, f"/v1/devices/{device.device_id}/drift")["summary"])
        assert _get(cp, f"/v1/devices/{device.device_id}/drift")["summary"]["psi"] == 0.31
        fleet = _get(cp, f"/v1/groups/{group}/drift")["items"]
        assert [(d["device_id"], d["alarms"]) for d in fleet] == [(device.device_id, ["psi"])]
        samples = wait_for(lambda: _get(cp, "/v1/samples", device_id=device.device_id)["items"])
        assert samples[0]["verdict"] == "uncertain" and samples[0]["input_bytes"] == 3
        assert "input" not in samples[0]["meta"]
        events = _get(cp, "/v1/events", group=group, name="drift")["items"]
        assert [e["device_id"] for e in events] == [device.device_id]
        topic = f"edged/v1/{device.device_id}/state"
        offline = device.message("state", [{"online": False}])
        assert device.publish_raw(topic, offline) == 0
        wait_for(lambda: not _get(cp, f"/v1/devices/{device.device_id}")["online"])
    finally:
        device.close()


def test_a_device_cannot_speak_for_another(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """B's topic is refused to A by the broker (0x87); a payload naming B on A's own topic is
    refused by ingest. (A's signature on B's topic, past a broker that allowed it, is refused
    as bad_signature: tests/unit/control_plane/test_ingest_plan.py.)"""
    a = _connected(cp, tmp_path / "a", group)
    b = _connected(cp, tmp_path / "b", group)
    try:
        since = time.time() - 5
        forged = a.message("telemetry", [{"rate_per_s": 666.0}])
        assert a.publish_raw(f"edged/v1/{b.device_id}/telemetry", forged) == 0x87
        impersonation = _signed(
            a,
            f"edged/v1/{a.device_id}/telemetry",
            {
                "v": 1,
                "d": b.device_id,
                "c": "telemetry",
                "r": [["telemetry", 1, 99, time.time(), {"rate_per_s": 1.0}]],
            },
        )
        assert a.publish_raw(f"edged/v1/{a.device_id}/telemetry", impersonation) == 0
        b.publish("telemetry", [{"rate_per_s": 2.0}])  # B's own, genuine
        wait_for(lambda: _telemetry_count(cp, b.device_id, since) == 1)
        wait_for(lambda: _rejections(cp, a.device_id).get("mismatch") == 1)
        assert _telemetry_count(cp, a.device_id, since) == 0
        assert _telemetry_count(cp, b.device_id, since) == 1
    finally:
        a.close()
        b.close()


def test_bad_messages_are_counted_by_reason_and_never_stored(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Garbage CBOR, an unknown schema version, an oversized payload and a bad signature are
    counted per device and reason; a good message after them is still stored."""
    device = _connected(cp, tmp_path, group)
    topic = f"edged/v1/{device.device_id}/telemetry"
    since = time.time() - 5
    try:
        future = _signed(device, topic, {"v": 2, "d": device.device_id, "c": "telemetry", "r": []})
        good = device.message("telemetry", [{"rate_per_s": 1.0}])
        tampered = good[:-1] + bytes([good[-1] ^ 1])
        for payload in (b"\xff\x00garbage", future, b"\x00" * (1 << 20 + 1), tampered):
            assert device.publish_raw(topic, payload) == 0
        assert device.publish_raw(topic, good) == 0
        wait_for(lambda: _telemetry_count(cp, device.device_id, since) == 1)
        counts = wait_for(lambda: (c := _rejections(cp, device.device_id)) and len(c) >= 4 and c)
        assert counts == {"malformed": 1, "schema_version": 1, "oversized": 1, "bad_signature": 1}
        with cp.api(cp.admin_token) as api:
            metrics = api.get("/metrics").text
        assert 'edged_cp_ingest_rejected_total{reason="schema_version"}' in metrics
    finally:
        device.close()


def test_quarantine_refuses_data_and_decommission_revokes_credentials(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Quarantined data is counted, not stored; a decommissioned device is dropped by the
    broker, cannot log in again, and its API token stops working."""
    device = _connected(cp, tmp_path, group)
    since = time.time() - 5
    try:
        with cp.api(cp.admin_token) as api:
            assert api.post(f"/v1/devices/{device.device_id}/quarantine").status_code == 200
        device.publish("telemetry", [{"rate_per_s": 1.0}])
        wait_for(lambda: _rejections(cp, device.device_id).get("quarantined") == 1)
        with cp.api(cp.admin_token) as api:
            assert api.post(f"/v1/devices/{device.device_id}/release").status_code == 200
        device.publish("telemetry", [{"rate_per_s": 2.0}])
        wait_for(lambda: _telemetry_count(cp, device.device_id, since) == 1)
        with cp.api(cp.admin_token) as api:
            gone = api.post(f"/v1/devices/{device.device_id}/decommission")
            assert gone.status_code == 200 and gone.json()["status"] == "decommissioned"
            again = api.post(f"/v1/devices/{device.device_id}/release")
            assert again.status_code == 409
        wait_for(lambda: device.disconnects, timeout=5)
        device.close()
        refused = device.connect()
        assert refused is not None and refused.is_failure
        with cp.api(device.api_token) as api:
            assert api.get("/v1/device/self").status_code == 401
        assert _telemetry_count(cp, device.device_id, since) == 1
    finally:
        device.close()


def test_hostile_bodies_are_stored_and_a_refused_message_blocks_nothing(
    cp: ControlPlaneProcess, database_url: str, group: str, tmp_path: Path
) -> None:
    """Bytes, NaN and NUL in bodies are stored as JSON; a message the database itself refuses
    (a trigger here) is counted as unstorable while the messages around it are stored."""
    sqlite = database_url.startswith("sqlite")
    if sqlite:
        install = [
            "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.name = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poison refused'); END"
        ]
        remove = ["DROP TRIGGER poison"]
    else:
        install = [
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN IF NEW.name = 'poison' "
            "THEN RAISE EXCEPTION 'poison refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION "
            "refuse_poison()",
        ]
        remove = ["DROP TRIGGER poison ON events", "DROP FUNCTION refuse_poison()"]
    device = _connected(cp, tmp_path, group)
    run_sql(database_url, install)
    try:
        device.publish("events", [{"name": "odd\x00ity", "blob": b"\x00\x01", "x": float("nan")}])
        device.publish("events", [{"name": "poison"}])
        device.publish("events", [{"name": "after"}])
        names = wait_for(
            lambda: (
                sorted(
                    e["name"] for e in _get(cp, "/v1/events", device_id=device.device_id)["items"]
                )
                if len(_get(cp, "/v1/events", device_id=device.device_id)["items"]) == 2
                else None
            ),
            timeout=30,
        )
        assert names == ["after", "oddity"]
        stored = _get(cp, "/v1/events", device_id=device.device_id, name="oddity")["items"][0]
        assert stored["body"] == {"name": "odd\x00ity", "blob": {"$base64": "AAE="}, "x": None}
        wait_for(lambda: _rejections(cp, device.device_id).get("unstorable") == 1)
    finally:
        device.close()
        run_sql(database_url, remove)


def test_large_batches_are_stored_once_too(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Messages big enough for PostgreSQL's COPY path, redelivered, are stored exactly once
    and in the batch's own transaction."""
    device = _connected(cp, tmp_path, group)
    start = time.time() - 50
    try:
        payload = device.message("telemetry", [{"rate_per_s": 3.0}] * 150, created=start)
        topic = f"edged/v1/{device.device_id}/telemetry"
        for _ in range(3):
            assert device.publish_raw(topic, payload) == 0
        wait_for(lambda: _telemetry_count(cp, device.device_id, start - 1) == 150)
        second = device.message("telemetry", [{"rate_per_s": 4.0}] * 100, created=start + 1)
        assert device.publish_raw(topic, second) == 0
        wait_for(lambda: _telemetry_count(cp, device.device_id, start - 1) == 250)
        time.sleep(0.3)
        assert _telemetry_count(cp, device.device_id, start - 1) == 250
    finally:
        device.close()
