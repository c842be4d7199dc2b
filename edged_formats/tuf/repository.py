"""The repository side: make and sign new metadata versions (pure, values in, files out).

A `Repository` holds every published root (signed elsewhere when root keys are offline), the
current targets, snapshot and timestamp, and the keys it may sign with. `files()` is the whole
consistent-snapshot layout as {path: bytes}; the control plane stores and serves it, tests
serve it from memory (docs/ota.md, "Repository layout").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edged_formats.errors import TrustError
from edged_formats.tuf.keys import SigningKey
from edged_formats.tuf.metadata import (
    ROLES,
    Envelope,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
    sign,
)

__all__ = ["DAY", "Expiry", "Repository", "artifact_path", "metadata_path", "new_root"]

DAY = 86_400


@dataclass(frozen=True, slots=True)
class Expiry:
    """How long each role's metadata stays valid once signed, in seconds."""

    root: int = 365 * DAY
    targets: int = 90 * DAY
    snapshot: int = 7 * DAY
    timestamp: int = DAY


def metadata_path(role: str, version: int | None = None) -> str:
    return f"metadata/{role}.json" if version is None else f"metadata/{version}.{role}.json"


def artifact_path(target: TargetFile | str, sha256: str | None = None) -> str:
    """`models/x/1.0.edb` with sha256 S is served as `targets/models/x/S.1.0.edb`."""
    name = target if isinstance(target, str) else target.name
    digest = sha256 if sha256 is not None else getattr(target, "sha256", None)
    folder, _, base = name.rpartition("/")
    return f"targets/{folder + '/' if folder else ''}{digest}.{base}"


def new_root(
    version: int,
    expires: int,
    keys: Mapping[str, Sequence[SigningKey]],
    thresholds: Mapping[str, int] | None = None,
) -> Root:
    """A root naming `keys[role]` for every role (threshold 1 unless `thresholds` says)."""
    thresholds = thresholds or {}
    public = {k.keyid: k.public_key for role in ROLES for k in keys[role]}
    roles = {
        role: Role(tuple(k.keyid for k in keys[role]), thresholds.get(role, 1)) for role in ROLES
    }
    return Root(version=version, expires=expires, keys=public, roles=roles)


def _meta(data: bytes, version: int) -> MetaFile:
    return MetaFile(version, len(data), hashlib.sha256(data).hexdigest())


class Repository:
    """Current metadata plus the online signers; every method returns the new files."""

    def __init__(
        self,
        roots: Sequence[bytes],
        signers: Mapping[str, Sequence[SigningKey]],
        expiry: Expiry | None = None,
    ) -> None:
        if not roots:
            raise TrustError("a repository needs its first root metadata")
        self.roots = list(roots)
        self.signers = {role: list(keys) for role, keys in signers.items()}
        self.expiry = expiry or Expiry()
        self.targets: Targets | None = None
        self.snapshot: Snapshot | None = None
        self.timestamp: Timestamp | None = None
        self._files: dict[str, bytes] = {}
        for data in self.roots:
            self._files[metadata_path("root", _version(data))] = data

    @property
    def root(self) -> Root:
        signed = Envelope.parse(self.roots[-1], "root").signed
        assert isinstance(signed, Root)
        return signed

    def _signers(self, role: str) -> list[SigningKey]:
        keys = self.signers.get(role, [])
        if not keys:
            raise TrustError(f"the repository holds no {role} key")
        return keys

    def add_root(self, data: bytes) -> None:
        """Publish root N+1 (signed offline by old and new root keys)."""
        version = _version(data)
        if version != self.root.version + 1:
            raise TrustError(f"root v{version} does not follow v{self.root.version}")
        self.roots.append(data)
        self._files[metadata_path("root", version)] = data

    def publish(self, targets: Mapping[str, TargetFile], now: int) -> dict[str, bytes]:
        """New targets, snapshot and timestamp versions listing exactly `targets`."""
        version = self.targets.version + 1 if self.targets else 1
        self.targets = Targets(
            version=version, expires=now + self.expiry.targets, targets=dict(targets)
        )
        return self.sign_targets(self.targets, sign(self.targets, self._signers("targets")), now)

    def sign_targets(self, targets: Targets, data: bytes, now: int) -> dict[str, bytes]:
        """Adopt targets metadata signed elsewhere (offline targets keys) and re-snapshot."""
        self.targets = targets
        new = {metadata_path("targets", targets.version): data}
        snap_version = self.snapshot.version + 1 if self.snapshot else 1
        self.snapshot = Snapshot(
            version=snap_version,
            expires=now + self.expiry.snapshot,
            targets=_meta(data, targets.version),
        )
        snapshot_bytes = sign(self.snapshot, self._signers("snapshot"))
        new[metadata_path("snapshot", snap_version)] = snapshot_bytes
        new.update(self._timestamp(snapshot_bytes, now))
        self._files.update(new)
        return new

    def refresh_timestamp(self, now: int) -> dict[str, bytes]:
        """A new timestamp naming the same snapshot (run well before the old one expires)."""
        if self.snapshot is None:
            raise TrustError("nothing is published yet")
        snapshot_bytes = self._files[metadata_path("snapshot", self.snapshot.version)]
        new = self._timestamp(snapshot_bytes, now)
        self._files.update(new)
        return new

    def _timestamp(self, snapshot_bytes: bytes, now: int) -> dict[str, bytes]:
        assert self.snapshot is not None
        version = self.timestamp.version + 1 if self.timestamp else 1
        self.timestamp = Timestamp(
            version=version,
            expires=now + self.expiry.timestamp,
            snapshot=_meta(snapshot_bytes, self.snapshot.version),
        )
        return {metadata_path("timestamp"): sign(self.timestamp, self._signers("timestamp"))}

    def resume(self, role: str, data: bytes) -> None:
        """Take stored metadata as the current `role` (a repository restarting from disk)."""
        if role not in ("targets", "snapshot", "timestamp"):
            raise TrustError(f"only targets, snapshot and timestamp resume, not {role}")
        signed = Envelope.parse(data, role)  # type: ignore[arg-type]
        setattr(self, role, signed.signed)
        version = None if role == "timestamp" else signed.signed.version
        self._files[metadata_path(role, version)] = data

    def files(self) -> dict[str, bytes]:
        return dict(self._files)


def _version(root_bytes: bytes) -> int:
    return Envelope.parse(root_bytes, "root").signed.version
