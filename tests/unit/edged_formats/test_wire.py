"""The uplink wire format: round trips, exact sizes and one clear refusal per kind of mistake."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from nacl.signing import SigningKey, VerifyKey

from edged_formats import (
    Batch,
    FormatError,
    MessageError,
    Record,
    SignatureError,
    UnknownDevice,
    WireError,
    WireLimits,
    decode_batch,
    encode_batch,
    encode_batch_raw,
    encode_record,
    message_size,
    parse_topic,
    topic_for,
)
from edged_formats.wire import MAX_BODY_DEPTH

DEVICE = "dev-0123456789abcdef"
TOPIC = f"edged/v1/{DEVICE}/telemetry"
KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))


def keys(device: str) -> VerifyKey | None:
    return {DEVICE: KEY.verify_key, "dev-other": OTHER_KEY.verify_key}.get(device)


def records(n: int = 10) -> list[Record]:
    return [
        Record(
            kind="telemetry",
            boot=3,
            seq=100 + i,
            created=1_700_000_000.25 + i,
            body={"cpu": 0.31, "temp_c": 48.5, "rss": 41_234_567, "model": "digits@1.0.0"},
        )
        for i in range(n)
    ]


def message(payload: Any, topic: str = TOPIC, key: SigningKey = KEY, *, raw: bool = False) -> bytes:
    """A message signed exactly as docs/wire-format.md says, around any payload."""
    data = payload if raw else cbor2.dumps(payload, canonical=True)
    signed = b"edged/v1\x00" + topic.encode() + b"\x00" + data
    return cbor2.dumps({"p": data, "s": key.sign(signed).signature}, canonical=True)


def payload(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "d": DEVICE,
        "c": "telemetry",
        "r": [["telemetry", 3, 100, 1_700_000_000.25, {"cpu": 0.31}]],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not KeyError}


# -- topics ---------------------------------------------------------------------------------


def test_topic_round_trip() -> None:
    """A topic made by topic_for parses back to the same device and channel."""
    for channel in ("events", "telemetry", "samples", "state"):
        assert parse_topic(topic_for(DEVICE, channel)) == (DEVICE, channel)


@pytest.mark.parametrize(
    ("topic", "match"),
    [
        ("edged/v2/dev-1/telemetry", "is not of the form 'edged/v1/<device>/<channel>'"),
        ("edged/v1/dev-1/telemetry/extra", "is not of the form"),
        ("edged/v1/dev-1", "is not of the form"),
        ("edged/v1/Dev_1/telemetry", "device id must be 1-64 characters of a-z, 0-9 or '-'"),
        ("edged/v1//telemetry", "device id must be 1-64"),
        (f"edged/v1/{'a' * 65}/telemetry", "device id must be 1-64"),
        ("edged/v1/dev-1/cmd", "channel 'cmd' is not one of events, telemetry, samples, state"),
        ("edged/v1/+/telemetry", "device id must be 1-64"),
    ],
)
def test_parse_topic_refuses_anything_else(topic: str, match: str) -> None:
    """Only edged/v1/<valid device>/<known channel> parses."""
    with pytest.raises(MessageError, match=match):
        parse_topic(topic)


# -- records --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kind": ""}, "record kind must be 1-64 characters"),
        ({"kind": 7}, "record kind must be"),
        ({"seq": -1}, r"record seq must be an integer from 0 to 2\*\*63 - 1"),
        ({"seq": 1 << 63}, "record seq must be an integer"),
        ({"boot": True}, "record boot must be an integer"),
        ({"boot": 1.0}, "record boot must be an integer"),
        ({"created": float("nan")}, "record created must be a finite number of seconds"),
        ({"created": float("inf")}, "record created must be a finite number"),
        ({"created": "2024-01-01"}, "record created must be a finite number"),
        ({"body": {1: "x"}}, "record body has a map key that is not a text string"),
        ({"body": {"when": object()}}, "record body holds a object, which the wire format"),
        ({"body": [1 << 64]}, "record body holds an integer outside the 64-bit CBOR range"),
        ({"body": {1.5}}, "record body holds a set"),
    ],
)
def test_record_refuses_bad_fields(fields: dict[str, Any], match: str) -> None:
    """A record that could not cross the wire is refused when it is made, not when sent."""
    base: dict[str, Any] = {"kind": "event", "boot": 0, "seq": 0, "created": 0.0, "body": None}
    with pytest.raises(MessageError, match=match):
        Record(**{**base, **fields})


def test_record_body_depth_is_bounded() -> None:
    """Bodies nest at most MAX_BODY_DEPTH containers deep, and a cycle is refused, not looped."""
    deep: Any = 0
    for _ in range(MAX_BODY_DEPTH):
        deep = [deep]
    Record("event", 0, 0, 0.0, deep)
    with pytest.raises(MessageError, match="nests containers deeper than 32 levels"):
        Record("event", 0, 0, 0.0, [deep])
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(MessageError, match="nests containers deeper"):
        Record("event", 0, 0, 0.0, cycle)


def test_record_key_and_created_normalised() -> None:
    """key is (boot, seq); an integer created is kept as a float."""
    record = Record("event", 2, 9, 5, None)
    assert record.key == (2, 9)
    assert isinstance(record.created, float)


# -- round trip and sizes -------------------------------------------------------------------


def test_round_trip() -> None:
    """A batch decodes to the same records, device, channel and topic it was encoded from."""
    sent = records()
    data = encode_batch(DEVICE, "telemetry", sent, KEY)
    batch = decode_batch(TOPIC, data, keys)
    assert batch == Batch(DEVICE, "telemetry", tuple(sent), {})
    assert batch.topic == TOPIC
    assert [r.key for r in batch.records] == [(3, 100 + i) for i in range(10)]


def test_round_trip_of_every_plain_type() -> None:
    """Every value type the body may hold comes back unchanged (tuples as lists)."""
    body = {
        "none": None,
        "flags": [True, False],
        "ints": [0, -1, 23, 24, 255, 256, 65_536, (1 << 64) - 1, -(1 << 64)],
        "floats": [0.5, 1e300, -2.25],
        "text": "héllo ✓",
        "bytes": bytes(range(256)),
        "nested": {"a": {"b": [{"c": []}]}},
        "tuple": (1, 2),
    }
    (back,) = decode_batch(
        TOPIC, encode_batch(DEVICE, "telemetry", [Record("sample", 1, 1, 1.0, body)], KEY), keys
    ).records
    assert back.body == {**body, "tuple": [1, 2]}


def test_message_size_is_exact() -> None:
    """message_size predicts encode_batch's length from record sizes, across head widths."""
    for n, pad in [(0, 0), (1, 0), (10, 50), (23, 0), (24, 0), (300, 200), (40, 2000)]:
        sent = [Record("event", 0, i, 0.0, "x" * pad) for i in range(n)]
        data = encode_batch(DEVICE, "events", sent, KEY)
        assert len(data) == message_size(
            DEVICE, "events", n, sum(len(encode_record(r)) for r in sent)
        )


