"""The device path (`build --device cuda`, engine/device.py) against the numpy CPU path.

Without a GPU the same path runs on torch's CPU device: upload, kernels, rounding, writing
and resume are all exercised; on a GPU machine the CUDA device is added to the parameters.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import synth_checkpoints as synth
from helpers import file_digest, resave_as_f64, write_recipe
from test_bad_inputs import poke
from streammerge.cli import main as cli
from streammerge.engine.device import choose_device
from streammerge.engine.job import build
from streammerge.errors import CheckpointError
from streammerge.export.hf import export_store
from streammerge.export.variants import export_variant
from streammerge.methods import get_method

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_METHODS = ["task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"]
ROUTED = ["mediator", "1bit"]
SHAPE = synth.ModelShape(hidden=64, intermediate=160, layers=3, heads=4, kv_heads=2, vocab=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    base, fts = synth.make_family(root / "src", SHAPE, n_finetunes=3, dtype="bfloat16", delta_scale=0.004)
    (root / "models").mkdir()
    for name, d in [("base", base), *[(f"ft{i + 1}", f) for i, f in enumerate(fts)]]:
        os.symlink(d, root / "models" / name)
    return root


def store_digest(store: Path) -> dict[str, str]:
    """sha256 of every array chunk, blob and metadata file: what the build wrote, not how
    (stats and completion markers are bookkeeping, which the two paths keep differently)."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and not rel.startswith(("stats/", "done/")) and rel not in ("lock", "manifest.json"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def build_in(models: Path, recipe: Path, store: Path, **kw):
    cwd = os.getcwd()
    os.chdir(models)  # the recipes name models/base, models/ft1, ...
    try:
        return build(recipe, store, progress=False, **kw)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", KERNEL_METHODS + ROUTED)
def test_device_build_is_bit_identical_to_cpu(models, tmp_path, method, device):
    if method in KERNEL_METHODS:
        assert get_method(method).kernel is not None, f"{method} has no device kernel"
    recipe = RECIPES / f"{method}.yaml"
    cpu = build_in(models, recipe, tmp_path / "cpu.zarr", block_elems=2048)
    dev = build_in(models, recipe, tmp_path / "dev.zarr", block_elems=2048, device=device)
    assert dev.report.blocks_run == cpu.report.blocks_run
    assert dev.report.on_cpu == () if method in KERNEL_METHODS else "conflict" in " ".join(dev.report.on_cpu)
    assert store_digest(tmp_path / "dev.zarr") == store_digest(tmp_path / "cpu.zarr")
    variants = ["merged"] + (["routed", "task:math"] if method in ROUTED else [])
    for v in variants:
        export_variant(cpu.store, tmp_path / f"cpu-{v}", v)
        export_variant(dev.store, tmp_path / f"dev-{v}", v)
        assert file_digest(tmp_path / f"dev-{v}") == file_digest(tmp_path / f"cpu-{v}"), v


@pytest.mark.parametrize("device", DEVICES)
def test_device_build_of_f64_inputs_is_bit_identical_to_cpu(tmp_path, device):
    """F64 inputs go up as float64 and are narrowed on the device, as the CPU path reads them."""
    base, fts = synth.make_family(tmp_path / "src", SHAPE, n_finetunes=2, dtype="float32")
    resave_as_f64([base, *fts])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (0.7, 0.4))],
    })
    build(recipe, tmp_path / "cpu.zarr", progress=False, block_elems=2048)
    dev = build(recipe, tmp_path / "dev.zarr", progress=False, block_elems=2048, device=device)
    assert dev.report.on_cpu == () and {t["dtype"] for t in dev.store.tensors} == {"float64"}
    assert store_digest(tmp_path / "dev.zarr") == store_digest(tmp_path / "cpu.zarr")


