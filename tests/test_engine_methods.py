"""Every registered method, streamed by the engine, equals the same method run in memory.

The methods' own tests check their math against mergekit; this checks the engine: passes run
over all blocks and reduced in order, stats persisted and reloaded on resume, blocks merged
independently, results rounded to the output dtype; for any block size and worker count.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import synth_checkpoints as synth
from helpers import load_model_tensors, write_recipe
from streammerge.engine.job import build
from streammerge.methods import get_method, method_names
from streammerge.ops import topk as _topk
from streammerge.methods.inmemory import merge_tensor
from streammerge.recipe import load_recipe
from streammerge.plan.planner import make_plan
from streammerge.export.hf import export_store

# (models used, base?, global parameters, per-model parameters) for each method.
CASES = {
    "linear": (3, False, {}, {"weight": [0.5, 0.3, 0.2]}),
    "task_arithmetic": (3, True, {"lambda": 0.8}, {"weight": [0.5, 0.3, 0.2]}),
    "ties": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.6]}),
    "dare_ties": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.6]}),
    "dare_linear": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.6]}),
    "breadcrumbs": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.8, 0.7, 0.9], "gamma": [0.01, 0.02, 0.01]}),
    "breadcrumbs_ties": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.8, 0.7, 0.9]}),
    "della": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.1, 0.1]}),
    "della_linear": (3, True, {}, {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.4, 0.6]}),
    "sce": (3, True, {"select_topk": 0.5}, {}),
    "slerp": (1, True, {"t": 0.3}, {}),
    "nuslerp": (2, False, {}, {"weight": [0.6, 0.4]}),
    "multislerp": (3, False, {}, {"weight": [0.5, 0.3, 0.2]}),
    "karcher": (3, False, {}, {}),
    "model_stock": (3, True, {}, {}),
    "nearswap": (1, True, {"t": 0.001}, {}),
    "arcee_fusion": (1, True, {}, {}),
    "ram": (3, True, {"epsilon": 1e-4}, {}),
    "ramplus_tl": (3, True, {"r": 0.5, "alpha": 0.5, "epsilon": 1e-4}, {}),
    "passthrough": (1, False, {}, {}),
}


def test_every_registered_method_has_an_engine_case():
    static = {m for m in method_names() if get_method(m).pipeline is None}  # routing methods: test_routed.py
    assert static <= set(CASES), static - set(CASES)


@pytest.mark.parametrize("method", sorted(CASES))
def test_engine_equals_in_memory(method, synth_family, tmp_path):
    if method not in method_names():
        pytest.skip(f"{method} is not registered")
    _check_engine_equals_in_memory(method, synth_family, tmp_path)


@pytest.mark.parametrize("method", sorted(m for m in CASES if m in method_names() and get_method(m).row_groups))
@pytest.mark.parametrize("group_elems", [1, 700])
def test_row_groups_equal_in_memory(method, group_elems, synth_family, tmp_path, monkeypatch):
    """Methods merged group of rows by group of rows (MergeMethod.row_groups): one row per call,
    and several rows per call with a ragged last group, give the in-memory result."""
    import streammerge.engine.build as engine_build

    monkeypatch.setattr(engine_build, "row_group_elems", lambda workers: group_elems)
    calls = []
    merge = engine_build._merge_row_groups
    monkeypatch.setattr(engine_build, "_merge_row_groups", lambda *a: calls.append(1) or merge(*a))
    _check_engine_equals_in_memory(method, synth_family, tmp_path)
    assert calls, "the row-group path ran"


def _check_engine_equals_in_memory(method, synth_family, tmp_path):
    n_models, with_base, globals_, per_model = CASES[method]
    base, fts = synth_family("methods", dtype="bfloat16")
    recipe = {"merge_method": method}
    if with_base:
        recipe["base_model"] = str(base)
    recipe["models"] = [
        {"model": str(fts[i]), "parameters": {k: v[i] for k, v in per_model.items()}} for i in range(n_models)
    ]
    if globals_:
        recipe["parameters"] = globals_
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe)

    # Small blocks (several per tensor, a ragged last one), two workers.
    build(recipe_path, tmp_path / "job.zarr", workers=2, block_elems=1000, seed=7, progress=False)
    # Resume from persisted stats: forget every merged block, keep the stats, build again.
    shutil.rmtree(tmp_path / "job.zarr" / "done")
    build(recipe_path, tmp_path / "job.zarr", workers=2, block_elems=1000, seed=7, progress=False)
    from streammerge.store.store import Store

    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    got = load_model_tensors(tmp_path / "out")

    plan = make_plan(load_recipe(recipe_path), seed=7)
    m = get_method(method)
    arrays = {spec: load_model_tensors(ck.directory) for spec, ck in plan.checkpoints.items()}
    f32 = lambda t: t.float().numpy()  # noqa: E731
    for job in plan.jobs:
        base_arr = f32(arrays[plan.base_spec][job.name]) if plan.base_spec else None
        models = [f32(arrays[s][job.name]) for s in plan.model_specs]
        want = merge_tensor(m, job.name, base_arr, models, job.params, block_rows=job.rows)  # one block
        want_bf16 = want.astype(ml_dtypes.bfloat16).view(np.uint16)
        have = got[job.name].view(dtype=__import__("torch").int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(have, want_bf16, err_msg=f"{method}: {job.name}")


# ---------------------------------------------------------------------------------------------
# Passes that look at some rows only (Pass.rows): the top-k sample of ties reads its rows only.

# Large enough that the mlp and embedding tensors are row-sampled at the real constants.
ROWS_SHAPE = synth.ModelShape(hidden=512, intermediate=2048, layers=1, heads=8, kv_heads=2, vocab=4096)


def _ties_recipe(tmp_path, base, fts):
    models = [
        {"model": str(f), "parameters": {"weight": w, "density": d}}
        for f, w, d in zip(fts, (0.5, 0.3, 0.2), (0.5, 0.1, 0.9))
    ]
    return write_recipe(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(base), "models": models})


def test_pass_map_sees_only_its_declared_rows(synth_family, tmp_path):
    from streammerge.engine.build import PassMap, _read_block

    base, fts = synth_family("rows", shape=ROWS_SHAPE)
    plan = make_plan(load_recipe(_ties_recipe(tmp_path, base, fts)), block_elems=300_000)
    method = get_method("ties")
    sample = method.passes[0]
    seen = []

    def spy(block, params, stats):
        seen.append((block.rows.copy(), [a.copy() for a in (block.base, *block.models)]))
        return sample.map(block, params, stats)

    spied = dataclasses.replace(method, passes=(dataclasses.replace(sample, map=spy), *method.passes[1:]))
    job = next(j for j in plan.jobs if j.name == "model.layers.0.mlp.up_proj.weight")  # 2048 x 512
    rows = sample.rows(job.shape, job.params)
    assert job.nblocks > 1 and 0 < 2 * rows.size < job.rows
    for i in range(job.nblocks):
        partial = PassMap(spied, job, 0, i)(None)
        held, arrays = seen[-1]
        r0, r1 = job.block_range(i)
        np.testing.assert_array_equal(held, rows[(rows >= r0) & (rows < r1)])
        whole = _read_block(job, i)  # every row of the block
        for got, full in zip(arrays, (whole.base, *whole.models)):
            np.testing.assert_array_equal(got, full[held - r0])
        # the map gives the same for the whole block (it picks its rows itself)
        again = sample.map(whole, job.params, {})
        assert again[0] == partial[0] and again[1].keys() == partial[1].keys()
        for src, values in again[1].items():
            np.testing.assert_array_equal(values, partial[1][src])


def test_build_reads_the_sample_rows_only(synth_family, tmp_path):
    """ties reads the sample's rows, then every input twice (collect, merge): no refinement on
    synthetic deltas. The bits do not depend on block size or workers and equal the in-memory run."""
    from streammerge.dtypes import float_type
    from streammerge.store.store import Store

    base, fts = synth_family("rows", shape=ROWS_SHAPE)
    recipe = _ties_recipe(tmp_path, base, fts)
    sample = get_method("ties").passes[0]
    outs = []
    for block_elems, workers in ((300_000, 2), (2_000_000, 1)):
        store = tmp_path / f"job{block_elems}.zarr"
        report = build(recipe, store, workers=workers, block_elems=block_elems, seed=3, progress=False).report
        expected = 0
        row_sampled = 0
        for job in make_plan(load_recipe(recipe), block_elems=block_elems, seed=3).jobs:
            row_bytes = sum(job.row_elems * float_type(h.dtype).itemsize for h in job.inputs)
            rows = sample.rows(job.shape, job.params)
            row_sampled += rows is not None
            sampled_whole = job.numel < 2 * _topk.SAMPLE_TARGET  # resolved in the sample reduce
            expected += (job.rows if rows is None else rows.size) * row_bytes  # sample
            expected += (1 if sampled_whole else 2) * job.input_bytes  # collect, merge
        assert row_sampled == 4  # embed_tokens, lm_head, up_proj, gate_proj
        assert report.input_bytes == expected
        export_store(Store.open(store), tmp_path / f"out{block_elems}")
        outs.append(load_model_tensors(tmp_path / f"out{block_elems}"))
    plan = make_plan(load_recipe(recipe), seed=3)
    arrays = {spec: load_model_tensors(ck.directory) for spec, ck in plan.checkpoints.items()}
    for job in plan.jobs:
        f32 = [arrays[s][job.name].float().numpy() for s in (plan.base_spec, *plan.model_specs)]
        want = merge_tensor(get_method("ties"), job.name, f32[0], f32[1:], job.params, block_rows=job.rows)
        want = want.astype(ml_dtypes.bfloat16).view(np.uint16)
        for got in outs:
            np.testing.assert_array_equal(got[job.name].view(dtype=torch.int16).numpy().view(np.uint16), want)


def test_read_rows_at(tmp_path):
    from streammerge.checkpoints import TensorHandle
    from streammerge.checkpoints.blocks import read_rows, read_rows_at
    from streammerge.errors import CheckpointError

    x = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    x[33, 4] = np.nan
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 8 + x.tobytes())
    h = TensorHandle("t", str(path), 8, "F32", (40, 6))
    rows = np.array([0, 1, 2, 7, 20, 21, 39])
    got = read_rows_at(h, rows, np.empty(rows.size * 6, np.float32))
    np.testing.assert_array_equal(got, x[rows])
    assert read_rows_at(h, rows[:0], np.empty(1, np.float32)).shape == (0, 6)
    with pytest.raises(CheckpointError, match=r"non-finite value \(nan\) at flat index 202;"):
        read_rows_at(h, np.array([5, 33]), np.empty(12, np.float32))
    h2 = TensorHandle("t", str(path), 8, "F32", (40, 6), check_finite=False)
    got = read_rows_at(h2, np.array([5, 33]), np.empty(12, np.float32))
    np.testing.assert_array_equal(got[0], read_rows(h2, 5, 6, np.empty(6, np.float32))[0])


def test_pass_with_row_groups_maps_groups_of_rows(synth_family, tmp_path):
    """dare_ties' l1 pass (Pass.row_groups) is mapped group of rows by group of rows: one partial
    per group, reduced as blocks' partials are, to the stats of whole blocks."""
    from streammerge.engine.build import GroupPartials, PassMap, _block_partials, _read_block

    base, fts = synth_family("rows", shape=ROWS_SHAPE)
    models = [{"model": str(f), "parameters": {"weight": w, "density": 0.5}} for f, w in zip(fts, (0.5, 0.3, 0.2))]
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "dare_ties", "base_model": str(base), "models": models})
    plan = make_plan(load_recipe(recipe), block_elems=300_000)
    method = get_method("dare_ties")
    index = next(k for k, p in enumerate(method.passes) if p.name == "l1")
    l1 = method.passes[index]
    job = next(j for j in plan.jobs if j.name == "model.layers.0.mlp.up_proj.weight")  # 2048 x 512
    grouped, whole = [], []
    for i in range(job.nblocks):
        parts = PassMap(method, job, index, i, group_elems=20_000)(None)
        r0, r1 = job.block_range(i)
        assert isinstance(parts, GroupPartials) and len(parts) == -(-(r1 - r0) // (20_000 // 512))
        grouped.append(parts)
        whole.append(l1.map(_read_block(job, i), job.params, {}))
    got = l1.reduce(_block_partials(grouped), job.params, {})
    want = l1.reduce(whole, job.params, {})
    assert got.keys() == want.keys() and got["l1.apply"].all()
    np.testing.assert_array_equal(got["l1.scale"], want["l1.scale"])


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_tie_cut_in_a_row_group_of_the_passes(method, synth_family, tmp_path, monkeypatch):
    """The select passes map row groups: with tiny candidate caps a tie cut is left to the merge
    in a group's span, smaller than a block; the block holding it is merged whole, scanning
    that span, and the bits equal the in-memory run's."""
    import streammerge.engine.build as engine_build
    from streammerge.store.store import Store

    monkeypatch.setattr(engine_build, "row_group_elems", lambda workers: 300)
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 4)
    monkeypatch.setattr(_topk, "CAP_MIN", 2)
    monkeypatch.setattr(_topk, "CAP_DIV", 10**9)
    _check_engine_equals_in_memory(method, synth_family, tmp_path)
    store = Store.open(tmp_path / "job.zarr")
    plan = make_plan(load_recipe(tmp_path / "r.yaml"), seed=7)
    spans = []
    for job in plan.jobs:
        stats = store.load_stats(job.stage, job.store_key) or {}
        for key, bstart in stats.items():
            if key.endswith(".bstart") and int(bstart) >= 0:
                spans.append((int(stats[key[: -len("bstart")] + "bend"]) - int(bstart), job.block_range(0)[1] * job.row_elems))
    assert any(span < block for span, block in spans), spans


