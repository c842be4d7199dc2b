"""edged: the on-device daemon and tools (LiteRT inference; never imports torch)."""

from edged_formats import __version__

__all__ = ["__version__"]
