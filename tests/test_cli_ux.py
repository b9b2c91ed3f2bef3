"""What a new user meets on the command line (issue #19): parameter ranges, `methods NAME`,
missing models, resume messages, byte counts, printed paths, export summaries, re-running a
finished build, the report's captions. Every test runs the real CLI (CliRunner) on tiny
synthetic checkpoints and asserts the output and the exit code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import synth_checkpoints as synth
from streammerge.cli import main as cli
from streammerge.methods import get_method, method_names
from streammerge.recipe import load_recipe

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)


def invoke(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_error_line(res) -> str:
    """The output of a failed command: exactly one line, `error: ...`, and exit code 1."""
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A directory holding models/base, models/ft1, models/ft2 (recipes name them relatively)."""
    root = tmp_path_factory.mktemp("ux")
    synth.make_family(root / "models", SHAPE, n_finetunes=2, dtype="bfloat16")
    return root


@pytest.fixture
def in_family(family, monkeypatch):
    monkeypatch.chdir(family)
    return family


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TIES = """\
merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: {weight}, density: {density}}}
dtype: bfloat16
"""


# ---- parameter ranges --------------------------------------------------------------------------


@pytest.mark.parametrize("density", ["1.5", "-0.2"])
def test_density_out_of_range_is_an_error_at_its_line(in_family, density):
    r = write(in_family / "r.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=density))
    for cmd in ("plan", "build"):
        args = [cmd, r] + (["--store", in_family / "never.zarr", "--no-progress"] if cmd == "build" else [])
        line = one_error_line(invoke(*args))
        assert line.startswith(f"error: {r}:7: models[1].parameters.density: must be "), line
        assert density.lstrip("-") in line
    assert not (in_family / "never.zarr").exists()


def test_slerp_t_outside_0_1_extrapolates_as_in_mergekit(in_family):
    # mergekit takes any t (test_parity_mergekit checks the bits): not a range error
    r = write(in_family / "s.yaml", "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/ft1\n"
              "parameters:\n  t: [-0.2, 1.7]\ndtype: bfloat16\n")
    res = invoke("plan", r)
    assert res.exit_code == 0, res.output


def test_multislerp_weights_summing_to_zero_are_an_error_at_their_line(in_family):
    r = write(in_family / "m.yaml", "merge_method: multislerp\nbase_model: models/base\nmodels:\n"
              "  - model: models/ft1\n    parameters: {weight: 1.0}\n  - model: models/ft2\n    parameters: {weight: -1.0}\n"
              "dtype: bfloat16\n")
    line = one_error_line(invoke("build", r, "--store", in_family / "never.zarr", "--no-progress"))
    assert line.startswith(f"error: {r}:4: models[0]: for tensor ") and "the weights [1.0, -1.0] sum to 0" in line, line
    assert not (in_family / "never.zarr").exists()


def test_negative_weight_is_accepted_as_in_mergekit(in_family):
    # mergekit subtracts a task vector with a negative weight (task negation): not a range error
    r = write(in_family / "neg.yaml", TIES.format(ft2="models/ft2", weight=-0.5, density=0.5))
    res = invoke("plan", r)
    assert res.exit_code == 0, res.output


def test_every_bounded_parameter_rejects_values_outside_its_range():
    for name in method_names():
        for p in get_method(name).params:
            if p.kind in (int, float) and p.min is not None:
                with pytest.raises(ValueError, match="must be >="):
                    p.validate(p.min - 1)
            if p.kind in (int, float) and p.max is not None:
                with pytest.raises(ValueError, match="must be <="):
                    p.validate(p.max + 1)


def test_methods_lists_each_parameters_range():
    res = invoke("methods")
    assert res.exit_code == 0, res.output
    ties = re.split(r"\n(?=\S)", res.output.split("\nties: ", 1)[1])[0]
    rows = {line.split()[0]: line for line in ties.splitlines()[1:] if line.startswith("    ")}
    assert "range [0, 1]" in rows["density"]
    assert "range any number" in rows["weight"] and "negative" in rows["weight"]
    assert "range true/false" in rows["normalize"]
    assert "range l1|inverse_density" in rows["rescale_mode"]


# ---- methods NAME --------------------------------------------------------------------------------


def test_methods_name_shows_one_method_and_an_example_recipe():
    res = invoke("methods", "ties")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ties: ")
    assert "\nslerp:" not in res.output and "\ndare_ties:" not in res.output
    assert "density" in res.output and "default 1.0" in res.output and "[0, 1]" in res.output
    example = yaml.safe_load(res.output.split("example recipe:\n", 1)[1])
    assert example["merge_method"] == "ties"
    assert all(m["parameters"]["weight"] == 0.5 for m in example["models"])


@pytest.mark.parametrize("name", method_names())
def test_every_methods_example_recipe_plans(in_family, name):
    res = invoke("methods", name)
    assert res.exit_code == 0, res.output
    example = in_family / f"example-{name}.yaml"
    example.write_text(res.output.split("example recipe:\n", 1)[1])
    assert load_recipe(example).merge_method == name
    res = invoke("plan", example)
    assert res.exit_code == 0, res.output


def test_methods_unknown_name_is_one_line():
    line = one_error_line(invoke("methods", "slerpp"))
    assert "unknown merge method 'slerpp'" in line and "did you mean 'slerp'" in line


# ---- missing models ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["models/ft9", "./models/ft9", "../ux-nowhere/ft9"])
def test_missing_model_that_looks_like_a_path_names_the_recipe_line(in_family, spec):
    r = write(in_family / "m.yaml", TIES.format(ft2=spec, weight=0.5, density=0.5))
    line = one_error_line(invoke("plan", r))
    assert line.startswith(f"error: {r}:6: models[1].model: {spec}: no such model directory"), line
    assert "huggingface" not in line.lower()


def test_missing_model_relative_to_the_recipe_dir_is_a_path(family, tmp_path, monkeypatch):
    # the recipe sits beside models/, the cwd is elsewhere: models/ft9 is still a path
    monkeypatch.chdir(tmp_path)
    r = write(family / "far.yaml", TIES.format(ft2="models/ft9", weight=0.5, density=0.5))
    line = one_error_line(invoke("plan", r))
    assert line.startswith(f"error: {r}:6: models[1].model: ") and "no such model directory" in line, line
    assert str(family / "models" / "ft9") in line and "huggingface" not in line.lower()


def test_missing_hub_id_still_suggests_a_download(in_family, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = write(in_family / "h.yaml", TIES.format(ft2="someorg/somemodel", weight=0.5, density=0.5))
    line = one_error_line(invoke("plan", r))
    assert line.startswith(f"error: {r}:6: models[1].model: someorg/somemodel: ") and "huggingface-cli download" in line


# ---- resuming a changed recipe -------------------------------------------------------------------


def test_resume_after_a_parameter_change_names_model_parameter_and_values(in_family):
    r = write(in_family / "c.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    store = in_family / "c.zarr"
    assert invoke("build", r, "--store", store, "--no-progress").exit_code == 0
    write(r, TIES.format(ft2="models/ft2", weight=0.5, density=0.7))
    line = one_error_line(invoke("build", r, "--store", store, "--no-progress"))
    assert "models[1] (models/ft2).parameters.density 0.5 -> 0.7" in line, line
    assert "--restart" in line


def test_describe_changes_lists_each_difference():
    from streammerge.recipe.diff import describe_changes

    old = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}],
           "parameters": {"lambda": 1.0}}
    new = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "c"}],
           "parameters": {"lambda": 1.0, "normalize": True}}
    assert describe_changes(old, new) == (
        "models[0] (a).parameters.weight 1.0 -> 2.0; models[1].model 'b' -> 'c'; parameters.normalize (unset) -> True"
    )
    assert describe_changes(old, old) == "formatting"
    more = {**new, "dtype": "float16", "base_model": "x"}
    assert describe_changes(old, more).endswith("; and 2 more")


