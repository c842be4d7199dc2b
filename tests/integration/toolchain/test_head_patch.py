"""In-place head patching of a real int8 .tflite (the digits reference build): the
re-quantisation matches ai-edge-quantizer byte for byte, only the head's bytes change, LiteRT
runs the result, and models that have no patchable head are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, open_bundle
from edged.finetune.head_patch import HeadPatchError, patch_head, read_head
from edged_formats import Bundle, read_bundle, write_bundle
from edged_formats.bundle import digest_members

pytestmark = [pytest.mark.train, pytest.mark.slow]

TF = Path(__file__).resolve().parents[2] / "fixtures" / "tf"


@pytest.fixture(scope="module")
def base(digits_build) -> Bundle:
    """The digits reference bundle as the toolchain built it."""
    out, report = digits_build
    return open_bundle(out / report.bundle)


def _head(base: Bundle) -> tuple[np.ndarray, np.ndarray]:
    head = base.head_weights()
    assert head is not None
    return head


def _with_model(base: Bundle, model: bytes) -> Bundle:
    members = dict(base.members) | {"model.tflite": model}
    manifest = dataclasses.replace(base.manifest, members=digest_members(members))
    return read_bundle(write_bundle(manifest, members))


def test_requantising_the_shipped_head_reproduces_the_model(base: Bundle) -> None:
    """Patching in the bundle's own float head gives back the quantizer's bytes exactly."""
    weight, bias = _head(base)
    assert patch_head(base.model, base.manifest.output.name, weight, bias) == base.model


def test_dequantised_head_is_within_half_a_step(base: Bundle) -> None:
    """read_head's int8 values stand for the float head to within half a quantisation step."""
    weight, bias = _head(base)
    head = read_head(base.model, base.manifest.output.name)
    w, b = head.dequantised()
    assert w.shape == weight.shape and head.weight_scale.shape == (weight.shape[0],)
    assert np.all(np.abs(w - weight) <= head.weight_scale[:, None] / 2 + 1e-9)
    assert np.all(np.abs(b - bias) <= head.bias_scale / 2 + 1e-9)


def test_changed_head_touches_only_head_bytes_and_runs(base: Bundle, digits_build) -> None:
    """A perturbed head changes only bytes inside the head's tensors and quantisation, and
    LiteRT's int8 top-1 follows the float head applied to the same embeddings."""
    weight, bias = _head(base)
    rng = np.random.default_rng(0)
    tuned_w = weight + rng.normal(0, 0.05, weight.shape).astype(np.float32)
    tuned_b = bias + np.float32(0.1)
    name = base.manifest.output.name
    patched = patch_head(base.model, name, tuned_w, tuned_b)
    assert len(patched) == len(base.model)
    changed = np.count_nonzero(
        np.frombuffer(patched, np.uint8) != np.frombuffer(base.model, np.uint8)
    )
    # int8 weights + int32 bias + one float32 scale per class for each of weight and bias
    assert 0 < changed <= weight.size + 4 * bias.size + 2 * 4 * len(bias)
    after = read_head(patched, name)
    assert after.output_scale == read_head(base.model, name).output_scale
    with np.load(digits_build[0] / "digits-test.npz") as data:
        x = data["x"]
    prediction = Engine(_with_model(base, patched), EngineOptions()).predict(x)
    embeddings = Engine(base, EngineOptions()).predict(x).embeddings
    assert embeddings is not None
    float_top1 = np.argmax(embeddings @ tuned_w.T + tuned_b, axis=1)
    assert np.mean(prediction.top1 == float_top1) >= 0.95


def test_logit_range_recalibrates_the_output(base: Bundle) -> None:
    """With a logit range the output's scale and zero point follow the quantizer's rule."""
    weight, bias = _head(base)
    name = base.manifest.output.name
    patched = patch_head(base.model, name, weight, bias, logit_range=(-10.0, 30.0))
    head = read_head(patched, name)
    assert head.output_scale == pytest.approx(40.0 / 255, rel=1e-6)
    assert head.output_zero_point == round(-128 + 10.0 / (40.0 / 255))
    assert np.array_equal(head.weight, read_head(base.model, name).weight)


def test_wrong_shapes_and_non_finite_heads_are_refused(base: Bundle) -> None:
    """A head of another shape, or with NaN, is refused before anything is written."""
    weight, bias = _head(base)
    name = base.manifest.output.name
    with pytest.raises(HeadPatchError, match="expects"):
        patch_head(base.model, name, weight[:, :-1], bias)
    with pytest.raises(HeadPatchError, match="expects"):
        patch_head(base.model, name, weight, bias[:-1])
    broken = weight.copy()
    broken[0, 0] = np.nan
    with pytest.raises(HeadPatchError, match="non-finite"):
        patch_head(base.model, name, broken, bias)
    with pytest.raises(HeadPatchError, match="finite interval"):
        patch_head(base.model, name, weight, bias, logit_range=(1.0, -1.0))


def test_unknown_output_is_refused(base: Bundle) -> None:
    """An output name the model does not have is refused."""
    weight, bias = _head(base)
    with pytest.raises(HeadPatchError, match="no output named"):
        patch_head(base.model, "logits", weight, bias)


def test_output_not_made_by_fully_connected_is_refused(base: Bundle) -> None:
    """A TF-converter model ending in softmax has no head to patch in place, and bytes that
    are no flatbuffer are refused."""
    tf_model = (TF / "digits_int8_io_int8.tflite").read_bytes()
    with pytest.raises(HeadPatchError, match="FullyConnected"):
        read_head(tf_model, "StatefulPartitionedCall_1:0")
    with pytest.raises(HeadPatchError):
        read_head(b"not a flatbuffer", "x")
