"""Signing key files, and the offline side of root metadata: make the first root, sign the next.

Two directories, never the same one:

- the **offline directory** (an air-gapped machine, a USB stick): root keys, targets keys when
  targets are signed offline, and every `N.root.json` signed so far. The server never reads it.
- the server's **key directory** (`key_dir`, default `<data_dir>/keys`): the online keys only,
  timestamp and snapshot, and targets unless targets are offline.

A key file is `<role>-<first 16 hex of its key id>.key` (edged_formats.tuf.SigningKey's format,
mode 0600, written atomically); which role a key serves is what root metadata says, the file
name is only for people. `sign_next_root` makes root N+1 with rotated roles and signs it with a
threshold of the old root keys and of the new, which is what every device checks.

    ControlPlaneError
    └── KeyFileError    a key directory that cannot be read or written, a key that is missing
                        or below threshold, a root that cannot be made (control_plane.signing_keys)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.errors import ControlPlaneError
from edged.atomic import atomic_write
from edged_formats.errors import TrustError
from edged_formats.tuf import DAY, ROLES, Envelope, PublicKey, Role, Root, SigningKey, sign

__all__ = [
    "KeyFileError",
    "OfflineRoot",
    "init_keys",
    "latest_root",
    "load_keys",
    "role_signers",
    "sign_next_root",
    "sign_pending_targets",
    "write_key",
]

ONLINE_ROLES = ("timestamp", "snapshot")
_ROOT_FILE = re.compile(r"^([1-9][0-9]{0,18})\.root\.json$")


class KeyFileError(ControlPlaneError):
    """A key or root file that cannot be read, written, found or used."""


def write_key(directory: Path, role: str, key: SigningKey) -> Path:
    """The key's file in `directory` (made 0700), mode 0600."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{role}-{key.keyid[:16]}.key"
    try:
        atomic_write(path, key.to_file_bytes(), mode=0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot write the key file {path}: {exc.strerror or exc}") from exc
    return path


def load_keys(directory: Path) -> dict[str, SigningKey]:
    """Every key file in `directory` by key id; an absent directory holds none."""
    keys: dict[str, SigningKey] = {}
    try:
        paths = sorted(directory.glob("*.key"))
    except OSError as exc:
        raise KeyFileError(f"cannot list the key directory {directory}: {exc}") from exc
    for path in paths:
        try:
            key = SigningKey.from_file_bytes(path.read_bytes(), f"key file {path}")
        except OSError as exc:
            raise KeyFileError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
        except TrustError as exc:
            raise KeyFileError(str(exc)) from exc
        keys[key.keyid] = key
    return keys


def role_signers(root: Root, role: str, keys: Mapping[str, SigningKey]) -> list[SigningKey]:
    """The keys of `role` in `root` found among `keys`, in root's order."""
    return [keys[k] for k in root.roles[role].keyids if k in keys]


def _needs_threshold(root: Root, role: str, held: Sequence[SigningKey], where: str) -> None:
    threshold = root.roles[role].threshold
    if len(held) < threshold:
        raise KeyFileError(
            f"{where} holds {len(held)} of the {threshold} {role} key(s) root v{root.version} needs"
        )


@dataclass(frozen=True, slots=True)
class OfflineRoot:
    """The newest root metadata in an offline directory."""

    root: Root
    data: bytes
    path: Path


def latest_root(offline_dir: Path) -> OfflineRoot:
    """The highest `N.root.json` of `offline_dir`."""
    try:
        found = [(int(m[1]), p) for p in offline_dir.iterdir() if (m := _ROOT_FILE.match(p.name))]
    except OSError as exc:
        raise KeyFileError(f"cannot list the offline directory {offline_dir}: {exc}") from exc
    if not found:
        raise KeyFileError(f"{offline_dir} holds no N.root.json; run `keys init` first")
    _, path = max(found)
    data = path.read_bytes()
    try:
        signed = Envelope.parse(data, "root").signed
    except TrustError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    assert isinstance(signed, Root)
    return OfflineRoot(signed, data, path)


def _generate(count: int) -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(count)]


def _write_root(offline_dir: Path, root: Root, signers: Iterable[SigningKey]) -> Path:
    data = sign(root, list({k.keyid: k for k in signers}.values()))
    path = offline_dir / f"{root.version}.root.json"
    if path.exists():
        raise KeyFileError(f"{path} exists already; root metadata is never overwritten")
    atomic_write(path, data, mode=0o644)
    return path


def init_keys(
    offline_dir: Path,
    key_dir: Path,
    *,
    root_keys: int = 1,
    root_threshold: int = 1,
    targets_offline: bool = False,
    expires_s: int = 365 * DAY,
    now: float | None = None,
) -> Path:
    """New keys for every role and `1.root.json` signed by the root keys; its path."""
    if not 1 <= root_threshold <= root_keys:
        raise KeyFileError("the root threshold must be between 1 and the number of root keys")
    if offline_dir.resolve() == key_dir.resolve():
        raise KeyFileError("the offline directory and the server's key directory must differ")
    if offline_dir.exists() and any(_ROOT_FILE.match(p.name) for p in offline_dir.iterdir()):
        raise KeyFileError(f"{offline_dir} already holds root metadata; use `root sign` to rotate")
    offline_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(offline_dir, 0o700)
    keys = {"root": _generate(root_keys)} | {role: _generate(1) for role in ROLES[1:]}
    for role, role_keys in keys.items():
        offline = role == "root" or (role == "targets" and targets_offline)
        for key in role_keys:
            write_key(offline_dir if offline else key_dir, role, key)
    root = Root(
        version=1,
        expires=int(now if now is not None else time.time()) + expires_s,
        keys={k.keyid: k.public_key for role_keys in keys.values() for k in role_keys},
        roles={
            role: Role(tuple(k.keyid for k in keys[role]), root_threshold if role == "root" else 1)
            for role in ROLES
        },
    )
    return _write_root(offline_dir, root, keys["root"])


