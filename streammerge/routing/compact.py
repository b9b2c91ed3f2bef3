"""A sparse delta resident compressed on the device, and its products: `CompactSparse` holds one
task's S_t of one tensor (row pointers, the positions as int16 columns or the packed bitmask, the
values as stored) and gives x S^T from it, decoded per product or from a cached decoded form.
Mediator's routed tensors (terms.py) hold one per task; the runtime (deltas.py) chooses forms.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..encodings.sparse import sparse_count
from ..errors import StreammergeError
from .encoded import SparseDelta, sparse_blocks, stored_values
from .runtime import require_torch


def _rows_cols(shape) -> tuple[int, int]:
    """A tensor as a matrix: (rows, elements per row); 0-D and 1-D tensors are one row."""
    shape = tuple(shape)
    if len(shape) < 2:
        return 1, int(np.prod(shape, dtype=np.int64)) if shape else 1
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))



# Where a decoded mask-form delta is multiplied as a dense float32 matrix instead of a CSR one:
# from this density (kept entries / entries) up. A dense product takes the same time at any
# density, a CSR one grows with it. Measured on one CPU thread (1024 x 256 and 256 x 1024,
# cached forms): at 32 rows (a decoding step) they are equal near 0.3 (CSR 0.17 ms against 0.21
# at 0.25), at 256 rows near 0.18, at 1 row the dense one is faster from 0.1; decoded per
# product the dense form costs what the CSR one does at 0.1 and less above. At rho 0.5 the
# dense float32 matrix takes the bytes of the float32 CSR one (4 a value + 4 a column index).
DENSE_FROM = 0.25

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
