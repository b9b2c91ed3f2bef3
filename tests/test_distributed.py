"""dask.distributed: the same graphs on a LocalCluster or an existing scheduler give the same bytes.

Every file of an export built and exported on worker processes (`--cluster local:2`, or
`--scheduler <address>` of a cluster started here) is byte-identical to the threaded path's.
Also: what the tasks pickle to (handles, never data), errors raised in workers, the shared
filesystem check, and the message when `distributed` is missing.
"""

from __future__ import annotations

import logging
import operator
import pickle
import sys

import pytest
from click.testing import CliRunner

from helpers import file_digest, write_recipe
from streammerge.cli import main as cli
from streammerge.errors import StreammergeError

distributed = pytest.importorskip("distributed")

# Small blocks (many tasks) and small shards (several files written from several processes).
GRAPH_OPTS = ["--block-elements", "2048", "--workers", "2", "--no-progress"]
SHARD = ["--shard-size", "60KB"]


def run_cli(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def recipe_for(method: str, base, fts) -> dict:
    if method == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, [0.5, [0.2, 0.9], 0.3])],
            "parameters": {"lambda": 0.7},
        }
    if method == "ties":  # tensor-wide passes (exact top-k): map/reduce tasks, stats in the store
        return {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(f), "parameters": {"weight": w, "density": 0.5}} for f, w in zip(fts, [0.5, 0.3, 0.2])
            ],
            "dtype": "bfloat16",
        }
    raise AssertionError(method)


def threaded_export(tmp_path, recipe):
    run_cli("build", recipe, "--store", tmp_path / "thr.zarr", "--export", tmp_path / "thr-out", *GRAPH_OPTS, *SHARD)
    digest = file_digest(tmp_path / "thr-out")
    assert sum(f.endswith(".safetensors") for f in digest) > 1  # several shards
    return digest


@pytest.fixture(scope="module")
def cluster():
    """An external cluster (2 worker processes) that commands reach with --scheduler."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as lc:
        yield lc


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_local_cluster_export_is_byte_identical(synth_family, tmp_path, method):
    base, fts = synth_family("dist")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(method, base, fts))
    want = threaded_export(tmp_path, recipe)
    out = run_cli(
        "build", recipe, "--store", tmp_path / "dist.zarr", "--export", tmp_path / "dist-out",
        "--cluster", "local:2", *GRAPH_OPTS, *SHARD,
    )
    assert "0 already done" in out
    assert file_digest(tmp_path / "dist-out") == want


def test_existing_scheduler_build_then_export(synth_family, tmp_path, cluster):
    base, fts = synth_family("dist")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for("ties", base, fts))
    want = threaded_export(tmp_path, recipe)
    addr = cluster.scheduler_address
    run_cli("build", recipe, "--store", tmp_path / "dist.zarr", "--scheduler", addr, *GRAPH_OPTS)
    run_cli("export", tmp_path / "dist.zarr", tmp_path / "dist-out", "--scheduler", addr, "--no-progress", *SHARD)
    assert file_digest(tmp_path / "dist-out") == want
    # Resuming a finished store on the cluster computes nothing.
    out = run_cli("build", recipe, "--store", tmp_path / "dist.zarr", "--scheduler", addr, *GRAPH_OPTS)
    assert "0 block(s) computed" in out


def test_tasks_pickle_small(synth_family, tmp_path):
    """Workers get handles (path, offset, dtype, shape), the store's path, method names: no data."""
    from streammerge.engine.build import build_graph
    from streammerge.engine.job import manifest_for
    from streammerge.export.safetensors_writer import ShardedWriter, TensorSpec
    from streammerge.plan.planner import make_plan
    from streammerge.recipe import load_recipe
    from streammerge.store.store import Store

    base, fts = synth_family("dist")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for("ties", base, fts))
    plan = make_plan(load_recipe(recipe), block_elems=2048)
    store = Store.create(tmp_path / "job.zarr", manifest_for(plan, recipe.read_text()))
    dsk, targets, _, _ = build_graph(plan, store)
    sizes = [len(pickle.dumps(task)) for task in dsk.values()]
    assert len(targets) > 50 and max(sizes) < 4096, max(sizes)
    assert len(pickle.dumps(store)) < 512
    assert len(pickle.dumps(plan.method)) < 200 and pickle.loads(pickle.dumps(plan.method)) is plan.method
    copy = pickle.loads(pickle.dumps(store))  # reopened lazily from its path, same manifest
    assert copy.path == store.path and copy.tensors == store.tensors

    specs = [TensorSpec(f"t{i}", "BF16", (4, 8), 64) for i in range(100)]
    writer = ShardedWriter(tmp_path / "w", specs, shard_size=640)
    blob = pickle.dumps(writer)
    assert len(blob) < 2048  # directory + 10 shard names
    w2 = pickle.loads(blob)
    import numpy as np

    w2.write("t57", 16, np.arange(24, dtype=np.uint16))  # finds its offset in the shard headers
    writer.finish()
    f, start = writer.files[5], None
    raw = (tmp_path / "w" / f).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + 7 * 64 + 16  # t57 is the 8th tensor of shard 6
    assert np.frombuffer(raw[start : start + 48], dtype=np.uint16).tolist() == list(range(24))


def test_worker_errors_and_missing_paths(cluster, tmp_path):
    from streammerge.engine.scheduler import check_workers_see, run_graph

    with distributed.Client(cluster) as client:
        with pytest.raises(ZeroDivisionError):
            run_graph({"a": (operator.truediv, 1, 0)}, ["a"], {"a": 1}, workers=1, scheduler=client, desc="x", progress=False)
        check_workers_see(client, [str(tmp_path)])
        with pytest.raises(StreammergeError, match="same paths on every machine"):
            check_workers_see(client, [str(tmp_path / "not-there")])


def test_option_errors(tmp_path, monkeypatch):
    out = run_cli("export", tmp_path, tmp_path / "o", "--cluster", "local:x", expect=2)
    assert "--cluster" in out and "local:N" in out
    from streammerge.engine.scheduler import dask_client

    with pytest.raises(StreammergeError, match="mutually exclusive"):
        with dask_client("tcp://127.0.0.1:1", "local:1"):
            pass
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    with pytest.raises(StreammergeError, match=r"pip install 'streammerge\[distributed\]'"):
        with dask_client(None, "local:1"):
            pass


def test_progress_counts_every_task_once(synth_family, tmp_path):
    """Under distributed only targets have futures; their ancestors' bytes are counted with them."""
    from streammerge.engine.build import build_graph
    from streammerge.engine.job import manifest_for
    from streammerge.engine.scheduler import _uncounted_bytes
    from streammerge.plan.planner import make_plan
    from streammerge.recipe import load_recipe
    from streammerge.store.store import Store

    base, fts = synth_family("dist")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for("ties", base, fts))
    plan = make_plan(load_recipe(recipe), block_elems=2048)
    store = Store.create(tmp_path / "job.zarr", manifest_for(plan, recipe.read_text()))
    dsk, targets, task_bytes, _ = build_graph(plan, store)
    counted: set = set()
    assert sum(_uncounted_bytes(dsk, k, task_bytes, counted) for k in targets) == sum(task_bytes.values())
