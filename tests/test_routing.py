"""Inference for routing stores: router fitting, routing decisions, the routed model's weights
and logits against `export --variant task:NAME`, weighted Mediator merges against the formula,
the CLI (router fit / show, generate).

References are computed independently: exports loaded with transformers / the safetensors
library, the routed export's documented index / value tensors, and torch arithmetic here.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import synth_checkpoints as synth
from helpers import load_model_tensors, write_recipe
from streammerge.cli import main as cli

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256)
TASKS = ["chat", "math", "code"]
# CI runs on CPU; STREAMMERGE_TEST_DEVICE=cuda runs the same checks on a GPU (bit-exactness included)
DEVICE = os.environ.get("STREAMMERGE_TEST_DEVICE", "cpu")
# Separable prompts: each task writes "words" over its own characters only; "general" text (a
# router's background class, of none of the tasks) over characters of its own too.
ALPHABETS = {"chat": "abcdefghijk", "math": "0123456789+*=", "code": "{}()[];<>_#", "general": "LMNOPQRSTUVWXYZ"}


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


def prompts_for(task: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{task}-{seed}")
    chars = ALPHABETS[task]
    return [
        " ".join("".join(rng.choice(chars) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(3, 9))) for _ in range(n)
    ]


def write_jsonl(path, prompts, field="prompt"):
    path.write_text("".join(json.dumps({field: p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    base, fts = synth.make_family(root, SHAPE, n_finetunes=3, dtype="bfloat16", delta_scale=0.004)

    def build(name, method, **params):
        r = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"task": t}} for f, t in zip(fts, TASKS)],
            "parameters": params,
        }
        store = root / f"{name}.zarr"
        run("build", write_recipe(root / f"{name}.yaml", r), "--store", store, "--block-elements", "1000")
        return store

    return {
        "root": root,
        # two routed layers; blocks of ~15 rows, so sparse offsets cross block boundaries
        "mediator": build("med", "mediator", route=2, rho=0.1),
        # 1-bit everywhere (matrices, 1-D norms as per-block blobs, embeddings), lambda != 1
        "1bit": build("bit", "1bit", preset="uniform", **{"lambda": 0.8}),
    }


@pytest.fixture(scope="module")
def routers(stores):
    """A router fitted on each store (CLI for mediator, Python API with logreg for 1bit)."""
    from streammerge.routing import fit_router

    root = stores["root"]
    specs = []
    for t in TASKS:
        specs += ["--prompts", f"{t}={write_jsonl(root / f'{t}.jsonl', prompts_for(t, 50, 0))}"]
    out = run("router", "fit", stores["mediator"], *specs, "--device", DEVICE, "--epochs", "30")
    rep_1bit = fit_router(
        stores["1bit"], [(t, prompts_for(t, 50, 0)) for t in TASKS], classifier="logreg", device=DEVICE, seed=3
    )
    return {"cli_output": out, "1bit": rep_1bit}


# ---- router fitting -------------------------------------------------------------------------


def test_router_fit_reaches_accuracy_and_saves_safetensors(stores, routers):
    out = routers["cli_output"]
    assert "held-out accuracy" in out and "saved" in out
    d = stores["mediator"] / "inference" / "router"
    meta = json.loads((d / "router.json").read_text())
    assert meta["classifier"] == "mlp" and meta["tasks"] == TASKS and meta["dim"] == SHAPE.hidden
    assert meta["n_heldout"] == 30 and meta["heldout"]["accuracy"] >= 0.9, meta["heldout"]
    assert sorted(p.name for p in d.iterdir()) == ["router.json", "router.safetensors"]  # no pickle
    from safetensors import safe_open

    with safe_open(str(d / "router.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"feature_mean", "feature_std", "net.0.weight", "net.1.running_mean", "net.8.weight"} <= keys
    assert (stores["mediator"] / "inference" / "merged" / "config.json").is_file()  # the merged export cache

    rep = routers["1bit"]
    assert rep["classifier"] == "logreg" and rep["heldout"]["accuracy"] >= 0.9, rep["heldout"]
    # new prompts, never seen in training, are routed to their task
    from streammerge.routing import RoutedModel

    rm = RoutedModel.from_store(stores["1bit"], device=DEVICE)
    fresh = [(t, p) for t in TASKS for p in prompts_for(t, 10, 99)]
    decisions = rm.route([p for _, p in fresh])
    acc = np.mean([d.task == t for (t, _), d in zip(fresh, decisions)])
    assert acc >= 0.9, acc


def test_router_fit_is_deterministic(stores, tmp_path):
    from streammerge.routing import fit_router

    copy = tmp_path / "med.zarr"
    shutil.copytree(stores["mediator"], copy)
    prompts = [(t, prompts_for(t, 12, 5)) for t in TASKS]
    blobs = []
    for _ in range(2):
        rep = fit_router(copy, prompts, classifier="mlp", epochs=5, device=DEVICE, seed=7)
        blobs.append((Path(rep["path"]) / "router.safetensors").read_bytes())
    assert blobs[0] == blobs[1]
    assert rep["n_train"] + rep["n_heldout"] == 36


def test_router_fit_errors(stores, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": "fine"}\n{"prompt": 3}\n')
    out = run("router", "fit", stores["mediator"], "--prompts", f"math={bad}", expect=1)
    assert out.strip() == f"error: {bad}:4: 'prompt' must be a string, got int"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
    out = run("router", "fit", stores["mediator"], "--prompts", f"math={bad}", expect=1)
    assert out.startswith(f"error: {bad}:2: not valid JSON") and out.count("\n") == 1
    bad.write_text('{"question": "where is the prompt?"}\n')
    out = run("router", "fit", stores["mediator"], "--prompts", f"math={bad}", expect=1)
    assert f"{bad}:1: no 'prompt' (or 'text') field" in out
    good = write_jsonl(tmp_path / "ok.jsonl", ["a b c"], field="text")
    out = run("router", "fit", stores["mediator"], "--prompts", f"poetry={good}", expect=1)
    assert "'poetry' is not a task" in out and "chat, math, code" in out
    out = run("router", "fit", stores["mediator"], "--prompts", str(good), expect=1)
    assert "expected TASK=FILE" in out


# ---- routing decisions ------------------------------------------------------------------------


def test_route_decision_formula():
    from streammerge.routing import normalized_entropy, route_decision

    p = [0.5, 0.3, 0.2]
    h = -sum(x * math.log(x) for x in p) / math.log(3)
    assert normalized_entropy(p) == pytest.approx(h)
    d = route_decision(p, TASKS, "mediator", eta=0.5, top_m=0)
    assert d.mode == "mix" and dict(d.weights) == pytest.approx(dict(zip(TASKS, p)))
    d = route_decision(p, TASKS, "mediator", eta=0.5, top_m=2)
    assert d.mode == "mix" and dict(d.weights) == pytest.approx({"chat": 0.625, "math": 0.375})
    d = route_decision(p, TASKS, "mediator", eta=0.95, top_m=2)  # h = 0.937 <= eta: top-1
    assert d.mode == "top1" and d.task == "chat" and d.entropy == pytest.approx(h)
    d = route_decision([0.2, 0.2, 0.6], TASKS, "1bit")  # 1bit: always top-1, whatever the entropy
    assert d.mode == "top1" and d.task == "code"
    assert route_decision([1 / 3] * 3, TASKS, "mediator", eta=0.99).mode == "mix"  # uniform: H = 1
    assert route_decision([1.0, 0.0, 0.0], TASKS, "mediator", eta=0.0).task == "chat"  # H = 0 <= 0
    assert route_decision([0.4, 0.4, 0.2], TASKS, "mediator", eta=0.5, top_m=1).task == "chat"  # tie: first task
    assert route_decision([1.0], ["only"], "mediator", eta=0.0).task == "only"  # N = 1: H = 0
    assert route_decision(p, TASKS, "mediator", 0.5, 2).key == route_decision([0.5, 0.3, 0.2], TASKS, "mediator", 0.5, 2).key


def test_route_decision_with_a_background_class():
    """The last probability is "none of the tasks": its expert is the merged model (S = 0), and
    it counts like a task's in the entropy, the top-m and the renormalisation."""
    from streammerge.routing import normalized_entropy, route_decision
    from streammerge.routing.decision import NONE

    p = [0.3, 0.2, 0.1, 0.4]  # chat, math, code, none
    h = -sum(x * math.log(x) for x in p) / math.log(4)
    d = route_decision(p, TASKS, "mediator", eta=0.5, background=True)
    assert d.mode == "mix" and d.entropy == pytest.approx(h) == pytest.approx(normalized_entropy(p))
    assert dict(d.weights) == pytest.approx({"chat": 0.3, "math": 0.2, "code": 0.1})  # the rest, 0.4: D alone
    assert dict(d.probs) == pytest.approx(dict(zip([*TASKS, NONE], p)))
    d = route_decision(p, TASKS, "mediator", eta=0.5, top_m=2, background=True)  # none and chat: chat 0.3 / 0.7
    assert d.mode == "mix" and dict(d.weights) == pytest.approx({"chat": 0.3 / 0.7})
    d = route_decision(p, TASKS, "mediator", eta=0.99, background=True)  # confident enough: top-1 is none
    assert d.mode == "static" and d.key == ("static",) and "none of the tasks" in d.applied({"method": "mediator"})
    assert route_decision(p, TASKS, "mediator", eta=0.5, top_m=1, background=True).mode == "static"
    assert route_decision([0.7, 0.1, 0.1, 0.1], TASKS, "mediator", eta=0.99, background=True).task == "chat"
    assert route_decision(p, TASKS, "1bit", background=True).mode == "static"  # 1bit: top-1, none -> the merged model
    assert route_decision([0.2, 0.5, 0.1, 0.2], TASKS, "1bit", background=True).task == "math"
    with pytest.raises(ValueError, match="3 tasks and the background class"):
        route_decision([0.5, 0.3, 0.2], TASKS, "mediator", background=True)


