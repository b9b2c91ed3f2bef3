#!/usr/bin/env python
"""Benchmark `streammerge serve`: the same mixed-task prompts at several concurrencies.

    python tools/bench_serve.py [--methods mediator,1bit] [--concurrency 1,8,32] [--prompts-per-task 16]
                                [--max-tokens 32] [--rounds 3] [--memory-budget 256MB] [--fused auto,never] [--hidden 256 --layers 4 --vocab 2048] [--device cpu] [--threads auto] [--stream] [--json out.json]

Generates a synthetic base + 3 fine-tunes, builds a store per method and fits its router (as
tools/bench_routing.py does), starts `streammerge serve` as a subprocess per store and sends
the 3 tasks' prompts, shuffled, over HTTP with C requests in flight (greedy, max_tokens each):

  static   every request to NAME:static (the merged model, served the same way)
  forced   each request to NAME:task:<its task> (mixed decisions, no router)
  routed   each request to NAME (router + mixed decisions)
  experts  one `streammerge serve` process per task, each sent only NAME:task:<its task> (the
           bench routes each request to its task's process: the oracle, no router), "where
           memory allows": a process starts only while MemAvailable exceeds the first one's RSS;
           the resident figures are the sum over the processes
  swap     the old weight-swap path in this process (tools/weight_swap.py): the merged model
           routes the prompts, then one decision group at a time, each decision's dense weights
           materialised from the encodings and swapped into the model, batches of C

Reports tokens/s (completion tokens / wall time), p50 / p95 request latency, tokens per CPU
second of the server process (its user + system time over the run: what a box shared with
other jobs still measures fairly), and the server's resident bytes (/metrics: model,
encodings, cache, KV cache) against the storage figure `build` prints (storage.json), plus the
server process' RSS. static / forced / routed run `--rounds` times, alternating (static, forced,
routed, static, ...), each figure the median with its min-max.

With --stream the requests stream (server-sent events, usage in the last event) and the client
also times the gaps between a request's consecutive text events: the inter-token latency
(p50, p99 and the longest gap of each run), where a running request's pause while others are
routed and prefilled shows.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from bench_routing import TASKS, add_family_args, build_store, prompts_for, synthetic_family, work_dir  # noqa: E402
from serve_process import ServeProcess  # noqa: E402


class Server(ServeProcess):
    def __init__(self, store: Path, device: str, max_batch: int, log: Path, memory_budget: str | None = None,
                 fused: str = "auto", threads: str = "auto"):
        super().__init__(store, "--device", device, "--max-batch", max_batch, "--name", "bench", "--fused", fused,
                         "--threads", threads,
                         *(["--memory-budget", memory_budget] if memory_budget else []), log=log, timeout=300)

    def resident(self) -> dict:
        import httpx

        out = {}
        for line in httpx.get(self.base + "/metrics").text.splitlines():
            if line.startswith("streammerge_resident_bytes{"):
                out[line.split('part="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        with open(f"/proc/{self.proc.pid}/status") as f:
            out["process_rss"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))
        return out

    def prefills(self) -> int:
        """Prefills so far (/metrics): each admission of waiting requests is one (and, for routed
        requests, one routing forward before it)."""
        import httpx

        for line in httpx.get(self.base + "/metrics").text.splitlines():
            if line.startswith("streammerge_prefill_size_count"):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def cpu_seconds(self) -> float:
        """User + system time of the server process so far (all its threads)."""
        return process_cpu_seconds(self.proc.pid)


def process_cpu_seconds(pid: int) -> float:
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_load(base: str | list[str], reqs: list[dict], concurrency: int, servers: list | None = None,
             stream: bool = False) -> dict:
    """reqs sent with `concurrency` in flight, request i to base (or base[i], one per request);
    with `servers`, also the completion tokens per CPU second those processes spent; with
    `stream`, streamed, and the gaps between each request's consecutive text events (itl_*)."""
    import httpx

    cpu0 = sum(s.cpu_seconds() for s in servers or [])
    prefills0 = sum(s.prefills() for s in servers or [])

    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4))
    bases = [base] * len(reqs) if isinstance(base, str) else base

    def one(i):
        body = reqs[i]
        t0 = time.perf_counter()
        if not stream:
            r = client.post(bases[i] + "/v1/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"], []
        times, usage = [], None
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", bases[i] + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                elif any(c.get("text") for c in event.get("choices", [])):
                    times.append(time.perf_counter())
        return time.perf_counter() - t0, usage["completion_tokens"], [b - a for a, b in zip(times, times[1:])]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(len(reqs))))
    wall = time.perf_counter() - t0
    client.close()
    lat = sorted(x for x, _, _ in res)
    tokens = sum(n for _, n, _ in res)
    out = {"tok_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
           "tokens": tokens, "wall_s": wall}
    gaps = sorted(g for _, _, gs in res for g in gs)
    if gaps:
        out.update(itl_p50_s=statistics.median(gaps), itl_p99_s=gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
                   itl_max_s=gaps[-1])
    if servers:
        out["tok_cpu_s"] = tokens / max(1e-9, sum(s.cpu_seconds() for s in servers) - cpu0)
        out["prefills"] = sum(s.prefills() for s in servers) - prefills0
    return out


