"""Whole-model parity with mergekit: the same YAML, the same checkpoints, every output tensor.

mergekit (PyPI, a test-only dependency) runs in-process on tiny random checkpoints (Llama with
GQA, Qwen2-style q/k/v biases, tied embeddings; bf16 and fp32). Expectations per method family
follow docs/methods.md, "Agreement with mergekit"; each tolerance has its reason next to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import synth_checkpoints as synth
from helpers import load_model_tensors, resave_as_f64, write_recipe
from streammerge.engine.job import build
from streammerge.export.hf import export_store
from streammerge.store.store import Store

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.mergekit


def run_mergekit(recipe: dict, out, seed=None):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    run_merge(config, str(out), MergeOptions(quiet=True, random_seed=seed, write_model_card=False, copy_tokenizer=False))
    return load_model_tensors(out)


def run_streammerge(recipe: dict, tmp_path, seed=0, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    build(path, tmp_path / "job.zarr", workers=2, seed=seed, progress=False, **kw)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "sm-out")
    return load_model_tensors(tmp_path / "sm-out")


SHAPES = {
    "llama-gqa": synth.ModelShape(hidden=64, intermediate=96, layers=3, heads=8, kv_heads=2, vocab=128),
    "qwen2-bias-tied": synth.ModelShape(hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2, vocab=128, qkv_bias=True, tied_embeddings=True),
}


@pytest.fixture(params=[(s, d) for s in SHAPES for d in ("bfloat16", "float32")], ids=lambda p: f"{p[0]}-{p[1]}")
def family(request, synth_family):
    shape_name, dtype = request.param
    base, fts = synth_family(f"parity-{shape_name}", dtype=dtype, shape=SHAPES[shape_name])
    return base, fts, dtype


def models(fts, **per_model):
    return [{"model": str(f), "parameters": {k: v[i] for k, v in per_model.items()}} for i, f in enumerate(fts)]


def assert_identical(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name].float() - want[name].float()).abs().max()}"


# Elementwise methods, computed in float32 by both tools: bit-identical in the output dtype.
@pytest.mark.parametrize(
    "method,extra",
    [
        ("linear", {"models_fn": lambda b, f: models([b, *f], weight=[0.4, 0.3, 0.2, 0.1])}),
        ("task_arithmetic", {"models_fn": lambda b, f: models(f, weight=[0.5, [0.1, 0.9], 0.3]), "parameters": {"lambda": 0.8}}),
        ("task_arithmetic", {"models_fn": lambda b, f: models(f, weight=[0.5, 0.5, 0.3]), "parameters": {"normalize": True}}),
        ("nearswap", {"models_fn": lambda b, f: models(f[:1]), "parameters": {"t": 0.001}}),
    ],
    ids=["linear", "task_arithmetic-gradient", "task_arithmetic-normalize", "nearswap"],
)
def test_elementwise_methods_bit_identical(family, tmp_path, method, extra):
    base, fts, dtype = family
    recipe = {"merge_method": method, "base_model": str(base), "models": extra["models_fn"](base, fts), "dtype": "float32", "out_dtype": dtype}
    if method == "linear":
        del recipe["base_model"]
    if "parameters" in extra:
        recipe["parameters"] = extra["parameters"]
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    assert_identical(got, want)


def test_task_arithmetic_in_bf16_differs_only_by_mergekits_rounding(synth_family, tmp_path):
    """Without `dtype`, mergekit computes task arithmetic in bf16 (a rounding after every op);
    streammerge computes in float32 and rounds once. The results differ by at most a few bf16
    units in the last place, and streammerge is the one closer to the exact value."""
    base, fts = synth_family("parity-llama-gqa", dtype="bfloat16", shape=SHAPES["llama-gqa"])
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models(fts, weight=[0.5, 0.3, 0.2])}
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    base_t, ft_t = load_model_tensors(base), [load_model_tensors(f) for f in fts]
    for name in want:
        exact = base_t[name].double() + sum(w * (f[name].double() - base_t[name].double()) for w, f in zip([0.5, 0.3, 0.2], ft_t))
        err_ours = (got[name].double() - exact).abs()
        err_mk = (want[name].double() - exact).abs()
        ulp = bf16_spacing(exact)
        assert (err_ours <= ulp).all(), name  # float32 result rounded once: within one unit
        assert err_ours.sum() <= err_mk.sum(), name  # and closer to exact than mergekit overall
        # mergekit rounds every intermediate (each delta, product and sum) to bf16, so its error
        # is a few units of the operands' magnitude, not of the (possibly smaller) result.
        operand = torch.stack([base_t[name].double().abs()] + [f[name].double().abs() for f in ft_t]).amax(0)
        assert ((got[name].double() - want[name].double()).abs() <= 4 * bf16_spacing(operand)).all(), name


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent bf16 values around x (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def test_magnitude_topk_methods_identical_except_threshold_ties(family, tmp_path):
    base, fts, dtype = family
    for method, per_model in [
        ("ties", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.3, 0.7]}),
        ("breadcrumbs_ties", {"weight": [0.5, 0.3, 0.2], "density": [0.8, 0.7, 0.9], "gamma": [0.01, 0.05, 0.02]}),
    ]:
        recipe = {"merge_method": method, "base_model": str(base), "models": models(fts, **per_model), "dtype": "float32", "out_dtype": dtype}
        want = run_mergekit(recipe, tmp_path / f"mk-{method}")
        got = run_streammerge(recipe, tmp_path / method)
        base_t = load_model_tensors(base)
        ft_t = [load_model_tensors(f) for f in fts]
        for name in want:
            diff = (got[name] != want[name]).flatten()
            # Entries may differ only where a task vector's magnitude is tied with another entry's
            # (mergekit's order among equal magnitudes at a cut is unspecified; ours is by flat index).
            tied = torch.zeros_like(diff)
            for f in ft_t:
                mag = (f[name].float() - base_t[name].float()).abs().flatten()
                _, inverse, counts = torch.unique(mag, return_inverse=True, return_counts=True)
                tied |= counts[inverse] > 1
            assert not (diff & ~tied).any(), f"{method} {name}: {int((diff & ~tied).sum())} untied entries differ"


def test_passthrough_layer_stacking_and_slices(family, tmp_path):
    base, fts, dtype = family
    import json

    from transformers import AutoConfig

    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(fts[1]), "layer_range": [1, 3]}]},
        ],
    }
    got = run_streammerge(recipe, tmp_path)
    cfg = json.loads((tmp_path / "sm-out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert AutoConfig.from_pretrained(tmp_path / "sm-out").num_hidden_layers == 4
    # Independent reference: the source tensors, renumbered.
    a, b = load_model_tensors(fts[0]), load_model_tensors(fts[1])
    stacked = {k: v for k, v in a.items() if ".layers." not in k and "embed" in k}  # from the first slice
    stacked.update({k: v for k, v in b.items() if ".layers." not in k and "embed" not in k})  # from the last
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for k, v in src.items():
            if f".layers.{layer}." in k:
                stacked[k.replace(f".layers.{layer}.", f".layers.{out_layer}.")] = v
    assert_identical(got, stacked)
    if json.loads((Path(fts[0]) / "config.json").read_text())["model_type"] == "llama":
        # mergekit 0.1.5 writes a Qwen2 layer-stacking config that transformers refuses
        # (3-entry layer_types for 4 layers), so it is compared on Llama only.
        assert_identical(got, run_mergekit(recipe, tmp_path / "mk"))


def test_slerp_with_layer_gradient(family, tmp_path):
    base, fts, dtype = family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]}, {"model": str(fts[0]), "layer_range": [0, 3]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]},
        "dtype": "float32",
        "out_dtype": dtype,
    }
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    assert set(got) == set(want)
    a, b = load_model_tensors(base), load_model_tensors(fts[0])
    for name in want:
        # Tensor-wide dot products are summed in another order and sin/acos may differ by an
        # ulp (see test_methods_slerp.py): at most 8 float32 units of |a| + |b|, plus one unit
        # of the output dtype when it is narrower.
        g, w = got[name].double(), want[name].double()
        tol = 8 * 2.0**-24 * (a[name].double().abs() + b[name].double().abs())
        if dtype == "bfloat16":
            tol = tol + bf16_spacing(w)
        assert ((g - w).abs() <= tol).all(), name


def test_differing_vocab_sizes_keep_common_rows(synth_family, tmp_path):
    shape = SHAPES["llama-gqa"]
    root = tmp_path / "m"
    base = synth.make_base(root / "base", shape, dtype="float32")
    ft_big = synth.make_finetune(base, root / "big", seed=3, vocab=shape.vocab + 16)
    ft = synth.make_finetune(base, root / "ft", seed=4)
    recipe = {"merge_method": "linear", "models": models([ft, ft_big], weight=[0.5, 0.5]), "dtype": "float32"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = build(path, tmp_path / "job.zarr", progress=False)
    assert any("vocabulary sizes differ" in w for w in result.warnings)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    got = load_model_tensors(tmp_path / "out")
    a, b = load_model_tensors(ft), load_model_tensors(ft_big)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == shape.vocab
        want = (a[name] * 0.5 + b[name][: shape.vocab] * 0.5) / 1.0
        np.testing.assert_array_equal(got[name].numpy(), want.numpy())
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == shape.vocab


# mergekit takes any t and any weights for the spherical methods: t outside [0, 1] and negative
# weights extrapolate (nuslerp's weights summing to 0 give t = 0.5), and so does streammerge.
@pytest.mark.parametrize(
    "method,with_base,models_fn,parameters",
    [
        ("slerp", True, lambda b, f: models([b, f[0]]), {"t": -0.3}),
        ("slerp", True, lambda b, f: models([b, f[0]]), {"t": [{"filter": "mlp", "value": [1.4, 0.5, -0.2]}, {"value": 1.25}]}),
        ("nuslerp", True, lambda b, f: models(f[:2], weight=[1.5, -0.5]), {}),
        ("nuslerp", False, lambda b, f: models(f[:2], weight=[1.0, -1.0]), {}),
        ("multislerp", True, lambda b, f: models(f, weight=[1.0, -0.4, 0.6]), {}),
    ],
    ids=["slerp-t-below-0", "slerp-gradient-past-1", "nuslerp-negative-weight", "nuslerp-weights-sum-to-0", "multislerp-negative-weight"],
)
def test_spherical_methods_extrapolate_as_mergekit(synth_family, tmp_path, method, with_base, models_fn, parameters):
    base, fts = synth_family("parity-llama-gqa", dtype="float32", shape=SHAPES["llama-gqa"])
    recipe = {"merge_method": method, "models": models_fn(base, fts), "dtype": "float32", "parameters": parameters}
    if with_base:
        recipe["base_model"] = str(base)
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    assert set(got) == set(want)
    inputs = [load_model_tensors(m) for m in [base, *fts]]
    for name in want:
        # sums in another order, an ulp of sin/acos apart (as test_slerp_with_layer_gradient):
        # 8 float32 units of the inputs' magnitudes, times the largest coefficient here (2.5)
        scale = sum(x[name].double().abs() for x in inputs)
        diff = (got[name].double() - want[name].double()).abs()
        assert (diff <= 20 * 2.0**-24 * scale).all(), f"{name}: {(diff / scale).max() * 2**24:.1f} units"


@pytest.fixture(scope="module")
def f64_family(tmp_path_factory):
    """A float32 family saved as F64, off the float32 grid (reading must round, as mergekit's
    cast to float32 does)."""
    root = tmp_path_factory.mktemp("f64")
    base, fts = synth.make_family(root, SHAPES["llama-gqa"], n_finetunes=2, dtype="float32")
    resave_as_f64([base, *fts])
    return base, fts


@pytest.mark.parametrize(
    "method,dtypes",
    [("task_arithmetic", {"dtype": "float32"}), ("linear", {"dtype": "float32", "out_dtype": "bfloat16"}), ("ties", {"dtype": "float32"})],
)
def test_f64_inputs_merge_as_mergekit_casts_them(f64_family, tmp_path, method, dtypes):
    """F64 checkpoints are read; with mergekit's `dtype: float32` both tools cast to float32
    and compute there: the same bits."""
    base, fts = f64_family
    recipe = {"merge_method": method, "base_model": str(base), "models": models(fts, weight=[0.6, 0.3], density=[0.5, 0.7]), **dtypes}
    if method == "linear":
        recipe["models"] = models([base, *fts], weight=[0.5, 0.3, 0.2])
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    assert {v.dtype for v in got.values()} == {getattr(torch, dtypes.get("out_dtype", dtypes["dtype"]))}
    assert_identical(got, want)


def test_f64_inputs_without_a_dtype_give_f64_as_mergekit(f64_family, tmp_path):
    """No dtype: mergekit computes in float64 and writes F64. streammerge writes F64 too,
    computed in float32: equal within float32 rounding of the inputs' magnitudes."""
    base, fts = f64_family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models(fts, weight=[0.6, 0.3])}
    want = run_mergekit(recipe, tmp_path / "mk")
    got = run_streammerge(recipe, tmp_path)
    assert set(got) == set(want) and {v.dtype for v in got.values()} == {torch.float64}
    inputs = [load_model_tensors(m) for m in [base, *fts]]
    for name in want:
        scale = sum(x[name].abs() for x in inputs)
        assert ((got[name] - want[name]).abs() <= 4 * 2.0**-24 * scale).all(), name
