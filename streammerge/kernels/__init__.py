"""Whole-tensor merge kernels in torch: what `build --device cuda` runs instead of the numpy path.

The CPU engine streams a method block by block in numpy, with tensor-wide passes for the
quantities a block cannot know (top-k thresholds, L1 norms, scales). On a GPU one tensor fits
whole, so the engine uploads every row block of every input there (the raw 2-byte data,
through pinned buffers), calls the method's `kernel` once on the whole tensor, and writes the
results back block by block. There are no passes: thresholds and sums are computed on the
device directly.

A kernel is `kernel(x: DeviceTensor, params: TensorParams) -> result`, pure torch on
`x.device` (no I/O), and returns what the method's `merge` returns, for all blocks at once:
a float32 tensor of shape (rows, *trailing), or a dict {output name: tensor (rows, *trailing),
or a list of bytes, one per block of `x.bounds`, for blob outputs}; or a pair (that, stats)
when later readers of the store need stats the CPU path's passes would have saved (1-bit's
per-tensor scales): the engine saves them as the job's stats. Kernels compute the same
float32 operations in the same order as the numpy method, so outputs are bit-identical; a
method whose kernel cannot be (a sum whose order differs) says by how much in its docstring.

Modules here import torch inside their functions: importing a method never imports torch.

Arrows: kernels import the rules they share with the numpy methods from ops/ (sparsification,
the torch sign election, random streams) and the formats they write from encodings/; they
never import methods/ (a method picks its kernel, methods/*.py -> kernels/*.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..geometry import row_elems


@dataclass(frozen=True)
class DeviceTensor:
    """One tensor's inputs, whole, as float32 torch tensors of shape (rows, *shape[1:]).

    A 0-d tensor is one row of one element; a 1-D tensor has 1-element rows (as in the engine).
    `bounds` are the engine's row blocks [r0, r1): blob outputs are cut by them.
    """

    name: str
    shape: tuple[int, ...]
    base: Any  # torch.Tensor | None
    models: tuple  # tuple[torch.Tensor, ...], recipe order, base excluded
    bounds: tuple[tuple[int, int], ...]

    @property
    def first(self):
        return self.models[0] if self.models else self.base

    @property
    def device(self):
        return self.first.device

    @property
    def numel(self) -> int:
        return int(self.first.numel())

    @property
    def row_elems(self) -> int:
        return row_elems(self.shape)

    def block_starts(self) -> list[int]:
        """Flat index of each block's first element."""
        return [r0 * self.row_elems for r0, _ in self.bounds]


def as_block(a: np.ndarray) -> np.ndarray:
    """An array as the engine holds a whole tensor's rows: 0-d -> (1,), otherwise unchanged."""
    return a.reshape(1) if a.ndim == 0 else a


def device_tensor(name: str, base, models: Sequence, block_rows: int | None = None, device="cpu") -> DeviceTensor:
    """A DeviceTensor from float32-convertible numpy arrays (tests, benchmarks)."""
    import torch

    def up(a):
        return torch.from_numpy(np.ascontiguousarray(as_block(np.asarray(a, np.float32)))).to(device)

    shape = tuple(np.shape(models[0] if len(models) else base))
    first = as_block(np.asarray(models[0] if len(models) else base))
    rows = first.shape[0]
    step = block_rows or max(rows, 1)
    bounds = tuple((r0, min(rows, r0 + step)) for r0 in range(0, max(rows, 1), step))
    return DeviceTensor(
        name=name,
        shape=shape,
        base=None if base is None else up(base),
        models=tuple(up(m) for m in models),
        bounds=bounds,
    )


def split_blocks(result, x: DeviceTensor) -> list:
    """A kernel's result cut into the engine's blocks, as numpy (what `merge` returns per block)."""
    if not isinstance(result, dict):
        rows = result.detach().cpu().numpy()
        return [rows[r0:r1] for r0, r1 in x.bounds]
    per_block: list[dict] = [{} for _ in x.bounds]
    for name, value in result.items():
        if isinstance(value, (list, tuple)):
            for i, blob in enumerate(value):
                per_block[i][name] = blob
        else:
            rows = value.detach().cpu().numpy()
            for i, (r0, r1) in enumerate(x.bounds):
                per_block[i][name] = rows[r0:r1]
    return per_block
