"""torch definitions of the reference models. Every net takes the device's layout (channels
last) and returns (logits, embedding) so the head can be fine-tuned on the device."""

from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["DigitsCNN", "MobileNetV2", "SensorCNN1D", "fold_batchnorm", "within_input_range"]


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 grey digits, NHWC in."""

    def __init__(self, classes: int = 10, embedding: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, embedding),
            nn.ReLU(),
        )
        self.head = nn.Linear(embedding, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.features(x.permute(0, 3, 1, 2))
        return self.head(embedding), embedding


class SensorCNN1D(nn.Module):
    """1-D CNN for multichannel sensor windows, NLC (time, channel) in: four conv blocks
    (batch norm, ReLU, max-pool between them), global average pool, the embedding. About
    140 k weights, so they, not the flatbuffer's fixed overhead, make up the int8 file.

    `input_range` clips the (preprocessed) input first. The int8 model's input has one scale
    for the range its calibration saw, so a few outliers (the IMU windows reach -23 where
    99.98 % of values lie within -7.4..7.0) would make every sample's rounding coarse; clipped,
    the steps are 2.3 times finer, and the float model clips exactly as the int8 one
    saturates."""

    def __init__(
        self,
        channels: int,
        classes: int,
        embedding: int = 32,
        widths: tuple[int, ...] = (32, 64, 128, 128),
        input_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.input_range = input_range
        layers: list[nn.Module] = []
        width = channels
        for i, out in enumerate(widths):
            layers += [nn.Conv1d(width, out, 5, padding=2, bias=False), nn.BatchNorm1d(out)]
            layers.append(nn.ReLU())
            if i < len(widths) - 1:
                layers.append(nn.MaxPool1d(2))
            width = out
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, embedding), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(embedding, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_range is not None:
            x = x.clamp(*self.input_range)
        embedding = self.features(x.permute(0, 2, 1))
        return self.head(embedding), embedding


def within_input_range(module: nn.Module, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Calibration samples clipped as `module` clips its input (its `input_range`, if any), so
    the int8 input's scale covers what the model uses, not the outliers it discards."""
    bounds = getattr(module, "input_range", None)
    return x if bounds is None else np.clip(x, *bounds).astype(np.float32)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """`module` (eval mode) with each Conv1d/Conv2d + BatchNorm pair of its `nn.Sequential`s
    fused into one convolution, as the int8 export should see it; the module itself is left
    as it was."""
    folded = copy.deepcopy(module).eval()

    def fuse(sequence: nn.Sequential) -> nn.Sequential:
        children, out = list(sequence.children()), list[nn.Module]()
        i = 0
        while i < len(children):
            child = children[i]
            following = children[i + 1] if i + 1 < len(children) else None
            if isinstance(child, (nn.Conv1d, nn.Conv2d)) and isinstance(
                following, (nn.BatchNorm1d, nn.BatchNorm2d)
            ):
                out.append(fuse_conv_bn_eval(child, following))
                i += 2
                continue
            out.append(fuse(child) if isinstance(child, nn.Sequential) else child)
            i += 1
        return nn.Sequential(*out)

    for name, child in list(folded.named_children()):
        if isinstance(child, nn.Sequential):
            setattr(folded, name, fuse(child))
    return folded


def _conv_bn(inp: int, out: int, stride: int, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(inp, hidden, 1, kernel=1)]
        layers += [
            _conv_bn(hidden, hidden, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, 224x224 RGB, NHWC in), the shape the benchmarks target."""

    # expansion, channels, repeats, first stride
    _SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 2)]
        channels = 32
        for expand, out, repeats, stride in self._SETTINGS:
            for i in range(repeats):
                layers.append(_InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        layers += [_conv_bn(channels, 1280, 1, kernel=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.features(x.permute(0, 3, 1, 2))
        return self.head(embedding), embedding
