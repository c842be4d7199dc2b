"""The update client against a repository simulator: every attack is refused with its own error,
and a refused update changes nothing on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest

from edged.ota.client import UpdateClient, UpdateError, UpdatePolicy
from edged.ota.delta import make_patch
from edged.ota.fetcher import FetchError, TooLarge
from edged_formats.errors import (
    ExpiredError,
    MetadataError,
    MismatchError,
    RollbackError,
    TargetRefused,
    ThresholdError,
)
from edged_formats.tuf import (
    DAY,
    SigningKey,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
    TrustLimits,
    artifact_path,
    canonical_json,
    metadata_path,
    sign,
)
from tests.support.tuf_simulator import NOW, RepositorySimulator, snapshot_tree

MODEL = random.Random(1).randbytes(4500)  # incompressible: a patch must use its parent
NAME = "models/digits/1.1.0.edb"


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(NAME, MODEL, model="digits", version="1.1.0")
    return sim


def client_for(sim: RepositorySimulator, state: Path, **policy: object) -> UpdateClient:
    client = UpdateClient(
        sim,
        state,
        UpdatePolicy(reserve_bytes=0, **policy),
        clock=lambda: sim.now,  # type: ignore[arg-type]
    )
    if client.metadata.read("root") is None:
        client.metadata.write("root", sim.first_root)
    return client


def refused(client: UpdateClient, state: Path, error: type[Exception], match: str) -> None:
    """The refresh fails with `error` and the device's update state is byte for byte unchanged."""
    before = snapshot_tree(state)
    with pytest.raises(error, match=match):
        client.refresh()
    assert snapshot_tree(state) == before


