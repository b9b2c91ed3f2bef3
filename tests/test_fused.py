"""ops/fused.py: the compiled merge loop gives the numpy code's bits for every method of the
TIES family it serves, parameter and input kind (NaN, inf, signed zeros, exact ties, zero
divisors, negative weights), and the numpy code stays the path without numba."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import make, tensor_params
from streammerge.methods import get_method
from streammerge.methods.inmemory import merge_tensor
from streammerge.ops import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not importable")

CASES = [
    ("ties", dict(weight=[0.5, 0.3, 0.4], density=0.5)),
    ("ties", dict(weight=[1.0, -0.7, 0.4], density=[0.2, 1.0, 0.0], normalize=False, **{"lambda": 0.7})),
    ("ties", dict(weight=0.5, density=0.3, rescale=True, rescale_mode="inverse_density")),
    ("ties", dict(weight=0.5, density=0.4, rescale=True)),  # l1
    ("dare_ties", dict(weight=[0.5, 0.3, 0.4], density=0.5)),
    ("dare_ties", dict(weight=0.6, density=[0.3, 0.9, 1.0], normalize=True, **{"lambda": 1.5})),
    ("dare_ties", dict(weight=0.5, density=0.5, rescale_mode="inverse_density")),
    ("dare_linear", dict(weight=[0.5, 0.25, 0.5], density=0.5)),
    ("dare_linear", dict(weight=[0.5, -0.5, 0.0], density=0.5, normalize=True)),  # weights sum to 0
    ("breadcrumbs", dict(weight=0.5, density=0.8, gamma=0.05)),
    ("breadcrumbs_ties", dict(weight=[0.5, 0.3, 0.4], density=0.7, gamma=0.02, normalize=True)),
]


def _hostile(base, models, seed):
    """Plant NaN, inf, -0.0 and equal-but-opposite deltas (exact sign ties) in the inputs."""
    rng = np.random.default_rng(seed)
    flat = [m.reshape(-1) for m in models]
    n = flat[0].size
    for m in flat:
        m[rng.integers(0, n, 3)] = np.inf
        m[rng.integers(0, n, 3)] = -np.inf
        m[rng.integers(0, n, 3)] = np.nan
    b = base.reshape(-1)
    pos = rng.integers(0, n, 50)
    flat[0][pos] = b[pos] + np.float32(0.5)
    flat[1][pos] = b[pos] - np.float32(0.5)  # total 0 (+0 elects +), one counted each side
    zero = rng.integers(0, n, 20)
    b[zero] = 0.0
    for m in flat:
        m[zero] = -0.0  # tau = -0.0 - 0.0 = -0.0
    return base, models


@pytest.mark.parametrize("name,parameters", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("kind", ["cont", "small", "hostile"])
@pytest.mark.parametrize("block_rows", [None, 5])
def test_fused_merge_gives_the_numpy_bits(monkeypatch, name, parameters, kind, block_rows):
    shape = (37, 1100)  # rows longer than a tile, a row group of several tiles and a tail
    base, models = make(shape, "small" if kind == "small" else "cont", seed=3)
    if kind == "hostile":
        base, models = _hostile(base, list(models), seed=4)
    method = get_method(name)
    params = tensor_params(name, len(models), seed=7, **parameters)
    tensor = "model.layers.0.mlp.up_proj.weight"
    calls = []
    real = fused.family_merge
    monkeypatch.setattr(fused, "family_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = merge_tensor(method, tensor, base, list(models), params, block_rows)
    assert calls, "the compiled loop was not used"
    monkeypatch.setattr(fused, "available", lambda: False)
    want = merge_tensor(method, tensor, base, list(models), params, block_rows)
    assert got.dtype == want.dtype == np.float32
    # NaN is NaN: x86 makes inf * 0 a NaN with the sign bit set where numpy's loops may not
    # (the engine refuses a non-finite result's inputs anyway: methods' nonfinite_spreads)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    differ = (got.view(np.uint32) != want.view(np.uint32)) & ~nan
    assert not differ.any(), f"{int(differ.sum())} entries differ"
    if kind == "hostile":
        assert nan.any()  # the planted non-finite inputs reached the result


BITS_CASES = [
    ("task_arithmetic", dict(weight=[0.5, 0.3, 0.4])),
    ("task_arithmetic", dict(weight=[1.0, -0.7, 0.4], normalize=True, **{"lambda": 0.7})),
    ("task_arithmetic", dict(weight=[0.5, -0.25, -0.25], normalize=True)),  # weights sum to 0: no divisor
    ("task_arithmetic", dict(weight=[3e38, 1.0, 2.0], **{"lambda": 1e6})),  # overflows from finite inputs
    ("linear", dict(weight=[0.5, 0.3, 0.2])),
    ("linear", dict(weight=[1.0, -0.7, 0.4], normalize=False)),
    ("linear", dict(weight=[0.5, -0.25, -0.25])),  # weights sum to 0: a division by zero
]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    from streammerge import dtypes

    return dtypes.from_float32(np.ascontiguousarray(x, np.float32), dtypes.BF16)


@pytest.mark.parametrize("name,parameters", BITS_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BITS_CASES)])
@pytest.mark.parametrize("kind", ["cont", "small", "hostile"])
def test_bf16_bits_merge_gives_the_numpy_bits(name, parameters, kind):
    """A method's compiled bf16-bits merge (MergeMethod.merge_bf16) against its numpy merge of
    the widened inputs, then the engine's rounding: the same bf16 words (NaN as NaN) and the
    same finiteness, on a group of several tiles and a tail."""
    from streammerge import dtypes

    shape = (7, 1100)
    base, models = make(shape, "small" if kind == "small" else "cont", seed=5)
    if kind == "hostile":
        base, models = _hostile(base, list(models), seed=6)
        base.reshape(-1)[:40] = np.float32(1e-40)  # subnormals: bf16 keeps some
        models[0].reshape(-1)[40:80] = np.float32(-1e-39)
    bits = [_bf16_bits(x).reshape(-1) for x in (base, *models)]
    wide = [(b.astype(np.uint32) << 16).view(np.float32).reshape(shape) for b in bits]
    method = get_method(name)
    params = tensor_params(name, len(models), seed=0, **parameters)
    with np.errstate(all="ignore"):
        merged = merge_tensor(method, "t", wide[0], wide[1:], params, None)
        want = np.zeros(merged.size, np.uint16)
        want_finite = dtypes.float32_into_finite(merged, dtypes.BF16, want)
        got = np.zeros(merged.size, np.uint16)
        got_finite = method.merge_bf16(bits[0], bits[1:], params, got)
    assert got_finite == want_finite
    nan = (want & 0x7FFF) > 0x7F80
    assert np.array_equal((got & 0x7FFF) > 0x7F80, nan)
    differ = (got != want) & ~nan
    assert not differ.any(), f"{int(differ.sum())} entries differ"
    overflow = max(abs(w) for w in parameters["weight"]) > 1e30
    assert want_finite == (kind != "hostile" and not overflow and not (name == "linear" and sum(parameters["weight"]) == 0))


@pytest.mark.parametrize("method,imports", [("slerp", False), ("task_arithmetic", True), ("ties", True)])
def test_only_methods_with_compiled_loops_import_numba(tmp_path, method, imports):
    """A bf16 build of a method without compiled loops leaves numba out of the process (its
    import and cache load, ~0.4 s, would buy nothing); task_arithmetic (its bf16-bits merge)
    and a TIES-family build bring it in. Seen in the build's own `-X importtime` lines."""
    import os
    import subprocess
    import sys

    import fault_inject
    import synth_checkpoints as synth
    from helpers import write_recipe

    shape = synth.ModelShape(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=256)
    base, fts = synth.make_family(tmp_path / "m", shape, n_finetunes=2, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", fault_inject.recipe_for(method, base, fts))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("STREAMMERGE_NO_NUMBA", None)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "streammerge", "build", str(recipe),
                          "--store", str(tmp_path / "job.zarr"), "--no-progress"],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    imported = any(line.rstrip().endswith("| numba") for line in out.stderr.splitlines())
    assert imported == imports


