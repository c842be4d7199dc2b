"""The `edged` command as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.errors import InputError
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
    sample = tmp_path / "sample.npy"
    np.save(sample, np.zeros((8, 8, 1), np.float32))
    result = run("predict", corrupt, sample, ok=False)
    assert result.returncode == 2
    assert result.stderr.startswith("edged: error: ") and result.stderr.count("\n") == 1
    assert "corrupt.bundle" in result.stderr
    result = run("predict", tf_bundles["digits_float"], tmp_path / "nothing.npy", ok=False)
    assert "nothing.npy" in result.stderr and "Traceback" not in result.stderr


# -- bad input: one sentence, exit 2, nothing written --------------------------------------


def refused(*args: str | Path) -> str:
    """Run edged expecting a refusal: exit 2, no traceback, and exactly one `edged: error:`
    line, last on stderr (the TFLite runtime may print an INFO line before it)."""
    result = run(*args, ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("edged: error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture
def digits_data(tf_reference, tmp_path) -> dict[str, Path]:
    """Good and broken sample files next to each other: the stream, labels and calibration."""
    x, y = tf_reference["x"], tf_reference["y"]
    files = {
        "good": {"x": x, "y": y},
        "object_x": {"x": np.array([1, "a"], dtype=object)},
        "object_y": {"x": x, "y": np.array([1, "a"], dtype=object)},
        "text_x": {"x": np.array(["a"] * 64)},
        "bool_x": {"x": np.zeros(x.shape, bool)},
        "empty_x": {"x": x[:0]},
        "nan_x": {"x": np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x)},
        "inf_x": {"x": np.full(x.shape, np.inf, np.float32)},
        "short_y": {"x": x, "y": y[:10]},
        "float_y": {"x": x, "y": y.astype(np.float32)},
        "big_y": {"x": x, "y": y + 10},
        "calibration_16": {"x": np.zeros((32, 16), np.float32)},
    }
    paths = {}
    for name, arrays in files.items():
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], **arrays)
    paths["empty_npy"] = tmp_path / "empty.npy"
    np.save(paths["empty_npy"], x[:0])
    paths["labels"] = tmp_path / "labels.txt"
    paths["labels"].write_text("\n".join(str(i) for i in range(10)))
    return paths


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("object_x", "array 'x' is not a plain numeric array"),
        ("text_x", "samples must be integers or floats, not <U1"),
        ("bool_x", "samples must be integers or floats, not bool"),
        ("empty_x", "the file holds no samples (shape [0, 8, 8, 1])"),
        ("empty_npy", "the file holds no samples (shape [0, 8, 8, 1])"),
        ("nan_x", "samples hold NaN or infinite values"),
        ("inf_x", "samples hold NaN or infinite values"),
    ],
)
def test_predict_refuses_unusable_samples(tf_bundles, digits_data, data: str, problem: str) -> None:
    """Object, text, bool, empty or NaN/inf samples: one line naming the file, no traceback."""
    error = refused("predict", tf_bundles["digits_float"], digits_data[data])
    assert error.startswith(f"edged: error: {digits_data[data]}: ") and problem in error


def test_predict_ignores_labels_it_does_not_need(tf_bundles, digits_data) -> None:
    """predict never loads `y`, so an unreadable `y` next to a good `x` does not stop it."""
    result = run("predict", tf_bundles["digits_float"], digits_data["object_y"])
    assert len(result.stdout.splitlines()) == 64


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("empty_x", "the file holds no samples"),
        ("object_y", "array 'y' is not a plain numeric array"),
        ("short_y", "labels 'y' have shape [10], expected one per sample ([64])"),
        ("float_y", "labels 'y' must be integer class indices, not float32"),
        ("big_y", "labels 'y' must be class indices from 0 to 9"),
    ],
)
def test_replay_refuses_unusable_data(tf_bundles, digits_data, data: str, problem: str) -> None:
    """replay refuses empty data and labels that are not one valid class index per sample."""
    error = refused("replay", tf_bundles["digits_float"], digits_data[data], "--json")
    assert error.startswith(f"edged: error: {digits_data[data]}: ") and problem in error


PACK = ("model", "pack", "m.tflite", "--labels", "l", "--calibration", "c", "--name", "n")


@pytest.mark.parametrize(
    ("flag", "args"),
    [
        ("--top", ("predict", "{bundle}", "{data}", "--top", "0")),
        ("--top", ("predict", "{bundle}", "{data}", "--top", "many")),
        ("--threads", ("predict", "{bundle}", "{data}", "--threads", "0")),
        ("--threads", ("replay", "{bundle}", "{data}", "--threads", "65")),
        ("--batch", ("model", "bench", "{bundle}", "--batch", "0")),
        ("--batch", ("model", "bench", "{bundle}", "--batch", "1025")),
        ("--iterations", ("model", "bench", "{bundle}", "--iterations", "0")),
        ("--warmup", ("model", "bench", "{bundle}", "--warmup", "-1")),
        ("--scale", (*PACK, "--version", "1", "--scale", "0")),
        ("--scale", (*PACK, "--version", "1", "--scale", "nan")),
        ("--offset", (*PACK, "--version", "1", "--offset", "inf")),
    ],
)
def test_out_of_range_flags_are_usage_errors(
    tf_bundles, digits_data, flag: str, args: tuple[str, ...]
) -> None:
    """Out-of-bounds numeric flags are argparse usage errors (exit 2) naming the flag."""
    values = {"bundle": str(tf_bundles["digits_float"]), "data": str(digits_data["good"])}
    result = run(*(a.format(**values) for a in args), ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("usage: edged ")
    assert f"error: argument {flag}: " in result.stderr.splitlines()[-1]


def pack_args(
    model: Path, digits_data: dict[str, Path], out: Path, **flags: str | Path
) -> list[str | Path]:
    """`edged model pack` arguments for the digits model with good defaults, overridden by
    `flags` (underscores become dashes)."""
    options: dict[str, str | Path] = {
        "labels": digits_data["labels"],
        "calibration": digits_data["good"],
        "name": "digits",
        "version": "1.0.0",
        "output": out,
        **flags,
    }
    flat = [x for key, value in options.items() for x in (f"--{key.replace('_', '-')}", value)]
    return ["model", "pack", model, *flat]


def test_pack_refuses_bad_arguments_and_writes_nothing(tf_reference, digits_data, tmp_path):
    """Each bad pack argument is one sentence naming the problem, and nothing is written."""
    model = FIXTURES / "tf" / "digits_float.tflite"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "digits.bundle"
    bad_labels = tmp_path / "latin1.txt"
    bad_labels.write_bytes("z\xe9ro\nun\n".encode("latin-1"))
    blank_labels = tmp_path / "blank.txt"
    blank_labels.write_text("\n  \n\n")
    one_label = tmp_path / "one.txt"
    one_label.write_text("only\n")
    twice = tmp_path / "twice.txt"
    twice.write_text("a\nb\na\n")
    no_weight = tmp_path / "head.npz"
    np.savez(no_weight, w=np.zeros((10, 4)), bias=np.zeros(10))
    cases: list[tuple[dict[str, str | Path], str]] = [
        ({"name": "Bad Name"}, "manifest name must be"),
        ({"version": ""}, "manifest version must be"),
        ({"calibration": digits_data["calibration_16"]}, "calibration samples have shape [16]"),
        ({"calibration": digits_data["nan_x"]}, "samples hold NaN or infinite values"),
        ({"calibration": digits_data["short_y"]}, "labels 'y' have shape [10]"),
        ({"calibration": digits_data["big_y"]}, "calibration labels must be class indices"),
        ({"labels": bad_labels}, f"{bad_labels}: the labels file is not UTF-8 text"),
        ({"labels": blank_labels}, f"{blank_labels}: the labels file has no labels"),
        ({"labels": one_label}, "a classifier needs at least 2 labels, got 1"),
        ({"labels": twice}, "label 'a' appears more than once"),
        ({"head": no_weight}, f"{no_weight}: the head .npz has no array named 'weight'"),
        ({"output_tensor": "nope"}, "the model has no output named 'nope'"),
        ({"embedding": "nope"}, "the model has no output named 'nope'"),
        ({"output": tmp_path / "missing" / "x.bundle"}, "no such directory for the bundle"),
    ]
    for flags, problem in cases:
        error = refused(*pack_args(model, digits_data, out, **flags))
        assert problem in error, (flags, error)
    assert list(out_dir.iterdir()) == []


def test_pack_replaces_the_bundle_atomically(digits_data, tmp_path) -> None:
    """pack renames a new file over the old bundle (open readers keep the old one whole)."""
    out = tmp_path / "digits.bundle"
    out.write_bytes(b"old bundle")
    model = FIXTURES / "tf" / "digits_float.tflite"
    with out.open("rb") as reader:
        run(*pack_args(model, digits_data, out))
        assert reader.read() == b"old bundle"
    assert out.read_bytes()[:10] != b"old bundle" and (out.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir() if "digits" in p.name) == ["digits.bundle"]


def test_pack_help_says_why_calibration_is_required() -> None:
    """--calibration stays required, and its help says what it is measured for."""
    help_text = " ".join(run("model", "pack", "--help").stdout.split())
    assert "reference statistics" in help_text and "canaries" in help_text
    without = ["model", "pack", "m.tflite", "--labels", "l", "--name", "n", "--version", "1"]
    result = run(*without, ok=False)
    assert result.returncode == 2 and "--calibration" in result.stderr


@pytest.mark.train
def test_pack_output_tensor_resolves_ambiguity(tmp_path_factory, digits_data, tmp_path) -> None:
    """With two 10-wide outputs pack names both and refuses; --output-tensor picks one."""
    from tests.integration.edged.test_packer import SCORES, SECOND, build_odd_models

    model = build_odd_models(tmp_path_factory)["two_heads"]
    calibration = tmp_path / "vectors.npz"
    np.savez(calibration, x=np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32))
    out = tmp_path / "two.bundle"
    error = refused(*pack_args(model, digits_data, out, calibration=calibration))
    assert f"'{SCORES}', '{SECOND}' all have 10 values" in error and "--output-tensor" in error
    run(*pack_args(model, digits_data, out, calibration=calibration, output_tensor=SECOND))
    report = json.loads(run("model", "inspect", out).stdout)
    assert report["output"]["name"] == SECOND and report["output"]["kind"] == "logits"


def test_main_turns_anticipated_errors_into_one_line(monkeypatch, capsys) -> None:
    """main() prints edged/format/OS errors as one line, exit 2; other exceptions propagate."""
    from edged import cli
    from edged_formats import ManifestError

    def failing(exc: BaseException):
        def command(args) -> int:
            raise exc

        return command

    cases = [
        (ManifestError("manifest name must be lowercase"), "manifest name must be lowercase"),
        (InputError("x.npy: the file holds no samples"), "x.npy: the file holds no samples"),
        (FileNotFoundError(2, "No such file or directory", "gone.npy"), "gone.npy: No such"),
        (BrokenPipeError(32, "Broken pipe"), "Broken pipe"),
    ]
    for exc, line in cases:
        monkeypatch.setattr(cli, "cmd_inspect", failing(exc))
        assert cli.main(["model", "inspect", "anything"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"edged: error: {line}") and err.count("\n") == 1, err
    monkeypatch.setattr(cli, "cmd_inspect", failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        cli.main(["model", "inspect", "anything"])
