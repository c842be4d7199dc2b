"""The inference engine: one bundle served by a LiteRT interpreter, hot-swappable.

Raw samples go in (what the source produced, e.g. uint8 pixels); probabilities and, when the
bundle names one, embeddings come out as float32. Preprocessing (`raw * scale + offset`) and the
input tensor's quantisation are folded into one affine map, applied through a 256-entry lookup
table when raw samples are 8-bit, and written straight into the interpreter's input buffer.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edged.errors import InputError, ModelError, ModelMismatch
from edged.input_map import InputMap
from edged.runtime import Runtime, RuntimeName, load_runtime
from edged_formats import Bundle, BundleLimits, FormatError, Manifest, read_bundle

__all__ = ["Engine", "EngineOptions", "Prediction", "open_bundle"]

FloatArray = npt.NDArray[np.float32]


def open_bundle(path: str | Path, limits: BundleLimits | None = None) -> Bundle:
    """Read and check a bundle file; ModelError naming the file if it is refused."""
    limits = limits or BundleLimits()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_total_bytes:
            raise ModelError(f"{path}: bundle is {size} bytes, over the configured limit")
        return read_bundle(path.read_bytes(), limits)
    except FormatError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the bundle ({exc.strerror})") from exc


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How the interpreter runs. `max_batch` > 1 enables batched invokes where the model
    allows its batch dimension to be resized."""

    runtime: RuntimeName = "auto"
    num_threads: int = 1
    xnnpack: bool = True
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.num_threads <= 64:
            raise ValueError("num_threads must be between 1 and 64")
        if not 1 <= self.max_batch <= 1024:
            raise ValueError("max_batch must be between 1 and 1024")


@dataclass(frozen=True, slots=True)
class Prediction:
    """Outputs for a batch of samples, and which model version produced them."""

    probabilities: FloatArray
    embeddings: FloatArray | None
    model_version: str

    @property
    def top1(self) -> npt.NDArray[np.intp]:
        return np.argmax(self.probabilities, axis=1)

    @property
    def confidence(self) -> FloatArray:
        return np.max(self.probabilities, axis=1)


@dataclass(frozen=True, slots=True)
class _Quant:
    scale: float
    zero_point: int


def _quant_of(detail: dict[str, Any]) -> _Quant | None:
    if detail["dtype"] == np.float32:
        return None
    scale, zero_point = detail["quantization"]
    if scale == 0:
        raise ModelMismatch(f"tensor '{detail['name']}' is integer but not quantised")
    return _Quant(float(scale), int(zero_point))


class _Session:
    """One interpreter at one batch size, with its tensor indices and quantisation."""

    def __init__(
        self, runtime: Runtime, model: bytes, manifest: Manifest, batch: int, options: EngineOptions
    ) -> None:
        self.interpreter = runtime.interpreter(
            model, num_threads=options.num_threads, xnnpack=options.xnnpack
        )
        self.batch = batch
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelMismatch(f"the model has {len(inputs)} inputs; edged serves one")
        self.input = inputs[0]
        outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        self.output = _find_output(outputs, manifest.output.name, "output")
        self.embedding = (
            _find_output(outputs, manifest.embedding.name, "embedding")
            if manifest.embedding
            else None
        )
        if batch != 1:
            shape = [batch, *self.input["shape"][1:]]
            self.interpreter.resize_tensor_input(self.input["index"], shape, strict=False)
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
        self.input_quant = _quant_of(self.input)
        self.output_quant = _quant_of(self.output)
        self.embedding_quant = _quant_of(self.embedding) if self.embedding else None


