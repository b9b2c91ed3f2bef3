"""A mergekit user's habits: `build RECIPE OUT` with the store beside OUT, and mergekit's flags
that mean something here. References: the same build spelled with streammerge's own options."""

from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors.numpy import load_file

from helpers import write_recipe
from streammerge.cli import main as cli


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res.output


def recipe(tmp_path, family, method="dare_ties"):
    base, fts = family
    return write_recipe(tmp_path / "r.yaml", {
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts],
    })


def test_positional_output_with_the_store_beside_it(synth_family, tmp_path):
    r = recipe(tmp_path, synth_family(n_finetunes=2))
    out = run("build", r, tmp_path / "merged", "--out-shard-size", "100KB", "--random-seed", "7", "--no-progress")
    store = tmp_path / "merged.zarr"
    assert f"store: {store}" in out  # where the resume state is, said up front
    assert json.loads((store / "manifest.json").read_text())["seed"] == 7
    shards = sorted(p.name for p in (tmp_path / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1  # --out-shard-size reached the export

    # the same merge spelled with streammerge's own options: the same bytes
    run("build", r, "--store", tmp_path / "j.zarr", "--export", tmp_path / "ref", "--shard-size", "100KB", "--seed", "7")
    for name in shards:
        got, want = load_file(tmp_path / "merged" / name), load_file(tmp_path / "ref" / name)
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)

    again = run("build", r, tmp_path / "merged", "--out-shard-size", "100KB", "--random-seed", "7", "--no-progress")
    assert "already" in again  # the finished job, run again: nothing to do, exit 0


def test_mergekit_flags_that_change_nothing_are_accepted_with_a_note(synth_family, tmp_path):
    r = recipe(tmp_path, synth_family(n_finetunes=2), method="task_arithmetic")
    out = run("build", r, tmp_path / "m", "--copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "--cuda", "--no-progress")
    assert "--lazy-unpickle does nothing" in out
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    import torch

    if not torch.cuda.is_available():  # --cuda is --device cuda: here it falls back to the CPU, saying why
        assert "no CUDA device" in out


def test_output_and_store_arguments_must_agree(synth_family, tmp_path):
    r = recipe(tmp_path, synth_family(n_finetunes=2))
    out = run("build", r, expect=2)
    assert "give an output directory" in out
    out = run("build", r, tmp_path / "a", "--export", tmp_path / "b", expect=2)
    assert "name different directories" in out
