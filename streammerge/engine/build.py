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

import numpy as np

from ..checkpoints.blocks import read_rows, read_rows_at
from ..dtypes import float_type, from_float32
from ..methods import Block, MergeMethod, Pass
from ..plan.planner import Plan, TensorJob
from ..store.store import Store
from .scheduler import run_graph
from .workspace import buffer


@dataclass
class BuildReport:
    blocks_run: int
    blocks_skipped: int
    input_bytes: int
    on_cpu: tuple[str, ...] = ()  # with a device: the methods that had no kernel and ran on the CPU


def _read_block(job: TensorJob, i: int, rows: np.ndarray | None = None) -> Block:
    """Block i of every input; with `rows` (a pass's declared rows), only those rows of it."""
    r0, r1 = job.block_range(i)
    if rows is None:
        n = (r1 - r0) * job.row_elems
        arrays = [read_rows(h, r0, r1, buffer(slot, n)) for slot, h in enumerate(job.inputs)]
    else:
        rows = _rows_in(rows, r0, r1)
        n = rows.size * job.row_elems
        arrays = [read_rows_at(h, rows, buffer(slot, n)) for slot, h in enumerate(job.inputs)]
    base = arrays.pop(0) if job.base is not None else None
    return Block(
        tensor=job.name, shape=job.shape, start=r0 * job.row_elems, base=base, models=tuple(arrays), rows=rows
    )


def _rows_in(rows: np.ndarray, r0: int, r1: int) -> np.ndarray:
    return rows[np.searchsorted(rows, r0) : np.searchsorted(rows, r1)]


def _pass_rows(p: Pass, job: TensorJob) -> np.ndarray | None:
    return None if p.rows is None else p.rows(job.shape, job.params)


def _block_bytes(job: TensorJob, i: int, rows: np.ndarray | None = None) -> int:
    r0, r1 = job.block_range(i)
    nrows = r1 - r0 if rows is None else _rows_in(rows, r0, r1).size
    return sum(nrows * job.row_elems * float_type(h.dtype).itemsize for h in job.inputs)


def _method(plan: Plan, job: TensorJob) -> MergeMethod:
    return job.method or plan.method


def _map_task(method: MergeMethod, job: TensorJob, pass_index: int, i: int, stats):
    p = method.passes[pass_index]
    if not p.needed(job.params, stats or {}):
        return None  # nothing to read: the reduce passes the stats through
    return p.map(_read_block(job, i, _pass_rows(p, job)), job.params, stats or {})


PASS_BYTES = "_pass_bytes"  # stats key: input bytes the passes read (for the bytes-read figure)


def _reduce_task(method: MergeMethod, job: TensorJob, pass_index: int, partials, stats):
    stats = dict(stats or {})
    p = method.passes[pass_index]
    if p.needed(job.params, stats):
        stats.update(p.reduce(partials, job.params, stats))
        rows = _pass_rows(p, job)
        stats[PASS_BYTES] = int(stats.get(PASS_BYTES, 0)) + sum(_block_bytes(job, i, rows) for i in range(job.nblocks))
    return stats


def _save_stats_task(store: Store, job: TensorJob, stats):
    store.save_stats(job.stage, job.store_key, stats)
    return stats


def _write_outputs(store: Store, job: TensorJob, i: int, result) -> None:
    outputs = job.output_list
    if not isinstance(result, dict):
        result = {outputs[0].name: result}
    for out in outputs:
        value = result[out.name]
        path = job.store_key if not out.name else f"{job.store_key}/{out.name}"
        if out.blob:
            store.write_blob(path, i, value)
            continue
        try:
            raw = from_float32(value, float_type(out.dtype))
        except KeyError:  # not a float type: stored as returned
            raw = value.astype(out.dtype, copy=False)
        store.write_block(path, i, raw)


def _merge_task(method: MergeMethod, store: Store, job: TensorJob, i: int, stats) -> None:
    if stats is None and method.passes:
        stats = store.load_stats(job.stage, job.store_key)
    block = _read_block(job, i)
    _write_outputs(store, job, i, method.merge(block, job.params, stats or {}))
    store.mark_done(job.stage, job.store_key, i)