# ---- the routed model's weights -------------------------------------------------------------


def _ids(rm, prompt):
    from streammerge.routing.runtime import encode_for_generation

    return torch.tensor([encode_for_generation(rm.tokenizer, [prompt])[0]], device=rm.device)


@pytest.mark.parametrize("method", ["mediator", "1bit"])
def test_routed_logits_equal_task_export(stores, routers, method, tmp_path):
    """A prompt routed to task k runs `export --variant task:k`: the runtime adds task k's delta
    to the shared products in float32, the export rounds the same weights to bf16 once, so the
    logits agree within the runtime's stated tolerance (deltas.EXPORT_REL of the largest |logit|)
    and (Mediator) greedy decoding gives the export's tokens. No parameter is copied or swapped."""
    from transformers import AutoModelForCausalLM

    from streammerge.routing import RoutedModel
    from streammerge.routing.deltas import EXPORT_REL

    store = stores[method]
    rm = RoutedModel.from_store(store, device=DEVICE, dtype="float32", eta=1.0)  # eta 1: Mediator always top-1
    routed_names = set(rm.runtime.tensors)
    n_params = len(dict(rm.model.named_parameters()))
    # Mediator: the tensors of the 2 routed layers; 1bit uniform: every tensor has an encoding
    assert len(routed_names) == (18 if method == "mediator" else n_params)
    ptrs = {n: p.data_ptr() for n, p in rm.model.named_parameters()}
    for k in TASKS:
        prompt = prompts_for(k, 1, 123)[0]
        decision = rm.route([prompt])[0]
        assert decision.mode == "top1" and decision.task == k, decision
        run("export", store, tmp_path / k, "--variant", f"task:{k}")
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / k), dtype=torch.float32).to(DEVICE).eval()
        text = rm.generate(prompt, decisions=[decision], max_new_tokens=6)
        # the logits over the prompt and the routed answer (teacher-forced), both models
        seq = torch.cat([_ids(rm, prompt), torch.tensor([rm.tokenizer(text, add_special_tokens=False)["input_ids"]],
                                                        dtype=torch.long, device=rm.device)], dim=1)
        rm.apply(decision)
        with torch.inference_mode():
            got, want = rm.model(input_ids=seq).logits, ref(input_ids=seq).logits
        tol = EXPORT_REL * want.abs().amax(dim=-1, keepdim=True)
        assert ((got - want).abs() <= tol).all(), (k, (got - want).abs().max())
        if method == "mediator":  # few weights rounded: greedy gives the export's answer exactly
            ids = _ids(rm, prompt)
            with torch.inference_mode():
                ref_ids = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                       pad_token_id=rm.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            eos = rm.tokenizer.eos_token_id
            ref_ids = ref_ids[: ref_ids.index(eos)] if eos in ref_ids else ref_ids
            assert text == rm.tokenizer.decode(ref_ids, skip_special_tokens=True), k
        # (1bit rounds every weight: on these random models greedy may take the other side of a
        # near-tie of the export's logits, within 2 EXPORT_REL of the largest; the logits above
        # bound it. On trained models: test_quality_smoke's answers through the server.)
    # every tensor is where it was: the model (1bit: theta_0) is shared by every decision
    assert {n: p.data_ptr() for n, p in rm.model.named_parameters()} == ptrs


