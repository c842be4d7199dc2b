"""Reference models trained on real data that ships inside a package, built into bundles.

`build_reference("digits", out_dir)` trains the small CNN on scikit-learn's 8x8 digits, converts
and int8-quantises it with the official toolchain, packs it, and measures the acceptance
figures (int8 vs torch agreement, accuracy loss, size ratio) on held-out data. Fine-tunable
models also carry a class-balanced replay set from the training split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from control_plane.toolchain.convert import export_float, quantize_int8
from control_plane.toolchain.datasets import Dataset, digits_dataset
from control_plane.toolchain.nets import (
    DigitsCNN,
    SensorCNN1D,
    fold_batchnorm,
    within_input_range,
)
from control_plane.toolchain.sensor_data import sensor_dataset
from edged.atomic import atomic_write
from edged.engine import Engine, EngineOptions
from edged.packer import PackRequest, balanced_replay, pack
from edged_formats import read_bundle
from edged_formats.bundle import dump_npz

__all__ = ["DATASETS", "BuildReport", "build_bundle", "build_reference", "train"]


CALIBRATION_SAMPLES = 2000  # the whole training split of both reference data sets
# Training samples per class in a fine-tunable bundle's replay set (digits: 500 raw 8x8 uint8
# images with int64 labels, about 36 KB; sensor: 350 float32 windows of 100x6, about 845 KB).
REPLAY_PER_CLASS = 50


def input_range(data: Dataset, tail: float = 0.01) -> tuple[float, float]:
    """The preprocessed training inputs' central range, all but `tail` % at either end."""
    x = data.preprocess(data.x_train)
    low, high = np.percentile(x, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Recipe:
    dataset: Callable[[], Dataset]
    net: Callable[[Dataset], nn.Module]
    bundle_name: str
    epochs: int
    lr: float
    cosine: bool = False  # anneal the learning rate to 0 over the run


DATASETS: dict[str, Recipe] = {
    "sensor": Recipe(
        sensor_dataset,
        lambda d: SensorCNN1D(d.x_train.shape[-1], len(d.labels), input_range=input_range(d)),
        "watch-imu-cnn",
        epochs=40,
        lr=3e-3,
        cosine=True,
    ),
    "digits": Recipe(
        digits_dataset, lambda d: DigitsCNN(len(d.labels)), "digits-cnn", epochs=30, lr=2e-3
    ),
}


def train(
    module: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    batch_size: int = 64,
    cosine: bool = False,
) -> nn.Module:
    """Adam + cross-entropy on the training split, the learning rate constant or annealed
    (cosine) to 0 over the run."""
    torch.manual_seed(seed)
    x = torch.from_numpy(data.preprocess(data.x_train))
    y = torch.from_numpy(data.y_train)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if cosine else None
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimiser.zero_grad()
            logits, _ = module(x[idx])
            loss_fn(logits, y[idx]).backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
    return module.eval()


def torch_top1(module: nn.Module, data: Dataset, raw: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    with torch.no_grad():
        outputs = module(torch.from_numpy(data.preprocess(raw)))
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    return logits.argmax(dim=1).numpy()


@dataclass(frozen=True)
class BuildReport:
    bundle: str
    test_samples: int
    torch_accuracy: float
    int8_accuracy: float
    accuracy_loss_pts: float
    top1_agreement: float
    float_bytes: int
    int8_bytes: int
    size_ratio: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def build_reference(
    name: str, out_dir: Path, *, version: str = "1.0.0", seed: int = 0
) -> BuildReport:
    """Train, convert, quantise, pack and evaluate one reference model; writes
    `<bundle>-<version>.bundle`, `<name>-test.npz` (the held-out stream) and a report."""
    recipe = DATASETS[name]
    data = recipe.dataset()
    torch.manual_seed(seed)
    module = train(
        recipe.net(data), data, epochs=recipe.epochs, lr=recipe.lr, seed=seed, cosine=recipe.cosine
    )
    report = build_bundle(module, data, out_dir, name=recipe.bundle_name, version=version)
    atomic_write(
        out_dir / f"{name}-test.npz", dump_npz(compress=True, x=data.x_test, y=data.y_test)
    )
    return report


def build_bundle(
    module: nn.Module,
    data: Dataset,
    out_dir: Path,
    *,
    name: str,
    version: str,
    parent_version: str | None = None,
) -> BuildReport:
    """A trained module -> float .tflite -> int8 .tflite -> bundle in `out_dir`, scored on
    the held-out split. The module takes the device's layout and returns logits, or
    (logits, embedding) with its classifier in `module.head` (an nn.Linear) to make the
    bundle fine-tunable; a fine-tunable bundle also gets `REPLAY_PER_CLASS` training samples
    of each class as its replay set, and allows the device to train its last block (the
    FullyConnected op producing the embedding) from the weights in the int8 model."""
    module = fold_batchnorm(module)  # the int8 model gets the fused convolutions
    sample = torch.from_numpy(data.preprocess(data.x_train[:1]))
    with torch.no_grad():
        outputs = module(sample)
    fine_tunable = isinstance(outputs, tuple) and isinstance(
        getattr(module, "head", None), nn.Linear
    )
    float_model = export_float(module, sample)
    calibration = within_input_range(module, data.preprocess(data.x_train[:CALIBRATION_SAMPLES]))
    int8_model = quantize_int8(float_model, calibration)
    head = getattr(module, "head", None)
    head_weights = (
        (head.weight.detach().numpy(), head.bias.detach().numpy())
        if fine_tunable and isinstance(head, nn.Linear)
        else None
    )
    request = PackRequest(
        model=int8_model,
        labels=data.labels,
        calibration=data.x_val,
        calibration_labels=data.y_val,
        name=name,
        version=version,
        parent_version=parent_version,
        input_scale=data.scale,
        input_offset=data.offset,
        output_kind="logits",
        head=head_weights,
        replay=balanced_replay(data.x_train, data.y_train, REPLAY_PER_CLASS)
        if fine_tunable
        else None,
        block=fine_tunable,
    )
    draft = read_bundle(pack(request))
    int8_top1 = Engine(draft, EngineOptions()).predict(data.x_test).top1
    float_top1 = torch_top1(module, data, data.x_test)
    torch_acc = float(np.mean(float_top1 == data.y_test))
    int8_acc = float(np.mean(int8_top1 == data.y_test))
    report = BuildReport(
        bundle=f"{name}-{version}.bundle",
        test_samples=len(data.y_test),
        torch_accuracy=round(torch_acc, 4),
        int8_accuracy=round(int8_acc, 4),
        accuracy_loss_pts=round(100 * (torch_acc - int8_acc), 2),
        top1_agreement=round(float(np.mean(float_top1 == int8_top1)), 4),
        float_bytes=len(float_model),
        int8_bytes=len(int8_model),
        size_ratio=round(len(int8_model) / len(float_model), 4),
    )
    metrics = {
        "test_accuracy": report.int8_accuracy,
        "torch_test_accuracy": torch_acc,
        "int8_torch_agreement": report.top1_agreement,
    }
    bundle = pack(PackRequest(**{**request.__dict__, "metrics": metrics}))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / report.bundle, bundle)
    atomic_write(out_dir / f"{name}-{version}.report.json", report.to_json().encode())
    return report
