"""Enrollment against a real control plane, broker and database: the happy path and every
refusal, each leaving nothing behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from edged.enrollment import enroll, load_enrollment
from edged.errors import EnrollmentError
from edged.identity import DeviceIdentity
from edged_formats.enrollment import prove_possession
from tests.support.control_plane import ControlPlaneProcess, edged_enroll, wait_for


def _request(identity: DeviceIdentity, token: str) -> dict[str, str]:
    return {
        "token": token,
        "public_key": identity.public_key_hex,
        "proof": prove_possession(identity.signing_key, token).hex(),
    }


def _device_count(cp: ControlPlaneProcess, group: str) -> int:
    with cp.api(cp.admin_token) as api:
        return len(api.get("/v1/devices", params={"group": group}).json()["items"])


def test_enrolled_device_is_registered_and_its_credentials_work(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A redeemed token yields a registered device whose broker login and API token work."""
    device = cp.enroll(tmp_path, group, tags=["site:lab", "cam"])
    assert device.device_id == device.identity.default_device_id()
    stored = load_enrollment(tmp_path)
    assert stored is not None and stored.group == group
    for secret in ("uplink.password", "api.token"):
        assert (tmp_path / secret).stat().st_mode & 0o777 == 0o600
    with cp.api(cp.admin_token) as api:
        listed = api.get("/v1/devices", params={"group": group}).json()["items"]
    assert [d["id"] for d in listed] == [device.device_id]
    assert listed[0]["tags"] == ["cam", "site:lab"]
    assert listed[0]["public_key"] == device.identity.public_key_hex
    assert listed[0]["status"] == "active"
    assert not device.connect().is_failure
    try:
        device.publish("telemetry", [{"rate_per_s": 3.0}])
        with cp.api(cp.admin_token) as api:
            wait_for(lambda: api.get(f"/v1/devices/{device.device_id}").json()["last_seen"])
    finally:
        device.close()
    with cp.api(device.api_token) as api:
        me = api.get("/v1/device/self")
    assert me.status_code == 200 and me.json()["id"] == device.device_id


