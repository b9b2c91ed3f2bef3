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
  ||tau||^2 - n*alpha^2) or "rms" = ||tau||_2 / sqrt(n) (||alpha*sign(tau)|| = ||tau||). Sums in
  float64, alpha rounded to float32 once.
  - per tensor ("1bit", granularity "tensor"): a pass; stats key "<task>.alpha" (a float that
    is exactly a float32). The sums are exact-order: per aligned group of GROUP flat elements
    (a numpy float64 sum of the group), groups cut by a block boundary are sent whole as values
    and summed in the reduce the same way, then math.fsum over the group sums: alpha is
    bit-identical for any row blocking.
  - per row ("1bit-row", or "1bit" with granularity "row"): computed in the block; output
    "<task>.scale" float32, trailing (). For ndim <= 1 the one row is the whole tensor, so it is
    the per-tensor alpha (stats), and no scale output exists.
* Two bits ("2bit", per row; 1-D and 0-D tensors fall back to "1bit", one scale): a second
  sign bit for the residual, tau ~ b1 * s1 + b2 * s2 with s1 = sign(tau), a1 = mean_row|tau|,
  r = tau - a1 * s1 (float32), s2 = sign(r), a2 = mean_row|r| (the greedy least-squares fit).
  Scale "absmean": b = a. Scale "rms": both scaled by f = rms(tau) / rms(a1 s1 + a2 s2) per row
  (float32 division; 1 where the fit is zero), so each row keeps its norm as the 1-bit rms
  scale does. Outputs "<task>.bits" and "<task>.bits2" (packed like the 1-bit signs),
  "<task>.scale" and "<task>.scale2" (float32 (rows,)): 2 bits + 8 bytes per row.
* Precisions per task (for this tensor): "drop" (nothing), "1bit", "1bit-row", "2bit", "sparse" (top
  rho of |tau| over the whole tensor, exactly k = int(rho*n), ties by flat index; blob
  "<task>.sparse", see sparse.py; "sparse-0.05" sets a task's own rho), "dense" ("<task>.dense",
  bfloat16 tau, trailing = the tensor's).

Merges (float32, tasks in the given order; tau_hat_t = the reconstruction of task t)
------
* TIES over tau_hats (`ties_merge`): s = sum_t tau_hat_t; elected = +1 where s >= 0 else -1;
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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from ..methods._topk import CHUNK, TopK, block_size, flat, numel, scratch
from ..methods.base import Block, MergeMethod, Output, Pass, Stats, TensorParams
from .sparse import apply_sparse, bf16_round, check_tasks, encode_sparse, select_block, top_rho_k

SCALES = ("absmean", "rms")
GRANULARITIES = ("tensor", "row")
KINDS = ("drop", "1bit", "1bit-row", "2bit", "sparse", "dense")
GROUP = 1 << 14  # flat-aligned groups of the exact-order per-tensor sums

_BF16 = np.dtype(ml_dtypes.bfloat16)
_F1 = np.float32(1)


# ---------------------------------------------------------------------------------------------
# shapes, signs, scales


def cols_of(shape: Sequence[int]) -> int:
    """Elements per row for packing: prod(shape[1:]) for ndim >= 2; 1-D and 0-D: 1 (see module doc)."""
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) >= 2 else 1


