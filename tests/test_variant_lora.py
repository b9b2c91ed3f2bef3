"""export --variant lora: a routing store's shipped model plus one PEFT adapter per task.

Reference: `export --variant task:NAME` (the task's model, as tests/test_routed.py checks it
against the formulas), loaded with transformers; the adapter is applied by peft itself."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import synth_checkpoints as synth
from helpers import load_model_tensors, write_recipe
from streammerge.cli import main as cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, vocab=96)
TASKS = ["chat", "math", "code"]


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlora")
    base, fts = synth.make_family(root, SHAPE, n_finetunes=3, dtype="bfloat16", delta_scale=0.004)

    def build(name, method, **params):
        r = {"merge_method": method, "base_model": str(base),
             "models": [{"model": str(f), "parameters": {"task": t}} for f, t in zip(fts, TASKS)], "parameters": params}
        store = root / f"{name}.zarr"
        run("build", write_recipe(root / f"{name}.yaml", r), "--store", store, "--block-elements", "1000")
        return store

    return {
        "mediator": build("med", "mediator", route=2, rho=0.2, route_outside=True),
        "1bit": build("bit", "1bit", preset="uniform", **{"lambda": 0.5}),
    }


def _peft_merged(out, task):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. peft's "missing adapter keys": wrong targets
        return peft.PeftModel.from_pretrained(model, out / "adapters" / task).merge_and_unload().state_dict()


@pytest.mark.parametrize("method", ["mediator", "1bit"])
def test_full_rank_adapters_give_each_task_model(stores, tmp_path, method):
    store = stores[method]
    out = run("export", store, tmp_path / "lora", "--variant", "lora", "--rank", 128)
    assert "adapter math:" in out
    meta = json.loads((tmp_path / "lora" / "lora.json").read_text())
    assert meta["tasks"] == TASKS and meta["adapters"]["code"] == "adapters/code"
    for task in ("math", "code"):
        run("export", store, tmp_path / task, "--variant", f"task:{task}")
        want = load_model_tensors(tmp_path / task)
        got = _peft_merged(tmp_path / "lora", task)
        for name, w in want.items():
            g = got[name] if name in got else got[name.replace("lm_head", "model.embed_tokens")]
            # the task export rounds its float32 weights to bf16 once; the adapter's are float32
            torch.testing.assert_close(g, w.float(), atol=1e-6, rtol=2**-8, msg=lambda m, n=name: f"{n}: {m}")
        report = json.loads((tmp_path / "lora" / "adapters" / task / "extraction.json").read_text())["tensors"]
        assert max(r["rel_error"] for r in report.values() if r.get("rank")) < 1e-4


def test_low_rank_adapters_report_their_error(stores, tmp_path):
    out = run("export", stores["1bit"], tmp_path / "lora", "--variant", "lora", "--rank", 4)
    report = json.loads((tmp_path / "lora" / "adapters" / "math" / "extraction.json").read_text())["tensors"]
    errs = [r["rel_error"] for r in report.values() if r.get("rank")]
    assert all(0 < e < 1 for e in errs)  # a sign matrix is far from rank 4, never worse than nothing
    assert "relative error median" in out
    cfg = json.loads((tmp_path / "lora" / "adapters" / "math" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    _peft_merged(tmp_path / "lora", "math")  # loads


def test_lora_variant_of_a_static_store_is_refused(synth_family, tmp_path):
    base, fts = synth_family(n_finetunes=2)
    r = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                           "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts]})
    run("build", r, "--store", tmp_path / "j.zarr")
    out = run("export", tmp_path / "j.zarr", tmp_path / "o", "--variant", "lora", expect=1)
    assert "mediator or 1bit" in out


def test_modules_to_save_drop_gives_engine_loadable_adapters_and_reports_the_loss(stores, tmp_path):
    """A Mediator store routes its routed layers' norms: keep saves them whole per task, drop
    leaves them out (vLLM and SGLang refuse modules_to_save) and reports ||delta|| for each, which
    is what keep's whole tensor minus the shipped model's gives."""
    run("export", stores["mediator"], tmp_path / "keep", "--variant", "lora", "--rank", 8)
    out = run("export", stores["mediator"], tmp_path / "drop", "--variant", "lora", "--rank", 8, "--modules-to-save", "drop")
    shipped = load_model_tensors(tmp_path / "drop")
    for task in TASKS:
        keep_cfg = json.loads((tmp_path / "keep" / "adapters" / task / "adapter_config.json").read_text())
        cfg = json.loads((tmp_path / "drop" / "adapters" / task / "adapter_config.json").read_text())
        assert keep_cfg["modules_to_save"] and cfg["modules_to_save"] is None
        assert cfg["target_modules"] == keep_cfg["target_modules"]
        adapter = load_file(tmp_path / "drop" / "adapters" / task / "adapter_model.safetensors")
        kept = load_file(tmp_path / "keep" / "adapters" / task / "adapter_model.safetensors")
        assert all(re.fullmatch(r"base_model\.model\..+\.lora_[AB]\.weight", k) for k in adapter), sorted(adapter)
        whole = {k[len("base_model.model."):]: v for k, v in kept.items() if k not in adapter}
        assert whole and all(".lora_" not in k for k in whole)
        summary = json.loads((tmp_path / "drop" / "adapters" / task / "extraction.json").read_text())
        dropped = {n: t for n, t in summary["tensors"].items() if t.get("dropped")}
        assert set(dropped) == set(whole)
        lost2 = 0.0
        for name, w in whole.items():
            want = float(torch.linalg.norm(w.double() - shipped[name].double()))
            assert dropped[name]["delta_norm"] == pytest.approx(want, rel=1e-6, abs=1e-9), name
            lost2 += want**2
        total2 = sum(t["delta_norm"] ** 2 for t in summary["tensors"].values())
        assert summary["dropped_share"] == pytest.approx((lost2 / total2) ** 0.5, rel=1e-6)
        assert f"adapter {task}: dropped {len(whole)} changed tensor(s)" in out
        merged = _peft_merged(tmp_path / "drop", task)
        for name in whole:  # peft leaves them as shipped
            torch.testing.assert_close(merged[name], shipped[name].float(), atol=0, rtol=0)


def test_modules_to_save_is_refused_outside_the_lora_variant(stores, tmp_path):
    out = run("export", stores["mediator"], tmp_path / "o", "--variant", "routed", "--modules-to-save", "drop", expect=1)
    assert out.count("\n") == 1 and "--modules-to-save drop: only for --variant lora" in out
    assert not (tmp_path / "o").exists()
