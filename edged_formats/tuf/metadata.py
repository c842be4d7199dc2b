"""The four metadata roles as frozen values, their strict parsing, and signing.

`Envelope.parse(bytes)` checks the JSON shape and returns the signed part both as a value
(`Root`, `Timestamp`, `Snapshot`, `Targets`) and as the canonical bytes the signatures cover;
whether the signatures suffice is the trusted set's decision. `sign(signed, keys)` is the
repository side. docs/ota.md describes every field.
"""

from __future__ import annotations

import abc
import calendar
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from edged_formats.errors import MetadataError
from edged_formats.tuf.keys import PublicKey, SigningKey, canonical_json, parse_json

__all__ = [
    "ROLES",
    "Envelope",
    "MetaFile",
    "Patch",
    "Role",
    "Root",
    "Signed",
    "Snapshot",
    "TargetFile",
    "Targets",
    "Timestamp",
    "check_target_name",
    "format_expiry",
    "sign",
]

SPEC_VERSION = "1.0"
ROLES = ("root", "targets", "snapshot", "timestamp")
RoleName = Literal["root", "targets", "snapshot", "timestamp"]
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXPIRY = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_SEGMENT = re.compile(r"^[a-z0-9._-]{1,128}$")
_MAX_VERSION = 2**63 - 1


def format_expiry(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch_s)))


def _expiry(value: Any, where: str) -> int:
    if not isinstance(value, str) or not _EXPIRY.match(value):
        raise MetadataError(f"{where}.expires must read YYYY-MM-DDTHH:MM:SSZ")
    try:
        return calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError as exc:
        raise MetadataError(f"{where}.expires is not a real date") from exc


