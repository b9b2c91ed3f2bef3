"""FP8 checkpoints as merge inputs (checkpoints/fp8.py), against a torch dequantization.

The checkpoints are a tiny transformers Llama whose linear weights are quantized the way
DeepSeek-V3 and Qwen FP8 releases are (per block of `weight_block_size`: scale_inv = amax / fp8
max, weight = (W / scale_inv) in float8, written with safetensors). The reference for every
input is torch's own dequantization, weight.float() * scale_inv repeated over the blocks; the
merge is then computed in memory on those tensors (torch for linear, the method's in-memory
emulation for ties, whose top-k is tested against mergekit in test_methods_ties.py). Both must
equal streammerge's streamed build bit for bit, on the CPU path and the device path, and the
export must load in transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from helpers import load_model_tensors, torch_linear, write_recipe
from streammerge.checkpoints import open_model
from streammerge.checkpoints.blocks import read_rows, read_rows_at
from streammerge.checkpoints.fp8 import Fp8Handle
from streammerge.cli import main as cli
from streammerge.engine.job import build
from streammerge.methods import TensorParams, get_method
from streammerge.methods.inmemory import merge_tensor

transformers = pytest.importorskip("transformers")

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (weight_block_size written in config.json or None for the default 128 x 128, fp8 format)
LAYOUTS = {"default-e4m3": (None, "F8_E4M3"), "32x48-e5m2": ([32, 48], "F8_E5M2")}


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def tiny_llama(out: Path, seed: int) -> Path:
    config = transformers.LlamaConfig(
        hidden_size=160, intermediate_size=272, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=200, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int], fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv per block), as FP8 releases are made."""
    br, bc = block
    rows, cols = w.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(gr * br, gc * bc)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(gr, br, gc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(FP8[fmt]).max
    q = (blocks / scale[:, None, :, None]).reshape(gr * br, gc * bc)[:rows, :cols].to(FP8[fmt])
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: weight.float() * scale_inv repeated over its blocks."""
    rows, cols = q.shape
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def fp8_model(src: Path, out: Path, size: list[int] | None, fmt: str) -> Path:
    """`src` with its linear weights quantized to `fmt` in blocks of `size` (config.json)."""
    shutil.copytree(src, out)
    block = tuple(size or (128, 128))
    tensors = load_file(out / "model.safetensors")
    for name in list(tensors):
        if any(f"{p}.weight" in name for p in LINEAR):
            tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name], block, fmt)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if size:
        cfg["quantization_config"]["weight_block_size"] = size
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def reference_inputs(model: Path, size) -> dict[str, torch.Tensor]:
    """Every tensor the merge sees, float32: FP8 weights dequantized by torch, scales dropped."""
    raw = load_model_tensors(model)
    block = tuple(size or (128, 128))
    return {
        n: dequantize(t, raw[n + "_scale_inv"], block) if t.dtype in FP8.values() else t.float()
        for n, t in raw.items() if not n.endswith("_scale_inv")
    }


@pytest.fixture(scope="module", params=list(LAYOUTS))
def family(request, tmp_path_factory):
    size, fmt = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp("fp8")
    dirs = [fp8_model(tiny_llama(root / f"src{i}", seed=i), root / f"m{i}", size, fmt) for i in range(3)]
    return {"dirs": dirs, "size": size, "fmt": fmt, "refs": [reference_inputs(d, size) for d in dirs]}


@pytest.mark.parametrize("st", list(FP8))
@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 1001])
def test_fp8_decoding_equals_torch(st, n):
    """Every code (the pair table, and the odd last byte), into an output at any offset."""
    from streammerge.dtypes import fp8_to_float32

    raw = np.random.default_rng(n).permutation(np.resize(np.arange(256, dtype=np.uint8), max(n, 1)))[:n]
    out = np.full(n + 2, 7.0, np.float32)
    got = fp8_to_float32(raw, st, out[1 : n + 1])
    want = torch.from_numpy(raw.copy()).view(FP8[st]).float().numpy()
    assert np.array_equal(got, want, equal_nan=True) and out[0] == out[-1] == 7.0


def test_rows_read_equal_torch_dequantization(family):
    ck = open_model(str(family["dirs"][0]))
    assert not any(n.endswith("_scale_inv") for n in ck.tensors)
    ref = family["refs"][0]
    name = "model.layers.1.mlp.down_proj.weight"  # 160 x 272: ragged last blocks either way
    h = ck.tensors[name]
    assert isinstance(h, Fp8Handle) and h.dtype == "BF16" and h.weight.dtype == family["fmt"]
    want = ref[name].numpy()
    rows = want.shape[0]
    for r0, r1 in [(0, rows), (0, 1), (5, 12), (31, 33), (127, 160), (rows - 1, rows)]:
        got = read_rows(h, r0, r1, np.empty((r1 - r0) * want.shape[1], np.float32))
        assert np.array_equal(got, want[r0:r1]), (r0, r1)
    picked = np.array([0, 1, 2, 40, 41, 127, 128, 159])
    got = read_rows_at(h, picked, np.empty(picked.size * want.shape[1], np.float32))
    assert np.array_equal(got, want[picked])
    assert read_rows_at(h, picked[:0], np.empty(0, np.float32)).shape == (0, want.shape[1])


def recipe(tmp_path, method, dirs, **extra):
    return write_recipe(tmp_path / f"{method}.yaml", {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": w, "density": 0.5}} for d, w in zip(dirs[1:], (0.7, 0.5))],
        **extra,
    })


def test_linear_equals_torch_on_dequantized_inputs_and_loads_in_transformers(family, tmp_path):
    dirs, refs = family["dirs"], family["refs"]
    r = write_recipe(tmp_path / "linear.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, (0.5, 0.3, 0.2))],
    })
    run("build", r, "--store", tmp_path / "j.zarr", "--export", tmp_path / "out", "--block-elements", "4000", "--no-progress")
    out = load_model_tensors(tmp_path / "out")
    assert set(out) == set(refs[0])  # the scales are no outputs
    for name, got in out.items():
        assert got.dtype == torch.bfloat16, name  # bf16 unless the recipe says otherwise
        want = torch_linear([ref[name] for ref in refs], [0.5, 0.3, 0.2]).to(torch.bfloat16)
        assert torch.equal(got, want), name

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, p in model.state_dict().items():
        assert torch.equal(p, out[name]), name
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("path", ["cpu-path", "device-path"])
def test_ties_equals_the_method_on_dequantized_inputs(family, tmp_path, path):
    """Streamed in row blocks (CPU) or whole on torch's device path: the same bits as the
    method run in memory on torch's dequantization."""
    dirs, refs = family["dirs"], family["refs"]
    r = recipe(tmp_path, "ties", dirs, dtype="float32", parameters={"normalize": True})
    device = "cpu" if path == "device-path" else None
    build(r, tmp_path / "j.zarr", progress=False, block_elems=3000, device=device)
    run("export", tmp_path / "j.zarr", tmp_path / "out")
    out = load_model_tensors(tmp_path / "out")
    method = get_method("ties")
    glob = {p.name: p.default for p in method.params if p.scope == "global"} | {"normalize": True}
    per_model = tuple({p.name: p.default for p in method.params if p.scope != "global"} | {"weight": w, "density": 0.5} for w in (0.7, 0.5))
    params = TensorParams(glob, per_model, 0)
    for name, got in out.items():
        assert got.dtype == torch.float32, name
        want = merge_tensor(method, name, refs[0][name].numpy(), [refs[1][name].numpy(), refs[2][name].numpy()], params, None)
        assert np.array_equal(got.numpy(), want), name


def test_bf16_base_with_fp8_finetunes(family, tmp_path):
    """Inputs in different storage agree: a bf16 base merges with FP8 fine-tunes."""
    dirs, refs = family["dirs"], family["refs"]
    base = tmp_path / "bf16"
    shutil.copytree(dirs[0], base)
    save_file({n: t.to(torch.bfloat16) for n, t in refs[0].items()}, base / "model.safetensors", metadata={"format": "pt"})
    r = write_recipe(tmp_path / "ta.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": 0.5}} for d in dirs[1:]],
        "out_dtype": "float32",
    })
    run("build", r, "--store", tmp_path / "j.zarr", "--export", tmp_path / "out", "--no-progress")
    out = load_model_tensors(tmp_path / "out")
    b = refs[0]
    for name, got in out.items():
        base_value = b[name].to(torch.bfloat16).float()
        want = base_value + ((refs[1][name] - base_value) * 0.5 + (refs[2][name] - base_value) * 0.5)
        assert torch.equal(got, want), name


