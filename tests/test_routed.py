"""Mediator and 1bit-Merging builds end to end: analysis, decisions, exports, report, storage.

References are independent in-memory torch computations of docs/methods.md's formulas on
the same checkpoints (loaded with the safetensors library).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

import synth_checkpoints as synth
from helpers import load_model_tensors, write_recipe
from streammerge.cli import main as cli

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=96)
TASKS = ["chat", "math", "code"]
LAYER = re.compile(r"\.layers\.(\d+)\.")


def assert_within_bf16_ulp(got, want, label: str) -> None:
    """got equals want (bf16) within one bf16 unit in the last place of want."""
    diff = (got.float() - want.float()).abs()
    tol = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2.0**-126))) - 7)
    assert (diff <= tol).all(), f"{label}: max diff {diff.max()}"


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res.output


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    base, fts = synth.make_family(root, SHAPE, n_finetunes=3, dtype="bfloat16", delta_scale=0.004)
    return base, fts, load_model_tensors(base), [load_model_tensors(f) for f in fts]


def recipe(method, base, fts, **params):
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"task": t}} for f, t in zip(fts, TASKS)],
        "parameters": params,
    }


def taus(b, fs, name):
    return [f[name].float() - b[name].float() for f in fs]


def brute_layer_conflict(b, fs):
    """d_l: elected-sign conflict per layer (sign elected + where the sum is >= 0)."""
    count, size = {}, {}
    for name in b:
        m = LAYER.search(name)
        if not m:
            continue
        ts = torch.stack(taus(b, fs, name)).double()
        elected = torch.where(ts.sum(0) >= 0, 1.0, -1.0)
        conflicts = ((ts != 0) & (torch.sign(ts) != elected)).sum().item()
        layer = int(m.group(1))
        count[layer] = count.get(layer, 0) + conflicts
        size[layer] = size.get(layer, 0) + ts[0].numel()
    return [count[i] / (len(fs) * size[i]) for i in sorted(count)]


def topk_by_magnitude(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest |x|, ties broken by the lowest flat index."""
    flat = x.flatten().abs().double()
    idx = torch.arange(flat.numel(), dtype=torch.float64)
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i)) if flat.numel() < 5000 else None
    if order is None:  # stable sort on (-|x|, index)
        _, order_t = torch.sort(-flat, stable=True)
        order = order_t.tolist()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    del idx
    return mask.reshape(x.shape)


def test_mediator_build_exports_and_report(family, tmp_path):
    base, fts, b, fs = family
    r = write_recipe(tmp_path / "r.yaml", recipe("mediator", base, fts, route=2, rho=0.1))
    store = tmp_path / "med.zarr"
    out = run("build", r, "--store", store, "--block-elements", "1000")
    assert "storage:" in out and "% of full routing" in out

    analysis = json.loads((store / "analysis.json").read_text())
    want = brute_layer_conflict(b, fs)
    assert [round(layer["d"], 12) for layer in analysis["layers"]] == [round(d, 12) for d in want]
    decision = json.loads((store / "method.json").read_text())
    top2 = sorted(range(len(want)), key=lambda i: (-want[i], i))[:2]
    assert decision["routed_layers"] == top2

    run("export", store, tmp_path / "merged", "--variant", "merged")
    run("export", store, tmp_path / "math", "--variant", "task:math")
    merged = load_model_tensors(tmp_path / "merged")
    math = load_model_tensors(tmp_path / "math")
    for name in b:
        mean = (fs[0][name].float() + fs[1][name].float() + fs[2][name].float()) / 3  # dense expert / average
        assert torch.equal(merged[name], mean.to(torch.bfloat16)), name
        m = LAYER.search(name)
        if m and int(m.group(1)) in top2:
            delta = fs[1][name].float() - mean.to(torch.bfloat16).float()  # against D as stored
            keep = topk_by_magnitude(delta, int(0.1 * delta.numel()))
            sparse = torch.where(keep, delta, torch.zeros_like(delta)).to(torch.bfloat16).float()
            want_t = (mean.to(torch.bfloat16).float() + sparse).to(torch.bfloat16)
            assert torch.equal(math[name], want_t), name
        else:
            assert torch.equal(math[name], merged[name]), name

    storage = json.loads((store / "storage.json").read_text())
    assert storage["n_tasks"] == 3 and 0 < storage["share_of_full_routing"] < 1

    run("report", store, "-o", tmp_path / "report")
    html = (tmp_path / "report" / "index.html").read_text()
    for layer in top2:
        assert str(layer) in html
    assert (tmp_path / "report" / "conflict_heatmap.png").stat().st_size > 1000

    run("export", store, tmp_path / "routed", "--variant", "routed")
    meta = json.loads((tmp_path / "routed" / "routing.json").read_text())
    assert meta["method"] == "mediator" and meta["decision"]["routed_layers"] == top2


