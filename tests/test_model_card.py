"""The export's model card (README.md) and recipe (mergekit_config.yml), read back with the Hub's
own parser (huggingface_hub.ModelCard) and mergekit's recipe schema."""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from streammerge.cli import main as cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_export_writes_a_model_card_the_hub_reads(synth_family, tmp_path, monkeypatch):
    # the base model comes from a Hugging Face cache (a Hub repo id), the fine-tunes from directories
    base, fts = synth_family()
    hub = tmp_path / "hub"
    snap = hub / "models--org--base" / "snapshots" / COMMIT
    shutil.copytree(base, snap)
    (hub / "models--org--base" / "refs").mkdir()
    (hub / "models--org--base" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    ft1, ft2 = fts[:2]
    text = (
        "merge_method: task_arithmetic\n"
        "base_model: org/base\n"
        "models:\n"
        f"  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {ft2}\n    parameters: {{weight: 0.3}}\n"
        "dtype: float32\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    run("build", recipe, "--store", tmp_path / "job.zarr", "--export", tmp_path / "out", "--no-progress")

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["org/base"]  # local directories are no Hub ids: text only
    assert card.data.library_name == "transformers"
    assert "merge" in card.data.tags and "task_arithmetic" in card.data.tags
    assert card.text.lstrip().startswith("# A task_arithmetic merge\n")
    assert "streammerge" in card.text and "`task_arithmetic` merge" in card.text
    assert str(ft1) in card.text and str(ft2) in card.text
    assert "https://huggingface.co/org/base" in card.text
    assert text.strip() in card.text  # the recipe as written

    saved = (tmp_path / "out" / "mergekit_config.yml").read_text()
    assert saved == text
    mergekit_config = pytest.importorskip("mergekit.config")
    cfg = mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(saved))
    assert cfg.merge_method == "task_arithmetic" and len(cfg.models) == 2


def test_local_models_give_no_base_model_metadata(synth_family, tmp_path):
    base, fts = synth_family()
    ft1 = fts[0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {ft1}\n    parameters: {{weight: 1}}\n")
    run("build", recipe, "--store", tmp_path / "j.zarr", "--no-progress")
    run("export", tmp_path / "j.zarr", tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None
    assert card.data.tags[0] == "merge"
    assert f"`{base}`" in card.text


def _in_hub_cache(hub, repo: str, src) -> None:
    snap = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)


def test_card_lists_each_adapter_input_with_its_base(synth_family, tmp_path, monkeypatch):
    """LoRA adapter inputs (issue #16): each listed as the adapter and the base it was applied to,
    Hub ids for what came from the Hugging Face cache (in the metadata too), paths otherwise;
    the `BASE+ADAPTER` string and mergekit's mapping form alike."""
    base, fts = synth_family()
    run("extract-lora", fts[0], "--base", base, "-o", tmp_path / "math-lora", "--rank", "2", "--no-progress")
    run("extract-lora", fts[1], "--base", base, "-o", tmp_path / "code-lora", "--rank", "2", "--no-progress")
    hub = tmp_path / "hub"
    _in_hub_cache(hub, "org/base", base)
    _in_hub_cache(hub, "org/math-lora", tmp_path / "math-lora")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    local = tmp_path / "code-lora"
    text = (
        "merge_method: task_arithmetic\n"
        "base_model: org/base\n"
        "models:\n"
        "  - model: org/base+org/math-lora\n    parameters: {weight: 0.5}\n"
        f"  - model: {{model: org/base, lora: {local}}}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {fts[2]}\n    parameters: {{weight: 0.2}}\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    run("build", recipe, "--store", tmp_path / "job.zarr", "--export", tmp_path / "out", "--no-progress")

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["org/base", "org/math-lora"]
    hub_base = "[org/base](https://huggingface.co/org/base)"
    lines = card.text.splitlines()
    assert f"- {hub_base} (base model)" in lines
    assert f"- `org/base+org/math-lora`: LoRA adapter [org/math-lora](https://huggingface.co/org/math-lora) applied to {hub_base}" in lines
    assert f"- `org/base+{local}`: LoRA adapter `{local}` applied to {hub_base}" in lines
    assert f"- `{fts[2]}`" in lines
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
