"""Per-tensor sign-conflict analysis of N task vectors, as streamed passes (docs/methods.md section 2).

`conflict_method(n_tasks, denoise_q)` is a stats-only `MergeMethod` (merge=None, base required):
the engine maps its passes over every row block of a tensor and reduces the partials in block
order; the results are the final stats. With tau_t = theta_t - theta_0 (float32 subtraction, as
the merge methods do), for the n entries p of one tensor:

    n                 int      number of elements
    n_tasks           int      N
    nonzero           (N,)     #p with tau_t,p != 0
    elected_conflict  (N,)     #p with tau_t,p != 0 and sign(tau_t,p) != s_p
    pair_conflict     (N, N)   #p with sign(tau_t,p) * sign(tau_u,p) < 0 (symmetric, zero diagonal)
    pair_overlap      (N, N)   #p with tau_t,p != 0 and tau_u,p != 0 (diagonal = nonzero)
    sq_norm           (N,)     sum_p tau_t,p^2                      (float64)
    dot               (N, N)   sum_p tau_t,p tau_u,p (diagonal = sq_norm)   (float64)
    denoise_q         float    q;  denoise_k  int  k = int(q * n) (0 when q >= 1: no denoising)

Elected sign: s_p = +1 if S_p >= 0 else -1, S_p = sum_t tau_t,p summed in float64 in task order
(TIES's convention; at an exact cancellation S_p == 0 the elected sign is +, so the tasks with
tau_t,p < 0 count as conflicting there and those with tau_t,p > 0 do not). The float64 sum of a
few float32 deltas of similar magnitude is exact (always so for bf16/fp16-derived deltas), so
the sign is the exact sign of the sum except in contrived cases (magnitudes 2**29 apart).
This can differ from ties.py's float32 election only where the float32 sum rounds to 0 or
flips, i.e. essentially never on real checkpoints.

Denoised variant (denoise_q = q < 1): for each task t the "counted" entries are task t's top-k
entries by |tau_t,p|, k = int(q * n), in the order (|tau| descending, flat index ascending) -
the exact selection of `_topk.TopK`, so exactly k entries are selected and ties at the
threshold go to the lowest flat indices whatever the blocking. The denoised task vector is
tau^_t = tau_t on its counted entries, 0 elsewhere (TIES's trimmed vector), and the denoised
statistics are the same counts computed on tau^ instead of tau:

    nonzero_denoised           (N,)    #p with tau^_t,p != 0 (= min(k, nonzero_t) up to ties of 0)
    elected_conflict_denoised  (N,)    #p with tau^_t,p != 0 and sign(tau^_t,p) != s^_p,
                                       s^_p = + if sum_t tau^_t,p >= 0 else -  (the sign is
                                       elected among the counted entries only, as TIES does
                                       after trimming)
    pair_conflict_denoised     (N, N)  #p with sign(tau^_t,p) * sign(tau^_u,p) < 0, i.e. both
                                       counted and of opposite signs
    pair_overlap_denoised      (N, N)  #p with tau^_t,p != 0 and tau^_u,p != 0 (both counted);
                                       the summary's denoised pairwise fraction divides by it

Entries with tau == 0 never count (a task with fewer than k nonzero entries contributes only
its nonzero ones). NaN deltas count as zero in the counts (and make sq_norm/dot NaN).

Exactness: the counts are integers and identical for any block size. sq_norm and dot are sums
of exact float64 products (a float32 product fits in 53 bits) accumulated in float64 per chunk
and per block, so they agree across block sizes to float64 rounding: relative error of order
1e-16 * log2(n) for sq_norm, absolute error of that order times ||tau_t|| ||tau_u|| for dot.
That is far below anything the report shows.

Passes: with q < 1 the five `TopK` passes "conflict.topk.*" (sample, select0..3; one selection per task;
sample + collect resolve ordinary data, see _topk.py) then "conflict.count"; with q >= 1 only
"conflict.count". The count pass reads each block once, in chunks of `_topk.CHUNK` elements,
and returns O(N^2) numbers per block.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import StreammergeError
from ..methods._topk import CHUNK, TopK, as_u32, block_size, chunks, flat, numel, scratch
from ..methods.base import Block, MergeMethod, Pass, Stats, TensorParams
from ..methods.inmemory import run_passes

NAME = "conflict-analysis"
TOPK_NAME = "conflict.topk"

COUNT_KEYS = ("nonzero", "elected_conflict", "pair_conflict", "pair_overlap")
FLOAT_KEYS = ("sq_norm", "dot")
DENOISED_KEYS = (
    "nonzero_denoised",
    "elected_conflict_denoised",
    "pair_conflict_denoised",
    "pair_overlap_denoised",
)


def _abs_delta(block: Block, t: int, sl: slice, out: np.ndarray | None = None) -> np.ndarray:
    d = np.subtract(flat(block.models[t])[sl], flat(block.base)[sl], out=out)
    return np.abs(d, out=d)


class _Conflict:
    def __init__(self, n_tasks: int, denoise_q: float):
        if int(n_tasks) != n_tasks or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
        q = float(denoise_q)
        if not (0.0 <= q <= 1.0) or q != q:
            raise ValueError(f"denoise_q must be within [0, 1], got {denoise_q!r}")
        self.N = int(n_tasks)
        self.q = q
        self.denoised = q < 1.0
        self.topk = TopK(TOPK_NAME, self._values, self._plan) if self.denoised else None

    # -- top-k plumbing ---------------------------------------------------------------------
    @staticmethod
    def _values(block, params, stats, src, sl, out):
        return _abs_delta(block, src, sl, out)

    def k(self, n: int) -> int:
        return int(self.q * n) if self.denoised else 0

    def _plan(self, params: TensorParams, stats: Stats, n: int) -> list[tuple[int, int]]:
        return [(t, self.k(n)) for t in range(self.N)]

    # -- passes -------------------------------------------------------------------------------
    def passes(self) -> tuple[Pass, ...]:
        out: list[Pass] = []
        if self.topk is not None:
            out.extend(self.topk.passes)
        out.append(Pass("conflict.count", self._count_map, self._count_reduce))
        return tuple(out)

    def _check(self, block: Block) -> None:
        if block.base is None:
            raise StreammergeError(f"{block.tensor}: conflict analysis needs the base model's tensor")
        if len(block.models) != self.N:
            raise StreammergeError(
                f"{block.tensor}: conflict analysis was set up for {self.N} tasks, got {len(block.models)} models"
            )

    def _count_map(self, block: Block, params: TensorParams, stats: Stats):
        self._check(block)
        N = self.N
        nb = block_size(block)
        acc = {
            "nonzero": np.zeros(N, np.int64),
            "elected_conflict": np.zeros(N, np.int64),
            "pair_conflict": np.zeros((N, N), np.int64),
            "pair_overlap": np.zeros((N, N), np.int64),
            "dot": np.zeros((N, N), np.float64),
            "n": numel(block.shape),
            "nb": nb,
        }
        if self.denoised:
            for k in DENOISED_KEYS:
                acc[k] = np.zeros((N, N) if k.startswith("pair") else N, np.int64)
            keepers = self.topk.keepers(block, params, stats)
            # selection j is task j (the plan lists one selection per task, in task order)
            assert [self.topk.source(stats, j) for j in range(len(keepers))] == list(range(N))
        bflat = flat(block.base)
        mflat = [flat(m) for m in block.models]
        for c0, c1 in chunks(nb, CHUNK):
            L = c1 - c0
            tau = scratch("cf.tau", N * L).reshape(N, L)
            for t in range(N):
                np.subtract(mflat[t][c0:c1], bflat[c0:c1], out=tau[t])
            X = scratch("cf.x", N * L, np.float64).reshape(N, L)
            np.copyto(X, tau)
            acc["dot"] += X @ X.T
            pos = scratch("cf.pos", N * L).reshape(N, L)  # 0/1 as float32: counts by sgemm,
            neg = scratch("cf.neg", N * L).reshape(N, L)  # exact for L < 2**24
            b = scratch("cf.b", N * L, bool).reshape(N, L)
            np.greater(tau, 0, out=b)
            np.copyto(pos, b)
            np.less(tau, 0, out=b)
            np.copyto(neg, b)
            self._counts(X, pos, neg, acc, "", L)
            if self.denoised:
                keep = scratch("cf.keep", N * L).reshape(N, L)
                kb = scratch("cf.kb", L, bool)
                for t in range(N):
                    u = as_u32(np.abs(tau[t], out=scratch("cf.abs", L)))
                    np.copyto(keep[t], keepers[t].mask(u, block.start + c0, out=kb))
                np.multiply(pos, keep, out=pos)
                np.multiply(neg, keep, out=neg)
                np.multiply(X, keep, out=X)
                self._counts(X, pos, neg, acc, "_denoised", L)
        return acc

    @staticmethod
    def _counts(X: np.ndarray, pos: np.ndarray, neg: np.ndarray, acc: dict, sfx: str, L: int) -> None:
        """Add the counts of one chunk: X = tau (float64), pos/neg = 0/1 float32 sign masks."""
        N = X.shape[0]
        # elected sign: + where the float64 sum (task order) is >= 0
        S = scratch("cf.s", L, np.float64)
        np.copyto(S, X[0])
        for t in range(1, N):
            np.add(S, X[t], out=S)
        sp = scratch("cf.sp", L)
        np.copyto(sp, np.greater_equal(S, 0, out=scratch("cf.spb", L, bool)))
        sn = scratch("cf.sn", L)
        np.subtract(np.float32(1), sp, out=sn)
        nz = scratch("cf.nz", N * L).reshape(N, L)
        np.add(pos, neg, out=nz)
        pn = (pos @ neg.T).astype(np.int64)
        ov = (nz @ nz.T).astype(np.int64)
        acc["pair_conflict" + sfx] += pn + pn.T
        acc["pair_overlap" + sfx] += ov
        acc["nonzero" + sfx] += np.diagonal(ov)
        acc["elected_conflict" + sfx] += (neg @ sp).astype(np.int64) + (pos @ sn).astype(np.int64)

    def _count_reduce(self, partials: Sequence[Any], params: TensorParams, stats: Stats) -> dict:
        partials = [p for p in partials if p is not None]
        if not partials:
            raise StreammergeError("conflict analysis: a tensor with no blocks")
        n = int(partials[0]["n"])
        seen = sum(int(p["nb"]) for p in partials)
        if seen != n:
            raise StreammergeError(f"conflict analysis: the blocks cover {seen} of {n} elements")
        out: dict = {}
        for key, v in partials[0].items():
            if isinstance(v, np.ndarray):
                tot = v.copy()
                for p in partials[1:]:
                    tot += p[key]
                out[key] = tot
        dot = out["dot"]
        out["dot"] = (dot + dot.T) / 2  # X @ X.T is symmetric up to BLAS order: make it exactly so
        out["sq_norm"] = np.diagonal(out["dot"]).copy()
        out["n"] = n
        out["n_tasks"] = self.N
        out["denoise_q"] = float(self.q)
        out["denoise_k"] = int(self.k(n))
        return out


class _ConflictMethod(MergeMethod):
    """A MergeMethod that pickles as the call building it (its passes hold TopK's lambdas,
    which plain pickle cannot serialize; cloudpickle could, but this is smaller too)."""

    def __reduce_ex__(self, protocol):
        args = self.__dict__.get("_factory_args")
        if args is None:
            return super().__reduce_ex__(protocol)
        return (conflict_method, args)


def conflict_method(n_tasks: int, denoise_q: float = 1.0) -> MergeMethod:
    """The stats-only method computing the conflict statistics of one tensor (module docstring).

    Not registered: build one per analysis job. `n_tasks` = number of fine-tunes (Block.models);
    `denoise_q` in [0, 1] (1: no denoised statistics).
    """
    conf = _Conflict(n_tasks, denoise_q)
    m = _ConflictMethod(
        name=NAME,
        merge=None,
        params=(),
        base="required",
        passes=conf.passes(),
        summary="sign-conflict, norm and cosine statistics of the task vectors (analysis)",
    )
    object.__setattr__(m, "_factory_args", (conf.N, conf.q))
    return m


def analyze_tensor(
    method: MergeMethod,
    name: str,
    base: np.ndarray,
    models: Sequence[np.ndarray],
    params: TensorParams | None = None,
    block_rows: int | None = None,
) -> dict:
    """Run only the passes of a stats-only method over arrays held in memory, cut into row blocks
    of `block_rows` rows (the engine's semantics, as methods/inmemory.py); returns the stats."""
    models = list(models)
    params = params or TensorParams(globals={}, per_model=tuple({} for _ in models))
    return run_passes(method, name, base, models, params, block_rows)
