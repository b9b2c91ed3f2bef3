"""Per-thread reusable buffers.

Fresh allocations are slow (first touch of new pages runs at ~0.6 GiB/s here), so each worker
thread keeps its buffers (one per input slot and purpose) and reuses them for every block.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def buffer(slot, n: int, dtype=np.float32) -> np.ndarray:
    """An array of at least `n` elements of `dtype`, private to this thread, for `slot` (any
    hashable name: an input index, ("raw", index), ...)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    dtype = np.dtype(dtype)
    b = bufs.get((slot, dtype))
    if b is None or b.size < n:
        b = bufs[(slot, dtype)] = np.empty(max(n, 1), dtype=dtype)
    return b[:n]
