"""Parity of arcee_fusion with mergekit's own method (called in-process on the same float32
tensors of at most 10^6 entries, where mergekit's quartiles are exact).

The bound: mergekit's softmax and KL are float32 sums in torch's order, ours float64 (then
rounded to float32). A KL of two near-equal distributions is a sum of cancelling terms, so
mergekit's is off by up to a few float32 units of 1 in absolute terms (softmax sums shift every
log(p/q) of a vector alike): delta = 2e-6 bounds it (5.2e-7 measured on these tensors). An
importance |d| * KL then differs by at most delta * max|d|, a quartile too, and the threshold
median + 1.5 (q3 - q1) by 4 delta max|d|. So: the thresholds agree within ATOL = 1e-5 max|d|,
and the outputs are bit-identical at every entry except those whose importance (mergekit's)
lies within ATOL of mergekit's threshold. Ours do not depend on the block size at all."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods import arcee_fusion as mk_fusion  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods.arcee_fusion import threshold  # noqa: E402
from streammerge.methods.inmemory import merge_tensor, run_passes  # noqa: E402

pytestmark = pytest.mark.mergekit
PARAMS = TensorParams({}, ({},))
DELTA = 2e-6  # bound of the KL's absolute float32 error (module docstring)


def atol(base, other) -> float:
    return 5 * DELTA * float(np.abs(other.astype(np.float64) - base).max())


def mergekit_fusion(base, other):
    group = TensorGroup.from_tensors([torch.from_numpy(base), torch.from_numpy(other)], base_index=0, name="w")
    (out,) = registry.get("arcee_fusion")([group], parameters={})
    imp = mk_fusion._compute_importance(torch.from_numpy(other), torch.from_numpy(base))
    thr = mk_fusion.DynamicThresholdFusion().calculate_dynamic_threshold(imp)
    return out.numpy(), imp.expand(np.shape(base)).numpy() if base.ndim else imp.numpy(), float(thr)


def pair(shape, seed, scale=1.0):
    """A base and a fine-tune: mixed-magnitude changes, some vectors left unchanged (KL 0)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(rng.standard_normal(shape) * scale, np.float32)
    delta = rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 0, shape)
    if len(shape) >= 2:
        delta.reshape(-1, shape[-1])[::5] = 0
    return base, np.asarray(base + delta, np.float32)


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7), (1, 1), (2,), (), (300, 1100), (600_000,)])
@pytest.mark.parametrize("seed", [0, 1])
def test_arcee_fusion_matches_mergekit(shape, seed):
    base, other = pair(shape, seed, scale=[1.0, 4.0][seed])
    want, imp, mk_thr = mergekit_fusion(base, other)
    method = get_method("arcee_fusion")
    got = merge_tensor(method, "w", base, [other], PARAMS)
    ours_thr = float(threshold(run_passes(method, "w", base, [other], PARAMS), base.size))
    tol = atol(base, other)
    assert abs(ours_thr - mk_thr) <= tol, (ours_thr, mk_thr)
    near = np.abs(imp - mk_thr) <= tol
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not (differ & ~near).any(), int((differ & ~near).sum())
    assert differ.sum() <= max(1, base.size // 100)
    taken = want != base
    assert 0 < taken.sum() < base.size or base.size <= 2  # the mask does select, not all


@pytest.mark.parametrize("shape", [(37, 29), (64,), (3, 5, 7)])
def test_arcee_fusion_does_not_depend_on_the_blocks(shape):
    base, other = pair(shape, 7)
    method = get_method("arcee_fusion")
    whole = merge_tensor(method, "w", base, [other], PARAMS)
    for block_rows in (1, 2, 5):
        assert np.array_equal(merge_tensor(method, "w", base, [other], PARAMS, block_rows).view(np.uint32), whole.view(np.uint32))


def test_arcee_fusion_large_tensor_uses_exact_quartiles():
    """Above 10^6 entries mergekit samples; ours are the exact quartiles of the importance."""
    from streammerge.methods.arcee_fusion import importance
    from streammerge.methods.base import Block

    base, other = pair((1100, 1000), 3)
    method = get_method("arcee_fusion")
    stats = run_passes(method, "w", base, [other], PARAMS, 64)
    block = Block("w", base.shape, 0, base, (other,))
    imp = np.sort(importance(block, stats, slice(0, base.size)))
    n = imp.size
    q1, q2, q3 = imp[(n - 1) // 4], imp[(n - 1) // 2], imp[3 * (n - 1) // 4]
    assert threshold(stats, n) == np.float32(q2 + np.float32(1.5) * np.float32(q3 - q1))


def test_arcee_fusion_contract():
    base, other = pair((4, 4), 0)
    m = get_method("arcee_fusion")
    with pytest.raises(ValueError, match="exactly 1 other model"):
        merge_tensor(m, "w", base, [other, other], TensorParams({}, ({}, {})))
    with pytest.raises(ValueError):
        merge_tensor(m, "w", None, [other], PARAMS)


def test_recipe_builds_mergekit_result(synth_family, tmp_path):
    """A recipe built end to end (streamed, small blocks) against mergekit per tensor, with the
    bound above."""
    from click.testing import CliRunner

    from helpers import load_model_tensors, write_recipe
    from streammerge.cli import main as cli

    base, fts = synth_family(dtype="float32", delta_scale=0.004)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "arcee_fusion", "base_model": str(base), "models": [{"model": str(fts[0])}], "dtype": "float32",
    })
    res = CliRunner().invoke(cli, ["build", str(recipe), str(tmp_path / "out"), "--block-elements", "2000", "--no-progress"])
    assert res.exit_code == 0, res.output
    got = load_model_tensors(tmp_path / "out")
    b, ft = load_model_tensors(base), load_model_tensors(fts[0])
    for tensor, value in got.items():
        want, imp, thr = mergekit_fusion(b[tensor].numpy(), ft[tensor].numpy())
        near = np.abs(imp - thr) <= atol(b[tensor].numpy(), ft[tensor].numpy())
        differ = value.numpy().view(np.uint32) != want.view(np.uint32)
        assert not (differ & ~near).any(), tensor
    res = CliRunner().invoke(cli, ["methods", "arcee_fusion"])
    assert res.exit_code == 0 and "arcee_fusion" in res.output


