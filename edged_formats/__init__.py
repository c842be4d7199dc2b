"""Formats shared by the device and the cloud: model bundles, uplink wire messages (and later
signed metadata). Pure: bytes and values in, values out; imports none of the applications."""

from edged_formats.bundle import Bundle, BundleLimits, read_bundle, write_bundle
from edged_formats.errors import (
    BundleError,
    FormatError,
    ManifestError,
    MessageError,
    SignatureError,
    UnknownDevice,
    WireError,
)
from edged_formats.manifest import (
    FORMAT_VERSION,
    Canaries,
    ConfidenceHistogram,
    EmbeddingSpec,
    HeadSpec,
    InputSpec,
    Manifest,
    MemberDigest,
    OutputSpec,
    ReferenceStats,
)
from edged_formats.wire import (
    CHANNELS,
    WIRE_SCHEMA_VERSION,
    Batch,
    Record,
    WireLimits,
    decode_batch,
    encode_batch,
    encode_batch_raw,
    encode_record,
    message_size,
    parse_topic,
    topic_for,
)

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "FORMAT_VERSION",
    "WIRE_SCHEMA_VERSION",
    "Batch",
    "Bundle",
    "BundleError",
    "BundleLimits",
    "Canaries",
    "ConfidenceHistogram",
    "EmbeddingSpec",
    "FormatError",
    "HeadSpec",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "MemberDigest",
    "MessageError",
    "OutputSpec",
    "Record",
    "ReferenceStats",
    "SignatureError",
    "UnknownDevice",
    "WireError",
    "WireLimits",
    "__version__",
    "decode_batch",
    "encode_batch",
    "encode_batch_raw",
    "encode_record",
    "message_size",
    "parse_topic",
    "read_bundle",
    "topic_for",
    "write_bundle",
]