def test_uncertain_prompt_gets_weighted_merge(stores, routers, tmp_path):
    """Mediator, H > eta: D + sum_{t in top-m} p~_t S_t, checked against the formula computed
    here from the merged export (D) and the routed export's index / value tensors (S_t)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from streammerge.routing import RoutedModel

    store = stores["mediator"]
    run("export", store, tmp_path / "merged", "--variant", "merged")
    run("export", store, tmp_path / "routed", "--variant", "routed")
    merged = load_model_tensors(tmp_path / "merged")
    meta = json.loads((tmp_path / "routed" / "routing.json").read_text())
    experts = {}
    for f in meta["files"]:
        experts.update(load_file(tmp_path / "routed" / f))

    from streammerge.routing import route_decision

    from weight_swap import WeightSwapModel

    from streammerge.routing.deltas import EXACT_ATOL

    rm = RoutedModel.from_store(store, device=DEVICE, dtype="float32")
    swap = WeightSwapModel.load(store, device=DEVICE, dtype="float32")
    probs = [0.5, 0.3, 0.2]  # normalised entropy 0.937 > eta = 0.5
    with_none = route_decision([0.3, 0.2, 0.1, 0.4], TASKS, "mediator", background=True)  # weights sum to 0.6
    for decision, want_w in ((rm.decide(probs, top_m=2), {"chat": 0.625, "math": 0.375}),
                             (rm.decide(probs, top_m=0), {"chat": 0.5, "math": 0.3, "code": 0.2}),
                             (with_none, {"chat": 0.3, "math": 0.2, "code": 0.1})):
        assert decision.mode == "mix" and dict(decision.weights) == pytest.approx(want_w)
        formula = {}
        for name, D in merged.items():
            if f"{name}::chat.index" not in experts:
                continue
            w = D.float().flatten().clone()
            for t, p in want_w.items():
                w[experts[f"{name}::{t}.index"]] += torch.tensor(p, dtype=torch.float32) * experts[f"{name}::{t}.value"].float()
            formula[name] = w.reshape(D.shape)
        assert set(formula) == set(rm.runtime.tensors) and formula
        # the decoding functions' dense weights (tools/weight_swap.py, the old path's): the formula
        # rounded to bf16, one bf16 unit at most (in practice: equal)
        dense = swap.dense.weights(decision)
        for name, f in formula.items():
            want_t = f.to(torch.bfloat16).float()
            ulp = torch.exp2(torch.floor(torch.log2(want_t.abs().clamp_min(2.0**-126))) - 7)
            assert ((dense[name].cpu() - want_t).abs() <= ulp).all(), name
        # the runtime: D's product plus each expert's, float32, against the unrounded formula
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).to(DEVICE).eval()
        ref.load_state_dict(formula, strict=False)
        prompt = prompts_for("math", 1, 7)[0]
        with torch.inference_mode():
            want = ref(input_ids=_ids(rm, prompt)).logits
        got = rm.logits(prompt, decision)
        assert torch.allclose(got, want, atol=EXACT_ATOL, rtol=0), (got - want).abs().max()

    # eta = 0 forces the weighted merge for real prompts (their entropy is > 0)
    rm0 = RoutedModel.from_store(store, device=DEVICE, dtype="float32", eta=0.0)
    gens = rm0.generate([prompts_for("code", 1, 11)[0], prompts_for("chat", 1, 11)[0]], max_new_tokens=3, details=True)
    for g in gens:
        assert g.decision.mode == "mix" and sum(w for _, w in g.decision.weights) == pytest.approx(1.0)
        assert g.decision.entropy > 0 and 1 <= g.new_tokens <= 3


def test_router_with_a_background_class(stores, tmp_path):
    """`router fit --background`: prompts of none of the tasks become a last class; new prompts
    like them get the merged model, the tasks' prompts still get their task."""
    from streammerge.routing import STATIC, RoutedModel

    store = tmp_path / "med.zarr"
    shutil.copytree(stores["mediator"], store)
    specs = []
    for t in TASKS:
        specs += ["--prompts", f"{t}={write_jsonl(tmp_path / f'{t}.jsonl', prompts_for(t, 50, 0))}"]
    general = write_jsonl(tmp_path / "general.jsonl", prompts_for("general", 50, 0))
    out = run("router", "fit", store, *specs, "--background", general, "--device", DEVICE, "--epochs", "30")
    assert "(none) " in out and "held-out accuracy" in out
    meta = json.loads((store / "inference" / "router" / "router.json").read_text())
    assert meta["tasks"] == TASKS and meta["background"] == {"files": [str(general)], "prompts": 50}
    assert meta["n_train"] + meta["n_heldout"] == 200 and len(meta["heldout"]["confusion"]) == 4
    assert meta["heldout"]["accuracy"] >= 0.9, meta["heldout"]

    rm = RoutedModel.from_store(store, device=DEVICE)
    assert rm.router.classes == [*TASKS, "(none)"]
    fresh = [(t, p) for t in [*TASKS, "general"] for p in prompts_for(t, 10, 99)]
    decisions = rm.route([p for _, p in fresh])
    got = [d.task if d.mode != "static" else "general" for d in decisions]
    assert np.mean([g == t for (t, _), g in zip(fresh, got)]) >= 0.9, got
    assert all(d.probs is not None and len(d.probs) == 4 for d in decisions)
    assert any(d == STATIC for d in decisions)  # none of the tasks: the merged model

    out = run("router", "show", store)
    assert f"background  50 ({general}): class (none), the merged model" in out
    out = run("generate", store, "--prompt", prompts_for("general", 1, 5)[0], "--show-routing", "--max-new-tokens", "2", "--device", DEVICE)
    assert "(none) " in out.splitlines()[0] and "-> merged model (static): none of the tasks" in out.splitlines()[0]


