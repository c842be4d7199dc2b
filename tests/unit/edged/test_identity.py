"""The device key on disk: made once, reloaded the same, refused when it cannot be trusted."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from edged.errors import EdgedError, IdentityError
from edged.identity import DeviceIdentity


def test_create_then_reload_gives_the_same_key(tmp_path: Path) -> None:
    """The first call makes a key; later calls load that very key."""
    path = tmp_path / "state" / "device.key"
    made = DeviceIdentity.load_or_create(path)
    loaded = DeviceIdentity.load_or_create(path)
    assert loaded.public_key_hex == made.public_key_hex
    assert loaded == made
    assert path.read_bytes() == bytes(made.signing_key)


def test_names_derived_from_the_public_key(tmp_path: Path) -> None:
    """key_id is the first 16 hex digits of sha256(public key); the device id is dev-<key_id>."""
    identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
    public = bytes.fromhex(identity.public_key_hex)
    assert public == bytes(identity.verify_key)
    assert len(public) == 32
    assert identity.key_id == hashlib.sha256(public).hexdigest()[:16]
    assert identity.default_device_id() == f"dev-{identity.key_id}"


def test_key_file_is_private(tmp_path: Path) -> None:
    """The key file is created with mode 0600 (and its new directory 0700)."""
    path = tmp_path / "new-dir" / "device.key"
    DeviceIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_refuses_a_key_open_to_others(tmp_path: Path) -> None:
    """A key file readable by group or others is refused, not used and not replaced."""
    path = tmp_path / "device.key"
    DeviceIdentity.load_or_create(path)
    before = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="has mode 0644, open to group or others; it must be"):
        DeviceIdentity.load_or_create(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "shown"), [(b"", "0"), (b"\1" * 31, "31"), (b"\1" * 33, "more")]
)
def test_refuses_a_key_of_the_wrong_length(tmp_path: Path, content: bytes, shown: str) -> None:
    """A key file that is not exactly a 32-byte seed is refused, never regenerated over."""
    path = tmp_path / "device.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=rf"is not a 32-byte ed25519 seed \({shown} bytes\)"):
        DeviceIdentity.load_or_create(path)
    assert path.read_bytes() == content


def test_refuses_a_directory(tmp_path: Path) -> None:
    """A directory where the key file should be is refused with a clear sentence."""
    path = tmp_path / "device.key"
    path.mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="is not a regular file"):
        DeviceIdentity.load_or_create(path)


def test_unreadable_path_is_an_identity_error(tmp_path: Path) -> None:
    """A key path that cannot be opened (here: under a file) is an IdentityError."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(IdentityError, match=r"cannot read the device key .* \(Not a directory\)"):
        DeviceIdentity.load_or_create(blocker / "device.key")
    assert issubclass(IdentityError, EdgedError)


def test_failed_creation_is_an_identity_error() -> None:
    """Failing to persist a new key is an IdentityError (/proc/self refuses new files, even to
    root)."""
    with pytest.raises(IdentityError, match=r"cannot write the device key /proc/self/device\.key"):
        DeviceIdentity.load_or_create(Path("/proc/self/device.key"))


def test_repr_hides_the_seed(tmp_path: Path) -> None:
    """repr and str show the key id only, never seed bytes in any spelling."""
    identity = DeviceIdentity.load_or_create(tmp_path / "device.key")
    seed = bytes(identity.signing_key)
    for text in (repr(identity), str(identity), f"{identity}"):
        assert text == f"DeviceIdentity(key_id={identity.key_id!r})"
        assert seed.hex() not in text
        assert repr(seed) not in text


def test_creation_leaves_no_temporary_files(tmp_path: Path) -> None:
    """Atomic creation leaves exactly the key file in its directory."""
    DeviceIdentity.load_or_create(tmp_path / "device.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]


def test_from_seed_checks_length() -> None:
    """A seed of the wrong length is refused by from_seed as well."""
    assert DeviceIdentity.from_seed(bytes(32)).key_id
    with pytest.raises(IdentityError, match="a device key seed has 32 bytes, not 16"):
        DeviceIdentity.from_seed(bytes(16))
