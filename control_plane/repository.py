"""The update repository the control plane serves (docs/ota.md): signed metadata in the
database, artifacts and patches as immutable files, signing with the online keys.

    store = RepositoryStore(settings, db)
    result = await store.run(work)      # work(tx) in one transaction, serialised, retried
        tx.publish(targets, now)        #   targets + snapshot + timestamp (or pending targets)
        tx.install_root(data, now)      #   root N+1 checked with the devices' own rules
    await store.refresh(now)            # re-sign what is past half its lifetime

Every metadata version is a row keyed by (role, version), never changed; a timestamp refresh
adds a row and `timestamp.json` is the newest. Publishing runs in one transaction that holds a
PostgreSQL advisory lock (and a process-local lock), and the key makes two replicas that signed
the same next version collide: the loser rolls back and retries on the new state. The signing
itself is edged_formats.tuf.Repository, the code the device-side simulator runs.

Keys come from `key_dir` at every signing (so rotated key files are picked up without a
restart); a root key there is refused, and so is a root whose online keys the server lacks.

    ControlPlaneError
    └── RepositoryError     nothing to sign with, no root yet, a key directory holding a root key
        └── RootRefused     root metadata the trust rules refuse (threshold, version, expiry)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import PendingTargets, RepositoryMetadata
from control_plane.errors import ControlPlaneError
from control_plane.settings import Settings
from control_plane.signing_keys import load_keys, role_signers
from edged.atomic import atomic_write
from edged_formats.errors import TrustError
from edged_formats.tuf import (
    Envelope,
    Expiry,
    Repository,
    Root,
    TargetFile,
    Targets,
    TrustedSet,
    artifact_path,
    canonical_json,
    check_target_name,
    parse_json,
)

__all__ = ["RepositoryError", "RepositoryStore", "RootRefused", "Transaction", "current_root"]

log = logging.getLogger("control_plane.repository")
T = TypeVar("T")
ATTEMPTS = 6
LOCK_KEY = 0x6564_6765_6472_7031  # "edgedrp1": the repository's advisory lock
METADATA_FILE = re.compile(r"^(?:timestamp|([1-9][0-9]{0,18})\.(root|targets|snapshot))\.json$")
SIGNED_ROLES = ("targets", "snapshot", "timestamp")


class RepositoryError(ControlPlaneError):
    """The repository cannot sign or publish: no root yet, keys missing or misplaced."""


class RootRefused(RepositoryError):
    """Root metadata refused by the rules devices apply (signatures, version, expiry)."""


def _parse(data: bytes, role: str) -> Any:
    return Envelope.parse(data, role).signed  # type: ignore[arg-type]


def _due(row: RepositoryMetadata, now: float) -> bool:
    """Past half its lifetime: time to re-sign, long before any device sees it expire."""
    return now >= row.created_at + (row.expires_at - row.created_at) / 2


@dataclass(slots=True)
class _State:
    """The newest row of each role (None: not published yet) and the pending targets."""

    rows: dict[str, RepositoryMetadata | None]
    pending: PendingTargets | None = None

    @property
    def root(self) -> Root:
        row = self.rows["root"]
        if row is None:
            raise RepositoryError(
                "the repository has no root metadata yet; run `edged-control-plane keys init`"
                " offline, then `root install` or `root publish`"
            )
        signed = _parse(row.data, "root")
        assert isinstance(signed, Root)
        return signed


@dataclass(slots=True)
class Transaction:
    """One unit of work on the repository inside the store's transaction."""

    store: RepositoryStore
    session: AsyncSession
    _state: _State | None = field(default=None)

    async def state(self) -> _State:
        if self._state is None:
            rows: dict[str, RepositoryMetadata | None] = {}
            for role in ("root", *SIGNED_ROLES):
                rows[role] = await self.session.scalar(
                    select(RepositoryMetadata)
                    .where(RepositoryMetadata.role == role)
                    .order_by(RepositoryMetadata.version.desc())
                    .limit(1)
                )
            pending = await self.session.scalar(
                select(PendingTargets).order_by(PendingTargets.version.desc()).limit(1)
            )
            self._state = _State(rows, pending)
        return self._state

    async def current_targets(self) -> dict[str, TargetFile]:
        row = (await self.state()).rows["targets"]
        return dict(_parse(row.data, "targets").targets) if row is not None else {}

    # -- signing ----------------------------------------------------------------------------

    def signer(self, state: _State, root_row: RepositoryMetadata) -> tuple[Repository, bool]:
        """A Repository resumed at the stored versions, and whether targets are signed here."""
        root = _parse(root_row.data, "root")
        keys = self.store.keys(root)
        signers = {role: role_signers(root, role, keys) for role in SIGNED_ROLES}
        for role in ("snapshot", "timestamp"):
            needed = root.roles[role].threshold
            if len(signers[role]) < needed:
                raise RepositoryError(
                    f"the server holds {len(signers[role])} of the {needed} {role} key(s) root"
                    f" v{root.version} names; put the key file in {self.store.key_dir}"
                )
        online_targets = len(signers["targets"]) >= root.roles["targets"].threshold
        repo = Repository([root_row.data], signers, self.store.expiry)
        for role in SIGNED_ROLES:  # resume at the stored versions
            row = state.rows[role]
            if row is not None:
                repo.resume(role, row.data)
        return repo, online_targets

    def store_files(self, files: Mapping[str, bytes], now: float) -> None:
        for path, data in files.items():
            role = path.rsplit("/", 1)[-1].removesuffix(".json").rsplit(".", 1)[-1]
            signed = _parse(data, role)
            row = RepositoryMetadata(
                role=role,
                version=signed.version,
                data=data,
                sha256=hashlib.sha256(data).hexdigest(),
                expires_at=float(signed.expires),
                created_at=now,
            )
            self.session.add(row)
            assert self._state is not None
            self._state.rows[role] = row

    async def publish(self, targets: Mapping[str, TargetFile], now: float) -> int:
        """New targets listing exactly `targets`, then snapshot and timestamp; with offline
        targets keys, a pending targets document instead (signed by `targets sign`). The new
        targets version."""
        state = await self.state()
        root_row = state.rows["root"]
        _ = state.root  # no root: RepositoryError
        assert root_row is not None
        repo, online = self.signer(state, root_row)
        if online:
            new = repo.publish(targets, int(now))
            self.store_files(new, now)
            assert repo.targets is not None
            return repo.targets.version
        return await self._pend(state, targets, now)

    async def _pend(self, state: _State, targets: Mapping[str, TargetFile], now: float) -> int:
        current = state.rows["targets"]
        version = max(
            current.version if current else 0, state.pending.version if state.pending else 0
        )
        document = Targets(
            version=version + 1, expires=int(now) + self.store.expiry.targets, targets=targets
        )
        await self.session.execute(delete(PendingTargets))  # superseded
        state.pending = PendingTargets(
            version=document.version,
            signed=canonical_json(document.to_dict()),
            signatures={},
            created_at=now,
        )
        self.session.add(state.pending)
        return document.version

    async def add_targets_signatures(self, version: int, signatures: Mapping[str, str]) -> int:
        """Add offline signatures (key id -> hex) to pending targets `version`; once they reach
        the threshold, publish it with a new snapshot and timestamp. Signatures still missing."""
        state = await self.state()
        pending, root = state.pending, state.root
        if pending is None or pending.version != version:
            raise RepositoryError(f"no targets v{version} is waiting for signatures")
        keys, threshold = root.role_keys("targets")
        collected = dict(pending.signatures)
        for keyid, sig in signatures.items():
            key = keys.get(keyid)
            if key is None:
                raise RootRefused(f"key {keyid[:12]} is not a targets key of root v{root.version}")
            if not key.verifies(bytes.fromhex(sig), pending.signed):
                raise RootRefused(f"the signature by key {keyid[:12]} does not verify")
            collected[keyid] = sig
        pending.signatures = collected
        missing = threshold - len(collected)
        if missing > 0:
            return missing
        body = {
            "signed": parse_json(pending.signed, "pending targets"),
            "signatures": [{"keyid": k, "sig": s} for k, s in sorted(collected.items())],
        }
        data = canonical_json(body)
        envelope = Envelope.parse(data, "targets")
        assert isinstance(envelope.signed, Targets)
        root_row = state.rows["root"]
        assert root_row is not None
        repo, _online = self.signer(state, root_row)
        now = time.time()
        self.store_files(repo.sign_targets(envelope.signed, data, int(now)), now)
        await self.session.delete(pending)
        state.pending = None
        return 0

    # -- root -------------------------------------------------------------------------------

    async def install_root(self, data: bytes, now: float) -> Root:
        """Root N+1 (or the first root), checked as a device would, then re-published under."""
        state = await self.state()
        current = state.rows["root"]
        try:
            if current is None:
                trusted = TrustedSet(data, now)  # checks its own signatures
                if trusted.root.version != 1:
                    raise RootRefused(
                        f"the first root installed must be version 1, not v{trusted.root.version}"
                    )
            else:
                trusted = TrustedSet(current.data, now)
                trusted.update_root(data)
        except TrustError as exc:
            raise RootRefused(str(exc)) from exc
        new = trusted.root
        if new.is_expired(now):
            raise RootRefused(f"root v{new.version} has already expired")
        previous_targets = await self.current_targets()
        row = RepositoryMetadata(
            role="root",
            version=new.version,
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            expires_at=float(new.expires),
            created_at=now,
        )
        self.session.add(row)
        state.rows["root"] = row
        repo, online = self.signer(state, row)  # refuses a root whose online keys are missing
        targets_row = state.rows["targets"]
        if online:
            self.store_files(repo.publish(previous_targets, int(now)), now)
        elif targets_row is not None and _still_signed(new, targets_row.data):
            self.store_files(repo.sign_targets(repo.targets, targets_row.data, int(now)), now)  # type: ignore[arg-type]
        else:
            await self._pend(state, previous_targets, now)
        return new