@pytest.mark.parametrize("method", ["task_arithmetic"])
def test_merge_allocates_no_block(method, synth_family, tmp_path):
    """The engine hands merges its reusable result array (Block.out) and reads into reused
    buffers: once a thread has merged a block, merging the next (read, convert, merge, round)
    allocates far less than one float32 copy of it."""
    import tracemalloc

    from streammerge.engine.build import MergeBlock, _merge_block, _merge_row_groups
    from streammerge.methods.base import row_group_elems
    from streammerge.store.store import Store

    base, fts = synth_family("rows", shape=ROWS_SHAPE)
    models = [{"model": str(f), "parameters": {"weight": w, "density": 0.5}} for f, w in zip(fts, (0.5, 0.3, 0.2))]
    if method != "ties":
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
    recipe = {"merge_method": method, "models": models}
    if method != "linear":
        recipe["base_model"] = str(base)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    build(path, tmp_path / "job.zarr", workers=1, block_elems=300_000, progress=False)  # the passes' stats
    store = Store.open(tmp_path / "job.zarr")
    plan = make_plan(load_recipe(path), block_elems=300_000)
    job = next(j for j in plan.jobs if j.name == "model.layers.0.mlp.up_proj.weight")  # 2048 x 512
    m = get_method(method)
    stats = store.load_stats(job.stage, job.store_key) or {}

    def merge(i):
        node = MergeBlock(m, job, store, i, row_group_elems(2))
        r0, r1 = job.block_range(i)
        if m.in_row_groups(stats, r0 * job.row_elems, r1 * job.row_elems):
            return _merge_row_groups(m, job, i, stats, node.group_elems)
        return _merge_block(m, job, i, stats)

    assert job.nblocks >= 3
    merge(0)
    tracemalloc.start()
    try:
        for i in range(1, job.nblocks):
            merge(i)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    block_bytes = (job.block_range(1)[1] - job.block_range(1)[0]) * job.row_elems * 4
    assert peak < block_bytes / 8, (peak, block_bytes)


