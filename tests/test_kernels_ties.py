"""TIES-family kernels (kernels/ties.py) and the device top-k (kernels/topk.py) against the numpy
path, bit for bit, on bf16-derived data full of magnitude ties. Runs on the CPU, and on CUDA too
where torch sees a GPU."""

from __future__ import annotations

from functools import cache

import ml_dtypes
import numpy as np
import pytest

from streammerge.errors import StreammergeError
from streammerge.kernels import device_tensor, split_blocks
from streammerge.kernels import ties as kernels
from streammerge.methods import TensorParams, get_method
from streammerge.methods.inmemory import merge_tensor
from streammerge.ops.sparsify import magnitude_k as _magnitude_k, outlier_ks as _outlier_ks

torch = pytest.importorskip("torch")
from streammerge.kernels.topk import magnitude_bits, nth_true, topk_mask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TENSOR = "model.layers.0.mlp.up_proj.weight"
# shape -> the CPU path's block rows (a 1-D tensor has one-element rows)
SHAPES = {(48, 40): 7, (6, 10, 4): 4, (301,): 64, (): None}
METHODS = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]

CASES = [
    {"weight": [1.0, 0.5, 0.7], "density": 0.3},
    {"weight": [0.7, -0.4, 1.2], "density": [0.5, 0.0, 1.0], "normalize": True, "rescale": True},
    {"weight": 1.0, "density": 0.02, "rescale": True, "rescale_mode": "inverse_density", "lambda": 0.6},
    {"weight": [1.0, -1.0, 0.5], "density": 0.9, "normalize": False, "rescale": False, "lambda": 1.7},
    {"weight": [0.5, 0.5, -1.0], "density": [0.1, 0.6, 0.25], "normalize": True, "rescale": True, "rescale_mode": "l1"},
    {"weight": [0.3, 0.8, 0.2], "density": 1.0, "normalize": True, "rescale": True},
    {"weight": [1.0, 0.6, 0.3], "density": 0.0, "normalize": False, "rescale": True},
]
# breadcrumbs*: gamma per case (index-aligned with CASES)
GAMMAS = [0.05, [0.05, 0.2, 0.0], 0.0, 0.3, 0.01, 0.1, 0.01]
# della*: density +- epsilon must lie within (0, 1)
DELLA_CASES = [
    {"weight": [1.0, 0.5, 0.7], "density": 0.3},
    {"weight": [0.7, -0.4, 1.2], "density": [0.5, 0.0, 1.0], "epsilon": 0.1, "normalize": True, "rescale": True},
    {"weight": 1.0, "density": 0.05, "epsilon": 0.01, "rescale": True, "rescale_mode": "inverse_density", "lambda": 0.6},
    {"weight": [1.0, -1.0, 0.5], "density": 0.8, "epsilon": [0.1, 0.05, 0.19], "normalize": False, "rescale": False},
    {"weight": [0.5, 0.5, -1.0], "density": [0.4, 0.6, 0.25], "epsilon": 0.2, "normalize": True, "rescale": True},
]


def cases(name: str) -> list[dict]:
    if name.startswith("della"):
        return DELLA_CASES
    if name.startswith("breadcrumbs"):
        # density 0 with inverse_density: the CPU path divides the dropped entries by 0 (NaN)
        extra = {"weight": 0.5, "density": 0.0, "gamma": 0.1, "rescale": True, "rescale_mode": "inverse_density"}
        return [{**c, "gamma": g} for c, g in zip(CASES, GAMMAS)] + [extra]
    return CASES


# ---------------------------------------------------------------------------------------------
# drivers


def bf16(a) -> np.ndarray:
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@cache
def family(shape: tuple, seed: int = 0):
    """base + 3 bf16-derived fine-tunes: deltas take few distinct values (many magnitude ties);
    the third fine-tune equals the base in ~60% of entries; the base has -0.0 entries (where the
    merged delta is an all-zero sum, +0 and -0 give different bits)."""
    rng = np.random.default_rng(seed)
    base = bf16(rng.standard_normal(shape) * 0.02)
    base = np.where(rng.random(shape) < 0.1, np.float32(-0.0), base)
    models = [bf16(base + rng.standard_normal(shape) * 1e-3) for _ in range(2)]
    changed = bf16(base + rng.standard_normal(shape) * 2e-3)
    models.append(np.where(rng.random(shape) < 0.6, base, changed))
    return base, tuple(models)


def tensor_params(method, nmodels: int, seed: int = 0, **values) -> TensorParams:
    """Resolved parameters: recipe defaults, per-model values given as lists."""
    glob, per_model = {}, [{} for _ in range(nmodels)]
    for p in method.params:
        value = values.get(p.name, p.default)
        if p.scope == "global":
            glob[p.name] = p.validate(value)
        else:
            for i in range(nmodels):
                per_model[i][p.name] = p.validate(value[i] if isinstance(value, list) else value)
    return TensorParams(glob, tuple(per_model), seed)


def kernel_merge(method, base, models, params, device, block_rows=None) -> np.ndarray:
    x = device_tensor(TENSOR, base, models, block_rows, device)
    result = method.kernel(x, params)
    assert result.dtype == torch.float32 and tuple(result.shape) == (x.first.shape[0], *x.shape[1:])
    return np.concatenate(split_blocks(result, x)).reshape(np.shape(base))


def assert_same_bits(got: np.ndarray, want: np.ndarray, what) -> None:
    same = got.view(np.uint32) == want.view(np.uint32)
    same |= np.isnan(got) & np.isnan(want)  # NaN payloads are the hardware's (x86's is negative)
    assert same.all(), f"{what}: {np.count_nonzero(~same)} of {same.size} entries differ"