def test_raw_records_are_spliced_not_reencoded() -> None:
    """encode_batch_raw with encode_record's bytes gives the very message encode_batch gives."""
    sent = records(5)
    raw = encode_batch_raw(DEVICE, "telemetry", [encode_record(r) for r in sent], KEY)
    assert raw == encode_batch(DEVICE, "telemetry", sent, KEY)


def test_unknown_payload_fields_are_kept() -> None:
    """A newer sender's extra payload fields reach the reader in Batch.extensions."""
    data = encode_batch(DEVICE, "telemetry", records(1), KEY, extensions={"x-route": [1, "a"]})
    assert decode_batch(TOPIC, data, keys).extensions == {"x-route": [1, "a"]}
    handmade = message(payload(zz={"future": True}))
    assert decode_batch(TOPIC, handmade, keys).extensions == {"zz": {"future": True}}


def test_extensions_cannot_shadow_schema_fields() -> None:
    """An extension named like a schema field is refused on encode."""
    with pytest.raises(MessageError, match="extension field 'v' collides with the schema"):
        encode_batch(DEVICE, "telemetry", records(1), KEY, extensions={"v": 2})


def test_unknown_outer_fields_are_ignored() -> None:
    """Unsigned fields next to p and s are ignored, never surfaced."""
    outer = cbor2.loads(message(payload()))
    outer["k"] = "key-2"
    batch = decode_batch(TOPIC, cbor2.dumps(outer), keys)
    assert batch.extensions == {}