@pytest.mark.parametrize("method", ["mediator", "1bit"])
def test_mixed_batch_generates_as_each_prompt_alone(stores, routers, method):
    """One generate over prompts with different decisions (every task, STATIC, a Mediator mix)
    decodes them in ONE batch and gives each prompt's text alone; the old weight swap (dense
    weights per decision in a copy of the model, tools/weight_swap.py) gives the same texts
    (Mediator)."""
    from weight_swap import WeightSwapModel

    from streammerge.errors import StreammergeError
    from streammerge.routing import STATIC, RoutedModel, forced

    store = stores[method]
    rm = RoutedModel.from_store(store, device=DEVICE, dtype="float32")
    prompts = [p for t in TASKS for p in prompts_for(t, 2, 42)]
    decs = [forced(t, TASKS) for t in TASKS for _ in range(2)]
    decs[1] = STATIC
    if method == "mediator":
        decs[3] = rm.decide([0.5, 0.3, 0.2], eta=0.0, top_m=0)
        assert decs[3].mode == "mix"
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    prompts, decs = [prompts[i] for i in order], [decs[i] for i in order]
    together = rm.generate(prompts, decisions=decs, max_new_tokens=6, batch_size=8)
    assert rm.timings.batches == 1 and len(together) == 6
    alone = [rm.generate(p, decisions=[d], max_new_tokens=6) for p, d in zip(prompts, decs)]
    assert together == alone
    # the rows did run different weights
    p = prompts[0]
    assert not torch.allclose(rm.logits(p, "math"), rm.logits(p, "code"))
    if method == "mediator":  # (1bit: the swap's weights are all rounded to bf16, see the test above)
        swap = WeightSwapModel.load(store, device=DEVICE, dtype="float32")
        assert swap.generate(prompts, decs, max_new_tokens=6) == together

    # a memory budget caches decoded terms: the same texts
    cached = RoutedModel.from_store(store, device=DEVICE, dtype="float32", memory_budget=1 << 30)
    assert cached.generate(prompts, decisions=decs, max_new_tokens=6) == together
    assert cached.resident_bytes()["cache"] > 0 and rm.resident_bytes()["cache"] == 0
    with pytest.raises(StreammergeError, match="the model and the encodings alone take"):
        RoutedModel.from_store(store, device=DEVICE, dtype="float32", memory_budget=1000)
    with pytest.raises(StreammergeError, match="cache_size: .* memory_budget=BYTES"):
        RoutedModel.from_store(store, device=DEVICE, cache_size=4)  # the old LRU's option, refused with a pointer
    out = run("generate", store, "--prompt", p, "--task", "math", "--memory-budget", "1KB", "--device", DEVICE, expect=1)
    assert out.startswith("error: ") and "memory budget" in out and len(out.strip().splitlines()) == 1