def test_numpy_path_when_numba_is_refused(monkeypatch):
    """STREAMMERGE_NO_NUMBA keeps the numpy code (a fresh interpreter: the flag is read at import)."""
    import subprocess
    import sys

    code = "from streammerge import jit; print(jit.available())"
    env = {"STREAMMERGE_NO_NUMBA": "1", "PATH": "/usr/bin:/bin"}
    import os

    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compiled_bf16_conversions_give_the_numpy_bits(monkeypatch):
    """dtypes' compiled widening and rounding against its numpy code, on every bf16 pattern and
    the float32 values that decide rounding (NaN, inf, halfway cases, the largest finite)."""
    from streammerge import dtypes

    raw = np.arange(1 << 16, dtype=np.uint16)
    # every high half (sign, exponent, top mantissa) with the low halves that decide rounding
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000], np.uint32)
    x = (high[:, None] | low[None, :]).reshape(-1).view(np.float32)
    finite_x = x[np.isfinite(x)]

    def run():
        wide = dtypes.to_float32(raw, dtypes.BF16, np.zeros(raw.shape, np.float32))
        rounded = np.zeros(x.size, np.uint16)
        flags = (dtypes.float32_into_finite(x, dtypes.BF16, rounded),
                 dtypes.float32_into_finite(finite_x, dtypes.BF16, np.zeros(finite_x.size, np.uint16)))
        return wide.view(np.uint32).copy(), rounded, flags

    assert fused.available() and dtypes.loaded()  # numba in the process: dtypes uses its loops
    got = run()
    monkeypatch.setattr(dtypes, "loaded", lambda: False)
    want = run()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] == (False, True)
