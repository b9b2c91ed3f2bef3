"""The results table (markdown), the targets check and the accuracy-vs-storage plot."""

from __future__ import annotations

from pathlib import Path

from . import tasks as T

STATIC_FAMILIES = ("task_arithmetic", "ties", "dare_ties")


def _pct(x):
    return "" if x is None else f"{100 * x:.1f}"


def rows_for_table(results: dict) -> list[dict]:
    return [r for r in results["rows"] if r.get("in_table", True)]


def share_of_full(r: dict, ref: float) -> float:
    """A row's average over full routing's: over several seeds, the mean of the per-seed shares
    (each seed's row against the same seed's full routing)."""
    if "share" in r:
        return r["share"]
    return r["avg"] / ref if ref else 0.0


# ---- several seeds ------------------------------------------------------------------------


def _mean_tree(values: list):
    """The mean of numbers at the same place in equally shaped JSON values (dicts: their common
    keys; lists of one length: element-wise); anything else is the first value's."""
    first = values[0]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values) / len(values)
    if all(isinstance(v, dict) for v in values):
        return {k: _mean_tree([v[k] for v in values]) for k in first if all(k in v for v in values)}
    if all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [_mean_tree(list(z)) for z in zip(*values)]
    return first


def aggregate(per_seed: dict) -> dict:
    """One results dict from the per-seed ones ({seed: results}): every number is the mean over
    the seeds (rows present in every seed, in the first seed's order), and each row carries
    its per-seed `seeds` values and `range` ([min, max]) of avg, share of full routing and OOD.
    Targets are judged on the means."""
    runs = list(per_seed.values())
    out = _mean_tree(runs)
    by_name = [{r["name"]: r for r in run["rows"]} for run in runs]
    rows = []
    for name in (r["name"] for r in runs[0]["rows"]):
        if not all(name in b for b in by_name):
            continue
        rs = [b[name] for b in by_name]
        values = {"avg": [r["avg"] for r in rs], "share": [r["avg"] / run["reference_avg"] for r, run in zip(rs, runs)],
                  "ood_all": [r.get("ood_all") for r in rs]}
        row = _mean_tree(rs)
        row["share"] = sum(values["share"]) / len(rs)
        row["seeds"] = {k: v for k, v in values.items() if None not in v}
        row["range"] = {k: [min(v), max(v)] for k, v in row["seeds"].items()}
        rows.append(row)
    detail = runs[0]["config_detail"]
    out.update(rows=rows, seeds=list(per_seed), config_detail={**detail, "training": {**detail["training"], "seed": list(per_seed)}},
               seconds=round(sum(r["seconds"] for r in runs), 1), generated_prompts=sum(r["generated_prompts"] for r in runs))
    if all("train" in r for r in runs):  # what the per-seed outputs recorded of their training
        trains = [r["train"] for r in runs]
        out["train"] = {"hash": [t["hash"] for t in trains], "device": "; ".join(dict.fromkeys(t["device"] for t in trains)),
                        "seconds": round(sum(t["seconds"] for t in trains), 1)}
    out["targets"] = targets(out)
    return out


def _range(r: dict, key: str) -> str:
    """Over several seeds, ` (min-max)` of a row's `key` in %; else nothing."""
    lo_hi = r.get("range", {}).get(key)
    return f" ({100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f})" if lo_hi else ""


