"""The sparsification rules of mergekit's generalized task arithmetic family, for both backends.

What a method of the family keeps of each task vector, as numbers: the family's specs, which
rule each uses, how many entries a magnitude rule keeps, whether a model's mask is trivial, the
L1-rescale threshold and DELLA's parameter checks. methods/ties.py (streamed numpy) and
kernels/ties.py (whole tensors in torch) both apply them, so the two paths cannot disagree on
a rule; methods/ties.py's docstring defines the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import StreammergeError

MAGNITUDE = "magnitude"
RANDOM = "random"
OUTLIERS = "magnitude_outliers"
DELLA = "della_magprune"

MAX_1D_RANKED = 1 << 22  # della on a 1-D tensor keeps its ranks in stats
EPS_RESCALE = 1e-7  # the L1 rescale applies only when both sums reach this (mergekit's rule)


@dataclass(frozen=True)
class Spec:
    """One method of the family: its name, sparsification rule and defaults."""

    name: str
    consensus: bool
    sparsify: str
    default_normalize: bool
    default_rescale: bool


def densities(params) -> list[float]:
    """The per-model `density` parameters of a TensorParams, as floats."""
    return [float(d) for d in params.model_values("density")]


def magnitude_k(density: float, n: int) -> int:
    """Entries the magnitude rule keeps of n: max(1, int(density * n))."""
    return max(1, int(density * n))


def outlier_ks(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Descending ranks [k1, k2) kept by mergekit's magnitude_outliers (k1 == k2: none)."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    hi = min(n, max(n_bot, n_bot + target))  # python slice [n_bot : n_bot + target], clamped
    lo = min(n, n_bot)
    if hi <= lo:
        return 0, 0
    return n - hi, n - lo


def active(spec: Spec, density: float, n: int) -> str:
    """'dense' (untouched), 'zero' (all dropped) or 'mask'."""
    if density >= 1:
        return "dense"
    if spec.sparsify == MAGNITUDE:
        return "zero" if (density <= 0 or n == 0) else "mask"
    if spec.sparsify == DELLA:
        return "zero" if density <= 0 else "mask"
    return "mask"


def check_della(tensor: str, model: int, density: float, epsilon: float) -> None:
    """DELLA's keep probabilities density +/- epsilon must lie within (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise StreammergeError(
            f"{tensor}: della needs density +/- epsilon within (0, 1) "
            f"(model {model}: density {density}, epsilon {epsilon})"
        )


def check_rank1d(tensor: str, n: int) -> None:
    """DELLA ranks a 1-D tensor as one row: its ranks are held whole (at most MAX_1D_RANKED)."""
    if n > MAX_1D_RANKED:
        raise StreammergeError(
            f"{tensor}: della on a 1-D tensor of {n} elements (ranks are tensor-wide; "
            f"at most {MAX_1D_RANKED} supported)"
        )


def weight_sum(weights: Sequence) -> np.float32:
    """The linear divisor: the weights summed in float32 from 0; |sum| < 1e-8 counts as 1."""
    total = np.float32(0)
    for w in weights:
        total = np.float32(total + w)
    if abs(total) < 1e-8:
        total = np.float32(1)
    return total
