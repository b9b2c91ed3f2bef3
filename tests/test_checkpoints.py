"""Tests for streammerge.checkpoints: the strict safetensors header reader and model resolution."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from safetensors.numpy import save_file

from streammerge.checkpoints import (
    ModelCheckpoint,
    SafetensorsHeader,
    TensorHandle,
    open_model,
    parse_header,
    read_header,
    resolve_model_dir,
)
from streammerge.errors import CheckpointError, StreammergeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz_headers  # noqa: E402  (the hypothesis strategies live in tools/fuzz_headers.py)

# --------------------------------------------------------------------------------------------
# helpers


def raw_file(header: str | bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    """Hand-craft a safetensors file: length prefix + header (+ data)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def assert_one_line_error(exc: BaseException, path: str | Path, *fragments: str) -> None:
    msg = str(exc)
    assert type(exc) is CheckpointError and isinstance(exc, StreammergeError)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def read_back(h: TensorHandle) -> np.ndarray:
    """Read a tensor through its handle only (path + offset + dtype + shape)."""
    np_dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "I64": np.int64}[h.dtype]
    arr = np.fromfile(h.path, dtype=np_dtype, count=h.numel, offset=h.offset)
    assert arr.nbytes == h.nbytes
    return arr.reshape(h.shape)


def write_model(directory: Path, shards: dict[str, dict[str, np.ndarray]], index: bool | dict = True,
                config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for fname, tensors in shards.items():
        save_file(tensors, directory / fname, metadata={"format": "pt"})
    if index is True:
        index = {"metadata": {"total_size": 0},
                 "weight_map": {t: f for f, ts in shards.items() for t in ts}}
    if index:
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


RNG = np.random.default_rng(0)
ARRAYS = {
    "embed.weight": RNG.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),
    "layer.0.weight": RNG.standard_normal((3, 4)).astype(np.float16),
    "layer.0.bias": RNG.standard_normal((3,)).astype(np.float32),
    "norm.weight": RNG.standard_normal((4,)).astype(ml_dtypes.bfloat16),
    "empty": np.zeros((0, 4), np.float32),
    "scalar": np.array(2.5, np.float32),
}


# --------------------------------------------------------------------------------------------
# header reader: valid files