def _find_output(outputs: dict[str, dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    if name not in outputs:
        raise ModelMismatch(
            f"manifest {what} '{name}' is not an output of the model (it has "
            f"{', '.join(sorted(outputs))})"
        )
    return outputs[name]


def _check_tensors(session: _Session, manifest: Manifest) -> None:
    """Refuse a manifest that disagrees with the model's own tensors."""
    if session.input["name"] != manifest.input.name:
        raise ModelMismatch(
            f"manifest input '{manifest.input.name}' is not the model's input "
            f"'{session.input['name']}'"
        )
    checks = [
        ("input", session.input, manifest.input.shape, manifest.input.dtype),
        ("output", session.output, manifest.output.shape, manifest.output.dtype),
    ]
    for what, detail, shape, dtype in checks:
        actual_shape = [int(d) for d in detail["shape"]]
        if actual_shape != list(shape):
            raise ModelMismatch(
                f"manifest {what} shape {list(shape)} disagrees with the model's {actual_shape}"
            )
        actual_dtype = np.dtype(detail["dtype"]).name
        if actual_dtype != dtype:
            raise ModelMismatch(
                f"manifest {what} dtype {dtype} disagrees with the model's {actual_dtype}"
            )
    if manifest.embedding and session.embedding is not None:
        size = int(np.prod(session.embedding["shape"][1:]))
        if size != manifest.embedding.size:
            raise ModelMismatch(
                f"manifest embedding size {manifest.embedding.size} disagrees with the "
                f"model's {size}"
            )


class _LoadedModel:
    """A bundle made servable: sessions, the fused input map and the output decoding."""

    def __init__(self, bundle: Bundle, runtime: Runtime, options: EngineOptions) -> None:
        # Keep only what serving needs: not the fine-tuning head, not the archive.
        self.manifest = bundle.manifest
        self.model = bundle.model
        self.labels = bundle.labels
        self.canary_inputs = bundle.canary_inputs
        self.runtime = runtime
        self.options = options
        self.single = _Session(runtime, self.model, self.manifest, 1, options)
        _check_tensors(self.single, self.manifest)
        self._batched: _Session | None = None
        self._batching_failed = options.max_batch == 1
        self.sample_shape = tuple(int(d) for d in self.single.input["shape"][1:])
        quant = self.single.input_quant
        self.input_map = InputMap(
            self.manifest.input.scale,
            self.manifest.input.offset,
            self.single.input["dtype"],
            None if quant is None else (quant.scale, quant.zero_point),
        )

    @property
    def version(self) -> str:
        return self.manifest.version

    def _write_input(self, session: _Session, raw: npt.NDArray[Any]) -> None:
        self.input_map.write(raw, session.interpreter.tensor(session.input["index"])())

    def _read(
        self, session: _Session, detail: dict[str, Any], quant: _Quant | None, count: int
    ) -> FloatArray:
        values = session.interpreter.get_tensor(detail["index"])[:count]
        values = values.reshape(count, -1)
        if quant is None:
            return values.astype(np.float32, copy=False)
        return ((values.astype(np.float32) - quant.zero_point) * quant.scale).astype(np.float32)

    def _invoke(
        self, session: _Session, raw: npt.NDArray[Any]
    ) -> tuple[FloatArray, FloatArray | None]:
        self._write_input(session, raw)
        session.interpreter.invoke()
        count = raw.shape[0]
        scores = self._read(session, session.output, session.output_quant, count)
        embeddings = (
            self._read(session, session.embedding, session.embedding_quant, count)
            if session.embedding is not None
            else None
        )
        return scores, embeddings

    def _batched_session(self) -> _Session | None:
        if self._batched is None and not self._batching_failed:
            try:
                self._batched = _Session(
                    self.runtime,
                    self.model,
                    self.manifest,
                    self.options.max_batch,
                    self.options,
                )
                self._check_batching(self._batched)
            except (ModelError, ValueError, RuntimeError):
                self._batched, self._batching_failed = None, True
        return self._batched

    def _check_batching(self, batched: _Session) -> None:
        """A resized model must give the same answers as the batch-1 one, or we don't use it."""
        canaries = self.canary_inputs[: self.options.max_batch]
        padded = np.resize(canaries, (self.options.max_batch, *self.sample_shape))
        batch_scores, _ = self._invoke(batched, padded.astype(canaries.dtype))
        for i, sample in enumerate(canaries):
            single, _ = self._invoke(self.single, sample[None])
            if not np.allclose(single[0], batch_scores[i], atol=1e-5):
                raise ModelError("batched results differ from single-sample results")

    def predict(self, raw: npt.NDArray[Any]) -> Prediction:
        if raw.shape[1:] != self.sample_shape:
            raise InputError(
                f"input shape {list(raw.shape[1:])} does not match the model's sample shape "
                f"{list(self.sample_shape)}"
            )
        if raw.dtype.kind not in "iuf":
            raise InputError(f"input dtype {raw.dtype} is not numeric")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise InputError("input holds NaN or infinite values")
        count = raw.shape[0]
        if count == 0:
            classes = self.manifest.output.num_classes
            size = self.manifest.embedding.size if self.manifest.embedding else None
            return Prediction(
                np.zeros((0, classes), np.float32),
                None if size is None else np.zeros((0, size), np.float32),
                self.manifest.version,
            )
        batched = self._batched_session() if count > 1 else None
        if batched is None:
            parts = [self._invoke(self.single, raw[i : i + 1]) for i in range(count)]
        else:
            parts = []
            step = batched.batch
            for start in range(0, count, step):
                chunk = raw[start : start + step]
                if len(chunk) == step:
                    parts.append(self._invoke(batched, chunk))
                else:
                    parts.extend(self._invoke(self.single, s[None]) for s in chunk)
        scores = parts[0][0] if count == 1 else np.concatenate([p[0] for p in parts])
        embeddings = None
        if parts and parts[0][1] is not None:
            embeddings = (
                parts[0][1]
                if count == 1
                else np.concatenate([p[1] for p in parts if p[1] is not None])
            )
        if self.manifest.output.kind == "logits":
            scores = _softmax(scores)
        return Prediction(scores, embeddings, self.manifest.version)


def _release_freed_heap() -> None:
    """glibc keeps freed heap pages (a multi-MB bundle read) in the process; hand them back so
    a loaded model's idle RSS is what it uses. A no-op where malloc_trim does not exist."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _softmax(logits: FloatArray) -> FloatArray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


class Engine:
    """Serves one bundle at a time; `swap` replaces it between two invokes.

    Thread-safe: invokes are serialised, and a swap prepares the new model (load, checks,
    warm-up) before taking the lock, so in-flight work finishes on the old model."""

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.runtime = load_runtime(self.options.runtime)
        self._lock = threading.Lock()
        self._model = self._prepare(bundle)

    @classmethod
    def from_file(cls, path: str | Path, options: EngineOptions | None = None) -> Engine:
        engine = cls(open_bundle(path), options)
        _release_freed_heap()  # the archive bytes are gone; give their pages back
        return engine

    def _prepare(self, bundle: Bundle) -> _LoadedModel:
        model = _LoadedModel(bundle, self.runtime, self.options)
        model.predict(model.canary_inputs[:1])  # warm-up: first real inference
        return model

    @property
    def manifest(self) -> Manifest:
        return self._model.manifest

    @property
    def labels(self) -> tuple[str, ...]:
        return self._model.labels

    @property
    def canary_inputs(self) -> npt.NDArray[Any]:
        return self._model.canary_inputs

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._model.sample_shape

    def predict(self, raw: npt.NDArray[Any]) -> Prediction:
        """Run a batch of raw samples (first axis is the batch)."""
        with self._lock:
            return self._model.predict(np.asarray(raw))

    def canary_agreement(self) -> float:
        """Share of the bundle's canaries whose top-1 matches the manifest: the health check.
        Inputs, expectations and model are taken together, so a concurrent swap cannot mix
        one version's canaries with another's."""
        with self._lock:
            model = self._model
            top1 = model.predict(model.canary_inputs).top1
        expected = np.asarray(model.manifest.canaries.expected_top1)
        return float(np.mean(top1 == expected))

    def swap(self, bundle: Bundle) -> str:
        """Serve `bundle` from the next invoke on; returns the version it replaced."""
        model = self._prepare(bundle)
        with self._lock:
            previous_version, self._model = self._model.version, model
        _release_freed_heap()  # the old model's interpreter and buffers
        return previous_version
