"""Sparse top-rho entries of a tensor, one byte string per row block (Mediator's experts).

Blob layout, version 2 (one row block; everything little-endian):

    offset  size     field
    0       4        magic b"SMSP"
    4       2        version (uint16) = 2
    6       2        value code (uint16): 1 = bfloat16
    8       4        count c (uint32)
    12      2        layout (uint16): 0 = offsets, 1 = bitmask
    14      2        reserved (uint16) = 0
    16      4        block elements n (uint32), n <= 2**31 - 1
    20      ...      the positions, by layout:
                       offsets  4c bytes: int32 flat offsets *within the block* (row-major over
                                (rows, *shape[1:])), strictly increasing, each in [0, n)
                       bitmask  ceil(n / 8) bytes: bit i (np.packbits, little bit order) set iff
                                flat offset i is kept; exactly c bits set, none past n
    ...     2c       bfloat16 values (round to nearest even from float32), in offset order

The encoder picks the smaller layout: the bitmask when ceil(n / 8) < 4c (a density above about
1/32), else the offsets (ties go to the offsets), so a blob is 20 + min(4c, ceil(n / 8)) + 2c
bytes (the bitmask halves, or better, the bytes of an expert at rho 0.1 and above); an empty
selection is the 20-byte header. The flat index of an entry in the tensor is Block.start + offset.

Version 1 blobs (stores written before the bitmask) still decode: a 12-byte header (magic,
version = 1, value code, count), then 4c bytes of int32 offsets and 2c bytes of bf16 values; they
do not record n, so only a caller's `size` bounds their offsets.

Selection (the "top-rho" of a tensor): exactly k = int(rho * n) entries of the whole tensor, the
largest by magnitude, ties at the threshold broken by flat index (lowest first), found by the
exact streamed TopK of methods/_topk.py, so the set does not depend on the row blocks.

Mediator's sparse experts (docs/methods.md 3.4): D = mean_t theta_t (float32: summed in task order
from theta_1, then divided by N; optionally rounded to the dtype the dense expert is stored in,
see `mediator_expert_method`), S_t = top-rho of (theta_t - D), stored as above. At inference
theta_t ~ D + S_t (`apply_sparse`).
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from ..dtypes import float_type, from_float32
from ..methods._topk import TopK, as_u32, block_size, chunks, flat, scratch
from ..methods.base import Block, MergeMethod, Output, Stats, TensorParams

MAGIC = b"SMSP"
VERSION = 2
VALUE_BF16 = 1
LAYOUT_OFFSETS = 0
LAYOUT_BITMASK = 1
_HEADER = struct.Struct("<4sHHIHHI")  # magic, version, value code, count, layout, reserved, n
HEADER_SIZE = _HEADER.size  # 20
_HEADER_V1 = struct.Struct("<4sHHI")  # magic, version, value code, count
HEADER_SIZE_V1 = _HEADER_V1.size  # 12
MAX_BLOCK = (1 << 31) - 1

_BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16 -> float32 (what a bf16 store gives back)."""
    return np.asarray(x, dtype=np.float32).astype(_BF16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# blob format


def bitmask_bytes(size: int) -> int:
    """Bytes of the bitmask layout's positions for a block of `size` elements."""
    return -(-size // 8)


def choose_layout(count: int, size: int) -> int:
    """The layout of the smaller blob: the bitmask iff ceil(size / 8) < 4 * count."""
    return LAYOUT_BITMASK if bitmask_bytes(size) < 4 * count else LAYOUT_OFFSETS


def encode_sparse(offsets, values_f32, size: int) -> bytes:
    """One row block's entries as a blob (see the module docstring); values rounded to bf16.

    `size` is the block's element count: offsets must lie in [0, size); it picks the layout.
    """
    off = np.asarray(offsets)
    val = np.asarray(values_f32)
    if off.ndim != 1 or val.ndim != 1 or off.shape != val.shape:
        raise ValueError(f"offsets and values must be 1-D of one length, got {off.shape} and {val.shape}")
    if off.size and not np.issubdtype(off.dtype, np.integer):
        raise ValueError(f"offsets must be integers, got {off.dtype}")
    size = int(size)
    if not 0 <= size <= MAX_BLOCK:
        raise ValueError(f"a block of {size} elements cannot be encoded (at most 2**31 - 1)")
    off = off.astype(np.int64, copy=False)
    if off.size:
        if off[0] < 0 or off[-1] >= size:
            raise ValueError(f"offsets must lie in [0, {size}), got {off.min()}..{off.max()}")
        if off.size > 1 and not np.all(off[1:] > off[:-1]):
            raise ValueError("offsets must be strictly increasing")
    layout = choose_layout(off.size, size)
    head = _HEADER.pack(MAGIC, VERSION, VALUE_BF16, int(off.size), layout, 0, size)
    if layout == LAYOUT_BITMASK:
        mask = np.zeros(size, dtype=bool)
        mask[off] = True
        pos = np.packbits(mask, bitorder="little").tobytes()
    else:
        pos = off.astype("<i4").tobytes()
    v = val.astype(np.float32, copy=False).astype(_BF16).view("<u2").tobytes()
    return head + pos + v


def sparse_count(blob) -> int:
    """The number of entries in a blob (header checks only)."""
    return _header(blob)[0]


def _header(blob) -> tuple[int, int, int | None, int]:
    """(count, layout, block elements or None for version 1, header size) after checking the
    header and that the blob has exactly the bytes it announces."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"a sparse blob must be bytes, got {type(blob).__name__}")
    mv = memoryview(blob)
    if mv.nbytes < HEADER_SIZE_V1:
        raise ValueError(f"sparse blob of {mv.nbytes} bytes is shorter than a {HEADER_SIZE_V1}-byte header")
    magic, version, code, count = _HEADER_V1.unpack(bytes(mv[:HEADER_SIZE_V1]))
    if magic != MAGIC:
        raise ValueError(f"not a sparse blob (magic {magic!r}, expected {MAGIC!r})")
    if version not in (1, VERSION):
        raise ValueError(f"sparse blob version {version} is not supported (1 or {VERSION})")
    if code != VALUE_BF16:
        raise ValueError(f"sparse blob value code {code} is not supported (1 = bfloat16)")
    if version == 1:
        layout, size, head = LAYOUT_OFFSETS, None, HEADER_SIZE_V1
    else:
        if mv.nbytes < HEADER_SIZE:
            raise ValueError(f"sparse blob of {mv.nbytes} bytes is shorter than its {HEADER_SIZE}-byte header")
        _, _, _, _, layout, reserved, size = _HEADER.unpack(bytes(mv[:HEADER_SIZE]))
        if layout not in (LAYOUT_OFFSETS, LAYOUT_BITMASK):
            raise ValueError(f"sparse blob layout {layout} is not supported (0 = offsets, 1 = bitmask)")
        if reserved != 0:
            raise ValueError(f"sparse blob reserved field is {reserved}, expected 0")
        if size > MAX_BLOCK:
            raise ValueError(f"sparse blob block of {size} elements exceeds 2**31 - 1")
        if count > size:
            raise ValueError(f"sparse blob has {count} entries in a block of {size} elements")
        head = HEADER_SIZE
    positions = bitmask_bytes(size) if layout == LAYOUT_BITMASK else 4 * count
    want = head + positions + 2 * count
    if mv.nbytes != want:
        raise ValueError(f"sparse blob of {mv.nbytes} bytes, its header says {count} entries ({want} bytes)")
    return count, layout, size, head


def decode_sparse(blob, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, float32 values) of a blob; `size` is the block's element count, which a
    version-2 blob records: a different `size` is an error.

    Raises ValueError for anything malformed: short or long data, bad magic, version, value
    code, layout or reserved field; negative, unsorted or repeated offsets, offsets outside the
    block; a bitmask whose set bits are not exactly the count or that sets bits past the block.
    """
    count, layout, stored, head = _header(blob)
    if stored is not None and size is not None and stored != size:
        raise ValueError(f"sparse blob is for a block of {stored} elements, not {size}")
    bound = stored if stored is not None else size
    buf = bytes(blob) if not isinstance(blob, bytes) else blob
    if layout == LAYOUT_BITMASK:
        nbytes = bitmask_bytes(stored)
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=head), bitorder="little")
        if bits[stored:].any():
            raise ValueError(f"sparse blob bitmask sets bits past its block of {stored} elements")
        off = np.flatnonzero(bits)
        if off.size != count:
            raise ValueError(f"sparse blob bitmask sets {off.size} bits, its header says {count} entries")
        pos_bytes = nbytes
    else:
        off = np.frombuffer(buf, dtype="<i4", count=count, offset=head).astype(np.int64)
        if count:
            if off[0] < 0:
                raise ValueError(f"sparse blob has a negative offset ({off[0]})")
            if count > 1 and not np.all(off[1:] > off[:-1]):
                raise ValueError("sparse blob offsets are not strictly increasing")
            if bound is not None and off[-1] >= bound:
                raise ValueError(f"sparse blob offset {off[-1]} is outside a block of {bound} elements")
        pos_bytes = 4 * count
    raw = np.frombuffer(buf, dtype="<u2", count=count, offset=head + pos_bytes)
    val = raw.astype(np.uint16).view(_BF16).astype(np.float32)
    return off.astype(np.int64, copy=False), val


