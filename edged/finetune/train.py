"""Train a classifier head on embeddings: the worker's one use of torch.

Full-batch L-BFGS (strong-Wolfe line search) from the base head on the mean cross-entropy of
the samples (the labelled ones and the bundle's replay set alike) plus `anchor` x the squared
L2 distance of weight and bias from the base head, which keeps the head near the one the base
was validated with. (Weighting the labelled samples against the replay set was tried on
rotated digits and changed neither recovery nor forgetting beyond noise, so every sample
weighs the same.) Deterministic: the
same inputs, seed and thread count give the same head.

Only the worker imports this module (torch is heavy and the daemon never loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["HeadFit", "train_head"]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class HeadFit:
    """The trained head and how the optimiser got there."""

    weight: FloatArray
    bias: FloatArray
    loss: float
    iterations: int


def train_head(
    embeddings: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.integer[Any]],
    weight: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
    *,
    anchor: float,
    max_iter: int,
    threads: int = 1,
    seed: int = 0,
) -> HeadFit:
    """The head [classes, embedding] + [classes] minimising mean cross-entropy on
    (`embeddings`, `labels`) + `anchor` * (||W - W0||² + ||b - b0||²), starting at W0, b0 =
    `weight`, `bias`."""
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or len(labels) == 0:
        raise ValueError("training needs embeddings [n, E] with one label each (n > 0)")
    classes, size = weight.shape
    if embeddings.shape[1] != size or bias.shape != (classes,):
        raise ValueError(
            f"embeddings of size {embeddings.shape[1]} do not fit a head of shape "
            f"{list(weight.shape)} with bias {list(bias.shape)}"
        )
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be class indices below {classes}")
    if anchor < 0 or max_iter < 1:
        raise ValueError("anchor must be >= 0 and max_iter >= 1")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    w0 = torch.from_numpy(np.array(weight, dtype=np.float64))
    b0 = torch.from_numpy(np.array(bias, dtype=np.float64))
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def loss_of() -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(x @ w.T + b, y)
        pull = ((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()
        return ce.mean() + anchor * pull

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    optimiser.step(objective)
    with torch.no_grad():
        final = float(loss_of())
    state = optimiser.state[optimiser._params[0]]
    weight_out = w.detach().numpy().astype(np.float32)
    bias_out = b.detach().numpy().astype(np.float32)
    if not (np.isfinite(weight_out).all() and np.isfinite(bias_out).all()):
        raise ValueError("training diverged (non-finite head weights)")
    return HeadFit(weight_out, bias_out, final, int(state.get("n_iter", 0)))
