"""The pure ingest core: messages in, rows and refusals out, no broker, no database."""

from __future__ import annotations

import cbor2
from nacl.signing import SigningKey

from control_plane.ingest_plan import DeviceInfo, Message, plan_ingest
from edged_formats import Record, encode_batch
from edged_formats.wire import WireLimits

A, B = "dev-aaaa", "dev-bbbb"
KEYS = {A: SigningKey(b"a" * 32), B: SigningKey(b"b" * 32)}
LIMITS = WireLimits(max_message_bytes=4096)


def _info(status: str = "active"):
    def lookup(device: str) -> DeviceInfo | None:
        key = KEYS.get(device)
        return DeviceInfo(key.verify_key, status) if key else None

    return lookup


def _message(
    device: str,
    channel: str,
    bodies,
    *,
    signer: str | None = None,
    topic_device: str | None = None,
    kind: str | None = None,
    seq0: int = 1,
) -> Message:
    kind = (
        kind
        or {"telemetry": "telemetry", "events": "event", "samples": "sample", "state": "state"}[
            channel
        ]
    )
    records = [Record(kind, 3, seq0 + i, 1000.0 + i, b) for i, b in enumerate(bodies)]
    data = encode_batch(device, channel, records, KEYS[signer or device])
    topic = f"edged/v1/{topic_device or device}/{channel}"
    return Message(topic, data)


def test_telemetry_rows_carry_the_figures_the_api_downsamples() -> None:
    """Columns are pulled out of the body; the newest health and model reach the device."""
    body = {
        "rate_per_s": 12.5,
        "queue_depth": 3,
        "outbox": {"depth": 7},
        "latency_ms": {"p50_ms": 1.0, "p99_ms": 4.2},
        "health": {"proc_cpu_percent": 30.0, "proc_rss_mb": 61.0, "temp_c": None},
        "gating": {"confident": 3, "uncertain": 1},
        "model": {"name": "digits", "version": "2"},
    }
    plan = plan_ingest(
        [_message(A, "telemetry", [body, {**body, "rate_per_s": True}])], _info(), 5000.0, LIMITS
    )
    first, second = plan.telemetry
    assert (first["device_id"], first["boot"], first["seq"], first["ts_ms"]) == (A, 3, 1, 1_000_000)
    assert (first["rate_per_s"], first["outbox_depth"], first["latency_p99_ms"]) == (12.5, 7.0, 4.2)
    assert (first["cpu_percent"], first["rss_mb"], first["temp_c"]) == (30.0, 61.0, None)
    assert first["uncertain_share"] == 0.25 and first["received_at"] == 5000.0
    assert second["rate_per_s"] is None  # a bool is not a figure
    update = plan.devices[A]
    assert update.health == (1001.0, body["health"]) and update.model == (1001.0, "digits", "2")
    assert plan.accepted == 1 and not plan.rejections


def test_a_signature_by_another_device_is_refused() -> None:
    """A's key on B's topic (past a broker that let it through) is a bad signature for B."""
    forged = _message(B, "telemetry", [{"rate_per_s": 1.0}], signer=A)
    plan = plan_ingest([forged], _info(), 0.0, LIMITS)
    assert plan.records == 0
    count, error = plan.rejections[(B, "bad_signature")]
    assert count == 1 and "does not verify with the key of device 'dev-bbbb'" in error


def test_refusals_are_counted_per_device_and_reason() -> None:
    """Unknown device, garbage, oversize, wrong kind, quarantine: counted, never stored."""
    unknown = Message("edged/v1/dev-cccc/telemetry", cbor2.dumps({"p": b"x", "s": b"y" * 64}))
    garbage = Message(f"edged/v1/{A}/telemetry", b"\xff\xff")
    oversize = Message(f"edged/v1/{A}/telemetry", b"\x00" * 5000)
    wrong_kind = _message(A, "telemetry", [{"x": 1}], kind="event")
    not_a_map = _message(A, "events", [[1, 2]])
    plan = plan_ingest(
        [unknown, garbage, oversize, wrong_kind, not_a_map, garbage], _info(), 0.0, LIMITS
    )
    assert {k: v[0] for k, v in plan.rejections.items()} == {
        ("dev-cccc", "unknown_device"): 1,
        (A, "malformed"): 2,
        (A, "oversized"): 1,
        (A, "schema"): 2,
    }
    quarantined = plan_ingest([_message(A, "telemetry", [{}])], _info("quarantined"), 0.0, LIMITS)
    assert quarantined.rejections[(A, "quarantined")][0] == 1 and quarantined.records == 0


