"""Build pipelines of the routing methods (Mediator, 1bit-Merging).

A static method is one function per tensor. A routing method is planned in two phases:

  A. "analysis": every tensor's task vectors are scored (conflict counts, norms, dot products,
     analysis/conflict.py); the engine saves the stats and `summarize` turns them into a
     per-layer / per-module-kind summary (analysis.json).
  B. from that summary, a decision (which layers Mediator routes; 1bit-Merging's precision per
     task and module kind; method.json), then the jobs that write the merged (static fallback)
     model under tensors/ and the per-task experts or encodings beside it.

Both phases are ordinary engine jobs (one dask task per tensor x row block), so they stream,
resume and run anywhere the static methods do. The decision is a pure function of the saved
stats, so a resumed build re-derives the same phase-B jobs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..analysis.conflict import conflict_method
from ..analysis.summary import module_kind
from ..checkpoints.stacks import layer_index, stack_of
from ..encodings.onebit import granularity_spec, onebit_outputs, scale_spec
from ..encodings.sparse import expert_outputs
from ..errors import RecipeError
from ..kernels import linear as linear_kernels
from ..methods import Block, MergeMethod, TensorParams, get_method
from ..methods.mediator import mediator_expert_method
from ..methods.onebit import onebit_encode_method, onebit_fallback_method, precision_by_kind
from .planner import Plan, TensorJob

KINDS = ("attention", "mlp", "norm", "embedding", "other")


def task_names(plan: Plan) -> list[str]:
    """Task names from each model's `task` parameter, else its directory name; must be unique."""
    first = plan.jobs[0].params
    names = []
    for spec, p in zip(plan.model_specs, first.per_model):
        names.append(p.get("task") or Path(spec.rstrip("/")).name)
    if len(set(names)) != len(names):
        raise RecipeError(f"task names must be unique, got {names}: set models[].parameters.task")
    return names


def analysis_jobs(plan: Plan) -> list[TensorJob]:
    g = plan.jobs[0].params.globals
    method = conflict_method(len(plan.model_specs), denoise_q=float(g.get("denoise_q", 1.0)))
    return [replace(j, method=method, stage="analysis", key=f"analysis/{j.name}", outputs=()) for j in plan.jobs]


# ---- Mediator -----------------------------------------------------------------------------


def _mean(block: Block, params: TensorParams, stats) -> np.ndarray:
    """The dense expert D = mean_t theta_t: summed in task order, divided by N, in float32."""
    acc = block.models[0].copy()
    for m in block.models[1:]:
        acc += m
    acc /= np.float32(len(block.models))
    return acc


MEAN = MergeMethod(name="mean", merge=_mean, kernel=linear_kernels.mean, base="optional", summary="mean of the fine-tunes")


def mediator_decision(summary: dict, g: dict, tasks: list[str]) -> dict:
    """The layers Mediator routes: the text decoder's ("routed_layers"), and each other stack's
    (a vision tower's, under "stacks") chosen among that stack's layers only, by the same rule."""
    score_key = "pairwise" if g["conflict"] == "pairwise" else "d"
    decoder = _route_layers(summary["layers"], score_key, g)
    return {
        "method": "mediator",
        "tasks": tasks,
        **decoder,
        "stacks": {name: _route_layers(s["layers"], score_key, g) for name, s in summary.get("stacks", {}).items()},
        "score": score_key,
        "route_outside": g["route_outside"],
        "rho": g["rho"],
        "value_bits": g["value_bits"],
        "eta": g["eta"],
        "top_m": g["top_m"],
        "average": g["average"],
    }


def _route_layers(layers: list[dict], score_key: str, g: dict) -> dict:
    """routed_layers, selection and scores for the layers of one stack (by highest conflict)."""
    scores = [layer[score_key] for layer in layers]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if g["route_threshold"] >= 0:
        routed = [i for i in order if scores[i] > g["route_threshold"]]
        selection = {"mode": "threshold", "k": len(routed), "threshold": g["route_threshold"]}
    else:
        r = g["route"]
        k = int(r) if r >= 1 else int(round(r * len(scores)))
        if r > 0:
            k = max(1, k)
        routed = order[: min(k, len(scores))]
        selection = {"mode": "top_k", "k": len(routed), "threshold": None}
    return {"routed_layers": routed, "selection": selection, "scores": scores}