def apply_sparse(block2d: np.ndarray, blob, scale: float = 1.0) -> np.ndarray:
    """block += scale * S in place (float32 arithmetic) and return it.

    `block2d` is a C-contiguous float32 row block of any shape (offsets are flat within it):
    D + S_k is apply_sparse(D.copy(), S_k); sum_t p_t S_t is successive calls with scale=p_t.
    """
    if block2d.dtype != np.float32 or not block2d.flags.c_contiguous:
        raise ValueError("apply_sparse needs a C-contiguous float32 block")
    off, val = decode_sparse(blob, size=block2d.size)
    if off.size:
        f = block2d.reshape(-1)
        if scale != 1:
            val *= np.float32(scale)
        f[off] += val  # offsets are unique
    return block2d


# ---------------------------------------------------------------------------------------------
# selecting a block's entries of a top-k selection


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


def top_rho_k(rho: float, n: int) -> int:
    """Entries kept by a top-rho selection of n elements: int(rho * n), clamped to [0, n]."""
    return max(0, min(n, int(rho * n)))


def check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("at least one task is needed")
    for t in tasks:
        if not isinstance(t, str) or not t or "/" in t or t.startswith("."):
            raise ValueError(f"invalid task name {t!r} (non-empty, no '/', not starting with '.')")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    return tasks