@pytest.mark.parametrize("ahead", [0, 96])
def test_pieces_read_ahead_is_bounded(tmp_path, monkeypatch, ahead):
    """A block read in pieces: with the kernel's read-ahead (plentiful memory) the span is
    advised sequential; with our own (tight memory), random, then WILLNEED ranges that follow
    each other from the first piece's end to the span's end, never more than `ahead` bytes past
    the piece being read. The bytes are the file's either way."""
    import os

    from streammerge.checkpoints import TensorHandle
    from streammerge.checkpoints import blocks

    x = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)  # rows of 24 bytes
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 8 + x.tobytes())
    h = TensorHandle("t", str(path), 8, "F32", (40, 6))
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: (calls.append((off, n, adv)), real(fd, off, n, adv))[1])
    monkeypatch.setattr(blocks, "read_ahead", lambda streams=1: ahead)
    r0, r1 = 3, 37
    with blocks.RawRows(h, r0, r1, pieces=True) as rows:
        start = 8 + r0 * 24
        assert calls.pop(0) == (start, (r1 - r0) * 24, os.POSIX_FADV_RANDOM if ahead else os.POSIX_FADV_SEQUENTIAL)
        for a in range(r0, r1, 2):
            b = min(r1, a + 2)
            got = rows.read(a, b, np.empty((b - a) * 24, np.uint8)).view(np.float32).reshape(-1, 6)
            np.testing.assert_array_equal(got, x[a:b])
            advised = [c for c in calls if c[2] == os.POSIX_FADV_WILLNEED]
            if ahead:
                assert advised, "the first read advises what follows"
                last = advised[-1][0] + advised[-1][1]
                assert 8 + b * 24 <= last <= 8 + b * 24 + ahead or last == 8 + r1 * 24
    advised = [c for c in calls if c[2] == os.POSIX_FADV_WILLNEED]
    assert len(advised) == len(calls)
    if not ahead:
        assert advised == []
        return
    assert advised[0][0] == start + 2 * 24 and advised[-1][0] + advised[-1][1] == 8 + r1 * 24
    assert all(p[0] + p[1] == q[0] for p, q in zip(advised, advised[1:])), advised  # no gap, no overlap
    assert len(advised) < (r1 - r0) // 2, "advised in halves of `ahead`, not a call a piece"


