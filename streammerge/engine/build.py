"""Execution: one dask task per (tensor, row block).

A merge task reads its block from every input (memory-mapped, converted to float32 into
per-thread buffers), runs the method, rounds to the output dtype, writes its own zarr chunk and
then its completion marker. Methods with tensor-wide passes get, per pass, one task per block
mapping it to a small partial and one task reducing them; the final stats are saved in the
store before any merge task of that tensor runs. The graph only contains blocks without a
marker, so running it again resumes.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..checkpoints.blocks import RawRows, block_shape, check_finite, convert, read_rows, read_rows_at, row_elems
from ..dtypes import BF16, float32_into_finite, float_type
from ..fsutil import store_writers
from ..geometry import numel
from ..jit import available
from ..methods import Block, MergeMethod
from ..methods.base import Output, row_group_elems
from ..plan.planner import Plan, TensorJob, rows_in
from ..store.store import Store
from ..workspace import thread_buffer as buffer
from .progress import NOTHING_READ
from .scheduler import run_graph


@dataclass
class BuildReport:
    blocks_run: int
    blocks_skipped: int
    input_bytes: int
    on_cpu: tuple[str, ...] = ()  # with a device: the methods that had no kernel and ran on the CPU


def _read_block(job: TensorJob, i: int, rows: np.ndarray | None = None, merging: bool = False) -> Block:
    """Block i of every input; with `rows` (a pass's declared rows), only those rows of it.
    `merging`: with this thread's result array (Block.out) for a merge."""
    r0, r1 = job.block_range(i)
    if rows is None:
        n = (r1 - r0) * job.row_elems
        arrays = [read_rows(h, r0, r1, buffer(slot, n)) for slot, h in enumerate(job.inputs)]
    else:
        rows = rows_in(rows, r0, r1)
        n = rows.size * job.row_elems
        arrays = [read_rows_at(h, rows, buffer(slot, n)) for slot, h in enumerate(job.inputs)]
    return _as_block(job, arrays, r0, rows, merging)


def _as_block(job: TensorJob, arrays: list[np.ndarray], r0: int, rows: np.ndarray | None = None, merging: bool = False) -> Block:
    """The inputs' arrays (base first, if any) as the Block a method merges, starting at row r0;
    `merging`: with this thread's reusable result array (methods.base.result_array)."""
    out = buffer("result", arrays[0].size) if merging and arrays else None
    base = arrays.pop(0) if job.base is not None else None
    return Block(tensor=job.name, shape=job.shape, start=r0 * job.row_elems, base=base, models=tuple(arrays), rows=rows, out=out)


def _method(plan: Plan, job: TensorJob) -> MergeMethod:
    return job.method or plan.method


PASS_BYTES = "_pass_bytes"  # stats key: input bytes the passes read (for the bytes-read figure)


def _by_output(job: TensorJob, result) -> dict:
    return result if isinstance(result, dict) else {job.output_list[0].name: result}


def _float_type(out: Output):
    """The FloatType `out` is stored as, or None (not a float type: stored as returned)."""
    try:
        return float_type(out.dtype)
    except KeyError:
        return None


def _stored_types(out: Output) -> tuple[np.dtype, np.dtype]:
    """(what a method's float32 values are cast to, what is stored) for `out`: bf16 is cast to
    ml_dtypes.bfloat16 (round to nearest even) and stored as its uint16 bits."""
    ftype = _float_type(out)
    return (ftype.logical, ftype.storage) if ftype else (np.dtype(out.dtype),) * 2


def _storage_dtype(out: Output) -> np.dtype:
    """What is stored for `out` (uint16 bits for bf16), without the logical type (whose
    ml_dtypes import the common path does without)."""
    ftype = _float_type(out)
    return ftype.storage if ftype else np.dtype(out.dtype)


def _stored_buffer(job: TensorJob, k: int, out: Output, r0: int, r1: int) -> np.ndarray:
    """This thread's buffer for rows [r0, r1) of output `k` as stored (reused block after block)."""
    trailing = job.shape[1:] if out.trailing is None else out.trailing
    n = (r1 - r0) * numel(trailing)
    return buffer(("out", k), n, _storage_dtype(out)).reshape((r1 - r0, *trailing))


def _storage_into(out: Output, value: np.ndarray, dest: np.ndarray) -> bool:
    """A method's float32 `value` for `out` written into `dest` as stored (rounded, e.g. to bf16
    bits); returns whether every value of a float output was finite (what rounding sees)."""
    ftype = _float_type(out)
    if ftype is not None:
        return float32_into_finite(value, ftype, dest)
    np.copyto(dest, value.reshape(dest.shape), casting="unsafe")  # not a float type: stored as returned
    return True


def _commit(store: Store, job: TensorJob, i: int, stored: dict) -> None:
    """Block i's outputs (as stored) into the store, then its completion marker."""
    with store.committing(job.stage, job.store_key, i) as block:
        for out in job.output_list:
            path = job.output_path(out)
            (block.blob if out.blob else block.array)(path, stored[out.name])


def _merge_block(method: MergeMethod, job: TensorJob, i: int, stats) -> dict:
    """Block i merged and rounded to each output's storage, in one call of the method."""
    result = _by_output(job, method.merge(_read_block(job, i, merging=True), job.params, stats))
    r0, r1 = job.block_range(i)
    return {out.name: _as_stored(job, k, out, r0, r1, result[out.name]) for k, out in enumerate(job.output_list)}


def _as_stored(job: TensorJob, k: int, out: Output, r0: int, r1: int, value):
    """A method's value for output `k` as stored: rounded into this thread's buffer for it
    (fresh memory per block is slow to touch); a blob, or a value shaped otherwise, as returned."""
    if out.blob:
        return value
    dest = _stored_buffer(job, k, out, r0, r1)
    if np.size(value) != dest.size:
        logical, storage = _stored_types(out)
        return np.asarray(value).astype(logical, copy=False).view(storage)
    _storage_into(out, value, dest)
    return dest


def _merge_row_groups(method: MergeMethod, job: TensorJob, i: int, stats, group_elems: int, workers: int = 1) -> dict:
    """What `_merge_block` returns, computed group of rows by group of rows (methods with
    `row_groups`): per group, each input's stored bytes are read into a cache-sized buffer,
    converted to float32, merged and rounded into the outputs while they are in cache. Neither
    the raw nor the float32 block is materialised: a block travels through memory once
    (README, Benchmarks). An input without raw bytes (`has_raw` False: a LoRA-applied weight)
    is read as float32 rows once, and sliced per group. A method whose result shows every
    non-finite input (`nonfinite_spreads`) has its result checked instead of its inputs."""
    r0, r1 = job.block_range(i)
    stored = {out.name: _stored_buffer(job, k, out, r0, r1) for k, out in enumerate(job.output_list)}
    unsplit = method.unsplit(stats, r0 * job.row_elems, r1 * job.row_elems) if method.unsplit else ()
    by_result = method.nonfinite_spreads and len(job.output_list) == 1 and _float_type(job.output_list[0]) is not None
    if by_result and not unsplit and _bf16_bits(method, job):
        _merge_bf16_groups(method, job, i, group_elems, stored[job.output_list[0].name], workers)
        return stored
    for a, b, block in _row_groups(job, i, group_elems, merging=True, checked=not by_result, unsplit=unsplit, workers=workers):
        result = _by_output(job, method.merge(block, job.params, stats))
        for out in job.output_list:
            finite = _storage_into(out, result[out.name], stored[out.name][a - r0 : b - r0])
            if by_result and not finite:
                _check_inputs(job, block)  # raises for a non-finite input; else an overflow: kept
    return stored


def _bf16_bits(method: MergeMethod, job: TensorJob) -> bool:
    """Whether `method.merge_bf16` merges this job: every input stored as bf16 bytes, the one
    output bf16, and numba importable (jit.available: the first such job imports it)."""
    if method.merge_bf16 is None or _float_type(job.output_list[0]) is not BF16:
        return False
    if not all(h.has_raw and float_type(h.dtype) is BF16 for h in job.inputs):
        return False
    return available()


def _merge_bf16_groups(method: MergeMethod, job: TensorJob, i: int, group_elems: int, dest: np.ndarray,
                       workers: int = 1) -> None:
    """Block i merged by `method.merge_bf16` group of rows by group of rows: each input's
    stored bytes read into a cache-sized buffer and merged from there into `dest` (the block's
    stored output, bf16 bits). Where a group's result is not finite, its inputs are converted
    and checked (`_check_inputs`: an error names the first NaN/Inf input), else the overflow is
    kept, as `_merge_row_groups` does."""
    r0, r1 = job.block_range(i)
    L = max(1, job.row_elems)
    out = dest.reshape(-1).view(np.uint16)
    with ExitStack() as files:
        sources = [files.enter_context(_pieces(job, h, r0, r1, workers)) for h in job.inputs]
        for a, b in group_bounds(r0, r1, max(1, group_elems // L)):
            n = (b - a) * L
            bits = [src.read(a, b, buffer(("raw", slot), 2 * n, np.uint8)).view(np.uint16) for slot, src in enumerate(sources)]
            base = bits.pop(0) if job.base is not None else None
            if not method.merge_bf16(base, bits, job.params, out[(a - r0) * L : (b - r0) * L]):
                raws = bits if base is None else [base, *bits]
                arrays = [
                    convert(h, raw, buffer(slot, n), a * L, check=False).reshape(block_shape(h.shape, a, b))
                    for slot, (h, raw) in enumerate(zip(job.inputs, raws))
                ]
                _check_inputs(job, _as_block(job, arrays, a))


def _pieces(job: TensorJob, h, r0: int, r1: int, workers: int) -> RawRows:
    """Input `h`'s stored rows [r0, r1), read in pieces; every worker reads every input of its
    job at once, so `workers` x inputs descriptors stream together (read_ahead's `streams`)."""
    return RawRows(h, r0, r1, pieces=True, streams=workers * len(job.inputs))


def _check_inputs(job: TensorJob, block: Block) -> None:
    """The NaN/Inf check of the inputs of `block` (rows read and converted unchecked): raises
    the error naming the first non-finite value of the first input holding one. Inputs without
    raw bytes were checked as they computed their rows."""
    arrays = [block.base, *block.models] if job.base is not None else list(block.models)
    for h, values in zip(job.inputs, arrays):
        if h.has_raw:
            check_finite(h, values.reshape(-1), block.start)


def _row_groups(job: TensorJob, i: int, group_elems: int, merging: bool = False, checked: bool = True, unsplit=(),
                workers: int = 1):
    """(a, b, Block of rows [a, b)) for the groups of about `group_elems` elements of block i,
    read and converted group by group (each Block's arrays are reused by the next), none
    cutting a flat span of `unsplit` (MergeMethod.unsplit). `checked` False: raw inputs are
    not checked for NaN/Inf (the caller does it: `_check_inputs`)."""
    r0, r1 = job.block_range(i)
    L = job.row_elems
    with ExitStack() as files:
        sources = []  # per input: its RawRows, or its float32 rows
        for slot, h in enumerate(job.inputs):
            if h.has_raw:
                sources.append(files.enter_context(_pieces(job, h, r0, r1, workers)))
            else:
                sources.append(read_rows(h, r0, r1, buffer(("rows", slot), (r1 - r0) * L)).reshape(-1))
        spans = [(s0 // max(1, L), -(-s1 // max(1, L))) for s0, s1 in unsplit]  # in rows
        for a, b in group_bounds(r0, r1, max(1, group_elems // max(1, L)), spans):
            arrays = [_group_rows(h, slot, src, r0, a, b, checked) for slot, (h, src) in enumerate(zip(job.inputs, sources))]
            yield a, b, _as_block(job, arrays, a, merging=merging)


def group_bounds(r0: int, r1: int, step: int, spans=()):
    """Row ranges [a, b) of `step` rows covering [r0, r1), a range that would end inside one of
    the row `spans` [s0, s1) widened to its end."""
    a = r0
    while a < r1:
        b = min(r1, a + step)
        while b < r1 and (cut := [s1 for s0, s1 in spans if s0 < b < s1]):
            b = min(r1, max(cut))
        yield a, b
        a = b


def _group_rows(h, slot: int, source, r0: int, a: int, b: int, checked: bool = True) -> np.ndarray:
    """Rows [a, b) of input `slot` as float32 (its block starting at row r0): read and converted
    into this thread's group buffers, or sliced from its float32 rows."""
    L = row_elems(h.shape)
    if not isinstance(source, RawRows):
        rows = source[(a - r0) * L : (b - r0) * L]
    else:
        ftype = float_type(h.dtype)
        raw = source.read(a, b, buffer(("raw", slot), (b - a) * L * ftype.itemsize, np.uint8))
        rows = convert(h, raw.view(ftype.storage), buffer(slot, (b - a) * L), a * L, check=checked)
    return rows.reshape(block_shape(h.shape, a, b))


# ---- the graph's nodes ------------------------------------------------------------------------
# One frozen dataclass per kind of task, as mergekit's Task: the node holds its arguments, is
# called by dask with the results of its dependencies, and names its own dask key (a tuple:
# dask keys must be). Readers of the graph look at the node, never at positions in a tuple.


@dataclass(frozen=True, eq=False)
class Node:
    kind: ClassVar[str]
    method: MergeMethod
    job: TensorJob

    @property
    def key(self) -> tuple:
        return (self.kind, self.job.stage, self.job.store_key, *self.index())

    def index(self) -> tuple:
        return ()


class GroupPartials(list):
    """A pass map's partials for the row groups of one block (Pass.row_groups), in order."""


@dataclass(frozen=True, eq=False)
class PassMap(Node):
    """Pass `pass_index` mapped over block `block`: called with the stats so far."""

    kind = "pass"
    pass_index: int
    block: int
    group_elems: int = 0  # > 0: a pass with `row_groups` maps groups of about this many elements
    workers: int = 1  # the build's threads (how many read at once: RawRows' read-ahead)

    def index(self) -> tuple:
        return (self.pass_index, self.block)

    def __call__(self, stats):
        job, p, stats = self.job, self.method.passes[self.pass_index], stats or {}
        if not p.needed(job.params, stats):
            return NOTHING_READ  # the reduce passes the stats through; the progress bar drops its bytes
        rows = job.pass_rows(p)
        if p.row_groups and rows is None and self.group_elems > 0:
            # A job that merges checks every input as its merge reads it, before any of its
            # blocks is written: its passes, which only compute stats, read unchecked.
            checked = not (job.output_list and self.method.merge is not None)
            groups = _row_groups(job, self.block, self.group_elems, checked=checked, workers=self.workers)
            return GroupPartials(_map_group(p, job, block, stats, checked) for _, _, block in groups)
        return p.map(_read_block(job, self.block, rows), job.params, stats)


def _map_group(p, job: TensorJob, block: Block, stats, checked: bool):
    """Pass `p` mapped over a row group; read unchecked, a failure is first blamed on a
    non-finite input (the error a checked read would have given), if there is one."""
    try:
        return p.map(block, job.params, stats)
    except Exception:
        if not checked:
            _check_inputs(job, block)
        raise


def _block_partials(partials) -> list:
    """The partials of every block, in order, a block mapped in row groups giving its groups'."""
    return [q for part in partials for q in (part if isinstance(part, GroupPartials) else (part,))]


@dataclass(frozen=True, eq=False)
class PassReduce(Node):
    """Pass `pass_index`'s partials reduced into the stats: called with (partials, stats so far)."""

    kind = "reduce"
    pass_index: int

    def index(self) -> tuple:
        return (self.pass_index,)

    def __call__(self, partials, stats):
        job = self.job
        stats = dict(stats or {})
        p = self.method.passes[self.pass_index]
        if p.needed(job.params, stats):
            stats.update(p.reduce(_block_partials(partials), job.params, stats))
            rows = job.pass_rows(p)
            stats[PASS_BYTES] = int(stats.get(PASS_BYTES, 0)) + sum(job.block_bytes(i, rows) for i in range(job.nblocks))
        return stats


@dataclass(frozen=True, eq=False)
class SaveStats(Node):
    """The final stats saved in the store, before any merge task of the job reads them."""

    kind = "stats"
    store: Store

    def __call__(self, stats):
        self.store.save_stats(self.job.stage, self.job.store_key, stats)
        return stats


@dataclass(frozen=True, eq=False)
class MergeBlock(Node):
    """Block `block` merged, written and marked: called with the stats (None: load them)."""

    kind = "merge"
    store: Store
    block: int
    group_elems: int
    workers: int = 1  # the build's threads (how many read at once: RawRows' read-ahead)

    def index(self) -> tuple:
        return (self.block,)

    def __call__(self, stats) -> None:
        method, job = self.method, self.job
        if stats is None and method.passes:
            stats = self.store.load_stats(job.stage, job.store_key)
        r0, r1 = job.block_range(self.block)
        in_groups = method.in_row_groups(stats or {}, r0 * job.row_elems, r1 * job.row_elems)
        if in_groups and not any(out.blob for out in job.output_list):
            stored = _merge_row_groups(method, job, self.block, stats or {}, self.group_elems, self.workers)
        else:
            stored = _merge_block(method, job, self.block, stats or {})
        _commit(self.store, job, self.block, stored)


@dataclass(frozen=True, eq=False)
class DeviceJob(Node):
    """The whole job on a device (engine/device.py): its kernel once, then the `blocks` written."""

    kind = "device"
    store: Store
    blocks: tuple[int, ...]
    device: str

    def __call__(self) -> None:
        from .device import device_task

        device_task(self.method, self.store, self.job, list(self.blocks), self.device)


def _add(dsk: dict, node: Node, *deps) -> tuple:
    """`node` into the graph, called with the results of the keys `deps`; returns its key."""
    dsk[node.key] = (node, *deps)
    return node.key


def graph_node(dsk: dict, key) -> Node:
    return dsk[key][0]


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
    group_elems = row_group_elems(plan.workers)
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
            k = _add(dsk, DeviceJob(method, job, store, tuple(todo), device))
            targets.append(k)
            task_bytes[k] = sum(job.block_bytes(i) for i in todo)
            continue
        stats_key = None
        if not stats_saved:
            prev = None
            for p in range(len(method.passes)):
                maps = []
                rows = job.pass_rows(method.passes[p])
                for i in range(job.nblocks):
                    k = _add(dsk, PassMap(method, job, p, i, group_elems, plan.workers), prev)
                    maps.append(k)
                    task_bytes[k] = job.block_bytes(i, rows)
                prev = _add(dsk, PassReduce(method, job, p), maps, prev)
            stats_key = _add(dsk, SaveStats(method, job, store), prev)
            if not has_outputs:
                targets.append(stats_key)
        for i in todo:
            k = _add(dsk, MergeBlock(method, job, store, i, group_elems, plan.workers), stats_key)
            targets.append(k)
            task_bytes[k] = job.block_bytes(i)
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
        with store.writing_behind(store_writers(workers)):
            run_graph(
                dsk, targets, task_bytes, workers=workers, scheduler=scheduler, cluster=cluster, desc=desc, progress=progress,
                done_bytes=_bytes_done(plan, store),
            )
    on_cpu = sorted({_method(plan, j).name for j in plan.jobs if device and not _on_device(_method(plan, j), j, device)})
    blocks_run = sum(_blocks_written(graph_node(dsk, k)) for k in targets)
    return BuildReport(
        blocks_run=blocks_run,
        blocks_skipped=skipped,
        input_bytes=_bytes_read(plan, store, dsk, task_bytes),
        on_cpu=tuple(on_cpu),
    )


def _blocks_written(node: Node) -> int:
    """Blocks a target task counts for in the report: a device job its blocks, others one."""
    return len(node.blocks) if isinstance(node, DeviceJob) else 1


def _bytes_done(plan: Plan, store: Store) -> int:
    """Input bytes of the work the store already holds (where a resumed progress bar starts):
    its finished blocks, and the passes of the tensors whose stats are saved."""
    total = 0
    for job in plan.jobs:
        method = _method(plan, job)
        if method.passes:
            total += int((store.load_stats(job.stage, job.store_key) or {}).get(PASS_BYTES, 0))
        if job.output_list and method.merge is not None:
            total += sum(job.block_bytes(i) for i in store.done_blocks(job.stage, job.store_key))
    return total


def _bytes_read(plan: Plan, store: Store, dsk: dict, task_bytes: dict) -> int:
    """Input bytes this run really read: its merge tasks, and each pass that was needed, of the
    rows it declares: where the progress bar ends (a pass found not needed leaves its total)."""
    nodes = [graph_node(dsk, key) for key in task_bytes]
    total = sum(n for node, n in zip(nodes, task_bytes.values()) if isinstance(node, (MergeBlock, DeviceJob)))
    scheduled = {(node.job.stage, node.job.store_key) for node in nodes if isinstance(node, PassMap)}
    for job in plan.jobs:
        if (job.stage, job.store_key) in scheduled:
            stats = store.load_stats(job.stage, job.store_key) or {}
            total += int(stats.get(PASS_BYTES, 0))
    return total