def check(name, base, models, values, device, block_rows=None, seed=11):
    method = get_method(name)
    params = tensor_params(method, len(models), seed, **values)
    want = merge_tensor(method, TENSOR, base, list(models), params, block_rows)
    got = kernel_merge(method, base, models, params, device, block_rows)
    assert_same_bits(got, want, (name, np.shape(base), values))


@pytest.fixture(autouse=True)
def small_host_chunks(monkeypatch):
    """Random streams drawn in many short chunks: positions must continue across chunks."""
    monkeypatch.setattr(kernels, "HOST_CHUNK", 97)


# ---------------------------------------------------------------------------------------------
# the kernels against merge_tensor


def kernel_cases():
    nan_warning = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
    for name in METHODS:
        for i, values in enumerate(cases(name)):
            dividing_by_zero = values["density"] == 0 and values.get("rescale_mode") == "inverse_density"
            yield pytest.param(name, i, id=f"{name}-{i}", marks=[nan_warning] if dividing_by_zero else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("name,case", list(kernel_cases()))
def test_kernel_matches_numpy(name, case, shape, device):
    base, models = family(shape)
    check(name, base, models, cases(name)[case], device, SHAPES[shape])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_kernel_matches_streamed_selection(name, device):
    """n > 2**19: the CPU selects top-k by sampling and streamed candidates over 13-row blocks."""
    base, models = family((1100, 512), seed=3)
    values = {"weight": [1.0, -0.5, 0.7], "density": [0.5, 0.1, 0.8], "rescale": True}
    if name.startswith("breadcrumbs"):
        values["gamma"] = [0.01, 0.05, 0.0]
    check(name, base, models, values, device, block_rows=13)


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 1], ids=str)
def test_data_has_ties_at_the_thresholds(shape):
    """The selections above cut through runs of equal magnitudes, so the tie order is tested."""
    base, models = family(shape)
    n = base.size
    ks = [_magnitude_k(0.3, n), _magnitude_k(0.1, n), *_outlier_ks(0.3, 0.05, n)]
    for m in models:
        u = np.abs(m - base).ravel().view(np.uint32)
        desc = np.sort(u)[::-1]
        split = [int(np.count_nonzero(u > desc[k - 1])) < k < int(np.count_nonzero(u >= desc[k - 1])) for k in ks]
        assert sum(split) >= 2 if n > 1000 else any(split), (shape, ks, split)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
def test_no_models_returns_base(name, device):
    base, _ = family((48, 40))
    method = get_method(name)
    params = tensor_params(method, 0)
    got = kernel_merge(method, base, [], params, device)
    assert_same_bits(got, base, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 40), (301,)], ids=str)
def test_della_rejects_what_the_cpu_rejects(shape, device, monkeypatch):
    base, models = family(shape)
    method = get_method("della")
    bad = tensor_params(method, 3, weight=1.0, density=0.1, epsilon=0.15)
    with pytest.raises(StreammergeError, match="density"):
        merge_tensor(method, TENSOR, base, list(models), bad)
    with pytest.raises(StreammergeError, match="density"):
        kernel_merge(method, base, models, bad, device)
    if len(shape) == 1:
        monkeypatch.setattr("streammerge.ops.sparsify.MAX_1D_RANKED", 300)
        ok = tensor_params(method, 3, weight=1.0, density=0.3)
        with pytest.raises(StreammergeError, match="1-D"):
            merge_tensor(method, TENSOR, base, list(models), ok)
        with pytest.raises(StreammergeError, match="1-D"):
            kernel_merge(method, base, models, ok, device)


# ---------------------------------------------------------------------------------------------
# top-k


def brute_topk(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest |values| as float32 patterns, ties by lowest flat index."""
    u = np.abs(values).ravel().view(np.uint32).astype(np.int64)
    keep = np.zeros(u.size, bool)
    keep[np.lexsort((np.arange(u.size), -u))[:k]] = True
    return keep


def topk_inputs():
    rng = np.random.default_rng(5)
    n = 4000
    yield "bf16", bf16(rng.standard_normal(n) * 1e-3)
    yield "levels", rng.integers(-3, 4, n).astype(np.float32)
    sparse = bf16(rng.standard_normal(n))
    yield "mostly-zero", np.where(rng.random(n) < 0.7, np.float32(0), sparse)
    # one value's neighbours: equal top digits, so the select narrows down to the last one
    yield "near-one", (1 + rng.integers(0, 50, n) * 2.0**-23).astype(np.float32)
    yield "patterns", rng.integers(0, 2**31, n, dtype=np.int64).astype(np.uint32).view(np.float32)  # NaN, inf, subnormal
    yield "single", np.array([-2.5], np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,values", list(topk_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_mask_exact(kind, values, device):
    n = values.size
    bits = magnitude_bits(torch.from_numpy(values).to(device))
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 5}):
        got = topk_mask(bits, k).cpu().numpy()
        assert np.array_equal(got, brute_topk(values, k)), (kind, k)


@pytest.mark.parametrize("device", DEVICES)
def test_nth_true(device):
    rng = np.random.default_rng(1)
    for density in (0.002, 0.3, 1.0):
        flags = rng.random(1000) < density
        flags[-1] = True
        where = np.flatnonzero(flags)
        on_device = torch.from_numpy(flags).to(device)
        for chunk in (1, 7, 64, 1 << 16):
            for m in sorted({1, where.size // 2 + 1, where.size}):
                assert nth_true(on_device, m, chunk) == where[m - 1], (density, chunk, m)
