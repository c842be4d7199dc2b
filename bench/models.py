"""Benchmark models built with the project's own toolchain and cached under `bench/.cache/`.

MobileNetV2 (random weights, seed 0) → litert-torch float .tflite → ai-edge-quantizer static
int8 → `edged.packer.pack`, once as an int8 bundle and once as a float bundle. The .tflite files
are keyed by a hash of the toolchain sources and versions; the bundles additionally by the
packer and bundle format sources, so a packer change re-packs without re-converting.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import CACHE, REPO, atomic_write
from edged_formats.bundle import dump_npz

__all__ = ["INPUT_OFFSET", "INPUT_SCALE", "BenchModel", "mobilenet_v2", "raw_images"]

INPUT_SCALE = 1 / 127.5  # raw uint8 pixel * scale + offset lands in [-1, 1]
INPUT_OFFSET = -1.0
IMAGE_SHAPE = (224, 224, 3)
CALIBRATION_SAMPLES = 32
NAME = "mobilenetv2-224"
_TOOLCHAIN_SOURCES = (
    "control_plane/toolchain/nets.py",
    "control_plane/toolchain/convert.py",
    "bench/models.py",
)
_PACKER_SOURCES = ("edged/packer.py", "edged_formats")
_TOOLCHAIN_PACKAGES = ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert", "numpy")


@dataclass(frozen=True)
class BenchModel:
    """Paths of the cached files and how long building them took (when they were built)."""

    int8_bundle: Path
    float_bundle: Path
    int8_tflite: Path
    float_tflite: Path
    build_s: dict[str, float]
    built_now: bool


def raw_images(count: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Random uint8 RGB images, batch first, as a camera source would deliver them."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *IMAGE_SHAPE), dtype=np.uint8)


def preprocess(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return (raw.astype(np.float32) * INPUT_SCALE + INPUT_OFFSET).astype(np.float32)


def mobilenet_v2() -> BenchModel:
    """The MobileNetV2-224 int8 and float bundles, built on first use."""
    toolchain_key = _key(_TOOLCHAIN_SOURCES, _TOOLCHAIN_PACKAGES)
    bundle_key = _key((*_PACKER_SOURCES, "bench/models.py"), (), toolchain_key)
    folder = CACHE / f"{NAME}-{toolchain_key}"
    paths = {
        "int8_tflite": folder / "int8.tflite",
        "float_tflite": folder / "float.tflite",
        "int8_bundle": folder / f"int8-{bundle_key}.bundle",
        "float_bundle": folder / f"float-{bundle_key}.bundle",
    }
    meta_path = folder / "build.json"
    built_now = False
    build_s: dict[str, float] = {}
    if meta_path.exists():
        build_s = json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no cache yet
    if not (paths["int8_tflite"].exists() and paths["float_tflite"].exists()):
        build_s = _convert(paths["float_tflite"], paths["int8_tflite"])
        built_now = True
    if not (paths["int8_bundle"].exists() and paths["float_bundle"].exists()):
        build_s["pack_s"] = _pack_both(paths)
        built_now = True
    if built_now:
        build_s["total_s"] = sum(v for k, v in build_s.items() if k != "total_s")
        atomic_write(meta_path, json.dumps(build_s, indent=1).encode())
        _prune(folder, keep=set(paths.values()))
    return BenchModel(build_s=build_s, built_now=built_now, **paths)


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove builds from older toolchain or packer sources."""
    for stale in folder.parent.glob(f"{NAME}-*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale)
    for stale in folder.glob("*.bundle"):
        if stale not in keep:
            stale.unlink()


def _key(sources: tuple[str, ...], packages: tuple[str, ...], *extra: str) -> str:
    digest = hashlib.sha256()
    for source in sources:
        for path in sorted(_expand(REPO / source)):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    for package in packages:
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:12]


def _expand(path: Path) -> list[Path]:
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _convert(float_path: Path, int8_path: Path) -> dict[str, float]:
    """torch → float .tflite → int8 .tflite; seconds spent in each step."""
    import torch

    from control_plane.toolchain.convert import export_float, quantize_int8
    from control_plane.toolchain.nets import MobileNetV2

    started = time.perf_counter()
    torch.manual_seed(0)
    calibration = preprocess(raw_images(CALIBRATION_SAMPLES))
    module = _with_batchnorm_statistics(MobileNetV2(), torch.from_numpy(calibration))
    float_model = export_float(module, torch.from_numpy(calibration[:1]))
    exported = time.perf_counter()
    int8_model = quantize_int8(float_model, calibration)
    quantized = time.perf_counter()
    atomic_write(float_path, float_model)
    atomic_write(int8_path, int8_model)
    _save_head(float_path.with_name("head.npz"), module)
    return {"export_s": exported - started, "quantize_s": quantized - exported}


def _with_batchnorm_statistics(module: Any, samples: Any) -> Any:
    """The module in eval mode with BatchNorm running statistics measured on `samples`.

    With torch's default initialisation and untouched running statistics the activations of a
    random MobileNetV2 shrink ~10x per block (to ~1e-7 by the last ones); the quantizer then
    gives them scales so small that TFLite's reference kernels refuse the model
    ("no_integer_overflow_from_quantization"). Measured statistics keep every layer's
    activations in the range a trained network has; the weights stay random.
    """
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the passes
    module.train()
    with torch.no_grad():
        for start in range(0, len(samples), 8):
            module(samples[start : start + 8])
    return module.eval()


def _save_head(path: Path, module: Any) -> None:
    weight = module.head.weight.detach().numpy().astype(np.float32)
    bias = module.head.bias.detach().numpy().astype(np.float32)
    atomic_write(path, dump_npz(weight=weight, bias=bias))


def _pack_both(paths: dict[str, Path]) -> float:
    """Pack the int8 and the float model the same way: labels, raw calibration, head."""
    from edged.packer import PackRequest, pack

    started = time.perf_counter()
    with np.load(paths["float_tflite"].with_name("head.npz")) as head:
        weight, bias = head["weight"], head["bias"]
    for kind in ("int8", "float"):
        request = PackRequest(
            model=paths[f"{kind}_tflite"].read_bytes(),
            labels=[f"class{i}" for i in range(1000)],
            calibration=raw_images(CALIBRATION_SAMPLES),
            name=f"{NAME}-{kind}",
            version="1.0.0",
            input_scale=INPUT_SCALE,
            input_offset=INPUT_OFFSET,
            output_kind="logits",
            head=(weight, bias),
        )
        atomic_write(paths[f"{kind}_bundle"], pack(request))
    return time.perf_counter() - started


if __name__ == "__main__":
    model = mobilenet_v2()
    print(json.dumps({"built_now": model.built_now, **model.build_s}, indent=1))
