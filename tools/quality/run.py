#!/usr/bin/env python
"""Measured merge quality: train small real experts, score every method on held-out tasks.

    python tools/quality/run.py --out results/quality                 # full configuration
    python tools/quality/run.py --out /tmp/q --config smoke           # CPU smoke test (~1 min)
    python tools/quality/run.py --out results/quality --seeds 0,1,2   # three seeds, their means and ranges

Steps (each cached under --cache, default bench-out/quality/<config>-<hash>/):
  1. train: tokenizer, base model (pretraining on the mixed corpus), one expert per task
     (tools/quality/train.py; --train-device, default cuda when available). Skipped when the
     checkpoints of this configuration are cached. --train-only stops after it (with a quick
     score of the base and the experts); --pack DIR writes one tar per model (to move them off
     a GPU machine) and --import DIR unpacks such tars into the cache.
  2. merge: every recipe of tools/quality/merges.py with streammerge (stores resume, so a
     rerun recomputes nothing), task_arithmetic and ties with mergekit too.
  3. evaluate (--device, default cpu): greedy exact match per task and on out-of-distribution
     prompts for the base, each expert, full routing (oracle and fitted router), every static
     merge, and every routing store (oracle task, fitted router, static fallback; Mediator under
     several entropy thresholds), and the LoRA exports of the stores adapters.SOURCES names at
     ranks 8, 32 and 128 (shipped model + the routed task's adapter, loaded by peft).
     --via-server scores the routing stores' rows again through `streammerge serve`
     (tools/quality/evaluate.py ServedEval) and counts differing answers.
  4. write OUT/results.json, OUT/results.md (table + targets) and OUT/accuracy_vs_storage.png.
     With --only NAMES, the rows evaluated replace theirs in an existing OUT/results.json (the
     other rows are kept; the run is listed as a rerun); --fresh writes them alone.
  --seeds 0,1,2: steps 1-4 once per seed (Config.with_seed: its own cache, OUT/seed-N/,
     --pack DIR/seed-N/, --import DIR/seed-N/), then OUT/results.{json,md} and the plot give every
     row's mean over the seeds with its min-max (table.aggregate). Seeds run apart (say one per
     GPU machine, each with --seeds N --out SOMEWHERE) are gathered as OUT/seed-N/ and
     `--report-only --seeds 0,1,2 --out OUT` writes their means (rows scored in every seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from quality import adapters as LR
from quality import merges as M
from quality import table as TB
from quality import tasks as T
from quality.config import CONFIGS
from quality.train import cache_dir, describe_device, is_trained, log, pack, train_all, unpack

ETAS = (0.01, 0.1, 0.3, 0.5, 0.7, 1.0)  # Mediator's entropy threshold; 1 = always top-1
# Routers fitted for Mediator's uncertainty routing (streammerge.routing.router.fit_router
# options). The default MLP reaches 100 % held-out accuracy and is so confident that its
# out-of-distribution entropies stay under 0.02: it never mixes. L2-regularised logistic
# regression keeps the accuracy and spreads the probabilities where the prompt is ambiguous.
# "+bg": fitted with the background class too (EvalSets.background, `router fit --background`).
ROUTERS = {
    "mlp": {}, "logreg-wd0.1": {"classifier": "logreg", "weight_decay": 0.1}, "logreg-wd1": {"classifier": "logreg", "weight_decay": 1.0},
    "mlp+bg": {"background": True}, "logreg-wd1+bg": {"classifier": "logreg", "weight_decay": 1.0, "background": True},
}
# The OOD target is judged on this router at this eta against top-1 (eta 1) with the same
# router and with the same classifier fitted without the background class (PLAIN_ROUTER).
# logreg-wd1 was chosen before any sweep (the router whose in-distribution entropies stay under
# the default eta 0.5); its background variant after ood_probe.py showed why it alone could not
# beat top-1 (README, Merge quality).
OOD_ROUTER, OOD_ETA, PLAIN_ROUTER = "logreg-wd1+bg", 0.5, "logreg-wd1"


def _quantiles(v: list[float]) -> dict:
    v = sorted(v)
    q = lambda f: round(v[int(f * (len(v) - 1))], 5)
    return {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": round(v[-1], 5)}
# simulated variants (whatif.py): (kind, the store they start from)
# (Mediator's routed embeddings, once simulated here, are its route_outside option now.)
WHATIF = {
    "full": [("1bit-dense-embeddings", "1bit-uniform-row-lam0"), ("1bit-dense-embeddings", "1bit-uniform-row-lam0-rms")],
    "scratch": [("1bit-dense-embeddings", "1bit-uniform-row-lam0-rms")],
}
CHOSEN = {"full": {}, "scratch": {}, "smoke": {}}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def have_mergekit() -> bool:
    try:
        import mergekit  # noqa: F401
    except ImportError:
        log("mergekit is not installed: its rows are left out")
        return False
    return True


def model_bytes(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "np") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                size = 1
                for d in sl.get_shape():
                    size *= d
                n += size * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
    return n


def quick_scores(cfg, root: Path, device: str) -> dict:
    """Base and experts on the tests (the end of a --train-only run)."""
    from quality.evaluate import EvalSets, Memo, eval_model, load_model

    _, tok = load_model(root / "base", "cpu")
    sets = EvalSets.make(cfg, tok)
    memo = Memo()
    out = {}
    for name in ("base", *T.TASKS):
        r = eval_model(root / name, sets, memo, device)
        out[name] = {"acc": r["acc"], "avg": r["avg"], "ood": r["ood_all"]}
        log(f"{name:6s} " + " ".join(f"{t} {100 * r['acc'][t]:5.1f}" for t in T.TASKS) + f"  avg {100 * r['avg']:5.1f}  ood {100 * r['ood_all']:5.1f}")
    return out


def row(name, family, label, res, storage_bytes, **extra) -> dict:
    return {"name": name, "family": family, "label": label, "acc": res["acc"], "avg": res["avg"], "ood_all": res.get("ood_all"),
            "ood": res.get("ood"), "storage_bytes": int(storage_bytes), "samples": res.get("samples"), **extra}


def evaluate_all(cfg, root: Path, out: Path, device: str, only: set | None = None, sweep: bool = True,
                 via_server: bool = False, routers: dict = ROUTERS, etas: tuple = ETAS) -> dict:
    """Every row (or those in `only`); sweep False skips Mediator's router x eta sweep (quick
    exploration: the rows themselves are unchanged, the OOD table and target lack them), which
    covers `routers` x `etas` (by default every one of ROUTERS and ETAS);
    via_server also scores each routing store's rows through `streammerge serve` (the row's
    `via_server`: accuracy per mode and how many answers differ from the in-process ones)."""
    from quality.evaluate import (
        EvalSets,
        Memo,
        RoutedEval,
        eval_full_routing,
        eval_model,
        load_model,
    )
    from quality.evaluate import via_server as evaluate_via_server

    t_start = time.perf_counter()
    workdir = root / "merges"
    _, tok = load_model(root / "base", "cpu")
    sets = EvalSets.make(cfg, tok)
    memo = Memo()
    mbytes = model_bytes(root / "base")
    n = len(T.TASKS)
    rows, extra = [], {}

    def say(r):
        log(f"{r['name']:28s} avg {100 * r['avg']:5.1f}  " + " ".join(f"{t} {100 * r['acc'][t]:5.1f}" for t in T.TASKS)
            + (f"  ood {100 * r['ood_all']:5.1f}" if r.get("ood_all") is not None else "") + f"  storage {r['storage_bytes'] / (n * mbytes):.3f}")

    for name in ("base", *T.TASKS):
        r = row(name if name == "base" else f"expert-{name}", "base" if name == "base" else "expert",
                "pretrained base" if name == "base" else f"fine-tuned on {name}", eval_model(root / name, sets, memo, device), mbytes)
        rows.append(r)
        say(r)
    fr = eval_full_routing(root, sets, memo, device)
    for mode, label in (("oracle", "oracle task"), ("router", "fitted router (base features)")):
        r = row(f"full-routing-{mode}", "full routing", label, fr[mode], n * mbytes, router_accuracy=fr[mode].get("router_accuracy"))
        rows.append(r)
        say(r)
    reference = fr["oracle"]["avg"]

    full = cfg.name != "smoke"
    for m in M.merges(cfg):
        if only and m.name not in only:
            continue
        info = M.build(m, root, workdir)
        if not m.routing:
            r = row(m.name, m.family, m.label, eval_model(Path(info["model"]), sets, memo, device), mbytes, build_s=info["seconds"])
            rows.append(r)
            say(r)
            if m.mergekit and have_mergekit():
                mk = M.build_mergekit(m, root, workdir)
                r = row(f"mergekit-{m.name}", "mergekit", f"mergekit {m.method}, {m.label}", eval_model(Path(mk["model"]), sets, memo, device), mbytes)
                rows.append(r)
                say(r)
            continue
        ev = RoutedEval(Path(info["store"]), sets, memo, device)
        storage = info["storage"]["total_bytes"]
        default_eta = ev.rm.eta
        res = ev.evaluate("router", eta=default_eta)
        oracle = ev.evaluate("oracle")
        fallback = ev.evaluate("static")
        r = row(m.name, m.family, m.label + (f", eta {default_eta:g}" if m.method == "mediator" else ""), res, storage,
                oracle_avg=oracle["avg"], oracle_acc=oracle["acc"], fallback_avg=fallback["avg"], fallback_acc=fallback["acc"],
                router_heldout=ev.router_report["heldout"]["accuracy"], mixed_share=res.get("mixed_share"),
                storage_detail=info["storage"])
        rows.append(r)
        say(r)
        log(f"{'':28s} oracle avg {100 * oracle['avg']:5.1f}, static fallback avg {100 * fallback['avg']:5.1f}, "
            f"router held-out {100 * ev.router_report['heldout']['accuracy']:.1f}")
        if via_server:  # before the sweep refits the router
            r["via_server"] = served = evaluate_via_server(ev, device)
            log(f"{'':28s} via streammerge serve: " + ", ".join(
                f"{mode} avg {100 * v['avg']:5.1f} ({v['differ']}/{v['answers']} answers differ)" for mode, v in served.items()))
        if LR.row_names(cfg.name, m.name):  # before the sweep refits the router
            for r in LR.lora_rows(m.name, Path(info["store"]), ev, sets, memo, device, tensor_bytes=model_bytes, full_bytes=n * mbytes, row=row):
                rows.append(r)
                say(r)
        if m.method == "mediator" and sweep:
            by_router = {}
            for i, (rname, kw) in enumerate(routers.items()):
                if kw or i:  # the row was scored with the default router (kw {}): kept while it comes first
                    ev.refit(kw)
                sweep = {}
                for eta in etas:
                    e = ev.evaluate("router", eta=eta)
                    sweep[f"{eta:g}"] = {"avg": e["avg"], "acc": e["acc"], "ood_all": e["ood_all"], "ood": e["ood"], "mixed_share": e["mixed_share"]}
                    log(f"{'':28s} router {rname}, eta {eta:4g}: avg {100 * e['avg']:5.1f}  ood {100 * e['ood_all']:5.1f}  "
                        f"mixed: ood {100 * e['mixed_share']['ood']:.0f}%, tests {100 * max(e['mixed_share'][t] for t in T.TASKS):.0f}%")
                ent = ev.entropies()
                by_router[rname] = {"sweep": sweep, "heldout": ev.router_report["heldout"]["accuracy"],
                                    "entropy": {k: _quantiles(v) for k, v in ent.items()}}
            extra.setdefault("eta_sweep", {})[m.name] = by_router
            u = by_router[OOD_ROUTER]["sweep"]
            extra.setdefault("ood_routing", {})[m.name] = {
                "router": OOD_ROUTER, "eta": OOD_ETA, "uncertainty": u[f"{OOD_ETA:g}"]["ood_all"], "top1": u["1"]["ood_all"],
                "plain_router": PLAIN_ROUTER, "top1_plain": by_router[PLAIN_ROUTER]["sweep"]["1"]["ood_all"],
                "uncertainty_plain": by_router[PLAIN_ROUTER]["sweep"][f"{OOD_ETA:g}"]["ood_all"],
                "mixed": u[f"{OOD_ETA:g}"]["mixed_share"]["ood"], "n": len(sets.ood),
            }
        if m.name in ("1bit-auto",) or (not full and m.method == "1bit"):
            analysis = json.loads((Path(info["store"]) / "analysis.json").read_text())
            extra["norm_share"] = analysis.get("norm_share")
            extra["kind_params"] = {k: v["n"] for k, v in analysis.get("kinds", {}).items()}
            extra["task_vector_norms"] = analysis.get("norms")
            extra["task_vector_cosines"] = analysis.get("cosine")
            extra["precision_auto"] = json.loads((Path(info["store"]) / "method.json").read_text()).get("precision")
        del ev

    whatifs = []
    for kind, store_name in WHATIF.get(cfg.name, []):
        if only and store_name not in only:
            continue
        from quality.whatif import evaluate_whatif

        w = evaluate_whatif(kind, workdir / store_name / "job.zarr", root, workdir / f"whatif-{kind}-{store_name}", sets, memo, device)
        w["name"] = f"{kind} ({store_name})"
        whatifs.append(w)
        log(f"what-if {w['name']}: avg {100 * w['avg']:5.1f}  " + " ".join(f"{t} {100 * w['acc'][t]:5.1f}" for t in T.TASKS)
            + f"  storage {w['storage_bytes'] / (n * mbytes):.3f}")
    extra["whatif"] = whatifs

    results = {
        "config": cfg.name, "config_detail": cfg.as_dict(), "n_params": _n_params(root / "base"),
        "model_bytes": mbytes, "full_routing_bytes": n * mbytes, "reference_avg": reference, "reference": "full-routing-oracle",
        "eval_device": describe_device(device), "rows": rows, "chosen": CHOSEN.get(cfg.name, {}), **extra,
        "generated_prompts": memo.generated, "generation_seconds": round(memo.seconds, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    results["targets"] = TB.targets(results)
    return results


def row_order(cfg) -> list[str]:
    """Names of every row of a configuration, in table order."""
    names = ["base", *(f"expert-{t}" for t in T.TASKS), "full-routing-oracle", "full-routing-router"]
    for m in M.merges(cfg):
        names += [m.name] + ([f"mergekit-{m.name}"] if m.mergekit else []) + LR.row_names(cfg.name, m.name)
    return names


def merge_previous(new: dict, old: dict, cfg, command: str) -> dict:
    """An --only run's results merged into the previous full results: its rows replace theirs,
    rows no longer configured are dropped, the rest are kept; a Mediator row re-evaluated
    without the eta sweep (--no-sweep) keeps its earlier sweep. The evaluation time and the
    command stay the full run's, this run is listed under `reruns`."""
    order = row_order(cfg)
    fresh = {r["name"] for r in new["rows"]}
    rows = {r["name"]: r for r in old["rows"] if r["name"] not in fresh}
    rows.update({r["name"]: r for r in new["rows"]})
    out = dict(new)
    out["rows"] = [rows[n] for n in order if n in rows]
    for key in ("eta_sweep", "ood_routing"):
        kept = {k: v for k, v in (old.get(key) or {}).items() if k in rows}
        both = {**kept, **(new.get(key) or {})}
        out[key] = {n: both[n] for n in order if n in both}
    whatif_names = {f"{kind} ({store})" for kind, store in WHATIF.get(cfg.name, [])}
    by_name = {w["name"]: w for w in (old.get("whatif") or []) if w["name"] in whatif_names}
    by_name.update({w["name"]: w for w in new.get("whatif") or []})
    out["whatif"] = [by_name[n] for n in (f"{k} ({s})" for k, s in WHATIF.get(cfg.name, [])) if n in by_name]
    for key in ("norm_share", "kind_params", "task_vector_norms", "task_vector_cosines", "precision_auto"):
        if key not in new and key in old:
            out[key] = old[key]
    for key in ("seconds", "generated_prompts", "generation_seconds", "eval_device"):
        out[key] = old[key]
    out["reruns"] = old.get("reruns", []) + [{
        "command": command, "rows": sorted(fresh), "eval_device": new["eval_device"], "seconds": new["seconds"],
        "generated_prompts": new["generated_prompts"], "sweep": "--no-sweep" not in command}]
    out["command"] = old["command"]
    out["targets"] = TB.targets(out)
    return out


