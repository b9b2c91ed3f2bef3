"""Per-row routed weights in one forward pass: the runtime behind `streammerge serve`, `generate`
and RoutedModel (model.py).

    rt = DeltaRuntime(model, store, method, device, dtype, memory_budget=None)
    rt.set_rows([forced("math", tasks), STATIC, mix_decision])   # one decision per batch row
    logits = model(input_ids=ids).logits                          # row b ran with decision b

The model is the store's merged model as `load_merged_model` gives it: STATIC rows run it as it
is, with no delta. For Mediator its routed tensors are the dense experts D. For 1bit-Merging the
runtime replaces every encoded tensor by the STATIC weight M = theta_0 + lambda * TIES(all)
computed once at load from theta_0 (the base checkpoint's tensor, then dropped) and the
encodings, unrounded: the request-independent part is computed once, never per forward, and the
model stays one model.

Per forward, a module that holds a routed tensor computes the shared product once for the whole
batch, then adds each row group's delta, taken from the compressed encodings on the device:
  Linear     y = x W^T (+ b), then y[rows] += w_row * (x[rows] Delta^T) for each delta term
  Embedding  y = W[ids], then y[rows] += w_row * Delta[ids[rows]] (rows of Delta, gathered)
  any other  (norm weights, 1-D tensors) a module found affine in its tensors (AffineForm:
             y = (kappa + w) * n(x) + b, RMSNorm, LayerNorm, ...) runs once with neutral tensors,
             then y[b] = (kappa + w_b) * n(x[b]) + b_b with each row's tensors (static + delta,
             stacked per row once per row plan); any other module runs once per row group
The modules stay where they are, so parameter names, state_dict and hooks are unchanged; only
their `forward` is replaced (DeltaLinear, DeltaEmbedding, DeltaGrouped). `close()` restores it.

Delta terms:
  Mediator  one term per task present in the batch, over the rows using it, with the rows'
            weights: top-1 / forced rows weight 1 (D + S_k), an uncertain row p_t for each of
            its tasks (D + sum p_t S_t), STATIC rows none (D). S_t stays sparse (`CompactSparse`:
            int32 row pointers, the positions as int16 columns or as the packed bitmask,
            whichever is smaller, then columns for the sparsest while the extra bytes fit
            COLUMNS_ALLOWANCE of the storage figure; the values as stored: bf16, or int8 codes with a float32
            scale per 64), decoded per product (or once, cached within the budget) into a
            float32 CSR matrix for torch.sparse.mm or, for a bitmask from DENSE_FROM up, a
            dense float32 matrix (see CompactSparse for the bytes and the measured costs;
            int8 values: 1.1-1.3x the bf16 store's decoding step on CPU without a budget,
            hidden 256, rho 0.1-0.5, measured with int16 columns). (One sparse product of the
            stacked [S_1; ...; S_N] for all rows, then each row's mix, was measured no faster on
            CPU at 32 tokens and slower above: not kept.)
  1bit      one term per task decision present in the batch: Delta_k = tau_hat_k + lambda *
            (TIES({tau_hat_j : j != k}) - TIES(all)), k's weight less M. Per tensor it is zero
            where task k has no piece (k's others are all the pieces) and (1 - lambda) tau_hat_k
            where k's piece is the only one (TIES of one vector is itself), a scaled sign-bits
            product (`signs_product`: the +-1 of each byte looked up, multiplied, then scaled),
            as is every term with lambda = 0. Where two or more tasks have pieces and lambda !=
            0 the term is nonlinear in the encodings: no sum of per-task compressed deltas gives
            it. It is built from the packed bits and scales in row chunks (encoded.py
            `TaskPiece.tau_hat`, `onebit_terms`) and multiplied chunk by chunk, every forward
            (no memory beyond the encodings, at the cost of decoding all N tasks' bits and two
            elections per term), or cached within the budget: 4 bytes per routed parameter
            (float32 compute) per hot task decision, N at most.

Measured (tools/bench_deltas.py --repeat 5: hidden 512, intermediate 1376, 4 layers, vocab
4096; one forward of 32 rows over 3 tasks; CPU time on one thread; ratio to the static model's
forward of the same batch; swap = the old per-decision dense weights (now tools/weight_swap.py),
one forward per task group; a 2-core box shared with other jobs at load 13-17, about +-30 %):
                       decoding step (1 token/row)      prefill (32 tokens/row)
                       no cache   cache   swap          no cache   cache   swap
  Mediator (rho 0.1)   1.7        1.2     2.8           1.4        1.3     1.0
  1bit lambda 0        6.3        3.4     3.3           2.6        1.3     1.2
  1bit lambda 1        91         2.6     2.2           9.6        1.5     1.1
The cache held 14 MB (Mediator: float32 CSR) / 164 MB
(1bit: 3 decisions' full float32 weights) against encodings of 7.1 / 5.9 MB and a 30 MB bf16
model. Mediator's products from the resident CSR form cost 1.7x the static forward, against
5.5x measured before, when the store's bitmask was decoded into a CSR matrix every forward. With
preset uniform every task has a piece in every tensor, so every 1bit term is a full-size
product: 3 products per layer instead of 1. Served from the encodings, lambda != 0 costs about
15x lambda 0's time per decoding step (N tau_hats and N + 1 elections per row chunk per
forward); cached, the same as lambda 0. Where a preset drops a task's modules (paper, auto),
those terms vanish (see OneBitTensor).

Cache: with `memory_budget` (bytes the weights may take on the device: model + encodings +
row plan + cache), the decoded form of a term is kept, least recently used first out, in what
the model, the encodings and the row plan's reserve leave: Mediator the decoded S_t (float32
CSR, or dense: CompactSparse.decoded); 1bit a task decision's full weight M + Delta_k of each Linear, so that its rows run one
product with it, as the weight swap does, instead of shared + delta (in the compute dtype: on
bf16 that is the export's rounding).
(Mediator's full weights D + S_k instead were measured no faster for a decoding step on CPU,
with 5x the cache: not kept.) Without a budget nothing is cached (and nothing fused): resident
weights are the model plus the encodings. The row plan is what a forward keeps for its batch's
decisions until they change (row indices, each decision's small tensors, a routed norm's
per-row scale and shift, the fused coefficients); the budget reserves its worst case for the
largest batch (`plan_bound`, `reserve_rows`: the server's --max-batch). resident_bytes()
reports the four (the fused stacks under "cache").

Fused products (DeltaLinear._fused): on CUDA, for a batch of at most FUSED_MAX_TOKENS tokens
(decoding steps), a routed Linear whose stack fits the budget runs in two kernels whatever the
batch's decisions: y_all = x [W; W_1; ...; W_K]^T, the shared weight stacked with its K terms
(Mediator: every task's S_t, dense; 1bit: each task decision's Delta_k), then
y[b] = sum_j P[b, j] y_all[b, j] with one coefficient row per batch row, built once per row plan:
P[b, 0] = 1, P[b, 1 + j] = the row's weight of term j (1 top-1, p_t a mix, 0 STATIC). The stacks
are built on first use, in the model's dtype (on bf16 each term is rounded once, as the export
rounds its weights; so are a mix's p_t), and take their share of the budget before the cache,
Linear by Linear in module order while they fit; the others and CPU keep the per-term
products. A longer batch (a prefill) of a Linear with a stack runs the shared product, then
each term's rows times its dense block of the stack (DeltaLinear._blocks: one dense product per
term instead of a sparse one; measured on an H100 below FUSED_MAX_TOKENS). `rt.fused =
"always"` forces the fused product on any device and batch (tests), "never" turns it off; see
FUSED_MAX_TOKENS for the policy.

Exactness: `export --variant task:k` rounds W = D + S_k (1bit: theta_0 + tau_hat_k + lambda *
TIES) to the store's dtype once; the delta path computes x D^T + x S_k^T in float32 without that
rounding. The difference is one rounding of the changed weights, a relative 2^-9 (bf16) of each
changed entry (1bit STATIC rows too: M is not rounded): the logits agree with the export's within EXPORT_REL of the row's largest |logit|
and with the unrounded float32 weights within EXACT_ATOL (float32 compute); greedy tokens are the
export's on the test models.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from functools import partial
from typing import Sequence

import numpy as np

from ..encodings.sparse import sparse_count
from ..errors import StreammergeError
from .decision import STATIC, Decision
from .encoded import (CHUNK_ELEMENTS, OneBitEncodings, SparseDelta, TaskPiece, Values, onebit_terms, onebit_weight,
                      sparse_blocks, stored_values)
from .runtime import require_torch

# The stated tolerances of the delta path (float32 compute), see "Exactness" above: against the
# model `export --variant task:k` writes (weights rounded to bf16 once), |logit difference| <=
# EXPORT_REL * max |logit| of the row (measured on the test models: <= 1/140 for 1bit, whose every
# weight is rounded, <= 1/1800 for Mediator); against the same float32 weights never rounded
# (the export's numpy block functions), <= EXACT_ATOL (measured: 4e-7).
EXPORT_REL = 1 / 64
EXACT_ATOL = 1e-5


# The fused product (DeltaLinear._fused) computes every routed Linear of a batch in one matmul
# with the shared weight and the K stacked terms, then one contraction with each row's
# coefficients: (K + 1)x the FLOPs and weight reads of the shared product, for 2 kernels instead
# of ~5 per term (gather, cast, sparse product, scale, scatter-add) on top of the shared one. It
# pays where a step's time is launches, not arithmetic: on a GPU, for a batch of few tokens
# (decoding steps; up to this many tokens, rows x sequence). Longer batches (prefills) take
# each term's dense block of the stack over its rows only (DeltaLinear._blocks). On CPU each
# term's product is arithmetic-bound already (see the table above): the per-term path stays.
FUSED_MAX_TOKENS = 128
FUSED_MODES = ("auto", "always", "never")  # DeltaRuntime.fused; `serve --fused`


def fused_pays(device, tokens: int) -> bool:
    """The "auto" policy of the fused product: CUDA, at most FUSED_MAX_TOKENS tokens."""
    torch, _ = require_torch()
    return torch.device(device).type == "cuda" and tokens <= FUSED_MAX_TOKENS


_TABLES: dict = {}


def _sign_table(device):
    """(256, 8) float32: the +-1 sign of each bit of each byte value, in little bit order.
    Looking bytes up in it unpacks 4x faster than shifting and masking."""
    torch, _ = require_torch()
    t = _TABLES.get(device)
    if t is None:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        t = _TABLES[device] = bits.to(torch.float32).mul_(2).sub_(1)
    return t


def _rows_cols(shape) -> tuple[int, int]:
    """A tensor as a matrix: (rows, elements per row); 0-D and 1-D tensors are one row."""
    shape = tuple(shape)
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64)) if shape else 1
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


# ---- compressed sparse deltas -----------------------------------------------------------------


# Where a decoded mask-form delta is multiplied as a dense float32 matrix instead of a CSR one:
# from this density (kept entries / entries) up. A dense product takes the same time at any
# density, a CSR one grows with it. Measured on one CPU thread (1024 x 256 and 256 x 1024,
# cached forms): at 32 rows (a decoding step) they are equal near 0.3 (CSR 0.17 ms against 0.21
# at 0.25), at 256 rows near 0.18, at 1 row the dense one is faster from 0.1; decoded per
# product the dense form costs what the CSR one does at 0.1 and less above. At rho 0.5 the
# dense float32 matrix takes the bytes of the float32 CSR one (4 a value + 4 a column index).
DENSE_FROM = 0.25

# Of the store's storage figure (storage.json), the bytes the runtime may spend on int16 columns
# instead of bitmasks (DeltaRuntime._columns_where_they_fit): products from columns cost 2x (rho
# 0.5) to 7x (rho 0.1) less than decoding a mask each time (CompactSparse), and this keeps the
# resident weights within 10 % of the storage figure with room for the row pointers and the plan.
COLUMNS_ALLOWANCE = 0.05

# Entries of a delta decoded at a time by an uncached dense product (CompactSparse.product_in_rows):
# 4 MB of float32, plus the count and the bits.
PRODUCT_ROWS_ELEMENTS = 1 << 20

_SHIFTS: dict = {}


_CSR_WARNED: list = []


def _csr_tensor(crow, col, values, shape):
    """torch.sparse_csr_tensor without the invariant checks (built from our own sorted
    positions). torch warns once per process that CSR support is in beta: the first build
    swallows that warning (the operations used here are covered by tests); later ones skip
    the warnings machinery, a few microseconds of a decoding step's ~40 products a layer."""
    torch, _ = require_torch()
    if _CSR_WARNED:
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    _CSR_WARNED.append(True)
    return m


