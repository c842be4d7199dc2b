"""The cloud's head-only update moves only the rows it is told to, so a delta update of the
bundle carries only those rows."""

from __future__ import annotations

import numpy as np

from control_plane.toolchain.head_update import train_head


def _problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.1, (50, 16)).astype(np.float32)
    bias = rng.normal(0, 0.1, 50).astype(np.float32)
    embeddings = rng.normal(0, 1, (200, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 200)
    return weight, bias, embeddings, labels


def test_only_the_named_classes_rows_move_and_the_rest_stay_bit_for_bit() -> None:
    weight, bias, embeddings, labels = _problem()
    classes = np.unique(labels)
    new_weight, new_bias = train_head(weight, bias, embeddings, labels, 0.05, classes=classes)
    still = np.setdiff1d(np.arange(50), classes)
    assert new_weight[still].tobytes() == weight[still].tobytes()
    assert new_bias[still].tobytes() == bias[still].tobytes()
    assert np.all(np.abs(new_weight[classes] - weight[classes]).sum(axis=1) > 0)
    before = np.mean((embeddings @ weight.T + bias).argmax(axis=1) == labels)
    after = np.mean((embeddings @ new_weight.T + new_bias).argmax(axis=1) == labels)
    assert after > before + 0.3  # the rows that moved learnt the labels


def test_without_classes_every_row_moves() -> None:
    weight, bias, embeddings, labels = _problem()
    new_weight, _ = train_head(weight, bias, embeddings, labels, 0.05)
    assert np.all(np.abs(new_weight - weight).sum(axis=1) > 0)
