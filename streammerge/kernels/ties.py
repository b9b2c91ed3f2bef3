"""The TIES family on a device: ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear (methods/ties.py, whose docstring defines them).

Per model: tau = theta - base, its keep mask, the optional rescale, the weight; then TIES sign
consensus or the plain sum, lambda, plus the base. The float32 operations and their order are
those of `_Family.merge` and `_consensus` (comparisons may be rewritten: they round nothing), so
the results are the same bits, with one exception, the L1 rescale:

    The CPU sums |tau| and |masked tau| in float64 in its own order (numpy's pairwise sums of
    cache-sized chunks, added chunk after chunk); the device sums them in float64 in another.
    Each float64 sum is within its rounding error of the exact one: about 1e-16 relative
    typically, at most (n / 65536 + log2 n) * 2**-53 (4e-13 for n = 2**28). The float32 scale
    (float32(before) / float32(after)) can therefore differ only when one of the float64 sums
    falls that close to a float32 rounding boundary (relative spacing 6e-8): by one ulp of that
    sum, with odds of about 1e-16 / 6e-8 ~ 1e-8 per model and tensor on ordinary data.

Masks, as the CPU passes select them:
    magnitude (ties)          kernels/topk.py, k = _magnitude_k(density, n);
    outliers (breadcrumbs*)   top-k2 minus top-k1, (k1, k2) = _outlier_ks(density, gamma, n);
    random (dare_*, della*)   methods/_random.py's counter-based streams of numpy's PCG64: the
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

from ..errors import StreammergeError
from . import DeviceTensor
from .topk import magnitude_bits, topk_mask

HOST_CHUNK = 1 << 24  # positions of a random stream drawn on the CPU and uploaded at a time


def family_kernel(spec):
    """kernel(x, params) of the family's method `spec` (a methods.ties._Spec)."""

    def kernel(x: DeviceTensor, params):
        return _merge(spec, x, params)

    kernel.__name__ = kernel.__qualname__ = f"{spec.name}_kernel"
    kernel.__doc__ = __doc__  # what it computes, and its one difference from the CPU path
    return kernel


def _merge(spec, x: DeviceTensor, params):
    import torch

    # Imported here, not at the top: methods/ties.py imports this module, and importing any
    # method module first imports them all.
    from ..methods import ties as fam

    base = x.base
    if not x.models:
        return base.clone()
    n = x.numel
    weights = [np.float32(w) for w in params.model_values("weight")]
    dens = fam._densities(params)
    rescale = bool(params.globals["rescale"])
    l1 = rescale and params.globals["rescale_mode"] == "l1"
    ds = []
    for i, theta in enumerate(x.models):
        d = theta - base
        state = fam._active(spec, dens[i], n)
        if state == "zero":
            d.mul_(0.0)
        elif state == "mask":
            keep, div = _keep(fam, spec, x, params, i, d)
            scale = _l1_scale(fam, d, keep) if l1 else None
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


def _keep(fam, spec, x: DeviceTensor, params, i: int, d):
    """(bool keep mask shaped like d, inverse_density divisor or None) of model i, as
    `_BlockMasks.mask` gives them for every chunk."""
    import torch

    from ..methods import _random

    density = fam._densities(params)[i]
    sparsify = spec.sparsify
    if sparsify in (fam.MAGNITUDE, fam.OUTLIERS):
        bits = magnitude_bits(d)
        if sparsify == fam.MAGNITUDE:
            keep = topk_mask(bits, fam._magnitude_k(density, x.numel))
        else:
            k1, k2 = fam._outlier_ks(density, float(params.per_model[i]["gamma"]), x.numel)
            keep = topk_mask(bits, k2)
            if k1 > 0:
                keep &= ~topk_mask(bits, k1)
        return keep.view(d.shape), _scalar(np.float32(density), d)
    key = _random.stream_key(params.seed, x.name, i, sparsify)
    if sparsify == fam.RANDOM:
        keep = _from_host(x, lambda start, count: _random.bernoulli_keep(key, start, count, density), torch.bool)
        return keep.view(d.shape), (_scalar(np.float32(density), d) if density > 0 else None)
    probs = _della_probs(fam, x, params, i, d)
    uniforms = _from_host(x, lambda start, count: _random.uniform32(key, start, count), torch.float32)
    return torch.lt(uniforms.view(d.shape), probs), probs


def _from_host(x: DeviceTensor, draw, dtype):
    """draw(start, count) -> numpy values of flat positions start.., for the whole tensor, on x.device."""
    import torch

    out = torch.empty(x.numel, dtype=dtype, device=x.device)
    for start in range(0, x.numel, HOST_CHUNK):
        count = min(HOST_CHUNK, x.numel - start)
        out[start : start + count].copy_(torch.from_numpy(draw(start, count)))
    return out


def _l1_scale(fam, d, keep):
    """The l1 pass's float32 scale sum|tau| / sum|masked tau|, or None where it does not apply."""
    import torch

    mags = d.abs()
    before = np.float32(mags.sum(dtype=torch.float64).item())
    after = np.float32(mags.mul_(keep).sum(dtype=torch.float64).item())
    if before < fam._EPS_RESCALE or after < fam._EPS_RESCALE:
        return None
    return before / after


def _della_probs(fam, x: DeviceTensor, params, i: int, d):
    """DELLA keep probabilities of model i: (density - eps) + rank_norm * 2 * eps in float32."""
    import torch

    density = fam._densities(params)[i]
    eps = float(params.per_model[i]["epsilon"])
    if density + eps >= 1 or density - eps <= 0:
        raise StreammergeError(
            f"{x.name}: della needs density +/- epsilon within (0, 1) "
            f"(model {i}: density {density}, epsilon {eps})"
        )
    if len(x.shape) == 0:
        probs = torch.full_like(d, 0.5)
    elif len(x.shape) == 1:
        if x.numel > fam.MAX_1D_RANKED:
            raise StreammergeError(
                f"{x.name}: della on a 1-D tensor of {x.numel} elements (ranks are tensor-wide; "
                f"at most {fam.MAX_1D_RANKED} supported)"
            )
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
    """`_consensus` (and normalize) of methods/ties.py; frees each d of `ds` once used."""
    import torch

    if len(ds) == 1:
        positive = ds[0] >= 0
    else:
        total = ds[0] + ds[1]
        for d in ds[2:]:
            total += d
        positive = total >= 0
        del total
    merged = divisor = None
    for i, w in enumerate(weights):
        d, ds[i] = ds[i], None
        # sign(d) == elected sign, which the CPU tests as d * (+1 or -1) > 0 (false for 0 and NaN)
        agree = torch.where(positive, d > 0, d < 0)
        if merged is None:
            merged = d.mul_(agree)
            divisor = agree * float(w)
        else:
            merged += d.mul_(agree)
            divisor += agree * float(w)
        del d, agree
    merged.add_(0.0)  # torch sums from +0: an all-zero sum is +0
    if normalize:
        divisor.add_(divisor == 0)
        merged.div_(divisor)
    return merged


def _sum(ds: list, weights, normalize: bool):
    """The linear sum of `_Family.merge` (ds[0] becomes the result)."""
    merged = ds[0]
    for d in ds[1:]:
        merged += d
    merged.add_(0.0)  # torch sums from +0: an all-zero sum is +0
    if normalize:
        total = np.float32(0)
        for w in weights:
            total = np.float32(total + w)
        if abs(total) < 1e-8:  # a zero divisor counts as 1
            total = np.float32(1)
        merged.div_(_scalar(total, merged))
    return merged
