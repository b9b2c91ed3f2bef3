"""ties / dare / breadcrumbs / della / sce: exact streamed top-k, block-size independence, and
parity with mergekit's own implementation (called in-process on the same float32 tensors)."""

from __future__ import annotations

import os
import time
import zlib

import ml_dtypes
import numpy as np
import pytest

from streammerge.methods import MergeMethod, TensorParams, get_method
from streammerge.methods import base as _base
from streammerge.ops import random_streams as _random
from streammerge.ops import topk as _topk
from streammerge.methods.inmemory import merge_tensor
from helpers import make, tensor_params

torch = pytest.importorskip("torch")
mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

BLOCKS = (None, 7, 1)


# ---------------------------------------------------------------------------------------------
# drivers


def mergekit_merge(name, base, models, **parameters):
    """mergekit's method on float32 torch tensors (so it computes in float32)."""
    group = TensorGroup.from_tensors(
        [torch.from_numpy(np.ascontiguousarray(base))] + [torch.from_numpy(np.ascontiguousarray(m)) for m in models],
        base_index=0,
    )
    return mk_registry.get(name)([group], parameters=parameters, dtype=torch.float32)[0].numpy()


def ours(name, base, models, block_rows=None, seed=0, tensor="model.layers.0.mlp.up_proj.weight", **parameters):
    """Our method through the in-memory engine emulation; per-model values may be lists."""
    params = tensor_params(name, len(models), seed, **parameters)
    return merge_tensor(get_method(name), tensor, base, list(models), params, block_rows)


def bits_equal(a, b, where=None):
    diff = a.view(np.uint32) != b.view(np.uint32)
    if where is not None:
        diff &= where
    return int(diff.sum())


def kth_largest(a: np.ndarray, k: int):
    a = np.abs(a).ravel()
    return np.partition(a, a.size - k)[a.size - k]


def tie_mask(base, models, ks_per_model):
    """Entries of some model whose |tau| equals one of its top-k thresholds (ambiguous in mergekit)."""
    m = np.zeros(base.shape, bool)
    for x, ks in zip(models, ks_per_model):
        tau = np.abs(x - base)
        for k in ks:
            if 0 < k < tau.size:
                m |= tau == kth_largest(tau, k)
    return m


# ---------------------------------------------------------------------------------------------
# exact top-k, against a brute-force stable sort by (-|x|, index)


def brute_topk(x: np.ndarray, k: int) -> np.ndarray:
    u = np.abs(x.astype(np.float32)).ravel().view(np.uint32).astype(np.int64)
    order = np.argsort(-u, kind="stable")
    sel = np.zeros(u.size, bool)
    sel[order[: max(0, k)]] = True
    return sel.reshape(x.shape)


def run_topk(x: np.ndarray, ks, block_rows=None) -> list[np.ndarray]:
    """Selections of the ks largest |x| through the TopK passes; masks in flat order."""

    def values(block, params, stats, src, sl, out):
        return np.abs(block.models[0].reshape(-1)[sl], out=out)

    tk = _topk.TopK("t", values, lambda params, stats, n: [(0, k) for k in ks])

    def merge(block, params, stats):
        kps = tk.keepers(block, params, stats)
        u = np.abs(block.models[0].reshape(-1)).view(np.uint32)
        out = np.zeros(u.size, np.float32)
        for j, kp in enumerate(kps):
            out += kp.mask(u, block.start).astype(np.float32) * np.float32(2**j)
        return out.reshape(block.models[0].shape)

    method = MergeMethod("topk-test", merge=merge, base="unused", passes=tk.passes)
    codes = merge_tensor(method, "t", None, [x], TensorParams({}, ({},), 0), block_rows).astype(np.int64)
    return [((codes >> j) & 1).astype(bool) for j in range(len(ks))]


def topk_cases():
    rng = np.random.default_rng(42)
    yield "cont-2d", rng.standard_normal((150, 40)).astype(np.float32)
    yield "cont-1d", rng.standard_normal(700).astype(np.float32)
    yield "small-2d", rng.integers(-3, 4, size=(90, 33)).astype(np.float32)
    yield "small-1d", rng.integers(-2, 3, size=500).astype(np.float32)
    yield "const", np.full((40, 25), 0.5, np.float32)
    yield "3d", rng.standard_normal((30, 4, 9)).astype(np.float32)
    yield "bf16", (rng.standard_normal((120, 64)) * 1e-3).astype(ml_dtypes.bfloat16).astype(np.float32)


