#!/usr/bin/env python
"""What reading a LoRA input's delta costs: `checkpoints/lora._product` (the exact sum's float32
rounding, the same bits on any machine) against a plain float32 gemm (BLAS's order, its
machine's bits), on the chunks a build computes (`_CHUNK` entries: rows x the tensor's width).

    python tools/bench_lora_product.py [--rank 16] [--width 4096] [--rounds 7]

One thread (OMP/OPENBLAS/MKL threads set to 1 before numpy loads), alternating the two round by
round after a warm-up (numba's compile or cache load); prints ms per million delta entries,
median (min-max), and the ratio per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streammerge.checkpoints import lora  # noqa: E402
from streammerge.jit import available  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunks", type=int, default=16, help="chunks per round")
    args = ap.parse_args()
    rows = max(2, lora._CHUNK // args.width)
    rng = np.random.default_rng(0)
    tall = (rng.standard_normal((rows, args.rank)) * 0.1).astype(np.float32)
    wide = (rng.standard_normal((args.rank, args.width)) * 0.1).astype(np.float32)
    paths = {"exact (_product)": lambda: lora._product(tall, wide), "float32 gemm": lambda: tall @ wide}
    for f in paths.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.rounds):
        for name, f in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.chunks):
                f()
            times[name].append((time.perf_counter() - t0) * 1e3 / (args.chunks * rows * args.width / 1e6))
    print(f"rank {args.rank}, chunks of {rows} x {args.width}, 1 thread, numba {'on' if available() else 'off'}; "
          f"{args.rounds} alternating rounds, median (min-max)\n")
    print("| product | ms per million entries |")
    print("|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) |")
    ratios = [a / b for a, b in zip(*times.values())]
    print(f"\nexact / float32 per round: {statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f})")


if __name__ == "__main__":
    main()
