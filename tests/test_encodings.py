"""1-bit task vectors, sparse top-rho blobs, 1bit-Merging's fallback and dynamic merge, Mediator's
experts: formats round-trip, scales and selections equal brute force, results do not depend
on the row blocks."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest

from streammerge.encodings import onebit, sparse
from streammerge.encodings.onebit import (
    dynamic_merge_block,
    fallback_merge_block,
    onebit_outputs,
    pack_signs,
    pack_signs_flat,
    reconstruct_from_outputs,
    row_scales,
    tensor_scale,
    unpack_signs,
    unpack_signs_flat,
)
from streammerge.encodings.sparse import (
    apply_sparse,
    decode_sparse,
    dequantize_int8,
    encode_sparse,
    expert_block,
    expert_outputs,
)
from streammerge.methods.base import Block, TensorParams
from streammerge.methods.mediator import mediator_expert_method
from streammerge.methods.onebit import onebit_encode_method, onebit_fallback_method

P = TensorParams({}, ())


def bf16_round(x):
    """float32 -> nearest-even bfloat16 -> float32, by ml_dtypes (the reference rounding)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# an engine in miniature: row blocks as the engine cuts them, passes, then merge per block


def _blocks(name, shape, base, models, block_rows):
    shape = tuple(shape)
    rows = shape[0] if len(shape) >= 1 else 1
    re = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    for r0 in range(0, max(rows, 1), block_rows):
        r1 = min(rows, r0 + block_rows)
        bshape = (r1 - r0, *shape[1:]) if len(shape) >= 1 else (1,)

        def cut(a):
            return np.ascontiguousarray(np.asarray(a, np.float32).reshape(-1)[r0 * re : r1 * re].reshape(bshape))

        yield r0, r1, Block(name, shape, r0 * re, None if base is None else cut(base), tuple(cut(m) for m in models))


def run(method, shape, base, models, block_rows):
    """(stats, [(r0, r1, merge result)])"""
    stats: dict = {}
    for p in method.passes:
        if not p.needed(P, stats):
            continue
        partials = [p.map(b, P, stats) for _, _, b in _blocks("t", shape, base, models, block_rows)]
        stats = {**stats, **p.reduce(partials, P, stats)}
    res = [(r0, r1, method.merge(b, P, stats)) for r0, r1, b in _blocks("t", shape, base, models, block_rows)]
    return stats, res


def concat(res, shape):
    out = np.concatenate([np.asarray(r).reshape(-1) for _, _, r in res])
    return out.reshape(shape)


