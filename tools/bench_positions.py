#!/usr/bin/env python
"""Cost of one sparse-delta product from each resident position form of a Mediator expert
(routing/deltas.py CompactSparse): "columns" (CSR, int16 column indices) against "mask" (the
packed bitmask), decoded per product (no --memory-budget: `product_in_rows`, a dense decode a
row range at a time) or cached (within one).

    python tools/bench_positions.py [--shapes 1024x256,256x1024] [--rho 0.1,0.5] [--tokens 32]
                                    [--value-bits 16] [--repeat 5]

Random positions (exactly int(rho * n) of them) and values; one torch thread; per (rho, form)
the mean wall time of one product x S^T over the shapes, best of --repeat runs, in ms, with the
resident bytes of the positions.
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


def main(argv=None) -> None:
    import torch

    from streammerge.routing.deltas import CompactSparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1024x256,256x1024")
    ap.add_argument("--rho", default="0.1,0.5")
    ap.add_argument("--tokens", type=int, default=32, help="rows of x (a decoding step's batch)")
    ap.add_argument("--value-bits", type=int, default=16, choices=(8, 16))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
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
