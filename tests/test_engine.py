"""End to end: recipe -> build -> store -> export, against an in-memory torch reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import synth_checkpoints as synth
from helpers import (
    TORCH_DTYPES,
    file_digest,
    gradient,
    layer_t,
    load_model_tensors,
    torch_linear,
    torch_task_arithmetic,
    write_recipe,
)
from streammerge.cli import main as cli
from streammerge.engine.job import build
from streammerge.export.hf import export_store
from streammerge.store.store import Store


def run_cli(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def ta_recipe(base, fts, weights, **extra):
    r = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, weights)],
    }
    r.update(extra)
    return r


def reference_task_arithmetic(base_dir, ft_dirs, weights, out_dtype, num_layers, lam=1.0, normalize=False):
    base = load_model_tensors(base_dir)
    fts = [load_model_tensors(d) for d in ft_dirs]
    out = {}
    for name, b in base.items():
        t = layer_t(name, num_layers)
        ws = [gradient(w, t) for w in weights]
        out[name] = torch_task_arithmetic(b, [f[name] for f in fts], ws, lam, normalize).to(TORCH_DTYPES[out_dtype])
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_task_arithmetic_bit_identical_to_torch(synth_family, tmp_path, dtype):
    base, fts = synth_family("ta", dtype=dtype, shard_size=40_000 if dtype == "float32" else None)
    weights = [0.5, [0.2, 0.9], 0.3]  # a layer gradient on the second model
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, weights, parameters={"lambda": 0.7}))
    build(recipe, tmp_path / "job.zarr", workers=2, progress=False)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    got = load_model_tensors(tmp_path / "out")
    want = reference_task_arithmetic(base, fts, weights, dtype, num_layers=2, lam=0.7)
    for name in want:
        assert got[name].dtype == TORCH_DTYPES[dtype]
        assert torch.equal(got[name], want[name]), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == dtype


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_linear_with_out_dtype(synth_family, tmp_path, out_dtype):
    base, fts = synth_family("lin", dtype="float32", shape=synth.ModelShape(tied_embeddings=True, qkv_bias=True))
    weights = [1.0, 2.0, 0.5]
    r = {
        "merge_method": "linear",
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip([base, *fts[:2]], weights)],
        "out_dtype": out_dtype,
    }
    recipe = write_recipe(tmp_path / "r.yaml", r)
    run_cli("build", recipe, "--store", tmp_path / "job.zarr", "--export", tmp_path / "out")
    got = load_model_tensors(tmp_path / "out")
    models = [load_model_tensors(d) for d in (base, *fts[:2])]
    assert "lm_head.weight" not in got  # tied embeddings stay tied
    assert any(n.endswith("q_proj.bias") for n in got)
    for name in models[0]:
        want = torch_linear([m[name] for m in models], weights).to(TORCH_DTYPES[out_dtype])
        assert torch.equal(got[name], want), name


def test_block_size_and_workers_do_not_change_output(synth_family, tmp_path):
    base, fts = synth_family("ta", dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.4, 0.4, 0.2]))
    digests = []
    for i, (workers, block_elems) in enumerate([(1, None), (2, 64), (3, 1000)]):
        store = tmp_path / f"job{i}.zarr"
        build(recipe, store, workers=workers, block_elems=block_elems, progress=False)
        run_cli("export", store, tmp_path / f"out{i}", "--workers", workers)
        digests.append(file_digest(tmp_path / f"out{i}"))
    assert digests[0] == digests[1] == digests[2]


def test_sharded_export_loads_in_transformers_with_reference_logits(synth_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = synth_family("ta", dtype="bfloat16")
    weights = [0.5, 0.3, 0.2]
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, weights, dtype="float32"))
    run_cli("build", recipe, "--store", tmp_path / "job.zarr", "--export", tmp_path / "out", "--shard-size", "50KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref_tensors = reference_task_arithmetic(base, fts, weights, "float32", num_layers=2)  # dtype: float32, no out_dtype
    reference.load_state_dict({k: v.float() for k, v in ref_tensors.items()}, strict=False)
    ids = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, reference(ids).logits)


def test_changed_inputs_and_recipe_are_refused(synth_family, tmp_path):
    base, fts = synth_family("ta", dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    store = tmp_path / "job.zarr"
    run_cli("build", recipe, "--store", store)
    out = run_cli("build", recipe, "--store", store)  # nothing to do: resumes with everything done
    assert "0 block(s) computed" in out

    write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.25]))
    out = run_cli("build", recipe, "--store", store, expect=1)
    assert "recipe changed" in out and "models" in out and "--restart" in out

    write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    f = next(Path(fts[1]).glob("*.safetensors"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        out = run_cli("build", recipe, "--store", store, expect=1)
        assert "changed since the store was started" in out and f.name in out
        out = run_cli("build", recipe, "--store", store, "--restart")
        assert "built" in out
    finally:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_status_and_plan(synth_family, tmp_path):
    base, fts = synth_family("ta", dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    plan = json.loads(run_cli("plan", recipe, "--json"))
    n_tensors = len(load_model_tensors(base))
    assert plan["tensors"] == n_tensors and plan["method"] == "task_arithmetic"
    assert plan["input_bytes"] == sum(f.stat().st_size for d in (base, *fts) for f in Path(d).glob("*.safetensors")) - sum(
        8 + int.from_bytes(open(f, "rb").read(8), "little") for d in (base, *fts) for f in Path(d).glob("*.safetensors")
    )
    run_cli("build", recipe, "--store", tmp_path / "job.zarr")
    status = json.loads(run_cli("status", tmp_path / "job.zarr", "--json"))
    assert status["complete"] and status["stages"]["merge"]["done"] == plan["blocks"]


def test_export_refuses_incomplete_store_and_keeps_existing_output(synth_family, tmp_path):
    base, fts = synth_family("ta", dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    store = tmp_path / "job.zarr"
    run_cli("build", recipe, "--store", store, "--export", tmp_path / "out")
    before = file_digest(tmp_path / "out")
    run_cli("export", store, tmp_path / "out", expect=1)  # exists: refused without --overwrite
    marker = next((store / "done" / "merge").rglob("0"))
    marker.unlink()
    out = run_cli("export", store, tmp_path / "out", "--overwrite", expect=1)
    assert "not finished" in out
    assert file_digest(tmp_path / "out") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_killed_build_resumes_to_identical_export(tmp_path):
    """SIGKILL a real build process mid-way, run it again, compare with an uninterrupted run."""
    shape = synth.ModelShape(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=1024)
    base, fts = synth.make_family(tmp_path / "m", shape, n_finetunes=3, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    cmd = [sys.executable, "-m", "streammerge", "build", str(recipe), "--workers", "1", "--block-elements", "128", "--no-progress"]

    subprocess.run(cmd + ["--store", str(tmp_path / "ref.zarr"), "--export", str(tmp_path / "ref")], check=True)
    store = tmp_path / "job.zarr"
    total = json.loads(subprocess.run([sys.executable, "-m", "streammerge", "status", str(tmp_path / "ref.zarr"), "--json"],
                                      capture_output=True, text=True, check=True).stdout)["stages"]["merge"]["total"]
    proc = subprocess.Popen(cmd + ["--store", str(store), "--export", str(tmp_path / "out")])  # export written during the build
    deadline = time.time() + 60
    while time.time() < deadline:
        done_dir = store / "done" / "merge"
        n = sum(1 for p in done_dir.rglob("*") if p.is_file()) if done_dir.is_dir() else 0
        if n >= total // 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = json.loads(subprocess.run([sys.executable, "-m", "streammerge", "status", str(store), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert 0 < status["stages"]["merge"]["done"] < total, "the kill should land mid-build"
    assert not (tmp_path / "out").exists()
    subprocess.run(cmd + ["--store", str(store), "--export", str(tmp_path / "out")], check=True)
    assert file_digest(tmp_path / "out") == file_digest(tmp_path / "ref")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the killed run's partial export is removed"


def test_build_export_writes_the_merged_model_once(tmp_path):
    """`build --export` keeps the merged tensors as the export's shards in the store and the
    export hard-links them: no tensor is written twice (no zarr chunk), and the result is
    byte-identical to exporting a store built without --export (the zarr layout). Another dtype
    is converted as before; a re-export with another dtype or shard size reads the shard store
    alone; a resumed build rewrites the blocks without markers in place."""
    shape = synth.ModelShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1024)
    base, fts = synth.make_family(tmp_path / "m", shape, n_finetunes=3, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    opts = dict(workers=2, progress=False, block_elems=4096)
    ref = build(recipe, tmp_path / "ref.zarr", **opts).store  # zarr chunks, no export
    export_store(ref, tmp_path / "ref", shard_size=300_000, progress=False)

    res = build(recipe, tmp_path / "a.zarr", **opts, export=dict(out_dir=tmp_path / "a", shard_size=300_000))
    shards = sorted(f.name for f in (tmp_path / "a").glob("*.safetensors"))
    assert res.export["linked"] and len(shards) > 1
    for name in shards:
        assert os.path.samefile(tmp_path / "a" / name, tmp_path / "a.zarr" / "shards" / name)
    assert not [f for f in (tmp_path / "a.zarr" / "tensors").rglob("c.*")], "no tensor written as a zarr chunk too"
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "ref")
    export_store(res.store, tmp_path / "a2", shard_size=300_000, progress=False)  # linked again
    assert file_digest(tmp_path / "a2") == file_digest(tmp_path / "ref")
    for opts_ in (dict(dtype="float32", shard_size=200_000), dict(shard_size=10**9)):  # read from the shards
        export_store(res.store, tmp_path / "a3", overwrite=True, progress=False, **opts_)
        export_store(ref, tmp_path / "ref3", overwrite=True, progress=False, **opts_)
        assert file_digest(tmp_path / "a3") == file_digest(tmp_path / "ref3")

    res = build(recipe, tmp_path / "b.zarr", **opts, export=dict(out_dir=tmp_path / "b", dtype="float32", shard_size=200_000))
    assert not res.export["linked"] and "tensor_files" not in res.store.manifest
    export_store(ref, tmp_path / "b-ref", dtype="float32", shard_size=200_000, progress=False)
    assert file_digest(tmp_path / "b") == file_digest(tmp_path / "b-ref")

    # every other block unmarked and its bytes overwritten, as after a kill mid-write
    store = tmp_path / "a.zarr"
    files = json.loads((store / "manifest.json").read_text())["tensor_files"]
    markers = sorted(m for m in (store / "done" / "merge").rglob("*") if m.is_file())
    for m in markers[::2]:
        name = m.parent.relative_to(store / "done" / "merge" / "tensors").as_posix()
        t = next(t for t in ref.tensors if t["name"] == name)
        row_bytes = 2 * int(torch.tensor(t["shape"][1:]).prod())
        fname, start = files["offsets"][name]
        with open(store / files["dir"] / fname, "r+b") as f:
            f.seek(start + int(m.name) * t["block_rows"] * row_bytes)
            f.write(b"\xff" * row_bytes)
        m.unlink()
    res = build(recipe, store, **opts, export=dict(out_dir=tmp_path / "c", shard_size=300_000))
    assert res.resumed and res.report.blocks_run == len(markers[::2])
    assert file_digest(tmp_path / "c") == file_digest(tmp_path / "ref")


def test_build_export_refuses_existing_output_before_building(synth_family, tmp_path):
    base, fts = synth_family("ta", dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", ta_recipe(base, fts, [0.5, 0.3, 0.2]))
    (tmp_path / "out").mkdir()
    out = run_cli("build", recipe, "--store", tmp_path / "job.zarr", "--export", tmp_path / "out", expect=1)
    assert "already exists" in out and "--overwrite" in out
    status = json.loads(run_cli("status", tmp_path / "job.zarr", "--json"))
    assert status["stages"]["merge"]["done"] == 0, "nothing computed for an export that cannot be written"


def test_graph_nodes_are_typed_and_name_their_keys(synth_family, tmp_path):
    """engine/build.py's graph: one typed node per task, under its own key, wired pass by pass;
    the distributed path check finds the files through the nodes' fields."""
    from streammerge.engine.build import MergeBlock, PassMap, PassReduce, SaveStats, build_graph, graph_node
    from streammerge.engine.job import manifest_for
    from streammerge.engine.scheduler import graph_paths
    from streammerge.plan.planner import make_plan
    from streammerge.recipe import load_recipe

    base, fts = synth_family("tiny")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts],
        },
    )
    plan = make_plan(load_recipe(recipe), block_elems=2048)
    store = Store.create(tmp_path / "job.zarr", manifest_for(plan, recipe.read_text()))
    dsk, targets, task_bytes, skipped = build_graph(plan, store)
    for key in dsk:
        assert graph_node(dsk, key).key == key
    merges = [graph_node(dsk, k) for k in targets]
    assert all(isinstance(n, MergeBlock) for n in merges) and skipped == 0
    assert len(merges) == sum(job.nblocks for job in plan.jobs)
    job = merges[0].job
    npasses = len(plan.method.passes)
    maps = [n for n in map(graph_node, [dsk] * len(dsk), dsk) if isinstance(n, PassMap) and n.job is job]
    assert sorted((n.pass_index, n.block) for n in maps) == [(p, i) for p in range(npasses) for i in range(job.nblocks)]
    stats = SaveStats(plan.method, job, store).key
    reduce_last = PassReduce(plan.method, job, npasses - 1).key
    assert dsk[stats][1] == reduce_last  # the stats are saved from the last reduce
    assert all(dsk[MergeBlock(plan.method, job, store, i, 0).key][1] == stats for i in range(job.nblocks))
    assert set(task_bytes) == {k for k in dsk if not isinstance(graph_node(dsk, k), (PassReduce, SaveStats))}
    paths = graph_paths(dsk)
    assert os.path.abspath(store.path) in paths and any(p.startswith(str(base)) for p in paths)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_bf16_build_command_does_not_import_ml_dtypes(tmp_path, method):
    """Importing ml_dtypes registers its casts with numpy (~0.5 s here, in every command): a bf16
    static merge and its export never need it (bf16 is converted on its bits), so the command
    must not import it; the task_arithmetic model is still torch's."""
    shape = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
    base, fts = synth.make_family(tmp_path / "m", shape, n_finetunes=2, dtype="bfloat16")
    recipe = ta_recipe(base, fts, [0.6, 0.4], merge_method=method)
    if method == "dare_ties":  # random masks and the l1 pass: the streams' path too
        for spec in recipe["models"]:
            spec["parameters"]["density"] = 0.5
    recipe_path = write_recipe(tmp_path / "r.yaml", recipe)
    code = (
        "import sys\n"
        "from streammerge.cli import main\n"
        f"sys.argv = ['streammerge', 'build', {str(recipe_path)!r}, '--store', {str(tmp_path / 'job.zarr')!r}, "
        f"'--export', {str(tmp_path / 'out')!r}, '--no-progress', '--workers', '2']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('ml_dtypes imported:', 'ml_dtypes' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "ml_dtypes imported: False" in p.stdout, p.stdout
    merged = load_model_tensors(tmp_path / "out")
    assert set(merged) == set(load_model_tensors(base))
    if method == "task_arithmetic":
        b, models = load_model_tensors(base), [load_model_tensors(f) for f in fts]
        for name, t in merged.items():
            assert torch.equal(t, torch_task_arithmetic(b[name], [m[name] for m in models], [0.6, 0.4]).to(t.dtype)), name
