"""Execution: one dask task per (tensor, row block).

A merge task reads its block from every input (memory-mapped, converted to float32 into
per-thread buffers), runs the method, rounds to the output dtype, writes its own zarr chunk and
then its completion marker. Methods with tensor-wide passes get, per pass, one task per block
mapping it to a small partial and one task reducing them; the final stats are saved in the
store before any merge task of that tensor runs. The graph only contains blocks without a
marker, so running it again resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask

from ..checkpoints.blocks import read_rows
from ..dtypes import float_type, from_float32
from ..methods import Block, MergeMethod
from ..plan.planner import Plan, TensorJob
from ..store.store import MERGE_STAGE, Store
from .progress import BytesProgress
from .workspace import buffer


@dataclass
class BuildReport:
    blocks_run: int
    blocks_skipped: int
    input_bytes: int


def _read_block(job: TensorJob, i: int) -> Block:
    r0, r1 = job.block_range(i)
    n = (r1 - r0) * job.row_elems
    arrays = [read_rows(h, r0, r1, buffer(slot, n)) for slot, h in enumerate(job.inputs)]
    base = arrays.pop(0) if job.base is not None else None
    return Block(tensor=job.name, shape=job.shape, start=r0 * job.row_elems, base=base, models=tuple(arrays))


def _block_bytes(job: TensorJob, i: int) -> int:
    r0, r1 = job.block_range(i)
    return sum((r1 - r0) * job.row_elems * float_type(h.dtype).itemsize for h in job.inputs)


def _map_task(method: MergeMethod, job: TensorJob, pass_index: int, i: int, stats):
    p = method.passes[pass_index]
    if not p.needed(job.params, stats or {}):
        return None  # nothing to read: the reduce passes the stats through
    return p.map(_read_block(job, i), job.params, stats or {})


def _reduce_task(method: MergeMethod, job: TensorJob, pass_index: int, partials, stats):
    stats = dict(stats or {})
    p = method.passes[pass_index]
    if p.needed(job.params, stats):
        stats.update(p.reduce(partials, job.params, stats))
    return stats


def _save_stats_task(store: Store, job: TensorJob, stats):
    store.save_stats(MERGE_STAGE, job.name, stats)
    return stats


def _merge_task(method: MergeMethod, store: Store, job: TensorJob, i: int, stats) -> None:
    if stats is None and method.passes:
        stats = store.load_stats(MERGE_STAGE, job.name)
    block = _read_block(job, i)
    merged = method.merge(block, job.params, stats or {})
    store.write_block(job.name, i, from_float32(merged, float_type(job.dtype)))
    store.mark_done(MERGE_STAGE, job.name, i)


def build_graph(plan: Plan, store: Store) -> tuple[dict, list, dict, int]:
    """The dask graph of all unfinished work: graph, target keys, input bytes per task, skipped blocks."""
    method = plan.method
    dsk: dict = {}
    targets: list = []
    task_bytes: dict = {}
    skipped = 0
    for job in plan.jobs:
        done = store.done_blocks(MERGE_STAGE, job.name)
        todo = [i for i in range(job.nblocks) if i not in done]
        skipped += job.nblocks - len(todo)
        if not todo:
            continue
        stats_key = None
        if method.passes and store.load_stats(MERGE_STAGE, job.name) is None:
            prev = None
            for p in range(len(method.passes)):
                maps = []
                for i in range(job.nblocks):
                    key = ("pass", job.name, p, i)
                    dsk[key] = (_map_task, method, job, p, i, prev)
                    maps.append(key)
                    task_bytes[key] = _block_bytes(job, i)
                red = ("reduce", job.name, p)
                dsk[red] = (_reduce_task, method, job, p, maps, prev)
                prev = red
            stats_key = ("stats", job.name)
            dsk[stats_key] = (_save_stats_task, store, job, prev)
        for i in todo:
            key = ("merge", job.name, i)
            dsk[key] = (_merge_task, method, store, job, i, stats_key)
            targets.append(key)
            task_bytes[key] = _block_bytes(job, i)
    return dsk, targets, task_bytes, skipped


def run_build(plan: Plan, store: Store, *, workers: int, progress: bool | None = None) -> BuildReport:
    dsk, targets, task_bytes, skipped = build_graph(plan, store)
    if targets:
        with BytesProgress(task_bytes, "merge", enabled=progress):
            dask.threaded.get(dsk, targets, num_workers=workers)
    return BuildReport(blocks_run=len(targets), blocks_skipped=skipped, input_bytes=sum(task_bytes.values()))
