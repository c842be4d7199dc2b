"""Real smartwatch IMU windows for the sensor-style reference model, shipped inside a wheel.

Source: the "watch" data set that the `seglearn` package (BSD-3-Clause, (c) 2018 David M.
Burns) ships as `seglearn/data/watch_dataset.npy`; no download happens at run time. It is a
subset of the study in D. M. Burns, N. Leung, M. Hardisty, C. M. Whyne, P. Henry and
S. McLachlin, "Shoulder physiotherapy exercise recognition: machine learning the inertial
signals from a smartwatch", Physiological Measurement 39(7) 075007, 2018
(doi:10.1088/1361-6579/aacfd9, arXiv:1802.01489).

What it measures: ten healthy adults wore a smartwatch on the active arm and did sets of about
20 repetitions of seven rotator-cuff physiotherapy exercises (PEN pendulum, ABD abduction, FEL
forward elevation, IR / ER internal / external rotation, TRAP trapezius, ROW row), with each
arm: 140 recordings of 6-axis inertial data at 50 Hz, accelerometer ax, ay, az in g and
gyroscope wx, wy, wz in rad/s, 19 to 52 s each (about 81 minutes in all).

The recordings are cut into non-overlapping windows of `WINDOW` samples (2 s), laid out NLC
(batch, time, channel) as float32, the class being the exercise. There is no official split, so
the split is by subject, deterministic in `seed`: six subjects train, two validate, two test, so
the test figures are for people the model has never seen. Every subject did every exercise
with both arms, so each split holds every class in about the same proportion (stratified by
construction). One global scale and offset, taken from the training windows, standardise the
input (per-channel normalisation does not fit the bundle's single input affine).

`seglearn` itself is never imported (its `__init__` needs pandas, which it does not declare):
the file is located with `importlib.util.find_spec` and read with numpy. The file is a pickled
dict, so it is loaded with `allow_pickle=True`; that trusts the installed package exactly as
importing it would.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from control_plane.toolchain.datasets import Dataset

__all__ = ["CHANNELS", "LABELS", "SAMPLE_RATE_HZ", "WINDOW", "sensor_dataset", "watch_path"]

PACKAGE = "seglearn"
RELATIVE_PATH = ("data", "watch_dataset.npy")
LABELS = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
SAMPLE_RATE_HZ = 50
WINDOW = 100  # 2 s at 50 Hz
SUBJECTS_VAL = 2
SUBJECTS_TEST = 2


def watch_path() -> Path:
    """Where the installed `seglearn` keeps the watch data, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the sensor reference data ships in the {PACKAGE!r} package: pip install {PACKAGE}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*RELATIVE_PATH)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PACKAGE} is installed but has no {'/'.join(RELATIVE_PATH)}")


def _load() -> dict[str, Any]:
    data = np.load(watch_path(), allow_pickle=True).item()
    if not isinstance(data, dict) or tuple(data.get("y_labels", ())) != LABELS:
        raise ValueError("unexpected contents in the seglearn watch data set")
    if tuple(data.get("X_labels", ())) != CHANNELS:
        raise ValueError("unexpected channels in the seglearn watch data set")
    return data


def _windows(
    series: list[npt.NDArray[Any]],
    labels: npt.NDArray[np.int64],
    picked: npt.NDArray[np.bool_],
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Non-overlapping windows of the picked recordings (the tail shorter than WINDOW dropped),
    shuffled so that any prefix, such as a quantiser's calibration slice, mixes classes,
    subjects and arms."""
    xs: list[npt.NDArray[np.float32]] = []
    ys: list[npt.NDArray[np.int64]] = []
    for recording, label, keep in zip(series, labels, picked, strict=True):
        if not keep:
            continue
        count = len(recording) // WINDOW
        windows = np.asarray(recording[: count * WINDOW], dtype=np.float32)
        xs.append(windows.reshape(count, WINDOW, len(CHANNELS)))
        ys.append(np.full(count, label, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(y))
    return np.ascontiguousarray(x[order]), y[order]


def sensor_dataset(seed: int = 0) -> Dataset:
    """2-s smartwatch IMU windows (100 x 6, float32, NLC), seven exercise classes, split by
    subject (6 train / 2 validation / 2 test), deterministic in `seed`."""
    data = _load()
    series = list(data["X"])
    labels = np.asarray(data["y"], dtype=np.int64)
    subjects = np.asarray(data["subject"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.unique(subjects))
    test_subjects = order[:SUBJECTS_TEST]
    val_subjects = order[SUBJECTS_TEST : SUBJECTS_TEST + SUBJECTS_VAL]
    in_test = np.isin(subjects, test_subjects)
    in_val = np.isin(subjects, val_subjects)
    x_train, y_train = _windows(series, labels, ~(in_test | in_val), rng)
    x_val, y_val = _windows(series, labels, in_val, rng)
    x_test, y_test = _windows(series, labels, in_test, rng)
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    scale = 1.0 / std
    return Dataset(
        "watch-imu",
        LABELS,
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        scale=scale,
        offset=-mean * scale,
    )
