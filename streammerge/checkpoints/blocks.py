"""Reading row blocks of a tensor out of a memory-mapped safetensors file.

Tasks receive a `TensorHandle` (path, offset, dtype, shape) and open the map lazily here, once
per file per process. After converting a block into float32, the block's pages are dropped from
this process (MADV_DONTNEED): the page cache keeps them, but resident memory does not grow with
the model.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from ..dtypes import float_type, to_float32
from ..errors import CheckpointError

_PAGE = mmap.PAGESIZE
_maps: dict[str, mmap.mmap] = {}
_maps_lock = threading.Lock()


def _map(path: str) -> mmap.mmap:
    m = _maps.get(path)
    if m is None:
        with _maps_lock:
            m = _maps.get(path)
            if m is None:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                _maps[path] = m
    return m


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
    m = _map(handle.path)
    dest = out.reshape(-1)[:n].reshape(block_shape(handle.shape, r0, r1))
    if start + n * ftype.itemsize > len(m):
        raise CheckpointError(
            f"{handle.path}: tensor {handle.name} ends past the end of the file ({len(m)} bytes); "
            "was the file truncated or replaced after it was opened?"
        )
    raw = np.frombuffer(m, dtype=ftype.storage, count=n, offset=start)
    if getattr(handle, "check_finite", True):
        _convert_checked(raw, ftype, dest.reshape(-1), handle, r0 * row_elems(handle.shape))
    else:
        to_float32(raw.reshape(dest.shape), ftype, dest)
    del raw
    lo = start - start % _PAGE
    hi = start + n * ftype.itemsize
    if hi > lo:
        try:
            m.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(m)) - lo)
        except (AttributeError, OSError, ValueError):  # platforms without madvise: pages stay cached
            pass
    return dest


# ---- non-finite inputs -----------------------------------------------------------------------
# Every block of every input is checked for NaN/Inf as it is converted, unless its handle says
# otherwise (`TensorHandle.check_finite`, False under `streammerge build --allow-nonfinite`).
# The check is fused with the conversion, chunk by chunk, so it runs on cache-hot data: it adds
# ~1.7 ms per 16 Mi-element bf16 block to the ~2.8 ms read + conversion (docs/reliability.md).
_CHECK_CHUNK = 1 << 18  # elements converted then checked at a time (1 MiB of float32)
_tls = threading.local()


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


def close_all() -> None:
    """Forget cached maps (they close when the last array view of them is gone)."""
    with _maps_lock:
        _maps.clear()