def _still_signed(root: Root, targets_bytes: bytes) -> bool:
    envelope = Envelope.parse(targets_bytes, "targets")
    keys, threshold = root.role_keys("targets")
    return len(envelope.valid_keyids(keys)) >= threshold


async def current_root(session: AsyncSession) -> bytes | None:
    """The newest root metadata, what a device enrolled now is given to trust."""
    row = await session.scalar(
        select(RepositoryMetadata)
        .where(RepositoryMetadata.role == "root")
        .order_by(RepositoryMetadata.version.desc())
        .limit(1)
    )
    return row.data if row is not None else None


class RepositoryStore:
    """The repository of one control plane: database rows, artifact files, key directory."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.db = db
        self.key_dir = settings.signing_key_dir
        self.directory = settings.artifact_dir
        self.expiry = Expiry(
            root=365 * 86_400,
            targets=settings.targets_expiry_s,
            snapshot=settings.snapshot_expiry_s,
            timestamp=settings.timestamp_expiry_s,
        )
        self.check_s = settings.repository_check_s
        self._lock = asyncio.Lock()

    # -- keys -------------------------------------------------------------------------------

    def keys(self, root: Root) -> dict[str, Any]:
        """The online keys in `key_dir`; a root key there is refused outright."""
        keys = load_keys(self.key_dir)
        leaked = sorted(set(keys) & set(root.roles["root"].keyids))
        if leaked:
            raise RepositoryError(
                f"{self.key_dir} holds the root key {leaked[0][:16]}; root keys must stay"
                " offline: remove it (and rotate root, it may be compromised)"
            )
        return keys

    # -- transactions -----------------------------------------------------------------------

    async def run(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """`work` in one transaction, serialised across processes; retried from scratch when
        another replica published the same version first (or SQLite was busy)."""
        for attempt in range(ATTEMPTS):
            async with self._lock, self.db.session() as session:
                try:
                    if self.db.dialect == "postgresql":
                        await session.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY}
                        )
                    result = await work(Transaction(self, session))
                    await session.commit()
                    return result
                except (IntegrityError, OperationalError) as exc:
                    await session.rollback()
                    if attempt == ATTEMPTS - 1:
                        raise
                    log.info("repository publish collided (%s); retrying", type(exc).__name__)
            await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    async def refresh(self, now: float) -> list[str]:
        """Re-sign every online role past half its lifetime; the roles re-signed."""

        async def work(tx: Transaction) -> list[str]:
            state = await tx.state()
            root_row = state.rows["root"]
            if root_row is None or state.rows["timestamp"] is None:
                return []
            repo, online = tx.signer(state, root_row)
            rows = state.rows
            assert rows["targets"] is not None and rows["snapshot"] is not None
            if online and _due(rows["targets"], now):
                tx.store_files(repo.publish(await tx.current_targets(), int(now)), now)
                return ["targets", "snapshot", "timestamp"]
            pended = []
            if not online and _due(rows["targets"], now) and state.pending is None:
                version = await tx._pend(state, await tx.current_targets(), now)
                log.warning(
                    "targets are past half their lifetime: run `targets sign` (v%d)", version
                )
                pended = [f"pending targets v{version}"]
            if _due(rows["snapshot"], now):
                targets = _parse(rows["targets"].data, "targets")
                tx.store_files(repo.sign_targets(targets, rows["targets"].data, int(now)), now)
                return [*pended, "snapshot", "timestamp"]
            if _due(rows["timestamp"], now):  # type: ignore[arg-type]
                tx.store_files(repo.refresh_timestamp(int(now)), now)
                return [*pended, "timestamp"]
            return pended

        return await self.run(work)

    async def _refresher(self) -> None:
        while True:
            try:
                roles = await self.refresh(time.time())
                if roles:
                    log.info("re-signed %s", ", ".join(roles))
            except Exception:  # keep refreshing: a passing database error must not stop it
                log.exception("repository refresh failed")
            await asyncio.sleep(self.check_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RepositoryStore]:
        """The store with its timestamp refresher; refuses a key directory with a root key."""
        async with self.db.session() as session:
            tx = Transaction(self, session)
            state = await tx.state()
            if state.rows["root"] is None:
                log.warning("no root metadata installed: devices cannot update yet")
            else:
                self.keys(state.root)
        task = asyncio.create_task(self._refresher(), name="repository-refresher")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- reading ----------------------------------------------------------------------------

    async def metadata(self, session: AsyncSession, name: str) -> RepositoryMetadata | None:
        """The stored file served as `metadata/<name>`."""
        match = METADATA_FILE.match(name)
        if match is None:
            return None
        if match[1] is None:
            return await session.scalar(
                select(RepositoryMetadata)
                .where(RepositoryMetadata.role == "timestamp")
                .order_by(RepositoryMetadata.version.desc())
                .limit(1)
            )
        return await session.get(RepositoryMetadata, (match[2], int(match[1])))

    # -- artifacts --------------------------------------------------------------------------

    def write_artifact(self, name: str, data: bytes) -> tuple[str, str]:
        """Store `data` as target `name` (content-addressed, atomically); (sha256, served path
        under targets/)."""
        check_target_name(name, "artifact name")
        sha = hashlib.sha256(data).hexdigest()
        served = artifact_path(name, sha)
        path = self.directory / served
        if not (path.is_file() and path.stat().st_size == len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, mode=0o644)
        return sha, served

    def artifact(self, served: str) -> Path | None:
        """The file for `targets/<served>`, when it is a safe path to an existing file."""
        try:
            check_target_name(served, "artifact path")
        except TrustError:
            return None
        base = (self.directory / "targets").resolve()
        path = (base / served).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return None
        return path

    def read_artifact(self, name: str, sha256: str) -> bytes:
        return (self.directory / artifact_path(name, sha256)).read_bytes()
