"""The merges to score: recipes (mergekit YAML), built with streammerge's Python API (the same
code as `streammerge build` / `export`) and, for task_arithmetic and ties, with mergekit too.

Every merge lives under <cache>/merges/<name>/: recipe.yaml, job.zarr (the store: a rerun
resumes it, so nothing is recomputed) and model/ (the exported static model; routing methods
are evaluated from the store itself). mergekit's outputs go to <cache>/merges/mk-<name>/model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import tasks as T


@dataclass
class Merge:
    name: str  # unique, used for paths and the table
    family: str  # linear, task_arithmetic, ties, dare_ties, 1bit, mediator, mergekit
    method: str
    label: str  # parameters, for the table
    params: dict = field(default_factory=dict)  # global parameters
    model_params: dict = field(default_factory=dict)  # per-model parameters (all models)
    mergekit: bool = False  # also build it with mergekit

    @property
    def routing(self) -> bool:
        return self.method in ("mediator", "1bit")


def recipe(m: Merge, root: Path) -> dict:
    models = []
    for t in T.TASKS:
        p = dict(m.model_params)
        if m.routing:
            p["task"] = t
        if m.method == "1bit":
            p["task_type"] = T.TASK_TYPES[t]
        models.append({"model": str((root / t).resolve()), "parameters": p} if p else {"model": str((root / t).resolve())})
    r = {"merge_method": m.method}
    if m.method != "linear":
        r["base_model"] = str((root / "base").resolve())
    r["models"] = models
    if m.params:
        r["parameters"] = dict(m.params)
    r["dtype"] = "bfloat16"
    return r


SHORT = {"lambda": "lam", "coverage": "cov", "rho": "rho", "bits": "bits", "scale_exponent": "g", "group_size": "group",
         "precision_by_kind": ""}


def _tag(key: str, value) -> str:
    """A row name's piece for one parameter: '-lam0.5', '-rms', '-g2', '-embedding2bit-norm-dense'."""
    if isinstance(value, (int, float)):
        return f"-{SHORT.get(key, key)}{value:g}"
    if key == "precision_by_kind":  # "embedding=2bit, norm=dense" -> "-embedding2bit-normdense"
        return "".join(f"-{item.replace('=', '').strip()}" for item in value.replace(" ", "").split(","))
    return f"-{value}"


