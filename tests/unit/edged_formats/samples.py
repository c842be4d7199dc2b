"""Valid manifests and bundles made without any interpreter, for the pure-core tests."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

# Enough of a flatbuffer for the pure checks: the format only looks at the identifier.
FAKE_TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def replay_arrays(per_class: int = 2) -> dict[str, np.ndarray]:
    """A valid replay set for the sample manifest: `per_class` uint8 inputs of each class."""
    y = np.repeat(np.arange(10, dtype=np.int64), per_class)
    return {"x": np.full((len(y), 8, 8, 1), 3, dtype=np.uint8), "y": y}


def members(with_head: bool = False, *, with_replay: bool = False) -> dict[str, bytes]:
    out = {
        "model.tflite": FAKE_TFLITE,
        "labels.txt": "".join(f"digit-{i}\n" for i in range(10)).encode(),
        "canaries.npy": npy(np.zeros((2, 8, 8, 1), dtype=np.uint8)),
    }
    if with_head:
        out["head.npz"] = npz(weight=np.ones((10, 4), np.float32), bias=np.zeros(10, np.float32))
    if with_replay:
        out["replay.npz"] = npz(**replay_arrays())
    return out


def manifest_dict(
    with_head: bool = False,
    content: dict[str, bytes] | None = None,
    *,
    with_replay: bool = False,
) -> dict[str, Any]:
    content = content if content is not None else members(with_head, with_replay=with_replay)
    obj: dict[str, Any] = {
        "format": "edged-bundle",
        "format_version": 1,
        "name": "digits-cnn",
        "version": "1.2.0",
        "parent_version": "1.1.0",
        "created_at": "2026-11-22T00:00:00Z",
        "members": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in sorted(content.items())
        },
        "input": {
            "name": "in",
            "shape": [1, 8, 8, 1],
            "dtype": "int8",
            "layout": "NHWC",
            "scale": 0.0625,
            "offset": 0.0,
        },
        "output": {
            "name": "out",
            "shape": [1, 10],
            "dtype": "int8",
            "kind": "logits",
            "labels_member": "labels.txt",
        },
        "embedding": {"name": "emb", "size": 4} if with_head else None,
        "head": {"member": "head.npz"} if with_head else None,
        "reference": {
            "granularity": "element",
            "feature_mean": [1.0] * 64,
            "feature_std": [0.5] * 64,
            "confidence_histogram": [0, 1, 2, 3],
            "confidence_quantiles": {"0.05": 0.6},
            "samples": 6,
        },
        "canaries": {"member": "canaries.npy", "expected_top1": [3, 7]},
        "metrics": {"accuracy": 0.97},
    }
    if with_replay:
        obj["replay"] = {"member": "replay.npz"}
    return obj


PERSONALISATION = {
    "base_version": "1.2.0",
    "base_sha256": "ab" * 32,
    "labels": 300,
    "device": "cam-01",
}