def test_a_token_enrols_one_device_only(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A second redemption of the same token is refused (410) and registers nothing."""
    token = cp.enrollment_token(group)
    first = DeviceIdentity.load_or_create(tmp_path / "a" / "device.key")
    enroll(cp.url, token, first, tmp_path / "a")
    second = DeviceIdentity.load_or_create(tmp_path / "b" / "device.key")
    with pytest.raises(EnrollmentError, match="already used"):
        enroll(cp.url, token, second, tmp_path / "b")
    assert not (tmp_path / "b" / "uplink.password").exists()
    assert _device_count(cp, group) == 1


def test_expired_unknown_and_unproven_requests_are_refused(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Expired (410), unknown (401), a proof by another key (400), an enrolled key (409)."""
    identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
    other = DeviceIdentity.load_or_create(tmp_path / "other.key")
    expiring = cp.enrollment_token(group, ttl_s=0.2)
    time.sleep(0.4)
    good = cp.enrollment_token(group)
    with httpx.Client(base_url=cp.url) as client:
        expired = client.post("/v1/enroll", json=_request(identity, expiring))
        unknown = client.post("/v1/enroll", json=_request(identity, "edenr_" + "x" * 40))
        stolen = _request(identity, good)
        stolen["proof"] = prove_possession(other.signing_key, good).hex()
        unproven = client.post("/v1/enroll", json=stolen)
        assert client.post("/v1/enroll", json=_request(identity, good)).status_code == 201
        again = client.post("/v1/enroll", json=_request(identity, cp.enrollment_token(group)))
    assert (expired.status_code, expired.json()["detail"]) == (
        410,
        "the enrollment token has expired",
    )
    assert (unknown.status_code, unknown.json()["detail"]) == (
        401,
        "the enrollment token is unknown",
    )
    assert unproven.status_code == 400
    assert unproven.json()["detail"] == "proof of possession does not verify with the offered key"
    assert again.status_code == 409 and "already enrolled" in again.json()["detail"]
    assert expired.headers["content-type"] == "application/problem+json"
    assert _device_count(cp, group) == 1


def test_malformed_enrollment_requests_get_one_sentence(cp: ControlPlaneProcess) -> None:
    """Bad JSON fields are refused with 422 and a problem document naming the field."""
    with httpx.Client(base_url=cp.url) as client:
        short_key = client.post(
            "/v1/enroll", json={"token": "edenr_abcdefgh", "public_key": "ab", "proof": "cd"}
        )
        extra = client.post(
            "/v1/enroll",
            json={
                "token": "edenr_abcdefgh",
                "public_key": "a" * 64,
                "proof": "b" * 128,
                "admin": True,
            },
        )
    assert short_key.status_code == 422
    assert short_key.json()["detail"].startswith("public_key:")
    assert extra.status_code == 422 and extra.json()["detail"].startswith("admin:")


def test_enrollment_needs_an_operator_token_to_issue(cp: ControlPlaneProcess, group: str) -> None:
    """Issuing enrollment tokens needs an operator; a viewer gets 403, nobody 401."""
    viewer = cp.new_token("viewer")
    with cp.api(viewer) as api:
        denied = api.post("/v1/enrollment-tokens", json={"group": group})
    with cp.api() as api:
        anonymous = api.post("/v1/enrollment-tokens", json={"group": group})
    assert denied.status_code == 403 and anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"


def test_edged_enroll_command(cp: ControlPlaneProcess, group: str, tmp_path: Path) -> None:
    """`edged enroll --url --token` stores the credentials; a refusal exits 1 with a sentence."""
    token = cp.enrollment_token(group)
    ok = edged_enroll(cp.url, token, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "enrolled as dev-" in ok.stdout
    again = edged_enroll(cp.url, token, tmp_path)
    assert again.returncode != 0
    assert "the enrollment token was already used" in again.stderr
    assert _device_count(cp, group) == 1


def test_one_address_is_slowed_down_after_its_limits(
    cp: ControlPlaneProcess, database_url: str, dynsec_mosquitto, tmp_path: Path
) -> None:
    """On a replica with enroll_per_minute = 3, auth_failures_per_minute = 4 and
    max_request_bytes = 64 KiB: a bigger body is 413 before anything else, declared or
    streamed (a bundle upload is bounded by max_bundle_bytes instead); the 4th enrollment
    attempt from one address within a minute is 429 with Retry-After, however good it is;
    after 4 refused tokens (operator or device) every token from that address, a valid one
    too, is 429 without being checked, so guessing stops there."""
    from tests.integration.control_plane.conftest import BROKER_ADMIN, BROKER_ADMIN_PASSWORD

    with ControlPlaneProcess(
        database_url,
        dynsec_mosquitto,
        BROKER_ADMIN,
        BROKER_ADMIN_PASSWORD,
        tmp_path / "limited",
        ingest="false",
        enroll_per_minute="3",
        auth_failures_per_minute="4",
        max_request_bytes=str(64 << 10),
    ) as limited:
        huge = {"token": "edenr_" + "x" * 40, "public_key": "ab" * 32, "pad": "y" * (100 << 10)}
        with limited.api() as api:
            declared = api.post("/v1/enroll", json=huge)
            streamed = api.post(
                "/v1/enroll",
                content=(b"z" * 4096 for _ in range(25)),
                headers={"content-type": "application/json"},
            )
        with limited.api(cp.admin_token) as api:
            bundle = api.post("/v1/models", content=b"not a bundle" * 10_000)
        assert [declared.status_code, streamed.status_code] == [413, 413], streamed.text
        assert declared.headers["content-type"] == "application/problem+json"
        assert bundle.status_code == 400, bundle.text  # read whole, refused as a bundle
        identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
        with limited.api() as api:
            tries = [
                api.post("/v1/enroll", json=_request(identity, f"edenr_guess-{i}"))
                for i in range(3)
            ]
            token = cp.enrollment_token("g-limits")
            throttled = api.post("/v1/enroll", json=_request(identity, token))
        assert [t.status_code for t in tries] == [401, 401, 401]
        assert throttled.status_code == 429, throttled.text
        assert throttled.headers["content-type"] == "application/problem+json"
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        assert "too many enrollment attempts from 127.0.0.1" in throttled.json()["detail"]
        assert _device_count(cp, "g-limits") == 0
        refused = []
        for i in range(2):
            with limited.api(f"edcp_wrong-{i}") as api:
                refused.append(api.get("/v1/devices").status_code)
            with limited.api(f"eddev_wrong-{i}") as api:
                refused.append(api.get("/v1/device/self").status_code)
        assert refused == [401, 401, 401, 401]
        with limited.api(cp.admin_token) as api:
            locked = api.get("/v1/devices")
        assert locked.status_code == 429, locked.text
        assert "too many failed token checks" in locked.json()["detail"]
    with cp.api(cp.admin_token) as api:  # another replica keeps its own count
        assert api.get("/v1/devices").status_code == 200


def test_enrollment_tokens_are_listed_and_a_leaked_one_revoked(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """An operator lists its group's enrollment tokens with their state and revokes one
    before it is used: redeeming it is then 410 and it shows as revoked; a used token
    cannot be revoked (409); another group's operator sees neither and may not revoke."""
    made = cp.create_token("operator", groups=[group])
    outsider = cp.new_token("operator", groups=[f"{group}-other"])
    with cp.api(made["token"]) as api:
        leaked, kept = (
            api.post("/v1/enrollment-tokens", json={"group": group}).json() for _ in range(2)
        )
        before = api.get("/v1/enrollment-tokens", params={"group": group}).json()["items"]
        revoked = api.delete(f"/v1/enrollment-tokens/{leaked['id']}")
    assert {t["id"]: t["state"] for t in before} == {leaked["id"]: "pending", kept["id"]: "pending"}
    assert all("token" not in t and "token_hash" not in t for t in before)
    assert revoked.status_code == 204
    identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
    with httpx.Client(base_url=cp.url) as client:
        refused = client.post("/v1/enroll", json=_request(identity, leaked["token"]))
        enrolled = client.post("/v1/enroll", json=_request(identity, kept["token"]))
    assert (refused.status_code, refused.json()["detail"]) == (
        410,
        "the enrollment token was revoked",
    )
    assert enrolled.status_code == 201
    with cp.api(made["token"]) as api:
        after = {t["id"]: t for t in api.get("/v1/enrollment-tokens").json()["items"]}
        used_again = api.delete(f"/v1/enrollment-tokens/{kept['id']}")
        missing = api.delete(f"/v1/enrollment-tokens/{'0' * 32}")
    assert after[leaked["id"]]["state"] == "revoked"
    assert after[leaked["id"]]["revoked_by"] == made["id"]
    assert after[kept["id"]]["state"] == "used"
    assert after[kept["id"]]["device_id"] == enrolled.json()["device_id"]
    assert used_again.status_code == 409 and missing.status_code == 404
    with cp.api(outsider) as api:
        seen = api.get("/v1/enrollment-tokens").json()["items"]
        foreign = api.delete(f"/v1/enrollment-tokens/{leaked['id']}")
    assert {leaked["id"], kept["id"]}.isdisjoint({t["id"] for t in seen})
    assert foreign.status_code == 403
    with cp.api(cp.admin_token) as api:
        audit = api.get("/v1/audit", params={"target": leaked["id"]}).json()["items"]
    assert {(e["action"], e["outcome"]) for e in audit} >= {
        ("enrollment.revoke", "ok"),
        ("enrollment.revoke", "denied"),
    }