def summarize(runs: list[dict]) -> dict:
    """Rounds of one configuration: each figure's median, and its [min, max] under *_range."""
    out = {"rounds": len(runs)}
    for k in ("tok_s", "tok_cpu_s", "p50_s", "p95_s", "itl_p50_s", "itl_p99_s", "itl_max_s"):
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k], out[k + "_range"] = statistics.median(vals), [min(vals), max(vals)]
    out["tokens"] = runs[0]["tokens"]
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable"))


def bench_experts(store: Path, prompts: list[tuple[str, str]], work: Path, args) -> list[dict]:
    """One server per task, each sent its task's requests only (NAME:task:T)."""
    servers: dict[str, Server] = {}
    rows = []
    try:
        for t in TASKS:
            if servers:
                need = next(iter(servers.values())).resident()["process_rss"]
                if mem_available() < 1.2 * need:
                    print(f"experts: stopped at {len(servers)} process(es): MemAvailable {mem_available() / 2**20:.0f} MiB "
                          f"< 1.2 x {need / 2**20:.0f} MiB", flush=True)
                    return []
            servers[t] = Server(store, args.device, max(args.concurrency), work / f"expert-{t}.log", args.memory_budget,
                                threads=args.threads)
        reqs = [{"model": f"bench:task:{t}", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0} for t, p in prompts]
        bases = [servers[t].base for t, _ in prompts]
        n = max(args.concurrency)
        run_load(bases[:n], reqs[:n], n)  # warm-up
        for c in args.concurrency:
            r = run_load(bases, reqs, c, list(servers.values()))
            rows.append({"mode": "experts", "concurrency": c, "processes": len(servers), **summarize([r])})
        total: dict[str, float] = {}
        for srv in servers.values():
            for k, v in srv.resident().items():
                total[k] = total.get(k, 0) + v
        for r in rows:
            r["resident"] = total
    finally:
        for srv in servers.values():
            srv.stop()
    return rows