def pending_markdown(results: dict) -> list[str]:
    """The notes' "to run": merges configured for this configuration that the table lacks."""
    done = {r["name"] for r in results["rows"]}
    todo = [m for m in M.merges(CONFIGS[results["config"]]) if m.name not in done]
    if not todo:
        return []
    return ["Notes: to run (configured in tools/quality/merges.py, not in this table yet):", "",
            *[f"- {m.name}: {m.family}, {m.label}" for m in todo], ""]


def _n_params(path: Path) -> int:
    return model_bytes(path) // 2


def write_outputs(results: dict, train_info: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if train_info is not None:
        results["train"] = {k: train_info.get(k) for k in ("hash", "device", "seconds")}
        results["train"]["pretrain_seconds"] = train_info.get("pretrain", {}).get("seconds")
        results["train"]["lr_selection"] = train_info.get("finetune", {}).get("lr_selection")
    results["command"] = command
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    TB.plot(results, out / "accuracy_vs_storage.png")
    md = [f"# Merge quality ({results['config']} configuration)", "",
          f"Command: `{command}`", "",
          (f"Training: {results['train']['device']}, {results['train']['seconds']} s. Evaluation: {results['eval_device']}, "
           f"{results['seconds']} s ({results['generated_prompts']} generations)."), "",
          *[f"Rows re-evaluated since (same harness, same prompts): `{r['command']}` ({r['eval_device']}, {r['seconds']:.1f} s): "
            + ", ".join(r["rows"]) + ("." if r.get("sweep", True) else " (without the eta sweep: their sweep below is the earlier run's).")
            for r in results.get("reruns", [])],
          *([""] if results.get("reruns") else []),
          *([f"Mean over seeds {', '.join(map(str, results['seeds']))} (each seed's tables: seed-N/results.md); in brackets, "
             "the lowest and the highest seed. % of full routing is each seed's row against the same seed's full routing, "
             "averaged; the targets are judged on the means. Training times and generations are the seeds' sums.", ""]
            if results.get("seeds") else []),
          TB.markdown_table(results), "", "Targets:", "", TB.targets_markdown(results["targets"]), "",
          ("Mediator on the out-of-distribution prompts: accuracy (share of OOD prompts routed to a probability-weighted "
           "mix of experts) by router and entropy threshold eta (1 = always top-1):"), "",
          TB.eta_markdown(results), "",
          "Where each task vector lies (share of its squared norm per module kind; in brackets, that share over the kind's share of the parameters):", "",
          TB.norm_share_markdown(results), "",
          "What-if (simulated, not streammerge methods; oracle task; tools/quality/whatif.py):", "",
          TB.whatif_markdown(results), "",
          "Plot: accuracy_vs_storage.png", "",
          *pending_markdown(results)]
    (out / "results.md").write_text("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/quality"))
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full")
    ap.add_argument("--smoke", action="store_true", help="same as --config smoke")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-out" / "quality")
    ap.add_argument("--device", default="cpu", help="evaluation device (cpu or cuda)")
    ap.add_argument("--train-device", default=None, help="training device (default: cuda when available, else cpu)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--retrain", action="store_true", help="train even when the checkpoints are cached")
    ap.add_argument("--pack", type=Path, help="after training, write one tar per model here")
    ap.add_argument("--import", dest="import_dir", type=Path, help="unpack tars written by --pack into the cache first")
    ap.add_argument("--only", help="comma-separated merge names to evaluate (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT/results.md and the plot from OUT/results.json; "
                    "with --seeds, from OUT/seed-N/results.json (their means and ranges: seeds run apart)")
    ap.add_argument("--no-sweep", action="store_true", help="skip Mediator's router x eta sweep (quick exploration)")
    ap.add_argument("--sweep-routers", help=f"comma-separated routers of the sweep (default all: {','.join(ROUTERS)}); "
                    f"must hold {OOD_ROUTER} and {PLAIN_ROUTER}, which the OOD target compares")
    ap.add_argument("--sweep-etas", help=f"comma-separated entropy thresholds of the sweep (default {','.join(f'{e:g}' for e in ETAS)}); "
                    f"must hold {OOD_ETA:g} and 1 (top-1)")
    ap.add_argument("--via-server", action="store_true", help="also score each routing store's rows (router, oracle, "
                    "static) through `streammerge serve` with the openai client, and count the answers that differ")
    ap.add_argument("--seeds", type=seed_list, help="comma-separated training seeds (e.g. 0,1,2): train and score each into "
                    "OUT/seed-N, and write their means with min-max to OUT (default: the configuration's one seed, into OUT)")
    ap.add_argument("--fresh", action="store_true", help="with --only: write only this run's rows instead of merging them "
                    "into OUT/results.json")
    a = ap.parse_args(argv)
    quiet()
    if a.report_only:
        if a.seeds:  # seeds trained and scored apart (by separate runs or machines): their means again
            results = aggregate_seed_dirs(a.out, a.seeds)
            print(TB.markdown_table(results))
        else:
            results = json.loads((a.out / "results.json").read_text())
            results["targets"] = TB.targets(results)
        write_outputs(results, None, a.out, results["command"])
        print(TB.targets_markdown(results["targets"]))
        return 0
    cfg = CONFIGS["smoke" if a.smoke else a.config]
    a.sweep_grid = sweep_grid(a)  # a wrong grid fails before any training
    import torch

    train_device = a.train_device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = "python tools/quality/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.seeds is None:
        results = run_one(a, cfg, a.out, a.pack, a.import_dir, train_device, command)
    else:  # each seed in OUT/seed-N (and PACK/seed-N, IMPORT/seed-N), their means in OUT
        per_seed = {}
        for seed in a.seeds:
            sub = f"seed-{seed}"
            per_seed[seed] = run_one(a, cfg.with_seed(seed), a.out / sub, a.pack and a.pack / sub,
                                     a.import_dir and a.import_dir / sub, train_device, command)
        if a.train_only:
            return 0
        results = TB.aggregate(per_seed)
        write_outputs(results, None, a.out, results["command"])
    if results is not None:
        print(TB.markdown_table(results))
        print(TB.targets_markdown(results["targets"]))
    return 0


