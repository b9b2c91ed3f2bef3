"""The TIES family on a device: ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear (methods/ties.py, whose docstring defines them).

Per model: tau = theta - base, its keep mask, the optional rescale, the weight; then TIES sign
consensus or the plain sum, lambda, plus the base. The float32 operations and their order are
those of `_Family.merge` and ops/consensus.py (comparisons may be rewritten: they round nothing), so
the results are the same bits, with one exception, the L1 rescale:

    The CPU sums |tau| and |masked tau| in float64 in its own order (numpy's pairwise sums of
    cache-sized chunks, added chunk after chunk); the device sums them in float64 in another.
    Each float64 sum is within its rounding error of the exact one: about 1e-16 relative
    typically, at most (n / 65536 + log2 n) * 2**-53 (4e-13 for n = 2**28). The float32 scale
    (float32(before) / float32(after)) can therefore differ only when one of the float64 sums
    falls that close to a float32 rounding boundary (relative spacing 6e-8): by one ulp of that
    sum, with odds of about 1e-16 / 6e-8 ~ 1e-8 per model and tensor on ordinary data.

Masks, as the CPU passes select them:
    magnitude (ties)          kernels/topk.py, k = magnitude_k(density, n) (ops/sparsify.py);
    outliers (breadcrumbs*)   top-k2 minus top-k1, (k1, k2) = outlier_ks(density, gamma, n);
    random (dare_*, della*)   ops/random_streams.py's counter-based streams of numpy's PCG64: the
                              keep decisions (dare) and uniforms (della) are drawn on the CPU, in
                              chunks of HOST_CHUNK positions, and uploaded (1 byte per element for
                              dare, 4 for della); the device only compares. Generating PCG64 on
                              the device would need its 128-bit arithmetic.
    della ranks               a stable sort of the magnitude bit patterns along axis 1 (the whole
                              tensor for 1-D), as _rank_norm; 0-d: 0.5.

Divisions by a scalar divide by a 0-d tensor on the device: torch's CUDA division by a CPU
scalar multiplies by its reciprocal instead, which can be an ulp off.
"""

from __future__ import annotations

import numpy as np

from ..ops import random_streams
from ..ops import sparsify as rules
from ..ops.consensus import consensus_torch, disjoint_mean_torch
from ..ops.sparsify import weight_sum
from . import DeviceTensor
from .topk import magnitude_bits, topk_mask

HOST_CHUNK = 1 << 24  # positions of a random stream drawn on the CPU and uploaded at a time


def family_kernel(spec):
    """kernel(x, params) of the family's method `spec` (an ops.sparsify.Spec)."""

    def kernel(x: DeviceTensor, params):
        return _merge(spec, x, params)

    kernel.__name__ = kernel.__qualname__ = f"{spec.name}_kernel"
    kernel.__doc__ = __doc__  # what it computes, and its one difference from the CPU path
    return kernel


def _merge(spec, x: DeviceTensor, params):
    import torch

    base = x.base
    if not x.models:
        return base.clone()
    n = x.numel
    weights = [np.float32(w) for w in params.model_values("weight")]
    dens = rules.densities(params)
    rescale = bool(params.globals["rescale"])
    l1 = rescale and params.globals["rescale_mode"] == "l1"
    ds = []
    for i, theta in enumerate(x.models):
        d = theta - base
        state = rules.active(spec, dens[i], n)
        if state == "zero":
            d.mul_(0.0)
        elif state == "mask":
            keep, div = _keep(spec, x, params, i, d)
            scale = _l1_scale(d, keep) if l1 else None
            d.mul_(keep)
            del keep
            if scale is not None:
                d.mul_(float(scale))
            elif rescale and not l1 and div is not None:
                d.div_(div)
        d.mul_(float(weights[i]))
        ds.append(d)
    del d
    if spec.consensus:
        merged = _consensus(ds, weights, bool(params.globals["normalize"]))
    else:
        merged = _sum(ds, weights, bool(params.globals["normalize"]))
    lam = float(params.globals["lambda"])
    if lam != 1:
        merged.mul_(float(np.float32(lam)))
    return torch.add(base, merged, out=merged)


