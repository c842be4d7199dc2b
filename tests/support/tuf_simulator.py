"""An in-memory update repository that is also a Fetcher, and can serve any attack.

Each test changes the simulator (rotate keys, replay old files, tamper, stall, grow a file
without end), runs a refresh, and asserts the exact refusal and that nothing on disk changed.
After python-tuf's RepositorySimulator; the signing itself is edged_formats.tuf.Repository,
the same code the control plane runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edged.ota.fetcher import FetchError, NotFound, TooLarge
from edged_formats.tuf import (
    DAY,
    ROLES,
    Repository,
    SigningKey,
    TargetFile,
    artifact_path,
    new_root,
    sign,
)

__all__ = ["NOW", "RepositorySimulator", "snapshot_tree"]

NOW = 1_800_000_000  # a fixed clock: 2027-01-15


class RepositorySimulator:
    def __init__(self, now: int = NOW, thresholds: Mapping[str, int] | None = None) -> None:
        self.now = now
        self.keys: dict[str, list[SigningKey]] = {
            role: [SigningKey.generate() for _ in range((thresholds or {}).get(role, 1))]
            for role in ROLES
        }
        self.thresholds = dict(thresholds or {})
        root = new_root(1, now + 365 * DAY, self.keys, self.thresholds)
        self.repo = Repository([sign(root, self.keys["root"])], self.keys)
        self.targets: dict[str, TargetFile] = {}
        self.blobs: dict[str, bytes] = {}  # served path -> bytes
        self.overrides: dict[str, bytes] = {}  # served instead of the real file
        self.stalled: set[str] = set()  # paths whose fetch times out
        self.requests: list[str] = []
        self.publish()

    @property
    def first_root(self) -> bytes:
        return self.repo.roots[0]

    # -- repository changes -----------------------------------------------------------------

    def add_target(
        self, name: str, data: bytes, *, publish: bool = True, **custom: Any
    ) -> TargetFile:
        sha = hashlib.sha256(data).hexdigest()
        custom = {"hardware": ["any"], "channel": "stable"} | custom
        target = TargetFile(name, len(data), sha, custom)
        self.targets[name] = target
        self.blobs[artifact_path(target)] = data
        if publish:
            self.publish()
        return target

    def add_blob(self, name: str, data: bytes) -> tuple[str, int, str]:
        """A patch or other file served by its hash: (name, length, sha256)."""
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[artifact_path(name, sha)] = data
        return name, len(data), sha

    def publish(self) -> dict[str, bytes]:
        return self.repo.publish(self.targets, self.now)

    def rotate(
        self,
        role: str,
        new_keys: Sequence[SigningKey],
        *,
        threshold: int = 1,
        signed_by: Sequence[SigningKey] | None = None,
    ) -> bytes:
        """Root N+1 giving `role` new keys; signed by old and new root keys unless `signed_by`."""
        old_root_keys = self.keys["root"]
        self.keys[role] = list(new_keys)
        self.thresholds[role] = threshold
        current = self.repo.root
        root = new_root(current.version + 1, self.now + 365 * DAY, self.keys, self.thresholds)
        signers = signed_by if signed_by is not None else [*old_root_keys, *self.keys["root"]]
        data = sign(root, list(dict.fromkeys(signers)))
        self.repo.add_root(data)
        self.repo.signers[role] = list(new_keys)
        return data

    def files(self) -> dict[str, bytes]:
        return self.repo.files() | self.blobs | self.overrides

    # -- Fetcher ----------------------------------------------------------------------------

    def _serve(self, path: str) -> bytes:
        self.requests.append(path)
        if path in self.stalled:
            raise FetchError(f"{path}: the server stalled (timeout)")
        files = self.files()
        if path not in files:
            raise NotFound(f"{path} is not on the server")
        return files[path]

    def fetch(self, path: str, max_bytes: int) -> bytes:
        data = self._serve(path)
        if len(data) > max_bytes:
            raise TooLarge(f"{path} is longer than the {max_bytes} bytes allowed")
        return data

    def download(self, path: str, dest: Path, max_bytes: int) -> None:
        have = dest.stat().st_size if dest.exists() else 0
        data = self._serve(path)[have:]
        if have + len(data) > max_bytes:
            raise TooLarge(f"{path} is longer than the {max_bytes} bytes allowed")
        with dest.open("ab") as out:
            out.write(data)


def snapshot_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: compare before and after a refused update."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
