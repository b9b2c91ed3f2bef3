"""Linear averaging (model soups): sum_i w_i theta_i / sum_i w_i.

Same operation order as mergekit's `linear` in float32: accumulate w_i * theta_i into zeros in
model order, then divide by the float32 sum of weights when normalizing.
"""

import numpy as np

from .base import Block, MergeMethod, Param, TensorParams, register


def linear(block: Block, params: TensorParams, stats) -> np.ndarray:
    weights = np.asarray(params.model_values("weight"), dtype=np.float32)
    acc = np.zeros_like(block.models[0])
    for theta, w in zip(block.models, weights):
        acc += theta * w
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