def _on_device(method: MergeMethod, job: TensorJob, device: str | None) -> bool:
    if device is None or method.kernel is None:
        return False
    from .device import device_budget, job_device_bytes

    return device_budget(device).fits(job_device_bytes(job))


def build_graph(plan: Plan, store: Store, device: str | None = None) -> tuple[dict, list, dict, int]:
    """The dask graph of all unfinished work: graph, target keys, input bytes per task, skipped blocks.

    With a `device`, jobs whose method has a kernel are one task each (engine/device.py)."""
    dsk: dict = {}
    targets: list = []
    task_bytes: dict = {}
    skipped = 0
    for job in plan.jobs:
        method = _method(plan, job)
        key = job.store_key
        has_outputs = bool(job.output_list) and method.merge is not None
        done = store.done_blocks(job.stage, key) if has_outputs else set()
        todo = [i for i in range(job.nblocks) if i not in done]
        stats_saved = not method.passes or store.load_stats(job.stage, key) is not None
        if not has_outputs:
            todo = []
        skipped += job.nblocks - len(todo) if has_outputs else 0
        if (has_outputs and not todo) or stats_saved and not todo:
            continue
        if has_outputs and _on_device(method, job, device):
            from .device import device_task

            k = ("device", job.stage, key)
            dsk[k] = (device_task, method, store, job, todo, device)
            targets.append(k)
            task_bytes[k] = sum(_block_bytes(job, i) for i in range(job.nblocks))
            continue
        stats_key = None
        if not stats_saved:
            prev = None
            for p in range(len(method.passes)):
                maps = []
                rows = _pass_rows(method.passes[p], job)
                for i in range(job.nblocks):
                    k = ("pass", job.stage, key, p, i)
                    dsk[k] = (_map_task, method, job, p, i, prev)
                    maps.append(k)
                    task_bytes[k] = _block_bytes(job, i, rows)
                red = ("reduce", job.stage, key, p)
                dsk[red] = (_reduce_task, method, job, p, maps, prev)
                prev = red
            stats_key = ("stats", job.stage, key)
            dsk[stats_key] = (_save_stats_task, store, job, prev)
            if not has_outputs:
                targets.append(stats_key)
        for i in todo:
            k = ("merge", job.stage, key, i)
            dsk[k] = (_merge_task, method, store, job, i, stats_key)
            targets.append(k)
            task_bytes[k] = _block_bytes(job, i)
    return dsk, targets, task_bytes, skipped


def run_build(
    plan: Plan,
    store: Store,
    *,
    workers: int,
    progress: bool | None = None,
    desc: str = "merge",
    scheduler=None,
    cluster: str | None = None,
    device: str | None = None,
) -> BuildReport:
    dsk, targets, task_bytes, skipped = build_graph(plan, store, device)
    if targets:
        run_graph(
            dsk, targets, task_bytes, workers=workers, scheduler=scheduler, cluster=cluster, desc=desc, progress=progress
        )
    on_cpu = sorted({_method(plan, j).name for j in plan.jobs if device and not _on_device(_method(plan, j), j, device)})
    blocks_run = sum(len(dsk[k][4]) if k[0] == "device" else 1 for k in targets)  # a device task: its blocks
    return BuildReport(
        blocks_run=blocks_run,
        blocks_skipped=skipped,
        input_bytes=_bytes_read(plan, store, task_bytes),
        on_cpu=tuple(on_cpu),
    )


def _bytes_read(plan: Plan, store: Store, task_bytes: dict) -> int:
    """Input bytes this run really read: its merge tasks, and each pass that was needed, of the
    rows it declares (the progress bar counted every scheduled pass; skipped ones read nothing)."""
    total = sum(n for key, n in task_bytes.items() if key[0] in ("merge", "device"))
    scheduled = {(key[1], key[2]) for key in task_bytes if key[0] == "pass"}
    for job in plan.jobs:
        if (job.stage, job.store_key) in scheduled:
            stats = store.load_stats(job.stage, job.store_key) or {}
            total += int(stats.get(PASS_BYTES, 0))
    return total
