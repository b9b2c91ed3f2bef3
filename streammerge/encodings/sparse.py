"""Sparse top-rho entries of a tensor, one byte string per row block (Mediator's experts).

Blob layout, version 2 (one row block; everything little-endian):

    offset  size     field
    0       4        magic b"SMSP"
    4       2        version (uint16) = 2
    6       2        value code (uint16): 1 = bfloat16, 2 = int8 groups
    8       4        count c (uint32)
    12      2        layout (uint16): 0 = offsets, 1 = bitmask
    14      2        reserved (uint16) = 0
    16      4        block elements n (uint32), n <= 2**31 - 1
    20      ...      the positions, by layout:
                       offsets  4c bytes: int32 flat offsets *within the block* (row-major over
                                (rows, *shape[1:])), strictly increasing, each in [0, n)
                       bitmask  ceil(n / 8) bytes: bit i (np.packbits, little bit order) set iff
                                flat offset i is kept; exactly c bits set, none past n
    ...     ...      the values, in offset order, by value code:
                       1 bfloat16  2c bytes: bf16 values (round to nearest even from float32)
                       2 int8      4g bytes: float32 scales, g = ceil(c / 64), one per group of
                                   GROUP = 64 consecutive values (the last group: the rest);
                                   then c bytes: int8 codes q in [-127, 127]

int8 groups (`value_bits` 8, like GGML's Q8_0 with a float32 scale: 8.5 bits a value): a group's
scale is absmax(group) / 127 and q = round-half-even(v / scale) (0 where the scale is 0), both
in float32, so |scale * q - v| <= scale / 2. A float32 scale, not float16: task-vector deltas
are often below float16's normal range. Decoding gives bf16(scale * q) (the float32 product,
rounded to nearest even), so the decoded values of both codes are bf16 numbers: the export
holds them as such; the routed runtime (routing/encoded.py's Int8Values) keeps the codes and
scales (`decode_sparse_codes`) and computes the same numbers when it uses them. The groups run
within a blob, so int8 values (not the selection) depend on the store's row blocks; a store keeps
its blocking when resumed, and the device path cuts the same blocks.

The encoder picks the smaller layout: the bitmask when ceil(n / 8) < 4c (a density above about
1/32), else the offsets (ties go to the offsets), so a blob is 20 + min(4c, ceil(n / 8)) + V
bytes, V = 2c (bf16) or 4 ceil(c / 64) + c (int8) (the bitmask halves, or better, the bytes of
an expert at rho 0.1 and above); an empty selection is the 20-byte header. The flat index of an
entry in the tensor is Block.start + offset.

Version 1 blobs (stores written before the bitmask) still decode: a 12-byte header (magic,
version = 1, value code = 1, count), then 4c bytes of int32 offsets and 2c bytes of bf16 values; they
do not record n, so only a caller's `size` bounds their offsets.

Selection (the "top-rho" of a tensor): exactly k = int(rho * n) entries of the whole tensor, the
largest by magnitude, ties at the threshold broken by flat index (lowest first), found by the
exact streamed TopK of ops/topk.py, so the set does not depend on the row blocks.

Mediator's sparse experts (docs/methods.md 3.4): D = mean_t theta_t (float32: summed in task order
from theta_1, then divided by N; optionally rounded to the dtype the dense expert is stored in,
see methods/mediator.py's `mediator_expert_method`), S_t = top-rho of (theta_t - D), stored as above. At inference
theta_t ~ D + S_t (`apply_sparse`).
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np

from ..dtypes import BF16
from ..methods.base import Output

MAGIC = b"SMSP"
VERSION = 2
VALUE_BF16 = 1
VALUE_INT8 = 2
VALUE_CODES = {16: VALUE_BF16, 8: VALUE_INT8}  # value_bits -> value code
GROUP = 64  # int8 values per float32 scale
LAYOUT_OFFSETS = 0
LAYOUT_BITMASK = 1
_HEADER = struct.Struct("<4sHHIHHI")  # magic, version, value code, count, layout, reserved, n
HEADER_SIZE = _HEADER.size  # 20
_HEADER_V1 = struct.Struct("<4sHHI")  # magic, version, value code, count
HEADER_SIZE_V1 = _HEADER_V1.size  # 12
MAX_BLOCK = (1 << 31) - 1



# ---------------------------------------------------------------------------------------------
# blob format


def bitmask_bytes(size: int) -> int:
    """Bytes of the bitmask layout's positions for a block of `size` elements."""
    return -(-size // 8)


def choose_layout(count: int, size: int) -> int:
    """The layout of the smaller blob: the bitmask iff ceil(size / 8) < 4 * count."""
    return LAYOUT_BITMASK if bitmask_bytes(size) < 4 * count else LAYOUT_OFFSETS


def value_bytes(code: int, count: int) -> int:
    """Bytes of `count` values under value `code`."""
    return 2 * count if code == VALUE_BF16 else 4 * -(-count // GROUP) + count


def quantize_int8(values_f32) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scales, int8 codes) of finite values, by groups of GROUP (the module docstring)."""
    val = np.asarray(values_f32, dtype=np.float32)
    if not np.isfinite(val).all():
        raise ValueError("int8 sparse values must be finite")
    grid = np.zeros(-(-val.size // GROUP) * GROUP, np.float32)
    grid[: val.size] = val
    grid = grid.reshape(-1, GROUP)
    scale = np.abs(grid).max(axis=1) / np.float32(127)  # the padding's zeros change no absmax
    q = np.rint(grid / np.where(scale > 0, scale, np.float32(1))[:, None])
    return scale, np.clip(q, -127, 127).astype(np.int8).reshape(-1)[: val.size]


def dequantize_int8(scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """bf16(scale * q) as float32: the values an int8 blob decodes to."""
    v = np.repeat(scale.astype(np.float32), GROUP)[: codes.size] * codes.astype(np.float32)
    return v.astype(BF16.logical).astype(np.float32)


def value_code(value_bits) -> int:
    """The blob value code of `value_bits` (16: bf16, 8: int8 groups); ValueError otherwise."""
    if value_bits not in VALUE_CODES:
        raise ValueError(f"value_bits must be 16 or 8, got {value_bits!r}")
    return VALUE_CODES[value_bits]


def encode_sparse(offsets, values_f32, size: int, value_bits: int = 16) -> bytes:
    """One row block's entries as a blob (see the module docstring); values rounded to bf16
    (`value_bits` 16) or to int8 groups (8).

    `size` is the block's element count: offsets must lie in [0, size); it picks the layout.
    """
    code = value_code(value_bits)
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
    head = _HEADER.pack(MAGIC, VERSION, code, int(off.size), layout, 0, size)
    if layout == LAYOUT_BITMASK:
        mask = np.zeros(size, dtype=bool)
        mask[off] = True
        pos = np.packbits(mask, bitorder="little").tobytes()
    else:
        pos = off.astype("<i4").tobytes()
    if code == VALUE_BF16:
        return head + pos + val.astype(np.float32, copy=False).astype(BF16.logical).view("<u2").tobytes()
    scale, q = quantize_int8(val)
    return head + pos + scale.astype("<f4").tobytes() + q.tobytes()


def _header(blob) -> tuple[int, int, int | None, int, int]:
    """(count, layout, block elements or None for version 1, header size, value code) after
    checking the header and that the blob has exactly the bytes it announces."""
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
    if code not in (VALUE_BF16, VALUE_INT8) or (version == 1 and code != VALUE_BF16):
        raise ValueError(f"sparse blob value code {code} is not supported (1 = bfloat16, 2 = int8 groups in version 2)")
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
    want = head + positions + value_bytes(code, count)
    if mv.nbytes != want:
        raise ValueError(f"sparse blob of {mv.nbytes} bytes, its header says {count} entries ({want} bytes)")
    return count, layout, size, head, code


def sparse_count(blob) -> int:
    """The entries a blob holds, from its checked header (nothing decoded)."""
    return _header(blob)[0]


def decode_sparse(blob, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, float32 values) of a blob; `size` is the block's element count, which a
    version-2 blob records: a different `size` is an error.

    Raises ValueError for anything malformed: short or long data, bad magic, version, value
    code, layout or reserved field; negative, unsorted or repeated offsets, offsets outside the
    block; a bitmask whose set bits are not exactly the count or that sets bits past the block;
    int8 groups with a negative or non-finite scale, a code of -128 or values past bf16's range.
    """
    off, scale, val = _decode(blob, size)
    return off, val if scale is None else _int8_decoded(scale, val)


def decode_sparse_codes(blob, size: int | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(int64 offsets, scales, values) of a blob as it stores them: bf16 values (value code 1)
    as float32 with scales None; int8 groups (2) as the float32 scales, one per GROUP values,
    and the int8 codes, whose decoded values are `dequantize_int8(scales, codes)`. Checked as
    `decode_sparse` checks (the same errors): for readers that keep the codes."""
    off, scale, val = _decode(blob, size)
    if scale is not None:
        _int8_decoded(scale, val)  # values past bf16's range are refused here too
    return off, scale, val


def _decode(blob, size: int | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """decode_sparse_codes without the int8 values' range check (decode_sparse does it on the
    values it computes anyway)."""
    count, layout, stored, head, code = _header(blob)
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
    at = head + pos_bytes
    off = off.astype(np.int64, copy=False)
    if code == VALUE_BF16:
        return off, None, np.frombuffer(buf, dtype="<u2", count=count, offset=at).astype(np.uint16).view(BF16.logical).astype(np.float32)
    return (off, *_int8_groups(buf, at, count))


def _int8_groups(buf: bytes, at: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scales, int8 codes) of the int8 groups at byte `at` of a blob, checked."""
    groups = -(-count // GROUP)
    scale = np.frombuffer(buf, dtype="<f4", count=groups, offset=at).astype(np.float32)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError("sparse blob has a negative or non-finite int8 group scale")
    q = np.frombuffer(buf, dtype=np.int8, count=count, offset=at + 4 * groups)
    if (q == -128).any():
        raise ValueError("sparse blob has an int8 code of -128 (codes are within [-127, 127])")
    return scale, q


def _int8_decoded(scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The groups' decoded values (bf16 numbers, as float32); ValueError past bf16's range."""
    with np.errstate(over="ignore"):
        val = dequantize_int8(scale, codes)
    if not np.isfinite(val).all():
        raise ValueError("sparse blob int8 values overflow bfloat16")
    return val


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


def expert_outputs(tasks: Sequence[str]) -> tuple[Output, ...]:
    """The outputs of methods/mediator.py's `mediator_expert_method`: one blob per task, named by the task."""
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
    "GROUP",
    "HEADER_SIZE",
    "LAYOUT_BITMASK",
    "LAYOUT_OFFSETS",
    "MAGIC",
    "VALUE_BF16",
    "VALUE_CODES",
    "VALUE_INT8",
    "VERSION",
    "apply_sparse",
    "bitmask_bytes",
    "choose_layout",
    "decode_sparse",
    "decode_sparse_codes",
    "dequantize_int8",
    "encode_sparse",
    "expert_block",
    "expert_outputs",
    "quantize_int8",
    "sparse_count",
    "top_rho_k",
    "value_bytes",
    "value_code",
]
