"""Delta patches (zstd patch-from): exact round trips on real model bytes, and every bad
patch, wrong parent or oversized output refused with PatchError before it can cost memory."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard

from edged.errors import EdgedError
from edged.ota.delta import PatchError, apply_patch, make_patch, window_log_for

TF = Path(__file__).resolve().parents[3] / "fixtures" / "tf"
MIB = 1 << 20
BIG = 100 * MIB


@pytest.fixture(scope="module")
def parent() -> bytes:
    """A real int8 digits .tflite (TensorFlow converter fixture)."""
    return (TF / "digits_int8_io_int8.tflite").read_bytes()


@pytest.fixture(scope="module")
def head_tuned(parent: bytes) -> bytes:
    """The parent with 640 contiguous bytes replaced, as a re-quantised 10x64 int8 head
    patched in place would be; every other byte identical."""
    start = len(parent) // 2
    noise = np.random.default_rng(0).integers(-127, 128, 640, dtype=np.int8).tobytes()
    return parent[:start] + noise + parent[start + 640 :]


@pytest.fixture(scope="module")
def zeros_frame() -> bytes:
    """An honest frame (content size declared, checksum) that decodes to 100 MiB of zeros,
    compressed in 1 MiB pieces so the test itself never holds 100 MiB."""
    params = zstandard.ZstdCompressionParameters.from_level(
        1, write_content_size=True, write_checksum=True
    )
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj(size=BIG)
    chunk = bytes(MIB)
    body = b"".join(stream.compress(chunk) for _ in range(BIG // MIB))
    return body + stream.flush()


def _header(frame: bytes) -> tuple[int, int, int]:
    """(frame header descriptor, offset of the content size field, its width) of a frame."""
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    dict_id_width = (0, 1, 2, 4)[descriptor & 3]
    width = {0: single_segment, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    return descriptor, 5 + (1 - single_segment) + dict_id_width, width


def _declaring(frame: bytes, content_size: int) -> bytes:
    """The same frame with its header's content size rewritten (a lying header)."""
    _, at, width = _header(frame)
    assert width in (4, 8)
    return frame[:at] + content_size.to_bytes(width, "little") + frame[at + width :]