# ---- bad FP8 inputs: one line naming the tensor, nothing written ------------------------------

WEIGHT = "model.layers.0.self_attn.q_proj.weight"


def _no_scale(t):
    del t[WEIGHT + "_scale_inv"]


def _short_scale(t):
    t[WEIGHT + "_scale_inv"] = t[WEIGHT + "_scale_inv"][:-1]


def _int_scale(t):
    t[WEIGHT + "_scale_inv"] = torch.ones_like(t[WEIGHT + "_scale_inv"], dtype=torch.int32)


def _nan_weight(t):
    q = t[WEIGHT].view(torch.uint8).clone()
    q[3, 7] = 0x7F  # NaN in both e4m3fn and e5m2
    t[WEIGHT] = q.view(t[WEIGHT].dtype)


def _vector(t):
    t["model.extra"] = torch.zeros(4, dtype=torch.float8_e4m3fn)
    t["model.extra_scale_inv"] = torch.ones(1)


def _bad_block(cfg):
    cfg["quantization_config"]["weight_block_size"] = [128]


BAD = {
    "no scale": (_no_scale, None, [WEIGHT, "has no " + WEIGHT + "_scale_inv"]),
    "scale of the wrong shape": (_short_scale, None, [WEIGHT + "_scale_inv", "has shape", "needs"]),
    "integer scale": (_int_scale, None, [WEIGHT + "_scale_inv", "I32", "must be BF16, F16 or F32"]),
    "NaN weight": (_nan_weight, None, [WEIGHT, "non-finite value (nan)", f"flat index {3 * 160 + 7}"]),
    "1-D FP8 tensor": (_vector, None, ["model.extra", "only 2-D FP8 weights"]),
    "bad block size": (None, _bad_block, ["config.json", "weight_block_size must be two positive integers"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_inputs_are_refused_with_the_tensor(family, tmp_path, case):
    edit_tensors, edit_config, expected = BAD[case]
    bad = tmp_path / "bad"
    shutil.copytree(family["dirs"][1], bad)
    if edit_tensors:
        tensors = load_file(bad / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((bad / "config.json").read_text())
        edit_config(cfg)
        (bad / "config.json").write_text(json.dumps(cfg))
    r = recipe(tmp_path, "task_arithmetic", [family["dirs"][0], bad])
    line = run("build", r, "--store", tmp_path / "j.zarr", expect=1).strip()
    assert "\n" not in line and line.startswith(f"error: {bad.resolve() if case != 'bad block size' else bad}"), line
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "j.zarr" / "manifest.json").exists() or case == "NaN weight"


def test_a_nan_fp8_weight_merges_with_allow_nonfinite(family, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(family["dirs"][1], bad)
    tensors = load_file(bad / "model.safetensors")
    _nan_weight(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    r = recipe(tmp_path, "task_arithmetic", [family["dirs"][0], bad])
    run("build", r, tmp_path / "out", "--allow-nonfinite", "--no-progress")
    got = load_model_tensors(tmp_path / "out")[WEIGHT]
    assert torch.isnan(got[3, 7]) and torch.isfinite(got).sum() == got.numel() - 1
