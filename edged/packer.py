"""Wrap a .tflite made anywhere into a bundle, measuring its reference statistics and canaries
on calibration data with the same engine that will serve it."""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edged.engine import Engine, EngineOptions
from edged.errors import ModelError, ModelMismatch
from edged.runtime import load_runtime
from edged_formats import (
    Bundle,
    Canaries,
    ConfidenceHistogram,
    EmbeddingSpec,
    HeadSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    ReferenceStats,
    read_bundle,
    write_bundle,
)
from edged_formats.bundle import digest_members

__all__ = ["PackRequest", "pack"]

HISTOGRAM_BINS = 20
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)
MAX_ELEMENT_FEATURES = 4096
CANARY_COUNT = 8
_LAYOUT_BY_RANK = {4: "NHWC", 3: "NLC", 2: "NC"}


@dataclass(frozen=True)
class PackRequest:
    """What the packer needs besides the model: labels and raw calibration samples (batch
    first, as sources will deliver them), optionally their true labels for metrics."""

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
    head: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def pack(request: PackRequest) -> bytes:
    """Bundle bytes for the request; ModelError naming the problem when it cannot be packed."""
    if len(request.calibration) < 2:
        raise ModelError("calibration data needs at least 2 samples")
    details = _tensor_details(request.model)
    input_detail, output_detail, embedding_detail = _pick_tensors(details, request)
    members = {
        "model.tflite": request.model,
        "labels.txt": "".join(f"{label}\n" for label in request.labels).encode(),
        "canaries.npy": _npy(request.calibration[:1]),
    }
    if request.head is not None:
        weight, bias = request.head
        members["head.npz"] = _npz(weight=weight.astype(np.float32), bias=bias.astype(np.float32))
    rank = len(input_detail["shape"])
    if rank not in _LAYOUT_BY_RANK:
        raise ModelError(f"input rank {rank} is not supported (edged serves NHWC, NLC and NC)")
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
    )
    reference = _reference(request.calibration, np.full(len(request.calibration), 1.0))
    placeholder = Canaries("canaries.npy", (0,))
    kind = "probabilities" if request.output_kind == "auto" else request.output_kind
    draft = _bundle(base, members, _output(output_detail, kind), reference, placeholder)
    probabilities = Engine(draft, EngineOptions(max_batch=1)).predict(request.calibration)
    if request.output_kind == "auto" and not _rows_are_distributions(probabilities.probabilities):
        kind = "logits"
        draft = _bundle(base, members, _output(output_detail, kind), reference, placeholder)
        probabilities = Engine(draft, EngineOptions(max_batch=1)).predict(request.calibration)
    canary_idx = _pick_canaries(probabilities.probabilities)
    members["canaries.npy"] = _npy(request.calibration[canary_idx])
    canaries = Canaries("canaries.npy", tuple(int(i) for i in probabilities.top1[canary_idx]))
    reference = _reference(request.calibration, probabilities.confidence)
    metrics = dict(request.metrics)
    if request.calibration_labels is not None:
        truth = np.asarray(request.calibration_labels)
        metrics["calibration_accuracy"] = float(np.mean(probabilities.top1 == truth))
    bundle = _bundle(base, members, _output(output_detail, kind), reference, canaries, metrics)
    return write_bundle(bundle.manifest, bundle.members)


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


def _pick_tensors(
    details: tuple[list[dict[str, Any]], list[dict[str, Any]]], request: PackRequest
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    inputs, outputs = details
    if len(inputs) != 1:
        raise ModelMismatch(f"the model has {len(inputs)} inputs; edged serves one")
    classes = [d for d in outputs if int(np.prod(d["shape"][1:])) == len(request.labels)]
    if not classes:
        sizes = ", ".join(str(int(np.prod(d["shape"][1:]))) for d in outputs)
        raise ModelMismatch(
            f"no model output has {len(request.labels)} values, one per label (outputs: {sizes})"
        )
    embedding = None
    if request.embedding_output is not None or request.head is not None:
        others = [d for d in outputs if d is not classes[0]]
        wanted = request.embedding_output
        matches = [d for d in others if wanted is None or d["name"] == wanted]
        if len(matches) != 1:
            raise ModelMismatch(
                f"cannot tell which output is the embedding among "
                f"{', '.join(d['name'] for d in others) or 'none'}"
            )
        embedding = matches[0]
    return inputs[0], classes[0], embedding


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


def _reference(raw: npt.NDArray[Any], confidence: npt.NDArray[Any]) -> ReferenceStats:
    samples = raw.astype(np.float64)
    elements = math.prod(samples.shape[1:])
    if elements <= MAX_ELEMENT_FEATURES:
        granularity, features = "element", samples.reshape(len(samples), -1)
    else:
        granularity, features = "channel", samples.reshape(-1, samples.shape[-1])
    counts, _ = np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return ReferenceStats(
        granularity=granularity,  # type: ignore[arg-type]
        feature_mean=tuple(float(round(v, 6)) for v in features.mean(axis=0)),
        feature_std=tuple(float(round(v, 6)) for v in features.std(axis=0)),
        confidence_histogram=ConfidenceHistogram(tuple(int(c) for c in counts)),
        confidence_quantiles={
            f"{q:g}": float(round(np.quantile(confidence, q), 6)) for q in QUANTILES
        },
        samples=len(raw),
    )


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


def _npy(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npz(**arrays: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()
