"""The device → cloud uplink wire format: per-device topics carrying signed CBOR batches.

A message on `edged/v1/<device>/<channel>` is the CBOR map `{"p": payload, "s": signature}`.
The payload is the canonical CBOR map `{"v": 1, "d": device, "c": channel, "r": records}`, each
record the array `[kind, boot, seq, created, body]`; the ed25519 signature covers
`b"edged/v1\\x00" + topic + b"\\x00" + payload`, so a message replayed onto another topic fails.

Pure: `encode_batch` takes records and a signing key and returns bytes; `decode_batch` takes a
topic, bytes and a key lookup and returns a `Batch` or raises one `WireError` sentence. The
signature is checked before the payload is parsed. Only plain CBOR is accepted (no semantic
tags, no indefinite lengths, no duplicate or non-text map keys). Unknown payload fields are
kept in `Batch.extensions`; an unknown schema version is refused. Receivers de-duplicate by
(device, boot, seq). The format is documented in docs/wire-format.md.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edged_formats.errors import MessageError, SignatureError, UnknownDevice

__all__ = [
    "CHANNELS",
    "DEFAULT_LIMITS",
    "MAX_BODY_DEPTH",
    "WIRE_SCHEMA_VERSION",
    "Batch",
    "Record",
    "WireLimits",
    "check_plain_value",
    "decode_batch",
    "encode_batch",
    "encode_batch_raw",
    "encode_record",
    "encode_record_parts",
    "message_size",
    "parse_topic",
    "topic_for",
]

WIRE_SCHEMA_VERSION = 1
CHANNELS = ("events", "telemetry", "samples", "state")
MAX_BODY_DEPTH = 32
TOPIC_ROOT = "edged/v1"
SIGNATURE_CONTEXT = b"edged/v1\x00"
SIGNATURE_BYTES = 64
MIB = 1 << 20
_PAYLOAD_FIELDS = frozenset({"v", "d", "c", "r"})
_DEVICE = re.compile(r"^[a-z0-9-]{1,64}$")
_KIND = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_COUNTER_LIMIT = 1 << 63  # boot and seq fit a signed 64-bit column on either side
_CBOR_INT_LIMIT = 1 << 64  # beyond this cbor2 writes a bignum tag, which decoding refuses
# Tags cbor2 decodes itself (dates, bignums, decimals, regexes, shared values, ...): each is
# overridden to refuse, and every other tag reaches `_refuse_tag`.
_BUILTIN_TAGS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100)
_BUILTIN_TAGS += (256, 258, 260, 261, 1004, 43000, 55799)


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds a message must stay within; the size is checked before any decoding."""

    max_message_bytes: int = MIB
    max_records: int = 10_000


DEFAULT_LIMITS = WireLimits()


def topic_for(device: str, channel: str) -> str:
    """The uplink topic of `device` for `channel`, e.g. `edged/v1/dev-1a2b/telemetry`."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise MessageError("device id must be 1-64 characters of a-z, 0-9 or '-'")
    if channel not in CHANNELS:
        raise MessageError(f"channel {channel!r} is not one of {', '.join(CHANNELS)}")
    return f"{TOPIC_ROOT}/{device}/{channel}"


def parse_topic(topic: str) -> tuple[str, str]:
    """(device, channel) of an uplink topic; anything else is refused."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise MessageError(
            f"topic {topic!r} is not of the form '{TOPIC_ROOT}/<device>/<channel>'", "topic"
        )
    try:
        topic_for(parts[2], parts[3])
    except MessageError as exc:
        raise MessageError(str(exc), "topic") from exc
    return parts[2], parts[3]


_PLAIN_SCALARS = frozenset({type(None), bool, float, str, bytes})


def check_plain_value(value: Any, where: str) -> None:
    """Refuse anything a v1 reader would not decode back to the same plain value."""
    _check_item(value, where, 0)


def _check_item(item: Any, where: str, depth: int) -> None:
    # Exact types first (what CBOR decoding yields): this runs for every value ingest reads.
    kind = type(item)
    if kind in _PLAIN_SCALARS:
        return
    if kind is int:
        if not -_CBOR_INT_LIMIT <= item < _CBOR_INT_LIMIT:
            raise MessageError(f"{where} holds an integer outside the 64-bit CBOR range")
        return
    if kind is dict or kind is list or kind is tuple:
        if depth >= MAX_BODY_DEPTH:
            raise MessageError(f"{where} nests containers deeper than {MAX_BODY_DEPTH} levels")
        if kind is dict:
            for key, v in item.items():
                if type(key) is not str and not isinstance(key, str):
                    raise MessageError(f"{where} has a map key that is not a text string")
                if type(v) not in _PLAIN_SCALARS:
                    _check_item(v, where, depth + 1)
        else:
            for v in item:
                if type(v) not in _PLAIN_SCALARS:
                    _check_item(v, where, depth + 1)
        return
    _check_subclass(item, where, depth)


