"""ops/consensus.py: the one numpy and the one torch TIES sign election agree bit for bit, with
each other and with a plain reference written from the definition (signed zeros, NaN, exact
ties at zero, weights, several shapes); the routed runtime's `ties_torch` is that function."""

from __future__ import annotations

import numpy as np
import pytest

from streammerge.ops.consensus import (
    consensus,
    consensus_torch,
    disjoint_mean,
    disjoint_mean_torch,
    sum_into,
    ties_merge,
    ties_torch,
)

torch = pytest.importorskip("torch")


def reference(hats, weights=None, weigh_values=False):
    """(S, D) from the definition, one float32 operation at a time, no buffers reused."""
    total = hats[0].copy()
    for h in hats[1:]:
        total = (total + h).astype(np.float32)
    elected = np.where(total >= 0, np.float32(1), np.float32(-1))
    S = D = None
    for i, h in enumerate(hats):
        counted = (h * elected) > 0  # NaN and zeros never count
        mass = counted.astype(np.float32) * np.float32(1 if weights is None else weights[i])
        kept = (h * (mass if weigh_values else counted)).astype(np.float32)
        S = kept if S is None else (S + kept).astype(np.float32)
        D = mass if D is None else (D + mass).astype(np.float32)
    return S, D


def hats_of(seed, n_models, shape):
    rng = np.random.default_rng(seed)
    hats = []
    for _ in range(n_models):
        h = rng.standard_normal(shape).astype(np.float32)
        flat = h.reshape(-1)
        pick = rng.random(flat.size)
        flat[pick < 0.1] = 0.0
        flat[(pick >= 0.1) & (pick < 0.15)] = -0.0
        flat[(pick >= 0.15) & (pick < 0.17)] = np.nan
        flat[(pick >= 0.17) & (pick < 0.25)] = np.float32(0.5)  # exact cancellations in the sum
        flat[(pick >= 0.25) & (pick < 0.33)] = np.float32(-0.5)
        hats.append(h)
    return hats


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def numpy_pair(hats, weights, weigh_values=False):
    total = sum_into(hats, np.empty_like(hats[0]))
    S, D, mb = np.empty_like(total), np.empty_like(total), np.empty(total.shape, bool)
    consensus(hats, total, S, D, mb, np.empty_like(total), weights, weigh_values)
    return S, D, mb


CASES = [(1, (17,)), (2, (5, 9)), (3, (64, 33)), (5, (3, 4, 7))]


@pytest.mark.parametrize("n_models,shape", CASES)
@pytest.mark.parametrize("weighted", ["no", "yes", "values"])  # values: SCE's h * (w * counted)
def test_numpy_and_torch_election_agree_bit_for_bit(n_models, shape, weighted):
    hats = hats_of(n_models * 7 + len(shape), n_models, shape)
    # negative weights too: w * (not counted) is then -0, which signs the zero terms of S
    weights = [np.float32(w) for w in np.linspace(-0.7, 1.7, n_models)] if weighted != "no" else None
    values = weighted == "values"
    originals = [h.copy() for h in hats]
    S_ref, D_ref = reference(hats, weights, values)

    S, D, mb = numpy_pair(hats, weights, values)
    assert np.array_equal(bits(S), bits(S_ref)) and np.array_equal(bits(D), bits(D_ref))
    assert all(np.array_equal(bits(h), bits(o)) for h, o in zip(hats, originals))  # inputs untouched

    for inplace in (True, False):
        ts = [torch.from_numpy(h.copy()) for h in hats]
        St, Dt = consensus_torch(lambda ts=ts: ts, weights, inplace=inplace, weigh_values=values)
        assert np.array_equal(bits(St.numpy()), bits(S)), inplace
        assert np.array_equal(bits(Dt.numpy()), bits(D)), inplace
        if not inplace:
            assert all(np.array_equal(bits(t.numpy()), bits(o)) for t, o in zip(ts, originals))

    mean = disjoint_mean(S.copy(), D.copy(), mb)
    mean_t = disjoint_mean_torch(torch.from_numpy(S.copy()), torch.from_numpy(D.copy()))
    want = (S_ref / np.where(D_ref == 0, np.float32(1), D_ref)).astype(np.float32)
    assert np.array_equal(bits(mean), bits(want)) and np.array_equal(bits(mean_t.numpy()), bits(want))


@pytest.mark.parametrize("n_models,shape", CASES)
def test_ties_merge_and_routing_ties_torch(n_models, shape):
    """The unweighted disjoint mean both 1bit-Merging paths and the routed runtime use."""
    from streammerge.routing.encoded import ties_torch as routed

    assert routed is ties_torch  # one implementation, importable where the runtime had its own
    hats = hats_of(n_models, n_models, shape)
    S_ref, D_ref = reference(hats)
    want = (S_ref / np.where(D_ref == 0, np.float32(1), D_ref)).astype(np.float32)
    assert np.array_equal(bits(ties_merge(hats)), bits(want))
    ts = [torch.from_numpy(h.copy()) for h in hats]
    assert np.array_equal(bits(ties_torch(ts).numpy()), bits(want))
    assert all(np.array_equal(bits(t.numpy()), bits(h)) for t, h in zip(ts, hats))  # not modified
    assert ties_merge([]) is None


def test_weigh_values_needs_weights():
    hats = hats_of(1, 2, (4,))
    with pytest.raises(ValueError, match="weights"):
        numpy_pair(hats, None, True)
    with pytest.raises(ValueError, match="weights"):
        consensus_torch(lambda: [torch.from_numpy(h) for h in hats], None, weigh_values=True)


def test_generator_hats_are_rebuilt_for_each_pass():
    """consensus_torch accepts hats rebuilt on each call (kernels/onebit.py does, to save memory)."""
    hats = hats_of(3, 4, (8, 8))
    calls = []

    def rebuild():
        calls.append(1)
        return (torch.from_numpy(h.copy()) for h in hats)

    S, D = consensus_torch(rebuild)
    S_ref, D_ref = reference(hats)
    assert len(calls) == 2
    assert np.array_equal(bits(S.numpy()), bits(S_ref)) and np.array_equal(bits(D.numpy()), bits(D_ref))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_hat_leaves_S_nonfinite_whether_it_counts_or_not(bad):
    """The engine checks a ties merge's result for NaN/Inf in place of its inputs
    (MergeMethod.nonfinite_spreads): a non-finite hat must show in S at its entry, counted
    (inf with the elected sign) or not (NaN never counts; an inf of the other sign is masked
    by a multiplication, inf * 0 = NaN), in both implementations."""
    rng = np.random.default_rng(7)
    hats = [rng.standard_normal(64).astype(np.float32) for _ in range(3)]
    hats[1][5] = bad
    hats[0][9], hats[1][9] = np.float32(-np.inf), np.float32(np.inf)  # NaN sum: elected -1,
    # so +inf does not count (inf * 0 is NaN) while -inf does
    n = hats[0].size
    total = sum_into(hats, np.empty(n, np.float32))
    S, D, mb, tmp = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, bool), np.empty(n, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        consensus(hats, total, S, D, mb, tmp)
        St, _ = consensus_torch(lambda: [torch.from_numpy(h.copy()) for h in hats])
    assert not np.isfinite(S[5]) and not np.isfinite(S[9])
    assert np.isfinite(np.delete(S, [5, 9])).all()
    assert not torch.isfinite(St[5]) and not torch.isfinite(St[9])
