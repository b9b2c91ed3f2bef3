"""Parity of ram and ramplus_tl with mergekit's own methods (called in-process on the same
float32 tensors): bit-identical, whatever the block size; plus one recipe built end to end."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from streammerge.methods import TensorParams, get_method  # noqa: E402
from streammerge.methods.inmemory import merge_tensor  # noqa: E402

pytestmark = pytest.mark.mergekit


def mergekit_merge(name, base, models, **parameters):
    group = TensorGroup.from_tensors([torch.from_numpy(base)] + [torch.from_numpy(m) for m in models], base_index=0, name="w")
    (out,) = registry.get(name)([group], parameters=parameters)
    return out.numpy()


def ours(name, base, models, block_rows, **parameters):
    method = get_method(name)
    glob = {p.name: parameters.get(p.name, p.default) for p in method.params}
    return merge_tensor(method, "w", base, list(models), TensorParams(glob, tuple({} for _ in models)), block_rows)


def family(shape, n, seed):
    """A base and n fine-tunes, each leaving a random part of the entries (nearly) unchanged,
    so that every count of changing models occurs, and changes at the epsilon boundary."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    models = []
    for i in range(n):
        delta = (rng.standard_normal(shape) * 10.0 ** rng.integers(-7, -1, shape)).astype(np.float32)
        delta *= rng.random(shape) < 0.4 + 0.15 * i  # entries this model leaves alone
        models.append(np.asarray(base + delta, np.float32))
    return base, models


SHAPES = [(37, 29), (64,), (3, 5, 7), ()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("block_rows", [None, 1, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 1e-3])
def test_ram_bit_identical(shape, n, block_rows, epsilon):
    base, models = family(shape, n, seed=n * 10 + len(shape))
    got = ours("ram", base, models, block_rows, epsilon=epsilon)
    np.testing.assert_array_equal(got, mergekit_merge("ram", base, models, epsilon=epsilon))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("block_rows", [None, 1, 4])
@pytest.mark.parametrize("r, alpha, epsilon", [(0.1, 0.2, 1e-5), (0.5, 1.0, 1e-5), (2.0, 10.0, 1e-3), (0.0, 0.2, 0.0)])
def test_ramplus_tl_bit_identical(shape, n, block_rows, r, alpha, epsilon):
    base, models = family(shape, n, seed=n * 10 + len(shape) + 1)
    got = ours("ramplus_tl", base, models, block_rows, r=r, alpha=alpha, epsilon=epsilon)
    want = mergekit_merge("ramplus_tl", base, models, r=r, alpha=alpha, epsilon=epsilon)
    np.testing.assert_array_equal(got, want)


def test_ramplus_tl_scales_unique_changes_by_the_tensor_wide_ratio():
    """The lambda of a model comes from counts over the whole tensor: with one row block per
    row, a row a model changes alone still gets the ratio of the tensor, not of its row."""
    base = np.zeros((2, 4), np.float32)
    a = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)  # shared: row 0; unique: a[1, 0]
    b = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    got = ours("ramplus_tl", base, [a, b], 1, r=0.5, alpha=10.0)
    lam = np.float32(1) + np.float32(0.5) * np.float32(4 / 1)  # rho_a = 4 shared / 1 unique
    assert got[1, 0] == lam and np.array_equal(got[0], np.ones(4, np.float32))
    np.testing.assert_array_equal(got, mergekit_merge("ramplus_tl", base, [a, b], r=0.5, alpha=10.0))


def test_ram_methods_listed_with_help():
    from click.testing import CliRunner

    from streammerge.cli import main as cli

    for name, params in (("ram", ["epsilon"]), ("ramplus_tl", ["r", "alpha", "epsilon"])):
        res = CliRunner().invoke(cli, ["methods", name])
        assert res.exit_code == 0, res.output
        assert name in res.output and all(p in res.output for p in params)


@pytest.mark.parametrize("name, parameters", [("ram", {"epsilon": 1e-4}), ("ramplus_tl", {"r": 0.5, "alpha": 0.5, "epsilon": 1e-4})])
def test_recipe_builds_mergekit_result(name, parameters, synth_family, tmp_path):
    """A recipe built end to end (streamed, small blocks) equals mergekit's method on each
    tensor of the same checkpoints, computed in float32."""
    from click.testing import CliRunner

    from helpers import load_model_tensors, write_recipe
    from streammerge.cli import main as cli

    base, fts = synth_family(dtype="float32", delta_scale=0.004)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": name, "base_model": str(base), "models": [{"model": str(f)} for f in fts],
        "parameters": parameters, "dtype": "float32",
    })
    res = CliRunner().invoke(cli, ["build", str(recipe), str(tmp_path / "out"), "--block-elements", "2000", "--no-progress"])
    assert res.exit_code == 0, res.output
    got = load_model_tensors(tmp_path / "out")
    b, models = load_model_tensors(base), [load_model_tensors(f) for f in fts]
    for tensor, value in got.items():
        want = mergekit_merge(name, b[tensor].numpy(), [m[tensor].numpy() for m in models], **parameters)
        np.testing.assert_array_equal(value.numpy(), want, err_msg=tensor)