def test_read_ahead_follows_the_memory_available(monkeypatch):
    """Tight memory (our own read-ahead) scales with the descriptors reading at once: 3000 MB is
    plenty for 2 threads x 4 inputs and tight for 16 x 4 (both measured, tools/bench_70b.py)."""
    from streammerge.checkpoints import blocks

    ours = blocks.READ_AHEAD
    for avail, streams, want in ((1000 << 20, 1, ours), (1000 << 20, 8, ours), (24 << 30, 8, 0), (None, 64, 0),
                                 (3000 << 20, 8, 0), (3000 << 20, 64, ours), (24 << 30, 64, 0), (20 << 30, 128, ours)):
        monkeypatch.setattr(blocks, "memory_available", lambda a=avail: a)
        blocks.read_ahead.cache_clear()
        assert blocks.read_ahead(streams) == want, (avail, streams)
    blocks.read_ahead.cache_clear()


def test_build_reads_ahead_for_its_threads_times_inputs(synth_family, tmp_path, monkeypatch):
    """Every block read in pieces asks read_ahead for the build's threads x the job's inputs
    (ties over a base and 3 fine-tunes: 4 inputs)."""
    from streammerge.checkpoints import blocks

    base, fts = synth_family("rows", shape=ROWS_SHAPE)
    recipe = _ties_recipe(tmp_path, base, fts)
    for workers in (1, 3):
        asked = []
        monkeypatch.setattr(blocks, "read_ahead", lambda streams=1: asked.append(streams) or 0)
        build(recipe, tmp_path / f"job{workers}.zarr", workers=workers, block_elems=300_000, seed=3, progress=False)
        assert asked and set(asked) == {workers * 4}, (workers, set(asked))


