"""torch module -> float .tflite (litert-torch) -> static int8 .tflite (ai-edge-quantizer)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from control_plane.errors import ToolchainError

__all__ = ["ConversionError", "export_float", "quantize_int8"]


class ConversionError(ToolchainError):
    """The official toolchain could not convert or quantise a model."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The toolchain prints progress bars and warns about its own internals (torch
    deprecations it has not caught up with); keep our commands' output readable."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def export_float(module: torch.nn.Module, sample_input: torch.Tensor) -> bytes:
    """The module as a float32 .tflite, one input, outputs in the module's return order."""
    import litert_torch

    module = module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.tflite"
        try:
            with _quiet():
                litert_torch.convert(module, (sample_input,)).export(os.fspath(path))
        except Exception as exc:  # the converter raises bare Exceptions of many kinds
            raise ConversionError(f"litert-torch could not convert the module: {exc}") from exc
        return path.read_bytes()


def quantize_int8(float_model: bytes, calibration: npt.NDArray[np.float32]) -> bytes:
    """Static int8 weights and activations, int8 input and outputs, calibrated on samples
    shaped like the model input (batch 1 each, already preprocessed).

    Activation ranges are the true min/max over the calibration set (as TensorFlow's own
    converter does), not the quantizer's default moving average, which clips wide-swinging
    channels: on the sensor model that cost 5 points of int8/torch agreement."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    signatures = Interpreter(model_content=float_model).get_signature_list()
    if len(signatures) != 1:
        raise ConversionError(f"expected one signature, found {len(signatures)}")
    ((signature, io_names),) = signatures.items()
    (input_name,) = io_names["inputs"]
    samples = [{input_name: sample[None].astype(np.float32)} for sample in calibration]
    try:
        with _quiet():
            manager = recipe_manager.RecipeManager()
            manager.load_quantization_recipe(recipe.static_wi8_ai8())
            ranges = calibrator.Calibrator(
                bytes(float_model), qsv_update_func=qsv_utils.min_max_update
            )
            ranges.calibrate({signature: samples}, manager)
            quant = quantizer.Quantizer(bytearray(float_model))
            quant.load_quantization_recipe(recipe.static_wi8_ai8())
            result = quant.quantize(ranges.get_model_qsvs())
    except Exception as exc:  # the quantizer raises bare Exceptions of many kinds
        raise ConversionError(f"ai-edge-quantizer could not quantise the model: {exc}") from exc
    if result.quantized_model is None:
        raise ConversionError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)
