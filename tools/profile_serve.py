"""Where a serving step's time goes: the engine's steps run in process (no HTTP), phases timed.

Builds the synthetic family and routing stores of bench_serve (same arguments), loads one engine
per method, submits the same mixed-task prompts all at once as static, forced and routed
requests (alternating rounds), and reports per mode: wall time, tokens/s, decoding steps, and
the seconds spent in the runner's phases (routing decisions, prefill, decode steps, and the
runtime's plan building inside them), each phase ended by a device synchronisation so that the
time is the phase's own. A phase's share tells what to make cheaper; bench_serve gives the
figures a user sees (through the server).

    python tools/profile_serve.py --device cuda --hidden 1024 --intermediate 4096 --layers 8 \
        --heads 16 --kv-heads 4 --vocab 8192 --prompts-per-task 8 --rounds 3 --memory-budget 16GB
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_routing import TASKS, add_family_args, build_store, prompts_for, synthetic_family, work_dir  # noqa: E402


class PhaseTimer:
    """Wraps methods of objects so each call's time adds to a phase: an outer phase ends with a
    device sync (its kernels' time is its own); a nested one (sync=False) times the host side
    only, so that it does not serialise the phase it runs in."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, phase: str, sync: bool = True) -> None:
        inner = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                if sync:
                    self.sync()
                self.seconds[phase] += time.perf_counter() - t0
                self.calls[phase] += 1

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def run_batch(engine, requests) -> float:
    """Submit all, then run the engine's steps in this thread (as its loop would, so that a
    profiler of this thread sees them) until every one finished; returns the wall seconds."""
    finished = []
    for r in requests:
        r.emit = lambda ev, f=finished: f.append(1) if ev[0] in ("done", "error") else None
    t0 = time.perf_counter()
    for r in requests:
        engine.submit(r)
    while len(finished) < len(requests):
        step = engine.scheduler.schedule(timeout=1.0)
        if step is not None:
            engine._step(step)
    return time.perf_counter() - t0


def torch_profile(engine, requests, device: str) -> str:
    """One batch under torch.profiler: the wall time, the operators' summed host and device
    time, and the busiest operators (a wall time far above the operators' host time is Python)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        wall = run_batch(engine, requests)
    ev = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in ev) / 1e6
    dev = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e6
    calls = sum(e.count for e in ev)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return (f"wall {wall:.3f}s, operators' self host time {host:.3f}s, device time {dev:.3f}s, {calls} operator calls\n"
            + ev.table(sort_by=sort, row_limit=18, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="mediator,1bit")
    ap.add_argument("--work", type=Path, default=None)
    add_family_args(ap)
    ap.add_argument("--train-prompts", type=int, default=40)
    ap.add_argument("--prompts-per-task", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--fused", default="auto")
    ap.add_argument("--torch-profile", action="store_true",
                    help="Also run each mode once more under torch.profiler and print its busiest operators "
                    "(host time, and device time on CUDA) against the wall time.")
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from streammerge.cli import parse_size
    from streammerge.routing import fit_router
    from streammerge.serve.scheduler import Request, Sampling
    from streammerge.serve.server import build_engine

    hf_logging.set_verbosity_error()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    with work_dir(args.work, "profile-serve-") as work:
        _, base, fts = synthetic_family(work, args)
        for method in args.methods.split(","):
            store = build_store(work, method, base, fts)
            fit_router(store, [(t, prompts_for(t, args.train_prompts, 0)) for t in TASKS], device=args.device)
            prompts = [(t, p) for t in TASKS for p in prompts_for(t, args.prompts_per_task, 1)]
            random.Random(2).shuffle(prompts)
            engine, runner = build_engine(store, args.device, "auto", len(prompts), 256, budget, fused=args.fused)
            timer = PhaseTimer(sync)
            timer.wrap(runner, "decide", "decide")
            timer.wrap(runner, "prefill", "prefill")
            timer.wrap(runner, "decode", "decode")
            rt = runner.runtime
            timer.wrap(rt, "set_rows", "set_rows", sync=False)
            timer.wrap(rt, "groups", "plan: groups", sync=False)
            timer.wrap(rt, "row_params", "plan: norm rows", sync=False)
            targets = {"static": lambda t: ("static",), "forced": lambda t: ("task", t), "routed": lambda t: ("routed",)}

            def requests(mode):
                return [Request(list(runner.tokenizer(p, add_special_tokens=False)["input_ids"]),
                                Sampling(max_tokens=args.max_tokens), targets[mode](t), features_text=p)
                        for t, p in prompts]

            results: dict[str, list] = defaultdict(list)
            try:
                for mode in targets:  # warm-up
                    run_batch(engine, requests(mode))
                for _ in range(args.rounds):
                    for mode in targets:
                        reqs = requests(mode)
                        timer.reset()
                        steps0 = engine.steps
                        wall = run_batch(engine, reqs)
                        tokens = sum(r.generated for r in reqs)
                        decisions = {r.decision.key for r in reqs}
                        results[mode].append({"wall": wall, "tok_s": tokens / wall, "steps": engine.steps - steps0,
                                              "decisions": len(decisions),
                                              "mix": sum(r.decision.mode == "mix" for r in reqs),
                                              **{f"s:{k}": v for k, v in timer.seconds.items()},
                                              **{f"n:{k}": v for k, v in timer.calls.items()}})
                if args.torch_profile:
                    for mode in targets:
                        print(f"\n{method} {mode}: torch.profiler")
                        print(torch_profile(engine, requests(mode), args.device))
            finally:
                engine.scheduler.close()
            print(f"\n{method}: {len(prompts)} prompts, max_tokens {args.max_tokens}, device {args.device}, "
                  f"fused {args.fused}, {args.rounds} rounds (medians)")
            static_tok = statistics.median(r["tok_s"] for r in results["static"])
            for mode, rs in results.items():
                med = {k: statistics.median(r.get(k, 0) for r in rs) for k in sorted({k for r in rs for k in r})}
                phases = "  ".join(f"{k[2:]} {med[k]:.3f}s/{med['n:' + k[2:]]:.0f}" for k in med if k.startswith("s:"))
                print(f"  {mode:7} {med['tok_s']:8.1f} tok/s ({100 * med['tok_s'] / static_tok:3.0f}%)  wall {med['wall']:.3f}s  "
                      f"steps {med['steps']:.0f}  decisions {med['decisions']:.0f} (mix {med['mix']:.0f})\n          {phases}")


if __name__ == "__main__":
    main()
