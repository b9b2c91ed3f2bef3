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

import os
import threading

import numpy as np

from ..dtypes import float_type, to_float32
from ..errors import CheckpointError

_tls = threading.local()


def _raw_buffer(nbytes: int) -> np.ndarray:
    """A per-thread byte buffer of at least `nbytes` (fresh memory is slow to touch here)."""
    buf = getattr(_tls, "raw", None)
    if buf is None or buf.size < nbytes:
        buf = _tls.raw = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf[:nbytes]


def row_elems(shape: tuple[int, ...]) -> int:
    """Elements per row: a 0-d tensor is one row of one element; 1-D tensors have 1-element rows."""
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


def num_rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 1 else 1


def block_shape(shape: tuple[int, ...], r0: int, r1: int) -> tuple[int, ...]:
    return (r1 - r0, *shape[1:]) if len(shape) >= 1 else (1,)


def read_rows(handle, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows [r0, r1) of `handle` converted into float32 `out` (flat or shaped, >= the block size).

    Returns a view of `out` shaped (r1 - r0, *shape[1:]).
    """
    ftype = float_type(handle.dtype)
    n = (r1 - r0) * row_elems(handle.shape)
    start = handle.offset + r0 * row_elems(handle.shape) * ftype.itemsize
    dest = out.reshape(-1)[:n].reshape(block_shape(handle.shape, r0, r1))
    nbytes = n * ftype.itemsize
    buf = _raw_buffer(nbytes)
    # Opened per block (~20 us): no descriptor cache to bound or to keep valid across threads.
    fd = os.open(handle.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if start + nbytes > size:
            raise CheckpointError(
                f"{handle.path}: tensor {handle.name} ends past the end of the file ({size} bytes); "
                "was the file truncated or replaced after it was opened?"
            )
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_RANDOM)
        view, pos = memoryview(buf), start
        while view:
            got = os.preadv(fd, [view], pos)
            if got == 0:
                raise CheckpointError(f"{handle.path}: tensor {handle.name}: unexpected end of file at byte {pos}")
            view, pos = view[got:], pos + got
    finally:
        os.close(fd)
    raw = buf.view(ftype.storage)
    if getattr(handle, "check_finite", True):
        _convert_checked(raw, ftype, dest.reshape(-1), handle, r0 * row_elems(handle.shape))
    else:
        to_float32(raw.reshape(dest.shape), ftype, dest)
    return dest


# ---- non-finite inputs -----------------------------------------------------------------------
# Every block of every input is checked for NaN/Inf as it is converted, unless its handle says
# otherwise (`TensorHandle.check_finite`, False under `streammerge build --allow-nonfinite`).
# The check is fused with the conversion, chunk by chunk, so it runs on cache-hot data: it adds
# ~1.7 ms per 16 Mi-element bf16 block to the ~2.8 ms read + conversion (README, Reliability).
_CHECK_CHUNK = 1 << 18  # elements converted then checked at a time (1 MiB of float32)


def _convert_checked(raw: np.ndarray, ftype, dest: np.ndarray, handle, first: int) -> None:
    """to_float32 of flat `raw` into flat `dest`, raising CheckpointError at the first NaN/Inf."""
    ok = getattr(_tls, "ok", None)
    if ok is None:
        ok = _tls.ok = np.empty(_CHECK_CHUNK, dtype=bool)
    n = raw.shape[0]
    for s in range(0, n, _CHECK_CHUNK):
        e = min(n, s + _CHECK_CHUNK)
        d = dest[s:e]
        to_float32(raw[s:e], ftype, d)
        flags = np.isfinite(d, out=ok[: e - s])
        if not flags.all():
            k = int(np.argmin(flags))
            value = "nan" if np.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
            raise CheckpointError(
                f"{handle.path}: tensor {handle.name} holds a non-finite value ({value}) at flat index "
                f"{first + s + k}; fix the checkpoint, or pass --allow-nonfinite to merge it anyway"
            )



