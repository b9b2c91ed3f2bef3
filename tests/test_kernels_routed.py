"""The routing methods' device kernels (kernels/onebit.py, kernels/sparse.py) against the CPU
path (passes, then merge per block): arrays bit for bit, blobs byte for byte, every blocking."""

from __future__ import annotations

import pickle
from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

from streammerge.encodings import onebit
from streammerge.encodings.onebit import GROUP, tensor_scale
from streammerge.kernels import device_tensor, split_blocks
from streammerge.kernels import onebit as onebit_kernels
from streammerge.kernels.onebit import moment_sums, pairwise_rows, tensor_alpha
from streammerge.methods.base import TensorParams
from streammerge.methods.inmemory import run_passes, tensor_blocks
from streammerge.methods.mediator import mediator_expert_method
from streammerge.methods.onebit import onebit_encode_method, onebit_fallback_method

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
P = TensorParams({}, ())

PRECISIONS = {"chat": "1bit", "math": "1bit-row", "code": "sparse", "law": "dense", "med": "drop", "bio": "sparse-0.3", "geo": "2bit"}
TASKS = list(PRECISIONS)


def bf16(a) -> np.ndarray:
    return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)


def family(shape, n, seed, data):
    """base + n fine-tunes, float32. "bf16": values of a bf16 checkpoint, so task vectors repeat
    magnitudes (ties at top-k thresholds); "float32": full mantissas, so the float64 scale sums
    are inexact and their order matters. Task 1 equals the base on its first row (zero taus)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    if data == "bf16":
        base = bf16(base)
    models = []
    for t in range(n):
        m = (base + rng.standard_normal(shape) * 0.02 * (t + 1)).astype(np.float32)
        models.append(bf16(m) if data == "bf16" else m)
    if n > 1 and len(shape) >= 1:
        models[1][:1] = base[:1]
    return base, models


def cpu_path(method, base, models, block_rows):
    stats = run_passes(method, "t", base, models, P, block_rows)
    return stats, [method.merge(b, P, stats) for b in tensor_blocks("t", base, models, block_rows)]


def device_path(method, base, models, block_rows, device):
    """(per-block outputs, stats or None): a kernel returns outputs, or (outputs, stats)."""
    x = device_tensor("t", base, models, block_rows, device)
    result = method.kernel(x, P)
    outputs, stats = result if isinstance(result, tuple) else (result, None)
    return split_blocks(outputs, x), stats


def assert_same(got, want):
    """Equal bytes: blobs, and arrays' dtypes, sizes and bit patterns (-0, NaN payloads too)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, bytes):
        assert isinstance(got, bytes) and got == want
    else:
        g, w = np.ascontiguousarray(got), np.ascontiguousarray(want)
        assert g.dtype == w.dtype
        assert g.shape == w.shape or g.size == w.size == 1  # a 0-d tensor: (1,) rows vs (1, 1)
        np.testing.assert_array_equal(g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8))


def check_method(method, base, models, block_sizes, device, alpha_stats=False):
    """Outputs equal for every block size; with alpha_stats, the kernel's stats are the CPU
    passes' "<task>.alpha" (what later stages read), bit for bit."""
    for br in block_sizes:
        stats, want = cpu_path(method, base, models, br)
        got, kernel_stats = device_path(method, base, models, br, device)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
        if alpha_stats:
            assert kernel_stats == {k: v for k, v in stats.items() if k.endswith(".alpha")}
        else:
            assert kernel_stats is None


# ---------------------------------------------------------------------------------------------
# the scale sums


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_rows_is_numpy_sum(device):
    rng = np.random.default_rng(1)
    for n in [*range(140), 255, 256, 257, 1000, 1029, 4096, 14336, GROUP, GROUP + 13, 3 * GROUP - 5]:
        rows = 3 if n < 5000 else 1
        # magnitudes over many binades: every addition rounds, so any other order shows
        y = np.abs(rng.standard_normal((rows, n)) * np.exp2(rng.integers(-30, 30, (rows, n)))).astype(np.float32)
        y = y.astype(np.float64)
        got = pairwise_rows(torch.from_numpy(y).to(device)).cpu().numpy()
        np.testing.assert_array_equal(got, np.add.reduce(y, axis=1), err_msg=f"n={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0"])
