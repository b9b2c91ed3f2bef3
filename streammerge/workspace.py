"""Per-thread reusable buffers: the one pool every stage draws its working arrays from.

Fresh allocations are slow (first touch of new pages runs at ~0.3-0.6 GiB/s on these VMs), so
each worker thread keeps its buffers and reuses them for every block: raw reads (checkpoints/),
converted inputs and stored outputs (engine/), the methods' and passes' temporaries
(ops/topk.scratch), O_DIRECT staging (fsutil). A buffer is named by a key; users keep their keys
apart by prefix (an input slot, ("raw", slot), "checkpoints.raw", ("scratch", name), ...).
Every buffer starts on a page boundary, so any of them can be written with O_DIRECT.
"""

from __future__ import annotations

import threading
from typing import Hashable

import numpy as np

PAGE = 4096
_local = threading.local()


def page_aligned(n: int, dtype=np.uint8) -> np.ndarray:
    """A new array of `n` elements of `dtype` whose data starts on a page boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + PAGE, dtype=np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip : skip + n * dtype.itemsize].view(dtype)


def thread_buffer(key: Hashable, n: int, dtype=np.float32, at_least: int = 1) -> np.ndarray:
    """An array of `n` elements of `dtype`, private to this thread, for `key`; its storage is
    reused by the next call with the same key and dtype (allocated at >= `at_least` elements)."""
    try:
        bufs = _local.bufs
    except AttributeError:
        bufs = _local.bufs = {}
    # called tens of times per row group: the dtype's name comes from a cache, not np.dtype()
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).str
    b = bufs.get((key, name))
    if b is None or b.size < n:
        b = bufs[(key, name)] = page_aligned(max(n, at_least), dtype)
    return b[:n]


_DTYPE_NAMES: dict = {}  # np.float32, np.dtype("float32"), "f4", ... -> "<f4"
