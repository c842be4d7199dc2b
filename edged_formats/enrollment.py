"""Enrollment proof of possession, shared by the device (`edged enroll`) and the control plane.

The device signs `b"edged-enroll/v1\\x00" + token + b"\\x00" + public_key` with the ed25519 key it
just made; the control plane checks the signature with the public key offered. Binding the
one-time token means a captured request cannot enrol another key, and the context prefix keeps
the signature from ever passing as an uplink message."""

from __future__ import annotations

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from edged_formats.errors import SignatureError

__all__ = ["possession_message", "prove_possession", "verify_possession"]

CONTEXT = b"edged-enroll/v1\x00"


def possession_message(token: str, public_key: bytes) -> bytes:
    return CONTEXT + token.encode() + b"\x00" + public_key


def prove_possession(signing_key: SigningKey, token: str) -> bytes:
    """The 64-byte signature a device sends with its enrollment request."""
    message = possession_message(token, bytes(signing_key.verify_key))
    return signing_key.sign(message).signature


def verify_possession(public_key: bytes, token: str, signature: bytes) -> None:
    """Raise SignatureError unless `signature` proves the holder of `public_key` signed `token`."""
    if len(public_key) != 32:
        raise SignatureError("public key must be a 32-byte ed25519 key")
    if len(signature) != 64:
        raise SignatureError("proof of possession must be a 64-byte ed25519 signature")
    try:
        VerifyKey(public_key).verify(possession_message(token, public_key), signature)
    except (BadSignatureError, CryptoError, ValueError) as exc:
        raise SignatureError("proof of possession does not verify with the offered key") from exc
