"""SCE (select, calculate, erase; arXiv 2408.07990), as mergekit's `sce`, streamed.

    tau_i = theta_i - theta_0
    select  (select_topk < 1): keep the int(select_topk * nnz) elements with the largest
            variance across models, var = mean_i tau_i^2 - mean^2 (population variance; nnz =
            number of elements whose variance is not zero), the same mask for every model;
            select_topk <= 0 keeps nothing, >= 1 everything
    calculate  w_i = mean(tau_i'^2) / sum_j mean(tau_j'^2)   (1/N if that sum is < 1e-6)
    erase   elected sign = + where sum_i tau_i' >= 0; entries of the other sign are erased
    merge   theta_0 + sum_i w_i m_i tau_i' / max(sum_i w_i m_i, 1e-6)

Parameters (mergekit's): select_topk (1.0), int8_mask (false; no numerical effect).

The variance is computed as torch.var does on CPU (Welford in float64, rounded to float32), so
the selection matches mergekit's except for entries tied with the threshold (ties: lowest flat
index first). The weights are tensor-wide means: float64 sums here, float32 sums in torch, so
w_i can differ from mergekit's in the last bit (results agree to ~1e-7 relative).

Passes: `sce.nnz` (count of non-zero variances, only with 0 < select_topk < 1), the five top-k
passes over the variance (see _topk.py), `sce.weights` (sum of tau_i'^2 per model).
"""

from __future__ import annotations

import numpy as np

from ._topk import OptionalPass, TopK, block_size, flat, numel, scratch
from .base import Block, MergeMethod, Param, Stats, TensorParams, register
from .ties import _F0, _F1, _F2, row_chunks

_CLAMP = np.float32(1e-6)


def _select_active(params: TensorParams) -> bool:
    s = float(params.globals["select_topk"])
    return 0 < s < 1


def _variance(block: Block, sl: slice, out: np.ndarray | None = None) -> np.ndarray:
    """Population variance across models, Welford in float64 (torch CPU), as float32."""
    b = flat(block.base)[sl]
    mean = np.zeros(b.shape, np.float64)
    m2 = np.zeros_like(mean)
    x = np.empty_like(mean)
    delta = np.empty_like(mean)
    for i, m in enumerate(block.models):
        np.copyto(x, np.subtract(flat(m)[sl], b))  # the float32 task vector, widened
        np.subtract(x, mean, out=delta)
        mean += delta / (i + 1)
        x -= mean
        delta *= x
        m2 += delta
    m2 /= len(block.models)
    if out is None:
        return m2.astype(np.float32)
    np.copyto(out, m2, casting="same_kind")
    return out


def _values(block, params, stats, src, sl, out):
    return _variance(block, sl, out)


def _plan(params: TensorParams, stats: Stats, n: int):
    if not _select_active(params):
        return []
    return [(0, int(int(stats["sce.nnz"]) * float(params.globals["select_topk"])))]


TOPK = TopK("sce.topk", _values, _plan)


def _nnz_map(block: Block, params: TensorParams, stats: Stats):
    if not _select_active(params) or not block.models:
        return 0
    nb = block_size(block)
    total = 0
    for c0, c1 in row_chunks(block, nb):
        total += int(np.count_nonzero(_variance(block, slice(c0, c1))))
    return total


def _nnz_reduce(partials, params, stats):
    return {"sce.nnz": int(sum(p for p in partials if p is not None))}


def _tvs(block: Block, params: TensorParams, stats: Stats, keeper, c0: int, c1: int) -> list[np.ndarray]:
    """Selected task vectors of the chunk [c0, c1): tau_i * mask (mask shared by the models)."""
    L = c1 - c0
    b = flat(block.base)[c0:c1]
    tvs = []
    for i, m in enumerate(block.models):
        d = scratch(f"d{i}", L)
        np.subtract(flat(m)[c0:c1], b, out=d)
        tvs.append(d)
    if keeper is not None:
        if keeper == "none":
            for d in tvs:
                np.multiply(d, _F0, out=d)
        else:
            u = _variance(block, slice(c0, c1)).view(np.uint32)
            mask = keeper.mask(u, block.start + c0)
            for d in tvs:
                np.multiply(d, mask, out=d)
    return tvs