def check_topk(x, block_sizes=(None, 7, 1)):
    n = x.size
    ks = sorted({0, 1, 2, n // 10, n // 3, n // 2, n - 1, n})
    want = [brute_topk(x, k) for k in ks]
    for br in block_sizes:
        got = run_topk(x, ks, br)
        for k, g, w in zip(ks, got, want):
            assert g.sum() == k, (k, br)
            assert np.array_equal(g, w), (k, br)


@pytest.mark.parametrize("name,x", list(topk_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_exact_whole_sample(name, x):
    """Small tensors: the sample is the whole tensor (resolved in the sample reduce)."""
    check_topk(x)


@pytest.mark.parametrize("name,x", list(topk_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_exact_streamed(name, x, monkeypatch):
    """Force the streamed path (sample -> bracket -> collect) on small tensors."""
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 4)  # every few rows, as on large tensors
    check_topk(x)


@pytest.mark.parametrize("name,x", list(topk_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_exact_overflow_and_refine(name, x, monkeypatch):
    """Tiny candidate caps: level counts, deferred tie cuts in the boundary block, refinements."""
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 4)
    monkeypatch.setattr(_topk, "CAP_MIN", 2)
    monkeypatch.setattr(_topk, "CAP_DIV", 10**9)
    check_topk(x, (None, 7))


@pytest.mark.parametrize("name,x", list(topk_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_topk_exact_scanned_in_pieces(name, x, monkeypatch):
    """The collect pass scans a block over SCAN_MAX_ELEMS in pieces (a row group whole): the
    selection, tie cut included, is the brute force's whichever way a block is cut."""
    monkeypatch.setattr(_base, "SCAN_MAX_ELEMS", 2000)
    monkeypatch.setattr(_base, "CACHE_ELEMS", 512)
    monkeypatch.setattr(_topk, "CHUNK", 128)
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 4)
    check_topk(x, block_sizes=(None, 40, 7))


@pytest.mark.parametrize("where", ["above", "below", "narrow", "noheavy"])
def test_topk_bracket_miss(where, monkeypatch):
    """A bracket that misses the k-th value still gives the exact answer (refinement passes)."""
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)
    real = _topk.TopK._bracket

    def bad(samp, n, k, *layout):
        A, B, P, H, E = real(samp, n, k, *layout)
        top = int(samp.max())
        if where == "above":
            A = B = top
        elif where == "below":
            A = B = int(samp.min())
        elif where == "narrow":
            return A, B, np.unique(np.array([A, B], np.uint32)), np.zeros(0, np.uint32), E
        else:
            return A, B, P, np.zeros(0, np.uint32), E
        return A, B, np.array([A], np.uint32), np.zeros(0, np.uint32), E

    monkeypatch.setattr(_topk.TopK, "_bracket", staticmethod(bad))
    monkeypatch.setattr(_topk, "CAP_MIN", 16)
    monkeypatch.setattr(_topk, "CAP_DIV", 10**9)
    for name, x in topk_cases():
        check_topk(x, (None, 7))


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 12),
    levels=st.integers(1, 6),
    frac=st.floats(0, 1),
    block_rows=st.integers(1, 41),
    sample_target=st.sampled_from([4, 16, 1 << 18]),
    sample_rows=st.sampled_from([1, 3, 256]),
    cap=st.sampled_from([1, 3, 4096]),
    seed=st.integers(0, 2**16),
)
def test_topk_exact_property(rows, cols, levels, frac, block_rows, sample_target, sample_rows, cap, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-levels, levels + 1, size=(rows, cols)).astype(np.float32)
    x += rng.standard_normal(x.shape).astype(np.float32) * np.float32(rng.random() < 0.5)
    k = int(frac * x.size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_topk, "SAMPLE_TARGET", sample_target)
        mp.setattr(_topk, "SAMPLE_ROWS", sample_rows)
        mp.setattr(_topk, "CAP_MIN", cap)
        mp.setattr(_topk, "CAP_DIV", 10**9)
        (got,) = run_topk(x, [k], block_rows)
    assert np.array_equal(got, brute_topk(x, k))


def test_topk_large_bf16_like():
    """A realistic tensor: 2**19+ bf16-derived deltas, streamed path, heavy tie levels."""
    base, models = make((1100, 512), "bf16", nmodels=1, seed=3)
    tau = models[0] - base
    n = tau.size
    for k in (n // 2, n // 10):
        want = brute_topk(tau, k)
        for br in (None, 13):
            (got,) = run_topk(tau, [k], br)
            assert got.sum() == k
            assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# randomness


def test_random_stream_independent_of_chunking():
    key = _random.stream_key(7, "w", 1, "x")
    whole = _random.bits32(key, 1000, 5000)
    parts = np.concatenate([_random.bits32(key, 1000 + a, b - a) for a, b in [(0, 1), (1, 999), (999, 5000)]])
    assert np.array_equal(whole, parts)
    assert np.array_equal(_random.bits32(key, 0, 6000)[1000:], whole)  # position p is word p of the stream
    assert not np.array_equal(whole, _random.bits32(_random.stream_key(8, "w", 1, "x"), 1000, 5000))
    u = _random.uniform(key, 0, 200_000)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    m = _random.bernoulli_keep(key, 0, 200_000, 0.3)
    assert abs(m.mean() - 0.3) < 0.005


def test_random_stream_reused_in_any_order():
    """A Stream read chunk after chunk (forward, back, overlapping, unaligned) gives the words a
    fresh seeding gives for each chunk."""
    key = _random.stream_key(3, "w", 0, "random")
    stream = _random.Stream(key)
    for start, count in [(0, 5), (5, 1000), (1005, 3), (7, 9), (4000, 1), (1, 4003), (2**40 + 3, 17), (2, 2)]:
        assert np.array_equal(stream.bits16(start, count), _random.bits16(key, start, count))
    for start, count in [(10, 99), (0, 7), (3, 5)]:
        assert np.array_equal(stream.bits32(start, count), _random.bits32(key, start, count))
        assert np.array_equal(stream.uniform32(start, count), _random.uniform32(key, start, count))
        assert np.array_equal(stream.bernoulli_keep(start, count, 0.3), _random.bernoulli_keep(key, start, count, 0.3))


def test_thread_stream_is_kept_per_thread_and_bounded():
    """thread_stream: the same Stream for a key on one thread (seeded once across row groups),
    another on another thread, at most _KEPT_STREAMS kept, and its words a fresh seeding's."""
    import threading

    keys = [_random.stream_key(5, f"t{i}", 0, "random") for i in range(_random._KEPT_STREAMS + 3)]
    first = _random.thread_stream(keys[0])
    assert _random.thread_stream(keys[0]) is first
    other: list = []
    t = threading.Thread(target=lambda: other.append(_random.thread_stream(keys[0])))
    t.start()
    t.join()
    assert other[0] is not first
    for k in keys[1:]:
        _random.thread_stream(k)
    kept = _random._local.streams
    assert len(kept) == _random._KEPT_STREAMS and keys[0] not in kept and keys[-1] in kept
    s = _random.thread_stream(keys[-1])
    for start, count in [(100, 50), (3, 7), (2**33 + 1, 11)]:  # forward, back, far: a fresh seeding's words
        assert np.array_equal(s.bits16(start, count), _random.bits16(keys[-1], start, count))


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_block_size_and_seed(name):
    base, models = make((60, 50), "cont", seed=1)
    kw = dict(weight=[1.0, 0.6, 0.3], density=[0.5, 0.3, 0.7])
    outs = [ours(name, base, models, br, seed=11, **kw) for br in BLOCKS]
    for o in outs[1:]:
        assert bits_equal(o, outs[0]) == 0
    other = ours(name, base, models, None, seed=12, **kw)
    assert bits_equal(other, outs[0]) > 0.1 * base.size
    other_tensor = ours(name, base, models, None, seed=11, tensor="another", **kw)
    assert bits_equal(other_tensor, outs[0]) > 0.1 * base.size


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_dare_masks_drawn_once_for_pass_and_merge(name, monkeypatch):
    """The l1 pass keeps each mask it draws (random_streams.KEPT_MASKS) and the merge takes it
    back instead of drawing again: every mask of the merge comes from the cache, the cache is
    empty afterwards, and the result is the same bits as with nothing kept (budget 0: every
    mask drawn twice) and as a cache left holding another tensor's masks."""
    base, models = make((300, 200), "cont", seed=3)
    kw = dict(weight=[1.0, 0.6, 0.3], density=[0.5, 0.3, 0.7])
    drawn = []
    bernoulli = _random.Stream.bernoulli_keep
    monkeypatch.setattr(_random.Stream, "bernoulli_keep", lambda self, *a, **k: drawn.append((id(self), *a[:2])) or bernoulli(self, *a, **k))
    _random.KEPT_MASKS._masks.clear()
    _random.KEPT_MASKS._bytes = 0
    kept = ours(name, base, models, 70, **kw)
    assert len(drawn) == len(set(drawn)) > 3 and len(_random.KEPT_MASKS) == 0  # each drawn once, all taken
    drawn.clear()
    monkeypatch.setattr(_random, "KEPT_MASKS", _random.KeptMasks(0))
    redrawn = ours(name, base, models, 70, **kw)
    assert len(drawn) == 2 * len(set(drawn))  # pass and merge
    monkeypatch.setattr(_random, "KEPT_MASKS", _random.KeptMasks(2**20))
    ours(name, base, models, 70, tensor="another", **{**kw, "rescale": False})  # nothing kept without the pass
    ours(name, base, models, 70, tensor="another", **kw)  # its pass keeps; its merge takes
    assert bits_equal(kept, redrawn) == 0 and bits_equal(ours(name, base, models, None, **kw), kept) == 0


def test_kept_masks_bounded():
    """KeptMasks holds at most its budget of packed bits, dropping the oldest; a taken mask is
    gone; a mask is what was put."""
    cache = _random.KeptMasks(3 * 1024)
    masks = [_random.bernoulli_keep(k, 0, 8192, 0.3) for k in range(5)]  # 1 KiB packed each
    for k, m in enumerate(masks):
        cache.put(k, m)
    assert len(cache) == 3 and cache._bytes == 3 * 1024 and cache.take(0) is None and cache.take(1) is None
    assert np.array_equal(cache.take(3), masks[3]) and cache.take(3) is None and len(cache) == 2
    cache.put("big", np.ones(8 * 4096, bool))  # over the budget alone: not kept
    assert cache.take("big") is None and cache._bytes == 2048


def test_dare_masks_differ_between_models():
    base, models = make((100, 100), "cont", nmodels=2, seed=2)
    models[1] = models[0].copy()
    out = ours("dare_linear", base, models, density=0.5, weight=[1.0, 1.0], rescale=False)
    # identical fine-tunes, independent masks: 1/4 of entries kept by both, 1/4 by neither
    tau = models[0] - base
    both = np.isclose(out - base, 2 * tau, rtol=1e-4, atol=0)
    assert 0.2 < both.mean() < 0.3


# ---------------------------------------------------------------------------------------------
# parity with mergekit: magnitude methods (deterministic)

SHAPES = [(256, 384), (1030, 512), (3000,)]  # whole-sample path, streamed path (n > 2**19), 1-D


def _magnitude_ks(name, n, dens, gammas):
    from streammerge.ops.sparsify import magnitude_k as _magnitude_k, outlier_ks as _outlier_ks

    out = []
    for d, g in zip(dens, gammas):
        if d >= 1:
            out.append(())
        elif name == "ties":
            out.append((_magnitude_k(d, n),) if d > 0 else ())
        else:
            out.append(_outlier_ks(d, g, n))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["cont", "bf16", "small"])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_parity(name, kind, shape):
    base, models = make(shape, kind, seed=zlib.crc32(f"{name}/{kind}".encode()) % 1000)  # not hash(): it varies per process
    dens = [0.5, 0.1, 0.9]
    gammas = [0.01, 0.05, 0.0]
    variants = [
        dict(weight=[1.0, 0.5, 0.7]),
        dict(weight=[1.0, -0.5, 0.3], normalize=False, **{"lambda": 0.8}),
        dict(weight=[0.4, 0.4, 0.4], normalize=True),
    ]
    extra = {"gamma": gammas} if name != "ties" else {}
    ks = _magnitude_ks(name, base.size, dens, gammas)
    ties = tie_mask(base, models, ks)
    for v in variants:
        ref = mergekit_merge(name, base, models, density=dens, **extra, **v)
        for br in (None, 5) if len(shape) > 1 else (None, 64):
            out = ours(name, base, models, br, density=dens, **extra, **v)
            assert bits_equal(out, ref, where=~ties) == 0, (v, br)
            if kind == "cont":
                assert ties.sum() <= 8
    if kind == "cont":  # no (or almost no) ties: bit-identical everywhere
        assert bits_equal(out, ref) <= ties.sum()


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_magnitude_parity_scanned_in_pieces(name, monkeypatch):
    """A block scanned in several pieces (a block over SCAN_MAX_ELEMS: cache-sized pieces, made
    tiny here) gives mergekit's merge as a block scanned whole does: the top-k collect and the
    merge's row chunks both cut it."""
    monkeypatch.setattr(_base, "SCAN_MAX_ELEMS", 3000)
    monkeypatch.setattr(_base, "CACHE_ELEMS", 1024)
    monkeypatch.setattr(_topk, "CHUNK", 256)
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 256)  # the streamed path: sample, bracket, collect
    shape = (300, 40)
    base, models = make(shape, "cont", seed=11)
    dens = [0.5, 0.1, 0.9]
    ties = tie_mask(base, models, _magnitude_ks(name, base.size, dens, [0.01, 0.05, 0.0]))
    extra = {"gamma": [0.01, 0.05, 0.0]} if name != "ties" else {}
    ref = mergekit_merge(name, base, models, density=dens, weight=[1.0, 0.5, 0.7], **extra)
    for br in (None, 70, 7):  # 12000 elements in 1024-element pieces; 2800 whole; 280 whole
        out = ours(name, base, models, br, density=dens, weight=[1.0, 0.5, 0.7], **extra)
        assert bits_equal(out, ref, where=~ties) == 0, br


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_magnitude_parity_rescale(name):
    """rescale=true (L1): mergekit's float32 tensor sums (torch's cascade, thread-dependent) vs our
    float64 sums: the scale factors can differ by an ulp, so the outputs agree to ~1e-7."""
    base, models = make((300, 300), "cont", seed=5)
    kw = dict(weight=[1.0, 0.5, 0.7], density=[0.5, 0.2, 0.8], rescale=True)
    ref = mergekit_merge(name, base, models, **kw)
    out = ours(name, base, models, 9, **kw)
    ks = _magnitude_ks(name, base.size, kw["density"], [0.01] * 3)
    ok = ~tie_mask(base, models, ks)
    np.testing.assert_allclose(out[ok], ref[ok], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("density", [1.0, 0.0])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_density_edges(name, density):
    base, models = make((40, 30), "cont", seed=6)
    kw = dict(weight=[1.0, 0.5, 0.7], density=density)
    ref = mergekit_merge(name, base, models, **kw)
    for br in (None, 1):
        assert bits_equal(ours(name, base, models, br, **kw), ref) == 0


@pytest.mark.parametrize("density", [1.5, -0.1])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della"])
def test_density_outside_unit_interval_is_refused(name, density):
    # a kept fraction outside [0, 1] means nothing (mergekit accepts it anyway); the recipe
    # check names the range instead of merging something the author did not mean
    param = next(p for p in get_method(name).params if p.name == "density")
    with pytest.raises(ValueError, match=r"must be (<= 1|>= 0)"):
        param.validate(density)


def test_ties_keeps_exactly_k():
    base, models = make((200, 300), "small", nmodels=1, seed=9)
    out = ours("ties", base, models, 3, weight=1.0, density=0.37)
    kept = np.count_nonzero((out - base) != 0)
    assert kept == int(0.37 * base.size)
    assert np.array_equal((out - base) != 0, brute_topk(models[0] - base, int(0.37 * base.size)))


def test_ties_negative_zero_base():
    """torch sums from +0: an all-zero merged delta on a -0 base gives +0, as mergekit."""
    base, models = make((50, 40), "cont", seed=10)
    base[::3] = -0.0
    for m in models:
        m[::3, ::2] = -0.0  # delta -0 - (-0) = 0
    for name in ("ties", "breadcrumbs"):
        kw = dict(weight=[1.0, 0.5, 0.7], density=0.5)
        ref = mergekit_merge(name, base, models, **kw)
        assert bits_equal(ours(name, base, models, 4, **kw), ref, where=~tie_mask(base, models, [[1000]] * 3)) == 0


def test_no_models_returns_base():
    from streammerge.methods import Block

    base, _ = make((10, 10), "cont")
    for name in ("ties", "dare_linear", "della", "breadcrumbs", "sce"):
        method = get_method(name)
        glob = {p.name: p.default for p in method.params if p.scope == "global"}
        out = method.merge(Block("t", base.shape, 0, base, ()), TensorParams(glob, (), 0), {})
        assert bits_equal(out, base) == 0


# ---------------------------------------------------------------------------------------------
# parity with mergekit: random methods (same density, same rescale, same expectation)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_density_one_is_exact(name):
    base, models = make((64, 80), "cont", seed=12)
    kw = dict(weight=[1.0, 0.5, 0.7], density=1.0)
    ref = mergekit_merge(name, base, models, **kw)
    assert bits_equal(ours(name, base, models, 3, **kw), ref) == 0


def _single(name, base, model, n_runs=1, **kw):
    """(ours, mergekit) for one model with weight 1 (out - base is its sparsified delta)."""
    ref = mergekit_merge(name, base, [model], weight=1.0, **kw)
    out = ours(name, base, [model], 16, weight=1.0, **kw)
    return out - base, ref - base


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("rescale", [False, True])
def test_random_density_and_rescale(name, rescale):
    torch.manual_seed(0)
    base, (model,) = make((400, 500), "cont", nmodels=1, seed=13)
    tau = model - base
    density = 0.3
    mine, ref = _single(name, base, model, density=density, rescale=rescale)
    n = base.size
    sd = np.sqrt(density * (1 - density) / n)
    for d in (mine, ref):
        kept = np.mean(np.abs(d) > 0)
        assert abs(kept - density) < 6 * sd
        if rescale:  # L1 norm of the tensor preserved
            assert np.isclose(np.abs(d).sum(dtype=np.float64), np.abs(tau).sum(dtype=np.float64), rtol=1e-4)
        elif name == "dare_linear":
            assert np.isclose(np.abs(d).sum(dtype=np.float64), density * np.abs(tau).sum(dtype=np.float64), rtol=0.02)
    assert np.isclose(np.abs(mine).sum(dtype=np.float64), np.abs(ref).sum(dtype=np.float64), rtol=0.02)
    # same expectation of the merged delta: E = tau (rescaled) or density * tau
    scale = 1.0 if rescale else density
    for d in (mine, ref):
        resid = d.astype(np.float64) - scale * tau
        assert abs(resid.mean()) < 6 * resid.std() / np.sqrt(n)
        assert np.isclose(d.astype(np.float64).std(), ref.astype(np.float64).std(), rtol=0.02)


def test_della_keep_probability_follows_rank():
    """Per-row rank-based keep probability: compare the kept fraction per rank decile with mergekit."""
    torch.manual_seed(1)
    base, (model,) = make((300, 400), "cont", nmodels=1, seed=14)
    tau = np.abs(model - base)
    mine, ref = _single("della_linear", base, model, density=0.4, epsilon=0.2, rescale=False)
    ranks = np.argsort(np.argsort(tau, axis=1, kind="stable"), axis=1, kind="stable") / (tau.shape[1] - 1)
    dec = np.minimum((ranks * 10).astype(int), 9)
    for q in range(10):
        sel = dec == q
        p = 0.4 - 0.2 + 2 * 0.2 * (q + 0.5) / 10
        sd = np.sqrt(p * (1 - p) / sel.sum())
        for d in (mine, ref):
            assert abs(np.mean(d[sel] != 0) - p) < 6 * sd + 0.01


def test_della_1d_and_inverse_density():
    base, (model,) = make((5000,), "cont", nmodels=1, seed=15)
    tau = model - base
    out = ours("della_linear", base, [model], 7, weight=1.0, density=0.5, epsilon=0.1, rescale_mode="inverse_density")
    d = out - base
    kept = d != 0
    assert 0.45 < kept.mean() < 0.55
    ranks = np.argsort(np.argsort(np.abs(tau), kind="stable"), kind="stable") / (tau.size - 1)
    p = (np.float32(0.5 - 0.1) + (ranks.astype(np.float32) * 2) * np.float32(0.1)).astype(np.float32)
    np.testing.assert_allclose(out[kept], (base + tau / p)[kept], rtol=1e-6, atol=1e-9)
    # larger magnitudes kept more often
    assert kept[ranks > 0.5].mean() > kept[ranks < 0.5].mean() + 0.05
    assert bits_equal(ours("della_linear", base, [model], 1, weight=1.0, density=0.5, epsilon=0.1), ours("della_linear", base, [model], None, weight=1.0, density=0.5, epsilon=0.1)) == 0


def test_dare_inverse_density():
    base, (model,) = make((100, 100), "cont", nmodels=1, seed=16)
    tau = model - base
    out = ours("dare_linear", base, [model], 9, weight=1.0, density=0.25, rescale_mode="inverse_density")
    d = out - base
    kept = d != 0
    assert bits_equal(out, base + (tau / np.float32(0.25)), where=kept) == 0


def test_dare_ties_consensus_statistics():
    torch.manual_seed(2)
    base, models = make((300, 300), "cont", seed=17)
    kw = dict(weight=[1.0, 0.7, 0.5], density=0.5)
    ref = mergekit_merge("dare_ties", base, models, **kw) - base
    mine = ours("dare_ties", base, models, 11, **kw) - base
    assert abs(np.mean(mine != 0) - np.mean(ref != 0)) < 0.01
    assert np.isclose(np.abs(mine).mean(), np.abs(ref).mean(), rtol=0.01)
    assert abs(mine.mean() - ref.mean()) < 6 * ref.std() / np.sqrt(ref.size)


def test_della_bad_epsilon():
    base, models = make((10, 10), "cont")
    with pytest.raises(Exception, match="epsilon"):
        ours("della", base, models, weight=1.0, density=0.1, epsilon=0.2)


# ---------------------------------------------------------------------------------------------
# sce


@pytest.mark.parametrize("shape", [(256, 384), (1030, 512), (2000,)], ids=str)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_parity(shape, select_topk):
    base, models = make(shape, "cont", seed=18)
    ref = mergekit_merge("sce", base, models, select_topk=select_topk)
    outs = [ours("sce", base, models, br, select_topk=select_topk) for br in (None, 5)]
    assert bits_equal(outs[0], outs[1]) == 0
    # weights are tensor-wide means (float64 here, float32 in torch): agree to float32 rounding
    np.testing.assert_allclose(outs[0], ref, rtol=1e-6, atol=1e-9)


def test_sce_selection_matches():
    base, models = make((300, 200), "small", seed=19)
    for s in (0.3, 0.7):
        ref = mergekit_merge("sce", base, models, select_topk=s)
        out = ours("sce", base, models, 7, select_topk=s)
        var = np.stack([m - base for m in models]).var(axis=0, dtype=np.float64).astype(np.float32)
        k = int(np.count_nonzero(var) * s)
        amb = var == kth_largest(var, k)
        # (values differ slightly: which tied entries are kept changes the tensor-wide weights)
        assert np.array_equal((out != base)[~amb], (ref != base)[~amb])
        assert amb.sum() < 0.2 * amb.size


# ---------------------------------------------------------------------------------------------
# block-size independence of every method


@pytest.mark.parametrize(
    "name,kw",
    [
        ("ties", dict(weight=[1.0, 0.5, 0.7], density=[0.3, 0.6, 0.9])),
        ("ties", dict(weight=[1.0, 0.5, 0.7], density=0.4, rescale=True)),
        ("breadcrumbs", dict(weight=[1.0, 0.5, 0.7], density=0.5, gamma=0.05)),
        ("breadcrumbs_ties", dict(weight=[1.0, 0.5, 0.7], density=0.5, gamma=0.05, rescale=True)),
        ("dare_ties", dict(weight=[1.0, 0.5, 0.7], density=0.5)),
        ("della", dict(weight=[1.0, 0.5, 0.7], density=0.5)),
        ("sce", dict(select_topk=0.4)),
    ],
)
@pytest.mark.parametrize("shape", [(130, 17), (700,), (5, 6, 7)], ids=str)
def test_block_size_independent(name, kw, shape, monkeypatch):
    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 128)  # the streamed top-k path on small tensors
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 8)  # ... sampling every few rows
    base, models = make(shape, "small", seed=20)
    outs = [ours(name, base, models, br, **kw) for br in (None, 1, 3, 64)]
    for o in outs[1:]:
        assert bits_equal(o, outs[0]) == 0


@pytest.mark.parametrize("name,kw", [("ties", dict(density=0.5)), ("breadcrumbs_ties", dict(density=0.8, gamma=0.05))])
def test_row_groups_hold_a_deferred_tie_cut_whole(name, kw, monkeypatch):
    """Top-k methods are merged one group of rows at a time (MergeMethod.row_groups, as the engine
    does), a span where a tie cut was left to the merge held whole by one group (unsplit; the
    engine's group_bounds widens the group that would cut it): one row per call elsewhere gives
    the whole blocks' bits, and a call cutting such a span is refused."""
    from streammerge.engine.build import group_bounds
    from streammerge.errors import StreammergeError
    from streammerge.methods.base import Block
    from streammerge.methods.inmemory import run_passes, tensor_blocks

    monkeypatch.setattr(_topk, "SAMPLE_TARGET", 64)  # tiny candidate caps: tie cuts deferred
    monkeypatch.setattr(_topk, "SAMPLE_ROWS", 4)
    monkeypatch.setattr(_topk, "CAP_MIN", 2)
    monkeypatch.setattr(_topk, "CAP_DIV", 10**9)
    base, models = make((60, 9), "small", seed=3)
    method, params = get_method(name), tensor_params(name, 3, weight=[1.0, 0.5, 0.7], **kw)
    stats = run_passes(method, "t", base, models, params, block_rows=7)
    want = merge_tensor(method, "t", base, models, params, block_rows=7)
    got, widened = [], 0
    for b in tensor_blocks("t", base, models, 7):
        r0 = b.start // 9
        assert method.in_row_groups(stats, b.start, b.start + b.base.size)
        spans = method.unsplit(stats, b.start, b.start + b.base.size)
        rows = [(s0 // 9, -(-s1 // 9)) for s0, s1 in spans]
        for a, e in group_bounds(r0, r0 + b.base.shape[0], 1, rows):
            group = Block("t", b.shape, a * 9, b.base[a - r0 : e - r0], tuple(m[a - r0 : e - r0] for m in b.models))
            got.append(method.merge(group, params, stats))
            widened += e - a > 1
        if spans and rows[0][1] - rows[0][0] > 1:  # one row of a span alone: refused
            s0 = rows[0][0]
            alone = Block("t", b.shape, s0 * 9, b.base[s0 - r0 : s0 - r0 + 1], tuple(m[s0 - r0 : s0 - r0 + 1] for m in b.models))
            with pytest.raises(StreammergeError, match="row blocks changed"):
                method.merge(alone, params, stats)
    assert widened >= 1
    assert bits_equal(np.concatenate(got), want) == 0


def test_group_bounds_widen_only_what_would_cut_a_span():
    from streammerge.engine.build import group_bounds

    assert list(group_bounds(0, 10, 3)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(group_bounds(0, 10, 3, [(2, 5)])) == [(0, 5), (5, 8), (8, 10)]
    assert list(group_bounds(0, 10, 3, [(3, 6)])) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # none cut
    assert list(group_bounds(0, 10, 2, [(1, 4), (3, 7)])) == [(0, 7), (7, 9), (9, 10)]
    assert list(group_bounds(4, 10, 4, [(5, 12)])) == [(4, 10)]


# ---------------------------------------------------------------------------------------------
# timing (printed, not asserted; pytest captures the line: `-rP` or `-s` shows it)


def test_ties_timing():
    """ties over a 4096x4096 tensor x 3 models (bf16-derived, density 0.5), 256-row blocks."""
    shape = (4096, 4096)
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
    models = [
        (base + rng.standard_normal(shape, dtype=np.float32) * 1e-3).astype(ml_dtypes.bfloat16).astype(np.float32)
        for _ in range(3)
    ]
    method = get_method("ties")
    params = TensorParams(
        {"normalize": True, "rescale": False, "rescale_mode": "l1", "lambda": 1.0, "int8_mask": False},
        tuple({"weight": w, "density": 0.5} for w in (1.0, 0.6, 0.3)),
        0,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    merge_tensor(method, "w", base, models, params, 256)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    line = (
        f"\nties 4096x4096 x3 (256-row blocks): {wall:.2f} s wall, {cpu:.2f} s cpu, "
        f"{cpu / base.size * 1e9:.1f} ns/element"
    )
    if os.environ.get("STREAMMERGE_TIME_MERGEKIT"):
        g = TensorGroup.from_tensors([torch.from_numpy(base)] + [torch.from_numpy(m) for m in models], base_index=0)
        t0 = time.perf_counter()
        mk_registry.get("ties")([g], parameters={"weight": [1.0, 0.6, 0.3], "density": 0.5}, dtype=torch.float32)
        line += f"; mergekit {time.perf_counter() - t0:.2f} s"
    print(line)


@pytest.mark.parametrize("kind", ["cont", "bf16", "small"])
def test_topk_resolves_in_one_data_pass(kind):
    """At the real constants, sample + collect resolve ordinary tensors (refinements are no-ops)
    and the collect partials stay small (pairs <= cap, a few percent of a block at most)."""
    from streammerge.methods import Block

    base, models = make((1100, 512), kind, seed=4)
    method = get_method("ties")
    glob = {p.name: p.default for p in method.params if p.scope == "global"}
    params = TensorParams(glob, tuple({"weight": 1.0, "density": d} for d in (0.5, 0.1, 0.9)), 0)
    rows = 64
    blocks = [
        Block("t", base.shape, r0 * 512, base[r0 : r0 + rows], tuple(m[r0 : r0 + rows] for m in models))
        for r0 in range(0, 1100, rows)
    ]
    stats: dict = {}
    sample, collect, *refine = method.passes[:5]
    stats.update(sample.reduce([sample.map(b, params, stats) for b in blocks], params, stats))
    partials = [collect.map(b, params, stats) for b in blocks]
    for part, b in zip(partials, blocks):
        for start, nelem, gt, cin, hc, counts, pairs, window in part.values():
            cap = max(_topk.CAP_MIN, nelem // _topk.CAP_DIV)
            assert pairs[0].size <= cap
            assert counts is None or counts[0].size <= 2 * _topk.MAX_SPLITS + 1
    stats.update(collect.reduce(partials, params, stats))
    assert all(stats[f"ties.topk.{j}.state"] == _topk.DONE for j in range(3))
    for p in refine:
        assert not p.needed(params, stats)
        assert all(p.map(b, params, stats) is None for b in blocks[:2])


def row_structured(shape, kind, seed=0):
    """bf16 base + 3 bf16 fine-tunes whose deltas vary by row, as real task vectors do: 'iid'
    (no row structure), 'lognormal' (row scales e^N(0,1)), 'outliers' (1% of rows x10), 'dead'
    (half the rows barely change, as embeddings of tokens a fine-tune never saw)."""
    rng = np.random.default_rng(seed)

    def bf16(a):
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)

    base = bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    models = []
    for _ in range(3):
        scale = np.ones((shape[0], 1), np.float32)
        if kind == "lognormal":
            scale = np.exp(rng.standard_normal((shape[0], 1))).astype(np.float32)
        elif kind == "outliers":
            scale[rng.random(shape[0]) < 0.01] = 10
        elif kind == "dead":
            scale[rng.random(shape[0]) < 0.5] = 0.01
        models.append(bf16(base + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.002) * scale))
    return base, models


@pytest.mark.parametrize("kind", ["iid", "lognormal", "outliers", "dead"])
def test_row_sample_resolves_in_one_data_pass(kind):
    """The sample reads whole rows (Pass.rows), which differ more than entries do: its bracket
    widens with the spread between rows, so that sample + collect still resolve every selection
    (no refinement pass) when rows differ strongly; the selection is exact in any case."""
    from streammerge.methods.inmemory import tensor_blocks

    shape = (2048, 1024)
    base, models = row_structured(shape, kind)
    method = get_method("ties")
    glob = {p.name: p.default for p in method.params if p.scope == "global"}
    params = TensorParams(glob, tuple({"weight": 1.0, "density": d} for d in (0.5, 0.1, 0.9)), 0)
    sample, collect, *refine = method.passes[:5]
    rows = sample.rows(shape, params)
    assert rows is not None and 6 * rows.size < shape[0]
    stats: dict = {}
    for p, only in ((sample, rows), (collect, None)):
        blocks = tensor_blocks("t", base, models, 300, only)
        stats.update(p.reduce([p.map(b, params, stats) for b in blocks], params, stats))
    assert all(stats[f"ties.topk.{j}.state"] == _topk.DONE for j in range(3))
    assert not any(p.needed(params, stats) for p in refine)
    tk = sample.map.__self__  # the TopK: its keepers, as merge applies them
    for j in range(3):
        tau = models[j] - base
        got = [
            tk.keeper(b, params, stats, j).mask(np.abs(b.models[j] - b.base).reshape(-1).view(np.uint32), b.start)
            for b in tensor_blocks("t", base, models, 300)
        ]
        assert np.array_equal(np.concatenate(got), brute_topk(tau, int(stats[f"ties.topk.{j}.k"])).reshape(-1))


def merge_tensor_skipping(method, name, base, models, params, block_rows):
    """inmemory.merge_tensor, but skipping passes whose `needed(params, stats)` is false (what an
    engine may do to avoid reading blocks for passes without work)."""
    from streammerge.methods import Block

    rows = models[0].shape[0]
    row = int(np.prod(models[0].shape[1:], dtype=np.int64))
    block_rows = block_rows or rows

    def blocks():
        for r0 in range(0, rows, block_rows):
            r1 = min(rows, r0 + block_rows)
            yield Block(name, models[0].shape, r0 * row, base[r0:r1], tuple(m[r0:r1] for m in models))

    stats: dict = {}
    ran = []
    for p in method.passes:
        needed = getattr(p, "needed", None)
        if needed is not None and not needed(params, stats):
            continue
        ran.append(p.name)
        stats = {**stats, **p.reduce([p.map(b, params, stats) for b in blocks()], params, stats)}
    return np.concatenate([method.merge(b, params, stats) for b in blocks()]), ran


@pytest.mark.parametrize(
    "name,kw,passes",
    [
        ("ties", dict(weight=1.0, density=0.5), 2),
        ("ties", dict(weight=1.0, density=1.0), 0),
        ("ties", dict(weight=1.0, density=0.5, rescale=True), 3),
        ("breadcrumbs_ties", dict(weight=1.0, density=0.5, gamma=0.02), 2),
        ("dare_linear", dict(weight=1.0, density=0.5), 1),
        ("dare_linear", dict(weight=1.0, density=0.5, rescale=False), 0),
        ("della", dict(weight=1.0, density=0.5), 2),
        ("sce", dict(select_topk=1.0), 1),
        ("sce", dict(select_topk=0.5), 4),
    ],
)
def test_skipping_unneeded_passes(name, kw, passes):
    base, models = make((1100, 512), "bf16", seed=21)
    method = get_method(name)
    glob, per_model = {}, [{} for _ in models]
    for p in method.params:
        v = kw.get(p.name, p.default)
        if p.scope == "global":
            glob[p.name] = v
        else:
            for d in per_model:
                d[p.name] = v
    params = TensorParams(glob, tuple(per_model), 3)
    full = merge_tensor(method, "t", base, models, params, 100)
    skipped, ran = merge_tensor_skipping(method, "t", base, models, params, 100)
    assert bits_equal(full, skipped) == 0
    assert len(ran) == passes, ran