# -- refusals -------------------------------------------------------------------------------


def test_wrong_topic() -> None:
    """A message on a topic outside the layout is refused before anything is decoded."""
    data = encode_batch(DEVICE, "telemetry", records(1), KEY)
    with pytest.raises(MessageError, match="is not of the form"):
        decode_batch(f"edged/v1/{DEVICE}/telemetry/x", data, keys)


def test_replay_onto_another_topic() -> None:
    """A signed message replayed onto another channel of the same device fails its signature."""
    data = encode_batch(DEVICE, "telemetry", records(1), KEY)
    with pytest.raises(SignatureError, match="signature does not verify with the key of device"):
        decode_batch(f"edged/v1/{DEVICE}/events", data, keys)


def test_device_mismatch_with_topic() -> None:
    """A payload naming another device than its topic is refused, even correctly signed."""
    data = message(payload(d="dev-other"))
    with pytest.raises(MessageError, match="payload device 'dev-other' does not match topic"):
        decode_batch(TOPIC, data, keys)


def test_channel_mismatch_with_topic() -> None:
    """A payload naming another channel than its topic is refused, even correctly signed."""
    with pytest.raises(MessageError, match="payload channel 'events' does not match topic"):
        decode_batch(TOPIC, message(payload(c="events")), keys)


