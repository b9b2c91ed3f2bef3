#!/usr/bin/env python
"""Llama-2-70B-shaped benchmark: `ties` over a base + 3 fine-tunes under a 1 GB memory cap.

    python tools/bench_70b.py [--layers 2] [--memcap 1000] [--memory-limit 1000MB] [--keep]

1. Generates once (cached under --data, reused while its `.complete` stamp matches) a base and
   three fine-tunes with tools/synth_checkpoints.py, preset "70b" (hidden 8192, intermediate
   28672, 64 heads / 8 KV heads, vocab 32000, bf16) with --layers N (>= 2; ~4.5 GB per
   2-layer model). Free disk is checked with `df` first.
2. Runs, as one command,
       memcap.sh CAP /usr/bin/time -v streammerge build ties.yaml --store S --export O ...
   (ties, density 0.5, weights 0.5/0.3/0.2): memcap.sh prints `rc maxusage_mb failcnt` of the
   cgroup (anonymous memory + page cache charged to it), /usr/bin/time the peak RSS.
3. Reports input GB, wall time, throughput (input GB/s), peak RSS, whether it completed under the
   cap, and an extrapolation to the 80 layers of Llama-2-70B:

       T_80 = T_startup + 80 * (M_layer + E_layer) + (M_fixed + E_fixed)

   M_layer: merge seconds of one decoder layer, M_fixed: of the tensors outside the layers
   (embed_tokens, lm_head, final norm). They come from the store's own completion records: every
   block marker (done/...) and stats file (stats/...) is created when its work finishes, so
   sorting them by mtime and charging each interval between consecutive records to the tensor
   of the record that ends it splits the merge phase's wall time exactly among tensors (with 2
   threads, concurrent tensors share intervals: the split is approximate, the sum is exact).
   E_layer, E_fixed: the export's time split in proportion to output bytes (export is a pure
   stream: read chunk, pwrite). T_startup: the rest of the wall time (interpreter, planning,
   store creation, fsync), which does not grow with the layer count. Everything measured here
   is linear in bytes per tensor shape, and all 80 layers of the real model have the shapes of
   the measured ones.

Prints a markdown table and writes the figures to <work>/bench_70b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMCAP = ROOT / "tools" / "memcap.sh"
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FULL_LAYERS = 80
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5


def shape_for(layers: int):
    sys.path.insert(0, str(ROOT / "tools"))
    from dataclasses import replace

    import synth_checkpoints as synth

    return replace(synth.PRESETS["70b"], layers=layers)


def model_bytes(layers: int) -> int:
    return shape_for(layers).n_params * 2  # bf16


def free_bytes(path: Path) -> int:
    """Free space where `path` lives, as `df` reports it."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["df", "-B1", "--output=avail", str(path)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    except (OSError, subprocess.CalledProcessError, ValueError):
        return shutil.disk_usage(path).free


def generate(data: Path, layers: int) -> float:
    """The base + 3 fine-tunes, unless a complete set for this shape is cached; returns seconds spent."""
    stamp = data / ".complete"
    want = {"preset": "70b", "layers": layers, "finetunes": 3, "dtype": "bfloat16", "seed": 0}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return 0.0
    need = 4 * model_bytes(layers)
    if data.exists():
        shutil.rmtree(data)
    free = free_bytes(data.parent)
    if free < need + 2 * 10**9:
        sys.exit(f"not enough disk for the checkpoints: {need / 1e9:.1f} GB needed (+2 GB margin), {free / 1e9:.1f} GB free")
    print(f"generating 70B-shaped checkpoints ({layers} layers, 4 x {model_bytes(layers) / 1e9:.2f} GB) in {data}", file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "synth_checkpoints.py"), str(data), "--preset", "70b",
         "--layers", str(layers), "--finetunes", "3", "--no-tokenizer"],
        check=True,
    )
    stamp.write_text(json.dumps(want))
    return time.perf_counter() - t0


