"""The control plane's side of on-device fine-tuning (docs/finetune.md) on real parts: labels
posted over HTTP reach a real MQTT subscriber logged in as the device and the device's own
poll; sequence numbers stay contiguous under concurrent posts; roles, scopes, validation and
decommissioned devices are refused; the operator's switch resolves device ?? group ?? on. On
SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.api.personalisation import MAX_MESSAGE_BYTES
from control_plane.local_broker import MosquittoBroker
from tests.integration.control_plane.conftest import BROKER_ADMIN, BROKER_ADMIN_PASSWORD
from tests.support.control_plane import ControlPlaneProcess, DeviceClient, wait_for


@dataclass
class Listener:
    """An enrolled device subscribed (SUBACK awaited) to its cmd/personalisation topic."""

    cp: ControlPlaneProcess
    client: DeviceClient
    raw: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.client.device_id

    def listen(self) -> Listener:
        assert not self.client.connect().is_failure
        paho = self.client.client
        assert paho is not None
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            with self._lock:
                self.raw.append(bytes(message.payload))

        paho.on_message = on_message
        paho.on_subscribe = lambda *_args: subscribed.set()
        paho.subscribe(f"edged/v1/{self.id}/cmd/personalisation", qos=1)
        assert subscribed.wait(10), "no SUBACK"
        return self

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(r) for r in self.raw]

    def poll(self, **params: Any) -> tuple[int, Any]:
        with self.cp.api(self.client.api_token) as api:
            response = api.get("/v1/device/self/personalisation", params=params)
        return response.status_code, response.json()


def _listener(cp: ControlPlaneProcess, tmp_path: Path, group: str) -> Listener:
    return Listener(cp, cp.enroll(tmp_path, group)).listen()


def _labels(n: int, prefix: str = "s") -> list[dict[str, str]]:
    return [{"sample_id": f"{prefix}-{i}", "label": str(i % 10)} for i in range(n)]


def _post(cp: ControlPlaneProcess, device_id: str, labels: Any, token: str | None = None) -> Any:
    with cp.api(token or cp.admin_token) as api:
        return api.post(f"/v1/devices/{device_id}/labels", json={"labels": labels})


def _get(cp: ControlPlaneProcess, path: str, **params: Any) -> Any:
    with cp.api(cp.admin_token) as api:
        response = api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _all_labels(cp: ControlPlaneProcess, device_id: str, limit: int = 100) -> list[Any]:
    """Every label of the device, following next_cursor."""
    items: list[Any] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        page = _get(cp, f"/v1/devices/{device_id}/labels", **params)
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _put(cp: ControlPlaneProcess, path: str, enabled: bool | None, token: str | None = None) -> Any:
    with cp.api(token or cp.admin_token) as api:
        return api.put(path, json={"enabled": enabled})


def _audit(cp: ControlPlaneProcess, **params: Any) -> list[dict[str, Any]]:
    return list(_get(cp, "/v1/audit", limit=1000, **params)["items"])


def test_posted_labels_reach_the_device_over_mqtt_and_its_poll_pages_them(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A post answers 202 with its seq range, is audited, arrives on cmd/personalisation as
    the contract's document, and the device's poll pages by `after` and `limit`."""
    device = _listener(cp, tmp_path, group)
    try:
        first = _post(cp, device.id, [{"sample_id": "1a-3f", "label": "7"}, *_labels(2)])
        assert first.status_code == 202, first.text
        assert first.json() == {"first_seq": 1, "last_seq": 3, "count": 3}
        expected = {
            "enabled": True,
            "labels": [
                {"seq": 1, "sample_id": "1a-3f", "label": "7"},
                {"seq": 2, "sample_id": "s-0", "label": "0"},
                {"seq": 3, "sample_id": "s-1", "label": "1"},
            ],
            "last_seq": 3,
        }
        wait_for(lambda: device.received() == [expected])
        assert device.poll() == (200, expected)

        second = _post(cp, device.id, _labels(2, "t"))
        assert second.json() == {"first_seq": 4, "last_seq": 5, "count": 2}
        wait_for(lambda: len(device.received()) == 2)
        assert [x["seq"] for x in device.received()[1]["labels"]] == [4, 5]

        status, newer = device.poll(after=3)
        assert status == 200 and [x["seq"] for x in newer["labels"]] == [4, 5]
        assert newer["last_seq"] == 5
        assert device.poll(after=5) == (200, {"enabled": True, "labels": [], "last_seq": 5})
        _, page = device.poll(after=1, limit=2)
        assert [x["seq"] for x in page["labels"]] == [2, 3] and page["last_seq"] == 5
    finally:
        device.client.close()
    listed = _all_labels(cp, device.id, limit=2)
    assert [x["seq"] for x in listed] == [1, 2, 3, 4, 5]
    assert listed[0]["sample_id"] == "1a-3f" and listed[0]["created_by"].startswith("test-admin")
    entries = _audit(cp, action="device.labels", target=device.id)
    assert [e["detail"]["first_seq"] for e in entries] == [4, 1]  # newest first
    assert all(e["outcome"] == "ok" for e in entries)


