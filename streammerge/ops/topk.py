"""Exact streamed top-k selection by magnitude, without sorting or holding a tensor.

A *selection* asks for the k largest entries of one *source* (a non-negative float32 quantity
defined elementwise on a tensor, e.g. |theta_i - theta_0| for model i) in the total order

    (value descending, flat index ascending)

so exactly k entries are selected and ties at the threshold are broken by flat index, lowest
first, whatever the block size. The result is a threshold T and a cut index C: an entry is
selected iff  value > T  or  (value == T and flat index <= C).

Values are compared as their IEEE bit patterns (uint32), which order non-negative floats
exactly; NaN patterns sort above +inf (torch's descending sort also puts NaN first).

Passes (static list; each later pass is a no-op once every selection is resolved):

  sample   map: the source on a grid chosen by flat row index (so independent of blocking):
           every R-th row (r = 0 mod R, R odd), and in each such row every C-th entry, from a
           column that shifts by one from a sampled row to the next (`sample_grid`): at least
           256 rows, about 2**18 samples. The pass declares those rows (`Pass.rows`), so the
           engine reads just them: 1/R of each input instead of all of it.
           reduce: a bracket [A, B] around the k-th largest, at +-(5 sigma + 16) sample ranks of
           the target rank. Rows differ more than entries do (outlier rows, rows of unused
           tokens), so sigma is the larger of the binomial one and the spread of the per-row
           counts above E (the sample's k-th largest) over the rows sampled. Split points P (at
           most 256): the sample values in the bracket that occur more than once (values
           shared by many entries, as bf16-derived deltas are; at most 128, the most frequent),
           the rest half at even quantiles of the bracket's samples, half evenly spaced in bit
           patterns, plus A and B; heavy values H = the (at most 6) repeated values holding
           >= 1/512 of the sample. A tensor with n < 2**19 is sampled whole and resolved
           exactly right here.
  select0  ("collect") map, per block: the count of entries > B, the count of entries equal to
           each heavy value, and the other entries of [A, B] as (value, flat index) pairs if at
           most cap = max(4096, block/32) of them, else counts per *level* (each split point,
           each open interval between them) plus the pairs of the open levels within a window
           of levels around E, as wide as the cap allows.
           reduce: finds the level holding the k-th entry. An exact level (one value) gives T
           at once; the tie cut is exact from the pairs or, when a block only sent counts,
           deferred to `merge` (the "boundary block", where the cumulative tie count crosses m,
           scans itself for its r-th tie: one block per selection). An open level whose pairs
           are all known gives T and C by selection among them (np.partition). Otherwise the
           selection stays pending with the narrower interval.
  select1..3  ("refine") the same map/reduce over the pending interval, with P a uniform grid
           of 2048 bit patterns. Each refinement shrinks an open interval 2048-fold, so from any
           interval of 2**32 patterns three refinements end on an exact level: the result is
           exact in all cases (a bracket miss, adversarial data, massive ties). On ordinary
           data sample + collect resolve everything and the refinements do nothing: bf16-derived
           deltas, with or without row structure (a wide bracket is mostly repeated values,
           exact levels), and continuous (fp32) deltas without strong row structure. Continuous
           deltas whose rows differ strongly (row scales e^N(0, 0.5) and wider) get a bracket
           of 10-25% of the entries, more than the window lists: about half need one refinement.

Partials: counts plus at most `cap` pairs (12 bytes each); on ordinary data the bracket holds
about 1% of the entries minus the heavy values (0.2% of a block on bf16-derived deltas).

Merge keeps u > T, plus the ties u == T with flat index <= C. A deferred cut names the span
whose partial sent counts (a block, or a group of rows: the select passes map row groups), and
the merge scans that span whole: a merge call holds it whole (`spans_in`: the engine widens
the row group that would cut it), and a block that cuts it is reported.

Using it (e.g. for the sparse top-rho encodings):

    tk = TopK("enc.topk", values, plan)     # values(block, params, stats, src, sl, out)
    passes = (*tk.passes, ...)              # plan(params, stats, n) -> [(src, k), ...]
    # in merge (or a later pass), for selection j:
    keep = tk.keeper(block, params, stats, j).mask(u_uint32, block.start + c0)
    # or the kept entries of the block at once (offsets, values), as the encoders store them:
    off, val = select_block(block, tk, params, stats, j, diff)

Every pass is an `OptionalPass`: `needed(params, stats)` says whether it has work; an engine
may skip a pass that is not needed (its map returns None for every block anyway and its
reduce changes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..workspace import thread_buffer
from ..errors import StreammergeError
from ..geometry import numel, row_elems
from ..methods.base import Block, Pass, Stats, TensorParams, scan_elems

SAMPLE_TARGET = 1 << 18  # about this many samples per tensor (one of < 2 * SAMPLE_TARGET: all)
SAMPLE_ROWS = 256  # rows sampled at least (all, in a tensor with fewer)
GRID = 2048  # split points per refinement
MAX_SPLITS = 256  # split points of the sample's bracket
MAX_HEAVY = 6  # split points counted by equality in the map (values shared by >= 1/HEAVY_DIV)
HEAVY_DIV = 512
CAP_MIN = 4096  # candidate pairs a block may always return
CAP_DIV = 32  # ... or block / CAP_DIV if larger
N_SELECT = 4  # collect + 3 refinements
CHUNK = 65536  # elements per cache-sized chunk when scanning a block

U32MAX = 0xFFFFFFFF
PENDING, DONE = 0, 1

# values(block, params, stats, source, sl, out) -> float32 magnitudes (>= 0) of `source` at the
# flattened-block positions `sl` (a slice, possibly strided). `out` is None or a float32 scratch
# array of the right size to write them into. The result may be overwritten by the caller.
ValuesFn = Callable[[Block, TensorParams, Stats, int, slice, "np.ndarray | None"], np.ndarray]
# plan(params, stats, n) -> [(source, k), ...]: the selections for a tensor of n elements.
PlanFn = Callable[[TensorParams, Stats, int], Sequence[tuple[int, int]]]


# Every Pass has `needed`; the name stays for readability where a pass is often skipped.
OptionalPass = Pass


def _order_stat(part: np.ndarray, at: int, j: int) -> int:
    """The j-th smallest entry (0-based) of `part`, an array partitioned at `at`
    (np.partition(x, at)): the smallest `at` entries come first, in any order."""
    if j >= at:
        return int(np.partition(part[at:], j - at)[j - at])
    return int(np.partition(part[:at], j)[j])


def scratch(name: str, size: int, dtype=np.float32) -> np.ndarray:
    """This thread's reusable working array `name` (workspace.py), at least a chunk long."""
    return thread_buffer(("scratch", name), size, dtype, at_least=CHUNK)


