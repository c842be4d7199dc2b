"""The signed repository of a real control plane on both databases: metadata served as a
device fetches it, the timestamp refresher, root rotation through the CLI and the API, roots
refused, keys kept apart, replicas publishing at once, and offline targets signing."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from control_plane.local_broker import MosquittoBroker
from control_plane.signing_keys import latest_root, load_keys
from edged.ota.client import UpdateClient
from edged_formats.tuf import DAY, Envelope, Role, Root, SigningKey, TrustedSet, sign
from tests.integration.control_plane.conftest import BROKER_ADMIN, BROKER_ADMIN_PASSWORD
from tests.support.control_plane import (
    ControlPlaneProcess,
    child_bundle,
    init_repository,
    repository_fetcher,
    wait_for,
)

TIMESTAMP_S = 6  # the refresher re-signs at half of it


@pytest.fixture(scope="module")
def repo_cp(
    database_url: str, dynsec_mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """A control plane whose timestamps live six seconds, checked four times a second."""
    workdir = tmp_path_factory.mktemp("repo-cp")
    with ControlPlaneProcess(
        database_url,
        dynsec_mosquitto,
        BROKER_ADMIN,
        BROKER_ADMIN_PASSWORD,
        workdir,
        timestamp_expiry_s=str(TIMESTAMP_S),
        repository_check_s="0.25",
    ) as process:
        yield process


@pytest.fixture(scope="module")
def offline_dir(repo_cp: ControlPlaneProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root v1 made offline (two root keys, threshold two) and installed."""
    directory = tmp_path_factory.mktemp("offline") / "keys"
    init_repository(repo_cp, directory, "--root-keys", "2", "--root-threshold", "2")
    return directory


@pytest.fixture(scope="module")
def bundle(tf_bundles: dict[str, Path]) -> bytes:
    return tf_bundles["digits_int8_io_int8"].read_bytes()


def _key_dir(cp: ControlPlaneProcess) -> Path:
    return Path(cp.env["EDGED_CP_DATA_DIR"]) / "keys"


def _status(cp: ControlPlaneProcess) -> dict:
    with cp.api(cp.admin_token) as api:
        response = api.get("/v1/repository")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _refresh(cp: ControlPlaneProcess, token: str, state_dir: Path) -> TrustedSet:
    fetcher = repository_fetcher(cp, token)
    try:
        return UpdateClient(fetcher, state_dir).refresh()
    finally:
        fetcher.close()


def test_metadata_is_served_as_devices_fetch_it(
    repo_cp: ControlPlaneProcess, offline_dir: Path, tmp_path: Path
) -> None:
    """Every role by its consistent-snapshot name, the bytes stored; versioned files immutable,
    timestamp.json no-cache; ETags are sha256; unknown files 404; no token 401."""
    device = repo_cp.enroll(tmp_path, "default")
    status = _status(repo_cp)
    with repo_cp.api(device.api_token) as api:
        timestamp = api.get("/v1/repository/metadata/timestamp.json")
        snapshot_name = f"{status['snapshot']['version']}.snapshot.json"
        snapshot = api.get(f"/v1/repository/metadata/{snapshot_name}")
        targets = api.get(f"/v1/repository/metadata/{status['targets']['version']}.targets.json")
        root = api.get("/v1/repository/metadata/1.root.json")
        missing = api.get("/v1/repository/metadata/99.root.json")
        sneaky = api.get("/v1/repository/targets/models/../../keys/x.key")
    with repo_cp.api() as anonymous:
        refused = anonymous.get("/v1/repository/metadata/timestamp.json")
    assert root.content == (offline_dir / "1.root.json").read_bytes()
    assert timestamp.headers["cache-control"] == "no-cache"
    for response in (snapshot, targets, root):
        assert response.status_code == 200
        assert "immutable" in response.headers["cache-control"]
        assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    assert Envelope.parse(timestamp.content, "timestamp").signed.version >= 1
    assert missing.status_code == 404 and missing.json()["status"] == 404
    assert sneaky.status_code in (404, 422)
    assert refused.status_code == 401
    trusted = _refresh(repo_cp, device.api_token, tmp_path / "ota")
    assert (
        trusted.snapshot is not None and trusted.snapshot.version == status["snapshot"]["version"]
    )


