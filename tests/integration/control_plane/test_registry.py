"""The model registry against a real control plane on both databases: uploads that a real
device client installs over HTTP (in full, by patch, resumed), and every refusal."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.ota.client import UpdateClient
from edged_formats.bundle import read_bundle
from edged_formats.errors import BundleError, TargetRefused
from edged_formats.tuf import artifact_path
from tests.support.control_plane import (
    ControlPlaneProcess,
    DeviceClient,
    child_bundle,
    init_repository,
    repository_fetcher,
)

BUNDLE = "digits_int8_io_int8"  # packed from TensorFlow's own converter output (tests/conftest)
NAME = "digits-int8-io-int8"


@pytest.fixture(scope="module")
def offline_dir(cp: ControlPlaneProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys made and root v1 installed once for the module's control plane."""
    directory = tmp_path_factory.mktemp("offline") / "keys"
    init_repository(cp, directory)
    return directory


@pytest.fixture(scope="module")
def parent(tf_bundles: dict[str, Path]) -> bytes:
    return tf_bundles[BUNDLE].read_bytes()


@pytest.fixture(scope="module")
def uploaded(cp: ControlPlaneProcess, offline_dir: Path, parent: bytes) -> dict[str, object]:
    """The parent bundle (1.0.0) and a child (1.1.0) uploaded once for the module."""
    with cp.api(cp.admin_token) as api:
        first = api.post("/v1/models", content=parent, params={"channel": "stable"})
        assert first.status_code == 201, first.text
        child = child_bundle(parent, "1.1.0", metrics={"calibration_accuracy": 0.5})
        second = api.post("/v1/models", content=child, params={"hardware": ["any", "rpi4"]})
        assert second.status_code == 201, second.text
    return {"parent": first.json(), "child": second.json(), "child_bytes": child}


@pytest.fixture
def device(cp: ControlPlaneProcess, offline_dir: Path, tmp_path: Path) -> Iterator[DeviceClient]:
    """An enrolled device (its trusted root written from the enrollment answer)."""
    yield cp.enroll(tmp_path / "device", "default")


@pytest.fixture
def updater(cp: ControlPlaneProcess, device: DeviceClient) -> Iterator[UpdateClient]:
    """The device's update client on the live server's repository routes."""
    fetcher = repository_fetcher(cp, device.api_token)
    yield UpdateClient(fetcher, device.state_dir / "ota")
    fetcher.close()


def test_enrollment_gives_the_device_its_trusted_root(
    cp: ControlPlaneProcess, offline_dir: Path, device: DeviceClient
) -> None:
    """The enrollment answer's root is the installed 1.root.json, written 0644."""
    written = device.state_dir / "ota" / "metadata" / "root.json"
    assert written.read_bytes() == (offline_dir / "1.root.json").read_bytes()
    assert written.stat().st_mode & 0o777 == 0o644


def test_an_uploaded_bundle_is_installed_by_a_device_over_http(
    cp: ControlPlaneProcess,
    device: DeviceClient,
    updater: UpdateClient,
    uploaded: dict[str, object],
    parent: bytes,
) -> None:
    """The device's trust walk over the live server accepts the target and its full artifact
    is exactly the uploaded bundle."""
    client = updater
    trusted = client.refresh()
    target = trusted.target(f"models/{NAME}/1.0.0.edb", "any", "stable")
    assert target.sha256 == hashlib.sha256(parent).hexdigest()
    assert target.custom["model"] == NAME and target.custom["version"] == "1.0.0"
    fetched = client.fetch_target(target, None)
    assert fetched.via == "full" and fetched.path.read_bytes() == parent
    info = uploaded["parent"]
    assert isinstance(info, dict)
    assert info["sha256"] == target.sha256 and info["length"] == len(parent)
    assert info["parent_version"] is None and info["patches"] == [] and info["lineage"] == []


def test_a_child_version_arrives_as_a_patch_from_its_parent(
    cp: ControlPlaneProcess,
    device: DeviceClient,
    updater: UpdateClient,
    uploaded: dict[str, object],
    parent: bytes,
    tmp_path: Path,
) -> None:
    """A device holding 1.0.0 rebuilds 1.1.0 from the listed patch, a fraction of the full
    size, and the registry shows the lineage and the patch size."""
    child = uploaded["child_bytes"]
    assert isinstance(child, bytes)
    held = tmp_path / "held.edb"
    held.write_bytes(parent)
    client = updater
    target = client.refresh().target(f"models/{NAME}/1.1.0.edb", "rpi4", "stable")
    assert target.parent == "1.0.0" and list(target.hardware) == ["any", "rpi4"]
    patch = target.patches[hashlib.sha256(parent).hexdigest()]
    assert patch.length < len(child) // 10
    fetched = client.fetch_target(target, held)
    assert fetched.via == "patch" and fetched.fetched_bytes == patch.length
    assert fetched.path.read_bytes() == child
    with cp.api(cp.admin_token) as api:
        shown = api.get(f"/v1/models/{NAME}/1.1.0").json()
    assert shown["lineage"] == [
        {"version": "1.0.0", "sha256": hashlib.sha256(parent).hexdigest(), "revoked": False}
    ]
    assert shown["patches"][0]["length"] == patch.length