def test_memory_available_is_at_most_meminfo_and_the_cgroup_limit():
    from streammerge.fsutil import memory_available

    with open("/proc/meminfo") as f:
        avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    got = memory_available()
    assert got is not None and got <= avail * 1.2
    # under a memory cgroup of 300 MB (tools/memcap.sh, where this machine lets us make one)
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "from streammerge.fsutil import memory_available; print(memory_available())"
    res = subprocess.run(["bash", str(root / "tools" / "memcap.sh"), "300", sys.executable, "-c", code],
                         capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    if "cannot create a cgroup" in res.stderr:
        pytest.skip("no memory cgroup can be made here")
    assert int(res.stdout.split()[0]) == 300 << 20, res.stdout + res.stderr


def test_memory_available_without_meminfo_counts_the_free_pages(monkeypatch):
    """Where /proc/meminfo cannot be read (not Linux), the free pages (sysconf), as serve's auto
    budget had before it used this function; never more than a memory cgroup's limit."""
    import builtins

    from streammerge import fsutil

    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = fsutil.memory_available()
    assert got is not None and got <= free * 1.2 and got > 0


@pytest.mark.parametrize("workers", [1, 2, 4, 16, 32])
@pytest.mark.parametrize("n_inputs", [2, 4, 9])
def test_planned_block_is_the_largest_whose_memory_estimate_fits(workers, n_inputs):
    """block_elems_for inverts the estimate (inputs, work arrays, queued writes and the scan
    pieces' temporaries, counted whole up to SCAN_MAX_ELEMS): the block it picks fits the limit
    and one element more would not, on both sides of the scan cap."""
    from streammerge.plan.planner import (BASELINE_BYTES, MAX_BLOCK_ELEMS, MIN_BLOCK_ELEMS, WORK_ARRAYS,
                                          block_elems_for, scan_bytes, writer_blocks)

    def estimate(elems):
        return BASELINE_BYTES + workers * scan_bytes(elems) + elems * 4 * (workers * (n_inputs + WORK_ARRAYS) + writer_blocks(workers))

    sides = set()
    for limit in np.geomspace(320 << 20, 64 << 30, 60).astype(np.int64).tolist():
        elems = block_elems_for(limit, workers, n_inputs)
        if MIN_BLOCK_ELEMS < elems < MAX_BLOCK_ELEMS:
            assert estimate(elems) <= limit < estimate(elems + 1), (limit, elems)
            sides.add(elems <= 1 << 20)
    assert sides == {True, False}  # blocks under and over the scan cap both checked
