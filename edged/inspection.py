"""What is inside a bundle or a bare .tflite: tensors, quantisation, ops and sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edged.engine import open_bundle
from edged.errors import ModelError
from edged.runtime import load_runtime
from edged_formats.bundle import TFLITE_IDENTIFIER

__all__ = ["inspect_path"]


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    params = detail.get("quantization_parameters", {})
    channels = len(params.get("scales", [])) if params else 0
    return {
        "name": detail["name"],
        "shape": [int(d) for d in detail["shape"]],
        "shape_signature": [int(d) for d in detail.get("shape_signature", detail["shape"])],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": None
        if scale == 0
        else {
            "scale": float(scale),
            "zero_point": int(zero_point),
            "per_channel": channels > 1,
        },
    }


def inspect_model(model: bytes) -> dict[str, Any]:
    """Tensors, op counts and weight quantisation of a .tflite."""
    if model[4:8] != TFLITE_IDENTIFIER:
        raise ModelError("not a TFLite flatbuffer (no TFL3 identifier)")
    runtime = load_runtime()
    interpreter = runtime.interpreter(model, num_threads=1, xnnpack=False)
    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    dtypes = Counter(np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details())
    return {
        "runtime": runtime.label,
        "bytes": len(model),
        "inputs": [_tensor(d) for d in interpreter.get_input_details()],
        "outputs": [_tensor(d) for d in interpreter.get_output_details()],
        "ops": dict(sorted(ops.items())),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "quantised": dtypes.get("int8", 0) + dtypes.get("uint8", 0) > 0,
    }


def inspect_path(path: str | Path) -> dict[str, Any]:
    """A report for a bundle (manifest, members and model) or a bare .tflite file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from exc
    if head[4:8] == TFLITE_IDENTIFIER:
        return {"path": str(path), "kind": "tflite", "model": inspect_model(path.read_bytes())}
    bundle = open_bundle(path)
    manifest = bundle.manifest.to_dict()
    return {
        "path": str(path),
        "kind": "bundle",
        "bytes": path.stat().st_size,
        "name": manifest["name"],
        "version": manifest["version"],
        "parent_version": manifest["parent_version"],
        "created_at": manifest["created_at"],
        "members": manifest["members"],
        "input": manifest["input"],
        "output": manifest["output"],
        "labels": list(bundle.labels),
        "embedding": manifest["embedding"],
        "head": manifest["head"],
        "metrics": manifest["metrics"],
        "reference": {
            k: v
            for k, v in manifest["reference"].items()
            if k not in ("feature_mean", "feature_std")
        },
        "canaries": manifest["canaries"],
        "model": inspect_model(bundle.model),
    }
