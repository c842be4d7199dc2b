"""Wrap a .tflite made anywhere into a bundle, measuring its reference statistics and canaries
on calibration data with the same engine that will serve it.

`pack` checks the request before any inference (labels, calibration data, the model's tensors)
and raises one ModelError sentence for anything it cannot pack, format errors included.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edged.engine import Engine, EngineOptions
from edged.errors import InputError, ModelError, ModelMismatch
from edged.runtime import load_runtime
from edged_formats import (
    BlockSpec,
    Bundle,
    Canaries,
    ConfidenceHistogram,
    EmbeddingSpec,
    FormatError,
    HeadSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    ReferenceStats,
    ReplaySpec,
    check_replay,
    read_bundle,
    write_bundle,
)
from edged_formats.bundle import digest_members, dump_npy, dump_npz
from edged_formats.manifest import SCORE_QUANTILE_NAMES, TENSOR_DTYPES
from edged_formats.scores import max_probability, score

__all__ = ["PackRequest", "balanced_replay", "pack", "reference_statistics"]

HISTOGRAM_BINS = 20
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)
MAX_ELEMENT_FEATURES = 4096
CANARY_COUNT = 8
BLOCK_MEMBER = "block.npz"  # the float weights of a trainable last block, when shipped
_LAYOUT_BY_RANK = {4: "NHWC", 3: "NLC", 2: "NC"}


@dataclass(frozen=True)
class PackRequest:
    """What the packer needs besides the model: labels and raw calibration samples (batch
    first, as sources will deliver them), optionally their true labels for metrics.

    `output_name` names the class output when several outputs have one value per label;
    `embedding_output` names the embedding output (needed with `head` when the model has
    more than one other output). `replay` is a class-balanced set of raw samples and their
    class indices (see `balanced_replay`), stored as `replay.npz` for on-device fine-tuning
    to measure forgetting against. `block` lets on-device fine-tuning train the last block,
    the FullyConnected op producing the embedding output (refused when no such op can be
    patched in place): True de-quantises its weights from the model; (weight [embedding,
    inputs], bias [embedding]) ships these float weights as `block.npz`."""

    model: bytes
    labels: Sequence[str]
    calibration: npt.NDArray[Any]
    name: str
    version: str
    calibration_labels: npt.NDArray[np.integer[Any]] | None = None
    parent_version: str | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    output_kind: Literal["auto", "logits", "probabilities"] = "auto"
    embedding_output: str | None = None
    output_name: str | None = None
    head: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None
    replay: tuple[npt.NDArray[Any], npt.NDArray[np.integer[Any]]] | None = None
    block: bool | tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] = False
    metrics: Mapping[str, float] = field(default_factory=dict)


def pack(request: PackRequest) -> bytes:
    """Bundle bytes for the request; ModelError naming the problem when it cannot be packed."""
    _check_request(request)
    try:
        return _pack(request)
    except FormatError as exc:  # the manifest's own checks: name, version, scale, ...
        raise ModelError(f"cannot pack: {exc}") from exc
    except InputError as exc:  # the engine refused the calibration data
        raise ModelError(f"calibration data: {exc}") from exc


def _pack(request: PackRequest) -> bytes:
    details = _tensor_details(request.model)
    input_detail, output_detail, embedding_detail = _pick_tensors(details, request)
    _check_fit(request, input_detail, embedding_detail)
    members = {
        "model.tflite": request.model,
        "labels.txt": "".join(f"{label}\n" for label in request.labels).encode(),
        "canaries.npy": dump_npy(request.calibration[:1]),
    }
    if request.head is not None:
        weight, bias = request.head
        members["head.npz"] = dump_npz(
            weight=weight.astype(np.float32), bias=bias.astype(np.float32)
        )
    if isinstance(request.block, tuple):
        weight, bias = request.block
        members[BLOCK_MEMBER] = dump_npz(
            weight=np.asarray(weight, np.float32), bias=np.asarray(bias, np.float32)
        )
    if request.replay is not None:
        replay_x, replay_y = request.replay
        members["replay.npz"] = dump_npz(x=replay_x, y=np.asarray(replay_y).astype(np.int64))
    rank = len(input_detail["shape"])
    base = dict(
        name=request.name,
        version=request.version,
        parent_version=request.parent_version,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        input=InputSpec(
            name=input_detail["name"],
            shape=tuple(int(d) for d in input_detail["shape"]),
            dtype=np.dtype(input_detail["dtype"]).name,
            layout=_LAYOUT_BY_RANK[rank],
            scale=request.input_scale,
            offset=request.input_offset,
        ),
        embedding=None
        if embedding_detail is None
        else EmbeddingSpec(embedding_detail["name"], int(np.prod(embedding_detail["shape"][1:]))),
        head=HeadSpec("head.npz") if request.head is not None else None,
        replay=ReplaySpec("replay.npz") if request.replay is not None else None,
        block=_block(request, embedding_detail, output_detail),
    )
    reference = reference_statistics(request.calibration, None)
    placeholder = Canaries("canaries.npy", (0,))
    kind = "probabilities" if request.output_kind == "auto" else request.output_kind
    draft = _bundle(base, members, _output(output_detail, kind), reference, placeholder)
    probabilities = Engine(draft, EngineOptions(max_batch=1)).predict(request.calibration)
    if request.output_kind == "auto" and not _rows_are_distributions(probabilities.probabilities):
        kind = "logits"
        draft = _bundle(base, members, _output(output_detail, kind), reference, placeholder)
        probabilities = Engine(draft, EngineOptions(max_batch=1)).predict(request.calibration)
    if not np.all(np.isfinite(probabilities.probabilities)):
        raise ModelError(
            f"output '{output_detail['name']}' gives non-finite scores on the calibration data"
        )
    canary_idx = _pick_canaries(probabilities.probabilities)
    members["canaries.npy"] = dump_npy(request.calibration[canary_idx])
    canaries = Canaries("canaries.npy", tuple(int(i) for i in probabilities.top1[canary_idx]))
    reference = reference_statistics(request.calibration, probabilities.probabilities)
    metrics = dict(request.metrics)
    if request.calibration_labels is not None:
        truth = np.asarray(request.calibration_labels)
        metrics["calibration_accuracy"] = float(np.mean(probabilities.top1 == truth))
    bundle = _bundle(base, members, _output(output_detail, kind), reference, canaries, metrics)
    return write_bundle(bundle.manifest, bundle.members)


def _block(
    request: PackRequest, embedding: dict[str, Any] | None, output: dict[str, Any]
) -> BlockSpec | None:
    """The trainable block the request asks for: the op producing the embedding, which must
    be a FullyConnected op the fine-tune can patch in place and that feeds the head."""
    if request.block is False:
        return None
    if embedding is None:
        raise ModelError("a trainable block needs an embedding output")
    from edged.finetune.head_patch import HeadPatchError, read_block

    try:
        block = read_block(request.model, embedding["name"], output["name"])
    except HeadPatchError as exc:
        raise ModelError(f"the embedding's block cannot be trained in place: {exc}") from exc
    if request.block is True:
        return BlockSpec(embedding["name"])
    shapes = [np.shape(a) for a in request.block]
    if shapes != [block.weight.shape, block.bias.shape]:
        raise ModelMismatch(
            f"the block has weight {list(shapes[0])} and bias {list(shapes[1])}, but the model "
            f"needs {list(block.weight.shape)} and {list(block.bias.shape)}"
        )
    return BlockSpec(embedding["name"], BLOCK_MEMBER)


def _bundle(
    base: dict[str, Any],
    members: dict[str, bytes],
    output: OutputSpec,
    reference: ReferenceStats,
    canaries: Canaries,
    metrics: Mapping[str, float] | None = None,
) -> Bundle:
    manifest = Manifest(
        members=digest_members(members),
        output=output,
        reference=reference,
        canaries=canaries,
        metrics=dict(metrics or {}),
        **base,
    )
    return read_bundle(write_bundle(manifest, members))


def _tensor_details(model: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    interpreter = load_runtime().interpreter(model, num_threads=1, xnnpack=False)
    return interpreter.get_input_details(), interpreter.get_output_details()


def _check_request(request: PackRequest) -> None:
    """Refuse, before loading the model, what no model could be packed with."""
    _check_labels(request.labels)
    x = request.calibration
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf":
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise ModelError(f"calibration data must be an integer or float array, not {kind}")
    if x.ndim < 2 or len(x) < 2:
        raise ModelError(
            f"calibration data needs at least 2 samples, batch first (it has shape {list(x.shape)})"
        )
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ModelError(f"calibration data holds {bad} non-finite values (NaN or infinity)")
    if request.calibration_labels is not None:
        _check_class_indices(np.asarray(request.calibration_labels), len(x), request.labels)
    if request.replay is not None:
        _check_replay(request.replay, x.dtype, request.labels)
    if not (math.isfinite(request.input_scale) and request.input_scale != 0):
        raise ModelError(f"input scale must be a finite non-zero number, not {request.input_scale}")
    if not math.isfinite(request.input_offset):
        raise ModelError(f"input offset must be a finite number, not {request.input_offset}")
    for key, value in request.metrics.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ModelError(f"metric '{key}' must be a finite number, not {value!r}")
    for what, pair in (("head", request.head), ("block", request.block)):
        if isinstance(pair, tuple):
            arrays = [np.asarray(a) for a in pair]
            if any(a.dtype.kind not in "iuf" or not np.all(np.isfinite(a)) for a in arrays):
                raise ModelError(f"the {what}'s weight and bias must be arrays of finite numbers")


def _check_labels(labels: Sequence[str]) -> None:
    if len(labels) < 2:
        raise ModelError(f"a classifier needs at least 2 labels, got {len(labels)}")
    seen: set[str] = set()
    for label in labels:
        if not isinstance(label, str) or [label] != label.splitlines() or label != label.strip():
            raise ModelError(
                f"label {label!r} is not one line of text without surrounding whitespace"
            )
        if label in seen:
            raise ModelError(f"label {label!r} appears more than once")
        seen.add(label)


def _check_class_indices(
    truth: npt.NDArray[Any], samples: int, labels: Sequence[str], what: str = "calibration"
) -> None:
    if truth.dtype.kind not in "iu":
        raise ModelError(f"{what} labels must be integer class indices, not {truth.dtype}")
    if truth.shape != (samples,):
        raise ModelError(
            f"{what} labels have shape {list(truth.shape)}, expected one per sample ([{samples}])"
        )
    if truth.min() < 0 or truth.max() >= len(labels):
        raise ModelError(
            f"{what} labels must be class indices from 0 to {len(labels) - 1}, "
            f"found {int(truth.min())} to {int(truth.max())}"
        )


def _check_replay(
    replay: tuple[npt.NDArray[Any], npt.NDArray[Any]], raw: np.dtype[Any], labels: Sequence[str]
) -> None:
    """Replay samples are raw samples like the calibration data (same dtype: the bundle's
    canaries are calibration samples), with one class index each."""
    x, y = replay
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iuf":
        kind = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise ModelError(f"replay samples must be an integer or float array, not {kind}")
    if x.dtype != raw:
        raise ModelError(
            f"replay samples are {x.dtype} but the calibration data is {raw}: both must be "
            f"raw samples as the source delivers them"
        )
    if x.ndim < 2 or len(x) < 1:
        raise ModelError(
            f"replay samples need at least 1 sample, batch first (they have shape {list(x.shape)})"
        )
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ModelError(f"replay samples hold {bad} non-finite values (NaN or infinity)")
    _check_class_indices(np.asarray(y), len(x), labels, "replay")
    try:  # every class present, none more than twice as common as another
        check_replay(
            x,
            np.asarray(y).astype(np.int64),
            classes=len(labels),
            sample_shape=x.shape[1:],
            dtype=raw,
            what="replay set",
        )
    except FormatError as exc:
        raise ModelError(str(exc)) from exc


def balanced_replay(
    x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]], per_class: int, *, seed: int = 0
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """`per_class` samples of every class in `y`, drawn without replacement and in dataset
    order, the same for the same seed: a class-balanced replay set for `PackRequest.replay`."""
    labels = np.asarray(y)
    if per_class < 1:
        raise ModelError(f"a replay set needs at least 1 sample per class, not {per_class}")
    if labels.shape != (len(x),) or labels.dtype.kind not in "iu":
        raise ModelError("replay labels must be one integer class index per sample")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        where = np.flatnonzero(labels == cls)
        if len(where) < per_class:
            raise ModelError(
                f"class {int(cls)} has {len(where)} samples, fewer than the {per_class} per "
                f"class the replay set needs"
            )
        chosen.append(rng.choice(where, size=per_class, replace=False))
    idx = np.sort(np.concatenate(chosen))
    return x[idx], labels[idx].astype(np.int64)


def _check_fit(
    request: PackRequest, input_detail: dict[str, Any], embedding: dict[str, Any] | None
) -> None:
    """Refuse calibration data or a head that do not fit the model's tensors."""
    name = input_detail["name"]
    shape = [int(d) for d in input_detail["shape"]]
    if len(shape) not in _LAYOUT_BY_RANK:
        raise ModelError(
            f"input rank {len(shape)} is not supported (edged serves NHWC, NLC and NC)"
        )
    if list(request.calibration.shape[1:]) != shape[1:]:
        raise ModelMismatch(
            f"calibration samples have shape {list(request.calibration.shape[1:])} but the "
            f"model input '{name}' takes samples of shape {shape[1:]}"
        )
    if request.replay is not None and list(request.replay[0].shape[1:]) != shape[1:]:
        raise ModelMismatch(
            f"replay samples have shape {list(request.replay[0].shape[1:])} but the model "
            f"input '{name}' takes samples of shape {shape[1:]}"
        )
    if request.head is not None and embedding is not None:
        weight, bias = (np.shape(a) for a in request.head)
        classes, size = len(request.labels), _values(embedding)
        if weight != (classes, size) or bias != (classes,):
            raise ModelMismatch(
                f"the head has weight {list(weight)} and bias {list(bias)}, but the model "
                f"needs [{classes}, {size}] and [{classes}]"
            )