def aggregate_seed_dirs(out: Path, seeds: list[int]) -> dict:
    """The means over OUT/seed-N/results.json (rows scored in every seed); the command names
    each seed's own run."""
    per_seed = {}
    for seed in seeds:
        path = out / f"seed-{seed}" / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: --report-only --seeds: {path} is missing (run that seed first)")
        per_seed[seed] = json.loads(path.read_text())
    results = TB.aggregate(per_seed)
    results.pop("reruns", None)  # each seed's results.md lists its own
    results["command"] = "; ".join(dict.fromkeys(r["command"] for r in per_seed.values()))
    return results


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct and >= 0: {text!r}")
    return seeds


def sweep_grid(a) -> dict:
    """evaluate_all's routers and etas from --sweep-routers / --sweep-etas (SystemExit naming a
    wrong one, or a grid without what the OOD target compares)."""
    names = a.sweep_routers.split(",") if a.sweep_routers else list(ROUTERS)
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise SystemExit(f"error: --sweep-routers: unknown router(s) {', '.join(unknown)} (known: {', '.join(ROUTERS)})")
    try:
        etas = tuple(float(x) for x in a.sweep_etas.split(",")) if a.sweep_etas else ETAS
    except ValueError:
        raise SystemExit(f"error: --sweep-etas {a.sweep_etas!r}: comma-separated numbers") from None
    if OOD_ROUTER not in names or PLAIN_ROUTER not in names or OOD_ETA not in etas or 1.0 not in etas:
        raise SystemExit(f"error: the sweep must hold routers {OOD_ROUTER} and {PLAIN_ROUTER} and etas {OOD_ETA:g} and 1 "
                         "(the OOD target compares them)")
    return {"routers": {n: ROUTERS[n] for n in ROUTERS if n in names}, "etas": tuple(sorted(set(etas)))}