# ---------------------------------------------------------------------------------------------
# Mediator's sparse experts

_tls = threading.local()


class _Experts:
    def __init__(self, tasks: list[str], rho: float, dense_dtype: str | None):
        self.tasks = tasks
        self.rho = float(rho)
        self.dense = None if dense_dtype is None else float_type(dense_dtype)
        self.tk = TopK("experts.topk", self._values, self._plan)

    def _plan(self, params: TensorParams, stats: Stats, n: int):
        k = top_rho_k(self.rho, n)
        return [(t, k) for t in range(len(self.tasks))]

    def _mean(self, models: Sequence[np.ndarray], sl) -> np.ndarray:
        """D at flat block positions `sl`: sum in task order from theta_1, / N, in float32."""
        acc = np.array(flat(models[0])[sl], dtype=np.float32, copy=True)
        for m in models[1:]:
            acc += flat(m)[sl]
        acc /= np.float32(len(models))
        if self.dense is not None:
            acc = from_float32(acc, self.dense).view(self.dense.logical).astype(np.float32)
        return acc

    def block_mean(self, block: Block) -> np.ndarray:
        """D for the whole block, flat; cached per thread for the block object being worked on."""
        c = getattr(_tls, "mean", None)
        if c is not None and c[0] is block and c[1] is self:
            return c[2]
        D = self._mean(block.models, slice(None))
        _tls.mean = (block, self, D)
        return D

    def _values(self, block: Block, params, stats, src: int, sl: slice, out):
        if sl.step not in (None, 1):  # the sample: a strided subset
            D = self._mean(block.models, sl)
            d = np.subtract(flat(block.models[src])[sl], D, out=D)
        else:
            D = self.block_mean(block)
            d = np.subtract(flat(block.models[src])[sl], D[sl], out=out)
        return np.abs(d, out=d)

    def merge(self, block: Block, params: TensorParams, stats: Stats) -> dict:
        if len(block.models) != len(self.tasks):
            raise ValueError(f"{block.tensor}: {len(block.models)} models for {len(self.tasks)} tasks")
        D = self.block_mean(block)
        out = {}
        for t, task in enumerate(self.tasks):
            mt = flat(block.models[t])

            def diff(c0, c1, mt=mt):
                return np.subtract(mt[c0:c1], D[c0:c1], out=scratch("sp.diff", c1 - c0))

            off, val = select_block(block, self.tk, params, stats, t, diff)
            out[task] = encode_sparse(off, val, mt.size)
        _tls.mean = None
        return out


