"""Every registered method, streamed by the engine, equals the same method run in memory.

The methods' own tests check their math against mergekit; this checks the engine: passes run
over all blocks and reduced in order, stats persisted and reloaded on resume, blocks merged
independently, results rounded to the output dtype; for any block size and worker count.
"""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

from helpers import load_model_tensors, write_recipe
from streammerge.engine.job import build
from streammerge.methods import get_method, method_names
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
    "passthrough": (1, False, {}, {}),
}


def test_every_registered_method_has_an_engine_case():
    static = {m for m in method_names() if get_method(m).pipeline is None}  # routing methods: test_routed.py
    assert static <= set(CASES), static - set(CASES)


@pytest.mark.parametrize("method", sorted(CASES))
def test_engine_equals_in_memory(method, synth_family, tmp_path):
    if method not in method_names():
        pytest.skip(f"{method} is not registered")
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
