"""The fused preprocessing + quantisation map: every fast path equals the plain formula."""

from __future__ import annotations

import numpy as np
import pytest

from edged.input_map import InputMap

RNG = np.random.default_rng(0)


def reference(raw: np.ndarray, scale: float, offset: float, dtype, quant) -> np.ndarray:
    """The definition: float input, then the tensor's own quantisation."""
    value = raw.astype(np.float64) * scale + offset
    if quant is None:
        return value.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(value / quant[0] + quant[1]), info.min, info.max).astype(dtype)


@pytest.mark.parametrize(
    ("raw_dtype", "scale", "offset", "tensor_dtype", "quant", "strategy"),
    [
        # uint8 pixels into an int8 tensor with matching scale: a byte shift (MobileNet case)
        (np.uint8, 1 / 127.5, -1.0, np.int8, (1 / 127.5, 0), "shift"),
        (np.uint8, 1 / 255, 0.0, np.int8, (1 / 255, -128), "shift"),
        # digits: 0..16 into int8 with its own scale: a pair table
        (np.uint8, 1 / 16, 0.0, np.int8, (0.0181, -4), "pairs"),
        (np.int8, 0.5, 3.0, np.uint8, (0.37, 10), "pairs"),
        # 8-bit raw into a float tensor: a 256-entry table
        (np.uint8, 1 / 255, 0.0, np.float32, None, "table"),
        # float raw: copy when the map is the identity, else the formula
        (np.float32, 1.0, 0.0, np.float32, None, "copy"),
        (np.float32, 2.0, -1.0, np.int8, (0.05, 3), "affine"),
    ],
)
def test_every_path_equals_the_formula(
    raw_dtype, scale, offset, tensor_dtype, quant, strategy
) -> None:
    """Whatever path is chosen, the tensor holds the quantised preprocessed value."""
    info = np.iinfo(raw_dtype) if np.dtype(raw_dtype).kind in "iu" else None
    if info is not None:
        raw = RNG.integers(info.min, info.max + 1, size=(3, 7, 5, 3)).astype(raw_dtype)
    else:
        raw = RNG.normal(size=(3, 7, 5, 3)).astype(raw_dtype)
    mapping = InputMap(scale, offset, tensor_dtype, quant)
    assert mapping.strategy(raw_dtype) == strategy
    got = mapping.convert(raw).astype(np.float64)
    want = reference(raw, scale, offset, tensor_dtype, quant).astype(np.float64)
    if strategy == "shift":
        # exact but for .5 ties, which float rounding cannot decide either
        assert np.max(np.abs(got - want)) <= 1
        assert np.mean(got == want) > 0.4
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_pair_table_handles_odd_sizes_and_strided_input() -> None:
    """Odd byte counts fall back to the byte table; non-contiguous input is copied first."""
    mapping = InputMap(1 / 16, 0.0, np.int8, (0.0181, -4))
    raw = RNG.integers(0, 17, size=(1, 3, 3, 1)).astype(np.uint8)  # 9 bytes
    np.testing.assert_array_equal(
        mapping.convert(raw), reference(raw, 1 / 16, 0.0, np.int8, (0.0181, -4))
    )
    wide = RNG.integers(0, 17, size=(1, 8, 16, 1)).astype(np.uint8)
    strided = wide[:, :, ::2]
    np.testing.assert_array_equal(
        mapping.convert(strided), reference(strided, 1 / 16, 0.0, np.int8, (0.0181, -4))
    )


def test_clipping_rules_out_the_shift() -> None:
    """When the map saturates, a wrapping shift would be wrong, so a table is used."""
    mapping = InputMap(2 / 255, 0.0, np.int8, (1 / 255, -128))
    assert mapping.strategy(np.uint8) == "pairs"
    raw = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(
        mapping.convert(raw), reference(raw, 2 / 255, 0.0, np.int8, (1 / 255, -128))
    )