def test_the_refresher_resigns_the_timestamp_before_it_expires(
    repo_cp: ControlPlaneProcess, offline_dir: Path, tmp_path: Path
) -> None:
    """The timestamp is re-signed at half its lifetime, so a device refreshing after the first
    one expired is never frozen."""
    device = repo_cp.enroll(tmp_path, "default")
    first = _status(repo_cp)["timestamp"]
    wait_for(
        lambda: _status(repo_cp)["timestamp"]["version"] > first["version"],
        timeout=TIMESTAMP_S,
    )
    later = _status(repo_cp)["timestamp"]
    assert later["expires_at"] > first["expires_at"]
    assert later["signed_at"] - first["signed_at"] <= TIMESTAMP_S / 2 + 2
    time.sleep(max(0.0, first["expires_at"] + 0.5 - time.time()))
    trusted = _refresh(repo_cp, device.api_token, tmp_path / "ota")
    assert trusted.timestamp is not None and trusted.timestamp.version > first["version"]


def test_root_rotation_through_the_cli_is_followed_by_a_device_that_trusted_v1(
    repo_cp: ControlPlaneProcess, offline_dir: Path, tmp_path: Path
) -> None:
    """`root sign --rotate root --rotate timestamp` then `root publish`: the server re-signs
    with the new timestamp key at once, and a device holding root v1 walks to v2."""
    device = repo_cp.enroll(tmp_path, "default")
    assert _refresh(repo_cp, device.api_token, tmp_path / "ota").root.version == 1
    signed = repo_cp.run_cli(
        "root",
        "sign",
        "--offline-dir",
        str(offline_dir),
        "--rotate",
        "root",
        "--rotate",
        "timestamp",
        "--key-dir",
        str(_key_dir(repo_cp)),
    )
    assert signed.returncode == 0, signed.stderr
    new_root = Path(signed.stdout.strip())
    assert new_root.name == "2.root.json"
    published = repo_cp.run_cli(
        "root", "publish", str(new_root), "--url", repo_cp.url, "--token", repo_cp.admin_token
    )
    assert published.returncode == 0, published.stderr
    assert _status(repo_cp)["root"]["version"] == 2
    trusted = _refresh(repo_cp, device.api_token, tmp_path / "ota")
    assert trusted.root.version == 2
    assert (tmp_path / "ota" / "metadata" / "root.json").read_bytes() == new_root.read_bytes()
    v1 = Envelope.parse((offline_dir / "1.root.json").read_bytes(), "root").signed
    assert isinstance(v1, Root)
    assert set(trusted.root.roles["timestamp"].keyids).isdisjoint(v1.roles["timestamp"].keyids)
    assert set(trusted.root.roles["root"].keyids).isdisjoint(v1.roles["root"].keyids)
    with repo_cp.api(repo_cp.admin_token) as api:
        audit = api.get("/v1/audit", params={"action": "repository.root"}).json()["items"]
    assert "root v2" in {entry["target"] for entry in audit}


def _next_root(offline_dir: Path, version_step: int = 1) -> tuple[Root, list[SigningKey], list]:
    """Root N+step with fresh root keys: (root, new keys, the current root keys held)."""
    current = latest_root(offline_dir).root
    held = load_keys(offline_dir)
    old_keys = [held[k] for k in current.roles["root"].keyids]
    fresh = [SigningKey.generate() for _ in old_keys]
    keys = {k: v for k, v in current.keys.items() if k not in current.roles["root"].keyids}
    keys |= {k.keyid: k.public_key for k in fresh}
    roles = dict(current.roles) | {
        "root": Role(tuple(k.keyid for k in fresh), current.roles["root"].threshold)
    }
    root = Root(
        version=current.version + version_step,
        expires=int(time.time()) + 30 * DAY,
        keys=keys,
        roles=roles,
    )
    return root, fresh, old_keys


