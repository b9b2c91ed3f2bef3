"""NearSwap (mergekit 0.1.5 semantics): take the other model where it is close to the base.

weight = clamp(t / max(|base - other|, 1e-6), 0, 1); result = weight * other + (1 - weight) * base.
Elementwise, no passes. mergekit evaluates `t / x` as torch's `x.reciprocal() * t` (float32
reciprocal, then a float32 product), and so does this: the output is bit-identical.
"""

from __future__ import annotations

import numpy as np

from .base import REQUIRED, Block, MergeMethod, Param, TensorParams, register

F32 = np.float32


def nearswap_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    if block.base is None:
        raise ValueError(f"nearswap requires a base model (tensor {block.tensor})")
    if len(block.models) != 1:
        raise ValueError(
            f"nearswap needs exactly 1 input model besides the base, got {len(block.models)} (tensor {block.tensor})"
        )
    a = block.base
    b = block.models[0]
    with np.errstate(all="ignore"):  # inf/nan propagate exactly as in torch
        weight = np.subtract(a, b)
        np.abs(weight, out=weight)
        np.maximum(weight, F32(1e-6), out=weight)  # clamp(min=1e-6); nan propagates as in torch
        np.reciprocal(weight, out=weight)
        weight *= F32(params.globals["t"])
        np.clip(weight, F32(0), F32(1), out=weight)
        rest = np.subtract(F32(1), weight)
        rest *= a
        weight *= b
        weight += rest
    return weight


register(
    MergeMethod(
        name="nearswap",
        example_models=1,
        max_models=1,
        merge=nearswap_merge,
        base="required",
        params=(Param("t", float, REQUIRED, min=0, example=0.001, help="similarity threshold: swap in values closer than about t"),),
        summary="per element, move the base toward the other model where they are within t",
    )
)
