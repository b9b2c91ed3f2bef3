"""`streammerge report`: what a routing build (Mediator, 1bit-Merging) measured and decided.

A routing build writes three JSON files at the store root (docs/methods.md sections 2-4):

    analysis.json   conflict scores d per layer and module kind, task-vector norms, cosines,
                    the share of each task's squared norm per module kind
    method.json     the decisions: routed layers (Mediator) or per (task, kind) precision (1bit)
    storage.json    bytes per stored component and the share of "full routing" (N models)

`load_report` reads them (analysis.json is required, the other two may be missing while a build
is unfinished) and adds a `summary` of derived facts: per layer whether it is routed and why,
which module kind dominates each task, consistency warnings. `write_report` renders the HTML
page (html.py) and the PNG figures (figures.py) into a directory.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from pathlib import Path

from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json

ROUTING_METHODS = ("mediator", "1bit")
INDEX = "index.html"

# The paper's observation (1bit-Merging): chat/general knowledge sits in attention, math/code in MLP.
_EXPECT = (
    (re.compile(r"chat|general|instruct|dialog|assist|conv|alpaca|sharegpt", re.I), "attention"),
    (re.compile(r"math|code|coder|gsm|program|python|mbpp|humaneval|arith", re.I), "mlp"),
)
_TYPE_EXPECT = {"chat": "attention", "general": "attention", "math": "mlp", "code": "mlp"}


def load_report(store_path: Path) -> dict:
    """Read a store's analysis/method/storage JSON; raise StreammergeError (one line) if there is none."""
    from ..store.store import Store

    store_path = Path(store_path)
    st = Store.open(store_path)
    built_with = st.manifest.get("method", "?")
    analysis = _read(store_path, "analysis.json")
    if analysis is None:
        if built_with in ROUTING_METHODS:
            raise StreammergeError(
                f"{store_path}: no analysis in this store yet (the {built_with} build has not finished its analysis "
                "pass); run `streammerge build` again to resume"
            )
        raise StreammergeError(
            f"{store_path}: no analysis in this store (built with method {built_with}); reports exist for mediator "
            "and 1bit builds"
        )
    method = _read(store_path, "method.json")
    storage = _read(store_path, "storage.json")
    _check(store_path, analysis, method, storage)
    rep = {
        "store": str(store_path),
        "built_with": built_with,
        "method": method,
        "analysis": analysis,
        "storage": storage,
    }
    rep["summary"] = summarize(rep)
    return rep


def write_report(rep: dict, outdir: Path) -> dict:
    """Write index.html and the PNG figures into `outdir` (created); return {"html", "figures"}."""
    from . import figures
    from .html import render

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise StreammergeError(f"{outdir}: exists and is not a directory")
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in figures.FIGURES.items():
        png = draw(rep)
        if png is not None:
            _atomic_write(outdir / name, png)
            written.append(name)
        elif (outdir / name).is_file():  # stale figure of an earlier report into this directory
            (outdir / name).unlink()
    _atomic_write(outdir / INDEX, render(rep, written).encode("utf-8"))
    return {"html": str(outdir / INDEX), "figures": [str(outdir / n) for n in written]}


# ---- reading ------------------------------------------------------------------------------------


def _read(store_path: Path, name: str):
    path = store_path / name
    if not path.is_file():
        return None
    return read_json(path, DOCUMENT.named(name))


def _check(store_path: Path, analysis, method, storage) -> None:
    """Refuse documents of the wrong shape in one line; tolerate missing optional fields."""

    def bad(name, what):
        raise StreammergeError(f"{store_path / name}: {what}")

    if not isinstance(analysis, dict):
        bad("analysis.json", "expected a JSON object")
    if not isinstance(analysis.get("layers", []), list) or not all(isinstance(x, dict) for x in analysis.get("layers", [])):
        bad("analysis.json", '"layers" must be a list of objects')
    if not isinstance(analysis.get("tasks", []), list):
        bad("analysis.json", '"tasks" must be a list')
    for key in ("kinds", "norm_share", "attention_vs_mlp", "norms", "outside_layers", "stacks"):
        if analysis.get(key) is not None and not isinstance(analysis[key], dict):
            bad("analysis.json", f'"{key}" must be an object')
    if method is not None:
        if not isinstance(method, dict):
            bad("method.json", "expected a JSON object")
        if method.get("routed_layers") is not None and not isinstance(method["routed_layers"], list):
            bad("method.json", '"routed_layers" must be a list of layer indices')
    if storage is not None:
        if not isinstance(storage, dict):
            bad("storage.json", "expected a JSON object")
        if not isinstance(storage.get("components", []), list):
            bad("storage.json", '"components" must be a list')


