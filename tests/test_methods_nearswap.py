"""Parity of nearswap with mergekit 0.1.5: elementwise, bit-identical (float32 torch tensors)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods.base import REQUIRED  # noqa: E402
from streammerge.methods.inmemory import merge_tensor  # noqa: E402

pytestmark = pytest.mark.mergekit


def mergekit_nearswap(base, other, t):
    group = TensorGroup.from_tensors([torch.from_numpy(base), torch.from_numpy(other)], base_index=0, name="w")
    (out,) = registry.get("nearswap")([group], parameters={"t": t})
    return out.numpy()


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), ()])
@pytest.mark.parametrize("t", [0.0, 1e-7, 1e-3, 0.0123, 0.1, 1.0, 7.5, -0.5])
@pytest.mark.parametrize("block_rows", [None, 1, 4])
def test_nearswap_bit_identical(shape, t, block_rows):
    rng = np.random.default_rng(len(shape) * 1000 + int(abs(t) * 1e4))
    base = rng.standard_normal(shape).astype(np.float32)
    other = np.asarray(base + rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 1, shape), np.float32)
    if other.ndim:
        other.reshape(-1)[::7] = base.reshape(-1)[::7]  # identical entries: |a - b| clamps to 1e-6
    got = merge_tensor(
        get_method("nearswap"), "w", base, [other], TensorParams(globals={"t": t}, per_model=({},)), block_rows
    )
    np.testing.assert_array_equal(got, mergekit_nearswap(base, other, t))


def test_nearswap_nonfinite_and_contract():
    base = np.array([0.0, 1.0, np.inf, np.nan, 3e38, -3e38], np.float32)
    other = np.array([0.0, np.inf, 1.0, 2.0, -3e38, 3e38], np.float32)
    got = merge_tensor(get_method("nearswap"), "w", base, [other], TensorParams(globals={"t": 0.5}, per_model=({},)))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(got, mergekit_nearswap(base, other, 0.5))
    m = get_method("nearswap")
    assert m.base == "required" and m.param("t").default is REQUIRED
    with pytest.raises(ValueError):
        merge_tensor(m, "w", None, [other], TensorParams(globals={"t": 0.5}, per_model=({},)))


def test_nearswap_bf16_inputs_bound():
    """For bf16 checkpoints mergekit computes nearswap with bf16 torch ops (each intermediate
    rounded to bf16); we compute in float32 and round once on output: within 4 bf16 units
    (2**-8) of |base| + |other| per element."""
    rng = np.random.default_rng(3)
    bf = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)  # noqa: E731
    base = bf(rng.standard_normal((96, 64))).float().numpy()
    other = bf(base + 0.05 * rng.standard_normal((96, 64))).float().numpy()
    group = TensorGroup.from_tensors([bf(base), bf(other)], base_index=0, name="w")
    (ref,) = registry.get("nearswap")([group], parameters={"t": 0.02})
    params = TensorParams(globals={"t": 0.02}, per_model=({},))
    got = bf(merge_tensor(get_method("nearswap"), "w", base, [other], params)).float().numpy()
    scale = np.abs(base.astype(np.float64)) + np.abs(other)
    assert np.max(np.abs(got - ref.float().numpy()) / (scale * 2.0**-8)) <= 4
