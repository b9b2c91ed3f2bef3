"""`modules:` recipes and per-stack layer numbering on vision-language checkpoints (issue #17).

The checkpoints are tiny LLaVA and Qwen2-VL models made and saved by transformers' own classes
(a base, and fine-tunes = base + a Gaussian delta per tensor). References: an in-memory torch
computation per tensor (task arithmetic with each stack's own gradient position t), mergekit's
output where mergekit 0.1.5 runs the same recipe (Qwen2-VL, which it has an architecture file
for), and transformers loading the result.
"""

from __future__ import annotations

import json
import re
import zlib

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import gradient, load_model_tensors, write_recipe
from streammerge.cli import main as cli
from streammerge.engine.job import build
from streammerge.errors import RecipeError
from streammerge.export.hf import export_store
from streammerge.plan.planner import make_plan
from streammerge.recipe import load_recipe
from streammerge.store.store import Store

transformers = pytest.importorskip("transformers")

LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")
VISION = re.compile(r"(?:^|\.)(?:vision_tower|visual)\.(?!merger)")  # saved and runtime names
PROJECTOR = re.compile(r"(?:^|\.)(?:multi_modal_projector|visual\.merger)\.")


def llava_config(vision_hidden=32):
    return transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
        image_token_index=120,
    )


def qwen2vl_config():
    return transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=150, video_token_id=151, vision_start_token_id=152,
    )


def save_family(root, cls, config, deltas, n_finetunes=2):
    """root/base and root/ft1..ftN saved by `cls.save_pretrained`; ft i = base + deltas(i, name, tensor)."""
    torch.manual_seed(0)
    model = cls(config).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base")
    fts = []
    for i in range(1, n_finetunes + 1):
        model.load_state_dict({k: v + deltas(i, k, v) for k, v in base_state.items()})
        model.save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
    if cls is transformers.Qwen2VLForConditionalGeneration:
        # Qwen2-VL's released configs also give the decoder's layer count at the top level, where
        # mergekit 0.1.5's architecture file reads it; transformers 5 writes it in text_config only.
        for d in [root / "base", *fts]:
            cfg = json.loads((d / "config.json").read_text())
            cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"]
            (d / "config.json").write_text(json.dumps(cfg))
    return root / "base", fts


def gaussian(i, name, v):
    g = torch.Generator().manual_seed(zlib.crc32(f"{i}/{name}".encode()))
    return 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("llava"), transformers.LlavaForConditionalGeneration, llava_config(), gaussian)


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("qwen2vl"), transformers.Qwen2VLForConditionalGeneration, qwen2vl_config(), gaussian)


def run_streammerge(recipe: dict, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = build(path, tmp_path / "job.zarr", workers=2, progress=False)
    export_store(Store.open(tmp_path / "job.zarr"), tmp_path / "out")
    return load_model_tensors(tmp_path / "out"), result.warnings


def run_mergekit(recipe: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    run_merge(config, str(out), MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))
    return load_model_tensors(out)


def stack(name: str) -> tuple[str, int]:
    """(module, its layer count) of a tensor of these tiny models: 3 decoder and 2 vision layers."""
    if PROJECTOR.search(name):
        return "multi_modal_projector", 0
    if VISION.search(name):
        return "vision_tower", 2
    return "text_decoder", 3


def t_of(name: str) -> float:
    """mergekit's gradient position: the layer within the tensor's own stack, 0 outside layers."""
    m = LAYER.search(name)
    _, n = stack(name)
    return int(m.group(1)) / (n - 1) if m else 0.0


def modules_recipe(base, fts):
    """Task arithmetic with other models, weights (gradients over each stack) and lambda per module."""
    ft1, ft2 = map(str, fts)
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "dtype": "float32",
        "parameters": {"lambda": 0.5},
        "modules": {
            "text_decoder": {
                "models": [{"model": ft1, "parameters": {"weight": [0.2, 1.0]}}, {"model": ft2, "parameters": {"weight": 0.5}}],
                "parameters": {"lambda": 0.9},
            },
            # 2 layers: t = 0, 1 (numbered as the decoder's 3 layers, layer 1 would get t = 0.5)
            "vision_tower": {"models": [{"model": ft1, "parameters": {"weight": [1.0, 0.0]}}]},
            "multi_modal_projector": {"models": [{"model": ft2, "parameters": {"weight": 0.7}}]},
        },
    }


