"""Signed update metadata after The Update Framework: roles, keys, and the client's trust
decisions (pure: bytes and a clock in, values or a TrustError out). docs/ota.md."""

from edged_formats.tuf.keys import PublicKey, SigningKey, canonical_json, parse_json
from edged_formats.tuf.metadata import (
    ROLES,
    Envelope,
    MetaFile,
    Patch,
    Role,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
    check_target_name,
    format_expiry,
    sign,
)
from edged_formats.tuf.repository import (
    DAY,
    Expiry,
    Repository,
    artifact_path,
    metadata_path,
    new_root,
)
from edged_formats.tuf.trusted_set import TrustedSet, TrustLimits, check_bytes

__all__ = [
    "DAY",
    "ROLES",
    "Envelope",
    "Expiry",
    "MetaFile",
    "Patch",
    "PublicKey",
    "Repository",
    "Role",
    "Root",
    "Signed",
    "SigningKey",
    "Snapshot",
    "TargetFile",
    "Targets",
    "Timestamp",
    "TrustLimits",
    "TrustedSet",
    "artifact_path",
    "canonical_json",
    "check_bytes",
    "check_target_name",
    "format_expiry",
    "metadata_path",
    "new_root",
    "parse_json",
    "sign",
]
