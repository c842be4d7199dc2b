"""Several API replicas on one database and one broker: the shared subscription splits the
devices' traffic between them and every record is stored exactly once, and a revoked token
stops working on every replica within the token cache's bound."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from control_plane.local_broker import MosquittoBroker
from tests.integration.control_plane.conftest import BROKER_ADMIN, BROKER_ADMIN_PASSWORD
from tests.support.control_plane import ControlPlaneProcess, wait_for

STORED = re.compile(r'^edged_cp_ingest_records_total\{channel="telemetry"\} (\S+)$', re.M)


def _stored_by(replica: ControlPlaneProcess) -> float:
    with replica.api() as api:
        match = STORED.search(api.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def test_two_replicas_split_ingest_and_store_each_record_once(
    cp: ControlPlaneProcess,
    database_url: str,
    dynsec_mosquitto: MosquittoBroker,
    group: str,
    tmp_path: Path,
) -> None:
    """Two replicas in one ingest group: both store part of the load, none twice, and either
    one answers the API for devices the other enrolled. (The module's own control plane
    listens in its own group and races them: what it stores counts too.)"""
    shared = f"ingest-{uuid.uuid4().hex[:8]}"
    replicas = [
        ControlPlaneProcess(
            database_url,
            dynsec_mosquitto,
            BROKER_ADMIN,
            BROKER_ADMIN_PASSWORD,
            tmp_path / f"replica-{i}",
            ingest_group=shared,
        )
        for i in range(2)
    ]
    for replica in replicas:
        replica.admin_token = cp.admin_token
        replica.start()
    try:
        devices = [replicas[i % 2].enroll(tmp_path / f"dev-{i}", group) for i in range(4)]
        since = time.time() - 5
        before = _stored_by(cp)
        for device in devices:
            assert not device.connect().is_failure
        messages = 60
        for _ in range(messages):
            for device in devices:
                device.publish("telemetry", [{"rate_per_s": 1.0}] * 5)
        expected = messages * len(devices) * 5

        def total() -> int:
            with replicas[1].api(cp.admin_token) as api:
                series = api.get(
                    f"/v1/groups/{group}/telemetry", params={"since": since, "bucket_s": 3600}
                ).json()
            return sum(p["count"] for p in series["points"])

        try:
            wait_for(lambda: total() == expected, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"stored {total()} of {expected}") from exc
        time.sleep(0.5)
        assert total() == expected
        shares = [_stored_by(r) for r in replicas]
        assert all(s > 0 for s in shares), shares
        assert sum(shares) + _stored_by(cp) - before == expected  # each record stored once
        with replicas[0].api(cp.admin_token) as api:
            listed = api.get("/v1/devices", params={"group": group}).json()["items"]
        assert len(listed) == len(devices)
        _revocation_reaches_the_other_replica(cp, *replicas)
    finally:
        for device in devices:
            device.close()
        for replica in replicas:
            replica.stop()


def _revocation_reaches_the_other_replica(
    cp: ControlPlaneProcess, here: ControlPlaneProcess, there: ControlPlaneProcess
) -> None:
    """A token revoked through one replica is refused by it at once, and by a replica that
    has it cached within token_cache_s (2 s by default)."""
    made = cp.create_token("viewer")
    token = made["token"]
    with there.api(token) as api:
        assert api.get("/v1/devices").status_code == 200  # cached there now
    with here.api(cp.admin_token) as api:
        assert api.delete(f"/v1/tokens/{made['id']}").status_code == 204
    revoked = time.monotonic()
    with here.api(token) as api:
        assert api.get("/v1/devices").status_code == 401
    with there.api(token) as api:
        wait_for(lambda: api.get("/v1/devices").status_code == 401, timeout=10)
    # the cache's bound, plus slack for a slow machine
    assert time.monotonic() - revoked <= 2.0 + 3.0
