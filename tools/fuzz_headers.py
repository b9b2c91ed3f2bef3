#!/usr/bin/env python
"""Fuzz the safetensors header reader and the index.json reader.

    python tools/fuzz_headers.py --examples 10000 [--seed N]

Feeds arbitrary bytes and mutated valid headers to `parse_header`, checks valid generated
headers parse back exactly, and writes mutated `model.safetensors.index.json` files into a
temporary model directory for `open_model`. The only exception allowed out is a one-line
CheckpointError naming the path. Prints one summary line; exits non-zero on a failure (with
hypothesis's minimal falsifying example).

The hypothesis strategies live here and tests/test_checkpoints.py imports them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from streammerge.checkpoints.model import INDEX_NAME, open_model  # noqa: E402
from streammerge.checkpoints.safetensors_header import (  # noqa: E402
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    parse_header,
)
from streammerge.errors import CheckpointError  # noqa: E402

FUZZ_PATH = "fuzz/case.safetensors"  # the path handed to parse_header

# --------------------------------------------------------------------------------------------
# a tiny JSON writer that can express what json.dumps cannot: duplicate keys and raw tokens


class Obj(list):
    """A JSON object as a list of (key, value) pairs: keys may repeat."""


class Raw(str):
    """Text inserted verbatim into the JSON (NaN, 1e999, unbalanced nesting, ...)."""


def dumps(value: Any, ensure_ascii: bool = True) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(
            json.dumps(k, ensure_ascii=ensure_ascii) + ":" + dumps(v, ensure_ascii) for k, v in value
        ) + "}"
    if isinstance(value, dict):
        return dumps(Obj(value.items()), ensure_ascii)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def frame(header_text: bytes, length: int | None = None) -> bytes:
    """8-byte little-endian length prefix + header bytes."""
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text


# --------------------------------------------------------------------------------------------
# strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# raw JSON fragments that stress the parser rather than the validator
raw_tokens = st.sampled_from(
    [
        "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "-0", "0.0", "2.5", "1e2",
        "9" * 5000, "-" + "9" * 5000, str(2**64), str(2**63 - 1), str(-(2**63)),
        '"\\ud800"', '"\\u0000"', '"BF16\\u0000"', "true", "null", "[]", "{}", '""',
        "[" * 100_000 + "]" * 100_000, "{" * 50_000, '{"a":' * 20_000 + "1" + "}" * 20_000,
    ]
).map(Raw)

interesting_ints = st.sampled_from(
    [0, 1, -1, 7, 8, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 8, 10**30, 10**4000,
     MAX_HEADER_BYTES + 1]
)
any_value = json_values | raw_tokens | interesting_ints

hostile_names = st.sampled_from(
    ["", "__metadata__", "a\nb", "\x00", "\u202e", "x" * 300, "名前", "\U0001f600"]
) | st.text(max_size=10)

dtypes = st.sampled_from(sorted(DTYPE_BITS))


@dataclass
class Layout:
    """A valid safetensors header, in structured form, with what it must parse to."""

    doc: Obj  # the JSON document (entries are Obj of dtype/shape/data_offsets)
    expected: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: dict[str, str] | None
    data_size: int
    pad: int  # trailing spaces after the JSON
    ensure_ascii: bool

    def header_text(self) -> bytes:
        return (dumps(self.doc, self.ensure_ascii) + " " * self.pad).encode("utf-8")

    def raw_and_size(self) -> tuple[bytes, int]:
        text = self.header_text()
        return frame(text), 8 + len(text) + self.data_size


@st.composite
def layouts(draw, max_tensors: int = 6) -> Layout:
    names = draw(
        st.lists(st.text(max_size=16).filter(lambda s: s != "__metadata__"), max_size=max_tensors, unique=True)
    )
    specs = []
    for name in names:
        dtype = draw(dtypes)
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPE_BITS[dtype] % 8:  # sub-byte dtypes must fill whole bytes
            dtype = "U8"
        specs.append((name, dtype, shape, numel * DTYPE_BITS[dtype] // 8))
    # data order is a permutation of header order
    order = draw(st.permutations(range(len(specs))))
    expected: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    cursor = 0
    offsets = {}
    for i in order:
        name, dtype, shape, nbytes = specs[i]
        offsets[name] = (cursor, cursor + nbytes)
        cursor += nbytes
    doc = Obj()
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    meta_pos = draw(st.integers(0, len(specs)))
    for pos, (name, dtype, shape, _) in enumerate(specs):
        if metadata is not None and pos == meta_pos:
            doc.append(("__metadata__", dict(metadata)))
        begin, end = offsets[name]
        doc.append((name, Obj([("dtype", dtype), ("shape", list(shape)), ("data_offsets", [begin, end])])))
        expected[name] = (dtype, shape, begin, end)
    if metadata is not None and meta_pos >= len(specs):
        doc.append(("__metadata__", dict(metadata)))
    return Layout(
        doc=doc,
        expected=expected,
        metadata=metadata,
        data_size=cursor,
        pad=draw(st.integers(0, 7)),
        ensure_ascii=draw(st.booleans()),
    )


def _entries(layout: Layout) -> list[int]:
    return [i for i, (k, v) in enumerate(layout.doc) if isinstance(v, Obj)]


@st.composite
def mutated_layouts(draw) -> tuple[bytes, int]:
    """A valid header with 1-3 structural, textual or framing mutations."""
    layout = draw(layouts())
    doc = layout.doc
    length_override = None
    size_delta = 0
    text_edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                [
                    "entry_value", "drop_field", "field_value", "dup_entry", "dup_field",
                    "extra_field", "shift_offsets", "shape_dim", "metadata", "doc_value",
                    "dtype", "raw_field", "file_size", "length", "text_edit", "extra_tensor",
                    "zero_size", "swap_spans",
                ]
            )
        )
        ents = _entries(layout)
        if kind in ("entry_value", "drop_field", "field_value", "dup_entry", "dup_field",
                    "extra_field", "shift_offsets", "shape_dim", "dtype", "raw_field") and not ents:
            kind = "extra_tensor"
        if kind == "entry_value":
            i = draw(st.sampled_from(ents))
            doc[i] = (doc[i][0], draw(any_value))
        elif kind == "drop_field":
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            if fields:
                del fields[draw(st.integers(0, len(fields) - 1))]
        elif kind in ("field_value", "raw_field"):
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            if fields:
                j = draw(st.integers(0, len(fields) - 1))
                fields[j] = (fields[j][0], draw(raw_tokens if kind == "raw_field" else any_value))
        elif kind == "dup_entry":
            i = draw(st.sampled_from(ents))
            doc.insert(draw(st.integers(0, len(doc))), (doc[i][0], Obj(list(doc[i][1]))))
        elif kind == "dup_field":
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            if fields:
                fields.append(fields[draw(st.integers(0, len(fields) - 1))])
        elif kind == "extra_field":
            i = draw(st.sampled_from(ents))
            doc[i][1].append((draw(st.text(max_size=8)), draw(json_values)))
        elif kind == "shift_offsets":
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            for j, (k, v) in enumerate(fields):
                if k == "data_offsets" and isinstance(v, list) and len(v) == 2:
                    which = draw(st.sampled_from([0, 1, 2, 3, 3, 3]))
                    delta = draw(st.integers(-9, 9) | interesting_ints)
                    nv = list(v)
                    if which == 2:
                        nv = [v[1], v[0]]
                    elif which == 3:  # move the whole span: gaps, overlaps, out of file
                        nv = [v[0] + delta, v[1] + delta]
                    else:
                        nv[which] = nv[which] + delta
                    fields[j] = (k, nv)
        elif kind == "shape_dim":
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            for j, (k, v) in enumerate(fields):
                if k == "shape" and isinstance(v, list):
                    nv = list(v) + [draw(st.integers(-2, 3) | interesting_ints | json_scalars)]
                    if draw(st.booleans()) and len(nv) > 1:
                        nv = nv[1:]
                    if draw(st.integers(1, 8)) == 5:  # many large dims: no huge products allowed
                        nv = draw(st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**63 - 1]), max_size=3000))
                    fields[j] = (k, nv)
        elif kind == "dtype":
            i = draw(st.sampled_from(ents))
            fields = doc[i][1]
            for j, (k, v) in enumerate(fields):
                if k == "dtype":
                    fields[j] = (k, draw(dtypes | st.sampled_from(["bf16", "F8", "F128", "", "BF16 "]) | json_scalars))
        elif kind == "metadata":
            doc.append(("__metadata__", draw(any_value | st.dictionaries(st.text(max_size=4), json_scalars, max_size=3))))
        elif kind == "doc_value":
            text = dumps(draw(any_value)).encode("utf-8")  # the document is not an object
            return frame(text), 8 + len(text) + draw(st.integers(0, 64))
        elif kind == "extra_tensor":
            doc.append((draw(hostile_names), draw(any_value | st.builds(
                lambda d, s, o: Obj([("dtype", d), ("shape", s), ("data_offsets", o)]),
                dtypes, st.lists(st.integers(0, 4), max_size=2), st.lists(st.integers(0, 40), min_size=2, max_size=2),
            ))))
        elif kind == "zero_size":  # an empty tensor somewhere, possibly inside another's span
            at = draw(st.integers(0, layout.data_size + 2))
            doc.insert(draw(st.integers(0, len(doc))), (draw(st.text(max_size=6)), Obj(
                [("dtype", "F32"), ("shape", [0, 3]), ("data_offsets", [at, at])])))
        elif kind == "swap_spans" and len(ents) >= 2:  # two tensors claim each other's bytes
            i, j = draw(st.permutations(ents))[:2]
            fi, fj = doc[i][1], doc[j][1]
            oi = [k for k, (f, _) in enumerate(fi) if f == "data_offsets"]
            oj = [k for k, (f, _) in enumerate(fj) if f == "data_offsets"]
            if oi and oj:
                a, b = fi[oi[0]], fj[oj[0]]
                fi[oi[0]], fj[oj[0]] = b, a
        elif kind == "file_size":
            size_delta += draw(st.integers(-16, 16) | interesting_ints)
        elif kind == "length":
            length_override = draw(st.integers(0, 2**64 - 1) | interesting_ints.filter(lambda x: 0 <= x < 2**64))
        elif kind == "text_edit":
            text_edits.append(
                (draw(st.sampled_from(["flip", "insert", "delete", "truncate"])), draw(st.integers(0, 10**6)),
                 draw(st.binary(min_size=1, max_size=4)))
            )
    text = layout.header_text()
    for op, pos, blob in text_edits:
        pos = pos % (len(text) + 1)
        if op == "flip" and text:
            pos %= len(text)
            text = text[:pos] + bytes([text[pos] ^ blob[0]]) + text[pos + 1:]
        elif op == "insert":
            text = text[:pos] + blob + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + len(blob):]
        elif op == "truncate":
            text = text[:pos]
    file_size = 8 + len(text) + layout.data_size + size_delta
    raw = frame(text, length_override)
    if draw(st.integers(1, 10)) == 7:  # ~10% (hypothesis favours boundary values)
        raw = raw[: draw(st.integers(0, len(raw)))]  # hand over too few bytes
    return raw, file_size


@st.composite
def arbitrary_headers(draw) -> tuple[bytes, int]:
    """Random bytes, either raw or behind a consistent length prefix (to reach the JSON stage)."""
    body = draw(st.binary(max_size=300) | st.text(max_size=100).map(lambda s: s.encode("utf-8")))
    if draw(st.booleans()):
        raw = frame(body)
        size = len(raw) + draw(st.integers(0, 64))
    else:
        raw = body
        size = draw(st.integers(0, 2**65) | st.just(len(body)))
    return raw, size


def hostile_headers() -> st.SearchStrategy[tuple[bytes, int]]:
    """(raw, file_size) pairs for parse_header: arbitrary bytes and mutated valid headers."""
    return arbitrary_headers() | mutated_layouts()


# --------------------------------------------------------------------------------------------
# checks


def check_hostile(raw: bytes, file_size: int, path: str = FUZZ_PATH) -> bool:
    """parse_header either succeeds (and the result is consistent) or raises a proper error.

    Returns True if the header was accepted.
    """
    try:
        h = parse_header(raw, file_size, path)
    except CheckpointError as e:
        check_message(e, path)
        return False
    # accepted: the invariants the rest of streammerge relies on must hold
    data_size = file_size - h.data_start
    spans = sorted((t.begin, t.end) for t in h.tensors.values())
    cursor = 0
    for b, e in spans:
        assert b == cursor, (b, cursor)
        cursor = e
    assert cursor == data_size
    for t in h.tensors.values():
        assert isinstance(t.name, str) and t.dtype in DTYPE_BITS
        assert all(type(d) is int and d >= 0 for d in t.shape)
    if h.metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    return True


def check_message(e: BaseException, path: str) -> None:
    msg = str(e)
    assert type(e) is CheckpointError, type(e)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert len(msg) < 2000, len(msg)


def check_valid(layout: Layout) -> None:
    raw, size = layout.raw_and_size()
    h = parse_header(raw, size, FUZZ_PATH)
    got = {n: (t.dtype, t.shape, t.begin, t.end) for n, t in h.tensors.items()}
    assert got == layout.expected
    assert list(h.tensors) == list(layout.expected)  # header order kept
    assert h.metadata == layout.metadata
    assert h.data_start == 8 + len(layout.header_text())


# -- index.json --------------------------------------------------------------------------------


def make_index_model(root: Path) -> Path:
    """A sharded model dir (a.safetensors: x, y; b.safetensors: z) plus decoys outside it."""
    import numpy as np
    from safetensors.numpy import save_file

    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(4, np.float16)}, model / "a.safetensors")
    save_file({"z": np.zeros((3,), np.float32)}, model / "b.safetensors")
    # decoys: if a name could escape the directory, opening would succeed with these
    save_file({"x": np.zeros(1, np.float32)}, root / "outside.safetensors")
    (model / "sub").mkdir(exist_ok=True)
    save_file({"x": np.zeros(1, np.float32)}, model / "sub" / "a.safetensors")
    return model


VALID_WEIGHT_MAP = {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}
shard_names = st.sampled_from(
    [
        "a.safetensors", "b.safetensors", "c.safetensors", "../outside.safetensors",
        "/abs/a.safetensors", "sub/a.safetensors", "sub\\a.safetensors", "", ".", "..",
        "a.safetensors\x00", "./a.safetensors", "a.bin", "sub", "A.safetensors",
    ]
) | st.text(max_size=12)


@st.composite
def index_documents(draw) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return dumps(draw(any_value)).encode("utf-8")
    wm = Obj(VALID_WEIGHT_MAP.items())
    for _ in range(draw(st.integers(0 if choice == 2 else 1, 3))):
        op = draw(st.sampled_from(["rename", "drop", "add", "dup", "value", "raw"]))
        if op == "rename" and wm:
            i = draw(st.integers(0, len(wm) - 1))
            wm[i] = (wm[i][0], draw(shard_names))
        elif op == "drop" and wm:
            del wm[draw(st.integers(0, len(wm) - 1))]
        elif op == "add":
            wm.append((draw(hostile_names | st.sampled_from(["x", "y", "z", "w"])), draw(shard_names)))
        elif op == "dup" and wm:
            wm.append(wm[draw(st.integers(0, len(wm) - 1))])
        elif op == "value" and wm:
            i = draw(st.integers(0, len(wm) - 1))
            wm[i] = (wm[i][0], draw(any_value))
        elif op == "raw":
            return dumps(Obj([("metadata", {}), ("weight_map", draw(raw_tokens))])).encode("utf-8")
    doc = Obj([("metadata", {"total_size": 40}), ("weight_map", wm)])
    if draw(st.booleans()):
        doc = Obj([("weight_map", wm)] + ([("weight_map", wm)] if draw(st.booleans()) else []))
    return dumps(doc, draw(st.booleans())).encode("utf-8")


def check_index(model: Path, index_bytes: bytes) -> bool:
    """Write index_bytes as the model's index and open it. True if it opened."""
    (model / INDEX_NAME).write_bytes(index_bytes)
    try:
        m = open_model(str(model))
    except CheckpointError as e:
        msg = str(e)
        assert type(e) is CheckpointError
        assert "\n" not in msg and "\r" not in msg, msg
        assert str(model) in msg, msg
        return False
    real = model.resolve()
    for h in m.tensors.values():
        assert Path(h.path).parent == real, h.path  # never a file outside the directory
    assert set(m.tensors) <= {"x", "y", "z"}
    return True