def _average_method(g: dict, n: int) -> tuple[MergeMethod, TensorParams]:
    if g["average"] == "mean":
        return MEAN, TensorParams({}, tuple({} for _ in range(n)))
    m = get_method(g["average"])
    defaults = {p.name: p.default for p in m.params if p.scope == "global"}
    if g["average"] == "ties":
        per = tuple({"weight": 1.0, "density": g["density"]} for _ in range(n))
        return m, TensorParams({**defaults, "normalize": True}, per)
    per = tuple({"weight": 1.0 / n} for _ in range(n))  # task arithmetic at weight 1/N: theta_0 + mean tau
    return m, TensorParams(defaults, per)


def mediator_jobs(plan: Plan, decision: dict) -> list[TensorJob]:
    g = plan.jobs[0].params.globals
    tasks = decision["tasks"]
    # routed layers per stack: a vision tower's layer i is not the decoder's layer i
    stacks = decision.get("stacks", {})
    routed = {name: set(s["routed_layers"]) for name, s in stacks.items()}
    decoder = set(decision["routed_layers"])
    avg_method, avg_params = _average_method(g, len(tasks))
    jobs = []
    for j in plan.jobs:
        layer = layer_index(j.name)
        # tensors of no layer (embeddings, lm_head, final norm) are routed only on request
        in_stack = routed.get(stack_of(j.name), decoder)
        is_routed = layer in in_stack if layer is not None else decision["route_outside"]
        if is_routed:  # the merged model holds the dense expert; the experts stage adds S_t beside it
            jobs.append(replace(j, method=MEAN, base=None, stage="merge", key="", outputs=None))
            # S_t is taken against the dense expert as stored (rounded to the output dtype), so
            # that D + S_t reproduces theta_t on the kept entries up to the values' rounding.
            experts = mediator_expert_method(tasks, g["rho"], dense_dtype=j.dtype, value_bits=g["value_bits"])
            jobs.append(
                replace(j, method=experts, base=None, stage="experts", key=f"experts/{j.name}", outputs=expert_outputs(tasks))
            )
        else:
            jobs.append(replace(j, method=avg_method, params=replace(avg_params, seed=j.params.seed), stage="merge", key="", outputs=None))
    return jobs


# ---- 1bit-Merging ---------------------------------------------------------------------------


def _guess_type(task: str) -> str:
    t = task.lower()
    for kind in ("chat", "math", "code"):
        if kind in t:
            return kind
    return "general"


def onebit_decision(summary: dict, g: dict, tasks: list[str], task_types: list[str | None]) -> dict:
    precision: dict[str, dict[str, str]] = {}
    why: dict[str, str] = {}
    task_types = [t or _guess_type(task) for task, t in zip(tasks, task_types)]
    for task, ttype in zip(tasks, task_types):
        if g["preset"] == "uniform":
            precision[task] = {k: "1bit" for k in KINDS}
            why[task] = "uniform: 1-bit everywhere"
        elif g["preset"] == "paper":
            keep = "attention" if ttype in ("chat", "general") else "mlp"
            precision[task] = {k: ("1bit" if k == keep else "drop") for k in KINDS}
            why[task] = f"paper: a {ttype} task keeps {keep}"
        else:  # auto: the module kinds that hold `coverage` of the task's squared task-vector norm
            shares = summary["norm_share"][task]
            kept, total = [], 0.0
            for kind in sorted(shares, key=lambda k: -shares[k]):
                if total >= g["coverage"] or shares[kind] <= 0:
                    break
                kept.append(kind)
                total += shares[kind]
            # Norm weights are tiny and a 1-bit sign loses their scale structure: keep them dense.
            precision[task] = {k: (("dense" if k == "norm" else "1bit") if k in kept else "drop") for k in KINDS}
            why[task] = "auto: keeps " + ", ".join(f"{k} ({100 * shares[k]:.0f}%)" for k in kept) + " of its squared norm"
        if g["bits"] == 2:  # a second sign bit (the residual's) wherever the preset keeps one
            precision[task] = {k: ("2bit" if p == "1bit" else p) for k, p in precision[task].items()}
            why[task] += "; 2 bits"
        overrides = precision_by_kind(g.get("precision_by_kind") or "")
        if overrides:  # the recipe's precision for these kinds, whatever the preset chose
            precision[task].update(overrides)
            why[task] += "; " + ", ".join(f"{k} {p}" for k, p in overrides.items())
    return {
        "method": "1bit",
        "tasks": tasks,
        "preset": g["preset"],
        "task_types": dict(zip(tasks, task_types)),
        "precision": precision,
        "why": why,
        "bits": g["bits"],
        "precision_by_kind": g.get("precision_by_kind") or "",
        "scale": g["scale"],
        "scale_exponent": g.get("scale_exponent", -1.0),
        "granularity": granularity_spec(g["granularity"], g.get("group_size", 0)),
        "lambda": g["lambda"],
        "rho": g["rho"],
    }


