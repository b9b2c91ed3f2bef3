"""Task arithmetic: theta_0 + lambda * sum_i w_i (theta_i - theta_0).

Operation order follows mergekit's generalized task arithmetic so a recipe computed in float32
gives the same bits: deltas scaled by their weights, summed in model order, optionally divided
by the sum of weights (a divisor with |d| < 1e-8 counts as 1), scaled by lambda when it is not 1,
added to the base.
"""

import numpy as np

from ..kernels import linear as kernels
from ..ops import fused
from ..workspace import thread_buffer
from .base import CACHE_ELEMS, Block, MergeMethod, Param, TensorParams, cache_slices, register, result_array


def _coefficients(params: TensorParams):
    """(float32 weights, the divisor or None, lambda)."""
    weights = [np.float32(w) for w in params.model_values("weight")]
    divisor = None
    if params.globals["normalize"]:
        d = np.float32(0)
        for w in weights:
            d = np.float32(d + w)
        divisor = d if abs(d) >= 1e-8 else None
    return weights, divisor, params.globals["lambda"]


def task_arithmetic(block: Block, params: TensorParams, stats) -> np.ndarray:
    weights, divisor, lam = _coefficients(params)
    base = block.base.reshape(-1)
    models = [m.reshape(-1) for m in block.models]
    out = result_array(block).reshape(-1)
    delta = thread_buffer("task_arithmetic.delta", min(base.size, CACHE_ELEMS))
    for sl in cache_slices(base.size):
        b, mixed, d = base[sl], out[sl], delta[: sl.stop - sl.start]
        np.subtract(models[0][sl], b, out=mixed)
        mixed *= weights[0]
        for theta, w in zip(models[1:], weights[1:]):
            np.subtract(theta[sl], b, out=d)
            d *= w
            mixed += d
        if divisor is not None:
            mixed /= divisor
        if lam != 1:
            mixed *= np.float32(lam)
        mixed += b
    return out.reshape(block.base.shape)


def task_arithmetic_bf16(base: np.ndarray, models: list, params: TensorParams, out: np.ndarray) -> bool:
    """The same merge from bf16 bits to bf16 bits in one compiled pass (MergeMethod.merge_bf16)."""
    weights, divisor, lam = _coefficients(params)
    return fused.task_arithmetic_bf16(base, models, weights, divisor, lam, out)


register(
    MergeMethod(
        name="task_arithmetic",
        merge=task_arithmetic,
        merge_bf16=task_arithmetic_bf16,
        row_groups=True,
        nonfinite_spreads=True,
        kernel=kernels.task_arithmetic,
        base="required",
        params=(
            Param("weight", float, scope="model", example=0.5, help="this model's task-vector coefficient; negative subtracts it, as in mergekit (task negation)"),
            Param("normalize", bool, False, help="divide the summed task vectors by the sum of weights"),
            Param("lambda", float, 1.0, help="scale applied to the summed task vectors (any number, as in mergekit)"),
        ),
        summary="base + lambda * weighted sum of task vectors",
    )
)
