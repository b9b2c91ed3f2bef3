"""Mediator (docs/methods.md section 3): a routing method, registered for its recipe parameters.

The build is a pipeline (plan/routed.py): conflict analysis of every layer, then the
low-conflict layers averaged and the high-conflict ones stored as a dense expert (the mean of
the fine-tunes) plus one sparse top-rho expert per task. With `route_outside`, the tensors that
belong to no layer (embeddings, lm_head, final norm) are routed too: on small models they hold a
large share of each task vector's norm for a few percent of the parameters. Routing happens at
inference.

Below the registration: `mediator_expert_method`, the per-tensor job that stores the sparse
experts (encodings/sparse.py's blobs).
"""

from __future__ import annotations

import functools
import threading
from typing import Sequence

import numpy as np

from ..dtypes import float_type, round_to
from ..encodings import sparse
from ..kernels.sparse import mediator_experts
from ..ops.topk import TopK, flat, scratch, select_block
from .base import Block, MergeMethod, Param, Stats, TensorParams, register

register(
    MergeMethod(
        name="mediator",
        merge=None,
        base="required",
        pipeline="mediator",
        params=(
            Param("task", str, None, scope="model", help="task name of this fine-tune (default: its directory name)"),
            Param("route", float, 0.25, min=0, help="layers routed: a fraction of the layers (< 1) or a count (>= 1), by highest conflict"),
            Param("route_threshold", float, -1.0, help="if >= 0: route every layer whose conflict d_l exceeds it (overrides route); negative: off"),
            Param("conflict", str, "elected", choices=("elected", "pairwise"), help="conflict score used to rank layers"),
            Param("denoise_q", float, 1.0, min=0, max=1, help="count only each task's top-q fraction by magnitude (1: all entries)"),
            Param(
                "route_outside",
                bool,
                False,
                help="also route the tensors outside the layers (embeddings, lm_head, final norm) through D + sparse experts",
            ),
            Param("rho", float, 0.1, min=0, max=1, help="density of each sparse expert: top-rho of (theta_t - dense expert)"),
            Param(
                "value_bits",
                int,
                16,
                choices=(16, 8),
                help="bits per stored sparse-expert value: 16 = bf16, 8 = int8 with a float32 scale per 64 values (about half the bytes)",
            ),
            Param("eta", float, 0.5, min=0, max=1, help="inference: normalised-entropy threshold between top-1 and weighted routing"),
            Param("top_m", int, 0, min=0, help="inference: experts merged when uncertain (0: all)"),
            Param("average", str, "mean", choices=("mean", "task_arithmetic", "ties"), help="how layers that are not routed are averaged"),
            Param("density", float, 0.5, min=0, max=1, help="with average: ties, the TIES density"),
        ),
        summary="average low-conflict layers, route high-conflict ones through a dense + sparse per-task experts",
    )
)


# ---------------------------------------------------------------------------------------------
# The per-tensor job of the routed layers: Mediator's sparse experts, in the blob format of
# encodings/sparse.py (the device path: kernels/sparse.py).

_tls = threading.local()


class _Experts:
    def __init__(self, tasks: list[str], rho: float, dense_dtype: str | None, value_bits: int):
        self.tasks = tasks
        self.rho = float(rho)
        self.value_bits = value_bits
        self.dense = None if dense_dtype is None else float_type(dense_dtype)
        self.tk = TopK("experts.topk", self._values, self._plan)

    def _plan(self, params: TensorParams, stats: Stats, n: int):
        k = sparse.top_rho_k(self.rho, n)
        return [(t, k) for t in range(len(self.tasks))]

    def _mean(self, models: Sequence[np.ndarray], sl) -> np.ndarray:
        """D at flat block positions `sl`: sum in task order from theta_1, / N, in float32."""
        acc = np.array(flat(models[0])[sl], dtype=np.float32, copy=True)
        for m in models[1:]:
            acc += flat(m)[sl]
        acc /= np.float32(len(models))
        if self.dense is not None:
            acc = round_to(acc, self.dense)
        return acc

    def block_mean(self, block: Block) -> np.ndarray:
        """D for the whole block, flat; cached per thread for the block object being worked on."""
        c = getattr(_tls, "mean", None)
        if c is not None and c[0] is block and c[1] is self:
            return c[2]
        D = self._mean(block.models, slice(None))
        _tls.mean = (block, self, D)
        return D

    def _values(self, block: Block, params, stats, src: int, sl: slice, out):
        if sl.step not in (None, 1):  # the sample: a strided subset
            D = self._mean(block.models, sl)
            d = np.subtract(flat(block.models[src])[sl], D, out=D)
        else:
            D = self.block_mean(block)
            d = np.subtract(flat(block.models[src])[sl], D[sl], out=out)
        return np.abs(d, out=d)

    def merge(self, block: Block, params: TensorParams, stats: Stats) -> dict:
        if len(block.models) != len(self.tasks):
            raise ValueError(f"{block.tensor}: {len(block.models)} models for {len(self.tasks)} tasks")
        D = self.block_mean(block)
        out = {}
        for t, task in enumerate(self.tasks):
            mt = flat(block.models[t])

            def diff(c0, c1, mt=mt):
                return np.subtract(mt[c0:c1], D[c0:c1], out=scratch("sp.diff", c1 - c0))

            off, val = select_block(block, self.tk, params, stats, t, diff)
            out[task] = sparse.encode_sparse(off, val, mt.size, self.value_bits)
        _tls.mean = None
        return out


def mediator_expert_method(tasks: Sequence[str], rho: float, dense_dtype: str | None = None, value_bits: int = 16) -> MergeMethod:
    """Mediator's per-task sparse experts of one routed tensor: merge returns {task: blob}.

    Block.models are the N fine-tunes in task order (the base is not used). D is computed per
    block as in the merged model's "mean" job; with `dense_dtype` (e.g. "bfloat16", the dtype
    the dense expert is stored in) D is rounded to it first, so that the stored D plus S_t gives
    theta_t back on the selected entries up to the rounding of S_t's values alone (bf16, or int8
    groups with `value_bits` 8: encodings/sparse.py).
    """
    tasks = sparse.check_tasks(tasks)
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be within [0, 1], got {rho}")
    sparse.value_code(value_bits)  # a wrong value fails here, at plan time, not in the first block
    ex = _Experts(tasks, rho, dense_dtype, value_bits)
    return MergeMethod(
        name="mediator.experts",
        merge=ex.merge,
        kernel=functools.partial(mediator_experts, ex.tasks, ex.rho, None if ex.dense is None else ex.dense.name, value_bits),
        base="unused",
        passes=ex.tk.passes,
        summary="Mediator sparse experts: top-rho of (theta_t - mean), per task, as sparse blobs",
    )
