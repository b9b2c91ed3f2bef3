"""Parity of the per-tensor passthrough with mergekit 0.1.5: bit-identical."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods.inmemory import merge_tensor  # noqa: E402

pytestmark = pytest.mark.mergekit


def mergekit_passthrough(x: torch.Tensor, scale):
    group = TensorGroup.from_tensors([x], name="w")
    (out,) = registry.get("passthrough")([group], parameters={"scale": [scale]})
    return out


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), ()])
@pytest.mark.parametrize("scale", [None, 1.0, 0.37, -2.5, 0.0, 1e-3])
@pytest.mark.parametrize("block_rows", [None, 1, 5])
def test_passthrough_float32(shape, scale, block_rows):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = merge_tensor(
        get_method("passthrough"), "w", None, [x], TensorParams(globals={}, per_model=({"scale": scale},)), block_rows
    )
    np.testing.assert_array_equal(got, mergekit_passthrough(torch.from_numpy(x), scale).numpy())
    assert got is not x


@pytest.mark.parametrize("scale", [None, 0.37, 3.0, -1.7])
def test_passthrough_bf16_rounding_matches(scale):
    """mergekit scales a bf16 tensor in float32 opmath and rounds once to bf16; our float32
    product rounded to bf16 (round to nearest even) on output is the same value."""
    x = torch.randn(64, 48).to(torch.bfloat16)
    x32 = x.float().numpy()
    params = TensorParams(globals={}, per_model=({"scale": scale},))
    got = merge_tensor(get_method("passthrough"), "w", None, [x32], params)
    ref = mergekit_passthrough(x, scale).float().numpy()
    np.testing.assert_array_equal(got.astype(ml_dtypes.bfloat16).astype(np.float32), ref)


def test_passthrough_contract():
    m = get_method("passthrough")
    assert m.base == "unused"
    p = m.param("scale")
    assert p.scope == "model" and p.default is None
    x = np.ones(3, np.float32)
    with pytest.raises(ValueError):
        merge_tensor(m, "w", None, [x, x], TensorParams(globals={}, per_model=({}, {})))
