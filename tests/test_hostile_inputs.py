"""Hostile recipes and model-directory JSON (issue #22): refused in bounded time and memory.

Each case runs `python -m streammerge build BAD --store STORE` as a real process under a 1 GB
address-space cap (RLIMIT_AS) and a wall-clock limit, next to an existing, complete store. It
must exit 1 with one line, `error: ...`, naming the file (and line) and the limit, within a few
seconds and a few tens of MB more than a trivially refused build (a missing recipe file), and
leave the store byte-for-byte as it was. Before the limits, the alias bomb reached 5.1 GB and the
2,000,000-weight gradient 1.4 GB (killed after 60 s).

Below the table: the limits at their edges (what is allowed still loads, and parses to what
PyYAML / json parse), and the request-body entry point for the server.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

import synth_checkpoints as synth
from streammerge.errors import StreammergeError
from streammerge.limits import DOCUMENT, LISTING, RECIPE, REQUEST, parse_json, parse_request_body
from streammerge.recipe import parse_recipe
from test_bad_inputs import invoke, tree_digest

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 1 << 30  # RLIMIT_AS of every CLI process
EXTRA_SECONDS = 4.0  # over the time a trivially refused build takes on this machine
HARD_TIMEOUT = 60  # a process still running then has failed (and is killed)


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


# A small process starts the CLI and reports its peak RSS: a child's ru_maxrss counts what it
# inherited at fork, so forked straight from pytest (hundreds of MB) it would measure pytest.
LAUNCHER = """
import json, os, subprocess, sys
with open(sys.argv[1], "wb") as o, open(sys.argv[2], "wb") as e:
    p = subprocess.Popen([sys.executable, "-m", "streammerge", *sys.argv[3:]], stdout=o, stderr=e)
    _, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "max_rss_kb": usage.ru_maxrss}))
