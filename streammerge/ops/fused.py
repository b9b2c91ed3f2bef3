"""Fused CPU loops for the streamed merges' hot path, compiled with numba when it is importable.

A TIES-family merge written as numpy calls makes ~40 passes over each entry of a row group
(subtract, mask, scale, weigh, the election's compares and products, the disjoint mean, the
base added back); each pass runs at memory-copy speed, so they, not arithmetic, set the time
(README, Benchmark). `family_merge` does all of that in one loop over tiles of a few hundred
entries: a tile's task vectors stay in L1 while the election reads them. It does the same
float32 operations in the same order as methods/ties.py's numpy code, written without branches
on data (a comparison becomes a 0/1 factor: multiplying by 1 or 0 rounds exactly as the
numpy code's multiply by a bool array), so the two give the same bits (a NaN's sign aside: tests/test_fused.py).

`task_arithmetic_bf16` and `linear_bf16` go further for bf16 jobs (MergeMethod.merge_bf16): the
inputs' stored bf16 bits in, the output's bf16 bits out, widening and rounding inside the tile,
so neither the float32 inputs nor the float32 result ever reach memory.

Compiled by streammerge/jit.py where numba is importable; elsewhere `available()` is False
and the callers keep their numpy code, which is also the tests' reference.
"""

from __future__ import annotations

import numpy as np

from ..jit import available, jit

TILE = 512  # entries per tile: (models + 3) x TILE float32 stay in L1


@jit
def _family_merge(base, models, keep, masked, zero, mul, div, w, elect, normalize, lin_div, lam, scale_lam, out, work):
    """One row group of a TIES-family merge; the arrays are flat float32, `keep` (N, L) bool.

    Per model i (in order): d = models[i] - base; zero[i]: d * 0; else masked[i]: d * keep[i],
    then d * mul[i] (the L1 scale, or 1) and d / div[i] (the inverse keep probability, or 1);
    then d * w[i]. With `elect`: the TIES election of ops/consensus.py (total in order, elected
    sign total >= 0, counted = d * sign > 0, S and D summed from the first term), S + 0, and
    with `normalize` S / D (a zero D counting as 1). Without: S = d_1 + ... + d_N, S + 0, and
    with `normalize` S / lin_div. Then S * lam where `scale_lam`, and out = base + S.
    `work` is (N + 3, TILE) float32 scratch.
    """
    N = len(models)
    L = base.shape[0]
    T = work.shape[1]
    z = np.float32(0)
    tot = work[N]
    S = work[N + 1]
    D = work[N + 2]
    for t0 in range(0, L, T):
        n = min(T, L - t0)
        b = base[t0 : t0 + n]
        for i in range(N):
            m = models[i][t0 : t0 + n]
            d = work[i]
            for j in range(n):
                d[j] = m[j] - b[j]
            if zero[i]:
                for j in range(n):
                    d[j] = d[j] * z
            else:
                if masked[i]:
                    k = keep[i, t0 : t0 + n]
                    for j in range(n):
                        d[j] = d[j] * np.float32(k[j])
                if mul[i] != 1:
                    s = mul[i]
                    for j in range(n):
                        d[j] = d[j] * s
                if div[i] != 1:
                    q = div[i]
                    for j in range(n):
                        d[j] = d[j] / q
            wi = w[i]
            for j in range(n):
                d[j] = d[j] * wi
            if i == 0:
                for j in range(n):
                    tot[j] = d[j]
            else:
                for j in range(n):
                    tot[j] = tot[j] + d[j]
        if elect:
            for i in range(N):
                d = work[i]
                wi = w[i]
                for j in range(n):
                    pos = tot[j] >= z
                    x = d[j]
                    c = np.float32((pos and x > z) or ((not pos) and x < z))
                    if i == 0:
                        S[j] = x * c
                        D[j] = c * wi
                    else:
                        S[j] = S[j] + x * c
                        D[j] = D[j] + c * wi
            for j in range(n):
                s = S[j] + z  # torch sums from +0: an all-zero sum is +0
                if normalize:
                    dj = D[j]
                    s = s / (dj + np.float32(dj == z))
                S[j] = s
        else:
            for j in range(n):
                s = tot[j] + z
                if normalize:
                    s = s / lin_div
                S[j] = s
        o = out[t0 : t0 + n]
        if scale_lam:
            for j in range(n):
                o[j] = b[j] + S[j] * lam
        else:
            for j in range(n):
                o[j] = b[j] + S[j]


def family_merge(base, models, keep, masked, zero, mul, div, w, elect, normalize, lin_div, lam, out):
    """`_family_merge` on numpy inputs (models: a sequence of flat float32 arrays)."""
    N = len(models)
    models = tuple(np.ascontiguousarray(m) for m in models)
    work = np.empty((N + 3, TILE), np.float32)
    f = np.float32
    _family_merge(
        np.ascontiguousarray(base), models, keep,
        np.asarray(masked, np.bool_), np.asarray(zero, np.bool_),
        np.asarray(mul, f), np.asarray(div, f), np.asarray(w, f),
        bool(elect), bool(normalize), f(lin_div), f(lam), f(lam) != 1, out, work,
    )  # fmt: skip
    return out


