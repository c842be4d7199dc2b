"""Session fixtures shared by the whole suite: real models, real bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TF_MODELS = ("digits_float", "digits_int8_io_int8", "digits_int8_io_uint8", "digits_int8_io_float")


@pytest.fixture(scope="session")
def tf_reference() -> dict[str, np.ndarray]:
    """The 64 held-out digits the TF fixtures were checked on, with Keras' probabilities."""
    with np.load(FIXTURES / "tf" / "digits_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def tf_bundles(tmp_path_factory: pytest.TempPathFactory, tf_reference) -> dict[str, Path]:
    """Every TensorFlow-converter fixture packed into a bundle by edged's own packer."""
    from edged.packer import PackRequest, pack

    out = tmp_path_factory.mktemp("tf-bundles")
    bundles = {}
    for name in TF_MODELS:
        request = PackRequest(
            model=(FIXTURES / "tf" / f"{name}.tflite").read_bytes(),
            labels=[str(i) for i in range(10)],
            calibration=tf_reference["x"],
            calibration_labels=tf_reference["y"],
            name=name.replace("_", "-"),
            version="1.0.0",
        )
        bundles[name] = out / f"{name}.bundle"
        bundles[name].write_bytes(pack(request))
    return bundles


def _reference_build(tmp_path_factory: pytest.TempPathFactory, name: str):
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    from control_plane.toolchain.reference import build_reference

    out = tmp_path_factory.mktemp(name)
    return out, build_reference(name, out)


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory: pytest.TempPathFactory):
    """The digits reference model built end to end by the project's toolchain (torch ->
    litert-torch -> ai-edge-quantizer -> bundle). About ten seconds, once per session."""
    return _reference_build(tmp_path_factory, "digits")


@pytest.fixture(scope="session")
def sensor_build(tmp_path_factory: pytest.TempPathFactory):
    """The smartwatch IMU 1-D CNN built the same way, once per session."""
    return _reference_build(tmp_path_factory, "sensor")