def sample_grid(shape: Sequence[int]) -> tuple[int, int]:
    """(R, C): the sample is every R-th row (r = 0 mod R) and, within it, every C-th entry: L // C
    of them, from column (-(r // R)) % C. Columns shift by one from a sampled row to the next so
    that every column is sampled alike (a fixed set would miss column scales). At least
    SAMPLE_ROWS rows, then columns thinned to about SAMPLE_TARGET entries; (1, 1) is the whole
    tensor. R is odd so that it shares no factor with the power-of-two periods of weight rows
    (attention heads, rotary halves): every row residue is sampled alike too."""
    n = numel(shape)
    if n < 2 * SAMPLE_TARGET:
        return 1, 1
    rows, L = n // row_elems(shape), row_elems(shape)
    want = min(rows, max(SAMPLE_ROWS, -(-SAMPLE_TARGET // L)))
    R = rows // want
    R -= 1 - R % 2
    return R, min(L, max(1, -(-rows // R) * L // SAMPLE_TARGET))


def _consecutive(idx: np.ndarray, limit: int):
    """(i0, i1): runs of consecutive values idx[i0:i1] (ascending idx), at most `limit` long."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), idx.size]):
        for i0 in range(a, b, limit):
            yield i0, min(b, i0 + limit)


def block_size(block: Block) -> int:
    a = block.base if block.base is not None else block.models[0]
    return int(a.size)


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def chunks(nelem: int, size: int = CHUNK):
    for c0 in range(0, nelem, size):
        yield c0, min(nelem, c0 + size)


def as_u32(values: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(values, dtype=np.float32)
    return v.view(np.uint32)


# ---------------------------------------------------------------------------------------------
# the selection result, as merge uses it


@dataclass(frozen=True)
class Keeper:
    """Selected iff u > T or (u == T and flat index <= cut); u = float32 bit pattern."""

    T: int
    cut: int
    n: int

    @property
    def keeps_none(self) -> bool:
        return self.T >= U32MAX and self.cut < 0

    def mask(self, u: np.ndarray, p0: int, out: np.ndarray | None = None) -> np.ndarray:
        """Selection mask for the bit patterns `u` of flat positions p0, p0+1, ..."""
        T = np.uint32(self.T)
        if self.cut < p0:
            return np.greater(u, T, out=out)
        if self.cut >= p0 + u.size - 1:
            return np.greater_equal(u, T, out=out)
        m = np.greater(u, T, out=out)
        head = u[: self.cut - p0 + 1]
        m[np.flatnonzero(head == T)] = True
        return m


# ---------------------------------------------------------------------------------------------
# helpers


def _exact(cu: np.ndarray, cidx: np.ndarray, need: int) -> tuple[int, int]:
    """T and cut selecting the `need` largest of candidates (cu, cidx) (ties: lowest index)."""
    c = cu.size
    assert 1 <= need <= c
    pos = c - need
    T = int(np.partition(cu, pos)[pos])
    m = need - int(np.count_nonzero(cu > np.uint32(T)))
    ties = cidx[cu == np.uint32(T)]
    cut = int(np.partition(ties, m - 1)[m - 1])
    return T, cut


def _grid(A: int, B: int) -> np.ndarray:
    W = B - A + 1
    step = -(-W // GRID)
    count = -(-W // step)
    return (A + step * np.arange(count, dtype=np.int64)).astype(np.uint32)


def _codes(cu: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Level code of each value: 2j+1 for value == P[j], 2j for P[j-1] < value < P[j]."""
    pos = np.searchsorted(P, cu, side="left")
    L = P.size
    eq = P[np.minimum(pos, L - 1)] == cu
    eq &= pos < L
    return 2 * pos + eq


class _Acc:
    """Per block, per selection: the entries of [A, B] that are not heavy values, bounded.

    Up to `cap` of them are kept as pairs. Beyond, they are counted per level, and only the
    pairs of a window of open levels around `mid` (the code of the expected k-th value) are
    kept, as wide as the cap allows: it narrows as entries come, so every open level still in
    the window at the end has all its pairs here.
    """

    def __init__(self, P: np.ndarray, nheavy: int, cap: int, mid: int):
        self.P = P
        self.cap = cap
        self.mid = mid
        self.gt = 0
        self.cin = 0  # all entries in [A, B], heavy ones included
        self.hc = np.zeros(nheavy, dtype=np.int64)
        self.npairs = 0
        self.cu: list[np.ndarray] = []
        self.ci: list[np.ndarray] = []
        self.counts: np.ndarray | None = None  # level counts of the non-heavy entries, once over cap
        self.cc: list[np.ndarray] = []  # the level codes of the pairs, once over cap
        self.window = (0, 2 * P.size)  # open-level codes whose pairs are all kept, once over cap

    def add(self, cu: np.ndarray, ci: np.ndarray) -> None:
        if self.counts is None:
            self.cu.append(cu)
            self.ci.append(ci)
            self.npairs += cu.size
            if self.npairs > self.cap:
                cu = np.concatenate(self.cu)
                ci = np.concatenate(self.ci)
                self.cu, self.ci, self.npairs = [], [], 0
                self.counts = np.zeros(2 * self.P.size + 1, dtype=np.int64)
                self._add_levels(cu, ci)
            return
        self._add_levels(cu, ci)

    def _add_levels(self, cu, ci) -> None:
        codes = _codes(cu, self.P)
        self.counts += np.bincount(codes, minlength=self.counts.size)
        lo, hi = self.window
        keep = ((codes & 1) == 0) & (codes >= lo) & (codes <= hi)
        if np.any(keep):
            self.cu.append(cu[keep])
            self.ci.append(ci[keep])
            self.cc.append(codes[keep])
            self.npairs += self.cu[-1].size
            if self.npairs > self.cap:
                self._narrow()

    def _narrow(self) -> None:
        """The widest window [mid - r, mid + r] whose pairs fit the cap; drops the others."""
        cu, ci, cc = np.concatenate(self.cu), np.concatenate(self.ci), np.concatenate(self.cc)
        dist = np.abs(cc - self.mid)
        within = np.cumsum(np.bincount(dist, minlength=self.counts.size))  # pairs within radius r
        r = int(np.searchsorted(within, self.cap, side="right")) - 1  # -1: not even mid's level fits
        self.window = (self.mid - r, self.mid + r)
        keep = dist <= r
        self.cu, self.ci, self.cc = [cu[keep]], [ci[keep]], [cc[keep]]
        self.npairs = int(np.count_nonzero(keep))

    def partial(self, start: int, nelem: int):
        cu = np.concatenate(self.cu) if self.cu else np.zeros(0, np.uint32)
        ci = np.concatenate(self.ci) if self.ci else np.zeros(0, np.int64)
        counts = None
        if self.counts is not None:
            nz = np.flatnonzero(self.counts)
            counts = (nz.astype(np.int32), self.counts[nz])
        return (start, nelem, self.gt, self.cin, self.hc, counts, (cu, ci), self.window)


# ---------------------------------------------------------------------------------------------


class TopK:
    """Exact top-k selections over sources of a tensor; see the module docstring.

    `name` prefixes the stats keys, so several TopK may serve one method.
    """

    def __init__(self, name: str, values: ValuesFn, plan: PlanFn):
        self.name = name
        self.values = values
        self.plan = plan

    # stats keys -------------------------------------------------------------------------
    def _k(self, j: int, what: str) -> str:
        return f"{self.name}.{j}.{what}"

    def nsel(self, stats: Stats) -> int:
        return int(stats.get(f"{self.name}.nsel", 0))

    def source(self, stats: Stats, j: int) -> int:
        return int(stats[self._k(j, "src")])

    def _pending(self, stats: Stats) -> list[int]:
        return [j for j in range(self.nsel(stats)) if stats.get(self._k(j, "state")) == PENDING]

    def _done(self, j: int, T: int, cut: int, bstart: int = -1, bend: int = -1, brank: int = 0):
        return {
            self._k(j, "state"): DONE,
            self._k(j, "T"): int(T),
            self._k(j, "cut"): int(cut),
            self._k(j, "bstart"): int(bstart),
            self._k(j, "bend"): int(bend),
            self._k(j, "brank"): int(brank),
        }

    def _pend(self, j: int, A: int, B: int, P: np.ndarray, H: np.ndarray, E: int):
        """Pending in [A, B] with split points P, heavy values H; E: where the k-th is expected."""
        return {
            self._k(j, "state"): PENDING,
            self._k(j, "A"): int(A),
            self._k(j, "B"): int(B),
            self._k(j, "P"): np.asarray(P, dtype=np.uint32),
            self._k(j, "H"): np.asarray(H, dtype=np.uint32),
            self._k(j, "E"): int(E),
        }

    # passes -------------------------------------------------------------------------------
    @property
    def passes(self) -> tuple[Pass, ...]:
        out: list[Pass] = [
            OptionalPass(
                f"{self.name}.sample",
                self._sample_map,
                self._sample_reduce,
                needed=self._sample_needed,
                rows=self._sample_rows,
            ),
        ]
        for i in range(N_SELECT):
            out.append(
                OptionalPass(
                    f"{self.name}.select{i}",
                    self._select_map,
                    (lambda partials, params, stats, i=i: self._select_reduce(partials, params, stats, i)),
                    needed=lambda params, stats: bool(self._pending(stats)),
                    # a partial is of any run of rows: a deferred tie cut names its span
                    row_groups=True,
                )
            )
        return tuple(out)

    def _sample_needed(self, params: TensorParams, stats: Stats) -> bool:
        """False when there is no selection at all (then nothing downstream reads its stats)."""
        return bool(self.plan(params, stats, 1 << 62))

    def _sample_rows(self, shape: tuple[int, ...], params: TensorParams) -> np.ndarray | None:
        """Pass.rows of the sample: its rows, where that leaves some unread (rows of one element
        are not worth a read each: those tensors are read whole)."""
        R, _ = sample_grid(shape)
        if R == 1 or len(shape) < 2:
            return None
        return np.arange(0, shape[0], R, dtype=np.int64)

    def _sample_map(self, block: Block, params: TensorParams, stats: Stats):
        n = numel(block.shape)
        sel = self.plan(params, stats, n)
        sources = sorted({src for src, k in sel if 0 < k < n})
        R, C = sample_grid(block.shape)
        L = row_elems(block.shape)
        r0 = block.start // L
        held = block.rows if block.rows is not None else np.arange(r0, r0 + block_size(block) // L)
        rows = np.flatnonzero(held % R == 0)  # of the block's arrays
        first = ((-(held[rows] // R)) % C).tolist()  # each sampled row's first column
        k = L // C
        samples = {}
        for src in sources:
            if L == 1 and block.rows is None:  # a strided slice: no values for the rows left out
                sl = slice(int(rows[0]) if rows.size else 0, None if rows.size else 0, R)
                samples[src] = as_u32(self.values(block, params, stats, src, sl, None)).copy()
                continue
            out = np.empty((rows.size, k), np.uint32)
            for i0, i1 in _consecutive(rows, max(1, CHUNK // L)):  # cache-sized runs of rows
                a, b = int(rows[i0]) * L, (int(rows[i1 - 1]) + 1) * L
                u = as_u32(self.values(block, params, stats, src, slice(a, b), scratch("tk.v", b - a))).reshape(-1, L)
                if C == 1:
                    out[i0:i1] = u
                    continue
                for i in range(i0, i1):
                    out[i] = u[i - i0, first[i] : first[i] + C * k : C]
            samples[src] = out.reshape(-1)
        return (tuple(block.shape), samples)

    def _sample_reduce(self, partials: Sequence[Any], params: TensorParams, stats: Stats):
        partials = [p for p in partials if p is not None]
        if not partials:
            return {f"{self.name}.nsel": 0, f"{self.name}.n": 0}
        shape = partials[0][0]
        n = numel(shape)
        sel = list(self.plan(params, stats, n))
        out: dict = {f"{self.name}.nsel": len(sel), f"{self.name}.n": n}
        R, C = sample_grid(shape)
        L = row_elems(shape)
        cache: dict[int, np.ndarray] = {}
        for j, (src, k) in enumerate(sel):
            out[self._k(j, "src")] = int(src)
            out[self._k(j, "k")] = int(k)
            if k <= 0:
                out.update(self._done(j, U32MAX, -1))
                continue
            if k >= n:
                out.update(self._done(j, 0, n))
                continue
            if src not in cache:
                cache[src] = np.concatenate([p[1][src] for p in partials])
            samp = cache[src]
            if (R, C) == (1, 1):  # the whole tensor: exact now
                T, cut = _exact(samp, np.arange(samp.size, dtype=np.int64), k)
                out.update(self._done(j, T, cut))
                continue
            out.update(self._pend(j, *self._bracket(samp, n, k, L // C, n // L)))
        return out

    @staticmethod
    def _bracket(samp: np.ndarray, n: int, k: int, row: int, rows: int):
        """[A, B] around the k-th largest, split points P, heavy values H (subset of P), and E,
        the sample's estimate of the k-th largest. The sample holds `row` entries of each
        sampled row, one row after another, of the tensor's `rows`."""
        s = samp.size
        p = k / n
        r = k * s / n  # expected count of samples >= the k-th largest
        at = s - min(s, max(1, round(r)))
        part = np.partition(samp, at)
        E = int(part[at])
        sd = math.sqrt(s * p * (1.0 - p))  # of that count, were the samples independent
        if row > 1 and s // row < rows:
            # Whole rows are sampled, and rows differ (outlier rows, rows of unused tokens): the
            # count varies with the spread of the per-row counts, often far beyond binomial
            # (less the share of the rows sampled: all rows sampled, rows add no variance).
            per_row = np.count_nonzero(samp.reshape(-1, row) >= np.uint32(E), axis=1)
            spread = per_row.size * float(per_row.var()) * (1.0 - per_row.size / rows)
            sd = max(sd, math.sqrt(spread))
        margin = int(5.0 * sd) + 16
        hi_pos = int(math.floor(r)) - 1 - margin  # descending 0-based ranks
        lo_pos = int(math.ceil(r)) - 1 + margin
        # single-kth partitions (numpy's SIMD quickselect is ~10x faster than one with 2 kth), of
        # the side of E's partition that holds the rank: half the data of partitioning it all again
        B = _order_stat(part, at, s - 1 - hi_pos) if hi_pos >= 0 else U32MAX
        A = _order_stat(part, at, s - 1 - lo_pos) if lo_pos < s else 0
        window = samp[(samp >= np.uint32(A)) & (samp <= np.uint32(B))]
        vals, cnt = np.unique(window, return_counts=True)
        rep = cnt > 1
        heavy, hcnt = vals[rep], cnt[rep]
        if heavy.size > MAX_SPLITS // 2:
            order = np.sort(np.argsort(-hcnt, kind="stable")[: MAX_SPLITS // 2])
            heavy, hcnt = heavy[order], hcnt[order]
        # The other split points cut a wide bracket of distinct values (a row sample of
        # continuous deltas) into fine levels, of which a block holding too many candidates
        # still lists those nearest E: half at even quantiles of the window, half evenly spaced
        # in bit patterns (where the sample's rows are unlike the tensor's, its quantiles are
        # sparse where the tensor's values are dense).
        room = (MAX_SPLITS - 2 - heavy.size) // 2
        at = np.linspace(0, window.size, room + 1, endpoint=False)[1:]
        quantiles = vals[np.searchsorted(np.cumsum(cnt), at, side="right").clip(0, vals.size - 1)]
        even = np.linspace(A, B, room + 2)[1:-1].astype(np.uint32)
        P = np.unique(np.concatenate([heavy, quantiles, even, np.array([A, B], dtype=np.uint32)]))
        big = np.argsort(-hcnt, kind="stable")[:MAX_HEAVY]
        big = big[hcnt[big] * HEAVY_DIV >= s]
        H = np.sort(heavy[big])
        return A, B, P, H, E

    def _select_map(self, block: Block, params: TensorParams, stats: Stats):
        pending = self._pending(stats)
        if not pending:
            return None
        nb = block_size(block)
        cap = max(CAP_MIN, nb // CAP_DIV)
        by_src: dict[int, list[int]] = {}
        for j in pending:
            by_src.setdefault(self.source(stats, j), []).append(j)
        sel = {}
        for j in pending:
            P = np.asarray(stats[self._k(j, "P")], np.uint32)
            H = np.asarray(stats.get(self._k(j, "H"), ()), np.uint32)
            A, B = int(stats[self._k(j, "A")]), int(stats[self._k(j, "B")])
            # [A, B] one heavy value (bf16-derived deltas, the k-th in a large tie): its entries
            # are counted, not compared again
            single = int(np.flatnonzero(H == A)[0]) if A == B and A in H else None
            sel[j] = (
                np.uint32(A),
                B,
                [np.uint32(h) for h in H],
                single,
                _Acc(P, H.size, cap, int(_codes(np.array([stats[self._k(j, "E")]], np.uint32), P)[0])),
            )
        for src, js in by_src.items():
            for c0, c1 in chunks(nb, max(CHUNK, scan_elems(nb))):  # a row group whole: fewer GIL-held calls
                L = c1 - c0
                u = as_u32(self.values(block, params, stats, src, slice(c0, c1), scratch("tk.v", L)))
                g = scratch("tk.g", L, bool)
                m = scratch("tk.m", L, bool)
                e = scratch("tk.e", L, bool)
                for j in js:
                    A, B, H, single, acc = sel[j]
                    np.greater_equal(u, A, out=m)
                    cin = int(np.count_nonzero(m))
                    if B < U32MAX:
                        np.greater(u, np.uint32(B), out=g)
                        gt = int(np.count_nonzero(g))
                        acc.gt += gt
                        cin -= gt
                    if not cin:
                        continue
                    acc.cin += cin
                    if single is not None:
                        acc.hc[single] += cin
                        continue
                    if B < U32MAX:
                        np.logical_xor(m, g, out=m)  # A <= u <= B  (u > B implies u >= A)
                    for h, hv in enumerate(H):
                        np.equal(u, hv, out=e)
                        ch = int(np.count_nonzero(e))
                        if ch:
                            acc.hc[h] += ch
                            cin -= ch
                            np.logical_xor(m, e, out=m)  # e implies m
                    if cin:
                        idx = np.flatnonzero(m)
                        acc.add(u[idx], idx + (block.start + c0))
        return {j: sel[j][4].partial(block.start, nb) for j in pending}

    def _select_reduce(self, partials: Sequence[Any], params: TensorParams, stats: Stats, i: int):
        pending = self._pending(stats)
        out: dict = {}
        partials = [p for p in partials if p is not None]
        n = int(stats[f"{self.name}.n"])
        for j in pending:
            parts = [p[j] for p in partials]
            k = int(stats[self._k(j, "k")])
            A = int(stats[self._k(j, "A")])
            B = int(stats[self._k(j, "B")])
            P = np.asarray(stats[self._k(j, "P")], np.uint32)
            H = np.asarray(stats.get(self._k(j, "H"), ()), np.uint32)
            res = self._resolve(parts, k, n, A, B, P, H)
            if res[0] == DONE:
                out.update(self._done(j, *res[1:]))
            elif i == N_SELECT - 1:
                raise RuntimeError(f"top-k selection {self.name}.{j} did not converge")  # cannot happen
            else:
                lo, hi = res[1], res[2]
                out.update(self._pend(j, lo, hi, _grid(lo, hi), np.zeros(0, np.uint32), lo + (hi - lo) // 2))
        return out

    @staticmethod
    def _resolve(parts, k: int, n: int, A: int, B: int, P: np.ndarray, H: np.ndarray):
        G = sum(p[2] for p in parts)
        C = sum(p[3] for p in parts)
        need = k - G
        if need <= 0:  # the k-th is above B
            return (PENDING, B + 1, U32MAX)
        if need > C:  # below A
            return (PENDING, 0, A - 1)
        nlev = 2 * P.size + 1
        hcodes = 2 * np.searchsorted(P, H) + 1
        heavy = np.zeros(nlev, dtype=bool)
        heavy[hcodes] = True
        # per block: level counts, pair codes, and which levels its pairs list completely
        blocks = []
        total = np.zeros(nlev, dtype=np.int64)
        for start, nelem, gt, cin, hc, counts, pairs, (lo, hi) in parts:
            codes = _codes(pairs[0], P)
            if counts is None:
                c = np.bincount(codes, minlength=nlev)
                complete = ~heavy
            else:
                c = np.zeros(nlev, dtype=np.int64)
                c[counts[0]] = counts[1]
                complete = np.zeros(nlev, dtype=bool)
                complete[max(lo, 0) : max(hi + 1, 0)] = True
                complete[1::2] = False  # exact levels were only counted
            c[hcodes] += hc
            total += c
            blocks.append((start, nelem, c, codes, pairs, complete))
        cum = np.cumsum(total[::-1])  # cum[t] = entries in the top t+1 levels
        t = int(np.searchsorted(cum, need, side="left"))
        lam = nlev - 1 - t
        above = G + (int(cum[t - 1]) if t > 0 else 0)
        need_l = k - above
        if lam & 1:  # an exact level: value P[(lam-1)//2]
            T = int(P[(lam - 1) // 2])
            if need_l == int(total[lam]):
                return (DONE, T, n)
            before = 0
            for start, nelem, c, codes, pairs, complete in blocks:
                cb = int(c[lam])
                if before + cb >= need_l:
                    r = need_l - before
                    if complete[lam]:
                        idx = pairs[1][codes == lam]
                        return (DONE, T, int(np.partition(idx, r - 1)[r - 1]))
                    return (DONE, T, -1, start, start + nelem, r)  # resolved by the block itself
                before += cb
            raise AssertionError("tie count mismatch")
        # an open level: entries strictly between two split points
        h = lam // 2
        lo = int(P[h - 1]) + 1 if h >= 1 else A
        hi = int(P[h]) - 1 if h < P.size else B
        cu_l, ci_l = [], []
        for start, nelem, c, codes, pairs, complete in blocks:
            if c[lam] == 0:
                continue
            if not complete[lam]:  # this block could not list them: refine
                return (PENDING, lo, hi)
            sel = codes == lam
            cu_l.append(pairs[0][sel])
            ci_l.append(pairs[1][sel])
        T, cut = _exact(np.concatenate(cu_l), np.concatenate(ci_l), need_l)
        return (DONE, T, cut)

    # merge side ---------------------------------------------------------------------------
    def keeper(self, block: Block, params: TensorParams, stats: Stats, j: int) -> Keeper:
        """Selection j as it applies to `block` (resolves a deferred tie cut if it lies here)."""
        n = int(stats[f"{self.name}.n"])
        T = int(stats[self._k(j, "T")])
        cut = int(stats[self._k(j, "cut")])
        bstart = int(stats[self._k(j, "bstart")])
        if bstart < 0:
            return Keeper(T, cut, n)
        bend = int(stats[self._k(j, "bend")])
        nb = block_size(block)
        b0, b1 = block.start, block.start + nb
        if b1 <= bstart:
            return Keeper(T, n, n)  # before the boundary block: all its ties are kept
        if b0 >= bend:
            return Keeper(T, -1, n)
        if not b0 <= bstart < bend <= b1:
            raise StreammergeError(
                f"{block.tensor}: the row blocks changed between the selection passes and the merge "
                f"(block {b0}:{b1} overlaps {bstart}:{bend}); rerun the tensor from its first pass"
            )
        # the boundary span (a block, or a group of rows, of the passes) lies in this block:
        # its r-th tie is the cut
        r = int(stats[self._k(j, "brank")])
        src = self.source(stats, j)
        seen = 0
        for c0, c1 in chunks(bend - bstart):
            at = slice(bstart - b0 + c0, bstart - b0 + c1)
            v = self.values(block, params, stats, src, at, scratch("tk.v", c1 - c0))
            eq = np.flatnonzero(as_u32(v) == np.uint32(T))
            if seen + eq.size >= r:
                return Keeper(T, bstart + c0 + int(eq[r - seen - 1]), n)
            seen += eq.size
        raise AssertionError("boundary block has fewer ties than recorded")

    def spans_in(self, stats: Stats, b0: int, b1: int) -> list[tuple[int, int]]:
        """The spans of the passes (a block or a group of rows), as flat [start, end), to which
        a selection's tie cut was deferred, overlapping the flat range [b0, b1): `keeper` scans
        such a span, so a merge call must hold it whole (MergeMethod.unsplit)."""
        spans = []
        for j in range(self.nsel(stats)):
            bstart = int(stats.get(self._k(j, "bstart"), -1))
            if bstart >= 0 and b0 < int(stats[self._k(j, "bend")]) and b1 > bstart:
                spans.append((bstart, int(stats[self._k(j, "bend")])))
        return sorted(spans)

    def keepers(self, block: Block, params: TensorParams, stats: Stats) -> list[Keeper]:
        return [self.keeper(block, params, stats, j) for j in range(self.nsel(stats))]


def select_block(
    block: Block,
    tk: TopK,
    params: TensorParams,
    stats: Stats,
    j: int,
    diff: Callable[[int, int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The entries of `block` kept by selection j of `tk`: (int64 within-block offsets, float32
    values). `diff(c0, c1)` gives the signed quantity whose magnitude was ranked, for flat block
    positions [c0, c1) (float32; may be a scratch buffer)."""
    keeper = tk.keeper(block, params, stats, j)
    nb = block_size(block)
    if keeper.keeps_none or nb == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    offs, vals = [], []
    for c0, c1 in chunks(nb):
        d = diff(c0, c1)
        u = as_u32(np.abs(d, out=scratch("sp.abs", c1 - c0)))
        m = keeper.mask(u, block.start + c0, out=scratch("sp.keep", c1 - c0, bool))
        idx = np.flatnonzero(m)
        if idx.size:
            vals.append(d[idx].astype(np.float32))
            offs.append(idx + c0)
    if not offs:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(offs).astype(np.int64), np.concatenate(vals)
