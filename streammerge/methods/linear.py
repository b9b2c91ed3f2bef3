"""Linear averaging (model soups): sum_i w_i theta_i / sum_i w_i.

Same operations as mergekit's `linear` in float32: accumulate w_i * theta_i into zeros in model
order with torch's `addcmul_`, which the CPU kernels execute as a fused multiply-add (one
rounding), then divide by the float32 sum of weights when normalizing. numpy has no FMA; the
product of two float32 values is exact in float64, so acc + theta * w is formed in float64 and
rounded once to float32, which reproduces the fused result.
"""

import numpy as np

from ..kernels import linear as kernels
from ..ops import fused
from ..workspace import thread_buffer
from .base import CACHE_ELEMS, Block, MergeMethod, Param, TensorParams, cache_slices, register, result_array


def linear(block: Block, params: TensorParams, stats) -> np.ndarray:
    weights = np.asarray(params.model_values("weight"), dtype=np.float32)
    models = [m.reshape(-1) for m in block.models]
    out = result_array(block).reshape(-1)
    acc = thread_buffer("linear.acc", min(out.size, CACHE_ELEMS), np.float64)
    tmp = thread_buffer("linear.tmp", min(out.size, CACHE_ELEMS), np.float64)
    denominator = weights.sum(dtype=np.float32)
    for sl in cache_slices(out.size):
        a, t = acc[: sl.stop - sl.start], tmp[: sl.stop - sl.start]
        a[:] = 0
        for theta, w in zip(models, weights):
            np.multiply(theta[sl], np.float64(w), out=t)
            a += t
            a[:] = a.astype(np.float32)  # round as the fused op does, per step
        out[sl] = a
        if params.globals["normalize"]:
            out[sl] /= denominator
    return out.reshape(block.models[0].shape)


def linear_bf16(base, models: list, params: TensorParams, out: np.ndarray) -> bool:
    """The same merge from bf16 bits to bf16 bits in one compiled pass (MergeMethod.merge_bf16)."""
    return fused.linear_bf16(models, params.model_values("weight"), params.globals["normalize"], out)


register(
    MergeMethod(
        name="linear",
        merge=linear,
        merge_bf16=linear_bf16,
        row_groups=True,
        nonfinite_spreads=True,
        kernel=kernels.linear,
        base="unused",
        params=(
            Param("weight", float, scope="model", example=0.5, help="this model's coefficient; negative allowed, as in mergekit"),
            Param("normalize", bool, True, help="divide by the sum of the weights"),
        ),
        summary="weighted average of the models",
    )
)