def _keeper(block, params, stats):
    s = float(params.globals["select_topk"])
    if s >= 1:
        return None
    if s <= 0:
        return "none"
    return TOPK.keeper(block, params, stats, 0)


def _weights_map(block: Block, params: TensorParams, stats: Stats):
    if not block.models:
        return None
    nb = block_size(block)
    keeper = _keeper(block, params, stats)
    sums = np.zeros(len(block.models), dtype=np.float64)
    for c0, c1 in row_chunks(block, nb):
        for i, d in enumerate(_tvs(block, params, stats, keeper, c0, c1)):
            sums[i] += np.add.reduce(np.square(d), dtype=np.float64)  # float32 squares, as torch
    return sums


def _weights_reduce(partials, params, stats):
    partials = [p for p in partials if p is not None]
    if not partials:
        return {}
    total = np.sum(partials, axis=0)
    return {"sce.sumsq": total}


def _tensor_weights(stats: Stats, n: int, N: int) -> np.ndarray:
    means = (np.asarray(stats["sce.sumsq"], np.float64) / n).astype(np.float32)
    ws = np.float32(0)
    for m in means:
        ws = np.float32(ws + m)
    if abs(float(ws)) < 1e-6:
        return np.full(N, np.float32(1) / np.float32(N), dtype=np.float32)
    return (means / ws).astype(np.float32)


def sce_merge(block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
    base = block.base
    if not block.models:
        return np.array(base, dtype=np.float32, copy=True)
    N = len(block.models)
    n = numel(block.shape)
    nb = block_size(block)
    w = _tensor_weights(stats, n, N)
    keeper = _keeper(block, params, stats)
    out = np.empty(base.shape, dtype=np.float32)
    bflat, oflat = flat(base), flat(out)
    for c0, c1 in row_chunks(block, nb):
        L = c1 - c0
        tvs = _tvs(block, params, stats, keeper, c0, c1)
        # erase mask: sign(tv) == elected, elected = + where sum_i tv_i >= 0
        sw = scratch("sw", L)
        np.copyto(sw, tvs[0])
        for d in tvs[1:]:
            np.add(sw, d, out=sw)
        mb = scratch("mb", L, bool)
        np.greater_equal(sw, 0, out=mb)
        sgn = sw
        np.multiply(mb, _F2, out=sgn)
        np.subtract(sgn, _F1, out=sgn)
        S = scratch("S", L)
        D = scratch("D", L)
        x = scratch("x", L)
        ew = scratch("ew", L)
        for i, d in enumerate(tvs):
            np.multiply(d, sgn, out=x)
            np.greater(x, 0, out=mb)
            np.multiply(mb, w[i], out=ew)  # erased weight: w_i * mask
            np.multiply(d, ew, out=x)  # tv * erased weight
            if i == 0:
                np.copyto(S, x)
                np.copyto(D, ew)
            else:
                np.add(S, x, out=S)
                np.add(D, ew, out=D)
        np.add(S, _F0, out=S)  # torch sums from +0
        np.maximum(D, _CLAMP, out=D)
        np.divide(S, D, out=S)
        np.add(bflat[c0:c1], S, out=oflat[c0:c1])
    return out


register(
    MergeMethod(
        name="sce",
        merge=sce_merge,
        params=(
            Param("select_topk", float, 1.0, min=0, max=1, help="fraction of elements kept by variance across models"),
            Param("int8_mask", bool, False, help="mergekit's mask dtype; no numerical effect"),
        ),
        base="required",
        passes=(
            OptionalPass("sce.nnz", _nnz_map, _nnz_reduce, needed=lambda params, stats: _select_active(params)),
            *TOPK.passes,
            OptionalPass("sce.weights", _weights_map, _weights_reduce),
        ),
        summary="SCE: variance top-k selection, sign consensus, norm-weighted mean",
    )
)
