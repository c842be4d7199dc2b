"""Training data for the reference models: raw samples as a device would see them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Dataset", "digits_dataset", "rotated"]

DIGITS_MAX = 16  # the digits' pixel range is 0..16


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


def rotated(
    x: npt.NDArray[np.uint8], degrees: float, *, high: int = DIGITS_MAX
) -> npt.NDArray[np.uint8]:
    """Drift for digits-shaped uint8 images [n, h, w, c]: each image rotated by `degrees`
    about its centre (bilinear, same size, corners filled with 0), clipped to the dataset's
    range 0..`high` and rounded back to uint8."""
    from scipy.ndimage import rotate

    if x.ndim != 4:
        raise ValueError(f"rotated expects images [n, h, w, c], not shape {list(x.shape)}")
    turned = rotate(
        x.astype(np.float32), degrees, axes=(2, 1), reshape=False, order=1, mode="constant"
    )
    return np.rint(np.clip(turned, 0, high)).astype(np.uint8)
