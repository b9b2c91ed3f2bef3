"""Arcee Fusion, as mergekit's `arcee_fusion`: take the other model's value where it matters most.

    importance = |theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0))
                 (softmax + 1e-8 over the last dimension; the KL is one number per such vector,
                 for a 1-D tensor one number for the whole tensor)
    threshold  = median + 1.5 * (q3 - q1) of the importance over the whole tensor
                 (quartiles = the sorted values at floor(q * (n - 1)), q = 0.25, 0.5, 0.75)
    result     = theta_0 + (theta_1 - theta_0) * [importance >= threshold]

Exactly one model besides the base. mergekit takes the quartiles from a random sample of 10^6
entries in tensors larger than that (torch's global generator: not reproducible); here they
are exact order statistics, streamed with ops/topk.py, so the result is deterministic and, for
tensors of at most 10^6 entries, the quartiles mergekit computes. The softmax and KL sums are
computed in float64 (torch: float32, in its own order), so importances differ from mergekit's
in the last float32 bits: results agree except for entries whose importance is within that of
the threshold (tests/test_methods_arcee_fusion.py states the bound).

Passes: for 1-D tensors, `max`, `sum` (of the exponentials) and `kl`, summed exactly (ops/exactsum.py)
so that no sum depends on the blocks;
`count` (entries of negative importance, which a rounded KL can give, and the minimum); the top-k
passes, which find each quartile as the k-th largest of the non-negative importances or of the
negated negative ones.
"""

from __future__ import annotations

import numpy as np

from ..ops.exactsum import exact_block_sums, exact_reduce
from ..ops.topk import TopK, block_size, flat, numel
from .base import CACHE_ELEMS, Block, MergeMethod, Pass, Stats, TensorParams, register

F32 = np.float32
EPS = 1e-8  # added to both softmaxes, as mergekit
QUARTILES = (1, 2, 3)  # q = i / 4


def _check(block: Block) -> None:
    if block.base is None or len(block.models) != 1:
        raise ValueError(
            f"arcee_fusion needs a base model and exactly 1 other model, got {len(block.models)} (tensor {block.tensor})"
        )


def _vector_length(shape) -> int | None:
    """Length of the vectors the softmax runs over; None: the whole tensor (1-D or a scalar)."""
    return shape[-1] if len(shape) >= 2 else None


