"""mergekit's generalized task arithmetic family with sparsification, streamed.

    ties              magnitude top-k     + sign consensus   normalize=true   rescale=false
    dare_ties         random (Bernoulli)  + sign consensus   normalize=false  rescale=true
    dare_linear       random (Bernoulli)                     normalize=false  rescale=true
    breadcrumbs       magnitude outliers                     normalize=false  rescale=false
    breadcrumbs_ties  magnitude outliers  + sign consensus   normalize=false  rescale=false
    della             DELLA magprune      + sign consensus   normalize=true   rescale=true
    della_linear      DELLA magprune                         normalize=false  rescale=true

Per model i: tau_i = theta_i - theta_0 is sparsified (mask, then optional rescale), multiplied by
weight_i; then either summed (linear) or combined by TIES sign consensus: the elected sign is +
where sum_i w_i tau_i' >= 0, an entry counts only if its sign is the elected one, and
normalize divides by the sum of the weights of the entries that count (a zero divisor counts as
1). Finally lambda scales the merged delta (when != 1) and theta_0 is added. Every operation is
done in float32 in mergekit's order, so deterministic paths give mergekit's bits: ties,
breadcrumbs and breadcrumbs_ties match except where entries tie in magnitude with the top-k
threshold (mergekit's sort breaks such ties arbitrarily; we keep the lowest flat indices).
With rescale (l1), the scale is float32(sum64 before) / float32(sum64 after) where mergekit sums
in float32 with torch's thread-dependent cascade: the two scales can differ by an ulp, so those
outputs agree to ~1e-7 relative instead of bitwise. Random methods match in distribution (same
keep probability, same rescale rule, same expectation); at density >= 1 they are bit-identical.

Parameters (mergekit's, same defaults) - per model: weight (required), density (1.0),
gamma (0.01, breadcrumbs*), epsilon (0.15, della*); global: normalize, rescale, lambda (1.0),
int8_mask (false; mergekit's mask dtype, no numerical effect). One addition:

    rescale_mode  "l1" (default: mergekit's rule, the masked delta is scaled by
                  sum|tau| / sum|masked tau| over the whole tensor, unless either sum < 1e-7)
                  or "inverse_density" (the DARE paper's rule: kept entries divided by their
                  keep probability: 1/density for dare_*, 1/p_i for della*, 1/density for
                  ties and breadcrumbs). Applies only when rescale is true.

Sparsification:
  magnitude (ties)  exact top-k of |tau|, k = max(1, int(density*n)) over the whole tensor
                    (density >= 1: dense; density <= 0: all dropped). See ops/topk.py.
  magnitude_outliers (breadcrumbs*)  ascending-sort positions [n_bot, n_bot + int(density*n))
                    with n_bot = max(0, n - int(density*n) - int(gamma*n)) are kept: two exact
                    top-k selections (the entries ranked below k1 = n - n_bot - target and
                    within k2 = n - n_bot, in descending order).
  random (dare_*)   keep with probability density, from a counter-based hash of
                    (seed, tensor, model, flat index): see random_streams.py.
  della_magprune    per row (axis 1, as mergekit; a 1-D tensor is one row), keep probability
                    p = (density - eps) + 2 eps * rank/(len-1), rank of |tau| ascending
                    (ties by index); mergekit errors on rows of one element, we use p = density.

Passes (static; each is an OptionalPass whose `needed` says when it has no work):
  ties, breadcrumbs, breadcrumbs_ties: "<name>.topk.sample", "<name>.topk.select0" (collect),
      "<name>.topk.select1..3" (refinements: only after a bracket miss; see ops/topk.py), "l1"
      (only with rescale in l1 mode). One selection per model for ties, two for breadcrumbs*.
  dare_ties, dare_linear: "l1" (only with rescale in l1 mode; it is the default for dare).
  della, della_linear: "della1d" (1-D tensors only: their single row spans the whole tensor, so
      its ranks are computed in the reduce), "l1" (rescale in l1 mode, the default).
Every map returns O(1) numbers (or the bounded top-k candidates); merge is one read of the block.

Where numba is importable (streammerge/jit.py), the merge of each row group is one compiled loop
(ops/fused.py: masks applied, rescaled, weighted, elected and added to the base in one pass;
della keeps the numpy loop, its divisor being per entry), and |tau| for the masks and the l1
sums is one pass too; the numpy code below stays the reference and the path without numba.
"""

