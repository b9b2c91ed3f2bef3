"""Parity of slerp, nuslerp, multislerp and karcher with mergekit 0.1.5, run in-process.

What is compared, and why not everything bit for bit:

* mergekit takes its norms and dot products with float32 torch reductions (its own summation
  order; slerp in 2**20-element chunks) and uses SLEEF's float32 acos/sin/cos (1 ulp). We take
  the reductions exactly (float64 products, exact integer addition: block-size invariant) and
  use correctly rounded transcendental functions. A scalar of ours can therefore differ from
  mergekit's in its last float32 bit or so, and the output by a few units of 2**-24 relative to
  the magnitude of the inputs.
* Everything after those reductions repeats mergekit's float32 operations in its order. The
  "exact" tests show it: on inputs whose float32 reductions are exact in any order (entries
  +-c with a power-of-4 length, or small integers), with our transcendental functions swapped
  for torch's, the outputs are bit-identical. Branches that involve no reduction-sensitive
  arithmetic (lerp fallbacks of colinear/antipodal pairs, a single model) are bit-identical
  without any swap.
* Random inputs: |ours - mergekit| <= UNITS * 2**-24 * sum_j |x_j| elementwise, plus twice
  |mergekit(float32) - mergekit(float64)|: near-antipodal vectors make slerp ill-conditioned
  and mergekit's own float32 result then moves by that much (the allowance is what mergekit's
  float32 rounding costs, measured by running it in float64).
* karcher iterates in float64 on coefficients (see streammerge/methods/slerp.py) while
  mergekit rounds every iterate to float32: we match mergekit run in float64 to a few units,
  and mergekit in float32 within its own float32 error.
* multislerp with large unnormalized weights: its tangent residual (rounding noise in both
  implementations) and its output scale both grow with sum|w|, hence UNITS * sum|w|**2;
  near-cancelling means are compared by distance to mergekit's float64 result, in norm.
* bf16 checkpoints: mergekit runs nuslerp / multislerp / karcher in bf16 arithmetic (it casts
  each group to the input dtype), we in float32 with one rounding on output: bounded in bf16
  units at the end of this file.
* Every result must also be bit-identical across block sizes (1 row, a few rows, whole).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods import slerp as sl  # noqa: E402
from streammerge.ops import exactsum as xs  # noqa: E402
from streammerge.methods.inmemory import merge_tensor  # noqa: E402

pytestmark = pytest.mark.mergekit

BLOCKS = (None, 1, 3, 8)
UNITS = 8  # in 2**-24 * sum_j |x_j|: observed maximum is about 3 on well-conditioned data


# ---------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------


def mergekit_merge(name, base, models, params, dtype=torch.float32):
    """Call mergekit's own registered method on one tensor group (base first, as its planner)."""
    tensors = ([] if base is None else [base]) + list(models)
    group = TensorGroup.from_tensors(
        [torch.from_numpy(np.asarray(x, np.float32)).to(dtype) for x in tensors],
        base_index=None if base is None else 0,
        name="w",
    )
    (out,) = registry.get(name)([group], parameters=params)
    return out.to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()


def ours(name, base, models, glob, per_model, block_rows=None):
    params = TensorParams(globals=glob, per_model=tuple(per_model))
    return merge_tensor(get_method(name), "w", base, list(models), params, block_rows)


def ours_all_blocks(name, base, models, glob, per_model):
    """Our result, asserting it is bit-identical for every block size."""
    outs = [ours(name, base, models, glob, per_model, b) for b in BLOCKS]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert outs[0].dtype == np.float32 and outs[0].shape == np.shape(models[0])
    return outs[0]


def assert_close(got, mk32, mk64, inputs, units=UNITS):
    scale = sum(np.abs(np.asarray(x, np.float64)) for x in inputs)
    err = np.abs(got.astype(np.float64) - mk32)
    allowed = units * 2.0**-24 * scale + 2 * np.abs(mk32.astype(np.float64) - mk64)
    worst = float(np.max(err - allowed)) if err.size else 0.0
    assert np.all(err <= allowed), f"exceeds tolerance by {worst}"


