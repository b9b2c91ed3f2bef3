#!/usr/bin/env python
"""Benchmark streammerge against mergekit on the same recipe and checkpoints.

    python tools/bench_merge.py --preset 0.5b --methods task_arithmetic [--memcap 800] [--skip-mergekit]

Generates (once, cached under --data) a base and three fine-tunes, then for each method runs
`streammerge build --export` and `mergekit-yaml` under `/usr/bin/time -v`, reporting wall time
and peak RSS of the whole process; with --memcap, also runs each under a memory cgroup cap of
that many MB (tools/memcap.sh) and reports whether it completed. Prints a markdown table.
Every run of either tool starts alike: previous outputs removed, `sync`, inputs in the page cache.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

RECIPES = {
    "mediator": "parameters: {{task: {task}}}",  # routing methods: no mergekit counterpart
    "1bit": "parameters: {{task: {task}}}",
    "task_arithmetic": "parameters: {{weight: {w}}}",
    "ties": "parameters: {{weight: {w}, density: 0.5}}",
    "dare_ties": "parameters: {{weight: {w}, density: 0.5}}",
    "linear": "parameters: {{weight: {w}}}",
}


def write_recipe(path: Path, method: str, data: Path) -> None:
    weights = [0.5, 0.3, 0.2]
    tasks = ["chat", "math", "code"]
    method, _, preset = method.partition(":")  # e.g. 1bit:uniform
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {data / 'base'}")
    lines.append("models:")
    for i, w in enumerate(weights, 1):
        lines.append(f"  - model: {data / f'ft{i}'}")
        lines.append("    " + RECIPES[method].format(w=w, task=tasks[i - 1]))
    if preset:
        lines.append(f"parameters: {{preset: {preset}}}")
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")


def median_run(cmd: list[str], repeat: int, before=None) -> dict:
    """`timed` `repeat` times: median wall time, largest peak RSS, first failure if any."""
    runs = []
    for _ in range(repeat):
        if before:
            before()
        runs.append(timed(cmd))
    failed = [r for r in runs if r["rc"] != 0]
    walls = sorted(r["wall_s"] for r in runs)
    out = dict(failed[0] if failed else runs[0])
    out["wall_s"] = walls[len(walls) // 2]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["walls"] = walls
    return out


def timed(cmd: list[str], env=None) -> dict:
    """Run under /usr/bin/time -v: wall seconds, peak RSS (MB), exit code."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
        "tail": (p.stdout + p.stderr)[-800:],
    }


