"""The small shared modules under everything (issue #20): one rounding helper per backend that
agree bit for bit, one per-thread buffer pool, one row geometry."""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

from streammerge.workspace import thread_buffer
from streammerge.dtypes import float_type, round_to, round_to_torch, torch_dtype
from streammerge.geometry import block_shape, num_rows, numel, row_elems

torch = pytest.importorskip("torch")

LOGICAL = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def hard_values(seed=0):
    """float32 values with halfway cases for bf16/fp16 rounding, signed zeros, inf, nan, subnormals."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 20, 4096))).astype(np.float32)
    halfway = (rng.integers(0, 1 << 16, 512, dtype=np.uint32) << 16 | np.uint32(0x8000)).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 65504.0, 65520.0, 3.4e38], np.float32)
    return np.concatenate([x, halfway[np.isfinite(halfway)], special])


def assert_same_bits(got, want):
    """Equal bit patterns, NaN compared as NaN (its payload is not part of the contract)."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_rounding_numpy_and_torch_agree_bit_for_bit(name):
    x = hard_values()
    with np.errstate(over="ignore"):  # fp16 overflows to inf, as it should
        want = x.astype(LOGICAL[name]).astype(np.float32)  # ml_dtypes / numpy: nearest even
        got = round_to(x, float_type(name))
    assert got.dtype == np.float32
    assert_same_bits(got, want)
    assert_same_bits(round_to_torch(torch.from_numpy(x.copy()), name).numpy(), want)


def test_torch_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16 and torch_dtype("float32") is torch.float32
    with pytest.raises(KeyError):
        torch_dtype("int8")


def test_thread_buffer_reuses_per_key_dtype_and_thread():
    a = thread_buffer(("test", "a"), 100)
    a[:] = 7
    again = thread_buffer(("test", "a"), 50)
    assert np.shares_memory(a, again) and again.shape == (50,) and (again == 7).all()
    assert not np.shares_memory(a, thread_buffer(("test", "b"), 100))
    assert not np.shares_memory(a, thread_buffer(("test", "a"), 100, np.float64))
    for spelling in (np.dtype(np.float32), "float32", "<f4"):  # one buffer, however the dtype is named
        assert np.shares_memory(a, thread_buffer(("test", "a"), 100, spelling))
    bigger = thread_buffer(("test", "a"), 1000)
    assert bigger.shape == (1000,) and thread_buffer(("test", "a"), 10).base is bigger.base
    small = thread_buffer(("test", "c"), 3, at_least=64)
    assert np.shares_memory(small, thread_buffer(("test", "c"), 64)), "allocated at 64 elements"
    assert all(b.ctypes.data % 4096 == 0 for b in (a, bigger, small)), "page-aligned (O_DIRECT)"
    other = []
    t = threading.Thread(target=lambda: other.append(thread_buffer(("test", "a"), 100)))
    t.start()
    t.join()
    assert not np.shares_memory(other[0], thread_buffer(("test", "a"), 100))


def test_numel_is_exact_past_int64():
    assert numel((2**40, 2**40)) == 2**80 and type(numel((3, 4))) is int


@pytest.mark.parametrize("shape", [(), (7,), (5, 3), (4, 3, 2), (0, 6)])
def test_row_geometry_matches_the_engine_row_view(shape):
    a = np.empty(shape)
    rows = a.reshape(1) if a.ndim == 0 else a  # the engine's view: 0-d is one row of one element
    assert numel(shape) == rows.size and num_rows(shape) == rows.shape[0]
    assert numel(tuple(np.int64(d) for d in shape)) == rows.size  # numpy integers in a shape
    assert row_elems(shape) == (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    assert block_shape(shape, 0, num_rows(shape)) == rows.shape
    if len(shape) >= 1 and shape[0] >= 2:
        assert block_shape(shape, 1, 2) == rows[1:2].shape


# ---- the engine's conversions (dtypes.to_float32 / float32_into), against ml_dtypes' casts ----


def test_bf16_widening_is_ml_dtypes_cast_for_every_pattern():
    from streammerge.dtypes import BF16, to_float32

    raw = np.arange(1 << 16, dtype=np.uint16)
    want = raw.view(ml_dtypes.bfloat16).astype(np.float32)
    got = to_float32(raw, BF16, np.full(raw.shape, 7, np.float32))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads too


def bf16_rounding_cases():
    """Every sign/exponent/top-mantissa pattern (all 65536 high halves) with the low halves that
    decide rounding: exact, just above, halfway (odd and even kept bit), just below, the largest."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000], np.uint32)
    return (high[:, None] | low[None, :]).reshape(-1).view(np.float32)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_float32_into_rounds_as_ml_dtypes(name):
    from streammerge.dtypes import float32_into, from_float32

    ftype = float_type(name)
    x = bf16_rounding_cases() if name == "bfloat16" else hard_values()
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(LOGICAL[name])
    want_bits = want.view(ftype.storage)
    nan = np.isnan(want)
    dest = np.zeros(x.size, ftype.storage)
    with np.errstate(over="ignore"):  # fp16 overflows to inf, as it should
        got = float32_into(x, ftype, dest)
        from_f32 = from_float32(x, ftype)
    assert got is dest
    assert np.array_equal(got[~nan], want_bits[~nan])
    assert np.isnan(got.view(LOGICAL[name])[nan]).all()
    if name == "bfloat16":  # NaN keeps its sign and becomes the quiet NaN, as ml_dtypes makes it
        assert nan.sum() > 1000 and np.array_equal(got[nan], want_bits[nan])
    bits = want_bits.view(np.uint16)
    assert np.array_equal(from_f32.view(np.uint16)[~nan], bits[~nan])
    shaped = np.zeros((x.size // 2, 2), ftype.storage)  # any shapes with as many elements
    with np.errstate(over="ignore"):
        float32_into(x, ftype, shaped)
    assert np.array_equal(shaped.reshape(-1).view(np.uint16)[~nan], bits[~nan])


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_float32_into_finite_says_whether_every_value_was(name):
    """What the engine checks a row group's result with: the same bits as float32_into, and
    False exactly when a value is NaN or +-Inf, wherever it is (first or last element of a
    rounding slice)."""
    from streammerge.dtypes import _ROUND_SLICE, float32_into, float32_into_finite

    ftype = float_type(name)
    x = np.random.default_rng(3).standard_normal(2 * _ROUND_SLICE + 5).astype(np.float32)
    for at, bad in [(None, 0), (0, np.inf), (_ROUND_SLICE - 1, -np.inf), (_ROUND_SLICE, np.nan), (x.size - 1, np.nan)]:
        y = x.copy()
        if at is not None:
            y[at] = bad
        dest = np.zeros(y.size, ftype.storage)
        assert float32_into_finite(y, ftype, dest) is (at is None)
        assert np.array_equal(dest.view(np.uint8), float32_into(y, ftype, np.ones(y.size, ftype.storage)).view(np.uint8))