def _scalar(value, like):
    """A float32 0-d tensor on `like`'s device (a divisor: see the module docstring)."""
    import torch

    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _keep(spec, x: DeviceTensor, params, i: int, d):
    """(bool keep mask shaped like d, inverse_density divisor or None) of model i, as
    `_BlockMasks.mask` gives them for every chunk."""
    import torch

    density = rules.densities(params)[i]
    sparsify = spec.sparsify
    if sparsify in (rules.MAGNITUDE, rules.OUTLIERS):
        bits = magnitude_bits(d)
        if sparsify == rules.MAGNITUDE:
            keep = topk_mask(bits, rules.magnitude_k(density, x.numel))
        else:
            k1, k2 = rules.outlier_ks(density, float(params.per_model[i]["gamma"]), x.numel)
            keep = topk_mask(bits, k2)
            if k1 > 0:
                keep &= ~topk_mask(bits, k1)
        return keep.view(d.shape), _scalar(np.float32(density), d)
    key = random_streams.stream_key(params.seed, x.name, i, sparsify)
    if sparsify == rules.RANDOM:
        keep = _from_host(x, lambda start, count: random_streams.bernoulli_keep(key, start, count, density), torch.bool)
        return keep.view(d.shape), (_scalar(np.float32(density), d) if density > 0 else None)
    probs = _della_probs(x, params, i, d)
    uniforms = _from_host(x, lambda start, count: random_streams.uniform32(key, start, count), torch.float32)
    return torch.lt(uniforms.view(d.shape), probs), probs


def _from_host(x: DeviceTensor, draw, dtype):
    """draw(start, count) -> numpy values of flat positions start.., for the whole tensor, on x.device."""
    import torch

    out = torch.empty(x.numel, dtype=dtype, device=x.device)
    for start in range(0, x.numel, HOST_CHUNK):
        count = min(HOST_CHUNK, x.numel - start)
        out[start : start + count].copy_(torch.from_numpy(draw(start, count)))
    return out


def _l1_scale(d, keep):
    """The l1 pass's float32 scale sum|tau| / sum|masked tau|, or None where it does not apply."""
    import torch

    mags = d.abs()
    before = np.float32(mags.sum(dtype=torch.float64).item())
    after = np.float32(mags.mul_(keep).sum(dtype=torch.float64).item())
    if before < rules.EPS_RESCALE or after < rules.EPS_RESCALE:
        return None
    return before / after


def _della_probs(x: DeviceTensor, params, i: int, d):
    """DELLA keep probabilities of model i: (density - eps) + rank_norm * 2 * eps in float32."""
    import torch

    density = rules.densities(params)[i]
    eps = float(params.per_model[i]["epsilon"])
    rules.check_della(x.name, i, density, eps)
    if len(x.shape) == 0:
        probs = torch.full_like(d, 0.5)
    elif len(x.shape) == 1:
        rules.check_rank1d(x.name, x.numel)
        probs = _rank_norm(d.abs().view(1, -1)).view(d.shape)
    else:
        probs = _rank_norm(d.abs().movedim(1, -1)).movedim(-1, 1)
    probs.mul_(2.0)
    probs.mul_(float(np.float32(eps)))
    probs.add_(float(np.float32(density - eps)))
    return probs


def _rank_norm(mags):
    """methods/ties.py's _rank_norm along the last axis: rank / (L - 1) in float32, where rank
    orders |tau| ascending with ties by index (a stable sort of the bit patterns)."""
    import torch

    L = mags.shape[-1]
    if L <= 1:
        return torch.full(mags.shape, 0.5, dtype=torch.float32, device=mags.device)
    order = torch.sort(mags.view(torch.int32), dim=-1, stable=True).indices
    ranks = torch.arange(L, dtype=torch.float32, device=mags.device).expand(mags.shape)
    norm = torch.empty(mags.shape, dtype=torch.float32, device=mags.device).scatter_(-1, order, ranks)
    del order
    return norm.div_(_scalar(L - 1, norm))


def _consensus(ds: list, weights, normalize: bool):
    """The consensus (and normalize) of `_Family.merge`: ops/consensus.py; the ds are consumed."""
    merged, divisor = consensus_torch(lambda: ds, weights)
    ds.clear()
    merged.add_(0.0)  # torch sums from +0: an all-zero sum is +0
    return disjoint_mean_torch(merged, divisor) if normalize else merged


def _sum(ds: list, weights, normalize: bool):
    """The linear sum of `_Family.merge` (ds[0] becomes the result)."""
    merged = ds[0]
    for d in ds[1:]:
        merged += d
    merged.add_(0.0)  # torch sums from +0: an all-zero sum is +0
    if normalize:
        merged.div_(_scalar(weight_sum(weights), merged))
    return merged
