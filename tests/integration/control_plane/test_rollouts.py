"""Staged rollouts against a real control plane, a real dynamic-security Mosquitto and both
SQL backends: enrolled devices are told over MQTT, ask the device route, and report ota.*
events as signed records, the way the daemon does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from control_plane.local_broker import MosquittoBroker
from tests.integration.control_plane.conftest import BROKER_ADMIN, BROKER_ADMIN_PASSWORD
from tests.support.control_plane import (
    ControlPlaneProcess,
    DeviceClient,
    child_bundle,
    init_repository,
    wait_for,
)

BUNDLE = "digits_int8_io_int8"  # packed from TensorFlow's own converter output (tests/conftest)
MODEL = "digits-int8-io-int8"
OLD = {"target": f"models/{MODEL}/1.0.0.edb", "version": "1.0.0"}
NEW = {"target": f"models/{MODEL}/1.1.0.edb", "version": "1.1.0"}
REVOKED = {"target": f"models/{MODEL}/1.2.0.edb", "version": "1.2.0"}
GOOD = {
    "canary_agreement": 1.0,
    "confidence_before": 0.91,
    "confidence_after": 0.9,
    "latency_ratio": 1.05,
    "error_rate": 0.0,
}


@pytest.fixture(scope="module")
def cp(
    database_url: str, dynsec_mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """The module's control plane, with the rollout engine ticking every 0.2 s."""
    with ControlPlaneProcess(
        database_url,
        dynsec_mosquitto,
        BROKER_ADMIN,
        BROKER_ADMIN_PASSWORD,
        tmp_path_factory.mktemp("cp-rollouts"),
        rollout_tick_s="0.2",
    ) as process:
        yield process


