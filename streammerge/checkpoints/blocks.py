"""Reading row blocks of a tensor out of a safetensors file, block by block.

Tasks receive a `TensorHandle` (path, offset, dtype, shape) and open the file for each block. A block's bytes are read with `pread` into a per-thread buffer and
converted into float32, so resident memory holds one block per input per thread whatever the
model size, and nothing stays mapped.

Why `pread` rather than a memory map: measured on this project's 70B-shaped benchmark under a
1000 MB memory cgroup (cold page cache), a map read 6.9-7.1x the input from disk (the kernel's
8 MiB readahead around page faults is evicted before use under the cap) and took 12.7-16.0 s on
two tensors; `pread` with POSIX_FADV_RANDOM (no speculative readahead: each pread already asks
for the whole block) read 2.54x (the passes' own re-reads) in 8.4-9.8 s. Without a cap both
are equal. The page cache still serves repeated reads of a block.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..workspace import thread_buffer
from ..dtypes import float_type, to_float32
from ..errors import CheckpointError
from ..fsutil import memory_available
from .safetensors_header import DTYPE_BITS
from ..geometry import block_shape, num_rows, row_elems  # noqa: F401  (the engine's row view)


def _raw_buffer(nbytes: int) -> np.ndarray:
    """This thread's byte buffer for raw reads (fresh memory is slow to touch here)."""
    return thread_buffer("checkpoints.raw", nbytes, np.uint8)


