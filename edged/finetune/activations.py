"""The values of one inner tensor of a bundle's int8 model on raw samples: the input of the
block a fine-tune trains (the FullyConnected op producing the embedding).

The base model runs in its own LiteRT interpreter with `experimental_preserve_all_tensors`
(intermediate tensors are otherwise reused) and without the default XNNPACK delegate (whose
fused ops keep no intermediate tensors); the tensor is read after each invoke and
de-quantised with its scale and zero point. The worker alone uses this: the daemon's engine
and its inference path are untouched. numpy and LiteRT only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edged.errors import ModelError
from edged.input_map import InputMap
from edged.runtime import load_runtime
from edged_formats import Bundle

__all__ = ["tensor_values"]


def tensor_values(
    bundle: Bundle, tensor_name: str, raw: npt.NDArray[Any], *, threads: int = 1
) -> npt.NDArray[np.float32]:
    """The de-quantised values [n, size] of the tensor named `tensor_name` when the bundle's
    model runs on each raw sample of `raw` (batch first, the model's sample shape)."""
    module = load_runtime().module  # LiteRT, else tflite-runtime: both take these options
    try:
        interpreter = module.Interpreter(
            model_content=bundle.model,
            num_threads=threads,
            experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=True,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT refused the base model for its activations ({exc})") from exc
    details = [d for d in interpreter.get_tensor_details() if d["name"] == tensor_name]
    if len(details) != 1:
        raise ModelError(f"the base model has no single tensor named {tensor_name!r}")
    detail = details[0]
    size = int(np.prod(detail["shape"][1:]))
    scale, zero_point = detail["quantization"]
    source = interpreter.get_input_details()[0]
    quant = source["quantization"]
    manifest = bundle.manifest.input
    input_map = InputMap(
        manifest.scale,
        manifest.offset,
        source["dtype"],
        None if quant[0] == 0 else (float(quant[0]), int(quant[1])),
    )
    out = np.empty((len(raw), size), np.float32)
    for i, sample in enumerate(raw):
        input_map.write(sample[None], interpreter.tensor(source["index"])())
        interpreter.invoke()
        values = interpreter.get_tensor(detail["index"]).reshape(-1)
        if scale:
            out[i] = (values.astype(np.float32) - zero_point) * np.float32(scale)
        else:
            out[i] = values
    return out
