"""The model registry: bundles operators upload, their versions and lineage, and the targets
metadata they make.

    row = await upload(store, data, UploadOptions(channel="stable"), uploader, audit)
    row = await revoke(store, "digits", "1.3.0", revoker, audit)

An upload is checked with edged_formats.bundle.read_bundle before anything is kept; its
artifact is stored under the repository's targets (content-addressed, atomically), a delta
patch is made from the parent version when the registry holds it and the patch is smaller than
the artifact, and then one transaction inserts the row and publishes a new targets version
listing every model that is not revoked (the audit entry commits with it). Revoking removes the
model from targets metadata, which is how devices stop installing it (docs/ota.md).

    ControlPlaneError
    └── RegistryError
        ├── BundleRefused    the upload is not a valid bundle, or its name cannot be a target
        ├── ModelExists      that name and version are already in the registry
        ├── ModelNotFound    no such name and version
        └── ModelRevoked     the version was revoked already
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import ModelVersion
from control_plane.errors import ControlPlaneError
from control_plane.repository import RepositoryStore, Transaction
from edged.ota.delta import make_patch
from edged_formats.bundle import BundleLimits, read_bundle
from edged_formats.errors import BundleError
from edged_formats.manifest import Manifest
from edged_formats.tuf import TargetFile

__all__ = [
    "BundleRefused",
    "ModelExists",
    "ModelNotFound",
    "ModelRevoked",
    "RegistryError",
    "UploadOptions",
    "find",
    "lineage",
    "listed_targets",
    "revoke",
    "upload",
]

SAFE_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_LINEAGE = 100


class RegistryError(ControlPlaneError):
    """A registry request that cannot be carried out; the message names why."""


class BundleRefused(RegistryError):
    """The upload is not a valid bundle, or its name or version cannot name a target."""


class ModelExists(RegistryError):
    """The registry already holds that name and version."""


class ModelNotFound(RegistryError):
    """The registry holds no such name and version."""


class ModelRevoked(RegistryError):
    """The version was revoked already."""


class Audit(Protocol):
    def __call__(
        self, session: AsyncSession, action: str, target: str | None, **detail: Any
    ) -> None:
        """Add an audit entry to `session`'s transaction."""


@dataclass(frozen=True, slots=True)
class UploadOptions:
    """Where a model may be installed: its channel and hardware compatibility tags."""

    channel: str = "stable"
    hardware: tuple[str, ...] = ("any",)


def target_name(name: str, version: str) -> str:
    return f"models/{name}/{version}.edb"


def patch_name(name: str, parent: str, version: str) -> str:
    return f"patches/{name}/{parent}-{version}.zst"


def summary(manifest: Manifest) -> dict[str, Any]:
    """What the registry keeps of a manifest (the bundle itself keeps the rest)."""
    return {
        "format_version": manifest.format_version,
        "created_at": manifest.created_at,
        "input": {
            "name": manifest.input.name,
            "shape": list(manifest.input.shape),
            "dtype": manifest.input.dtype,
        },
        "output": {
            "name": manifest.output.name,
            "shape": list(manifest.output.shape),
            "kind": manifest.output.kind,
        },
        "canaries": len(manifest.canaries.expected_top1),
        "fine_tunable": manifest.head is not None,
        "metrics": dict(manifest.metrics),
    }


def target_file(row: ModelVersion) -> TargetFile:
    """The model as targets metadata lists it (docs/ota.md, "Metadata")."""
    custom: dict[str, Any] = {
        "model": row.name,
        "version": row.version,
        "hardware": list(row.hardware),
        "channel": row.channel,
        "patches": dict(row.patches),
    }
    if row.parent_version is not None:
        custom["parent"] = row.parent_version
    return TargetFile(row.target, row.length, row.sha256, custom)


async def listed_targets(session: AsyncSession) -> dict[str, TargetFile]:
    """Every model that is not revoked, as targets."""
    rows = await session.scalars(
        select(ModelVersion).where(ModelVersion.revoked_at.is_(None)).order_by(ModelVersion.id)
    )
    return {row.target: target_file(row) for row in rows}


async def find(session: AsyncSession, name: str, version: str) -> ModelVersion | None:
    return await session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