def _pick_tensors(
    details: tuple[list[dict[str, Any]], list[dict[str, Any]]], request: PackRequest
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    inputs, outputs = details
    if len(inputs) != 1:
        raise ModelMismatch(f"the model has {len(inputs)} inputs; edged serves one")
    _check_dtype(inputs[0], "input")
    output = _pick_output(outputs, request)
    return inputs[0], output, _pick_embedding(outputs, output, request)


def _pick_output(outputs: list[dict[str, Any]], request: PackRequest) -> dict[str, Any]:
    """The class output: the named one, else the only one with a value per label."""
    count = len(request.labels)
    if request.output_name is not None:
        output = _named(outputs, request.output_name)
        if _values(output) != count:
            raise ModelMismatch(
                f"output '{output['name']}' has {_values(output)} values, not one per label "
                f"({count})"
            )
    else:
        candidates = [d for d in outputs if _values(d) == count]
        if len(candidates) > 1:  # a named embedding is not a candidate for the class output
            candidates = [d for d in candidates if d["name"] != request.embedding_output]
        if not candidates:
            sizes = ", ".join(str(_values(d)) for d in outputs)
            raise ModelMismatch(
                f"no model output has {count} values, one per label (outputs: {sizes})"
            )
        if len(candidates) > 1:
            raise ModelMismatch(
                f"outputs {_names(candidates)} all have {count} values: name the class "
                f"output (output_name, --output-tensor)"
            )
        output = candidates[0]
    shape = [int(d) for d in output["shape"]]
    if any(d != 1 for d in shape[1:-1]):
        raise ModelMismatch(
            f"output '{output['name']}' has shape {shape}, not [batch, classes]: it is not "
            f"one score per label"
        )
    _check_dtype(output, "output")
    return output


def _pick_embedding(
    outputs: list[dict[str, Any]], output: dict[str, Any], request: PackRequest
) -> dict[str, Any] | None:
    """The embedding output: the named one, else (with a head) the only other output."""
    if request.embedding_output is not None:
        if request.embedding_output == output["name"]:
            raise ModelMismatch(
                f"output '{output['name']}' cannot be both the class output and the embedding"
            )
        embedding = _named(outputs, request.embedding_output)
    elif request.head is not None:
        others = [d for d in outputs if d is not output]
        if len(others) != 1:
            raise ModelMismatch(
                f"cannot tell which output is the embedding among {_names(others)}: name it"
            )
        embedding = others[0]
    else:
        return None
    _check_dtype(embedding, "embedding")
    return embedding


def _named(outputs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for detail in outputs:
        if detail["name"] == name:
            return detail
    raise ModelMismatch(f"the model has no output named '{name}' (outputs: {_names(outputs)})")


def _names(details: list[dict[str, Any]]) -> str:
    return ", ".join(f"'{d['name']}'" for d in details) or "none"


def _values(detail: dict[str, Any]) -> int:
    return math.prod(int(d) for d in detail["shape"][1:])


def _check_dtype(detail: dict[str, Any], what: str) -> None:
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in TENSOR_DTYPES:
        raise ModelMismatch(
            f"the model {what} '{detail['name']}' is {dtype}; edged serves "
            f"{', '.join(TENSOR_DTYPES)}"
        )


def _output(detail: dict[str, Any], kind: str) -> OutputSpec:
    return OutputSpec(
        name=detail["name"],
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        kind=kind,  # type: ignore[arg-type]
    )


def _rows_are_distributions(scores: npt.NDArray[np.float32]) -> bool:
    """Whether raw outputs already are probabilities (non-negative, rows summing to 1 within
    int8 rounding) rather than logits."""
    return bool(np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=0.05))


def reference_statistics(
    raw: npt.NDArray[Any], probabilities: npt.NDArray[np.float32] | None
) -> ReferenceStats:
    """Input statistics, and the quantiles of every confidence score the gate can use (the
    same functions as the gate); without probabilities (the draft bundle) a placeholder."""
    samples = raw.astype(np.float64)
    elements = math.prod(samples.shape[1:])
    if elements <= MAX_ELEMENT_FEATURES:
        granularity, features = "element", samples.reshape(len(samples), -1)
    else:
        granularity, features = "channel", samples.reshape(-1, samples.shape[-1])
    score_quantiles: dict[str, dict[str, float]] = {}
    if probabilities is None:
        confidence = np.ones(len(raw), dtype=np.float32)
    else:
        confidence = max_probability(probabilities)
        # Clipped: int8 probabilities can round a hair past 1, the manifest wants [0, 1].
        score_quantiles = {
            name: _quantiles(np.clip(score(name, probabilities), 0.0, 1.0))
            for name in SCORE_QUANTILE_NAMES
        }
    counts, _ = np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return ReferenceStats(
        granularity=granularity,  # type: ignore[arg-type]
        feature_mean=tuple(float(round(v, 6)) for v in features.mean(axis=0)),
        feature_std=tuple(float(round(v, 6)) for v in features.std(axis=0)),
        confidence_histogram=ConfidenceHistogram(tuple(int(c) for c in counts)),
        confidence_quantiles=_quantiles(confidence),
        samples=len(raw),
        score_quantiles=score_quantiles,
    )


def _quantiles(values: npt.NDArray[Any]) -> dict[str, float]:
    return {f"{q:g}": round(float(np.quantile(values, q)), 6) for q in QUANTILES}


def _pick_canaries(probabilities: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
    """Clear-cut samples (big top-1 margin, so every runtime agrees), spread over classes."""
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    top1 = np.argmax(probabilities, axis=1)
    chosen: list[int] = []
    for idx in np.argsort(-margin, kind="stable"):
        if top1[idx] not in top1[chosen]:
            chosen.append(int(idx))
        if len(chosen) == CANARY_COUNT:
            break
    for idx in np.argsort(-margin, kind="stable"):
        if len(chosen) == min(CANARY_COUNT, len(probabilities)):
            break
        if idx not in chosen:
            chosen.append(int(idx))
    return np.asarray(sorted(chosen), dtype=np.intp)
