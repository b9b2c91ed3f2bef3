"""Shared rules of the merge math, below both backends: methods/ (numpy) and kernels/ (torch).

A rule that the CPU path and the device path must apply identically is written once, here,
so that the two cannot drift apart and neither backend imports the other:

    sparsify.py        the TIES family's specs and sparsification rules (densities, k, checks)
    consensus.py       TIES sign election + disjoint mean: one numpy and one torch implementation
    random_streams.py  counter-based random masks (DARE, DELLA): position -> random numbers
    topk.py            exact streamed top-k by magnitude (the passes methods and encodings use)
    exactsum.py        exact float32 sums independent of blocking (slerp, model_stock)

Arrows: ops/ imports only numpy, errors.py, dtypes.py and the method contract in
methods/base.py (which imports nothing of streammerge); methods/, kernels/, encodings/ and
analysis/ import ops/, never the reverse.
"""
