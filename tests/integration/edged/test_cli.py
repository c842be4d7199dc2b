"""The `edged` command as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import FIXTURES

EDGED = [sys.executable, "-m", "edged.cli"]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*EDGED, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (result.returncode == 0) == ok, result.stderr
    return result


def test_version() -> None:
    """`edged --version` names the package version."""
    from edged import __version__

    assert run("--version").stdout.strip() == f"edged {__version__}"


def test_inspect_bundle_and_bare_tflite(tf_bundles) -> None:
    """inspect reports manifest, tensors, quantisation and ops for bundles and .tflite files."""
    report = json.loads(run("model", "inspect", tf_bundles["digits_int8_io_int8"]).stdout)
    assert report["kind"] == "bundle" and report["labels"] == [str(i) for i in range(10)]
    model = report["model"]
    assert model["inputs"][0]["dtype"] == "int8"
    quantization = model["inputs"][0]["quantization"]
    assert abs(quantization["scale"] - 1 / 255) < 1e-8 and quantization["zero_point"] == -128
    assert model["quantised"] and model["ops"]["CONV_2D"] == 2
    bare = json.loads(run("model", "inspect", FIXTURES / "tf" / "digits_float.tflite").stdout)
    assert bare["kind"] == "tflite" and not bare["model"]["quantised"]


def test_predict_prints_one_line_per_sample(tf_bundles, tf_reference, tmp_path) -> None:
    """predict on a single .npy sample and on an .npz batch gives labels and top-k."""
    single = tmp_path / "one.npy"
    np.save(single, tf_reference["x"][0])
    lines = run("predict", tf_bundles["digits_int8_io_int8"], single, "--top", "2").stdout
    (answer,) = [json.loads(line) for line in lines.splitlines()]
    assert answer["label"] == str(tf_reference["keras_probs"][0].argmax())
    assert len(answer["top"]) == 2 and answer["model_version"] == "1.0.0"
    batch = tmp_path / "batch.npz"
    np.savez(batch, x=tf_reference["x"][:5])
    assert len(run("predict", tf_bundles["digits_float"], batch).stdout.splitlines()) == 5


def test_pack_wraps_a_foreign_tflite(tf_reference, tmp_path) -> None:
    """pack turns a TensorFlow-made .tflite plus calibration data into a servable bundle."""
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"digit {i}" for i in range(10)))
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=tf_reference["x"], y=tf_reference["y"])
    out = tmp_path / "packed.bundle"
    run(
        "model",
        "pack",
        FIXTURES / "tf" / "digits_int8_io_float.tflite",
        "--labels",
        labels,
        "--calibration",
        calibration,
        "--name",
        "tf-digits",
        "--version",
        "3.1.0",
        "-o",
        out,
    )
    report = json.loads(run("model", "inspect", out).stdout)
    assert report["version"] == "3.1.0" and report["labels"][3] == "digit 3"
    assert report["output"]["kind"] == "probabilities"
    assert report["metrics"]["calibration_accuracy"] >= 0.95
    assert report["reference"]["granularity"] == "element"
    assert sum(report["reference"]["confidence_histogram"]) == 64
    assert len(report["canaries"]["expected_top1"]) == 8


def test_bench_and_replay_report_figures(tf_bundles, tf_reference, tmp_path) -> None:
    """bench reports latency percentiles; replay reports accuracy and a histogram."""
    bench = json.loads(
        run(
            "model",
            "bench",
            tf_bundles["digits_int8_io_int8"],
            "--iterations",
            "50",
            "--warmup",
            "5",
        ).stdout
    )
    assert 0 < bench["p50_ms"] <= bench["p99_ms"] and bench["throughput_per_s"] > 0
    data = tmp_path / "stream.npz"
    np.savez(data, x=tf_reference["x"], y=tf_reference["y"])
    replay = json.loads(run("replay", tf_bundles["digits_int8_io_int8"], data, "--json").stdout)
    assert replay["samples"] == 64 and replay["accuracy"] >= 0.95
    assert sum(replay["confidence_histogram"].values()) == 64


def test_bad_input_exits_2_with_one_sentence(tf_bundles, tmp_path) -> None:
    """A corrupt bundle or unreadable input gives exit code 2 and a one-line error."""
    corrupt = tmp_path / "corrupt.bundle"
    corrupt.write_bytes(b"\x00" * 4096)
    result = run("predict", corrupt, tmp_path / "nothing.npy", ok=False)
    assert result.returncode == 2
    assert result.stderr.startswith("edged: error: ") and result.stderr.count("\n") == 1
    result = run("predict", tf_bundles["digits_float"], tmp_path / "nothing.npy", ok=False)
    assert "nothing.npy" in result.stderr and "Traceback" not in result.stderr
