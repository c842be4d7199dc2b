"""The pure trust core: canonical form, keys, strict parsing and the trusted set's rules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edged_formats.errors import ExpiredError, MetadataError, ThresholdError, TrustError
from edged_formats.tuf import (
    DAY,
    ROLES,
    Envelope,
    PublicKey,
    Repository,
    Root,
    SigningKey,
    TargetFile,
    TrustedSet,
    artifact_path,
    canonical_json,
    format_expiry,
    metadata_path,
    new_root,
    sign,
)

NOW = 1_800_000_000


@pytest.fixture
def keys() -> dict[str, list[SigningKey]]:
    return {role: [SigningKey.generate()] for role in ROLES}


def root_bytes(keys: dict[str, list[SigningKey]], **changes: object) -> bytes:
    root = dataclasses.replace(new_root(1, NOW + DAY, keys), **changes)  # type: ignore[arg-type]
    return sign(root, keys["root"])


def test_canonical_json_is_sorted_and_compact() -> None:
    """Signatures cover sorted keys without whitespace, non-ASCII as UTF-8."""
    assert canonical_json({"b": 1, "a": ["é", True]}) == '{"a":["é",true],"b":1}'.encode()
    with pytest.raises(MetadataError, match="canonical form"):
        canonical_json({"x": float("nan")})


def test_key_files_round_trip_and_never_print_the_seed() -> None:
    """A signing key survives its file format; its repr shows the key id only."""
    key = SigningKey.generate()
    again = SigningKey.from_file_bytes(key.to_file_bytes())
    assert again.keyid == key.keyid and again.sign(b"m") == key.sign(b"m")
    assert json.loads(key.to_file_bytes())["seed"] not in repr(key)
    with pytest.raises(MetadataError, match="no valid 32-byte hex `seed`"):
        SigningKey.from_file_bytes(b'{"keytype": "ed25519", "seed": "abc"}')


def test_key_id_is_the_hash_of_the_key_object() -> None:
    """A root listing a key under another id is refused."""
    key = SigningKey.generate()
    assert key.keyid == PublicKey(key.public_key.public).keyid
    keys = {role: [key] for role in ROLES}
    body = new_root(1, NOW + DAY, keys).to_dict()
    body["keys"] = {"0" * 64: key.public_key.to_dict()}
    for role in ROLES:
        body["roles"][role]["keyids"] = ["0" * 64]
    data = canonical_json({"signed": body, "signatures": []})
    with pytest.raises(MetadataError, match="under the wrong id"):
        Envelope.parse(data, "root")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.update(extra=1), "unknown field 'extra'"),
        (lambda b: b.update(version=0), "root.version must be an integer >= 1"),
        (lambda b: b.update(version=True), "root.version must be an integer"),
        (lambda b: b.update(expires="tomorrow"), "YYYY-MM-DDTHH:MM:SSZ"),
        (lambda b: b.update(expires="2027-02-30T00:00:00Z"), "not a real date"),
        (lambda b: b.update(spec_version="2.0"), "spec_version '2.0'"),
        (lambda b: b.update(_type="targets"), "not root metadata"),
        (lambda b: b["roles"]["targets"].update(threshold=2), "threshold exceeds"),
        (lambda b: b["roles"].pop("snapshot"), "root.roles lacks snapshot"),
    ],
)
def test_malformed_root_names_the_problem(
    keys: dict[str, list[SigningKey]], mutate: object, message: str
) -> None:
    """Every schema break is one sentence naming the field."""
    body = json.loads(root_bytes(keys))["signed"]
    mutate(body)  # type: ignore[operator]
    with pytest.raises(MetadataError, match=message):
        Envelope.parse(canonical_json({"signed": body, "signatures": []}), "root")


def test_root_must_be_self_signed(keys: dict[str, list[SigningKey]]) -> None:
    """The initial trusted root needs a threshold of its own root keys."""
    root = new_root(1, NOW + DAY, keys)
    with pytest.raises(ThresholdError, match="root v1 has 0 valid"):
        TrustedSet(sign(root, keys["targets"]), NOW)


def test_expired_root_is_found_after_the_walk(keys: dict[str, list[SigningKey]]) -> None:
    """An expired trusted root may still rotate; only the final root must be current."""
    trusted = TrustedSet(root_bytes(keys, expires=NOW - 10), NOW)
    repo = Repository([root_bytes(keys, expires=NOW - 10)], keys)
    with pytest.raises(ExpiredError, match="root v1 expired at"):
        trusted.update_timestamp(repo.publish({}, NOW)[metadata_path("timestamp")])
    new = new_root(2, NOW + DAY, keys)
    trusted.update_root(sign(new, keys["root"]))
    assert trusted.update_timestamp(repo.files()[metadata_path("timestamp")]).version == 1


def test_refused_update_leaves_trusted_state_alone(keys: dict[str, list[SigningKey]]) -> None:
    """After a refused timestamp the trusted set still holds what it held."""
    repo = Repository([root_bytes(keys)], keys)
    files = repo.publish({}, NOW)
    trusted = TrustedSet(repo.roots[0], NOW)
    good = trusted.update_timestamp(files[metadata_path("timestamp")])
    with pytest.raises(ThresholdError):
        trusted.update_timestamp(sign(dataclasses.replace(good, version=9), keys["targets"]))
    assert trusted.timestamp == good


def test_order_of_the_walk_is_enforced(keys: dict[str, list[SigningKey]]) -> None:
    """Snapshot before timestamp, targets before snapshot, root after timestamp are refused."""
    repo = Repository([root_bytes(keys)], keys)
    files = repo.publish({}, NOW)
    trusted = TrustedSet(repo.roots[0], NOW)
    with pytest.raises(TrustError, match="before timestamp"):
        trusted.update_snapshot(files[metadata_path("snapshot", 1)])
    with pytest.raises(TrustError, match="before snapshot"):
        trusted.update_targets(files[metadata_path("targets", 1)])
    trusted.update_timestamp(files[metadata_path("timestamp")])
    with pytest.raises(TrustError, match="root cannot change"):
        trusted.update_root(sign(new_root(2, NOW + DAY, keys), keys["root"]))


def test_target_custom_fields_are_typed_and_unknown_ones_kept() -> None:
    """Known custom fields are checked; fields a newer server adds survive a round trip."""
    value = {"length": 1, "hashes": {"sha256": "a" * 64}, "custom": {"future": [1], "channel": 3}}
    with pytest.raises(MetadataError, match=r"custom\.channel must be a string"):
        TargetFile.from_dict("m/x.edb", value, "target")
    value["custom"] = {"future": [1], "hardware": ["rpi4"]}
    target = TargetFile.from_dict("m/x.edb", value, "target")
    assert target.to_dict()["custom"]["future"] == [1]
    assert target.fits("rpi4", "stable") and not target.fits("jetson", "stable")
    assert artifact_path(target) == f"targets/m/{'a' * 64}.x.edb"


def test_expiry_format_round_trips() -> None:
    """Expiry is written and read as UTC seconds."""
    assert format_expiry(NOW) == "2027-01-15T08:00:00Z"
    root = Root(version=1, expires=NOW, keys={}, roles={})
    assert root.is_expired(NOW) and not root.is_expired(NOW - 1)


def test_a_resumed_repository_continues_the_versions(keys: dict[str, list[SigningKey]]) -> None:
    """A repository rebuilt from stored files signs the next versions, not version 1 again."""
    first = Repository([root_bytes(keys)], keys)
    files = first.publish({}, NOW)
    again = Repository([root_bytes(keys)], keys)
    for role in ("targets", "snapshot", "timestamp"):
        version = None if role == "timestamp" else 1
        again.resume(role, files[metadata_path(role, version)])
    new = again.publish({}, NOW)
    assert metadata_path("targets", 2) in new and again.timestamp is not None
    assert again.timestamp.version == 2
    with pytest.raises(TrustError, match="only targets, snapshot and timestamp"):
        again.resume("root", first.roots[0])