def run_one(a, cfg, out: Path, pack_dir: Path | None, import_dir: Path | None, train_device: str, command: str) -> dict | None:
    """One configuration (one seed) end to end into `out`: import or train (or find the cache),
    pack, evaluate, write; returns the results (None with --train-only)."""
    root = cache_dir(cfg, a.cache)
    if import_dir:
        unpack(import_dir, root)
        if not is_trained(root, cfg):
            raise SystemExit(f"error: --import {import_dir}: not the checkpoints of configuration {cfg.name}, "
                             f"seed {cfg.training.seed} (hash {cfg.training_hash()})")
    info = train_all(cfg, root, train_device, force=a.retrain)
    log(f"checkpoints: {root} (trained on {info.get('device')} in {info.get('seconds')} s)")
    if pack_dir:
        pack(root, pack_dir)
    if a.train_only:
        scores = quick_scores(cfg, root, train_device)
        if pack_dir:
            (pack_dir / "scores.json").write_text(json.dumps(scores, indent=1))
        return None
    results = evaluate_all(cfg, root, out, a.device, set(a.only.split(",")) if a.only else None, sweep=not a.no_sweep,
                           via_server=a.via_server, **a.sweep_grid)
    previous = out / "results.json"
    if a.only and not a.fresh and previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("config") == cfg.name:
            results = merge_previous(results, old, cfg, command)
            command = results["command"]
    write_outputs(results, info, out, command)
    return results


if __name__ == "__main__":
    sys.exit(main())