def bench_swap(store: Path, prompts: list[tuple[str, str]], batch: int, max_tokens: int, device: str) -> dict:
    """The old path (tools/weight_swap.py), timed from routing to the last token."""
    from weight_swap import WeightSwapModel

    from streammerge.routing import STATIC, route_decision
    from streammerge.routing.router import Router
    from streammerge.routing.runtime import encode_for_features, mean_hidden_features, pad_id

    swap = WeightSwapModel.load(store, device=device)
    router = Router.load(swap.store, swap.tasks).to(swap.device)
    texts = [p for _, p in prompts]
    eta, top_m = float(swap.method.get("eta", 0.5)), int(swap.method.get("top_m", 0) or 0)

    def route(batch_texts):
        swap.apply(STATIC)  # the router's features are the merged model's
        seqs = encode_for_features(swap.tokenizer, batch_texts, router.meta.get("max_tokens"))
        probs = router.probs(mean_hidden_features(swap.model, seqs, pad_id(swap.tokenizer), batch))
        return [route_decision(p, swap.tasks, swap.method["method"], eta, top_m, background=router.background) for p in probs]

    swap.generate(texts[:batch], route(texts[:batch]), max_new_tokens=2, batch_size=batch)  # warm-up
    swap.stats["new_tokens"] = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    swap.generate(texts, route(texts), max_new_tokens=max_tokens, batch_size=batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = swap.stats["new_tokens"]
    return {"tok_s": tokens / wall, "tok_cpu_s": tokens / cpu, "tokens": tokens, "wall_s": wall, "builds": swap.stats["builds"],
            "decision_bytes": swap.decision_bytes}


def bench_method(method: str, store: Path, work: Path, args) -> list[dict]:
    from streammerge.routing import fit_router

    fit_router(store, [(t, prompts_for(t, args.train_prompts, 0)) for t in TASKS], device=args.device)
    prompts = [(t, p) for t in TASKS for p in prompts_for(t, args.prompts_per_task, 1)]
    random.Random(2).shuffle(prompts)
    storage = json.loads((store / "storage.json").read_text())["total_bytes"]
    rows = []
    # one server per --fused value: the first serves static / forced / routed, each further one
    # forced and routed again (the same store with another fused policy), all alternating
    servers = {f: Server(store, args.device, max(args.concurrency), work / f"{method}-server-{f}.log", args.memory_budget, f,
                         args.threads)
               for f in args.fused}
    try:
        models = {"static": lambda t: "bench:static", "forced": lambda t: f"bench:task:{t}", "routed": lambda t: "bench"}
        configs = [(mode, f) for f in args.fused for mode in models if f == args.fused[0] or mode != "static"]
        reqs = {mode: [{"model": model(t), "prompt": p, "max_tokens": args.max_tokens, "temperature": 0} for t, p in prompts]
                for mode, model in models.items()}
        for mode, f in configs:  # warm-up: every prompt once (on a GPU, a first round's new shapes ran at 1/3 speed)
            run_load(servers[f].base, reqs[mode], max(args.concurrency))
        runs: dict = {}
        for rnd in range(args.rounds):  # alternating: the box's load drifts alike over each mode
            for c in args.concurrency:
                for mode, f in configs:
                    srv = servers[f]
                    r = run_load(srv.base, reqs[mode], c, [srv], stream=args.stream)
                    runs.setdefault((mode, f, c), []).append(r)
                    itl = (f"  itl p50 {1e3 * r['itl_p50_s']:.1f} p99 {1e3 * r['itl_p99_s']:.1f} max {1e3 * r['itl_max_s']:.1f} ms"
                           if "itl_p50_s" in r else "")
                    print(f"{method:8} {mode:7} fused {f:6} c={c:<3} round {rnd}: {r['tok_s']:8.1f} tok/s  "
                          f"{r['tok_cpu_s']:8.1f} tok/CPU-s  p50 {r['p50_s']:.2f}s  p95 {r['p95_s']:.2f}s  "
                          f"prefills {r['prefills']}{itl}", flush=True)
        for (mode, f, c), rs in runs.items():
            rows.append({"method": method, "mode": mode if f == args.fused[0] else f"{mode} (fused {f})", "fused": f,
                         "concurrency": c, "memory_budget": args.memory_budget, **summarize(rs)})
        res = servers[args.fused[0]].resident()
    finally:
        for srv in servers.values():
            srv.stop()
    weights = sum(v for k, v in res.items() if k not in ("kv_cache", "process_rss"))
    for row in rows:
        row.update(resident=res, storage_bytes=storage, weights_over_storage=weights / storage)
    if not args.skip_experts:
        for r in bench_experts(store, prompts, work, args):
            rows.append({"method": method, "memory_budget": args.memory_budget, "storage_bytes": storage, **r})
            print(f"{method:8} experts c={r['concurrency']:<3} {r['tok_s']:8.1f} tok/s  {r['tok_cpu_s']:8.1f} tok/CPU-s  p50 {r['p50_s']:.2f}s  "
                  f"p95 {r['p95_s']:.2f}s  ({r['processes']} processes, RSS {r['resident']['process_rss'] / 2**20:.0f} MiB)",
                  flush=True)
    for c in ([] if args.skip_swap else args.concurrency):
        r = bench_swap(store, prompts, c, args.max_tokens, args.device)
        rows.append({"method": method, "mode": "swap", "concurrency": c, **r})
        print(f"{method:8} swap    c={c:<3} {r['tok_s']:8.1f} tok/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="mediator,1bit")
    ap.add_argument("--work", type=Path, default=None, help="Working directory (default: a temporary one, removed).")
    add_family_args(ap)
    ap.add_argument("--train-prompts", type=int, default=40)
    ap.add_argument("--prompts-per-task", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds of static / forced / routed (medians reported).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-budget", default=None,
                    help="Passed to `serve --memory-budget` (e.g. 8GB, or none: no cache and no KV limit); "
                    "default: serve's own (auto).")
    ap.add_argument("--fused", default="auto",
                    help="`serve --fused` policies, comma-separated (e.g. auto,never): the first serves static / forced / "
                    "routed, each further one forced and routed again in its own server, alternating with the first.")
    ap.add_argument("--skip-swap", action="store_true", help="Leave out the old weight-swap path.")
    ap.add_argument("--skip-experts", action="store_true", help="Leave out the one-process-per-expert servers.")
    ap.add_argument("--threads", default="auto", help="Passed to `serve --threads` (torch's CPU threads; default auto).")
    ap.add_argument("--stream", action="store_true",
                    help="Stream the static / forced / routed requests and report the inter-token latency (the gaps "
                         "between a request's text events: p50, p99, longest).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.fused = args.fused.split(",")
    from streammerge.routing.deltas import FUSED_MODES

    if any(f not in FUSED_MODES for f in args.fused):
        ap.error(f"--fused {','.join(args.fused)}: each one of {', '.join(FUSED_MODES)}")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with work_dir(args.work, "bench-serve-") as work:
        shape, base, fts = synthetic_family(work, args)
        rows = []
        for method in args.methods.split(","):
            rows += bench_method(method, build_store(work, method, base, fts), work, args)

    print(f"\nmodel: {shape.n_params / 1e6:.2f}M params; device {args.device}; {args.prompts_per_task} prompts/task x 3 tasks, "
          f"max_tokens {args.max_tokens}, greedy; memory budget {args.memory_budget or 'auto (serve default)'}; {args.rounds} rounds "
          f"(median [min-max]); load {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n")
    itl = " itl p50 / p99 / max ms |" if args.stream else ""
    print(f"| method | mode | concurrency | tok/s | vs static | tok/CPU-s | vs static | p50 s | p95 s |{itl}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if itl else ""))
    static = {(r["method"], r["concurrency"]): r for r in rows if r["mode"] == "static"}

    def rng(r, k, fmt):
        return f"{r[k]:{fmt}} [{r[k + '_range'][0]:{fmt}}-{r[k + '_range'][1]:{fmt}}]" if r.get("rounds", 1) > 1 else f"{r[k]:{fmt}}"

    for r in rows:
        ref = static[(r["method"], r["concurrency"])]
        p = (f"{r['p50_s']:.2f} | {r['p95_s']:.2f}") if "p50_s" in r else "- | -"
        cpu = (f"{rng(r, 'tok_cpu_s', '.0f')} | {100 * r['tok_cpu_s'] / ref['tok_cpu_s']:.0f}%") if "tok_cpu_s" in r else "- | -"
        gaps = (f" {1e3 * r['itl_p50_s']:.1f} / {1e3 * r['itl_p99_s']:.1f} / {1e3 * r['itl_max_s']:.0f} |"
                if "itl_p50_s" in r else (" - |" if itl else ""))
        print(f"| {r['method']} | {r['mode']} | {r['concurrency']} | {rng(r, 'tok_s', '.0f')} | "
              f"{100 * r['tok_s'] / ref['tok_s']:.0f}% | {cpu} | {p} |{gaps}")
    print("\n| method | serving | storage (build) | resident weights (model + encodings + cache) | ratio | process RSS |")
    print("|---|---|---|---|---|---|")
    for m, mode in ((m, mode) for m in args.methods.split(",") for mode in ("routed", "experts")):
        r = next((x for x in rows if x["method"] == m and x["mode"] == mode and "resident" in x), None)
        if r is None:
            continue
        res = r["resident"]
        w = sum(v for k, v in res.items() if k not in ("kv_cache", "process_rss"))
        label = "one server" if mode == "routed" else f"{r['processes']} servers (sum)"
        print(f"| {m} | {label} | {r['storage_bytes'] / 2**20:.2f} MiB | {w / 2**20:.2f} MiB "
              f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in res.items() if k != 'process_rss')}) | "
              f"{w / r['storage_bytes']:.2f} | {res['process_rss'] / 2**20:.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
