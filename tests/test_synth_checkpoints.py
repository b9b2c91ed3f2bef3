"""Tests for tools/synth_checkpoints.py (tiny shapes only)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "synth_checkpoints.py"


def _load_tool():
    name = "synth_checkpoints"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(_TOOL):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


sc = _load_tool()
TINY = sc.PRESETS["tiny"]


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _dtype_kw() -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": "auto"} if (major, minor) >= (4, 56) else {"torch_dtype": "auto"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return sc.make_family(root, TINY, n_finetunes=3, seed=7)


# ------------------------------------------------------------------------------------ layout


def test_tensor_specs_match_hf_names_and_shapes():
    shape = sc.ModelShape(hidden=64, heads=4, kv_heads=2, intermediate=96, layers=3, vocab=300, qkv_bias=True)
    specs = {n: s for n, s, _ in sc.tensor_specs(shape)}
    assert specs["model.embed_tokens.weight"] == (300, 64)
    assert specs["lm_head.weight"] == (300, 64)
    assert specs["model.layers.2.self_attn.q_proj.weight"] == (64, 64)
    assert specs["model.layers.2.self_attn.k_proj.weight"] == (32, 64)  # kv_heads * head_dim
    assert specs["model.layers.2.self_attn.v_proj.bias"] == (32,)
    assert specs["model.layers.0.mlp.down_proj.weight"] == (64, 96)
    assert specs["model.layers.0.mlp.gate_proj.weight"] == (96, 64)
    assert "model.layers.3.input_layernorm.weight" not in specs
    tied = {n for n, _, _ in sc.tensor_specs(sc.ModelShape(tied_embeddings=True))}
    assert "lm_head.weight" not in tied and not any(n.endswith(".bias") for n in tied)
    with pytest.raises(ValueError):
        sc.ModelShape(hidden=64, heads=5)


def test_files_and_config(family):
    base, fts = family
    names = {p.name for p in base.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == 256 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000 and cfg["max_position_embeddings"] == 2048
    for ft in fts:
        assert _tree_digest(ft)["config.json"] == _tree_digest(base)["config.json"]
        assert _tree_digest(ft)["tokenizer.json"] == _tree_digest(base)["tokenizer.json"]
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == {n for n, _, _ in sc.tensor_specs(TINY)}
    sd = sc.read_checkpoint(base)
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    w = _f32(sd["model.layers.0.mlp.up_proj.weight"])
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    norm = _f32(sd["model.norm.weight"])
    assert abs(norm.mean() - 1) < 0.01 and 0 < norm.std() < 0.05


# ------------------------------------------------------------------------------------ transformers


@pytest.mark.parametrize(
    "qkv_bias,tied,dtype,shard",
    [
        (False, False, "bfloat16", None),
        (False, True, "float16", None),
        (True, False, "float32", 40_000),
        (True, True, "bfloat16", 40_000),
    ],
)
def test_loads_in_transformers(tmp_path, qkv_bias, tied, dtype, shard):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    shape = sc.ModelShape(qkv_bias=qkv_bias, tied_embeddings=tied)
    base = sc.make_base(tmp_path / "base", shape, dtype=dtype, seed=3, shard_size=shard)
    ft = sc.make_finetune(base, tmp_path / "ft", seed=4, emphasis="mlp", shard_size=shard)
    for d in (base, ft):
        model = transformers.AutoModelForCausalLM.from_pretrained(d, **_dtype_kw())
        assert type(model).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
        assert model.dtype == getattr(torch, dtype)
        assert model.config.tie_word_embeddings == tied
        state = {k: v for k, v in model.state_dict().items()}
        files = sc.read_checkpoint(d)
        expected = set(files) | ({"lm_head.weight"} if tied else set())
        assert set(state) == expected
        for name, arr in files.items():
            got = state[name]
            assert tuple(got.shape) == arr.shape and got.dtype == getattr(torch, dtype), name
            np.testing.assert_array_equal(got.float().numpy(), _f32(arr), err_msg=name)
        if tied:
            assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 200]])).logits
        assert logits.shape == (1, 4, 256) and torch.isfinite(logits.float()).all()


def test_tokenizer_loads_and_encodes(family):
    transformers = pytest.importorskip("transformers")
    base, _ = family
    tok = transformers.AutoTokenizer.from_pretrained(base)
    assert len(tok) == 256
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    text = "hello the world, model merge 42!"
    ids = tok(text).input_ids
    assert ids[0] == 1 and all(0 <= i < 256 for i in ids)
    assert 0 not in ids  # all printable ASCII is in the vocabulary
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text)  # merges are used
    assert tok("\u00e9").input_ids[-1] == 0  # unknown -> <unk>


def test_tokenizer_vocab_exact_and_prefix_stable():
    for n in (3, 50, 256, 5000):
        assert sc.build_tokenizer(n).get_vocab_size(with_added_tokens=True) == n
    small, big = sc.build_tokenizer(256).get_vocab(), sc.build_tokenizer(5000).get_vocab()
    assert all(big[t] == i for t, i in small.items())


# ------------------------------------------------------------------------------------ sharding


def test_sharded_index_consistent(tmp_path):
    shape = sc.ModelShape(qkv_bias=True)
    shard = 30_000
    d = sc.make_base(tmp_path / "sharded", shape, seed=1, shard_size=shard, tokenizer=False)
    u = sc.make_base(tmp_path / "single", shape, seed=1, tokenizer=False)
    assert not (d / "model.safetensors").exists() and not (d / "tokenizer.json").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("model-*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == {name for name, _, _ in sc.tensor_specs(shape)}
    from safetensors import safe_open

    total = 0
    for fname in files:
        with safe_open(d / fname, framework="np") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == fname}
        header, _ = sc._read_header(d / fname)
        header.pop("__metadata__")
        nbytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
        assert nbytes <= shard or len(header) == 1
        total += nbytes
    assert index["metadata"]["total_size"] == total
    # same values as the unsharded layout
    a, b = sc.read_checkpoint(d), sc.read_checkpoint(u)
    assert set(a) == set(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_parse_size():
    assert sc.parse_size("2GB") == 2_000_000_000
    assert sc.parse_size("512MiB") == 512 * 2**20
    assert sc.parse_size("1.5 kb") == 1500
    assert sc.parse_size("1234") == 1234
    with pytest.raises(ValueError):
        sc.parse_size("2 parsecs")


# ------------------------------------------------------------------------------------ values


def test_deterministic(tmp_path, family):
    base, fts = family
    root2 = tmp_path / "again"
    base2, fts2 = sc.make_family(root2, TINY, n_finetunes=3, seed=7, workers=1)  # thread count irrelevant
    for a, b in zip([base, *fts], [base2, *fts2]):
        assert _tree_digest(a) == _tree_digest(b)
    other = sc.make_base(tmp_path / "other", TINY, seed=8, tokenizer=False)
    assert _tree_digest(other)["model.safetensors"] != _tree_digest(base)["model.safetensors"]
    # fine-tunes differ from each other and from the base
    digests = {_tree_digest(d)["model.safetensors"] for d in (base, *fts)}
    assert len(digests) == 4


def _task_vector_energy(base: Path, ft: Path) -> dict[str, float]:
    b, f = sc.read_checkpoint(base), sc.read_checkpoint(ft)
    energy = {"attention": 0.0, "mlp": 0.0, "other": 0.0}
    for name in b:
        d = _f32(f[name]).astype(np.float64) - _f32(b[name])
        energy[sc.module_kind(name)] += float((d * d).sum())
    return energy


def test_emphasis_concentrates_task_vector(family):
    base, (ft_attn, ft_mlp, ft_none) = family
    e = _task_vector_energy(base, ft_attn)
    assert e["attention"] / sum(e.values()) > 0.75, e
    e = _task_vector_energy(base, ft_mlp)
    assert e["mlp"] / sum(e.values()) > 0.75, e
    e = _task_vector_energy(base, ft_none)
    assert e["attention"] / sum(e.values()) < 0.5 and e["mlp"] / sum(e.values()) < 0.75, e
    # the dense delta has the requested scale
    b, f = sc.read_checkpoint(base), sc.read_checkpoint(ft_none)
    d = _f32(f["model.layers.1.mlp.up_proj.weight"]) - _f32(b["model.layers.1.mlp.up_proj.weight"])
    assert 0.0015 < d.std() < 0.0025


def test_bf16_is_rne_of_float32(tmp_path):
    f32 = sc.read_checkpoint(sc.make_base(tmp_path / "f32", TINY, dtype="float32", seed=5, tokenizer=False))
    bf16 = sc.read_checkpoint(sc.make_base(tmp_path / "bf16", TINY, dtype="bfloat16", seed=5, tokenizer=False))
    f16 = sc.read_checkpoint(sc.make_base(tmp_path / "f16", TINY, dtype="float16", seed=5, tokenizer=False))
    for k in f32:
        assert f32[k].dtype == np.float32 and f16[k].dtype == np.float16
        assert bf16[k].tobytes() == f32[k].astype(ml_dtypes.bfloat16).tobytes()
        assert f16[k].tobytes() == f32[k].astype(np.float16).tobytes()


def test_finetune_larger_vocab_and_dtype(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    base, _ = family
    ft = sc.make_finetune(base, tmp_path / "bigvocab", seed=11, vocab=300, dtype="float32")
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["torch_dtype"] == "float32"
    b, f = sc.read_checkpoint(base), sc.read_checkpoint(ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert b[name].shape == (256, 64) and f[name].shape == (300, 64) and f[name].dtype == np.float32
        delta = f[name][:256] - _f32(b[name])
        assert np.abs(delta).max() < 0.02  # old rows: base + small delta
        assert 0.015 < f[name][256:].std() < 0.025  # new rows: fresh N(0, 0.02)
    assert f["model.norm.weight"].shape == b["model.norm.weight"].shape
    tok = transformers.AutoTokenizer.from_pretrained(ft)
    assert len(tok) == 300
    base_tok = transformers.AutoTokenizer.from_pretrained(base)
    assert tok("hello world").input_ids == base_tok("hello world").input_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(ft, **_dtype_kw())
    assert model.get_input_embeddings().weight.shape == (300, 64)
    with pytest.raises(ValueError):
        sc.make_finetune(base, tmp_path / "smaller", seed=1, vocab=100)


# ------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert sc.main([str(out), "--preset", "tiny", "--layers", "1", "--finetunes", "2", "--tied",
                    "--shard-size", "50KB", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "ft2" in printed and "total" in printed
    assert sorted(p.name for p in out.iterdir()) == ["base", "ft1", "ft2"]
    cfg = json.loads((out / "ft2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is True
    assert (out / "ft1" / "model.safetensors.index.json").exists()
    with pytest.raises(SystemExit) as e:
        sc.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--preset", "--layers", "--finetunes", "--dtype", "--qkv-bias", "--tied", "--shard-size", "--seed"):
        assert opt in help_text