@jit
def _bf16_word(v):
    """The float32 bits v rounded to bf16 bits as dtypes.float32_into_finite rounds (nearest
    even: the carry of v + 0x7FFF + its lowest kept bit; NaN as its sign | 0x7FC0). Its twin is
    the loop of dtypes._round_bf16: kept apart because a compiled caller's disk cache is keyed on
    its own file only (jit.py), so a helper shared across files could go stale in the cache."""
    r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = ((v >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
    return np.uint16(nan if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r)


@jit
def _task_arithmetic_bf16(base, models, w, divisor, has_divisor, lam, scale_lam, out, wide, acc):
    """methods/task_arithmetic.py's merge of a row group from the inputs' bf16 bits (flat
    uint16) into the output's bf16 bits, a tile at a time: each input widened into `wide`
    ((N + 1, TILE) uint32), then the numpy code's float32 operations in its order (per model
    d = (theta_i - base) * w_i summed, then / divisor, * lam, + base) into `acc` (TILE float32),
    rounded as dtypes.float32_into_finite rounds (same bits, NaNs included). Returns the
    largest exponent field of the float32 results: 0x7F800000 if one was not finite."""
    L = base.shape[0]
    T = acc.shape[0]
    N = len(models)
    f = wide.view(np.float32)
    bits = acc.view(np.uint32)
    top = np.uint32(0)
    for t0 in range(0, L, T):
        n = min(T, L - t0)
        src = base[t0 : t0 + n]
        dst = wide[0]
        for j in range(n):
            dst[j] = np.uint32(src[j]) << np.uint32(16)
        for i in range(N):
            src = models[i][t0 : t0 + n]
            dst = wide[i + 1]
            for j in range(n):
                dst[j] = np.uint32(src[j]) << np.uint32(16)
        b = f[0]
        m = f[1]
        w0 = w[0]
        for j in range(n):
            acc[j] = (m[j] - b[j]) * w0
        for i in range(1, N):
            m = f[i + 1]
            wi = w[i]
            for j in range(n):
                acc[j] = acc[j] + (m[j] - b[j]) * wi
        if has_divisor:
            for j in range(n):
                acc[j] = acc[j] / divisor
        if scale_lam:
            for j in range(n):
                acc[j] = acc[j] * lam
        for j in range(n):
            acc[j] = acc[j] + b[j]
        o = out[t0 : t0 + n]
        for j in range(n):
            o[j] = _bf16_word(bits[j])
            top = max(top, bits[j] & np.uint32(0x7F800000))
    return top


def task_arithmetic_bf16(base, models, w, divisor, lam, out) -> bool:
    """`_task_arithmetic_bf16` on flat uint16 numpy arrays (bf16 bits; divisor None: none);
    returns whether every result was finite."""
    f = np.float32
    models = tuple(np.ascontiguousarray(m) for m in models)
    wide = np.empty((len(models) + 1, TILE), np.uint32)
    acc = np.empty(TILE, np.float32)
    top = _task_arithmetic_bf16(np.ascontiguousarray(base), models, np.asarray(w, f), f(1 if divisor is None else divisor),
                                divisor is not None, f(lam), f(lam) != 1, out, wide, acc)  # fmt: skip
    return top != 0x7F800000


@jit
def _linear_bf16(models, w, denominator, normalize, out, wide, acc):
    """methods/linear.py's merge of a row group from the models' bf16 bits (flat uint16) into
    the output's: per model in order acc = float32(float64(acc) + float64(theta_i) * w_i) (the
    numpy code's emulation of torch's fused multiply-add), then acc / denominator where
    `normalize`, rounded to bf16 as dtypes.float32_into_finite rounds. `wide` is (TILE,)
    uint32 scratch, `acc` (TILE,) float32. Returns the largest exponent field of the float32
    results: 0x7F800000 if one was not finite."""
    L = out.shape[0]
    T = acc.shape[0]
    f = wide.view(np.float32)
    bits = acc.view(np.uint32)
    top = np.uint32(0)
    for t0 in range(0, L, T):
        n = min(T, L - t0)
        for j in range(n):
            acc[j] = 0
        for i in range(len(models)):
            src = models[i][t0 : t0 + n]
            for j in range(n):
                wide[j] = np.uint32(src[j]) << np.uint32(16)
            wi = np.float64(w[i])
            for j in range(n):
                acc[j] = np.float32(np.float64(acc[j]) + np.float64(f[j]) * wi)
        if normalize:
            for j in range(n):
                acc[j] = acc[j] / denominator
        o = out[t0 : t0 + n]
        for j in range(n):
            o[j] = _bf16_word(bits[j])
            top = max(top, bits[j] & np.uint32(0x7F800000))
    return top


def linear_bf16(models, w, normalize: bool, out) -> bool:
    """`_linear_bf16` on flat uint16 numpy arrays (bf16 bits); returns whether every result
    was finite."""
    w = np.asarray(w, np.float32)
    models = tuple(np.ascontiguousarray(m) for m in models)
    top = _linear_bf16(models, w, w.sum(dtype=np.float32), bool(normalize), out, np.empty(TILE, np.uint32), np.empty(TILE, np.float32))
    return top != 0x7F800000


@jit
def _abs_delta(model, base, out):
    for j in range(out.shape[0]):
        out[j] = abs(model[j] - base[j])


def abs_delta(model: np.ndarray, base: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = |model - base| (flat float32, out of the same length), in one pass."""
    _abs_delta(model, base, out)
    return out


@jit
def _abs_delta64(model, base, keep, out, kept):
    for j in range(out.shape[0]):
        a = np.float64(abs(model[j] - base[j]))
        out[j] = a
        kept[j] = a * np.float64(keep[j])


def abs_delta64(model: np.ndarray, base: np.ndarray, keep: np.ndarray, out: np.ndarray, kept: np.ndarray):
    """out = float64(|model - base|) (the float32 difference, widened) and kept = out * keep
    (bool), in one pass: the two arrays whose float64 sums DARE's l1 rescale compares."""
    _abs_delta64(model, base, keep, out, kept)
    return out, kept