def reference(recipe: dict, base_dir) -> dict[str, torch.Tensor]:
    """Task arithmetic per tensor in float32 torch (mergekit's order of operations), each tensor
    with its module's models and parameters at its own stack's t."""
    base = load_model_tensors(base_dir)
    loaded = {}
    out = {}
    for name, b in base.items():
        module = recipe["modules"][stack(name)[0]]
        lam = (module.get("parameters") or recipe["parameters"])["lambda"]
        acc = torch.zeros_like(b, dtype=torch.float32)
        for entry in module["models"]:
            ft = loaded.setdefault(entry["model"], load_model_tensors(entry["model"]))
            acc += (ft[name].float() - b.float()) * gradient(entry["parameters"]["weight"], t_of(name))
        out[name] = (b.float() + acc * lam).to(b.dtype)
    return out


def assert_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name].float() - want[name].float()).abs().max()}"


def assert_loads(cls, out_dir, got: dict, pairs: dict[str, str]):
    """transformers loads the merged model with every weight from the files (none missing or
    unexpected), `pairs` (its state_dict name: the checkpoint's name) holding the merged values."""
    model, info = cls.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for runtime, saved in pairs.items():
        assert torch.equal(state[runtime], got[saved]), runtime
    return model.eval()


def test_llava_modules_recipe_equals_reference_and_loads(llava, tmp_path):
    base, fts = llava
    recipe = modules_recipe(base, fts)
    got, warnings = run_streammerge(recipe, tmp_path)
    assert warnings == []
    assert_equal(got, reference(recipe, base))
    # the vision tower's last layer took weight 0 (its own t = 1): exactly the base's
    b = load_model_tensors(base)
    assert torch.equal(got["vision_tower.encoder.layers.1.mlp.fc1.weight"], b["vision_tower.encoder.layers.1.mlp.fc1.weight"])
    model = assert_loads(transformers.LlavaForConditionalGeneration, tmp_path / "out", got, {
        "model.vision_tower.encoder.layers.1.self_attn.q_proj.weight": "vision_tower.encoder.layers.1.self_attn.q_proj.weight",
        "model.language_model.layers.2.mlp.down_proj.weight": "language_model.model.layers.2.mlp.down_proj.weight",
        "model.multi_modal_projector.linear_2.weight": "multi_modal_projector.linear_2.weight",
        "lm_head.weight": "language_model.lm_head.weight",
    })
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 17]])).logits).all()


@pytest.mark.mergekit
def test_qwen2vl_modules_recipe_equals_mergekit_and_reference(qwen2vl, tmp_path):
    pytest.importorskip("mergekit")
    base, fts = qwen2vl
    recipe = modules_recipe(base, fts)
    got, warnings = run_streammerge(recipe, tmp_path)
    assert warnings == []
    assert_equal(got, run_mergekit(recipe, tmp_path / "mk"))
    assert_equal(got, reference(recipe, base))
    assert_loads(transformers.Qwen2VLForConditionalGeneration, tmp_path / "out", got, {
        "model.visual.blocks.1.attn.qkv.weight": "visual.blocks.1.attn.qkv.weight",
        "model.visual.merger.mlp.2.weight": "visual.merger.mlp.2.weight",
        "model.language_model.layers.2.mlp.up_proj.weight": "model.layers.2.mlp.up_proj.weight",
    })


@pytest.mark.mergekit
def test_qwen2vl_models_recipe_gradient_runs_over_each_stack(qwen2vl, tmp_path):
    """A plain `models:` recipe: mergekit plans it per module too, so a gradient spans each
    stack's own layers (vision layer 1 is the tower's last, t = 1)."""
    pytest.importorskip("mergekit")
    base, fts = qwen2vl
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(fts[0]), "parameters": {"weight": [0.0, 1.0]}}],
    }
    got, _ = run_streammerge(recipe, tmp_path)
    want = run_mergekit(recipe, tmp_path / "mk")
    # mergekit 0.1.5's qwen2_vl.json lists the projector's MLP as 2 "layers" whose names have no
    # layer index: each tensor is planned at t = 0 and again at t = 1, and the last write wins.
    # Outside any layer, t = 0 here (as for every other tensor outside the layers).
    quirk = {n for n in want if n.startswith("visual.merger.mlp.")}
    assert_equal({n: v for n, v in got.items() if n not in quirk}, {n: v for n, v in want.items() if n not in quirk})
    b = load_model_tensors(base)
    assert quirk and all(torch.equal(got[n], b[n]) for n in quirk)  # weight 0 at t = 0
    ft = load_model_tensors(fts[0])
    assert torch.equal(got["visual.blocks.1.mlp.fc2.weight"], ft["visual.blocks.1.mlp.fc2.weight"])  # t = 1: weight 1