def test_tampered_payload_byte() -> None:
    """Changing one byte of the signed payload fails the signature."""
    outer = cbor2.loads(encode_batch(DEVICE, "telemetry", records(), KEY))
    body = bytearray(outer["p"])
    body[len(body) // 2] ^= 0x01
    outer["p"] = bytes(body)
    with pytest.raises(SignatureError, match="signature does not verify"):
        decode_batch(TOPIC, cbor2.dumps(outer), keys)


def test_wrong_key() -> None:
    """A message signed with another device's key does not verify as this device."""
    data = encode_batch(DEVICE, "telemetry", records(1), OTHER_KEY)
    with pytest.raises(SignatureError, match=f"key of device '{DEVICE}'"):
        decode_batch(TOPIC, data, keys)


def test_unknown_device() -> None:
    """A device without a key on record is refused as unknown (a SignatureError)."""
    data = encode_batch("dev-stranger", "telemetry", records(1), KEY)
    with pytest.raises(UnknownDevice, match="unknown device 'dev-stranger' has no verify key"):
        decode_batch("edged/v1/dev-stranger/telemetry", data, keys)
    assert issubclass(UnknownDevice, SignatureError)


def test_unknown_schema_version() -> None:
    """A newer schema version is refused with the version named, before other field checks."""
    data = message({"v": 2, "d": DEVICE, "c": "telemetry", "records": {}})
    with pytest.raises(MessageError, match=r"payload schema version 2 is unknown \(this reader"):
        decode_batch(TOPIC, data, keys)


def test_oversize_message_refused_before_decoding() -> None:
    """A message over the byte bound is refused by its length alone."""
    limits = WireLimits(max_message_bytes=1000)
    with pytest.raises(MessageError, match="message of 1001 bytes is over the limit of 1000"):
        decode_batch(TOPIC, b"\xff" * 1001, keys, limits=limits)
    with pytest.raises(MessageError, match="over the limit of 1000 bytes"):
        encode_batch(DEVICE, "telemetry", records(20), KEY, limits=limits)


def test_default_size_bound_is_one_mib() -> None:
    """The default bound is 1 MiB on both sides."""
    big = [Record("sample", 0, 0, 0.0, b"\0" * (1 << 20))]
    with pytest.raises(MessageError, match="over the limit of 1048576 bytes"):
        encode_batch(DEVICE, "samples", big, KEY)


def test_record_count_bound() -> None:
    """A message carrying more records than allowed is refused on both sides."""
    limits = WireLimits(max_records=3)
    with pytest.raises(MessageError, match="batch of 4 records is over the limit of 3"):
        encode_batch(DEVICE, "telemetry", records(4), KEY, limits=limits)
    data = encode_batch(DEVICE, "telemetry", records(4), KEY)
    with pytest.raises(MessageError, match="payload carries 4 records, over the limit of 3"):
        decode_batch(TOPIC, data, keys, limits=limits)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "message is not well-formed CBOR"),
        (b"\xff\x00garbage", "message is not well-formed CBOR"),
        (b"\xa2\x61p", "message is not well-formed CBOR"),
        (cbor2.dumps([1, 2]), "message is not a CBOR map"),
        (cbor2.dumps({"p": "text", "s": b"\0" * 64}), "field 'p' is not a byte string"),
        (cbor2.dumps({"p": b"x", "s": b"\0" * 63}), "field 's' is not a 64-byte ed25519"),
        (cbor2.dumps({"s": b"\0" * 64}), "field 'p' is not a byte string"),
        (
            cbor2.dumps({"p": b"", "s": b"\0" * 64}) + b"\0",
            r"message has trailing data after its CBOR item \(1 bytes\)",
        ),
        (bytes.fromhex("bf61700061730040ff"), "message is not well-formed CBOR"),  # indefinite
        (bytes.fromhex("a361700061700161730040"), "Duplicate map key"),
        (bytes.fromhex("a1f6f6"), "map key must be a text string or byte string"),
    ],
)
def test_garbage_outer_message(data: bytes, match: str) -> None:
    """Anything but a definite CBOR map of a byte-string payload and signature is refused."""
    with pytest.raises(MessageError, match=match):
        decode_batch(TOPIC, data, keys)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xff", "payload is not well-formed CBOR"),
        (cbor2.dumps([1]), "payload is not a CBOR map"),
        (cbor2.dumps({"d": DEVICE}), "payload has no integer schema version 'v'"),
        (cbor2.dumps({"v": True}), "payload has no integer schema version 'v'"),
        (cbor2.dumps(payload(r={"a": 1})), "payload field 'r' is not an array of records"),
        (cbor2.dumps(payload(r=[["event", 0, 0, 0.0]])), "record 0 is not an array"),
        (cbor2.dumps(payload(r=[1])), r"record 0 is not an array \[kind, boot, seq"),
        (cbor2.dumps(payload(r=[["e", 0, -1, 0.0, None]])), "record 0 seq must be an integer"),
        (cbor2.dumps(payload(r=[["e", 0, 0, "now", None]])), "record 0 created must be a finite"),
        (cbor2.dumps(payload(r=[["e", 0, 0, float("nan"), 1]])), "record 0 created must be"),
        (cbor2.dumps(payload(r=[[1, 0, 0, 0.0, 1]])), "record 0 kind must be 1-64 characters"),
        (cbor2.dumps(payload(r=[["e", "0", 0, 0.0, 1]])), "record 0 boot must be an integer"),
        (cbor2.dumps(payload(zz=cbor2.undefined)), "payload holds a UndefinedType"),
        (cbor2.dumps(payload()) + b"\x00", "payload has trailing data after its CBOR item"),
    ],
)
def test_wrong_types_in_signed_payload(body: bytes, match: str) -> None:
    """A correctly signed payload that breaks the schema is refused with the field named."""
    with pytest.raises(MessageError, match=match):
        decode_batch(TOPIC, message(body, raw=True), keys)


def test_second_record_named_in_error() -> None:
    """The refusal says which record of the batch is wrong."""
    good = ["event", 0, 0, 0.0, None]
    data = message(payload(r=[good, ["event", 0, -5, 0.0, None]]))
    with pytest.raises(MessageError, match="record 1 seq must be"):
        decode_batch(TOPIC, data, keys)