# ---- one definition of bytes: plan, progress bar, summary ----------------------------------------

BAR = re.compile(r"merge:\s+(\d+)%\|[^|]*\|\s*([\d.]+[kMG]?)/([\d.]+[kMG]?)")


def bars(output: str) -> list[tuple[int, str, str]]:
    """Every rendering of the progress bar: (percent, done, total) as tqdm prints them."""
    return [(int(p), a, b) for p, a, b in BAR.findall(output.replace("\r", "\n"))]


def summary_read(output: str) -> str:
    return re.search(r"([\d.]+ [KMG]iB) read in", output).group(1)


def test_plan_bar_and_summary_count_the_same_bytes(in_family):
    import json

    from tqdm import tqdm

    r = write(in_family / "b.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    plan = json.loads(invoke("plan", r, "--json").output)
    assert plan["read_bytes"] > plan["input_bytes"]  # ties reads its inputs again for top-k
    res = invoke("build", r, "--store", in_family / "b.zarr", "--progress")
    assert res.exit_code == 0, res.output
    seen = bars(res.output)
    # the bar starts at the plan's figure (every pass counted) ...
    assert seen[0][0] == 0 and seen[0][2] == tqdm.format_sizeof(plan["read_bytes"], divisor=1024)
    # ... passes found not needed leave its total, and it ends at what the summary reports
    pct, done, total = seen[-1]
    assert pct == 100 and done == total
    assert float(total[:-1]) == pytest.approx(float(summary_read(res.output).split()[0]), abs=0.01)
    assert total.endswith("M") and summary_read(res.output).endswith("MiB")


def test_resumed_bar_starts_where_the_work_is(in_family):
    import shutil

    r = write(in_family / "rb.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    store = in_family / "rb.zarr"
    first = invoke("build", r, "--store", store, "--progress")
    assert first.exit_code == 0, first.output
    whole = bars(first.output)[-1][2]
    markers = sorted((store / "done" / "merge" / "tensors").iterdir())
    for d in markers[: len(markers) // 2]:  # as if interrupted with half the tensors written
        shutil.rmtree(d)
    res = invoke("build", r, "--store", store, "--progress")
    assert res.exit_code == 0, res.output
    seen = bars(res.output)
    assert 0 < seen[0][0] < 100 and seen[0][2] == whole, seen
    assert seen[-1] == (100, whole, whole)
    assert "already done" in res.output


# ---- paths and files -----------------------------------------------------------------------------


def test_built_and_exported_print_absolute_paths(in_family):
    r = write(in_family / "p.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    res = invoke("build", r.name, "--store", "p.zarr", "--export", "p-out", "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"built {in_family / 'p.zarr'}: " in res.output
    assert f"exported {in_family / 'p-out'}: 1 shard(s), " in res.output
    res = invoke("export", "p.zarr", "p-out2", "--no-progress")
    assert res.exit_code == 0 and f"exported {in_family / 'p-out2'}: " in res.output, res.output


def test_build_export_again_on_a_finished_store_says_so(in_family):
    r = write(in_family / "a.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    args = ["build", r, "--store", in_family / "a.zarr", "--export", in_family / "a-out", "--no-progress",
            "--shard-size", "100KB"]
    assert invoke(*args).exit_code == 0
    before = {f.name: f.stat().st_mtime_ns for f in (in_family / "a-out").iterdir()}
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert f"exported {in_family / 'a-out'}: already this store's complete export; nothing written" in res.output
    assert {f.name: f.stat().st_mtime_ns for f in (in_family / "a-out").iterdir()} == before
    # other options (another dtype), or an export that lost a shard, are not that export: refused as before
    res = invoke(*args, "--dtype", "float32")
    assert res.exit_code == 1 and "already exists" in res.output, res.output
    next((in_family / "a-out").glob("model-00002-*.safetensors")).unlink()
    res = invoke(*args)
    assert res.exit_code == 1 and "already exists" in res.output, res.output


def test_routed_export_summary_lists_the_routing_files(in_family):
    res = invoke("methods", "1bit")
    r = write(in_family / "ob.yaml", res.output.split("example recipe:\n", 1)[1])
    assert invoke("build", r, "--store", in_family / "ob.zarr", "--no-progress").exit_code == 0
    res = invoke("export", in_family / "ob.zarr", in_family / "ob-out", "--variant", "routed", "--no-progress")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("exported "))
    written = sorted(f.name for f in (in_family / "ob-out").iterdir() if f.name.startswith("routing"))
    assert written == ["routing.json", "routing.safetensors"]
    assert line.startswith(f"exported {in_family / 'ob-out'}: 1 shard(s) + routing.safetensors, routing.json, "), line


def test_plan_says_what_it_reads_and_what_the_memory_estimate_includes(in_family):
    import json

    from streammerge.cli import human
    from streammerge.plan.planner import BASELINE_BYTES

    r = write(in_family / "pm.yaml", TIES.format(ft2="models/ft2", weight=0.5, density=0.5))
    plan = json.loads(invoke("plan", r, "--json").output)
    res = invoke("plan", r)
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert lines["read"].startswith(f"read          up to {human(plan['read_bytes'])} from disk, passes included")
    blocks = plan["memory_estimate_bytes"] - BASELINE_BYTES
    assert lines["memory"] == (
        f"memory        ~{human(plan['memory_estimate_bytes'])} with 2 worker(s): {human(BASELINE_BYTES)} for the process "
        f"(Python, numpy, dask, zarr) + {human(blocks)} of float32 blocks (inputs and work arrays per worker, writes queued)"
    )
