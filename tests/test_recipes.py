"""Every example in recipes/ builds and exports against generated checkpoints, and mergekit
accepts it unchanged (its own config validation)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from helpers import load_model_tensors
from streammerge.engine.job import build
from streammerge.export.hf import export_store
from streammerge.methods import method_names

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_one_recipe_per_method():
    assert {p.stem for p in RECIPES} == set(method_names())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds(recipe, synth_family, tmp_path, monkeypatch):
    base, fts = synth_family("recipes", dtype="bfloat16")
    (tmp_path / "models").mkdir()
    for name, d in [("base", base), *[(f"ft{i + 1}", f) for i, f in enumerate(fts)]]:
        os.symlink(d, tmp_path / "models" / name)
    monkeypatch.chdir(tmp_path)
    result = build(recipe, tmp_path / "job.zarr", progress=False)
    assert result.store.is_complete()
    export_store(result.store, tmp_path / "out")
    tensors = load_model_tensors(tmp_path / "out")
    assert tensors and all(t.isfinite().all() for t in tensors.values())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_mergekit_accepts_recipe(recipe):
    config = pytest.importorskip("mergekit.config")
    config.MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
