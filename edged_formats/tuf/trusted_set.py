"""The client's trust decisions: bytes and one fixed clock in, trusted metadata or an error out.

    ts = TrustedSet(local_root_bytes, now)      # clock fixed for the whole update
    ts.update_root(next_root) ...               # while N+1.root.json exists (capped)
    ts.trust_previous(timestamp=..., snapshot=...)  # last accepted copies: rollback floors
    ts.update_timestamp(data); ts.update_snapshot(data); ts.update_targets(data)
    target = ts.target(name, hardware, channel); ts.check_artifact(target, data)

No I/O: the updater fetches (with the caps `limits` gives), persists what was accepted, and
decides what to install. Every refusal is a TrustError subclass naming the problem; nothing
trusted changes when an update_* call raises. docs/ota.md lists the rules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edged_formats.errors import (
    ExpiredError,
    MetadataError,
    MismatchError,
    RollbackError,
    TargetRefused,
    ThresholdError,
    TrustError,
)
from edged_formats.tuf.metadata import (
    Envelope,
    MetaFile,
    RoleName,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
    format_expiry,
)

__all__ = ["TrustLimits", "TrustedSet", "check_bytes"]


@dataclass(frozen=True, slots=True)
class TrustLimits:
    """Byte caps of every download, and the cap on root rotations in one update."""

    root_bytes: int = 512 * 1024
    timestamp_bytes: int = 64 * 1024
    snapshot_bytes: int = 512 * 1024
    targets_bytes: int = 4 * 1024 * 1024
    max_root_rotations: int = 32


def check_bytes(data: bytes, length: int | None, sha256: str | None, what: str) -> None:
    """Length, then sha256, against what signed metadata says."""
    if length is not None and len(data) != length:
        raise MismatchError(f"{what} is {len(data)} bytes, signed metadata says {length}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise MismatchError(f"{what} does not match the sha256 in signed metadata")


class TrustedSet:
    """Trusted metadata of one update session (python-tuf's TrustedMetadataSet, reduced)."""

    def __init__(self, root: bytes, now: float, limits: TrustLimits | None = None) -> None:
        self.now = now
        self.limits = limits or TrustLimits()
        envelope = Envelope.parse(root, "root")
        trusted = envelope.signed
        assert isinstance(trusted, Root)
        self._verify(envelope, trusted, "root")
        self.root: Root = trusted
        self.root_bytes = root
        self.rotations = 0
        self.timestamp: Timestamp | None = None
        self.snapshot: Snapshot | None = None
        self.targets: Targets | None = None
        self._previous_timestamp: Timestamp | None = None
        self._previous_snapshot: Snapshot | None = None

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _verify(envelope: Envelope, root: Root, role: RoleName, as_of: str = "") -> None:
        keys, threshold = root.role_keys(role)
        valid = envelope.valid_keyids(keys)
        if len(valid) < threshold:
            source = as_of or f"root v{root.version}"
            raise ThresholdError(
                f"{role} v{envelope.signed.version} has {len(valid)} valid signature(s) from"
                f" {role} keys of {source}, needs {threshold}"
            )

    def _check_expiry(self, signed: Root | Timestamp | Snapshot | Targets) -> None:
        if signed.is_expired(self.now):
            raise ExpiredError(
                f"{signed.role} v{signed.version} expired at {format_expiry(signed.expires)};"
                " cannot update until the server publishes fresh metadata"
            )

    # -- root -------------------------------------------------------------------------------

    def update_root(self, data: bytes) -> Root:
        """Accept root N+1: signed by a threshold of the old root keys and of its own."""
        if self.timestamp is not None:
            raise TrustError("root cannot change after timestamp was accepted in this update")
        if self.rotations >= self.limits.max_root_rotations:
            raise RollbackError(
                f"more than {self.limits.max_root_rotations} root rotations in one update"
            )
        envelope = Envelope.parse(data, "root")
        new = envelope.signed
        assert isinstance(new, Root)
        self._verify(envelope, self.root, "root", f"the trusted root v{self.root.version}")
        self._verify(envelope, new, "root", f"its own root v{new.version}")
        if new.version != self.root.version + 1:
            raise RollbackError(
                f"root v{new.version} does not follow the trusted root v{self.root.version}"
            )
        self.root, self.root_bytes = new, data
        self.rotations += 1
        return new

    def trust_previous(self, timestamp: bytes | None, snapshot: bytes | None) -> list[str]:
        """Adopt the last accepted timestamp and snapshot as rollback floors, if the final root
        still vouches for them; returns what was dropped and why (keys rotated: the fast-forward
        recovery of TUF 5.3.11). Expiry does not matter for a floor."""
        found: dict[str, Timestamp | Snapshot] = {}
        for role, data in (("timestamp", timestamp), ("snapshot", snapshot)):
            if data is None:
                continue
            try:
                envelope = Envelope.parse(data, role)  # type: ignore[arg-type]
                self._verify(envelope, self.root, role)  # type: ignore[arg-type]
            except TrustError as exc:
                # keys rotated (or the copy is damaged): forget both, as TUF 5.3.11 says
                return [f"previous {role} dropped with its partner: {exc}"]
            assert isinstance(envelope.signed, Timestamp | Snapshot)
            found[role] = envelope.signed
        ts, snap = found.get("timestamp"), found.get("snapshot")
        previous_ts = ts if isinstance(ts, Timestamp) else None
        previous_snap = snap if isinstance(snap, Snapshot) else None
        dropped = []
        if previous_snap and (
            previous_ts is None or previous_snap.version != previous_ts.snapshot.version
        ):
            previous_snap = None
            dropped.append("previous snapshot dropped: not the one the previous timestamp names")
        self._previous_timestamp, self._previous_snapshot = previous_ts, previous_snap
        return dropped

    # -- timestamp, snapshot, targets -------------------------------------------------------

    def update_timestamp(self, data: bytes) -> Timestamp:
        self._check_expiry(self.root)
        envelope = Envelope.parse(data, "timestamp")
        new = envelope.signed
        assert isinstance(new, Timestamp)
        self._verify(envelope, self.root, "timestamp")
        previous = self._previous_timestamp
        if previous is not None:
            if new.version < previous.version:
                raise RollbackError(
                    f"timestamp v{new.version} is older than the trusted v{previous.version}"
                )
            if new.snapshot.version < previous.snapshot.version:
                raise RollbackError(
                    f"timestamp names snapshot v{new.snapshot.version}, older than the trusted"
                    f" v{previous.snapshot.version}"
                )
            if new.version == previous.version and new != previous:
                raise RollbackError(f"timestamp v{new.version} was re-signed with other content")
        self._check_expiry(new)
        self.timestamp = new
        return new

    def update_snapshot(self, data: bytes) -> Snapshot:
        if self.timestamp is None:
            raise TrustError("snapshot cannot be checked before timestamp")
        expected = self.timestamp.snapshot
        check_bytes(data, expected.length, expected.sha256, f"snapshot v{expected.version}")
        envelope = Envelope.parse(data, "snapshot")
        new = envelope.signed
        assert isinstance(new, Snapshot)
        self._verify(envelope, self.root, "snapshot")
        if new.version != expected.version:
            raise RollbackError(
                f"snapshot v{new.version} is not the v{expected.version} timestamp names"
            )
        previous = self._previous_snapshot
        if previous is not None and new.targets.version < previous.targets.version:
            raise RollbackError(
                f"snapshot names targets v{new.targets.version}, older than the trusted"
                f" v{previous.targets.version}"
            )
        self._check_expiry(new)
        self.snapshot = new
        return new

    def update_targets(self, data: bytes) -> Targets:
        if self.snapshot is None:
            raise TrustError("targets cannot be checked before snapshot")
        expected: MetaFile = self.snapshot.targets
        check_bytes(data, expected.length, expected.sha256, f"targets v{expected.version}")
        envelope = Envelope.parse(data, "targets")
        new = envelope.signed
        assert isinstance(new, Targets)
        self._verify(envelope, self.root, "targets")
        if new.version != expected.version:
            raise RollbackError(
                f"targets v{new.version} is not the v{expected.version} snapshot names"
            )
        self._check_expiry(new)
        self.targets = new
        return new

    # -- artifacts --------------------------------------------------------------------------

    def target(self, name: str, hardware: str, channel: str) -> TargetFile:
        """The signed entry for `name`, if this device may install it."""
        if self.targets is None:
            raise TrustError("no trusted targets metadata in this update")
        found = self.targets.targets.get(name)
        if found is None:
            raise TargetRefused(f"target {name!r} is not in targets v{self.targets.version}")
        try:
            fits = found.fits(hardware, channel)
        except MetadataError as exc:
            raise TargetRefused(str(exc)) from exc
        if not fits:
            raise TargetRefused(
                f"target {name} is for hardware {list(found.hardware)} on channel"
                f" {found.channel!r}, this device is {hardware!r} on {channel!r}"
            )
        return found

    @staticmethod
    def check_artifact(target: TargetFile, data: bytes) -> None:
        check_bytes(data, target.length, target.sha256, f"artifact {target.name}")
