#!/usr/bin/env python
"""Why uncertainty routing alone does not beat top-1 on the harness's out-of-distribution
prompts, and what a router with a background class changes.

For Mediator stores already built by `run.py` (cached checkpoints, same prompts), this scores
the OOD prompts per kind under weightings of the sparse experts that Mediator could apply, with
the router fitted on the task prompts only (logistic regression, weight decay 1):

  top-1             D + S_k, k the router's argmax (eta 1)
  Mediator          the default rule: D + sum_t p_t S_t when the normalised entropy > eta 0.5
  uniform if H>eta  D + mean_t S_t (the averaged model) for the uncertain prompts
  temp T if H>eta   D + sum_t p_t^(1/T) S_t / Z: flatter than p for the uncertain prompts
  uniform all       D + mean_t S_t for every prompt

and prints, per kind, the router's argmax and median entropy; first, how far each test set and
OOD kind lies from the router's training prompts (`novelty`). What it shows (README, Merge
quality): the kind that a mix of experts helps (two-digit arithmetic without `calc`: the
averaged model solves 38-39 %, the math expert 22-23 %) is routed to math with confidence, and
the kinds the router is unsure of (facts-format arithmetic, calc-format list sums) are best
served by the top expert; so no entropy rule over these probabilities beats top-1.

Then (`background`), for the same stores, top-1 against Mediator's rule (eta 0.5) with the
router fitted without and with a background class (`router fit --background`: the harness's
background prompts, beginnings of pretraining-like documents), on the harness's OOD draw and
on a second draw of the same kinds (seed "ood-2"), with the in-distribution average beside.

    python tools/quality/ood_probe.py [--stores mediator-8-0.5-outside,mediator-8-0.2-outside]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from quality import tasks as T  # noqa: E402
from quality.config import CONFIGS  # noqa: E402
from quality.evaluate import EvalSets, Memo, RoutedEval, load_model, matches  # noqa: E402
from quality.run import OOD_ETA, OOD_ROUTER, PLAIN_ROUTER, ROUTERS  # noqa: E402
from quality.train import cache_dir  # noqa: E402


def probe(ev: RoutedEval, sets: EvalSets) -> tuple[list, dict]:
    """(rule, OOD accuracy, per-kind accuracy) per rule, and per kind: (argmax task, its count,
    prompts, median normalised entropy)."""
    from streammerge.routing.decision import Decision, normalized_entropy

    kinds = [k for k, _, _ in sets.ood]
    prompts = [p for _, p, _ in sets.ood]
    answers = [a for _, _, a in sets.ood]
    P = np.asarray(ev.probs("ood", prompts))
    H = np.array([normalized_entropy(p) for p in P])
    tasks = ev.rm.tasks
    top1 = [ev.rm.decide(p, eta=1.0) for p in P]

    def mix(w) -> Decision:
        return Decision("mix", tuple((t, round(float(x), 3)) for t, x in zip(tasks, w)))

    uniform = mix(np.full(len(tasks), 1 / len(tasks)))

    def tempered(p, temp):
        q = np.asarray(p) ** (1 / temp)
        return mix(q / q.sum())

    rules = {
        "top-1": top1,
        f"Mediator (eta {OOD_ETA:g})": [ev.rm.decide(p, eta=OOD_ETA) for p in P],
        f"uniform if H>{OOD_ETA:g}": [uniform if h > OOD_ETA else d for h, d in zip(H, top1)],
        f"temp 2 if H>{OOD_ETA:g}": [tempered(p, 2.0) if h > OOD_ETA else d for h, p, d in zip(H, P, top1)],
        "uniform all": [uniform] * len(P),
    }
    rows = []
    for name, decisions in rules.items():
        outs = ev._gen(decisions, prompts, sets.budget["ood"])
        ok = np.array(matches(outs, answers))
        per = {k: float(ok[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in T.OOD_KINDS}
        rows.append((name, float(ok.mean()), per))
    routing = {}
    for k in T.OOD_KINDS:
        ix = [i for i, kk in enumerate(kinds) if kk == k]
        picks = np.bincount(P[ix].argmax(1), minlength=len(tasks))
        routing[k] = (tasks[int(picks.argmax())], int(picks.max()), len(ix), float(np.median(H[ix])))
    return rows, routing


DRAWS = ("ood", "ood-2")


def background(store: Path, sets: EvalSets, memo: Memo, cfg) -> tuple[list[tuple], dict]:
    """(router, draw, rule, OOD accuracy, per kind, in-distribution average, mixed share of OOD,
    median p of none on arith) for top-1 and Mediator's rule, routers without and with the
    background class, on two draws of the OOD prompts; and the per-prompt exact matches
    {(router, rule): [bool] over both draws} for the paired comparisons."""
    import dataclasses

    from streammerge.routing.decision import NONE

    out, correct = [], {}
    for draw in DRAWS:
        s = dataclasses.replace(sets, ood=T.ood_set(cfg.n_ood, cfg.difficulty, seed=draw))
        prompts, answers = [p for _, p, _ in s.ood], [a for _, _, a in s.ood]
        for rname in (PLAIN_ROUTER, OOD_ROUTER, "mlp+bg"):
            ev = RoutedEval(store, s, memo, router_kw=ROUTERS[rname])
            probs = np.asarray(ev.probs("ood", prompts))  # what evaluate() routes with
            classes = ev.rm.router.classes
            arith = [i for i, (k, _, _) in enumerate(s.ood) if k == "arith"]
            none = float(np.median(probs[arith, classes.index(NONE)])) if NONE in classes else None
            for rule, eta in (("top-1", 1.0), (f"Mediator (eta {OOD_ETA:g})", OOD_ETA)):
                e = ev.evaluate("router", eta=eta)
                out.append((rname, draw, rule, e["ood_all"], e["ood"], e["avg"], e["mixed_share"]["ood"], none))
                outs = ev._gen([ev.rm.decide(p, eta=eta) for p in probs], prompts, s.budget["ood"])  # memoised
                correct.setdefault((rname, rule), []).extend(matches(outs, answers))
    return out, correct


def paired(x, y) -> tuple[int, int, float]:
    """(prompts y solves and x does not, the reverse, two-sided exact McNemar p)."""
    import math

    x, y = np.asarray(x), np.asarray(y)
    win, lose = int((y & ~x).sum()), int((x & ~y).sum())
    n = win + lose
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(max(win, lose), n + 1)) / 2**n) if n else 1.0
    return win, lose, p


def novelty(root: Path, sets: EvalSets) -> dict:
    """Median Mahalanobis distance to the nearest task's router prompts (class means, shared
    covariance, in the base model's mean hidden states) of each test set and each OOD kind: how
    far from what the router was fitted on a prompt lies, which its entropy does not see."""
    import torch

    from quality.evaluate import features

    model, tok = load_model(root / "base", "cpu")
    with torch.inference_mode():
        feats = lambda prompts: np.asarray(features(model, tok, prompts), dtype=np.float64)  # noqa: E731
        X = [feats(sets.router[t]) for t in T.TASKS]
        groups = {f"test {t}": feats([p for p, _ in sets.tests[t]]) for t in T.TASKS}
        for k in T.OOD_KINDS:
            groups[f"OOD {k}"] = feats([p for kk, p, _ in sets.ood if kk == k])
    mu = np.stack([x.mean(0) for x in X])
    R = np.concatenate([x - m for x, m in zip(X, mu)])
    cov = R.T @ R / len(R)
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    inv = np.linalg.inv(cov)

    def dist(F):
        d = F[:, None, :] - mu[None]
        return np.sqrt(np.einsum("nkd,de,nke->nk", d, inv, d)).min(1)

    return {name: float(np.median(dist(F))) for name, F in groups.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", default="mediator-8-0.5-outside,mediator-8-0.2-outside", help="Mediator rows of run.py (built already)")
    ap.add_argument("--config", default="full", choices=sorted(CONFIGS))
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-out" / "quality")
    a = ap.parse_args(argv)
    cfg = CONFIGS[a.config]
    root = cache_dir(cfg, a.cache)
    _, tok = load_model(root / "base", "cpu")
    sets = EvalSets.make(cfg, tok)
    memo = Memo()
    print("Median Mahalanobis distance to the nearest task's router prompts (base model features):\n")
    print("| prompts | distance |\n|---|---:|")
    for name, d in novelty(root, sets).items():
        print(f"| {name} | {d:.1f} |")
    for name in a.stores.split(","):
        store = root / "merges" / name / "job.zarr"
        if not store.is_dir():
            print(f"{store}: not built (run tools/quality/run.py first)", file=sys.stderr)
            return 1
        ev = RoutedEval(store, sets, memo, router_kw=ROUTERS[PLAIN_ROUTER])
        rows, routing = probe(ev, sets)
        print(f"\n{name}, router {PLAIN_ROUTER}: " + "; ".join(
            f"{k} -> {t} for {n}/{m} prompts, median entropy {h:.2f}" for k, (t, n, m, h) in routing.items()))
        print("\n| rule | OOD | " + " | ".join(T.OOD_KINDS) + " |")
        print("|---|---:|" + "---:|" * len(T.OOD_KINDS))
        for rule, acc, per in rows:
            print(f"| {rule} | {100 * acc:.1f} | " + " | ".join(f"{100 * per[k]:.0f}" for k in T.OOD_KINDS) + " |")
    print("\n## With a background class\n")
    print(f"Routers {PLAIN_ROUTER} (tasks only), {OOD_ROUTER} and mlp+bg (fitted with {len(sets.background)} background prompts too); "
          "draw `ood` is the harness's OOD set, `ood-2` a second draw of the same kinds. `none` is the median probability "
          "of the background class on the arith prompts. In-distribution: the average over the four test sets.")
    for name in a.stores.split(","):
        rows, correct = background(root / "merges" / name / "job.zarr", sets, memo, cfg)
        print(f"\n{name}:\n")
        print("| router | draw | rule | OOD | " + " | ".join(T.OOD_KINDS) + " | mixed | none (arith) | in-distribution |")
        print("|---|---|---|---:|" + "---:|" * len(T.OOD_KINDS) + "---:|---:|---:|")
        for rname, draw, rule, acc, per, avg, mixed, none in rows:
            print(f"| {rname} | {draw} | {rule} | {100 * acc:.1f} | " + " | ".join(f"{100 * per[k]:.0f}" for k in T.OOD_KINDS)
                  + f" | {100 * mixed:.0f}% | {'-' if none is None else f'{none:.2f}'} | {100 * avg:.1f} |")
        med = correct[(OOD_ROUTER, f"Mediator (eta {OOD_ETA:g})")]
        print(f"\nPaired, both draws ({len(med)} prompts): Mediator (eta {OOD_ETA:g}) with {OOD_ROUTER} "
              f"solves {100 * np.mean(med):.1f} %, against")
        for rname in (OOD_ROUTER, PLAIN_ROUTER):
            base = correct[(rname, "top-1")]
            win, lose, p = paired(base, med)
            print(f"- top-1 with {rname}: {100 * np.mean(base):.1f} %; {win} prompts solved only by Mediator, {lose} only by "
                  f"top-1 (two-sided exact McNemar p = {p:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
