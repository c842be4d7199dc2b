"""Errors raised by the cloud side.

ControlPlaneError        base of everything the control plane raises on purpose
├── ToolchainError       building a model bundle failed
│   └── ConversionError  litert-torch or ai-edge-quantizer refused a model
│                        (control_plane.toolchain.convert)
├── BrokerAdminError     the broker did not grant, revoke, disable or enable a device's
│                        credentials: refused, unreachable or no answer in time
│                        (control_plane.broker_admin)
├── SettingsError        a setting is missing, not TOML or out of bounds
│                        (control_plane.settings, defined there)
└── SchemaError          the database is unreachable or not at the migration head
                         (control_plane.db.engine, defined there)
"""

__all__ = ["BrokerAdminError", "ControlPlaneError", "ToolchainError"]


class ControlPlaneError(Exception):
    """Base class for errors the control plane raises on purpose."""


class ToolchainError(ControlPlaneError):
    """A model could not be built into a bundle."""


class BrokerAdminError(ControlPlaneError):
    """The broker's account management failed; the message names the problem."""
