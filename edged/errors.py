"""Errors raised by the device side.

    EdgedError                  base of everything edged raises on purpose
    ├── RuntimeUnavailable      no TFLite runtime importable (configuration of the install)
    ├── ModelError              a model or bundle that cannot be served (bad data)
    │   └── ModelMismatch       manifest and .tflite disagree on tensors
    ├── InputError              an input that does not fit the model (bad data from a source)
    ├── IdentityError           the device key file is unusable (permissions, length, I/O)
    └── EnrollmentError         the control plane refused enrollment or could not be reached

Messages are one sentence naming the problem; bundle format errors from edged_formats are
re-raised as ModelError with the original as the cause.
"""

__all__ = [
    "EdgedError",
    "EnrollmentError",
    "IdentityError",
    "InputError",
    "ModelError",
    "ModelMismatch",
    "RuntimeUnavailable",
]


class EdgedError(Exception):
    """Base class for errors edged raises on purpose."""


class RuntimeUnavailable(EdgedError):
    """Neither ai-edge-litert nor tflite-runtime can be imported."""


class ModelError(EdgedError):
    """A model or bundle that cannot be served."""


class ModelMismatch(ModelError):
    """The manifest describes tensors the .tflite does not have."""


class InputError(EdgedError):
    """An input whose shape or type does not fit the loaded model."""


class IdentityError(EdgedError):
    """The device key file cannot be read, trusted or written."""


class EnrollmentError(EdgedError):
    """Enrollment with the control plane failed; the message says why."""