def test_read_header_bf16_f16_f32(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(ARRAYS, p, metadata={"format": "pt"})
    h = read_header(p)
    assert isinstance(h, SafetensorsHeader)
    assert h.metadata == {"format": "pt"}
    assert set(h.tensors) == set(ARRAYS)
    assert h.file_size == p.stat().st_size
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert h.data_start == 8 + n
    assert h.header_sha256 == hashlib.sha256(raw[: 8 + n]).hexdigest()
    # header order is the JSON's order
    assert list(h.tensors) == [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    dtypes = {"embed.weight": "BF16", "layer.0.weight": "F16", "layer.0.bias": "F32", "empty": "F32"}
    for name, dt in dtypes.items():
        assert h.tensors[name].dtype == dt
    assert h.tensors["scalar"].shape == ()
    assert h.tensors["empty"].shape == (0, 4) and h.tensors["empty"].nbytes == 0
    # offsets point at the right bytes
    for name, arr in ARRAYS.items():
        t = h.tensors[name]
        got = raw[h.data_start + t.begin : h.data_start + t.end]
        assert got == np.ascontiguousarray(arr).tobytes()


def test_parse_header_is_pure_and_ignores_data(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": np.ones(3, np.float32)}, p)
    raw = p.read_bytes()
    h1 = parse_header(raw, len(raw), "x.safetensors")  # extra bytes after the header are ignored
    (n,) = struct.unpack("<Q", raw[:8])
    h2 = parse_header(raw[: 8 + n], len(raw), "x.safetensors")
    assert h1 == h2 and h1.path == Path("x.safetensors")


def test_empty_safetensors_file_is_valid():
    raw = raw_file("{}")
    h = parse_header(raw, len(raw), "e.safetensors")
    assert h.tensors == {} and h.metadata is None


def test_huge_declared_header_is_refused_without_reading(tmp_path):
    # a sparse 300 MB file claiming a 250 MB header: rejected from the prefix alone
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 250_000_000))
        f.truncate(300_000_000)
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    assert_one_line_error(ei.value, p, "exceeds the 100 MB limit")


# --------------------------------------------------------------------------------------------
# header reader: the table of malformed files

F32x1 = entry()
MALFORMED = [
    # (id, file bytes, fragments the message must contain)
    ("empty-file", b"", ["file is 0 bytes", "shorter than the 8-byte"]),
    ("short-file", b"\x01\x02\x03\x04\x05", ["file is 5 bytes", "shorter than the 8-byte"]),
    ("length-beyond-file", raw_file("{}", length=1000), ["header length 1000", "beyond the end of the file"]),
    ("length-u64-max", raw_file("{}", length=2**64 - 1), ["exceeds the 100 MB limit"]),
    ("length-over-100MB", raw_file("{}", length=100_000_001), ["exceeds the 100 MB limit"]),
    ("not-utf8", raw_file(b'{"a\xff\xfe": 1}'), ["not valid UTF-8"]),
    ("not-json", raw_file('{"a": '), ["not valid JSON"]),
    ("empty-header", raw_file(""), ["not valid JSON"]),
    ("trailing-garbage", raw_file("{} x"), ["not valid JSON"]),
    ("nan", raw_file('{"a": NaN}'), ["not valid JSON", "NaN"]),
    ("infinity", raw_file('{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}', b"\0" * 4),
     ["not valid JSON"]),
    ("huge-int-literal", raw_file('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'),
     ["not valid JSON (an integer literal has too many digits)"]),
    ("huge-offsets-message", raw_file({"w": entry(offsets=(10**4000, 0))}), ["begin ~2^13287 is after end 0"]),
    ("deep-nesting", raw_file("[" * 200_000 + "]" * 200_000), ["nested too deeply"]),
    ("deep-nesting-object", raw_file('{"a":' * 50_000 + "1" + "}" * 50_000), ["nested too deeply"]),
    ("top-level-array", raw_file("[1, 2]"), ["must be a JSON object, got an array"]),
    ("top-level-string", raw_file('"hi"'), ["must be a JSON object, got a string"]),
    ("metadata-not-object", raw_file({"__metadata__": ["x"]}), ["__metadata__ must be an object of strings"]),
    ("metadata-non-str-value", raw_file({"__metadata__": {"format": 1}}),
     ["__metadata__['format'] must be a string, got an integer"]),
    ("metadata-duplicate-key", raw_file('{"__metadata__": {"k": "a", "k": "b"}}'),
     ["duplicate key 'k' in __metadata__"]),
    ("entry-not-object", raw_file({"w": 5}), ["tensor 'w'", "entry must be an object, got an integer"]),
    ("entry-null", raw_file({"w": None}), ["tensor 'w'", "entry must be an object, got null"]),
    ("missing-dtype", raw_file({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     ["tensor 'w'", "missing field 'dtype'"]),
    ("missing-shape", raw_file({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
     ["missing field 'shape'"]),
    ("missing-offsets", raw_file({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
     ["missing field 'data_offsets'"]),
    ("unknown-field", raw_file({"w": {**F32x1, "extra": 1}}, b"\0" * 4), ["unknown field 'extra'"]),
    ("dtype-not-string", raw_file({"w": entry(dtype=4)}, b"\0" * 4), ["dtype must be a string, got an integer"]),
    ("unknown-dtype", raw_file({"w": entry(dtype="F128")}, b"\0" * 4), ["unknown dtype 'F128'"]),
    ("lowercase-dtype", raw_file({"w": entry(dtype="bf16")}, b"\0" * 4), ["unknown dtype 'bf16'"]),
    ("shape-not-list", raw_file({"w": {**F32x1, "shape": "1"}}, b"\0" * 4),
     ["shape must be an array of integers, got a string"]),
    ("negative-dim", raw_file({"w": entry(shape=(-1,))}, b"\0" * 4), ["negative dimension -1"]),
    ("float-dim", raw_file({"w": entry(shape=(1.0,))}, b"\0" * 4), ["non-integer dimension 1.0"]),
    ("bool-dim", raw_file({"w": entry(shape=(True,))}, b"\0" * 4), ["non-integer dimension True"]),
    ("offsets-not-list", raw_file({"w": {**F32x1, "data_offsets": "0,4"}}, b"\0" * 4),
     ["data_offsets must be an array of 2 integers, got a string"]),
    ("offsets-one-value", raw_file({"w": entry(offsets=(4,))}, b"\0" * 4),
     ["data_offsets must be an array of 2 integers, got an array of 1"]),
    ("offsets-float", raw_file({"w": entry(offsets=(0, 4.0))}, b"\0" * 4), ["non-integer value 4.0"]),
    ("offsets-negative", raw_file({"w": entry(offsets=(-4, 0))}, b"\0" * 4), ["negative value"]),
    ("begin-after-end", raw_file({"w": entry(shape=(0,), offsets=(4, 0))}, b"\0" * 4),
     ["data_offsets begin 4 is after end 0"]),
    ("size-mismatch", raw_file({"w": entry(shape=(2,), offsets=(0, 4))}, b"\0" * 4),
     ["shape [2] of F32 needs 8 bytes but data_offsets [0, 4] span 4"]),
    ("huge-numel", raw_file({"w": entry(shape=(2**40, 2**40), offsets=(0, 4))}, b"\0" * 4),
     ["has over 2^63 elements but data_offsets [0, 4] span 4 bytes"]),
    ("many-large-dims", raw_file({"w": entry(shape=[2**62] * 100_000, offsets=(0, 4))}, b"\0" * 4),
     ["has over 2^63 elements"]),
    ("dim-over-int64", raw_file({"w": entry(shape=[2**63, 0], offsets=(0, 0))}), ["dimension 9223372036854775808 over 2^63 - 1"]),
    ("huge-dim-then-zero", raw_file({"w": entry(shape=[10**4000, 0], offsets=(0, 0))}), ["dimension ~2^13287 over 2^63 - 1"]),
    ("subbyte-not-whole-bytes", raw_file({"w": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"\0" * 2),
     ["3 elements of F4 do not fill a whole number of bytes"]),
    ("offsets-beyond-file", raw_file({"w": entry(shape=(2,), offsets=(0, 8))}, b"\0" * 4),
     ["data_offsets [0, 8] go beyond the end of the file", "data section is 4 bytes"]),
    ("offsets-huge", raw_file({"w": entry(offsets=(2**64, 2**64 + 4))}, b"\0" * 4), ["beyond the end of the file"]),
    ("overlap", raw_file({"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))}, b"\0" * 12),
     ["tensor 'b' data_offsets [4, 12] overlap tensor 'a' [0, 8]"]),
    ("same-span-twice", raw_file({"a": entry(), "b": entry()}, b"\0" * 4), ["overlap tensor"]),
    ("zero-size-inside-another", raw_file({"a": entry(shape=(2,), offsets=(0, 8)), "z": entry(shape=(0,), offsets=(4, 4))},
                                          b"\0" * 8), ["tensor 'z' data_offsets [4, 4] overlap tensor 'a'"]),
    ("gap", raw_file({"a": entry(), "b": entry(offsets=(8, 12))}, b"\0" * 12),
     ["tensor 'b' starts at data offset 8 but tensor 'a' ends at 4", "not contiguous"]),
    ("gap-at-start", raw_file({"a": entry(offsets=(4, 8))}, b"\0" * 8), ["not contiguous"]),
    ("trailing-bytes", raw_file({"a": entry()}, b"\0" * 8), ["tensors end at data offset 4 but the data section is 8 bytes"]),
    ("no-tensors-but-data", raw_file("{}", b"\0" * 4), ["4 trailing bytes belong to no tensor"]),
    ("duplicate-tensor-name",
     raw_file('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
              ' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
     ["duplicate tensor name 'w'"]),
    ("duplicate-field", raw_file('{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
                                 b"\0" * 4), ["tensor 'w': duplicate field 'dtype'"]),
    ("newline-in-name", raw_file({"a\nb": 1}), ["tensor 'a\\nb'"]),
    ("lone-surrogate-name", raw_file('{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
     ["tensor name 'w\\ud800' is not valid Unicode"]),
    ("lone-surrogate-metadata", raw_file('{"__metadata__": {"k": "\\udfff"}}'), ["__metadata__['k']", "not valid Unicode"]),
]


@pytest.mark.parametrize("content,fragments", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_headers(tmp_path, content, fragments):
    p = tmp_path / "bad model.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    assert_one_line_error(ei.value, p, *fragments)
    assert str(ei.value).startswith(f"{p}: ")
    # the pure parser says the same thing about the same bytes
    with pytest.raises(CheckpointError) as ei2:
        parse_header(content, len(content), p)
    assert str(ei2.value) == str(ei.value)


def test_parse_header_truncated_raw():
    raw = raw_file({"a": entry()}, b"\0" * 4)
    with pytest.raises(CheckpointError) as ei:
        parse_header(raw[:20], len(raw), "t.safetensors")
    assert_one_line_error(ei.value, "t.safetensors", "header is truncated")


@pytest.mark.parametrize("target,fragment", [("missing", "cannot read"), ("directory", "is a directory"),
                                             ("fifo", "not a regular file")])
def test_read_header_unreadable(tmp_path, target, fragment):
    p = tmp_path / "x.safetensors"
    if target == "directory":
        p.mkdir()
    elif target == "fifo":
        os.mkfifo(p)  # opening it for reading would block forever
    with pytest.raises(CheckpointError) as ei:
        read_header(p)
    assert_one_line_error(ei.value, p, fragment)


# --------------------------------------------------------------------------------------------
# models


def test_single_file_model(tmp_path):
    d = write_model(tmp_path / "m", {"model.safetensors": ARRAYS}, index=False, config={"model_type": "llama"})
    m = open_model(str(d))
    assert isinstance(m, ModelCheckpoint)
    assert m.directory == d.resolve() and m.files == (d / "model.safetensors",)
    assert m.config == {"model_type": "llama"}
    assert set(m.tensors) == set(ARRAYS)
    for name, arr in ARRAYS.items():
        h = m.tensors[name]
        assert os.path.isabs(h.path) and h.name == name
        got = read_back(h)
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
    h = m.tensors["embed.weight"]
    assert h.dtype == "BF16" and h.shape == (5, 4) and h.numel == 20 and h.nbytes == 40
    assert m.tensors["empty"].nbytes == 0 and m.tensors["scalar"].numel == 1


def test_tensor_handle_is_small_and_picklable(tmp_path):
    d = write_model(tmp_path / "m", {"model.safetensors": ARRAYS}, index=False)
    m = open_model(str(d))
    h = m.tensors["embed.weight"]
    blob = pickle.dumps(h)
    assert len(blob) < 400 and pickle.loads(blob) == h
    assert pickle.loads(pickle.dumps(m)).tensors == m.tensors


def test_relative_spec(tmp_path, monkeypatch):
    write_model(tmp_path / "m", {"model.safetensors": {"a": np.ones(2, np.float32)}}, index=False)
    monkeypatch.chdir(tmp_path)
    m = open_model("m")
    assert m.spec == "m" and m.directory == (tmp_path / "m").resolve()


def test_sharded_model_with_index(tmp_path):
    shards = {
        "model-00001-of-00002.safetensors": {k: ARRAYS[k] for k in ("embed.weight", "layer.0.weight")},
        "model-00002-of-00002.safetensors": {k: ARRAYS[k] for k in ("layer.0.bias", "norm.weight")},
    }
    d = write_model(tmp_path / "m", shards, config={"hidden_size": 4})
    m = open_model(str(d))
    assert m.files == tuple(d / f for f in sorted(shards))
    assert set(m.tensors) == {"embed.weight", "layer.0.weight", "layer.0.bias", "norm.weight"}
    for fname, ts in shards.items():
        for name, arr in ts.items():
            h = m.tensors[name]
            assert h.path == str((d / fname).resolve())
            assert read_back(h).tobytes() == arr.tobytes() and read_back(h).dtype == arr.dtype
    fp = m.fingerprint()
    assert set(fp) == set(shards)
    for fname in shards:
        st = os.stat(d / fname)
        assert fp[fname]["size"] == st.st_size and fp[fname]["mtime_ns"] == st.st_mtime_ns
        assert fp[fname]["header_sha256"] == read_header(d / fname).header_sha256
    # fingerprint() hands out copies
    fp["model-00001-of-00002.safetensors"]["size"] = -1
    assert m.fingerprint() != fp


def test_index_exposes_only_listed_tensors(tmp_path):
    d = write_model(tmp_path / "m", {"a.safetensors": {"x": np.ones(2, np.float32), "extra": np.ones(1, np.float32)}},
                    index={"weight_map": {"x": "a.safetensors"}})
    assert set(open_model(str(d)).tensors) == {"x"}


def test_glob_of_safetensors_without_index(tmp_path):
    d = write_model(tmp_path / "m", {"b.safetensors": {"y": np.ones(2, np.float32)},
                                     "a.safetensors": {"x": np.ones(3, np.float16)}}, index=False)
    (d / "notes.txt").write_text("hi")
    m = open_model(str(d))
    assert [f.name for f in m.files] == ["a.safetensors", "b.safetensors"]
    assert list(m.tensors) == ["x", "y"]


def test_duplicate_tensor_across_shards(tmp_path):
    d = write_model(tmp_path / "m", {"a.safetensors": {"x": np.ones(2, np.float32)},
                                     "b.safetensors": {"x": np.ones(2, np.float32)}}, index=False)
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, "tensor 'x' appears in both a.safetensors and b.safetensors")


def test_duplicate_tensor_across_indexed_shards(tmp_path):
    d = write_model(tmp_path / "m", {"a.safetensors": {"x": np.ones(2, np.float32)},
                                     "b.safetensors": {"x": np.ones(2, np.float32), "y": np.ones(1, np.float32)}},
                    index={"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, "appears in both")


def _index_model(tmp_path) -> Path:
    return write_model(tmp_path / "m", {"a.safetensors": {"x": np.ones(2, np.float32)},
                                        "b.safetensors": {"y": np.ones(2, np.float32)}}, index=False)


BAD_INDEXES = [
    ("parent-dir", {"weight_map": {"x": "../a.safetensors"}}, ["weight_map['x']", "plain file names"]),
    ("absolute", {"weight_map": {"x": "/etc/a.safetensors"}}, ["plain file names"]),
    ("subdir", {"weight_map": {"x": "sub/a.safetensors"}}, ["plain file names"]),
    ("backslash", {"weight_map": {"x": "..\\a.safetensors"}}, ["plain file names"]),
    ("empty-name", {"weight_map": {"x": ""}}, ["weight_map['x'] is an empty file name"]),
    ("dotdot", {"weight_map": {"x": ".."}}, ["is not a valid file name"]),
    ("not-safetensors", {"weight_map": {"x": "a.bin"}}, ["must be .safetensors files"]),
    ("non-str-name", {"weight_map": {"x": 3}}, ["must be a file name string, got int"]),
    ("missing-file", {"weight_map": {"x": "c.safetensors"}}, ["references shard 'c.safetensors'", "does not exist"]),
    ("tensor-not-in-file", {"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}},
     ["maps tensor 'z' to a.safetensors, but that file does not contain it"]),
    ("tensor-in-other-file", {"weight_map": {"x": "b.safetensors"}}, ["maps tensor 'x' to b.safetensors"]),
    ("no-weight-map", {"metadata": {}}, ["has no 'weight_map'"]),
    ("weight-map-list", {"weight_map": ["a.safetensors"]}, ["'weight_map' must be an object"]),
    ("weight-map-empty", {"weight_map": {}}, ["'weight_map' is empty"]),
    ("index-list", [1], ["the index must be a JSON object"]),
    ("index-not-json", "{not json", ["the index is not valid JSON"]),
    ("index-dup-tensor", '{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}',
     ["tensor 'x' is listed twice in weight_map"]),
    ("index-deep", "[" * 100_000, ["nested too deeply"]),
]


@pytest.mark.parametrize("index,fragments", [c[1:] for c in BAD_INDEXES], ids=[c[0] for c in BAD_INDEXES])
def test_bad_index(tmp_path, index, fragments):
    d = _index_model(tmp_path)
    (tmp_path / "a.safetensors").write_bytes((d / "a.safetensors").read_bytes())  # a decoy outside
    (d / "sub").mkdir()
    (d / "sub" / "a.safetensors").write_bytes((d / "a.safetensors").read_bytes())
    text = index if isinstance(index, str) else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, *fragments)


def test_index_names_may_be_symlinks_to_outside(tmp_path):
    # the name check is on the NAME: a plain name that links elsewhere (as in the HF cache) is fine
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"x": np.arange(3, dtype=np.float32)}, blobs / "abc123")
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.safetensors").symlink_to("../blobs/abc123")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    m = open_model(str(d))
    assert m.tensors["x"].path == str((blobs / "abc123").resolve())
    assert np.array_equal(read_back(m.tensors["x"]), np.arange(3, dtype=np.float32))


def test_dangling_shard_symlink(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.safetensors").symlink_to("../blobs/missing")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, "dangling symlink")


def test_corrupt_shard_is_reported_with_its_path(tmp_path):
    d = write_model(tmp_path / "m", {"model.safetensors": {"x": np.ones(2, np.float32)}}, index=False)
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d / "model.safetensors", "1 trailing bytes")


def test_dangling_link_without_index_is_reported(tmp_path):
    d = write_model(tmp_path / "m", {"a.safetensors": {"x": np.ones(1, np.float32)}}, index=False)
    (d / "b.safetensors").symlink_to("../blobs/not-downloaded")
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d / "b.safetensors", "dangling symlink")


def test_dangling_config_is_reported(tmp_path):
    d = write_model(tmp_path / "m", {"model.safetensors": {"x": np.ones(1, np.float32)}}, index=False)
    (d / "config.json").symlink_to("../blobs/not-downloaded")
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d / "config.json", "dangling symlink")


def test_spec_with_overlong_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    spec = "a" * 300 + "/b"
    with pytest.raises(CheckpointError) as ei:
        open_model(spec)
    assert_one_line_error(ei.value, spec)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.00.pth"])
def test_pickle_only_model_is_refused(tmp_path, name):
    d = tmp_path / "m"
    d.mkdir()
    (d / name).write_bytes(b"\x80\x04not really a pickle")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, name, "execute arbitrary code", "safe_serialization=True",
                          f"from_pretrained('{d.resolve()}')")


@pytest.mark.parametrize(
    "setup,fragments",
    [
        ("missing", ["no such model directory"]),
        ("file", ["is a file, not a model directory"]),
        ("empty-dir", ["no weights found"]),
        ("bad-config", ["config.json is not valid JSON"]),
        ("config-list", ["config.json must be a JSON object"]),
        ("no-tensors", ["contains no tensors"]),
    ],
)
def test_model_dir_errors(tmp_path, setup, fragments):
    d = tmp_path / "model dir"
    if setup == "file":
        d.write_bytes(b"x")
    elif setup != "missing":
        d.mkdir()
    if setup in ("bad-config", "config-list"):
        save_file({"x": np.ones(1, np.float32)}, d / "model.safetensors")
        (d / "config.json").write_text("{oops" if setup == "bad-config" else "[]")
    if setup == "no-tensors":
        (d / "model.safetensors").write_bytes(raw_file("{}"))
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d))
    assert_one_line_error(ei.value, d, *fragments)


# -- the Hugging Face cache ---------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def make_hf_cache(root: Path) -> Path:
    """hub/models--org--name with blobs, refs/{main,dev} and two snapshots linking to blobs."""
    repo = root / "hub" / "models--org--name"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    save_file({"x": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}, blobs / "sha-x")
    save_file({"y": np.full(2, 3, np.float16)}, blobs / "sha-y")
    save_file({"x": np.zeros(1, np.float32)}, blobs / "sha-old")
    (blobs / "sha-index").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                        "y": "model-00002-of-00002.safetensors"}}))
    (blobs / "sha-config").write_text(json.dumps({"model_type": "llama"}))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, blob in [("model-00001-of-00002.safetensors", "sha-x"), ("model-00002-of-00002.safetensors", "sha-y"),
                       ("model.safetensors.index.json", "sha-index"), ("config.json", "sha-config")]:
        (snap / name).symlink_to(f"../../blobs/{blob}")
    old = repo / "snapshots" / OTHER
    old.mkdir(parents=True)
    (old / "model.safetensors").symlink_to("../../blobs/sha-old")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "dev").write_text(OTHER + "\n")
    return root / "hub"


def test_hf_cache_resolution(tmp_path, monkeypatch):
    hub = make_hf_cache(tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    m = open_model("org/name")
    assert m.spec == "org/name"
    assert m.directory == (hub / "models--org--name" / "snapshots" / COMMIT).resolve()
    assert m.config == {"model_type": "llama"}
    hx = m.tensors["x"]
    assert hx.path == str((hub / "models--org--name" / "blobs" / "sha-x").resolve())
    assert np.array_equal(read_back(hx).astype(np.float32), np.arange(4, dtype=np.float32))
    assert np.array_equal(read_back(m.tensors["y"]), np.full(2, 3, np.float16))
    assert set(m.fingerprint()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    # a branch ref, and a commit hash naming a snapshot directly
    assert set(open_model("org/name@dev").tensors) == {"x"}
    assert resolve_model_dir(f"org/name@{OTHER}") == (hub / "models--org--name" / "snapshots" / OTHER).resolve()


def test_hf_home_and_default_cache(tmp_path, monkeypatch):
    hub = make_hf_cache(tmp_path / "home")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hub.parent))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/name").name == COMMIT
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "fakehome"))
    (tmp_path / "fakehome" / ".cache" / "huggingface").mkdir(parents=True)
    hub.rename(tmp_path / "fakehome" / ".cache" / "huggingface" / "hub")
    assert resolve_model_dir("org/name").name == COMMIT


