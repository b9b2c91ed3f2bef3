"""1-bit task vectors (BitDelta style) and 1bit-Merging's merges (docs/methods.md section 4).

A task vector tau = theta_t - theta_0 of one tensor is stored as its signs and a scale:
tau ~ alpha * sign(tau).

Conventions
-----------
* Blocks are row blocks (rows, *shape[1:]), seen as 2-D (rows, cols), cols = prod(shape[1:]).
  1-D tensors (and 0-D ones, one element) are ONE row of n elements for every tensor-wide or
  per-row notion (the scale), while the engine hands them out as blocks of 1-element rows.
* Sign bit: 1 iff tau >= 0. Exact zeros (+0 and -0) count as +1, NaN as -1. With one bit there
  is no zero; + matches TIES's "+ on ties" election. The least-squares scale below is optimal
  whatever the zero convention (zeros contribute 0 to <tau, s>).
* Packing (ndim >= 2): `pack_signs` = np.packbits(tau >= 0, axis=1, bitorder="little"), so
  column c of a row is bit (c % 8) of byte c // 8; padding bits of the last byte are 0. Output
  "<task>.bits": uint8, trailing (ceil(cols/8),), chunked like the tensor's row blocks.
* Packing (ndim <= 1): an array output must have one row per tensor row, i.e. a byte per
  element; instead "<task>.bits" is a blob output: per row block, the block's elements packed
  the same way (np.packbits(flat >= 0, bitorder="little")), ceil(block_rows/8) bytes, the last
  byte zero-padded. Nothing is required from the engine (any block_rows works; the padding
  costs < 1 byte per block), and the decoded signs do not depend on the blocking.
* Scale alpha: "absmean" = mean|tau| (the c minimising ||tau - c*sign(tau)||^2; its error is
  ||tau||^2 - n*alpha^2) or "rms" = ||tau||_2 / sqrt(n) (||alpha*sign(tau)|| = ||tau||), or
  between and beyond them "pow:<g>" = absmean * (rms / absmean)^g (g >= 0; 0 and 1 are absmean
  and rms; g = 2 gives ||tau||^2 / ||tau||_1, the scale whose tau_hat projects onto tau as tau
  itself: <tau_hat, tau> = ||tau||^2), computed in float64 from both moments (0 where absmean
  is 0). Sums in float64, alpha rounded to float32 once.
  - per tensor ("1bit", granularity "tensor"): a pass; stats key "<task>.alpha" (a float that
    is exactly a float32). The sums are exact-order: per aligned group of GROUP flat elements
    (a numpy float64 sum of the group), groups cut by a block boundary are sent whole as values
    and summed in the reduce the same way, then math.fsum over the group sums: alpha is
    bit-identical for any row blocking.
  - per row ("1bit-row", or "1bit" with granularity "row"): computed in the block; output
    "<task>.scale" float32, trailing (). For ndim <= 1 the one row is the whole tensor, so it is
    the per-tensor alpha (stats), and no scale output exists.
  - per group ("1bit-group": "1bit" with granularity "group:<G>", ndim >= 2): one scale per
    group of G consecutive entries of a row, columns [g*G, (g+1)*G); the last group of a row
    holds the cols % G left (if any). Output "<task>.scale" float32, trailing
    (ceil(cols/G),). Each group's scale is computed like a row's from its own entries (the full
    groups' moments as rows of a (rows * (cols // G), G) array, the tails' as rows of their
    own). 1-D / 0-D tensors: the per-tensor alpha.
* Two bits ("2bit", per row; 1-D and 0-D tensors fall back to "1bit", one scale): a second
  sign bit for the residual, tau ~ b1 * s1 + b2 * s2 with s1 = sign(tau), a1 = mean_row|tau|,
  r = tau - a1 * s1 (float32), s2 = sign(r), a2 = mean_row|r| (the greedy least-squares fit).
  Scale "absmean": b = a. Scale "rms": both scaled by f = rms(tau) / rms(a1 s1 + a2 s2) per row
  (float32 division; 1 where the fit is zero), so each row keeps its norm as the 1-bit rms
  scale does. Scale "pow:<g>": both scaled by f^g (f as for rms, raised in float64, rounded to
  float32). Outputs "<task>.bits" and "<task>.bits2" (packed like the 1-bit signs),
  "<task>.scale" and "<task>.scale2" (float32 (rows,)): 2 bits + 8 bytes per row.
* Precisions per task (for this tensor): "drop" (nothing), "1bit", "1bit-row", "2bit", "sparse" (top
  rho of |tau| over the whole tensor, exactly k = int(rho*n), ties by flat index; blob
  "<task>.sparse", see sparse.py; "sparse-0.05" sets a task's own rho), "dense" ("<task>.dense",
  bfloat16 tau, trailing = the tensor's).

Merges (float32, tasks in the given order; tau_hat_t = the reconstruction of task t)
------
* TIES over tau_hats (`ties_merge`, ops/consensus.py): s = sum_t tau_hat_t; elected = +1 where s >= 0 else -1;
  an entry counts iff tau_hat_t * elected > 0 (so zeros never count); merged = sum of counted
  entries / their count (count 0 -> divide by 1, result 0). Trimming: 1-bit vectors have one
  magnitude per tensor (or row), so a top-k trim is a no-op and none is done; sparse ones are
  already trimmed; dense ones are used as stored.
* Static fallback: theta_0 + lambda * TIES({tau_hat_t : precision != drop}), computed as
  base + (lambda * merged).
* Dynamic (router picked k): (theta_0 + tau_hat_k) + lambda * TIES({tau_hat_j : j != k, not
  dropped}); when k is dropped for this tensor the first term is theta_0 alone.
The fallback is computed from the fine-tunes with exactly the arithmetic of `reconstruct_task`
on the stored encodings, so both agree bit for bit.

This module is the format; the jobs that write it (`onebit_encode_method`,
`onebit_fallback_method`) are built in methods/onebit.py, with kernels/onebit.py as their
device path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..dtypes import BF16, round_to
from ..geometry import block_shape, row_elems
from ..methods.base import Output, Stats
from ..ops.consensus import ties_merge
from .sparse import apply_sparse, check_tasks

SCALES = ("absmean", "rms")
GRANULARITIES = ("tensor", "row", "group:<G>")
KINDS = ("drop", "1bit", "1bit-row", "1bit-group", "2bit", "sparse", "dense")
GROUP = 1 << 14  # flat-aligned groups of the exact-order per-tensor sums



# ---------------------------------------------------------------------------------------------
# shapes, signs, scales


def packed_cols(shape: Sequence[int]) -> int:
    return -(-row_elems(shape) // 8)


def pack_signs(tau2d: np.ndarray) -> np.ndarray:
    """uint8 (rows, ceil(cols/8)): bit c%8 of byte c//8 is 1 iff tau[r, c] >= 0."""
    t = np.asarray(tau2d)
    if t.ndim != 2:
        raise ValueError(f"pack_signs needs a 2-D array, got shape {t.shape}")
    return np.packbits(np.greater_equal(t, 0), axis=1, bitorder="little")