def test_llava_module_slices_stack_decoder_layers(llava, tmp_path):
    """Slices inside a module stack that module's layers only; config.json's text_config says
    how many the decoder has now, and transformers loads the model."""
    base, fts = llava
    recipe = {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {"slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(fts[0]), "layer_range": [1, 3]}]},
            ]},
            "vision_tower": {"models": [{"model": str(fts[1])}]},
            "multi_modal_projector": {"models": [{"model": str(fts[0])}]},
        },
    }
    got, _ = run_streammerge(recipe, tmp_path)
    res = CliRunner().invoke(cli, ["plan", str(tmp_path / "recipe.yaml"), "--json"])
    plan = json.loads(res.output)
    assert plan["stacks"] == {"text_decoder": 4, "vision_tower": 2, "multi_modal_projector": 0}
    assert plan["modules"] == {"text_decoder": [str(base), str(fts[0])], "vision_tower": [str(fts[1])],
                               "multi_modal_projector": [str(fts[0])]}
    b, f1, f2 = load_model_tensors(base), load_model_tensors(fts[0]), load_model_tensors(fts[1])
    for name, v in got.items():
        module = stack(name)[0]
        m = LAYER.search(name)
        if module == "vision_tower":
            want = f2[name]
        elif module == "multi_modal_projector":
            want = f1[name]
        elif m is None:  # embeddings from the first slice, final norm and lm_head from the last
            want = b[name] if "embed" in name else f1[name]
        else:
            i = int(m.group(1))
            want = b[name] if i < 2 else f1[name.replace(f"layers.{i}.", f"layers.{i - 1}.")]
        assert torch.equal(v, want), name
    assert sum(1 for n in got if n.endswith("layers.3.mlp.up_proj.weight")) == 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4 and cfg["vision_config"]["num_hidden_layers"] == 2
    model = assert_loads(transformers.LlavaForConditionalGeneration, tmp_path / "out", got, {
        "model.language_model.layers.3.self_attn.o_proj.weight": "language_model.model.layers.3.self_attn.o_proj.weight",
    })
    assert len(model.model.language_model.layers) == 4


def test_unlisted_module_is_not_written_with_a_warning(qwen2vl, tmp_path):
    base, fts = qwen2vl
    recipe = {"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}}]}}}
    plan = make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert {stack(j.name)[0] for j in plan.jobs} == {"text_decoder"}
    assert any("vision_tower" in w and "not written" in w for w in plan.warnings)


@pytest.mark.parametrize(
    "recipe_fn,message",
    [
        (lambda b, f: {"merge_method": "linear", "modules": {"vision": {"models": [{"model": str(f[0]), "parameters": {"weight": 1.0}}]}}},
         r"recipe\.yaml:3: modules\.vision: .*ft1 has no module 'vision' \(its modules: text_decoder, vision_tower, multi_modal_projector\)"),
        (lambda b, f: {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(b), "layer_range": [0, 2]}]}]},
         r"recipe\.yaml:\d+: slices: .*base has several modules .* slice them under `modules:`"),
        (lambda b, f: {"merge_method": "mediator", "base_model": str(b), "modules": {"text_decoder": {"models": [{"model": str(f[0])}]}}},
         r"recipe\.yaml:\d+: modules: mediator routes every stack by itself from one `models:` list"),
    ],
    ids=["unknown-module", "top-level-slices", "routing-method"],
)
def test_modules_refused_with_the_recipe_line(llava, tmp_path, recipe_fn, message):
    base, fts = llava
    with pytest.raises(RecipeError, match=message):
        make_plan(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe_fn(base, fts))))


# ---- Mediator: decoder and vision layers are scored and routed apart ------------------------