def packed_cols(shape: Sequence[int]) -> int:
    return -(-cols_of(shape) // 8)


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


def _moments(t: np.ndarray, scale: str) -> np.ndarray:
    """float64 sums along axis 1 of |t| (absmean) or t^2 (rms); t float32 2-D."""
    y = t.astype(np.float64)
    if scale == "absmean":
        np.abs(y, out=y)
    else:
        np.multiply(y, y, out=y)
    return np.add.reduce(y, axis=1)


def _scale_from(total: float | np.ndarray, n: int, scale: str):
    if n == 0:
        return 0.0 if np.ndim(total) == 0 else np.zeros_like(total)
    m = np.asarray(total, dtype=np.float64) / n
    if scale == "rms":
        m = np.sqrt(m)
    return m.astype(np.float32)


def row_scales(tau2d: np.ndarray, scale: str = "absmean") -> np.ndarray:
    """Per-row scale, float32 (rows,): mean|tau| or sqrt(mean tau^2) along axis 1 (float64 sums)."""
    t = np.asarray(tau2d, dtype=np.float32)
    return _scale_from(_moments(t, scale), t.shape[1], scale)


def tensor_scale(tau: np.ndarray, scale: str = "absmean") -> float:
    """The per-tensor alpha of a whole tensor in memory, as the streamed pass computes it."""
    f = np.asarray(tau, dtype=np.float32).reshape(-1)
    full = (f.size // GROUP) * GROUP
    parts = [_moments(f[:full].reshape(-1, GROUP), scale)] if full else []
    if full < f.size:
        parts.append(_moments(f[full:].reshape(1, -1), scale))
    total = math.fsum(np.concatenate(parts)) if parts else 0.0
    return float(_scale_from(total, f.size, scale))


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
    f = np.divide(q_t, q_h, out=np.ones_like(q_t), where=q_h > 0)
    return m1, m2, a1 * f, a2 * f


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
        kind = "1bit-row" if (p == "1bit-row" or granularity == "row") else "1bit"
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


def _check_common(tasks, precisions, scale, granularity, rho):
    tasks = check_tasks(tasks)
    missing = [t for t in tasks if t not in precisions]
    if missing:
        raise ValueError(f"no precision for task(s) {missing}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
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
    tasks = _check_common(tasks, precisions, "absmean", granularity, rho)
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


def ties_merge(taus_hat: Sequence[np.ndarray]) -> np.ndarray | None:
    """Sign election + disjoint mean of float32 arrays (one shape), in list order; None if empty."""
    hats = [np.asarray(h, dtype=np.float32) for h in taus_hat]
    if not hats:
        return None
    s = np.array(hats[0], dtype=np.float32, copy=True)
    for h in hats[1:]:
        np.add(s, h, out=s)
    return _ties_into(hats, s, np.empty_like(s), np.empty_like(s), np.empty(s.shape, bool), np.empty_like(s))


def _ties_into(hats, s, S, D, mb, tmp) -> np.ndarray:
    """TIES given s = sum of the hats in order (overwritten); S receives the merged delta.

    elected = +1 where s >= 0 else -1; an entry counts iff h * elected > 0; S = sum of counted
    entries in list order, D = their count (0 -> 1); returns S / D (in S).
    """
    np.greater_equal(s, 0, out=mb)
    elected = s
    np.multiply(mb, np.float32(2), out=elected)
    np.subtract(elected, _F1, out=elected)
    for i, h in enumerate(hats):
        np.multiply(h, elected, out=tmp)
        np.greater(tmp, 0, out=mb)
        if i == 0:
            np.multiply(h, mb, out=S)
            np.copyto(D, mb)
        else:
            np.multiply(h, mb, out=tmp)
            np.add(S, tmp, out=S)
            np.add(D, mb, out=D)
    np.add(D, np.equal(D, 0), out=D)  # no counted entry: divide by 1
    np.divide(S, D, out=S)
    return S


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


def _block_shape(shape: Sequence[int], rows: int) -> tuple[int, ...]:
    return (rows, *shape[1:]) if len(shape) >= 1 else (1,)


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
    blob bytes), scale (float32 (rows,), 1bit-row), alpha (the stats' "<task>.alpha", 1bit),
    bits, bits2, scale, scale2 (2bit), sparse (the block's blob bytes), dense (float32 /
    bfloat16 values, or the raw uint16 bf16 storage the store holds). granularity must be the
    encoder's.
    """
    shape = tuple(shape)
    kind, _ = resolve_precision(precision, granularity, shape, 0.0)
    bshape = _block_shape(shape, rows)
    nb = int(np.prod(bshape, dtype=np.int64))
    if kind == "drop":
        return None
    if kind == "2bit":
        if bits is None or bits2 is None or scale is None or scale2 is None:
            raise ValueError("2bit: bits, bits2, scale and scale2 are needed")
        cols = cols_of(shape)
        m1, m2 = (np.unpackbits(np.asarray(b, dtype=np.uint8).reshape(rows, -1), axis=1, count=cols, bitorder="little") for b in (bits, bits2))
        b1, b2 = (np.asarray(x, dtype=np.float32).reshape(rows, 1) for x in (scale, scale2))
        return two_bit_hat(m1, m2, b1, b2).reshape(bshape)
    if kind in ("1bit", "1bit-row"):
        if bits is None:
            raise ValueError(f"{kind}: bits are needed")
        if len(shape) >= 2:
            cols = cols_of(shape)
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
        d = d.view(_BF16)
    out = bf16_round(d.astype(np.float32)) if d.dtype != _BF16 else d.astype(np.float32)
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


# ---------------------------------------------------------------------------------------------
# the streamed methods


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _OneBit:
    """What the encoder and the fallback share: precisions, passes, tau_hat per chunk."""

    def __init__(self, tasks, precisions, scale, granularity, rho, shape):
        self.tasks = _check_common(tasks, precisions, scale, granularity, rho)
        self.precisions = {t: precisions[t] for t in self.tasks}
        self.scale = scale
        self.granularity = granularity
        self.rho = float(rho)
        self.shape = None if shape is None else tuple(shape)
        self._specs: dict[tuple, list[TaskSpec]] = {}
        self.tk = TopK("onebit.topk", self._values, self._plan)
        # selections in task order: one per sparse task (whatever the shape)
        self.sparse_tasks = [
            (i, resolve_precision(self.precisions[t], granularity, (2, 2), rho)[1])
            for i, t in enumerate(self.tasks)
            if resolve_precision(self.precisions[t], granularity, (2, 2), rho)[0] == "sparse"
        ]
        self.sel_of = {i: j for j, (i, _) in enumerate(self.sparse_tasks)}

    def specs(self, shape) -> list[TaskSpec]:
        shape = tuple(shape)
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"block of a tensor shaped {shape}, method made for {self.shape}")
        sp = self._specs.get(shape)
        if sp is None:
            sp = self._specs[shape] = task_specs(self.tasks, self.precisions, shape, self.granularity, self.rho)
        return sp

    def _check(self, block: Block):
        if block.base is None:
            raise ValueError(f"{block.tensor}: 1-bit encodings need the base model")
        if len(block.models) != len(self.tasks):
            raise ValueError(f"{block.tensor}: {len(block.models)} models for {len(self.tasks)} tasks")

    # -- passes -----------------------------------------------------------------------------
    def _plan(self, params, stats, n):
        return [(i, top_rho_k(r, n)) for i, r in self.sparse_tasks]

    @staticmethod
    def _values(block, params, stats, src, sl, out):
        d = np.subtract(flat(block.models[src])[sl], flat(block.base)[sl], out=out)
        return np.abs(d, out=d)

    def _alpha_tasks(self, shape) -> list[TaskSpec]:
        return [s for s in self.specs(shape) if s.kind == "1bit"]

    def _alpha_needed(self, params, stats) -> bool:
        if self.shape is not None:
            return bool(self._alpha_tasks(self.shape))
        kinds = [resolve_precision(self.precisions[t], self.granularity, (2, 2), self.rho)[0] for t in self.tasks]
        # a 1-D tensor's 1bit-row (and 2bit) is one bit per tensor
        return any(k.startswith("1bit") or k == "2bit" for k in kinds)

    def _alpha_map(self, block: Block, params: TensorParams, stats: Stats):
        specs = self._alpha_tasks(block.shape)
        if not specs:
            return None
        self._check(block)
        nb = block_size(block)
        s0, e0 = block.start, block.start + nb
        G = GROUP
        g0, g1 = -(-s0 // G), e0 // G
        if g0 > g1:  # inside one group
            frags, full = [(s0, e0)], (0, 0)
        else:
            frags = [(s0, g0 * G), (g1 * G, e0)]
            full = (g0 * G, g1 * G)
        base = flat(block.base)
        res = {}
        for s in specs:
            m = flat(block.models[s.index])
            pieces = []
            for a, b in frags:
                if b > a:
                    pieces.append((a, np.subtract(m[a - s0 : b - s0], base[a - s0 : b - s0])))
            sums = []
            step = max(1, CHUNK // G) * G
            for a in range(full[0], full[1], step):
                b = min(full[1], a + step)
                t = np.subtract(m[a - s0 : b - s0], base[a - s0 : b - s0], out=scratch("ob.a", b - a))
                sums.append(_moments(t.reshape(-1, G), self.scale))
            res[s.task] = (pieces, np.concatenate(sums) if sums else np.zeros(0))
        return (numel(block.shape), G, res)

    def _alpha_reduce(self, partials, params: TensorParams, stats: Stats):
        partials = [p for p in partials if p is not None]
        if not partials:
            return {}
        n, G = partials[0][0], partials[0][1]
        out = {}
        for task in partials[0][2]:
            sums = [p[2][task][1] for p in partials]
            groups: dict[int, list] = {}
            for p in partials:
                for a, v in p[2][task][0]:
                    groups.setdefault(a // G, []).append((a, v))
            for g, lst in groups.items():
                lst.sort(key=lambda x: x[0])
                v = np.concatenate([x[1] for x in lst])
                sums.append(_moments(v.reshape(1, -1), self.scale))
            total = math.fsum(np.concatenate(sums)) if sums else 0.0
            out[f"{task}.alpha"] = float(_scale_from(total, n, self.scale))
        return out

    @property
    def passes(self) -> tuple[Pass, ...]:
        return (*self.tk.passes, Pass("onebit.alpha", self._alpha_map, self._alpha_reduce, needed=self._alpha_needed))

    # -- per block --------------------------------------------------------------------------
    def geometry(self, block: Block):
        shape = tuple(block.shape)
        nb = block_size(block)
        if len(shape) >= 2:
            cols = cols_of(shape)
            rows = nb // cols if cols else 0
        else:
            cols, rows = 1, nb
        return rows, cols

    def tau_chunk(self, block: Block, i: int, r0: int, r1: int, cols: int, name: str) -> np.ndarray:
        a, b = r0 * cols, r1 * cols
        t = scratch(name, b - a)
        np.subtract(flat(block.models[i])[a:b], flat(block.base)[a:b], out=t)
        return t.reshape(r1 - r0, cols)

    # -- the encoder --------------------------------------------------------------------------
    def encode(self, block: Block, params: TensorParams, stats: Stats) -> dict:
        self._check(block)
        specs = self.specs(block.shape)
        rows, cols = self.geometry(block)
        nd2 = len(block.shape) >= 2
        out: dict = {}
        for s in specs:
            if s.kind == "drop":
                continue
            if s.kind in ("1bit", "1bit-row"):
                if nd2:
                    bits = np.empty((rows, -(-cols // 8)), dtype=np.uint8)
                    sc = np.empty(rows, dtype=np.float32) if s.kind == "1bit-row" else None
                    for r0, r1 in _row_chunks(rows, cols):
                        t = self.tau_chunk(block, s.index, r0, r1, cols, "ob.t")
                        bits[r0:r1] = pack_signs(t)
                        if sc is not None:
                            sc[r0:r1] = row_scales(t, self.scale)
                    out[f"{s.task}.bits"] = bits
                    if sc is not None:
                        out[f"{s.task}.scale"] = sc
                else:
                    t = np.subtract(flat(block.models[s.index]), flat(block.base))
                    out[f"{s.task}.bits"] = pack_signs_flat(t)
            elif s.kind == "2bit":
                pc = -(-cols // 8)
                pieces = {"bits": np.empty((rows, pc), np.uint8), "bits2": np.empty((rows, pc), np.uint8),
                          "scale": np.empty(rows, np.float32), "scale2": np.empty(rows, np.float32)}
                for r0, r1 in _row_chunks(rows, cols):
                    m1, m2, b1, b2 = two_bit_fit(self.tau_chunk(block, s.index, r0, r1, cols, "ob.t"), self.scale)
                    pieces["bits"][r0:r1] = np.packbits(m1, axis=1, bitorder="little")
                    pieces["bits2"][r0:r1] = np.packbits(m2, axis=1, bitorder="little")
                    pieces["scale"][r0:r1], pieces["scale2"][r0:r1] = b1[:, 0], b2[:, 0]
                out.update({f"{s.task}.{k}": v for k, v in pieces.items()})
            elif s.kind == "sparse":
                m, b = flat(block.models[s.index]), flat(block.base)

                def diff(c0, c1, m=m, b=b):
                    return np.subtract(m[c0:c1], b[c0:c1], out=scratch("ob.d", c1 - c0))

                off, val = select_block(block, self.tk, params, stats, self.sel_of[s.index], diff)
                out[f"{s.task}.sparse"] = encode_sparse(off, val, m.size)
            else:  # dense: the engine rounds the float32 tau to bf16
                out[f"{s.task}.dense"] = np.subtract(block.models[s.index], block.base)
        return out

    # -- the static fallback ------------------------------------------------------------------
    def fallback(self, block: Block, params: TensorParams, stats: Stats, lam: float) -> np.ndarray:
        self._check(block)
        specs = [s for s in self.specs(block.shape) if s.kind != "drop"]
        out = np.array(block.base, dtype=np.float32, copy=True)
        if not specs:
            return out
        rows, cols = self.geometry(block)
        keepers = {s.index: self.tk.keeper(block, params, stats, self.sel_of[s.index]) for s in specs if s.kind == "sparse"}
        alphas = {s.index: np.float32(stats[f"{s.task}.alpha"]) for s in specs if s.kind == "1bit"}
        o2 = out.reshape(rows, cols)
        lam32 = np.float32(lam)
        for r0, r1 in _row_chunks(rows, cols):
            L = (r1 - r0) * cols
            shp = (r1 - r0, cols)
            hats = []
            for s in specs:
                t = self.tau_chunk(block, s.index, r0, r1, cols, f"fb.t{len(hats)}")
                if s.kind in ("1bit", "1bit-row"):
                    a = alphas[s.index] if s.kind == "1bit" else row_scales(t, self.scale)[:, None]
                    # +-a as (t >= 0) * 2a - a: exact (2a is exact, 2a - a == a by Sterbenz)
                    mb = np.greater_equal(t, 0, out=scratch("fb.sg", L, bool).reshape(shp))
                    h = t  # tau is no longer needed
                    np.multiply(mb, a * np.float32(2), out=h)
                    np.subtract(h, a, out=h)
                elif s.kind == "2bit":
                    h = two_bit_hat(*two_bit_fit(t, self.scale))
                elif s.kind == "sparse":
                    u = np.abs(t, out=scratch("fb.u", L).reshape(shp)).reshape(-1).view(np.uint32)
                    keep = keepers[s.index].mask(u, block.start + r0 * cols, out=scratch("fb.k", L, bool))
                    h = np.where(keep.reshape(shp), bf16_round(t), np.float32(0))
                else:
                    h = bf16_round(t)
                hats.append(h)
            ssum = scratch("fb.s", L).reshape(shp)
            np.copyto(ssum, hats[0])
            for h in hats[1:]:
                np.add(ssum, h, out=ssum)
            T = _ties_into(
                hats,
                ssum,
                scratch("fb.S", L).reshape(shp),
                scratch("fb.D", L).reshape(shp),
                scratch("fb.m", L, bool).reshape(shp),
                scratch("fb.x", L).reshape(shp),
            )
            np.multiply(T, lam32, out=T)
            np.add(o2[r0:r1], T, out=o2[r0:r1])
        return out


def onebit_encode_method(
    tasks: Sequence[str],
    precisions: Mapping[str, str],
    scale: str = "absmean",
    granularity: str = "tensor",
    rho: float = 0.1,
    *,
    shape: Sequence[int] | None = None,
) -> MergeMethod:
    """The per-task encodings of one tensor (base required; Block.models = the fine-tunes in
    task order): merge returns {output name: value} exactly as `onebit_outputs` declares them.

    `shape` (optional, the tensor's) lets the alpha pass say exactly whether it is needed; the
    method then refuses blocks of another shape.
    """
    # Imported here, not at the top: that module imports this one.
    from ..kernels.onebit import onebit_encode

    ob = _OneBit(tasks, precisions, scale, granularity, rho, shape)
    return MergeMethod(
        name="1bit.encode",
        merge=ob.encode,
        kernel=functools.partial(onebit_encode, ob),
        base="required",
        passes=ob.passes,
        summary="1bit-Merging encodings: sign bits + scale, sparse top-rho or dense bf16 per task",
    )


def onebit_fallback_method(
    tasks: Sequence[str],
    precisions: Mapping[str, str],
    scale: str = "absmean",
    granularity: str = "tensor",
    lam: float = 1.0,
    rho: float = 0.1,
    *,
    shape: Sequence[int] | None = None,
) -> MergeMethod:
    """The static fallback theta_0 + lam * TIES(tau_hat_t over the tasks not dropped), float32.

    tau_hat_t is what `reconstruct_task` rebuilds from the encoder's outputs (same precisions,
    scale, granularity and rho), computed here straight from the fine-tunes.
    """
    # Imported here, not at the top: that module imports this one.
    from ..kernels.onebit import onebit_fallback

    ob = _OneBit(tasks, precisions, scale, granularity, rho, shape)
    lam = float(lam)

    return MergeMethod(
        name="1bit.fallback",
        merge=_Fallback(ob, lam),
        kernel=functools.partial(onebit_fallback, ob, lam),
        base="required",
        passes=ob.passes,
        summary="1bit-Merging static fallback: theta_0 + lambda * TIES over the 1-bit task vectors",
    )


class _Fallback:
    def __init__(self, ob: _OneBit, lam: float):
        self.ob = ob
        self.lam = lam

    def __call__(self, block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
        return self.ob.fallback(block, params, stats, self.lam)


__all__ = [
    "GROUP",
    "KINDS",
    "SCALES",
    "TaskSpec",
    "cols_of",
    "dynamic_merge_block",
    "fallback_merge_block",
    "onebit_encode_method",
    "onebit_fallback_method",
    "onebit_outputs",
    "pack_signs",
    "pack_signs_flat",
    "packed_cols",
    "reconstruct_from_outputs",
    "reconstruct_task",
    "resolve_precision",
    "row_scales",
    "task_specs",
    "tensor_scale",
    "ties_merge",
    "two_bit_fit",
    "two_bit_hat",
    "unpack_signs",
    "unpack_signs_flat",
]
