"""Non-float tensors (integer and boolean buffers) are copied from the base when every input
holds the same bytes, and refused, naming the tensor, when they do not. References: the bytes
the inputs hold (safetensors' own reader) and a build of the same family without the buffers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from helpers import write_recipe
from streammerge.cli import main as cli

POS = np.arange(64, dtype=np.int64).reshape(1, 64)
MASK = np.tril(np.ones((8, 8), dtype=bool))


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res.output


def with_buffers(src, dst, **extra):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors.update(extra)
    save_file(tensors, dst / "model.safetensors")
    return dst


def recipe(tmp_path, base, fts, name="r.yaml"):
    return write_recipe(tmp_path / name, {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
        "dtype": "float32",
    })


@pytest.fixture()
def family(synth_family, tmp_path):
    base, fts = synth_family(n_finetunes=2)
    buf = {"model.position_ids": POS, "model.causal_mask": MASK}
    return {
        "plain": (base, fts),
        "buffers": (with_buffers(base, tmp_path / "base", **buf), [with_buffers(f, tmp_path / f"ft{i}", **buf) for i, f in enumerate(fts)]),
    }


def test_buffers_are_copied_and_weights_merged_as_without_them(family, tmp_path):
    base, fts = family["buffers"]
    run("build", recipe(tmp_path, base, fts), "--store", tmp_path / "j.zarr", "--export", tmp_path / "out", "--no-progress")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["model.position_ids"].dtype == np.int64 and np.array_equal(out["model.position_ids"], POS)
    assert out["model.causal_mask"].dtype == np.bool_ and np.array_equal(out["model.causal_mask"], MASK)

    pbase, pfts = family["plain"]
    run("build", recipe(tmp_path, pbase, pfts, "p.yaml"), "--store", tmp_path / "p.zarr", "--export", tmp_path / "pout", "--no-progress")
    plain = load_file(tmp_path / "pout" / "model.safetensors")
    assert set(out) == set(plain) | {"model.position_ids", "model.causal_mask"}
    for name, value in plain.items():
        assert np.array_equal(out[name], value), name

    # re-exported in another dtype: the weights convert, the buffers stay as they are
    run("export", tmp_path / "j.zarr", tmp_path / "out16", "--dtype", "bfloat16")
    out16 = load_file(tmp_path / "out16" / "model.safetensors")
    assert np.array_equal(out16["model.position_ids"], POS) and np.array_equal(out16["model.causal_mask"], MASK)


def test_a_lost_buffer_copy_is_made_again_on_resume(family, tmp_path):
    base, fts = family["buffers"]
    r = recipe(tmp_path, base, fts)
    run("build", r, "--store", tmp_path / "j.zarr", "--no-progress")
    (tmp_path / "j.zarr" / "buffers" / "0").unlink()
    out = run("export", tmp_path / "j.zarr", tmp_path / "out", expect=1)
    assert "build is not finished" in out
    run("build", r, "--store", tmp_path / "j.zarr", "--no-progress")
    run("export", tmp_path / "j.zarr", tmp_path / "out")
    assert np.array_equal(load_file(tmp_path / "out" / "model.safetensors")["model.position_ids"], POS)


def test_a_buffer_that_differs_is_refused_with_its_name(family, tmp_path):
    pbase, pfts = family["plain"]
    base = with_buffers(pbase, tmp_path / "b", **{"model.position_ids": POS})
    same = with_buffers(pfts[0], tmp_path / "f0", **{"model.position_ids": POS})
    other = with_buffers(pfts[1], tmp_path / "f1", **{"model.position_ids": POS + 1})
    out = run("build", recipe(tmp_path, base, [same, other]), "--store", tmp_path / "j.zarr", expect=1)
    line = out.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert "model.position_ids" in line and str(other) in line and "other values" in line
    assert not (tmp_path / "j.zarr" / "manifest.json").exists()


@pytest.mark.parametrize("dtype, st", [("float8_e8m0fnu", "F8_E8M0")])
def test_float_types_that_are_not_merged_are_refused_not_copied(family, tmp_path, dtype, st):
    """FP8 formats without block scales hold values, not bytes to copy (block-scaled F8_E4M3 /
    F8_E5M2 are merged: test_fp8_inputs.py; F64 too: test_parity_mergekit.py)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    pbase, pfts = family["plain"]
    paths = []
    for src, name in [(pbase, "b"), (pfts[0], "f0")]:
        d = tmp_path / name
        shutil.copytree(src, d)
        tensors = load_torch(d / "model.safetensors")
        tensors["model.q"] = torch.zeros(4, 4, dtype=getattr(torch, dtype))
        save_torch(tensors, d / "model.safetensors")
        paths.append(d)
    out = run("build", recipe(tmp_path, paths[0], paths[1:]), "--store", tmp_path / "j.zarr", expect=1)
    assert "model.q" in out and st in out and "only BF16, F16, F32, F64 and block-scaled FP8 are merged" in out