def _object(
    value: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetadataError(f"{where} must be a JSON object")
    missing = required - value.keys()
    if missing:
        raise MetadataError(f"{where} lacks {', '.join(sorted(missing))}")
    unknown = value.keys() - required - optional
    if unknown:
        raise MetadataError(f"{where} has unknown field {sorted(unknown)[0]!r}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_VERSION:
        raise MetadataError(f"{where} must be an integer >= {minimum}")
    return value


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, dict) or set(value) != {"sha256"}:
        raise MetadataError(f'{where} must be {{"sha256": <64 hex digits>}}')
    digest = value["sha256"]
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise MetadataError(f"{where}.sha256 is not 64 lowercase hex digits")
    return digest


def check_target_name(name: Any, where: str) -> str:
    """Relative paths of [a-z0-9._-] segments; `.`, `..` and empty segments are refused."""
    if not isinstance(name, str) or len(name) > 512:
        raise MetadataError(f"{where} must be a string of at most 512 characters")
    for segment in name.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise MetadataError(f"{where} {name!r} is not a safe relative path")
    return name


@dataclass(frozen=True, slots=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int

    def to_dict(self) -> dict[str, Any]:
        return {"keyids": list(self.keyids), "threshold": self.threshold}


@dataclass(frozen=True, slots=True)
class MetaFile:
    """What timestamp says of snapshot.json, and snapshot of targets.json."""

    version: int
    length: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        if self.length is not None:
            out["length"] = self.length
        if self.sha256 is not None:
            out["hashes"] = {"sha256": self.sha256}
        return out

    @classmethod
    def from_dict(cls, value: Any, where: str) -> MetaFile:
        obj = _object(value, where, {"version"}, frozenset({"length", "hashes"}))
        return cls(
            _int(obj["version"], f"{where}.version", 1),
            _int(obj["length"], f"{where}.length", 0) if "length" in obj else None,
            _sha256(obj["hashes"], f"{where}.hashes") if "hashes" in obj else None,
        )


@dataclass(frozen=True, slots=True)
class Patch:
    """A delta from the parent artifact whose sha256 keys it (docs/ota.md)."""

    name: str
    length: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TargetFile:
    """An installable artifact. `custom` keeps every field, known or not (newer servers)."""

    name: str
    length: int
    sha256: str
    custom: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "hashes": {"sha256": self.sha256},
            "custom": dict(self.custom),
        }

    @classmethod
    def from_dict(cls, name: str, value: Any, where: str) -> TargetFile:
        obj = _object(value, where, {"length", "hashes"}, frozenset({"custom"}))
        custom = obj.get("custom", {})
        if not isinstance(custom, dict):
            raise MetadataError(f"{where}.custom must be a JSON object")
        target = cls(
            check_target_name(name, "target name"),
            _int(obj["length"], f"{where}.length", 0),
            _sha256(obj["hashes"], f"{where}.hashes"),
            custom,
        )
        _ = target.hardware, target.channel, target.patches  # type-check the known fields now
        return target

    def _text(self, key: str) -> str | None:
        value = self.custom.get(key)
        if value is not None and not isinstance(value, str):
            raise MetadataError(f"target {self.name}: custom.{key} must be a string")
        return value

    @property
    def model(self) -> str | None:
        return self._text("model")

    @property
    def version(self) -> str | None:
        return self._text("version")

    @property
    def parent(self) -> str | None:
        return self._text("parent")

    @property
    def channel(self) -> str | None:
        return self._text("channel")

    @property
    def hardware(self) -> tuple[str, ...]:
        value = self.custom.get("hardware", ["any"])
        if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
            raise MetadataError(f"target {self.name}: custom.hardware must be a list of strings")
        return tuple(value)

    @property
    def patches(self) -> dict[str, Patch]:
        value = self.custom.get("patches", {})
        where = f"target {self.name}: custom.patches"
        if not isinstance(value, dict):
            raise MetadataError(f"{where} must be a JSON object")
        out = {}
        for parent_sha, entry in value.items():
            if not _SHA256.match(parent_sha):
                raise MetadataError(f"{where} is keyed by something other than a sha256")
            obj = _object(entry, f"{where}[{parent_sha[:12]}]", {"name", "length", "hashes"})
            out[parent_sha] = Patch(
                check_target_name(obj["name"], f"{where} name"),
                _int(obj["length"], f"{where} length", 0),
                _sha256(obj["hashes"], f"{where} hashes"),
            )
        return out

    def fits(self, hardware: str, channel: str) -> bool:
        tags = self.hardware
        return ("any" in tags or hardware in tags) and (self.channel in (None, channel))


@dataclass(frozen=True, slots=True, kw_only=True)
class Signed(abc.ABC):
    """What every role has: `_type`, `spec_version`, `version`, `expires`."""

    role: ClassVar[RoleName]
    version: int
    expires: int  # epoch seconds

    def is_expired(self, now: float) -> bool:
        return now >= self.expires

    def _common(self) -> dict[str, Any]:
        return {
            "_type": self.role,
            "spec_version": SPEC_VERSION,
            "version": self.version,
            "expires": format_expiry(self.expires),
        }

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The `signed` object, as signatures cover it (after canonical_json)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Root(Signed):
    role: ClassVar[RoleName] = "root"
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    consistent_snapshot: bool = True

    def role_keys(self, name: str) -> tuple[dict[str, PublicKey], int]:
        role = self.roles[name]
        return {k: self.keys[k] for k in role.keyids}, role.threshold

    def to_dict(self) -> dict[str, Any]:
        return self._common() | {
            "consistent_snapshot": self.consistent_snapshot,
            "keys": {keyid: key.to_dict() for keyid, key in self.keys.items()},
            "roles": {name: role.to_dict() for name, role in self.roles.items()},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Timestamp(Signed):
    role: ClassVar[RoleName] = "timestamp"
    snapshot: MetaFile

    def to_dict(self) -> dict[str, Any]:
        return self._common() | {"meta": {"snapshot.json": self.snapshot.to_dict()}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot(Signed):
    role: ClassVar[RoleName] = "snapshot"
    targets: MetaFile

    def to_dict(self) -> dict[str, Any]:
        return self._common() | {"meta": {"targets.json": self.targets.to_dict()}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Targets(Signed):
    role: ClassVar[RoleName] = "targets"
    targets: Mapping[str, TargetFile]

    def to_dict(self) -> dict[str, Any]:
        return self._common() | {"targets": {n: t.to_dict() for n, t in self.targets.items()}}


_FIELDS: dict[str, set[str]] = {
    "root": {"consistent_snapshot", "keys", "roles"},
    "timestamp": {"meta"},
    "snapshot": {"meta"},
    "targets": {"targets"},
}


def _parse_root(obj: dict[str, Any], common: dict[str, int]) -> Root:
    keys_obj = obj["keys"]
    if not isinstance(keys_obj, dict):
        raise MetadataError("root.keys must be a JSON object")
    keys = {}
    for keyid, value in keys_obj.items():
        key = PublicKey.from_dict(value, f"root.keys[{str(keyid)[:12]}]")
        if key.keyid != keyid:
            raise MetadataError(f"root.keys lists key {str(keyid)[:12]} under the wrong id")
        keys[keyid] = key
    roles_obj = _object(obj["roles"], "root.roles", set(ROLES))
    roles = {}
    for name in ROLES:
        role = _object(roles_obj[name], f"root.roles.{name}", {"keyids", "threshold"})
        keyids = role["keyids"]
        if not isinstance(keyids, list) or len(set(keyids)) != len(keyids):
            raise MetadataError(f"root.roles.{name}.keyids must be a list without repeats")
        if any(k not in keys for k in keyids):
            raise MetadataError(f"root.roles.{name} names a key that root.keys does not list")
        threshold = _int(role["threshold"], f"root.roles.{name}.threshold", 1)
        if threshold > len(keyids):
            raise MetadataError(f"root.roles.{name}.threshold exceeds its number of keys")
        roles[name] = Role(tuple(keyids), threshold)
    if not isinstance(obj["consistent_snapshot"], bool):
        raise MetadataError("root.consistent_snapshot must be true or false")
    return Root(**common, keys=keys, roles=roles, consistent_snapshot=obj["consistent_snapshot"])


def _parse_signed(obj: Any, expected: RoleName) -> Signed:
    if not isinstance(obj, dict) or obj.get("_type") != expected:
        raise MetadataError(f"metadata is not {expected} metadata (_type)")
    _object(obj, expected, {"_type", "spec_version", "version", "expires"} | _FIELDS[expected])
    if obj["spec_version"] != SPEC_VERSION:
        raise MetadataError(
            f"{expected} metadata has spec_version {obj['spec_version']!r}, not {SPEC_VERSION}"
        )
    common = {
        "version": _int(obj["version"], f"{expected}.version", 1),
        "expires": _expiry(obj["expires"], expected),
    }
    if expected == "root":
        return _parse_root(obj, common)
    if expected == "targets":
        targets = obj["targets"]
        if not isinstance(targets, dict):
            raise MetadataError("targets.targets must be a JSON object")
        return Targets(
            **common,
            targets={n: TargetFile.from_dict(n, v, f"targets[{n!r}]") for n, v in targets.items()},
        )
    meta_name = "snapshot.json" if expected == "timestamp" else "targets.json"
    meta = _object(obj["meta"], f"{expected}.meta", {meta_name})
    info = MetaFile.from_dict(meta[meta_name], f"{expected}.meta[{meta_name}]")
    if expected == "timestamp":
        return Timestamp(**common, snapshot=info)
    return Snapshot(**common, targets=info)


@dataclass(frozen=True, slots=True)
class Envelope:
    """Parsed metadata: the signed value, the bytes signed, and the signatures by key id."""

    signed: Signed
    signed_bytes: bytes
    signatures: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, data: bytes, role: RoleName) -> Envelope:
        doc = _object(
            parse_json(data, f"{role} metadata"), f"{role} metadata", {"signed", "signatures"}
        )
        sigs = doc["signatures"]
        if not isinstance(sigs, list) or len(sigs) > 1024:
            raise MetadataError(f"{role} metadata: signatures must be a list (at most 1024)")
        signatures = []
        for entry in sigs:
            obj = _object(entry, f"{role} signature", {"keyid", "sig"})
            try:
                signatures.append((str(obj["keyid"]), bytes.fromhex(obj["sig"])))
            except (TypeError, ValueError) as exc:
                raise MetadataError(f"{role} metadata has a signature that is not hex") from exc
        signed = _parse_signed(doc["signed"], role)
        return cls(signed, canonical_json(doc["signed"]), tuple(signatures))

    def valid_keyids(self, keys: Mapping[str, PublicKey]) -> set[str]:
        """Distinct key ids among `keys` with a valid signature: a repeated key counts once."""
        valid = set()
        for keyid, signature in self.signatures:
            key = keys.get(keyid)
            if (
                key is not None
                and keyid not in valid
                and key.verifies(signature, self.signed_bytes)
            ):
                valid.add(keyid)
        return valid


def sign(signed: Signed, keys: Sequence[SigningKey]) -> bytes:
    """Metadata bytes for `signed` carrying one signature per key (repository side)."""
    body = signed.to_dict()
    message = canonical_json(body)
    signatures = [{"keyid": k.keyid, "sig": k.sign(message).hex()} for k in keys]
    return canonical_json({"signed": body, "signatures": signatures})