def test_presence_events_and_samples() -> None:
    """State sets online without a row; events take their name; samples keep input apart."""
    plan = plan_ingest(
        [
            _message(A, "state", [{"online": False}]),
            _message(A, "events", [{"name": "drift", "score": 1.0}], seq0=10),
            _message(
                A, "samples", [{"verdict": "audit", "input": b"\x00\x01", "shape": [2]}], seq0=20
            ),
        ],
        _info(),
        9.0,
        LIMITS,
    )
    assert plan.devices[A].online is False and plan.devices[A].last_seen == 9.0
    assert [e["name"] for e in plan.events] == ["drift"]
    sample = plan.samples[0]
    assert sample["input"] == b"\x00\x01" and "input" not in sample["meta"]
    assert sample["verdict"] == "audit" and plan.accepted == 3


def test_bodies_are_stored_as_json_both_backends_take() -> None:
    """Bytes become base64, NaN and infinities null, NUL stays (escaped); names lose NUL."""
    import json

    from control_plane.json_codec import dumps_json

    body = {
        "blob": b"\x00\xff",
        "ratio": float("nan"),
        "note": "a\x00b",
        "list": [b"x", 1.5, float("-inf")],
        "health": {"temp_c": float("inf")},
    }
    assert json.loads(dumps_json(body)) == {
        "blob": {"$base64": "AP8="},
        "ratio": None,
        "note": "a\x00b",
        "list": [{"$base64": "eA=="}, 1.5, None],
        "health": {"temp_c": None},
    }
    assert "\\u0000" in dumps_json({"note": "a\x00b"})
    plan = plan_ingest(
        [_message(A, "events", [{"name": "dr\x00ift"}], seq0=5)], _info(), 0.0, LIMITS
    )
    assert plan.events[0]["name"] == "drift"


def _raw(device: str, body_cbor_item, kind: str = "telemetry") -> Message:
    """A signed message whose one record body is any CBOR item (bypassing Record's checks)."""
    from edged_formats.wire import SIGNATURE_CONTEXT

    topic = f"edged/v1/{device}/telemetry"
    payload = cbor2.dumps(
        {"v": 1, "d": device, "c": "telemetry", "r": [[kind, 1, 1, 1.0, body_cbor_item]]},
        canonical=True,
    )
    signature = KEYS[device].sign(SIGNATURE_CONTEXT + topic.encode() + b"\x00" + payload)
    return Message(topic, cbor2.dumps({"p": payload, "s": signature.signature}))


def test_the_fast_body_check_refuses_what_the_wire_refuses() -> None:
    """Ingest's one-pass JSON check refuses non-text keys, CBOR undefined and deep nesting
    like the wire's own check, and keeps what the wire allows beyond orjson's integers."""
    deep: list = []
    for _ in range(40):
        deep = [deep]
    cases = {
        "int key": {1: "x"},
        "undefined": {"a": cbor2.undefined},
        "simple value": {"a": cbor2.CBORSimpleValue(99)},
        "deep": {"a": deep},
    }
    for name, body in cases.items():
        plan = plan_ingest([_raw(A, body)], _info(), 0.0, WireLimits())
        assert plan.records == 0, name
        assert plan.rejections, name
    ok = plan_ingest(
        [_raw(A, {"n": -(2**64), "b": b"\x01", "f": float("nan")})], _info(), 0.0, WireLimits()
    )
    assert ok.telemetry[0]["body"]["n"] == -(2**64)
    assert (
        ok.telemetry[0]["body_json"]
        == '{"b":{"$base64":"AQ=="},"f":null,"n":-18446744073709551616}'
    )