def synth_set(root: Path, preset: str, layers: int | None = None) -> Path:
    """root/<preset>[-<layers>l]/: a base and three bf16 fine-tunes (ft1..ft3) of the preset's
    shape, generated once (tools/synth_checkpoints.py) and reused by every benchmark."""
    data = root / (preset + (f"-{layers}l" if layers else ""))
    if not (data / "base" / "config.json").exists():
        import synth_checkpoints as synth

        shape = synth.PRESETS[preset]
        if layers:
            from dataclasses import replace

            shape = replace(shape, layers=layers)
        t0 = time.perf_counter()
        synth.make_family(data, shape, n_finetunes=3, dtype="bfloat16", seed=0)
        print(f"generated {data} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return data


def capped(cmd: list[str], mb: int) -> dict:
    memcap = ROOT / "tools" / "memcap.sh"
    if not memcap.exists():
        return {"ok": None, "note": "memcap.sh not found"}
    p = subprocess.run(["bash", str(memcap), str(mb), *cmd], capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    m = re.search(r"rc=(\d+) maxusage_mb=(\d+)", last)
    return {"ok": bool(m and m.group(1) == "0"), "maxusage_mb": int(m.group(2)) if m else None, "line": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b", help="synthetic model shape (tiny, 0.5b, 70b)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--methods", default="task_arithmetic", help="comma-separated merge methods")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "data", help="checkpoint cache directory")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out", help="scratch directory for outputs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="700MB", help="streammerge --memory-limit")
    ap.add_argument("--memcap", type=int, default=0, help="also run each tool under this memory cap (MB)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool (alternating); the median wall time is reported")
    args = ap.parse_args()

    data = synth_set(args.data, args.preset, args.layers)
    size = sum(f.stat().st_size for f in data.rglob("*.safetensors"))
    bin_dir = Path(sys.executable).parent
    rows = []
    for method in args.methods.split(","):
        work = args.work / method.replace(":", "-")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        recipe = work / "recipe.yaml"
        write_recipe(recipe, method, data)
        sm = [
            str(bin_dir / "streammerge"), "build", str(recipe), "--store", str(work / "job.zarr"),
            "--export", str(work / "sm-out"), "--workers", str(args.workers),
            "--memory-limit", args.memory_limit, "--no-progress", "--restart", "--overwrite",
        ]
        # Before each run of either tool, untimed: the previous run's outputs are removed, dirty
        # pages written back (mergekit writes through the page cache; its writeback would land
        # in the next run) and the inputs read into the page cache (this VM evicts idle pages).
        def fresh(*outputs):
            for d in outputs:
                shutil.rmtree(work / d, ignore_errors=True)
            os.sync()
            subprocess.run(["cat", *map(str, data.rglob("*.safetensors"))], stdout=subprocess.DEVNULL)

        r = median_run(sm, args.repeat, before=lambda: fresh("job.zarr", "sm-out"))
        if r["rc"] != 0:
            print(r["tail"], file=sys.stderr)
        row = {"method": method, "tool": "streammerge", **r}
        if args.memcap:
            fresh("job.zarr", "sm-out")
            row["cap"] = capped(sm, args.memcap)
        rows.append(row)
        storage = work / "job.zarr" / "storage.json"
        if storage.exists():
            import json

            info = json.loads(storage.read_text())
            row["storage"] = f"{info['total_bytes'] / 2**30:.2f} GiB = {100 * info['share_of_full_routing']:.1f}% of full routing"
        mk = bin_dir / "mergekit-yaml"
        routing = method.split(":")[0] in ("mediator", "1bit")
        if not args.skip_mergekit and mk.exists() and not routing:
            mk_cmd = [str(mk), str(recipe), str(work / "mk-out"), "--quiet", "-j", str(args.workers)]
            r = median_run(mk_cmd, args.repeat, before=lambda: fresh("mk-out"))
            if r["rc"] != 0:
                print(r["tail"], file=sys.stderr)
            row = {"method": method, "tool": "mergekit", **r}
            if args.memcap:
                fresh("mk-out")
                row["cap"] = capped(mk_cmd, args.memcap)
            rows.append(row)

    print(f"\ninput: {data} ({size / 1e9:.2f} GB, base + 3 fine-tunes), {os.cpu_count()} cores, median of {args.repeat}\n")
    for row in rows:
        print(f"  {row['method']} {row['tool']}: walls {', '.join(f'{w:.1f}' for w in row['walls'])} s")
    cap_col = f" | under {args.memcap} MB cap" if args.memcap else ""
    print(f"| method | tool | wall (s) | peak RSS (MB) | speed-up (storage for routing methods){cap_col} |")
    print("|---|---|---:|---:|---:|" + ("---|" if args.memcap else ""))
    for row in rows:
        peer = next((r for r in rows if r["method"] == row["method"] and r["tool"] == "mergekit"), None)
        speed = f"{peer['wall_s'] / row['wall_s']:.1f}x" if peer and row["tool"] == "streammerge" and peer["rc"] == 0 else ""
        status = "" if row["rc"] == 0 else f" (exit {row['rc']})"
        cap = ""
        if args.memcap:
            c = row["cap"]
            cap = " | " + ("completed" if c.get("ok") else "killed/failed") + f" (max {c.get('maxusage_mb')} MB)"
        speed = speed or row.get("storage", "")
        print(f"| {row['method']} | {row['tool']}{status} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} | {speed}{cap} |")


if __name__ == "__main__":
    main()
