#!/usr/bin/env python
"""GPU path against CPU path on one machine: `build --device cuda` vs `--device cpu`.

    python tools/bench_gpu.py [--sets 0.5b,70b:2] [--methods ties] [--cpu-workers 4,8,16] [--gpu-workers 4] [--rounds 3]

For each checkpoint set (a base + 3 bf16 fine-tunes from tools/synth_checkpoints.py: "0.5b", or
"70b:L" for L Llama-2-70B-shaped layers; generated once under --data):
  1. the machine's page-cache read rate: every input file read with pread in 8 MiB pieces by
     1 thread and by one thread per core, after a first read that puts the files in the cache;
  2. `streammerge build` of each method (ties: density 0.5, weights 0.5/0.3/0.2) with
     `--device cpu -j N` for each --cpu-workers count and with `--device cuda`, wall time of the
     whole command, in alternating rounds (every path and the read rate once per round);
  3. input GB/s = input bytes / wall time (medians with min-max ranges), GPU / CPU ratios per
     round, the CPU path's scaling with threads, and whether all stores hold the same bytes;
  4. the GPU command's floors, once per round: a bare interpreter that imports torch and starts
     CUDA (beside what the build waited for its device, started beside the planning), and the
     store's bytes written with O_DIRECT (bench_merge's write floor).

Prints a markdown table and writes the figures to --out (JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

PIECE = 8 << 20
BLOCK_ELEMS = 4 << 20
RECIPE_PARAMS = {
    "ties": "{{weight: {w}, density: 0.5}}",
    "dare_ties": "{{weight: {w}, density: 0.5}}",
    "task_arithmetic": "{{weight: {w}}}",
}
WEIGHTS = (0.5, 0.3, 0.2)


def generate(data: Path, spec: str) -> Path:
    preset, _, layers = spec.partition(":")
    out = data / spec.replace(":", "-")
    if (out / ".complete").exists():
        return out
    cmd = [sys.executable, str(ROOT / "tools" / "synth_checkpoints.py"), str(out), "--preset", preset,
           "--finetunes", "3", "--no-tokenizer"]
    if layers:
        cmd += ["--layers", layers]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    (out / ".complete").write_text("")
    print(f"generated {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return out


def input_files(data: Path) -> list[Path]:
    return sorted(data.rglob("*.safetensors"))


def _read_range(job: tuple[Path, int, int]) -> int:
    path, start, length = job
    buf = bytearray(PIECE)
    fd = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[: min(PIECE, length - done)]], start + done)
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)
    return done


def read_rate(files: list[Path], threads: int) -> float:
    """GB/s of reading `files` (already cached) with `threads` threads, 8 MiB preads."""
    span = 256 << 20  # files cut into ranges so that threads share big files
    jobs = [(f, s, min(span, f.stat().st_size - s)) for f in files for s in range(0, f.stat().st_size, span)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(_read_range, jobs))
    return total / (time.perf_counter() - t0) / 1e9


def write_recipe(path: Path, method: str, data: Path) -> None:
    lines = [f"merge_method: {method}", f"base_model: {data / 'base'}", "models:"]
    for i, w in enumerate(WEIGHTS, 1):
        lines += [f"  - model: {data / f'ft{i}'}", "    parameters: " + RECIPE_PARAMS[method].format(w=w)]
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")


def store_digest(store: Path) -> str:
    files = sorted(p for p in (store / "tensors").rglob("*") if p.is_file())

    def one(p: Path) -> str:
        return p.relative_to(store).as_posix() + ":" + hashlib.sha256(p.read_bytes()).hexdigest()

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return hashlib.sha256("\n".join(pool.map(one, files)).encode()).hexdigest()


def run_build(recipe: Path, store: Path, device: str, workers: int) -> dict:
    # Same row blocks whatever the worker count, so that both stores can be compared byte for byte.
    cmd = [str(Path(sys.executable).parent / "streammerge"), "build", str(recipe), "--store", str(store),
           "--device", device, "--workers", str(workers), "--block-elements", str(BLOCK_ELEMS),
           "--no-progress", "--restart"]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "streammerge", *cmd[1:]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}{p.stderr}")
    # The build's own figure leaves out the interpreter, imports (torch: seconds) and planning;
    # what it spent waiting for the device to finish starting is said apart and taken out here.
    merge = re.search(r"read in ([0-9.]+)s(?:, ([0-9.]+)s of it waiting for the device)?", p.stdout)
    wait = float(merge.group(2) or 0) if merge else 0.0
    return {"wall_s": wall, "merge_s": float(merge.group(1)) - wait if merge else None, "device_wait_s": wait,
            "output": (p.stdout + p.stderr).strip()[-400:]}


def write_rate(work: Path, nbytes: int) -> float:
    """GB/s of writing `nbytes` to a new file in `work` with O_DIRECT, then fsync (bench_merge's
    floor): the store's bytes cannot reach the disk faster than this."""
    from bench_merge import CHUNK, write_direct

    buf = memoryview(mmap.mmap(-1, CHUNK))  # page-aligned, as O_DIRECT needs
    t0 = time.perf_counter()
    write_direct(work / "floor.bin", nbytes, buf)
    return nbytes / (time.perf_counter() - t0) / 1e9


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "tensors").rglob("*") if p.is_file())