def read_rows(handle, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows [r0, r1) of `handle` converted into float32 `out` (flat or shaped, >= the block size).

    Returns a view of `out` shaped (r1 - r0, *shape[1:]). A handle without raw storage
    (`has_raw` False: checkpoints.lora.LoraHandle) computes its rows itself.
    """
    if not handle.has_raw:
        return handle.read_rows(r0, r1, out)
    ftype = float_type(handle.dtype)
    n = (r1 - r0) * row_elems(handle.shape)
    dest = out.reshape(-1)[:n].reshape(block_shape(handle.shape, r0, r1))
    buf = read_raw(handle, r0, r1, _raw_buffer(n * ftype.itemsize))
    convert(handle, buf.view(ftype.storage), dest.reshape(-1), r0 * row_elems(handle.shape))
    return dest


def convert(handle, raw: np.ndarray, dest: np.ndarray, first: int, check: bool = True) -> np.ndarray:
    """Flat raw storage values of `handle` (its elements first, first + 1, ...) into the flat
    float32 array `dest`, refusing NaN/Inf unless the handle allows them. `check` False: not
    looked at here, because the caller checks them later (`check_finite` on these values or on
    a result they cannot leave finite; engine/build.py)."""
    ftype = float_type(handle.dtype)
    if check and getattr(handle, "check_finite", True):
        _convert_checked(raw, ftype, dest, handle, first)
    else:
        to_float32(raw, ftype, dest)
    return dest


def read_raw(handle, r0: int, r1: int, buf: np.ndarray) -> np.ndarray:
    """The stored bytes of rows [r0, r1) of `handle` into the uint8 array `buf` (exactly that size).

    Only for handles with `has_raw`: others have no stored bytes to read (read_rows them)."""
    with RawRows(handle, r0, r1) as rows:
        return rows.read(r0, r1, buf)


class RawRows:
    """The stored bytes of rows [r0, r1) of `handle` (with `has_raw`), read through one
    descriptor: at once (read_raw), or in pieces of consecutive rows in order (`pieces`), as
    the engine reads a block group of rows by group of rows so that each piece lands in a
    cache-sized buffer. Opened per block (~20 us): no descriptor cache to bound or to keep
    valid across threads."""

    def __init__(self, handle, r0: int, r1: int, pieces: bool = False, streams: int = 1):
        self.handle, self.r0 = handle, r0
        self.row_bytes = row_elems(handle.shape) * DTYPE_BITS[handle.dtype] // 8
        self.start = handle.offset + r0 * self.row_bytes
        self.span = (r1 - r0) * self.row_bytes
        # In pieces the reads go forward through the span, and read-ahead fetches what follows
        # from disk while a piece is merged: the kernel's (sequential) or ours (read_ahead();
        # `streams`: the descriptors reading in pieces at once, this one included).
        self.ahead = read_ahead(streams) if pieces else 0
        self.advised = 0  # bytes of the span advised (WILLNEED) so far, with our own read-ahead
        advice = "POSIX_FADV_SEQUENTIAL" if pieces and not self.ahead else "POSIX_FADV_RANDOM"
        self.fd = _open_span(handle, self.start, self.span, advice)

    def read(self, a: int, b: int, buf: np.ndarray) -> np.ndarray:
        """Rows [a, b) (within [r0, r1)) into the uint8 array `buf` (exactly their size)."""
        end = (b - self.r0) * self.row_bytes
        if self.ahead and self.advised < self.span and self.advised - end < self.ahead // 2:
            # at most `ahead` bytes past this piece, asked for in halves
            lo, hi = max(self.advised, end), min(self.span, end + self.ahead)
            if hi > lo:
                os.posix_fadvise(self.fd, self.start + lo, hi - lo, os.POSIX_FADV_WILLNEED)
            self.advised = hi
        _pread_full(self.fd, memoryview(buf), self.start + (a - self.r0) * self.row_bytes, self.handle)
        return buf

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "RawRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Read-ahead of blocks read in pieces. The kernel's (POSIX_FADV_SEQUENTIAL) grows windows of up
# to twice read_ahead_kb a descriptor (8 MiB on this project's VMs: 16 MiB, for each input of each
# thread) and is the faster where memory is plentiful. Where it is tight, those pages are evicted
# before they are read and read again: the 70B-shaped ties benchmark under a 1000 MB cgroup read
# 95-99 GB from disk for its 36 GB of preads and took 67-86 s. There the reader advises the next
# READ_AHEAD bytes itself (WILLNEED, in halves, so at most that much is in flight a descriptor):
# 34-36 GB read, 51-52 s. Uncapped (24 GiB box) the kernel's took 55-58 s against 62-67 s.
# "Tight" scales with the descriptors reading at once (threads x inputs): below STREAM_MEMORY
# each, and below TIGHT_MEMORY whatever their number. Under a 3000 MB cgroup the kernel's was
# right for 2 threads x 4 inputs (36 GB read) and evicted for 16 x 4 (59 GB read; ours 34 GB).
READ_AHEAD = 16 << 20
TIGHT_MEMORY = 2 << 30  # memory_available() below this: tight (1000 MB measured; 24 GiB not)
STREAM_MEMORY = TIGHT_MEMORY // 8  # per descriptor reading at once (TIGHT_MEMORY: 2 threads x 4 inputs)


@functools.lru_cache(maxsize=64)
def read_ahead(streams: int = 1) -> int:
    """Bytes a reader in pieces advises ahead itself (where memory is tight for `streams`
    descriptors reading in pieces at once: the build's threads x the job's inputs), or 0: the
    kernel's sequential read-ahead. Decided once a process for each number of streams."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    avail = memory_available()
    return READ_AHEAD if avail is not None and avail < max(TIGHT_MEMORY, streams * STREAM_MEMORY) else 0


def _open_span(handle, start: int, nbytes: int, advice: str = "POSIX_FADV_RANDOM") -> int:
    """A descriptor of handle's file, checked to hold [start, start + nbytes), with the
    read-ahead `advice` (random: off, as each pread asks for exactly what it needs)."""
    fd = os.open(handle.path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    if start + nbytes > size:
        os.close(fd)
        raise CheckpointError(
            f"{handle.path}: tensor {handle.name} ends past the end of the file ({size} bytes); "
            "was the file truncated or replaced after it was opened?"
        )
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, nbytes, getattr(os, advice))
    return fd


def _pread_full(fd: int, view: memoryview, pos: int, handle) -> None:
    while view:
        got = os.preadv(fd, [view], pos)
        if got == 0:
            raise CheckpointError(f"{handle.path}: tensor {handle.name}: unexpected end of file at byte {pos}")
        view, pos = view[got:], pos + got


def read_rows_at(handle, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The rows `rows` (ascending indices) of `handle` converted into float32 `out`, one after
    another, for a pass that looks at only some rows (methods.base.Pass.rows).

    Returns a view of `out` shaped (len(rows), *shape[1:]). The file is opened once and read
    with one pread per run of consecutive rows; POSIX_FADV_RANDOM keeps the kernel from reading
    ahead into the rows between them. Runs are first read without waiting (RWF_NOWAIT: what the
    page cache holds); the rest get POSIX_FADV_WILLNEED all at once before the waiting preads,
    so that the disk fetches them together: one after another, cold, they took 4x as long
    (110-140 ms against 31-38 ms for 293 of 2048 rows of 11 KiB, 4 inputs). A WILLNEED on a run
    already cached costs about as much as reading it, hence not on every run.
    """
    if not handle.has_raw:
        return handle.read_rows_at(rows, out)
    ftype = float_type(handle.dtype)
    L = row_elems(handle.shape)
    row_bytes = L * ftype.itemsize
    dest = out.reshape(-1)[: rows.size * L]
    if rows.size:
        buf = memoryview(_raw_buffer(rows.size * row_bytes))
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        # per run: the part of `buf` still to fill, and its file offset
        todo = [
            (buf[a * row_bytes : b * row_bytes], handle.offset + int(rows[a]) * row_bytes)
            for a, b in zip([0, *breaks], [*breaks, rows.size])
        ]
        first = todo[0][1]
        span = todo[-1][1] + len(todo[-1][0]) - first
        fd = _open_span(handle, first, span)
        try:
            if hasattr(os, "RWF_NOWAIT") and hasattr(os, "posix_fadvise"):
                todo = [(view[got:], pos + got) for view, pos in todo if (got := _read_cached(fd, view, pos)) < len(view)]
                for view, pos in todo:
                    os.posix_fadvise(fd, pos, len(view), os.POSIX_FADV_WILLNEED)
            for view, pos in todo:
                _pread_full(fd, view, pos, handle)
        finally:
            os.close(fd)
        to_float32(np.frombuffer(buf, ftype.storage), ftype, dest)
        if getattr(handle, "check_finite", True):
            # unfused (a few rows): the index maps back through `rows`
            ok = np.isfinite(dest)
            if not ok.all():
                k = int(np.argmin(ok))
                raise nonfinite_error(handle, int(rows[k // L]) * L + k % L, float(dest[k]))
    return dest.reshape((rows.size, *handle.shape[1:]))


def _read_cached(fd: int, view: memoryview, pos: int) -> int:
    """Bytes read into `view` from `pos` without waiting for the disk (0: none cached)."""
    try:
        return os.preadv(fd, [view], pos, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a filesystem without RWF_NOWAIT
        return 0


# ---- non-finite inputs -----------------------------------------------------------------------
# Every block of every input is checked for NaN/Inf, unless its handle says otherwise
# (`TensorHandle.check_finite`, False under `streammerge build --allow-nonfinite`): here as it
# is converted, chunk by chunk on cache-hot data (~1.7 ms per 16 Mi-element bf16 block against
# ~2.8 ms read + conversion), or, where the engine converts a row group unchecked (`convert`'s
# `check`), through `check_finite` once the method's result shows a NaN/Inf (engine/build.py).
_CHECK_CHUNK = 1 << 18  # elements converted then checked at a time (1 MiB of float32)


def _convert_checked(raw: np.ndarray, ftype, dest: np.ndarray, handle, first: int) -> None:
    """to_float32 of flat `raw` into flat `dest`, raising CheckpointError at the first NaN/Inf."""
    ok = thread_buffer("checkpoints.finite", _CHECK_CHUNK, bool)
    n = raw.shape[0]
    for s in range(0, n, _CHECK_CHUNK):
        e = min(n, s + _CHECK_CHUNK)
        d = dest[s:e]
        to_float32(raw[s:e], ftype, d)
        _check_chunk(handle, d, first + s, ok)


def check_finite(handle, values: np.ndarray, first: int) -> None:
    """Raise the error naming the first NaN/Inf of the flat float32 `values` (elements first,
    first + 1, ... of `handle`), unless the handle lets them through."""
    if not getattr(handle, "check_finite", True):
        return
    ok = thread_buffer("checkpoints.finite", _CHECK_CHUNK, bool)
    for s in range(0, values.shape[0], _CHECK_CHUNK):
        _check_chunk(handle, values[s : s + _CHECK_CHUNK], first + s, ok)


def _check_chunk(handle, values: np.ndarray, first: int, ok: np.ndarray) -> None:
    flags = np.isfinite(values, out=ok[: values.shape[0]])
    if not flags.all():
        k = int(np.argmin(flags))
        raise nonfinite_error(handle, first + k, float(values[k]))


def nonfinite_error(handle, index: int, value: float) -> CheckpointError:
    name = "nan" if value != value else ("inf" if value > 0 else "-inf")
    return CheckpointError(
        f"{handle.path}: tensor {handle.name} holds a non-finite value ({name}) at flat index "
        f"{index}; fix the checkpoint, or pass --allow-nonfinite to merge it anyway"
    )



