"""extract-lora: a fine-tune's task vectors as a PEFT LoRA adapter, by a streamed randomized SVD.

References: torch.linalg.svd's truncated SVD (the optimum at each rank, Eckart-Young), the
adapter's own factors multiplied here, and peft loading the adapter onto the base model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from streammerge.cli import main as cli
from streammerge.export.lora import streamed_low_rank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LOW_RANK = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res.output


def _config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float32 base; 'exact': base + a rank-4 delta on every projection; 'noisy': the same plus
    small full-rank noise and a changed embedding."""
    root = tmp_path_factory.mktemp("xlora")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config()).eval()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    out = {"base": root / "base"}
    for kind in ("exact", "noisy"):
        ft = transformers.LlamaForCausalLM(_config()).eval()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in ft.named_parameters():
                if p.ndim == 2 and any(t in name for t in TARGETS):
                    u = torch.randn(p.shape[0], LOW_RANK, generator=g) * 0.05
                    v = torch.randn(LOW_RANK, p.shape[1], generator=g) * 0.05
                    p.add_(u @ v)
                    if kind == "noisy":
                        p.add_(torch.randn(p.shape, generator=g) * 1e-3)
            if kind == "noisy":
                ft.model.embed_tokens.weight.add_(torch.randn(ft.model.embed_tokens.weight.shape, generator=g) * 1e-2)
        ft.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def _deltas(models, kind):
    b = load_file(models["base"] / "model.safetensors")
    f = load_file(models[kind] / "model.safetensors")
    return {n: (f[n] - b[n]).double() for n in f if f[n].ndim == 2 and any(t in n for t in TARGETS)}


def _product(adapter, module):
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    return b @ a


@pytest.mark.parametrize("rank", [2, 8])
def test_error_within_one_percent_of_the_truncated_svd(models, tmp_path, rank):
    run("extract-lora", models["noisy"], "--base", models["base"], "-o", tmp_path / "a", "--rank", rank)
    adapter = load_file(tmp_path / "a" / "adapter_model.safetensors")
    report = json.loads((tmp_path / "a" / "extraction.json").read_text())["tensors"]
    deltas = _deltas(models, "noisy")
    assert set(report) >= set(deltas)
    for name, d in deltas.items():
        s = torch.linalg.svdvals(d)
        optimum = float(torch.sqrt((s[rank:] ** 2).sum()) / torch.linalg.norm(d))
        ours = float(torch.linalg.norm(d - _product(adapter, name[: -len(".weight")])) / torch.linalg.norm(d))
        assert ours <= optimum * 1.01 + 1e-6, (name, ours, optimum)
        assert report[name]["rel_error"] == pytest.approx(ours, rel=1e-3, abs=1e-6)  # what it reports is what it made
        assert report[name]["rank"] == rank


def test_peft_loads_the_adapter_and_reproduces_the_finetune(models, tmp_path):
    run("extract-lora", models["exact"], "--base", models["base"], "-o", tmp_path / "a", "--rank", 8)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    base = transformers.LlamaForCausalLM.from_pretrained(models["base"]).eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ft = transformers.LlamaForCausalLM.from_pretrained(models["exact"]).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(ids).logits, ft(ids).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(models["base"]).eval()(ids).logits
    # the delta is exactly rank 4: rank 8 recovers it up to float32 rounding
    assert (want - plain).abs().max() > 1e-2  # the fine-tune does differ from the base
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    merged = model.merge_and_unload().state_dict()
    fts = ft.state_dict()
    for name in _deltas(models, "exact"):
        torch.testing.assert_close(merged[name], fts[name], atol=2e-5, rtol=0)


def test_changed_embeddings_are_saved_whole_and_load(models, tmp_path):
    out = run("extract-lora", models["noisy"], "--base", models["base"], "-o", tmp_path / "a", "--rank", 4)
    assert "model.embed_tokens.weight" in out
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.embed_tokens"]
    base = transformers.LlamaForCausalLM.from_pretrained(models["base"]).eval()
    model = peft.PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload()
    want = load_file(models["noisy"] / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], want, atol=0, rtol=0)


def test_sv_epsilon_gives_lower_ranks_that_peft_loads(models, tmp_path):
    deltas = _deltas(models, "noisy")
    # a threshold between the 4 strong singular values and the noise's
    s = torch.linalg.svdvals(deltas["model.layers.0.self_attn.q_proj.weight"])
    eps = float((s[LOW_RANK - 1] + s[LOW_RANK]) / 2)
    run("extract-lora", models["noisy"], "--base", models["base"], "-o", tmp_path / "a", "--rank", 8, "--sv-epsilon", eps)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    adapter = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == LOW_RANK
    for module, r in cfg["rank_pattern"].items():
        assert adapter[f"base_model.model.{module}.lora_A.weight"].shape[0] == r == cfg["alpha_pattern"][module]
    base = transformers.LlamaForCausalLM.from_pretrained(models["base"]).eval()
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload().state_dict()
    b = load_file(models["base"] / "model.safetensors")
    for name in deltas:
        module = name[: -len(".weight")]
        torch.testing.assert_close(merged[name].double(), b[name].double() + _product(adapter, module), atol=1e-5, rtol=0)


