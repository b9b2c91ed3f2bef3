"""FP8 checkpoints (DeepSeek-V3 / Qwen FP8 releases), dequantized as their rows are read.

Such a checkpoint stores a 2-D weight W as F8_E4M3 or F8_E5M2 together with
`<name>_scale_inv`, one float scale per block of `weight_block_size` (config.json
`quantization_config.weight_block_size`, default 128 x 128) rows x columns; the value is
W[r, c] * scale_inv[r // 128, c // 128], computed in float32 (as their own dequantization
kernels and transformers' do). Opening such a model replaces each FP8 weight by an
`Fp8Handle`, whose rows are decoded and scaled block by block (memory: the block's bytes and
the few scale rows it spans), and drops the scale tensors, which are no outputs. The handle
reads as BF16, the dtype the planner then writes unless the recipe says otherwise, and, like
a LoRA handle, has no raw storage: the engine's CPU and device paths both read its float32
rows through `read_rows` here, the one place FP8 is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..dtypes import FP8_TYPES, fp8_to_float32, is_float_st
from ..errors import CheckpointError
from ..workspace import thread_buffer
from .blocks import block_shape, nonfinite_error, read_raw, read_rows as read_float_rows, row_elems
from .safetensors_header import TensorSize, _q

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
READ_AS = "BF16"  # the dtype an FP8 weight is merged and written as by default


@dataclass(frozen=True)
class Fp8Handle(TensorSize):
    """An FP8 weight and its block scales, read as float32 rows (see the module docstring).
    Small and picklable like `TensorHandle`; `weight` and `scale` are TensorHandles."""

    name: str
    weight: object  # the F8_E4M3 / F8_E5M2 tensor
    scale: object  # its `_scale_inv`: (ceil(rows / block[0]), ceil(cols / block[1])) floats
    block: tuple[int, int]
    check_finite: bool = True  # as TensorHandle's: NaN/Inf after scaling is refused
    dtype: ClassVar[str] = READ_AS
    has_raw: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def path(self) -> str:
        return self.weight.path

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.weight.path, self.scale.path)

    @property
    def nbytes(self) -> int:
        """Bytes read: the FP8 weight and its scales."""
        return self.weight.nbytes + self.scale.nbytes

    def read_rows(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Rows [r0, r1) dequantized into float32 `out` (flat or shaped, >= the block size)."""
        cols = row_elems(self.shape)
        dest = out.reshape(-1)[: (r1 - r0) * cols]
        raw = read_raw(self.weight, r0, r1, thread_buffer("checkpoints.fp8", dest.size, np.uint8))
        rows = fp8_to_float32(raw, self.weight.dtype, dest).reshape(r1 - r0, cols)
        br, bc = self.block
        s0, s1 = r0 // br, -(-r1 // br)
        scale = self.scale if self.check_finite else replace(self.scale, check_finite=False)
        scales = read_float_rows(scale, s0, s1, thread_buffer("checkpoints.fp8.scale", (s1 - s0) * self.scale.shape[1]))
        for s in range(s0, s1):
            a, b = max(r0, s * br) - r0, min(r1, (s + 1) * br) - r0
            group = rows[a:b]
            group *= np.repeat(scales[s - s0], bc)[:cols]
            if self.check_finite:
                self._check_finite(group, (r0 + a) * cols)
        return dest.reshape(block_shape(self.shape, r0, r1))

    def read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The rows `rows` (ascending) dequantized into float32 `out`, one run of consecutive
        rows at a time."""
        cols = row_elems(self.shape)
        flat = out.reshape(-1)
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for a, b in zip([0, *breaks], [*breaks, rows.size]) if rows.size else ():
            first = int(rows[a])
            self.read_rows(first, first + b - a, flat[a * cols : b * cols])
        return flat[: rows.size * cols].reshape((rows.size, *self.shape[1:]))

    def _check_finite(self, values: np.ndarray, first: int) -> None:
        ok = np.isfinite(values)
        if not ok.all():
            k = int(np.argmin(ok.reshape(-1)))
            raise nonfinite_error(self, first + k, float(values.reshape(-1)[k]))


def without_fp8_quantization(config: dict) -> dict:
    """config.json of a model whose FP8 weights were dequantized: without its FP8
    `quantization_config` (transformers would otherwise expect FP8 weights and scales)."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        return {k: v for k, v in config.items() if k != "quantization_config"}
    return config


def block_size(config: dict | None, where: Path) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of a model's config.json, else 128 x 128."""
    quant = (config or {}).get("quantization_config")
    size = quant.get("weight_block_size") if isinstance(quant, dict) else None
    if size is None:
        return DEFAULT_BLOCK
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size must be two positive integers, got {_q(size)}")
    return (size[0], size[1])


def dequantized(tensors: dict, config: dict | None, config_path: Path) -> dict:
    """`tensors` (name -> TensorHandle) with every FP8 weight replaced by its Fp8Handle and its
    scale tensor dropped; a weight without a scale, or a scale that does not fit it, is an
    error naming the tensor. A checkpoint without FP8 tensors is returned as it is."""
    fp8 = [name for name, h in tensors.items() if h.dtype in FP8_TYPES]
    if not fp8:
        return tensors
    block = block_size(config, config_path)
    handles = {name: _fp8_handle(tensors[name], tensors.get(name + SCALE_SUFFIX), block) for name in fp8}
    scales = {name + SCALE_SUFFIX for name in fp8}
    return {name: handles.get(name, h) for name, h in tensors.items() if name not in scales}


def _fp8_handle(weight, scale, block: tuple[int, int]) -> Fp8Handle:
    where = f"{weight.path}: tensor {weight.name} ({weight.dtype})"
    if scale is None:
        raise CheckpointError(f"{where} has no {weight.name}{SCALE_SUFFIX}, the block scales FP8 weights are read with")
    if len(weight.shape) != 2:
        raise CheckpointError(f"{where} has shape {list(weight.shape)}; only 2-D FP8 weights with block scales are read")
    want = tuple(-(-n // b) for n, b in zip(weight.shape, block))
    if tuple(scale.shape) != want:
        raise CheckpointError(
            f"{scale.path}: tensor {scale.name} has shape {list(scale.shape)}, but the {list(weight.shape)} weight "
            f"{weight.name} in blocks of {list(block)} needs {list(want)}"
        )
    if not is_float_st(scale.dtype):
        raise CheckpointError(f"{scale.path}: tensor {scale.name} has dtype {scale.dtype}; FP8 block scales must be BF16, F16 or F32")
    return Fp8Handle(weight.name, weight, scale, block)
