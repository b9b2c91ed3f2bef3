"""Quick scoring of routing rows on one seed's cached checkpoints: each test set through the
routed runtime with its true task forced (the oracle; what the fitted router gives where it is
100 % accurate on the tests, as here), no OOD prompts, no router fit, no static fallback; and
full routing's oracle (each expert on its own task). For comparing many variants in a fraction
of run.py's time; run.py's rows remain the reported figures.

    python tools/quality/oracle_rows.py --seed 0 --out /tmp/q0.json --rows full,1bit-uniform-row-lam0-rms

Checkpoints: run.py --import (or its training) must have filled the cache. Stores are built
under --work (default /tmp/oracle-rows-<seed>), apart from run.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import merges as M  # noqa: E402
from quality import tasks as T  # noqa: E402
from quality.config import CONFIGS  # noqa: E402
from quality.evaluate import EvalSets, Memo, exact, load_model  # noqa: E402
from quality.train import cache_dir  # noqa: E402


def full_routing(root: Path, sets: EvalSets) -> dict:
    acc = {}
    for t in T.TASKS:
        model, tok = load_model(root / t, "cpu")
        outs = Memo().run(t, "static", model, tok, [p for p, _ in sets.tests[t]], sets.budget[t])
        acc[t] = exact(outs, [a for _, a in sets.tests[t]])
    return {"acc": acc, "share": 1.0}


def routed_row(m: M.Merge, root: Path, work: Path, sets: EvalSets) -> dict:
    from streammerge.routing.decision import forced
    from streammerge.routing.model import RoutedModel

    info = M.build(m, root, work)
    rm = RoutedModel.from_store(info["store"], device="cpu", router=False, memory_budget=8 << 30)
    memo, acc = Memo(), {}
    for t in T.TASKS:
        d = forced(t, rm.tasks)
        prompts = [p for p, _ in sets.tests[t]]
        outs = memo.run_rows(m.name, [d.key] * len(prompts), rm.model, rm.tokenizer, prompts, sets.budget[t],
                             set_rows=lambda keys, d=d: rm.runtime.set_rows([d] * len(keys)))
        acc[t] = exact(outs, [a for _, a in sets.tests[t]])
    storage = info["storage"]
    return {"acc": acc, "share": storage["share_of_full_routing"], "bytes": storage["total_bytes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full")
    ap.add_argument("--cache", default="bench-out/quality")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", required=True, help="JSON of the rows (rows already there are skipped)")
    ap.add_argument("--rows", required=True, help="comma-separated: full and/or routing rows of merges.py")
    a = ap.parse_args(argv)
    cfg = CONFIGS[a.config].with_seed(a.seed)
    root = cache_dir(cfg, Path(a.cache))
    work = Path(a.work or f"/tmp/oracle-rows-{a.seed}")
    by_name = {m.name: m for m in M.merges(cfg) if m.routing}
    names = a.rows.split(",")
    unknown = [n for n in names if n != "full" and n not in by_name]
    if unknown:
        print(f"error: --rows: not routing rows of merges.py: {', '.join(unknown)}", file=sys.stderr)
        return 1
    _, tok = load_model(root / "base", "cpu")
    sets = EvalSets.make(cfg, tok)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    for name in names:
        if name in res:
            continue
        t0 = time.time()
        r = full_routing(root, sets) if name == "full" else routed_row(by_name[name], root, work, sets)
        r["avg"] = sum(r["acc"].values()) / len(r["acc"])
        r["seconds"] = round(time.time() - t0, 1)
        res[name] = r
        print(name, json.dumps(r), flush=True)
        out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
