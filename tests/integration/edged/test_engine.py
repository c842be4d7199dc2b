"""The engine on real .tflite files from TensorFlow's own converter, in a real LiteRT."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edged.engine import Engine, EngineOptions, open_bundle
from edged.errors import InputError, ModelError, ModelMismatch, RuntimeUnavailable
from edged.runtime import load_runtime
from edged_formats import Manifest, read_bundle, write_bundle
from tests.conftest import TF_MODELS


@pytest.mark.parametrize("name", TF_MODELS)
def test_matches_keras_on_every_io_type(name, tf_bundles, tf_reference) -> None:
    """float, int8-in/int8-out, uint8 I/O and float I/O around int8 all give Keras' answers."""
    engine = Engine.from_file(tf_bundles[name])
    prediction = engine.predict(tf_reference["x"])
    keras = tf_reference["keras_probs"]
    agreement = np.mean(prediction.top1 == keras.argmax(axis=1))
    assert agreement >= 63 / 64
    assert np.max(np.abs(prediction.probabilities - keras)) < 0.05
    assert engine.manifest.output.kind == "probabilities"  # softmax models, detected by pack
    assert engine.canary_agreement() == 1.0


@pytest.mark.parametrize("name", ["digits_int8_io_int8", "digits_int8_io_uint8"])
def test_8bit_raw_input_takes_the_same_path_as_float(
    name, tf_bundles, tf_reference, tmp_path
) -> None:
    """uint8 raw pixels through the lookup table equal the same pixels given as floats."""
    bundle = open_bundle(tf_bundles[name])
    raw = np.clip(np.rint(tf_reference["x"] * 255), 0, 255).astype(np.uint8)
    fields = bundle.manifest.to_dict()
    fields["input"]["scale"] = 1 / 255
    manifest = Manifest.from_dict(fields)
    engine = Engine(read_bundle(write_bundle(manifest, bundle.members)))
    via_lut = engine.predict(raw).probabilities
    via_float = engine.predict(raw.astype(np.float32)).probabilities
    np.testing.assert_array_equal(via_lut, via_float)


@pytest.mark.parametrize("name", TF_MODELS)
def test_batched_invoke_equals_single(name, tf_bundles, tf_reference) -> None:
    """Batches (full chunks resized, remainder single) give the single-sample results."""
    x = tf_reference["x"][:21]
    batched = Engine.from_file(tf_bundles[name], EngineOptions(max_batch=8)).predict(x)
    single = Engine.from_file(tf_bundles[name], EngineOptions(max_batch=1)).predict(x)
    np.testing.assert_allclose(batched.probabilities, single.probabilities, atol=1e-6)


def test_threads_and_reference_kernels(tf_bundles, tf_reference) -> None:
    """num_threads=2 and XNNPACK off both serve and agree on top-1."""
    x = tf_reference["x"]
    fast = Engine.from_file(tf_bundles["digits_int8_io_int8"], EngineOptions(num_threads=2))
    reference = Engine.from_file(tf_bundles["digits_int8_io_int8"], EngineOptions(xnnpack=False))
    assert np.mean(fast.predict(x).top1 == reference.predict(x).top1) >= 63 / 64


def test_hot_swap_drops_no_in_flight_work(tf_bundles, tf_reference) -> None:
    """Swapping bundles while four threads predict: every call answers, from one version or
    the other, and calls after the swap use the new one."""
    engine = Engine.from_file(tf_bundles["digits_float"])
    replacement = open_bundle(tf_bundles["digits_int8_io_int8"])
    fields = replacement.manifest.to_dict()
    fields["version"] = "2.0.0"
    replacement = read_bundle(write_bundle(Manifest.from_dict(fields), replacement.members))
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                seen.append(engine.predict(tf_reference["x"][:3]).model_version)
            except BaseException as exc:
                errors.append(exc)

    def wait_until(count: int) -> None:
        deadline = time.monotonic() + 30
        while len(seen) < count and not errors:
            assert time.monotonic() < deadline, f"only {len(seen)} predictions in 30 s"
            time.sleep(0.001)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(50)
        assert engine.swap(replacement) == "1.0.0"
        wait_until(len(seen) + 50)
    finally:
        stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert set(seen) == {"1.0.0", "2.0.0"}
    assert engine.predict(tf_reference["x"][:1]).model_version == "2.0.0"
    assert engine.manifest.output.dtype == "int8"


