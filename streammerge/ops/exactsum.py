"""Exact, block-invariant sums of products, and float32 scalar helpers with torch's semantics.

The spherical methods (methods/slerp.py) and model_stock need tensor-wide norms and dot
products whose values must not depend on how a tensor is cut into blocks, how many workers
run or in which order blocks finish. `row_dots` forms every product in float64 (exact for
float32 inputs) and sums each row in fixed segments (a block always holds whole rows);
`exact_block_sums` turns a block's row sums into exact (integer numerator, exponent) pairs;
`exact_reduce` adds the partials as integers and rounds once. The results are bit-identical
for any blocking and within ~1e-16 relative of the exact value.

The float32 helpers follow torch where mergekit's formulas use float32 scalars: correctly
rounded sin/cos/acos/sqrt, and `torch_sum32`, torch's CPU cascade order for short sums.

(1bit-Merging's per-tensor alpha uses another exact-order sum, float64 group sums + fsum,
because its float64 row sums are part of what the device kernel reproduces bit for bit:
encodings/onebit.py.)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

F32 = np.float32
F64 = np.float64

_ROW_CHUNK = 1 << 18  # elements per float64 scratch window
_SEG = 4096  # rows are reduced in segments of this many elements (one einsum inner loop each)


def as_2d(x: np.ndarray) -> np.ndarray:
    """View a block as (rows, elements per row); 0-d and 1-D blocks have one element per row."""
    if x.ndim <= 1:
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64)))


def row_dots(xs: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """float64 (rows, len(pairs)) array: per-row sums of xs[i] * xs[j], exact products.

    The value for a row depends on that row alone, never on the rows around it or on how the
    tensor was cut into blocks: each row is split into fixed segments of _SEG elements counted
    from the row's start, each segment is summed by one einsum inner loop on an exact float64
    copy, and the segment sums are added per row.
    """
    rows = [as_2d(x) for x in xs]
    n, width = rows[0].shape
    k = len(pairs)
    if n == 0 or width == 0:
        return np.zeros((n, k), dtype=F64)
    if width == 1:  # 0-/1-D tensors: a row is one element, its "sum" the exact product
        out = np.empty((n, k), dtype=F64)
        cols = [r[:, 0].astype(F64) for r in rows]
        for q, (i, j) in enumerate(pairs):
            np.multiply(cols[i], cols[j], out=out[:, q])
        return out
    used = sorted({i for pair in pairs for i in pair})
    nseg = -(-width // _SEG)
    seg = np.empty((n, k, nseg), dtype=F64)
    win = max(_SEG, (_ROW_CHUNK // _SEG) * _SEG)  # column window: whole segments
    step = max(1, _ROW_CHUNK // min(width, win))
    bufs = {i: np.empty(min(step, n) * min(width, win), dtype=F64) for i in used}
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        m = r1 - r0
        for c0 in range(0, width, win):
            c1 = min(width, c0 + win)
            w = c1 - c0
            x64 = {}
            for i in used:
                b = bufs[i][: m * w].reshape(m, w)
                np.copyto(b, rows[i][r0:r1, c0:c1])  # float32 -> float64: exact
                x64[i] = b
            s0 = c0 // _SEG
            full, tail = divmod(w, _SEG)
            for q, (i, j) in enumerate(pairs):
                a, b = x64[i], x64[j]
                if full:
                    seg[r0:r1, q, s0 : s0 + full] = np.einsum(
                        "rks,rks->rk",
                        a[:, : full * _SEG].reshape(m, full, _SEG),
                        b[:, : full * _SEG].reshape(m, full, _SEG),
                    )
                if tail:
                    seg[r0:r1, q, s0 + full] = np.einsum("rc,rc->r", a[:, full * _SEG :], b[:, full * _SEG :])
    return seg[:, :, 0].copy() if nseg == 1 else seg.sum(axis=2)


_CHUNK_BITS = 18  # a 53-bit mantissa as three pieces of < 2**18: float64 sums of them stay exact
_CHUNK_MASK = (1 << _CHUNK_BITS) - 1


def _exact_columns(v: np.ndarray) -> list:
    """Exact sum of each column of a float64 (rows, K) array.

    Returns, per column, (numerator, exponent) with sum = numerator * 2**exponent, or a float
    when the column holds inf/nan (which then propagates as in float arithmetic). Each value is
    split into its integer mantissa (53 bits) and exponent; the mantissas are cut into three
    pieces of at most 18 bits and accumulated per (column, exponent) with float64 bincounts,
    which are exact (integer sums below 2**53 for up to 2**35 rows); the few per-exponent sums
    are then combined as Python integers.
    """
    rows, k = v.shape
    out: list = [(0, 0)] * k
    finite = np.isfinite(v).all(axis=0)
    for c in np.flatnonzero(~finite):
        out[c] = float(np.sum(v[:, c]))
    cols = np.flatnonzero(finite)
    if rows == 0 or cols.size == 0:
        return out
    sub = v[:, cols] if cols.size < k else v
    mant, expo = np.frexp(sub)
    mi = np.ldexp(mant, 53).astype(np.int64)  # exact: |mant| < 1
    expo = expo.astype(np.int64)
    e0 = int(expo.min())
    span = int(expo.max()) - e0 + 1
    key = (expo - e0) + span * np.arange(cols.size, dtype=np.int64)
    key = key.ravel()
    size = span * cols.size
    pieces = (
        np.bincount(key, weights=(mi & _CHUNK_MASK).ravel().astype(F64), minlength=size),
        np.bincount(key, weights=((mi >> _CHUNK_BITS) & _CHUNK_MASK).ravel().astype(F64), minlength=size),
        np.bincount(key, weights=(mi >> (2 * _CHUNK_BITS)).ravel().astype(F64), minlength=size),
    )
    nums = [0] * cols.size
    for g in np.flatnonzero((pieces[0] != 0) | (pieces[1] != 0) | (pieces[2] != 0)).tolist():
        c, de = divmod(g, span)
        total = int(pieces[0][g]) + (int(pieces[1][g]) << _CHUNK_BITS) + (int(pieces[2][g]) << (2 * _CHUNK_BITS))
        nums[c] += total << de
    for c, num in enumerate(nums):
        out[int(cols[c])] = (num, e0 - 53) if num else (0, 0)
    return out


def upper_pairs(n: int) -> list[tuple[int, int]]:
    """(i, j) with i <= j: the entries of a symmetric Gram matrix."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def exact_block_sums(xs: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> list:
    """Pass partial: exact sums over the block of xs[i] * xs[j] for each pair (a short list)."""
    return _exact_columns(row_dots(xs, pairs))


