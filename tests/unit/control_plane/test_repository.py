"""Key files and root signing done offline, and the repository's file-level rules: what the
CLI makes is what devices accept, keys land where their role belongs, paths stay inside."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from control_plane.db.engine import Database
from control_plane.db.models import ModelVersion
from control_plane.registry import BundleRefused, _checked, target_file
from control_plane.repository import METADATA_FILE, RepositoryStore
from control_plane.settings import Settings
from control_plane.signing_keys import (
    KeyFileError,
    init_keys,
    latest_root,
    load_keys,
    sign_next_root,
)
from edged_formats.errors import ThresholdError
from edged_formats.tuf import SigningKey, TrustedSet, sign


def _roles_of(directory: Path) -> set[str]:
    return {p.name.split("-")[0] for p in directory.glob("*.key")}


def test_init_makes_a_root_devices_accept_with_keys_where_they_belong(tmp_path: Path) -> None:
    """1.root.json verifies with its own 2-of-2 root keys; root keys sit offline, the online
    roles in the key directory, every key file 0600."""
    offline, keys = tmp_path / "offline", tmp_path / "server-keys"
    path = init_keys(offline, keys, root_keys=2, root_threshold=2)
    assert path == offline / "1.root.json"
    trusted = TrustedSet(path.read_bytes(), time.time())
    assert trusted.root.roles["root"].threshold == 2 and len(trusted.root.roles["root"].keyids) == 2
    assert _roles_of(offline) == {"root"} and _roles_of(keys) == {
        "targets",
        "snapshot",
        "timestamp",
    }
    assert set(load_keys(offline)) == set(trusted.root.roles["root"].keyids)
    for key_file in [*offline.glob("*.key"), *keys.glob("*.key")]:
        assert key_file.stat().st_mode & 0o777 == 0o600
    assert offline.stat().st_mode & 0o777 == 0o700


def test_offline_targets_keys_stay_offline(tmp_path: Path) -> None:
    """With targets offline, the server's directory gets only timestamp and snapshot."""
    offline, keys = tmp_path / "offline", tmp_path / "keys"
    init_keys(offline, keys, targets_offline=True)
    assert _roles_of(offline) == {"root", "targets"}
    assert _roles_of(keys) == {"snapshot", "timestamp"}


def test_init_refuses_to_overwrite_or_to_share_a_directory(tmp_path: Path) -> None:
    """A second init on the same offline directory, or one directory for both, is refused."""
    init_keys(tmp_path / "offline", tmp_path / "keys")
    with pytest.raises(KeyFileError, match="already holds root metadata"):
        init_keys(tmp_path / "offline", tmp_path / "keys")
    with pytest.raises(KeyFileError, match="must differ"):
        init_keys(tmp_path / "same", tmp_path / "same")
    with pytest.raises(KeyFileError, match="threshold"):
        init_keys(tmp_path / "o2", tmp_path / "k2", root_keys=1, root_threshold=2)


def test_a_rotated_root_is_accepted_by_a_client_that_trusted_the_old_one(tmp_path: Path) -> None:
    """root sign --rotate root --rotate timestamp: v2 passes TrustedSet.update_root from v1,
    the new timestamp key is in the key directory and v2 lists it instead of the old."""
    offline, keys = tmp_path / "offline", tmp_path / "keys"
    first = init_keys(offline, keys, root_keys=2, root_threshold=2).read_bytes()
    old_timestamp = set(TrustedSet(first, time.time()).root.roles["timestamp"].keyids)
    path = sign_next_root(offline, rotate=["root", "timestamp"], key_dir=keys)
    trusted = TrustedSet(first, time.time())
    new = trusted.update_root(path.read_bytes())
    assert new.version == 2 and set(new.roles["timestamp"].keyids).isdisjoint(old_timestamp)
    assert set(new.roles["timestamp"].keyids) <= set(load_keys(keys))
    assert set(new.roles["root"].keyids) <= set(load_keys(offline))
    assert latest_root(offline).root.version == 2