def _unpack_bits(packed, cols: int):
    """(r, ceil(cols / 8)) uint8, little bit order -> (r, cols) uint8 0 / 1: a shift and an and
    per bit on uint8 (a (256, 8) table lookup takes twice as long on CPU)."""
    torch, _ = require_torch()
    sh = _SHIFTS.get(packed.device)
    if sh is None:
        sh = _SHIFTS[packed.device] = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> sh) & 1).view(packed.shape[0], -1)
    return bits if bits.shape[1] == cols else bits[:, :cols]


class CompactSparse:
    """One sparse delta of one tensor (rows x cols), resident in one of two position forms,
    whichever takes fewer bytes (`layout`), with int32 row pointers (rows + 1) and the values
    as stored (encoded.py Values: bf16; Int8Values: int8 codes and scales) in both:

      "columns"  CSR column indices, int16 when cols <= 2^15 (else int32): 2 bytes a kept entry
      "mask"     the bitmask of the tensor packed by rows, little bit order (the store's own
                 layout, each row padded to a byte): ceil(cols / 8) bytes a row, 1/8 a byte an
                 entry of the tensor

    The mask is the smaller from a density of 1/16 (int16 columns) up (the runtime then moves
    the sparsest tensors back to columns within COLUMNS_ALLOWANCE: `to_columns`): at rho 0.5 the columns
    take 8x its bytes (1 byte an entry of the tensor against 0.125), which put a served Mediator
    store at 1.38x its storage figure; with the mask the encodings are 1.02-1.05x the stored
    experts' bytes (the row pointers add 4 bytes a row, 4 / cols an entry: they spare a
    gathered row (embeddings) a count of every row before it, and a CSR build the per-row
    counts; the stored blobs' 20-byte headers are not kept).

    A product takes the decoded form (`decoded`): the float32 CSR matrix torch.sparse.mm takes
    (columns form: casts of the entries, int8 values decoded; mask form below DENSE_FROM:
    positions from nonzero() of the unpacked bits) or, for a mask from DENSE_FROM up, a dense
    float32 matrix (each kept bit's value found by a cumulative count of the bits, then one
    index_select), multiplied by a dense product. The runtime caches decoded forms within
    --memory-budget; without one a product decodes its term every time. Measured per product
    (tools/bench_positions.py: one CPU thread, a 1024 x 256 and a 256 x 1024 tensor, 32 rows,
    ms, bf16 / int8 values):

                    columns                          mask
                    decoded        cached            decoded        cached
        rho 0.1     0.11 / 0.14    0.08              0.77 / 0.83    0.08 (CSR)
        rho 0.5     0.36 / 0.44    0.32              0.86 / 0.88    0.21 (dense)

    so without a budget a mask product costs 2-2.4x (rho 0.5) to 6-7x (rho 0.1) the column
    form's: a CPU decoding step (32 rows over 3 tasks, hidden 256, 2 of 4 layers routed, int8
    values, float32 compute, one thread) takes 3.9-4.2x the static model's instead of 1.7-1.9x
    (rho 0.1) and 2.6x (0.5). With one, a cached mask term is as fast (rho 0.1) or faster (0.5:
    a dense product): that step is as before (1.4-1.8x at rho 0.1, 1.8-2.0x at 0.5), a 32-token
    prefill at rho 0.5 1.3-1.7x instead of 1.8-2.4x."""

    def __init__(self, sparse: SparseDelta, shape, layout: str | None = None):
        """From a SparseDelta's sorted flat positions (tests, benchmarks: the runtime reads the
        store's blocks with `load`). `layout`: "columns" or "mask"; None: the smaller."""
        index = sparse.index.cpu().numpy()
        self._build(shape, index.size, ((0, index),), sparse.value, layout, sparse.index.device)

    @classmethod
    def load(cls, store, path: str, job: dict, device, layout: str | None = None) -> "CompactSparse":
        """One task's expert of one tensor from the store, block by block: the blobs (the
        compressed expert, about what it takes resident) are read first, so that their headers
        give the entry count that chooses the form, then each is decoded into the form and
        dropped. No flat index of the whole tensor is ever held: at load a 14336 x 4096 expert
        at rho 0.5 rose the peak by 600-850 MB (int64 and int32 indices, float32 values) before."""
        blobs = [store.read_blob(path, b) for b in range(job["nblocks"])]
        count = sum(sparse_count(b) for b in blobs)
        values = []

        def positions():
            for start, off, scale, val in sparse_blocks(store, path, job, blobs):
                values.append((scale, val))
                yield start, off

        self = cls.__new__(cls)
        self._build(tuple(job["shape"]), count, positions(), None, layout, device)
        self.value = stored_values(values, device)
        return self

    def _build(self, shape, count: int, parts, value, layout: str | None, device) -> None:
        """The row pointers and the positions' form from `parts`: (first entry, sorted integer
        offsets from it) in ascending order, built in numpy a row range of about
        PRODUCT_ROWS_ELEMENTS entries at a time (bounded temporaries whatever the tensor), then
        moved to `device`."""
        torch, _ = require_torch()
        self.rows, self.cols = rows, cols = _rows_cols(shape)
        self.size, self.count = rows * cols, count
        if count >= 2**31:
            raise StreammergeError(f"a sparse delta of {count} entries: more than int32 row pointers hold")
        col_type, row_bytes = self._col_type, -(-cols // 8)
        if layout is None:
            layout = "mask" if self.columns_extra_bytes() > 0 else "columns"
        if layout not in ("columns", "mask"):
            raise ValueError(f"layout must be 'columns' or 'mask', got {layout!r}")
        self.layout = layout
        counts = np.zeros(rows, dtype=np.int64)
        col = np.empty(count, dtype=np.int16 if col_type == torch.int16 else np.int32) if layout == "columns" else None
        mask = np.zeros((rows, row_bytes), dtype=np.uint8) if layout == "mask" else None
        step, done = max(1, PRODUCT_ROWS_ELEMENTS // max(1, cols)) * cols, 0
        for first, off in parts:
            at = off + first if first else off  # flat positions
            cuts = np.searchsorted(at, np.arange((at[0] // step + 1) * step, at[-1] + 1, step)) if at.size else []
            for piece in np.split(at, cuts):
                if not piece.size:
                    continue
                r0 = int(piece[0]) // cols
                r = piece // cols
                counts[r0 : int(r[-1]) + 1] += np.bincount(r - r0)
                c = piece - r * cols
                if col is not None:
                    col[done : done + piece.size] = c
                else:  # a block may end inside a row (1-D tensors): or the bits into what is there
                    r1 = int(r[-1]) + 1
                    bits = np.zeros((r1 - r0) * row_bytes * 8, dtype=np.uint8)
                    bits[(r - r0) * (row_bytes * 8) + c] = 1
                    mask[r0:r1] |= np.packbits(bits, bitorder="little").reshape(r1 - r0, row_bytes)
                done += piece.size
        if done != count:
            raise StreammergeError(f"a sparse delta announced {count} entries and holds {done}")
        crow = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(counts, out=crow[1:], dtype=np.int32)
        self.crow = torch.from_numpy(crow).to(device)
        self.col = None if col is None else torch.from_numpy(col).to(device)
        self.mask = None if mask is None else torch.from_numpy(mask).to(device)
        self.value = value  # Values | Int8Values

    def _row_ranges(self):
        """(r0, r1, lo, hi): rows [r0, r1) of about PRODUCT_ROWS_ELEMENTS entries of the tensor,
        whose kept entries are [lo, hi)."""
        step = max(1, PRODUCT_ROWS_ELEMENTS // max(1, self.cols))
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            yield r0, r1, int(self.crow[r0]), int(self.crow[r1])

    @property
    def nbytes(self) -> int:
        pos = self.col if self.mask is None else self.mask
        return sum(t.numel() * t.element_size() for t in (self.crow, pos)) + self.value.nbytes

    @property
    def density(self) -> float:
        return self.count / max(1, self.rows * self.cols)

    @property
    def _col_type(self):
        """The columns form's index type: int16 while the columns fit it."""
        torch, _ = require_torch()
        return torch.int16 if self.cols <= 2**15 else torch.int32

    @property
    def _decodes_dense(self) -> bool:
        """Whether a product decodes the delta densely (a mask from DENSE_FROM up) rather than
        into a CSR matrix."""
        return self.mask is not None and self.density >= DENSE_FROM

    def columns_extra_bytes(self) -> int:
        """What the columns form takes more than the mask form (negative: less)."""
        return self.count * self._col_type.itemsize - self.rows * -(-self.cols // 8)

    def to_columns(self) -> None:
        """Hold the positions as column indices from now on (the faster products)."""
        if self.mask is not None:
            self.col = self._columns(self._col_type)
            self.mask, self.layout = None, "columns"

    def _columns(self, dtype=None):
        """Each entry's column (int32, or `dtype`), row by row."""
        torch, _ = require_torch()
        dtype = torch.int32 if dtype is None else dtype
        if self.mask is None:
            return self.col.to(dtype)
        out = torch.empty(self.count, dtype=dtype, device=self.mask.device)
        for r0, r1, lo, hi in self._row_ranges():  # row-major nonzero(): the entries' order
            out[lo:hi] = _unpack_bits(self.mask[r0:r1], self.cols).nonzero()[:, 1].to(dtype)
        return out

    def csr(self):
        """The delta as a float32 CSR matrix (rows x cols) for torch.sparse.mm."""
        return _csr_tensor(self.crow, self._columns(), self.value.float(), (self.rows, self.cols))

    def decoded(self):
        """The form a product multiplies (and the runtime caches): the dense float32 delta for
        a mask from DENSE_FROM up, else the CSR matrix (`product` multiplies either)."""
        return self.dense() if self._decodes_dense else self.csr()

    @staticmethod
    def product(m, x):
        """x m^T for a decoded form m (rows x cols; CSR or dense), x (k, cols) float32 -> (k, rows)
        (from a CSR m the transpose of m x^T: adding it where it goes reads it strided, cheaper
        than making it contiguous)."""
        torch, _ = require_torch()
        if m.layout == torch.strided:
            return torch.nn.functional.linear(x, m)
        return torch.mm(m, x.t()).t()

    def gather_rows(self, ids):
        """Dense float32 rows `ids` (any order, repeats allowed) of the delta: (len(ids), cols)."""
        torch, _ = require_torch()
        uniq, inverse = torch.unique(ids, return_inverse=True)
        start, end = self.crow.long()[uniq], self.crow.long()[uniq + 1]
        counts = end - start
        which = torch.repeat_interleave(torch.arange(uniq.numel(), device=ids.device), counts)  # output row of each entry
        first = torch.cumsum(counts, 0) - counts  # where each row's entries start in the gathered list
        pos = start[which] + torch.arange(which.numel(), device=ids.device) - first[which]
        out = torch.zeros((uniq.numel(), self.cols), dtype=torch.float32, device=ids.device)
        if self.mask is None:
            out[which, self.col[pos].long()] = self.value.float(pos)
        else:  # the rows' set bits in row-major order are their entries in `pos` order
            out.masked_scatter_(_unpack_bits(self.mask[uniq], self.cols).bool(), self.value.float(pos))
        return out[inverse]

    def dense(self):
        """The whole delta, float32 (rows x cols)."""
        return self.dense_rows(0, self.rows)

    def dense_rows(self, r0: int, r1: int):
        """Rows [r0, r1) of the delta, float32 ((r1 - r0) x cols)."""
        torch, _ = require_torch()
        lo, hi = int(self.crow[r0]), int(self.crow[r1])  # the rows' entries
        if self.mask is None:
            out = torch.zeros((r1 - r0, self.cols), dtype=torch.float32, device=self.crow.device)
            counts = (self.crow[r0 + 1 : r1 + 1] - self.crow[r0:r1]).long()
            rows = torch.repeat_interleave(torch.arange(r1 - r0, device=counts.device), counts)
            out[rows, self.col[lo:hi].long()] = self.value.float(slice(lo, hi))
            return out
        # kept bit i holds value number (bits before it, itself included) - 1: a cumulative
        # count (int32), zero where no bit is set, indexes the values behind a leading 0.0
        # (twice as fast as masked_scatter_, 3x nonzero() at rho 0.5)
        bits = _unpack_bits(self.mask[r0:r1], self.cols).reshape(-1)
        at = torch.cumsum(bits, 0, dtype=torch.int32).mul_(bits)
        values = torch.cat([torch.zeros(1, dtype=torch.float32, device=bits.device), self.value.float(slice(lo, hi))])
        return values.index_select(0, at).view(r1 - r0, self.cols)

    def decoded_nbytes(self) -> int:
        """The bytes of `decoded()`: what caching it takes."""
        if self._decodes_dense:
            return 4 * self.rows * self.cols
        return 4 * (self.rows + 1) + 8 * self.count  # CSR: int32 pointers and columns, float32 values

    def product_in_rows(self, x):
        """x S^T without the whole decoded form where that is dense (a mask from DENSE_FROM up):
        PRODUCT_ROWS_ELEMENTS of the delta decoded and multiplied at a time, so that an uncached
        product of a large tensor holds a few MB of temporaries, not 9 bytes an entry of it (the
        dense matrix, the int32 count, the unpacked bits: 0.5 GB for a 14336 x 4096 tensor).
        The CSR form is O(kept entries) and is built whole."""
        torch, _ = require_torch()
        if not self._decodes_dense:
            return self.product(self.csr(), x)
        ranges = list(self._row_ranges())
        if len(ranges) == 1:
            return torch.nn.functional.linear(x, self.dense_rows(0, self.rows))
        out = torch.empty((x.shape[0], self.rows), dtype=torch.float32, device=x.device)
        for r0, r1, _, _ in ranges:
            out[:, r0:r1] = torch.nn.functional.linear(x, self.dense_rows(r0, r1))
        return out


# ---- the routed tensors of each method --------------------------------------------------------


class _Cache:
    """Decoded delta terms, least recently used out, within a byte budget."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self.items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key, build, nbytes):
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
            return hit[0]
        value = build()
        size = nbytes(value)
        if size <= self.budget:
            self._evict(self.budget - size)
            self.items[key] = (value, size)
            self.bytes += size
        return value

    def holds(self, key) -> bool:
        return key in self.items

    def resize(self, budget: int) -> None:
        self.budget = max(0, int(budget))
        self._evict(self.budget)

    def _evict(self, keep: int) -> None:
        """Least recently used out until at most `keep` bytes are held."""
        while self.items and self.bytes > keep:
            _, (_, old) = self.items.popitem(last=False)
            self.bytes -= old


def _tensor_bytes(t) -> int:
    if t.layout != require_torch()[0].strided:  # sparse CSR
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


class MediatorTensor:
    """A routed tensor of a Mediator store: D is the model's own tensor; per task the sparse S_t.
    Terms are tasks (linear in the decision's weights)."""

    def __init__(self, name: str, shape, experts: dict, cache: _Cache):
        self.name, self.shape = name, tuple(shape)
        self.rows, self.cols = _rows_cols(shape)
        self.experts = experts  # task -> CompactSparse
        self.cache = cache

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def _product(self, task, x):
        """x S_task^T: from the cached decoded form where the cache holds or takes it, else
        decoded row range by row range (nothing kept)."""
        e, key = self.experts[task], (self.name, task)
        if self.cache.holds(key) or e.decoded_nbytes() <= self.cache.budget:
            return CompactSparse.product(self.cache.get(key, e.decoded, _tensor_bytes), x)
        return e.product_in_rows(x)

    def matmul_terms(self, tasks: list, xs: list) -> list:
        """[x S_task^T for each term], x (m, cols) float32 -> (m, rows)."""
        return [self._product(task, x) for task, x in zip(tasks, xs)]

    def gather(self, task, ids):
        return self.experts[task].gather_rows(ids)

    def stack_keys(self) -> list:
        """The terms a fused stack holds (every task: any row may weigh any of them)."""
        return list(self.experts)

    def dense_term(self, task):
        """S_task, float32 (rows x cols): a block of the fused stack."""
        return self.experts[task].dense()

    def decision_delta(self, decision: Decision):
        """The whole delta of a decision (small tensors): sum_t w_t S_t, or None for STATIC."""
        if decision.mode == "static":
            return None
        out = None
        for task, w in decision.weights:
            d = self.experts[task].dense()
            d = d if decision.mode != "mix" else d * w
            out = d if out is None else out.add_(d)
        return out


class OneBitTensor:
    """An encoded tensor of a 1bit store. The model holds the STATIC decision's weight, the
    merged model M = theta_0 + lambda * TIES(all), computed once at load (`merged`); a term is
    a task decision k, its delta relative to M:
        Delta_k = theta_0 + tau_hat_k + lambda * TIES(others) - M
                = tau_hat_k + lambda * (TIES({tau_hat_j : j != k}) - TIES(all))
    which is zero when task k has no piece here (its others are all), and (1 - lambda) tau_hat_k
    when k's piece is the only one (TIES of one vector is that vector): a scaled compressed
    delta. Only where two or more tasks have pieces and lambda != 0 is Delta_k nonlinear in the
    encodings: built from them in row chunks per forward, or cached within the budget."""

    def __init__(self, name: str, shape, pieces: dict, lam: float, device, cache: _Cache):
        self.name, self.shape = name, tuple(shape)
        self.pieces = pieces  # task -> TaskPiece | None (dropped)
        self.lam, self.device, self.cache = lam, device, cache
        self.rows, self.cols = _rows_cols(shape)
        self.present = [t for t, pc in pieces.items() if pc is not None]

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self.pieces.values() if pc is not None)

    def own_scale(self, key: tuple) -> float | None:
        """c where Delta_k = c * tau_hat_k (lambda 0, or k's the only piece), else None."""
        if self.lam == 0 or self.present == [key[1]]:
            return 1.0 - self.lam
        return None

    def has_delta(self, key: tuple) -> bool:
        if key == STATIC.key or self.pieces[key[1]] is None:
            return False
        return self.own_scale(key) != 0.0

    def merged(self, base):
        """M = theta_0 + lambda * TIES(all) of the whole tensor, float32, in row chunks (base:
        theta_0, any float dtype): the export's arithmetic for the merged model, unrounded."""
        torch, _ = require_torch()
        base = base.reshape(self.rows, self.cols)
        out = torch.empty((self.rows, self.cols), dtype=torch.float32, device=self.device)
        rows = len(self.shape) >= 2
        for r0 in range(0, self.rows, self._chunk_rows()):
            r1 = min(self.rows, r0 + self._chunk_rows())
            hat = lambda t: self.pieces[t].tau_hat(self.shape, self.device, (r0, r1) if rows else None)  # noqa: E731
            out[r0:r1] = onebit_weight(base[r0:r1], hat, self.pieces, STATIC.key, self.lam, self.device).reshape(r1 - r0, -1)
        return out.reshape(self.shape)

    def _combine(self, key: tuple, hat):
        """Delta_k from hat(task) -> float32 tau_hat (of the same rows); None: no delta."""
        return self._combine_many([key], hat)[0]

    def _combine_many(self, keys: list, hat) -> list:
        """[Delta_k for k in keys] from hat(task) -> float32 tau_hat (of the same rows), None
        where no delta; each task decoded once, lambda * TIES(all) elected once for all keys."""
        hats: dict = {}
        memo = lambda t: hats[t] if t in hats else hats.setdefault(t, hat(t))  # noqa: E731
        ties_all, out = None, []
        for key in keys:
            c = self.own_scale(key) if self.has_delta(key) else 0.0
            if c == 0.0:
                out.append(None)
            elif c is not None:
                out.append(memo(key[1]) * c)
            else:  # two or more pieces: k's others are not empty
                if ties_all is None:
                    ties_all = onebit_terms(memo, self.pieces, STATIC.key, self.lam, self.device)[1]
                own, ties = onebit_terms(memo, self.pieces, key, self.lam, self.device)
                out.append(ties.sub_(ties_all).add_(own))
        return out

    def delta_rows(self, key: tuple, r0: int, r1: int):
        """The delta of rows [r0, r1) as (r1 - r0, cols) float32 (None: no delta)."""
        rows = (r0, r1) if len(self.shape) >= 2 else None
        d = self._combine(key, lambda t: self.pieces[t].tau_hat(self.shape, self.device, rows))
        return None if d is None else d.reshape(r1 - r0, self.cols)

    def _dense(self, key: tuple):
        return self.delta_rows(key, 0, self.rows)

    def stack_keys(self) -> list:
        """The terms a fused stack holds: the task decisions with a delta here."""
        return [("task", t) for t in self.pieces if self.has_delta(("task", t))]

    def dense_term(self, key: tuple):
        """Delta_k, float32 (rows x cols): a block of the fused stack."""
        return self._dense(key)

    def _chunk_rows(self) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, self.cols))

    def full_fits(self) -> bool:
        """Whether a decision's full weight fits the cache (then Linear layers use full())."""
        return self.rows * self.cols * 4 <= self.cache.budget

    def full(self, key: tuple, shared):
        """M + the decision's delta, in the shared weight's dtype (cached)."""
        build = lambda: (shared.float() + self._dense(key).view(shared.shape)).to(shared.dtype)  # noqa: E731
        return self.cache.get((self.name, key), build, _tensor_bytes)

    def matmul_terms(self, keys: list, xs: list) -> list:
        """[x Delta_k^T for each term], x (m, cols) float32, from the encodings: a scaled
        sign-bits term as the signs' product scaled; the others' deltas built together (each
        task decoded once per row chunk) and multiplied chunk by chunk."""
        torch, _ = require_torch()
        out, built = [], []
        for key, x in zip(keys, xs):
            c, piece = self.own_scale(key), self.pieces[key[1]]
            if c is not None and piece.kind in SIGN_KINDS and len(self.shape) >= 2:
                y = signs_product(x, piece, self._chunk_rows())
                out.append(y if c == 1.0 else y.mul_(c))
            else:
                out.append(torch.empty((x.shape[0], self.rows), dtype=torch.float32, device=x.device))
                built.append(len(out) - 1)
        step = self._chunk_rows()
        for r0 in range(0, self.rows if built else 0, step):
            r1 = min(self.rows, r0 + step)
            rows = (r0, r1) if len(self.shape) >= 2 else None
            deltas = self._combine_many([keys[i] for i in built], lambda t: self.pieces[t].tau_hat(self.shape, self.device, rows))
            for i, d in zip(built, deltas):
                torch.matmul(xs[i], d.reshape(r1 - r0, self.cols).t(), out=out[i][:, r0:r1])
        return out

    def gather(self, key: tuple, ids):
        """Rows `ids` of the delta (embeddings): the pieces' rows gathered, then combined."""
        uniq, inverse = require_torch()[0].unique(ids, return_inverse=True)
        shape = (uniq.numel(), *self.shape[1:])
        d = self._combine(key, lambda t: _gathered(self.pieces[t], uniq, self.rows).tau_hat(shape, self.device))
        return d.reshape(uniq.numel(), self.cols)[inverse]

    def decision_delta(self, decision: Decision):
        key = decision.key
        if not self.has_delta(key):
            return None
        return self._dense(key).reshape(self.shape)


SIGN_KINDS = {"1bit": (("bits", "alpha"),), "1bit-row": (("bits", "scale"),), "2bit": (("bits", "scale"), ("bits2", "scale2"))}


def signs_product(x, piece: TaskPiece, step: int):
    """x (m, cols) float32 times tau_hat^T of a sign-bits piece (1bit: alpha * s; 1bit-row:
    scale_r * s; 2bit: the sum of two such), without tau_hat: the +-1 signs of each row chunk
    are looked up a byte at a time, multiplied, then the product is scaled per output row.
    Equals x @ piece.tau_hat(shape).T up to float32 rounding (the scale applied after the sum)."""
    torch, _ = require_torch()
    table = _sign_table(x.device)
    cols = piece.parts["cols"]
    out = None
    for bits_name, scale_name in SIGN_KINDS[piece.kind]:
        packed, scale = piece.parts[bits_name], piece.parts[scale_name]
        rows = packed.shape[0]
        y = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            signs = table.index_select(0, packed[r0:r1].reshape(-1).long()).view(r1 - r0, -1)[:, :cols]
            torch.matmul(x, signs.t(), out=y[:, r0:r1])
        y.mul_(scale if scale.dim() == 0 else scale.view(1, -1))
        out = y if out is None else out.add_(y)
    return out


_ROW_PARTS = {"bits", "bits2", "scale", "scale2", "dense"}  # parts with one entry per tensor row


def _gathered(piece: TaskPiece, ids, rows: int) -> TaskPiece:
    """The piece restricted to rows `ids` (sorted, unique) of its tensor."""
    torch, _ = require_torch()
    if piece.kind == "sparse":  # flat positions: keep the entries of those rows, renumbered
        sp, cols = piece.parts["sparse"], piece.parts["sparse"].size // rows
        r = torch.div(sp.index.long(), cols, rounding_mode="floor")
        pos = torch.searchsorted(ids, r).clamp_(max=ids.numel() - 1)
        keep = ids[pos] == r
        sub = object.__new__(SparseDelta)
        sub.size = ids.numel() * cols
        sub.index = (pos[keep] * cols + (sp.index.long() - r * cols)[keep]).to(sp.index.dtype)
        sub.value = Values(sp.value.float(keep))  # a temporary: float32
        return TaskPiece("sparse", sparse=sub)
    return TaskPiece(piece.kind, **{k: (v[ids] if k in _ROW_PARTS else v) for k, v in piece.parts.items()})


# ---- the modules' forwards --------------------------------------------------------------------


class _Routed:
    """The replacement forward of one module: its routed tensors and the runtime's row plan."""

    def __init__(self, runtime: "DeltaRuntime", module, tensors: dict):
        self.rt, self.module = runtime, module
        self.tensors = tensors  # attribute name ("weight", "bias", ...) -> MediatorTensor | OneBitTensor

    def _check(self, batch: int) -> None:
        n = self.rt.n_rows
        if n is not None and n != batch:
            raise StreammergeError(f"set_rows gave {n} decisions for a batch of {batch} rows")


class DeltaLinear(_Routed):
    def __call__(self, x):
        torch, _ = require_torch()
        m = self.module
        self._check(x.shape[0])
        w = self.tensors.get("weight")
        terms = self.rt.terms(w, x.shape[0]) if w is not None else []
        product = self.rt.product(m, x) if terms else "terms"
        if product == "fused":
            y = self._fused(x, terms)
            terms = []
        elif terms and isinstance(w, OneBitTensor) and w.full_fits():
            y = self._full_weights(x, w, terms)
            terms = []
        elif product == "blocks":
            y = self._blocks(x, terms)
            terms = []
        else:
            y = torch.nn.functional.linear(x, m.weight, m.bias)
        if terms:
            xs = [_take(x, rows) for _, rows, _ in terms]
            ds = w.matmul_terms([key for key, _, _ in terms], [_float32(xr.reshape(-1, xr.shape[-1])) for xr in xs])
            for (_, rows, weights), xr, d in zip(terms, xs, ds):
                _add_rows(y, rows, d.reshape(*xr.shape[:-1], -1), weights)
        b = self.tensors.get("bias")
        if b is not None:
            for decision, rows in self.rt.groups(x.shape[0]):
                db = self.rt.small_delta(b, decision)
                if db is None:
                    continue
                db = db.reshape(-1).to(y.dtype)
                if rows is None:
                    y.add_(db)
                else:
                    y[rows] = y[rows] + db
        return y

    def _fused(self, x, terms):
        """Every row's weight in two products: y_all = x [W; W_1; ...; W_K]^T (the shared weight
        and the K stacked terms, bias on the shared block only), then y[b] = sum_j P[b, j] *
        y_all[b, j] with the plan's coefficients (P[b, 0] = 1; P[b, 1 + j] the row's weight of
        term j: 1 for a top-1 row, p_t for a mix, 0 for STATIC rows and other decisions)."""
        torch, _ = require_torch()
        m = self.module
        keys, wcat, bcat = self.rt.stack(m, self.tensors["weight"])
        p = self.rt.coefficients(keys, terms, x.shape[0], wcat.dtype)  # (batch, 1, 1 + K)
        y = torch.nn.functional.linear(x, wcat, bcat).view(-1, len(keys) + 1, m.out_features)
        if y.shape[0] != p.shape[0]:  # several tokens a row: each token takes its row's coefficients
            return torch.bmm(p.repeat_interleave(y.shape[0] // p.shape[0], dim=0), y).view(*x.shape[:-1], m.out_features)
        # one token a row (a decoding step, x (batch, 1, h)): bmm's (batch, 1, out) is the output's shape
        y = torch.bmm(p, y)
        return y if x.dim() == 3 else y.view(*x.shape[:-1], m.out_features)

    def _blocks(self, x, terms):
        """The shared product for every row, then each term's rows times its dense block of the
        stack (a long prefill: the fused product's (K+1)x FLOPs would not pay, and one dense
        product of a term's rows runs several times faster on a GPU than its sparse one)."""
        torch, _ = require_torch()
        m, F = self.module, torch.nn.functional
        keys, wcat, _ = self.rt.stack(m, self.tensors["weight"])
        n = m.out_features
        y = F.linear(x, m.weight, m.bias)
        for key, rows, weights in terms:
            j = 1 + keys.index(key)
            _add_rows(y, rows, F.linear(_take(x, rows), wcat[j * n : (j + 1) * n]), weights)
        return y

    def _full_weights(self, x, w, terms):
        """Each term's rows with its decision's full (cached) weight, the other rows with the
        shared one: one product per row, as the weight swap does, instead of shared + delta."""
        torch, _ = require_torch()
        m, F = self.module, torch.nn.functional
        if len(terms) == 1 and terms[0][1] is None:
            return F.linear(x, w.full(terms[0][0], m.weight), m.bias)
        y = torch.empty((*x.shape[:-1], m.out_features), dtype=x.dtype, device=x.device)
        for key, rows, _ in terms:
            _put(y, rows, F.linear(_take(x, rows), w.full(key, m.weight), m.bias))
        rest = self.rt.uncovered(w, x.shape[0])
        if rest is not None:
            _put(y, rest, F.linear(_take(x, rest), m.weight, m.bias))
        return y


class DeltaEmbedding(_Routed):
    def __call__(self, ids):
        torch, _ = require_torch()
        m = self.module
        self._check(ids.shape[0])
        y = torch.nn.functional.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        w = self.tensors["weight"]
        for key, rows, weights in self.rt.terms(w, ids.shape[0]):
            sel = _take(ids, rows)
            d = w.gather(key, sel.reshape(-1)).view(*sel.shape, -1)
            _add_rows(y, rows, d, weights)
        return y


class DeltaGrouped(_Routed):
    """Any other module (norms: 1-D weights). One whose output is affine in its 1-D tensors
    (AffineForm: RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm) runs ONCE over the batch with
    neutral tensors, then each row takes its decision's scale and shift; any other runs once
    per row group with the group's tensors. Both on a shallow copy of the module (thread-safe:
    the module itself is not touched)."""

    def __init__(self, runtime, module, tensors):
        super().__init__(runtime, module, tensors)
        self.forward = type(module).forward
        self.form = AffineForm.probe(module, tensors, self.forward)

    def __call__(self, x, *args, **kwargs):
        self._check(x.shape[0])
        groups = self.rt.groups(x.shape[0])
        if len(groups) > 1 and self.form is not None:
            return self.form.apply(self.forward, x, self.rt.row_params(self, x.shape[0]), *args, **kwargs)
        return self._per_group(groups, x, *args, **kwargs)

    def _per_group(self, groups: list, x, *args, **kwargs):
        torch, _ = require_torch()
        out = None
        for decision, rows in groups:
            params = self.rt.small_params(self.module, self.tensors, decision)
            if not params and rows is None:
                return self.forward(self.module, x, *args, **kwargs)
            shadow = _with_params(self.module, params)
            o = self.forward(shadow, _take(x, rows), *args, **kwargs)
            if rows is None:
                return o
            if out is None:
                out = torch.empty((x.shape[0], *o.shape[1:]), dtype=o.dtype, device=o.device)
            _put(out, rows, o)
        return out


class AffineForm:
    """A module whose output is, element by element of its last dimension, affine in its 1-D
    tensors of that length: y = (kappa + w) * n(x) + the sum of its shifts b, with at most one
    scale w (RMSNorm: kappa 0; Gemma's RMSNorm: kappa 1; LayerNorm: its bias a shift). A batch
    whose rows have different tensors then runs the module once with neutral ones (w = 1 - kappa,
    b = 0, so the output is n(x)) and applies each row's kappa + w and b after: one pass instead
    of one per row group.

    The form is found by running the module, never assumed from its class: on a probe input with
    every such tensor 0 (y0), then each at 1 (its coefficient c), then all random (r); the module
    qualifies when the random run gives y0 + sum r c, every c but one's (the scale's) is 1 and
    y0 = kappa * c of the scale."""

    # the probes run in float32: the random run differs from the affine prediction by rounding
    RTOL, ATOL = 1e-4, 1e-5

    def __init__(self, neutral, scale, kappa: float, shifts: tuple):
        self.neutral = neutral  # a shallow copy of the module holding the neutral tensors
        self.scale, self.kappa, self.shifts = scale, kappa, shifts  # attribute names

    @classmethod
    def probe(cls, module, routed: dict, forward) -> "AffineForm | None":
        """The module's form, or None (the per-group path) where it is not affine."""
        torch, _ = require_torch()
        own = dict(module.named_parameters(recurse=False))
        if not routed or any(own[a].dim() != 1 for a in routed):
            return None
        h = own[next(iter(routed))].shape[0]
        attrs = tuple(a for a, p in own.items() if p.dim() == 1 and p.shape[0] == h)
        if not set(routed) <= set(attrs):
            return None
        dev = own[attrs[0]].device
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((2, 3, h), generator=g, device=dev)
        fixed = {a: p.detach().float() for a, p in own.items()}

        def run(values: dict):
            with torch.no_grad():
                y = forward(_with_params(module, {**fixed, **values}), x)
            if not torch.is_tensor(y) or y.shape != x.shape:
                raise ValueError("not elementwise along the last dimension")
            return y.float()

        try:
            zero = {a: torch.zeros(h, device=dev) for a in attrs}
            y0 = run(zero)
            c = {a: run({**zero, a: torch.ones(h, device=dev)}) - y0 for a in attrs}
            r = {a: torch.randn(h, generator=g, device=dev) for a in attrs}
            y = run(r)
        except Exception:  # a module that cannot run on the probe keeps the per-group path
            return None
        tol = {"rtol": cls.RTOL, "atol": cls.ATOL * max(1.0, y.abs().max().item())}
        if not torch.allclose(y, y0 + sum(r[a] * c[a] for a in attrs), **tol):
            return None
        shifts = tuple(a for a in attrs if torch.allclose(c[a], torch.ones_like(c[a]), **tol))
        scales = [a for a in attrs if a not in shifts]
        if len(scales) > 1:
            return None
        scale, kappa = (scales[0] if scales else None), 0.0
        if scale is not None:  # y0 = kappa * c: kappa to 1/1024, so that 1 - kappa is exact
            cs = c[scale]
            kappa = round((y0 * cs).sum().item() / max((cs * cs).sum().item(), 1e-30) * 1024) / 1024
            if not torch.allclose(y0, kappa * cs, **tol):
                return None
        neutral = {a: torch.zeros_like(own[a]) for a in shifts}
        if scale is not None:
            neutral[scale] = torch.full_like(own[scale], 1.0 - kappa)
        return cls(_with_params(module, neutral), scale, kappa, shifts)

    def rows(self, module, groups: list, params_of, batch: int) -> tuple:
        """(scale, shift): float32 (batch, h) tensors, each row's kappa + w and sum of shifts
        (None where the form has none), from its group's tensors (params_of(decision): those
        that differ from the module's)."""
        torch, _ = require_torch()
        out = []
        for attrs, add in (((self.scale,) if self.scale else (), self.kappa), (self.shifts, 0.0)):
            t = None
            for decision, rows in groups if attrs else ():
                params = params_of(decision)
                v = sum(params.get(a, getattr(module, a)).float() for a in attrs) + add
                if t is None:
                    t = torch.empty((batch, v.shape[0]), dtype=torch.float32, device=v.device)
                _put(t, rows, v.expand(len(_indices(rows, batch)), -1))
            out.append(t)
        return tuple(out)

    def apply(self, forward, x, rows: tuple, *args, **kwargs):
        """The module once over the batch with the neutral tensors, then each row's scale and
        shifts (`rows`), in float32, rounded once to the module's output dtype."""
        torch, _ = require_torch()
        y = forward(self.neutral, x, *args, **kwargs)
        view = (y.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)
        scale, shift = (None if t is None else t.view(view) for t in rows)
        if scale is None:
            out = y.float() + shift
        elif shift is None:
            out = y.float() * scale
        else:
            out = torch.addcmul(shift, y.float(), scale)
        return out.to(y.dtype)


def _with_params(module, params: dict):
    import copy

    if not params:
        return module
    shadow = copy.copy(module)
    shadow._parameters = dict(module._parameters)
    shadow._parameters.update(params)
    return shadow


# Rows of a batch: None (all), a slice (a contiguous run: views, no copies; the serving runner
# keeps a batch's rows sorted by decision so that each group is one) or an int64 index tensor.


def _take(x, rows):
    """x[rows] along dim 0."""
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _float32(x):
    """x as float32 (itself when it is)."""
    torch, _ = require_torch()
    return x if x.dtype == torch.float32 else x.float()


def _put(y, rows, v) -> None:
    """y[rows] = v along dim 0."""
    if rows is None:
        y.copy_(v)
    elif isinstance(rows, slice):
        y[rows] = v
    else:
        y.index_copy_(0, rows, v)


def _add_rows(y, rows, d, weights) -> None:
    """y[rows] += weights[:, None...] * d (all of y when rows is None)."""
    if weights is not None:
        d = d * weights.view(-1, *([1] * (d.dim() - 1)))
    if d.dtype != y.dtype:
        d = d.to(y.dtype)
    if rows is None:
        y.add_(d)
    elif isinstance(rows, slice):
        y[rows].add_(d)  # in place on the view: `y[rows] += d` would copy it back onto itself
    else:
        y.index_add_(0, rows, d)


# ---- the runtime ------------------------------------------------------------------------------


class DeltaRuntime:
    """Wraps a loaded transformers model (the store's merged model; for 1bit-Merging its encoded
    tensors hold the STATIC merge M computed at load) so that ONE forward pass over a batch
    computes, for batch row b, the weights of decision b (set_rows). See the module docstring.

    Interface for serving (stable): __init__(model, store, method, device, dtype,
    memory_budget=None), set_rows(decisions), resident_bytes(), tasks, close(), and
    set_memory_budget(bytes) to change the budget later (no second runtime needed); `fused`
    ("auto" | "always" | "never") picks when routed Linears run the fused product.
    """

    def __init__(self, model, store, method: dict, device, dtype, memory_budget: int | None = None):
        torch, _ = require_torch()
        self.model, self.store, self.method = model, store, method
        self.kind = method["method"]
        self.tasks: list[str] = list(method["tasks"])
        self.device, self.dtype = device, dtype
        self.cache = _Cache(0)
        self._fused_mode = "auto"
        self._fusable: dict = {}  # id(Linear module) -> its stack's keys, reserved in the budget
        self._stacks: dict = {}  # id(Linear module) -> (keys, stacked weight, stacked bias or None)
        params = dict(model.named_parameters(remove_duplicate=False))
        self.tensors = self._load(params)  # store tensor name -> MediatorTensor | OneBitTensor
        self._decisions: list[Decision] | None = None
        self._n_rows: int | None = None
        self._plan: dict = {}
        self.plan_rows = 0  # the rows whose row plan the budget reserves (reserve_rows)
        self._patched = self._patch(params)
        self.set_memory_budget(memory_budget)

    def set_memory_budget(self, memory_budget: int | None) -> None:
        """Bytes the weights may take (model + encodings + row plan + cache; None: no cache);
        the cache gets what the model, the encodings and the row plan's reserve (`plan_bound`
        of `plan_rows`) leave, least recently used terms out first."""
        used = self.resident_bytes()
        weights = used["model"] + used["encodings"]
        fixed = weights + self.plan_bound(self.plan_rows)
        if memory_budget is not None and memory_budget <= fixed:
            plan = f", with the row plan of {self.plan_rows} rows {fixed}" if fixed > weights else ""
            raise StreammergeError(f"memory budget {memory_budget} bytes: the model and the encodings alone take {weights}{plan}")
        self.memory_budget = memory_budget
        left = 0 if memory_budget is None else int(memory_budget) - fixed
        self._stacks = {}
        self.cache.resize(left - self._reserve_stacks(left))

    def fixed_bytes(self) -> int:
        """What the budget holds before any cache: the model, the encodings and the reserve of
        the row plan of `plan_rows` rows."""
        used = self.resident_bytes()
        return used["model"] + used["encodings"] + self.plan_bound(self.plan_rows)

    def reserve_rows(self, rows: int) -> None:
        """Reserve the row plan of forwards of up to `rows` rows in the budget (it only grows:
        the server reserves its --max-batch at load; set_rows reserves any larger batch, taking
        it from the cache and the stacks)."""
        if rows > self.plan_rows:
            self.plan_rows = int(rows)
            if self.memory_budget is not None:
                self.set_memory_budget(self.memory_budget)

    # ---- fused products -------------------------------------------------------------------------
    @property
    def fused(self) -> str:
        """When routed Linear layers run the fused product: "auto" (on CUDA, for at most
        FUSED_MAX_TOKENS tokens), "always" (any device and batch: for tests), "never"."""
        return self._fused_mode

    @fused.setter
    def fused(self, mode: str) -> None:
        if mode not in FUSED_MODES:
            raise StreammergeError(f"fused mode {mode!r}: one of {', '.join(FUSED_MODES)}")
        self._fused_mode = mode
        self.set_memory_budget(self.memory_budget)  # the stacks' share of the budget

    def _reserve_stacks(self, left: int) -> int:
        """Which routed Linear layers get a fused stack: in module order, while their stacks
        fit what the model and the encodings leave of the budget; returns the bytes reserved
        (taken from the cache's share, built on first use)."""
        self._fusable = {}
        if self.memory_budget is None or self.fused == "never" or (self.fused == "auto" and not fused_pays(self.device, 1)):
            return 0
        reserved = 0
        for module in self._patched:
            fwd = module.forward
            if not isinstance(fwd, DeltaLinear) or "weight" not in fwd.tensors:
                continue
            keys = fwd.tensors["weight"].stack_keys()
            need = (len(keys) + 1) * sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)
            if keys and reserved + need <= left:
                self._fusable[id(module)] = keys
                reserved += need
        return reserved

    def rebuilt_tensors(self) -> int:
        """Routed tensors with a task term that no compressed delta gives (1bit with lambda != 0
        where two or more tasks have pieces: OneBitTensor's nonlinear Delta_k): each product
        builds it from every task's encodings unless the cache, within the memory budget, holds it."""
        return sum(
            isinstance(t, OneBitTensor) and any(t.own_scale(("task", k)) is None for k in t.present)
            for t in self.tensors.values()
        )

    def fused_layers(self) -> tuple[int, int]:
        """(routed Linear layers whose fused stack is reserved in the budget, routed Linear layers)."""
        linears = sum(isinstance(m.forward, DeltaLinear) and "weight" in m.forward.tensors for m in self._patched)
        return len(self._fusable), linears

    def product(self, module, x) -> str:
        """How this product of a routed Linear (input x) adds its terms: "fused" (the stack in
        one product, see FUSED_MAX_TOKENS), "blocks" (a batch of more tokens, where the module
        has a stack: each term's rows times its dense block) or "terms" (no stack: the
        per-term products from the encodings or the cache)."""
        if id(module) not in self._fusable:
            return "terms"
        if self.fused == "always" or fused_pays(x.device, x.numel() // max(1, x.shape[-1])):
            return "fused"
        return "blocks"

    def stack(self, module, tensor) -> tuple:
        """(keys, [W; W_k for k in keys], [b; 0...] or None) of a fusable Linear, built once,
        in the module's dtype: W the model's weight, W_k the term's dense delta."""
        torch, _ = require_torch()
        hit = self._stacks.get(id(module))
        if hit is None:
            keys, w, bias = self._fusable[id(module)], module.weight, module.bias
            with torch.no_grad():
                stacked = torch.cat([w, *(tensor.dense_term(k).view(w.shape).to(w.dtype) for k in keys)])
                if bias is not None:
                    bias = torch.cat([bias, bias.new_zeros(len(keys) * bias.numel())])
            hit = self._stacks[id(module)] = (keys, stacked, bias)
        return hit

    def coefficients(self, keys: list, terms: list, batch: int, dtype):
        """P (batch, 1, 1 + len(keys)), bmm's left operand: each row's weight of the shared
        block (1) and of each stacked term, from the plan's terms (cached with the plan)."""
        torch, _ = require_torch()
        # a tensor's terms are the batch's decisions with a delta among its keys: the same for
        # every tensor with the same keys (Mediator: all of them)
        plan_key = ("coef", tuple(keys), batch, dtype)
        if plan_key not in self._plan:
            p = torch.zeros((batch, 1 + len(keys)), dtype=torch.float32)
            p[:, 0] = 1.0
            for key, rows, weights in terms:
                idx = torch.as_tensor(list(_indices(rows, batch)), dtype=torch.long)
                p[idx, 1 + keys.index(key)] = 1.0 if weights is None else weights.cpu()
            self._plan[plan_key] = p.to(device=self.device, dtype=dtype).unsqueeze(1)
        return self._plan[plan_key]

    # ---- loading --------------------------------------------------------------------------------
    def _load(self, params: dict) -> dict:
        torch, _ = require_torch()
        out = {}
        if self.kind == "mediator":
            for job in self.store.jobs:
                if job["stage"] != "experts":
                    continue
                name, shape = job["name"], tuple(job["shape"])
                _param(params, name)
                experts = {t: CompactSparse.load(self.store, f"{job['key']}/{t}", job, self.device) for t in self.tasks}
                out[name] = MediatorTensor(name, shape, experts, self.cache)
            self._columns_where_they_fit(out)
            return out
        enc = OneBitEncodings(self.store, self.method, self.device)
        for name in enc.names:
            p = _param(params, name)
            t = OneBitTensor(name, enc.shape[name], enc.pieces[name], enc.lam, self.device, self.cache)
            # the STATIC weight, unrounded, replaces the stored merged tensor; theta_0 is dropped
            p.data = t.merged(enc.base.pop(name)).to(self.dtype).reshape(p.shape)
            out[name] = t
        return out

    def _columns_where_they_fit(self, tensors: dict) -> None:
        """Mediator experts loaded in their smaller position form (mostly the mask) go to int16
        columns, sparsest first (the most speed for the fewest extra bytes), while the extra
        bytes fit COLUMNS_ALLOWANCE of the storage figure (none without storage.json)."""
        path = self.store.path / "storage.json"
        if not path.is_file():
            return
        from ..limits import DOCUMENT, read_json

        allowance = COLUMNS_ALLOWANCE * float(read_json(path, DOCUMENT.named("storage.json"))["total_bytes"])
        masks = [e for t in tensors.values() for e in t.experts.values() if e.layout == "mask"]
        for e in sorted(masks, key=lambda e: e.density):
            extra = e.columns_extra_bytes()
            if extra > allowance:
                continue
            allowance -= extra
            e.to_columns()

    def _patch(self, params: dict) -> list:
        """Replace the forward of every module that holds a routed tensor."""
        torch, _ = require_torch()
        by_id = {id(params[n]): t for n, t in self.tensors.items()}
        patched, seen = [], set()
        for _, module in self.model.named_modules(remove_duplicate=False):
            if id(module) in seen:
                continue
            mine = {a: by_id[id(p)] for a, p in module.named_parameters(recurse=False) if id(p) in by_id}
            if not mine:
                continue
            seen.add(id(module))
            if isinstance(module, torch.nn.Linear):
                fwd = DeltaLinear(self, module, mine)
            elif isinstance(module, torch.nn.Embedding) and set(mine) == {"weight"}:
                fwd = DeltaEmbedding(self, module, mine)
            else:
                fwd = DeltaGrouped(self, module, mine)
            module.forward = fwd
            patched.append(module)
        return patched

    def close(self) -> None:
        """Give the modules their own forward back (the weights stay: the merged model, 1bit its STATIC merge M)."""
        for m in self._patched:
            del m.forward
        self._patched = []

    # ---- the rows of the next forward -----------------------------------------------------------
    def set_rows(self, decisions: Sequence[Decision]) -> None:
        """One decision per batch row of the next forward(s)."""
        decisions = list(decisions)
        for d in decisions:
            for task, _ in d.weights:
                if task not in self.tasks:
                    raise StreammergeError(f"no task {task!r} (tasks: {', '.join(self.tasks)})")
            if self.kind == "1bit" and d.mode == "mix":
                raise StreammergeError("1bit-Merging routes top-1 only (no weighted decisions)")
        if self._decisions is None or [d.key for d in decisions] != [d.key for d in self._decisions]:
            self._plan = {}  # the same decisions as the last forward (a decoding step): same plan
        self.reserve_rows(len(decisions))
        self._decisions = decisions
        self._n_rows = None if len({d.key for d in decisions}) <= 1 else len(decisions)

    @property
    def n_rows(self) -> int | None:
        """Rows the decisions are for (None: one decision for any batch, or none set: static)."""
        return self._n_rows

    def groups(self, batch: int) -> list:
        """[(decision, rows or None for all)] for a batch of `batch` rows."""
        key = ("groups", batch)
        if key not in self._plan:
            self._plan[key] = self._groups(batch)
        return self._plan[key]

    def _groups(self, batch: int) -> list:
        torch, _ = require_torch()
        decs = self._decisions or [STATIC]
        if len({d.key for d in decs}) == 1:
            return [(decs[0], None)]
        by_key: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, d in enumerate(decs):
            by_key.setdefault(d.key, []).append(i)
        return [(decs[idx[0]], self._rows(idx, batch)) for idx in by_key.values()]

    def _rows(self, idx: list[int], batch: int):
        """Row indices (ascending) as None (all), a slice (a contiguous run) or an index tensor."""
        torch, _ = require_torch()
        if len(idx) == batch:
            return None
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return slice(idx[0], idx[0] + len(idx))
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def uncovered(self, tensor, batch: int):
        """The rows no term of `tensor` covers (None: none), for a top-1 plan (disjoint terms)."""
        key = ("uncovered", id(tensor), batch)
        if key not in self._plan:
            covered = set()
            for _, rows, _ in self.terms(tensor, batch):
                covered.update(_indices(rows, batch))
            rest = [i for i in range(batch) if i not in covered]
            self._plan[key] = self._rows(rest, batch) if rest else None
        return self._plan[key]

    def terms(self, tensor, batch: int) -> list:
        """[(term key, rows or None, row weights or None)] of the delta products of `tensor`."""
        key = ("terms", id(tensor), batch)
        if key not in self._plan:
            self._plan[key] = self._terms(tensor, batch)
        return self._plan[key]

    def _terms(self, tensor, batch: int) -> list:
        torch, _ = require_torch()
        groups = self.groups(batch)
        if self.kind == "1bit":  # a term per decision: its delta is nonlinear in the tasks
            return [(d.key, rows, None) for d, rows in groups if tensor.has_delta(d.key)]
        uses: OrderedDict[str, tuple[list, list]] = OrderedDict((t, ([], [])) for t in self.tasks)
        for d, rows in groups:
            if d.mode == "static":
                continue
            idx = _indices(rows, batch)
            for task, w in d.weights:
                uses[task][0].extend(idx)
                uses[task][1].extend([w if d.mode == "mix" else 1.0] * len(idx))
        out = []
        for task, (idx, ws) in uses.items():
            if not idx:
                continue
            order = sorted(range(len(idx)), key=idx.__getitem__)  # ascending rows: runs become slices
            idx, ws = [idx[i] for i in order], [ws[i] for i in order]
            rows = self._rows(idx, batch)
            weights = None if all(w == 1.0 for w in ws) else torch.tensor(ws, dtype=torch.float32, device=self.device)
            out.append((task, rows, weights))
        return out

    def small_params(self, module, tensors: dict, decision: Decision) -> dict:
        """{attribute: the module's tensor + the decision's delta} of its routed small tensors
        (those with a delta), in the module's dtype (cached with the plan)."""
        key = ("params", id(module), decision.key)
        if key not in self._plan:
            params = {}
            for attr, t in tensors.items():
                d = self.small_delta(t, decision)
                if d is not None:
                    base = getattr(module, attr)
                    params[attr] = (base.float() + d.view(base.shape)).to(base.dtype)
            self._plan[key] = params
        return self._plan[key]

    def row_params(self, grouped: "DeltaGrouped", batch: int) -> tuple:
        """An affine module's per-row (scale, shift) tensors (AffineForm.rows), cached with the plan."""
        key = ("rows", id(grouped.module), batch)
        if key not in self._plan:
            params_of = partial(self.small_params, grouped.module, grouped.tensors)
            self._plan[key] = grouped.form.rows(grouped.module, self.groups(batch), params_of, batch)
        return self._plan[key]

    def small_delta(self, tensor, decision: Decision):
        """A small routed tensor's delta for a decision (cached with the plan), or None."""
        key = ("small", id(tensor), decision.key)
        if key not in self._plan:
            self._plan[key] = tensor.decision_delta(decision)
        return self._plan[key]

    # ---- memory ---------------------------------------------------------------------------------
    def resident_bytes(self) -> dict:
        """Bytes on the device: the model's tensors, the encodings, the row plan of the current
        decisions (the tensors `_plan` holds), the cache of decoded terms (and the fused stacks)."""
        torch, _ = require_torch()
        seen, model = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                model += t.numel() * t.element_size()
        enc = sum(t.nbytes for t in self.tensors.values())
        stacks = sum(_tensor_bytes(w) + (0 if b is None else _tensor_bytes(b)) for _, w, b in self._stacks.values())
        plan, seen, todo = 0, set(), list(dict(self._plan).values())  # a copy: the server reads this from another thread
        while todo:
            v = todo.pop()
            if isinstance(v, (list, tuple)):
                todo.extend(v)
            elif isinstance(v, dict):
                todo.extend(v.values())
            elif torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                plan += v.numel() * v.element_size()
        return {"model": model, "encodings": enc, "plan": plan, "cache": self.cache.bytes + stacks}

    def plan_bound(self, rows: int) -> int:
        """The most bytes the row plan holds for a batch of at most `rows` rows, one decision a
        row (so at most `rows` distinct decisions): per routed small tensor (norm weights, Linear
        biases) a float32 delta per decision, and a norm's own tensor per decision; per norm
        run in one pass (AffineForm) its (rows, h) float32 scale and shift; per routed product
        (Linear and Embedding weights) each term's rows (int64) and weights (float32) and the
        rows no term covers; the fused products' coefficients, (rows, 1 + terms) in the model's
        dtype per set of terms; the row groups' indices."""
        if rows <= 0:
            return 0
        total, coefficients = 8 * rows, {}
        for module in self._patched:
            fwd = module.forward
            for attr, tensor in fwd.tensors.items():
                own = getattr(module, attr)
                if isinstance(fwd, DeltaGrouped):
                    total += rows * own.numel() * (4 + own.element_size())
                elif attr != "weight":  # a Linear's bias: its delta
                    total += rows * own.numel() * 4
                else:
                    total += rows * (12 * len(self.tasks) + 8)
                    if isinstance(fwd, DeltaLinear):
                        coefficients[tuple(tensor.stack_keys())] = own.element_size()
            if isinstance(fwd, DeltaGrouped) and fwd.form is not None:
                h = getattr(module, next(iter(fwd.tensors))).shape[0]
                total += rows * h * 4 * ((fwd.form.scale is not None) + bool(fwd.form.shifts))
        return total + sum(rows * (1 + len(keys)) * size for keys, size in coefficients.items() if keys)


def _indices(rows, batch: int):
    """The row numbers of a rows value (None: all of the batch)."""
    if rows is None:
        return range(batch)
    if isinstance(rows, slice):
        return range(rows.start, rows.stop)
    return rows.tolist()


def _param(params: dict, name: str):
    p = params.get(name)
    if p is None:
        raise StreammergeError(
            f"tensor {name} of the store is not a parameter of the loaded model "
            "(routing needs the checkpoint's tensor names as the model's parameter names)"
        )
    return p
