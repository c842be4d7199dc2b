"""Errors raised by the shared formats.

    FormatError            any malformed data handed to this package
    ├── ManifestError      a manifest that is not valid JSON or breaks the schema
    └── BundleError        an archive that is unsafe, incomplete or disagrees with its manifest

Every message is one sentence naming the problem, fit to show an operator as is.
"""

__all__ = ["BundleError", "FormatError", "ManifestError"]


class FormatError(ValueError):
    """Malformed data in one of the shared formats."""


class ManifestError(FormatError):
    """A bundle manifest that does not follow the documented schema."""


class BundleError(FormatError):
    """A model bundle archive that is unsafe, incomplete or inconsistent."""
