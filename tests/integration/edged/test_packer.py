"""The packer as a library: every request it cannot pack is one ModelError sentence, checked
before any work, and a model whose class output is ambiguous must be told which it is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.engine import Engine
from edged.errors import ModelError
from edged.packer import PackRequest, balanced_replay, pack
from edged_formats import read_bundle
from tests.conftest import FIXTURES
from tests.support.shared import session_build

LABELS = [str(i) for i in range(10)]
SCORES, SECOND, EMBEDDING = (f"serving_default_output_{i}_output" for i in range(3))


def build_odd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny litert-torch models with awkward outputs and inputs, built once per session (the
    files are cached under the session's base temp directory, so every module shares them).

    - one:       16 floats -> output [1, 1]
    - grouped:   16 floats -> output [1, 2, 5] (two groups of five, not one classification)
    - two_heads: 16 floats -> softmax [1, 10], scores [1, 10], embedding [1, 4]
    - int_input: 16 int32  -> float output [1, 10]
    """
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    import torch

    from control_plane.toolchain.convert import export_float

    class One(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=1, keepdim=True)

    class Grouped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x[:, :10].reshape(-1, 2, 5), dim=-1)

    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.softmax(x[:, :10], dim=1), x[:, 6:16] * 2.0, x[:, :4] + 1.0

    class IntInput(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x[:, :10].float(), dim=1)

    float_sample, int_sample = torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int32)
    specs: dict[str, tuple[Any, torch.Tensor]] = {
        "one": (One(), float_sample),
        "grouped": (Grouped(), float_sample),
        "two_heads": (TwoHeads(), float_sample),
        "int_input": (IntInput(), int_sample),
    }
    paths = {}
    with session_build(tmp_path_factory, "odd-models") as cache:
        for name, (module, sample) in specs.items():
            paths[name] = cache / f"{name}.tflite"
            if not paths[name].exists():
                paths[name].write_bytes(export_float(module, sample))
    return paths