# ---- the torch reconstruction against the numpy encoders, piece by piece --------------------


def test_device_reconstruction_matches_numpy():
    from streammerge.encodings.onebit import dynamic_merge_block, pack_signs, pack_signs_flat, reconstruct_task, row_scales
    from streammerge.encodings.sparse import encode_sparse
    from streammerge.routing.encoded import SparseDelta, TaskPiece, onebit_weight

    def T(a):
        return torch.from_numpy(np.array(a, copy=True)).to(DEVICE)

    rng = np.random.default_rng(0)
    rows, cols = 7, 13
    tau = rng.normal(size=(rows, cols)).astype(np.float32)
    tau[0, :3] = 0.0
    packed = pack_signs(tau)
    alpha = np.float32(np.abs(tau).mean())
    p = TaskPiece("1bit", bits=T(packed), cols=cols, alpha=T(alpha))
    want = reconstruct_task("1bit", (rows, cols), rows, bits=packed, alpha=alpha)
    assert torch.equal(p.tau_hat((rows, cols), DEVICE).cpu(), torch.from_numpy(want))
    sc = row_scales(tau)
    p = TaskPiece("1bit-row", bits=T(packed), cols=cols, scale=T(sc))
    want = reconstruct_task("1bit-row", (rows, cols), rows, bits=packed, scale=sc)
    assert torch.equal(p.tau_hat((rows, cols), DEVICE).cpu(), torch.from_numpy(want))
    v = rng.normal(size=29).astype(np.float32)  # 1-D: flat bits
    flat_bits = np.frombuffer(pack_signs_flat(v), np.uint8).reshape(1, -1)
    p = TaskPiece("1bit", bits=T(flat_bits), cols=29, alpha=T(np.float32(0.25)))
    want = reconstruct_task("1bit", (29,), 29, bits=pack_signs_flat(v), alpha=np.float32(0.25))
    assert torch.equal(p.tau_hat((29,), DEVICE).cpu(), torch.from_numpy(want))
    dense = tau.astype(np.float32)
    p = TaskPiece("dense", dense=T(dense).to(torch.bfloat16))
    want = reconstruct_task("dense", (rows, cols), rows, dense=dense)
    assert torch.equal(p.tau_hat((rows, cols), DEVICE).cpu(), torch.from_numpy(want))

    class FakeStore:
        def __init__(self, blobs):
            self.blobs = blobs

        def read_blob(self, path, b):
            return self.blobs[b]

    # shape (4, 5) in blocks of 3 rows: block 1 (row 3) starts at flat index 15
    blobs = [
        encode_sparse(np.array([1, 5]), np.array([0.5, -2.0], np.float32), 15),
        encode_sparse(np.array([0, 4]), np.array([3.0, 1e-3], np.float32), 5),
    ]
    sp = SparseDelta(FakeStore(blobs), "x", {"shape": [4, 5], "block_rows": 3, "nblocks": 2}, DEVICE)
    want = np.concatenate([reconstruct_task("sparse", (4, 5), 3, sparse=blobs[0]), reconstruct_task("sparse", (4, 5), 1, sparse=blobs[1])])
    assert torch.equal(TaskPiece("sparse", sparse=sp).tau_hat((4, 5), DEVICE).cpu(), torch.from_numpy(want))
    assert want.reshape(-1)[15] == 3.0 and want.reshape(-1)[19] != 0

    # a row range of every kind is that range of the whole (1bit builds work on row ranges)
    pieces = [
        TaskPiece("1bit", bits=T(packed), cols=cols, alpha=T(alpha)),
        TaskPiece("1bit-row", bits=T(packed), cols=cols, scale=T(sc)),
        TaskPiece("dense", dense=T(dense).to(torch.bfloat16)),
    ]
    for pc in pieces:
        assert torch.equal(pc.tau_hat((rows, cols), DEVICE, (2, 5)), pc.tau_hat((rows, cols), DEVICE)[2:5])
    sp_piece = TaskPiece("sparse", sparse=sp)
    for r in ((0, 1), (1, 3), (3, 4), (2, 4)):
        assert torch.equal(sp_piece.tau_hat((4, 5), DEVICE, r), sp_piece.tau_hat((4, 5), DEVICE)[r[0] : r[1]])

    hats = [rng.normal(size=(rows, cols)).astype(np.float32) * s for s in (1.0, 0.5, 2.0)]
    hats[1][0, 0] = 0.0
    base = rng.normal(size=(rows, cols)).astype(np.float32)
    want = dynamic_merge_block(base, {"a": hats[0], "b": hats[1], "c": hats[2]}, "b", 0.7)
    pieces = dict.fromkeys("abc", "piece")  # present (not dropped)
    got = onebit_weight(T(base), lambda t: T(hats["abc".index(t)]), pieces, ("task", "b"), 0.7, DEVICE)
    assert torch.equal(got.cpu(), torch.from_numpy(want))


