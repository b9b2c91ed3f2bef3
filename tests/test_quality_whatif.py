"""tools/quality/whatif.py's simulated 1-bit variants against independent computations: the
per-group rms encoding (numpy, entry by entry) and its byte count (the pieces counted one by
one); at one group per row it is the real encoder's 1bit-row rms reconstruction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
torch = pytest.importorskip("torch")

from quality.whatif import group_rms_hat, group_scale_bytes, rowcol_rms_hat, rowcol_scale_bytes  # noqa: E402
from streammerge.encodings import onebit  # noqa: E402


def ref_group_hat(tau: np.ndarray, group: int) -> np.ndarray:
    t2 = tau.reshape(tau.shape[0], -1) if tau.ndim >= 2 else tau.reshape(1, -1)
    g = group if tau.ndim >= 2 else t2.shape[1]
    out = np.empty(t2.shape, np.float32)
    for r in range(t2.shape[0]):
        for c0 in range(0, t2.shape[1], g):
            part = t2[r, c0 : c0 + g].astype(np.float64)
            a = np.float32(np.sqrt(np.mean(part * part)))
            out[r, c0 : c0 + g] = np.where(part >= 0, a, -a)
    return out.reshape(tau.shape)


@pytest.mark.parametrize("shape", [(6, 40), (5, 3, 7), (9, 64), (33,), ()])
@pytest.mark.parametrize("group", [1, 8, 16, 64])
def test_group_rms_hat_is_the_numpy_formula(shape, group):
    rng = np.random.default_rng(len(shape) + group)
    tau = np.asarray(rng.standard_t(3, size=shape) * 1e-3, dtype=np.float32)
    if tau.size > 3:
        tau.reshape(-1)[:3] = 0.0  # zeros count as +
    got = group_rms_hat(torch.from_numpy(tau.copy()), group).numpy()
    np.testing.assert_allclose(got, ref_group_hat(tau, group), rtol=1e-6, atol=0)


def test_one_group_per_row_is_the_encoders_row_scale():
    rng = np.random.default_rng(1)
    tau = (rng.standard_normal((12, 50)) * 1e-2).astype(np.float32)
    want = onebit.reconstruct_task("1bit-row", tau.shape, 12, bits=onebit.pack_signs(tau), scale=onebit.row_scales(tau, "rms"))
    np.testing.assert_array_equal(group_rms_hat(torch.from_numpy(tau), 50).numpy(), want)


@pytest.mark.parametrize("shape,group", [((6, 40), 16), ((5, 3, 7), 8), ((4, 64), 64), ((33,), 16), ((), 16)])
def test_group_scale_bytes_counts_each_piece(shape, group):
    if len(shape) >= 2:
        cols = int(np.prod(shape[1:]))
        bits = sum(len(np.packbits(np.zeros(cols, bool))) for _ in range(shape[0]))
        scales = sum(4 for _ in range(shape[0]) for _ in range(0, cols, group))
    else:
        n = int(np.prod(shape))
        bits, scales = len(np.packbits(np.zeros(n, bool))), 4
    assert group_scale_bytes(shape, group) == bits + scales


@pytest.mark.parametrize("shape", [(6, 40), (5, 3, 7), (33,)])
def test_rowcol_rms_hat_is_the_numpy_formula(shape):
    rng = np.random.default_rng(7)
    tau = (rng.standard_normal(shape) * rng.uniform(0.1, 3, shape[-1]) * 1e-3).astype(np.float32)
    got = rowcol_rms_hat(torch.from_numpy(tau.copy())).numpy()
    if tau.ndim < 2:
        want = ref_group_hat(tau, tau.size)
    else:
        t2 = tau.reshape(shape[0], -1).astype(np.float64)
        b = np.array([np.sqrt(np.mean(t2[:, c] ** 2)) for c in range(t2.shape[1])])
        a = np.array([np.linalg.norm(t2[r]) / np.linalg.norm(b) for r in range(t2.shape[0])])
        want = (np.outer(a, b) * np.where(t2 >= 0, 1, -1)).reshape(shape)
        # each row keeps its norm
        np.testing.assert_allclose(np.linalg.norm(got.reshape(shape[0], -1), axis=1), np.linalg.norm(t2, axis=1), rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_rowcol_with_equal_columns_is_the_row_scale():
    rng = np.random.default_rng(3)
    s = np.where(rng.standard_normal((8, 16)) >= 0, 1.0, -1.0)
    tau = (s * rng.uniform(0.5, 2, (8, 1)) * 1e-3).astype(np.float32)  # |tau| constant along each row
    b = rowcol_rms_hat(torch.from_numpy(tau)).numpy()
    np.testing.assert_allclose(b, onebit.row_scales(tau, "rms")[:, None] * s, rtol=1e-6)


@pytest.mark.parametrize("shape", [(6, 40), (5, 3, 7), (33,), ()])
def test_rowcol_scale_bytes_counts_each_piece(shape):
    if len(shape) >= 2:
        rows, cols = shape[0], int(np.prod(shape[1:]))
        want = rows * len(np.packbits(np.zeros(cols, bool))) + 4 * rows + 4 * cols
    else:
        want = len(np.packbits(np.zeros(int(np.prod(shape)), bool))) + 4
    assert rowcol_scale_bytes(shape) == want
