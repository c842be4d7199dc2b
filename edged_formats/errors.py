"""Errors raised by the shared formats.

    FormatError            any malformed data handed to this package
    ├── ManifestError      a manifest that is not valid JSON or breaks the schema
    ├── BundleError        an archive that is unsafe, incomplete or disagrees with its manifest
    └── WireError          an uplink message or record that cannot be accepted
        ├── MessageError   bad data: topic, CBOR, schema version, types or bounds
    │   └── SignatureError origin not proven: the signature does not verify
    │       └── UnknownDevice  no verify key on record for the topic's device
    └── TrustError     signed update metadata or an artifact the trust rules refuse
        ├── MetadataError      not valid metadata: JSON, schema, types, canonical form
        ├── ThresholdError     fewer distinct valid signatures than the role's threshold
        ├── ExpiredError       the metadata's expiry is past the update's fixed clock
        ├── RollbackError      a version lower than (or inconsistent with) what is trusted
        ├── MismatchError      length or sha256 differs from what signed metadata says
        └── TargetRefused      unknown, unsafe or incompatible target name

Every message is one sentence naming the problem, fit to show an operator as is.
"""

__all__ = [
    "BundleError",
    "ExpiredError",
    "FormatError",
    "ManifestError",
    "MessageError",
    "MetadataError",
    "MismatchError",
    "RollbackError",
    "SignatureError",
    "TargetRefused",
    "ThresholdError",
    "TrustError",
    "UnknownDevice",
    "WireError",
]


class FormatError(ValueError):
    """Malformed data in one of the shared formats."""


class ManifestError(FormatError):
    """A bundle manifest that does not follow the documented schema."""


class BundleError(FormatError):
    """A model bundle archive that is unsafe, incomplete or inconsistent."""


class WireError(FormatError):
    """An uplink message (or a record meant for one) that cannot be accepted."""


class MessageError(WireError):
    """A message, payload or record that breaks the wire schema or its bounds.

    `reason` names the kind of problem for counting: `topic`, `malformed` (not the CBOR
    envelope), `schema_version`, `oversized`, `mismatch` (payload and topic disagree) or
    `schema` (everything else about the data)."""

    def __init__(self, message: str, reason: str = "schema") -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(WireError):
    """A message whose origin cannot be proven with the device's key."""


class UnknownDevice(SignatureError):
    """A message from a device that has no verify key on record."""


class TrustError(FormatError):
    """Update metadata or an artifact refused by the trust rules (docs/ota.md)."""


class MetadataError(TrustError):
    """Metadata that is not canonical JSON of the documented schema."""


class ThresholdError(TrustError):
    """Metadata without a threshold of distinct valid signatures from its role's keys."""


class ExpiredError(TrustError):
    """Metadata whose expiry is past the update's clock (a freeze attack, or a stale server)."""


class RollbackError(TrustError):
    """Metadata older than, or inconsistent with, the version already trusted."""


class MismatchError(TrustError):
    """Bytes whose length or sha256 differ from what trusted metadata says."""


class TargetRefused(TrustError):
    """A target that is not listed, has an unsafe name, or does not fit this device."""
