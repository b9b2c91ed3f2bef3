"""Mediator's sparse experts on a device, and SMSP blobs cut from a device selection.

The selection and the bytes are those of encodings/sparse.py: exactly k = top_rho_k(rho, n)
entries of the whole tensor, the largest |theta_t - D| with ties to the lowest flat index
(kernels/topk.py: the same set as the streamed TopK), and each block's kept entries (flat
offsets within the block, float32 values) go through `encode_sparse`, which rounds the values
to bf16 or int8 groups (`value_bits`), picks the layout from the block's element count and
writes the blob: the CPU's bytes, whatever the blocking.

D is the "mean" job's kernel (kernels/linear.py, the float32 operations of the numpy mean), then
rounded to the dense expert's dtype as `from_float32` does (nearest even), so S_t is taken
against D as stored.
"""

from __future__ import annotations

import numpy as np

from ..encodings.sparse import encode_sparse, top_rho_k
from ..dtypes import round_to_torch
from . import DeviceTensor
from .linear import mean
from .topk import magnitude_bits, topk_mask


def block_blobs(values, keep, x: DeviceTensor, value_bits: int = 16) -> list[bytes]:
    """One SMSP blob per block of `x.bounds`: the entries of flat float32 `values` where `keep`."""
    idx = keep.nonzero().reshape(-1)  # ascending flat indices
    kept = values[idx].cpu().numpy()
    idx = idx.cpu().numpy()
    starts = [r0 * x.row_elems for r0, _ in x.bounds]
    ends = [r1 * x.row_elems for _, r1 in x.bounds]
    lo, hi = np.searchsorted(idx, starts), np.searchsorted(idx, ends)
    return [encode_sparse(idx[a:b] - s, kept[a:b], e - s, value_bits) for a, b, s, e in zip(lo, hi, starts, ends)]


def top_rho_blobs(diff, k: int, x: DeviceTensor, value_bits: int = 16) -> list[bytes]:
    """Blobs per block of the exact top-k of |diff| (float32, the tensor's rows)."""
    flat = diff.reshape(-1)
    return block_blobs(flat, topk_mask(magnitude_bits(flat), k), x, value_bits)


def mediator_experts(tasks: list[str], rho: float, dense_dtype: str | None, value_bits: int, x: DeviceTensor, params) -> dict:
    """{task: blobs per block} of S_t = top-rho of (theta_t - D): `mediator_expert_method`'s merge."""
    if len(x.models) != len(tasks):
        raise ValueError(f"{x.name}: {len(x.models)} models for {len(tasks)} tasks")
    D = mean(x, params)
    if dense_dtype not in (None, "float32"):
        D = round_to_torch(D, dense_dtype)
    k = top_rho_k(rho, x.numel)
    return {task: top_rho_blobs(theta - D, k, x, value_bits) for task, theta in zip(tasks, x.models)}