async def lineage(session: AsyncSession, row: ModelVersion) -> list[ModelVersion]:
    """The registered ancestors of `row`, parent first (stops at a version not registered)."""
    chain: list[ModelVersion] = []
    seen = {row.version}
    parent = row.parent_version
    while parent is not None and parent not in seen and len(chain) < MAX_LINEAGE:
        found = await find(session, row.name, parent)
        if found is None:
            break
        chain.append(found)
        seen.add(parent)
        parent = found.parent_version
    return chain


def _checked(data: bytes, max_bytes: int) -> Manifest:
    try:
        bundle = read_bundle(data, BundleLimits(max_total_bytes=max_bytes))
    except BundleError as exc:
        raise BundleRefused(str(exc)) from exc
    manifest = bundle.manifest
    for what, value in (("name", manifest.name), ("version", manifest.version)):
        if not SAFE_SEGMENT.match(value):
            raise BundleRefused(
                f"bundle {what} '{value}' cannot name an update target: use lowercase letters,"
                " digits, '.', '_' and '-', starting with a letter or digit"
            )
    if manifest.parent_version is not None and not SAFE_SEGMENT.match(manifest.parent_version):
        raise BundleRefused(
            f"bundle parent_version '{manifest.parent_version}' cannot name an update target"
        )
    return manifest


async def upload(
    store: RepositoryStore,
    data: bytes,
    options: UploadOptions,
    uploader: str,
    audit: Audit,
    *,
    max_bytes: int,
) -> ModelVersion:
    """Check, store and publish one bundle; the registry row."""
    manifest = await asyncio.to_thread(_checked, data, max_bytes)
    name, version, parent = manifest.name, manifest.version, manifest.parent_version
    async with store.db.session() as session:
        if await find(session, name, version) is not None:
            raise ModelExists(f"model {name} {version} is already in the registry")
        parent_row = await find(session, name, parent) if parent is not None else None
    target = target_name(name, version)
    sha, _ = await asyncio.to_thread(store.write_artifact, target, data)
    patches: dict[str, Any] = {}
    if parent_row is not None:
        patch = await asyncio.to_thread(_patch, store, parent_row, data)
        if len(patch) < len(data):
            assert parent is not None
            pname = patch_name(name, parent, version)
            patch_sha, _ = await asyncio.to_thread(store.write_artifact, pname, patch)
            patches[parent_row.sha256] = {
                "name": pname,
                "length": len(patch),
                "hashes": {"sha256": patch_sha},
            }

    async def work(tx: Transaction) -> ModelVersion:
        if await find(tx.session, name, version) is not None:
            raise ModelExists(f"model {name} {version} is already in the registry")
        row = ModelVersion(
            name=name,
            version=version,
            parent_version=parent,
            target=target,
            sha256=sha,
            length=len(data),
            channel=options.channel,
            hardware=sorted(set(options.hardware)),
            manifest=summary(manifest),
            patches=patches,
            uploaded_at=time.time(),
            uploaded_by=uploader,
        )
        tx.session.add(row)
        await tx.session.flush()
        targets_version = await tx.publish(await listed_targets(tx.session), time.time())
        audit(
            tx.session,
            "model.upload",
            f"{name}/{version}",
            sha256=sha,
            length=len(data),
            parent=parent,
            channel=row.channel,
            hardware=row.hardware,
            patches=len(patches),
            targets_version=targets_version,
        )
        return row

    return await store.run(work)


def _patch(store: RepositoryStore, parent: ModelVersion, data: bytes) -> bytes:
    return make_patch(store.read_artifact(parent.target, parent.sha256), data)


async def revoke(
    store: RepositoryStore, name: str, version: str, revoker: str, audit: Audit
) -> ModelVersion:
    """Take a version out of targets metadata (its files stay: they are immutable)."""

    async def work(tx: Transaction) -> ModelVersion:
        row = await find(tx.session, name, version)
        if row is None:
            raise ModelNotFound(f"no model {name} {version} in the registry")
        if row.revoked_at is not None:
            raise ModelRevoked(f"model {name} {version} was revoked already")
        row.revoked_at, row.revoked_by = time.time(), revoker
        await tx.session.flush()
        targets_version = await tx.publish(await listed_targets(tx.session), time.time())
        audit(tx.session, "model.revoke", f"{name}/{version}", targets_version=targets_version)
        return row

    return await store.run(work)


def hardware_tags(values: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(sorted(set(values))) if values else ("any",)