def _check_subclass(item: Any, where: str, depth: int) -> None:
    """Subclasses of the plain types (numpy floats, IntEnum, OrderedDict, ...)."""
    if isinstance(item, bool | float | str | bytes):
        return
    if isinstance(item, int):
        if not -_CBOR_INT_LIMIT <= item < _CBOR_INT_LIMIT:
            raise MessageError(f"{where} holds an integer outside the 64-bit CBOR range")
        return
    if isinstance(item, list | tuple | dict):
        if depth >= MAX_BODY_DEPTH:
            raise MessageError(f"{where} nests containers deeper than {MAX_BODY_DEPTH} levels")
        values = item.items() if isinstance(item, dict) else ((None, v) for v in item)
        for key, v in values:
            if isinstance(item, dict) and not isinstance(key, str):
                raise MessageError(f"{where} has a map key that is not a text string")
            _check_item(v, where, depth + 1)
        return
    name = type(item).__name__
    raise MessageError(f"{where} holds a {name}, which the wire format cannot carry")


def _check_counter(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _COUNTER_LIMIT:
        raise MessageError(f"record {name} must be an integer from 0 to 2**63 - 1")


@dataclass(frozen=True, slots=True)
class Record:
    """One outbox record on the wire. `(boot, seq)` orders records within a device and, with
    the device id, is the idempotency key; `created` is informational wall-clock time.

    `body` is plain data: None, bool, int (64-bit), float, str, bytes, lists (tuples are sent
    as lists) and maps with text keys, nested at most `MAX_BODY_DEPTH` deep."""

    kind: str
    boot: int
    seq: int
    created: float
    body: Any = None

    def __post_init__(self) -> None:
        self._check_head()
        check_plain_value(self.body, "record body")

    @classmethod
    def _with_checked_body(
        cls, kind: str, boot: int, seq: int, created: float, body: Any
    ) -> Record:
        """A record whose body the caller has already checked (see `decode_batch`)."""
        record = object.__new__(cls)
        for name, value in (
            ("kind", kind),
            ("boot", boot),
            ("seq", seq),
            ("created", created),
            ("body", body),
        ):
            object.__setattr__(record, name, value)
        record._check_head()
        return record

    def _check_head(self) -> None:
        if not isinstance(self.kind, str) or not _KIND.fullmatch(self.kind):
            raise MessageError(
                "record kind must be 1-64 characters of a-z, 0-9, '.', '_' or '-' "
                "starting with a letter"
            )
        _check_counter(self.boot, "boot")
        _check_counter(self.seq, "seq")
        created = self.created
        if (
            isinstance(created, bool)
            or not isinstance(created, int | float)
            or not math.isfinite(created)
        ):
            raise MessageError("record created must be a finite number of seconds")
        object.__setattr__(self, "created", float(created))

    @property
    def key(self) -> tuple[int, int]:
        """(boot, seq): with the device id, the record's idempotency key."""
        return (self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class Batch:
    """The records of one message, with unknown payload fields kept in `extensions`, and
    what `decode_batch`'s `body_check` returned for each record (else empty)."""

    device: str
    channel: str
    records: tuple[Record, ...]
    extensions: Mapping[str, Any] = field(default_factory=dict)
    checked: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        topic_for(self.device, self.channel)
        object.__setattr__(self, "records", tuple(self.records))

    @property
    def topic(self) -> str:
        return topic_for(self.device, self.channel)


# -- encoding -------------------------------------------------------------------------------


def encode_record(record: Record) -> bytes:
    """The canonical CBOR array `[kind, boot, seq, created, body]` of one record, as it appears
    in a payload; `encode_batch_raw` takes these without encoding them again."""
    item = [record.kind, record.boot, record.seq, record.created, record.body]
    try:
        return cbor2.dumps(item, canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        raise MessageError(f"record body cannot be encoded as CBOR ({exc})") from exc


def encode_record_parts(kind: str, boot: int, seq: int, created: float, body: bytes) -> bytes:
    """`encode_record` for a body that is already canonical CBOR (the outbox stores bodies
    so, checked as a `Record` when they were handed over): spliced in, never decoded."""
    head = cbor2.dumps([kind, boot, seq, float(created), None], canonical=True)
    return head[:-1] + body  # the placeholder null (one byte, 0xf6) is the last byte


def _head_size(length: int) -> int:
    """Bytes of a CBOR head (major type and length) for `length`."""
    if length < 24:
        return 1
    if length < 1 << 8:
        return 2
    if length < 1 << 16:
        return 3
    return 5 if length < 1 << 32 else 9


def _text_size(text: str) -> int:
    n = len(text.encode())
    return _head_size(n) + n


def message_size(device: str, channel: str, count: int, record_bytes: int) -> int:
    """Exact length of the message `encode_batch` makes (without extensions) for `count`
    records whose encodings (`encode_record`) add up to `record_bytes`: pack up to a bound without
    encoding anything twice."""
    payload = (
        1  # map of four
        + 4 * 2  # the keys "c", "d", "r", "v"
        + _text_size(channel)
        + _text_size(device)
        + _head_size(count)
        + record_bytes
        + 1  # the version 1
    )
    return 1 + 2 + _head_size(payload) + payload + 2 + _head_size(SIGNATURE_BYTES) + 64


class _EncodedRecords:
    """Already encoded records, spliced into the payload as one CBOR array."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[bytes]) -> None:
        self.items = items


def _write_encoded(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if not isinstance(value, _EncodedRecords):
        raise MessageError(f"a {type(value).__name__} cannot be encoded on the wire")
    encoder.encode_length(4, len(value.items))
    for item in value.items:
        encoder.write(item)


def _signed_bytes(topic: str, payload: bytes) -> bytes:
    return SIGNATURE_CONTEXT + topic.encode() + b"\x00" + payload


def encode_batch_raw(
    device: str,
    channel: str,
    encoded_records: Sequence[bytes],
    signing_key: SigningKey,
    *,
    extensions: Mapping[str, Any] | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> bytes:
    """A signed message from records already encoded by `encode_record` (not re-checked)."""
    topic = topic_for(device, channel)
    payload_map: dict[str, Any] = {}
    for key, value in (extensions or {}).items():
        if not isinstance(key, str) or key in _PAYLOAD_FIELDS:
            raise MessageError(f"extension field {key!r} collides with the schema or is not text")
        check_plain_value(value, f"extension field '{key}'")
        payload_map[key] = value
    if len(encoded_records) > limits.max_records:
        raise MessageError(
            f"batch of {len(encoded_records)} records is over the limit of {limits.max_records}",
            "oversized",
        )
    payload_map.update(
        v=WIRE_SCHEMA_VERSION, d=device, c=channel, r=_EncodedRecords(encoded_records)
    )
    payload = cbor2.dumps(payload_map, canonical=True, default=_write_encoded)
    signature = signing_key.sign(_signed_bytes(topic, payload)).signature
    message = cbor2.dumps({"p": payload, "s": signature}, canonical=True)
    if len(message) > limits.max_message_bytes:
        raise MessageError(
            f"message of {len(message)} bytes is over the limit of "
            f"{limits.max_message_bytes} bytes",
            "oversized",
        )
    return message


def encode_batch(
    device: str,
    channel: str,
    records: Sequence[Record],
    signing_key: SigningKey,
    *,
    extensions: Mapping[str, Any] | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> bytes:
    """The signed message carrying `records` on `topic_for(device, channel)`."""
    encoded = [encode_record(r) for r in records]
    return encode_batch_raw(
        device, channel, encoded, signing_key, extensions=extensions, limits=limits
    )


# -- decoding -------------------------------------------------------------------------------


class _RefusedTag(Exception):
    def __init__(self, tag: int) -> None:
        super().__init__(f"CBOR tag {tag} refused")
        self.tag = tag


def _refuse_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    raise _RefusedTag(tag.tag)


def _refuser(tag: int) -> Callable[[Any, bool], Any]:
    def refuse(value: Any, immutable: bool) -> Any:
        raise _RefusedTag(tag)

    return refuse


_REFUSE_BUILTIN_TAGS = {tag: _refuser(tag) for tag in _BUILTIN_TAGS}


def _loads(data: bytes, what: str, max_depth: int) -> Any:
    """One plain CBOR item filling all of `data`."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_REFUSE_BUILTIN_TAGS,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        ).decode()
    except cbor2.CBORDecodeError as exc:
        if isinstance(exc.__cause__, _RefusedTag):
            tag = exc.__cause__.tag
            raise MessageError(
                f"{what} uses CBOR tag {tag}, which the wire refuses", "malformed"
            ) from exc
        raise MessageError(f"{what} is not well-formed CBOR ({exc})", "malformed") from exc
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MessageError(f"{what} is not well-formed CBOR ({exc})", "malformed") from exc
    if stream.tell() != len(data):
        extra = len(data) - stream.tell()
        raise MessageError(
            f"{what} has trailing data after its CBOR item ({extra} bytes)", "malformed"
        )
    return value


BodyCheck = Callable[[Any], Any]


def _record_from(index: int, item: Any, body_check: BodyCheck | None) -> tuple[Record, Any]:
    if not isinstance(item, list) or len(item) != 5:
        raise MessageError(f"record {index} is not an array [kind, boot, seq, created, body]")
    try:
        if body_check is None:
            return Record(*item), None
        checked = body_check(item[4])
        return Record._with_checked_body(*item), checked
    except MessageError as exc:
        # Record's messages all start with "record "; say which one.
        raise MessageError(str(exc).replace("record", f"record {index}", 1), exc.reason) from exc


def decode_batch(
    topic: str,
    data: bytes,
    verify_key_for: Callable[[str], VerifyKey | None],
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    body_check: BodyCheck | None = None,
) -> Batch:
    """The batch a message carries, after checking its topic, size, signature and schema.

    `verify_key_for(device)` returns the device's key or None when the device is unknown;
    whatever it raises itself passes through unchanged. `body_check(body)`, when given,
    replaces the plain-value check of each record body: it must raise `MessageError` for
    exactly what that check refuses (a receiver that serialises bodies anyway can check them
    in the same pass); its results are kept in `Batch.checked`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"message must be bytes, not {type(data).__name__}", "malformed")
    if len(data) > limits.max_message_bytes:
        raise MessageError(
            f"message of {len(data)} bytes is over the limit of {limits.max_message_bytes} bytes",
            "oversized",
        )
    device, channel = parse_topic(topic)
    outer = _loads(bytes(data), "message", MAX_BODY_DEPTH)
    if not isinstance(outer, dict):
        raise MessageError("message is not a CBOR map {'p': payload, 's': signature}", "malformed")
    payload, signature = outer.get("p"), outer.get("s")
    if not isinstance(payload, bytes):
        raise MessageError(
            "message field 'p' is not a byte string holding the payload", "malformed"
        )
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise MessageError("message field 's' is not a 64-byte ed25519 signature", "malformed")
    verify_key = verify_key_for(device)
    if verify_key is None:
        raise UnknownDevice(f"unknown device '{device}' has no verify key on record")
    try:
        verify_key.verify(_signed_bytes(topic, payload), signature)
    except BadSignatureError as exc:
        raise SignatureError(
            f"signature does not verify with the key of device '{device}' for topic '{topic}'"
        ) from exc
    decoded = _loads(payload, "payload", MAX_BODY_DEPTH + 3)
    return _batch_from(decoded, device, channel, limits, body_check)


def _batch_from(
    payload: Any, device: str, channel: str, limits: WireLimits, body_check: BodyCheck | None
) -> Batch:
    if not isinstance(payload, dict):
        raise MessageError("payload is not a CBOR map", "malformed")
    version = payload.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise MessageError("payload has no integer schema version 'v'", "schema_version")
    if version != WIRE_SCHEMA_VERSION:
        raise MessageError(
            f"payload schema version {version} is unknown "
            f"(this reader knows {WIRE_SCHEMA_VERSION})",
            "schema_version",
        )
    if payload.get("d") != device:
        raise MessageError(
            f"payload device {payload.get('d')!r} does not match topic '{device}'", "mismatch"
        )
    if payload.get("c") != channel:
        raise MessageError(
            f"payload channel {payload.get('c')!r} does not match topic '{channel}'", "mismatch"
        )
    items = payload.get("r")
    if not isinstance(items, list):
        raise MessageError("payload field 'r' is not an array of records")
    if len(items) > limits.max_records:
        raise MessageError(
            f"payload carries {len(items)} records, over the limit of {limits.max_records}",
            "oversized",
        )
    extensions = {k: v for k, v in payload.items() if k not in _PAYLOAD_FIELDS}
    check_plain_value(extensions, "payload")
    pairs = [_record_from(i, item, body_check) for i, item in enumerate(items)]
    records = tuple(record for record, _ in pairs)
    checked = tuple(result for _, result in pairs) if body_check is not None else ()
    return Batch(device, channel, records, extensions, checked)