@pytest.fixture(scope="session")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The awkward litert-torch models of `build_odd_models`."""
    return build_odd_models(tmp_path_factory)


@pytest.fixture
def digits(tf_reference) -> PackRequest:
    """A request that packs: the TF float digits model with its 64 reference samples."""
    return PackRequest(
        model=(FIXTURES / "tf" / "digits_float.tflite").read_bytes(),
        labels=LABELS,
        calibration=tf_reference["x"],
        calibration_labels=tf_reference["y"],
        name="digits",
        version="1.0.0",
    )


def vectors(count: int = 32, dtype: Any = np.float32) -> np.ndarray:
    """Calibration samples for the 16-value odd models."""
    return np.random.default_rng(0).uniform(-3, 3, (count, 16)).astype(dtype)


def two_heads(odd_models: dict[str, Path]) -> PackRequest:
    """A request for the two-heads model, its scores as the class output, with an embedding."""
    return PackRequest(
        model=odd_models["two_heads"].read_bytes(),
        labels=LABELS,
        calibration=vectors(),
        name="headed",
        version="1",
        output_name=SCORES,
        embedding_output=EMBEDDING,
    )


def refused(request: PackRequest, **changes: Any) -> str:
    """The ModelError message `pack` gives for `request` with `changes`; it must be one line."""
    with pytest.raises(ModelError) as caught:
        pack(dataclasses.replace(request, **changes))
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_the_valid_request_packs(digits: PackRequest) -> None:
    """The baseline request the refusals below start from does pack."""
    bundle = read_bundle(pack(digits))
    assert bundle.labels == tuple(LABELS)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ([], "at least 2 labels, got 0"),
        (["only"], "at least 2 labels, got 1"),
        ([*LABELS[:9], "0"], "'0' appears more than once"),
        ([*LABELS[:9], ""], "'' is not one line"),
        ([*LABELS[:9], " 9"], "' 9' is not one line"),
        ([*LABELS[:9], "nine\nten"], "is not one line"),
    ],
)
def test_labels_are_refused_unless_two_or_more_distinct_lines(
    digits: PackRequest, labels: list[str], problem: str
) -> None:
    """Fewer than 2 labels, duplicates, blank or multi-line labels: ModelError, no bundle."""
    assert problem in refused(digits, labels=labels)


@pytest.mark.parametrize(
    ("calibration", "problem"),
    [
        (np.full((64, 8, 8, 1), np.nan, np.float32), "4096 non-finite values"),
        (np.full((64, 8, 8, 1), np.inf, np.float32), "non-finite"),
        (np.zeros((1, 8, 8, 1), np.float32), "at least 2 samples"),
        (np.zeros((0, 8, 8, 1), np.float32), "at least 2 samples"),
        (np.zeros((64, 8, 8, 1), bool), "integer or float array, not bool"),
        (np.array(["a", "b"]), "integer or float array, not <U1"),
        (np.zeros((64, 16), np.float32), "calibration samples have shape [16]"),
        (np.zeros((64, 8, 8), np.float32), "takes samples of shape [8, 8, 1]"),
    ],
)
def test_calibration_must_be_finite_numbers_shaped_like_the_input(
    digits: PackRequest, calibration: np.ndarray, problem: str
) -> None:
    """NaN/inf, too few samples, non-numeric dtypes or the wrong sample shape: ModelError."""
    assert problem in refused(digits, calibration=calibration, calibration_labels=None)


@pytest.mark.parametrize(
    ("truth", "problem"),
    [
        (np.zeros(10, np.int64), "shape [10], expected one per sample ([64])"),
        (np.zeros(64, np.float32), "integer class indices, not float32"),
        (np.full(64, 10), "from 0 to 9, found 10 to 10"),
        (np.full(64, -1), "from 0 to 9, found -1 to -1"),
    ],
)
def test_calibration_labels_must_be_one_class_index_per_sample(
    digits: PackRequest, truth: np.ndarray, problem: str
) -> None:
    """Calibration labels of the wrong length, dtype or range are refused, not broadcast."""
    assert problem in refused(digits, calibration_labels=truth)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"name": "Bad Name"}, "manifest name"),
        ({"version": ""}, "manifest version"),
        ({"input_scale": 0.0}, "input scale must be a finite non-zero number, not 0.0"),
        ({"input_scale": float("nan")}, "input scale"),
        ({"input_offset": float("inf")}, "input offset must be a finite number"),
        ({"model": b"not a model at all"}, "refused the model"),
        ({"metrics": {"f1": float("nan")}}, "metric 'f1' must be a finite number, not nan"),
        ({"metrics": {"f1": "high"}}, "metric 'f1' must be a finite number, not 'high'"),
    ],
)
def test_bad_fields_become_one_model_error(
    digits: PackRequest, changes: dict[str, Any], problem: str
) -> None:
    """Bad name, version, scale, offset, model or metrics: ModelError, never a FormatError."""
    assert problem in refused(digits, **changes)


def test_named_outputs_must_exist(digits: PackRequest) -> None:
    """An output or embedding name the model does not have is refused, listing the outputs."""
    assert "no output named 'nope' (outputs: 'StatefulPartitionedCall_1:0')" in refused(
        digits, output_name="nope"
    )
    assert "no output named 'emb'" in refused(digits, embedding_output="emb")
    assert "both the class output and the embedding" in refused(
        digits, embedding_output="StatefulPartitionedCall_1:0"
    )


def test_a_head_needs_an_embedding_output(digits: PackRequest) -> None:
    """A head for a model without a second output is refused instead of packed unusable."""
    head = (np.zeros((10, 4), np.float32), np.zeros(10, np.float32))
    assert "cannot tell which output is the embedding among none" in refused(digits, head=head)
    nan_head = (np.full((10, 4), np.nan, np.float32), np.zeros(10, np.float32))
    assert "finite numbers" in refused(digits, head=nan_head)


def test_replay_set_is_stored_and_read_back(digits: PackRequest, tf_reference) -> None:
    """A replay set packs into replay.npz (int64 labels) and reads back exactly."""
    x, y = balanced_replay(tf_reference["x"], tf_reference["y"], 3, seed=1)
    bundle = read_bundle(pack(dataclasses.replace(digits, replay=(x, y.astype(np.int32)))))
    assert bundle.manifest.replay is not None and "replay.npz" in bundle.members
    replay_x, replay_y = bundle.replay()
    assert np.array_equal(replay_x, x) and replay_x.dtype == np.float32
    assert np.array_equal(replay_y, y) and replay_y.dtype == np.int64
    assert read_bundle(pack(digits)).replay() is None


def test_balanced_replay_is_deterministic_and_balanced(tf_reference) -> None:
    """per_class samples of every class, in dataset order, the same for the same seed."""
    x, y = balanced_replay(tf_reference["x"], tf_reference["y"], 3, seed=0)
    assert x.shape == (30, 8, 8, 1) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [3] * 10
    again_x, again_y = balanced_replay(tf_reference["x"], tf_reference["y"], 3, seed=0)
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    other_x, _ = balanced_replay(tf_reference["x"], tf_reference["y"], 3, seed=1)
    assert not np.array_equal(x, other_x)
    with pytest.raises(ModelError, match="class 3 has 3 samples, fewer than the 4 per class"):
        balanced_replay(tf_reference["x"], tf_reference["y"], 4)
    with pytest.raises(ModelError, match="at least 1 sample per class, not 0"):
        balanced_replay(tf_reference["x"], tf_reference["y"], 0)


BALANCED_Y = np.arange(20, dtype=np.int64) % 10


@pytest.mark.parametrize(
    ("x", "y", "problem"),
    [
        (np.zeros((20, 8, 8, 1), np.uint8), BALANCED_Y, "replay samples are uint8 but the calib"),
        (np.zeros((20, 8, 8, 1), bool), BALANCED_Y, "integer or float array, not bool"),
        (np.zeros((0, 8, 8, 1), np.float32), BALANCED_Y[:0], "at least 1 sample"),
        (np.full((20, 8, 8, 1), np.nan, np.float32), BALANCED_Y, "1280 non-finite values"),
        (np.zeros((20, 8, 8), np.float32), BALANCED_Y, "replay samples have shape [8, 8] but"),
        (np.zeros((20, 16), np.float32), BALANCED_Y, "takes samples of shape [8, 8, 1]"),
        (np.zeros((20, 8, 8, 1), np.float32), BALANCED_Y[:19], "shape [19], expected one per"),
        (np.zeros((20, 8, 8, 1), np.float32), BALANCED_Y * 0.5, "integer class indices, not f"),
        (np.zeros((20, 8, 8, 1), np.float32), BALANCED_Y + 1, "from 0 to 9, found 1 to 10"),
        (
            np.zeros((20, 8, 8, 1), np.float32),
            np.where(BALANCED_Y == 9, 0, BALANCED_Y),
            "replay set is not class-balanced: class 9 has no sample",
        ),
        (
            np.zeros((25, 8, 8, 1), np.float32),
            np.r_[np.zeros(5, np.int64), BALANCED_Y],
            "class 0 has 7 samples, more than 2 times the 2 of class 1",
        ),
    ],
)
def test_replay_must_be_balanced_raw_samples_like_the_calibration(
    digits: PackRequest, x: np.ndarray, y: np.ndarray, problem: str
) -> None:
    """Replay samples of another dtype or shape than the calibration data, non-finite values,
    labels that are not one class index each, or an unbalanced set: one ModelError."""
    assert problem in refused(digits, replay=(x, y))


@pytest.mark.train
def test_single_value_output_is_not_a_classifier(odd_models: dict[str, Path]) -> None:
    """A [1, 1] output is refused with 1 label (no IndexError in canary picking) and with 2."""
    model = odd_models["one"].read_bytes()
    request = PackRequest(model=model, labels=["a"], calibration=vectors(), name="a", version="1")
    assert "at least 2 labels, got 1" in refused(request)
    assert "no model output has 2 values" in refused(request, labels=["a", "b"])


@pytest.mark.train
def test_grouped_output_is_not_one_classification(odd_models: dict[str, Path]) -> None:
    """A [1, 2, 5] output has 10 values but is not one score per label: refused."""
    request = PackRequest(
        model=odd_models["grouped"].read_bytes(),
        labels=LABELS,
        calibration=vectors(),
        name="grouped",
        version="1",
    )
    assert "has shape [1, 2, 5], not [batch, classes]" in refused(request)


@pytest.mark.train
def test_int32_input_is_refused(odd_models: dict[str, Path]) -> None:
    """A model with an int32 input tensor is refused by name, not by a manifest traceback."""
    request = PackRequest(
        model=odd_models["int_input"].read_bytes(),
        labels=LABELS,
        calibration=vectors(dtype=np.int32),
        name="ints",
        version="1",
    )
    assert "input 'serving_default_args_0' is int32; edged serves float32" in refused(request)


@pytest.mark.train
def test_ambiguous_class_output_needs_a_name(odd_models: dict[str, Path]) -> None:
    """Two outputs with a value per label are refused unless output_name picks the one served."""
    request = PackRequest(
        model=odd_models["two_heads"].read_bytes(),
        labels=LABELS,
        calibration=vectors(),
        name="two",
        version="1",
    )
    message = refused(request)
    assert f"outputs '{SCORES}', '{SECOND}' all have 10 values" in message
    assert "4 values, not one per label (10)" in refused(request, output_name=EMBEDDING)
    for name, kind in ((SCORES, "probabilities"), (SECOND, "logits")):
        bundle = read_bundle(pack(dataclasses.replace(request, output_name=name)))
        assert bundle.manifest.output.name == name and bundle.manifest.output.kind == kind
    # naming the other 10-wide output as the embedding also settles which one holds the scores
    bundle = read_bundle(pack(dataclasses.replace(request, embedding_output=SECOND)))
    assert bundle.manifest.output.name == SCORES and bundle.manifest.embedding is not None


@pytest.mark.train
def test_head_must_fit_labels_and_embedding(odd_models: dict[str, Path]) -> None:
    """A head packs when it is [classes, embedding] and [classes]; other shapes are refused."""
    request = dataclasses.replace(
        two_heads(odd_models), head=(np.zeros((10, 4), np.float32), np.zeros(10, np.float32))
    )
    bundle = read_bundle(pack(request))
    assert bundle.manifest.embedding is not None and bundle.manifest.embedding.size == 4
    embeddings = Engine(bundle).predict(vectors(3)).embeddings
    assert embeddings is not None and embeddings.shape == (3, 4)
    wrong = (np.zeros((10, 5), np.float32), np.zeros(10, np.float32))
    assert "weight [10, 5] and bias [10], but the model needs [10, 4] and [10]" in refused(
        request, head=wrong
    )


@pytest.mark.train
def test_a_block_must_be_a_fully_connected_op_feeding_the_head(
    digits: PackRequest, odd_models: dict[str, Path]
) -> None:
    """A trainable block needs an embedding produced by a FullyConnected op the head reads;
    shipped float weights must fit that op."""
    assert "a trainable block needs an embedding output" in refused(digits, block=True)
    request = two_heads(odd_models)
    assert "the embedding's block cannot be trained in place" in refused(request, block=True)
    nan = (np.full((4, 16), np.nan, np.float32), np.zeros(4, np.float32))
    assert "the block's weight and bias must be arrays of finite numbers" in refused(
        request, block=nan
    )


@pytest.mark.train
def test_shipped_block_weights_are_packed_and_checked(digits_build) -> None:
    """The reference build's model packs with its block's float weights as block.npz (read
    back exactly); weights of another shape are refused naming both shapes."""
    from edged.finetune.head_patch import read_fc

    out, report = digits_build
    built = read_bundle((out / report.bundle).read_bytes())
    assert built.manifest.block is not None and built.manifest.embedding is not None
    weight, bias = read_fc(built.model, built.manifest.block.output).dequantised()
    request = PackRequest(
        model=built.model,
        labels=list(built.labels),
        calibration=built.canary_inputs,
        name="digits",
        version="1.0.0",
        output_name=built.manifest.output.name,
        embedding_output=built.manifest.embedding.name,
        input_scale=built.manifest.input.scale,
        input_offset=built.manifest.input.offset,
        block=(weight, bias),
    )
    bundle = read_bundle(pack(request))
    assert bundle.manifest.block is not None and bundle.manifest.block.member == "block.npz"
    shipped = bundle.block_weights()
    assert shipped is not None
    assert np.array_equal(shipped[0], weight) and np.array_equal(shipped[1], bias)
    assert "the block has weight [64, 511] and bias [64], but the model needs [64, 512]" in (
        refused(request, block=(weight[:, :-1], bias))
    )