from __future__ import annotations

import numpy as np

from ..kernels import ties as kernels
from ..ops import fused, random_streams
from ..ops.consensus import consensus, disjoint_mean, sum_into
from ..ops.sparsify import (
    DELLA,
    EPS_RESCALE,
    MAGNITUDE,
    OUTLIERS,
    RANDOM,
    Spec,
    active,
    check_della,
    check_rank1d,
    densities,
    magnitude_k,
    outlier_ks,
    weight_sum,
)
from ..ops.topk import Keeper, OptionalPass, TopK, block_size, flat, numel, scratch
from .base import Block, MergeMethod, Param, Pass, Stats, TensorParams, register, result_array, scan_elems

_F0 = np.float32(0)
_F2 = np.float32(2)


def row_chunks(block: Block, nb: int):
    """Chunks of whole rows, (c0, c1) flat offsets within the block: the engine's row group is
    one chunk (`scan_elems`; a block beyond SCAN_MAX_ELEMS goes in cache-sized chunks), not two
    or three of half its size (down_proj's 5632-entry rows made 11 + 11 + 1): every chunk costs
    ~40 numpy calls of Python, and same-run A/Bs on the 0.5B set (3 rounds) put ties at 1.09x
    (1.01-1.10) and dare_ties at 1.20x (1.19-1.29) faster than with 64 Ki-element chunks; 32 Ki
    was 0.92x / 0.78x."""
    rows = block.models[0].shape[0] if block.models[0].ndim else 1
    row = max(1, nb // max(1, rows))
    step = max(1, scan_elems(nb) // row) * row
    for c0 in range(0, nb, step):
        yield c0, min(nb, c0 + step)


# ---------------------------------------------------------------------------------------------
# per-model sparsification (the rules: ops/sparsify.py)


def _abs_delta(block: Block, i: int, sl: slice, out: np.ndarray | None = None) -> np.ndarray:
    m, b = flat(block.models[i])[sl], flat(block.base)[sl]
    if out is not None and fused.available():
        return fused.abs_delta(m, b, out[: m.size])
    d = np.subtract(m, b, out=out)
    return np.abs(d, out=d)


class _Family:
    """Everything one method of the family needs: passes, per-block masks, merge."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.topk = None
        if spec.sparsify in (MAGNITUDE, OUTLIERS):
            self.topk = TopK(f"{spec.name}.topk", self._values, self._plan)

    def unsplit(self, stats: Stats, b0: int, b1: int) -> list[tuple[int, int]]:
        """MergeMethod.unsplit: the spans where a top-k selection's tie cut was deferred."""
        return [] if self.topk is None else self.topk.spans_in(stats, b0, b1)

    # -- top-k plumbing -------------------------------------------------------------------
    @staticmethod
    def _values(block, params, stats, src, sl, out):
        return _abs_delta(block, src, sl, out)

    def _plan(self, params: TensorParams, stats: Stats, n: int) -> list[tuple[int, int]]:
        out = []
        dens = densities(params)
        for i, d in enumerate(dens):
            if active(self.spec, d, n) != "mask":
                continue
            if self.spec.sparsify == MAGNITUDE:
                out.append((i, magnitude_k(d, n)))
            else:
                gamma = float(params.per_model[i]["gamma"])
                k1, k2 = outlier_ks(d, gamma, n)
                out.append((i, k1))
                out.append((i, k2))
        return out

    # -- passes ---------------------------------------------------------------------------
    def passes(self) -> tuple[Pass, ...]:
        out: list[Pass] = []
        if self.topk is not None:
            out.extend(self.topk.passes)
        if self.spec.sparsify == DELLA:
            out.append(OptionalPass("della1d", self._rank1d_map, self._rank1d_reduce, needed=self._rank1d_needed))
        # l1 sums add up over any rows; a top-k method's masks need its boundary block whole
        out.append(OptionalPass("l1", self._l1_map, self._l1_reduce, needed=self._l1_needed, row_groups=self.topk is None))
        return tuple(out)

    def _l1_models(self, params: TensorParams, n: int) -> list[int]:
        if not params.globals["rescale"] or params.globals["rescale_mode"] != "l1":
            return []
        return [i for i, d in enumerate(densities(params)) if active(self.spec, d, n) == "mask"]

    def _l1_needed(self, params, stats) -> bool:
        return bool(params.globals["rescale"]) and params.globals["rescale_mode"] == "l1"

    def _l1_map(self, block: Block, params: TensorParams, stats: Stats):
        n = numel(block.shape)
        models = self._l1_models(params, n)
        if not models:
            return None
        nb = block_size(block)
        ctx = _BlockMasks(self, block, params, stats)
        sums = np.zeros((len(models), 2), dtype=np.float64)
        compiled = fused.available() and self.spec.sparsify == RANDOM  # masks drawn without tau
        for c0, c1 in row_chunks(block, nb):
            d64 = scratch("l1d64", c1 - c0, np.float64)
            if compiled:  # |tau| and its masked copy widened in one pass; the same sums (numpy's reduce)
                k64 = scratch("l1k64", c1 - c0, np.float64)
                for r, i in enumerate(models):
                    mask, _ = ctx.mask(i, None, c0, c1, keep=True)
                    fused.abs_delta64(flat(block.models[i])[c0:c1], flat(block.base)[c0:c1], mask, d64, k64)
                    sums[r, 0] += float(np.add.reduce(d64))
                    sums[r, 1] += float(np.add.reduce(k64))
                continue
            for r, i in enumerate(models):
                d = np.subtract(flat(block.models[i])[c0:c1], flat(block.base)[c0:c1], out=scratch("l1d", c1 - c0))
                np.abs(d, out=d)
                sums[r, 0] += _sum64(d, d64)
                mask, _ = ctx.mask(i, d, c0, c1, absolute=True, keep=True)
                np.multiply(d, mask, out=d)
                sums[r, 1] += _sum64(d, d64)
        return (models, sums)

    def _l1_reduce(self, partials, params, stats):
        partials = [p for p in partials if p is not None]
        if not partials:
            return {}
        models = partials[0][0]
        total = np.zeros((len(models), 2), dtype=np.float64)
        for _, s in partials:
            total += s
        scale = np.ones(len(models), dtype=np.float32)
        apply = np.zeros(len(models), dtype=bool)
        for r in range(len(models)):
            before = np.float32(total[r, 0])
            after = np.float32(total[r, 1])
            if not (before < EPS_RESCALE or after < EPS_RESCALE):
                scale[r] = before / after  # float32 / float32, as mergekit
                apply[r] = True
        return {
            "l1.models": np.asarray(models, dtype=np.int64),
            "l1.scale": scale,
            "l1.apply": apply,
        }

    def _rank1d_needed(self, params, stats) -> bool:
        return True

    def _rank1d_map(self, block: Block, params: TensorParams, stats: Stats):
        if len(block.shape) != 1:
            return None
        n = numel(block.shape)
        models = [i for i, d in enumerate(densities(params)) if active(self.spec, d, n) == "mask"]
        if not models:
            return None
        check_rank1d(block.tensor, n)
        return {i: _abs_delta(block, i, slice(None)) for i in models}

    def _rank1d_reduce(self, partials, params, stats):
        partials = [p for p in partials if p is not None]
        if not partials:
            return {}
        out = {}
        for i in partials[0]:
            mags = np.concatenate([p[i] for p in partials])
            out[f"della1d.{i}"] = _rank_norm(mags.reshape(1, -1)).reshape(-1)
        return out

    # -- merge ----------------------------------------------------------------------------
    def merge(self, block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
        base = block.base
        if not block.models:
            out = result_array(block)
            np.copyto(out, base)
            return out
        n = numel(block.shape)
        nb = block_size(block)
        N = len(block.models)
        weights = [np.float32(w) for w in params.model_values("weight")]
        dens = densities(params)
        states = [active(self.spec, d, n) for d in dens]
        ctx = _BlockMasks(self, block, params, stats)
        rescale = bool(params.globals["rescale"])
        mode = params.globals["rescale_mode"]
        l1_scale: dict[int, np.float32] = {}
        if rescale and mode == "l1" and "l1.models" in stats:
            for i, s, a in zip(stats["l1.models"], stats["l1.scale"], stats["l1.apply"]):
                if a:
                    l1_scale[int(i)] = np.float32(s)
        normalize = bool(params.globals["normalize"])
        lam = float(params.globals["lambda"])
        lam32 = np.float32(lam)

        out = result_array(block)
        bflat = flat(base)
        oflat = flat(out)
        mflat = [flat(m) for m in block.models]
        lin_div = weight_sum(weights)

        if fused.available() and self.spec.sparsify != DELLA:  # della's divisor is per entry
            self._merge_fused(ctx, bflat, mflat, oflat, nb, block, states, weights, l1_scale, lin_div)
            return out

        for c0, c1 in row_chunks(block, nb):
            L = c1 - c0
            b = bflat[c0:c1]
            ds = []
            for i in range(N):
                d = scratch(f"d{i}", L)
                np.subtract(mflat[i][c0:c1], b, out=d)
                st = states[i]
                if st == "zero":
                    np.multiply(d, _F0, out=d)
                elif st == "mask":
                    mask, div = ctx.mask(i, d, c0, c1)
                    np.multiply(d, mask, out=d)
                    if rescale:
                        if mode == "l1":
                            s = l1_scale.get(i)
                            if s is not None:
                                np.multiply(d, s, out=d)
                        elif div is not None:
                            np.divide(d, div, out=d)
                np.multiply(d, weights[i], out=d)
                ds.append(d)
            S = scratch("S", L)
            if self.spec.consensus:
                D, mb = scratch("D", L), scratch("mb", L, bool)
                consensus(ds, sum_into(ds, scratch("sw", L)), S, D, mb, scratch("x", L), weights)
                np.add(S, _F0, out=S)  # torch sums from +0: an all-zero sum is +0
                if normalize:
                    disjoint_mean(S, D, mb)
            else:
                np.copyto(S, ds[0])
                for d in ds[1:]:
                    np.add(S, d, out=S)
                np.add(S, _F0, out=S)  # torch sums from +0: an all-zero sum is +0
                if normalize:
                    np.divide(S, lin_div, out=S)
            if lam != 1:
                np.multiply(S, lam32, out=S)
            np.add(b, S, out=oflat[c0:c1])
        return out

    def _merge_fused(self, ctx, bflat, mflat, oflat, nb, block, states, weights, l1_scale, lin_div):
        """`merge`'s loop as one compiled pass per row group (ops/fused.py): the same float32
        operations in the same order, so the same bits; only the masks are drawn here."""
        params = ctx.params
        N = len(mflat)
        rescale = bool(params.globals["rescale"])
        mode = params.globals["rescale_mode"]
        masked = [st == "mask" for st in states]
        zero = [st == "zero" for st in states]
        # the rescale of a masked model, as merge's numpy loop applies it: the l1 scale (a
        # tensor-wide stat), or the divisor its mask comes with (inverse_density, below)
        mul = np.ones(N, np.float32)
        div = np.ones(N, np.float32)
        if rescale and mode == "l1":
            for i in range(N):
                if masked[i]:
                    mul[i] = l1_scale.get(i, np.float32(1))
        for c0, c1 in row_chunks(block, nb):
            L = c1 - c0
            keep = scratch("fused.keep", N * L, bool).reshape(N, L)
            for i in range(N):
                if not masked[i]:
                    continue
                if self.spec.sparsify == RANDOM:
                    m, d = ctx.mask(i, None, c0, c1)
                else:
                    u = _abs_delta(block, i, slice(c0, c1), out=scratch("fused.abs", L))
                    m, d = ctx.mask(i, u, c0, c1, absolute=True)
                np.copyto(keep[i], m)
                if rescale and mode != "l1" and d is not None:
                    div[i] = d
            fused.family_merge(
                bflat[c0:c1], [m[c0:c1] for m in mflat], keep, masked, zero, mul, div, weights,
                self.spec.consensus, params.globals["normalize"], lin_div, float(params.globals["lambda"]), oflat[c0:c1],
            )  # fmt: skip


def _sum64(x: np.ndarray, work: np.ndarray) -> float:
    """The float64 sum of float32 `x` (numpy's pairwise sum), through the float64 buffer `work`:
    widening, then a float64 reduce, takes 0.6x the time of `np.add.reduce(x, dtype=np.float64)`,
    which casts in small buffered pieces."""
    np.copyto(work, x)
    return float(np.add.reduce(work))


def _rank_norm(mags: np.ndarray) -> np.ndarray:
    """mergekit's della rank_norm along the last axis of (rows, L): rank/(L-1) in float32.

    rank = position in the ascending order of |tau| within the row, ties by index (torch's
    argsort breaks them arbitrarily). Sorting (bits << 32 | column) as uint64 keys gives the
    order without a stable argsort (about 8x faster).
    """
    rows, L = mags.shape
    if L <= 1:  # mergekit fails here (0/0); keep probability = density
        return np.full(mags.shape, 0.5, dtype=np.float32)
    key = np.ascontiguousarray(mags, dtype=np.float32).view(np.uint32).astype(np.uint64)
    key <<= np.uint64(32)
    key |= np.arange(L, dtype=np.uint64)
    key.sort(axis=1)
    key &= np.uint64(0xFFFFFFFF)
    col = key.view(np.int64)
    col += (np.arange(rows, dtype=np.int64) * L)[:, None]
    rn = np.empty(mags.size, dtype=np.float32)
    rn[col.reshape(-1)] = np.tile(np.arange(L, dtype=np.float32), rows)
    rn /= np.float32(L - 1)  # (rank+1 - min_rank) / (max_rank - min_rank), exact numerator
    return rn.reshape(mags.shape)


def _rank_norm_axis1(mags: np.ndarray) -> np.ndarray:
    """rank_norm along axis 1 of a row block (rows, L, *rest), as mergekit's argsort(dim=1)."""
    if mags.ndim == 2:
        return _rank_norm(mags)
    moved = np.moveaxis(mags, 1, -1)  # (rows, *rest, L)
    rn = _rank_norm(moved.reshape(-1, mags.shape[1]))
    return np.moveaxis(rn.reshape(moved.shape), -1, 1)


class _BlockMasks:
    """Keep masks of one block, per model: mask(i, d, c0, c1) for the chunk [c0, c1)."""

    def __init__(self, fam: _Family, block: Block, params: TensorParams, stats: Stats):
        self.fam = fam
        self.block = block
        self.params = params
        self.stats = stats
        self.spec = fam.spec
        self.n = numel(block.shape)
        self._keepers: dict[int, list[Keeper]] | None = None
        self.streams: dict[int, random_streams.Stream] = {}  # per model (random_streams.thread_stream)
        self.keys: dict[int, int] = {}  # per model: its stream's key
        self.dens = densities(params)

    def keepers(self, i: int) -> list[Keeper]:
        if self._keepers is None:
            tk = self.fam.topk
            ks = tk.keepers(self.block, self.params, self.stats)
            self._keepers = {}
            for j, kp in enumerate(ks):
                src = int(self.stats[f"{tk.name}.{j}.src"])
                self._keepers.setdefault(src, []).append(kp)
        return self._keepers.get(i, [])

    def mask(self, i: int, d: np.ndarray, c0: int, c1: int, absolute: bool = False, keep: bool = False):
        """(bool keep mask, per-element keep probability or None) for model i's chunk.

        d is tau_i for the chunk (or |tau_i| with absolute=True); it is not modified. A random
        (DARE) mask drawn with `keep` (the l1 pass) is kept for the merge, which takes it back
        instead of drawing it again (random_streams.KEPT_MASKS).
        """
        p0 = self.block.start + c0
        L = c1 - c0
        sp = self.spec.sparsify
        if sp in (MAGNITUDE, OUTLIERS):
            u = d if absolute else np.abs(d, out=scratch("abs", L))
            u = u.view(np.uint32)
            ks = self.keepers(i)
            if sp == MAGNITUDE:
                m = ks[0].mask(u, p0, out=scratch("keep", L, bool))
                div = None
                if self.params.globals["rescale_mode"] == "inverse_density":
                    div = np.float32(self.dens[i])
                return m, div
            k1, k2 = ks
            m = k2.mask(u, p0, out=scratch("keep", L, bool))
            if not k1.keeps_none:
                m &= ~k1.mask(u, p0, out=scratch("keep1", L, bool))
            div = None
            if self.params.globals["rescale_mode"] == "inverse_density":
                div = np.float32(self.dens[i])
            return m, div
        stream = self.streams.get(i)
        if stream is None:
            key = self.keys[i] = random_streams.stream_key(self.params.seed, self.block.tensor, i, self.spec.sparsify)
            stream = self.streams[i] = random_streams.thread_stream(key)
        if sp == RANDOM:
            dens = self.dens[i]
            div = np.float32(dens) if dens > 0 else None
            kept = (self.keys[i], p0, L, dens)
            if not keep:
                m = random_streams.KEPT_MASKS.take(kept)
                if m is not None:
                    return m, div
            m = stream.bernoulli_keep(p0, L, dens, out=scratch("keep", L, bool))
            if keep:
                random_streams.KEPT_MASKS.put(kept, m)
            return m, div
        # della
        eps = float(self.params.per_model[i]["epsilon"])
        dens = self.dens[i]
        check_della(self.block.tensor, i, dens, eps)
        shape = self.block.shape
        if len(shape) >= 2:
            mags = d if absolute else np.abs(d)
            rows = L // int(np.prod(shape[1:], dtype=np.int64))
            rn = _rank_norm_axis1(mags.reshape((rows,) + tuple(shape[1:]))).reshape(-1)
        elif len(shape) == 1:
            rn = np.asarray(self.stats[f"della1d.{i}"], np.float32)[p0 : p0 + L]
        else:
            rn = np.full(L, 0.5, dtype=np.float32)
        # probs = (density - epsilon) + rank_norm * 2 * epsilon, in float32 as torch
        probs = rn * _F2
        probs *= np.float32(eps)
        probs += np.float32(dens - eps)
        u = stream.uniform32(p0, L, out=scratch("unif", L))
        return np.less(u, probs, out=scratch("keep", L, bool)), probs


def _make(spec: Spec) -> MergeMethod:
    fam = _Family(spec)
    params = [
        Param("weight", float, scope="model", example=0.5, help="this model's task-vector coefficient; negative subtracts it, as in mergekit (task negation)"),
        Param("density", float, 1.0, scope="model", min=0, max=1, example=0.5, help="fraction of the task vector kept"),
    ]
    if spec.sparsify == OUTLIERS:
        params.append(Param("gamma", float, 0.01, scope="model", min=0, max=1, help="fraction of largest entries dropped"))
    if spec.sparsify == DELLA:
        params.append(Param("epsilon", float, 0.15, scope="model", min=0, max=0.5,
                            help="keep-probability spread around density (density +/- epsilon within (0, 1))"))
    params += [
        Param("normalize", bool, spec.default_normalize, help="divide by the sum of the (kept) weights"),
        Param("rescale", bool, spec.default_rescale, help="rescale the sparsified task vectors"),
        Param(
            "rescale_mode",
            str,
            "l1",
            choices=("l1", "inverse_density"),
            help="l1: keep the tensor's L1 norm (mergekit); inverse_density: divide by the keep probability (paper)",
        ),
        Param("lambda", float, 1.0, help="scale applied to the merged task vector (any number, as in mergekit)"),
        Param("int8_mask", bool, False, help="mergekit's mask dtype; no numerical effect"),
    ]
    return MergeMethod(
        name=spec.name,
        merge=fam.merge,
        params=tuple(params),
        base="required",
        passes=fam.passes(),
        # top-k methods: a span where a tie at the threshold was left to be cut is held whole
        # by one call (TopK.keeper scans it, as the passes saw it)
        row_groups=True,
        unsplit=fam.unsplit,
        # masks and the election multiply (0 * inf and NaN * 0 are NaN): a non-finite tau_i
        # leaves S non-finite, whether its entry counts or not
        nonfinite_spreads=True,
        kernel=kernels.family_kernel(spec),
        summary={
            MAGNITUDE: "TIES: top-k by magnitude, sign consensus, disjoint mean",
            RANDOM: "DARE: random drop and rescale",
            OUTLIERS: "Model Breadcrumbs: drop the largest and smallest entries",
            DELLA: "DELLA: magnitude-ranked random drop and rescale",
        }[spec.sparsify]
        + (" + sign consensus" if spec.consensus and spec.sparsify != MAGNITUDE else ""),
    )


SPECS = (
    Spec("ties", True, MAGNITUDE, True, False),
    Spec("dare_ties", True, RANDOM, False, True),
    Spec("dare_linear", False, RANDOM, False, True),
    Spec("breadcrumbs", False, OUTLIERS, False, False),
    Spec("breadcrumbs_ties", True, OUTLIERS, False, False),
    Spec("della", True, DELLA, True, True),
    Spec("della_linear", False, DELLA, False, True),
)

METHODS = {s.name: register(_make(s)) for s in SPECS}
