"""`make demo`: everything edged can do so far, end to end, on real parts.

1. The cloud toolchain trains the digits CNN on scikit-learn's digits, converts it with
   litert-torch, int8-quantises it with ai-edge-quantizer and packs a bundle.
2. A separate device process (no torch) inspects the bundle and streams the held-out digits
   through the LiteRT engine one by one: accuracy, latency and a confidence histogram.
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


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="edged-demo-"))
    step("cloud: train digits CNN (torch) -> litert-torch -> ai-edge-quantizer int8 -> bundle")
    report = json.loads(
        run(str(BIN / "edged-model"), "build", "digits", "--out", str(out), capture=True)
    )
    print(
        f"  held-out digits: torch {report['torch_accuracy']:.2%}, "
        f"int8 {report['int8_accuracy']:.2%}, top-1 agreement {report['top1_agreement']:.2%}"
    )
    print(
        f"  size: float {report['float_bytes']} B -> int8 {report['int8_bytes']} B "
        f"({report['size_ratio']:.0%})"
    )
    bundle = out / report["bundle"]

    step(f"device: edged model inspect {bundle.name}")
    info = json.loads(run(str(BIN / "edged"), "model", "inspect", str(bundle), capture=True))
    print(
        f"  {info['name']} {info['version']}, {info['bytes']} B, runtime {info['model']['runtime']}"
    )
    spec = info["input"]
    print(
        f"  input {spec['shape']} {spec['dtype']} {spec['layout']}, "
        f"raw*{spec['scale']:g}+{spec['offset']:g}; output {info['output']['kind']} over "
        f"{len(info['labels'])} labels; embedding {info['embedding']['size']}"
    )
    print(f"  ops {', '.join(f'{k}x{v}' for k, v in info['model']['ops'].items())}")

    step("device: edged replay (held-out digits streamed one sample at a time)")
    run(str(BIN / "edged"), "replay", str(bundle), str(out / "digits-test.npz"))
    print(f"\nartifacts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