# ---- derived facts ------------------------------------------------------------------------------


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


def summarize(rep: dict) -> dict:
    """Facts the page and --json show beside the raw documents: routing per layer and why, dominant kinds."""
    analysis, method, storage = rep["analysis"], rep["method"] or {}, rep["storage"]
    name = method.get("method") or rep.get("built_with")
    tasks = [str(t) for t in analysis.get("tasks") or method.get("tasks") or []]
    warnings = []
    if rep["method"] is None:
        warnings.append("method.json is missing (build unfinished?): routing decisions are not shown")
    if storage is None:
        warnings.append("storage.json is missing (build unfinished?): storage is not shown")
    if rep["method"] is not None and rep.get("built_with") not in (None, "?", name):
        warnings.append(f"method.json says {name!r} but the store was built with {rep['built_with']!r}")

    # the score Mediator ranked layers by: d (default) or the pairwise conflict (conflict: pairwise)
    score_key = method.get("score") if method.get("score") in ("d", "pairwise") else "d"
    routing = name == "mediator" and rep["method"] is not None
    layers = analysis.get("layers") or []
    decoder = _stack_rows(layers, method, score_key, routing, warnings, "")
    # the other stacks (a vision tower): their own layers, ranks and routing (plan/routed.py)
    stack_decisions = method.get("stacks") if isinstance(method.get("stacks"), dict) else {}
    stacks = {}
    for stack, doc in (analysis.get("stacks") or {}).items():
        if isinstance(doc, dict) and isinstance(doc.get("layers"), list):
            decision = stack_decisions.get(stack) if isinstance(stack_decisions.get(stack), dict) else {}
            stacks[stack] = {
                "num_layers": doc.get("num_layers", len(doc["layers"])),
                **_stack_rows(doc["layers"], {**method, **{k: decision.get(k) for k in ("routed_layers", "selection", "scores")}},
                              score_key, routing, warnings, f"{stack} "),
            }

    return {
        "method": name,
        "tasks": tasks,
        "variant": analysis.get("variant"),
        "score": score_key,
        "num_layers": analysis.get("num_layers", len(layers)),
        **decoder,
        "stacks": stacks,
        "dominant_kind": _dominant(analysis, method, tasks),
        "warnings": warnings,
    }


