"""Formats shared by the device and the cloud: model bundles (and later wire messages and
signed metadata). Pure: bytes and values in, values out; imports none of the applications."""

from edged_formats.bundle import Bundle, BundleLimits, read_bundle, write_bundle
from edged_formats.errors import BundleError, FormatError, ManifestError
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

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
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
    "OutputSpec",
    "ReferenceStats",
    "__version__",
    "read_bundle",
    "write_bundle",
]
