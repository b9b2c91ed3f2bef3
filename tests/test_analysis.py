"""Conflict analysis (streammerge.analysis) against brute-force numpy references."""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
import pytest

from streammerge.analysis import analyze_tensor, conflict_method, layer_index, module_kind, summarize
from streammerge.errors import StreammergeError
from streammerge.methods.base import Block, TensorParams

# ---------------------------------------------------------------------------------------------
# data


def bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32).reshape(np.shape(a))


def family(rng, shape, N, kind="bf16"):
    """base + N fine-tunes. bf16: bf16 weights with small updates (many exact-zero and tied
    deltas); sparse: float32 with ~40% untouched entries."""
    base = rng.standard_normal(shape).astype(np.float32)
    if kind == "bf16":
        base = bf16(base * 0.05)
        models = [bf16(base + rng.standard_normal(shape).astype(np.float32) * 0.0005) for _ in range(N)]
    else:
        models = []
        for _ in range(N):
            d = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.6)
            models.append((base + d).astype(np.float32))
    # a few exact cancellations between tasks 0 and 1 (sum == 0 at those entries)
    flat0 = models[0].reshape(-1)
    flat1 = models[1].reshape(-1)
    bflat = base.reshape(-1)
    idx = rng.choice(bflat.size, size=max(1, bflat.size // 20), replace=False)
    d = np.float32(0.25)
    flat0[idx] = bflat[idx] + d
    flat1[idx] = bflat[idx] - d
    if N > 2:
        for m in models[2:]:
            m.reshape(-1)[idx] = bflat[idx]
    return base, models


# ---------------------------------------------------------------------------------------------
# brute-force references (whole arrays, written from the definitions)


def topq_mask(tau_t: np.ndarray, k: int) -> np.ndarray:
    """The k largest |tau| (ties: lowest flat index), by a full sort."""
    n = tau_t.size
    order = np.lexsort((np.arange(n), -np.abs(tau_t.astype(np.float64))))
    keep = np.zeros(n, bool)
    keep[order[:k]] = True
    return keep


def counts_ref(tau: np.ndarray) -> dict:
    """tau: (N, n) float32 task vectors."""
    N = tau.shape[0]
    sgn = np.sign(tau)
    S = tau.astype(np.float64).sum(axis=0)
    elected = np.where(S >= 0, 1.0, -1.0)
    nonzero = np.array([np.count_nonzero(tau[t]) for t in range(N)], np.int64)
    conflict = np.array([np.sum((tau[t] != 0) & (sgn[t] != elected)) for t in range(N)], np.int64)
    pair = np.zeros((N, N), np.int64)
    overlap = np.zeros((N, N), np.int64)
    for t in range(N):
        for u in range(N):
            if t != u:
                pair[t, u] = np.sum(sgn[t] * sgn[u] < 0)
            overlap[t, u] = np.sum((tau[t] != 0) & (tau[u] != 0))
    return {"nonzero": nonzero, "elected_conflict": conflict, "pair_conflict": pair, "pair_overlap": overlap}


def stats_ref(base, models, q=1.0) -> dict:
    tau = np.stack([(np.asarray(m, np.float32) - np.asarray(base, np.float32)).reshape(-1) for m in models])
    N, n = tau.shape
    X = tau.astype(np.float64)
    out = counts_ref(tau)
    out["n"] = n
    out["sq_norm"] = np.array([math.fsum(X[t] * X[t]) for t in range(N)])
    out["dot"] = np.array([[math.fsum(X[t] * X[u]) for u in range(N)] for t in range(N)])
    if q < 1:
        k = int(q * n)
        masks = np.stack([topq_mask(tau[t], k) for t in range(N)])
        out["masks"] = masks
        for key, v in counts_ref(np.where(masks, tau, np.float32(0))).items():
            out[key + "_denoised"] = v
    return out


INT_KEYS = ("nonzero", "elected_conflict", "pair_conflict", "pair_overlap")
DEN_KEYS = tuple(k + "_denoised" for k in INT_KEYS)


def check_stats(got: dict, ref: dict, denoised: bool) -> None:
    assert int(got["n"]) == ref["n"]
    for key in INT_KEYS + (DEN_KEYS if denoised else ()):
        assert got[key].dtype == np.int64, key
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    if not denoised:
        assert not any(k in got for k in DEN_KEYS)
    scale = np.sqrt(np.outer(ref["sq_norm"], ref["sq_norm"])) + 1e-300
    assert got["sq_norm"].dtype == np.float64 and got["dot"].dtype == np.float64
    np.testing.assert_allclose(got["sq_norm"], ref["sq_norm"], rtol=1e-12)
    assert np.all(np.abs(got["dot"] - ref["dot"]) <= 1e-12 * scale)
    np.testing.assert_array_equal(got["dot"], got["dot"].T)
    np.testing.assert_array_equal(np.diagonal(got["dot"]), got["sq_norm"])


def run(base, models, q, block_rows, name="t"):
    return analyze_tensor(conflict_method(len(models), q), name, base, models, block_rows=block_rows)


# ---------------------------------------------------------------------------------------------
# conflict statistics


@pytest.mark.parametrize("N", [2, 3, 4])
@pytest.mark.parametrize("kind", ["bf16", "sparse"])
@pytest.mark.parametrize("shape", [(61, 37), (300,), (9, 4, 5)])
def test_stats_match_brute_force_any_block_size(N, kind, shape):
    rng = np.random.default_rng(zlib.crc32(repr((N, kind, shape)).encode()))  # not hash(): it varies per process
    base, models = family(rng, shape, N, kind)
    rows = shape[0]
    for q in (1.0, 0.3):
        ref = stats_ref(base, models, q)
        first = None
        for br in (None, 1, 2, 7, rows - 1):
            got = run(base, models, q, br)
            check_stats(got, ref, q < 1)
            if q < 1:
                assert int(got["denoise_k"]) == int(q * ref["n"])
                # exactly k counted per task (the top-k selection may include zeros, not counted)
                np.testing.assert_array_equal(ref["masks"].sum(axis=1), int(q * ref["n"]))
            if first is None:
                first = got
            else:  # counts identical, floats equal to float64 rounding
                for key in INT_KEYS + (DEN_KEYS if q < 1 else ()):
                    np.testing.assert_array_equal(got[key], first[key])


def test_large_tensor_exact_topk_with_ties():
    """n > 2**19: the TopK sample/collect path (bracket, heavy bf16 ties, deferred tie cut)."""
    rng = np.random.default_rng(7)
    shape = (1100, 512)  # 563200 elements
    base, models = family(rng, shape, 3, "bf16")
    ref = stats_ref(base, models, 0.2)
    # many deltas share one magnitude: the threshold lands inside a heavy tie
    for br in (64, 333):
        got = run(base, models, 0.2, br)
        check_stats(got, ref, True)
        # the tie cut was resolved by the boundary block itself (TopK's deferred path)
        assert any(int(got[f"conflict.topk.{j}.bstart"]) >= 0 for j in range(3))


def test_zero_sum_elects_plus():
    base = np.zeros((1, 6), np.float32)
    m0 = np.array([[1, -1, 2, 0, 0, -3]], np.float32)
    m1 = np.array([[-1, 1, -1, 0, 5, 3]], np.float32)
    got = run(base, [m0, m1], 1.0, None)
    # sums: 0 (+), 0 (+), 1 (+), 0, 5 (+), 0 (+): task 0 conflicts at p=1,5; task 1 at p=0,2
    np.testing.assert_array_equal(got["elected_conflict"], [2, 2])
    np.testing.assert_array_equal(got["nonzero"], [4, 5])
    np.testing.assert_array_equal(got["pair_conflict"], [[0, 4], [4, 0]])
    np.testing.assert_array_equal(got["pair_overlap"], [[4, 4], [4, 5]])
    np.testing.assert_array_equal(got["dot"], [[15, -13], [-13, 37]])


def test_denoised_by_hand():
    base = np.zeros((2, 3), np.float32)
    m0 = np.array([[4, -1, 1], [0, -2, 3]], np.float32)  # |.|: 4 1 1 0 2 3
    m1 = np.array([[-1, 5, -2], [1, 0, -2]], np.float32)  # |.|: 1 5 2 1 0 2
    # q = 0.5, k = 3: task 0 keeps p = 0, 5, 4; task 1 keeps p = 1, then ties at 2: p = 2, 5
    for br in (None, 1):
        got = run(base, [m0, m1], 0.5, br)
        # tau^0 = [4 0 0 0 -2 3], tau^1 = [0 5 -2 0 0 -2]; sums 4 5 -2 0 -2 1
        np.testing.assert_array_equal(got["nonzero_denoised"], [3, 3])
        np.testing.assert_array_equal(got["elected_conflict_denoised"], [0, 1])  # task 1 at p=5
        np.testing.assert_array_equal(got["pair_conflict_denoised"], [[0, 1], [1, 0]])
        np.testing.assert_array_equal(got["pair_overlap_denoised"], [[3, 1], [1, 3]])
        # q = 0.34, k = 2: task 1 keeps p = 1 and, of the tie at |2| (p = 2, 5), the lower p = 2
        got = run(base, [m0, m1], 0.34, br)
        # tau^0 = [4 0 0 0 0 3], tau^1 = [0 5 -2 0 0 0]
        np.testing.assert_array_equal(got["nonzero_denoised"], [2, 2])
        np.testing.assert_array_equal(got["elected_conflict_denoised"], [0, 0])
        np.testing.assert_array_equal(got["pair_overlap_denoised"], [[2, 0], [0, 2]])


def test_scalar_small_and_degenerate():
    rng = np.random.default_rng(3)
    base = np.float32(0.5)
    models = [np.float32(0.75), np.float32(0.25), np.float32(0.5)]
    got = run(np.asarray(base), [np.asarray(m) for m in models], 0.5, None)  # k = int(0.5) = 0
    assert int(got["n"]) == 1 and int(got["denoise_k"]) == 0
    np.testing.assert_array_equal(got["nonzero"], [1, 1, 0])
    np.testing.assert_array_equal(got["elected_conflict"], [0, 1, 0])
    np.testing.assert_array_equal(got["nonzero_denoised"], [0, 0, 0])
    # identical models: nothing nonzero, cosines undefined (norm 0)
    b = rng.standard_normal((5, 5)).astype(np.float32)
    got = run(b, [b.copy(), b.copy()], 0.5, 2)
    for key in INT_KEYS + DEN_KEYS:
        assert not got[key].any()
    assert not got["dot"].any()
    # q = 0: nothing counted
    base, models = family(rng, (20, 10), 3, "sparse")
    got = run(base, models, 0.0, 3)
    for key in DEN_KEYS:
        assert not got[key].any()


def test_errors():
    with pytest.raises(ValueError):
        conflict_method(2, 1.5)
    with pytest.raises(ValueError):
        conflict_method(0)
    b = np.zeros((2, 2), np.float32)
    with pytest.raises(StreammergeError):
        analyze_tensor(conflict_method(3), "x", b, [b, b])
    m = conflict_method(2)
    assert m.merge is None and m.base == "required"
    blk = Block(tensor="x", shape=(2, 2), start=0, base=None, models=(b, b))
    with pytest.raises(StreammergeError):
        m.passes[-1].map(blk, TensorParams({}, ({}, {})), {})


def test_stats_roundtrip_npz():
    rng = np.random.default_rng(5)
    base, models = family(rng, (40, 16), 3, "bf16")
    got = run(base, models, 0.25, 6)
    buf = io.BytesIO()
    np.savez(buf, **got)
    buf.seek(0)
    back = dict(np.load(buf, allow_pickle=False))
    assert set(back) == set(got)
    for k, v in got.items():
        np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    "name, kind, layer",
    [
        ("model.layers.0.self_attn.q_proj.weight", "attention", 0),
        ("model.layers.12.self_attn.o_proj.bias", "attention", 12),
        ("model.layers.3.mlp.down_proj.weight", "mlp", 3),
        ("model.layers.3.block_sparse_moe.experts.1.w2.weight", "mlp", 3),
        ("model.layers.3.feed_forward.w1.weight", "mlp", 3),
        ("model.layers.5.input_layernorm.weight", "norm", 5),
        ("model.layers.5.post_attention_layernorm.weight", "norm", 5),
        ("model.layers.5.self_attn.q_norm.weight", "norm", 5),
        ("model.norm.weight", "norm", None),
        ("model.embed_tokens.weight", "embedding", None),
        ("lm_head.weight", "embedding", None),
        ("transformer.wte.weight", "embedding", None),
        ("transformer.h.4.attn.c_attn.weight", "attention", 4),
        ("transformer.h.4.ln_1.weight", "norm", 4),
        ("transformer.ln_f.weight", "norm", None),
        ("model.layers.2.something.weight", "other", 2),
        ("score.weight", "other", None),
    ],
)
def test_names(name, kind, layer):
    assert module_kind(name) == kind
    assert layer_index(name) == layer


# ---------------------------------------------------------------------------------------------
# summary against a brute force over a fake model


def fake_model(rng, N, L=3, d=16, V=40):
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (d // 2, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (2 * d, d),
                p + "mlp.down_proj.weight": (d, 2 * d),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    tensors = {}
    for j, (name, shape) in enumerate(shapes.items()):
        kind = "bf16" if j % 2 else "sparse"
        base, models = family(rng, shape, N, kind)
        scale = 1.0 + 0.5 * (j % 3)  # unequal norms across tensors
        models = [(base + (m - base) * np.float32(scale)).astype(np.float32) for m in models]
        tensors[name] = (base, models)
    return tensors


def summary_ref(tensors, N, L, q, denoised):
    """Concatenate the (masked) task vectors of each group and apply the definitions."""
    names_by = {}

    def kind_of(name):
        if "self_attn" in name:
            return "attention"
        if "mlp" in name:
            return "mlp"
        if "norm" in name:
            return "norm"
        return "embedding"

    tau_of, mask_of = {}, {}
    for name, (base, models) in tensors.items():
        tau = np.stack([(m - base).reshape(-1) for m in models]).astype(np.float32)
        tau_of[name] = tau
        n = tau.shape[1]
        mask_of[name] = (
            np.stack([topq_mask(tau[t], int(q * n)) for t in range(N)]) if denoised else np.ones_like(tau, bool)
        )
        li = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        names_by.setdefault(("layer", li), []).append(name)
        names_by.setdefault(("kind", kind_of(name)), []).append(name)
        names_by.setdefault(("lk", li, kind_of(name)), []).append(name)

    def group(names):
        tau = np.concatenate([tau_of[n] for n in names], axis=1)
        th = np.where(np.concatenate([mask_of[n] for n in names], axis=1), tau, np.float32(0))
        sg = np.sign(th)
        S = th.astype(np.float64).sum(axis=0)
        el = np.where(S >= 0, 1.0, -1.0)
        P = tau.shape[1]
        d = np.sum((th != 0) & (sg != el)) / (N * P)
        fr = []
        for t in range(N):
            for u in range(t + 1, N):
                c = np.sum(sg[t] * sg[u] < 0)
                den = np.sum((th[t] != 0) & (th[u] != 0)) if denoised else P
                fr.append(c / den if den else 0.0)
        X = tau.astype(np.float64)
        norms = np.sqrt((X * X).sum(axis=1))
        cos = (X @ X.T) / np.outer(norms, norms)
        return {"n": P, "d": d, "pairwise": float(np.mean(fr)), "norms": norms, "cosine": cos, "sq": norms**2}

    return group, names_by


@pytest.mark.parametrize("N", [2, 3, 4])
def test_summary_matches_brute_force(N):
    rng = np.random.default_rng(100 + N)
    L, q = 3, 0.3
    tensors = fake_model(rng, N, L)
    tasks = [f"task{t}" for t in range(N)]
    per_tensor = {}
    for j, (name, (base, models)) in enumerate(tensors.items()):
        st = analyze_tensor(conflict_method(N, q), name, base, models, block_rows=1 + j % 5)
        buf = io.BytesIO()  # as the engine stores them
        np.savez(buf, **st)
        buf.seek(0)
        per_tensor[name] = dict(np.load(buf, allow_pickle=False))
    for denoised in (False, True):
        s = summarize(per_tensor, tasks, L, denoised)
        json.dumps(s, allow_nan=False)
        assert s["tasks"] == tasks and s["num_layers"] == L
        assert s["variant"] == ("denoised" if denoised else "elected")
        group, names_by = summary_ref(tensors, N, L, q, denoised)

        def close(got, ref):
            for key in ("n", "d", "pairwise"):
                assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key

        assert [ly["layer"] for ly in s["layers"]] == list(range(L))
        for i, ly in enumerate(s["layers"]):
            ref = group(names_by[("layer", i)])
            close(ly, ref)
            assert set(ly["by_kind"]) == {"attention", "mlp", "norm"}
            for kind, g in ly["by_kind"].items():
                close(g, group(names_by[("lk", i, kind)]))
            assert [ly["norms"][t] for t in tasks] == pytest.approx(list(ref["norms"]), rel=1e-12)
            np.testing.assert_allclose(ly["cosine"], ref["cosine"], rtol=1e-10, atol=1e-12)
        assert set(s["kinds"]) == {"attention", "mlp", "norm", "embedding"}
        for kind, g in s["kinds"].items():
            close(g, group(names_by[("kind", kind)]))
        close(s["outside_layers"], group(names_by[("layer", None)]))
        everything = list(tensors)
        whole = group(everything)
        assert [s["norms"][t] for t in tasks] == pytest.approx(list(whole["norms"]), rel=1e-12)
        np.testing.assert_allclose(s["cosine"], whole["cosine"], rtol=1e-10, atol=1e-12)
        for t, task in enumerate(tasks):
            shares = s["norm_share"][task]
            assert set(shares) == {"attention", "mlp", "norm", "embedding", "other"}
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
            assert shares["other"] == 0.0
            for kind in ("attention", "mlp", "norm", "embedding"):
                ref_share = group(names_by[("kind", kind)])["sq"][t] / whole["sq"][t]
                assert shares[kind] == pytest.approx(ref_share, rel=1e-12)
            am = s["attention_vs_mlp"][task]
            att = group(names_by[("kind", "attention")])["sq"][t]
            mlp = group(names_by[("kind", "mlp")])["sq"][t]
            assert am["attention"] == pytest.approx(att / (att + mlp), rel=1e-12)
            assert am["attention"] + am["mlp"] == pytest.approx(1.0, abs=1e-12)


def test_summary_edge_cases():
    rng = np.random.default_rng(9)
    base, models = family(rng, (8, 8), 2, "sparse")
    st = analyze_tensor(conflict_method(2), "model.layers.0.mlp.up_proj.weight", base, models)
    zero = analyze_tensor(conflict_method(2), "model.layers.7.mlp.up_proj.weight", base, [base, base])
    s = summarize({"model.layers.0.mlp.up_proj.weight": st, "model.layers.7.mlp.up_proj.weight": zero}, ["a", "b"], 2, False)
    json.dumps(s, allow_nan=False)
    assert s["layers"][1] == {
        "layer": 1, "n": 0, "d": 0.0, "pairwise": 0.0, "by_kind": {},
        "norms": {"a": 0.0, "b": 0.0}, "cosine": [[0.0, 0.0], [0.0, 0.0]],
    }  # fmt: skip
    assert s["outside_layers"]["n"] == 64  # layer 7 >= num_layers: outside
    assert s["outside_layers"]["d"] == 0.0
    assert s["norm_share"]["a"]["mlp"] == 1.0
    assert s["layers"][0]["cosine"][0][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="denoised"):
        summarize({"model.layers.0.mlp.up_proj.weight": st}, ["a", "b"], 2, True)
    with pytest.raises(ValueError, match="expected"):
        summarize({"model.layers.0.mlp.up_proj.weight": st}, ["a", "b", "c"], 2, False)


def test_method_pickles():
    import pickle

    rng = np.random.default_rng(11)
    base, models = family(rng, (30, 10), 3, "bf16")
    for q in (1.0, 0.4):
        m = pickle.loads(pickle.dumps(conflict_method(3, q)))
        assert m.name == "conflict-analysis" and m.merge is None
        got = analyze_tensor(m, "x", base, models, block_rows=4)
        check_stats(got, stats_ref(base, models, q), q < 1)