def test_include_and_exclude(models, tmp_path):
    run("extract-lora", models["exact"], "--base", models["base"], "-o", tmp_path / "a", "--rank", 2,
        "--include", r"self_attn", "--exclude", r"layers\.1\.")
    names = set(json.loads((tmp_path / "a" / "extraction.json").read_text())["tensors"])
    assert names == {f"model.layers.0.self_attn.{t}.weight" for t in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_streamed_factors_do_not_depend_on_the_block_size():
    rng = np.random.default_rng(0)
    d = (rng.standard_normal((200, 6)) @ rng.standard_normal((6, 90)) + 0.01 * rng.standard_normal((200, 90))).astype(np.float32)

    def blocks_of(rows):
        return lambda: ((r0, min(200, r0 + rows), d[r0 : r0 + rows]) for r0 in range(0, 200, rows))

    one = streamed_low_rank(blocks_of(200), d.shape, 6, np.random.default_rng(5))
    many = streamed_low_rank(blocks_of(7), d.shape, 6, np.random.default_rng(5))
    np.testing.assert_allclose(one.b @ one.a, many.b @ many.a, atol=1e-5)
    assert one.rel_error == pytest.approx(many.rel_error, abs=1e-6)


def test_bad_inputs_are_one_line_errors(models, tmp_path):
    out = run("extract-lora", models["exact"], "--base", models["base"], "-o", tmp_path / "a", "--rank", 2,
              "--include", "(", expect=1)
    assert out.count("\n") == 1 and "--include" in out and "regular expression" in out
    other = tmp_path / "other"
    cfg = _config()
    cfg.intermediate_size = 96
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    out = run("extract-lora", other, "--base", models["base"], "-o", tmp_path / "b", "--rank", 2, expect=1)
    assert out.count("\n") == 1 and "mlp" in out and ("[96, 64]" in out or "[64, 96]" in out)
    (tmp_path / "c").mkdir()
    out = run("extract-lora", models["exact"], "--base", models["base"], "-o", tmp_path / "c", "--rank", 2, expect=1)
    assert "already exists" in out
    assert not list(tmp_path.glob(".*partial*"))


def test_overwrite_replaces_whole_and_a_killed_runs_litter_is_removed(models, tmp_path):
    """The adapter is written beside OUT and renamed into place (fsutil.publish_dir): --overwrite
    swaps in the whole new adapter, and what a killed extraction left (its pid gone) is removed
    by the next one, while a running one's is left alone."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("an older adapter")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".adapter.partial-{dead.pid}-0123abcd"
        stale_old = tmp_path / f".adapter.old-{dead.pid}-89abcdef"
        running = tmp_path / f".adapter.partial-{live.pid}-0123abcd"
        for d in (stale, stale_old, running):
            d.mkdir()
            (d / "adapter_model.safetensors").write_bytes(b"half")
        run("extract-lora", models["exact"], "--base", models["base"], "-o", out, "--rank", 2, "--overwrite")
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "extraction.json"]
        assert not stale.exists() and not stale_old.exists() and running.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.")] == [running.name]
    finally:
        live.kill()
        live.wait()


# What vLLM's parse_fine_tuned_lora_name accepts from a linear layer's adapter (anything else:
# "... is unsupported LoRA weight"), and SGLang likewise.
ENGINE_KEY = r"base_model\.model\..+\.lora_[AB]\.weight"


def test_modules_to_save_drop_writes_lora_factors_only_and_reports_the_loss(models, tmp_path):
    keep_out = run("extract-lora", models["noisy"], "--base", models["base"], "-o", tmp_path / "keep", "--rank", 4)
    out = run("extract-lora", models["noisy"], "--base", models["base"], "-o", tmp_path / "drop", "--rank", 4,
              "--modules-to-save", "drop")
    assert "dropped" not in keep_out
    cfg = json.loads((tmp_path / "drop" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None
    adapter = load_file(tmp_path / "drop" / "adapter_model.safetensors")
    assert all(re.fullmatch(ENGINE_KEY, k) for k in adapter), sorted(adapter)
    # the factors are keep's; only the embedding saved whole is gone
    kept = load_file(tmp_path / "keep" / "adapter_model.safetensors")
    assert set(kept) - set(adapter) == {"base_model.model.model.embed_tokens.weight"}
    for k, v in adapter.items():
        torch.testing.assert_close(v, kept[k], atol=0, rtol=0)

    b = load_file(models["base"] / "model.safetensors")
    f = load_file(models["noisy"] / "model.safetensors")
    norms = {n: torch.linalg.norm(f[n].double() - b[n].double()) for n in f if f[n].ndim == 2}
    summary = json.loads((tmp_path / "drop" / "extraction.json").read_text())
    emb = summary["tensors"]["model.embed_tokens.weight"]
    assert emb["dropped"] and emb["rank"] is None and emb["rel_error"] == 1.0
    assert emb["delta_norm"] == pytest.approx(float(norms["model.embed_tokens.weight"]), rel=1e-6)
    share = norms["model.embed_tokens.weight"] / torch.sqrt(sum(v**2 for v in norms.values()))
    assert 0 < share < 1 and summary["dropped_share"] == pytest.approx(float(share), rel=1e-6)
    assert f"{100 * float(share):.2f} %" in out and "model.embed_tokens.weight" in out

    base = transformers.LlamaForCausalLM.from_pretrained(models["base"]).eval()
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "drop").merge_and_unload().state_dict()
    torch.testing.assert_close(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"], atol=0, rtol=0)
    for name in _deltas(models, "noisy"):
        torch.testing.assert_close(merged[name].double(), b[name].double() + _product(adapter, name[: -len(".weight")]),
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A Llama with attention biases; its fine-tune changes every projection (rank 4), two norms
    and a bias."""
    root = tmp_path_factory.mktemp("xlora-bias")
    cfg = _config()
    cfg.attention_bias = True
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.ndim == 2 and any(t in name for t in TARGETS):
                p.add_(torch.randn(p.shape[0], LOW_RANK, generator=g) @ torch.randn(LOW_RANK, p.shape[1], generator=g) * 0.003)
        base.model.layers[0].input_layernorm.weight.add_(torch.randn(64, generator=g) * 0.05)
        base.model.norm.weight.add_(torch.randn(64, generator=g) * 0.02)
        base.model.layers[1].self_attn.q_proj.bias.add_(torch.randn(64, generator=g) * 0.05)
    base.save_pretrained(root / "ft")
    return root / "base", root / "ft"


NORMS = ("model.layers.0.input_layernorm.weight", "model.norm.weight")
BIAS = "model.layers.1.self_attn.q_proj.bias"


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_norms_are_kept_or_dropped_and_what_is_lost_is_reported(biased, tmp_path, mode):
    base_dir, ft_dir = biased
    out = run("extract-lora", ft_dir, "--base", base_dir, "-o", tmp_path / "a", "--rank", 8, "--modules-to-save", mode)
    b, f = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    norms = {n: float(torch.linalg.norm(f[n].double() - b[n].double())) for n in f}
    lost = (BIAS, *NORMS) if mode == "drop" else (BIAS,)  # no adapter form carries a bias beside lora_A/B
    summary = json.loads((tmp_path / "a" / "extraction.json").read_text())
    assert {n for n, t in summary["tensors"].items() if t.get("dropped")} == set(lost)
    for name in lost:
        assert summary["tensors"][name]["delta_norm"] == pytest.approx(norms[name], rel=1e-6)
    share = (sum(norms[n] ** 2 for n in lost) / sum(v**2 for v in norms.values())) ** 0.5
    assert 0 < share < 1 and summary["dropped_share"] == pytest.approx(share, rel=1e-6)
    assert f"dropped {len(lost)} changed tensor(s)" in out and f"{100 * share:.2f} %" in out
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == (None if mode == "drop" else sorted(n[: -len(".weight")] for n in NORMS))
    with torch.no_grad():
        model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
        merged = peft.PeftModel.from_pretrained(model, tmp_path / "a").merge_and_unload().state_dict()
    for name in (BIAS, *NORMS):
        torch.testing.assert_close(merged[name], (b if name in lost else f)[name], atol=0, rtol=0)


def test_memory_is_bounded_by_blocks_not_by_the_tensors_saved_whole(tmp_path, monkeypatch):
    """A changed 32 MiB embedding (float32) is saved whole, block by block: with 64 KiB blocks,
    the Python heap (numpy's arrays included, tracemalloc) never holds a quarter of it (opening
    the checkpoints alone peaks at 4 MiB)."""
    import tracemalloc

    import streammerge.export.lora as xlora

    cfg = _config()
    cfg.vocab_size = 131072  # embed_tokens and lm_head: 131072 x 64 float32, 32 MiB each
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.model.embed_tokens.weight.add_(0.01)
        base.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    base.save_pretrained(tmp_path / "ft")
    monkeypatch.setattr(xlora, "BLOCK_ELEMS", 1 << 14)
    tracemalloc.start()
    try:
        info = xlora.extract_lora(str(tmp_path / "ft"), str(tmp_path / "base"), tmp_path / "a", 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["tensors"]["model.embed_tokens.weight"]["saved_whole"]
    assert peak < 8 * 2**20, peak
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")["base_model.model.model.embed_tokens.weight"]
    torch.testing.assert_close(saved, base.model.embed_tokens.weight.detach(), atol=0, rtol=0)