def test_moment_sums_are_the_cpu_doubles(device, scale, monkeypatch):
    monkeypatch.setattr(onebit_kernels, "SUM_CHUNK", 5000)  # several row chunks
    rng = np.random.default_rng(3)
    t = (rng.standard_normal((37, 1000)) * np.exp2(rng.integers(-12, 12, (37, 1000)))).astype(np.float32)
    got = moment_sums(torch.from_numpy(t).to(device), scale)
    np.testing.assert_array_equal(got, onebit.moments(t, scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0"])
def test_tensor_alpha_is_the_pass(device, scale):
    rng = np.random.default_rng(2)
    for n in (1, 7, 1000, GROUP, 2 * GROUP + 1, 3 * GROUP - 129):
        tau = (rng.standard_normal(n) * np.exp2(rng.integers(-12, 12, n))).astype(np.float32)
        assert tensor_alpha(torch.from_numpy(tau).to(device), scale) == tensor_scale(tau, scale), n


def test_bf16_data_ties_straddle_the_threshold():
    """The premise of the "bf16" cases: the k-th largest |tau| also occurs outside the top k."""
    base, models = family((48, 20), 3, seed=9, data="bf16")
    mags = np.sort(np.abs(models[2] - base).reshape(-1))[::-1]
    k = int(0.1 * mags.size)
    assert mags[k] == mags[k - 1]


# ---------------------------------------------------------------------------------------------
# 1bit-Merging


SHAPES = [(48, 20), (33, 9), (3, 5, 7), (40, 1000), (257,), (19,), ()]


def _block_sizes(shape):
    rows = shape[0] if shape else 1
    return sorted({1 if rows <= 48 else 8, 5, 13, rows})  # 1-D: 5 and 13 cut bit blobs mid-byte


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("data", ["float32", "bf16"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "group:8"])
@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_onebit_kernels(shape, scale, granularity, data, device):
    base, models = family(shape, len(TASKS), seed=len(shape) + 7, data=data)
    enc = onebit_encode_method(TASKS, PRECISIONS, scale, granularity, 0.1, shape=shape)
    fb = onebit_fallback_method(TASKS, PRECISIONS, scale, granularity, 0.7, 0.1, shape=shape)
    check_method(enc, base, models, _block_sizes(shape), device, alpha_stats=True)
    check_method(fb, base, models, _block_sizes(shape), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 20), (19,), ()])
def test_onebit_edge_precisions(shape, device):
    """k = 0 (rho 0, and rho * n < 1), every entry kept (rho 1), all tasks dropped."""
    base, models = family(shape, 4, seed=5, data="bf16")
    for precisions in (
        {"a": "sparse-0", "b": "sparse-1", "c": "sparse-0.001", "d": "1bit-row"},
        {"a": "drop", "b": "drop", "c": "drop", "d": "drop"},
    ):
        tasks = list(precisions)
        enc = onebit_encode_method(tasks, precisions, "rms", "row", 0.1, shape=shape)
        fb = onebit_fallback_method(tasks, precisions, "absmean", "tensor", 1.0, 0.1, shape=shape)
        check_method(enc, base, models, [None, 5], device, alpha_stats=True)
        check_method(fb, base, models, [None, 5], device)


# ---------------------------------------------------------------------------------------------
# Mediator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("data", ["float32", "bf16"])
@pytest.mark.parametrize("dense_dtype", [None, "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(60, 24), (3, 5, 7), (257,), ()])
def test_mediator_experts(shape, dense_dtype, data, device):
    _, models = family(shape, 3, seed=11, data=data)  # 3 tasks: D divides by 3
    rows = shape[0] if shape else 1
    for rho in (0.1, 0.001, 1.0):
        for value_bits in (16, 8):  # bf16 values, int8 groups
            m = mediator_expert_method(["chat", "math", "code"], rho, dense_dtype=dense_dtype, value_bits=value_bits)
            check_method(m, None, models, [None, 7, max(1, rows // 4)], device)


# ---------------------------------------------------------------------------------------------
# the methods travel to dask workers by value


def test_kernels_pickle():
    cloudpickle = pytest.importorskip("cloudpickle")
    shape = (12, 10)
    base, models = family(shape, 2, seed=23, data="bf16")
    precisions = {"a": "1bit", "b": "sparse"}
    for method in (
        onebit_encode_method(["a", "b"], precisions, shape=shape),
        onebit_fallback_method(["a", "b"], precisions, shape=shape),
        mediator_expert_method(["a", "b"], 0.2, dense_dtype="bfloat16"),
        mediator_expert_method(["a", "b"], 0.2, dense_dtype="bfloat16", value_bits=8),
    ):
        want = device_path(method, base, models, 5, "cpu")
        for kernel in (cloudpickle.loads(cloudpickle.dumps(method)).kernel, pickle.loads(pickle.dumps(method.kernel))):
            got = device_path(replace(method, kernel=kernel), base, models, 5, "cpu")
            for g, w in zip(got[0], want[0]):
                assert_same(g, w)
            assert got[1] == want[1]
