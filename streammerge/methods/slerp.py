"""Spherical methods: slerp, nuslerp, multislerp, karcher (mergekit 0.1.5 semantics).

All four need tensor-wide norms and dot products of (flattened) tensors. They are computed in
passes as block-invariant sums (`exact_block_sums` / `exact_reduce`, ops/exactsum.py): every block's products are
formed in float64 (a product of two float32 values is exact there), summed per row in fixed
segments (a block always holds whole rows, so a row's sum never depends on the blocking), and
the row sums are added exactly, as integers. The reduced statistics are therefore bit-identical
for any block size, worker count or block order, and within ~1e-16 relative of the exact value.
(One exception: nuslerp's non-flattened row-wise mode reduces over axis 0, so its per-column
partial sums are float64 arrays added in block order: invariant after rounding to float32
except in the ~1e-8-probability case of a float64 sum straddling a float32 rounding boundary.)

mergekit computes the same quantities with float32 torch reductions (its own summation order,
chunked at 2**20 elements for slerp) and float32 SLEEF transcendental functions, so a norm, dot
product, acos or sin of ours can differ from mergekit's by the last bit or so of float32. After
those reductions every scalar follows mergekit's float32 formula step by step, and the
elementwise part repeats its float32 operations in its order: given the same float32 scalars the
output is bit-identical (tests/test_methods_slerp.py checks that on inputs whose reductions are
exact, and checks the general case against a bound).

Per method:

* slerp (base required, one other model, param `t`): one pass (|a|^2, |b|^2, a.b), then
  coef_a * base + coef_b * other with mergekit's coefficients (lerp when |cos| > 0.9995).
* nuslerp (base optional, two models, `weight`, `nuslerp_flatten`=True, `nuslerp_row_wise`=
  False): flattened -> one pass for the whole tensor; not flattened -> vectors along the last
  axis (local to a block's rows, no pass) or, with row_wise, along axis 0 (one pass whose
  partials are arrays over shape[1:]). Colinear pairs (float32 1-cos^2 <= 1e-16) use lerp.
* multislerp (base optional, `weight`, `normalize_weights`=True, `eps`=1e-8): pass 1 is the
  Gram matrix of the (task) vectors; it gives their norms, the norm of the weighted mean of the
  unit vectors and the mean's dot with each unit vector. Pass 2 recomputes the last two
  elementwise (mergekit's float32 mean, exact sums) only when the weighted mean nearly cancels
  (then the Gram-matrix value would lose too many bits for mergekit's |mean| < eps test).
  Pass 3 measures the norm of the tangent residual T; T is zero in exact arithmetic (mergekit's
  tangent step is a no-op up to rounding), so pass 3 is skipped when a rounding bound proves
  cos(|T|) == 1 and sin(|T|)/|T| == 1 in float32, which is then exactly what the pass would
  have produced. Usually: one pass, then merge.
* karcher (all inputs, base included as mergekit does, `max_iter`=10, `tol`=1e-5): one pass
  for the Gram matrix of the inputs. Every iterate of mergekit's Karcher-mean iteration lies in
  the span of the unit inputs, so the whole iteration (dots, arccos, tangent norms, the
  convergence tests) runs on the N coefficients in float64 in `reduce`, exactly as mergekit's
  loop but without float32 rounding of the iterates; `merge` forms the final combination.
  mergekit rounds every iterate to float32, so its result differs from ours by its own float32
  noise (the tests bound it by |mergekit(float32) - mergekit(float64)|).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..ops.exactsum import (
    F32,
    F64,
    acos32,
    as_2d,
    cos32,
    exact_block_sums,
    exact_reduce,
    row_dots,
    sin32,
    sqrt32,
    torch_sum32,
    upper_pairs,
)
from .base import REQUIRED, Block, MergeMethod, Param, Pass, TensorParams, register

def need_inputs(block: Block, method: str, *, base: bool, lo: int, hi: int | None) -> None:
    if base and block.base is None:
        raise ValueError(f"{method} requires a base model (tensor {block.tensor})")
    n = len(block.models)
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo}..{hi}")
        extra = " besides the base" if base or block.base is not None else ""
        raise ValueError(f"{method} needs {want} input model(s){extra}, got {n} (tensor {block.tensor})")


def _g(params: TensorParams, name: str, default: Any) -> Any:
    return params.globals.get(name, default)


# ----------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------

_SLERP_EPS = F32(1e-8)
_SLERP_DOT_THRESHOLD = F32(0.9995)


def _slerp_map(block: Block, params: TensorParams, stats) -> list:
    need_inputs(block, "slerp", base=True, lo=1, hi=1)
    return exact_block_sums((block.base, block.models[0]), ((0, 0), (1, 1), (0, 1)))


def slerp_coefficients(saa: float, sbb: float, sab: float, t: float) -> tuple[np.float32, np.float32]:
    """mergekit.merge_methods.slerp.slerp's coefficients, float32 step by step."""
    na, nb = sqrt32(saa), sqrt32(sbb)
    na = na if na > _SLERP_EPS else F32(1)  # torch.where(norm > eps, norm, 1): nan -> 1 too
    nb = nb if nb > _SLERP_EPS else F32(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dot = F32(sab / (F64(na) * F64(nb)))
    dot = np.clip(dot, F32(-1), F32(1))
    t32 = F32(t)
    omt = F32(F32(1) - t32)
    if abs(dot) > _SLERP_DOT_THRESHOLD:
        return omt, t32
    theta = acos32(dot)
    sin_theta = sin32(theta)
    with np.errstate(invalid="ignore", divide="ignore"):
        ca = F32(sin32(F32(omt * theta)) / sin_theta)
        cb = F32(sin32(F32(t32 * theta)) / sin_theta)
    return ca, cb


def _slerp_reduce(partials, params: TensorParams, stats) -> dict:
    saa, sbb, sab = exact_reduce(partials, 3)
    ca, cb = slerp_coefficients(saa, sbb, sab, params.globals["t"])
    return {"slerp_coef_a": float(ca), "slerp_coef_b": float(cb)}


def slerp_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    need_inputs(block, "slerp", base=True, lo=1, hi=1)
    out = block.base * F32(stats["slerp_coef_a"])
    out += block.models[0] * F32(stats["slerp_coef_b"])
    return out


register(
    MergeMethod(
        name="slerp",
        example_models=1,
        merge=slerp_merge,
        base="required",
        params=(
            Param("t", float, REQUIRED, example=0.5, help="interpolation factor: 0 gives the base model, 1 the other model; outside [0, 1] extrapolates, as in mergekit"),
        ),
        passes=(Pass("slerp_dots", _slerp_map, _slerp_reduce),),
        summary="spherical interpolation between the base and one other model (whole-tensor angle)",
    )
)


# ----------------------------------------------------------------------------------------------
# nuslerp
# ----------------------------------------------------------------------------------------------


def _nuslerp_mode(params: TensorParams, shape: tuple[int, ...]) -> str:
    """'tensor' (one vector), 'row' (vectors along the last axis) or 'col' (along axis 0)."""
    if _g(params, "nuslerp_flatten", True) or len(shape) <= 1:
        return "tensor"
    return "col" if _g(params, "nuslerp_row_wise", False) else "row"


def _nuslerp_t(params: TensorParams) -> float:
    weights = [float(w) for w in params.model_values("weight")]
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _nuslerp_vectors(block: Block) -> tuple[np.ndarray, np.ndarray]:
    need_inputs(block, "nuslerp", base=False, lo=2, hi=2)
    v0, v1 = block.models
    if block.base is not None:
        v0 = v0 - block.base
        v1 = v1 - block.base
    return v0, v1


def nuslerp_coefficients(s00, s11, s01, t: float):
    """mergekit's nuslerp scalars per vector: (c0, c1, sin_theta, colinear), float32."""
    n0 = np.maximum(sqrt32(s00), F32(1e-7))  # clamp(min=1e-7); nan propagates
    n1 = np.maximum(sqrt32(s11), F32(1e-7))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (np.asarray(s01, F64) / (n0.astype(F64) * n1.astype(F64))).astype(F32)
    cos = np.clip(cos, F32(-1), F32(1))
    colinear = (F32(1) - cos * cos) <= F32(1e-16)
    theta = acos32(np.where(colinear, F32(0), cos))
    sin_theta = sin32(theta)
    c0 = sin32(F32(1 - t) * theta)
    c1 = sin32(F32(t) * theta)
    return c0, c1, sin_theta, colinear


def _nuslerp_map(block: Block, params: TensorParams, stats):
    mode = _nuslerp_mode(params, block.shape)
    if mode == "row":
        need_inputs(block, "nuslerp", base=False, lo=2, hi=2)
        return None  # vectors lie within rows: merge computes their norms itself
    v0, v1 = _nuslerp_vectors(block)
    if mode == "tensor":
        return exact_block_sums((v0, v1), ((0, 0), (1, 1), (0, 1)))
    if mode == "col":
        r0, r1 = as_2d(v0), as_2d(v1)
        # Per-column partials (arrays over shape[1:]), float64; summed in block order.
        return np.stack(
            [
                np.einsum("rc,rc->c", r0, r0, dtype=F64),
                np.einsum("rc,rc->c", r1, r1, dtype=F64),
                np.einsum("rc,rc->c", r0, r1, dtype=F64),
            ]
        )


def _nuslerp_reduce(partials, params: TensorParams, stats) -> dict:
    parts = [p for p in partials if p is not None]
    if not parts:
        return {}
    t = _nuslerp_t(params)
    if isinstance(parts[0], list):
        s = exact_reduce(parts, 3)
    else:
        s = parts[0].copy()
        for p in parts[1:]:
            s += p
    c0, c1, sin_theta, colinear = nuslerp_coefficients(s[0], s[1], s[2], t)
    return {
        "nuslerp_c0": np.asarray(c0, F32),
        "nuslerp_c1": np.asarray(c1, F32),
        "nuslerp_sin": np.asarray(sin_theta, F32),
        "nuslerp_colinear": np.asarray(colinear, bool),
    }


def _nuslerp_combine(v0, v1, c0, c1, sin_theta, colinear, t: float) -> np.ndarray:
    """where(colinear, (1-t) v0 + t v1, (c0 v0 + c1 v1) / sin_theta), mergekit's float32 ops."""
    colinear = np.asarray(colinear)
    lin = None
    if colinear.any():
        lin = v0 * F32(1 - t)
        lin += v1 * F32(t)
        if colinear.all():
            return lin
    sph = v0 * c0
    sph += v1 * c1
    with np.errstate(invalid="ignore", divide="ignore"):
        sph /= sin_theta
    if lin is None:
        return sph
    return np.where(colinear, lin, sph)


def nuslerp_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    mode = _nuslerp_mode(params, block.shape)
    t = _nuslerp_t(params)
    v0, v1 = _nuslerp_vectors(block)
    if v0.size == 0:
        return np.array(v0, dtype=F32, copy=True)
    if mode == "row":
        last = block.shape[-1]
        r0, r1 = v0.reshape(-1, last), v1.reshape(-1, last)
        s = row_dots((r0, r1), ((0, 0), (1, 1), (0, 1)))
        c0, c1, sin_theta, colinear = (a[:, None] for a in nuslerp_coefficients(s[:, 0], s[:, 1], s[:, 2], t))
        out = _nuslerp_combine(r0, r1, c0, c1, sin_theta, colinear, t).reshape(v0.shape)
    else:
        c0, c1, sin_theta, colinear = (
            stats["nuslerp_c0"],
            stats["nuslerp_c1"],
            stats["nuslerp_sin"],
            stats["nuslerp_colinear"],
        )
        if mode == "col":
            r0, r1 = as_2d(v0), as_2d(v1)
            c0, c1, sin_theta, colinear = (np.asarray(a).reshape(1, -1) for a in (c0, c1, sin_theta, colinear))
            out = _nuslerp_combine(r0, r1, c0, c1, sin_theta, colinear, t).reshape(v0.shape)
        else:
            c0, c1, sin_theta = F32(c0), F32(c1), F32(sin_theta)
            out = _nuslerp_combine(v0, v1, c0, c1, sin_theta, bool(colinear), t)
    if block.base is not None:
        out += block.base  # mergekit: base + nuslerp(...); float addition commutes
    return out


register(
    MergeMethod(
        name="nuslerp",
        merge=nuslerp_merge,
        base="optional",
        params=(
            Param("weight", float, REQUIRED, scope="model", example=0.5, help="relative weight; t = w2 / (w1 + w2) (0.5 when they sum to 0); any sign, as in mergekit"),
            Param(
                "nuslerp_row_wise",
                bool,
                False,
                help="without flattening, interpolate vectors along axis 0 (columns) instead of the last axis",
            ),
            Param("nuslerp_flatten", bool, True, help="treat the whole tensor as one vector"),
        ),
        passes=(Pass("nuslerp_dots", _nuslerp_map, _nuslerp_reduce),),
        summary="slerp of two models (or their task vectors, with a base) with weights, optionally per row",
    )
)


# ----------------------------------------------------------------------------------------------
# multislerp
# ----------------------------------------------------------------------------------------------


def _ms_deltas(block: Block) -> list[np.ndarray]:
    need_inputs(block, "multislerp", base=False, lo=1, hi=None)
    if block.base is None:
        return list(block.models)
    return [m - block.base for m in block.models]


def _ms_units(block: Block, stats) -> list[np.ndarray]:
    """unit_tensors = tensors / (norms + eps), float32 (fresh arrays)."""
    eps = F32(stats["ms_eps"])
    out = []
    for x, n in zip(block.models, stats["ms_norms"]):
        q = F32(F32(n) + eps)
        if block.base is None:
            out.append(x / q)
        else:
            d = np.subtract(x, block.base)
            d /= q
            out.append(d)
    return out


def _ms_weighted_sum(vectors, weights, scratch=None) -> np.ndarray:
    """(vectors * weights.view(-1, 1)).sum(0): float32 products, summed in model order."""
    acc = vectors[0] * F32(weights[0])
    tmp = np.empty_like(acc) if scratch is None else scratch
    for v, w in zip(vectors[1:], weights[1:]):
        np.multiply(v, F32(w), out=tmp)
        acc += tmp
    return acc


def _ms_map_gram(block: Block, params: TensorParams, stats):
    deltas = _ms_deltas(block)
    if len(deltas) == 1:
        return None
    return exact_block_sums(deltas, upper_pairs(len(deltas)))


_MS_ERROR = (
    "The weighted sum of the input tensors is zero. This occurs when "
    "antipodal vectors or sets of vectors have weights that exactly "
    "balance out (e.g., vectors a,-a with equal weights). Try using "
    "different weights if you have antipodal vectors."
)

# Below this tangent norm, float32 cos(x) == 1 and sin(x) / x == 1 (cos(x) rounds to 1 for
# x < 2**-12, sin(x) to x for x < ~4e-4); a margin of 2 is kept.
_MS_TINY_TANGENT = 2.0**-13
# |mean|^2 from the Gram matrix is used when it keeps at least this share of (sum |w_i u_i|)^2,
# i.e. when cancellation costs at most ~20 of float64's 53 bits; otherwise pass 2 measures
# the float32 mean elementwise, as mergekit does.
_MS_CANCELLATION = 1e-6


def _ms_reduce_gram(partials, params: TensorParams, stats) -> dict:
    weights = np.asarray([float(w) for w in params.model_values("weight")], dtype=F32)
    n = len(weights)
    if n == 1:
        return {"ms_single": True}
    if _g(params, "normalize_weights", True):
        weights = weights / torch_sum32(weights)
    eps = F32(_g(params, "eps", 1e-8))
    pairs = upper_pairs(n)
    flat = exact_reduce(partials, len(pairs))
    gram = np.zeros((n, n), dtype=F64)
    for (i, j), v in zip(pairs, flat):
        gram[i, j] = gram[j, i] = v
    norms = sqrt32(np.diag(gram))
    out = {
        "ms_single": False,
        "ms_eps": float(eps),
        "ms_weights": weights.astype(F32),
        "ms_norms": norms.astype(F32),
        "ms_avg_norm": float(torch_sum32(norms * weights)),
        "ms_direct": False,
    }
    # units u_i = delta_i / q_i with mergekit's float32 divisor q_i = |delta_i| + eps
    q = (norms + eps).astype(F64)
    w = weights.astype(F64)
    with np.errstate(all="ignore"):
        gu = gram / np.outer(q, q)
        um = gu @ w  # u_i . mean
        mm = float(w @ um)  # |mean|^2
        size = float(np.sum(np.abs(w) * np.sqrt(np.abs(np.diag(gu)))))
    if np.isfinite(gu).all() and mm >= _MS_CANCELLATION * size * size:
        out.update(_ms_mean_stats(mm, um, weights, eps))
        out["ms_direct"] = True
    return out


def _ms_mean_stats(mm: float, um: np.ndarray, weights: np.ndarray, eps: np.float32) -> dict:
    """From |mean|^2 and u_i . mean (float64): mergekit's mean_norm test, dots and fallback."""
    n = len(weights)
    mean_norm = sqrt32(mm)
    if mean_norm < eps:
        if n == 2:
            return {"ms_fallback": True, "ms_need_tangent": False}
        raise ValueError(_MS_ERROR)
    with np.errstate(invalid="ignore", divide="ignore"):
        dots = (np.asarray(um, F64) / F64(mean_norm)).astype(F32)
    # Bound on the float32 tangent residual T = sum_i w_i (u_i - d_i m) as `merge` computes it
    # (it is exactly 0 in exact arithmetic; see the module docstring): |T| <= c * 2**-24 *
    # sum|w_i| with c about 3n + 12 from the roundings of u_i, m, m/|m|, d_i and the float32
    # products and sums. When |T| + eps is surely below _MS_TINY_TANGENT, pass 3 is not needed.
    bound = 4.0 * (n + 4) * 2.0**-24 * float(np.sum(np.abs(weights.astype(F64)))) + float(eps)
    need = not (bound < _MS_TINY_TANGENT and np.isfinite(dots).all() and np.isfinite(mean_norm))
    return {
        "ms_fallback": False,
        "ms_mean_norm": float(mean_norm),
        "ms_dots": dots,
        "ms_need_tangent": bool(need),
    }


def _ms_map_mean(block: Block, params: TensorParams, stats):
    if stats["ms_single"] or stats["ms_direct"]:
        return None
    units = _ms_units(block, stats)
    mean = _ms_weighted_sum(units, stats["ms_weights"])
    xs = [mean, *units]
    return exact_block_sums(xs, [(0, 0)] + [(i, 0) for i in range(1, len(xs))])


def _ms_reduce_mean(partials, params: TensorParams, stats) -> dict:
    if stats["ms_single"] or stats["ms_direct"]:
        return {}
    n = len(stats["ms_norms"])
    s = exact_reduce(partials, n + 1)
    return _ms_mean_stats(float(s[0]), s[1:], stats["ms_weights"], F32(stats["ms_eps"]))


def _ms_tangent(block: Block, stats) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's normalized mean and tangent_result, float32, in its operation order."""
    units = _ms_units(block, stats)
    weights = stats["ms_weights"]
    tmp = np.empty_like(units[0])
    mean = _ms_weighted_sum(units, weights, tmp)
    mean /= F32(stats["ms_mean_norm"])
    for u, d in zip(units, stats["ms_dots"]):  # tangent_vectors = unit - dots * mean, in place
        np.multiply(mean, F32(d), out=tmp)
        u -= tmp
    return mean, _ms_weighted_sum(units, weights, tmp)


def _ms_map_tangent(block: Block, params: TensorParams, stats):
    if stats["ms_single"] or not stats["ms_need_tangent"]:
        return None
    _, tangent = _ms_tangent(block, stats)
    return exact_block_sums((tangent,), ((0, 0),))


def _ms_reduce_tangent(partials, params: TensorParams, stats) -> dict:
    if stats["ms_single"] or stats["ms_fallback"]:
        return {}
    if not stats["ms_need_tangent"]:
        return {"ms_cos": 1.0, "ms_sinc": 1.0}
    (sq,) = exact_reduce(partials, 1)
    tn = F32(sqrt32(sq) + F32(stats["ms_eps"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = F32(sin32(tn) / tn)
    return {"ms_cos": float(cos32(tn)), "ms_sinc": float(sinc)}


def multislerp_check(params: TensorParams) -> str | None:
    """Weights (of any sign, as in mergekit) that sum to 0 cannot be normalized: mergekit divides
    by 0 and writes NaN everywhere."""
    weights = [float(w) for w in params.model_values("weight")]
    if len(weights) > 1 and _g(params, "normalize_weights", True) and torch_sum32(weights) == 0:
        return f"the weights {weights} sum to 0, and normalize_weights divides by their sum; change them or set normalize_weights: false"
    return None


def multislerp_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    if stats["ms_single"]:
        need_inputs(block, "multislerp", base=False, lo=1, hi=1)
        return block.models[0].copy()
    if stats["ms_fallback"]:
        d = _ms_deltas(block)
        w = stats["ms_weights"]
        out = d[0] * F32(w[0])
        out += d[1] * F32(w[1])
    else:
        mean, tangent = _ms_tangent(block, stats)
        cos_tn, sinc = F32(stats["ms_cos"]), F32(stats["ms_sinc"])
        out = mean if cos_tn == 1 else mean * cos_tn
        out += tangent if sinc == 1 else tangent * sinc
        out *= F32(stats["ms_avg_norm"])
    if block.base is not None:
        out += block.base
    return out


register(
    MergeMethod(
        name="multislerp",
        merge=multislerp_merge,
        base="optional",
        params=(
            Param("weight", float, REQUIRED, scope="model", example=0.5, help="this model's barycentric weight; any sign, as in mergekit"),
            Param("normalize_weights", bool, True, help="divide the weights by their sum"),
            Param("eps", float, 1e-8, min=0, help="numerical-stability constant"),
        ),
        passes=(
            Pass("multislerp_gram", _ms_map_gram, _ms_reduce_gram),
            Pass("multislerp_mean", _ms_map_mean, _ms_reduce_mean),
            Pass("multislerp_tangent", _ms_map_tangent, _ms_reduce_tangent),
        ),
        summary="barycentric interpolation of several models on the hypersphere (optionally of task vectors)",
        check=multislerp_check,
    )
)


# ----------------------------------------------------------------------------------------------
# karcher
# ----------------------------------------------------------------------------------------------


def _karcher_map(block: Block, params: TensorParams, stats):
    need_inputs(block, "karcher", base=False, lo=1, hi=None)
    n = len(block.models)
    if n == 1:
        return None
    return exact_block_sums(block.models, upper_pairs(n))


def karcher_coefficients(gram: np.ndarray, max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """Coefficients k with karcher(x_1..x_n) = sum_j k_j x_j, from the Gram matrix of the x_j.

    mergekit.merge_methods.karcher.karcher_merge_tensors, run on coefficients in float64:
    mean = sum_j beta_j u_j with u_j = x_j / |x_j|, so mean . u_i = (G beta)_i, |mean|^2 =
    beta' G beta, and tangent = sum_i c_i (u_i - d_i mean) has coefficients
    c - (sum_i c_i d_i) beta.
    """
    n = gram.shape[0]
    alphas = [1.0 / n] * n
    with np.errstate(invalid="ignore"):
        norms64 = np.sqrt(np.diag(gram))
    norms32 = norms64.astype(F32)
    valid = [i for i in range(n) if float(norms32[i]) > tol]
    if not valid:
        return np.zeros(n, dtype=F64)
    alpha_sum = sum(alphas[i] for i in valid)
    na = np.array([alphas[i] / alpha_sum for i in valid], dtype=F64)
    nv = norms64[valid]
    with np.errstate(invalid="ignore", divide="ignore"):
        g = gram[np.ix_(valid, valid)] / np.outer(nv, nv)

    def norm(c):
        return math.sqrt(max(float(c @ g @ c), 0.0))

    mean_norm = norm(na)
    if mean_norm < tol:
        beta = np.zeros(len(valid), dtype=F64)
        beta[0] = 1.0
    else:
        beta = na / mean_norm
    for _ in range(max_iter):
        dots = np.clip(g @ beta, -1.0, 1.0)
        thetas = np.arccos(dots)
        tangent = np.zeros(len(valid), dtype=F64)
        for i, (alpha, dot, theta) in enumerate(zip(na, dots, thetas)):
            if theta < tol:
                continue
            coef = alpha * (theta / math.sin(theta))
            tangent[i] += coef
            tangent -= (coef * dot) * beta
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        beta = math.cos(tangent_norm) * beta + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(beta)
        if unit_norm > tol:
            beta = beta / unit_norm
    scale = sum(a * float(nrm) for a, nrm in zip(alphas, norms64))
    out = np.zeros(n, dtype=F64)
    out[valid] = scale * beta / nv
    return out


def _karcher_reduce(partials, params: TensorParams, stats) -> dict:
    parts = [p for p in partials if p is not None]
    if not parts:
        return {"karcher_single": True}
    n = len(params.per_model)
    pairs = upper_pairs(n)
    flat = exact_reduce(parts, len(pairs))
    gram = np.zeros((n, n), dtype=F64)
    for (i, j), v in zip(pairs, flat):
        gram[i, j] = gram[j, i] = v
    coefs = karcher_coefficients(gram, int(_g(params, "max_iter", 10)), float(_g(params, "tol", 1e-5)))
    return {"karcher_single": False, "karcher_coefs": coefs.astype(F32)}


def karcher_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    need_inputs(block, "karcher", base=False, lo=1, hi=None)
    if stats.get("karcher_single", len(block.models) == 1):
        return block.models[0].copy()
    coefs = stats["karcher_coefs"]
    out = block.models[0] * F32(coefs[0])
    for x, k in zip(block.models[1:], coefs[1:]):
        out += x * F32(k)
    return out


register(
    MergeMethod(
        name="karcher",
        merge=karcher_merge,
        base="unused",
        params=(
            Param("max_iter", int, 10, min=0, help="maximum number of Karcher-mean iterations"),
            Param("tol", float, 1e-5, min=0, help="convergence tolerance (and minimum norm of a usable input)"),
        ),
        passes=(Pass("karcher_gram", _karcher_map, _karcher_reduce),),
        summary="weighted Karcher (Riemannian) mean of the models on the hypersphere, rescaled by mean norm",
    )
)