@pytest.fixture
def torch_transcendentals(monkeypatch):
    """Use torch's float32 sin/cos/acos (SLEEF) in our scalar code, as mergekit does."""

    def wrap(fn):
        return lambda x: fn(torch.from_numpy(np.asarray(x, np.float32).copy())).numpy()

    monkeypatch.setattr(sl, "sin32", wrap(torch.sin))
    monkeypatch.setattr(sl, "cos32", wrap(torch.cos))
    monkeypatch.setattr(sl, "acos32", wrap(torch.acos))


def family(rng, shape, n, spread=0.1):
    """A base and n fine-tune-like models (base + small noise), float32."""
    base = rng.standard_normal(shape).astype(np.float32)
    models = [(base + spread * rng.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    return base, models


def signs(rng, n):
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=n)


def with_agreement(rng, u, agree):
    """A +-1 vector that agrees in sign with u at exactly `agree` positions."""
    v = -u.copy()
    v[rng.permutation(u.size)[:agree]] *= -1
    return v


SHAPES = [(37, 29), (64,), (3, 5, 7), ()]


def seed(*args) -> int:
    return zlib.crc32(repr(args).encode())


# ---------------------------------------------------------------------------------------------
# exact summation helpers
# ---------------------------------------------------------------------------------------------


def test_exact_sums_are_exact_and_block_invariant():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 33)) * 10.0 ** rng.integers(-20, 20, (50, 1))).astype(np.float32)
    y = rng.standard_normal((50, 33)).astype(np.float32)
    from fractions import Fraction

    exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x.ravel(), y.ravel()))
    rowsums = xs.row_dots((x, y), ((0, 1),))[:, 0]  # float64 per-row sums (the only rounding)
    for r in (1, 7, 50):  # a row's sum does not depend on the rows around it
        np.testing.assert_array_equal(xs.row_dots((x[:r], y[:r]), ((0, 1),))[:, 0], rowsums[:r])
    for split in ([50], [1] * 50, [7, 13, 30]):
        parts, r0 = [], 0
        for rows in split:
            parts.append(xs.exact_block_sums((x[r0 : r0 + rows], y[r0 : r0 + rows]), ((0, 1),)))
            r0 += rows
        (got,) = xs.exact_reduce(parts[::-1], 1)  # any order
        assert got == float(sum(Fraction(float(v)) for v in rowsums))  # correctly rounded
        assert abs(got - float(exact)) <= 1e-12 * float(abs(exact) + 1)


@pytest.mark.parametrize("shape", [(9, 5000), (40,), (6, 3, 4)])
def test_exact_sums_exact_representation(shape, monkeypatch):
    """Partials are exact; rows are reduced in fixed segments (checked with a tiny scratch
    window so that rows span several windows and segments); any cut gives identical results."""
    monkeypatch.setattr(xs, "_ROW_CHUNK", 1000)
    monkeypatch.setattr(xs, "_SEG", 256)
    from fractions import Fraction

    rng = np.random.default_rng(seed(shape))
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    x.reshape(-1)[::5] = 0
    y = rng.standard_normal(shape).astype(np.float32)
    (part,) = [xs.exact_block_sums((x, y), ((0, 1),))]
    num, exp = part[0]
    rowsums = xs.row_dots((x, y), ((0, 1),))[:, 0]
    assert Fraction(num) * Fraction(2) ** exp == sum(Fraction(float(v)) for v in rowsums)
    whole = xs.exact_reduce([part], 1)
    for cut in (1, 2, 7):
        parts = [xs.exact_block_sums((x[r : r + cut], y[r : r + cut]), ((0, 1),)) for r in range(0, shape[0], cut)]
        np.testing.assert_array_equal(xs.exact_reduce(parts, 1), whole)
    if len(shape) == 1:  # one element per row: the exact dot product itself
        exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x, y))
        assert whole[0] == float(exact)


