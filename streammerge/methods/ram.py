"""RAM, Reinforced Agent Merging (arXiv 2601.13572), and its tensor-local RAM+, as mergekit's
`ram` and `ramplus_tl`.

    tau_i = theta_i - theta_0;  m_i = |tau_i| > epsilon;  c = sum_i m_i  (per element)
    ram:         theta_0 + sum_i (tau_i m_i [c = 1] + tau_i m_i [c > 1] / c)
                 (an entry only one model changed keeps its change; shared ones are averaged)
    ramplus_tl:  the unique part of model i scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
                 rho_i = shared_i / max(unique_i, epsilon), where shared_i / unique_i count the
                 entries of the whole tensor that model i changes together with another model /
                 alone.

`ram` is elementwise (no passes). `ramplus_tl` counts shared_i and unique_i in one pass (exact
integer sums, so independent of the blocks), then merges elementwise. Each term is computed
as mergekit writes it, in float32, and the models' terms are added in recipe order, as torch's
sum over the stacked models does for these few rows: the output is bit-identical to
mergekit's (tests/test_methods_ram.py).
"""

from __future__ import annotations

import numpy as np

from .base import Block, MergeMethod, Param, Pass, Stats, TensorParams, register

F32 = np.float32


def _vectors(block: Block, epsilon: float):
    """(tau_i * m_i per model, m_i per model, c): mergekit's task vectors zeroed where a model
    does not change the entry, the masks, and how many models change each entry."""
    if block.base is None:
        raise ValueError(f"ram requires a base model (tensor {block.tensor})")
    taus = [np.subtract(m, block.base) for m in block.models]
    masks = [np.abs(t) > F32(epsilon) for t in taus]
    counts = np.zeros(block.base.shape, np.int64)
    for m in masks:
        counts += m
    for t, m in zip(taus, masks):
        t *= m  # tv * nonzero_mask (a float times a bool, as in torch)
    return taus, masks, counts


def _merged(block: Block, epsilon: float, scales) -> np.ndarray:
    """theta_0 + sum_i (tau_i m_i [c = 1] * scale_i + tau_i m_i [c > 1] / max(c, 1))."""
    if not block.models:
        return block.base.copy()
    taus, _, counts = _vectors(block, epsilon)
    unique, overlap = counts == 1, counts > 1
    divisor = np.maximum(counts, 1).astype(F32)
    total = None
    for t, scale in zip(taus, scales):
        term = t * unique
        if scale is not None:
            term *= scale
        shared = t * overlap
        shared /= divisor
        term += shared
        total = term if total is None else np.add(total, term, out=total)
    return np.add(block.base, total)


def ram_merge(block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
    return _merged(block, params.globals["epsilon"], [None] * len(block.models))


def _count_map(block: Block, params: TensorParams, stats: Stats):
    """Per model: (entries it changes with another model, entries it changes alone)."""
    if not block.models:
        return None
    _, masks, counts = _vectors(block, params.globals["epsilon"])
    shared = [int(np.count_nonzero(m & (counts > 1))) for m in masks]
    unique = [int(np.count_nonzero(m & (counts == 1))) for m in masks]
    return np.array([shared, unique], np.int64)


def _count_reduce(partials, params: TensorParams, stats: Stats) -> Stats:
    partials = [p for p in partials if p is not None]
    if not partials:
        return {}
    total = np.sum(partials, axis=0)
    return {"ram.shared": total[0], "ram.unique": total[1]}


def _lambdas(params: TensorParams, stats: Stats) -> list:
    """lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), in float32 as
    torch computes it from the integer counts."""
    g = params.globals
    shared = np.asarray(stats["ram.shared"]).astype(F32)
    unique = np.maximum(np.asarray(stats["ram.unique"]).astype(F32), F32(g["epsilon"]))
    with np.errstate(divide="ignore", invalid="ignore"):  # epsilon 0: NaN/inf as in mergekit
        rho = np.clip(shared / unique, F32(0), F32(g["alpha"]))
    return list(F32(1) + F32(g["r"]) * rho)


def ramplus_tl_merge(block: Block, params: TensorParams, stats: Stats) -> np.ndarray:
    scales = _lambdas(params, stats) if block.models else []
    return _merged(block, params.globals["epsilon"], scales)


EPSILON = Param("epsilon", float, 1e-5, min=0, help="a task vector entry counts as changed when |tau| > epsilon")

register(
    MergeMethod(
        name="ram",
        merge=ram_merge,
        base="required",
        params=(EPSILON,),
        row_groups=True,
        summary="per element, keep a change only one model made; average the changes models share",
    )
)

register(
    MergeMethod(
        name="ramplus_tl",
        merge=ramplus_tl_merge,
        base="required",
        params=(
            Param("r", float, 0.1, min=0, help="how much a model's unique changes are amplified per unit of rho"),
            Param("alpha", float, 0.2, min=0, help="upper clamp of rho = shared / unique changes of a model"),
            EPSILON,
        ),
        passes=(Pass("ram.counts", _count_map, _count_reduce),),
        summary="ram, with each model's unique changes scaled by 1 + r * min(shared/unique, alpha) over the tensor",
    )
)
