"""Hostile and broken inputs, end to end through the real CLI: a table of cases.

Every case runs `streammerge build BAD --store STORE --export OUT --overwrite` (and `plan` where
the error is found while planning) against an existing, complete store and an existing export
made from good inputs. Each must exit 1 with one line, `error: ...`, naming the offending path
and the problem, without a traceback, and leave the store and the output byte-for-byte as they
were. A few cases also run as real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from click.testing import CliRunner

import synth_checkpoints as synth
from streammerge.cli import main as cli

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
DOWN = "model.layers.1.mlp.down_proj.weight"  # [64, 128] bf16
NORM = "model.norm.weight"  # [64]


# ---- helpers ----------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (sha256), directory and symlink under root, by relative path."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            out[rel] = "<link " + os.readlink(p) + ">" if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def read_raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]) for k, v in header.items()}


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, pos = {}, 0
    for k, (dtype, shape, blob) in tensors.items():
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(blob)]}
        pos += len(blob)
    write_file(path, json.dumps(header).encode(), b"".join(t[2] for t in tensors.values()))


def write_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def poke(model: Path, name: str, index: int, bits: int) -> None:
    """Overwrite bf16 element `index` of tensor `name` (in place, keeping the header)."""
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0] + 2 * index
    data[start : start + 2] = struct.pack("<H", bits)
    f.write_bytes(bytes(data))


def recipe(path: Path, base, models, method="task_arithmetic", **extra) -> Path:
    r = {"merge_method": method, "base_model": str(base),
         "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], "dtype": "bfloat16"}
    r.update(extra)
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- the world: good models, an existing store and export ---------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    base, fts = synth.make_family(root / "m", SHAPE, n_finetunes=2, dtype="bfloat16")
    good = recipe(root / "good.yaml", base, fts)
    store, out = root / "job.zarr", root / "out"
    res = invoke("build", good, "--store", store, "--export", out, "--no-progress")
    assert res.exit_code == 0, res.output
    return {"root": root, "base": base, "ft1": fts[0], "ft2": fts[1], "store": store, "out": out}


@dataclass
class Case:
    name: str
    setup: Callable[[dict, Path], list]  # (world, case dir) -> CLI args after "build" (RECIPE, extra options)
    expect: tuple[str, ...]  # fragments of the message; "{d}" is the case directory
    at_plan: bool = True  # found while planning (so `plan` reports it too)
    fresh_store: bool = False  # the error needs a new store (found while merging)


def bad_ft(replace_file: Callable[[Path], None]):
    """A case whose second fine-tune is a clone of ft2 with model.safetensors rewritten."""

    def setup(w, d):
        m = clone(w["ft2"], d / "bad")
        replace_file(m / "model.safetensors")
        return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]

    return setup


def tensors_of(w) -> dict:
    return read_raw(w["ft2"] / "model.safetensors")


def _without(name):
    def setup(w, d):
        m = clone(w["ft2"], d / "bad")
        t = read_raw(m / "model.safetensors")
        del t[name]
        write_raw(m / "model.safetensors", t)
        return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]

    return setup


def _reshaped(w, d):
    m = clone(w["ft2"], d / "bad")
    t = read_raw(m / "model.safetensors")
    dtype, _shape, blob = t[DOWN]
    t[DOWN] = (dtype, [128, 64], blob)
    write_raw(m / "model.safetensors", t)
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _int_dtype(w, d):
    m = clone(w["ft2"], d / "bad")
    t = read_raw(m / "model.safetensors")
    _dtype, shape, blob = t[NORM]
    t[NORM] = ("I16", shape, blob)
    write_raw(m / "model.safetensors", t)
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _index(weight_map_value):
    def setup(w, d):
        m = clone(w["ft2"], d / "bad")
        names = list(read_raw(m / "model.safetensors"))
        wm = {n: "model.safetensors" for n in names}
        wm[names[-1]] = weight_map_value
        (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]

    return setup


def _dup_across_shards(w, d):
    m = clone(w["ft2"], d / "bad")
    (m / "model.safetensors").rename(m / "a.safetensors")
    write_raw(m / "b.safetensors", {NORM: tensors_of(w)[NORM]})
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _mixed_arch(w, d):
    m = clone(w["ft2"], d / "bad")
    edit_config(m, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _nonfinite(bits):
    def setup(w, d):
        m = clone(w["ft2"], d / "bad")
        poke(m, DOWN, 5000, bits)
        return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]

    return setup


def _pickle_only(w, d):
    import torch

    m = d / "bad"
    m.mkdir()
    shutil.copyfile(w["ft2"] / "config.json", m / "config.json")
    torch.save({NORM: torch.ones(64, dtype=torch.bfloat16)}, m / "pytorch_model.bin")
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _recipe_text(text):
    def setup(w, d):
        (d / "r.yaml").write_text(text.format(base=w["base"], ft1=w["ft1"], ft2=w["ft2"]))
        return [d / "r.yaml"]

    return setup


def _no_weights(w, d):
    m = d / "bad"
    m.mkdir()
    shutil.copyfile(w["ft2"] / "config.json", m / "config.json")
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _dangling(w, d):
    m = d / "bad"
    m.mkdir()
    shutil.copyfile(w["ft2"] / "config.json", m / "config.json")
    (m / "model.safetensors").symlink_to(d / "nowhere.safetensors")
    return [recipe(d / "r.yaml", w["base"], [w["ft1"], m])]


def _truncate(n_keep):
    def cut(f: Path):
        data = f.read_bytes()
        f.write_bytes(data[:n_keep] if n_keep >= 0 else data[:n_keep])

    return cut


def _hdr(header: bytes, data: bytes = b"", length=None):
    return lambda f: write_file(f, header, data, length)


def _tensors_json(entries: dict) -> bytes:
    return json.dumps({k: {"dtype": t, "shape": s, "data_offsets": o} for k, (t, s, o) in entries.items()}).encode()


def _out_of_range(w, d):
    """A global parameter above its maximum, for the first method that declares one."""
    from streammerge.methods import get_method, method_names

    for name in method_names():
        for prm in get_method(name).params:
            if prm.max is not None and prm.scope == "global" and prm.kind is float:
                text = YAML_OK.format(method=name, extra=f"parameters:\n  {prm.name}: {prm.max + 1.5}\n")
                (d / "r.yaml").write_text(text.format(base=w["base"], ft1=w["ft1"], ft2=w["ft2"]))
                return [d / "r.yaml"]
    pytest.skip("no merge method declares a bounded parameter")


YAML_OK = "merge_method: {method}\nbase_model: {{base}}\nmodels:\n  - model: {{ft1}}\n    parameters:\n      weight: 0.5\n{extra}"
BAD_FILE = "{d}/bad/model.safetensors"

CASES = [
    # missing paths
    Case("recipe missing", lambda w, d: [d / "nope.yaml"], ("{d}/nope.yaml", "no such recipe file")),
    Case("model dir missing", lambda w, d: [recipe(d / "r.yaml", w["base"], [d / "gone"])], ("{d}/gone", "no such model directory")),
    Case("no weights", _no_weights, ("{d}/bad", "no weights found")),
    Case("dangling symlink", _dangling, (BAD_FILE, "dangling symlink")),
    Case("pickle only", _pickle_only, ("{d}/bad", "pytorch_model.bin", "arbitrary code", "--allow-pickle")),
    # truncated / hostile headers
    Case("truncated data", bad_ft(_truncate(-100)), (BAD_FILE, "beyond the end of the file")),
    Case("truncated in header", bad_ft(_truncate(50)), (BAD_FILE, "goes beyond the end of the file")),
    Case("truncated to 5 bytes", bad_ft(_truncate(5)), (BAD_FILE, "shorter than the 8-byte")),
    Case("header length beyond file", bad_ft(_hdr(b"{}", length=10_000)), (BAD_FILE, "header length 10000 goes beyond")),
    Case("header over 100 MB", bad_ft(_hdr(b"{}", length=200_000_000)), (BAD_FILE, "exceeds the 100 MB limit")),
    Case("header not JSON", bad_ft(_hdr(b"{not json")), (BAD_FILE, "not valid JSON")),
    Case("header not an object", bad_ft(_hdr(b"[1, 2]")), (BAD_FILE, "must be a JSON object")),
    Case("unknown dtype", bad_ft(_hdr(_tensors_json({"w": ("Q7", [4], [0, 8])}), b"\0" * 8)), (BAD_FILE, "unknown dtype 'Q7'")),
    Case("shape product != bytes", bad_ft(_hdr(_tensors_json({"w": ("BF16", [4, 4], [0, 30])}), b"\0" * 30)),
         (BAD_FILE, "needs 32 bytes", "span 30")),
    Case("overlapping offsets", bad_ft(_hdr(_tensors_json({"a": ("BF16", [8], [0, 16]), "b": ("BF16", [8], [8, 24])}), b"\0" * 24)),
         (BAD_FILE, "overlap")),
    Case("non-contiguous offsets", bad_ft(_hdr(_tensors_json({"a": ("BF16", [8], [0, 16]), "b": ("BF16", [8], [24, 40])}), b"\0" * 40)),
         (BAD_FILE, "not contiguous")),
    Case("offsets out of file", bad_ft(_hdr(_tensors_json({"a": ("BF16", [4096], [0, 8192])}), b"\0" * 64)),
         (BAD_FILE, "beyond the end of the file")),
    Case("duplicate tensor names", bad_ft(_hdr(b'{"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}, '
                                                b'"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}', b"\0" * 8)),
         (BAD_FILE, "duplicate tensor name 'w'")),
    Case("duplicate across shards", _dup_across_shards, ("{d}/bad", NORM, "appears in both")),
    # indexes
    Case("index -> missing file", _index("model-00002-of-00002.safetensors"), ("{d}/bad", "model-00002-of-00002.safetensors", "does not exist")),
    Case("index -> ../x", _index("../x.safetensors"), ("{d}/bad/model.safetensors.index.json", "../x.safetensors", "plain file names")),
    Case("index -> /abs/x", _index("/abs/x.safetensors"), ("{d}/bad/model.safetensors.index.json", "/abs/x.safetensors", "plain file names")),
    # models that disagree
    Case("tensor missing in one model", _without(DOWN), ("{d}/bad", DOWN, "is missing")),
    Case("shape mismatch", _reshaped, ("{d}/bad", DOWN, "has shape [128, 64]", "[64, 128]")),
    Case("integer tensor", _int_dtype, ("{d}/bad/model.safetensors", NORM, "I16", "only BF16, F16, F32")),
    Case("mixed architectures", _mixed_arch, ("{d}/bad/config.json", "Qwen2ForCausalLM", "LlamaForCausalLM", "--allow-crimes")),
    # non-finite values: found while merging, in a new store
    Case("NaN input", _nonfinite(0x7FC0), (BAD_FILE, DOWN, "non-finite value (nan)", "flat index 5000", "--allow-nonfinite"),
         at_plan=False, fresh_store=True),
    Case("-Inf input", _nonfinite(0xFF80), (BAD_FILE, DOWN, "non-finite value (-inf)", "flat index 5000"),
         at_plan=False, fresh_store=True),
    # recipes
    Case("unknown method", _recipe_text(YAML_OK.format(method="frobnicate", extra="")),
         ("{d}/r.yaml:1", "unknown merge method 'frobnicate'")),
    Case("unknown parameter", _recipe_text(YAML_OK.format(method="ties", extra="      densty: 0.5\n")),
         ("{d}/r.yaml:7", "unknown parameter 'densty'", "did you mean 'density'")),
    Case("parameter out of range", lambda w, d: _out_of_range(w, d), ("{d}/r.yaml:8", "must be <=")),
    Case("YAML syntax", _recipe_text("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n   parameters: [\n"),
         ("{d}/r.yaml:5", "invalid YAML")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_error_and_touches_nothing(world, tmp_path, case):
    d = tmp_path
    args = case.setup(world, d)
    store = d / "new.zarr" if case.fresh_store else world["store"]
    before_store, before_out = tree_digest(world["store"]), tree_digest(world["out"])
    expect = [e.format(d=d) for e in case.expect]

    commands = [["build", *args, "--store", store, "--export", world["out"], "--overwrite", "--no-progress"]]
    if case.at_plan:
        commands.append(["plan", *args])
    for cmd in commands:
        res = invoke(*cmd)
        assert res.exit_code == 1, (cmd[0], res.output, res.exception)
        assert isinstance(res.exception, SystemExit), res.exception  # no traceback: a handled error
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        for frag in expect:
            assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
        assert "Traceback" not in res.output
    assert tree_digest(world["store"]) == before_store
    assert tree_digest(world["out"]) == before_out
    assert not [p for p in world["out"].parent.iterdir() if p.name.startswith(".out.")]
    if case.fresh_store:  # the new store is valid and resumable: status reads it, the lock is gone
        assert not (store / "lock").exists()
        res = invoke("status", store, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout)["complete"] is False


@pytest.mark.parametrize("name", ["header over 100 MB", "mixed architectures", "NaN input", "YAML syntax"])
def test_bad_input_through_a_real_process(world, tmp_path, name):
    case = next(c for c in CASES if c.name == name)
    args = case.setup(world, tmp_path)
    store = tmp_path / "new.zarr" if case.fresh_store else world["store"]
    r = subprocess.run([sys.executable, "-m", "streammerge", "build", *map(str, args), "--store", str(store),
                        "--export", str(world["out"]), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(e.format(d=tmp_path) in r.stderr for e in case.expect), r.stderr


def test_store_and_output_errors(world, tmp_path):
    cases = [
        (["status", tmp_path / "none.zarr"], ["none.zarr", "no such store"]),
        (["export", tmp_path, tmp_path / "o"], [str(tmp_path), "not a streammerge store"]),
        (["export", world["store"], world["out"]], [str(world["out"]), "already exists", "--overwrite"]),
    ]
    (tmp_path / "file.zarr").write_text("x")
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    good = world["root"] / "good.yaml"
    cases += [
        (["build", good, "--store", tmp_path / "file.zarr"], ["file.zarr", "exists and is not a directory"]),
        (["build", good, "--store", user_dir], [str(user_dir), "is not a streammerge store"]),
    ]
    before = tree_digest(world["out"])
    for args, frags in cases:
        res = invoke(*args)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (args, res.output)
        line = res.stderr.strip()
        assert "\n" not in line and line.startswith("error: "), line
        assert all(f in line for f in frags), (frags, line)
    assert (user_dir / "notes.txt").read_text() == "precious" and sorted(os.listdir(user_dir)) == ["notes.txt"]
    assert (tmp_path / "file.zarr").read_text() == "x"
    assert tree_digest(world["out"]) == before


def test_allow_flags_let_the_input_through(world, tmp_path):
    (tmp_path / "nan").mkdir()
    nan = _nonfinite(0x7FC0)(world, tmp_path / "nan")
    res = invoke("build", *nan, "--store", tmp_path / "nan.zarr", "--allow-nonfinite", "--no-progress")
    assert res.exit_code == 0, res.output
    (tmp_path / "arch").mkdir()
    arch = _mixed_arch(world, tmp_path / "arch")
    assert invoke("plan", *arch, "--allow-crimes").exit_code == 0
    res = invoke("build", *arch, "--store", tmp_path / "arch.zarr", "--allow-crimes", "--no-progress")
    assert res.exit_code == 0, res.output


def test_nonfinite_found_in_a_later_block_names_its_flat_index(world, tmp_path):
    m = clone(world["ft2"], tmp_path / "bad")
    poke(m, DOWN, 64 * 128 - 1, 0x7F80)  # the very last element: +inf
    r = recipe(tmp_path / "r.yaml", world["base"], [world["ft1"], m])
    res = invoke("build", r, "--store", tmp_path / "s.zarr", "--block-elements", "256", "--no-progress")
    assert res.exit_code == 1
    assert f"tensor {DOWN} holds a non-finite value (inf) at flat index {64 * 128 - 1}" in res.stderr
    assert str(m / "model.safetensors") in res.stderr


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "dare_linear", "ties", "dare_ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("where", ["base", "ft2"])
def test_nonfinite_named_whichever_check_finds_it(world, tmp_path, method, where):
    """The engine checks a row group's result, not its inputs, for methods whose result shows
    every NaN/Inf (task_arithmetic, linear, the ties family: masks and sign election multiply,
    so a NaN or Inf that does not count still leaves NaN), and passes read
    unchecked (the merge checks): the error still names the input, tensor and flat index,
    wherever the value is, in a small block (several groups) as in a whole one."""
    if method == "linear" and where == "base":
        pytest.skip("linear does not read the base")
    bad = clone(world[where], tmp_path / "bad")
    poke(bad, DOWN, 4321, 0xFF80)  # -inf
    base, ft2 = (bad, world["ft2"]) if where == "base" else (world["base"], bad)
    extra = {"parameters": {"density": 0.5}} if method not in ("task_arithmetic", "linear") else {}
    r = recipe(tmp_path / "r.yaml", base, [world["ft1"], ft2], method=method, **extra)
    if method == "linear":  # no base
        r.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(r.read_text()).items() if k != "base_model"}))
    for block in ("256", "8192"):
        res = invoke("build", r, "--store", tmp_path / f"s{block}.zarr", "--block-elements", block, "--no-progress")
        assert res.exit_code == 1, res.output
        assert f"{bad / 'model.safetensors'}: tensor {DOWN} holds a non-finite value (-inf) at flat index 4321" in res.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the compiled bits path (MergeMethod.merge_bf16)
def test_an_overflow_is_not_taken_for_a_nonfinite_input(world, tmp_path, dtype, monkeypatch):
    """A result checked in place of the inputs may be infinite from finite inputs (a weight
    near float32's largest, a large lambda): the inputs are then checked, found finite, and the merge goes on,
    giving what float32 arithmetic gives (inf), as when every input is checked."""
    import numpy as np
    from safetensors.numpy import load_file

    from streammerge.dtypes import BF16, from_float32
    from streammerge.ops import fused

    calls = []
    real = fused.task_arithmetic_bf16
    monkeypatch.setattr(fused, "task_arithmetic_bf16", lambda *a: calls.append(1) or real(*a))

    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(world["base"]), "dtype": dtype,
        "parameters": {"lambda": 1e6},
        "models": [{"model": str(world["ft1"]), "parameters": {"weight": 3e38}}],
    }, sort_keys=False))
    res = invoke("build", r, "--store", tmp_path / "s.zarr", "--export", tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[DOWN]
    if dtype == "bfloat16":  # safetensors.numpy reads bf16 as raw 2-byte words here
        got = (got.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    def f32(model):
        raw = read_raw(model / "model.safetensors")[DOWN][2]
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)

    b, t = f32(world["base"]), f32(world["ft1"])
    with np.errstate(over="ignore", invalid="ignore"):
        want = (t - b) * np.float32(3e38) * np.float32(1e6) + b
    assert not np.isfinite(want).all() and np.isfinite(b).all() and np.isfinite(t).all()
    if dtype == "bfloat16":
        want = (from_float32(want, BF16).astype(np.uint32) << 16).view(np.float32)
        assert bool(calls) == fused.available()  # the bits path where numba is
    np.testing.assert_array_equal(got.reshape(-1), want)


# ---- pickle checkpoints (--allow-pickle) --------------------------------------------------------


def _as_pickle(src: Path, dst: Path, shards: int = 1, alias: bool = False) -> Path:
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copyfile(src / f, dst / f)
    state = load_file(src / "model.safetensors")
    if alias:
        state["extra.alias"] = state[NORM]  # shares storage with NORM (tied weights)
    names = list(state)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    wm = {}
    for i, fname in enumerate(files):
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dst / fname)
        wm.update({n: fname for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


@pytest.mark.parametrize("shards", [1, 2])
def test_allow_pickle_converts_once_and_merges_identically(world, tmp_path, shards):
    pt = _as_pickle(world["ft2"], tmp_path / "ft2-pt", shards=shards, alias=shards == 1)
    r = recipe(tmp_path / "r.yaml", world["base"], [world["ft1"], pt])
    assert invoke("plan", r, "--allow-pickle").exit_code == 0
    store, out = tmp_path / "job.zarr", tmp_path / "out"
    res = invoke("build", r, "--store", store, "--export", out, "--allow-pickle", "--no-progress")
    assert res.exit_code == 0, res.output
    # the same weights as safetensors: the same export, byte for byte (but the model card and
    # recipe, which name the inputs: the pickle directory here)
    card = {"README.md", "mergekit_config.yml"}
    assert {k: v for k, v in tree_digest(out).items() if k not in card} == {
        k: v for k, v in tree_digest(world["out"]).items() if k not in card}
    assert str(pt) in (out / "README.md").read_text()
    converted = [p for p in (store / "converted").iterdir()]
    assert len(converted) == 1 and (converted[0] / ".complete").is_file()
    st = sorted(p.name for p in converted[0].glob("*.safetensors"))
    assert len(st) == shards
    stamp = {p: p.stat().st_mtime_ns for p in converted[0].iterdir()}
    res = invoke("build", r, "--store", store, "--allow-pickle", "--no-progress")
    assert res.exit_code == 0 and "0 block(s) computed" in res.stdout, res.output
    assert {p: p.stat().st_mtime_ns for p in converted[0].iterdir()} == stamp, "converted once, not again"
    # --restart keeps the conversion cache (the plan already points into it)
    res = invoke("build", r, "--store", store, "--allow-pickle", "--restart", "--no-progress")
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in converted[0].iterdir()} == stamp


def test_allow_pickle_still_refuses_code_and_needs_torch(world, tmp_path, monkeypatch):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    m = tmp_path / "evil"
    m.mkdir()
    shutil.copyfile(world["ft2"] / "config.json", m / "config.json")
    (m / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    r = recipe(tmp_path / "r.yaml", world["base"], [world["ft1"], m])
    res = invoke("build", r, "--store", tmp_path / "a.zarr", "--allow-pickle", "--no-progress")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    line = res.stderr.strip()
    assert "\n" not in line and f"{m / 'pytorch_model.bin'}: cannot load with torch.load(weights_only=True)" in line
    assert not marker.exists()

    pt = _as_pickle(world["ft2"], tmp_path / "ft2-pt")
    r = recipe(tmp_path / "r2.yaml", world["base"], [world["ft1"], pt])
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    res = invoke("build", r, "--store", tmp_path / "b.zarr", "--allow-pickle", "--no-progress")
    assert res.exit_code == 1 and "needs torch" in res.stderr and "\n" not in res.stderr.strip(), res.output