def test_local_directory_wins_over_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(make_hf_cache(tmp_path / "cache")))
    write_model(tmp_path / "work" / "org" / "name", {"model.safetensors": {"local": np.ones(1, np.float32)}}, index=False)
    monkeypatch.chdir(tmp_path / "work")
    assert set(open_model("org/name").tensors) == {"local"}


@pytest.mark.parametrize(
    "spec,fragments",
    [
        ("org/missing", ["org/missing: no such directory", "models--org--missing", "HF_HUB_CACHE"]),
        ("org/name@nope", ["revision 'nope' not found", "refs/nope"]),
        ("org/name@../../x", ["no such model directory"]),
        ("org/name@gone", ["points to commit", "does not exist"]),
        ("not a repo id", ["no such model directory"]),
    ],
)
def test_hf_cache_errors(tmp_path, monkeypatch, spec, fragments):
    hub = make_hf_cache(tmp_path / "cache")
    (hub / "models--org--name" / "refs" / "gone").write_text("deadbeef")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        open_model(spec)
    assert_one_line_error(ei.value, spec, *fragments)


# --------------------------------------------------------------------------------------------
# property tests (strategies from tools/fuzz_headers.py; run that tool for many more examples)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_headers.hostile_headers())
def test_fuzz_parse_header_raises_only_checkpoint_error(case):
    raw, file_size = case
    fuzz_headers.check_hostile(raw, file_size)


@settings(max_examples=100, deadline=None)
@given(fuzz_headers.layouts())
def test_fuzz_valid_headers_round_trip(layout):
    fuzz_headers.check_valid(layout)


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory):
    return fuzz_headers.make_index_model(tmp_path_factory.mktemp("fuzzidx"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=fuzz_headers.index_documents())
def test_fuzz_index_json(fuzz_model, doc):
    fuzz_headers.check_index(fuzz_model, doc)
