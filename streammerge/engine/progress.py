"""Progress for long runs: a tqdm bar over input bytes, with rate and ETA, fed by dask callbacks."""

from __future__ import annotations

import sys

from dask.callbacks import Callback
from tqdm import tqdm


class NothingRead:
    """What a task returns when it had nothing to read after all (a pass found not needed): its
    planned bytes leave the bar's total, so the bar ends at the bytes really read."""


NOTHING_READ = NothingRead()


class BytesProgress(Callback):
    """Advances by the bytes each finished task read (`task_bytes[key]`), out of the job's total.

    `done_bytes`: what the store already holds (a resumed build): the bar starts there, and its
    total is the whole job's, so it shows where the work is rather than restarting at 0 %.
    """

    def __init__(self, task_bytes: dict, desc: str, enabled: bool | None = None, done_bytes: int = 0):
        super().__init__()
        self.task_bytes = task_bytes
        total = done_bytes + sum(task_bytes.values())
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=done_bytes,
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
        if not n:
            return
        if isinstance(result, NothingRead):
            self.bar.total -= n
            self.bar.refresh()
        else:
            self.bar.update(n)

    def _finish(self, dsk, state, errored):
        self.bar.close()
