#!/usr/bin/env python
"""GPU path against CPU path on one machine: `build --device cuda` vs `--device cpu`.

    python tools/bench_gpu.py [--sets 0.5b,70b:2] [--methods ties] [--cpu-workers N] [--gpu-workers 4]

For each checkpoint set (a base + 3 bf16 fine-tunes from tools/synth_checkpoints.py: "0.5b", or
"70b:L" for L Llama-2-70B-shaped layers; generated once under --data):
  1. the machine's page-cache read rate: every input file read with pread in 8 MiB pieces by
     1 thread and by one thread per core, after a first read that puts the files in the cache;
  2. `streammerge build` of each method (ties: density 0.5, weights 0.5/0.3/0.2) with
     `--device cpu -j <cores>` and with `--device cuda`, wall time of the whole command;
  3. input GB/s = input bytes / wall time, and whether both stores hold the same bytes.

Prints a markdown table and writes the figures to --out (JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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
    # The build's own figure leaves out the interpreter, imports (torch: seconds) and planning.
    merge = re.search(r"read in ([0-9.]+)s", p.stdout)
    return {"wall_s": wall, "merge_s": float(merge.group(1)) if merge else None, "output": (p.stdout + p.stderr).strip()[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="0.5b,70b:2", help="checkpoint sets: 0.5b, 70b:LAYERS (comma-separated)")
    ap.add_argument("--methods", default="ties", help="comma-separated: " + ", ".join(RECIPE_PARAMS))
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "gpu")
    ap.add_argument("--cpu-workers", default=f"4,{os.cpu_count() or 1}", help="thread counts tried for the CPU path (the fastest is reported)")
    ap.add_argument("--gpu-workers", default="4", help="thread counts tried for the GPU path (the fastest is reported)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the best is reported")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu is None:
        sys.exit("no CUDA device: this benchmark compares the GPU path with the CPU path")
    cores = os.cpu_count() or 1
    rows = []
    for spec in args.sets.split(","):
        data = generate(args.data, spec)
        files = input_files(data)
        size = sum(f.stat().st_size for f in files)
        read_rate(files, cores)  # bring everything into the page cache
        cache = {"1 thread": read_rate(files, 1), f"{cores} threads": read_rate(files, cores)}
        for method in args.methods.split(","):
            work = args.work / f"{spec.replace(':', '-')}-{method}"
            work.mkdir(parents=True, exist_ok=True)
            recipe = work / "recipe.yaml"
            write_recipe(recipe, method, data)
            runs = {}
            for device, counts in (("cpu", args.cpu_workers), ("cuda", args.gpu_workers)):
                tries = []
                for workers in map(int, counts.split(",")):
                    for _ in range(args.repeat):
                        r = run_build(recipe, work / f"{device}.zarr", device, workers)
                        r.update(workers=workers, gb_s=size / r["wall_s"] / 1e9, merge_gb_s=size / r["merge_s"] / 1e9)
                        print(f"{spec} {method} {device} -j{workers}: {r['wall_s']:.1f}s wall, merge {r['merge_s']:.1f}s\n  "
                              f"{r['output']}", file=sys.stderr, flush=True)
                        tries.append(r)
                runs[device] = min(tries, key=lambda r: r["wall_s"])
                runs[device]["tries"] = [(t["workers"], t["wall_s"], t["merge_s"]) for t in tries]
                if tries[-1] is not runs[device]:  # the store compared below is the fastest run's
                    run_build(recipe, work / f"{device}.zarr", device, runs[device]["workers"])
            same = store_digest(work / "cpu.zarr") == store_digest(work / "cuda.zarr")
            rows.append({"set": spec, "method": method, "input_gb": size / 1e9, "page_cache_gb_s": cache,
                         "cpu": runs["cpu"], "cuda": runs["cuda"], "identical": same})
    print(f"\n{gpu}, {cores} cores\n")
    print("input GB/s = input bytes / time; 'whole' is the command's wall time, 'merge' the build's own (no interpreter,")
    print("imports or planning).\n")
    print("| set | method | input GB | page cache GB/s (1 thread / all) | CPU path GB/s, whole / merge | "
          "GPU path GB/s, whole / merge | GPU / CPU, whole / merge | same bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        c1, call = r["page_cache_gb_s"].values()
        cpu, gpu = r["cpu"], r["cuda"]
        print(f"| {r['set']} | {r['method']} | {r['input_gb']:.2f} | {c1:.1f} / {call:.1f} | "
              f"{cpu['gb_s']:.2f} / {cpu['merge_gb_s']:.2f} (-j{cpu['workers']}) | "
              f"{gpu['gb_s']:.2f} / {gpu['merge_gb_s']:.2f} (-j{gpu['workers']}) | "
              f"{cpu['wall_s'] / gpu['wall_s']:.1f}x / {cpu['merge_s'] / gpu['merge_s']:.1f}x | "
              f"{'yes' if r['identical'] else 'NO'} |")
    if args.out:
        args.out.write_text(json.dumps({"gpu": gpu, "cores": cores, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