def test_downloads_resume_with_range_through_the_real_server(
    cp: ControlPlaneProcess,
    device: DeviceClient,
    updater: UpdateClient,
    uploaded: dict[str, object],
    parent: bytes,
) -> None:
    """206 with Content-Range for a range, 416 past the end; a Range header that is not byte
    ranges is a 400 problem (Starlette answered those in plain text); a half-downloaded
    artifact is completed from where it stopped."""
    client = updater
    target = client.refresh().target(f"models/{NAME}/1.0.0.edb", "any", "stable")
    served = f"/v1/repository/{artifact_path(target)}"
    with cp.api(device.api_token) as api:
        part = api.get(served, headers={"Range": "bytes=100-199"})
        tail = api.get(served, headers={"Range": "bytes=1000-"})
        past = api.get(served, headers={"Range": f"bytes={len(parent)}-"})
        suffix = api.get(served, headers={"Range": "bytes=-100"})
        several = api.get(served, headers={"Range": "bytes=0-9, 20-29"})
        bad = {
            header: api.get(served, headers={"Range": header})
            for header in ("bytes=abc", "items=0-1", "bytes=9-2", "bytes=", "bytes=-0")
        }
        whole = api.get(served)
    assert part.status_code == 206 and part.content == parent[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(parent)}"
    assert tail.status_code == 206 and tail.content == parent[1000:]
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(parent)}"
    assert past.headers["content-type"] == "application/problem+json"
    assert suffix.status_code == 206 and suffix.content == parent[-100:]
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges")
    assert {h: r.status_code for h, r in bad.items()} == {
        "bytes=abc": 400,
        "items=0-1": 400,
        "bytes=9-2": 400,
        "bytes=": 400,
        "bytes=-0": 416,
    }
    for response in bad.values():
        assert response.headers["content-type"] == "application/problem+json", response.text
        assert "range" in response.json()["detail"].lower()
    assert whole.headers["etag"] == f'"{target.sha256}"'
    assert "immutable" in whole.headers["cache-control"]
    half = len(parent) // 2
    (client.downloads / f"{target.sha256}.part").write_bytes(parent[:half])
    fetched = client.fetch_target(target, None)
    assert fetched.via == "full" and fetched.fetched_bytes == len(parent) - half
    assert fetched.path.read_bytes() == parent


def test_a_duplicate_name_and_version_is_refused(
    cp: ControlPlaneProcess, uploaded: dict[str, object], parent: bytes
) -> None:
    """Uploading 1.0.0 again is a 409 problem and publishes nothing."""
    with cp.api(cp.admin_token) as api:
        before = api.get("/v1/repository").json()["targets"]["version"]
        again = api.post("/v1/models", content=parent)
        after = api.get("/v1/repository").json()["targets"]["version"]
    assert again.status_code == 409
    assert again.json()["detail"] == f"model {NAME} 1.0.0 is already in the registry"
    assert before == after