def exact_reduce(partials: Sequence[list], k: int) -> np.ndarray:
    """Add exact partials (any order gives the same result); float64 (k,), correctly rounded."""
    out = np.zeros(k, dtype=F64)
    for c in range(k):
        special = 0.0
        has_special = False
        terms: list[tuple[int, int]] = []
        for p in partials:
            if p is None:
                continue
            v = p[c]
            if isinstance(v, float):
                special += v
                has_special = True
            elif v[0] != 0:
                terms.append(v)
        if has_special:
            out[c] = special
            continue
        if not terms:
            continue
        e0 = min(e for _, e in terms)
        num = sum(n << (e - e0) for n, e in terms)
        try:
            out[c] = num * 2.0**e0 if e0 >= 0 else num / (1 << -e0)
        except OverflowError:
            out[c] = math.copysign(math.inf, num)
    return out


# ----------------------------------------------------------------------------------------------
# float32 scalar helpers following torch semantics
# ----------------------------------------------------------------------------------------------


def _in_float64(fn, x):
    """fn of x computed in float64, rounded once to float32 (NaN for inputs out of its domain)."""
    with np.errstate(invalid="ignore"):
        return fn(np.asarray(x, dtype=F64)).astype(F32)


def sin32(x):
    """float32 sin of float32 input, correctly rounded via float64 (torch uses SLEEF, 1 ulp)."""
    return _in_float64(np.sin, x)


def cos32(x):
    return _in_float64(np.cos, x)


def acos32(x):
    return _in_float64(np.arccos, x)


def sqrt32(x):
    """float32 of the square root of a float64 sum (double rounding here is innocuous)."""
    return _in_float64(np.sqrt, x)


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


def _multi_row_sum(rows: list, zero: np.ndarray) -> np.ndarray:
    num_levels = 4
    size = len(rows)
    level_power = max(4, _ceil_log2(size) // num_levels)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = [zero.copy() for _ in range(num_levels)]
    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            acc[0] = (acc[0] + rows[i]).astype(F32)
            i += 1
        for j in range(1, num_levels):
            acc[j] = (acc[j] + acc[j - 1]).astype(F32)
            acc[j - 1] = zero.copy()
            if i & (level_mask << (j * level_power)):
                break
    while i < size:
        acc[0] = (acc[0] + rows[i]).astype(F32)
        i += 1
    for j in range(1, num_levels):
        acc[0] = (acc[0] + acc[j]).astype(F32)
    return acc[0]


def _row_sum(items: list, zero: np.ndarray) -> np.ndarray:
    ilp = 4
    size_ilp = len(items) // ilp
    rows = [np.stack(items[r * ilp : (r + 1) * ilp]) for r in range(size_ilp)]
    part = list(_multi_row_sum(rows, np.stack([zero] * ilp)))
    for i in range(size_ilp * ilp, len(items)):
        part[0] = (part[0] + items[i]).astype(F32)
    for k in range(1, ilp):
        part[0] = (part[0] + part[k]).astype(F32)
    return part[0]


def torch_sum32(values) -> np.float32:
    """Sum of a short float32 vector in the order torch's CPU cascade sum uses.

    Used for mergekit's small sums (sum of weights, mean of pairwise cosines, ...). Fewer than 8
    values take torch's scalar path on every CPU; longer ones follow its 8-lane vector path.
    """
    x = np.asarray(values, dtype=F32).ravel()
    lanes = 8
    if x.size >= lanes:
        nvec = x.size // lanes
        vecs = [x[i * lanes : (i + 1) * lanes] for i in range(nvec)]
        acc = _row_sum(vecs, np.zeros(lanes, F32))
        total = F32(0)
        for k in range(nvec * lanes, x.size):
            total = F32(total + x[k])
        for v in acc:
            total = F32(total + v)
        return total
    return F32(_row_sum([F32(v) for v in x], np.zeros((), F32)))
