"""Re-quantise a FullyConnected op (the classifier head, or the last block that feeds the
embedding) and write it into an int8 .tflite in place.

A fine-tune changes the weight and bias of one or two FullyConnected ops and nothing else:
the head (producing the class output) and, when the bundle allows it, the block producing the
embedding output. `patch_fc` re-quantises the new float weights the way ai-edge-quantizer does
(int8 weights, symmetric per output channel, scale max|w|/127; int32 bias at input scale x
weight scale) and overwrites those tensors' bytes and scales inside the flatbuffer (LiteRT's
own schema, `ai_edge_litert.schema_py_generated`), so every other byte of the model stays
identical: OTA deltas and uploads stay small and no converter is needed. Given `output_range`
(the new outputs' min and max on calibration data) the output tensor's scale and zero point
are re-calibrated the quantizer's way (asymmetric int8, range widened to include 0); without
it they stay as calibrated for the base, and outputs the fine-tune moved outside that range
saturate. The op reading a re-calibrated tensor sees its new scale: patch the block before
the head, whose bias scale depends on it. `patch_head` is `patch_fc` on the class output.

Only numpy and the flatbuffer schema shipped with ai-edge-litert: no torch, no converter, so
this runs on the device (on-device fine-tuning exports through it). `check_changed_only` is
the converse: the provenance check that a candidate is the base with nothing but new weights
in the ops producing the named outputs.

    ValueError
    └── HeadPatchError   a FullyConnected op that cannot be found or rewritten in place
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edged_formats import Manifest

__all__ = [
    "ACTIVATION_BOUNDS",
    "FullyConnected",
    "HeadPatchError",
    "check_changed_only",
    "differs_only_in",
    "fc_outputs",
    "patch_fc",
    "patch_head",
    "read_block",
    "read_fc",
    "read_head",
    "trainable_outputs",
]

_INT8, _INT32 = 9, 2  # tflite TensorType
# The fused activations a trained op may have (tflite's ActivationFunctionType names), as the
# (low, high) clamp each applies; None: unbounded on that side.
ACTIVATION_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "NONE": (None, None),
    "RELU": (0.0, None),
    "RELU6": (0.0, 6.0),
    "RELU_N1_TO_1": (-1.0, 1.0),
}
_INT32_RANGE = (-(2**31), 2**31 - 1)


class HeadPatchError(ValueError):
    """A FullyConnected op (the head or the block) cannot be located or rewritten in place."""


@dataclass(frozen=True)
class FullyConnected:
    """A quantised FullyConnected op as stored in the model: weight [outputs, inputs], bias
    [outputs], one scale per output channel for each (or one for all), the name, scale and
    zero point of its input tensor, and its output's scale and zero point."""

    weight: npt.NDArray[np.int8]
    bias: npt.NDArray[np.int32]
    weight_scale: npt.NDArray[np.float32]
    bias_scale: npt.NDArray[np.float32]
    input_scale: float
    output_scale: float
    output_zero_point: int
    input_name: str = ""
    activation: str = "NONE"

    def dequantised(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The float weight and bias these int8/int32 values stand for."""
        weight = self.weight.astype(np.float32) * _per_row(self.weight_scale, len(self.weight))
        bias = self.bias.astype(np.float32) * self.bias_scale
        return weight.astype(np.float32), bias.astype(np.float32)


@dataclass
class _Views:
    """Writable numpy views into one bytearray holding the model."""

    weight: npt.NDArray[np.int8]
    bias: npt.NDArray[np.int32]
    weight_scale: npt.NDArray[np.float32]
    bias_scale: npt.NDArray[np.float32]
    input_scale: float
    output_scale: npt.NDArray[np.float32]
    output_zero_point: npt.NDArray[np.int64]
    input_name: str
    activation: str

    def op(self) -> FullyConnected:
        return FullyConnected(
            self.weight.copy(),
            self.bias.copy(),
            self.weight_scale.copy(),
            self.bias_scale.copy(),
            self.input_scale,
            float(self.output_scale[0]),
            int(self.output_zero_point[0]),
            self.input_name,
            self.activation,
        )


def read_fc(model: bytes, output_name: str) -> FullyConnected:
    """The quantised FullyConnected op that produces output `output_name`."""
    return _locate(bytearray(model), output_name).op()


def read_block(model: bytes, block_output: str, class_output: str) -> FullyConnected:
    """The trainable last block: the FullyConnected op producing `block_output`, which the
    head (the op producing `class_output`) must read directly, so that training the two
    composed is training what the model computes."""
    block = read_fc(model, block_output)
    head = read_fc(model, class_output)
    if head.input_name != block_output:
        raise HeadPatchError(f"the head reads {head.input_name!r}, not the block's output")
    return block


def read_head(model: bytes, output_name: str) -> FullyConnected:
    """The quantised head: the FullyConnected op that produces output `output_name`."""
    return read_fc(model, output_name)


def patch_head(
    model: bytes,
    output_name: str,
    weight: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
    *,
    logit_range: tuple[float, float] | None = None,
) -> bytes:
    """`patch_fc` on the head producing the class output `output_name`."""
    return patch_fc(model, output_name, weight, bias, output_range=logit_range)


def patch_fc(
    model: bytes,
    output_name: str,
    weight: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
    *,
    output_range: tuple[float, float] | None = None,
) -> bytes:
    """`model` with the FullyConnected op producing `output_name` re-quantised from the
    float `weight` [outputs, inputs] and `bias` [outputs] (and its output re-calibrated to
    `output_range` when given); every byte outside those tensors' data and quantisation is
    unchanged."""
    buffer = bytearray(model)
    views = _locate(buffer, output_name)
    classes, size = views.weight.shape
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weight.shape != (classes, size) or bias.shape != (classes,):
        raise HeadPatchError(
            f"{output_name!r}'s op has weight {list(weight.shape)} and bias "
            f"{list(bias.shape)}, the model expects [{classes}, {size}] and [{classes}]"
        )
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
        raise HeadPatchError(f"{output_name!r}'s op has non-finite weights")
    per_channel = len(views.weight_scale) == classes
    peak = np.abs(weight).max(axis=1) if per_channel else np.abs(weight).max(keepdims=True)
    # An all-zero row keeps its old scale: any scale represents zeros, and the bias needs one.
    weight_scale = np.where(peak > 0, peak / np.float32(127), views.weight_scale)
    weight_scale = weight_scale.astype(np.float32)
    bias_scale = (np.float32(views.input_scale) * _per_row(weight_scale, classes)[:, 0]).astype(
        np.float32
    )
    quantised = np.clip(np.rint(weight / _per_row(weight_scale, classes)), -127, 127)
    bias_q = np.rint(bias / bias_scale)  # in float32, as the quantizer rounds
    if bias_q.min() < _INT32_RANGE[0] or bias_q.max() > _INT32_RANGE[1]:
        raise HeadPatchError(f"{output_name!r}'s bias does not fit int32 at the new scale")
    views.weight[...] = quantised.astype(np.int8)
    views.bias[...] = bias_q.astype(np.int32)
    views.weight_scale[...] = weight_scale
    views.bias_scale[...] = bias_scale
    if output_range is not None:
        views.output_scale[...], views.output_zero_point[...] = _asymmetric(*output_range)
    patched = bytes(buffer)
    check = read_fc(patched, output_name)
    if not (
        np.array_equal(check.weight, quantised.astype(np.int8))
        and np.array_equal(check.bias_scale, bias_scale)
    ):
        raise HeadPatchError("the tensors did not read back as written")  # pragma: no cover
    return patched


def check_changed_only(
    base_model: bytes, candidate_model: bytes, output_names: Sequence[str]
) -> None:
    """Raise HeadPatchError unless `candidate_model` equals `base_model` byte for byte except
    the weight and bias data, and the weight, bias and output quantisation parameters, of the
    FullyConnected ops producing `output_names`: the candidate's raw values of those ops are
    written into a copy of the base, which must then be the candidate exactly."""
    if len(candidate_model) != len(base_model):
        raise HeadPatchError(
            f"the candidate model is {len(candidate_model)} bytes, the base {len(base_model)}"
        )
    buffer = bytearray(base_model)
    for name in output_names:
        what = "head" if len(output_names) == 1 else f"op producing {name!r}"
        try:
            op = read_fc(candidate_model, name)
        except HeadPatchError as exc:
            raise HeadPatchError(f"the candidate's {what} cannot be read ({exc})") from exc
        views = _locate(buffer, name)
        for part, ours, theirs in (
            ("weight", views.weight, op.weight),
            ("weight scale", views.weight_scale, op.weight_scale),
            ("bias scale", views.bias_scale, op.bias_scale),
        ):
            if ours.shape != theirs.shape:
                raise HeadPatchError(
                    f"the candidate's {what} {part} has shape {list(theirs.shape)}, the base's "
                    f"{list(ours.shape)}"
                )
        views.weight[...] = op.weight
        views.bias[...] = op.bias
        views.weight_scale[...] = op.weight_scale
        views.bias_scale[...] = op.bias_scale
        views.output_scale[...] = op.output_scale
        views.output_zero_point[...] = op.output_zero_point
    if bytes(buffer) != candidate_model:
        diff = np.frombuffer(bytes(buffer), np.uint8) != np.frombuffer(candidate_model, np.uint8)
        first = int(np.flatnonzero(diff)[0])
        where = "the head" if len(output_names) == 1 else "the trained ops"
        raise HeadPatchError(
            f"the candidate differs from the base at byte {first}, outside {where}"
        )


def trainable_outputs(manifest: Manifest) -> tuple[str, ...]:
    """The outputs whose producing ops a fine-tune of this bundle may change: the class
    output's (the head) and, when the manifest allows a block, the embedding's."""
    names = (manifest.output.name,)
    return names if manifest.block is None else (*names, manifest.block.output)


def differs_only_in(base_model: bytes, candidate_model: bytes, output_names: Sequence[str]) -> bool:
    """Whether `candidate_model` is `base_model` with nothing changed but the ops producing
    `output_names` (see `check_changed_only`, which says why not)."""
    try:
        check_changed_only(base_model, candidate_model, output_names)
    except HeadPatchError:
        return False
    return True


def _asymmetric(low: float, high: float) -> tuple[np.float32, np.int64]:
    """int8 scale and zero point for values in [low, high], as ai-edge-quantizer derives them
    for activations (the range always includes 0)."""
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise HeadPatchError(f"logit range [{low}, {high}] is not a finite interval")
    bound_min, bound_max = min(low, 0.0), max(high, 0.0)
    scale = np.float32(max(bound_max - bound_min, 1e-9) / 255.0)
    zero_point = np.int64(np.clip(np.rint(-128 - bound_min / scale), -128, 127))
    return scale, zero_point


def _per_row(scale: npt.NDArray[np.float32], rows: int) -> npt.NDArray[np.float32]:
    return np.broadcast_to(scale.reshape(-1, 1), (rows, 1)).astype(np.float32)


def _locate(buffer: bytearray, output_name: str) -> _Views:
    from ai_edge_litert import schema_py_generated as schema

    if len(buffer) < 8 or buffer[4:8] != b"TFL3":
        raise HeadPatchError("model is not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAs(buffer, 0)
    graph = model.Subgraphs(0)
    op, inputs, output = _head_op(schema, model, graph, output_name)
    source, weight_t, bias_t, output_t = (graph.Tensors(i) for i in (*inputs[:3], output))
    _check_private(model, graph, (inputs[1], inputs[2]))
    shape = tuple(_ints(weight_t.ShapeAsNumpy()))
    if weight_t.Type() != _INT8 or len(shape) != 2:
        raise HeadPatchError(f"{output_name!r}'s op weight is not a 2-D int8 tensor")
    if bias_t.Type() != _INT32 or tuple(_ints(bias_t.ShapeAsNumpy())) != (shape[0],):
        raise HeadPatchError(
            f"{output_name!r}'s op bias is not an int32 vector, one value per output channel"
        )
    if output_t.Type() != _INT8:
        raise HeadPatchError(f"{output_name!r} is not an int8 tensor")
    weight_q, bias_q, source_q, output_q = (
        t.Quantization() for t in (weight_t, bias_t, source, output_t)
    )
    for q, what, scales in (
        (source_q, "input", (1,)),
        (output_q, "output", (1,)),
        (weight_q, "weight", (1, shape[0])),
        (bias_q, "bias", (shape[0],)),
    ):
        if q is None or q.ScaleLength() not in scales:
            raise HeadPatchError(
                f"{output_name!r}'s op {what} is not quantised per tensor or per channel"
            )
    for q in (weight_q, bias_q):
        if q.ZeroPointLength() and np.any(q.ZeroPointAsNumpy() != 0):
            raise HeadPatchError(
                f"{output_name!r}'s op is not symmetrically quantised (zero point != 0)"
            )
    if output_q.ZeroPointLength() != 1:
        raise HeadPatchError(f"{output_name!r} has no single zero point")
    return _Views(
        weight=_data(model, buffer, weight_t.Buffer(), np.int8).reshape(shape),
        bias=_data(model, buffer, bias_t.Buffer(), np.dtype("<i4")),
        weight_scale=weight_q.ScaleAsNumpy(),
        bias_scale=bias_q.ScaleAsNumpy(),
        input_scale=float(source_q.ScaleAsNumpy()[0]),
        output_scale=output_q.ScaleAsNumpy(),
        output_zero_point=output_q.ZeroPointAsNumpy(),
        input_name=source.Name().decode(),
        activation=_activation(schema, op),
    )


def _head_op(schema: Any, model: Any, graph: Any, output_name: str) -> tuple[Any, list[int], int]:
    """The FullyConnected op producing the named output, its input tensor indices, and the
    output's own index."""
    outputs = [graph.Outputs(i) for i in range(graph.OutputsLength())]
    named = [t for t in outputs if graph.Tensors(t).Name().decode() == output_name]
    if not named:
        raise HeadPatchError(f"model has no output named {output_name!r}")
    producers = [
        graph.Operators(i)
        for i in range(graph.OperatorsLength())
        if named[0] in _ints(graph.Operators(i).OutputsAsNumpy())
    ]
    if len(producers) != 1:
        raise HeadPatchError(f"output {output_name!r} is not produced by exactly one operator")
    code = model.OperatorCodes(producers[0].OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin != schema.BuiltinOperator.FULLY_CONNECTED:
        raise HeadPatchError(f"output {output_name!r} is not produced by a FullyConnected op")
    inputs = _ints(producers[0].InputsAsNumpy())
    if len(inputs) < 3 or inputs[2] < 0:
        raise HeadPatchError(f"{output_name!r}'s FullyConnected op has no bias")
    return producers[0], inputs, named[0]


def _activation(schema: Any, op: Any) -> str:
    """The op's fused activation by its schema name (NONE, RELU, RELU6, ...)."""
    table = op.BuiltinOptions()
    if table is None:
        return "NONE"
    options = schema.FullyConnectedOptions()
    options.Init(table.Bytes, table.Pos)
    code = options.FusedActivationFunction()
    names = {v: k for k, v in vars(schema.ActivationFunctionType).items() if k.isupper()}
    return names.get(code, str(code))


def fc_outputs(
    inputs: npt.NDArray[np.floating[Any]],
    weight: npt.NDArray[np.floating[Any]],
    bias: npt.NDArray[np.floating[Any]],
    activation: str,
) -> npt.NDArray[np.float32]:
    """What a float FullyConnected op with this fused activation computes on `inputs`."""
    if activation not in ACTIVATION_BOUNDS:
        raise HeadPatchError(f"fused activation {activation} is not supported")
    values = np.asarray(inputs, np.float32) @ np.asarray(weight, np.float32).T + bias
    low, high = ACTIVATION_BOUNDS[activation]
    if low is not None or high is not None:
        values = np.clip(values, low, high)
    return values.astype(np.float32)


def _check_private(model: Any, graph: Any, tensors: tuple[int, int]) -> None:
    """Neither head tensor's buffer may be shared with any other tensor of the model, or the
    in-place write would change another op too."""
    mine = {graph.Tensors(t).Buffer() for t in tensors}
    for g in range(model.SubgraphsLength()):
        sub = model.Subgraphs(g)
        for t in range(sub.TensorsLength()):
            if (g, t) not in {(0, tensors[0]), (0, tensors[1])} and sub.Tensors(t).Buffer() in mine:
                raise HeadPatchError("the op's weights share a buffer with another tensor")


def _data(model: Any, buffer: bytearray, index: int, dtype: Any) -> Any:
    """A writable view of a buffer's bytes, inline in the flatbuffer or appended after it."""
    record = model.Buffers(index)
    dtype = np.dtype(dtype)
    if record.DataLength():
        data = record.DataAsNumpy()  # a view into `buffer` (a bytearray), so writable
        return data.view(dtype)
    offset, size = int(record.Offset()), int(record.Size())
    if offset <= 1 or size % dtype.itemsize or offset + size > len(buffer):
        raise HeadPatchError(f"buffer {index} has no data inside the model")
    return np.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize, offset=offset)


def _ints(values: Any) -> list[int]:
    """A flatbuffer int vector as a list (the generated code returns 0 for an empty one)."""
    return [] if isinstance(values, int) else [int(v) for v in values]
