"""Errors raised by the cloud side.

ControlPlaneError        base of everything the control plane raises on purpose
└── ToolchainError       building a model bundle failed
    └── ConversionError  litert-torch or ai-edge-quantizer refused a model
                         (control_plane.toolchain.convert)
"""

__all__ = ["ControlPlaneError", "ToolchainError"]


class ControlPlaneError(Exception):
    """Base class for errors the control plane raises on purpose."""


class ToolchainError(ControlPlaneError):
    """A model could not be built into a bundle."""
