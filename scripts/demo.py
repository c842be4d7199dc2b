"""`make demo`: everything edged can do so far, end to end, on real parts.

1. The cloud toolchain trains the reference models (a CNN on scikit-learn's digits, a 1-D CNN
   on real smartwatch IMU recordings), converts them with litert-torch, int8-quantises them
   with ai-edge-quantizer and packs bundles.
2. Separate device processes (no torch) inspect each bundle and stream its held-out data
   through the LiteRT engine one sample at a time: accuracy, latency, confidence histogram.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*args: str, capture: bool = False) -> str:
    """Run one real command; the toolchain's own log chatter is shown only if it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        args,
        check=False,
        text=True,
        env=env,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo step failed: {' '.join(args)}")
    return result.stdout or ""


def build(name: str, out: Path) -> Path:
    step(f"cloud: edged-model build {name} (torch -> litert-torch -> ai-edge-quantizer int8)")
    report = json.loads(
        run(str(BIN / "edged-model"), "build", name, "--out", str(out), capture=True)
    )
    print(
        f"  held-out: torch {report['torch_accuracy']:.2%}, int8 {report['int8_accuracy']:.2%}, "
        f"top-1 agreement {report['top1_agreement']:.2%}"
    )
    print(
        f"  size: float {report['float_bytes']} B -> int8 {report['int8_bytes']} B "
        f"({report['size_ratio']:.0%})"
    )
    return out / report["bundle"]


def serve(bundle: Path, data: Path) -> None:
    step(f"device: edged model inspect {bundle.name}")
    info = json.loads(run(str(BIN / "edged"), "model", "inspect", str(bundle), capture=True))
    print(f"  {info['name']} {info['version']}, {info['bytes']} B, {info['model']['runtime']}")
    spec = info["input"]
    print(
        f"  input {spec['shape']} {spec['dtype']} {spec['layout']}, "
        f"raw*{spec['scale']:.4g}{spec['offset']:+.4g}; output {info['output']['kind']} over "
        f"{len(info['labels'])} labels; embedding {info['embedding']['size']}"
    )
    print(f"  ops {', '.join(f'{k}x{v}' for k, v in info['model']['ops'].items())}")
    step(f"device: edged replay {bundle.name} {data.name} (one sample at a time)")
    run(str(BIN / "edged"), "replay", str(bundle), str(data))


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="edged-demo-"))
    for name in ("digits", "sensor"):
        serve(build(name, out), out / f"{name}-test.npz")
    print(f"\nartifacts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
