"""Sources, pure parts: payload decoding and the replay bookmark."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import cbor2
import numpy as np
import pytest

from edged.config import ReplaySourceConfig
from edged.sources import BadPayload, ReplaySource, Sample, SettleAll, decode_payload

SHAPE = (8, 8, 1)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_npy_payloads_are_one_sample_or_a_batch() -> None:
    """A .npy of the sample shape is a batch of one; a batch keeps its length."""
    one = np.arange(64, dtype=np.uint8).reshape(SHAPE)
    assert decode_payload(npy(one), "npy", SHAPE, "uint8", "m").shape == (1, *SHAPE)
    batch = np.zeros((5, *SHAPE), np.uint8)
    assert decode_payload(npy(batch), "npy", SHAPE, "uint8", "m").shape == (5, *SHAPE)


def test_raw_and_cbor_payloads() -> None:
    """raw is exactly one sample of the model's dtype; cbor carries dtype and shape."""
    one = np.arange(64, dtype=np.uint8).reshape(SHAPE)
    raw = decode_payload(one.tobytes(), "raw", SHAPE, "uint8", "m")
    np.testing.assert_array_equal(raw[0], one)
    body = cbor2.dumps({"data": one.tobytes(), "dtype": "uint8", "shape": list(SHAPE)})
    np.testing.assert_array_equal(decode_payload(body, "cbor", SHAPE, "uint8", "m")[0], one)


@pytest.mark.parametrize(
    ("payload", "fmt", "kind"),
    [
        (b"\x93NUMPY garbage", "npy", "unreadable"),
        (b"", "npy", "unreadable"),
        (b"\x00" * 63, "raw", "wrong_size"),
        (b"\xa1\x01", "cbor", "unreadable"),
        (cbor2.dumps({"data": b"x", "dtype": "object", "shape": [1]}), "cbor", "unreadable"),
        (npy(np.zeros((4, 4), np.uint8)), "npy", "wrong_shape"),
    ],
)
def test_bad_payloads_name_their_kind(payload: bytes, fmt: str, kind: str) -> None:
    """Garbage becomes BadPayload with the counter's kind and one sentence."""
    with pytest.raises(BadPayload) as caught:
        decode_payload(payload, fmt, SHAPE, "uint8", "message on t")
    assert caught.value.kind == kind
    assert "message on t" in str(caught.value)


def test_settle_all_waits_for_every_sample() -> None:
    """A file or message is settled once, after its last sample, refused if any was."""
    outcomes: list[bool] = []
    outcome = SettleAll(3, outcomes.append)
    outcome.settle(None)
    outcome.settle("wrong_shape")
    assert outcomes == []
    outcome.settle(None)
    assert outcomes == [True]


class Bookmarks:
    """The outbox's meta table, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def remember(self, key: str, value: float) -> None:
        self.values[key] = value

    async def recall(self, key: str, default: float) -> float:
        return self.values.get(key, default)


async def test_replay_bookmark_moves_only_past_settled_samples(tmp_path: Path) -> None:
    """Samples settled out of order move the bookmark only over a contiguous prefix, and a
    new source over the same bookmarks starts at the first unsettled sample."""
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(10 * 64, dtype=np.uint8).reshape(10, *SHAPE), y=np.arange(10))
    bookmarks = Bookmarks()
    seen: list[Sample] = []

    async def submit(sample: Sample) -> None:
        seen.append(sample)

    await ReplaySource(ReplaySourceConfig(name="d", path=path), bookmarks).run(submit)
    assert [s.ref for s in seen] == [str(i) for i in range(10)]
    for i in (0, 1, 3, 4):
        assert seen[i].settle is not None
        seen[i].settle(None)
    assert bookmarks.values["replay.d"] == 2
    resumed: list[Sample] = []

    async def collect(sample: Sample) -> None:
        resumed.append(sample)

    await ReplaySource(ReplaySourceConfig(name="d", path=path), bookmarks).run(collect)
    assert [s.ref for s in resumed] == [str(i) for i in range(2, 10)]


async def test_replay_refuses_a_missing_array(tmp_path: Path) -> None:
    """A dataset file without the configured array is one clear sentence."""
    path = tmp_path / "data.npz"
    np.savez(path, images=np.zeros((2, *SHAPE), np.uint8))

    async def submit(_sample: Sample) -> None:
        raise AssertionError("nothing to submit")

    with pytest.raises(BadPayload, match="has no array 'x'"):
        await ReplaySource(ReplaySourceConfig(name="d", path=path), Bookmarks()).run(submit)


def png(array: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_decode_as_grey_or_rgb_by_the_models_channels() -> None:
    """A PNG becomes uint8 pixels with the model's channel count; wrong sizes and garbage
    are refused, not resized or guessed."""
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    decoded = decode_payload(png(grey, "L"), "image", SHAPE, "uint8", "f.png")
    np.testing.assert_array_equal(decoded[0, :, :, 0], grey)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    decoded = decode_payload(png(rgb, "RGB"), "image", (8, 8, 3), "uint8", "f.png")
    assert decoded.shape == (1, 8, 8, 3) and int(decoded[0, 0, 0, 1]) == 200
    with pytest.raises(BadPayload) as caught:
        decode_payload(png(np.zeros((9, 8), np.uint8), "L"), "image", SHAPE, "uint8", "f.png")
    assert caught.value.kind == "wrong_shape"
    with pytest.raises(BadPayload) as caught:
        decode_payload(b"\xff\xd8\xff garbage", "image", SHAPE, "uint8", "f.jpg")
    assert caught.value.kind == "unreadable" and "not a readable image" in str(caught.value)


def test_an_image_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 62 KB PNG of 8000x8000 pixels is refused as wrong_shape before it is decoded (it
    took 610 MB when it was decoded first); measured in a process of its own."""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 8000)).save(bomb, format="PNG")
    assert bomb.stat().st_size < 200_000
    probe = f"""
import resource
from edged.sources import BadPayload, decode_payload
data = open({str(bomb)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_payload(data, "image", (8, 8, 3), "uint8", "bomb.png")
except BadPayload as exc:
    print(exc.kind, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split(maxsplit=2)
    assert out[0] == "wrong_shape" and "8000x8000 image" in out[2], out
    assert int(out[1]) < 20_000, f"decoding grew the peak RSS by {out[1]} KiB"
