"""ed25519 keys for update metadata (pynacl), canonical JSON, and signing.

A public key travels as `{"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public":
"<hex>"}}`; its id is the sha256 of that object's canonical JSON. A private key lives in a
file of its own (`{"keytype": "ed25519", "seed": "<hex>"}`, mode 0600) that only the signer
reads: root keys stay offline, timestamp and snapshot keys sit on the control plane.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from edged_formats.errors import MetadataError

__all__ = ["PublicKey", "SigningKey", "canonical_json", "parse_json"]


def _no_float(value: str) -> Any:
    raise MetadataError(f"metadata holds the non-integer number {value}; only integers are allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MetadataError(f"metadata repeats the key {key!r}")
        result[key] = value
    return result


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no repeated keys, no floats, NaN or infinities."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{what} is not UTF-8 text") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MetadataError(f"{what} is not valid JSON: {exc}") from exc


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes a signature covers."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata cannot be put in canonical form: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An ed25519 verify key as listed in root metadata."""

    public: bytes

    def __post_init__(self) -> None:
        if len(self.public) != 32:
            raise MetadataError("an ed25519 public key must be 32 bytes")

    @property
    def keyid(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": self.public.hex()}}

    @classmethod
    def from_dict(cls, value: Any, where: str) -> PublicKey:
        if not isinstance(value, dict) or set(value) != {"keytype", "scheme", "keyval"}:
            raise MetadataError(f"{where} is not a key object (keytype, scheme, keyval)")
        if value["keytype"] != "ed25519" or value["scheme"] != "ed25519":
            raise MetadataError(f"{where} is not an ed25519 key")
        keyval = value["keyval"]
        if not isinstance(keyval, dict) or set(keyval) != {"public"}:
            raise MetadataError(f"{where}.keyval must hold exactly `public`")
        try:
            return cls(bytes.fromhex(keyval["public"]))
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"{where}.keyval.public is not 64 hex digits") from exc

    def verifies(self, signature: bytes, message: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(self.public).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


class SigningKey:
    """An ed25519 private key; `to_file_bytes` is what a key file holds."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise MetadataError("an ed25519 seed must be 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public_key = PublicKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def to_file_bytes(self) -> bytes:
        return canonical_json({"keytype": "ed25519", "seed": bytes(self._key).hex()}) + b"\n"

    @classmethod
    def from_file_bytes(cls, data: bytes, what: str = "key file") -> SigningKey:
        value = parse_json(data, what)
        if not isinstance(value, dict) or value.get("keytype") != "ed25519":
            raise MetadataError(f"{what} is not an ed25519 key file")
        try:
            return cls(bytes.fromhex(value["seed"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"{what} has no valid 32-byte hex `seed`") from exc

    def __repr__(self) -> str:  # never the seed
        return f"SigningKey(keyid={self.keyid[:12]}...)"
