"""1bit-Merging (docs/methods.md section 4): a routing method, registered for its recipe parameters.

The build is a pipeline (plan/routed.py): conflict/norm analysis, a per (task, module kind)
precision plan, 1-bit task vectors (sign bits + scale) and the static fallback
theta_0 + lambda * TIES(all). Routing between tasks happens at inference.

Below the registration: the per-tensor jobs that pipeline runs, `onebit_encode_method` (the
encodings) and `onebit_fallback_method` (the static fallback), built on the format of
encodings/onebit.py.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np

from ..analysis.summary import KINDS as MODULE_KINDS
from ..dtypes import BF16, round_to
from ..encodings import onebit as enc
from ..encodings import sparse
from ..geometry import row_elems
from ..kernels.onebit import onebit_encode, onebit_fallback
from ..ops.consensus import consensus, disjoint_mean, sum_into
from ..ops.topk import CHUNK, TopK, block_size, flat, numel, scratch, select_block
from .base import Block, MergeMethod, Param, Pass, Stats, TensorParams, register


def precision_by_kind(text: str) -> dict[str, str]:
    """{module kind: precision} of the `precision_by_kind` parameter, "kind=precision, ..."
    (e.g. "embedding=2bit, norm=dense"); "" is none. Raises ValueError on an unknown kind or
    precision, or a kind named twice."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, sep, precision = (x.strip().lower() for x in item.partition("="))
        if not sep or kind not in MODULE_KINDS:
            raise ValueError(f"{item!r}: expected <kind>=<precision>, kind one of {', '.join(MODULE_KINDS)}")
        if kind in out:
            raise ValueError(f"module kind {kind!r} is given twice")
        enc.resolve_precision(precision, "row", (2, 2), 0.0)  # validates the precision
        out[kind] = precision
    return out


register(
    MergeMethod(
        name="1bit",
        merge=None,
        base="required",
        pipeline="1bit",
        params=(
            Param("task", str, None, scope="model", help="task name of this fine-tune (default: its directory name)"),
            Param(
                "task_type",
                str,
                None,
                scope="model",
                choices=("chat", "general", "math", "code"),
                help="for preset paper: chat/general keep attention, math/code keep MLP (default: guessed from the task name)",
            ),
            Param("preset", str, "auto", choices=("paper", "auto", "uniform"), help="precision plan per (task, module kind)"),
            Param("coverage", float, 0.8, min=0, max=1, help="preset auto: keep the module kinds holding this share of a task's squared norm"),
            Param("bits", int, 1, min=1, max=2, help="sign bits per entry of a 1-bit precision: 2 adds the residual's sign and a second scale per row"),
            Param(
                "precision_by_kind",
                str,
                "",
                check=precision_by_kind,
                help="overrides of the preset for every task, 'kind=precision, ...' (kinds attention, mlp, norm, embedding, other;"
                " precisions drop, 1bit, 2bit, sparse-<rho>, dense), e.g. 'embedding=2bit' for a second bit there only",
                example="embedding=2bit",
            ),
            Param("scale", str, "absmean", choices=("absmean", "rms"), help="1-bit scale: mean|tau| (least squares) or ||tau||/sqrt(n) (keeps the norm)"),
            Param(
                "scale_exponent",
                float,
                -1.0,
                max=4,
                help="if >= 0: the 1-bit scale is absmean * (rms/absmean)^exponent (overrides scale: 0 absmean, 1 rms,"
                " 2 ||tau||^2/||tau||_1, whose tau_hat projects onto tau as tau); negative: off",
            ),
            Param("granularity", str, "tensor", choices=("tensor", "row"), help="one scale per tensor or per output row"),
            Param(
                "group_size",
                int,
                0,
                min=0,
                help="if > 0: a 1bit precision gets one scale per group of this many consecutive entries of each row of a"
                " matrix (overrides granularity; 1-D tensors keep one per tensor, 2bit one per row); 0: off",
            ),
            Param("lambda", float, 1.0, min=0, help="weight of the other tasks' TIES merge (dynamic) and of the static fallback"),
            Param("rho", float, 0.1, min=0, max=1, help="density of 'sparse' precision entries"),
        ),
        summary="1-bit task vectors targeted by module kind, merged per prompt by a router; static fallback theta_0 + TIES",
    )
)