def _stack_rows(layers: list, method: dict, score_key: str, routing: bool, warnings: list, stack: str) -> dict:
    """The rows of one stack's layers (layer, d, score, rank, routed, why) and its routing facts;
    `method` holds that stack's routed_layers, selection and scores; warnings name the stack."""
    idx = [lay.get("layer", i) for i, lay in enumerate(layers)]
    ds = [_num(lay.get("d")) for lay in layers]
    scores = [_num(lay.get(score_key)) for lay in layers]
    given = method.get("scores")
    if isinstance(given, list) and len(given) == len(layers):
        scores = [_num(x) for x in given]
    routed = None
    threshold = None
    selection = method.get("selection") if isinstance(method.get("selection"), dict) else {}
    mode = selection.get("mode")
    if routing:
        routed = sorted({r for r in method.get("routed_layers") or [] if isinstance(r, int)})
        if mode == "threshold":
            threshold = _num(selection.get("threshold"))
        missing = [r for r in routed if r not in idx]
        if missing:
            warnings.append(f"routed {stack}layer(s) {missing} are not in analysis.json")

    # rank 1 = highest d (ties: lower layer first), the order in which top-K routes
    order = sorted((i for i in range(len(layers)) if scores[i] is not None), key=lambda i: (-scores[i], idx[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    rows = []
    for i, lay in enumerate(layers):
        is_routed = routed is not None and idx[i] in routed
        rows.append({
            "layer": idx[i],
            "d": ds[i],
            "score": scores[i],
            "rank": rank.get(i),
            "routed": is_routed,
            "why": _why(is_routed, scores[i], score_key, rank.get(i), len(order), mode, selection, threshold, method)
            if routed is not None else None,
        })
    if routed is not None:
        warnings += [stack + w for w in _routing_warnings(rows, mode, selection, threshold, SCORE_NAMES[score_key])]
    return {
        "routed_layers": routed,
        "selection_mode": mode if routed is not None else None,
        "threshold": threshold,
        "layers": rows,
    }


def _k_text(k) -> str:
    if isinstance(k, float) and 0 < k < 1:
        return f"{100 * k:g}% of layers"
    if isinstance(k, (int, float)) and not isinstance(k, bool):
        return f"{k:g}"
    return "?"


SCORE_NAMES = {"d": "d_l", "pairwise": "pairwise conflict"}


def _why(routed, score, score_key, rank, n_ranked, mode, selection, threshold, method) -> str:
    if not routed:
        return f"averaged ({method.get('average') or 'mean'})"
    name = SCORE_NAMES[score_key]
    if mode == "top_k":
        return f"top-K by {name} (K = {_k_text(selection.get('k'))}; rank {rank} of {n_ranked})"
    if mode == "threshold" and score is not None and threshold is not None:
        return f"{name} > γ ({score:.3f} > {threshold:.3f})"
    return f"routed (selection {mode or 'unknown'})"


def _routing_warnings(rows, mode, selection, threshold, name) -> list[str]:
    """The routed set should follow from the scores and the selection rule: say where it does not."""
    out = []
    scored = [r for r in rows if r["score"] is not None]
    inn = [r for r in scored if r["routed"]]
    outside = [r for r in scored if not r["routed"]]
    if mode == "top_k":
        k = selection.get("k")
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1 and len([r for r in rows if r["routed"]]) != min(k, len(rows)):
            out.append(f"selection top_k with K = {k} but {sum(r['routed'] for r in rows)} layer(s) are routed")
        if inn and outside:
            lo = min(inn, key=lambda r: r["score"])
            hi = max(outside, key=lambda r: r["score"])
            if hi["score"] > lo["score"]:
                out.append(
                    f"layer {hi['layer']} ({name} {hi['score']:.3f}) is not routed but routed layer {lo['layer']} has a "
                    f"lower {name} ({lo['score']:.3f})"
                )
    elif mode == "threshold" and threshold is not None:
        below = [r["layer"] for r in inn if not r["score"] > threshold]
        above = [r["layer"] for r in outside if r["score"] > threshold]
        if below:
            out.append(f"routed layer(s) {below} have {name} <= γ = {threshold:.3f}")
        if above:
            out.append(f"layer(s) {above} have {name} > γ = {threshold:.3f} but are not routed")
    return out


def _expected_kind(task: str, method: dict) -> str | None:
    types = method.get("task_types") or method.get("task_type")
    if isinstance(types, dict) and types.get(task) in _TYPE_EXPECT:
        return _TYPE_EXPECT[types[task]]
    for pattern, kind in _EXPECT:
        if pattern.search(task):
            return kind
    return None


def _dominant(analysis: dict, method: dict, tasks: list[str]) -> dict:
    """Per task: the kind holding the largest share of its squared norm, and attention vs MLP."""
    shares = analysis.get("norm_share") or {}
    avm = analysis.get("attention_vs_mlp") or {}
    out = {}
    for t in list(tasks) + [t for t in list(shares) + list(avm) if t not in tasks]:
        if t in out:
            continue
        s = shares.get(t) if isinstance(shares.get(t), dict) else {}
        a = avm.get(t) if isinstance(avm.get(t), dict) else {}
        vals = {k: _num(v) for k, v in s.items() if _num(v) is not None}
        top = max(vals, key=vals.get) if vals else None
        att, mlp = _num(a.get("attention")), _num(a.get("mlp"))
        if att is None or mlp is None:  # fall back on the raw shares
            att, mlp = vals.get("attention"), vals.get("mlp")
            if att is not None and mlp is not None and att + mlp > 0:
                att, mlp = att / (att + mlp), mlp / (att + mlp)
        between = None if att is None or mlp is None else ("attention" if att > mlp else "mlp" if mlp > att else "tie")
        expected = _expected_kind(t, method)
        out[t] = {
            "kind": top,
            "share": vals.get(top) if top else None,
            "attention": att,
            "mlp": mlp,
            "attention_vs_mlp": between,
            "paper_expects": expected,
            "agrees": None if expected is None or between in (None, "tie") else expected == between,
        }
    return out


# ---- writing ------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["load_report", "write_report", "summarize", "ROUTING_METHODS"]
