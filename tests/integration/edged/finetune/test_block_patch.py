"""The last block on the real digits int8 model: its inputs read through LiteRT, its weights
re-quantised and patched in place with the head (the embedding re-calibrated), and the
provenance check that allows exactly the ops the manifest lets a fine-tune change."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, open_bundle
from edged.finetune.activations import tensor_values
from edged.finetune.head_patch import (
    HeadPatchError,
    check_changed_only,
    differs_only_in,
    fc_outputs,
    patch_fc,
    read_fc,
    trainable_outputs,
)
from edged_formats import Bundle, read_bundle, write_bundle
from edged_formats.bundle import digest_members

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def base(digits_build) -> Bundle:
    """The digits reference bundle, which allows its last block to be trained."""
    out, report = digits_build
    bundle = open_bundle(out / report.bundle)
    assert bundle.manifest.block is not None
    return bundle


@pytest.fixture(scope="module")
def samples(digits_build) -> np.ndarray:
    """Held-out raw digits."""
    with np.load(digits_build[0] / "digits-test.npz") as data:
        return data["x"]


def _with_model(base: Bundle, model: bytes) -> Bundle:
    members = dict(base.members) | {"model.tflite": model}
    manifest = dataclasses.replace(base.manifest, members=digest_members(members))
    return read_bundle(write_bundle(manifest, members))


def _patched(base: Bundle, samples: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The model with a perturbed block (embedding re-calibrated) and its own head re-patched
    at the new embedding scale; the block inputs and the float embeddings of `samples`."""
    block = base.manifest.block
    assert block is not None
    op = read_fc(base.model, block.output)
    weight, bias = op.dequantised()
    rng = np.random.default_rng(0)
    weight = weight + rng.normal(0, 0.01, weight.shape).astype(np.float32)
    inputs = tensor_values(base, op.input_name, samples)
    embeddings = fc_outputs(inputs, weight, bias, op.activation)
    model = patch_fc(
        base.model,
        block.output,
        weight,
        bias,
        output_range=(float(embeddings.min()), float(embeddings.max())),
    )
    head_w, head_b = read_fc(base.model, base.manifest.output.name).dequantised()
    model = patch_fc(model, base.manifest.output.name, head_w, head_b)
    return model, inputs, embeddings


def test_block_inputs_are_what_the_block_reads(base: Bundle, samples: np.ndarray) -> None:
    """The block's de-quantised inputs through its own int8 weights give the engine's
    embeddings to within a couple of quantisation steps of the embedding (inside the
    embedding's quantised range)."""
    block = base.manifest.block
    assert block is not None
    op = read_fc(base.model, block.output)
    assert (op.activation, op.weight.shape) == ("RELU", (64, 512))
    inputs = tensor_values(base, op.input_name, samples)
    weight, bias = op.dequantised()
    engine_embeddings = Engine(base, EngineOptions()).predict(samples).embeddings
    assert engine_embeddings is not None
    # the int8 output saturates where samples go past the range calibrated for it
    low, high = ((q - op.output_zero_point) * op.output_scale for q in (-128, 127))
    computed = np.clip(fc_outputs(inputs, weight, bias, op.activation), low, high)
    error = np.abs(computed - engine_embeddings)
    assert error.max() <= 2 * op.output_scale


def test_patched_block_runs_and_follows_its_float_weights(
    base: Bundle, samples: np.ndarray
) -> None:
    """LiteRT's embeddings of the patched model follow the new float block, at the embedding
    scale re-calibrated to the new range; the head's bias scale follows that scale."""
    model, _, embeddings = _patched(base, samples)
    block = base.manifest.block
    assert block is not None
    after = read_fc(model, block.output)
    assert after.output_scale == pytest.approx(float(embeddings.max()) / 255, rel=1e-5)
    head = read_fc(model, base.manifest.output.name)
    assert head.input_scale == after.output_scale
    assert np.allclose(head.bias_scale, head.input_scale * head.weight_scale, rtol=1e-6)
    served = Engine(_with_model(base, model), EngineOptions()).predict(samples).embeddings
    assert served is not None
    assert np.abs(served - embeddings).max() <= 3 * after.output_scale


def test_provenance_allows_exactly_what_the_manifest_allows(
    base: Bundle, samples: np.ndarray
) -> None:
    """A new block and head pass the check with the manifest's trainable outputs, not with
    the head alone; a byte flipped outside both ops fails with its offset."""
    model, _, _ = _patched(base, samples)
    names = trainable_outputs(base.manifest)
    assert names == (base.manifest.output.name, base.manifest.embedding.name)
    assert differs_only_in(base.model, model, names)
    assert not differs_only_in(base.model, model, (base.manifest.output.name,))
    no_block = dataclasses.replace(base.manifest, block=None)
    assert not differs_only_in(base.model, model, trainable_outputs(no_block))
    diff = np.flatnonzero(np.frombuffer(base.model, np.uint8) != np.frombuffer(model, np.uint8))
    offset = next(i for i in (100, len(model) // 2, len(model) - 50) if i not in diff)
    spoiled = bytearray(model)
    spoiled[offset] ^= 0x01
    with pytest.raises(HeadPatchError, match=f"at byte {offset}, outside the trained ops"):
        check_changed_only(base.model, bytes(spoiled), names)


def test_a_block_of_the_wrong_shape_is_refused(base: Bundle) -> None:
    """Block weights that do not fit the op, or are not finite, are refused before writing."""
    block = base.manifest.block
    assert block is not None
    weight, bias = read_fc(base.model, block.output).dequantised()
    with pytest.raises(HeadPatchError, match="expects"):
        patch_fc(base.model, block.output, weight[:, :-1], bias)
    broken = weight.copy()
    broken[0, 0] = np.inf
    with pytest.raises(HeadPatchError, match="non-finite"):
        patch_fc(base.model, block.output, broken, bias)