def onebit_jobs(plan: Plan, decision: dict) -> list[TensorJob]:
    g = plan.jobs[0].params.globals
    tasks = decision["tasks"]
    scale = scale_spec(g["scale"], g.get("scale_exponent", -1.0))
    granularity = decision["granularity"]  # "tensor", "row" or "group:<G>"
    jobs = []
    for j in plan.jobs:
        kind = module_kind(j.name)
        precisions = {t: decision["precision"][t][kind] for t in tasks}
        fallback = onebit_fallback_method(tasks, precisions, scale, granularity, g["lambda"], g["rho"], shape=j.shape)
        jobs.append(replace(j, method=fallback, stage="merge", key="", outputs=None))
        if any(p != "drop" for p in precisions.values()):
            enc = onebit_encode_method(tasks, precisions, scale, granularity, g["rho"], shape=j.shape)
            outs = onebit_outputs(tasks, precisions, j.shape, granularity, g["rho"])
            jobs.append(replace(j, method=enc, stage="encode", key=f"encodings/{j.name}", outputs=outs))
    return jobs


def decide(plan: Plan, summary: dict) -> dict:
    g = dict(plan.jobs[0].params.globals)
    tasks = task_names(plan)
    if plan.method.pipeline == "mediator":
        return mediator_decision(summary, g, tasks)
    types = [p.get("task_type") for p in plan.jobs[0].params.per_model]
    return onebit_decision(summary, g, tasks, types)


def phase_b_jobs(plan: Plan, decision: dict) -> list[TensorJob]:
    return mediator_jobs(plan, decision) if plan.method.pipeline == "mediator" else onebit_jobs(plan, decision)


def storage(store, plan: Plan, decision: dict) -> dict:
    """Bytes per component, and the share of full routing (N fine-tuned models)."""
    from ..dtypes import float_type

    model_bytes = sum(int(np.prod(t["shape"], dtype=np.int64)) * float_type(t["dtype"]).itemsize for t in store.tensors)
    tasks = decision["tasks"]
    per_task = {t: 0 for t in tasks}
    for job in store.jobs:
        if job["stage"] not in ("experts", "encode"):
            continue
        for out in job["outputs"]:
            task = out["name"].split(".")[0]
            path = job["key"] if not out["name"] else f"{job['key']}/{out['name']}"
            if out.get("blob"):
                d = store.path / "blobs" / path
                per_task[task] += sum(f.stat().st_size for f in d.iterdir() if f.is_file()) if d.is_dir() else 0
            else:
                a = store.array_at(path)
                per_task[task] += int(np.prod(a.shape[:1], dtype=np.int64)) * int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
        if job["stage"] == "encode":
            stats = store.load_stats("encode", job["key"]) or {}
            for t in tasks:
                if f"{t}.alpha" in stats:
                    per_task[t] += 4  # one float32 scale per tensor
    if decision["method"] == "mediator":
        components = [{"name": "averaged model (with dense experts)", "bytes": model_bytes}]
        components += [{"name": f"sparse expert ({t})", "bytes": per_task[t]} for t in tasks]
    else:
        base_bytes = sum(j.base.nbytes for j in plan.jobs if j.base is not None)
        components = [{"name": "base model", "bytes": base_bytes}]
        components += [{"name": f"1-bit task vector ({t})", "bytes": per_task[t]} for t in tasks]
    total = sum(c["bytes"] for c in components)
    full = len(tasks) * model_bytes
    return {
        "components": components,
        "total_bytes": total,
        "model_bytes": model_bytes,
        "n_tasks": len(tasks),
        "full_routing_bytes": full,
        "share_of_full_routing": total / full if full else 0.0,
    }
