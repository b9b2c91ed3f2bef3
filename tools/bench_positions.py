#!/usr/bin/env python
"""Cost of one sparse-delta product from each resident position form of a Mediator expert
(routing/compact.py CompactSparse): "columns" (CSR, int16 column indices) against "mask" (the
packed bitmask), decoded per product (no --memory-budget: `product_in_rows`, a dense decode a
row range at a time) or cached (within one).

    python tools/bench_positions.py [--shapes 1024x256,256x1024] [--rho 0.1,0.5] [--tokens 32]
                                    [--value-bits 16] [--repeat 5]

Random positions (exactly int(rho * n) of them) and values; one torch thread; per (rho, form)
the mean wall time of one product x S^T over the shapes, best of --repeat runs, in ms, with the
resident bytes of the positions.

    python tools/bench_positions.py --load [--shapes 14336x4096] [--rho 0.1,0.5] [--value-bits 8]
                                    [--block-rows 512] [--repeat 3]

--load instead measures loading one expert from its stored blocks (encodings/sparse.py blobs of
--block-rows rows, each kept entry with probability rho): the runtime's `CompactSparse.load`
(block by block) against the form built from SparseDelta's flat index, alternating, each run a
fresh process: wall time and the rise of the peak RSS over the run (sampled every 2 ms), medians
with min-max, and the expert's resident MB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Fake:
    """What CompactSparse reads of a SparseDelta: sorted flat positions, values, size."""

    def __init__(self, index, value, size):
        self.index, self.value, self.size = index, value, size


def expert(shape, rho, value_bits, gen):
    import numpy as np
    import torch

    from streammerge.encodings.sparse import quantize_int8
    from streammerge.routing.encoded import Int8Values, Values

    n = shape[0] * shape[1]
    idx = torch.randperm(n, generator=gen)[: int(rho * n)].sort().values
    val = torch.randn(idx.numel(), generator=gen) * 0.01
    if value_bits == 8:
        scale, q = quantize_int8(val.numpy())
        value = Int8Values(torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(scale)), [(0, 0)])
    else:
        value = Values(val.bfloat16())
    return Fake(idx.to(torch.int32), value, n)


def timed(f, repeat: int, inner: int = 20) -> float:
    f()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


class Blobs:
    """A store of one tensor's blobs (what the loaders read)."""

    def __init__(self, blobs):
        self.blobs = blobs

    def read_blob(self, path, b):
        return self.blobs[b]


def load_once(shape, rho: float, value_bits: int, block_rows: int, path: str) -> dict:
    """One load of a random expert (in this process): seconds, peak RSS rise, resident bytes."""
    import threading

    import numpy as np
    import torch

    from streammerge.encodings.sparse import encode_sparse
    from streammerge.routing.compact import CompactSparse
    from streammerge.routing.encoded import SparseDelta

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows, cols = shape
    blobs = []
    for r0 in range(0, rows, block_rows):
        size = min(block_rows, rows - r0) * cols
        off = np.flatnonzero(rng.random(size) < rho)
        blobs.append(encode_sparse(off, (rng.standard_normal(off.size) * 0.01).astype(np.float32), size, value_bits=value_bits))
    store, job = Blobs(blobs), {"shape": [rows, cols], "block_rows": block_rows, "nblocks": len(blobs)}

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    before = rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    if path == "blocks":
        cs = CompactSparse.load(store, "x", job, "cpu")
    else:
        cs = CompactSparse(SparseDelta(store, "x", job, "cpu"), shape)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    return {"seconds": seconds, "peak_rise": max(peak[0], rss()) - before, "resident": cs.nbytes, "layout": cs.layout}


def bench_load(args, shapes) -> None:
    import json
    import statistics
    import subprocess

    def mid(v, scale=1.0, fmt="{:.2f}"):
        v = [x * scale for x in v]
        return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

    print(f"one expert's load, value_bits {args.value_bits}, blocks of {args.block_rows} rows, {args.repeat} alternating runs, "
          "medians (min-max)")
    print(f"{'shape':>11} {'rho':>5} {'path':>12} {'seconds':>18} {'peak rise MB':>20} {'resident MB':>12}")
    for shape in shapes:
        for rho in (float(r) for r in args.rho.split(",")):
            runs = {"index": [], "blocks": []}
            for _ in range(args.repeat):
                for path in runs:
                    case = json.dumps([list(shape), rho, args.value_bits, args.block_rows, path])
                    out = subprocess.run([sys.executable, __file__, "--one-load", case], check=True, capture_output=True, text=True)
                    runs[path].append(json.loads(out.stdout))
            for path, rs in runs.items():
                name = "flat index" if path == "index" else "load"
                print(f"{'x'.join(map(str, shape)):>11} {rho:>5} {name:>12} {mid([r['seconds'] for r in rs]):>18} "
                      f"{mid([r['peak_rise'] for r in rs], 2**-20, '{:.0f}'):>20} {rs[0]['resident'] / 2**20:>12.1f}")


def main(argv=None) -> None:
    import torch

    from streammerge.routing.compact import CompactSparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="default 1024x256,256x1024 (products), 14336x4096 (--load)")
    ap.add_argument("--rho", default="0.1,0.5")
    ap.add_argument("--tokens", type=int, default=32, help="rows of x (a decoding step's batch)")
    ap.add_argument("--value-bits", type=int, default=16, choices=(8, 16))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--load", action="store_true", help="measure loading an expert from its blocks instead of products")
    ap.add_argument("--block-rows", type=int, default=512, help="--load: rows of a stored block")
    ap.add_argument("--one-load", help=argparse.SUPPRESS)  # one --load run, in a child process
    args = ap.parse_args(argv)
    if args.one_load:
        import json

        shape, rho, bits, block_rows, path = json.loads(args.one_load)
        print(json.dumps(load_once(tuple(shape), rho, bits, block_rows, path)))
        return
    if args.load:
        bench_load(args, [tuple(int(v) for v in s.split("x")) for s in (args.shapes or "14336x4096").split(",")])
        return
    args.shapes = args.shapes or "1024x256,256x1024"
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"ms per product, {args.tokens} rows, one thread, mean over {args.shapes}, value_bits {args.value_bits}")
    print(f"{'rho':>5} {'form':>8} {'decoded':>9} {'cached':>8} {'cached as':>10} {'position bytes / entry':>23}")
    for rho in (float(r) for r in args.rho.split(",")):
        experts = [(expert(s, rho, args.value_bits, gen), s) for s in shapes]
        for layout in ("columns", "mask"):
            per, cached, pos, kinds = 0.0, 0.0, 0, set()
            for sp, shape in experts:
                cs = CompactSparse(sp, shape, layout=layout)
                x = torch.randn(args.tokens, shape[1], generator=gen)
                m = cs.decoded()
                assert torch.allclose(CompactSparse.product(m, x), x @ cs.dense().t(), atol=1e-5)
                per += timed(lambda: cs.product_in_rows(x), args.repeat)  # the runtime's uncached product
                cached += timed(lambda: CompactSparse.product(m, x), args.repeat)
                pos += cs.nbytes - cs.value.nbytes
                kinds.add("dense" if m.layout == torch.strided else "CSR")
            n = sum(a * b for _, (a, b) in experts)
            print(f"{rho:>5} {layout:>8} {per / len(experts):>9.3f} {cached / len(experts):>8.3f} {'/'.join(sorted(kinds)):>10} {pos / n:>23.3f}")


if __name__ == "__main__":
    main()
