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
