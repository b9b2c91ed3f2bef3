"""Per-thread reusable float32 buffers.

Fresh allocations are slow (first touch of new pages runs at ~0.6 GiB/s here), so each worker
thread keeps one buffer per input slot and reuses it for every block it processes.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def buffer(slot: int, n: int) -> np.ndarray:
    """A float32 array of at least `n` elements, private to this thread, for input slot `slot`."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    b = bufs.get(slot)
    if b is None or b.size < n:
        b = bufs[slot] = np.empty(max(n, 1), dtype=np.float32)
    return b[:n]