# ---------------------------------------------------------------------------------------------
# The jobs (MergeMethods) the planner builds per encoded tensor, from the format of
# encodings/onebit.py (layout, scales, pack/unpack), the streamed top-k of ops/topk.py, the
# sign election of ops/consensus.py and, for the device path, kernels/onebit.py.
# ---------------------------------------------------------------------------------------------
# the per-tensor jobs of the build: encode and static fallback


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _OneBit:
    """What the encoder and the fallback share: precisions, passes, tau_hat per chunk."""

    def __init__(self, tasks, precisions, scale, granularity, rho, shape):
        self.tasks = enc.check_common(tasks, precisions, scale, granularity, rho)
        self.precisions = {t: precisions[t] for t in self.tasks}
        self.scale = scale
        self.granularity = granularity
        self.group = enc.group_of(granularity)  # G of "group:<G>", else None
        self.rho = float(rho)
        self.shape = None if shape is None else tuple(shape)
        self._specs: dict[tuple, list[enc.TaskSpec]] = {}
        self.tk = TopK("onebit.topk", self._values, self._plan)
        # selections in task order: one per sparse task (whatever the shape)
        self.sparse_tasks = [
            (i, enc.resolve_precision(self.precisions[t], granularity, (2, 2), rho)[1])
            for i, t in enumerate(self.tasks)
            if enc.resolve_precision(self.precisions[t], granularity, (2, 2), rho)[0] == "sparse"
        ]
        self.sel_of = {i: j for j, (i, _) in enumerate(self.sparse_tasks)}

    def specs(self, shape) -> list[enc.TaskSpec]:
        shape = tuple(shape)
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"block of a tensor shaped {shape}, method made for {self.shape}")
        sp = self._specs.get(shape)
        if sp is None:
            sp = self._specs[shape] = enc.task_specs(self.tasks, self.precisions, shape, self.granularity, self.rho)
        return sp

    def _check(self, block: Block):
        if block.base is None:
            raise ValueError(f"{block.tensor}: 1-bit encodings need the base model")
        if len(block.models) != len(self.tasks):
            raise ValueError(f"{block.tensor}: {len(block.models)} models for {len(self.tasks)} tasks")

    # -- passes -----------------------------------------------------------------------------
    def _plan(self, params, stats, n):
        return [(i, sparse.top_rho_k(r, n)) for i, r in self.sparse_tasks]

    @staticmethod
    def _values(block, params, stats, src, sl, out):
        d = np.subtract(flat(block.models[src])[sl], flat(block.base)[sl], out=out)
        return np.abs(d, out=d)

    def _alpha_tasks(self, shape) -> list[enc.TaskSpec]:
        return [s for s in self.specs(shape) if s.kind == "1bit"]

    def _alpha_needed(self, params, stats) -> bool:
        if self.shape is not None:
            return bool(self._alpha_tasks(self.shape))
        kinds = [enc.resolve_precision(self.precisions[t], self.granularity, (2, 2), self.rho)[0] for t in self.tasks]
        # a 1-D tensor's 1bit-row (and 2bit) is one bit per tensor
        return any(k.startswith("1bit") or k == "2bit" for k in kinds)

    def _alpha_map(self, block: Block, params: TensorParams, stats: Stats):
        specs = self._alpha_tasks(block.shape)
        if not specs:
            return None
        self._check(block)
        nb = block_size(block)
        s0, e0 = block.start, block.start + nb
        G = enc.GROUP
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
                sums.append(enc.moments(t.reshape(-1, G), self.scale))
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
                sums.append(enc.moments(v.reshape(1, -1), self.scale))
            out[f"{task}.alpha"] = float(enc.scale_from(enc.exact_total(sums), n, self.scale))
        return out

    @property
    def passes(self) -> tuple[Pass, ...]:
        return (*self.tk.passes, Pass("onebit.alpha", self._alpha_map, self._alpha_reduce, needed=self._alpha_needed))

    # -- per block --------------------------------------------------------------------------
    def geometry(self, block: Block):
        shape = tuple(block.shape)
        nb = block_size(block)
        if len(shape) >= 2:
            cols = row_elems(shape)
            rows = nb // cols if cols else 0
        else:
            cols, rows = 1, nb
        return rows, cols

    def scales(self, t: np.ndarray, kind: str) -> np.ndarray:
        """1bit-row: float32 (rows,) row scales; 1bit-group: (rows, ceil(cols/G)) group scales."""
        return enc.row_scales(t, self.scale) if kind == "1bit-row" else enc.group_scales(t, self.scale, self.group)

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
            if s.kind in ("1bit", "1bit-row", "1bit-group"):
                if nd2:
                    bits = np.empty((rows, -(-cols // 8)), dtype=np.uint8)
                    sc = None
                    if s.kind == "1bit-row":
                        sc = np.empty(rows, dtype=np.float32)
                    elif s.kind == "1bit-group":
                        sc = np.empty((rows, enc.n_groups(cols, self.group)), dtype=np.float32)
                    for r0, r1 in _row_chunks(rows, cols):
                        t = self.tau_chunk(block, s.index, r0, r1, cols, "ob.t")
                        bits[r0:r1] = enc.pack_signs(t)
                        if sc is not None:
                            sc[r0:r1] = self.scales(t, s.kind)
                    out[f"{s.task}.bits"] = bits
                    if sc is not None:
                        out[f"{s.task}.scale"] = sc
                else:
                    t = np.subtract(flat(block.models[s.index]), flat(block.base))
                    out[f"{s.task}.bits"] = enc.pack_signs_flat(t)
            elif s.kind == "2bit":
                pc = -(-cols // 8)
                pieces = {"bits": np.empty((rows, pc), np.uint8), "bits2": np.empty((rows, pc), np.uint8),
                          "scale": np.empty(rows, np.float32), "scale2": np.empty(rows, np.float32)}
                for r0, r1 in _row_chunks(rows, cols):
                    m1, m2, b1, b2 = enc.two_bit_fit(self.tau_chunk(block, s.index, r0, r1, cols, "ob.t"), self.scale)
                    pieces["bits"][r0:r1] = np.packbits(m1, axis=1, bitorder="little")
                    pieces["bits2"][r0:r1] = np.packbits(m2, axis=1, bitorder="little")
                    pieces["scale"][r0:r1], pieces["scale2"][r0:r1] = b1[:, 0], b2[:, 0]
                out.update({f"{s.task}.{k}": v for k, v in pieces.items()})
            elif s.kind == "sparse":
                m, b = flat(block.models[s.index]), flat(block.base)

                def diff(c0, c1, m=m, b=b):
                    return np.subtract(m[c0:c1], b[c0:c1], out=scratch("ob.d", c1 - c0))

                off, val = select_block(block, self.tk, params, stats, self.sel_of[s.index], diff)
                out[f"{s.task}.sparse"] = sparse.encode_sparse(off, val, m.size)
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
                if s.kind in ("1bit", "1bit-row", "1bit-group"):
                    if s.kind == "1bit":
                        a = alphas[s.index]
                    elif s.kind == "1bit-row":
                        a = enc.row_scales(t, self.scale)[:, None]
                    else:
                        a = enc.expand_groups(enc.group_scales(t, self.scale, self.group), self.group, cols)
                    # +-a as (t >= 0) * 2a - a: exact (2a is exact, 2a - a == a by Sterbenz)
                    mb = np.greater_equal(t, 0, out=scratch("fb.sg", L, bool).reshape(shp))
                    h = t  # tau is no longer needed
                    np.multiply(mb, a * np.float32(2), out=h)
                    np.subtract(h, a, out=h)
                elif s.kind == "2bit":
                    h = enc.two_bit_hat(*enc.two_bit_fit(t, self.scale))
                elif s.kind == "sparse":
                    u = np.abs(t, out=scratch("fb.u", L).reshape(shp)).reshape(-1).view(np.uint32)
                    keep = keepers[s.index].mask(u, block.start + r0 * cols, out=scratch("fb.k", L, bool))
                    h = np.where(keep.reshape(shp), round_to(t, BF16), np.float32(0))
                else:
                    h = round_to(t, BF16)
                hats.append(h)
            T, D, mb = scratch("fb.S", L).reshape(shp), scratch("fb.D", L).reshape(shp), scratch("fb.m", L, bool).reshape(shp)
            consensus(hats, sum_into(hats, scratch("fb.s", L).reshape(shp)), T, D, mb, scratch("fb.x", L).reshape(shp))
            disjoint_mean(T, D, mb)
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