def test_mediator_route_outside_routes_embeddings(family, tmp_path):
    """route_outside: the tensors of no layer (embeddings, lm_head, final norm) get D + S_t like
    a routed layer; the routed weights of a task equal the formula there too."""
    from streammerge.routing.decision import forced
    from weight_swap import DenseDecisions
    from streammerge.store.store import Store

    base, fts, b, fs = family
    r = write_recipe(tmp_path / "r.yaml", recipe("mediator", base, fts, route=1, rho=0.2, route_outside=True))
    store = tmp_path / "med.zarr"
    run("build", r, "--store", store, "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    assert decision["route_outside"] is True and len(decision["routed_layers"]) == 1
    outside = sorted(n for n in b if not LAYER.search(n))
    assert any("embed" in n for n in outside) and any("norm" in n for n in outside)
    st = Store.open(store)
    experts = {j["name"] for j in st.jobs if j["stage"] == "experts"}
    routed = {n for n in b if LAYER.search(n) and int(LAYER.search(n).group(1)) in decision["routed_layers"]}
    assert experts == routed | set(outside)

    run("export", store, tmp_path / "merged", "--variant", "merged")
    merged = load_model_tensors(tmp_path / "merged")
    # the decoding functions' dense weights (streammerge/routing/encoded.py, through tools/weight_swap.py)
    w = DenseDecisions(st, decision, "cpu", torch.float32, {n: t.float() for n, t in merged.items()}).weights(forced("math", TASKS))
    assert set(w) == experts
    for name in experts:
        D = ((fs[0][name].float() + fs[1][name].float() + fs[2][name].float()) / 3).to(torch.bfloat16)
        assert torch.equal(merged[name], D), name
        delta = fs[1][name].float() - D.float()
        keep = topk_by_magnitude(delta, int(0.2 * delta.numel()))
        sparse = torch.where(keep, delta, torch.zeros_like(delta)).to(torch.bfloat16).float()
        assert torch.equal(w[name], (D.float() + sparse).to(torch.bfloat16).float()), name
    # the task:math export holds the same D + S_math on every routed tensor, the outside ones too
    run("export", store, tmp_path / "task", "--variant", "task:math")
    task = load_model_tensors(tmp_path / "task")
    for name in experts:
        assert torch.equal(task[name].float(), w[name]), name
    storage = json.loads((store / "storage.json").read_text())
    # more experts than the same build without the outside tensors
    r2 = write_recipe(tmp_path / "r2.yaml", recipe("mediator", base, fts, route=1, rho=0.2))
    run("build", r2, "--store", tmp_path / "med2.zarr", "--block-elements", "1000")
    assert storage["total_bytes"] > json.loads((tmp_path / "med2.zarr" / "storage.json").read_text())["total_bytes"]


def int8_groups(values: torch.Tensor) -> torch.Tensor:
    """Values (float32, in offset order) quantised in groups of 64 as documented: scale =
    absmax / 127, q = round-half-even(v / scale) (0 where the scale is 0), bf16(scale * q)."""
    out = torch.zeros_like(values)
    for g0 in range(0, values.numel(), 64):
        v = values[g0 : g0 + 64]
        scale = v.abs().max() / torch.tensor(127, dtype=torch.float32)
        q = torch.round(v / scale) if scale > 0 else torch.zeros_like(v)
        out[g0 : g0 + 64] = (scale * q).to(torch.bfloat16).float()
    return out


def test_mediator_int8_values_export_and_storage(family, tmp_path):
    """value_bits 8: each task export is D + dequantised(top-rho(theta_t - D)), the int8 groups
    running over each stored row block's kept entries; the store is smaller than with bf16
    values, and `build` prints the smaller share."""
    from streammerge.store.store import Store

    base, fts, b, fs = family
    shares = {}
    for bits in (16, 8):
        r = write_recipe(tmp_path / f"r{bits}.yaml", recipe("mediator", base, fts, route=2, rho=0.5, route_outside=True, value_bits=bits))
        out = run("build", r, "--store", tmp_path / f"med{bits}.zarr", "--block-elements", "1000")
        shares[bits] = float(re.search(r"= ([0-9.]+)% of full routing", out).group(1))
    store = tmp_path / "med8.zarr"
    assert json.loads((store / "method.json").read_text())["value_bits"] == 8
    bad = write_recipe(tmp_path / "bad.yaml", recipe("mediator", base, fts, value_bits=12))
    out = run("build", bad, "--store", tmp_path / "bad.zarr", expect=1)
    assert out.startswith("error: ") and "value_bits" in out and "16, 8" in out and len(out.strip().splitlines()) == 1, out
    s8, s16 = (json.loads((tmp_path / f"med{bits}.zarr" / "storage.json").read_text()) for bits in (8, 16))
    assert s8["share_of_full_routing"] < s16["share_of_full_routing"] and shares[8] < shares[16]
    for c8, c16 in zip(s8["components"][1:], s16["components"][1:]):  # the experts: about 0.6 of the bytes
        assert c8["bytes"] < 0.7 * c16["bytes"], (c8, c16)

    run("export", store, tmp_path / "math", "--variant", "task:math")
    math = load_model_tensors(tmp_path / "math")
    jobs = {j["name"]: j for j in Store.open(store).jobs if j["stage"] == "experts"}
    assert any(LAYER.search(n) for n in jobs) and any(not LAYER.search(n) for n in jobs)
    differ = 0
    for name, job in jobs.items():
        D = ((fs[0][name].float() + fs[1][name].float() + fs[2][name].float()) / 3).to(torch.bfloat16).float()
        delta = (fs[1][name].float() - D).flatten()
        idx = topk_by_magnitude(delta, int(0.5 * delta.numel())).nonzero().flatten()
        per_block = job["block_rows"] * (delta.numel() // job["shape"][0])
        sparse = torch.zeros_like(delta)
        for b0 in range(0, delta.numel(), per_block):
            sel = idx[(idx >= b0) & (idx < b0 + per_block)]
            sparse[sel] = int8_groups(delta[sel])
        want = (D.flatten() + sparse).to(torch.bfloat16).reshape(D.shape)
        assert torch.equal(math[name], want), name
        # the int8 values, not the bf16 experts' (the same after the export's rounding on small tensors)
        bf16_sparse = torch.zeros_like(delta)
        bf16_sparse[idx] = delta[idx].to(torch.bfloat16).float()
        differ += not torch.equal(math[name].flatten(), (D.flatten() + bf16_sparse).to(torch.bfloat16))
    assert differ >= len(jobs) // 2, (differ, len(jobs))


@pytest.mark.parametrize("preset", ["uniform", "paper", "auto"])
def test_onebit_task_export_equals_formula(family, tmp_path, preset):
    base, fts, b, fs = family
    r = write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, preset=preset, **{"lambda": 0.8}))
    store = tmp_path / "bit.zarr"
    run("build", r, "--store", store, "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    run("export", store, tmp_path / "code", "--variant", "task:code")
    got = load_model_tensors(tmp_path / "code")
    from streammerge.analysis.summary import module_kind

    for name in b:
        kind = module_kind(name)
        hats = {}
        for t, tau in zip(TASKS, taus(b, fs, name)):
            prec = decision["precision"][t][kind]
            if prec == "drop":
                continue
            if prec == "dense":
                hats[t] = tau.to(torch.bfloat16).float()
            else:
                assert prec == "1bit", prec
                alpha = tau.double().abs().mean().float()
                hats[t] = alpha * torch.where(tau >= 0, 1.0, -1.0)  # sign bit: + for tau >= 0
        merged = b[name].float().clone()
        if "code" in hats:
            merged = merged + hats["code"]
        others = [h for t, h in hats.items() if t != "code"]
        if others:
            st = torch.stack(others)
            elected = torch.where(st.sum(0) >= 0, 1.0, -1.0)
            agree = torch.sign(st) == elected
            num = torch.where(agree, st, torch.zeros_like(st)).sum(0)
            cnt = agree.sum(0).clamp_min(1)
            merged = merged + 0.8 * num / cnt
        want = merged.to(torch.bfloat16)
        diff = (got[name].float() - want.float()).abs()
        # float32 order of operations may differ from this reference: one bf16 unit at most
        tol = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2.0**-126))) - 7)
        assert (diff <= tol).all(), f"{preset} {name}: max diff {diff.max()}"
    storage = json.loads((store / "storage.json").read_text())
    if preset == "uniform":
        # base + three 1-bit task vectors: 1 + 3/16 models of 3 -> 39.6% plus scales
        assert storage["share_of_full_routing"] <= 0.40


