"""Parity of model_stock with mergekit 0.1.5 (in-process, float32 torch tensors).

Bit-identical on inputs whose float32 reductions are exact (integer-valued offsets, so that
mergekit's float32 norms and dot products equal our exact ones): that covers the scalar formula
(norm products, clamp, mean of pair cosines in torch's summation order, t, the singular case)
and the elementwise combination. On arbitrary values mergekit's norms and dot products are
float32 torch reductions and ours exact, so t can differ in its last bits: the output is then
compared with a tolerance of a few units of 2**-24 relative to the inputs' magnitude, plus
twice what mergekit's own float32 rounding costs (mergekit in float32 vs float64).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods.inmemory import merge_tensor  # noqa: E402

pytestmark = pytest.mark.mergekit

BLOCKS = (None, 1, 3, 8)
UNITS = 8


def seed(*args) -> int:
    return zlib.crc32(repr(args).encode())


def mergekit_merge(base, models, params, dtype=torch.float32):
    group = TensorGroup.from_tensors(
        [torch.from_numpy(np.asarray(x, np.float32)).to(dtype) for x in [base, *models]], base_index=0, name="w"
    )
    (out,) = registry.get("model_stock")([group], parameters=params)
    return out.to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()


def ours(base, models, filter_wise):
    params = TensorParams(globals={"filter_wise": filter_wise}, per_model=tuple({} for _ in models))
    outs = [merge_tensor(get_method("model_stock"), "w", base, list(models), params, b) for b in BLOCKS]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])  # block-size invariant, bit for bit
    return outs[0]


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), ()])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("spread", [0.1, 2.0])
def test_model_stock_random(shape, n, filter_wise, spread):
    rng = np.random.default_rng(seed(shape, n, filter_wise, spread))
    base = rng.standard_normal(shape).astype(np.float32)
    shared = spread * rng.standard_normal(shape)  # correlated task vectors: t well inside (0, 1)
    models = [(base + shared + spread * rng.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    got = ours(base, models, filter_wise)
    mk32 = mergekit_merge(base, models, {"filter_wise": filter_wise})
    mk64 = mergekit_merge(base, models, {"filter_wise": filter_wise}, torch.float64)
    scale = sum(np.abs(x.astype(np.float64)) for x in [base, *models])
    allowed = UNITS * 2.0**-24 * scale + 2 * np.abs(mk32.astype(np.float64) - mk64)
    assert np.all(np.abs(got.astype(np.float64) - mk32) <= allowed)


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7)])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_exact(shape, n, filter_wise):
    if filter_wise and n > 3 and len(shape) > 1:
        # torch averages more than 4 pair cosines per filter in an order that depends on the
        # filter's position (its outer-reduction tail); ours adds them in pair order.
        pytest.skip("per-filter mean of >4 pair cosines: torch's position-dependent order")
    rng = np.random.default_rng(seed(shape, n, filter_wise))
    # base with few significant bits and offsets in multiples of 1/2: offsets are computed
    # exactly and every float32 norm / dot product of them is exact in any summation order.
    base = (np.round(rng.standard_normal(shape) * 1024) / 256).astype(np.float32)
    shared = rng.integers(-3, 4, shape)
    models = [(base + (shared + rng.integers(-3, 4, shape)) * 0.5).astype(np.float32) for _ in range(n)]
    assert all(np.array_equal((m - base) * 2, np.round((m - base) * 2)) for m in models)
    got = ours(base, models, filter_wise)
    np.testing.assert_array_equal(got, mergekit_merge(base, models, {"filter_wise": filter_wise}))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_singular_and_degenerate(filter_wise):
    """Pairwise cos -1/2 for three models makes 1 + (N-1)c = 0: mergekit keeps the base there.
    Also antipodal pairs (N = 2) and models equal to the base (zero offsets)."""
    rng = np.random.default_rng(1)
    n = 64
    a = rng.choice(np.array([-1.0, 1.0]), n)
    b = -a.copy()
    b[rng.permutation(n)[:16]] *= -1  # agreement 16/64: cos(a, b) = -1/2
    c = -a - b  # |c| = |a| and cos(a, c) = cos(b, c) = -1/2
    base = rng.integers(-5, 5, n).astype(np.float32)
    cases = [
        [base + a, base + b, base + c],
        [base + a, base - a],
        [base, base + a, base + 2 * a],
        [base, base],
    ]
    for models in cases:
        models = [m.astype(np.float32) for m in models]
        got = ours(base, models, filter_wise)
        np.testing.assert_array_equal(got, mergekit_merge(base, models, {"filter_wise": filter_wise}))
    np.testing.assert_array_equal(ours(base, cases[0], filter_wise), base)
    # the same per row, mixed with regular rows, in filter-wise mode
    rows = np.stack([base + a, base + 0.5 * a + 0.25])
    m = [rows[0:1].repeat(2, 0), np.stack([base + b, base + a * 0.75]), np.stack([base + c, base - 0.5])]
    b2 = np.stack([base, base])
    m = [x.astype(np.float32) for x in m]
    np.testing.assert_array_equal(ours(b2, m, True), mergekit_merge(b2, m, {"filter_wise": True}))


def test_model_stock_needs_base_and_two_models():
    x = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError):
        ours(x, [x], False)
    params = TensorParams(globals={"filter_wise": False}, per_model=({}, {}))
    with pytest.raises(ValueError):
        merge_tensor(get_method("model_stock"), "w", None, [x, x], params)
    m = get_method("model_stock")
    assert m.base == "required" and m.param("filter_wise").default is False


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_bf16_inputs_bound(filter_wise):
    """mergekit runs model_stock's torch ops on bf16 tensors for bf16 checkpoints (rounding each
    intermediate to bf16); we compute in float32 and round once on output. The difference is
    mergekit's bf16 rounding: within 4 bf16 units (2**-8) of sum_j |x_j| per element."""
    rng = np.random.default_rng(seed("bf16", filter_wise))
    bf = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)  # noqa: E731
    base = bf(rng.standard_normal((96, 64))).float().numpy()
    shared = 0.1 * rng.standard_normal((96, 64))
    models = [bf(base + shared + 0.1 * rng.standard_normal((96, 64))).float().numpy() for _ in range(3)]
    group = TensorGroup.from_tensors([bf(x) for x in [base, *models]], base_index=0, name="w")
    (ref,) = registry.get("model_stock")([group], parameters={"filter_wise": filter_wise})
    got = bf(ours(base, models, filter_wise)).float().numpy()
    scale = sum(np.abs(x.astype(np.float64)) for x in [base, *models])
    assert np.max(np.abs(got - ref.float().numpy()) / (scale * 2.0**-8)) <= 4