def _traced_peak(call: Callable[[], object]) -> int:
    """Peak bytes Python allocated while `call` ran (the zstd output buffer is a bytes)."""
    tracemalloc.start()
    try:
        with pytest.raises(PatchError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_head_only_change_round_trips_and_is_small(parent: bytes, head_tuned: bytes) -> None:
    """A 640-byte in-place change of a 17 KB model rebuilds byte for byte from a patch of
    well under 5 % of the target."""
    patch = make_patch(parent, head_tuned)
    assert apply_patch(parent, patch, max_output=len(head_tuned)) == head_tuned
    assert len(patch) < 0.05 * len(head_tuned)


def test_round_trip_between_two_real_models(parent: bytes) -> None:
    """Patching one converter output into another (int8 vs uint8 I/O) is exact."""
    target = (TF / "digits_int8_io_uint8.tflite").read_bytes()
    patch = make_patch(parent, target)
    rebuilt = apply_patch(parent, patch, max_output=len(target))
    assert hashlib.sha256(rebuilt).digest() == hashlib.sha256(target).digest()


def test_unchanged_target_costs_next_to_nothing(parent: bytes) -> None:
    """A target identical to its parent patches to a few dozen bytes."""
    patch = make_patch(parent, parent)
    assert len(patch) < 64
    assert apply_patch(parent, patch, max_output=len(parent)) == parent


def test_patch_frame_declares_size_checksum_and_window(parent: bytes, head_tuned: bytes) -> None:
    """The frame carries the target's size and a checksum, and a window covering the parent."""
    frame = zstandard.get_frame_parameters(make_patch(parent, head_tuned))
    assert frame.content_size == len(head_tuned)
    assert frame.has_checksum
    assert frame.window_size <= 1 << window_log_for(len(parent), len(head_tuned))


def test_parent_that_looks_like_a_zstd_dictionary_is_raw_content() -> None:
    """A parent starting with zstd's dictionary magic is still used as raw bytes."""
    parent = b"\x37\xa4\x30\xec" + bytes(range(256)) * 64
    target = parent[:1000] + b"changed" + parent[1007:]
    assert apply_patch(parent, make_patch(parent, target), max_output=len(target)) == target


def test_patch_error_is_an_edged_error() -> None:
    """PatchError sits in edged's error tree, so the updater's one except clause sees it."""
    assert issubclass(PatchError, EdgedError)


def test_wrong_parent_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """A patch applied to another model than its parent fails the frame's checksum."""
    patch = make_patch(parent, head_tuned)
    other = (TF / "digits_int8_io_float.tflite").read_bytes()
    with pytest.raises(PatchError, match="does not rebuild"):
        apply_patch(other, patch, max_output=len(head_tuned))


def test_parent_with_one_flipped_byte_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """One flipped byte in a region the patch copies from is caught by the checksum."""
    patch = make_patch(parent, head_tuned)
    damaged = bytearray(parent)
    damaged[100] ^= 0xFF
    with pytest.raises(PatchError, match="checksum"):
        apply_patch(bytes(damaged), patch, max_output=len(head_tuned))


def test_truncated_parent_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """A parent shorter than the one the patch was made against is refused."""
    patch = make_patch(parent, head_tuned)
    with pytest.raises(PatchError):
        apply_patch(parent[:4096], patch, max_output=len(head_tuned))


def test_empty_parent_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """Without a parent there is nothing to patch."""
    with pytest.raises(PatchError, match="parent artifact is empty"):
        apply_patch(b"", make_patch(parent, head_tuned), max_output=len(head_tuned))


@pytest.mark.parametrize("keep", [0, 3, 5, 12, 0.5, -1])
def test_truncated_patch_is_refused(parent: bytes, head_tuned: bytes, keep: float) -> None:
    """A patch cut anywhere (inside the header, a block or the checksum) is refused."""
    patch = make_patch(parent, head_tuned)
    cut = int(len(patch) * keep) if isinstance(keep, float) else keep % len(patch)
    with pytest.raises(PatchError):
        apply_patch(parent, patch[:cut], max_output=len(head_tuned))


@pytest.mark.parametrize("seed", range(5))
def test_garbage_patch_is_refused(parent: bytes, seed: int) -> None:
    """Random bytes, with or without a zstd magic number in front, are refused."""
    noise = np.random.default_rng(seed).bytes(2048)
    for patch in (noise, b"\x28\xb5\x2f\xfd" + noise):
        with pytest.raises(PatchError):
            apply_patch(parent, patch, max_output=len(parent))


def test_corrupted_patch_body_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """Each flipped byte past the header makes the patch fail decoding or its checksum."""
    patch = make_patch(parent, head_tuned)
    for at in range(8, len(patch)):
        damaged = bytearray(patch)
        damaged[at] ^= 0x55
        with pytest.raises(PatchError):
            apply_patch(parent, bytes(damaged), max_output=len(head_tuned))


def test_data_after_the_frame_is_refused(parent: bytes, head_tuned: bytes) -> None:
    """Trailing bytes, or a second frame, are not silently ignored."""
    patch = make_patch(parent, head_tuned)
    for extra in (b"\x00", patch):
        with pytest.raises(PatchError, match="unused data"):
            apply_patch(parent, patch + extra, max_output=len(head_tuned))


def test_output_cap_is_inclusive(parent: bytes, head_tuned: bytes) -> None:
    """A cap of exactly the target length passes; one byte less is refused."""
    patch = make_patch(parent, head_tuned)
    assert apply_patch(parent, patch, max_output=len(head_tuned)) == head_tuned
    with pytest.raises(PatchError, match="over the"):
        apply_patch(parent, patch, max_output=len(head_tuned) - 1)


def test_declared_size_over_cap_is_refused_before_decoding(
    parent: bytes, zeros_frame: bytes
) -> None:
    """A frame declaring 100 MiB against a 1 MiB cap is refused from its header: the refusal
    allocates almost nothing."""
    peak = _traced_peak(lambda: apply_patch(parent, zeros_frame, max_output=MIB))
    assert peak < 64 * 1024


def test_lying_header_stops_at_the_cap(parent: bytes, zeros_frame: bytes) -> None:
    """A frame whose header claims 1 MiB but whose blocks hold 100 MiB fails at the cap,
    having allocated about the cap and not the 100 MiB."""
    lying = _declaring(zeros_frame, MIB)
    assert zstandard.get_frame_parameters(lying).content_size == MIB
    peak = _traced_peak(lambda: apply_patch(parent, lying, max_output=MIB))
    assert peak < 2 * MIB


def test_frame_without_content_size_is_refused(parent: bytes) -> None:
    """A frame that does not declare its size is refused (make_patch always declares it)."""
    stream = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compressobj()
    frame = stream.compress(bytes(1000)) + stream.flush()
    with pytest.raises(PatchError, match="does not declare its content size"):
        apply_patch(parent, frame, max_output=MIB)


def test_frame_without_checksum_is_refused(parent: bytes) -> None:
    """Without a checksum a wrong parent could pass the decoder: refused."""
    frame = zstandard.ZstdCompressor(write_checksum=False).compress(bytes(1000))
    with pytest.raises(PatchError, match="no checksum"):
        apply_patch(parent, frame, max_output=MIB)


def test_empty_target_frame_is_refused(parent: bytes) -> None:
    """A frame declaring zero bytes is not an artifact (and zstandard would not decode it)."""
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(b"")
    with pytest.raises(PatchError, match="empty target"):
        apply_patch(parent, frame, max_output=MIB)


def test_window_larger_than_parent_and_cap_need_is_refused() -> None:
    """A frame asking for a 128 MiB decoder window for a 1,000-byte target is refused."""
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1000))
    descriptor, _, width = _header(frame)
    assert descriptor & 0x20 and width == 2  # single segment, 2-byte content size
    # Clear the single-segment flag and insert a window descriptor: 2^(10 + 17) bytes.
    big_window = frame[:4] + bytes([descriptor & ~0x20]) + bytes([17 << 3]) + frame[5:]
    assert zstandard.get_frame_parameters(big_window).window_size == 128 * MIB
    with pytest.raises(PatchError, match="window"):
        apply_patch(b"p" * 4096, big_window, max_output=2000)


def test_non_positive_cap_is_a_caller_error(parent: bytes) -> None:
    """max_output must be positive: a programming error, not a bad patch."""
    with pytest.raises(ValueError, match="max_output"):
        apply_patch(parent, make_patch(parent, parent), max_output=0)


def test_make_patch_needs_a_parent_and_a_target(parent: bytes) -> None:
    """An empty parent or an empty target cannot make a patch the device would accept."""
    with pytest.raises(ValueError, match="parent"):
        make_patch(b"", parent)
    with pytest.raises(ValueError, match="target"):
        make_patch(parent, b"")


def test_window_log_follows_the_larger_size() -> None:
    """The window covers the larger of parent and target, within zstd's bounds."""
    assert window_log_for(1, 1) == zstandard.WINDOWLOG_MIN
    assert window_log_for(10 * MIB, 1000) == 24
    assert window_log_for(1000, 10 * MIB + 1) == 24
    assert window_log_for(1 << 40, 1) == 31