def test_roots_that_devices_would_refuse_are_refused(
    repo_cp: ControlPlaneProcess, offline_dir: Path, tmp_path: Path
) -> None:
    """Root N+1 signed only by the old root keys, or only by the new, or skipping a version,
    is a 400 naming the rule, through the API and the CLI; the repository keeps its root."""
    before = _status(repo_cp)["root"]["version"]
    root, fresh, old_keys = _next_root(offline_dir)
    only_old = sign(root, old_keys)
    only_new = sign(root, fresh)
    skipping_root, skipping_fresh, _ = _next_root(offline_dir, version_step=2)
    skipping = sign(skipping_root, [*old_keys, *skipping_fresh])
    with repo_cp.api(repo_cp.admin_token) as api:
        answers = [api.post("/v1/repository/root", content=data) for data in (only_old, only_new)]
        answers.append(api.post("/v1/repository/root", content=skipping))
        garbage = api.post("/v1/repository/root", content=b'{"signed": {}, "signatures": []}')
    details = [a.json()["detail"] for a in answers]
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert f"from root keys of its own root v{before + 1}, needs 2" in details[0]
    assert f"from root keys of the trusted root v{before}, needs 2" in details[1]
    assert "does not follow the trusted root" in details[2]
    assert garbage.status_code == 400
    bad_file = tmp_path / "only-old.root.json"
    bad_file.write_bytes(only_old)
    cli = repo_cp.run_cli(
        "root", "publish", str(bad_file), "--url", repo_cp.url, "--token", repo_cp.admin_token
    )
    assert cli.returncode == 2 and details[0] in cli.stderr
    assert _status(repo_cp)["root"]["version"] == before
    with repo_cp.api(repo_cp.admin_token) as api:
        refusals = api.get(
            "/v1/audit", params={"action": "repository.root", "outcome": "refused"}
        ).json()["items"]
    assert details[0] in {entry["detail"]["reason"] for entry in refusals}


def test_the_server_never_holds_root_keys(
    repo_cp: ControlPlaneProcess, offline_dir: Path, bundle: bytes
) -> None:
    """The key directory holds only online keys (0600) and no root key of any root; a root key
    put there makes the server refuse to sign, naming it."""
    key_dir = _key_dir(repo_cp)
    online = load_keys(key_dir)
    roots = [
        Envelope.parse(p.read_bytes(), "root").signed
        for p in sorted(offline_dir.glob("*.root.json"))
    ]
    root_keyids = {k for r in roots for k in r.roles["root"].keyids}  # type: ignore[attr-defined]
    assert online and root_keyids and root_keyids.isdisjoint(online)
    assert root_keyids <= set(load_keys(offline_dir))
    for path in [*key_dir.iterdir(), *offline_dir.glob("*.key")]:
        assert path.stat().st_mode & 0o777 == 0o600
    assert {p.name.split("-")[0] for p in key_dir.glob("*.key")} <= {
        "timestamp",
        "snapshot",
        "targets",
    }
    current = {k[:16] for k in latest_root(offline_dir).root.roles["root"].keyids}
    leaked = next(p for p in offline_dir.glob("root-*.key") if p.name[5:21] in current)
    shutil.copy(leaked, key_dir / leaked.name)
    try:
        with repo_cp.api(repo_cp.admin_token) as api:
            refused = api.post("/v1/models", content=child_bundle(bundle, "0.0.1-leak"))
            status = api.get("/v1/repository")
    finally:
        (key_dir / leaked.name).unlink()
    assert refused.status_code == 409 and "root keys must stay offline" in refused.json()["detail"]
    assert status.status_code == 409
    assert _status(repo_cp)["online_roles"] == ["targets", "snapshot", "timestamp"]