def mediator_expert_method(tasks: Sequence[str], rho: float, dense_dtype: str | None = None) -> MergeMethod:
    """Mediator's per-task sparse experts of one routed tensor: merge returns {task: blob}.

    Block.models are the N fine-tunes in task order (the base is not used). D is computed per
    block as in the merged model's "mean" job; with `dense_dtype` (e.g. "bfloat16", the dtype
    the dense expert is stored in) D is rounded to it first, so that the stored D plus S_t gives
    theta_t back on the selected entries up to the bf16 rounding of S_t alone.
    """
    tasks = check_tasks(tasks)
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be within [0, 1], got {rho}")
    # Imported here, not at the top: that module imports this one.
    from ..kernels.sparse import mediator_experts

    ex = _Experts(tasks, rho, dense_dtype)
    return MergeMethod(
        name="mediator.experts",
        merge=ex.merge,
        kernel=functools.partial(mediator_experts, ex.tasks, ex.rho, None if ex.dense is None else ex.dense.name),
        base="unused",
        passes=ex.tk.passes,
        summary="Mediator sparse experts: top-rho of (theta_t - mean), per task, as sparse blobs",
    )


def expert_outputs(tasks: Sequence[str]) -> tuple[Output, ...]:
    """The outputs of `mediator_expert_method`: one blob per task, named by the task."""
    return tuple(Output(name=t, dtype="uint8", trailing=(), blob=True) for t in check_tasks(tasks))


def expert_block(dense_block: np.ndarray, blobs: Sequence[bytes], weights: Sequence[float] | None = None) -> np.ndarray:
    """D + sum_t p_t S_t for one row block (float32; D as stored, converted to float32).

    weights None with one blob: D + S_k (top-1 routing). p_t are applied in the given order.
    """
    out = np.array(dense_block, dtype=np.float32, copy=True, order="C")
    if weights is None:
        weights = [1.0] * len(blobs)
    if len(weights) != len(blobs):
        raise ValueError("one weight per blob")
    for b, p in zip(blobs, weights):
        apply_sparse(out, b, p)
    return out


__all__ = [
    "HEADER_SIZE",
    "LAYOUT_BITMASK",
    "LAYOUT_OFFSETS",
    "MAGIC",
    "VERSION",
    "apply_sparse",
    "bf16_round",
    "bitmask_bytes",
    "choose_layout",
    "decode_sparse",
    "encode_sparse",
    "expert_block",
    "expert_outputs",
    "mediator_expert_method",
    "select_block",
    "sparse_count",
    "top_rho_k",
]
