"""LoRA adapters as merge inputs (checkpoints/lora.py), against peft and mergekit.

Adapters are made with peft on a tiny transformers Llama (every factor random, so every delta is
nonzero) and saved; the reference for each is peft's own `merge_and_unload()` of it, saved as
a model (what mergekit's `model+lora` does). streammerge streams base + scale * B @ A per block;
merged with task_arithmetic, ties and mediator it must give the bits the same method gives on
the merge_and_unload'd models: task_arithmetic against an in-memory torch computation, ties and
mediator against streammerge's build of the merged models (the methods' own references are in
test_methods_ties.py and test_routed.py), and mergekit's build of a `model+lora` recipe.
Bit-identity holds because the delta is computed as peft does ((B @ A) * scale in float32, each
row by one gemm over the full width, which sums the rank's products in torch's order here:
checked directly by test_lora_handle_rows_equal_peft and, at rank 64, by
test_high_rank_rows_do_not_depend_on_the_rows_read_with_them) and rounded to the base dtype as
merge_and_unload's in-place add does. Where another BLAS sums in another order, the bound is
that of a float32 dot product of length r (|error| <= r * 2**-24 * sum_k |B_ik A_kj| * scale),
then at most one step of the base dtype after its rounding.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import synth_checkpoints as synth
from helpers import load_model_tensors, torch_linear, torch_task_arithmetic, write_recipe
from streammerge.checkpoints.blocks import read_rows, read_rows_at
from streammerge.checkpoints.lora import LoraHandle, open_input
from streammerge.cli import main as cli
from streammerge.engine.job import build
from streammerge.export.hf import export_store
from streammerge.store.store import Store

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = synth.ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=96)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR),
    # rslora, an embedding LoRA (lora_embedding_A/B, stored transposed) and a full lm_head
    "rslora-embed": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                         modules_to_save=["lm_head"]),
    # per-module rank and alpha
    "patterns": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 12}),
}


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft starts B (embeddings: A) at zero
                p.normal_(0.0, 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p.float()).to(p.dtype) * 0.01)
    model.save_pretrained(out)
    return out


def merge_and_unload(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    return out


def materialize(adapter: Path, like: Path, out: Path) -> Path:
    """The model `adapter` makes of its base as streammerge reads it (every tensor through
    open_input), saved as a model directory like `like` (its config, its tensors' names and
    dtypes)."""
    shutil.copytree(like, out)
    ck = open_input(str(adapter))
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            h = ck.tensors[name]
            rows = read_rows(h, 0, h.shape[0], np.empty(h.numel, np.float32)).reshape(h.shape)
            tensors[name] = torch.from_numpy(rows).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """{dtype: (base dir, {name: adapter dir}, {name: model dir of the adapter applied as
    streammerge reads it})}, and {("peft", dtype): {name: merge_and_unload'd model dir}}.

    The handle is checked against peft's merge (test_lora_handle_rows_equal_peft: within the
    float32 sum's error, which depends on the machine's BLAS) and against the exact product
    (test_high_rank_rows_...); the merges below take the adapters as inputs and are checked,
    bit for bit, against the same merges of the materialized models: what the engine does with
    LoRA inputs (row groups, device uploads, passes, routing) is then tested on its own."""
    out = {}
    for dtype in ("bfloat16", "float32"):
        root = tmp_path_factory.mktemp(f"lora-{dtype}")
        base = synth.make_base(root / "base", SHAPE, dtype=dtype)
        adapters = {n: make_adapter(base, root / n, i, **cfg) for i, (n, cfg) in enumerate(ADAPTERS.items())}
        peft = {n: merge_and_unload(base, a, root / f"{n}-peft") for n, a in adapters.items()}
        merged = {n: materialize(a, peft[n], root / f"{n}-merged") for n, a in adapters.items()}
        out[dtype] = base, adapters, merged
        out[("peft", dtype)] = peft
    return out


def streammerge_export(recipe: dict, tmp_path: Path, **kw) -> dict[str, torch.Tensor]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    build(path, tmp_path / "job.zarr", workers=2, progress=False, block_elems=1000, **kw)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    return load_model_tensors(tmp_path / "out")


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name].float() - want[name].float()).abs().max()}"


def peft_close(got: np.ndarray, want: np.ndarray, dtype: str, where="") -> None:
    """Our rows against peft's merge_and_unload, both float32 arrays of values of `dtype`.
    peft sums B @ A in float32 in its BLAS's order, which depends on the machine and the shapes;
    we take the exact sum's rounding (checkpoints/lora._product). So an entry may differ by the
    float32 sum's error, carried through one rounding to `dtype`: at most one step of `dtype`
    at its magnitude plus 2^-14 of the tensor's largest entry. And the differences are rare,
    so that a step left out (the delta's rounding, the scale) still fails: at most 1 % of the
    bf16 entries differ (a float32 sum's error crosses a bf16 rounding boundary about once in
    2^8), and at most half of the float32 ones."""
    assert got.shape == want.shape, where
    diff = np.abs(got.astype(np.float64) - want)
    step = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    if dtype == "bfloat16":
        step *= 2**16
    tol = step + 2.0**-14 * float(np.abs(want).max(initial=0))
    assert (diff <= tol).all(), f"{where}: max |diff| {diff.max()} (tolerance {tol[diff > tol].min()})"
    share = float((diff != 0).mean()) if diff.size else 0.0
    assert share <= (0.01 if dtype == "bfloat16" else 0.5), f"{where}: {share:.1%} of the entries differ"


def assert_matches_peft(got: dict, want: dict) -> None:
    """`peft_close` tensor by tensor (same names, same dtypes): outputs built from peft's merged models."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        dtype = "bfloat16" if want[name].dtype == torch.bfloat16 else "float32"
        peft_close(got[name].float().numpy(), want[name].float().numpy(), dtype, name)


def ref_spec(form: str, base: Path, adapter: Path) -> str:
    return str(adapter) if form == "dir" else f"{base}+{adapter}"


# ---- the handle ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 100], ids=["one-chunk", "row-chunks"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lora_handle_rows_equal_peft(family, dtype, chunk, monkeypatch):
    """Every tensor read through the adapter (whole, in blocks, and at scattered rows) is
    merge_and_unload's tensor, bit for bit; targeted ones are LoraHandles, modules_to_save the
    adapter's copy. With a small chunk the delta is added a row or two at a time."""
    if chunk is not None:
        monkeypatch.setattr("streammerge.checkpoints.lora._CHUNK", chunk)
    base, adapters, _ = family[dtype]
    merged = family[("peft", dtype)]
    for name, adapter in adapters.items():
        ck = open_input(str(adapter))
        want = load_model_tensors(merged[name])
        assert set(ck.tensors) == set(want)
        n_lora = 0
        for tname, h in ck.tensors.items():
            ref = want[tname].float().numpy()
            rows = h.shape[0]
            whole = read_rows(h, 0, rows, np.empty(h.numel, np.float32))
            if isinstance(h, LoraHandle) and h.a is not None:
                peft_close(whole, ref, dtype, f"{name} {tname}")
            else:  # the base's or the adapter's own tensor: peft's bits
                assert np.array_equal(whole, ref), (name, tname)
            # the rows read in blocks or picked: the bits of the whole, whichever rows come with them
            halves = np.concatenate([read_rows(h, 0, rows // 3, np.empty(h.numel, np.float32)),
                                     read_rows(h, rows // 3, rows, np.empty(h.numel, np.float32))])
            assert np.array_equal(halves, whole), (name, tname)
            picked = np.array([0, 2, 3, rows - 1])
            assert np.array_equal(read_rows_at(h, picked, np.empty(h.numel, np.float32)), whole[picked]), (name, tname)
            none = np.array([], dtype=np.int64)  # a pass's rows may miss a block
            assert read_rows_at(h, none, np.empty(h.numel, np.float32)).shape == (0, *h.shape[1:])
            if isinstance(h, LoraHandle):
                n_lora += 1
                assert not h.has_raw and h.a is not None
        assert n_lora == {"plain": 14, "rslora-embed": 7, "patterns": 8}[name]
    ck = open_input(str(adapters["rslora-embed"]))
    assert ck.tensors["model.embed_tokens.weight"].transposed
    assert "adapter_model.safetensors" in ck.tensors["lm_head.weight"].path


def test_full_tensor_in_another_dtype_is_rounded_as_peft_loads_it(family, tmp_path):
    """A modules_to_save copy stored in float32 for a bf16 base is loaded into the bf16 module."""
    base, adapters, _ = family["bfloat16"]
    adapter = copy_adapter(adapters["rslora-embed"], tmp_path / "adapter")
    key = "base_model.model.lm_head.weight"
    _edit_tensors(lambda t: t.update({key: t[key].float() + torch.randn(t[key].shape, generator=torch.Generator().manual_seed(3)) * 1e-3}))(adapter)
    want = load_model_tensors(merge_and_unload(base, adapter, tmp_path / "merged"))["lm_head.weight"]
    h = open_input(str(adapter)).tensors["lm_head.weight"]
    assert isinstance(h, LoraHandle) and h.a is None and h.base.dtype == "F32" and h.dtype == "BF16"
    got = read_rows(h, 0, h.shape[0], np.empty(h.numel, np.float32))
    assert np.array_equal(got, want.float().numpy())
    assert not np.array_equal(got, load_file(adapter / "adapter_model.safetensors")[key].numpy())


def test_high_rank_rows_do_not_depend_on_the_rows_read_with_them(family, tmp_path):
    """At rank 64 BLAS sums a lone row's products in another order than a block's, and each
    machine's BLAS in its own: every row, read alone, in threes or whole, must be the exact
    product's rounding (summed here with math.fsum, no BLAS), scaled and added in float32."""
    base, _, _ = family["float32"]
    r, alpha = 64, 32
    q, emb = "model.layers.0.self_attn.q_proj", "model.embed_tokens"
    g = torch.Generator().manual_seed(7)
    b = load_model_tensors(base)
    factors = {
        f"base_model.model.{q}.lora_A.weight": torch.randn(r, 64, generator=g),
        f"base_model.model.{q}.lora_B.weight": torch.randn(64, r, generator=g),
        f"base_model.model.{emb}.lora_embedding_A": torch.randn(r, 96, generator=g),
        f"base_model.model.{emb}.lora_embedding_B": torch.randn(64, r, generator=g),
    }
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": str(base), "target_modules": ["q_proj", "embed_tokens"]}))
    def exact(tall, wide):  # each entry: the float32 rounding of the exact sum's float64 rounding
        t, w = tall.double().tolist(), wide.double().T.tolist()
        return torch.tensor([[math.fsum(x * y for x, y in zip(row, col)) for col in w] for row in t]).float()

    scale = torch.tensor(alpha / r, dtype=torch.float32)
    want = {
        f"{q}.weight": b[f"{q}.weight"] + exact(factors[f"base_model.model.{q}.lora_B.weight"], factors[f"base_model.model.{q}.lora_A.weight"]) * scale,
        f"{emb}.weight": b[f"{emb}.weight"]
        + exact(factors[f"base_model.model.{emb}.lora_embedding_B"], factors[f"base_model.model.{emb}.lora_embedding_A"]).T * scale,
    }
    ck = open_input(str(adapter))
    for name, ref in want.items():
        h, ref = ck.tensors[name], ref.numpy()
        rows = h.shape[0]
        buf = np.empty(h.numel, np.float32)
        assert np.array_equal(read_rows(h, 0, rows, buf), ref), name
        for i in range(rows):
            assert np.array_equal(read_rows_at(h, np.array([i]), buf), ref[i : i + 1]), (name, i)
        threes = np.concatenate([read_rows(h, i, min(rows, i + 3), np.empty(h.numel, np.float32)) for i in range(0, rows, 3)])
        assert np.array_equal(threes, ref), name


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
def test_product_is_the_exact_sums_rounding(compiled, monkeypatch):
    """checkpoints/lora._product against math.fsum entry by entry: random factors at rank 64,
    rows summing to a float32 rounding midpoint give or take 2^-70 (where the float64 sum's
    order could decide the rounding: these take the exact path), and non-finite factors."""
    import streammerge.checkpoints.lora as lora

    if not compiled:
        monkeypatch.setattr(lora, "available", lambda: False)
    rng = np.random.default_rng(5)
    tall = rng.standard_normal((40, 64)).astype(np.float32)
    wide = rng.standard_normal((64, 48)).astype(np.float32)
    tall[:8] = 0
    tall[:8, :4] = [[1, 2.0**-24, 2.0**-70 * (i - 4), -(2.0**-71)] for i in range(8)]  # 1 + 2^-24: a float32 midpoint
    wide[:4] = 1
    tall[8, 5], tall[9, 6], wide[7, 3] = np.nan, np.inf, np.inf
    got = lora._product(tall, wide)

    def exact(i, j):
        try:
            return np.float32(math.fsum(float(a) * float(b) for a, b in zip(tall[i], wide[:, j])))
        except ValueError:  # inf - inf
            return np.float32(np.nan)

    want = np.array([[exact(i, j) for j in range(wide.shape[1])] for i in range(tall.shape[0])], np.float32)
    assert np.array_equal(got, want, equal_nan=True), np.argwhere(~((got == want) | (np.isnan(got) & np.isnan(want))))
    for a, b in [(0, 1), (3, 17), (20, 40)]:  # any rows, the same bits
        assert np.array_equal(lora._product(tall[a:b], wide), got[a:b], equal_nan=True)


def test_fan_in_fan_out_adapter_rows_equal_peft(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): peft's fan_in_fan_out delta is (B @ A).T."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", 5, r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_fc"])
    want = load_model_tensors(merge_and_unload(tmp_path / "base", adapter, tmp_path / "merged"))
    ck = open_input(str(adapter))
    loras = [n for n, h in ck.tensors.items() if isinstance(h, LoraHandle)]
    assert len(loras) == 4 and all(ck.tensors[n].transposed for n in loras)
    for name, h in ck.tensors.items():
        got = read_rows(h, 0, h.shape[0], np.empty(h.numel, np.float32))
        peft_close(got, want[name].float().numpy(), "float32", name)


# ---- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dir", "plus"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_task_arithmetic_equals_merged_models_in_memory(family, tmp_path, dtype, form):
    base, adapters, merged = family[dtype]
    weights = [0.5, 0.3, 0.7]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": ref_spec(form, base, a), "parameters": {"weight": w}} for a, w in zip(adapters.values(), weights)],
        "dtype": dtype,
    }
    got = streammerge_export(recipe, tmp_path)
    b = load_model_tensors(base)
    ms = [load_model_tensors(m) for m in merged.values()]
    want = {n: torch_task_arithmetic(b[n], [m[n] for m in ms], weights).to(b[n].dtype) for n in b}
    assert_identical(got, want)


def test_row_groups_slice_lora_rows(family, tmp_path, monkeypatch):
    """engine/build._merge_row_groups: whole-tensor blocks merged 200 elements at a time, the
    base read raw and the adapters as float32 rows."""
    monkeypatch.setattr("streammerge.engine.build.row_group_elems", lambda workers: 200)
    base, adapters, merged = family["bfloat16"]
    weights = [0.5, 0.3, 0.7]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters.values(), weights)]}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    build(path, tmp_path / "job.zarr", workers=2, progress=False, block_elems=100_000)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    b = load_model_tensors(base)
    ms = [load_model_tensors(m) for m in merged.values()]
    want = {n: torch_task_arithmetic(b[n], [m[n] for m in ms], weights).to(b[n].dtype) for n in b}
    assert_identical(load_model_tensors(tmp_path / "out"), want)


def test_device_path_reads_lora_rows(family, tmp_path):
    """engine/device._upload: LoRA inputs go up as float32 rows (device "cpu" runs the kernels)."""
    base, adapters, merged = family["bfloat16"]
    models = [{"model": str(a), "parameters": {"weight": 0.5}} for a in adapters.values()]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models, "dtype": "bfloat16"}
    got = streammerge_export(recipe, tmp_path / "lora", device="cpu")
    merged_models = [{"model": str(m), "parameters": {"weight": 0.5}} for m in merged.values()]
    want = streammerge_export({**recipe, "models": merged_models}, tmp_path / "merged")
    assert_identical(got, want)


def test_without_base_model_the_adapters_declared_base_is_used(family, tmp_path):
    """linear (no base): each adapter goes on its adapter_config.json's base_model_name_or_path."""
    base, adapters, merged = family["bfloat16"]
    weights = [0.2, 0.5, 0.3]
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters.values(), weights)]}
    got = streammerge_export(recipe, tmp_path)
    ms = [load_model_tensors(m) for m in merged.values()]
    want = {n: torch_linear([m[n] for m in ms], weights).to(torch.bfloat16) for n in ms[0]}
    assert_identical(got, want)


