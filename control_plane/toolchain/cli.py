"""`edged-model`: build the reference models into int8 bundles (train extra)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from control_plane.toolchain.reference import DATASETS, build_reference

    parser = argparse.ArgumentParser(prog="edged-model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train, convert, quantise and pack a reference model")
    build.add_argument("reference", choices=sorted(DATASETS))
    build.add_argument("--out", type=Path, default=Path("build/models"))
    build.add_argument("--version", default="1.0.0")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = build_reference(args.reference, args.out, version=args.version, seed=args.seed)
    print(report.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