def test_device_build_resumes_only_missing_blocks(models, tmp_path):
    recipe = RECIPES / "ties.yaml"
    first = build_in(models, recipe, tmp_path / "job.zarr", block_elems=2048, device="cpu")
    export_store(first.store, tmp_path / "a")
    # Lose the last two blocks of one tensor, as a build killed mid-tensor would.
    name = "model.layers.1.mlp.down_proj.weight"
    done = tmp_path / "job.zarr" / "done" / "merge" / "tensors" / name
    blocks = sorted(int(p.name) for p in done.iterdir())
    for i in blocks[-2:]:
        (done / str(i)).unlink()
    again = build_in(models, recipe, tmp_path / "job.zarr", device="cpu")
    assert again.resumed and again.report.blocks_run == 2
    export_store(again.store, tmp_path / "b")
    assert file_digest(tmp_path / "b") == file_digest(tmp_path / "a")


def test_device_path_rejects_non_finite_inputs(tmp_path):
    base, fts = synth.make_family(tmp_path / "src", SHAPE, n_finetunes=1, dtype="bfloat16")
    poke(fts[0], "model.layers.0.self_attn.o_proj.weight", 77, 0x7FC0)  # a bf16 NaN
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(CheckpointError, match=r"o_proj.weight holds a non-finite value \(nan\) at flat index 77"):
        build(recipe, tmp_path / "job.zarr", progress=False, device="cpu")


def test_choose_device():
    assert choose_device("cpu").device is None
    with pytest.raises(Exception, match="expected auto, cpu, cuda"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        assert choose_device("auto").device is None and choose_device("auto").message is None
        fallback = choose_device("cuda")
        assert fallback.device is None and "computing on the CPU" in fallback.message
    else:
        assert choose_device("auto").device == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_cli_device_cuda_without_gpu_falls_back_with_a_note(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models)
    res = CliRunner().invoke(cli, ["build", str(RECIPES / "della.yaml"), "--store", str(tmp_path / "j.zarr"), "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert "note: --device cuda: no CUDA device is available to torch; computing on the CPU" in res.output


def test_device_starts_beside_the_planning(tmp_path, monkeypatch):
    """`start_device` chooses (imports torch, starts CUDA) in a background thread, and `build`
    waits for the choice only once the plan and the store are ready: the choice below blocks
    until the planning has begun, so a build that waited for it first would time out."""
    import streammerge.engine.device as device
    import streammerge.engine.job as job

    planning = __import__("threading").Event()
    make_plan = job.make_plan
    monkeypatch.setattr(job, "make_plan", lambda *a, **k: (planning.set(), make_plan(*a, **k))[1])
    monkeypatch.setattr(device, "choose_device",
                        lambda spec: device.DeviceChoice(None, "chosen during the planning" if planning.wait(30) else "too early"))
    base, fts = synth.make_family(tmp_path / "src", SHAPE, n_finetunes=1, dtype="bfloat16")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n    parameters: {{weight: 1.0}}\n")
    choice = device.start_device("cuda")
    assert not choice.done()
    res = build(recipe, tmp_path / "job.zarr", progress=False, device=choice)
    assert choice.result().message == "chosen during the planning" and res.report.blocks_run > 0
    with pytest.raises(Exception, match="expected auto, cpu, cuda"):
        device.start_device("tpu")  # refused at once, not in the thread
    assert device.start_device("cpu").result().device is None


def test_the_wait_for_the_device_is_said_apart(models, tmp_path, monkeypatch):
    """What is left of the device's start-up once the build is ready for it is counted in the
    build's time but said apart, and the rate printed leaves it out: a device that takes 0.6 s
    longer than the planning shows as such a wait, not as a slower merge."""
    import time

    import streammerge.engine.device as device

    monkeypatch.setattr(device, "choose_device", lambda spec: (time.sleep(0.6), device.DeviceChoice(None))[1])
    monkeypatch.chdir(models)
    res = CliRunner().invoke(cli, ["build", str(RECIPES / "della.yaml"), "--store", str(tmp_path / "j.zarr"),
                                   "--device", "cuda", "--no-progress"])
    assert res.exit_code == 0, res.output
    m = re.search(r"read in ([0-9.]+)s, ([0-9.]+)s of it waiting for the device to start \(", res.output)
    assert m, res.output
    assert 0.2 <= float(m.group(2)) <= float(m.group(1))
    res = CliRunner().invoke(cli, ["build", str(RECIPES / "della.yaml"), "--store", str(tmp_path / "k.zarr"),
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0 and "waiting for the device" not in res.output, res.output