def conflicting(i, name, v):
    """ft2's delta is ft1's (no conflict) except: in decoder layer 1 it is opposite on half the
    entries (d = 0.25), in vision layer 0 opposite everywhere (d = 0.5). The vision tower is
    wider than the decoder, so summed into decoder layer 0 it would outrank decoder layer 1."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    d = 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    if i == 1:
        return d
    m = LAYER.search(name)
    module = stack(name)[0]
    if m and module == "vision_tower" and m.group(1) == "0":
        return -d
    if m and module == "text_decoder" and m.group(1) == "1":
        flip = torch.ones(d.numel())
        flip[::2] = -1
        return d * flip.reshape(d.shape)
    return d


def brute_conflict(base, fts, names):
    """d per layer of the given tensors (2 tasks; elected sign + where the sum is >= 0)."""
    count, size = {}, {}
    for name in names:
        ts = torch.stack([f[name].double() - base[name].double() for f in fts])
        elected = torch.where(ts.sum(0) >= 0, 1.0, -1.0)
        i = int(LAYER.search(name).group(1))
        count[i] = count.get(i, 0) + int(((ts != 0) & (torch.sign(ts) != elected)).sum())
        size[i] = size.get(i, 0) + ts[0].numel()
    return [count[i] / (len(fts) * size[i]) for i in sorted(count)]


def test_mediator_scores_and_routes_decoder_and_vision_layers_apart(tmp_path):
    base, fts = save_family(tmp_path / "m", transformers.LlavaForConditionalGeneration, llava_config(vision_hidden=64), conflicting)
    recipe = {
        "merge_method": "mediator",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"task": t}} for f, t in zip(fts, ["chat", "math"])],
        "parameters": {"route": 1, "rho": 0.2},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe)
    build(path, tmp_path / "med.zarr", workers=2, progress=False)
    b, fs = load_model_tensors(base), [load_model_tensors(f) for f in fts]
    layered = [n for n in b if LAYER.search(n)]
    decoder = [n for n in layered if stack(n)[0] == "text_decoder"]
    vision = [n for n in layered if stack(n)[0] == "vision_tower"]

    analysis = json.loads((tmp_path / "med.zarr" / "analysis.json").read_text())
    assert [r["layer"] for r in analysis["layers"]] == [0, 1, 2]
    assert list(analysis["stacks"]) == ["vision_tower"]
    assert [r["layer"] for r in analysis["stacks"]["vision_tower"]["layers"]] == [0, 1]
    want_decoder, want_vision = brute_conflict(b, fs, decoder), brute_conflict(b, fs, vision)
    assert [round(r["d"], 12) for r in analysis["layers"]] == [round(d, 12) for d in want_decoder]
    assert [round(r["d"], 12) for r in analysis["stacks"]["vision_tower"]["layers"]] == [round(d, 12) for d in want_vision]
    # summed together, vision layer 0 would make decoder layer 0 the most conflicting one
    assert brute_conflict(b, fs, decoder + vision)[0] > want_decoder[1]

    decision = json.loads((tmp_path / "med.zarr" / "method.json").read_text())
    assert decision["routed_layers"] == [1]
    assert decision["stacks"]["vision_tower"]["routed_layers"] == [0]
    experts = {j["key"].removeprefix("experts/") for j in Store.open(tmp_path / "med.zarr").jobs if j["stage"] == "experts"}
    assert experts == {n for n in decoder if ".layers.1." in n} | {n for n in vision if ".layers.0." in n}

    # the report lists the stacks apart: the decoder's rows, then the vision tower's
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "med.zarr"), "--json", "-o", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)["summary"]
    assert [r["routed"] for r in summary["layers"]] == [False, True, False]
    assert [r["routed"] for r in summary["stacks"]["vision_tower"]["layers"]] == [True, False]
    assert summary["warnings"] == []
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.index("<h3>text_decoder</h3>") < html.index("<h3>vision_tower: its own 2 layers")


def test_routing_line_counts_each_stacks_routed_layers():
    from streammerge.routing.decision import forced

    method = {"method": "mediator", "routed_layers": [1], "stacks": {"vision_tower": {"routed_layers": [0]}}}
    assert forced("math", ["chat", "math"]).applied(method) == "forced math: D + S_math on 1 routed layer(s) + 1 vision_tower layer(s)"
