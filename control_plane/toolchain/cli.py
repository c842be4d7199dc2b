"""`edged-model`: build int8 bundles from torch models (train extra).

edged-model build digits|sensor            train and build a reference model
edged-model build-module PKG.MOD:FACTORY   build your own trained torch module
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from control_plane.errors import ControlPlaneError, ToolchainError
from edged.errors import EdgedError
from edged_formats import FormatError

__all__ = ["main"]

SPLITS = ("x_train", "x_val", "y_val", "x_test", "y_test")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite non-zero number")
    return value


def _load_module(spec: str) -> Any:
    """`package.module:factory` -> the trained module the factory returns."""
    import torch

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ToolchainError(f"{spec!r} is not MODULE:FACTORY")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ToolchainError(f"cannot load {spec}: {exc}") from exc
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ToolchainError(f"{spec} returned a {type(model).__name__}, not a torch module")
    return model


def _load_dataset(path: Path, labels: Path, scale: float, offset: float) -> Any:
    from control_plane.toolchain.datasets import Dataset

    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in SPLITS if name not in npz.files]
            if missing:
                raise ToolchainError(f"{path} lacks the arrays {', '.join(missing)}")
            arrays = {name: npz[name] for name in SPLITS}
    except (OSError, ValueError) as exc:
        raise ToolchainError(f"{path}: not a readable .npz of plain arrays ({exc})") from exc
    names = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
    return Dataset(
        path.stem,
        names,
        arrays["x_train"],
        np.zeros(0, np.int64),
        arrays["x_val"],
        arrays["y_val"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
        scale=scale,
        offset=offset,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from control_plane.toolchain.reference import DATASETS, build_bundle, build_reference

    parser = argparse.ArgumentParser(
        prog="edged-model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train, convert, quantise and pack a reference model")
    build.add_argument("reference", choices=sorted(DATASETS))
    build.add_argument("--out", type=Path, default=Path("build/models"))
    build.add_argument("--version", default="1.0.0")
    build.add_argument("--seed", type=int, default=0)
    own = sub.add_parser("build-module", help="convert, quantise and pack a trained module")
    own.add_argument(
        "factory",
        help="PKG.MODULE:FACTORY returning a trained torch module "
        "(taking channels-last input; returning logits, or (logits, embedding) "
        "with the classifier in .head for on-device fine-tuning)",
    )
    own.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz with raw x_train (calibration), x_val, y_val (reference "
        "statistics, canaries) and x_test, y_test (the acceptance figures)",
    )
    own.add_argument("--labels", type=Path, required=True, help="one label per line")
    own.add_argument("--name", required=True)
    own.add_argument("--version", required=True)
    own.add_argument("--parent-version")
    own.add_argument("--scale", type=_finite, default=1.0, help="model input = raw*scale+offset")
    own.add_argument("--offset", type=float, default=0.0)
    own.add_argument("--out", type=Path, default=Path("build/models"))
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            report = build_reference(args.reference, args.out, version=args.version, seed=args.seed)
        else:
            data = _load_dataset(args.data, args.labels, args.scale, args.offset)
            report = build_bundle(
                _load_module(args.factory),
                data,
                args.out,
                name=args.name,
                version=args.version,
                parent_version=args.parent_version,
            )
    except (ControlPlaneError, EdgedError, FormatError, OSError) as exc:
        print(f"edged-model: error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