def family(shape, n=3, seed=0, ties=False, zeros=0.0):
    """base + n fine-tunes, float32; ties: task vectors on a coarse grid (many equal magnitudes)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(rng.standard_normal(shape), dtype=np.float32)
    models = []
    for t in range(n):
        if ties:
            tau = np.asarray(rng.integers(-6, 7, size=shape) * 0.125, dtype=np.float32)
        else:
            tau = np.asarray(rng.standard_normal(shape) * (0.01 * (t + 1)), dtype=np.float32)
        if zeros:
            tau[rng.random(shape) < zeros] = 0
        models.append(np.asarray(base + tau, dtype=np.float32))
    return base, models


def taus_of(base, models):
    return [np.asarray(m - base, dtype=np.float32) for m in models]


def topk_ref(x: np.ndarray, k: int) -> np.ndarray:
    """flat indices of the k largest |x|, ties by lowest flat index (brute force)."""
    f = np.abs(x.reshape(-1).astype(np.float32))
    order = np.lexsort((np.arange(f.size), -f.astype(np.float64)))
    return np.sort(order[:k])


def as2d(a, shape):
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) >= 2 else None
    return a.reshape(-1, cols) if cols else a.reshape(1, -1)


def ref_scale(tau, scale, axis=None):
    t = tau.astype(np.float64)
    a, r = np.mean(np.abs(t), axis=axis), np.sqrt(np.mean(t * t, axis=axis))
    if scale == "absmean":
        v = a
    elif scale == "rms":
        v = r
    else:  # pow:<g>: absmean * (rms / absmean)^g, 0 where all entries are 0
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(a > 0, a * (r / a) ** float(scale[4:]), 0.0)
    return np.float32(v) if axis is None else v.astype(np.float32)


def ref_tau_hat(kind, tau, scale="absmean", rho=0.1):
    shape = tau.shape
    if kind == "drop":
        return None
    if kind == "1bit":
        return (ref_scale(tau, scale) * np.where(tau >= 0, 1, -1)).astype(np.float32)
    if kind == "1bit-row":
        if tau.ndim <= 1:
            return ref_tau_hat("1bit", tau, scale)
        t2 = as2d(tau, shape)
        a = ref_scale(t2, scale, axis=1)[:, None]
        return (a * np.where(t2 >= 0, 1, -1)).astype(np.float32).reshape(shape)
    if kind == "2bit":  # the greedy residual fit, then (rms) each row rescaled to its norm
        if tau.ndim <= 1:
            return ref_tau_hat("1bit", tau, scale)
        t2 = as2d(tau, shape).astype(np.float32)
        s1 = np.where(t2 >= 0, 1, -1).astype(np.float32)
        a1 = ref_scale(t2, "absmean", axis=1)[:, None]
        r = (t2 - a1 * s1).astype(np.float32)
        s2 = np.where(r >= 0, 1, -1).astype(np.float32)
        a2 = ref_scale(r, "absmean", axis=1)[:, None]
        fit = a1.astype(np.float64) * s1 + a2.astype(np.float64) * s2
        if scale != "absmean":  # rms: the row's norm; pow:<g>: that factor to the power g
            q_fit = np.sqrt(np.mean(fit * fit, axis=1, keepdims=True))
            f = np.where(q_fit > 0, ref_scale(t2, "rms", axis=1)[:, None] / np.where(q_fit > 0, q_fit, 1), 1)
            fit *= f ** (1.0 if scale == "rms" else float(scale[4:]))
        return fit.astype(np.float32).reshape(shape)
    if kind == "sparse":
        n = tau.size
        idx = topk_ref(tau, int(rho * n))
        h = np.zeros(n, np.float32)
        h[idx] = bf16_round(tau.reshape(-1)[idx])
        return h.reshape(shape)
    if kind == "dense":
        return bf16_round(tau)
    raise AssertionError(kind)


def ref_ties(hats):
    hats = [h for h in hats if h is not None]
    if not hats:
        return None
    s = hats[0].copy()
    for h in hats[1:]:
        s = (s + h).astype(np.float32)
    el = np.where(s >= 0, 1, -1).astype(np.float32)
    num = np.zeros_like(s)
    cnt = np.zeros_like(s)
    for h in hats:
        agree = np.sign(h) == el
        num = (num + np.where(agree, h, 0)).astype(np.float32)
        cnt = cnt + agree
    return (num / np.maximum(cnt, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# sign bits


@pytest.mark.parametrize("shape", [(5, 8), (3, 13), (1, 1), (7, 1), (4, 3, 5), (2, 17), (6, 64)])
def test_pack_roundtrip(shape):
    rng = np.random.default_rng(1)
    t = rng.standard_normal(shape).astype(np.float32)
    t.reshape(-1)[::3] = 0.0
    t.reshape(-1)[1::7] = -0.0
    t2 = as2d(t, shape) if len(shape) >= 2 else t.reshape(-1, 1)
    bits = pack_signs(t2)
    assert bits.dtype == np.uint8 and bits.shape == (t2.shape[0], -(-t2.shape[1] // 8))
    s = unpack_signs(bits, t2.shape[1])
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, np.where(t2 >= 0, 1.0, -1.0))  # zeros (and -0) are +1
    # padding bits are zero; bit c%8 of byte c//8
    assert bits[0, 0] & 1 == (t2[0, 0] >= 0)
    if t2.shape[1] % 8:
        pad = bits[:, -1] >> (t2.shape[1] % 8)
        assert not pad.any()


@pytest.mark.parametrize("n", [1, 5, 8, 9, 16, 37])
def test_pack_flat_roundtrip(n):
    t = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    t[::4] = 0
    blob = pack_signs_flat(t)
    assert isinstance(blob, bytes) and len(blob) == -(-n // 8)
    np.testing.assert_array_equal(unpack_signs_flat(blob, n), np.where(t >= 0, 1.0, -1.0))
    with pytest.raises(ValueError):
        unpack_signs_flat(blob + b"\0", n)


def test_nan_sign_is_negative():
    s = unpack_signs(pack_signs(np.array([[np.nan, 0.0, -0.0, -1e-30]], np.float32)), 4)
    np.testing.assert_array_equal(s, [[-1, 1, 1, -1]])


# ---------------------------------------------------------------------------------------------
# scales


@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0", "pow:0.5"])
@pytest.mark.parametrize("shape", [(37, 29), (300,), (5, 4, 6)])
def test_scales_brute_force_and_bounds(scale, shape):
    base, models = family(shape, n=1, seed=3, zeros=0.1)
    tau = taus_of(base, models)[0]
    n = tau.size
    a = tensor_scale(tau, scale)
    np.testing.assert_allclose(a, ref_scale(tau, scale), rtol=2e-7)
    # through the streamed pass: the same float32 alpha, bitwise, for any row blocking
    rows = shape[0]
    for br in (1, 3, 7, rows):
        stats, res = run(onebit_encode_method(["a"], {"a": "1bit"}, scale), shape, base, models, br)
        assert stats["a.alpha"] == a
    s = np.where(tau >= 0, 1.0, -1.0)
    t64, s64 = tau.astype(np.float64), s.astype(np.float64)
    err = lambda c: float(np.sum((t64 - c * s64) ** 2))  # noqa: E731
    if scale == "absmean":
        # the least-squares scale: no other c does better; its error is ||tau||^2 - n alpha^2
        for c in (0.0, 0.5 * a, 0.9 * a, 0.999 * a, 1.001 * a, 1.1 * a, 2 * a):
            assert err(a) <= err(c) * (1 + 1e-9)
        np.testing.assert_allclose(err(a), np.sum(t64**2) - n * float(a) ** 2, rtol=1e-5)
    elif scale == "rms":
        np.testing.assert_allclose(np.linalg.norm(a * s64), np.linalg.norm(t64), rtol=1e-6)
    elif scale == "pow:2.0":  # tau_hat projects onto tau as tau itself
        np.testing.assert_allclose(np.sum(a * s64 * t64), np.sum(t64 * t64), rtol=1e-6)
    else:  # between absmean and rms
        assert ref_scale(tau, "absmean") < a < ref_scale(tau, "rms")
    # per row
    if len(shape) >= 2:
        t2 = as2d(tau, shape)
        rs = row_scales(t2, scale)
        np.testing.assert_allclose(rs, ref_scale(t2, scale, axis=1), rtol=2e-7)
        for r in range(0, t2.shape[0], 5):
            e = lambda c: float(np.sum((t2[r].astype(np.float64) - c * np.where(t2[r] >= 0, 1.0, -1.0)) ** 2))  # noqa: E731
            if scale == "absmean":
                assert all(e(rs[r]) <= e(c) * (1 + 1e-9) for c in (0.9 * rs[r], 1.1 * rs[r]))
            elif scale == "rms":
                np.testing.assert_allclose(rs[r] * np.sqrt(t2.shape[1]), np.linalg.norm(t2[r]), rtol=1e-6)


def test_alpha_exact_across_group_boundaries(monkeypatch):
    """Small GROUP: blocks cut groups in every way; alpha stays bit-identical."""
    monkeypatch.setattr(onebit, "GROUP", 16)
    shape = (41, 7)
    base, models = family(shape, n=2, seed=5)
    tau = taus_of(base, models)
    want = [tensor_scale(t, "rms") for t in tau]
    for br in (1, 2, 3, 5, 16, 41):
        stats, _ = run(onebit_encode_method(["a", "b"], {"a": "1bit", "b": "1bit"}, "rms"), shape, base, models, br)
        assert [stats["a.alpha"], stats["b.alpha"]] == want
    np.testing.assert_allclose(want, [ref_scale(t, "rms") for t in tau], rtol=2e-7)


# ---------------------------------------------------------------------------------------------
# sparse blobs


def _dense_of(off, val, size):
    """Brute-force reference: the block as a dense float32 vector with the entries set."""
    d = np.zeros(size, np.float32)
    d[off] = val
    return d


def _blob_v2(count, layout, size, positions: bytes, values: bytes, reserved=0, version=2, code=1) -> bytes:
    """A version-2 blob put together field by field from the documented layout."""
    return struct.pack("<4sHHIHHI", b"SMSP", version, code, count, layout, reserved, size) + positions + values


def _blob_v1(off, val) -> bytes:
    """A version-1 blob (12-byte header, int32 offsets, bf16 values), as older stores hold."""
    head = struct.pack("<4sHHI", b"SMSP", 1, 1, len(off))
    return head + np.asarray(off, "<i4").tobytes() + bf16_bits(val).tobytes()


def bf16_bits(val) -> np.ndarray:
    return np.asarray(val, np.float32).astype(ml_dtypes.bfloat16).view("<u2")


@pytest.mark.parametrize("size,count", [(1000, 0), (1000, 1), (1000, 31), (1000, 32), (1000, 50), (1000, 500), (1000, 1000), (13, 5), (1, 1)])
def test_sparse_blob_roundtrip(size, count):
    rng = np.random.default_rng(size + count)
    off = np.sort(rng.choice(size, count, replace=False))
    val = rng.standard_normal(count).astype(np.float32)
    blob = encode_sparse(off, val, size)
    # the smaller of the two layouts, as documented: bitmask iff ceil(size / 8) < 4 * count
    mask_bytes, off_bytes = -(-size // 8), 4 * count
    layout = 1 if mask_bytes < off_bytes else 0
    assert len(blob) == 20 + min(mask_bytes, off_bytes) + 2 * count
    assert struct.unpack("<4sHHIHHI", blob[:20]) == (b"SMSP", 2, 1, count, layout, 0, size)
    if layout == 1:  # positions are np.packbits(little) of the kept mask
        keep = np.zeros(size, bool)
        keep[off] = True
        assert blob[20 : 20 + mask_bytes] == np.packbits(keep, bitorder="little").tobytes()
    else:
        assert blob[20 : 20 + off_bytes] == off.astype("<i4").tobytes()
    assert blob[len(blob) - 2 * count :] == bf16_bits(val).tobytes()
    assert sparse.sparse_count(blob) == count
    o, v = decode_sparse(blob, size=size)
    assert o.dtype == np.int64 and v.dtype == np.float32
    np.testing.assert_array_equal(o, off)
    np.testing.assert_array_equal(_dense_of(o, v, size), _dense_of(off, bf16_round(val), size))
    np.testing.assert_allclose(v, val, rtol=2**-8)
    np.testing.assert_array_equal(decode_sparse(blob)[0], off)  # the blob records its size
    # apply: scatter-add, with a scale, into a block of any shape with that many elements
    blk = np.ones((size,), np.float32).reshape(-1, 1) if size % 10 else np.ones((10, size // 10), np.float32)
    apply_sparse(blk, blob, 0.5)
    want = np.ones(size, np.float32) + _dense_of(off, bf16_round(val), size) * np.float32(0.5)
    np.testing.assert_array_equal(blk.reshape(-1), want)


@pytest.mark.parametrize("size", [64, 65, 71, 72])
def test_sparse_blob_layout_crossover(size):
    """Offsets cost 4 bytes per entry, the bitmask ceil(size / 8) bytes: the encoder switches to
    the bitmask at the first count where it is strictly smaller, and every count round-trips."""
    mask_bytes = -(-size // 8)
    first = mask_bytes // 4 + 1  # smallest count with 4 * count > mask_bytes
    for count in range(0, min(size, first + 3) + 1):
        off = np.arange(count) * (size // max(count, 1))
        blob = encode_sparse(off, np.arange(1, count + 1, dtype=np.float32), size)
        layout = struct.unpack("<H", blob[12:14])[0]
        assert layout == (1 if count >= first else 0), (count, layout)
        assert len(blob) == 20 + min(mask_bytes, 4 * count) + 2 * count
        np.testing.assert_array_equal(decode_sparse(blob, size=size)[0], off)


def test_sparse_blob_v1_still_decodes():
    """Stores written before the bitmask hold version-1 blobs: they decode and apply as before."""
    rng = np.random.default_rng(3)
    off = np.sort(rng.choice(1000, 50, replace=False))
    val = rng.standard_normal(50).astype(np.float32)
    blob = _blob_v1(off, val)
    assert sparse.sparse_count(blob) == 50
    o, v = decode_sparse(blob, size=1000)
    np.testing.assert_array_equal(o, off)
    np.testing.assert_array_equal(v, bf16_round(val))
    blk = np.zeros((10, 100), np.float32)
    apply_sparse(blk, blob, 2.0)
    np.testing.assert_array_equal(blk.reshape(-1), _dense_of(off, bf16_round(val) * np.float32(2), 1000))
    assert decode_sparse(_blob_v1([], []))[0].size == 0
    with pytest.raises(ValueError, match="outside"):
        decode_sparse(blob, size=int(off[-1]))


def test_sparse_blob_rejects_malformed():
    one = bf16_bits(np.ones(3)).tobytes()
    good_v1 = _blob_v1([1, 5, 9], np.ones(3))
    good_off = encode_sparse(np.array([1, 5, 9]), np.ones(3, np.float32), 100)  # offsets: 12 < 13 bytes
    good_mask = encode_sparse(np.array([1, 5, 9]), np.ones(3, np.float32), 16)  # bitmask: 2 < 12 bytes
    assert struct.unpack("<H", good_off[12:14])[0] == 0 and struct.unpack("<H", good_mask[12:14])[0] == 1
    mask = np.packbits(np.isin(np.arange(16), [1, 5, 9]), bitorder="little").tobytes()
    bad = [
        b"",
        good_v1[:11],
        good_v1[:-1],
        good_v1 + b"\0",
        b"XXXX" + good_v1[4:],
        good_v1[:4] + (3).to_bytes(2, "little") + good_v1[6:],  # version
        good_v1[:6] + (7).to_bytes(2, "little") + good_v1[8:],  # value code
        good_v1[:8] + (4).to_bytes(4, "little") + good_v1[12:],  # count
        _blob_v1([5, 1, 9], np.ones(3)),  # unsorted
        _blob_v1([-1, 5, 9], np.ones(3)),  # negative
        _blob_v1([1, 1, 9], np.ones(3)),  # repeated
        # version 2
        good_off[:19],  # shorter than the header
        good_off[:-1],
        good_off + b"\0",
        good_mask[:-1],
        good_mask + b"\0",
        _blob_v2(3, 2, 100, np.array([1, 5, 9], "<i4").tobytes(), one),  # layout
        _blob_v2(3, 0, 100, np.array([1, 5, 9], "<i4").tobytes(), one, reserved=1),
        _blob_v2(3, 0, 100, np.array([1, 5, 9], "<i4").tobytes(), one, code=2),
        _blob_v2(3, 0, 2**31, np.array([1, 5, 9], "<i4").tobytes(), one),  # block too large
        _blob_v2(3, 0, 2, np.array([1, 5, 9], "<i4").tobytes(), one),  # more entries than elements
        _blob_v2(3, 0, 9, np.array([1, 5, 9], "<i4").tobytes(), one),  # offset 9 outside 9 elements
        _blob_v2(3, 0, 100, np.array([5, 1, 9], "<i4").tobytes(), one),  # unsorted
        _blob_v2(3, 0, 100, np.array([-1, 5, 9], "<i4").tobytes(), one),  # negative
        _blob_v2(3, 0, 100, np.array([1, 1, 9], "<i4").tobytes(), one),  # repeated
        _blob_v2(3, 1, 16, bytes([mask[0] | 1, mask[1]]), one),  # 4 bits set, count 3
        _blob_v2(3, 1, 16, bytes([mask[0] & ~2, mask[1]]), one),  # 2 bits set, count 3
        _blob_v2(3, 1, 12, bytes([0b00100010, 0b00010000]), one),  # bits 1, 5, 12: one past 12 elements
        _blob_v2(2**31, 1, 16, mask, one),  # count past the block
    ]
    for i, b in enumerate(bad):
        with pytest.raises(ValueError):
            decode_sparse(b)
            pytest.fail(f"bad blob {i} decoded")
    with pytest.raises(ValueError):
        decode_sparse(good_v1, size=9)  # offset 9 outside a 9-element block
    for g in (good_off, good_mask):
        with pytest.raises(ValueError, match="block of"):
            decode_sparse(g, size=99)  # a version-2 blob is for one block size
        with pytest.raises(ValueError):
            apply_sparse(np.zeros(5, np.float32), g)
    with pytest.raises(ValueError):
        decode_sparse("not bytes")
    with pytest.raises(ValueError):
        encode_sparse(np.array([3, 2]), np.ones(2, np.float32), 10)
    with pytest.raises(ValueError):
        encode_sparse(np.array([1, 2]), np.ones(3, np.float32), 10)
    with pytest.raises(ValueError):
        encode_sparse(np.array([1, 10]), np.ones(2, np.float32), 10)  # offset outside the block
    with pytest.raises(ValueError):
        encode_sparse(np.array([1]), np.ones(1, np.float32), 2**31)
    with pytest.raises(ValueError):
        apply_sparse(np.zeros(5, np.float32), good_v1)


def _int8_reference(val):
    """(scales, codes, per-value scales, decoded) of values in groups of 64, group by group from
    the documented formulas: scale = absmax / 127 and q = round-half-even(v / scale), in float32;
    decoded = bf16(scale * q)."""
    val = np.asarray(val, np.float32)
    scales, codes = [], []
    for g0 in range(0, val.size, 64):
        grp = val[g0 : g0 + 64]
        s = np.float32(np.abs(grp).max()) / np.float32(127)
        q = np.zeros(grp.size, np.int64) if s == 0 else np.array([round(float(x / s)) for x in grp], np.int64)
        scales.append(s)
        codes.append(q)
    scales = np.asarray(scales, np.float32)
    q = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    per_value = np.repeat(scales, 64)[: val.size]
    return scales, q, per_value, bf16_round(per_value * q.astype(np.float32))


@pytest.mark.parametrize("size,count", [(1000, 0), (1000, 1), (1000, 63), (1000, 64), (1000, 65), (1000, 500), (1000, 1000), (13, 5)])
def test_sparse_blob_int8_roundtrip(size, count):
    """value_bits 8: the header's value code 2, float32 scales (absmax / 127 per 64 values in
    offset order) then int8 codes within scale / 2 of each value; decoded as bf16(scale * q)."""
    rng = np.random.default_rng(size + count)
    off = np.sort(rng.choice(size, count, replace=False))
    # magnitudes that differ by orders between groups (task-vector deltas are small), a zero group
    val = (rng.standard_normal(count) * 10.0 ** rng.integers(-7, 1, size=count)).astype(np.float32)
    val[64:128] = 0
    blob = encode_sparse(off, val, size, value_bits=8)
    mask_bytes, off_bytes, groups = -(-size // 8), 4 * count, -(-count // 64)
    layout = 1 if mask_bytes < off_bytes else 0
    assert len(blob) == 20 + min(mask_bytes, off_bytes) + 4 * groups + count
    assert struct.unpack("<4sHHIHHI", blob[:20]) == (b"SMSP", 2, 2, count, layout, 0, size)
    assert blob[20 : 20 + min(mask_bytes, off_bytes)] == encode_sparse(off, val, size)[20 : 20 + min(mask_bytes, off_bytes)]
    at = 20 + min(mask_bytes, off_bytes)
    scales = np.frombuffer(blob, "<f4", groups, at)
    q = np.frombuffer(blob, np.int8, count, at + 4 * groups).astype(np.int64)
    ref_scales, ref_q, per_value, ref_decoded = _int8_reference(val)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(q, ref_q)
    # round to nearest: within half a step of the value
    assert np.all(np.abs(per_value.astype(np.float64) * q - val) <= per_value.astype(np.float64) / 2 * (1 + 1e-6))
    assert np.all(np.abs(q) <= 127)
    o, v = decode_sparse(blob, size=size)
    assert o.dtype == np.int64 and v.dtype == np.float32
    np.testing.assert_array_equal(o, off)
    np.testing.assert_array_equal(v, bf16_round(per_value * q.astype(np.float32)))
    np.testing.assert_array_equal(v, bf16_round(v))  # bf16 numbers, as every reader keeps them
    np.testing.assert_array_equal(v, ref_decoded)
    # error per value: half a step, then the bf16 rounding of the product
    assert np.all(np.abs(v - val) <= per_value / 2 * (1 + 1e-6) + np.abs(v) * 2**-8)
    assert sparse.sparse_count(blob) == count
    blk = np.ones((size,), np.float32)
    apply_sparse(blk, blob, 0.5)
    np.testing.assert_array_equal(blk, np.ones(size, np.float32) + _dense_of(off, v, size) * np.float32(0.5))


@pytest.mark.parametrize("value_bits,size,count", [(8, 1000, 130), (8, 13, 5), (8, 100, 0), (16, 1000, 130), (16, 100, 2)])
def test_sparse_blob_codes_as_stored(value_bits, size, count):
    """decode_sparse_codes gives the blob's fields as stored, read back independently from its
    bytes: int8 groups as their float32 scales and int8 codes, whose dequantised values are
    decode_sparse's; bf16 values as float32 (no scales). The offsets are decode_sparse's."""
    rng = np.random.default_rng(count)
    off = np.sort(rng.choice(size, count, replace=False))
    val = (rng.standard_normal(count) * 1e-3).astype(np.float32)
    blob = encode_sparse(off, val, size, value_bits=value_bits)
    o, scales, values = sparse.decode_sparse_codes(blob)
    want_off, want_val = decode_sparse(blob)
    np.testing.assert_array_equal(o, want_off)
    if value_bits == 16:
        assert scales is None
        np.testing.assert_array_equal(values, want_val)
        return
    groups = -(-count // 64)
    at = len(blob) - count - 4 * groups
    assert scales.dtype == np.float32 and values.dtype == np.int8
    np.testing.assert_array_equal(scales, np.frombuffer(blob, "<f4", groups, at))
    np.testing.assert_array_equal(values, np.frombuffer(blob, np.int8, count, at + 4 * groups))
    np.testing.assert_array_equal(dequantize_int8(scales, values), want_val)


def test_sparse_blob_bf16_unchanged_by_value_bits():
    """value_bits 16 (the default) writes the bf16 blob of before: value code 1, 2 bytes a value."""
    rng = np.random.default_rng(5)
    off = np.sort(rng.choice(500, 200, replace=False))
    val = rng.standard_normal(200).astype(np.float32)
    blob = encode_sparse(off, val, 500)
    assert encode_sparse(off, val, 500, value_bits=16) == blob
    mask = np.zeros(500, bool)
    mask[off] = True
    want = struct.pack("<4sHHIHHI", b"SMSP", 2, 1, 200, 1, 0, 500) + np.packbits(mask, bitorder="little").tobytes()
    assert blob == want + bf16_bits(val).tobytes()


def test_sparse_blob_int8_rejects_malformed():
    off, val = np.array([1, 5, 9]), np.array([0.5, -1.0, 0.25], np.float32)
    good = encode_sparse(off, val, 100, value_bits=8)  # offsets layout: 20 + 12 + 4 + 3 bytes
    assert len(good) == 39 and decode_sparse(good)[0].tolist() == [1, 5, 9]
    pos = np.array([1, 5, 9], "<i4").tobytes()
    codes = np.array([64, -127, 32], np.int8).tobytes()

    def blob(scale, q=codes, count=3):
        return _blob_v2(count, 0, 100, pos, np.array([scale], "<f4").tobytes() + q, code=2)

    assert blob(1 / 127) == good[:32] + np.array([1 / 127], "<f4").tobytes() + codes
    bad = [
        good[:-1],  # a code short
        good + b"\0",
        _blob_v2(3, 0, 100, pos, bf16_bits(val).tobytes(), code=2),  # the bf16 size (2 bytes a value) under code 2
        blob(float("nan")),
        blob(float("inf")),
        blob(-1.0),
        blob(1.0, q=np.array([64, -128, 32], np.int8).tobytes()),  # -128 is no code
        blob(3e38),  # 127 * 3e38 overflows float32 / bfloat16
        _blob_v2(4, 0, 100, pos, np.array([1.0], "<f4").tobytes() + codes),  # count 4: a byte short
        struct.pack("<4sHHI", b"SMSP", 1, 2, 3) + pos + np.array([1.0], "<f4").tobytes() + codes,  # code 2 in version 1
        _blob_v2(3, 0, 100, pos, np.array([1.0], "<f4").tobytes() + codes, code=3),
    ]
    for i, b in enumerate(bad):
        for decode in (decode_sparse, sparse.decode_sparse_codes):  # the codes reader checks alike
            with pytest.raises(ValueError):
                decode(b)
                pytest.fail(f"bad blob {i} decoded by {decode.__name__}")
    with pytest.raises(ValueError, match="value_bits"):
        encode_sparse(off, val, 100, value_bits=4)
    for x in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            encode_sparse(off, np.array([0.5, x, 0.25], np.float32), 100, value_bits=8)


@pytest.mark.parametrize(
    "shape,rho,brs",
    [((50, 40), 0.1, (1, 7, 50)), ((333,), 0.05, (1, 8, 100, 333)), ((720, 800), 0.1, (97, 720))],
)
def test_sparse_topk_exact_with_ties(shape, rho, brs):
    """Exactly int(rho*n) survivors per tensor, ties by flat index, whatever the blocks (the
    last case exceeds 2**19 elements, so the sampled bracket path is used)."""
    base, models = family(shape, n=2, seed=7, ties=True)
    tau = taus_of(base, models)
    n = tau[0].size
    k = int(rho * n)
    m = onebit_encode_method(["a", "b"], {"a": "sparse", "b": "sparse-0.3"}, rho=rho)
    for br in brs:
        stats, res = run(m, shape, base, models, br)
        for task, r, t in (("a", rho, tau[0]), ("b", 0.3, tau[1])):
            idx, vals = [], []
            for r0, r1, out in res:
                o, v = decode_sparse(out[f"{task}.sparse"])
                start = r0 * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
                idx.append(o + start)
                vals.append(v)
            idx, vals = np.concatenate(idx), np.concatenate(vals)
            assert idx.size == int(r * n)
            np.testing.assert_array_equal(idx, topk_ref(t, int(r * n)))
            np.testing.assert_array_equal(vals, bf16_round(t.reshape(-1)[idx]))
    assert k > 0


# ---------------------------------------------------------------------------------------------
# Mediator's experts


@pytest.mark.parametrize("dense_dtype", [None, "bfloat16"])
def test_mediator_experts_brute_force(dense_dtype):
    shape = (60, 24)
    _, models = family(shape, n=3, seed=11, ties=False)
    models = [bf16_round(m) for m in models]  # bf16 checkpoints
    D = (models[0] + models[1]).astype(np.float32)
    D = ((D + models[2]).astype(np.float32) / np.float32(3)).astype(np.float32)
    Dq = D if dense_dtype is None else bf16_round(D)
    tasks = ["chat", "math", "code"]
    rho = 0.1
    k = int(rho * D.size)
    m = mediator_expert_method(tasks, rho, dense_dtype=dense_dtype)
    assert m.base == "unused"
    outs = expert_outputs(tasks)
    assert [o.name for o in outs] == tasks and all(o.blob for o in outs)
    results = {}
    for br in (1, 9, 60):
        _, res = run(m, shape, None, models, br)
        assert all(set(r) == set(tasks) for _, _, r in res)
        for t, task in enumerate(tasks):
            diff = (models[t] - Dq).astype(np.float32)
            idx = topk_ref(diff, k)
            want = Dq.copy().reshape(-1)
            want[idx] += bf16_round(diff.reshape(-1)[idx])
            got = np.concatenate([expert_block(Dq[r0:r1], [r[task]]).reshape(-1) for r0, r1, r in res])
            np.testing.assert_array_equal(got, want)
            nnz = sum(sparse.sparse_count(r[task]) for _, _, r in res)
            assert nnz == k
            results.setdefault(task, []).append(got)
    for task in tasks:
        for g in results[task][1:]:
            np.testing.assert_array_equal(g, results[task][0])
    # soft routing: D + sum_t p_t S_t
    _, res = run(m, shape, None, models, 13)
    p = [0.5, 0.3, 0.2]
    got = np.concatenate([expert_block(Dq[r0:r1], [r[t] for t in tasks], p).reshape(-1) for r0, r1, r in res])
    want = Dq.copy().reshape(-1)
    for t, task in enumerate(tasks):
        diff = (models[t] - Dq).astype(np.float32).reshape(-1)
        idx = topk_ref(diff, k)
        want[idx] += bf16_round(diff[idx]) * np.float32(p[t])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # with D kept in bf16, D + S_t gives theta_t back on the selected entries up to bf16 rounding
    if dense_dtype == "bfloat16":
        _, res = run(m, shape, None, models, 60)
        rec = expert_block(Dq, [res[0][2]["chat"]])
        off, _ = decode_sparse(res[0][2]["chat"])
        theta = models[0].reshape(-1)[off]
        d = np.abs(theta - Dq.reshape(-1)[off])
        err = np.abs(rec.reshape(-1)[off] - theta)
        assert np.all(err <= d * 2**-8 + np.abs(theta) * 2**-23)  # bf16 rounding of S_t, then a float32 add


def test_mediator_experts_int8_brute_force():
    """value_bits 8: the same top-rho entries as bf16, their values in int8 groups of 64 running
    within each row block (a blob), so D + S_t is the reference quantised block by block; fewer
    bytes than bf16."""
    shape = (60, 24)
    _, models = family(shape, n=3, seed=12, ties=False)
    models = [bf16_round(m) for m in models]
    D = ((models[0] + models[1]).astype(np.float32) + models[2]).astype(np.float32) / np.float32(3)
    Dq = bf16_round(D)
    tasks = ["chat", "math", "code"]
    rho = 0.5
    k = int(rho * D.size)
    m8 = mediator_expert_method(tasks, rho, dense_dtype="bfloat16", value_bits=8)
    m16 = mediator_expert_method(tasks, rho, dense_dtype="bfloat16")
    for br in (1, 9, 60):
        _, res = run(m8, shape, None, models, br)
        _, res16 = run(m16, shape, None, models, br)
        for t, task in enumerate(tasks):
            diff = (models[t] - Dq).astype(np.float32).reshape(-1)
            idx = topk_ref(diff, k)
            want = Dq.copy().reshape(-1)
            for r0 in range(0, shape[0], br):
                sel = idx[(idx >= r0 * 24) & (idx < min(shape[0], r0 + br) * 24)]
                want[sel] += _int8_reference(diff[sel])[3]
            got = np.concatenate([expert_block(Dq[r0:r1], [r[task]]).reshape(-1) for r0, r1, r in res])
            np.testing.assert_array_equal(got, want)
            # theta_t back on the kept entries within half a step (<= max |diff| / 254) and roundings
            assert np.abs(got[idx] - models[t].reshape(-1)[idx]).max() <= np.abs(diff).max() / 127
            b8 = sum(len(r[task]) for _, _, r in res)
            b16 = sum(len(r[task]) for _, _, r in res16)
            assert b8 < (0.7 if br == 60 else 1) * b16, (b8, b16)  # one-row blobs: the header weighs
    with pytest.raises(ValueError, match="value_bits"):
        mediator_expert_method(tasks, rho, value_bits=4)


# ---------------------------------------------------------------------------------------------
# 1bit-Merging: outputs, reconstruction, fallback, dynamic merge


PRECISIONS = {"chat": "1bit", "math": "1bit-row", "code": "sparse", "law": "dense", "med": "drop", "geo": "2bit"}
TASKS = list(PRECISIONS)


def _kind(p, shape, granularity="tensor"):
    return onebit.resolve_precision(p, granularity, shape, 0.1)[0]


@pytest.mark.parametrize("shape", [(48, 20), (3, 5, 7), (257,), ()])
@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0"])
def test_encode_reconstruct_fallback_dynamic(shape, scale):
    base, models = family(shape, n=len(TASKS), seed=13, zeros=0.05)
    tau = taus_of(base, models)
    rho, lam = 0.1, 0.7
    outs = onebit_outputs(TASKS, PRECISIONS, shape)
    enc = onebit_encode_method(TASKS, PRECISIONS, scale, "tensor", rho, shape=shape)
    fb = onebit_fallback_method(TASKS, PRECISIONS, scale, "tensor", lam, rho)

    ref_hats = {t: ref_tau_hat(_kind(PRECISIONS[t], shape), tau[i], scale, rho) for i, t in enumerate(TASKS)}
    rows = shape[0] if shape else 1
    fb_ref = (base + np.float32(lam) * ref_ties(list(ref_hats.values()))).astype(np.float32)

    seen = None
    for br in sorted({1, 3, 8, max(1, rows // 2), rows}):
        stats, res = run(enc, shape, base, models, br)
        # exactly the declared outputs, with the declared dtypes and shapes
        for r0, r1, out in res:
            assert set(out) == {o.name for o in outs}
            for o in outs:
                v = out[o.name]
                if o.blob:
                    assert isinstance(v, bytes)
                else:
                    trailing = o.trailing if o.trailing is not None else tuple(shape[1:])
                    assert np.asarray(v).size == (r1 - r0) * int(np.prod(trailing, dtype=np.int64))
                    if o.dtype == "uint8":
                        assert v.dtype == np.uint8
                    else:
                        assert v.dtype == np.float32
        # reconstruct every task block by block
        hats = {}
        for t in TASKS:
            parts = [reconstruct_from_outputs(t, PRECISIONS[t], shape, r1 - r0, out, stats) for r0, r1, out in res]
            hats[t] = None if parts[0] is None else np.concatenate([p.reshape(-1) for p in parts]).reshape(shape)
        for t in TASKS:
            if ref_hats[t] is None:
                assert hats[t] is None
            else:  # 2bit: the float32 rescaling factor and its products add a few roundings
                np.testing.assert_allclose(hats[t], ref_hats[t], rtol=2e-6 if PRECISIONS[t] == "2bit" else 3e-7, atol=0)
        # block-size independence: identical reconstructions and identical 2-D outputs
        if seen is None:
            seen = hats
        else:
            for t in TASKS:
                if hats[t] is not None:
                    np.testing.assert_array_equal(hats[t], seen[t])
        # the fallback equals the in-memory formula, and bitwise the merge of the stored encodings
        _, fres = run(fb, shape, base, models, br)
        got = concat(fres, shape)
        np.testing.assert_allclose(got, fb_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got, fallback_merge_block(base, hats, lam))
        # dynamic merge for each routed task
        for k in TASKS:
            others = [h for t, h in ref_hats.items() if t != k]
            T = ref_ties(others)
            want = base.copy() if ref_hats[k] is None else (base + ref_hats[k]).astype(np.float32)
            if T is not None:
                want = (want + np.float32(lam) * T).astype(np.float32)
            got = dynamic_merge_block(base, hats, k, lam)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            # block by block equals whole-tensor
            if shape and br < rows:
                rb = np.concatenate(
                    [
                        dynamic_merge_block(
                            base[r0:r1], {t: (None if h is None else h[r0:r1]) for t, h in hats.items()}, k, lam
                        ).reshape(-1)
                        for r0, r1, _ in res
                    ]
                )
                np.testing.assert_array_equal(rb.reshape(shape), got)


def test_bits_outputs_block_independent():
    shape = (30, 21)
    base, models = family(shape, n=2, seed=17)
    pr = {"a": "1bit", "b": "1bit"}
    outs = onebit_outputs(["a", "b"], pr, shape, granularity="row")
    assert [o.name for o in outs] == ["a.bits", "a.scale", "b.bits", "b.scale"]
    assert outs[0].trailing == (3,) and outs[0].dtype == "uint8" and outs[1].trailing == ()
    m = onebit_encode_method(["a", "b"], pr, "absmean", "row")
    whole = None
    for br in (1, 4, 30):
        _, res = run(m, shape, base, models, br)
        cat = {k: np.concatenate([r[k] for _, _, r in res]) for k in res[0][2]}
        if whole is None:
            whole = cat
        for k in cat:
            np.testing.assert_array_equal(cat[k], whole[k])
    tau = taus_of(base, models)[0]
    np.testing.assert_array_equal(whole["a.bits"], pack_signs(tau))
    np.testing.assert_allclose(whole["a.scale"], ref_scale(tau, "absmean", axis=1), rtol=2e-7)


def test_granularity_row_fallback_matches_reference():
    shape = (40, 16)
    base, models = family(shape, n=3, seed=19)
    tau = taus_of(base, models)
    pr = {"x": "1bit", "y": "1bit", "z": "1bit"}
    fb = onebit_fallback_method(list(pr), pr, "rms", "row", 1.0)
    want = (base + ref_ties([ref_tau_hat("1bit-row", t, "rms") for t in tau])).astype(np.float32)
    for br in (1, 7, 40):
        _, res = run(fb, shape, base, models, br)
        np.testing.assert_allclose(concat(res, shape), want, rtol=1e-6, atol=1e-6)


def test_all_dropped_and_validation():
    shape = (4, 4)
    base, models = family(shape, n=2)
    pr = {"a": "drop", "b": "drop"}
    assert onebit_outputs(["a", "b"], pr, shape) == ()
    fb = onebit_fallback_method(["a", "b"], pr)
    _, res = run(fb, shape, base, models, 2)
    np.testing.assert_array_equal(concat(res, shape), base)
    with pytest.raises(ValueError):
        onebit_encode_method(["a"], {"a": "3bit"})
    with pytest.raises(ValueError):
        onebit_encode_method(["a"], {"a": "1bit"}, scale="max")
    with pytest.raises(ValueError):
        onebit_encode_method(["a", "a"], {"a": "1bit"})
    with pytest.raises(ValueError):
        onebit_encode_method(["a"], {})
    with pytest.raises(ValueError):
        dynamic_merge_block(base, {"a": None}, "b")


def test_methods_pickle():
    cloudpickle = pytest.importorskip("cloudpickle")
    shape = (12, 10)
    base, models = family(shape, n=2, seed=23)
    for m in (
        onebit_encode_method(["a", "b"], {"a": "1bit", "b": "sparse"}),
        onebit_fallback_method(["a", "b"], {"a": "1bit", "b": "sparse"}),
        mediator_expert_method(["a", "b"], 0.2),
    ):
        m2 = cloudpickle.loads(cloudpickle.dumps(m))
        _, r1 = run(m, shape, base, models, 5)
        _, r2 = run(m2, shape, base, models, 5)
        for (_, _, a), (_, _, b) in zip(r1, r2):
            if isinstance(a, dict):
                assert a.keys() == b.keys()
                for key in a:
                    if isinstance(a[key], bytes):
                        assert a[key] == b[key]
                    else:
                        np.testing.assert_array_equal(a[key], b[key])
            else:
                np.testing.assert_array_equal(a, b)


def ref_group_hat(tau, scale, group):
    """tau_hat with one scale per group of `group` consecutive entries of each row, entry by
    entry (1-D / 0-D: the per-tensor scale)."""
    if tau.ndim <= 1:
        return ref_tau_hat("1bit", tau, scale)
    t2 = as2d(tau, tau.shape)
    out = np.empty(t2.shape, np.float32)
    for r in range(t2.shape[0]):
        for c0 in range(0, t2.shape[1], group):
            part = t2[r, c0 : c0 + group]
            out[r, c0 : c0 + group] = ref_scale(part, scale) * np.where(part >= 0, 1, -1)
    return out.reshape(tau.shape)


@pytest.mark.parametrize("shape,group", [((48, 20), 8), ((3, 5, 7), 16), ((6, 64), 64), ((9, 5), 1), ((257,), 8), ((), 8)])
@pytest.mark.parametrize("scale", ["absmean", "rms", "pow:2.0"])
def test_group_scales_encode_reconstruct_fallback(shape, group, scale):
    """granularity group:<G>: "1bit" of a matrix stores one scale per group of G entries of a row
    (the last group the cols % G left), declared as (rows, ceil(cols/G)) float32; the
    reconstruction and the fallback equal the entry-by-entry formula for every blocking."""
    base, models = family(shape, n=3, seed=21, zeros=0.05)
    tau = taus_of(base, models)
    gran = f"group:{group}"
    precisions = {"a": "1bit", "b": "1bit", "c": "dense"}
    outs = {o.name: o for o in onebit_outputs(list(precisions), precisions, shape, gran)}
    if len(shape) >= 2:
        cols = int(np.prod(shape[1:]))
        assert outs["a.scale"].trailing == (-(-cols // group),) and outs["a.scale"].dtype == "float32"
    else:
        assert "a.scale" not in outs
    enc = onebit_encode_method(list(precisions), precisions, scale, gran, shape=shape)
    fb = onebit_fallback_method(list(precisions), precisions, scale, gran, 0.5)
    want = {t: ref_group_hat(tau[i], scale, group) for i, t in enumerate("ab")}
    rows = shape[0] if shape else 1
    for br in sorted({1, 5, rows}):
        stats, res = run(enc, shape, base, models, br)
        for t in "ab":
            parts = [reconstruct_from_outputs(t, "1bit", shape, r1 - r0, out, stats, gran) for r0, r1, out in res]
            got = np.concatenate([p.reshape(-1) for p in parts]).reshape(shape)
            np.testing.assert_allclose(got, want[t], rtol=3e-7, atol=0)
        hats = {t: np.concatenate([reconstruct_from_outputs(t, p, shape, r1 - r0, out, stats, gran).reshape(-1)
                                   for r0, r1, out in res]).reshape(shape) for t, p in precisions.items()}
        _, fres = run(fb, shape, base, models, br)
        np.testing.assert_array_equal(concat(fres, shape), fallback_merge_block(base, hats, 0.5))