def _with_manifest_change(path, change) -> bytes:
    """The bundle with its manifest edited; canaries and hashes follow, so only the
    manifest-vs-model disagreement remains."""
    import io

    from edged_formats.bundle import digest_members

    bundle = open_bundle(path)
    fields = bundle.manifest.to_dict()
    change(fields)
    members = dict(bundle.members)
    buffer = io.BytesIO()
    np.save(buffer, bundle.canary_inputs.reshape(-1, *fields["input"]["shape"][1:]))
    members["canaries.npy"] = buffer.getvalue()
    fields["members"] = {
        n: {"sha256": d.sha256, "size": d.size} for n, d in digest_members(members).items()
    }
    return write_bundle(Manifest.from_dict(fields), members)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: f["input"].update(shape=[1, 4, 16, 1]),
            r"manifest input shape \[1, 4, 16, 1\] disagrees with the model's \[1, 8, 8, 1\]",
        ),
        (
            lambda f: f["input"].update(dtype="uint8"),
            "manifest input dtype uint8 disagrees with the model's int8",
        ),
        (
            lambda f: f["output"].update(dtype="float32"),
            "manifest output dtype float32 disagrees with the model's int8",
        ),
        (
            lambda f: f["output"].update(name="logits"),
            "manifest output 'logits' is not an output of the model",
        ),
        (
            lambda f: f["input"].update(name="images"),
            "manifest input 'images' is not the model's input 'serving_default_image:0'",
        ),
    ],
)
def test_refuses_manifest_that_disagrees_with_tflite(change, message, tf_bundles) -> None:
    """Shape, dtype or tensor-name disagreements between manifest and model are refused."""
    data = _with_manifest_change(tf_bundles["digits_int8_io_int8"], change)
    with pytest.raises(ModelMismatch, match=message):
        Engine(read_bundle(data))


def test_refuses_truncated_tflite_with_honest_hashes(tf_bundles) -> None:
    """A truncated model whose hashes were recomputed is refused cleanly: LiteRT verifies the
    flatbuffer; tflite-runtime would segfault, so it is probed in a child process first."""
    bundle = open_bundle(tf_bundles["digits_int8_io_int8"])
    members = dict(bundle.members)
    members["model.tflite"] = members["model.tflite"][:5000]
    from edged_formats.bundle import digest_members

    fields = bundle.manifest.to_dict()
    fields["members"] = {
        n: {"sha256": d.sha256, "size": d.size} for n, d in digest_members(members).items()
    }
    data = write_bundle(Manifest.from_dict(fields), members)
    refused = r"runtime (refused the model: .*not a valid Flatbuffer|crashed \(SIGSEGV\))"
    with pytest.raises(ModelError, match=refused):
        Engine(read_bundle(data))


def test_refuses_bad_bundle_file_naming_it(tmp_path, tf_bundles) -> None:
    """A corrupt or missing bundle file is a ModelError that names the file."""
    corrupt = tmp_path / "corrupt.bundle"
    corrupt.write_bytes(tf_bundles["digits_float"].read_bytes()[:20000])
    with pytest.raises(ModelError, match=r"corrupt\.bundle: bundle"):
        open_bundle(corrupt)
    with pytest.raises(ModelError, match=r"missing\.bundle: cannot read"):
        open_bundle(tmp_path / "missing.bundle")


def test_refuses_inputs_that_do_not_fit(tf_bundles) -> None:
    """Wrong sample shapes and non-numeric input are InputErrors, and the engine still serves."""
    engine = Engine.from_file(tf_bundles["digits_float"])
    with pytest.raises(InputError, match=r"input shape \[8, 8\] does not match"):
        engine.predict(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(InputError, match="is not numeric"):
        engine.predict(np.array([[["a"] * 1] * 8] * 8)[None])
    bad = np.zeros((2, 8, 8, 1), np.float32)
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        engine.predict(bad)
    empty = engine.predict(np.zeros((0, 8, 8, 1), np.float32))
    assert empty.probabilities.shape == (0, 10) and empty.top1.shape == (0,)
    assert engine.predict(np.zeros((1, 8, 8, 1), np.float32)).probabilities.shape == (1, 10)


def test_names_missing_runtime() -> None:
    """Asking for a runtime that is not installed is one clear RuntimeUnavailable, and "auto"
    picks LiteRT first, tflite-runtime when LiteRT is absent (the legacy environment)."""
    import importlib.util

    installed = {
        name: importlib.util.find_spec(module) is not None
        for name, module in [
            ("ai-edge-litert", "ai_edge_litert"),
            ("tflite-runtime", "tflite_runtime"),
        ]
    }
    for name, present in installed.items():
        if not present:
            with pytest.raises(RuntimeUnavailable, match="no TFLite runtime could be imported"):
                load_runtime(name)  # type: ignore[arg-type]
    expected = "ai-edge-litert" if installed["ai-edge-litert"] else "tflite-runtime"
    assert load_runtime().name == expected


def test_health_check_is_consistent_during_swaps(tf_bundles) -> None:
    """canary_agreement running while bundles swap back and forth never mixes one version's
    canaries with another's expectations."""
    first = open_bundle(tf_bundles["digits_float"])
    second = open_bundle(tf_bundles["digits_int8_io_int8"])
    engine = Engine(first)
    errors: list[BaseException] = []
    results: list[float] = []
    stop = threading.Event()

    def check() -> None:
        while not stop.is_set():
            try:
                results.append(engine.canary_agreement())
            except BaseException as exc:
                errors.append(exc)

    checker = threading.Thread(target=check)
    checker.start()
    try:
        for i in range(40):
            engine.swap(second if i % 2 == 0 else first)
    finally:
        stop.set()
        checker.join()
    assert not errors and results and set(results) == {1.0}
