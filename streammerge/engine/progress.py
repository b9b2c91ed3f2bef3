"""Progress for long runs: a tqdm bar over input bytes, with rate and ETA, fed by dask callbacks."""

from __future__ import annotations

import sys

from dask.callbacks import Callback
from tqdm import tqdm


class BytesProgress(Callback):
    """Advances by the bytes each finished task was planned to read (`task_bytes[key]`)."""

    def __init__(self, task_bytes: dict, desc: str, enabled: bool | None = None):
        super().__init__()
        self.task_bytes = task_bytes
        total = sum(task_bytes.values())
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not enabled,
            file=sys.stderr,
            smoothing=0.1,
        )

    def _posttask(self, key, result, dsk, state, worker_id):
        n = self.task_bytes.get(key)
        if n:
            self.bar.update(n)

    def _finish(self, dsk, state, errored):
        self.bar.close()
