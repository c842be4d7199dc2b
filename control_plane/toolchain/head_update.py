"""Train a new classifier head on embeddings (numpy softmax regression): the cloud side of a
head-only update, exported by edged.finetune.export.head_updated_bundle."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["train_head"]


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
    classes: npt.NDArray[np.integer[Any]] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Softmax regression from the given head: SGD with momentum on cross-entropy. With
    `classes`, only those classes' rows (and biases) move: every other row keeps its exact
    float weights, so its int8 bytes stay the same and a delta update carries only the rows
    that changed."""
    rng = np.random.default_rng(seed)
    w, b = weight.astype(np.float64), bias.astype(np.float64)
    moving = np.zeros(len(w), dtype=bool)
    moving[slice(None) if classes is None else np.asarray(classes)] = True
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
            p[:, ~moving] = 0.0  # no gradient, no momentum: those rows stay as they were
            vw = momentum * vw + p.T @ x
            vb = momentum * vb + p.sum(axis=0)
            w -= lr * vw
            b -= lr * vb
    # rows that never get a gradient round-trip float32 -> float64 -> float32 bit for bit
    return w.astype(np.float32), b.astype(np.float32)
