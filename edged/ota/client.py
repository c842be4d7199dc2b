"""The device's update client: the TUF trust walk over a Fetcher, and verified artifacts.

`refresh()` runs the client workflow of docs/ota.md with one clock reading for the whole
update; only when every role was accepted are the new files written (each atomically), so a
refused update changes nothing on disk and the next one starts from the last good set.
`fetch_target()` returns a file whose length and sha256 match the signed target: from a delta
patch when the device holds the parent the patch was made from, otherwise (or when anything
about the patch is wrong) from the full artifact, resumed where a previous attempt stopped.
Trust decisions stay in edged_formats.tuf; this module only moves bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edged.atomic import atomic_write, fsync_directory
from edged.errors import EdgedError
from edged.ota.delta import PatchError, apply_patch
from edged.ota.fetcher import Fetcher, FetchError, NotFound, TooLarge, ensure_space
from edged.ota.slots import fault_point
from edged_formats.errors import TrustError
from edged_formats.tuf import (
    TargetFile,
    TrustedSet,
    TrustLimits,
    artifact_path,
    check_bytes,
    metadata_path,
)

__all__ = ["Fetched", "MetadataStore", "UpdateClient", "UpdateError", "UpdatePolicy"]

log = logging.getLogger("edged.ota")
Progress = Callable[[str, dict[str, object]], None]


class UpdateError(EdgedError):
    """The update cannot proceed on this device (no trusted root, nothing to install)."""


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """What this device accepts: its hardware tag and channel, download caps, disk reserve."""

    hardware: str = "any"
    channel: str = "stable"
    limits: TrustLimits = field(default_factory=TrustLimits)
    reserve_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified artifact on disk and how it got there."""

    path: Path
    via: str  # "cache", "patch" or "full"
    fetched_bytes: int
    fallback: str | None = None  # why a patch was not used, when one was listed


class MetadataStore:
    """The last accepted copy of each role, one file per role, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def read(self, role: str) -> bytes | None:
        try:
            return (self.directory / f"{role}.json").read_bytes()
        except FileNotFoundError:
            return None

    def write(self, role: str, data: bytes) -> None:
        atomic_write(self.directory / f"{role}.json", data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class UpdateClient:
    def __init__(
        self,
        fetcher: Fetcher,
        state_dir: Path,
        policy: UpdatePolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        progress: Progress | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.policy = policy or UpdatePolicy()
        self.metadata = MetadataStore(state_dir / "metadata")
        self.downloads = state_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.progress = progress or (lambda _step, _fields: None)

    # -- metadata ---------------------------------------------------------------------------

    def refresh(self) -> TrustedSet:
        """Walk root, then timestamp, snapshot and targets; TrustError or FetchError on refusal."""
        limits = self.policy.limits
        root = self.metadata.read("root")
        if root is None:
            raise UpdateError("no trusted root metadata on this device; enroll it first")
        trusted = TrustedSet(root, self.clock(), limits)
        accepted: dict[str, bytes] = {}  # written only once the whole walk succeeded
        while True:
            try:
                data = self.fetcher.fetch(
                    metadata_path("root", trusted.root.version + 1), limits.root_bytes
                )
            except NotFound:
                break
            trusted.update_root(data)
            accepted["root"] = data
        for dropped in trusted.trust_previous(
            self.metadata.read("timestamp"), self.metadata.read("snapshot")
        ):
            log.warning("update metadata: %s", dropped)
        data = self.fetcher.fetch(metadata_path("timestamp"), limits.timestamp_bytes)
        trusted.update_timestamp(data)
        accepted["timestamp"] = data
        assert trusted.timestamp is not None
        meta = trusted.timestamp.snapshot
        data = self._versioned("snapshot", meta.version, meta.length, meta.sha256, trusted)
        trusted.update_snapshot(data)
        accepted["snapshot"] = data
        assert trusted.snapshot is not None
        meta = trusted.snapshot.targets
        data = self._versioned("targets", meta.version, meta.length, meta.sha256, trusted)
        trusted.update_targets(data)
        accepted["targets"] = data
        for role, data in accepted.items():  # in walk order: a crash between two is recovered
            if data != self.metadata.read(role):
                self.metadata.write(role, data)
        return trusted

    def _versioned(
        self, role: str, version: int, length: int | None, sha256: str | None, trusted: TrustedSet
    ) -> bytes:
        """The local copy when it is exactly what the newer role names, else a download."""
        local = self.metadata.read(role)
        if local is not None and sha256 is not None:
            try:
                check_bytes(local, length, sha256, role)
            except TrustError:
                pass
            else:
                return local
        cap = length if length is not None else getattr(self.policy.limits, f"{role}_bytes")
        path = metadata_path(role, version if trusted.root.consistent_snapshot else None)
        return self.fetcher.fetch(path, cap)

    # -- artifacts --------------------------------------------------------------------------

    def fetch_target(self, target: TargetFile, parent: Path | None) -> Fetched:
        """A file holding exactly `target`'s bytes (length and sha256 checked)."""
        final = self.downloads / f"{target.sha256}.edb"
        if final.exists() and _sha256_file(final) == target.sha256:
            return Fetched(final, "cache", 0)
        final.unlink(missing_ok=True)
        ensure_space(self.downloads, target.length, self.policy.reserve_bytes)
        fallback = None
        patch = None
        if parent is not None and target.patches:
            patch = target.patches.get(_sha256_file(parent))
            if patch is None:
                fallback = "no patch from the model this device holds"
        if patch is not None:
            self.progress("patch", {"target": target.name, "bytes": patch.length})
            try:
                data = self.fetcher.fetch(artifact_path(patch.name, patch.sha256), patch.length)
                check_bytes(data, patch.length, patch.sha256, f"patch {patch.name}")
                rebuilt = apply_patch(parent.read_bytes(), data, max_output=target.length)  # type: ignore[union-attr]
                TrustedSet.check_artifact(target, rebuilt)
            except (FetchError, TrustError, PatchError) as exc:
                fallback = f"patch not used: {exc}"
                log.warning("update %s: %s", target.name, fallback)
            else:
                fault_point("patch")  # test hook: rebuilt in memory, not yet written
                atomic_write(final, rebuilt)
                return Fetched(final, "patch", len(data))
        return self._full(target, final, fallback)

    def _full(self, target: TargetFile, final: Path, fallback: str | None) -> Fetched:
        part = self.downloads / f"{target.sha256}.part"
        resumed_from = part.stat().st_size if part.exists() else 0
        self.progress(
            "download", {"target": target.name, "bytes": target.length, "resume": resumed_from}
        )
        try:
            self.fetcher.download(artifact_path(target), part, target.length)
        except TooLarge:
            part.unlink(missing_ok=True)  # a server sending too much is not resumed from
            raise
        try:
            TrustedSet.check_artifact(target, part.read_bytes())
        except TrustError:
            part.unlink(missing_ok=True)  # never resume from bytes that proved wrong
            raise
        os.replace(part, final)
        fsync_directory(self.downloads)
        return Fetched(final, "full", target.length - resumed_from, fallback)

    def prune(self, keep: set[Path]) -> None:
        """Remove downloads that are not in `keep` (after an install or a refusal)."""
        for path in self.downloads.iterdir():
            if path not in keep:
                path.unlink(missing_ok=True)
