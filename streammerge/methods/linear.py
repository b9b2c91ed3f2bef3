"""Linear averaging (model soups): sum_i w_i theta_i / sum_i w_i.

Same operations as mergekit's `linear` in float32: accumulate w_i * theta_i into zeros in model
order with torch's `addcmul_`, which the CPU kernels execute as a fused multiply-add (one
rounding), then divide by the float32 sum of weights when normalizing. numpy has no FMA; the
product of two float32 values is exact in float64, so acc + theta * w is formed in float64 and
rounded once to float32, which reproduces the fused result.
"""

import numpy as np

from .base import Block, MergeMethod, Param, TensorParams, register


def linear(block: Block, params: TensorParams, stats) -> np.ndarray:
    weights = np.asarray(params.model_values("weight"), dtype=np.float32)
    acc = np.zeros(block.models[0].shape, dtype=np.float64)
    for theta, w in zip(block.models, weights):
        acc += theta.astype(np.float64) * np.float64(w)
        acc = acc.astype(np.float32).astype(np.float64)  # round as the fused op does, per step
    acc = acc.astype(np.float32)
    if params.globals["normalize"]:
        acc /= weights.sum(dtype=np.float32)
    return acc


register(
    MergeMethod(
        name="linear",
        merge=linear,
        base="unused",
        params=(
            Param("weight", float, scope="model", help="this model's coefficient"),
            Param("normalize", bool, True, help="divide by the sum of the weights"),
        ),
        summary="weighted average of the models",
    )
)
