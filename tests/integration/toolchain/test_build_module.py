"""`edged-model build-module`: a user's own trained torch module becomes a bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.train, pytest.mark.slow]

FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(3, 12) * 4)
        net[1].bias.zero_()
    return net.eval()
"""


def test_build_module_packs_a_users_model(tmp_path: Path) -> None:
    """A factory's module (plain logits, no head) is converted, quantised, packed and scored;
    bad arguments are one-line errors."""
    (tmp_path / "my_model.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(300, 4, 3), dtype=np.uint8)
    y = np.argmax(x.reshape(300, 12)[:, :3], axis=1)
    np.savez(
        tmp_path / "data.npz",
        x_train=x[:150],
        x_val=x[150:225],
        y_val=y[150:225],
        x_test=x[225:],
        y_test=y[225:],
    )
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    command = [
        sys.executable,
        "-m",
        "control_plane.toolchain.cli",
        "build-module",
        "my_model:make",
        "--data",
        str(tmp_path / "data.npz"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--name",
        "mine",
        "--version",
        "0.1.0",
        "--scale",
        str(1 / 255),
        "--out",
        str(tmp_path / "out"),
    ]
    env = {"PYTHONPATH": f"{tmp_path}:{Path.cwd()}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bundle"] == "mine-0.1.0.bundle" and report["test_samples"] == 75
    assert report["torch_accuracy"] == 1.0 and report["top1_agreement"] >= 0.95
    assert (tmp_path / "out" / "mine-0.1.0.bundle").exists()
    bad = subprocess.run(
        [*command[:4], "my_model:nothing", *command[5:]],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("edged-model: error: cannot load my_model:nothing")