def test_two_replicas_publishing_at_once_never_fork_the_repository(
    repo_cp: ControlPlaneProcess,
    offline_dir: Path,
    bundle: bytes,
    database_url: str,
    dynsec_mosquitto: MosquittoBroker,
    tmp_path: Path,
) -> None:
    """Six uploads spread over two API processes on one database and data directory all
    succeed, each with its own targets version, and the final targets lists every one."""
    before = _status(repo_cp)["targets"]["version"]
    with ControlPlaneProcess(
        database_url,
        dynsec_mosquitto,
        BROKER_ADMIN,
        BROKER_ADMIN_PASSWORD,
        tmp_path / "replica",
        data_dir=repo_cp.env["EDGED_CP_DATA_DIR"],
        ingest="false",
    ) as replica:
        versions = [f"3.0.{i}" for i in range(6)]
        bodies = {v: child_bundle(bundle, v) for v in versions}

        def upload(i: int) -> int:
            server = (repo_cp, replica)[i % 2]
            with server.api(repo_cp.admin_token) as api:
                return api.post("/v1/models", content=bodies[versions[i]]).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(upload, range(6)))
    assert codes == [201] * 6
    after = _status(repo_cp)
    assert after["targets"]["version"] == before + 6
    with repo_cp.api(repo_cp.admin_token) as api:
        audit = api.get("/v1/audit", params={"action": "model.upload", "limit": 50}).json()
        targets_file = api.get(
            f"/v1/repository/metadata/{after['targets']['version']}.targets.json"
        )
    published = [
        e["detail"]["targets_version"]
        for e in audit["items"]
        if e["target"].endswith(tuple(f"/{v}" for v in versions))
    ]
    assert sorted(published) == list(range(before + 1, before + 7))
    listed = Envelope.parse(targets_file.content, "targets").signed.targets  # type: ignore[attr-defined]
    assert {f"models/digits-int8-io-int8/{v}.edb" for v in versions} <= set(listed)


def test_offline_targets_keys_sign_through_the_cli(
    dynsec_mosquitto: MosquittoBroker, bundle: bytes, tmp_path: Path
) -> None:
    """With `--targets offline` the server holds no targets key: an upload (within
    max_bundle_bytes, else 413) leaves targets pending until `targets sign` signs them
    offline, and then a device sees the model."""
    with ControlPlaneProcess(
        f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}",
        dynsec_mosquitto,
        BROKER_ADMIN,
        BROKER_ADMIN_PASSWORD,
        tmp_path / "cp",
        max_bundle_bytes=str(len(bundle) + 1024),
    ) as cp:
        offline = tmp_path / "offline"
        init_repository(cp, offline, "--targets", "offline")
        status = _status(cp)
        assert status["online_roles"] == ["snapshot", "timestamp"]
        assert status["targets"] is None and status["pending_targets"] == 1
        assert not [p for p in _key_dir(cp).iterdir() if p.name.startswith("targets-")]
        with cp.api(cp.admin_token) as api:
            too_big = api.post("/v1/models", content=bundle + bytes(2048))
            assert too_big.status_code == 413, too_big.text
            assert too_big.json()["detail"].endswith(f"over the {len(bundle) + 1024}-byte limit")
            assert api.post("/v1/models", content=bundle).status_code == 201
            pending = api.get("/v1/repository/pending-targets").json()
        assert pending["version"] == 2 and pending["signed_by"] == []
        signed = cp.run_cli(
            "targets",
            "sign",
            "--offline-dir",
            str(offline),
            "--url",
            cp.url,
            "--token",
            cp.admin_token,
        )
        assert signed.returncode == 0, signed.stderr
        assert "signed targets v2 (models/digits-int8-io-int8/1.0.0.edb)" in signed.stdout
        status = _status(cp)
        assert status["targets"]["version"] == 2 and status["pending_targets"] is None
        device = cp.enroll(tmp_path / "device", "default")
        trusted = _refresh(cp, device.api_token, tmp_path / "device" / "ota")
        assert trusted.target("models/digits-int8-io-int8/1.0.0.edb", "any", "stable")
    assert os.path.exists(offline / "1.root.json")