def write_recipe(path: Path, data: Path) -> None:
    lines = ["merge_method: ties", f"base_model: {data / 'base'}", "models:"]
    for i, w in enumerate(WEIGHTS, 1):
        lines += [f"  - model: {data / f'ft{i}'}", f"    parameters: {{weight: {w}, density: {DENSITY}}}"]
    lines.append("dtype: bfloat16")
    path.write_text("\n".join(lines) + "\n")


def completion_split(store: Path) -> tuple[dict[str, float], float, float]:
    """Seconds of the merge phase charged to each tensor, from the mtimes of its completion records."""
    events = []
    for sub in ("done", "stats"):
        root = store / sub
        if not root.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(root).parts  # (stage, tensor..., block) or (stage, tensor.npz)
                if sub == "done":
                    name = "/".join(rel[1:-1])
                else:
                    name = "/".join(rel[1:])[: -len(".npz")] if f.endswith(".npz") else None
                if name:
                    events.append((p.stat().st_mtime, name))
    events.sort()
    per: dict[str, float] = {}
    if not events:
        return per, 0.0, 0.0
    # Records are named by the job's store key (e.g. "tensors/<tensor name>"). The merge phase
    # starts when the store is created (manifest.json is its last file, written just before).
    manifest = store / "manifest.json"
    prev = manifest.stat().st_mtime if manifest.is_file() else None
    for t, name in events:
        if prev is not None:
            per[name] = per.get(name, 0.0) + (t - prev)
        prev = t
    return per, events[0][0], events[-1][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic models (>= 2)")
    ap.add_argument("--data", type=Path, default=None, help="checkpoint cache (default bench-out/data/70b-<N>l)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "70b", help="store and export directory")
    ap.add_argument("--memcap", type=int, default=1000, help="memory cgroup cap in MB (0: no cap)")
    ap.add_argument("--memory-limit", default="1000MB", help="streammerge --memory-limit")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cluster", default=None, help="pass --cluster (e.g. local:2) to streammerge: dask.distributed")
    ap.add_argument("--keep", action="store_true", help="keep the store and the export afterwards")
    ap.add_argument(
        "--warm", action="store_true",
        help="leave the inputs in the page cache as they are (default: evict them first, posix_fadvise DONTNEED on "
        "these files only, so every run starts cold)",
    )
    args = ap.parse_args()
    if args.layers < 2:
        ap.error("--layers must be at least 2")
    data = args.data or ROOT / "bench-out" / "data" / f"70b-{args.layers}l"

    gen_s = generate(data, args.layers)
    inputs = sorted(data.rglob("*.safetensors"))
    input_bytes = sum(f.stat().st_size for f in inputs)
    out_bytes = model_bytes(args.layers)

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    free = free_bytes(work)
    if free < 2 * out_bytes + 10**9:
        sys.exit(f"not enough disk for the store and the export: {2 * out_bytes / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    recipe = work / "ties.yaml"
    write_recipe(recipe, data)
    store, out = work / "job.zarr", work / "out"
    sm = [
        str(Path(sys.executable).parent / "streammerge"), "build", str(recipe), "--store", str(store), "--export", str(out),
        "--workers", str(args.workers), "--memory-limit", args.memory_limit, "--no-progress",
    ] + (["--cluster", args.cluster] if args.cluster else [])
    cmd = ["/usr/bin/time", "-v", *sm]
    if args.memcap:
        if not MEMCAP.exists():
            sys.exit(f"{MEMCAP} not found")
        cmd = ["bash", str(MEMCAP), str(args.memcap), *cmd]
    if not args.warm:
        for f in inputs:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    printable = " ".join(cmd).replace(str(ROOT) + "/", "")
    print(f"$ {printable}", file=sys.stderr)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr

    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    elapsed = re.search(r"Elapsed \(wall clock\) time .*?: (?:(\d+):)?(\d+):([\d.]+)", text)
    cap = re.search(r"rc=(\d+) maxusage_mb=(\d+) failcnt=(\d+)", text)
    built = re.search(r"read in ([\d.]+)s", text)
    exported = re.search(r"exported .* in ([\d.]+)s", text)
    rc = int(cap.group(1)) if cap else p.returncode
    if elapsed:
        h, m, s = elapsed.groups()
        wall = int(h or 0) * 3600 + int(m) * 60 + float(s)
    completed = rc == 0 and ((out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file())
    fs_in = re.search(r"File system inputs: (\d+)", text)  # 512-byte blocks read from disk
    if not completed:
        print(text[-3000:], file=sys.stderr)

    per, _, _ = completion_split(store)
    layer_s = sum(v for k, v in per.items() if LAYER_RE.search(k))
    fixed_s = sum(v for k, v in per.items() if not LAYER_RE.search(k))
    merge_s = float(built.group(1)) if built else float("nan")
    export_s = float(exported.group(1)) if exported else float("nan")
    shape = shape_for(args.layers)
    layer_out = model_bytes(args.layers) - model_bytes(args.layers - 1)  # bytes of one decoder layer (bf16)
    fixed_out = out_bytes - args.layers * layer_out
    m_layer = layer_s / args.layers
    e_layer = export_s * layer_out / out_bytes
    e_fixed = export_s * fixed_out / out_bytes
    startup = wall - (layer_s + fixed_s) - export_s
    t80 = startup + FULL_LAYERS * (m_layer + e_layer) + (fixed_s + e_fixed)
    full_input = 4 * model_bytes(FULL_LAYERS)

    res = {
        "command": printable,
        "layers": args.layers,
        "shape": {"hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads,
                  "kv_heads": shape.kv_heads, "vocab": shape.vocab},
        "input_bytes": input_bytes,
        "generate_s": gen_s,
        "wall_s": wall,
        "merge_s_reported": merge_s,
        "export_s_reported": export_s,
        "throughput_gb_s": input_bytes / 1e9 / wall,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "memcap_mb": args.memcap,
        "cgroup_maxusage_mb": int(cap.group(2)) if cap else None,
        "cgroup_failcnt": int(cap.group(3)) if cap else None,
        "disk_read_bytes": int(fs_in.group(1)) * 512 if fs_in else None,
        "rc": rc,
        "completed": completed,
        "merge_layer_s": m_layer,
        "merge_fixed_s": fixed_s,
        "export_layer_s": e_layer,
        "export_fixed_s": e_fixed,
        "startup_s": startup,
        "extrapolated_80_layers_s": t80,
        "full_input_bytes": full_input,
        "per_tensor_s": per,
    }
    (work / "bench_70b.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    ok = "yes" if completed else f"no (rc={rc})"
    cap_txt = f"{ok}, cgroup max {res['cgroup_maxusage_mb']} MB, failcnt {res['cgroup_failcnt']}" if args.memcap else "n/a"
    print(f"\n`{printable}`\n")
    print(f"Llama-2-70B-shaped, {args.layers} layers, base + 3 fine-tunes, bf16, ties (density {DENSITY}), "
          f"{args.cluster or f'{args.workers} threads'}, {os.cpu_count()} cores, inputs {'as cached' if args.warm else 'cold'}, "
          f"{(res['disk_read_bytes'] or 0) / 1e9:.1f} GB read from disk\n")
    print("| input | wall | throughput | peak RSS | under the cap |")
    print("|---:|---:|---:|---:|---|")
    print(f"| {input_bytes / 1e9:.2f} GB | {wall:.1f} s (merge {merge_s:.1f} s, export {export_s:.1f} s) | "
          f"{res['throughput_gb_s']:.3f} GB/s | {res['peak_rss_mb'] or float('nan'):.0f} MB | "
          f"{args.memcap} MB: {cap_txt} |")
    print(f"\nextrapolation to {FULL_LAYERS} layers ({full_input / 1e9:.0f} GB of input):")
    print(f"  T_80 = T_startup + {FULL_LAYERS} x (M_layer + E_layer) + (M_fixed + E_fixed)")
    print(f"       = {startup:.1f} + {FULL_LAYERS} x ({m_layer:.1f} + {e_layer:.1f}) + ({fixed_s:.1f} + {e_fixed:.1f})"
          f" = {t80:.0f} s ({t80 / 3600:.2f} h, {full_input / 1e9 / t80:.3f} GB/s)")


if __name__ == "__main__":
    main()