"""


@dataclass
class Run:
    rc: int
    stderr: str
    seconds: float
    max_rss_mb: float


def run_cli(args: list, scratch: Path) -> Run:
    """`python -m streammerge *args` under the memory cap (set by preexec_fn, inherited)."""
    out, err = scratch / "stdout", scratch / "stderr"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, out, err, *map(str, args)], stdout=subprocess.PIPE,
                            env=env, preexec_fn=_cap_memory, start_new_session=True)
    try:
        report, _ = proc.communicate(timeout=HARD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still running after {HARD_TIMEOUT} s: {args}")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, report
    result = json.loads(report)
    return Run(result["rc"], err.read_text(), seconds, result["max_rss_kb"] / 1024)


# ---- the world: good models and a complete store ------------------------------------------------


def recipe_text(base, models) -> str:
    r = {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], "dtype": "bfloat16"}
    return yaml.safe_dump(r, sort_keys=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base, fts = synth.make_family(root / "m", SHAPE, n_finetunes=2, dtype="bfloat16")
    good = root / "good.yaml"
    good.write_text(recipe_text(base, fts))
    store = root / "job.zarr"
    res = invoke("build", good, "--store", store, "--no-progress")
    assert res.exit_code == 0, res.output
    scratch = root / "baseline"
    scratch.mkdir()
    baseline = run_cli(["build", root / "no-such.yaml", "--store", store, "--no-progress"], scratch)
    assert baseline.rc == 1 and "no such recipe file" in baseline.stderr, baseline
    return {"root": root, "base": base, "fts": fts, "store": store, "baseline": baseline}


# ---- hostile recipes ------------------------------------------------------------------------------


def alias_bomb() -> str:
    """8 levels of 9 aliases: 9^8 = 43 million values from ~540 bytes."""
    lines = ["merge_method: linear", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines + ["models:", "  - model: m"]) + "\n"


def merge_key_bomb() -> str:
    """The same through `<<:` merge keys, which PyYAML's constructor copies pair by pair."""
    lines = ["merge_method: linear", "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    lines += [f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def gradient(n: int) -> Callable[[dict], str]:
    def text(w):
        return (f"merge_method: task_arithmetic\nbase_model: {w['base']}\nmodels:\n  - model: {w['fts'][0]}\n"
                "    parameters:\n      weight: [" + ",".join(["0.5"] * n) + "]\n")
    return text


def unknown_keys(w) -> str:
    return "merge_method: linear\n" + "".join(f"unknown_{i:06d}: 1\n" for i in range(300_000))  # 4.5 MB


def nested(w) -> str:
    return "merge_method: linear\nmodels: " + "[" * 100_000 + "]" * 100_000 + "\n"


# ---- hostile JSON in a model directory --------------------------------------------------------------


def bad_model(w, d: Path, name: str, content: str | bytes) -> Path:
    """A copy of fine-tune 1 with `name` replaced, and a recipe using it."""
    import shutil

    model = d / "bad"
    shutil.copytree(w["fts"][0], model)
    (model / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return model


def indexed_model(w, d: Path, index: str) -> Path:
    """Fine-tune 1 as a sharded checkpoint: its one shard a.safetensors, the index given."""
    model = bad_model(w, d, "model.safetensors.index.json", index)
    (model / "model.safetensors").rename(model / "a.safetensors")
    return model


@dataclass
class Case:
    name: str
    recipe: Callable[[dict], str] | None = None  # the recipe text; None: a good recipe over `model`
    model: Callable[[dict, Path], Path] | None = None  # a hostile model directory
    expect: tuple[str, ...] = ()  # fragments of the one-line error; {d} is the case's directory
    # over the baseline's peak RSS; a tensor listing within its size limit is parsed, at about
    # 12 bytes of memory per byte of JSON
    extra_rss_mb: float = 60


CASES = [
    Case("alias bomb", lambda w: alias_bomb(), expect=("{d}/r.yaml:7:", "limit of 200,000")),
    Case("merge-key bomb", lambda w: merge_key_bomb(), expect=("{d}/r.yaml:7:", "limit of 200,000")),
    Case("alias cycle", lambda w: "merge_method: linear\nx: &c [1, *c]\n", expect=("{d}/r.yaml:2:", "*c refers to a node that contains it")),
    Case("2,000,000-weight gradient", gradient(2_000_000), expect=("{d}/r.yaml:", "larger than the limit of 1,000,000 bytes")),
    Case("100,000-weight gradient", gradient(100_000), expect=("{d}/r.yaml:6:", "a list with more entries than the limit of 4,096")),
    Case("4.5 MB of 300,000 unknown keys", unknown_keys, expect=("{d}/r.yaml:", "larger than the limit of 1,000,000 bytes")),
    Case("100,000 nested brackets", nested, expect=("{d}/r.yaml:2:", "nested too deeply", "limit of 64 levels")),
    # the JSON equivalents, in a model directory the recipe names
    Case("config.json of 300,000 keys", model=lambda w, d: bad_model(
        w, d, "config.json", json.dumps({f"unknown_{i:06d}": 1 for i in range(300_000)}, indent=1)),
        expect=("{d}/bad/config.json:", "larger than the limit of 4,000,000 bytes")),
    Case("config.json of 90,000 nested brackets", model=lambda w, d: bad_model(  # 100,000 count as objects
        w, d, "config.json", '{"a": ' + "[" * 90_000 + "]" * 90_000 + "}"),
        expect=("{d}/bad/config.json:1:", "nested too deeply", "limit of 64 levels")),
    Case("config.json with a 150,000-entry list", model=lambda w, d: bad_model(
        w, d, "config.json", json.dumps({"layer_weights": [0.5] * 150_000})),
        expect=("{d}/bad/config.json:", '$["layer_weights"] has 150,000 entries', "limit of 100,000")),
    Case("config.json of 200,000 empty objects", model=lambda w, d: bad_model(
        w, d, "config.json", "[" + ",".join(["{}"] * 200_000) + "]"),
        expect=("{d}/bad/config.json:", "more objects and arrays than the limit of 100,000")),
    Case("index json of 100,000 nested brackets", model=lambda w, d: indexed_model(
        w, d, '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        expect=("{d}/bad/model.safetensors.index.json:1:", "nested too deeply")),
    Case("index json of 40 MB", model=lambda w, d: indexed_model(
        w, d, json.dumps({"weight_map": {f"t{i:08d}" + "x" * 80: "a.safetensors" for i in range(400_000)}})),
        expect=("{d}/bad/model.safetensors.index.json:", "larger than the limit of 32,000,000 bytes")),
    Case("index json of 300,000 unknown tensors", model=lambda w, d: indexed_model(
        w, d, json.dumps({"weight_map": {f"u.{i:06d}": "a.safetensors" for i in range(300_000)}})),
        expect=("{d}/bad/model.safetensors.index.json", "u.000000", "does not contain it"), extra_rss_mb=120),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_fast_small_and_touches_nothing(world, tmp_path, case):
    d = tmp_path
    if case.model is not None:
        model = case.model(world, d)
        text = recipe_text(world["base"], [model, world["fts"][1]])
    else:
        text = case.recipe(world)
    (d / "r.yaml").write_text(text)
    before = tree_digest(world["store"])

    r = run_cli(["build", d / "r.yaml", "--store", world["store"], "--no-progress"], d)
    print(f"\n{case.name}: {r.seconds:.2f} s, peak RSS {r.max_rss_mb:.0f} MB (baseline {world['baseline'].seconds:.2f} s, {world['baseline'].max_rss_mb:.0f} MB)")

    lines = r.stderr.strip().splitlines()
    assert r.rc == 1, r
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for frag in case.expect:
        assert frag.format(d=d) in lines[0], f"{frag!r} not in {lines[0]!r}"
    base = world["baseline"]
    assert r.seconds < base.seconds + EXTRA_SECONDS, (r.seconds, base.seconds)
    assert r.max_rss_mb < base.max_rss_mb + case.extra_rss_mb, (r.max_rss_mb, base.max_rss_mb)
    assert tree_digest(world["store"]) == before


# ---- the limits at their edges --------------------------------------------------------------------


def test_recipe_at_the_limits_still_loads(world):
    """A 4,096-weight gradient beside the anchors and merge keys real recipes use: loaded as
    PyYAML reads it; one weight more is refused at its line."""
    grad = [i / (RECIPE.max_items - 1) for i in range(RECIPE.max_items)]
    text = (
        "merge_method: task_arithmetic\n"
        f"base_model: {world['base']}\n"
        "models:\n"
        f"  - model: {world['fts'][0]}\n"
        "    parameters: &p {weight: 0.5}\n"
        f"  - model: {world['fts'][1]}\n"
        "    parameters: {<<: *p, weight: [" + ", ".join(map(repr, grad)) + "]}\n"
    )
    r = parse_recipe(text, "edge.yaml")
    ref = yaml.safe_load(text)
    assert r.models[0].parameters == ref["models"][0]["parameters"] == {"weight": 0.5}
    assert r.models[1].parameters["weight"] == ref["models"][1]["parameters"]["weight"] == grad
    with pytest.raises(StreammergeError, match=r"^edge.yaml:7: a list with more entries than the limit of 4,096$"):
        parse_recipe(text.replace("[0.0, ", "[0.0, 0.0, ", 1), "edge.yaml")


def test_aliases_count_at_their_expanded_size():
    """A recipe under the node limit only with aliases counted once is still refused; the count
    is exact: the expansion of N values passes, N + 1 does not (reference: PyYAML's own tree)."""
    def doc(n_aliases: int) -> str:
        # a block of 1,000 values repeated by aliases
        return ("merge_method: linear\nblock: &b [" + ", ".join(["1"] * 999) + "]\n"
                "many: [" + ", ".join(["*b"] * n_aliases) + "]\n")

    def expanded(text: str) -> int:
        def count(v):
            return 1 + (sum(count(x) for x in v) if isinstance(v, list) else
                        sum(1 + count(x) for x in v.values()) if isinstance(v, dict) else 0)
        return count(yaml.safe_load(text))

    from streammerge.recipe.yaml_lines import load_yaml

    ok = max(n for n in range(150, 250) if expanded(doc(n)) <= RECIPE.max_nodes)
    data, _ = load_yaml(doc(ok), "a.yaml")
    assert data == yaml.safe_load(doc(ok))
    with pytest.raises(StreammergeError, match="limit of 200,000"):
        load_yaml(doc(ok + 1), "a.yaml")


@pytest.mark.parametrize("doc", [
    {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"weight_map": {f"model.layers.{i}.w": "a.safetensors" for i in range(50_000)}, "metadata": {"total_size": 1}},
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
])
def test_json_within_the_limits_parses_as_json_does(doc):
    data = json.dumps(doc).encode()
    assert parse_json(data, "x.json", LISTING) == json.loads(data)


def test_json_limits_at_their_edges():
    deep = lambda n: ("[" * n + "]" * n).encode()  # noqa: E731
    assert parse_json(deep(DOCUMENT.max_depth), "d.json") == json.loads(deep(DOCUMENT.max_depth))
    with pytest.raises(StreammergeError, match=r"^d.json:1: the file is nested too deeply"):
        parse_json(deep(DOCUMENT.max_depth + 1), "d.json")
    # the line is where the nesting passes the limit; brackets and quotes inside strings do not count
    text = '{"a": "", "b": "[[[[\\"{{",\n "c": ' + "[\n" * (DOCUMENT.max_depth + 1) + "]" * (DOCUMENT.max_depth + 1) + "}"
    line = 2 + DOCUMENT.max_depth - 1
    with pytest.raises(StreammergeError, match=rf"^d.json:{line}: the file is nested too deeply"):
        parse_json(text.encode(), "d.json")
    wide = lambda n: json.dumps(list(range(n))).encode()  # noqa: E731
    assert len(parse_json(wide(DOCUMENT.max_items), "w.json")) == DOCUMENT.max_items
    with pytest.raises(StreammergeError, match=r"^w.json: \$ has 100,001 entries"):
        parse_json(wide(DOCUMENT.max_items + 1), "w.json")
    with pytest.raises(StreammergeError, match=r"^b.json: the file is larger than the limit of 4,000,000 bytes$"):
        parse_json(b" " * (DOCUMENT.max_bytes + 1), "b.json")
    with pytest.raises(StreammergeError, match=r"^s.json:3: the file is not valid JSON \(Expecting"):
        parse_json(b'{\n"a": 1,\n}', "s.json")


def test_request_body_entry_point():
    """What the HTTP server calls on a body: an OpenAI chat request parses as json.loads reads it;
    hostile bodies are one-line StreammergeErrors under the REQUEST limits."""
    body = json.dumps({"model": "job", "messages": [{"role": "user", "content": "hi [x] {y}"}]}).encode()
    assert parse_request_body(body) == json.loads(body)
    for bad, fragment in [
        (b"[" * 100_000, "nested too deeply"),
        (b"{" * 200_000, "more objects and arrays than the limit of 100,000"),
        (b"x" * (REQUEST.max_bytes + 1), "larger than the limit of 4,000,000 bytes"),
        (b'{"a": 1', "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
    ]:
        with pytest.raises(StreammergeError) as ei:
            parse_request_body(bad)
        msg = str(ei.value)
        assert msg.startswith("request body") and fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize("loader", ["_PyBoundedLoader", "_CBoundedLoader"])
def test_yaml_limits_do_not_depend_on_libyaml(monkeypatch, loader):
    """The same refusals, at the same lines, with PyYAML's Python parser and with libyaml's."""
    import streammerge.limits as limits

    if not hasattr(limits, loader):
        pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(limits, "_BoundedLoader", getattr(limits, loader))
    for text, expect in [
        (alias_bomb(), "r.yaml:7: the recipe expands to more values than the limit of 200,000"),
        (merge_key_bomb(), "r.yaml:7: the recipe expands to more values than the limit of 200,000"),
        ("merge_method: linear\nx: &c [1, *c]\n", "r.yaml:2: the alias *c refers to a node that contains it"),
        ("merge_method: linear\nmodels: " + "[" * 5_000 + "]" * 5_000 + "\n", "r.yaml:2: the recipe is nested too deeply"),
        ("w: [" + ",".join(["1"] * 5_000) + "]\n", "r.yaml:1: a list with more entries than the limit of 4,096"),
    ]:
        with pytest.raises(StreammergeError) as ei:
            parse_recipe(text, "r.yaml")
        assert str(ei.value).startswith(expect), str(ei.value)
    assert parse_recipe(gradient(RECIPE.max_items)({"base": "b", "fts": ["f"]}), "r.yaml").models[0].parameters["weight"] == [0.5] * RECIPE.max_items