def test_onebit_two_bits_task_export_equals_formula(family, tmp_path):
    """bits: 2 (uniform, rms): matrices get tau ~ b1 s1 + b2 s2 per row (the residual's sign and
    scale, the row's norm kept), 1-D tensors one bit; the routed weights equal the export."""
    from streammerge.routing.decision import forced
    from weight_swap import DenseDecisions
    from streammerge.store.store import Store

    base, fts, b, fs = family
    params = {"preset": "uniform", "bits": 2, "scale": "rms", "granularity": "row", "lambda": 0.0}
    r = write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, **params))
    store = tmp_path / "bit.zarr"
    run("build", r, "--store", store, "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    assert decision["bits"] == 2 and set(decision["precision"]["code"].values()) == {"2bit"}
    run("export", store, tmp_path / "code", "--variant", "task:code")
    got = load_model_tensors(tmp_path / "code")

    def rms(x):
        return x.pow(2).mean(-1, keepdim=True).sqrt()

    for name in b:
        tau = (fs[2][name].float() - b[name].float()).double()
        t = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
        s1 = torch.where(t >= 0, 1.0, -1.0).double()
        if tau.dim() >= 2:
            a1 = t.abs().mean(-1, keepdim=True)
            res = t - a1 * s1
            fit = a1 * s1 + res.abs().mean(-1, keepdim=True) * torch.where(res >= 0, 1.0, -1.0)
            hat = fit * (rms(t) / rms(fit))
        else:
            hat = rms(t) * s1
        want = (b[name].double() + hat.reshape(tau.shape)).to(torch.bfloat16)
        assert_within_bf16_ulp(got[name], want, name)
    w = DenseDecisions(Store.open(store), decision, "cpu", torch.float32, {}).weights(forced("code", TASKS))
    for name, v in w.items():
        assert torch.equal(v, got[name].float()), name
    one = tmp_path / "one.zarr"
    run("build", write_recipe(tmp_path / "r1.yaml", recipe("1bit", base, fts, **{**params, "bits": 1})), "--store", one,
        "--block-elements", "1000")
    s1, s2 = (json.loads((p / "storage.json").read_text())["total_bytes"] for p in (one, store))
    # one more bit and one more float32 scale per row of each matrix, per task
    extra = sum(3 * (v.shape[0] * (-(-v[0].numel() // 8)) + 4 * v.shape[0]) for v in b.values() if v.dim() >= 2)
    assert s2 - s1 == extra


def test_onebit_routed_export_is_enough_to_rebuild_a_task(family, tmp_path):
    """A runtime that reads only the routed export (base shards + routing*.safetensors +
    routing.json, as documented there) rebuilds the same model as export --variant task:NAME."""
    import numpy as np
    from safetensors.torch import load_file

    base, fts, b, fs = family
    r = write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, preset="auto"))
    store = tmp_path / "bit.zarr"
    run("build", r, "--store", store)
    run("export", store, tmp_path / "routed", "--variant", "routed")
    run("export", store, tmp_path / "chat", "--variant", "task:chat")
    meta = json.loads((tmp_path / "routed" / "routing.json").read_text())
    routing, model = {}, {}
    for f in meta["files"]:
        routing.update(load_file(tmp_path / "routed" / f))
    for f in sorted((tmp_path / "routed").glob("model*.safetensors")):
        model.update(load_file(f))
    want = load_model_tensors(tmp_path / "chat")
    assert set(model) == set(b) and all(torch.equal(model[n], b[n]) for n in b)  # the shards are theta_0
    assert any(k.endswith(".bits") for k in routing)
    lam = meta["decision"]["lambda"]
    for name, theta0 in model.items():
        shape = theta0.shape
        n = theta0.numel()
        hats = {}
        for t in meta["decision"]["tasks"]:
            bits = routing.get(f"{name}::{t}.bits")
            if bits is not None:
                packed = bits.numpy().reshape(shape[0], -1) if len(shape) >= 2 else bits.numpy()
                signs = np.unpackbits(packed, axis=-1, bitorder="little")
                signs = signs[..., : (shape[-1] if len(shape) >= 2 else n)].astype(np.float32) * 2 - 1
                hats[t] = torch.from_numpy(signs.reshape(shape)) * routing[f"{name}::{t}.alpha"].item()
            elif f"{name}::{t}.dense" in routing:
                hats[t] = routing[f"{name}::{t}.dense"].float().reshape(shape)
        out = theta0.float() + hats.get("chat", 0)
        others = [h for t, h in hats.items() if t != "chat"]
        if others:
            st = torch.stack(others)
            elected = torch.where(st.sum(0) >= 0, 1.0, -1.0)
            agree = (st * elected) > 0
            out = out + lam * torch.where(agree, st, torch.zeros_like(st)).sum(0) / agree.sum(0).clamp_min(1)
        diff = (out.to(torch.bfloat16).float() - want[name].float()).abs()
        tol = torch.exp2(torch.floor(torch.log2(want[name].float().abs().clamp_min(2.0**-126))) - 7)
        assert (diff <= tol).all(), name


def test_onebit_precision_by_kind_task_export_equals_formula(family, tmp_path):
    """precision_by_kind overrides the preset per module kind for every task: with
    'embedding=2bit, norm=dense' on uniform 1-bit rows (rms), embeddings and lm_head get the
    2-bit fit, norms their bf16 task vector, the rest one bit with a row scale; the routed
    weights equal the export, and the storage grows by exactly the pieces that change."""
    from streammerge.routing.decision import forced
    from weight_swap import DenseDecisions
    from streammerge.analysis.summary import module_kind
    from streammerge.store.store import Store

    base, fts, b, fs = family
    params = {"preset": "uniform", "scale": "rms", "granularity": "row", "lambda": 0.0}
    store = tmp_path / "bit.zarr"
    r = write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, **params, precision_by_kind="embedding=2bit, norm=dense"))
    run("build", r, "--store", store, "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    assert decision["precision"]["math"] == {"attention": "1bit", "mlp": "1bit", "norm": "dense", "embedding": "2bit", "other": "1bit"}
    run("export", store, tmp_path / "code", "--variant", "task:code")
    got = load_model_tensors(tmp_path / "code")

    def rms(x):
        return x.pow(2).mean(-1, keepdim=True).sqrt()

    def sign(x):
        return torch.where(x >= 0, 1.0, -1.0).double()

    kinds = {module_kind(n) for n in b}
    assert {"embedding", "norm", "attention", "mlp"} <= kinds
    for name in b:
        tau = fs[2][name].float() - b[name].float()
        t = (tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)).double()
        kind = module_kind(name)
        if kind == "norm":
            hat = tau.to(torch.bfloat16).double()
        elif kind == "embedding":
            a1 = t.abs().mean(-1, keepdim=True)
            res = t - a1 * sign(t)
            fit = a1 * sign(t) + res.abs().mean(-1, keepdim=True) * sign(res)
            hat = fit * (rms(t) / rms(fit))
        else:
            hat = rms(t) * sign(t)
        want = (b[name].double() + hat.reshape(tau.shape)).to(torch.bfloat16)
        assert_within_bf16_ulp(got[name], want, f"{name} ({kind})")
    w = DenseDecisions(Store.open(store), decision, "cpu", torch.float32, {}).weights(forced("code", TASKS))
    for name, v in w.items():
        assert torch.equal(v, got[name].float()), name

    plain = tmp_path / "plain.zarr"
    run("build", write_recipe(tmp_path / "r1.yaml", recipe("1bit", base, fts, **params)), "--store", plain, "--block-elements", "1000")
    s1, s2 = (json.loads((p / "storage.json").read_text())["total_bytes"] for p in (plain, store))
    extra = 0
    for name, v in b.items():
        if module_kind(name) == "embedding":  # a second packed bit and float32 scale per row
            extra += 3 * (v.shape[0] * (-(-v[0].numel() // 8)) + 4 * v.shape[0])
        elif module_kind(name) == "norm":  # bf16 values instead of one bit (one block) + alpha
            assert v.numel() <= 1000
            extra += 3 * (2 * v.numel() - (-(-v.numel() // 8)) - 4)
    assert s2 - s1 == extra


@pytest.mark.parametrize("bad", ["embeding=2bit", "embedding", "mlp=3bit", "mlp=2bit,mlp=dense"])
def test_onebit_precision_by_kind_rejects_bad_values(family, tmp_path, bad):
    base, fts, _, _ = family
    r = write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, preset="uniform", precision_by_kind=bad))
    out = run("build", r, "--store", tmp_path / "s.zarr", expect=1)
    assert out.startswith("error: ") and "precision_by_kind" in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "s.zarr").exists()


def test_onebit_scale_exponent_task_export_equals_formula(family, tmp_path):
    """scale_exponent g: each row's scale is absmean * (rms / absmean)^g (g = 2: ||tau||^2 /
    ||tau||_1, tau_hat's projection onto tau is tau), 1-D tensors one such scale per tensor; the
    routed weights equal the export."""
    from streammerge.routing.decision import forced
    from weight_swap import DenseDecisions
    from streammerge.store.store import Store

    base, fts, b, fs = family
    params = {"preset": "uniform", "scale": "absmean", "scale_exponent": 2.0, "granularity": "row", "lambda": 0.0}
    store = tmp_path / "bit.zarr"
    run("build", write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, **params)), "--store", store, "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    assert decision["scale_exponent"] == 2.0
    run("export", store, tmp_path / "math", "--variant", "task:math")
    got = load_model_tensors(tmp_path / "math")
    for name in b:
        tau = fs[1][name].float() - b[name].float()
        t = (tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)).double()
        alpha = t.pow(2).sum(-1, keepdim=True) / t.abs().sum(-1, keepdim=True)
        hat = (alpha * torch.where(t >= 0, 1.0, -1.0).double()).reshape(tau.shape)
        want = (b[name].double() + hat).to(torch.bfloat16)
        assert_within_bf16_ulp(got[name], want, name)
    w = DenseDecisions(Store.open(store), decision, "cpu", torch.float32, {}).weights(forced("math", TASKS))
    for name, v in w.items():
        assert torch.equal(v, got[name].float()), name


def test_onebit_group_size_task_export_equals_formula(family, tmp_path):
    """group_size G: every matrix gets one rms scale per G consecutive entries of a row (the
    last group the rest), 1-D tensors one per tensor; the routed weights equal the export, and
    the store holds exactly (groups - 1) more float32 scales per row than granularity row."""
    from streammerge.routing.decision import forced
    from weight_swap import DenseDecisions
    from streammerge.store.store import Store

    base, fts, b, fs = family
    G = 24  # hidden 64: two full groups and a tail of 16; intermediate 128: five and a tail of 8
    params = {"preset": "uniform", "scale": "rms", "granularity": "row", "lambda": 0.0}
    store = tmp_path / "bit.zarr"
    run("build", write_recipe(tmp_path / "r.yaml", recipe("1bit", base, fts, **params, group_size=G)), "--store", store,
        "--block-elements", "1000")
    decision = json.loads((store / "method.json").read_text())
    assert decision["granularity"] == f"group:{G}"
    run("export", store, tmp_path / "code", "--variant", "task:code")
    got = load_model_tensors(tmp_path / "code")
    for name in b:
        tau = fs[2][name].float() - b[name].float()
        t = (tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)).double()
        g = G if tau.dim() >= 2 else t.shape[1]
        scale = torch.cat([t[:, c0 : c0 + g].pow(2).mean(-1, keepdim=True).sqrt().expand(-1, t[:, c0 : c0 + g].shape[1])
                           for c0 in range(0, t.shape[1], g)], dim=1)
        hat = (scale * torch.where(t >= 0, 1.0, -1.0).double()).reshape(tau.shape)
        want = (b[name].double() + hat).to(torch.bfloat16)
        assert_within_bf16_ulp(got[name], want, name)
    w = DenseDecisions(Store.open(store), decision, "cpu", torch.float32, {}).weights(forced("code", TASKS))
    for name, v in w.items():
        assert torch.equal(v, got[name].float()), name

    row = tmp_path / "row.zarr"
    run("build", write_recipe(tmp_path / "r1.yaml", recipe("1bit", base, fts, **params)), "--store", row, "--block-elements", "1000")
    s1, s2 = (json.loads((p / "storage.json").read_text())["total_bytes"] for p in (row, store))
    extra = sum(3 * 4 * v.shape[0] * (-(-v[0].numel() // G) - 1) for v in b.values() if v.dim() >= 2)
    assert extra > 0 and s2 - s1 == extra
