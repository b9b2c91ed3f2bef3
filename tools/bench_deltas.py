#!/usr/bin/env python
"""Forward time of one mixed-task batch through the delta-aware runtime (routing/deltas.py).

    python tools/bench_deltas.py [--hidden 512 --intermediate 1376 --layers 4 --vocab 4096]
                                 [--rows 32 --prefill 32 --repeat 5] [--workdir DIR] [--json OUT]

Generates a synthetic base + 3 fine-tunes (tools/synth_checkpoints.py), builds a Mediator store
(half the layers routed, rho 0.1) and two 1bit stores (preset uniform, lambda 0 and 1), then
times one forward of a batch of --rows rows, routed round-robin to the 3 tasks, as a decoding
step (1 token per row) and as a prefill (--prefill tokens per row), for:

  static     the merged model, plain transformers, no deltas: the floor
  delta      DeltaRuntime, no cache: the deltas decoded from the encodings every forward
  delta+c    DeltaRuntime with an unlimited memory budget: decoded terms cached (warm)
  swap       per-decision dense weights: the old weight swap (tools/weight_swap.py, decisions
             prebuilt), one forward per task group

Each figure is the CPU time of one forward on ONE torch thread (time.process_time), best of
--repeat runs: on a shared machine wall time mostly measures the neighbours. Also reports resident
bytes (model / encodings / cache) of the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench_routing import TASKS, build_store  # noqa: E402


def best(fn, repeat: int) -> float:
    fn()  # warm-up (and the cache's fill)
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def bench_store(store: Path, rows: int, prefill: int, repeat: int) -> dict:
    import torch

    from weight_swap import WeightSwapModel

    from streammerge.routing import STATIC, forced
    from streammerge.routing.deltas import DeltaRuntime
    from streammerge.routing.runtime import load_merged_model, open_routing_store

    cpu = torch.device("cpu")
    s, method = open_routing_store(store)
    decisions = [forced(TASKS[b % len(TASKS)], TASKS) for b in range(rows)]
    out = {}
    for label, seq in (("decode", 1), ("prefill", prefill)):
        static, _ = load_merged_model(s, cpu, torch.float32)  # the floor: the merged model (1bit: the runtime's M)
        vocab = static.config.vocab_size
        ids = torch.randint(3, min(1000, vocab), (rows, seq), generator=torch.Generator().manual_seed(0))
        res = {}

        def fwd(model):
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        res["static"] = best(lambda: fwd(static), repeat)
        static = None  # freed before the runtimes load their copies
        for name, budget in (("delta", None), ("delta+c", 1 << 40)):
            model, _ = load_merged_model(s, cpu, torch.float32)
            rt = DeltaRuntime(model, s, method, cpu, torch.float32, memory_budget=budget)
            rt.set_rows(decisions)
            res[name] = best(lambda: fwd(model), repeat)
            res[f"{name} bytes"] = rt.resident_bytes()
            model = rt = None
        sw = WeightSwapModel.load(store, device="cpu", dtype="float32")
        groups = {t: torch.tensor([b for b, d in enumerate(decisions) if d.task == t]) for t in TASKS}

        def swap():
            for t, idx in groups.items():
                sw.apply(forced(t, TASKS))
                with torch.inference_mode():
                    sw.model(input_ids=ids[idx], use_cache=False)

        res["swap"] = best(swap, repeat)
        sw.apply(STATIC)
        sw = None
        out[label] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import torch

    import synth_checkpoints as synth

    torch.set_num_threads(1)

    root = a.workdir or Path(tempfile.mkdtemp(prefix="bench-deltas-"))
    root.mkdir(parents=True, exist_ok=True)
    shape = synth.ModelShape(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=8, kv_heads=4, vocab=a.vocab)
    if not (root / "base").is_dir():
        synth.make_family(root, shape, n_finetunes=3, dtype="bfloat16", delta_scale=0.004)
    base, fts = root / "base", [root / f"ft{i}" for i in (1, 2, 3)]
    stores = {
        "mediator": build_store(root, "mediator", base, fts, {"route": 0.5, "rho": 0.1}, "med"),
        "1bit lambda 0": build_store(root, "1bit", base, fts, {"preset": "uniform", "lambda": 0.0}, "bit0"),
        "1bit lambda 1": build_store(root, "1bit", base, fts, {"preset": "uniform", "lambda": 1.0}, "bit1"),
    }
    print(f"model hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, vocab {a.vocab}; "
          f"batch {a.rows} rows over {len(TASKS)} tasks; torch threads {torch.get_num_threads()}; best of {a.repeat}")
    results = {}
    print("| store | step | static ms | delta ms | delta+cache ms | swap ms | delta/static | delta+cache/static | swap/static "
          "| encodings MB | cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, store in stores.items():
        r = bench_store(store, a.rows, a.prefill, a.repeat)
        results[name] = r
        for step, x in r.items():
            st = x["static"]
            print(f"| {name} | {step} | {1e3 * st:.1f} | {1e3 * x['delta']:.1f} | {1e3 * x['delta+c']:.1f} | {1e3 * x['swap']:.1f} | "
                  f"{x['delta'] / st:.2f} | {x['delta+c'] / st:.2f} | {x['swap'] / st:.2f} | "
                  f"{x['delta bytes']['encodings'] / 1e6:.1f} | {x['delta+c bytes']['cache'] / 1e6:.1f} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