def test_a_root_signed_without_the_old_threshold_cannot_be_made(tmp_path: Path) -> None:
    """With one of two root keys gone, `root sign` refuses instead of signing a root no device
    would accept; a root signed by the remaining key alone is refused by the client too."""
    offline, keys = tmp_path / "offline", tmp_path / "keys"
    first = init_keys(offline, keys, root_keys=2, root_threshold=2).read_bytes()
    next(offline.glob("root-*.key")).unlink()
    with pytest.raises(KeyFileError, match="holds 1 of the 2 root key"):
        sign_next_root(offline, rotate=["timestamp"], key_dir=keys)
    assert not (offline / "2.root.json").exists()
    (extra,) = offline.glob("root-*.key")
    root = latest_root(offline).root
    lone = SigningKey.from_file_bytes(extra.read_bytes())
    forged = sign(
        type(root)(version=2, expires=root.expires, keys=root.keys, roles=root.roles), [lone]
    )
    with pytest.raises(ThresholdError, match="needs 2"):
        TrustedSet(first, time.time()).update_root(forged)


def test_rotation_arguments_are_checked(tmp_path: Path) -> None:
    """An unknown role, or an online role without --key-dir, is refused before any key is
    made."""
    offline = tmp_path / "offline"
    init_keys(offline, tmp_path / "keys")
    with pytest.raises(KeyFileError, match="cannot rotate 'admin'"):
        sign_next_root(offline, rotate=["admin"])
    with pytest.raises(KeyFileError, match="needs --key-dir"):
        sign_next_root(offline, rotate=["snapshot"])
    with pytest.raises(KeyFileError, match=r"holds no N\.root\.json"):
        latest_root(tmp_path / "keys")


def test_artifacts_are_content_addressed_and_paths_stay_inside(tmp_path: Path) -> None:
    """An artifact is stored as <sha256>.<name> under targets/, 0644; `..`, absolute and
    unknown paths resolve to nothing."""
    store = RepositoryStore(
        Settings(data_dir=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db"),
        Database(f"sqlite+aiosqlite:///{tmp_path}/x.db"),
    )
    sha, served = store.write_artifact("models/m/1.0.edb", b"bundle bytes")
    assert served == f"targets/models/m/{sha}.1.0.edb"
    found = store.artifact(served.removeprefix("targets/"))
    assert found is not None and found.read_bytes() == b"bundle bytes"
    assert found.stat().st_mode & 0o777 == 0o644
    assert store.read_artifact("models/m/1.0.edb", sha) == b"bundle bytes"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "secret.key").write_text("x")
    for bad in ("../keys/secret.key", "models/../../keys/secret.key", "/etc/passwd", "models/m"):
        assert store.artifact(bad) is None
    with pytest.raises(ValueError, match="not a safe relative path"):
        store.write_artifact("../escape.edb", b"x")


def test_metadata_file_names() -> None:
    """Only timestamp.json and <version>.<role>.json are metadata files."""
    for good in ("timestamp.json", "1.root.json", "42.snapshot.json", "7.targets.json"):
        assert METADATA_FILE.match(good)
    for bad in ("0.root.json", "root.json", "1.timestamp.json", "../1.root.json", "1.root.json.x"):
        assert not METADATA_FILE.match(bad)


def test_a_registered_model_becomes_a_target_with_its_custom_fields() -> None:
    """custom carries model, version, parent, hardware, channel and patches; the device's
    fit rules read them."""
    row = ModelVersion(
        name="digits",
        version="1.3.0",
        parent_version="1.2.0",
        target="models/digits/1.3.0.edb",
        sha256="a" * 64,
        length=100,
        channel="beta",
        hardware=["rpi4"],
        patches={
            "b" * 64: {
                "name": "patches/digits/1.2.0-1.3.0.zst",
                "length": 9,
                "hashes": {"sha256": "c" * 64},
            }
        },
    )
    target = target_file(row)
    assert (target.model, target.version, target.parent) == ("digits", "1.3.0", "1.2.0")
    assert target.fits("rpi4", "beta") and not target.fits("jetson", "beta")
    assert not target.fits("rpi4", "stable")
    assert target.patches["b" * 64].length == 9


def test_an_upload_that_is_no_bundle_is_refused_with_one_sentence() -> None:
    """The registry passes read_bundle's sentence on as the refusal."""
    with pytest.raises(BundleRefused, match=r"^bundle ") as refused:
        _checked(b"\x00" * 1024, 1 << 20)
    assert "\n" not in str(refused.value)