def test_fresh_device_trusts_the_published_targets(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A refresh from root v1 accepts timestamp, snapshot and targets and persists all four."""
    client = client_for(sim, tmp_path)
    trusted = client.refresh()
    target = trusted.target(NAME, "any", "stable")
    assert target.length == len(MODEL) and target.version == "1.1.0"
    assert sorted(p.name for p in (tmp_path / "metadata").iterdir()) == [
        "root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]
    fetched = client.fetch_target(target, None)
    assert fetched.via == "full" and fetched.path.read_bytes() == MODEL


def test_tampered_artifact_is_refused_and_not_kept(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """Bytes of the right length but another hash never leave the download directory."""
    client = client_for(sim, tmp_path)
    target = client.refresh().target(NAME, "any", "stable")
    sim.overrides[artifact_path(target)] = b"X" + MODEL[1:]
    with pytest.raises(MismatchError, match="sha256"):
        client.fetch_target(target, None)
    assert list(client.downloads.iterdir()) == []


def test_oversized_artifact_stops_at_the_signed_length(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """An artifact longer than targets says is cut off at the signed length (endless data)."""
    client = client_for(sim, tmp_path)
    target = client.refresh().target(NAME, "any", "stable")
    sim.overrides[artifact_path(target)] = MODEL + b"more" * 1000
    with pytest.raises(TooLarge):
        client.fetch_target(target, None)


def test_oversized_metadata_stops_at_the_cap(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A timestamp beyond its byte cap is not read, let alone parsed."""
    client = client_for(sim, tmp_path, limits=TrustLimits(timestamp_bytes=4096))
    sim.overrides[metadata_path("timestamp")] = b" " * 5000
    refused(client, tmp_path, TooLarge, "longer than the 4096 bytes")


def test_unsigned_and_wrongly_signed_timestamp_is_below_threshold(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A timestamp signed by a key root does not list for it is refused."""
    client = client_for(sim, tmp_path)
    assert sim.repo.timestamp is not None
    forged = dataclasses.replace(sim.repo.timestamp, version=sim.repo.timestamp.version + 1)
    sim.overrides[metadata_path("timestamp")] = sign(forged, [SigningKey.generate()])
    refused(client, tmp_path, ThresholdError, "0 valid signature")


def test_threshold_cannot_be_reached_by_repeating_one_key(tmp_path: Path) -> None:
    """With a targets threshold of 2, one key's signature listed twice counts once."""
    sim = RepositorySimulator(thresholds={"targets": 2})
    sim.add_target(NAME, MODEL)
    client = client_for(sim, tmp_path)
    client.refresh()
    evil = sim.add_target("models/digits/6.6.6.edb", b"evil", publish=False)
    targets = Targets(version=3, expires=NOW + DAY, targets={**sim.targets, evil.name: evil})
    one = sim.keys["targets"][0]
    body = canonical_json(targets.to_dict())
    signature = {"keyid": one.keyid, "sig": one.sign(body).hex()}
    data = canonical_json({"signed": targets.to_dict(), "signatures": [signature, signature]})
    sim.repo.sign_targets(targets, data, sim.now)  # snapshot and timestamp re-signed honestly
    refused(client, tmp_path, ThresholdError, "targets v3 has 1 valid signature.*needs 2")


def test_online_keys_alone_cannot_install_an_arbitrary_model(tmp_path: Path) -> None:
    """Holding timestamp, snapshot and one of two targets keys is not enough for new targets."""
    sim = RepositorySimulator(thresholds={"targets": 2})
    sim.add_target(NAME, MODEL)
    client = client_for(sim, tmp_path)
    client.refresh()
    online_targets_key = sim.keys["targets"][0]
    evil = sim.add_target("models/digits/9.9.9.edb", b"evil model", publish=False)
    targets = Targets(version=3, expires=NOW + DAY, targets={evil.name: evil})
    sim.repo.sign_targets(targets, sign(targets, [online_targets_key]), sim.now)
    refused(client, tmp_path, ThresholdError, "targets v3 has 1 valid signature")


def test_replayed_older_timestamp_is_a_rollback(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A correctly signed but older timestamp than the trusted one is refused."""
    client = client_for(sim, tmp_path)
    client.refresh()
    old = sim.files()[metadata_path("timestamp")]
    sim.add_target("models/digits/1.2.0.edb", b"v2")
    client.refresh()
    sim.overrides[metadata_path("timestamp")] = old
    refused(client, tmp_path, RollbackError, "older than the trusted")


def test_replayed_older_snapshot_is_a_rollback(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A new timestamp naming an older snapshot (old targets) is refused."""
    client = client_for(sim, tmp_path)
    client.refresh()
    sim.add_target("models/digits/1.2.0.edb", b"v2")
    client.refresh()
    ts = sim.repo.timestamp
    assert ts is not None
    old_snapshot = sim.files()[metadata_path("snapshot", 1)]
    forged = Timestamp(
        version=ts.version + 1,
        expires=ts.expires,
        snapshot=dataclasses.replace(
            ts.snapshot,
            version=1,
            length=len(old_snapshot),
            sha256=hashlib.sha256(old_snapshot).hexdigest(),
        ),
    )
    sim.overrides[metadata_path("timestamp")] = sign(forged, sim.keys["timestamp"])
    refused(client, tmp_path, RollbackError, "names snapshot v1, older than the trusted v3")


def test_expired_timestamp_is_reported_as_cannot_update(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A frozen server (timestamp past expiry) yields 'cannot update', nothing accepted."""
    client = client_for(sim, tmp_path)
    client.refresh()
    sim.now += 2 * DAY
    refused(client, tmp_path, ExpiredError, "timestamp v.* expired .*cannot update")


def test_fast_forward_then_timestamp_key_rotation_recovers(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """After a stolen timestamp key pushed v999, rotating that key lets the device recover."""
    client = client_for(sim, tmp_path)
    client.refresh()
    ts = sim.repo.timestamp
    assert ts is not None
    stolen = dataclasses.replace(ts, version=999)
    sim.overrides[metadata_path("timestamp")] = sign(stolen, sim.keys["timestamp"])
    client.refresh()  # the device accepts the fast-forwarded timestamp
    sim.overrides.clear()
    refused(client, tmp_path, RollbackError, "older than the trusted v999")  # stuck
    sim.rotate("timestamp", [SigningKey.generate()])
    sim.repo.refresh_timestamp(sim.now)
    trusted = client.refresh()
    assert trusted.timestamp is not None and trusted.timestamp.version < 999
    assert trusted.root.version == 2


@pytest.mark.parametrize("signer", ["old", "new"])
def test_root_rotation_needs_old_and_new_keys(
    sim: RepositorySimulator, tmp_path: Path, signer: str
) -> None:
    """Root v2 signed only by the old root keys, or only by the new ones, is refused."""
    client = client_for(sim, tmp_path)
    client.refresh()
    old_keys = list(sim.keys["root"])
    new_keys = [SigningKey.generate()]
    sim.rotate("root", new_keys, signed_by=old_keys if signer == "old" else new_keys)
    whose = "its own root v2" if signer == "old" else "the trusted root v1"
    refused(client, tmp_path, ThresholdError, f"root v2 has 0 valid signature.* of {whose}")


def test_root_rotation_walk_is_capped(sim: RepositorySimulator, tmp_path: Path) -> None:
    """More root versions than the cap in one update stop the walk."""
    client = client_for(sim, tmp_path, limits=TrustLimits(max_root_rotations=3))
    for _ in range(4):
        sim.rotate("root", [SigningKey.generate()])
    with pytest.raises(RollbackError, match="more than 3 root rotations"):
        client.refresh()


def test_root_version_must_follow(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A root that skips or repeats a version is refused even when properly signed."""
    client = client_for(sim, tmp_path)
    client.refresh()
    root = dataclasses.replace(sim.repo.root, version=3)
    sim.overrides[metadata_path("root", 2)] = sign(root, sim.keys["root"])
    refused(client, tmp_path, RollbackError, "root v3 does not follow the trusted root v1")


def test_snapshot_not_matching_timestamp_is_mix_and_match(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A snapshot whose bytes differ from what timestamp names is refused before parsing."""
    client = client_for(sim, tmp_path)
    assert sim.repo.snapshot is not None
    other = dataclasses.replace(sim.repo.snapshot, expires=sim.repo.snapshot.expires - 60)
    path = metadata_path("snapshot", sim.repo.snapshot.version)
    sim.overrides[path] = sign(other, sim.keys["snapshot"])
    refused(client, tmp_path, MismatchError, f"snapshot v{sim.repo.snapshot.version} .*sha256")


def test_snapshot_version_must_be_the_one_timestamp_names(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A timestamp naming a snapshot version the snapshot file does not carry is refused."""
    client = client_for(sim, tmp_path)
    snap = sim.repo.snapshot
    assert snap is not None and sim.repo.timestamp is not None
    data = sign(
        Snapshot(version=5, expires=snap.expires, targets=snap.targets), sim.keys["snapshot"]
    )
    ts = dataclasses.replace(
        sim.repo.timestamp,
        snapshot=dataclasses.replace(
            sim.repo.timestamp.snapshot, length=len(data), sha256=hashlib.sha256(data).hexdigest()
        ),
    )
    sim.overrides[metadata_path("timestamp")] = sign(ts, sim.keys["timestamp"])
    sim.overrides[metadata_path("snapshot", snap.version)] = data
    refused(client, tmp_path, RollbackError, f"snapshot v5 is not the v{snap.version} timestamp")


def test_stalled_server_is_reported_not_waited_on(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A timeout is a FetchError naming the file; nothing is accepted."""
    client = client_for(sim, tmp_path)
    sim.stalled.add(metadata_path("timestamp"))
    refused(client, tmp_path, FetchError, "timestamp.json: the server stalled")


@pytest.mark.parametrize("name", ["models/../../etc/passwd", "../x.edb", "models/./x", "/abs"])
def test_target_names_that_escape_are_refused(
    sim: RepositorySimulator, tmp_path: Path, name: str
) -> None:
    """Signed targets metadata naming a path with `..`, `.` or a leading `/` is refused whole."""
    client = client_for(sim, tmp_path)
    evil = TargetFile(name, 3, hashlib.sha256(b"bad").hexdigest())
    raw = dict(sim.targets)
    targets = Targets(version=2, expires=NOW + DAY, targets=raw)
    body = targets.to_dict()
    body["targets"][name] = evil.to_dict()
    message = canonical_json(body)
    key = sim.keys["targets"][0]
    data = canonical_json(
        {"signed": body, "signatures": [{"keyid": key.keyid, "sig": key.sign(message).hex()}]}
    )
    sim.repo.sign_targets(targets, data, sim.now)
    refused(client, tmp_path, MetadataError, "not a safe relative path")


def test_model_for_other_hardware_or_channel_is_refused(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """A signed target whose hardware tags or channel do not fit this device is not installable."""
    sim.add_target("models/cam/2.0.0.edb", b"cam", hardware=["jetson-orin"], channel="beta")
    trusted = client_for(sim, tmp_path).refresh()
    with pytest.raises(TargetRefused, match="for hardware \\['jetson-orin'\\]"):
        trusted.target("models/cam/2.0.0.edb", "rpi4", "beta")
    with pytest.raises(TargetRefused, match="channel 'beta'"):
        trusted.target("models/cam/2.0.0.edb", "jetson-orin", "stable")
    assert trusted.target("models/cam/2.0.0.edb", "jetson-orin", "beta").length == 3
    with pytest.raises(TargetRefused, match="not in targets"):
        trusted.target("models/cam/9.edb", "any", "stable")


def test_no_trusted_root_means_no_update(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A device that was never given a root refuses to start the walk."""
    client = UpdateClient(sim, tmp_path, UpdatePolicy(reserve_bytes=0), clock=lambda: sim.now)
    with pytest.raises(UpdateError, match="no trusted root"):
        client.refresh()


def test_delta_patch_is_used_when_the_parent_matches(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """Holding the parent, the device fetches the small patch and rebuilds the exact artifact."""
    new = MODEL[:2000] + b"retrained head" + MODEL[2014:]
    patch = make_patch(MODEL, new)
    name, length, sha = sim.add_blob("patches/digits/1.1.0-1.2.0.zst", patch)
    parent_sha = hashlib.sha256(MODEL).hexdigest()
    patches = {parent_sha: {"name": name, "length": length, "hashes": {"sha256": sha}}}
    sim.add_target("models/digits/1.2.0.edb", new, parent="1.1.0", patches=patches)
    client = client_for(sim, tmp_path)
    target = client.refresh().target("models/digits/1.2.0.edb", "any", "stable")
    parent = tmp_path / "current.edb"
    parent.write_bytes(MODEL)
    fetched = client.fetch_target(target, parent)
    assert fetched.via == "patch" and fetched.fetched_bytes == length < len(new) // 10
    assert fetched.path.read_bytes() == new


@pytest.mark.parametrize("fault", ["tampered", "missing", "wrong-parent"])
def test_bad_patch_falls_back_to_the_full_artifact(
    sim: RepositorySimulator, tmp_path: Path, fault: str
) -> None:
    """A tampered, missing or mismatched patch is dropped and the full artifact fetched."""
    base = MODEL if fault != "wrong-parent" else random.Random(7).randbytes(len(MODEL))
    new = base[:100] + b"retrained" + base[109:]
    patch = make_patch(base, new)  # wrong-parent: listed under MODEL's hash, made from another
    name, length, sha = sim.add_blob("patches/digits/p.zst", patch)
    patches = {
        hashlib.sha256(MODEL).hexdigest(): {
            "name": name,
            "length": length,
            "hashes": {"sha256": sha},
        }
    }
    target_sha = sim.add_target("models/digits/1.2.0.edb", new, patches=patches).sha256
    served = artifact_path(name, sha)
    if fault == "tampered":
        sim.overrides[served] = patch[:-1] + bytes([patch[-1] ^ 1])
    elif fault == "missing":
        del sim.blobs[served]
    client = client_for(sim, tmp_path)
    target = client.refresh().target("models/digits/1.2.0.edb", "any", "stable")
    parent = tmp_path / "current.edb"
    parent.write_bytes(MODEL)
    fetched = client.fetch_target(target, parent)
    assert fetched.via == "full" and fetched.fallback and "patch not used" in fetched.fallback
    assert hashlib.sha256(fetched.path.read_bytes()).hexdigest() == target_sha


def test_interrupted_download_resumes(sim: RepositorySimulator, tmp_path: Path) -> None:
    """A partial download left by a crash is continued, not restarted."""
    client = client_for(sim, tmp_path)
    target = client.refresh().target(NAME, "any", "stable")
    (client.downloads / f"{target.sha256}.part").write_bytes(MODEL[:1000])
    fetched = client.fetch_target(target, None)
    assert fetched.fetched_bytes == len(MODEL) - 1000 and fetched.path.read_bytes() == MODEL


def test_metadata_with_floats_or_repeated_keys_is_malformed(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    """Non-canonical data types are refused as malformed metadata, not guessed at."""
    client = client_for(sim, tmp_path)
    good = json.loads(sim.files()[metadata_path("timestamp")])
    good["signed"]["version"] = 1.5
    sim.overrides[metadata_path("timestamp")] = json.dumps(good).encode()
    refused(client, tmp_path, MetadataError, "non-integer number 1.5")
    sim.overrides[metadata_path("timestamp")] = b'{"signed": {}, "signed": {}, "signatures": []}'
    refused(client, tmp_path, MetadataError, "repeats the key 'signed'")