@pytest.fixture(scope="module", autouse=True)
def registered(
    cp: ControlPlaneProcess, tf_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The registry holds OLD (1.0.0), NEW (1.1.0, parent 1.0.0) and a revoked 1.2.0."""
    init_repository(cp, tmp_path_factory.mktemp("offline") / "keys")
    parent = tf_bundles[BUNDLE].read_bytes()
    child = child_bundle(parent, "1.1.0")
    with cp.api(cp.admin_token) as api:
        for bundle in (parent, child, child_bundle(child, "1.2.0")):
            uploaded = api.post("/v1/models", content=bundle)
            assert uploaded.status_code == 201, uploaded.text
        revoked = api.post(f"/v1/models/{MODEL}/1.2.0/revoke")
        assert revoked.status_code == 200, revoked.text


@dataclass
class Device:
    """An enrolled device: listens on its cmd/update topic, polls, reports ota.* events."""

    cp: ControlPlaneProcess
    client: DeviceClient
    notices: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.client.device_id

    def listen(self) -> None:
        """Connect as the device and subscribe to its update notices (SUBACK awaited)."""
        assert not self.client.connect().is_failure
        paho = self.client.client
        assert paho is not None
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            with self._lock:
                self.notices.append(json.loads(message.payload))

        paho.on_message = on_message
        paho.on_subscribe = lambda *_args: subscribed.set()
        paho.subscribe(f"edged/v1/{self.id}/cmd/update", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.notices)

    def poll(self) -> tuple[int, Any]:
        with self.cp.api(self.client.api_token) as api:
            response = api.get("/v1/device/self/update")
        return response.status_code, response.json() if response.content else None

    def report(self, name: str, rollout: str, model: dict[str, str], **body: Any) -> None:
        if self.client.client is None:
            assert not self.client.connect().is_failure
        self.client.publish("events", [{"name": name, "rollout": rollout, **model, **body}])

    def install(self, rollout: str, model: dict[str, str] = NEW) -> None:
        """What a healthy update looks like from the control plane's side."""
        self.report("ota.started", rollout, model)
        self.report("ota.downloaded", rollout, model, via="full", bytes=61234)
        self.report("ota.committed", rollout, model, **GOOD)


def _fleet(cp: ControlPlaneProcess, tmp_path: Path, group: str, n: int) -> list[Device]:
    devices = [Device(cp, cp.enroll(tmp_path / f"d{i}", group)) for i in range(n)]
    return devices


def _close(devices: list[Device]) -> None:
    for device in devices:
        device.client.close()


def _create(cp: ControlPlaneProcess, token: str | None = None, **body: Any) -> Any:
    with cp.api(token or cp.admin_token) as api:
        response = api.post("/v1/rollouts", json={**NEW, **body})
    assert response.status_code == 201, response.text
    return response.json()


def _get(cp: ControlPlaneProcess, path: str, **params: Any) -> Any:
    with cp.api(cp.admin_token) as api:
        response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _until(
    cp: ControlPlaneProcess, rollout: str, check: Callable[[Any], bool], timeout: float = 20
) -> Any:
    """The rollout once `check` holds for it."""

    def ready() -> Any:
        current = _get(cp, f"/v1/rollouts/{rollout}")
        return current if check(current) else None

    return wait_for(ready, timeout)


def _stage_devices(cp: ControlPlaneProcess, rollout: str, stage: int) -> set[str]:
    items = _get(cp, f"/v1/rollouts/{rollout}/devices", stage=stage, limit=1000)["items"]
    return {d["device_id"] for d in items}


def _audit(cp: ControlPlaneProcess, target: str) -> list[dict[str, Any]]:
    items = _get(cp, "/v1/audit", target=target, limit=1000)["items"]
    return list(reversed(items))  # oldest first


def test_a_four_stage_rollout_advances_stage_by_stage_on_good_reports(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """1 device, 30 %, 60 %, 100 % of 10: each stage's devices are notified and answered on
    the device route, report a good install, and the next stage starts only after them; a
    device that never listens learns its assignment by polling; the end is audited."""
    devices = _fleet(cp, tmp_path, group, 10)
    deaf = devices[-1]  # never subscribes: its poll must cover the missed notice
    for device in devices[:-1]:
        device.listen()
    by_id = {d.id: d for d in devices}
    try:
        rollout = _create(
            cp,
            selector={"group": group},
            stages=[{"count": 1}, {"percent": 30}, {"percent": 60}, {"percent": 100}],
            criteria={"soak_s": 0.5},
        )
        rid = rollout["id"]
        assert rollout["devices"] == 10 and rollout["stage"] == 0
        assert [s["devices"] for s in rollout["stages"]] == [1, 2, 3, 4]
        done: set[str] = set()
        for number in (1, 2, 3, 4):
            current = _until(cp, rid, lambda r, n=number: r["stage"] == n)
            assert current["status"] == "running"
            members = _stage_devices(cp, rid, number)
            assert len(members) == current["stages"][number - 1]["devices"]
            for device_id in members:
                device = by_id[device_id]
                assert device.poll() == (200, {"rollout": rid, **NEW})
                if device is not deaf:
                    wait_for(lambda d=device: {"rollout": rid} in d.received())
            waiting = [d for d in devices if d.id not in done | members]
            if waiting:
                assert waiting[0].poll() == (204, None)
            for device_id in sorted(members):
                by_id[device_id].install(rid)
            done |= members
        finished = _until(cp, rid, lambda r: r["status"] == "completed")
        assert finished["states"] == {"committed": 10}
        assert [d.poll() for d in devices[:2]] == [(204, None), (204, None)]
        entries = [(e["actor"], e["action"]) for e in _audit(cp, rid)]
        assert entries[0][1] == "rollout.create"
        assert entries[1:] == [("system", "rollout.advance")] * 4 + [("system", "rollout.complete")]
        figures = _get(cp, f"/v1/rollouts/{rid}/devices", limit=1)["items"][0]["figures"]
        assert figures["latency_ratio"] == 1.05
    finally:
        _close(devices)


def test_a_failed_device_pauses_the_rollout_with_its_reason(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A stage-1 device rolling back (crash loop) pauses the rollout by default: nothing more
    is assigned, the reason is kept, the pause is audited as the system's; resuming accepts
    the stage and lets the next start."""
    devices = _fleet(cp, tmp_path, group, 4)
    try:
        rid = _create(
            cp,
            selector={"group": group},
            stages=[{"count": 1}, {"percent": 100}],
            criteria={"soak_s": 0},
        )["id"]
        _until(cp, rid, lambda r: r["stage"] == 1)
        (first,) = _stage_devices(cp, rid, 1)
        failing = next(d for d in devices if d.id == first)
        failing.report("ota.started", rid, NEW)
        failing.report("ota.rolled_back", rid, NEW, reason="crash loop: 3 starts")
        paused = _until(cp, rid, lambda r: r["status"] == "paused")
        assert paused["stage"] == 1 and paused["states"] == {"failed": 1, "pending": 3}
        assert paused["reasons"][0] == "stage 1: 1 of 1 devices rolled back (at most 0)"
        (row,) = _get(cp, f"/v1/rollouts/{rid}/devices", state="failed")["items"]
        assert (row["device_id"], row["last_event"], row["reason"]) == (
            first,
            "ota.rolled_back",
            "crash loop: 3 starts",
        )
        time.sleep(0.6)  # a few ticks: still paused, still nobody else assigned
        still = _get(cp, f"/v1/rollouts/{rid}")
        assert still["states"] == {"failed": 1, "pending": 3}
        assert still["reasons"] == paused["reasons"]  # later ticks keep why it paused
        assert all(d.poll() == (204, None) for d in devices if d.id != first)
        pause = [e for e in _audit(cp, rid) if e["action"] == "rollout.pause"]
        assert len(pause) == 1 and pause[0]["actor"] == "system"
        # resuming accepts the stage as it stands: the next one starts
        with cp.api(cp.new_token("operator")) as api:
            assert api.post(f"/v1/rollouts/{rid}/resume").status_code == 200
        resumed = _until(cp, rid, lambda r: r["stage"] == 2)
        assert resumed["states"] == {"failed": 1, "assigned": 3}
        resume = next(e for e in _audit(cp, rid) if e["action"] == "rollout.resume")
        assert resume["detail"]["accepted_stage"] == 1
    finally:
        _close(devices)


def test_a_stage_whose_devices_do_not_report_in_time_pauses(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """criteria.stage_timeout_s = 2: the stage-1 device never reports (it is offline), and
    2 s after the stage started the rollout pauses, saying how many reported, instead of
    waiting for ever; the next stage is not started."""
    devices = _fleet(cp, tmp_path, group, 2)
    try:
        rid = _create(
            cp,
            selector={"group": group},
            stages=[{"count": 1}, {"percent": 100}],
            criteria={"soak_s": 0, "stage_timeout_s": 2},
        )["id"]
        started = _until(cp, rid, lambda r: r["stage"] == 1)
        paused = _until(cp, rid, lambda r: r["status"] == "paused")
        assert paused["criteria"]["stage_timeout_s"] == 2
        assert paused["reasons"] == [
            "stage 1: only 0 of 1 devices reported within the 2 s stage timeout"
        ]
        assert paused["stage"] == 1 and paused["states"] == {"assigned": 1, "pending": 1}
        assert paused["updated_at"] - started["stage_started_at"] >= 2
    finally:
        _close(devices)


def test_a_failure_rolls_back_to_the_previous_target_when_asked(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """With on_failure rollback a refused install reverts the devices already updated: they
    are notified again, answered with the previous target, and once they report it the
    rollout ends rolled back (a recorded rollback stage) and answers no more."""
    devices = _fleet(cp, tmp_path, group, 4)
    for device in devices:
        device.listen()
    by_id = {d.id: d for d in devices}
    try:
        rid = _create(
            cp,
            selector={"group": group},
            stages=[{"count": 2}, {"percent": 100}],
            criteria={"soak_s": 0},
            on_failure="rollback",
        )["id"]  # the previous target: NEW's registered parent, OLD
        _until(cp, rid, lambda r: r["stage"] == 1)
        good, bad = (by_id[d] for d in sorted(_stage_devices(cp, rid, 1)))
        wait_for(lambda: {"rollout": rid} in good.received())
        good.install(rid)
        _until(cp, rid, lambda r: r["states"].get("committed") == 1)
        bad.report("ota.refused", rid, NEW, reason="targets metadata expired")
        rolling = _until(cp, rid, lambda r: r["status"] == "rolling_back")
        assert rolling["states"] == {"reverting": 1, "failed": 1, "pending": 2}
        assert rolling["history"][-1]["stage"] == "rollback"
        wait_for(lambda: good.received().count({"rollout": rid}) == 2)
        assert good.poll() == (200, {"rollout": rid, **OLD})
        assert bad.poll() == (204, None)
        good.report("ota.started", rid, OLD)
        good.report("ota.committed", rid, OLD)
        ended = _until(cp, rid, lambda r: r["status"] == "rolled_back")
        assert ended["states"] == {"reverted": 1, "failed": 1, "pending": 2}
        assert good.poll() == (204, None)
        actions = [(e["actor"], e["action"]) for e in _audit(cp, rid)]
        assert ("system", "rollout.rollback") in actions
        assert actions[-1] == ("system", "rollout.rolled_back")
        # the devices are free again: a new rollout may take them
        again = _create(cp, selector={"devices": [good.id]}, stages=[{"percent": 100}])
        assert again["devices"] == 1
    finally:
        _close(devices)


def test_operators_approve_pause_resume_and_abort_and_a_viewer_cannot(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A gated stage waits for approval; an operator approves, pauses, resumes and aborts,
    each audited; a viewer reads but is refused (403, audited); a device in an active
    rollout cannot join another; an aborted rollout answers no device."""
    devices = _fleet(cp, tmp_path, group, 3)
    operator, viewer = cp.new_token("operator"), cp.new_token("viewer")
    try:
        rid = _create(
            cp,
            operator,
            selector={"group": group},
            stages=[{"count": 1}, {"percent": 100, "require_approval": True}],
            criteria={"soak_s": 0},
        )["id"]
        _until(cp, rid, lambda r: r["stage"] == 1)
        (first,) = _stage_devices(cp, rid, 1)
        next(d for d in devices if d.id == first).install(rid)
        waiting = _until(cp, rid, lambda r: r["status"] == "awaiting_approval")
        assert waiting["reasons"] == ["stage 2 waits for an operator's approval"]
        with cp.api(viewer) as api:
            assert api.get(f"/v1/rollouts/{rid}").status_code == 200
            refused = api.post(f"/v1/rollouts/{rid}/approve")
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        with cp.api(operator) as api:
            taken = api.post("/v1/rollouts", json={
                **NEW, "selector": {"devices": [first]}, "stages": [{"percent": 100}],
            })  # fmt: skip
            assert taken.status_code == 409 and rid in taken.json()["detail"]
            assert api.post(f"/v1/rollouts/{rid}/approve").json()["status"] == "running"
            _until(cp, rid, lambda r: r["stage"] == 2)
            assert api.post(f"/v1/rollouts/{rid}/pause").json()["status"] == "paused"
            assert api.post(f"/v1/rollouts/{rid}/pause").status_code == 409
            assert api.post(f"/v1/rollouts/{rid}/resume").json()["status"] == "running"
            aborted = api.post(f"/v1/rollouts/{rid}/abort").json()
            assert aborted["status"] == "aborted" and aborted["finished_at"] is not None
            late = api.post(f"/v1/rollouts/{rid}/approve")
            assert late.status_code == 409
            assert late.json()["detail"] == f"rollout '{rid}' is aborted; cannot approve it"
        assert [d.poll() for d in devices] == [(204, None)] * 3
        entries = _audit(cp, rid)
        mine = [e["action"] for e in entries if e["role"] == "operator" and e["outcome"] == "ok"]
        assert mine == [
            "rollout.create",
            "rollout.approve",
            "rollout.pause",
            "rollout.resume",
            "rollout.abort",
        ]
        denied = _get(cp, "/v1/audit", outcome="denied", action=f"POST /v1/rollouts/{rid}/approve")
        assert [e["role"] for e in denied["items"]] == ["viewer"]
        assert ("system", "rollout.await_approval") in [(e["actor"], e["action"]) for e in entries]
        listed = _get(cp, "/v1/rollouts", status="aborted")["items"]
        assert rid in [r["id"] for r in listed]
    finally:
        _close(devices)


def test_an_operator_cannot_target_or_read_devices_outside_its_scope(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A group-scoped operator is refused (403, audited) a rollout over another group or one
    of its devices, and cannot see or act on a rollout reaching outside its groups."""
    other = f"{group}-other"
    mine = cp.enroll(tmp_path / "mine", group)
    theirs = cp.enroll(tmp_path / "theirs", other)
    scoped = cp.new_token("operator", groups=[group])
    body = {**NEW, "stages": [{"percent": 100}]}
    with cp.api(scoped) as api:
        by_group = api.post("/v1/rollouts", json={**body, "selector": {"group": other}})
        by_device = api.post(
            "/v1/rollouts",
            json={**body, "selector": {"devices": [mine.device_id, theirs.device_id]}},
        )
    assert [by_group.status_code, by_device.status_code] == [403, 403]
    assert by_group.json()["detail"].endswith(f"does not reach group '{other}'")
    denied = _get(cp, "/v1/audit", outcome="denied", action="rollout.create")["items"]
    assert {e["target"] for e in denied} >= {None, theirs.device_id}
    rid = _create(cp, selector={"group": other}, stages=[{"percent": 100}])["id"]
    with cp.api(scoped) as api:
        assert api.get(f"/v1/rollouts/{rid}").status_code == 403
        assert api.post(f"/v1/rollouts/{rid}/abort").status_code == 403
        assert rid not in [r["id"] for r in api.get("/v1/rollouts").json()["items"]]
        own = api.post("/v1/rollouts", json={**body, "selector": {"group": group}})
    assert own.status_code == 201 and own.json()["devices"] == 1


def test_the_device_route_answers_204_when_nothing_is_assigned(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """An enrolled device outside any rollout gets 204; without a device token, 401."""
    device = cp.enroll(tmp_path, group)
    with cp.api(device.api_token) as api:
        answer = api.get("/v1/device/self/update")
    assert answer.status_code == 204 and answer.content == b""
    with cp.api(cp.admin_token) as api:
        anonymous = api.get("/v1/device/self/update")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"


def test_bad_rollouts_are_refused_with_one_sentence(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Schema breaks are 422 naming the field; an unregistered target 404, a revoked one 409,
    a rollback with no previous target to fall back on 400; a selector matching nobody 400;
    an unknown device 404; an unknown rollout 404."""
    cp.enroll(tmp_path, group)
    one = {"selector": {"group": group}, "stages": [{"count": 1}]}
    cases = {
        "stages": {**one, "stages": [{"percent": 50}, {"percent": 10}]},
        "target": {**one, "target": "../etc/passwd"},
    }
    refused = {
        "unregistered": ({**one, "target": "models/other/1.0.0.edb"}, 404),
        "version": ({**one, "version": "9.9.9"}, 400),
        "revoked": ({**one, **REVOKED}, 409),
        "no previous": ({**one, **OLD, "on_failure": "rollback"}, 400),
    }
    with cp.api(cp.admin_token) as api:
        answers = {k: api.post("/v1/rollouts", json={**NEW, **v}) for k, v in cases.items()}
        others = {k: api.post("/v1/rollouts", json={**NEW, **v}) for k, (v, _) in refused.items()}
        nobody = api.post(
            "/v1/rollouts",
            json={**NEW, "selector": {"group": f"{group}-x"}, "stages": [{"count": 1}]},
        )
        unknown = api.post(
            "/v1/rollouts",
            json={
                **NEW,
                "selector": {"devices": ["dev-0000000000000000"]},
                "stages": [{"count": 1}],
            },
        )
        missing = api.get("/v1/rollouts/" + "0" * 32)
    assert {k: r.status_code for k, r in answers.items()} == {k: 422 for k in cases}
    assert "percents must increase" in answers["stages"].json()["detail"]
    assert {k: r.status_code for k, r in others.items()} == {k: c for k, (_, c) in refused.items()}
    assert others["revoked"].json()["detail"] == f"target '{REVOKED['target']}' is revoked"
    assert "has no registered, unrevoked parent" in others["no previous"].json()["detail"]
    assert answers["target"].json()["detail"].startswith("target:")
    assert nobody.status_code == 400
    assert unknown.status_code == 404
    assert (
        missing.status_code == 404
        and missing.json()["detail"] == f"no rollout with id '{'0' * 32}'"
    )


def test_an_api_only_replica_sends_update_notices_too(
    cp: ControlPlaneProcess,
    group: str,
    tmp_path: Path,
    database_url: str,
    dynsec_mosquitto: MosquittoBroker,
) -> None:
    """With the only running replica an API replica (`ingest = false`), a new rollout's
    devices are still told over MQTT, on the control plane's own broker login."""
    (device,) = _fleet(cp, tmp_path, group, 1)
    device.listen()
    cp.stop()
    try:
        with ControlPlaneProcess(
            database_url,
            dynsec_mosquitto,
            BROKER_ADMIN,
            BROKER_ADMIN_PASSWORD,
            tmp_path / "api-only",
            rollout_tick_s="0.2",
            ingest="false",
            data_dir=cp.env["EDGED_CP_DATA_DIR"],  # replicas share the repository's disk
        ) as replica:
            replica.admin_token = cp.admin_token
            rid = _create(replica, selector={"devices": [device.id]}, stages=[{"count": 1}])["id"]
            wait_for(lambda: {"rollout": rid} in device.received())
            device.cp = replica  # the module's process is down: ask the replica
            assert device.poll() == (200, {"rollout": rid, **NEW})
    finally:
        _close([device])
        cp.start()
