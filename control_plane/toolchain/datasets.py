"""Training data for the reference models: raw samples as a device would see them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Dataset", "digits_dataset"]


@dataclass(frozen=True)
class Dataset:
    """Raw samples as a device would see them (batch first), split three ways."""

    name: str
    labels: tuple[str, ...]
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[Any]
    y_val: npt.NDArray[np.int64]
    x_test: npt.NDArray[Any]
    y_test: npt.NDArray[np.int64]
    scale: float  # model input = raw * scale + offset
    offset: float

    def preprocess(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        return (raw.astype(np.float32) * self.scale + self.offset).astype(np.float32)


def digits_dataset(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits as uint8 pixels 0..16, split 60/20/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return Dataset(
        "digits",
        tuple(str(i) for i in range(10)),
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        scale=1 / 16,
        offset=0.0,
    )