def test_torch_small_sums():
    rng = np.random.default_rng(2)
    for n in list(range(1, 40)) + [64, 100]:
        for _ in range(20):
            x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(np.float32)
            assert xs.torch_sum32(x) == torch.from_numpy(x).sum().item()


# ---------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.77, 1.0, 1.3, -0.2])
def test_slerp_random(shape, t):
    rng = np.random.default_rng(seed((shape, t)))
    base, (other,) = family(rng, shape, 1, spread=1.0)  # far enough apart for the spherical branch
    got = ours_all_blocks("slerp", base, [other], {"t": t}, [{}])
    mk32 = mergekit_merge("slerp", base, [other], {"t": t})
    mk64 = mergekit_merge("slerp", base, [other], {"t": t}, torch.float64)
    assert_close(got, mk32, mk64, [base, other])


def test_slerp_chunked_large_tensor():
    """mergekit reduces slerp norms in 2**20-element chunks; the result must not care."""
    rng = np.random.default_rng(3)
    base, (other,) = family(rng, (1100, 1000), 1, spread=1.0)
    got = ours("slerp", base, [other], {"t": 0.4}, [{}], 300)
    mk32 = mergekit_merge("slerp", base, [other], {"t": 0.4})
    mk64 = mergekit_merge("slerp", base, [other], {"t": 0.4}, torch.float64)
    assert_close(got, mk32, mk64, [base, other])


@pytest.mark.parametrize("shape", [(16, 16), (64,), (4, 4, 4)])
@pytest.mark.parametrize("agree_frac", [0.0, 0.125, 0.5, 0.625, 0.875, 1.0])
@pytest.mark.parametrize("t", [0.25, 0.3, 0.9])
def test_slerp_exact(shape, agree_frac, t, torch_transcendentals):
    """Exact reductions + torch's sin/acos: bit-identical, both branches (|cos| = 1 is lerp)."""
    rng = np.random.default_rng(4)
    n = int(np.prod(shape))
    u = signs(rng, n)
    v = with_agreement(rng, u, int(agree_frac * n))
    base = (0.5 * u).reshape(shape).astype(np.float32)
    other = (2.0 * v).reshape(shape).astype(np.float32)
    got = ours_all_blocks("slerp", base, [other], {"t": t}, [{}])
    np.testing.assert_array_equal(got, mergekit_merge("slerp", base, [other], {"t": t}))


