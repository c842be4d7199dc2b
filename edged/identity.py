"""The device's ed25519 key pair, kept on disk as its 32-byte seed.

`DeviceIdentity.load_or_create(path)` reads the seed or, when the file does not exist yet,
makes a new key and persists it atomically (temporary file in the same directory with mode
0600, fsync, rename, fsync the directory). A key file that group or others may read or write,
that is not a regular file, or that does not hold exactly 32 bytes is refused with an
`IdentityError`: the key is never regenerated over an existing file. The seed is never logged
or shown; `repr` shows the key id only.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from edged.atomic import atomic_write
from edged.errors import IdentityError

__all__ = ["SEED_BYTES", "DeviceIdentity"]

SEED_BYTES = 32
KEY_FILE_MODE = 0o600


@dataclass(frozen=True, slots=True, repr=False)
class DeviceIdentity:
    """An ed25519 signing key and the names derived from its public half."""

    signing_key: SigningKey

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceIdentity:
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"a device key seed has {SEED_BYTES} bytes, not {len(seed)}")
        return cls(SigningKey(seed))

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceIdentity:
        """The identity stored at `path`, made and stored first if the file does not exist."""
        try:
            return cls.from_seed(_read_seed(path))
        except FileNotFoundError:
            pass
        signing_key = SigningKey.generate()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, bytes(signing_key), mode=KEY_FILE_MODE)
        except OSError as exc:
            raise IdentityError(
                f"cannot write the device key {path} ({exc.strerror or exc})"
            ) from exc
        return cls(signing_key)

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def public_key_hex(self) -> str:
        return bytes(self.verify_key).hex()

    @property
    def key_id(self) -> str:
        """First 16 hex digits of the sha256 of the public key."""
        return hashlib.sha256(bytes(self.verify_key)).hexdigest()[:16]

    def default_device_id(self) -> str:
        """The device id used until an operator assigns one: `dev-<key id>`."""
        return f"dev-{self.key_id}"

    def __repr__(self) -> str:
        return f"DeviceIdentity(key_id={self.key_id!r})"


def _read_seed(path: Path) -> bytes:
    """The seed in `path`; FileNotFoundError passes through so the caller can create it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(f"cannot read the device key {path} ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"device key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise IdentityError(
                f"device key {path} has mode {stat.S_IMODE(info.st_mode):04o}, open to group or "
                "others; it must be 0600"
            )
        seed = os.read(fd, SEED_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read the device key {path} ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(seed) != SEED_BYTES:
        raise IdentityError(
            f"device key {path} is not a {SEED_BYTES}-byte ed25519 seed "
            f"({len(seed) if len(seed) <= SEED_BYTES else 'more'} bytes)"
        )
    return seed
