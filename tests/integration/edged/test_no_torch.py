"""The device's inference path never imports torch or the conversion toolchain."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "litert_torch", "ai_edge_quantizer", "jax", "transformers", "fastapi")


def test_inference_process_never_imports_torch(tf_bundles, tf_reference, tmp_path) -> None:
    """Loading a bundle, predicting and running every CLI path imports no heavy package."""
    sample = tmp_path / "x.npy"
    import numpy as np

    np.save(sample, tf_reference["x"][:2])
    code = f"""
import sys
from edged import cli, engine, packer, inspection
from edged.engine import Engine
import numpy as np
e = Engine.from_file({str(tf_bundles["digits_int8_io_int8"])!r})
e.predict(np.load({str(sample)!r}))
cli.main(["model", "inspect", {str(tf_bundles["digits_float"])!r}])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("HEAVY:", loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip().splitlines()[-1] == "HEAVY: []"
