"""Formats shared by the device and the cloud: model bundles, uplink wire messages (and later
signed metadata). Pure: bytes and values in, values out; imports none of the applications.

The wire names are imported on first use: they need cbor2 and PyNaCl (libsodium, cffi), about
1.5 MB of a process's memory that one which only serves a model never uses."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edged_formats.bundle import Bundle, BundleLimits, check_replay, read_bundle, write_bundle
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
    BlockSpec,
    Canaries,
    ConfidenceHistogram,
    EmbeddingSpec,
    HeadSpec,
    InputSpec,
    Manifest,
    MemberDigest,
    OutputSpec,
    Personalisation,
    ReferenceStats,
    ReplaySpec,
)

if TYPE_CHECKING:
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

_WIRE_NAMES = frozenset(
    (
        "CHANNELS",
        "WIRE_SCHEMA_VERSION",
        "Batch",
        "Record",
        "WireLimits",
        "decode_batch",
        "encode_batch",
        "encode_batch_raw",
        "encode_record",
        "message_size",
        "parse_topic",
        "topic_for",
    )
)

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "FORMAT_VERSION",
    "WIRE_SCHEMA_VERSION",
    "Batch",
    "BlockSpec",
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
    "Personalisation",
    "Record",
    "ReferenceStats",
    "ReplaySpec",
    "SignatureError",
    "UnknownDevice",
    "WireError",
    "WireLimits",
    "__version__",
    "check_replay",
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


def __getattr__(name: str) -> Any:
    """Import the wire module on the first access to one of its names (PEP 562)."""
    if name not in _WIRE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("edged_formats.wire"), name)
    globals()[name] = value
    return value