def markdown_table(results: dict) -> str:
    ref = results["reference_avg"]
    full_bytes = results["full_routing_bytes"]
    head = ["model", "family", "parameters", *T.TASKS, "avg", "% of full routing", "OOD", "storage (MiB)", "% of full routing storage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows_for_table(results):
        cells = [r["name"], r["family"], r["label"]]
        cells += [_pct(r["acc"][t]) for t in T.TASKS]
        cells += [f"**{_pct(r['avg'])}**" + _range(r, "avg"), (_pct(share_of_full(r, ref)) + _range(r, "share")) if ref else "",
                  _pct(r.get("ood_all")) + _range(r, "ood_all")]
        cells += [f"{r['storage_bytes'] / 2**20:.1f}", f"{100 * r['storage_bytes'] / full_bytes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: dict) -> dict:
    """The issue's three targets, on the rows named by results['chosen'] (the tuned defaults)
    and on the best row of each family."""
    ref = results["reference_avg"]
    full_bytes = results["full_routing_bytes"]
    rows = {r["name"]: r for r in results["rows"]}
    static = [r for r in results["rows"] if r["family"] in STATIC_FAMILIES]
    best_static = max(static, key=lambda r: r["avg"]) if static else None
    out = {"reference_avg": ref, "best_static": best_static and {"name": best_static["name"], "avg": best_static["avg"]}}

    def share(r):
        return share_of_full(r, ref)

    bits = [r for r in results["rows"] if r["family"] == "1bit"]
    if bits:
        ok = [r for r in bits if r["storage_bytes"] <= 0.5 * full_bytes]
        best = max(ok or bits, key=lambda r: r["avg"])
        chosen = rows.get(results.get("chosen", {}).get("1bit"), best)
        out["1bit"] = {
            "row": chosen["name"], "share_of_full": share(chosen), "storage_share": chosen["storage_bytes"] / full_bytes,
            "met": share(chosen) >= 0.95 and chosen["storage_bytes"] <= 0.5 * full_bytes,
            "best_row": best["name"], "best_share_of_full": share(best),
        }
    meds = [r for r in results["rows"] if r["family"] == "mediator"]
    if meds:
        # a Mediator that stores more than full routing is dominated by it: judged below that
        best = max([r for r in meds if r["storage_bytes"] < full_bytes] or meds, key=lambda r: r["avg"])
        best_any = max(meds, key=lambda r: r["avg"])
        chosen = rows.get(results.get("chosen", {}).get("mediator"), best)
        # without a static row (an --only run of routing rows) the margin is not known: not judged (met None)
        margin = chosen["avg"] - best_static["avg"] if best_static else None
        out["mediator"] = {
            "row": chosen["name"], "share_of_full": share(chosen), "margin_over_best_static": margin,
            "met": None if margin is None else share(chosen) >= 0.95 and margin >= 0.10,
            "storage_share": chosen["storage_bytes"] / full_bytes,
            "best_any_storage": {"row": best_any["name"], "share_of_full": share(best_any), "storage_share": best_any["storage_bytes"] / full_bytes,
                                 "margin_over_best_static": best_any["avg"] - best_static["avg"] if best_static else None},
        }
        ood = results.get("ood_routing", {}).get(chosen["name"])
        if ood:
            # beaten: top-1 with the same router, and with the classifier fitted without the
            # background class (runs before it existed have no such key)
            top1 = max(ood["top1"], ood.get("top1_plain", 0.0))
            out["ood"] = {"row": chosen["name"], **ood, "top1_best": top1, "met": ood["uncertainty"] > top1}
            best = max(((n, r, e, v["ood_all"]) for n, by in results.get("eta_sweep", {}).items() for r, x in by.items()
                        for e, v in x["sweep"].items()), key=lambda z: z[3])
            out["ood"]["best_in_sweep"] = {"row": best[0], "router": best[1], "eta": best[2], "ood": best[3],
                                           "top1": results["eta_sweep"][best[0]][best[1]]["sweep"]["1"]["ood_all"]}
    # issue #21's tighter pair: the best row of the family within the storage cap, judged on
    # its share of full routing (over seeds, the mean of the per-seed shares)
    for key, family, cap, need in TIGHT_TARGETS:
        within = [r for r in results["rows"] if r["family"] == family and r["storage_bytes"] <= cap * full_bytes]
        if not [r for r in results["rows"] if r["family"] == family]:
            continue
        best = max(within, key=share) if within else None
        out[key] = {"cap": cap, "need": need, "row": best and best["name"], "share_of_full": best and share(best),
                    "storage_share": best and best["storage_bytes"] / full_bytes, "met": bool(best) and share(best) >= need}
    return out


# (key, family, storage cap as a share of full routing's, share of full routing needed)
TIGHT_TARGETS = (("1bit_tight", "1bit", 0.35, 0.95), ("mediator_tight", "mediator", 0.60, 0.97))
TIGHT_NAMES = {"1bit_tight": "1bit-Merging", "mediator_tight": "Mediator"}


def targets_markdown(t: dict) -> str:
    lines = []
    if "1bit" in t:
        b = t["1bit"]
        lines.append(
            f"- 1bit-Merging >= 95% of full routing at <= 50% of its storage: **{'met' if b['met'] else 'missed'}** "
            f"({b['row']}: {100 * b['share_of_full']:.1f}% of full routing at {100 * b['storage_share']:.1f}% of its storage"
            + ("" if b["met"] else f"; {100 * (0.95 - b['share_of_full']):.1f} points short") + ")"
        )
    if "mediator" in t:
        m = t["mediator"]
        bs = t["best_static"]
        a = m["best_any_storage"]
        verdict = "not judged" if m["met"] is None else "met" if m["met"] else "missed"
        static = (f", {100 * m['margin_over_best_static']:+.1f} points over {bs['name']} at {100 * bs['avg']:.1f}" if bs
                  else ", no static merge among these rows")
        lines.append(
            f"- Mediator >= 95% of full routing and >= 10 points over the best static merge: **{verdict}** "
            f"({m['row']}, the best below full routing's storage: {100 * m['share_of_full']:.1f}% of full routing at "
            f"{100 * m['storage_share']:.1f}% of its storage{static}"
            + ("" if m["share_of_full"] >= 0.95 else f"; {100 * (0.95 - m['share_of_full']):.1f} points short of 95%")
            + (f". Best at any storage: {a['row']}, {100 * a['share_of_full']:.1f}% at {100 * a['storage_share']:.1f}% of full routing's storage"
               if a["row"] != m["row"] else "") + ")"
        )
    for key, *_ in TIGHT_TARGETS:
        if key not in t:
            continue
        x = t[key]
        head = f"- {TIGHT_NAMES[key]} >= {100 * x['need']:.0f}% of full routing at <= {100 * x['cap']:.0f}% of its storage (issue #21): "
        if x["row"] is None:
            lines.append(head + "**missed** (no row within that storage)")
            continue
        lines.append(head + f"**{'met' if x['met'] else 'missed'}** ({x['row']}, the best within that storage: "
                     f"{100 * x['share_of_full']:.1f}% of full routing at {100 * x['storage_share']:.1f}% of its storage"
                     + ("" if x["met"] else f"; {100 * (x['need'] - x['share_of_full']):.1f} points short") + ")")
    if "ood" in t:
        o = t["ood"]
        b = o["best_in_sweep"]
        diff = round((o["uncertainty"] - o["top1_best"]) * o["n"])
        verdict = ("met" if o["met"] else "missed") + (f" (by {diff:+d} prompts: within noise)" if abs(diff) < 5 else "")
        plain = (f"; top-1 with router {o['plain_router']} (no background class) {100 * o['top1_plain']:.1f}%, its uncertainty "
                 f"routing {100 * o['uncertainty_plain']:.1f}%" if "top1_plain" in o else "")
        lines.append(
            f"- OOD: uncertainty routing beats top-1: **{verdict}** "
            f"({o['row']}, router {o['router']}, eta {o['eta']:g}: {100 * o['uncertainty']:.1f}% vs top-1 {100 * o['top1']:.1f}%{plain} "
            f"({diff:+d} of {o['n']:.0f} prompts over the better top-1; {100 * o['mixed']:.0f}% of them mixed); best of the sweep: "
            f"{b['row']}, router {b['router']}, eta {b['eta']}: {100 * b['ood']:.1f}% vs top-1 {100 * b['top1']:.1f}%; "
            "a second draw of the OOD prompts and paired tests: ood_probe.md)"
        )
    return "\n".join(lines)


def eta_markdown(results: dict) -> str:
    """OOD accuracy (share of OOD prompts mixed) per Mediator store, router and eta."""
    sweep = results.get("eta_sweep") or {}
    if not sweep:
        return "(no Mediator rows)"
    first = next(iter(sweep.values()))
    etas = list(next(iter(first.values()))["sweep"])
    lines = ["| store | router | in-dist entropy max | OOD entropy p10 / p50 / p90 | " + " | ".join(f"eta {e}" for e in etas) + " |",
             "|---|---|---:|---:|" + "---:|" * len(etas)]
    for name, by_router in sweep.items():
        for rname, r in by_router.items():
            ind = max(r["entropy"][t]["max"] for t in T.TASKS)
            o = r["entropy"]["ood"]
            cells = []
            for v in r["sweep"].values():
                tests_mixed = max(v["mixed_share"][t] for t in T.TASKS)
                cells.append(f"{100 * v['ood_all']:.1f} ({100 * v['mixed_share']['ood']:.0f}%" + (f"; tests {100 * tests_mixed:.0f}% mixed, avg {100 * v['avg']:.1f}" if tests_mixed > 0 else "") + ")")
            lines.append(f"| {name} | {rname} | {ind:.3g} | {o['p10']:.3g} / {o['p50']:.3g} / {o['p90']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def whatif_markdown(results: dict) -> str:
    w = results.get("whatif") or []
    if not w:
        return "(none)"
    ref, full = results["reference_avg"], results["full_routing_bytes"]
    lines = ["| simulated variant | " + " | ".join(T.TASKS) + " | avg | % of full routing | % of full routing storage |",
             "|---|" + "---:|" * (len(T.TASKS) + 3)]
    for r in w:
        lines.append(f"| {r['name']} | " + " | ".join(_pct(r["acc"][t]) for t in T.TASKS)
                     + f" | {_pct(r['avg'])} | {100 * r['avg'] / ref:.1f} | {100 * r['storage_bytes'] / full:.1f} |")
    return "\n".join(lines)


def norm_share_markdown(results: dict) -> str:
    shares, n = results.get("norm_share"), results.get("kind_params")
    if not shares or not n:
        return "(no analysis)"
    kinds = [k for k in ("attention", "mlp", "embedding", "norm") if k in n]
    total = sum(n.values())
    lines = ["| task | " + " | ".join(f"{k} ({100 * n[k] / total:.1f}% of parameters)" for k in kinds) + " |",
             "|---|" + "---:|" * len(kinds)]
    for task, sh in shares.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * sh[k]:.1f}% ({sh[k] / (n[k] / total):.2f}x)" for k in kinds) + " |")
    return "\n".join(lines)


FAMILY_STYLE = {
    "base": ("black", "x"), "expert": ("gray", "s"), "full routing": ("black", "*"), "linear": ("tab:brown", "v"),
    "task_arithmetic": ("tab:blue", "o"), "ties": ("tab:orange", "o"), "dare_ties": ("tab:olive", "o"),
    "mergekit": ("tab:cyan", "D"), "1bit": ("tab:green", "^"), "mediator": ("tab:red", "P"), "what-if": ("tab:purple", "o"),
    "lora": ("tab:pink", "h"),
}
# static merges all cost one model: spread them a little along x so that they stay visible
X_OFFSET = {"linear": -1.6, "task_arithmetic": -0.8, "ties": 0.0, "dare_ties": 0.8, "mergekit": 1.6}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_bytes = results["full_routing_bytes"]
    ref = results["reference_avg"]
    rows = [r for r in rows_for_table(results) if r["family"] != "expert"]
    best = {}
    for r in rows:
        if r["family"] not in best or r["avg"] > best[r["family"]]["avg"]:
            best[r["family"]] = r
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    seen = set()
    points = [(r["family"], r["name"], r["storage_bytes"], r["avg"], r.get("range", {}).get("avg")) for r in rows]
    points += [("what-if", w["name"], w["storage_bytes"], w["avg"], None) for w in results.get("whatif") or []]
    for family, name, nbytes, avg, lo_hi in points:
        color, marker = FAMILY_STYLE.get(family, ("gray", "o"))
        x, y = 100 * nbytes / full_bytes + X_OFFSET.get(family, 0.0), 100 * avg
        if lo_hi:  # several seeds: the mean, with a bar from the lowest seed to the highest
            ax.errorbar([x], [y], yerr=[[y - 100 * lo_hi[0]], [100 * lo_hi[1] - y]], fmt="none", ecolor=color, elinewidth=1, capsize=3, zorder=2)
        hollow = family in ("mergekit", "what-if")
        style = {"c": color} if marker == "x" else {"facecolors": "none" if hollow else color, "edgecolors": color}
        ax.scatter([x], [y], marker=marker, s=70 if family != "full routing" else 140, zorder=3, linewidths=1.5,
                   label=None if family in seen else ("what-if (simulated)" if family == "what-if" else family), **style)
        seen.add(family)
        if family in ("mediator", "what-if", "lora") or name in ("1bit-paper", "1bit-auto", "1bit-uniform") or best.get(family, {}).get("name") == name:
            ax.annotate(name.replace("full-routing-oracle", "full routing (oracle = router)"), (x, y),
                        textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.axhline(100 * ref, color="black", lw=0.8, ls="--")
    ax.axhline(95 * ref, color="gray", lw=0.8, ls=":", label="95% of full routing")
    ax.axvline(50, color="gray", lw=0.8, ls="-.", label="50% of full routing storage")
    ax.set_xlabel("storage, % of full routing (N fine-tuned models); static merges spread by +-1.6 for legibility")
    ax.set_ylabel(f"average exact match over {len(T.TASKS)} held-out tasks (%)")
    seeds = results.get("seeds")
    ax.set_title(f"Merge quality vs storage ({results['config']} configuration, {results['n_params'] / 1e6:.1f}M-parameter Llama, 4 experts"
                 + (f")\nmean of seeds {', '.join(map(str, seeds))}; bars: the lowest to the highest seed" if seeds else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