@pytest.mark.parametrize("name, parameters", [("arcee_fusion", {}), ("nearswap", {"t": 0.001})])
def test_a_second_model_is_a_recipe_error(name, parameters, synth_family, tmp_path):
    from click.testing import CliRunner

    from helpers import write_recipe
    from streammerge.cli import main as cli

    base, fts = synth_family()
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": name, "base_model": str(base), "models": [{"model": str(f)} for f in fts[:2]], "parameters": parameters,
    })
    res = CliRunner().invoke(cli, ["build", str(recipe), "--store", str(tmp_path / "j.zarr")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"error: {recipe}:3: models: merge method {name} takes 1 model besides the base_model, got 2"


def test_resume_reads_the_stats_back(synth_family, tmp_path):
    """Blocks merged after a restart use the softmax and quartile stats kept in the store: the
    export is byte-identical to the uninterrupted one (a 1-D and a 2-D tensor lose blocks)."""
    from click.testing import CliRunner

    from helpers import write_recipe
    from streammerge.cli import main as cli

    base, fts = synth_family(dtype="float32", delta_scale=0.004)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "arcee_fusion", "base_model": str(base), "models": [{"model": str(fts[0])}], "dtype": "float32",
    })
    args = ["build", str(recipe), "--store", str(tmp_path / "j.zarr"), "--block-elements", "2000", "--no-progress"]
    assert CliRunner().invoke(cli, args + ["--export", str(tmp_path / "a")]).exit_code == 0
    done = tmp_path / "j.zarr" / "done" / "merge" / "tensors"
    lost = [m for t in ("model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight") for m in (done / t).iterdir()]
    for marker in lost[:1] + lost[-2:]:
        marker.unlink()
    res = CliRunner().invoke(cli, args + ["--export", str(tmp_path / "b")])
    assert res.exit_code == 0 and "3 block(s) computed" in res.output, res.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