def cuda_start() -> float:
    """Wall time of the GPU path's fixed cost alone: an interpreter that imports torch and creates
    a CUDA context, nothing else. No GPU command can take less."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "import torch; torch.empty(1, device='cuda'); torch.cuda.synchronize()"],
                       capture_output=True)
    return time.perf_counter() - t0 if p.returncode == 0 else float("nan")  # no GPU here: no such floor


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict, f: str = "{:.2f}") -> str:
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="0.5b,70b:2", help="checkpoint sets: 0.5b, 70b:LAYERS (comma-separated)")
    ap.add_argument("--methods", default="ties", help="comma-separated: " + ", ".join(RECIPE_PARAMS))
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "gpu")
    ap.add_argument("--cpu-workers", default=f"4,{os.cpu_count() or 1}",
                    help="thread counts for the CPU path, each measured (the scaling table); the ratio uses the fastest median")
    ap.add_argument("--gpu-workers", default="4", help="thread counts for the GPU path (the ratio uses the fastest median)")
    ap.add_argument("--rounds", "--repeat", type=int, default=3,
                    help="alternating rounds: each round runs every path once; medians with min-max ranges")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu is None:
        sys.exit("no CUDA device: this benchmark compares the GPU path with the CPU path")
    cores = os.cpu_count() or 1
    paths = [("cpu", int(w)) for w in args.cpu_workers.split(",")] + [("cuda", int(w)) for w in args.gpu_workers.split(",")]
    rows = []
    for spec in args.sets.split(","):
        data = generate(args.data, spec)
        files = input_files(data)
        size = sum(f.stat().st_size for f in files)
        read_rate(files, cores)  # bring everything into the page cache
        for method in args.methods.split(","):
            work = args.work / f"{spec.replace(':', '-')}-{method}"
            work.mkdir(parents=True, exist_ok=True)
            recipe = work / "recipe.yaml"
            write_recipe(recipe, method, data)
            runs: dict = {p: [] for p in paths}
            cache: dict = {"1 thread": [], f"{cores} threads": []}
            start: list[float] = []
            write: list[float] = []
            # Round by round, every path once (and the page-cache floor), so that drift on a
            # shared machine spreads over all of them instead of favouring whichever ran first.
            for rnd in range(args.rounds):
                cache["1 thread"].append(read_rate(files, 1))
                cache[f"{cores} threads"].append(read_rate(files, cores))
                start.append(cuda_start())
                for device, workers in paths:
                    r = run_build(recipe, work / f"{device}-{workers}.zarr", device, workers)
                    runs[(device, workers)].append(r)
                    if len(write) == rnd:  # once a round, once a store exists to size it
                        write.append(write_rate(work, store_bytes(work / f"{device}-{workers}.zarr")))
                    print(f"{spec} {method} round {rnd} {device} -j{workers}: {r['wall_s']:.1f}s wall, merge {r['merge_s']:.1f}s\n  "
                          f"{r['output']}", file=sys.stderr, flush=True)
            digests = {p: store_digest(work / f"{p[0]}-{p[1]}.zarr") for p in paths}
            per_path = {}
            for (device, workers), rs in runs.items():
                wall, merge = stats([r["wall_s"] for r in rs]), stats([r["merge_s"] for r in rs])
                per_path[f"{device}-j{workers}"] = {"device": device, "workers": workers, "wall_s": wall, "merge_s": merge,
                                                    "device_wait_s": stats([r["device_wait_s"] for r in rs]),
                                                    "gb_s": stats([size / r["wall_s"] / 1e9 for r in rs]),
                                                    "merge_gb_s": stats([size / r["merge_s"] / 1e9 for r in rs])}
            best = {d: min((v for v in per_path.values() if v["device"] == d), key=lambda v: v["wall_s"]["median"])
                    for d in ("cpu", "cuda")}
            # per round, the fastest CPU thread count's time over the GPU's: a ratio of same-round runs
            ci, gi = (paths.index((best[d]["device"], best[d]["workers"])) for d in ("cpu", "cuda"))
            ratio_whole = stats([runs[paths[ci]][i]["wall_s"] / runs[paths[gi]][i]["wall_s"] for i in range(args.rounds)])
            ratio_merge = stats([runs[paths[ci]][i]["merge_s"] / runs[paths[gi]][i]["merge_s"] for i in range(args.rounds)])
            rows.append({"set": spec, "method": method, "input_gb": size / 1e9,
                         "page_cache_gb_s": {k: stats(v) for k, v in cache.items()}, "paths": per_path,
                         "cuda_start_s": stats(start), "direct_write_gb_s": stats(write),
                         "store_gb": store_bytes(work / f"{paths[0][0]}-{paths[0][1]}.zarr") / 1e9,
                         "best": {d: f"{v['device']}-j{v['workers']}" for d, v in best.items()},
                         "gpu_over_cpu_whole": ratio_whole, "gpu_over_cpu_merge": ratio_merge,
                         "identical": len(set(digests.values())) == 1})
    print(f"\n{gpu}, {cores} cores; {args.rounds} alternating rounds, median (min-max)\n")
    print("input GB/s = input bytes / time; 'whole' is the command's wall time, 'merge' the build's own (no interpreter,")
    print("imports or planning). GPU / CPU: the fastest CPU thread count against the GPU path, per round.\n")
    print("| set | method | input GB | page cache GB/s, 1 thread / all | CPU path GB/s, whole / merge | "
          "GPU path GB/s, whole / merge | GPU / CPU, whole / merge | GPU merge / all-thread read | same bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        c1, call = r["page_cache_gb_s"].values()
        cpu, cuda = (r["paths"][r["best"][d]] for d in ("cpu", "cuda"))
        share = cuda["merge_gb_s"]["median"] / call["median"]
        print(f"| {r['set']} | {r['method']} | {r['input_gb']:.2f} | {fmt(c1, '{:.1f}')} / {fmt(call, '{:.1f}')} | "
              f"{fmt(cpu['gb_s'])} / {fmt(cpu['merge_gb_s'])} (-j{cpu['workers']}) | "
              f"{fmt(cuda['gb_s'])} / {fmt(cuda['merge_gb_s'])} (-j{cuda['workers']}) | "
              f"{fmt(r['gpu_over_cpu_whole'], '{:.1f}x')} / {fmt(r['gpu_over_cpu_merge'], '{:.1f}x')} | {share:.0%} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    print("\nThe GPU command's time outside its merge, seconds, median (min-max): the whole command, what the build")
    print("waited for the device to finish starting (it starts beside the planning), and the floor: a bare")
    print("`python -c 'import torch; torch.empty(1, device=\"cuda\")'`. Merge rates above leave the wait out. The last")
    print("column is the merge's own floor: the store's bytes written with O_DIRECT at this disk's rate.\n")
    print("| set | method | GPU whole s | GPU merge s | waited for the device s | torch + CUDA start alone s | "
          "store GB at the O_DIRECT write rate s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cuda = r["paths"][r["best"]["cuda"]]
        write_s = stats([r["store_gb"] / w for w in r["direct_write_gb_s"]["runs"]])
        print(f"| {r['set']} | {r['method']} | {fmt(cuda['wall_s'], '{:.1f}')} | {fmt(cuda['merge_s'], '{:.1f}')} | "
              f"{fmt(cuda['device_wait_s'], '{:.1f}')} | {fmt(r['cuda_start_s'], '{:.1f}')} | "
              f"{r['store_gb']:.2f} GB / {fmt(r['direct_write_gb_s'], '{:.1f}')} GB/s = {fmt(write_s, '{:.1f}')} |")
    print("\nCPU path scaling (input GB/s of the whole command, median (min-max)):\n")
    counts = [w for d, w in paths if d == "cpu"]
    print("| set | method | " + " | ".join(f"-j{w}" for w in counts) + " |")
    print("|---|---|" + "---:|" * len(counts))
    for r in rows:
        print(f"| {r['set']} | {r['method']} | " + " | ".join(fmt(r["paths"][f"cpu-j{w}"]["gb_s"]) for w in counts) + " |")
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "cores": cores, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
