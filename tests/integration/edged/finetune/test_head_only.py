"""The provenance check on the real digits int8 model: a model patched by `patch_head` is the
base with only a new head; one byte changed anywhere else is not."""

from __future__ import annotations

import numpy as np
import pytest

from edged.engine import open_bundle
from edged.finetune.head_patch import (
    HeadPatchError,
    check_changed_only,
    differs_only_in,
    patch_head,
    read_head,
)

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def models(digits_build) -> tuple[bytes, bytes, str]:
    """The base .tflite, one with a perturbed head (output re-calibrated), the output name."""
    out, report = digits_build
    base = open_bundle(out / report.bundle)
    head = base.head_weights()
    assert head is not None
    rng = np.random.default_rng(0)
    weight = head[0] + rng.normal(0, 0.05, head[0].shape).astype(np.float32)
    name = base.manifest.output.name
    patched = patch_head(base.model, name, weight, head[1] + 0.1, logit_range=(-20.0, 25.0))
    return base.model, patched, name


def test_patched_head_passes(models: tuple[bytes, bytes, str]) -> None:
    """A new head, re-quantised and with re-calibrated logits: only the head differs."""
    base, patched, name = models
    assert patched != base
    assert differs_only_in(base, patched, (name,))
    assert differs_only_in(base, base, (name,))


def test_one_flipped_byte_outside_the_head_fails(models: tuple[bytes, bytes, str]) -> None:
    """A byte changed anywhere outside the head's tensors is found, with its offset."""
    base, patched, name = models
    diff = np.flatnonzero(np.frombuffer(base, np.uint8) != np.frombuffer(patched, np.uint8))
    outside = [i for i in (100, len(base) // 3, len(base) // 2, len(base) - 50) if i not in diff]
    for offset in outside:
        spoiled = bytearray(patched)
        spoiled[offset] ^= 0x01
        assert not differs_only_in(base, bytes(spoiled), (name,))
        with pytest.raises(HeadPatchError, match=f"at byte {offset}, outside the head"):
            check_changed_only(base, bytes(spoiled), (name,))


def test_a_flipped_byte_inside_the_head_weights_passes(models: tuple[bytes, bytes, str]) -> None:
    """The head's weight data is the candidate's to change: a byte there still passes."""
    base, patched, name = models
    weight = read_head(patched, name).weight
    offset = bytes(patched).find(weight.tobytes())
    assert offset > 0
    spoiled = bytearray(patched)
    spoiled[offset] ^= 0x01
    assert differs_only_in(base, bytes(spoiled), (name,))


def test_other_lengths_and_non_models_fail(models: tuple[bytes, bytes, str]) -> None:
    """A candidate of another length, or not a model at all, is refused with a reason."""
    base, patched, name = models
    with pytest.raises(HeadPatchError, match="bytes, the base"):
        check_changed_only(base, patched + b"\0", (name,))
    with pytest.raises(HeadPatchError, match="head cannot be read"):
        check_changed_only(base, b"\0" * len(base), (name,))