@pytest.mark.parametrize(
    "tagged",
    [
        cbor2.CBORTag(1, 1_700_000_000),  # epoch date, decoded by cbor2 itself
        cbor2.CBORTag(2, b"\x01" + b"\0" * 8),  # bignum
        cbor2.CBORTag(35, "a+"),  # regex
        cbor2.CBORTag(258, [1, 2]),  # set
        cbor2.CBORTag(28, [1]),  # shared value
        cbor2.CBORTag(55799, 1),  # self-describe
        cbor2.CBORTag(4242, "x"),  # unknown to everyone
    ],
)
def test_cbor_tags_rejected(tagged: cbor2.CBORTag) -> None:
    """Semantic tags are refused in the payload and in the outer message, naming the tag."""
    inner = cbor2.dumps(payload(r=[["event", 0, 0, 0.0, {"x": tagged}]]))
    with pytest.raises(MessageError, match=f"payload uses CBOR tag {tagged.tag}, which the wire"):
        decode_batch(TOPIC, message(inner, raw=True), keys)
    outer = cbor2.dumps({"p": b"", "s": b"\0" * 64, "x": tagged})
    with pytest.raises(MessageError, match=f"message uses CBOR tag {tagged.tag}"):
        decode_batch(TOPIC, outer, keys)


def test_simple_values_rejected() -> None:
    """CBOR simple values other than true, false and null are refused."""
    inner = cbor2.dumps(payload(r=[["event", 0, 0, 0.0, cbor2.CBORSimpleValue(16)]]))
    with pytest.raises(MessageError, match="record 0 body holds a CBORSimpleValue"):
        decode_batch(TOPIC, message(inner, raw=True), keys)


def test_errors_belong_to_the_format_hierarchy() -> None:
    """WireError is a FormatError, so callers can catch all bad data in one place."""
    assert issubclass(WireError, FormatError)
    assert issubclass(MessageError, WireError)
    assert issubclass(SignatureError, WireError)


# -- fuzz -----------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.1:
        return bytes(out[: rng.randrange(len(out))])
    if roll < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(out))
        if rng.random() < 0.5:
            out[position] ^= 1 << rng.randrange(8)
        else:
            out[position] ^= rng.randrange(1, 256)
    if out == data:  # two changes cancelled out
        out[0] ^= 0x80
    return bytes(out)


def _only_wire_errors(
    rng: random.Random, rounds: int, make: Callable[[bytes], bytes], original: bytes
) -> int:
    accepted = 0
    for _ in range(rounds):
        data = make(_mutate(rng, original))
        try:
            decode_batch(TOPIC, data, keys)
        except WireError:
            continue
        accepted += 1
    return accepted


def test_fuzz_byte_flips_only_raise_wire_errors() -> None:
    """Random flips, truncations and garbage, in the message and in a re-signed payload, only
    ever raise WireError."""
    rng = random.Random(20240603)
    original = encode_batch(DEVICE, "telemetry", records(4), KEY, extensions={"x": [1.5]})
    accepted = _only_wire_errors(rng, 3000, lambda data: data, original)
    assert accepted == 0  # every byte is covered by the signature or the framing
    signed_payload = cbor2.loads(original)["p"]
    _only_wire_errors(rng, 3000, lambda body: message(body, raw=True), signed_payload)


def test_spliced_record_equals_encoded_record() -> None:
    """A record spliced from a canonical body encodes byte for byte like encode_record."""
    from edged_formats.wire import encode_record, encode_record_parts

    for body in [None, {"b": [1, 2.5, "x"], "a": b"\x00"}, 2**40, -3, "text", [{"k": {}}]]:
        record = Record("sample", 7, 123456, 1.8e9 + 0.25, body)
        spliced = encode_record_parts(
            "sample", 7, 123456, 1.8e9 + 0.25, cbor2.dumps(body, canonical=True)
        )
        assert spliced == encode_record(record)