def sign_next_root(
    offline_dir: Path,
    *,
    rotate: Sequence[str] = (),
    key_dir: Path | None = None,
    root_keys: int | None = None,
    root_threshold: int | None = None,
    expires_s: int = 365 * DAY,
    now: float | None = None,
) -> Path:
    """Root N+1 giving each role in `rotate` fresh keys (as many, with the same threshold,
    unless `root_keys`/`root_threshold` say otherwise for root), signed by a threshold of the
    old root keys and of the new; its path. New online keys go to `key_dir` (copy them to the
    server before publishing the root), new root and offline targets keys to `offline_dir`."""
    unknown = sorted(set(rotate) - set(ROLES))
    if unknown:
        raise KeyFileError(f"cannot rotate {unknown[0]!r}: roles are {', '.join(ROLES)}")
    current = latest_root(offline_dir)
    old = current.root
    offline_keys = load_keys(offline_dir)
    old_root_signers = role_signers(old, "root", offline_keys)
    _needs_threshold(old, "root", old_root_signers, str(offline_dir))
    targets_offline = bool(role_signers(old, "targets", offline_keys))
    public: dict[str, PublicKey] = {}
    roles: dict[str, Role] = {}
    new_root_keys = old_root_signers
    for role in ROLES:
        if role not in rotate:
            roles[role] = old.roles[role]
            public.update({k: old.keys[k] for k in old.roles[role].keyids})
            continue
        count, threshold = len(old.roles[role].keyids), old.roles[role].threshold
        if role == "root":
            count = root_keys or count
            threshold = root_threshold or min(threshold, count)
        if not 1 <= threshold <= count:
            raise KeyFileError(f"the {role} threshold must be between 1 and its number of keys")
        fresh = _generate(count)
        offline = role == "root" or (role == "targets" and targets_offline)
        if not offline and key_dir is None:
            raise KeyFileError(f"rotating {role} needs --key-dir for its new online key")
        destination = offline_dir if offline else key_dir
        assert destination is not None
        for key in fresh:
            write_key(destination, role, key)
        if role == "root":
            new_root_keys = fresh
        roles[role] = Role(tuple(k.keyid for k in fresh), threshold)
        public.update({k.keyid: k.public_key for k in fresh})
    root = Root(
        version=old.version + 1,
        expires=int(now if now is not None else time.time()) + expires_s,
        keys=public,
        roles=roles,
        consistent_snapshot=old.consistent_snapshot,
    )
    _needs_threshold(root, "root", new_root_keys, str(offline_dir))
    return _write_root(offline_dir, root, [*old_root_signers, *new_root_keys])


def sign_pending_targets(offline_dir: Path, url: str, token: str) -> str:
    """Fetch the targets waiting for signatures, check they are targets metadata, sign them
    with the offline targets keys this directory holds, post the signatures; what was done."""
    import httpx

    from edged_formats.tuf import canonical_json, parse_json

    keys = load_keys(offline_dir)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60) as client:
            response = client.get("/v1/repository/pending-targets")
            if response.status_code == 404:
                return "no targets metadata is waiting for signatures"
            _ok(response, "the pending targets")
            pending = response.json()
            signed = str(pending["signed"]).encode("utf-8")
            document = parse_json(signed, "pending targets")
            if canonical_json(document) != signed:
                raise KeyFileError("the pending targets are not in canonical form; not signed")
            envelope = canonical_json({"signed": document, "signatures": []})
            targets = Envelope.parse(envelope, "targets").signed
            signatures = [
                {"keyid": k, "sig": keys[k].sign(signed).hex()}
                for k in pending["keyids"]
                if k in keys
            ]
            if not signatures:
                raise KeyFileError(f"{offline_dir} holds none of the targets keys root names")
            response = client.post(
                "/v1/repository/targets/signatures",
                json={"version": pending["version"], "signatures": signatures},
            )
            _ok(response, "the signatures")
    except httpx.HTTPError as exc:
        raise KeyFileError(f"cannot reach {url}: {exc}") from exc
    except TrustError as exc:
        raise KeyFileError(f"the pending targets are not valid targets metadata: {exc}") from exc
    listed = ", ".join(sorted(getattr(targets, "targets", {}))) or "no targets"
    return f"signed targets v{targets.version} ({listed}) with {len(signatures)} key(s)"


def _ok(response: Any, what: str) -> None:
    if response.status_code != 200:
        try:
            detail = response.json()["detail"]
        except (ValueError, KeyError, TypeError):
            detail = f"HTTP {response.status_code}"
        raise KeyFileError(f"the control plane refused {what}: {detail}")
