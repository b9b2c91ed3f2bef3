"""Run a method over one whole tensor held in memory, cut into row blocks.

This is the engine's semantics without the engine: passes over every block, reduce, then merge
each block. Tests use it as the reference the streamed engine must match bit for bit, and to
check that results do not depend on the block size.
"""

from __future__ import annotations

import numpy as np

from .base import Block, MergeMethod, TensorParams


def row_blocks(rows: int, block_rows: int):
    for r0 in range(0, max(rows, 1), block_rows):
        yield r0, min(rows, r0 + block_rows)


def tensor_blocks(
    name: str,
    base: np.ndarray | None,
    models: list[np.ndarray],
    block_rows: int | None = None,
    rows: np.ndarray | None = None,
):
    """The row blocks of float32 copies of whole tensors, as the engine would hand them out;
    with `rows` (a pass's declared rows), each block holds only those of them it spans."""
    shape = tuple(np.shape(models[0]))
    as2d = lambda a: a.reshape(1, -1) if a.ndim == 0 else a  # noqa: E731  scalars are one row
    base2 = None if base is None else as2d(np.asarray(base, np.float32))
    models2 = [as2d(np.asarray(m, np.float32)) for m in models]
    nrows = models2[0].shape[0]
    row_elems = int(np.prod(models2[0].shape[1:], dtype=np.int64))
    for r0, r1 in row_blocks(nrows, block_rows or max(nrows, 1)):
        held = slice(r0, r1) if rows is None else rows[np.searchsorted(rows, r0) : np.searchsorted(rows, r1)]
        yield Block(
            tensor=name,
            shape=shape,
            start=r0 * row_elems,
            base=None if base2 is None else base2[held],
            models=tuple(m[held] for m in models2),
            rows=None if rows is None else held,
        )


def run_passes(method: MergeMethod, name, base, models, params: TensorParams, block_rows=None) -> dict:
    """The tensor-wide stats: each needed pass mapped over every block (only the rows it declares),
    reduced in block order."""
    stats: dict = {}
    for p in method.passes:
        if not p.needed(params, stats):
            continue
        rows = None if p.rows is None else p.rows(tuple(np.shape(models[0])), params)
        partials = [p.map(b, params, stats) for b in tensor_blocks(name, base, models, block_rows, rows)]
        stats = {**stats, **p.reduce(partials, params, stats)}
    return stats


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: np.ndarray | None,
    models: list[np.ndarray],
    params: TensorParams,
    block_rows: int | None = None,
) -> np.ndarray:
    """Merge float32 arrays (all of one shape) block by block; returns the float32 result."""
    stats = run_passes(method, name, base, models, params, block_rows)
    blocks = tensor_blocks(name, base, models, block_rows)
    out = np.concatenate([method.merge(b, params, stats) for b in blocks], axis=0)
    return out.reshape(models[0].shape)
