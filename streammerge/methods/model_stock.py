"""Model Stock (mergekit 0.1.5 semantics): t * mean(theta_i) + (1 - t) * theta_0.

t = N c / (1 + (N - 1) c), c = mean over pairs i < j of cos(theta_i - theta_0, theta_j - theta_0),
with t = 0 where |1 + (N - 1) c| < 1e-6 (mergekit keeps the base there). Needs a base and at
least two other models.

* filter_wise = false (default), or a 0-/1-D tensor: one cosine per pair for the whole tensor.
  One pass computes the Gram matrix of the offsets exactly (see slerp.py: float64 products,
  per-row sums, exact integer addition, so the statistics do not depend on the blocking); the
  scalar t then follows mergekit's float32 formula step by step.
* filter_wise = true on a tensor of 2+ dims: one cosine per vector along the last axis (a
  "filter"; a block holds whole rows, hence whole filters): computed in `merge`, no pass.

The elementwise part repeats mergekit's float32 operations (sum(ws) / N, t * avg +
(1 - t) * w0), so with the same t the output is bit-identical; t can differ from mergekit's
in the last float32 bits because mergekit's norms and dot products are float32 torch
reductions (see tests/test_methods_slerp.py for the bound).
"""

from __future__ import annotations

import numpy as np

from ..ops.exactsum import F32, exact_block_sums, exact_reduce, row_dots, sqrt32, torch_sum32
from .base import Block, MergeMethod, Param, Pass, TensorParams, register
from .slerp import need_inputs


def _pairs(n: int) -> list[tuple[int, int]]:
    # (i, i) for the norms, then the pairs i < j in mergekit's order.
    return [(i, i) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]


def _offsets(block: Block) -> list[np.ndarray]:
    need_inputs(block, "model_stock", base=True, lo=2, hi=None)
    return [w - block.base for w in block.models]


def _filter_wise(params: TensorParams, shape) -> bool:
    return bool(params.globals.get("filter_wise", False)) and len(shape) >= 2


def model_stock_t(sums: np.ndarray, n: int, *, per_row_mean: bool = False) -> np.ndarray:
    """mergekit's t from float64 sums laid out as _pairs(n) along the last axis (float32)."""
    norms = sqrt32(sums[..., :n])
    cosines = []
    for k, (i, j) in enumerate(_pairs(n)[n:], start=n):
        norm_product = np.maximum(norms[..., i] * norms[..., j], F32(1e-6))
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = sums[..., k].astype(F32) / norm_product
        cosines.append(np.clip(cos, F32(-1), F32(1)))
    if per_row_mean:
        # torch.stack(cos).mean(0) over pairs for each filter (an outer reduction: in pair order)
        acc = cosines[0].copy()
        for c in cosines[1:]:
            acc += c
        cos_theta = acc / F32(len(cosines))
    else:
        cos_theta = np.asarray(torch_sum32(cosines) / F32(len(cosines)), F32)
    count = F32(n)
    denominator = F32(1) + F32(n - 1) * cos_theta
    singular = np.abs(denominator) < F32(1e-6)
    safe = np.where(singular, F32(1), denominator)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(singular, F32(0), (count * cos_theta) / safe)
    return t.astype(F32)


def _map(block: Block, params: TensorParams, stats):
    if _filter_wise(params, block.shape):
        need_inputs(block, "model_stock", base=True, lo=2, hi=None)
        return None  # per-filter statistics lie within rows: merge computes them
    offsets = _offsets(block)
    return exact_block_sums(offsets, _pairs(len(offsets)))


def _reduce(partials, params: TensorParams, stats) -> dict:
    parts = [p for p in partials if p is not None]
    if not parts:
        return {}
    n = len(params.per_model)
    sums = exact_reduce(parts, len(_pairs(n)))
    return {"model_stock_t": float(model_stock_t(sums, n))}


def _combine(w0: np.ndarray, ws, t) -> np.ndarray:
    average = ws[0].copy()  # sum(ws) starts at 0; 0 + w is w
    for w in ws[1:]:
        average += w
    average /= F32(len(ws))
    average *= t
    rest = w0 * (F32(1) - t)
    average += rest
    return average


def model_stock_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    need_inputs(block, "model_stock", base=True, lo=2, hi=None)
    if not _filter_wise(params, block.shape):
        return _combine(block.base, block.models, F32(stats["model_stock_t"]))
    last = block.shape[-1]
    if block.base.size == 0:
        return block.base.copy()
    w0 = block.base.reshape(-1, last)
    ws = [w.reshape(-1, last) for w in block.models]
    offsets = [w - w0 for w in ws]
    sums = row_dots(offsets, _pairs(len(offsets)))
    t = model_stock_t(sums, len(offsets), per_row_mean=True)[:, None]
    return _combine(w0, ws, t).reshape(block.base.shape)


register(
    MergeMethod(
        name="model_stock",
        merge=model_stock_merge,
        base="required",
        params=(
            Param("filter_wise", bool, False, help="one interpolation ratio per row (filter) instead of per tensor"),
        ),
        passes=(Pass("model_stock_gram", _map, _reduce),),
        summary="interpolate between the base and the average of the models by their task-vector angle",
    )
)