def merges(cfg) -> list[Merge]:
    """The merges scored on configuration `cfg`: the sweeps; on the smoke configuration one of
    each family. Mediator rows that route every layer name the configuration's layer count
    (mediator-8-* on the full configuration, mediator-12-* on the large one)."""
    full = cfg.name != "smoke"
    every = cfg.shape.layers
    out = [Merge("linear", "linear", "linear", "mean of the experts", model_params={"weight": 1.0})]
    tas = [0.5, 1.0] if full else [1.0]
    for lam in tas:
        out.append(Merge(f"ta-{lam:g}", "task_arithmetic", "task_arithmetic", f"weight {lam:g}", model_params={"weight": lam}, mergekit=True))
    ties = [(0.3, 1.0), (0.5, 1.0), (0.8, 1.0), (0.5, 2.0)] if full else [(0.5, 1.0)]
    for dens, lam in ties:
        out.append(Merge(f"ties-{dens:g}-{lam:g}", "ties", "ties", f"density {dens:g}, lambda {lam:g}",
                         params={"lambda": lam}, model_params={"weight": 1.0, "density": dens}, mergekit=True))
    dares = [(0.3, 0.5), (0.5, 0.5), (0.7, 0.5), (0.5, 1.0)] if full else [(0.5, 0.5)]
    for dens, w in dares:
        out.append(Merge(f"dare-{dens:g}-{w:g}", "dare_ties", "dare_ties", f"density {dens:g}, weight {w:g}",
                         model_params={"weight": w, "density": dens}))
    bits = [("paper", {}), ("auto", {}), ("uniform", {})]
    if full:
        bits += [("uniform", {"granularity": "row"}), ("uniform", {"lambda": 0.0}), ("uniform", {"granularity": "row", "lambda": 0.0}),
                 ("auto", {"coverage": 0.95, "granularity": "row", "lambda": 0.0}), ("uniform", {"granularity": "row", "lambda": 0.5}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms"}), ("uniform", {"granularity": "row", "lambda": 0.5, "scale": "rms"}),
                 ("uniform", {"granularity": "row", "scale": "rms"}), ("uniform", {"lambda": 0.0, "scale": "rms"}),
                 ("paper", {"granularity": "row", "lambda": 0.0, "scale": "rms"}), ("auto", {"granularity": "row", "lambda": 0.0, "scale": "rms"}),
                 # a second sign bit per entry (the residual's), with its own scale per row
                 ("uniform", {"bits": 2}), ("uniform", {"granularity": "row", "scale": "rms", "bits": 2}),
                 ("uniform", {"granularity": "row", "lambda": 0.5, "scale": "rms", "bits": 2}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "bits": 2}),
                 # issue #21, one bit that keeps 95 % (to run): lambda between the measured 0 and
                 # 0.5; norms kept dense (auto at full coverage: every other kind at one bit);
                 # auto at 0.95 drops the kinds holding the last 5 % of the norm (less storage).
                 # Not expressible with the method's parameters (a method change first): scales
                 # per group of a row, an rms/absmean mix, a second bit for some kinds only.
                 ("uniform", {"granularity": "row", "lambda": 0.25, "scale": "rms"}),
                 ("auto", {"coverage": 1.0, "granularity": "row", "lambda": 0.0, "scale": "rms"}),
                 ("auto", {"coverage": 1.0, "granularity": "row", "lambda": 0.25, "scale": "rms"}),
                 ("auto", {"coverage": 0.95, "granularity": "row", "lambda": 0.0, "scale": "rms"}),
                 # a second bit for the module kinds where it is cheap (embeddings: 4 % of the
                 # parameters, a large share of each task vector's norm; attention: 24 %), norms
                 # dense (0.07 %): <= 35 % of full routing's storage
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "precision_by_kind": "embedding=2bit"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "precision_by_kind": "embedding=2bit,norm=dense"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "precision_by_kind": "embedding=2bit,attention=2bit"}),
                 # diagnostics over the budget: which kind's second bit buys the 2-bit rows' gain
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "precision_by_kind": "mlp=2bit"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "precision_by_kind": "embedding=dense"}),
                 # larger scales than rms (absmean * (rms/absmean)^g; g 1 = rms, 2 = tau_hat
                 # projects onto tau as tau), alone and with the cheap second bits
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 1.5}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 2.0}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 1.5, "precision_by_kind": "embedding=2bit,attention=2bit"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 2.0, "precision_by_kind": "embedding=2bit,attention=2bit"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 1.25}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 1.25, "precision_by_kind": "embedding=2bit,attention=2bit"}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale_exponent": 1.5, "precision_by_kind": "embedding=2bit"}),
                 # one scale per group of G entries of a row: 32/G more bits per entry (G 128
                 # fits 35 %, G 64 does not)
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "group_size": 128}),
                 ("uniform", {"granularity": "row", "lambda": 0.0, "scale": "rms", "group_size": 64})]
    for preset, extra in bits:
        tag = "".join(_tag(k, v) for k, v in extra.items())
        label = f"preset {preset}" + "".join(f", {k} {v}" for k, v in extra.items())
        out.append(Merge(f"1bit-{preset}{tag}", "1bit", "1bit", label, params={"preset": preset, **extra}))
    # route: a fraction of the layers (< 1) or a count (>= 1); `every` = every layer.
    # route_outside also routes embed_tokens, lm_head and the final norm (a third to two thirds of
    # each task vector's squared norm here, 4% of the parameters).
    outside = {"route_outside": True}
    meds = [(2, 0.1, {}), (4, 0.1, {}), (every, 0.05, {}), (every, 0.1, {}), (every, 0.15, {}), (every, 0.2, {}), (every, 0.3, {}),
            (every, 0.4, {}), (every, 0.5, {}), (every, 0.1, {"average": "ties"}), (every, 0.2, outside), (every, 0.3, outside),
            (every, 0.4, outside), (every, 0.5, outside),
            # issue #21, <= 60 % of full routing's storage: fewer layers (the highest-conflict
            # ones) routed at a higher rho instead of every layer at rho 0.3
            (6, 0.4, outside), (5, 0.5, outside), (4, 0.5, outside),
            # the same: 8-bit expert values (int8, a float32 scale per 64 values) at about half
            # the experts' bytes of bf16 values
            (every, 0.5, {"value_bits": 8}), (every, 0.5, {**outside, "value_bits": 8}), (every, 0.6, {"value_bits": 8})] if full else [(0.5, 0.1, {})]
    tags = {"route_outside": ("-outside", ", routed outside"), "value_bits": ("-int8", ", int8 values")}
    for route, rho, extra in meds:
        tag = "".join(tags[k][0] if k in tags else f"-{v}" for k, v in extra.items())
        label = "".join(tags[k][1] if k in tags else f", {k} {v}" for k, v in extra.items())
        out.append(Merge(f"mediator-{route:g}-{rho:g}{tag}", "mediator", "mediator", f"route {route:g}, rho {rho:g}{label}",
                         params={"route": route, "rho": rho, **extra}))
    return out


def build(m: Merge, root: Path, workdir: Path) -> dict:
    """Build (or resume) with streammerge; export static ones. Returns paths and storage."""
    from streammerge.engine.job import build as sm_build
    from streammerge.export.hf import export_store
    from streammerge.store.store import Store

    d = workdir / m.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe(m, root), sort_keys=False))
    store_path = d / "job.zarr"
    res = sm_build(d / "recipe.yaml", store_path, workers=2, seed=0, progress=False)
    info = {"store": str(store_path), "seconds": round(res.seconds, 2), "resumed": res.resumed}
    if m.routing:
        info["storage"] = json.loads((store_path / "storage.json").read_text())
    else:
        out = d / "model"
        stamp = d / "model.json"
        if not (out.is_dir() and stamp.is_file() and json.loads(stamp.read_text()).get("digest") == res.store.digest):
            export_store(Store.open(store_path), out, overwrite=True, progress=False)
            stamp.write_text(json.dumps({"digest": res.store.digest}))
        info["model"] = str(out)
    return info


def build_mergekit(m: Merge, root: Path, workdir: Path) -> dict:
    """mergekit-yaml's run_merge on the same recipe, in-process; the tokenizer copied from the base."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    d = workdir / f"mk-{m.name}"
    out = d / "model"
    text = yaml.safe_dump(recipe(m, root), sort_keys=False)
    if out.is_dir() and (d / "recipe.yaml").is_file() and (d / "recipe.yaml").read_text() == text:
        return {"model": str(out), "resumed": True}
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "recipe.yaml").write_text(text)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), MergeOptions(quiet=True, random_seed=0, write_model_card=False, copy_tokenizer=False))
    for f in (root / "base").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    return {"model": str(out), "resumed": False}