def _kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KL(softmax(x) + eps || softmax(y) + eps) of each row of the 2-D arrays, as float32."""
    p = _softmax(x)
    q = _softmax(y)
    return np.sum(p * np.log(p / q), axis=-1).astype(F32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    e += EPS
    return e


def importance(block: Block, stats: Stats, sl: slice) -> np.ndarray:
    """The importance of the block's flat positions `sl` (a slice of whole rows, or any slice
    of a 1-D tensor), float32."""
    x, y = flat(block.models[0]), flat(block.base)
    V = _vector_length(block.shape)
    if V is None:  # one KL for the whole tensor, from the softmax passes
        return np.abs(x[sl] - y[sl]) * F32(stats["arcee_fusion.kl"])
    a, b, _ = sl.indices(x.size)
    v0, v1 = a // V, -(-b // V)  # the vectors the slice touches
    xs, ys = x[v0 * V : v1 * V].reshape(-1, V), y[v0 * V : v1 * V].reshape(-1, V)
    imp = np.abs(xs - ys)
    imp *= _kl(xs, ys)[:, None]
    return imp.reshape(-1)[a - v0 * V : b - v0 * V]


def _chunks(block: Block):
    """Slices of whole vectors, about CACHE_ELEMS elements each."""
    n = block_size(block)
    V = _vector_length(block.shape) or 1
    step = max(V, CACHE_ELEMS // V * V)
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


# ---- 1-D tensors: one softmax over the whole tensor ------------------------------------------


def _whole_only(shape, params):
    """Pass.rows of the softmax passes: tensors with vectors of their own need no read."""
    return None if _vector_length(shape) is None else np.empty(0, np.int64)


def _whole_vectors(block: Block):
    """(theta_1, theta_0) of a block of a tensor softmaxed whole, as float64; None otherwise."""
    if _vector_length(block.shape) is not None or not block_size(block):
        return None
    _check(block)
    return flat(block.models[0]).astype(np.float64), flat(block.base).astype(np.float64)


def _max_map(block: Block, params: TensorParams, stats: Stats):
    v = _whole_vectors(block)
    return None if v is None else (float(v[0].max()), float(v[1].max()))


def _max_reduce(partials, params: TensorParams, stats: Stats) -> Stats:
    partials = [p for p in partials if p is not None]
    if not partials:
        return {}
    return {"arcee_fusion.max": np.array([max(p[0] for p in partials), max(p[1] for p in partials)])}


def _exact_sums(terms: list[np.ndarray]) -> list:
    """Pass partial: the exact sum of each float64 array (exactsum.py: any blocking, same sum)."""
    ones = np.ones_like(terms[0])
    return exact_block_sums([*terms, ones], [(i, len(terms)) for i in range(len(terms))])


def _sum_map(block: Block, params: TensorParams, stats: Stats):
    v = _whole_vectors(block)
    if v is None:
        return None
    return _exact_sums([np.exp(x - m) for x, m in zip(v, stats["arcee_fusion.max"])])


def _sum_reduce(partials, params: TensorParams, stats: Stats) -> Stats:
    if all(p is None for p in partials):
        return {}
    return {"arcee_fusion.sum": exact_reduce(partials, 2)}


def _kl_map(block: Block, params: TensorParams, stats: Stats):
    v = _whole_vectors(block)
    if v is None:
        return None
    p, q = (np.exp(x - m) / s + EPS for x, m, s in zip(v, stats["arcee_fusion.max"], stats["arcee_fusion.sum"]))
    return _exact_sums([p * np.log(p / q)])


def _kl_reduce(partials, params: TensorParams, stats: Stats) -> Stats:
    if all(p is None for p in partials):
        return {}
    return {"arcee_fusion.kl": float(F32(exact_reduce(partials, 1)[0]))}


# ---- the threshold ----------------------------------------------------------------------------


def _count_map(block: Block, params: TensorParams, stats: Stats):
    """(entries of negative importance, smallest importance) of the block."""
    _check(block)
    neg, low = 0, np.inf
    for sl in _chunks(block):
        imp = importance(block, stats, sl)
        neg += int(np.count_nonzero(imp < 0))
        low = min(low, float(imp.min())) if imp.size else low
    return neg, low


def _count_reduce(partials, params: TensorParams, stats: Stats) -> Stats:
    partials = [p for p in partials if p is not None]
    return {"arcee_fusion.neg": sum(p[0] for p in partials), "arcee_fusion.min": min((p[1] for p in partials), default=0.0)}


def _quartile_index(i: int, n: int) -> int:
    """floor(i/4 * (n - 1)): mergekit's index into the sorted values (exact in float32 there
    for the sizes it sorts)."""
    return i * (n - 1) // 4


def _selections(stats: Stats, n: int) -> list[tuple[int, int, int]]:
    """(quartile, source, k) per quartile that needs a top-k selection. Source 0: magnitudes
    of the negative importances, whose (idx + 1)-th largest is the idx-th smallest overall;
    source 1: the non-negative importances (others as 0), whose (n - idx)-th largest is it.
    The smallest value (idx 0) comes from the count pass."""
    neg = int(stats["arcee_fusion.neg"])
    out = []
    for i in QUARTILES:
        idx = _quartile_index(i, n)
        if idx > 0:
            out.append((i, 0, idx + 1) if idx < neg else (i, 1, n - idx))
    return out


def _plan(params: TensorParams, stats: Stats, n: int):
    return [(src, k) for _, src, k in _selections(stats, n)]


def _values(block: Block, params: TensorParams, stats: Stats, src: int, sl: slice, out):
    imp = importance(block, stats, sl)
    keep = imp < 0 if src == 0 else imp > 0
    if src == 0:
        np.negative(imp, out=imp)
    return np.where(keep, imp, F32(0))  # +0.0: the bit patterns order non-negative values


TOPK = TopK("arcee_fusion.topk", _values, _plan)


def threshold(stats: Stats, n: int) -> np.float32:
    """median + 1.5 * (q3 - q1), in float32 as mergekit computes it."""
    q = {i: F32(stats["arcee_fusion.min"]) for i in QUARTILES}
    for j, (i, src, _k) in enumerate(_selections(stats, n)):
        value = np.uint32(stats[f"{TOPK.name}.{j}.T"]).view(F32)
        q[i] = -value if src == 0 else value
    return F32(q[2] + F32(1.5) * F32(q[3] - q[1]))


def arcee_fusion_merge(block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
    _check(block)
    t = threshold(stats, numel(block.shape))
    base, other = flat(block.base), flat(block.models[0])
    out = np.empty_like(base)
    for sl in _chunks(block):
        diff = other[sl] - base[sl]
        diff *= importance(block, stats, sl) >= t
        np.add(base[sl], diff, out=out[sl])
    return out.reshape(block.base.shape)


register(
    MergeMethod(
        name="arcee_fusion",
        merge=arcee_fusion_merge,
        base="required",
        example_models=1,
        max_models=1,
        passes=(
            Pass("arcee_fusion.max", _max_map, _max_reduce, rows=_whole_only),
            Pass("arcee_fusion.sum", _sum_map, _sum_reduce, rows=_whole_only),
            Pass("arcee_fusion.kl", _kl_map, _kl_reduce, rows=_whole_only),
            Pass("arcee_fusion.count", _count_map, _count_reduce),
            *TOPK.passes,
        ),
        summary="take the other model where |difference| x KL of the softmaxes exceeds median + 1.5 IQR",
    )
)