# --------------------------------------------------------------------------------------------
# the run


def run(examples: int, seed: int | None = None, verbose: bool = True) -> dict[str, Any]:
    stats = {"hostile": [0, 0], "valid": 0, "index": [0, 0]}  # [accepted, rejected]
    base = dict(
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )

    def seeded(f):
        return hypothesis_seed(seed)(f) if seed is not None else f

    @seeded
    @settings(max_examples=examples, **base)
    @given(hostile_headers())
    def fuzz_hostile(case):
        ok = check_hostile(*case)
        stats["hostile"][0 if ok else 1] += 1

    @seeded
    @settings(max_examples=max(1, examples // 5), **base)
    @given(layouts())
    def fuzz_valid(layout):
        check_valid(layout)
        stats["valid"] += 1

    tmp = Path(tempfile.mkdtemp(prefix="fuzz_index_"))
    try:
        model = make_index_model(tmp)

        @seeded
        @settings(max_examples=max(1, examples // 5), **base)
        @given(index_documents())
        def fuzz_index(doc):
            ok = check_index(model, doc)
            stats["index"][0 if ok else 1] += 1

        for name, fn in (("hostile headers", fuzz_hostile), ("valid headers", fuzz_valid), ("index.json", fuzz_index)):
            t0 = time.perf_counter()
            fn()
            if verbose:
                print(f"  {name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=10_000, help="examples for the hostile-header run "
                    "(valid round trips and index.json cases get a fifth of that each)")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a reproducible run")
    args = ap.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    t0 = time.perf_counter()
    try:
        stats = run(args.examples, args.seed)
    except Exception as e:
        import traceback

        traceback.print_exc()  # includes hypothesis's falsifying example (as exception notes)
        print(f"fuzz_headers: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return 1
    ha, hr = stats["hostile"]
    ia, ir = stats["index"]
    print(
        f"fuzz_headers: OK in {time.perf_counter() - t0:.1f} s: {ha + hr} hostile headers "
        f"({hr} rejected with CheckpointError, {ha} accepted and consistent), {stats['valid']} valid "
        f"headers round-tripped, {ia + ir} index.json cases ({ir} rejected, {ia} opened)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