def test_an_unresolvable_declared_base_is_one_line(family, tmp_path):
    _, adapters, _ = family["bfloat16"]
    adapter = copy_adapter(adapters["plain"], tmp_path / "adapter")
    _edit_config(base_model_name_or_path="nobody/no-such-model")(adapter)
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]})
    out = run("build", recipe, "--store", tmp_path / "job.zarr", expect=1).strip()
    assert len(out.splitlines()) == 1 and out.startswith(f"error: {adapter / 'adapter_config.json'}: base_model_name_or_path: nobody/no-such-model"), out
    assert "give the recipe a base_model" in out
    # the recipe's base_model comes first: the adapter's own path is not needed then
    base = family["bfloat16"][0]
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                                "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]})
    run("build", recipe, "--store", tmp_path / "job.zarr")


@pytest.mark.parametrize("form", ["dir", "plus"])
def test_ties_equals_merged_models(family, tmp_path, form):
    base, adapters, merged = family["bfloat16"]
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": ref_spec(form, base, a), "parameters": {"weight": 1.0, "density": 0.4}} for a in adapters.values()],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    got = streammerge_export(recipe, tmp_path / "lora")
    merged_models = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.4}} for m in merged.values()]
    want = streammerge_export({**recipe, "models": merged_models}, tmp_path / "merged")
    assert_identical(got, want)
    b = load_model_tensors(base)
    assert any(not torch.equal(got[n], b[n]) for n in b)