def test_a_large_post_is_split_into_messages_that_each_fit(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """1000 labels of long multi-byte text (about 600 kB of JSON) arrive in several
    messages, each at most 256 KiB, together every seq once and in order."""
    device = _listener(cp, tmp_path, group)
    try:
        labels = [{"sample_id": f"{i:04d}" + "€" * 124, "label": "ü" * 64} for i in range(1000)]
        assert _post(cp, device.id, labels).status_code == 202

        def all_arrived() -> bool:
            return sum(len(d["labels"]) for d in device.received()) >= 1000

        wait_for(all_arrived, timeout=20)
        with device._lock:
            sizes = [len(r) for r in device.raw]
        documents = device.received()
    finally:
        device.client.close()
    assert len(documents) >= 3 and max(sizes) <= MAX_MESSAGE_BYTES
    seqs = [x["seq"] for d in documents for x in d["labels"]]
    assert seqs == list(range(1, 1001))
    assert {d["last_seq"] for d in documents} == {1000}
    assert documents[0]["labels"][0]["sample_id"] == labels[0]["sample_id"]


def test_concurrent_posts_get_contiguous_sequence_numbers(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Forty posts from eight threads at once: every one is accepted, their ranges are
    disjoint, and together they cover 1..400 with each label under its own seq."""
    device = cp.enroll(tmp_path, group)

    def post(n: int) -> Any:
        response = _post(cp, device.device_id, _labels(10, f"p{n}"))
        assert response.status_code == 202, response.text
        return n, response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(40)))
    ranges = sorted((a["first_seq"], a["last_seq"], n) for n, a in answers)
    assert [(f, last) for f, last, _ in ranges] == [(1 + 10 * k, 10 + 10 * k) for k in range(40)]
    stored = _all_labels(cp, device.device_id, limit=1000)
    assert [x["seq"] for x in stored] == list(range(1, 401))
    by_seq = {x["seq"]: x["sample_id"] for x in stored}
    for first, _last, n in ranges:
        assert [by_seq[first + i] for i in range(10)] == [f"p{n}-{i}" for i in range(10)]
    status, document = Listener(cp, device).poll(after=395)
    assert status == 200 and document["last_seq"] == 400
    assert [x["seq"] for x in document["labels"]] == [396, 397, 398, 399, 400]


def test_roles_and_scopes_are_refused_and_audited(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """A viewer may read but not post or switch (403); an operator scoped to another group is
    refused the device and the group (403, audited with the target); nothing is stored."""
    other = f"{group}-other"
    device = cp.enroll(tmp_path, group)
    viewer = cp.new_token("viewer", groups=[group])
    outsider = cp.new_token("operator", groups=[other])
    path = f"/v1/devices/{device.device_id}"
    assert _post(cp, device.device_id, _labels(1), viewer).status_code == 403
    assert _put(cp, f"{path}/personalisation", False, viewer).status_code == 403
    with cp.api(viewer) as api:
        assert api.get(f"{path}/labels").status_code == 200
        assert api.get(f"{path}/personalisation").status_code == 200
    refused = _post(cp, device.device_id, _labels(1), outsider)
    assert refused.status_code == 403
    assert refused.json()["detail"].endswith(f"does not reach group '{group}'")
    assert _put(cp, f"{path}/personalisation", False, outsider).status_code == 403
    assert _put(cp, f"/v1/groups/{group}/personalisation", False, outsider).status_code == 403
    with cp.api(outsider) as api:
        assert api.get(f"{path}/labels").status_code == 403
        assert api.get(f"{path}/personalisation").status_code == 403
    assert _put(cp, f"/v1/groups/{other}/personalisation", True, outsider).status_code == 200

    denied = _audit(cp, outcome="denied", target=device.device_id)
    assert {e["action"] for e in denied} >= {
        "device.labels",
        "device.personalisation",
        "labels.read",
        "personalisation.read",
    }
    by_group = _audit(cp, outcome="denied", action="group.personalisation", target=group)
    assert len(by_group) == 1
    by_role = _audit(cp, outcome="denied", action=f"POST {path}/labels")
    assert len(by_role) == 1 and "needs 'operator'" in by_role[0]["detail"]["reason"]
    assert _all_labels(cp, device.device_id) == []
    shown = _get(cp, f"{path}/personalisation")
    assert shown["device"] is None and shown["group"] is None and shown["last_seq"] == 0


def test_bad_bodies_are_refused_with_422_and_unknown_devices_with_404(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """An empty list, 1001 entries, an overlong label or sample id, a NUL, an unknown field
    or a switch without `enabled` are 422; an unknown device 404; nothing is stored."""
    device = cp.enroll(tmp_path, group)
    bad = {
        "empty": [],
        "1001": _labels(1001),
        "long label": [{"sample_id": "a", "label": "x" * 65}],
        "long sample": [{"sample_id": "a" * 129, "label": "1"}],
        "empty label": [{"sample_id": "a", "label": ""}],
        "nul": [{"sample_id": "a\x00b", "label": "1"}],
        "extra field": [{"sample_id": "a", "label": "1", "weight": 2}],
        "no label": [{"sample_id": "a"}],
    }
    for name, labels in bad.items():
        response = _post(cp, device.device_id, labels)
        assert response.status_code == 422, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert _post(cp, device.device_id, _labels(1000)).status_code == 202  # the bound itself
    assert _post(cp, device.device_id, [{"sample_id": "a" * 128, "label": "é" * 64}]).json() == {
        "first_seq": 1001,
        "last_seq": 1001,
        "count": 1,
    }
    with cp.api(cp.admin_token) as api:
        no_switch = api.put(f"/v1/devices/{device.device_id}/personalisation", json={})
        not_bool = api.put(f"/v1/groups/{group}/personalisation", json={"enabled": "maybe"})
    assert [no_switch.status_code, not_bool.status_code] == [422, 422]
    assert Listener(cp, device).poll(limit=1001)[0] == 422
    missing = _post(cp, "dev-0000000000000000", _labels(1))
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no device with id 'dev-0000000000000000'"
    assert _put(cp, "/v1/devices/dev-0000000000000000/personalisation", True).status_code == 404
    assert len(_all_labels(cp, device.device_id, limit=1000)) == 1001


def test_the_switch_resolves_device_over_group_over_on_and_tells_the_devices(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """Effective = device ?? group ?? true, as the operator reads it, as the device polls it
    and as cmd/personalisation (labels: []) tells it; a group change reaches only devices that
    inherit; every change is audited; the newest finetune report is shown."""
    device = _listener(cp, tmp_path / "a", group)
    own = _listener(cp, tmp_path / "b", group)
    path = f"/v1/devices/{device.id}/personalisation"
    group_path = f"/v1/groups/{group}/personalisation"
    try:
        assert _put(cp, f"/v1/devices/{own.id}/personalisation", True).status_code == 200
        wait_for(lambda: len(own.received()) == 1)
        assert _get(cp, path) == {
            "device": None,
            "group": None,
            "effective": True,
            "last_seq": 0,
            "last_report": None,
        }
        steps = [  # (route, value) -> (device, group, effective)
            (group_path, False, (None, False, False)),
            (path, True, (True, False, True)),
            (group_path, None, (True, None, True)),
            (path, False, (False, None, False)),
            (path, None, (None, None, True)),
        ]
        told = 0  # messages the device should have had: its own changes, group ones it inherits
        for route, value, (mine, theirs, effective) in steps:
            answer = _put(cp, route, value)
            assert answer.status_code == 200, answer.text
            shown = _get(cp, path)
            assert (shown["device"], shown["group"], shown["effective"]) == (
                mine,
                theirs,
                effective,
            )
            assert device.poll() == (200, {"enabled": effective, "labels": [], "last_seq": 0})
            if route == group_path:
                inheriting = 1 if mine is None else 0
                assert answer.json() == {"group": group, "enabled": value, "devices": inheriting}
            if route == path or mine is None:
                told += 1
                wait_for(lambda n=told: len(device.received()) == n)
                assert device.received()[-1] == {"enabled": effective, "labels": [], "last_seq": 0}
        time.sleep(0.5)  # a stray group notice would have arrived by now
        assert len(device.received()) == told
        assert len(own.received()) == 1  # it decides for itself: group changes are not its own
        assert own.poll()[1]["enabled"] is True
        changes = _audit(cp, action="device.personalisation", target=device.id)
        assert [(e["detail"]["previous"], e["detail"]["to"]) for e in reversed(changes)] == [
            (None, True),
            (True, False),
            (False, None),
        ]
        assert len(_audit(cp, action="group.personalisation", target=group)) == 2

        device.client.publish("events", [{"name": "finetune", "verdict": "rejected"}])
        device.client.publish("events", [{"name": "finetune", "verdict": "accepted", "n": 3}])
        report = wait_for(
            lambda: (r := _get(cp, path)["last_report"]) and r.get("verdict") == "accepted" and r
        )
        assert report["n"] == 3
    finally:
        device.client.close()
        own.client.close()


def test_a_decommissioned_device_is_refused_and_its_token_is_dead(
    cp: ControlPlaneProcess, group: str, tmp_path: Path
) -> None:
    """After decommissioning: labels and switch changes are 409, its poll is 401, and its
    labels stay readable to operators."""
    device = cp.enroll(tmp_path, group)
    assert _post(cp, device.device_id, _labels(2)).status_code == 202
    with cp.api(cp.admin_token) as api:
        assert api.post(f"/v1/devices/{device.device_id}/decommission").status_code == 200
    refused = _post(cp, device.device_id, _labels(1))
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"device '{device.device_id}' is decommissioned"
    assert _put(cp, f"/v1/devices/{device.device_id}/personalisation", False).status_code == 409
    assert Listener(cp, device).poll()[0] == 401
    assert [x["seq"] for x in _all_labels(cp, device.device_id)] == [1, 2]


def test_a_broker_that_is_down_does_not_fail_a_post(
    cp: ControlPlaneProcess, dynsec_mosquitto: MosquittoBroker, group: str, tmp_path: Path
) -> None:
    """With the broker stopped a post is still 202 and the device's poll has the labels;
    once the broker is back, posts are delivered over MQTT again."""
    device = cp.enroll(tmp_path, group)
    dynsec_mosquitto.stop()
    try:
        answer = _post(cp, device.device_id, _labels(3))
    finally:
        dynsec_mosquitto.start()
    assert answer.status_code == 202, answer.text
    listener = Listener(cp, device)
    status, document = listener.poll()
    assert status == 200 and [x["seq"] for x in document["labels"]] == [1, 2, 3]
    listener.listen()
    try:

        def delivered() -> bool:
            _post(cp, device.device_id, _labels(1, "after"))
            return any(
                x["sample_id"] == "after-0" for d in listener.received() for x in d["labels"]
            )

        wait_for(delivered, timeout=30, interval=1.0)
    finally:
        device.close()


def test_an_api_only_replica_delivers_labels_too(
    cp: ControlPlaneProcess,
    database_url: str,
    dynsec_mosquitto: MosquittoBroker,
    group: str,
    tmp_path: Path,
) -> None:
    """A replica with `ingest = false` publishes the labels posted to it on its own broker
    login (the module's replica, which ingests, never saw the post)."""
    device = _listener(cp, tmp_path / "device", group)
    try:
        with ControlPlaneProcess(
            database_url,
            dynsec_mosquitto,
            BROKER_ADMIN,
            BROKER_ADMIN_PASSWORD,
            tmp_path / "api-only",
            ingest="false",
        ) as replica:
            replica.admin_token = cp.admin_token
            assert _post(replica, device.id, _labels(2)).status_code == 202
            wait_for(lambda: [len(d["labels"]) for d in device.received()] == [2])
    finally:
        device.client.close()
