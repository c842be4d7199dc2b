"""Raw samples -> input tensor values: `raw * scale + offset`, then the tensor's quantisation,
folded into one affine map `q = rint(raw * a + b)` (clipped to the tensor dtype).

For 8-bit raw samples the map is a function of 256 bit patterns, so it never computes per
element. Fastest first:
- a wrapping byte shift, when the map is `raw + c` (uint8 pixels into an int8 tensor whose
  scale matches the preprocessing: the MobileNet case), exact but for ties at .5 that float
  rounding cannot decide anyway;
- a 65,536-entry table over byte pairs (128 KB), when the tensor is 8-bit as well;
- a 256-entry table otherwise.
Pure numpy: no interpreter, no I/O.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["InputMap"]

_TIE_TOLERANCE = 1e-3


class InputMap:
    """Writes raw samples into an input tensor buffer of `tensor_dtype`."""

    def __init__(
        self,
        scale: float,
        offset: float,
        tensor_dtype: npt.DTypeLike,
        quant: tuple[float, int] | None,
    ) -> None:
        self.tensor_dtype = np.dtype(tensor_dtype)
        if quant is None:
            self.a, self.b = scale, offset
        else:
            self.a, self.b = scale / quant[0], offset / quant[0] + quant[1]
        self._byte_writers: dict[np.dtype[Any], Any] = {}
        self._byte_tables: dict[np.dtype[Any], npt.NDArray[Any]] = {}

    def strategy(self, raw_dtype: npt.DTypeLike) -> str:
        """Which path samples of `raw_dtype` take: shift, pairs, table, copy or affine."""
        raw_dtype = np.dtype(raw_dtype)
        if raw_dtype.itemsize == 1 and raw_dtype.kind in "iu":
            return str(self._byte_writer(raw_dtype)[0])
        if self.tensor_dtype.kind == "f" and (self.a, self.b) == (1.0, 0.0):
            return "copy"
        return "affine"

    def convert(self, raw: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The tensor values for `raw`, as a new array."""
        target = np.empty(raw.shape, self.tensor_dtype)
        self.write(raw, target)
        return target

    def write(self, raw: npt.NDArray[Any], target: npt.NDArray[Any]) -> None:
        """Fill `target` (same shape, the tensor's dtype, C-contiguous) from `raw`."""
        if raw.dtype.itemsize == 1 and raw.dtype.kind in "iu":
            kind, table = self._byte_writer(raw.dtype)
            flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
            out = target.reshape(-1)
            if kind == "shift":
                np.add(flat, table, out=out.view(np.uint8))
            elif kind == "pairs" and flat.size % 2 == 0:
                np.take(table, flat.view(np.uint16), out=out.view(np.uint16))
            else:
                np.take(self._byte_tables[raw.dtype], flat, out=out)
        elif self.strategy(raw.dtype) == "copy":
            target[...] = raw
        else:
            target[...] = self._to_tensor(raw * self.a + self.b)

    def _to_tensor(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self.tensor_dtype.kind == "f":
            return values.astype(self.tensor_dtype)
        info = np.iinfo(self.tensor_dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(self.tensor_dtype)

    def _exact(self, raw_dtype: np.dtype[Any]) -> npt.NDArray[np.float64]:
        """The unrounded map of every 8-bit raw value, indexed by its bit pattern."""
        values = np.arange(256, dtype=np.uint8).view(raw_dtype).astype(np.float64)
        return values * self.a + self.b

    def _table(self, raw_dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        return self._to_tensor(self._exact(raw_dtype))

    def _byte_writer(self, raw_dtype: np.dtype[Any]) -> tuple[str, Any]:
        cached = self._byte_writers.get(raw_dtype)
        if cached is None:
            cached = self._choose_byte_writer(raw_dtype)
            self._byte_writers[raw_dtype] = cached
        return cached

    def _choose_byte_writer(self, raw_dtype: np.dtype[Any]) -> tuple[str, Any]:
        table = self._byte_tables[raw_dtype] = self._table(raw_dtype)
        if self.tensor_dtype.itemsize != 1:
            return "table", table
        bits = table.view(np.uint8).astype(np.int64)
        shift = int(bits[0])
        shifted = (np.arange(256) + shift) % 256
        differs = shifted != bits
        if differs.any():
            as_tensor = shifted.astype(np.uint8).view(self.tensor_dtype).astype(np.int64)
            off_by_one = np.abs(as_tensor - table.astype(np.int64)) == 1
            exact = self._exact(raw_dtype)
            at_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < _TIE_TOLERANCE
            if not np.all(off_by_one[differs] & at_tie[differs]) and sys.byteorder == "little":
                low, high = np.meshgrid(bits, bits, indexing="xy")
                pairs = (low | (high << 8)).astype(np.uint16).reshape(-1)
                return "pairs", pairs
            if not np.all(off_by_one[differs] & at_tie[differs]):
                return "table", table
        return "shift", np.uint8(shift)
