"""1bit-Merging's encode and fallback jobs on a device (methods/onebit.py), whole tensors.

The float32 operations are the numpy methods', in the same order: tau = theta_t - theta_0;
sign bits tau >= 0 packed little-endian per row (1-D and 0-D tensors: per-block blobs by
`pack_signs_flat`); +-a as (tau >= 0) * 2a - a; 2bit as `two_bit_fit`; sparse top-rho by kernels/topk.py (the streamed
TopK's set) as `encode_sparse` blobs; bf16 rounding to nearest even; TIES in task order.

Scales. |tau| and tau^2 of float32 values are exact in float64, so only the order of the
float64 sums could change a bit. numpy's add.reduce sums each contiguous row pairwise, and
`pairwise_rows` reproduces that tree (blocks of at most 128 elements summed with 8 interleaved
accumulators, longer runs halved at a multiple of 8): the row sums are the same doubles. The
per-tensor alpha then sums its GROUP-element group sums with math.fsum on the host, as the
pass's reduce does, and the division, square root and float32 rounding are numpy's
(`scale_from`), so alpha and the per-row scales are bit-identical to the CPU path. Were numpy
to change its summation order, a float32 scale could differ (by one ulp) only where its float64
sum, whose rounding error is ~1e-16 relative, falls that close to a float32 rounding boundary.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..dtypes import round_to_torch
from ..encodings import onebit as enc
from ..encodings.sparse import top_rho_k
from ..geometry import row_elems
from ..ops.consensus import consensus_torch, disjoint_mean_torch
from . import DeviceTensor
from .sparse import top_rho_blobs
from .topk import magnitude_bits, topk_mask

PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE: runs up to this long are summed without halving
SUM_CHUNK = 1 << 24  # float64 elements of moments held at once


# ---------------------------------------------------------------------------------------------
# numpy's pairwise summation, on whole rows


@lru_cache(maxsize=256)
def _pairwise_plan(n: int):
    """numpy's summation tree for a row of n >= 8 elements.

    Returns (leaves, joins): leaves are the runs [start, start + length) summed directly, in
    order; joins, by height, are (ids, lefts, rights) index lists into a table whose first
    len(leaves) columns are the leaf sums and whose next columns are the joins in creation
    order (the root last).
    """
    leaves: list[tuple[int, int]] = []
    made: list[tuple[int, int, int]] = []  # (left, right, height); negative ids are joins

    def build(start: int, length: int) -> tuple[int, int]:
        if length <= PAIRWISE_BLOCK:
            leaves.append((start, length))
            return len(leaves) - 1, 0
        half = length // 2
        half -= half % 8
        (left, hl), (right, hr) = build(start, half), build(start + half, length - half)
        made.append((left, right, 1 + max(hl, hr)))
        return -len(made), 1 + max(hl, hr)

    build(0, n)

    def column(node: int) -> int:
        return node if node >= 0 else len(leaves) - node - 1

    by_height: dict[int, tuple[list, list, list]] = {}
    for j, (left, right, height) in enumerate(made):
        ids, lefts, rights = by_height.setdefault(height, ([], [], []))
        ids.append(len(leaves) + j)
        lefts.append(column(left))
        rights.append(column(right))
    return tuple(leaves), tuple(by_height[h] for h in sorted(by_height))


def pairwise_rows(y):
    """np.add.reduce(y, axis=1) of a float64 (rows, n) tensor, bit for bit (numpy's pairwise sum)."""
    import torch

    rows, n = y.shape
    if n < 8:  # numpy: res = 0.; res += a[i] in order
        res = torch.zeros(rows, dtype=y.dtype, device=y.device)
        for i in range(n):
            res += y[:, i]
        return res
    leaves, joins = _pairwise_plan(n)
    dev = y.device
    lane = torch.arange(8, device=dev)
    starts = torch.tensor([s for s, _ in leaves], device=dev)
    groups = [length // 8 for _, length in leaves]
    # accumulator j of a leaf: its elements j, j + 8, j + 16, ... added in order
    acc = y[:, starts[:, None] + lane]
    for g in range(1, max(groups)):
        active = [i for i, count in enumerate(groups) if count > g]
        if len(active) == len(leaves):
            acc += y[:, starts[:, None] + (8 * g) + lane]
        else:
            sel = torch.tensor(active, device=dev)
            acc[:, sel] += y[:, starts[sel, None] + (8 * g) + lane]
    a = acc.unbind(-1)
    leaf_sums = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    start, length = leaves[-1]  # only the last run has a remainder (halves are multiples of 8)
    for p in range(start + length - length % 8, start + length):
        leaf_sums[:, -1] += y[:, p]
    if not joins:
        return leaf_sums[:, 0]
    table = torch.empty((rows, len(leaves) + sum(len(ids) for ids, _, _ in joins)), dtype=y.dtype, device=dev)
    table[:, : len(leaves)] = leaf_sums
    for ids, lefts, rights in joins:
        table[:, ids] = table[:, lefts] + table[:, rights]
    return table[:, -1]


def moment_sums(t2d, scale: str) -> np.ndarray:
    """float64 row sums of |t| (absmean) or t^2 (rms) of a float32 (rows, n) tensor, as
    encodings/onebit.py's `moments` computes them; on the host."""
    import torch

    if scale not in enc.SCALES:  # pow:<g>: both moments, stacked as `moments` does
        return np.stack([moment_sums(t2d, "absmean"), moment_sums(t2d, "rms")], axis=-1)
    rows, n = t2d.shape
    step = max(1, SUM_CHUNK // max(n, 1))
    parts = []
    for r0 in range(0, rows, step):
        y = t2d[r0 : r0 + step].double()
        y = y.abs_() if scale == "absmean" else y.mul_(y)
        parts.append(pairwise_rows(y))
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)


def tensor_alpha(tau, scale: str) -> float:
    """The per-tensor alpha of `tau` (any shape), as the alpha pass computes it."""
    f = tau.reshape(-1)
    n = f.numel()
    full = (n // enc.GROUP) * enc.GROUP
    sums = [moment_sums(f[:full].view(-1, enc.GROUP), scale)] if full else []
    if full < n:
        sums.append(moment_sums(f[full:].view(1, -1), scale))
    return float(enc.scale_from(enc.exact_total(sums), n, scale))


def row_scales(tau2d, scale: str):
    """Per-row scales, float32 (rows,) on tau2d's device, as `encodings.onebit.row_scales`."""
    import torch

    return torch.from_numpy(enc.scale_from(moment_sums(tau2d, scale), tau2d.shape[1], scale)).to(tau2d.device)


def group_scales(tau2d, scale: str, group: int):
    """Per-group scales, float32 (rows, ceil(cols/G)) on tau2d's device, as
    `encodings.onebit.group_scales` (the same rows of moments, so the same doubles)."""
    import torch

    rows, cols = tau2d.shape
    full = cols // group
    parts = []
    if full:
        body = tau2d[:, : full * group].reshape(rows * full, group)
        parts.append(torch.from_numpy(enc.scale_from(moment_sums(body, scale), group, scale)).reshape(rows, full))
    if cols % group:
        tail = tau2d[:, full * group :].contiguous()
        parts.append(torch.from_numpy(enc.scale_from(moment_sums(tail, scale), cols % group, scale)).reshape(rows, 1))
    return torch.cat(parts, dim=1).to(tau2d.device)


def expand_groups(scales, group: int, cols: int):
    """float32 (rows, cols): each entry's group scale."""
    return scales.repeat_interleave(group, dim=1)[:, :cols]


# ---------------------------------------------------------------------------------------------
# pieces


def _geometry(x: DeviceTensor) -> tuple[int, int]:
    """(rows, cols) of the tensor seen as the encoding's 2-D rows: 1-D / 0-D are (n, 1)."""
    if len(x.shape) >= 2:
        return x.first.shape[0], row_elems(x.shape)
    return x.numel, 1


def _check(ob, x: DeviceTensor) -> None:
    if x.base is None:
        raise ValueError(f"{x.name}: 1-bit encodings need the base model")
    if len(x.models) != len(ob.tasks):
        raise ValueError(f"{x.name}: {len(x.models)} models for {len(ob.tasks)} tasks")


def pack_rows(mask):
    """uint8 (rows, ceil(cols/8)) from a bool (rows, cols) mask, as `pack_signs` packs tau >= 0."""
    import torch

    rows, cols = mask.shape
    nbytes = -(-cols // 8)
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, 8 * nbytes - cols))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (bits.view(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_rows(packed, cols: int, rows: tuple[int, int] | None = None):
    """0/1 uint8 (rows, cols) from `pack_rows` / `pack_signs` output (rows [r0, r1) when given):
    np.unpackbits(..., bitorder="little") on the device."""
    import torch

    if rows is not None:
        packed = packed[rows[0] : rows[1]]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def scaled_signs(bits01, scale):
    """+-1 * scale, float32, from 0/1 bits: `reconstruct_task`'s 1bit / 1bit-row (unpack_signs,
    then the product; a zero scale gives -0 where the bit is 0, as on the host)."""
    import torch

    return bits01.to(torch.float32).mul_(2).sub_(1).mul_(scale)


def _flat_bit_blobs(tau, x: DeviceTensor) -> list[bytes]:
    """1-D / 0-D sign bits: `pack_signs_flat` of each block's elements (a small tensor: on the host)."""
    t = tau.reshape(-1).cpu().numpy()
    return [enc.pack_signs_flat(t[r0:r1]) for r0, r1 in x.bounds]


def _tau(x: DeviceTensor, s, rows: int, cols: int):
    return (x.models[s.index] - x.base).reshape(rows, cols)


def plus_minus(mask, a):
    """+-a as mask * 2a - a, float32 (exact), as `encodings.onebit.plus_minus` (mask: bool or 0/1)."""
    return mask.float().mul_(a * 2).sub_(a)


def two_bit_fit(t, scale: str):
    """(s1 mask, s2 mask, b1, b2) of float32 (rows, cols) t: `encodings.onebit.two_bit_fit`,
    operation by operation (the row scales are bit-identical, see the module docstring)."""
    import torch

    m1 = t >= 0
    a1 = row_scales(t, "absmean")[:, None]
    h1 = plus_minus(m1, a1)
    r = t - h1
    m2 = r >= 0
    a2 = row_scales(r, "absmean")[:, None]
    if scale == "absmean":
        return m1, m2, a1, a2
    fit = h1.add_(plus_minus(m2, a2))
    q_t, q_h = row_scales(t, "rms")[:, None], row_scales(fit, "rms")[:, None]
    f = torch.where(q_h > 0, q_t / torch.where(q_h > 0, q_h, 1.0), 1.0)
    if scale != "rms":  # pow:<g>: f^g raised on the host in float64, as encodings/onebit.py
        f = torch.from_numpy(enc.norm_gain(f.cpu().numpy(), scale)).to(f.device)
    return m1, m2, a1 * f, a2 * f


def two_bit_hat(m1, m2, b1, b2):
    return plus_minus(m1, b1).add_(plus_minus(m2, b2))


def _hat_maker(ob, s, x: DeviceTensor, rows: int, cols: int):
    """hat(tau) -> tau_hat of task spec `s` from its float32 (rows, cols) tau, consumed: what
    `reconstruct_task` rebuilds. The tensor-wide parts (alpha, row scales, the top-k mask) are
    found here once, so the TIES loops can rebuild a hat instead of holding every task's."""
    import torch

    if s.kind in ("1bit", "1bit-row", "1bit-group"):
        t = _tau(x, s, rows, cols)
        if s.kind == "1bit":
            a = tensor_alpha(t, ob.scale)
            twice = 2.0 * a
        else:
            a = row_scales(t, ob.scale)[:, None] if s.kind == "1bit-row" else expand_groups(group_scales(t, ob.scale, ob.group), ob.group, cols)
            twice = a * 2
        # +-a as (tau >= 0) * 2a - a: exact (2a is exact, 2a - a == a by Sterbenz), as on the CPU
        return lambda tau: tau.copy_(tau >= 0).mul_(twice).sub_(a)
    if s.kind == "2bit":
        return lambda tau: two_bit_hat(*two_bit_fit(tau, ob.scale))
    if s.kind == "sparse":
        keep = topk_mask(magnitude_bits(_tau(x, s, rows, cols)), top_rho_k(s.rho, x.numel)).view(rows, cols)
        return lambda tau: torch.where(keep, round_to_torch(tau, "bfloat16"), 0.0)
    return lambda tau: round_to_torch(tau, "bfloat16")  # dense


# ---------------------------------------------------------------------------------------------
# the kernels


def onebit_encode(ob, x: DeviceTensor, params) -> tuple[dict, dict]:
    """`onebit_encode_method`'s kernel: (outputs, stats).

    outputs: {name: uint8 bits (rows, ceil(cols/8)) | float32 scales (rows,) | blobs per block |
    float32 tau for "dense"}, as `merge` returns them per block. stats: {"<task>.alpha": float}
    for the per-tensor 1-bit tasks, the alpha pass's stats, which exports and the router read
    from the encode job (no pass runs on the device). `ob` is the method's methods.onebit._OneBit.
    """
    _check(ob, x)
    rows, cols = _geometry(x)
    out: dict = {}
    stats: dict = {}
    for s in ob.specs(x.shape):
        if s.kind == "drop":
            continue
        tau = _tau(x, s, rows, cols)
        if s.kind == "1bit":
            stats[f"{s.task}.alpha"] = tensor_alpha(tau, ob.scale)
        if s.kind in ("1bit", "1bit-row", "1bit-group"):
            if len(x.shape) >= 2:
                out[f"{s.task}.bits"] = pack_rows(tau >= 0)
                if s.kind == "1bit-row":
                    out[f"{s.task}.scale"] = row_scales(tau, ob.scale)
                elif s.kind == "1bit-group":
                    out[f"{s.task}.scale"] = group_scales(tau, ob.scale, ob.group)
            else:
                out[f"{s.task}.bits"] = _flat_bit_blobs(tau, x)
        elif s.kind == "2bit":
            m1, m2, b1, b2 = two_bit_fit(tau, ob.scale)
            out.update({f"{s.task}.bits": pack_rows(m1), f"{s.task}.bits2": pack_rows(m2),
                        f"{s.task}.scale": b1[:, 0], f"{s.task}.scale2": b2[:, 0]})
        elif s.kind == "sparse":
            out[f"{s.task}.sparse"] = top_rho_blobs(tau, top_rho_k(s.rho, x.numel), x)
        else:  # dense: the engine rounds the float32 tau to bf16
            out[f"{s.task}.dense"] = tau.view(x.base.shape)
    return out, stats


def onebit_fallback(ob, lam: float, x: DeviceTensor, params):
    """`onebit_fallback_method`'s kernel: theta_0 + lam * TIES(tau_hats), float32 (rows, *trailing)."""
    _check(ob, x)
    specs = [s for s in ob.specs(x.shape) if s.kind != "drop"]
    if not specs:
        return x.base.clone()
    rows, cols = _geometry(x)
    makers = [(s, _hat_maker(ob, s, x, rows, cols)) for s in specs]
    # the hats are rebuilt for each of the election's two passes instead of held at once
    merged = disjoint_mean_torch(*consensus_torch(lambda: (hat(_tau(x, s, rows, cols)) for s, hat in makers)))
    merged *= float(np.float32(lam))
    return x.base + merged.view(x.base.shape)
