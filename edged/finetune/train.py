"""Train a classifier head on embeddings, or the last block and the head on the block's
inputs: the worker's one use of torch.

Full-batch L-BFGS (strong-Wolfe line search) from the base weights on the mean cross-entropy
of the samples (the labelled ones and the bundle's replay set alike) plus, per tensor group,
an anchor x the squared L2 distance from the base, which keeps the model near the one the
base was validated with: `anchor` for the head, `block_anchor` for the block (the
FullyConnected op producing the embedding, with its fused activation). On rotated digits
(bench/finetune.py's steps, 300 labels, 3 draws) a block anchor 100 times weaker than the
head's recovered the most: 91.4 % of the drift loss (upright -0.09 points) against 88.3 % at
the head's 1e-3 and 89.5 % with none, where upright accuracy fell 3.7 points. (Weighting
the labelled samples against the replay set was tried there too and changed neither recovery
nor forgetting beyond noise, so every sample weighs the same.) Deterministic: the same
inputs, seed and thread count give the same weights.

Only the worker imports this module (torch is heavy and the daemon never loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from edged.finetune.head_patch import ACTIVATION_BOUNDS

__all__ = ["BlockFit", "HeadFit", "train_block", "train_head"]

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

    def loss_of() -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(x @ w.T + b, y)
        pull = ((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()
        return ce.mean() + anchor * pull

    final, iterations = _minimise([w, b], loss_of, max_iter)
    weight_out = w.detach().numpy().astype(np.float32)
    bias_out = b.detach().numpy().astype(np.float32)
    if not (np.isfinite(weight_out).all() and np.isfinite(bias_out).all()):
        raise ValueError("training diverged (non-finite head weights)")
    return HeadFit(weight_out, bias_out, final, iterations)


@dataclass(frozen=True, slots=True)
class BlockFit:
    """The trained block and head, and how the optimiser got there."""

    block_weight: FloatArray
    block_bias: FloatArray
    weight: FloatArray
    bias: FloatArray
    loss: float
    iterations: int


def train_block(
    inputs: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.integer[Any]],
    block: tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]]],
    head: tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.floating[Any]]],
    *,
    activation: str,
    anchor: float,
    block_anchor: float,
    max_iter: int,
    threads: int = 1,
    seed: int = 0,
) -> BlockFit:
    """The block (V [embedding, inputs] + c, then `activation`) and head (W, b) minimising
    mean cross-entropy of W act(x V^T + c) + b on (`inputs`, `labels`) + `block_anchor` *
    (||V - V0||² + ||c - c0||²) + `anchor` * (||W - W0||² + ||b - b0||²), from `block` and
    `head`."""
    if inputs.ndim != 2 or len(inputs) != len(labels) or len(labels) == 0:
        raise ValueError("training needs block inputs [n, K] with one label each (n > 0)")
    v0_np, c0_np = block
    w0_np, b0_np = head
    size = v0_np.shape[0]
    classes = w0_np.shape[0]
    if v0_np.shape[1] != inputs.shape[1] or c0_np.shape != (size,):
        raise ValueError(
            f"block inputs of size {inputs.shape[1]} do not fit a block of shape "
            f"{list(v0_np.shape)} with bias {list(c0_np.shape)}"
        )
    if w0_np.shape != (classes, size) or b0_np.shape != (classes,):
        raise ValueError(f"the head {list(w0_np.shape)} does not take the block's {size} outputs")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must be class indices below {classes}")
    if anchor < 0 or block_anchor < 0 or max_iter < 1:
        raise ValueError("anchors must be >= 0 and max_iter >= 1")
    if activation not in ACTIVATION_BOUNDS:
        raise ValueError(f"the block's fused activation {activation} cannot be trained")
    bounds = ACTIVATION_BOUNDS[activation]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    start = [torch.from_numpy(np.array(a, dtype=np.float64)) for a in (v0_np, c0_np, w0_np, b0_np)]
    params = [t.clone().requires_grad_(True) for t in start]

    def loss_of() -> torch.Tensor:
        v, c, w, b = params
        embedding = x @ v.T + c
        if bounds != (None, None):
            embedding = embedding.clamp(*bounds)
        ce = torch.nn.functional.cross_entropy(embedding @ w.T + b, y)
        pulls = [((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True)]
        return ce.mean() + block_anchor * (pulls[0] + pulls[1]) + anchor * (pulls[2] + pulls[3])

    final, iterations = _minimise(params, loss_of, max_iter)
    v, c, w, b = (p.detach().numpy().astype(np.float32) for p in params)
    if not all(np.isfinite(a).all() for a in (v, c, w, b)):
        raise ValueError("training diverged (non-finite weights)")
    return BlockFit(v, c, w, b, loss=final, iterations=iterations)


def _minimise(
    params: list[torch.Tensor], loss_of: Callable[[], torch.Tensor], max_iter: int
) -> tuple[float, int]:
    """Full-batch L-BFGS with a strong-Wolfe line search on `params`, in place: the final
    loss and the iterations run."""
    optimiser = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    optimiser.step(objective)
    with torch.no_grad():
        final = float(loss_of())
    state = optimiser.state[optimiser._params[0]]
    return final, int(state.get("n_iter", 0))