def unpack_signs(bits: np.ndarray, cols: int) -> np.ndarray:
    """float32 +-1 (rows, cols) from `pack_signs` output."""
    b = np.asarray(bits)
    if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] != -(-cols // 8):
        raise ValueError(f"bits must be uint8 (rows, {-(-cols // 8)}), got {b.dtype} {b.shape}")
    u = np.unpackbits(b, axis=1, count=cols, bitorder="little")
    s = u.astype(np.float32)
    s *= 2
    s -= 1
    return s


def pack_signs_flat(tau: np.ndarray) -> bytes:
    """The 1-D / 0-D encoding of one block: packbits(flat >= 0, little), ceil(size/8) bytes."""
    return np.packbits(np.greater_equal(np.asarray(tau).reshape(-1), 0), bitorder="little").tobytes()


def unpack_signs_flat(blob, size: int) -> np.ndarray:
    """float32 +-1 (size,) from `pack_signs_flat` output; rejects a blob of the wrong length."""
    raw = np.frombuffer(bytes(blob), dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob.reshape(-1)
    if raw.dtype != np.uint8 or raw.size != -(-size // 8):
        raise ValueError(f"1-bit blob of {raw.size} bytes for {size} elements (expected {-(-size // 8)})")
    s = np.unpackbits(raw, count=size, bitorder="little").astype(np.float32)
    s *= 2
    s -= 1
    return s


def scale_spec(scale: str, exponent: float = -1.0) -> str:
    """The scale rule of the recipe's `scale` and `scale_exponent` (negative: off): "absmean",
    "rms" or "pow:<g>" (exponents 0 and 1 are absmean and rms, bit for bit)."""
    if exponent < 0:
        return scale
    if exponent in (0, 1):
        return ("absmean", "rms")[int(exponent)]
    return f"pow:{float(exponent)!r}"


def exponent_of(scale: str) -> float:
    """g of a scale rule: absmean 0, rms 1, pow:<g> g; ValueError for anything else."""
    if scale in SCALES:
        return float(SCALES.index(scale))
    if isinstance(scale, str) and scale.startswith("pow:"):
        try:
            g = float(scale[4:])
        except ValueError:
            g = -1.0
        if g >= 0 and math.isfinite(g):
            return g
    raise ValueError(f"scale must be one of {SCALES} or pow:<exponent >= 0>, got {scale!r}")


def moments(t: np.ndarray, scale: str) -> np.ndarray:
    """float64 sums along axis 1 of |t| (absmean), t^2 (rms) or both, stacked on a last axis of
    2 (pow:<g>); t float32 2-D."""
    y = t.astype(np.float64)
    if scale == "absmean":
        np.abs(y, out=y)
    elif scale == "rms":
        np.multiply(y, y, out=y)
    else:
        return np.stack([np.add.reduce(np.abs(y), axis=1), np.add.reduce(np.multiply(y, y, out=y), axis=1)], axis=-1)
    return np.add.reduce(y, axis=1)


def exact_total(sums: Sequence[np.ndarray]) -> float | np.ndarray:
    """math.fsum of the concatenated moment sums (per moment for pow:<g>): exactly rounded, so
    independent of how the sums were split."""
    sums = [x for x in sums if x.size]  # an empty part has no moment axis
    if not sums:
        return 0.0
    v = np.concatenate(sums)
    return math.fsum(v) if v.ndim == 1 else np.array([math.fsum(c) for c in v.T])


def scale_from(total: float | np.ndarray, n: int, scale: str):
    """The float32 scale of float64 moment sums over n entries: the mean, its root for rms, or
    absmean * (rms / absmean)^g for pow:<g> (0 where absmean is 0)."""
    total = np.asarray(total, dtype=np.float64)
    if scale not in SCALES:
        g = exponent_of(scale)
        if n == 0:
            return np.zeros(total.shape[:-1], np.float32) if total.ndim > 1 else 0.0
        a, r = total[..., 0] / n, np.sqrt(total[..., 1] / n)
        pos = a > 0
        out = np.where(pos, a * np.power(r / np.where(pos, a, 1.0), g), 0.0)
        return out.astype(np.float32)
    if n == 0:
        return 0.0 if np.ndim(total) == 0 else np.zeros_like(total)
    m = total / n
    if scale == "rms":
        m = np.sqrt(m)
    return m.astype(np.float32)


def row_scales(tau2d: np.ndarray, scale: str = "absmean") -> np.ndarray:
    """Per-row scale, float32 (rows,): mean|tau| or sqrt(mean tau^2) along axis 1 (float64 sums)."""
    t = np.asarray(tau2d, dtype=np.float32)
    return scale_from(moments(t, scale), t.shape[1], scale)


def tensor_scale(tau: np.ndarray, scale: str = "absmean") -> float:
    """The per-tensor alpha of a whole tensor in memory, as the streamed pass computes it."""
    f = np.asarray(tau, dtype=np.float32).reshape(-1)
    full = (f.size // GROUP) * GROUP
    parts = [moments(f[:full].reshape(-1, GROUP), scale)] if full else []
    if full < f.size:
        parts.append(moments(f[full:].reshape(1, -1), scale))
    return float(scale_from(exact_total(parts), f.size, scale))


def granularity_spec(granularity: str, group_size: int = 0) -> str:
    """The encoder's granularity of the recipe's `granularity` and `group_size` (0: off):
    "tensor", "row" or "group:<G>"."""
    return f"group:{int(group_size)}" if group_size > 0 else granularity


def group_of(granularity: str) -> int | None:
    """G of "group:<G>", None for "tensor" and "row"; ValueError for anything else."""
    if granularity in ("tensor", "row"):
        return None
    if isinstance(granularity, str) and granularity.startswith("group:") and granularity[6:].isdigit() and int(granularity[6:]) > 0:
        return int(granularity[6:])
    raise ValueError(f"granularity must be tensor, row or group:<G >= 1>, got {granularity!r}")


def n_groups(cols: int, group: int) -> int:
    return -(-cols // group)


def group_scales(tau2d: np.ndarray, scale: str, group: int) -> np.ndarray:
    """float32 (rows, ceil(cols/G)): each group's scale from its own entries (module doc)."""
    t = np.asarray(tau2d, dtype=np.float32)
    rows, cols = t.shape
    full = cols // group
    parts = []
    if full:
        body = np.ascontiguousarray(t[:, : full * group]).reshape(rows * full, group)
        parts.append(scale_from(moments(body, scale), group, scale).reshape(rows, full))
    if cols % group:
        parts.append(scale_from(moments(np.ascontiguousarray(t[:, full * group :]), scale), cols % group, scale).reshape(rows, 1))
    return np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0), np.float32)


def expand_groups(scales: np.ndarray, group: int, cols: int) -> np.ndarray:
    """float32 (rows, cols): each entry's group scale."""
    return np.repeat(np.asarray(scales, dtype=np.float32), group, axis=1)[:, :cols]


def plus_minus(mask: np.ndarray, a: np.ndarray) -> np.ndarray:
    """+-a as mask * 2a - a (float32): exact (2a is exact, 2a - a == a by Sterbenz)."""
    h = np.multiply(mask, a * np.float32(2), dtype=np.float32)
    return np.subtract(h, a, out=h)


def two_bit_fit(tau2d: np.ndarray, scale: str = "rms"):
    """(s1 mask, s2 mask, b1, b2) of the 2-bit fit of float32 (rows, cols) tau (module doc);
    masks bool (rows, cols), scales float32 (rows, 1)."""
    t = np.asarray(tau2d, dtype=np.float32)
    m1 = np.greater_equal(t, 0)
    a1 = row_scales(t, "absmean")[:, None]
    h1 = plus_minus(m1, a1)
    r = np.subtract(t, h1)
    m2 = np.greater_equal(r, 0)
    a2 = row_scales(r, "absmean")[:, None]
    if scale == "absmean":
        return m1, m2, a1, a2
    fit = np.add(h1, plus_minus(m2, a2))
    q_t, q_h = row_scales(t, "rms")[:, None], row_scales(fit, "rms")[:, None]
    f = norm_gain(np.divide(q_t, q_h, out=np.ones_like(q_t), where=q_h > 0), scale)
    return m1, m2, a1 * f, a2 * f


def norm_gain(f: np.ndarray, scale: str) -> np.ndarray:
    """The 2-bit fit's factor: f (float32 rms(tau) / rms(fit)) for rms, f^g in float64 rounded
    to float32 for pow:<g>."""
    g = exponent_of(scale)
    return f if g == 1 else np.power(f.astype(np.float64), g).astype(np.float32)


def two_bit_hat(m1: np.ndarray, m2: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """tau_hat = +-b1 + +-b2 (float32, in that order)."""
    h = plus_minus(m1, b1)
    return np.add(h, plus_minus(m2, b2), out=h)


# ---------------------------------------------------------------------------------------------
# precisions


@dataclass(frozen=True)
class TaskSpec:
    index: int  # position in Block.models
    task: str
    kind: str  # one of KINDS, resolved for the tensor's shape and the granularity
    rho: float | None = None  # sparse only


def resolve_precision(precision: str, granularity: str, shape: Sequence[int], rho: float) -> tuple[str, float | None]:
    """(kind, rho) of a precision string for a tensor of `shape`."""
    if not isinstance(precision, str):
        raise ValueError(f"precision must be a string, got {precision!r}")
    p = precision.strip().lower()
    if p == "drop":
        return "drop", None
    if p == "dense":
        return "dense", None
    if p == "sparse":
        r = float(rho)
    elif p.startswith("sparse-") or p.startswith("sparse:"):
        try:
            r = float(p[7:])
        except ValueError:
            raise ValueError(f"invalid precision {precision!r} (sparse-<rho>, e.g. sparse-0.05)") from None
    elif p in ("1bit", "1bit-row"):
        grouped = group_of(granularity) is not None
        kind = "1bit-row" if (p == "1bit-row" or granularity == "row") else ("1bit-group" if grouped else "1bit")
        if len(shape) <= 1:
            kind = "1bit"  # the whole tensor is the one row
        return kind, None
    elif p == "2bit":
        return ("2bit" if len(shape) >= 2 else "1bit"), None  # 1-D / 0-D: norms, biases: one bit
    else:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(KINDS)} or sparse-<rho>")
    if not 0 <= r <= 1:
        raise ValueError(f"precision {precision!r}: rho must be within [0, 1]")
    return "sparse", r


def check_common(tasks, precisions, scale, granularity, rho):
    tasks = check_tasks(tasks)
    missing = [t for t in tasks if t not in precisions]
    if missing:
        raise ValueError(f"no precision for task(s) {missing}")
    exponent_of(scale)  # validates it
    group_of(granularity)  # validates it
    if not 0 <= rho <= 1:
        raise ValueError(f"rho must be within [0, 1], got {rho}")
    for t in tasks:
        resolve_precision(precisions[t], granularity, (2, 2), rho)  # validates the string
    return tasks


def task_specs(tasks, precisions, shape, granularity="tensor", rho=0.1) -> list[TaskSpec]:
    out = []
    for i, t in enumerate(tasks):
        kind, r = resolve_precision(precisions[t], granularity, shape, rho)
        out.append(TaskSpec(i, t, kind, r))
    return out


def onebit_outputs(tasks, precisions, shape, granularity: str = "tensor", rho: float = 0.1) -> tuple[Output, ...]:
    """Exactly the outputs `onebit_encode_method` returns for a tensor of `shape`.

    Pass the same granularity as to the method: with granularity "row", "1bit" has a scale.
    """
    tasks = check_common(tasks, precisions, "absmean", granularity, rho)
    shape = tuple(shape)
    outs: list[Output] = []
    for s in task_specs(tasks, precisions, shape, granularity, rho):
        if s.kind in ("1bit", "1bit-row"):
            if len(shape) >= 2:
                outs.append(Output(f"{s.task}.bits", "uint8", (packed_cols(shape),)))
            else:
                outs.append(Output(f"{s.task}.bits", "uint8", (), blob=True))
            if s.kind == "1bit-row":
                outs.append(Output(f"{s.task}.scale", "float32", ()))
        elif s.kind == "1bit-group":
            outs.append(Output(f"{s.task}.bits", "uint8", (packed_cols(shape),)))
            outs.append(Output(f"{s.task}.scale", "float32", (n_groups(row_elems(shape), group_of(granularity)),)))
        elif s.kind == "2bit":
            for name in ("bits", "bits2"):
                outs.append(Output(f"{s.task}.{name}", "uint8", (packed_cols(shape),)))
            for name in ("scale", "scale2"):
                outs.append(Output(f"{s.task}.{name}", "float32", ()))
        elif s.kind == "sparse":
            outs.append(Output(f"{s.task}.sparse", "uint8", (), blob=True))
        elif s.kind == "dense":
            outs.append(Output(f"{s.task}.dense", "bfloat16", None))
    return tuple(outs)


# ---------------------------------------------------------------------------------------------
# TIES over reconstructed task vectors, and the dynamic merge


def dynamic_merge_block(base: np.ndarray, taus_hat: Mapping[str, np.ndarray | None], k: str, lam: float = 1.0) -> np.ndarray:
    """theta(x) = (theta_0 + tau_hat_k) + lam * TIES({tau_hat_j : j != k}) for one block.

    taus_hat: {task: float32 block or None (dropped for this tensor)}, in task order; the
    result is float32 of base's shape. k must be one of the tasks.
    """
    if k not in taus_hat:
        raise ValueError(f"task {k!r} is not one of {list(taus_hat)}")
    out = np.array(base, dtype=np.float32, copy=True)
    hk = taus_hat[k]
    if hk is not None:
        np.add(out, np.asarray(hk, np.float32).reshape(out.shape), out=out)
    others = [np.asarray(h, np.float32).reshape(out.shape) for t, h in taus_hat.items() if t != k and h is not None]
    T = ties_merge(others)
    if T is not None:
        np.multiply(T, np.float32(lam), out=T)
        np.add(out, T, out=out)
    return out


def fallback_merge_block(base: np.ndarray, taus_hat: Mapping[str, np.ndarray | None], lam: float = 1.0) -> np.ndarray:
    """theta_0 + lam * TIES(all tau_hats that are not None), from stored reconstructions."""
    out = np.array(base, dtype=np.float32, copy=True)
    T = ties_merge([np.asarray(h, np.float32).reshape(out.shape) for h in taus_hat.values() if h is not None])
    if T is not None:
        np.multiply(T, np.float32(lam), out=T)
        np.add(out, T, out=out)
    return out


# ---------------------------------------------------------------------------------------------
# reconstruction from stored pieces


def reconstruct_task(
    precision: str,
    shape: Sequence[int],
    rows: int,
    *,
    bits=None,
    scale=None,
    alpha=None,
    sparse=None,
    dense=None,
    bits2=None,
    scale2=None,
    granularity: str = "tensor",
) -> np.ndarray | None:
    """tau_hat of one task for one row block of `rows` rows: float32 (rows, *shape[1:]) (a 0-D
    tensor: (1,)), or None for "drop".

    Pieces, as stored: bits (ndim >= 2: uint8 (rows, ceil(cols/8)); ndim <= 1: the block's
    blob bytes), scale (float32 (rows,), 1bit-row; (rows, ceil(cols/G)), 1bit-group), alpha (the stats' "<task>.alpha", 1bit),
    bits, bits2, scale, scale2 (2bit), sparse (the block's blob bytes), dense (float32 /
    bfloat16 values, or the raw uint16 bf16 storage the store holds). granularity must be the
    encoder's.
    """
    shape = tuple(shape)
    kind, _ = resolve_precision(precision, granularity, shape, 0.0)
    bshape = block_shape(shape, 0, rows)
    nb = int(np.prod(bshape, dtype=np.int64))
    if kind == "drop":
        return None
    if kind == "2bit":
        if bits is None or bits2 is None or scale is None or scale2 is None:
            raise ValueError("2bit: bits, bits2, scale and scale2 are needed")
        cols = row_elems(shape)
        m1, m2 = (np.unpackbits(np.asarray(b, dtype=np.uint8).reshape(rows, -1), axis=1, count=cols, bitorder="little") for b in (bits, bits2))
        b1, b2 = (np.asarray(x, dtype=np.float32).reshape(rows, 1) for x in (scale, scale2))
        return two_bit_hat(m1, m2, b1, b2).reshape(bshape)
    if kind == "1bit-group":
        if bits is None or scale is None:
            raise ValueError("1bit-group: bits and the group scales are needed")
        cols, G = row_elems(shape), group_of(granularity)
        s = unpack_signs(np.asarray(bits, dtype=np.uint8).reshape(rows, -1), cols)
        np.multiply(s, expand_groups(np.asarray(scale, dtype=np.float32).reshape(rows, -1), G, cols), out=s)
        return s.reshape(bshape)
    if kind in ("1bit", "1bit-row"):
        if bits is None:
            raise ValueError(f"{kind}: bits are needed")
        if len(shape) >= 2:
            cols = row_elems(shape)
            s = unpack_signs(np.asarray(bits, dtype=np.uint8).reshape(rows, -1), cols)
        else:
            s = unpack_signs_flat(bits, nb).reshape(nb, 1)
        if kind == "1bit":
            if alpha is None:
                raise ValueError("1bit: the per-tensor alpha is needed")
            np.multiply(s, np.float32(alpha), out=s)
        else:
            if scale is None:
                raise ValueError("1bit-row: the per-row scale is needed")
            sc = np.asarray(scale, dtype=np.float32).reshape(rows, 1)
            np.multiply(s, sc, out=s)
        return s.reshape(bshape)
    if kind == "sparse":
        if sparse is None:
            raise ValueError("sparse: the blob is needed")
        return apply_sparse(np.zeros(bshape, np.float32), sparse)
    # dense
    if dense is None:
        raise ValueError("dense: the values are needed")
    d = np.asarray(dense)
    if d.dtype == np.uint16:
        d = d.view(BF16.logical)
    out = round_to(d, BF16) if d.dtype != BF16.logical else d.astype(np.float32)
    return out.reshape(bshape)


def reconstruct_from_outputs(
    task: str,
    precision: str,
    shape: Sequence[int],
    rows: int,
    outputs: Mapping[str, Any],
    stats: Stats,
    granularity: str = "tensor",
) -> np.ndarray | None:
    """`reconstruct_task` with the pieces looked up by output name ("<task>.bits", ...) in
    `outputs` (one block's values, e.g. what the encoder's merge returned or the store holds)
    and "<task>.alpha" in the encode job's stats."""
    return reconstruct_task(
        precision,
        shape,
        rows,
        bits=outputs.get(f"{task}.bits"),
        scale=outputs.get(f"{task}.scale"),
        alpha=stats.get(f"{task}.alpha"),
        sparse=outputs.get(f"{task}.sparse"),
        dense=outputs.get(f"{task}.dense"),
        bits2=outputs.get(f"{task}.bits2"),
        scale2=outputs.get(f"{task}.scale2"),
        granularity=granularity,
    )


__all__ = [
    "GROUP",
    "KINDS",
    "SCALES",
    "TaskSpec",
    "dynamic_merge_block",
    "exact_total",
    "expand_groups",
    "exponent_of",
    "granularity_spec",
    "group_of",
    "group_scales",
    "n_groups",
    "fallback_merge_block",
    "onebit_outputs",
    "pack_signs",
    "pack_signs_flat",
    "packed_cols",
    "reconstruct_from_outputs",
    "reconstruct_task",
    "resolve_precision",
    "row_scales",
    "scale_spec",
    "task_specs",
    "tensor_scale",
    "ties_merge",
    "two_bit_fit",
    "two_bit_hat",
    "unpack_signs",
    "unpack_signs_flat",
]