def test_a_bad_bundle_is_refused_with_the_sentence_naming_its_problem(
    cp: ControlPlaneProcess, offline_dir: Path, parent: bytes
) -> None:
    """A truncated bundle is a 400 whose detail is read_bundle's own sentence; nothing is
    registered."""
    broken = parent[: len(parent) // 3]
    with pytest.raises(BundleError) as expected:
        read_bundle(broken)
    with cp.api(cp.admin_token) as api:
        count = len(api.get("/v1/models").json()["items"])
        refused = api.post("/v1/models", content=broken)
        garbage = api.post("/v1/models", content=b"not a tar archive at all")
        listed = api.get("/v1/models").json()["items"]
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["detail"] == str(expected.value)
    assert garbage.status_code == 400 and garbage.json()["detail"].startswith("bundle")
    assert len(listed) == count


def test_a_viewer_cannot_upload_and_the_refusal_is_audited(
    cp: ControlPlaneProcess, offline_dir: Path, parent: bytes
) -> None:
    """403 for a viewer's upload (and an operator's revocation), each in the audit log."""
    viewer, operator = cp.new_token("viewer"), cp.new_token("operator")
    with cp.api(viewer) as api:
        refused = api.post("/v1/models", content=child_bundle(parent, "9.9.9"))
    with cp.api(operator) as api:
        no_revoke = api.post(f"/v1/models/{NAME}/1.0.0/revoke")
    assert refused.status_code == 403 and no_revoke.status_code == 403
    with cp.api(cp.admin_token) as api:
        denied = api.get("/v1/audit", params={"outcome": "denied"}).json()["items"]
        assert api.get(f"/v1/models/{NAME}/9.9.9").status_code == 404
    routes = {entry["action"] for entry in denied}
    assert {"POST /v1/models", f"POST /v1/models/{NAME}/1.0.0/revoke"} <= routes


def test_list_and_detail(cp: ControlPlaneProcess, uploaded: dict[str, object]) -> None:
    """The registry lists versions in upload order, one page at a time, and filters."""
    with cp.api(cp.new_token("viewer")) as api:
        first = api.get("/v1/models", params={"name": NAME, "limit": 1}).json()
        second = api.get(
            "/v1/models", params={"name": NAME, "limit": 1, "cursor": first["next_cursor"]}
        ).json()
        missing = api.get(f"/v1/models/{NAME}/0.0.1")
    assert [m["version"] for m in first["items"] + second["items"]][:2] == ["1.0.0", "1.1.0"]
    assert first["items"][0]["manifest"]["input"]["dtype"] == "int8"
    assert missing.status_code == 404


def test_revocation_removes_the_target_from_signed_metadata(
    cp: ControlPlaneProcess,
    device: DeviceClient,
    updater: UpdateClient,
    parent: bytes,
    offline_dir: Path,
) -> None:
    """A revoked version is gone from the targets a device trusts; revoking twice is a 409;
    both the upload and the revocation are audited."""
    with cp.api(cp.admin_token) as api:
        uploaded = api.post("/v1/models", content=child_bundle(parent, "2.0.0"))
        assert uploaded.status_code == 201, uploaded.text
        client = updater
        assert f"models/{NAME}/2.0.0.edb" in client.refresh().targets.targets  # type: ignore[union-attr]
        revoked = api.post(f"/v1/models/{NAME}/2.0.0/revoke")
        again = api.post(f"/v1/models/{NAME}/2.0.0/revoke")
        audit = api.get("/v1/audit", params={"target": f"{NAME}/2.0.0"}).json()["items"]
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert again.status_code == 409
    trusted = client.refresh()
    with pytest.raises(TargetRefused, match="is not in targets"):
        trusted.target(f"models/{NAME}/2.0.0.edb", "any", "stable")
    assert f"models/{NAME}/1.0.0.edb" in trusted.targets.targets  # type: ignore[union-attr]
    assert {e["action"] for e in audit} == {"model.upload", "model.revoke"}


@pytest.mark.train
@pytest.mark.slow
def test_a_head_only_fine_tune_reaches_the_device_as_a_small_patch(
    cp: ControlPlaneProcess, offline_dir: Path, updater: UpdateClient, digits_build, tmp_path: Path
) -> None:
    """The digits reference build and a child whose classifier head was re-quantised in place
    (control_plane.toolchain.head_patch): the device rebuilds the child from a patch of a few
    percent of the artifact."""
    from edged.finetune.head_patch import patch_head
    from edged_formats.bundle import dump_npz

    out, report = digits_build
    base_bytes = (out / report.bundle).read_bytes()
    base = read_bundle(base_bytes)
    head = base.head_weights()
    assert head is not None and base.manifest.head is not None
    rng = np.random.default_rng(7)
    weight = head[0] + rng.normal(0, 0.05, head[0].shape).astype(np.float32)
    bias = head[1] + np.float32(0.1)
    members = dict(base.members) | {
        "model.tflite": patch_head(base.model, base.manifest.output.name, weight, bias),
        base.manifest.head.member: dump_npz(weight=weight, bias=bias),
    }
    child = child_bundle(base_bytes, base.manifest.version + "-ft1", members=members)
    with cp.api(cp.admin_token) as api:
        for data in (base_bytes, child):
            response = api.post("/v1/models", content=data)
            assert response.status_code == 201, response.text
    held = tmp_path / "held.edb"
    held.write_bytes(base_bytes)
    name = f"models/{base.manifest.name}/{base.manifest.version}-ft1.edb"
    target = updater.refresh().target(name, "any", "stable")
    patch = target.patches[hashlib.sha256(base_bytes).hexdigest()]
    assert patch.length < len(child) * 0.10
    fetched = updater.fetch_target(target, held)
    assert fetched.via == "patch" and fetched.path.read_bytes() == child
