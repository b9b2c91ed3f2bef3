"""Task arithmetic: theta_0 + lambda * sum_i w_i (theta_i - theta_0).

Operation order follows mergekit's generalized task arithmetic so a recipe computed in float32
gives the same bits: deltas scaled by their weights, summed in model order, optionally divided
by the sum of weights (a divisor with |d| < 1e-8 counts as 1), scaled by lambda when it is not 1,
added to the base.
"""

import numpy as np

from .base import Block, MergeMethod, Param, TensorParams, register


def task_arithmetic(block: Block, params: TensorParams, stats) -> np.ndarray:
    base = block.base
    weights = params.model_values("weight")
    mixed = np.subtract(block.models[0], base)
    mixed *= np.float32(weights[0])
    delta = np.empty_like(mixed)
    for theta, w in zip(block.models[1:], weights[1:]):
        np.subtract(theta, base, out=delta)
        delta *= np.float32(w)
        mixed += delta
    if params.globals["normalize"]:
        divisor = np.float32(0)
        for w in weights:
            divisor = np.float32(divisor + np.float32(w))
        if abs(divisor) >= 1e-8:
            mixed /= divisor
    lam = params.globals["lambda"]
    if lam != 1:
        mixed *= np.float32(lam)
    mixed += base
    return mixed


register(
    MergeMethod(
        name="task_arithmetic",
        merge=task_arithmetic,
        base="required",
        params=(
            Param("weight", float, scope="model", help="this model's task-vector coefficient"),
            Param("normalize", bool, False, help="divide the summed task vectors by the sum of weights"),
            Param("lambda", float, 1.0, help="scale applied to the summed task vectors"),
        ),
        summary="base + lambda * weighted sum of task vectors",
    )
)