# ---- the command line -------------------------------------------------------------------------


def test_generate_sorts_a_batch_by_decision(stores):
    """Prompts batched by length whose decisions alternate (math, code, math, code as they grow)
    run as one batch with the rows sorted by decision, so each decision's rows are one run (a
    slice, not an index list), and each prompt gets its text alone."""
    from streammerge.routing import RoutedModel, forced

    rm = RoutedModel.from_store(stores["mediator"], device=DEVICE, dtype="float32")
    base = prompts_for("math", 1, 7)[0]
    prompts = [base + " and more" * i for i in range(4)]  # increasing lengths: the length order
    decs = [forced(("math", "code")[i % 2], TASKS) for i in range(4)]
    together = rm.generate(prompts, decisions=decs, max_new_tokens=4, batch_size=4)
    assert rm.timings.batches == 1
    assert [d.key for d in rm.runtime.decisions] == sorted(d.key for d in decs)
    assert all(isinstance(rows, slice) for _, rows in rm.runtime.groups(4))
    assert together == [rm.generate(p, decisions=[d], max_new_tokens=4) for p, d in zip(prompts, decs)]


def test_generate_cli(stores, routers, tmp_path):
    store = stores["mediator"]
    out = run("generate", store, "--prompt", prompts_for("math", 1, 3)[0], "--show-routing", "--max-new-tokens", "4", "--device", DEVICE)
    line = out.splitlines()[0]
    assert line.startswith("routing: p: chat ") and "entropy" in line and "top-1 math: D + S_math on 2 routed layer(s)" in line

    inp = tmp_path / "ask.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": prompts_for(t, 1, 50 + i)[0]}) + "\n" for i, t in enumerate(TASKS)))
    ans = tmp_path / "out" / "answers.jsonl"
    out = run("generate", store, "--input", inp, "--output", ans, "--max-new-tokens", "3", "--eta", "0", "--top-m", "2")
    assert "wrote 3 answer(s)" in out and "mix 3" in out
    rows = [json.loads(x) for x in ans.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all(isinstance(r["output"], str) for r in rows)
    for r, t in zip(rows, TASKS):
        assert r["routing"]["mode"] == "mix" and len(r["routing"]["weights"]) == 2 and t in r["routing"]["weights"]

    out = run("generate", stores["1bit"], "--prompt", "abc", "--task", "code", "--show-routing", "--max-new-tokens", "2")
    assert "forced code: theta_0 + tau_code + 0.8*TIES(chat, math)" in out

    copy = tmp_path / "norouter.zarr"
    shutil.copytree(stores["1bit"], copy)
    shutil.rmtree(copy / "inference" / "router")
    out = run("generate", copy, "--prompt", "abc", expect=1)
    assert out.startswith("error: ") and "no router fitted" in out and out.count("\n") == 1
    out = run("generate", copy, "--prompt", "abc", "--static", "--max-new-tokens", "2")
    out = run("generate", copy, "--prompt", "abc", "--task", "poetry", expect=1)
    assert "no task 'poetry'" in out
    out = run("router", "show", store)
    assert "classifier  mlp" in out and "held-out" in out


def test_generation_input_uses_the_chat_template(stores):
    from streammerge.routing.runtime import encode_for_features, encode_for_generation, load_tokenizer
    from streammerge.store.store import Store

    tok = load_tokenizer(Store.open(stores["1bit"]))
    assert encode_for_generation(tok, ["abc"]) == [tok("abc")["input_ids"]]  # no template: raw prompt, BOS
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
    want = tok("<s>user: abc\nbot:", add_special_tokens=False)["input_ids"]
    assert encode_for_generation(tok, ["abc"]) == [want] and want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1
    assert encode_for_features(tok, ["abc"]) == [tok("abc")["input_ids"]]  # the router reads the raw prompt


def test_length_batches_is_the_cheapest_partition_of_the_sorted_lengths():
    """Against a brute force over every cut of the sorted order: the same cost, each index once,
    no batch over max_rows, batches in length order."""
    from itertools import product

    from streammerge.routing.runtime import length_batches

    rng = random.Random(5)
    for trial in range(60):
        n = rng.randint(0, 9)
        lengths = [rng.randint(1, 80) for _ in range(n)]
        max_rows, overhead = rng.randint(1, 5), rng.choice([0, 8, 64, 4096])
        got = length_batches(lengths, max_rows, overhead)
        assert sorted(i for b in got for i in b) == list(range(n))
        assert all(1 <= len(b) <= max_rows for b in got)
        flat = [lengths[i] for b in got for i in b]
        assert flat == sorted(lengths)

        def cost(batches):
            return sum(overhead + max(lengths[i] for i in b) * len(b) for b in batches)

        order = sorted(range(n), key=lambda i: (lengths[i], i))
        best = float("inf")
        for cuts in product([0, 1], repeat=max(0, n - 1)):
            batches, cur = [], [order[0]] if n else []
            for k, c in enumerate(cuts):
                if c:
                    batches.append(cur)
                    cur = []
                cur.append(order[k + 1])
            if cur:
                batches.append(cur)
            if all(len(b) <= max_rows for b in batches):
                best = min(best, cost(batches))
        assert cost(got) == (best if n else 0), (lengths, max_rows, overhead, got)
    # padding that costs more than a forward is cut off; a large overhead keeps one batch
    assert length_batches([10, 10, 90, 10], 8, 64) == [[0, 1, 3], [2]]
    assert length_batches([10, 10, 90, 10], 8, 4096) == [[0, 1, 3, 2]]


def test_router_features_equal_each_prompt_alone_whatever_the_batching(stores):
    """mean_hidden_features against an unpadded forward of each prompt by itself, over batchings
    from one prompt a batch to all in one (padding to ~6x a prompt's length)."""
    from streammerge.routing.runtime import encode_for_features, load_merged_model, mean_hidden_features, pad_id
    from streammerge.store.store import Store

    lm, tok = load_merged_model(Store.open(stores["mediator"]), torch.device("cpu"), torch.float32)
    texts = prompts_for("chat", 6, 7) + ["a", "0+1=" * 40] + prompts_for("code", 6, 8)
    seqs = encode_for_features(tok, texts)
    with torch.inference_mode():
        want = torch.stack([lm.base_model(input_ids=torch.tensor([s])).last_hidden_state[0].mean(0) for s in seqs])
    for batch_size in (1, 3, len(seqs)):
        got = mean_hidden_features(lm, seqs, pad_id(tok), batch_size)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