ROUTED = {"mediator": {"route": 1, "rho": 0.2}, "1bit": {"preset": "auto", "lambda": 0.8}}


@pytest.mark.parametrize("method", list(ROUTED))
def test_routing_methods_equal_merged_models(family, tmp_path, method):
    """Analysis, decisions and exports of a routing store are the same with adapters as inputs."""
    base, adapters, merged = family["bfloat16"]

    def recipe(specs):
        models = [{"model": str(s), "parameters": {"task": t}} for s, t in zip(specs, ["chat", "math", "code"])]
        return {"merge_method": method, "base_model": str(base), "models": models, "parameters": ROUTED[method]}

    results = {}
    for kind, specs in (("lora", adapters.values()), ("merged", merged.values())):
        d = tmp_path / kind
        d.mkdir()
        r = write_recipe(d / "r.yaml", recipe(specs))
        run("build", r, "--store", d / "job.zarr", "--block-elements", "1000")
        for variant in ("merged", "task:math"):
            run("export", d / "job.zarr", d / variant.replace(":", "-"), "--variant", variant)
        results[kind] = {
            "analysis": json.loads((d / "job.zarr" / "analysis.json").read_text()),
            "decision": json.loads((d / "job.zarr" / "method.json").read_text()),
            "merged": load_model_tensors(d / "merged"),
            "math": load_model_tensors(d / "task-math"),
        }
    lora, ref = results["lora"], results["merged"]
    assert lora["analysis"] == ref["analysis"] and lora["decision"] == ref["decision"]
    assert_identical(lora["merged"], ref["merged"])
    assert_identical(lora["math"], ref["math"])
    if method != "mediator":
        return
    # mediator's dense part is the average of the three merge_and_unload'd models, computed in memory
    ms = [load_model_tensors(m) for m in merged.values()]
    for name, t in lora["merged"].items():
        assert torch.equal(t, ((ms[0][name].float() + ms[1][name].float() + ms[2][name].float()) / 3).to(t.dtype)), name


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_mergekit_model_plus_lora_recipe(family, tmp_path, dtype):
    """mergekit's own build of a `model+lora` recipe (it merges each adapter with peft into a
    cache first) and streammerge's streamed one are the same bits; so is streammerge's build of
    the recipe with mergekit's mapping form `model: {model: BASE, lora: ADAPTER}`."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, adapters, _ = family[dtype]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in zip(adapters.values(), [0.6, 0.3, 0.5])],
        "dtype": "float32",  # mergekit's compute dtype (without it, bf16 arithmetic): streammerge's
        "out_dtype": dtype,
    }
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    options = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False, lora_merge_cache=str(tmp_path / "cache"))
    run_merge(config, str(tmp_path / "mk"), options)
    assert_matches_peft(streammerge_export(recipe, tmp_path / "sm"), load_model_tensors(tmp_path / "mk"))
    # mergekit's mapping form of the same references: the same merge for both tools
    mapping = {**recipe, "models": [{"model": {"model": str(base), "lora": {"path": str(a)}}, "parameters": m["parameters"]}
                                    for a, m in zip(adapters.values(), recipe["models"])]}
    parse = lambda r: MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(r))).models  # noqa: E731
    assert parse(mapping) == parse(recipe)
    assert_matches_peft(streammerge_export(mapping, tmp_path / "sm-mapping"), load_model_tensors(tmp_path / "mk"))


# ---- resume and bad adapters ------------------------------------------------------------------


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize("changed", ["adapter_config.json", "adapter_model.safetensors"])
def test_resume_refuses_a_changed_adapter(family, tmp_path, changed):
    base, adapters, _ = family["bfloat16"]
    adapter = copy_adapter(adapters["plain"], tmp_path / "adapter")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
    })
    store = tmp_path / "job.zarr"
    run("build", recipe, "--store", store)
    assert "resumed" in run("build", recipe, "--store", store)
    if changed == "adapter_config.json":  # the scale changes: lora_alpha
        _edit_config(lora_alpha=4)(adapter)
    else:
        _edit_tensors(lambda t: t.update({Q_B: t[Q_B] * 2}))(adapter)
    out = run("build", recipe, "--store", store, expect=1)
    assert f"input {adapter}: adapter/{changed} changed since the store was started" in out


def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def _edit_tensors(fn):
    def edit(d: Path):
        tensors = load_file(d / "adapter_model.safetensors")
        fn(tensors)
        save_file(tensors, d / "adapter_model.safetensors")
    return edit


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _pickled(d: Path):
    tensors = load_file(d / "adapter_model.safetensors")
    torch.save(tensors, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()


BAD = {
    # case: (edit of a copy of the "plain" adapter, file the error names, words it must contain)
    "rank": (_edit_config(r=8), "adapter_model.safetensors", "rank mismatch"),
    "shape": (_edit_tensors(lambda t: t.update({Q_A: torch.zeros(4, 32), Q_B: t[Q_B]})), "adapter_model.safetensors",
              "shape mismatch"),
    "absent-module": (_edit_tensors(lambda t: t.update({Q_A.replace("q_proj", "zz_proj"): t[Q_A].clone(),
                                                        Q_B.replace("q_proj", "zz_proj"): t[Q_B].clone()})),
                      "adapter_model.safetensors", "targets model.layers.0.self_attn.zz_proj, which the base model"),
    "architecture": (_edit_config(auto_mapping={"base_model_class": "GPT2LMHeadModel", "parent_library": "x"}), "adapter_config.json",
                     "another architecture"),
    "pickle": (_pickled, "adapter_model.bin", "--allow-pickle"),
    "dora": (_edit_config(use_dora=True), "adapter_config.json", "DoRA"),
    "ia3": (_edit_config(peft_type="IA3"), "adapter_config.json", "only LoRA adapters"),
    "half-pair": (_edit_tensors(lambda t: t.pop(Q_B)), "adapter_model.safetensors", "has lora_A but no lora_B"),
    "pattern": (_edit_config(rank_pattern={"v_proj(": 2}), "adapter_config.json", "not a valid regular expression"),
    "huge-config": (_edit_config(padding="x" * 5_000_000), "adapter_config.json", "larger than the limit"),
    "nonfinite": (_edit_tensors(lambda t: t[Q_B].__setitem__((3, 1), float("nan"))), "adapter_model.safetensors",
                  "non-finite value (nan)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line_naming_the_file(family, tmp_path, case):
    base, adapters, _ = family["bfloat16"]
    edit, fname, words = BAD[case]
    adapter = copy_adapter(adapters["plain"], tmp_path / "adapter")
    edit(adapter)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
    })
    out = run("build", recipe, "--store", tmp_path / "job.zarr", expect=1).strip()
    assert len(out.splitlines()) == 1 and out.startswith("error: "), out
    assert str(adapter / fname) in out, out
    assert words in out, out


def test_a_missing_adapter_is_reported_at_its_recipe_line(family, tmp_path):
    base, _, _ = family["bfloat16"]
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": str(base),
                                                "models": [{"model": f"{base}+{tmp_path / 'nope'}", "parameters": {"weight": 1.0}}]})
    out = run("build", recipe, "--store", tmp_path / "job.zarr", expect=1).strip()
    assert out == f"error: {recipe}:4: models[0].model: {tmp_path / 'nope'}: no such model directory", out


def test_pickled_adapter_with_allow_pickle_equals_safetensors(family, tmp_path):
    base, adapters, merged = family["bfloat16"]
    adapter = copy_adapter(adapters["plain"], tmp_path / "adapter")
    _pickled(adapter)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    got = streammerge_export(recipe, tmp_path / "lora", allow_pickle=True)
    assert_identical(got, load_model_tensors(merged["plain"]))


def test_allow_nonfinite_lets_an_adapters_nan_through(family, tmp_path):
    base, adapters, merged = family["bfloat16"]
    adapter = copy_adapter(adapters["plain"], tmp_path / "adapter")
    _edit_tensors(lambda t: t[Q_B].__setitem__((3, 1), float("nan")))(adapter)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    got = streammerge_export(recipe, tmp_path / "out", allow_nonfinite=True)
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert torch.isnan(q[3]).all() and not torch.isnan(q[:3]).any() and not torch.isnan(q[4:]).any()


def test_local_cluster_reads_adapters(family, tmp_path):
    """Worker processes get LoraHandles (pickled: paths and shapes, no data) and read the same
    bits; the shared-filesystem check covers the adapter files."""
    pytest.importorskip("distributed")
    from helpers import file_digest
    from streammerge.engine.build import build_graph
    from streammerge.engine.job import manifest_for
    from streammerge.engine.scheduler import graph_paths
    from streammerge.plan.planner import make_plan
    from streammerge.recipe import load_recipe

    base, adapters, _ = family["bfloat16"]
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
        "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}} for a in adapters.values()],
    })
    opts = ["--block-elements", "2048", "--workers", "2", "--no-progress"]
    run("build", recipe, "--store", tmp_path / "thr.zarr", "--export", tmp_path / "thr-out", *opts)
    run("build", recipe, "--store", tmp_path / "dist.zarr", "--export", tmp_path / "dist-out", "--cluster", "local:2", *opts)
    assert file_digest(tmp_path / "dist-out") == file_digest(tmp_path / "thr-out")

    plan = make_plan(load_recipe(recipe), block_elems=2048)
    dsk, *_ = build_graph(plan, Store.create(tmp_path / "g.zarr", manifest_for(plan, recipe.read_text())))
    paths = graph_paths(dsk)
    for a in adapters.values():
        assert str((a / "adapter_model.safetensors").resolve()) in paths


def test_extract_lora_output_reads_as_peft_loads_it(family, tmp_path):
    """The two halves of the issue meet: an adapter written by `extract-lora` (rank_pattern,
    embeddings saved whole), as a merge input, is what peft's merge_and_unload makes of it."""
    base, _, _ = family["bfloat16"]
    merged = family[("peft", "bfloat16")]
    adapter = tmp_path / "extracted"
    run("extract-lora", merged["rslora-embed"], "--base", base, "-o", adapter, "--rank", 8, "--sv-epsilon", 1e-3)
    want = load_model_tensors(merge_and_unload(base, adapter, tmp_path / "peft-merged"))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    assert_matches_peft(streammerge_export(recipe, tmp_path / "sm"), want)
    ck = open_input(str(adapter), default_base=str(base))
    assert sum(isinstance(h, LoraHandle) for h in ck.tensors.values()) >= 6