@pytest.mark.parametrize("shape", [(13, 11), (40,), ()])
@pytest.mark.parametrize("factor", [1.0, 3.0, -1.0, -0.5, 0.0])
@pytest.mark.parametrize("t", [0.2, 0.5, 1.1])
def test_slerp_colinear_is_bit_identical(shape, factor, t):
    """Identical, scaled, antipodal and zero partners: mergekit's lerp fallback (or its zero-norm
    convention), bit-identical on arbitrary values: no reduction can flip that branch."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(shape).astype(np.float32)
    other = (base * np.float32(factor)).astype(np.float32)
    got = ours_all_blocks("slerp", base, [other], {"t": t}, [{}])
    mk32 = mergekit_merge("slerp", base, [other], {"t": t})
    if factor == 0.0:  # |other| = 0: mergekit treats the norm as 1, dot 0, theta = pi/2
        assert_close(got, mk32, mergekit_merge("slerp", base, [other], {"t": t}, torch.float64), [base])
    else:
        np.testing.assert_array_equal(got, mk32)


def test_slerp_zero_base():
    base = np.zeros((8, 8), np.float32)
    other = np.random.default_rng(6).standard_normal((8, 8)).astype(np.float32)
    got = ours_all_blocks("slerp", base, [other], {"t": 0.3}, [{}])
    np.testing.assert_array_equal(got, mergekit_merge("slerp", base, [other], {"t": 0.3}))


def test_slerp_needs_base_and_one_model():
    m = get_method("slerp")
    with pytest.raises(ValueError):
        ours("slerp", None, [np.ones(3, np.float32)], {"t": 0.5}, [{}])
    with pytest.raises(ValueError):
        ours("slerp", np.ones(3, np.float32), [np.ones(3, np.float32)] * 2, {"t": 0.5}, [{}, {}])
    assert m.base == "required" and m.param("t").default is sl.REQUIRED


# ---------------------------------------------------------------------------------------------
# nuslerp
# ---------------------------------------------------------------------------------------------

NUSLERP_MODES = [
    {},  # defaults: flatten
    {"nuslerp_flatten": False},  # vectors along the last axis
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},  # vectors along axis 0
    {"nuslerp_flatten": True, "nuslerp_row_wise": True},  # flatten wins
]


def _nuslerp(base, models, mode, weights, dtype=torch.float32):
    return mergekit_merge("nuslerp", base, models, {"weight": list(weights), **mode}, dtype)


def _ours_nuslerp(base, models, mode, weights):
    return ours_all_blocks("nuslerp", base, models, dict(mode), [{"weight": w} for w in weights])


@pytest.mark.parametrize("shape", [(37, 29), (64,), (17, 5, 6), ()])
@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 1.0), (2.0, -0.5), (0.5, -0.5)])
def test_nuslerp_random(shape, mode, use_base, weights):
    rng = np.random.default_rng(seed((shape, str(mode), use_base, weights)))
    base, models = family(rng, shape, 2)
    b = base if use_base else None
    got = _ours_nuslerp(b, models, mode, weights)
    mk32 = _nuslerp(b, models, mode, weights)
    mk64 = _nuslerp(b, models, mode, weights, torch.float64)
    assert_close(got, mk32, mk64, [base, *models])


@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 3.0)])
def test_nuslerp_exact(mode, use_base, weights, torch_transcendentals):
    """Every vector (whole tensor, each row, each column) is +-c of length 16, and rows/columns
    have varying agreement, including identical and antipodal ones (colinear -> lerp)."""
    rng = np.random.default_rng(7)
    shape = (16, 16)
    u = signs(rng, 256).reshape(shape)
    v = np.empty_like(u)
    by_cols = mode.get("nuslerp_row_wise") and not mode.get("nuslerp_flatten", True)
    for i in range(16):  # rows (or columns) with agreement 0..16 of 16
        line = (slice(None), i) if by_cols else (i, slice(None))
        v[line] = with_agreement(rng, u[line], [0, 16, 8, 4, 12, 2, 14, 16, 0, 6, 10, 1, 15, 3, 13, 8][i])
    base = rng.integers(-8, 8, shape).astype(np.float32) if use_base else None
    m0 = (0.25 * u + (0 if base is None else base)).astype(np.float32)
    m1 = (4.0 * v + (0 if base is None else base)).astype(np.float32)
    got = _ours_nuslerp(base, [m0, m1], mode, weights)
    np.testing.assert_array_equal(got, _nuslerp(base, [m0, m1], mode, weights))


@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize("factor", [1.0, 2.5, -1.0])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.5, 0.5)])
def test_nuslerp_colinear(mode, factor, weights):
    """Colinear task vectors (cos exactly +-1 with power-of-two lengths): lerp, bit-identical.

    With arbitrary float values mergekit's own float32 cos lands on +-1 or one ulp short of it
    depending on its rounding (then antipodal pairs take the spherical formula, which is
    singular there): that knife edge is not reproducible by any other summation order, so the
    test uses values whose norms are exact."""
    rng = np.random.default_rng(8)
    u = (signs(rng, 256) * 0.5).reshape(16, 16)
    base = rng.standard_normal((16, 16)).astype(np.float32)
    v0 = u.astype(np.float32)
    v1 = (u * np.float32(factor)).astype(np.float32)
    for b in (None, base):
        m0 = v0 if b is None else (b + v0).astype(np.float32)
        m1 = v1 if b is None else (b + v1).astype(np.float32)
        if b is not None and not (np.array_equal(m0 - b, v0) and np.array_equal(m1 - b, v1)):
            continue  # base addition rounded: task vectors no longer exactly colinear
        got = _ours_nuslerp(b, [m0, m1], mode, weights)
        np.testing.assert_array_equal(got, _nuslerp(b, [m0, m1], mode, weights))


def test_nuslerp_identical_random_models():
    """Identical arbitrary models: whichever side of the colinear test rounding puts either
    implementation, the result is the lerp to within a few units."""
    rng = np.random.default_rng(9)
    base, (m,) = family(rng, (33, 20), 1)
    for mode in NUSLERP_MODES:
        for b in (None, base):
            got = _ours_nuslerp(b, [m, m], mode, (0.3, 0.7))
            mk32 = _nuslerp(b, [m, m], mode, (0.3, 0.7))
            mk64 = _nuslerp(b, [m, m], mode, (0.3, 0.7), torch.float64)
            assert_close(got, mk32, mk64, [base, m])


def test_nuslerp_params():
    m = get_method("nuslerp")
    assert m.base == "optional"
    assert m.param("weight").scope == "model" and m.param("weight").default is sl.REQUIRED
    assert m.param("nuslerp_flatten").default is True
    assert m.param("nuslerp_row_wise").default is False


# ---------------------------------------------------------------------------------------------
# multislerp
# ---------------------------------------------------------------------------------------------


def _multislerp(base, models, weights, glob, dtype=torch.float32):
    return mergekit_merge("multislerp", base, models, {"weight": list(weights), **glob}, dtype)


def _ours_multislerp(base, models, weights, glob):
    full = {"normalize_weights": True, "eps": 1e-8, **glob}
    return ours_all_blocks("multislerp", base, models, full, [{"weight": w} for w in weights])


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), ()])
@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize(
    "weights,glob",
    [
        ((0.2, 0.5, 0.3), {}),
        ((1.0, 1.0, 1.0, 2.0), {}),
        ((0.2, 0.5, 0.3), {"normalize_weights": False}),
        ((3.0, 1.0), {"normalize_weights": False}),
        ((0.7, 0.3), {"eps": 1e-3}),
        ((150.0, 100.0), {"normalize_weights": False}),  # large weights: the tangent pass runs
    ],
)
def test_multislerp_random(shape, use_base, weights, glob):
    rng = np.random.default_rng(seed((shape, use_base, weights, str(glob))))
    base, models = family(rng, shape, len(weights))
    b = base if use_base else None
    got = _ours_multislerp(b, models, weights, glob)
    mk32 = _multislerp(b, models, weights, glob)
    mk64 = _multislerp(b, models, weights, glob, torch.float64)
    # Unnormalized weights scale the output by sum|w| (avg_norm) and the float32 tangent residual
    # (pure rounding noise, different in mergekit and here) by sum|w| again.
    wsum = max(1.0, sum(abs(w) for w in weights))
    assert_close(got, mk32, mk64, [base, *models], units=UNITS * wsum**2)


def test_multislerp_tangent_pass_only_when_needed():
    rng = np.random.default_rng(10)
    base, models = family(rng, (20, 10), 3)
    seen = []
    method = get_method("multislerp")
    orig = method.passes[2].map

    def spy(block, params, stats):
        seen.append(stats["ms_need_tangent"])
        return orig(block, params, stats)

    spied = dataclasses.replace(method, passes=(*method.passes[:2], dataclasses.replace(method.passes[2], map=spy)))
    for weights, need in (((0.2, 0.5, 0.3), False), ((300.0, 200.0, 100.0), True)):
        seen.clear()
        glob = {"normalize_weights": False, "eps": 1e-8}
        params = TensorParams(globals=glob, per_model=tuple({"weight": w} for w in weights))
        merge_tensor(spied, "w", base, models, params, 4)
        assert set(seen) == {need}


@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize("noise", [1e-7, 1e-5, 1e-3])
def test_multislerp_near_cancellation(use_base, noise):
    """Nearly antipodal task vectors with equal weights: the weighted mean nearly cancels, so the
    Gram-matrix shortcut is refused and pass 2 measures the float32 mean elementwise. The result
    is ill-conditioned (mergekit's own float32 and float64 runs differ a lot); it must stay
    within that error, and mergekit's fallback/raise decisions must be the same."""
    rng = np.random.default_rng(seed(use_base, noise))
    base = rng.standard_normal((24, 16)).astype(np.float32)
    d = rng.standard_normal((24, 16))
    b = base if use_base else None
    bb = base if use_base else 0
    m0 = (bb + d).astype(np.float32)
    m1 = (bb - d + noise * rng.standard_normal((24, 16))).astype(np.float32)
    params = TensorParams(
        globals={"normalize_weights": True, "eps": 1e-8}, per_model=({"weight": 0.5}, {"weight": 0.5})
    )
    stats: dict = {}
    method = get_method("multislerp")
    blk = sl.Block("w", (24, 16), 0, b, (m0, m1))
    for p in method.passes[:1]:
        stats.update(p.reduce([p.map(blk, params, stats)], params, stats))
    assert stats["ms_direct"] is False
    got = _ours_multislerp(b, [m0, m1], (0.5, 0.5), {})
    mk32 = _multislerp(b, [m0, m1], (0.5, 0.5), {})
    mk64 = _multislerp(b, [m0, m1], (0.5, 0.5), {}, torch.float64)
    # Amplified rounding noise dominates (|mean| ~ noise): compare distances to the exact
    # result (mergekit in float64) in norm: ours is no further than twice mergekit's float32.
    scale = np.linalg.norm(sum(np.abs(x.astype(np.float64)) for x in [base, m0, m1]))
    ours_err = np.linalg.norm(got - mk64)
    mk_err = np.linalg.norm(mk32 - mk64)
    assert ours_err <= 2 * mk_err + UNITS * 2.0**-24 * scale, (ours_err, mk_err)


@pytest.mark.parametrize("use_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_exact(use_base, normalize, torch_transcendentals):
    """+-c unit vectors whose weighted mean has a power-of-two norm: every reduction exact, and
    the tangent residual exactly zero: bit-identical."""
    rng = np.random.default_rng(11)
    n = 64
    base = rng.integers(-4, 4, n).astype(np.float32) if use_base else np.zeros(n, np.float32)
    cases = []
    # two models, cos = -1/2, weights 1/2: |mean| = 1/2
    u1 = signs(rng, n)
    cases.append(([u1, with_agreement(rng, u1, n // 4)], (0.5, 0.5)))
    # three models, cos12 = -1/2, cos13 = 0, cos23 = -1/4, weights (1/4, 1/4, 1/2): |mean| = 1/2
    u1 = signs(rng, n)
    perm = rng.permutation(n)
    same, diff = perm[:16], perm[16:]
    u2 = u1.copy()
    u2[diff] *= -1
    u3 = -u1.copy()
    u3[same[:4]] *= -1
    u3[diff[:28]] *= -1
    cases.append(([u1, u2, u3], (0.25, 0.25, 0.5)))
    for units, weights in cases:
        models = [(base + np.float32(2.0**k) * u).astype(np.float32) for k, u in enumerate(units)]
        b = base if use_base else None
        glob = {"normalize_weights": normalize}
        got = _ours_multislerp(b, models, weights, glob)
        np.testing.assert_array_equal(got, _multislerp(b, models, weights, glob))


@pytest.mark.parametrize("use_base", [True, False])
def test_multislerp_single_model_and_antipodal_fallback(use_base):
    rng = np.random.default_rng(12)
    base, (m,) = family(rng, (9, 7), 1)
    b = base if use_base else None
    got = _ours_multislerp(b, [m], (0.4,), {})
    np.testing.assert_array_equal(got, _multislerp(b, [m], (0.4,), {}))
    np.testing.assert_array_equal(got, m)
    # antipodal task vectors with equal weights: the mean is exactly zero -> linear fallback
    d = (rng.integers(-40, 40, (9, 7)) * 0.125).astype(np.float32)
    bb = rng.integers(-4, 4, (9, 7)).astype(np.float32) if use_base else np.zeros((9, 7), np.float32)
    b = bb if use_base else None
    m0, m1 = bb + d, bb - d  # exact: small dyadic values
    for weights in ((0.5, 0.5), (2.0, 2.0)):
        glob = {"normalize_weights": weights == (0.5, 0.5)}
        got = _ours_multislerp(b, [m0, m1], weights, glob)
        np.testing.assert_array_equal(got, _multislerp(b, [m0, m1], weights, glob))
    # three models that cancel: mergekit raises, so do we
    z = np.zeros_like(d)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _multislerp(None, [d, -d, z], (0.5, 0.5, 0.0), {})
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _ours_multislerp(None, [d, -d, z], (0.5, 0.5, 0.0), {})



def test_multislerp_weights_summing_to_zero_are_refused_not_nan():
    """Negative weights are accepted (mergekit extrapolates); weights summing to 0 under
    normalize_weights make mergekit divide by 0 and return NaN: the plan refuses them."""
    from streammerge.methods import get_method
    from streammerge.methods.base import TensorParams

    rng = np.random.default_rng(13)
    base, ms = family(rng, (9, 7), 2)
    assert np.isnan(_multislerp(base, ms, (1.0, -1.0), {})).all()
    check = get_method("multislerp").check
    params = lambda ws, **g: TensorParams({"normalize_weights": True, "eps": 1e-8, **g}, tuple({"weight": w} for w in ws))  # noqa: E731
    assert "the weights [1.0, -1.0] sum to 0, and normalize_weights divides" in check(params((1.0, -1.0)))
    assert check(params((1.0, -1.0), normalize_weights=False)) is None and check(params((1.0, -0.4))) is None
    got = _ours_multislerp(base, ms, (1.0, -1.0), {"normalize_weights": False})
    np.testing.assert_allclose(got, _multislerp(base, ms, (1.0, -1.0), {"normalize_weights": False}), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# karcher
# ---------------------------------------------------------------------------------------------


def _karcher(models, glob, dtype=torch.float32):
    return mergekit_merge("karcher", None, models, glob, dtype)


def _ours_karcher(models, glob):
    return ours_all_blocks("karcher", None, models, {"max_iter": 10, "tol": 1e-5, **glob}, [{}] * len(models))


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), ()])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("spread", [0.01, 0.3, 3.0])
@pytest.mark.parametrize("glob", [{}, {"max_iter": 1}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": 50, "tol": 1e-7}])
def test_karcher_random(shape, n, spread, glob):
    rng = np.random.default_rng(seed((shape, n, spread, str(glob))))
    base, models = family(rng, shape, n - 1, spread)
    inputs = [base, *models]  # the base counts as an input for karcher, as in mergekit
    got = _ours_karcher(inputs, glob)
    mk32 = _karcher(inputs, glob)
    mk64 = _karcher(inputs, glob, torch.float64)
    # exact iteration: agrees with mergekit run in float64 up to our final float32 rounding
    np.testing.assert_array_less(
        np.abs(got - mk64), 2.0 * n * 2.0**-24 * sum(np.abs(x.astype(np.float64)) for x in inputs) + 1e-30
    )
    assert_close(got, mk32, mk64, inputs)


def test_karcher_edge_cases():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    z = np.zeros_like(x)
    tiny = (x * np.float32(1e-7)).astype(np.float32)  # norm below tol: scale only
    cases = [[x], [x, x], [x, 2 * x], [z, z], [x, z], [x, tiny, 3 * x], [x, -x], [x, -x, z]]
    for inputs in cases:
        got = _ours_karcher(inputs, {})
        mk32, mk64 = _karcher(inputs, {}), _karcher(inputs, {}, torch.float64)
        assert_close(got, mk32, mk64, inputs)
    np.testing.assert_array_equal(_ours_karcher([x], {}), x)
    np.testing.assert_array_equal(_ours_karcher([z, z], {}), z)


def test_karcher_params():
    m = get_method("karcher")
    assert m.base == "unused"
    assert m.param("max_iter").default == 10 and m.param("tol").default == 1e-5
    assert len(m.passes) == 1


# ---------------------------------------------------------------------------------------------
# bfloat16 checkpoints: where mergekit computes in the input dtype
# ---------------------------------------------------------------------------------------------


def _bf16(x):
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize(
    "name,use_base,n,glob,per_model,bound",
    [
        # slerp computes in float32 whatever the input dtype: same bf16 values up to the last-bit
        # differences of its float32 reductions (an f32 ulp straddling a bf16 rounding boundary)
        ("slerp", True, 1, {"t": 0.3}, [{}], 1.0),
        # nuslerp / multislerp run every torch op on bf16 tensors (float32 opmath, rounded to bf16
        # after each op): the difference is mergekit's bf16 rounding of its intermediates
        ("nuslerp", True, 2, {}, [{"weight": 0.3}, {"weight": 0.7}], 6.0),
        ("nuslerp", False, 2, {}, [{"weight": 0.3}, {"weight": 0.7}], 6.0),
        ("multislerp", True, 3, {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], 6.0),
    ],
)
def test_bf16_inputs_bound(name, use_base, n, glob, per_model, bound):
    """mergekit merges bf16 checkpoints in bf16 (no dtype set): it casts every input group to
    the promoted input dtype. We compute in float32 and round once to bf16 on output. The bound
    is in bf16 units (2**-8) of sum_j |x_j| per element."""
    rng = np.random.default_rng(seed(name, use_base, n))
    base = _bf16(rng.standard_normal((96, 64)))
    models = [_bf16(base + 0.1 * rng.standard_normal((96, 64))) for _ in range(n)]
    b = base if use_base else None
    tensors = ([] if b is None else [b]) + models
    group = TensorGroup.from_tensors(
        [torch.from_numpy(x).to(torch.bfloat16) for x in tensors], base_index=None if b is None else 0, name="w"
    )
    mk_params = dict(glob)
    if "weight" in per_model[0]:
        mk_params["weight"] = [p["weight"] for p in per_model]
    (ref,) = registry.get(name)([group], parameters=mk_params)
    assert ref.dtype == torch.bfloat16
    full = {"normalize_weights": True, "eps": 1e-8, **glob} if name == "multislerp" else glob
    got = _bf16(ours(name, b, models, full, per_model, 8))
    scale = sum(np.abs(x.astype(np.float64)) for x in tensors)
    err = np.abs(got - ref.float().numpy()) / (scale * 2.0**-8)
    assert err.max() <= bound, err.max()


def test_bf16_karcher_is_mergekits_bf16_noise():
    """mergekit's bf16 Karcher iteration rounds every iterate to bf16, so its tangent never falls
    below tol and all max_iter steps are rounding noise: about 1% (relative, in norm) away from
    its own float32 result. Ours equals the float32/float64 result, rounded once."""
    rng = np.random.default_rng(14)
    base = _bf16(rng.standard_normal((96, 64)))
    inputs = [base] + [_bf16(base + 0.1 * rng.standard_normal((96, 64))) for _ in range(3)]
    group = TensorGroup.from_tensors([torch.from_numpy(x).to(torch.bfloat16) for x in inputs], name="w")
    (ref,) = registry.get("karcher")([group], parameters={})
    mk64 = _karcher(inputs, {}, torch.float64)
    got = _bf16(_ours_karcher(inputs, {}))
    assert np.linalg.norm(got - mk64) / np.linalg.norm(mk64) < 2.0**-8  # our bf16 rounding only
    assert np.linalg.norm(ref.float().numpy() - mk64) / np.linalg.norm(mk64) < 0.05
