"""Passthrough (mergekit 0.1.5 semantics), per tensor: copy the one input, optionally scaled.

`scale` is a per-model parameter with no default (null): without it the tensor is copied
unchanged; with it the result is tensor * float32(scale), as torch computes a float32 tensor
times a Python float (and, for bf16/fp16 inputs, mergekit's float32 opmath then rounding to the
input dtype equals our float32 product rounded on output). Layer stacking with `slices` is the
planner's job, not this module's.
"""

from __future__ import annotations

import numpy as np

from .base import Block, MergeMethod, Param, TensorParams, register


def passthrough_merge(block: Block, params: TensorParams, stats) -> np.ndarray:
    if len(block.models) != 1:
        raise ValueError(f"passthrough takes exactly one input model, got {len(block.models)} (tensor {block.tensor})")
    x = block.models[0]
    scale = params.per_model[0].get("scale") if params.per_model else None
    if scale is None:
        return x.copy()
    return x * np.float32(scale)


register(
    MergeMethod(
        name="passthrough",
        example_models=1,
        merge=passthrough_merge,
        base="unused",
        params=(Param("scale", float, None, scope="model", help="multiply the tensor by this factor (default: none; any number)"),),
        summary="copy a single input tensor, optionally scaled",
    )
)
