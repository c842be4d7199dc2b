"""A head-only model update as a bundle: train a new classifier head on embeddings, patch it
into the base .tflite in place (head_patch), and rebuild the bundle with a manifest that is
true for the new model (version and parent, member digests, canary top-1 and the confidence
reference re-measured on calibration samples). Used by the OTA benchmark, the demo and the
tests; issue 7's on-device fine-tuning exports the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
import numpy.typing as npt

from control_plane.toolchain.head_patch import patch_head
from edged.engine import Engine, EngineOptions
from edged.packer import reference_statistics
from edged_formats import Bundle, read_bundle, write_bundle
from edged_formats.bundle import digest_members, dump_npz

__all__ = ["head_updated_bundle", "train_head"]


def train_head(
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    embeddings: npt.NDArray[np.float32],
    labels: npt.NDArray[np.integer[Any]],
    lr: float,
    *,
    epochs: int = 20,
    batch: int = 32,
    momentum: float = 0.9,
    seed: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Softmax regression from the given head: SGD with momentum on cross-entropy."""
    rng = np.random.default_rng(seed)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(epochs):
        order = rng.permutation(len(embeddings))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            x = embeddings[idx].astype(np.float64)
            logits = x @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(idx)), labels[idx]] -= 1.0
            p /= len(idx)
            vw = momentum * vw + p.T @ x
            vb = momentum * vb + p.sum(axis=0)
            w -= lr * vw
            b -= lr * vb
    return w.astype(np.float32), b.astype(np.float32)


def head_updated_bundle(
    base: Bundle,
    weight: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    calibration: npt.NDArray[Any],
    version: str | None = None,
) -> bytes:
    """The base bundle with the new head patched in place (logits re-calibrated on the
    calibration samples' embeddings) and the manifest brought up to date."""

    embeddings = Engine(base, EngineOptions()).predict(calibration).embeddings
    assert embeddings is not None
    logits = embeddings @ weight.T + bias
    members = dict(base.members)
    members["model.tflite"] = patch_head(
        base.model,
        base.manifest.output.name,
        weight,
        bias,
        logit_range=(float(logits.min()), float(logits.max())),
    )
    members["head.npz"] = dump_npz(weight=weight, bias=bias)
    manifest = dataclasses.replace(
        base.manifest,
        version=version or _next_version(base.manifest.version),
        parent_version=base.manifest.version,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        members=digest_members(members),
    )
    draft = read_bundle(write_bundle(manifest, members))
    engine = Engine(draft, EngineOptions())
    canaries = engine.predict(draft.canary_inputs).top1
    probabilities = engine.predict(calibration).probabilities
    manifest = dataclasses.replace(
        manifest,
        canaries=dataclasses.replace(
            manifest.canaries, expected_top1=tuple(int(i) for i in canaries)
        ),
        reference=reference_statistics(calibration, probabilities),
    )
    return write_bundle(manifest, members)


def _next_version(version: str) -> str:
    major, minor, *_ = [*version.split("."), "0", "0"]
    return f"{major}.{int(minor) + 1}.0"
