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
    raw = np.frombuffer(m, dtype=ftype.storage, count=n, offset=start)
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


def close_all() -> None:
    """Forget cached maps (they close when the last array view of them is gone)."""
    with _maps_lock:
        _maps.clear()


