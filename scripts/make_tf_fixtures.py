"""Generate the TensorFlow Lite test fixtures in ``tests/fixtures/tf/``.

DEV-ONLY: TensorFlow is never a runtime or test dependency of edged. This script
is run by hand to (re)create small committed fixtures produced by TensorFlow's own
converter, so the edged engine can be checked against a reference toolchain.

Usage (in a throwaway venv)::

    pip install tensorflow-cpu scikit-learn
    python scripts/make_tf_fixtures.py

It trains a tiny CNN on scikit-learn's bundled 8x8 digits, converts it with
``tf.lite.TFLiteConverter`` (float, int8 I/O, uint8 I/O, float I/O with int8
internals), writes reference inputs/labels/Keras probabilities to
``digits_reference.npz`` and a README describing the models and their top-1
agreement with Keras (measured with ``tf.lite.Interpreter``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf"
SEED = 0
EPOCHS = 20
N_REFERENCE = 64  # test samples stored in digits_reference.npz
N_CALIBRATION = 300  # training samples fed to the representative dataset


@dataclass
class Data:
    x_train: np.ndarray  # float32 (N, 8, 8, 1) in [0, 1]
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray


def load_data() -> Data:
    """Digits as NHWC float32 in [0, 1] with a deterministic stratified split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    return Data(x_train, y_train, x_test, y_test)


def build_model() -> tf.keras.Model:
    """Tiny CNN: ~10k parameters, softmax output, dynamic batch dimension."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            layers.Input(shape=(8, 8, 1), name="image"),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="digits_cnn",
    )


def train(data: Data) -> tuple[tf.keras.Model, float]:
    """Train with fixed seeds; return the model and its test accuracy."""
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(data.x_train, data.y_train, epochs=EPOCHS, batch_size=32, verbose=0)
    _, acc = model.evaluate(data.x_test, data.y_test, verbose=0)
    if acc <= 0.90:
        raise RuntimeError(f"test accuracy {acc:.4f} is not > 0.90")
    return model, float(acc)


def representative_dataset(x_train: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def gen() -> Iterator[list[np.ndarray]]:
        for i in range(min(N_CALIBRATION, len(x_train))):
            yield [x_train[i : i + 1]]

    return gen


def convert(model: tf.keras.Model, x_train: np.ndarray, io_type: tf.DType | None) -> bytes:
    """Convert ``model``; ``io_type`` None = float model, tf.float32 = int8 internals
    with float I/O, tf.int8/tf.uint8 = full-integer model with that I/O type."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if io_type is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(x_train)
        if io_type != tf.float32:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
    return converter.convert()


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    if not np.issubdtype(detail["dtype"], np.integer):
        return q.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


@dataclass
class TfliteRun:
    probs: np.ndarray  # float32 (N, 10), dequantised
    inp: dict  # interpreter input details
    out: dict  # interpreter output details
    ops: list[str]


def run_tflite(model_bytes: bytes, x: np.ndarray) -> TfliteRun:
    """Run one sample at a time (batch 1) with tf.lite.Interpreter; return float probs."""
    interp = tf.lite.Interpreter(model_content=model_bytes)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    probs = []
    for sample in x:
        interp.set_tensor(inp["index"], quantize(sample[np.newaxis], inp))
        interp.invoke()
        probs.append(dequantize(interp.get_tensor(out["index"]), out)[0])
    # Private API, but handy; drop the XNNPACK DELEGATE nodes added at load time.
    ops = [op["op_name"] for op in interp._get_ops_details() if op["op_name"] != "DELEGATE"]
    return TfliteRun(np.stack(probs), inp, out, ops)


def describe(detail: dict) -> str:
    dtype = np.dtype(detail["dtype"]).name
    scale, zero_point = detail["quantization"]
    quant = f"scale={scale:.8g}, zero_point={zero_point}" if scale else "none"
    shape = detail["shape"].tolist()
    sig = detail["shape_signature"].tolist()
    return f"{dtype}, shape {shape}, shape_signature {sig}, quantization: {quant}"


def describe_disagreements(top1: np.ndarray, keras_probs: np.ndarray) -> str:
    """E.g. ' (differs on sample 32: Keras top-2 probs 0.523/0.477)'."""
    parts = []
    for i in np.flatnonzero(top1 != keras_probs.argmax(1)):
        best, second = np.sort(keras_probs[i])[::-1][:2]
        parts.append(f"sample {i}: Keras top-2 probs {best:.3f}/{second:.3f}")
    return f" (differs on {'; '.join(parts)})" if parts else ""


