#!/usr/bin/env python
"""Benchmark streammerge against mergekit and against the floor, in the same run.

    python tools/bench_merge.py --preset 0.5b --methods task_arithmetic [--repeat 3] [--memcap 800] [--json OUT]
        [--baseline DIR] [--mergekit-rounds N]

Generates (once, cached under --data) a base and three fine-tunes. For each method, each
streammerge tree first runs once untimed (its first run compiles the numba loops, cached on disk
after: seconds that would land in round 1; `warmup_s` in the JSON), then `--repeat` rounds each
run, in turn, `streammerge build --export`, `mergekit-yaml` and the floor, every run
preceded, untimed, by the removal of the previous outputs, `sync` (dirty pages of one run must not
be written back during the next) and a read of every input into the page cache. The floor is what
no tool can beat on this box: reading every input byte from the page cache (into one reused
buffer) plus writing the output's byte count with O_DIRECT (page-aligned buffer, then fsync) to
the output's filesystem. Wall times are whole commands (`/usr/bin/time -v`, which also gives the
peak RSS and the CPU seconds: on a shared box, compare those too). Reported: medians with min-max ranges, tool/floor and mergekit/streammerge (per round,
so both runs saw the same box), a markdown table and the exact command line; `--json` writes the
same figures for the README's regeneration. With --memcap, each tool also runs once under a memory
cgroup cap of that many MB (tools/memcap.sh) and the table says whether it completed.

`streammerge` is this source tree's package (PYTHONPATH set to it). `--baseline DIR` runs another
tree's (e.g. a checkout of main) as a fourth tool in the same rounds, and reports baseline /
streammerge per round: an A/B on the same box. `--mergekit-rounds N` runs mergekit in the first N
rounds only (minutes per run for ties); its ratios then come from those rounds.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shlex
import shutil
import statistics
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
PAGE = 4096
CHUNK = 16 * 2**20  # the floor's read and write buffer


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


def timed(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds, CPU seconds (user + system), peak RSS (MB), exit code."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
        "tail": (p.stdout + p.stderr)[-800:],
    }


def read_inputs(files: list[Path], buf: memoryview) -> int:
    """Every byte of `files` read into `buf`, chunk by chunk; returns the byte count."""
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total


def write_direct(path: Path, nbytes: int, buf: memoryview) -> None:
    """`nbytes` (rounded up to whole pages) written to a new `path` with O_DIRECT, then fsynced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    fd = os.open(path, flags, 0o644)
    try:
        left = -(-nbytes // PAGE) * PAGE
        while left:
            n = os.write(fd, buf[: min(left, len(buf))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def floor_run(files: list[Path], out_bytes: int, out_dir: Path, buf: memoryview) -> dict:
    """The floor: the inputs read from the page cache, then the output's bytes written O_DIRECT."""
    t0 = time.perf_counter()
    read_inputs(files, buf)
    t1 = time.perf_counter()
    write_direct(out_dir / "floor.bin", out_bytes, buf)
    t2 = time.perf_counter()
    return {"rc": 0, "wall_s": t2 - t0, "read_s": t1 - t0, "write_s": t2 - t1, "cpu_s": float("nan"), "peak_rss_mb": float("nan")}


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
    p = subprocess.run(["bash", str(memcap), str(mb), *cmd], capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    m = re.search(r"rc=(\d+) maxusage_mb=(\d+)", last)
    return {"ok": bool(m and m.group(1) == "0"), "maxusage_mb": int(m.group(2)) if m else None, "line": last or p.stderr[-300:]}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict, digits: int = 1, unit: str = "") -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'])}{unit} ({f.format(s['min'])}-{f.format(s['max'])})"


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def bench_method(args, method: str, data: Path, inputs: list[Path], buf: memoryview) -> dict:
    bin_dir = Path(sys.executable).parent
    work = args.work / method.replace(":", "-")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = work / "recipe.yaml"
    write_recipe(recipe, method, data)
    def streammerge(tree: Path, store: str, out: str) -> list[str]:
        """streammerge build of the source tree `tree` (its package first on the path)."""
        return [
            "env", f"PYTHONPATH={tree}", str(bin_dir / "streammerge"), "build", str(recipe), "--store", str(work / store),
            "--export", str(work / out), "--workers", str(args.workers),
            "--memory-limit", args.memory_limit, "--no-progress", "--restart", "--overwrite",
        ]

    tools = {"streammerge": streammerge(ROOT, "job.zarr", "sm-out")}
    outputs = {"streammerge": ("job.zarr", "sm-out"), "baseline": ("base.zarr", "base-out"), "mergekit": ("mk-out",), "floor": ()}
    if args.baseline:
        tools["baseline"] = streammerge(args.baseline.resolve(), "base.zarr", "base-out")
    mk = bin_dir / "mergekit-yaml"
    routing = method.split(":")[0] in ("mediator", "1bit")
    if not args.skip_mergekit and mk.exists() and not routing:
        tools["mergekit"] = [str(mk), str(recipe), str(work / "mk-out"), "--quiet", "-j", str(args.workers)]

    def fresh(tool: str) -> None:
        """Untimed, before every run: outputs removed, dirty pages written back, inputs cached."""
        for d in outputs[tool]:
            shutil.rmtree(work / d, ignore_errors=True)
        os.sync()
        read_inputs(inputs, buf)

    # One untimed run of each streammerge tree first: a tree's first run compiles its numba loops
    # (seconds; cached on disk for the next runs), which would otherwise land in round 1.
    warmup = {}
    for tool in ("streammerge", "baseline"):
        if tool in tools:
            fresh(tool)
            warmup[tool] = timed(tools[tool])["wall_s"]
    runs: dict[str, list[dict]] = {t: [] for t in (*tools, "floor")}
    out_bytes = None
    for round_ in range(args.repeat):
        for tool, cmd in tools.items():
            if tool == "mergekit" and round_ >= args.mergekit_rounds:
                continue
            fresh(tool)
            r = timed(cmd)
            if r["rc"] != 0:
                print(f"{method} {tool} failed (exit {r['rc']}):\n{r['tail']}", file=sys.stderr)
            runs[tool].append(r)
            if tool == "streammerge" and r["rc"] == 0:
                out_bytes = out_bytes or output_bytes(work / "sm-out")
        if out_bytes is None and "mergekit" in runs and runs["mergekit"][-1]["rc"] == 0:
            out_bytes = output_bytes(work / "mk-out")
        if out_bytes:
            fresh("floor")
            runs["floor"].append(floor_run(inputs, out_bytes, work, buf))
    result = {"method": method, "output_bytes": out_bytes, "warmup_s": warmup, "tools": {}}
    for tool, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        entry = {"failed": len(rs) - len(ok)}
        if ok:
            entry["wall_s"] = spread([r["wall_s"] for r in ok])
            if tool != "floor":
                entry["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
                entry["cpu_s"] = spread([r["cpu_s"] for r in ok])
            else:
                entry["read_s"] = spread([r["read_s"] for r in ok])
                entry["write_s"] = spread([r["write_s"] for r in ok])
        result["tools"][tool] = entry
    # ratios per round: each compares runs made minutes apart on the same box
    def ratios(num: str, den: str) -> dict | None:
        pairs = [(a, b) for a, b in zip(runs.get(num, []), runs.get(den, [])) if a["rc"] == 0 and b["rc"] == 0]
        return spread([a["wall_s"] / b["wall_s"] for a, b in pairs]) if pairs else None

    result["streammerge_over_floor"] = ratios("streammerge", "floor")
    result["mergekit_over_floor"] = ratios("mergekit", "floor")
    result["mergekit_over_streammerge"] = ratios("mergekit", "streammerge")
    result["baseline_over_streammerge"] = ratios("baseline", "streammerge")
    result["baseline_over_floor"] = ratios("baseline", "floor")
    result["mergekit_over_baseline"] = ratios("mergekit", "baseline")
    if args.memcap:
        for tool, cmd in tools.items():
            fresh(tool)
            result["tools"][tool]["cap"] = capped(cmd, args.memcap)
    storage = work / "job.zarr" / "storage.json"
    if storage.exists():
        info = json.loads(storage.read_text())
        result["storage"] = f"{info['total_bytes'] / 2**30:.2f} GiB = {100 * info['share_of_full_routing']:.1f}% of full routing"
    return result


def print_table(results: list[dict], args, header: str) -> None:
    print(header)
    cap_col = f" | under {args.memcap} MB cap" if args.memcap else ""
    print(f"| method | tool | wall s, median (min-max) | / floor | CPU s (user + sys) | peak RSS MB | mergekit / streammerge{cap_col} |")
    print("|---|---|---:|---:|---:|---:|---:|" + ("---|" if args.memcap else ""))
    for res in results:
        for tool, e in res["tools"].items():
            if "wall_s" not in e:
                print(f"| {res['method']} | {tool} (failed) | | | | | |" + (" |" if args.memcap else ""))
                continue
            over = res.get(f"{tool}_over_floor")
            speed = res.get(f"mergekit_over_{tool}") if tool in ("streammerge", "baseline") else None
            speed = fmt(speed, 1, "x") if speed else res.get("storage", "") if tool == "streammerge" else ""
            if tool == "baseline" and res.get("baseline_over_streammerge"):
                speed += f"; baseline / streammerge {fmt(res['baseline_over_streammerge'], 2, 'x')}"
            if tool == "floor":
                speed = f"read {fmt(e['read_s'], 2)} + write {fmt(e['write_s'], 2)}"
            failed = f" ({e['failed']} failed)" if e["failed"] else ""
            rss = f"{e['peak_rss_mb']:.0f}" if "peak_rss_mb" in e else ""
            cpu = fmt(e["cpu_s"], 1) if "cpu_s" in e else ""
            cap = ""
            if args.memcap and "cap" in e:
                c = e["cap"]
                cap = " | " + ("completed" if c.get("ok") else "killed/failed") + f" (max {c.get('maxusage_mb')} MB)"
            elif args.memcap:
                cap = " |"
            print(f"| {res['method']} | {tool}{failed} | {fmt(e['wall_s'], 2)} | {fmt(over, 2, 'x') if over else ''} | {cpu} | {rss} | {speed}{cap} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b", help="synthetic model shape (tiny, 0.5b, 70b)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--methods", default="task_arithmetic", help="comma-separated merge methods")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "data", help="checkpoint cache directory")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out", help="scratch directory for outputs (the floor writes here too)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="700MB", help="streammerge --memory-limit")
    ap.add_argument("--memcap", type=int, default=0, help="also run each tool once under this memory cap (MB)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-rounds", type=int, default=1 << 30, help="run mergekit in the first N rounds only (it is slow)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also run streammerge from this source tree (e.g. a checkout of main), alternating with this tree's")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each runs every tool once, alternating")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    data = synth_set(args.data, args.preset, args.layers)
    inputs = sorted(data.rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in inputs)
    buf = memoryview(mmap.mmap(-1, CHUNK))  # page-aligned, touched once by the first read
    results = [bench_method(args, m, data, inputs, buf) for m in args.methods.split(",")]

    command = "python " + shlex.join([os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]])
    header = (f"\n{command}\n\ninput: {data} ({size / 1e9:.2f} GB, base + 3 fine-tunes), {os.cpu_count()} cores, "
              f"{args.repeat} alternating rounds; median (min-max)\n")
    print_table(results, args, header)
    if args.json:
        doc = {"command": command, "input_bytes": size, "cores": os.cpu_count(), "repeat": args.repeat, "results": results}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
