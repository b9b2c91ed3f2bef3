"""Weighted sums on a device: linear, task_arithmetic and the plain mean (Mediator's dense expert).

The float32 operations and their order are those of methods/linear.py, methods/task_arithmetic.py
and plan/routed.py's MEAN, so the results are the same bits. Scalars are float32 values; an
elementwise +, -, * or / of float32 operands rounds the same whether the device computes it in
float32 or in float64 then rounds, so torch's choice of scalar precision cannot change a bit.
"""

from __future__ import annotations

import numpy as np

from . import DeviceTensor


def _f32(value) -> float:
    return float(np.float32(value))


def divide_(x, divisor: float):
    """x /= divisor, correctly rounded: on CUDA torch turns division by a Python number into
    multiplication by its reciprocal, which rounds differently; a 0-d tensor divisor does not."""
    import torch

    return x.div_(torch.tensor(divisor, dtype=x.dtype, device=x.device))


def task_arithmetic(x: DeviceTensor, params):
    weights = [_f32(w) for w in params.model_values("weight")]
    divisor = None
    if params.globals["normalize"]:
        d = np.float32(0)
        for w in weights:
            d = np.float32(d + np.float32(w))
        divisor = float(d) if abs(d) >= 1e-8 else None
    lam = params.globals["lambda"]
    base = x.base
    mixed = (x.models[0] - base).mul_(weights[0])
    for theta, w in zip(x.models[1:], weights[1:]):
        mixed += (theta - base).mul_(w)
    if divisor is not None:
        divide_(mixed, divisor)
    if lam != 1:
        mixed *= _f32(lam)
    return mixed.add_(base)


def linear(x: DeviceTensor, params):
    """sum_i w_i theta_i accumulated as a fused multiply-add (one rounding per step, as torch's
    CPU addcmul_ that mergekit uses): formed in float64, where the product is exact."""
    import torch

    weights = np.asarray(params.model_values("weight"), dtype=np.float32)
    acc = torch.zeros_like(x.models[0])
    for theta, w in zip(x.models, weights):
        acc = (acc.double() + theta.double() * float(w)).float()
    if params.globals["normalize"]:
        divide_(acc, float(weights.sum(dtype=np.float32)))
    return acc


def mean(x: DeviceTensor, params):
    """D = mean_t theta_t: summed in task order from theta_1, divided by N, in float32."""
    acc = x.models[0].clone()
    for m in x.models[1:]:
        acc += m
    return divide_(acc, float(len(x.models)))