def write_readme(rows: list[str], accuracy: str) -> None:
    text = f"""# TensorFlow Lite fixtures (digits CNN)

Generated by `scripts/make_tf_fixtures.py` (dev-only; TensorFlow is not a runtime or
test dependency of edged). Regenerate with:

    pip install tensorflow-cpu scikit-learn
    python scripts/make_tf_fixtures.py

Made with TensorFlow {tf.__version__} (Keras {tf.keras.__version__}), NumPy {np.__version__},
Python {platform.python_version()}, via `tf.lite.TFLiteConverter.from_keras_model`.

Model: tiny CNN (Conv2D 8 -> MaxPool -> Conv2D 16 -> Flatten -> Dense 32 -> Dense 10
softmax), trained on `sklearn.datasets.load_digits` (pixels / 16, NHWC (8, 8, 1), split
`train_test_split(test_size=0.25, random_state=0, stratify=y)`).
{accuracy}

- `digits_reference.npz`: `x` float32 (64, 8, 8, 1) in [0, 1] (first 64 test samples),
  `y` int64 (64,) labels, `keras_probs` float32 (64, 10) Keras float model output.
- Quantised models: full-integer quantisation, first {N_CALIBRATION} training samples as
  the representative dataset; weights are int8 per-channel (conv and fully-connected),
  biases int32, activations int8 per-tensor. Quantise inputs as
  `clip(round(x / scale) + zero_point)`, dequantise outputs as `(q - zero_point) * scale`.
- Batch is dynamic: `shape` is batch 1 but `shape_signature` has -1, and Flatten becomes
  SHAPE -> STRIDED_SLICE -> PACK -> RESHAPE, so the output shape is only known after
  running (`resize_tensor_input` to another batch size works in TFLite/LiteRT).

Top-1 agreement is against `keras_probs` on the 64 reference samples, measured with
`tf.lite.Interpreter` (batch 1, quantise/dequantise as above).

{chr(10).join(rows)}
"""
    (OUT_DIR / "README.md").write_text(text)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    data = load_data()
    model, test_acc = train(data)

    x_ref = data.x_test[:N_REFERENCE]
    y_ref = data.y_test[:N_REFERENCE]
    keras_probs = model(x_ref, training=False).numpy().astype(np.float32)
    np.savez_compressed(OUT_DIR / "digits_reference.npz", x=x_ref, y=y_ref, keras_probs=keras_probs)
    keras_top1 = keras_probs.argmax(1)
    accuracy = (
        f"Keras test accuracy {test_acc:.4f} ({len(data.y_test)} samples), "
        f"{int((keras_top1 == y_ref).sum())}/{N_REFERENCE} on the reference samples."
    )
    print(accuracy)

    variants: list[tuple[str, tf.DType | None, str]] = [
        ("digits_float.tflite", None, "float32 model"),
        ("digits_int8_io_int8.tflite", tf.int8, "full-integer, int8 input/output"),
        # TF 2.21 still accepts uint8 I/O: int8 model plus QUANTIZE ops at both ends.
        ("digits_int8_io_uint8.tflite", tf.uint8, "full-integer, uint8 input/output"),
        ("digits_int8_io_float.tflite", tf.float32, "int8 internals, float32 input/output"),
    ]
    rows = []
    for name, io_type, what in variants:
        try:
            model_bytes = convert(model, data.x_train, io_type)
        except Exception as exc:  # report and skip variants the converter refuses
            print(f"{name}: converter refused ({exc}); skipped")
            rows.append(f"- `{name}`: not produced, converter refused: {exc}")
            continue
        (OUT_DIR / name).write_bytes(model_bytes)
        run = run_tflite(model_bytes, x_ref)
        top1 = run.probs.argmax(1)
        agree = int((top1 == keras_top1).sum())
        max_diff = float(np.abs(run.probs - keras_probs).max())
        line = (
            f"- `{name}` ({len(model_bytes)} bytes): {what}.\n"
            f"  - input: {describe(run.inp)}\n"
            f"  - output: {describe(run.out)}\n"
            f"  - ops: {', '.join(run.ops)}\n"
            f"  - top-1 agreement with Keras: {agree}/{N_REFERENCE}"
            f"{describe_disagreements(top1, keras_probs)}; "
            f"max |prob - keras_prob| = {max_diff:.4g}"
        )
        print(line)
        rows.append(line)

    write_readme(rows, accuracy)


if __name__ == "__main__":
    main()
