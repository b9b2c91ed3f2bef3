"""Exact top-k by magnitude on a device: the same selection as ops/topk.py.

The k largest entries in the order (value descending, flat index ascending): values compared as
float32 bit patterns (non-negative floats order as their patterns; as int32 too, since the sign
bit is clear), so exactly k entries are kept and ties at the threshold go to the lowest flat
indices, as the streamed CPU selection does.

The threshold (the k-th largest pattern) comes from a radix select made of whole-tensor ops:
histograms (bincount) of the top 11 bits of the 31-bit patterns, then of the next 10 and the
last 10 bits among the entries sharing the digits found so far. Only the first histogram reads
the whole tensor; each later one reads the entries left from the one before (compacted). Small
histograms stay in shared memory on CUDA. torch.kthvalue is not used: on CUDA it runs one thread
block per slice, so one whole tensor is selected by a single SM, and it is flagged
nondeterministic.
"""

from __future__ import annotations

import numpy as np

_DIGITS = ((20, 11), (10, 10), (0, 10))  # (shift, width) of the radix digits, most significant first


def magnitude_bits(values):
    """int32 bit patterns of |values| (float32, flattened): ordered like the magnitudes.

    The sign bit is cleared on the pattern rather than by `abs`, which on CUDA returns a
    canonical NaN: numpy's abs keeps NaN payloads, and so must the order here."""
    import torch

    return values.reshape(-1).view(torch.int32) & 0x7FFFFFFF


def kth_largest(bits, k: int) -> tuple[int, int, int]:
    """(T, above, ties) for 1 <= k <= bits.numel(): the k-th largest of `bits` (int32 patterns of
    non-negative floats, flat), how many entries are > T and how many are == T."""
    import torch

    candidates = bits
    prefix = 0
    above = 0
    for shift, width in _DIGITS:
        digit = candidates >> shift
        if shift + width < 31:
            digit &= (1 << width) - 1
        hist = torch.bincount(digit, minlength=1 << width).cpu().numpy()
        at_least = np.cumsum(hist[::-1])  # at_least[j]: candidates whose digit >= top - j
        j = int(np.searchsorted(at_least, k - above))  # the first j reaching the rank still needed
        d = (1 << width) - 1 - j
        if j:
            above += int(at_least[j - 1])
        prefix |= d << shift
        if shift:
            candidates = candidates[digit == d]
        del digit
    return prefix, above, int(hist[d])


def topk_mask(bits, k: int):
    """bool mask (flat) of the k largest `bits` (int32 patterns of non-negative floats)."""
    import torch

    n = bits.numel()
    if k <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=bits.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=bits.device)
    threshold, above, ties = kth_largest(bits, k)
    if above + ties == k:
        return bits >= threshold
    keep = bits > threshold
    # Ties go to the lowest flat indices: those up to the (k - above)-th tie.
    cut = nth_true(bits == threshold, k - above)
    keep[: cut + 1] |= bits[: cut + 1] == threshold
    return keep


def nth_true(flags, m: int, chunk: int = 1 << 16) -> int:
    """Flat index of the m-th (1-based) True of the flat bool tensor `flags` (it has >= m).

    Counts per chunk, then one chunk's positions: no running count of the whole tensor (a
    4-byte integer per element) is formed."""
    import torch

    whole = flags.numel() // chunk * chunk
    counts = torch.cat([flags[:whole].view(-1, chunk).sum(1), flags[whole:].sum().view(1)])
    reached = torch.cumsum(counts, 0)
    c = int(torch.searchsorted(reached, m))  # the chunk where the count reaches m
    before = int(reached[c - 1]) if c else 0
    positions = torch.nonzero(flags[c * chunk : (c + 1) * chunk]).view(-1)
    return c * chunk + int(positions[m - before - 1])
