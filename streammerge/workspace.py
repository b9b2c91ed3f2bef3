"""Per-thread reusable buffers: the one pool every stage draws its working arrays from.

Fresh allocations are slow (first touch of new pages runs at ~0.6 GiB/s here), so each worker
thread keeps its buffers and reuses them for every block: raw reads (checkpoints/), converted
inputs and stored outputs (engine/), the methods' and passes' temporaries (ops/topk.scratch).
A buffer is named by a key; users keep their keys apart by prefix (an input slot, ("raw",
slot), "checkpoints.raw", ("scratch", name), ...).
"""

from __future__ import annotations

import threading
from typing import Hashable

import numpy as np

_local = threading.local()


def thread_buffer(key: Hashable, n: int, dtype=np.float32, at_least: int = 1) -> np.ndarray:
    """An array of `n` elements of `dtype`, private to this thread, for `key`; its storage is
    reused by the next call with the same key and dtype (allocated at >= `at_least` elements)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    dtype = np.dtype(dtype)
    b = bufs.get((key, dtype.str))
    if b is None or b.size < n:
        b = bufs[(key, dtype.str)] = np.empty(max(n, at_least), dtype=dtype)
    return b[:n]
