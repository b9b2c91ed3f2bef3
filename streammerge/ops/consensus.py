"""TIES sign election and disjoint sum: the one numpy and the one torch implementation.

For task vectors h_1..h_N (float32, one shape, in order) and optional weights w_i:

    total   = h_1 + h_2 + ... + h_N          (float32, in order)
    elected = +1 where total >= 0, else -1
    counted = h_i * elected > 0              (false for 0 and NaN)
    S       = sum_i h_i * counted_i          (in order, from the first product)
    D       = sum_i w_i * counted_i          (w_i = 1 without weights: a count)

or, with `weigh_values` (SCE's erase step, whose hats are not weighted yet),
S = sum_i h_i * (w_i * counted_i).

`disjoint_mean` then divides S by D, a zero divisor counting as 1. TIES merges
(methods/ties.py and its kernel), SCE (methods/sce.py), 1bit-Merging's fallback and dynamic merge
(methods/onebit.py, kernels/onebit.py) and the routed runtime (routing/encoded.py) all use
these, so the CPU path, the device path and a served answer share one election. Both
implementations do the same float32 operations in the same order (comparisons are written
differently: they round nothing), so they agree bit for bit (tests/test_consensus.py). The TIES
family's streamed merge runs the election inside one compiled loop with its masks and weights
(ops/fused.py, where numba is importable), tested bit for bit against this numpy code
(tests/test_fused.py).

torch is imported inside the torch functions: importing this module never imports torch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

_F0 = np.float32(0)
_F1 = np.float32(1)
_F2 = np.float32(2)


# ---------------------------------------------------------------------------------------------
# numpy, into caller-owned buffers (the streamed methods reuse per-thread scratch)


def sum_into(hats: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """out = hats[0] + hats[1] + ... in order (float32)."""
    np.copyto(out, hats[0])
    for h in hats[1:]:
        np.add(out, h, out=out)
    return out


def consensus(hats, total, S, D, mb, tmp, weights=None, weigh_values: bool = False) -> None:
    """S and D of the module docstring, given total = sum_into(hats) (overwritten).

    mb (bool) and tmp (float32) are work buffers of the hats' shape; hats are not modified.
    """
    if weigh_values and weights is None:
        raise ValueError("weigh_values needs weights")
    np.greater_equal(total, 0, out=mb)
    elected = total  # reuse: +1 / -1
    np.multiply(mb, _F2, out=elected)
    np.subtract(elected, _F1, out=elected)
    for i, h in enumerate(hats):
        np.multiply(h, elected, out=tmp)
        np.greater(tmp, 0, out=mb)
        if i == 0:  # D, then S, start from the first terms
            if weights is None:
                np.copyto(D, mb)
            else:
                np.multiply(mb, weights[0], out=D)
            np.multiply(h, D if weigh_values else mb, out=S)
        else:  # tmp holds w_i * counted_i, then the term of S
            if weights is None:
                np.add(D, mb, out=D)
            else:
                np.multiply(mb, weights[i], out=tmp)
                np.add(D, tmp, out=D)
            np.multiply(h, tmp if weigh_values else mb, out=tmp)
            np.add(S, tmp, out=S)


def disjoint_mean(S: np.ndarray, D: np.ndarray, mb: np.ndarray) -> np.ndarray:
    """S / D in S, a zero divisor counting as 1 (mb: a bool work buffer)."""
    np.add(D, np.equal(D, 0, out=mb), out=D)
    np.divide(S, D, out=S)
    return S


def ties_merge(hats: Sequence[np.ndarray]) -> np.ndarray | None:
    """Sign election + disjoint mean (unweighted) of float32 arrays of one shape; None if empty."""
    hats = [np.asarray(h, dtype=np.float32) for h in hats]
    if not hats:
        return None
    total = sum_into(hats, np.empty_like(hats[0]))
    S, D, mb = np.empty_like(total), np.empty_like(total), np.empty(total.shape, bool)
    consensus(hats, total, S, D, mb, np.empty_like(total))
    return disjoint_mean(S, D, mb)


# ---------------------------------------------------------------------------------------------
# torch, on whole tensors


def consensus_torch(hats: Callable[[], Iterable], weights=None, inplace: bool = True, weigh_values: bool = False):
    """(S, D) of the module docstring, as torch tensors on the hats' device.

    `hats()` yields the hats in order, afresh on each call (a list's `lambda: ds` does, or a
    generator rebuilding them to save device memory); it is called twice. The first call's
    tensors are left untouched (their sum is a new tensor); with `inplace` the second call's are
    multiplied by their mask in place (the first becomes S), so no hat is copied.
    """
    import torch

    if weigh_values and weights is None:
        raise ValueError("weigh_values needs weights")
    it = iter(hats())
    total, fresh = next(it), False
    for h in it:
        if fresh:
            total.add_(h)
        else:  # the first sum is a new tensor: the hats stay untouched, none is copied
            total, fresh = total + h, True
    positive = total >= 0
    del total, it
    S = D = None
    for i, h in enumerate(hats()):
        # h * elected > 0, written as a choice between comparisons (false for 0 and NaN)
        counted = torch.where(positive, h > 0, h < 0)
        mass = counted.float() if weights is None else counted * float(weights[i])
        factor = mass if weigh_values else counted
        kept = h.mul_(factor) if inplace else h * factor
        if S is None:
            S, D = kept, mass
        else:
            S += kept
            D += mass
        del h, counted, kept, mass, factor
    return S, D


def disjoint_mean_torch(S, D):
    """S / D in S, a zero divisor counting as 1."""
    D += D == 0
    return S.div_(D)


def ties_torch(hats: Sequence):
    """`ties_merge` of float32 torch tensors (not modified), bit for bit."""
    return disjoint_mean_torch(*consensus_torch(lambda: hats, inplace=False))
