"""A strict reader for safetensors headers.

This is the first code a hostile or corrupt file reaches, so it trusts nothing: the length
prefix is checked against the file size and a 100 MB cap before anything is read or allocated,
the JSON is parsed with duplicate-key detection and no NaN/Infinity, every entry is type-checked,
and the tensors' byte ranges must tile the data section exactly (sorted by offset: no gaps, no
overlaps, no trailing bytes; zero-size tensors are allowed). Any problem raises a one-line
`CheckpointError("<path>: <problem>")`; no other exception type escapes `parse_header` or
`read_header`, whatever the input.

Layout of a safetensors file: u64 little-endian N, N bytes of UTF-8 JSON, then the data section.
Each JSON entry is `name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}` with
offsets relative to the data section (byte 8 + N); an optional `__metadata__` maps str -> str.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat as stat_mod
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streammerge.errors import CheckpointError
from streammerge.limits import value_error_text

MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces ("100 MB")
METADATA_KEY = "__metadata__"
MAX_DIM = 2**63 - 1  # dims and element counts must fit int64 (numpy, torch)
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

# Element size in BITS of every dtype the safetensors format defines (sub-byte float types
# F4/F6 pack several elements per byte: a tensor of them must fill whole bytes).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


def dtype_nbytes(dtype: str, numel: int) -> int | None:
    """Bytes taken by `numel` elements of safetensors dtype `dtype`; None if not whole bytes."""
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        return None
    return bits // 8


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # data_offsets, relative to data_start
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int  # 8 + N
    tensors: dict[str, TensorEntry]  # in header order
    metadata: dict[str, str] | None
    header_sha256: str  # sha256 hex of the 8-byte length prefix + the N header bytes


# --------------------------------------------------------------------------------------------
# helpers


def _q(value: Any, limit: int = 120) -> str:
    """repr() for messages: always one line (newlines and control chars are escaped), bounded."""
    try:
        text = repr(value)
    except Exception:  # pragma: no cover - repr of JSON values cannot fail
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def _kind(value: Any) -> str:
    """The JSON type name of a decoded value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover


def _num(n: int) -> str:
    """An integer for a message: hostile ones can have thousands of digits."""
    if abs(n) < 10**20:
        return str(n)
    return f"{'-' if n < 0 else ''}~2^{abs(n).bit_length() - 1}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Obj(dict):
    """A decoded JSON object that remembers keys that appeared more than once."""

    __slots__ = ("duplicates",)


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    dups: list[str] = []
    for key, value in pairs:
        if key in obj:
            dups.append(key)
        obj[key] = value
    obj.duplicates = dups
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> Any:
    """json.loads that records duplicate keys (as `_Obj.duplicates`) and refuses NaN/Infinity.

    Raises ValueError (incl. JSONDecodeError) or RecursionError; callers turn those into
    CheckpointError with their own path.
    """
    return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)


def duplicates_of(obj: Any) -> list[str]:
    return list(getattr(obj, "duplicates", ()) or ())


def _check_unicode(text: str, what: str, path: Any) -> None:
    """JSON allows escapes of lone surrogates ("\\ud800"); they are not text and break encoders."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, f"{what} {_q(text)} is not valid Unicode (lone surrogate escape)") from None


def _fail(path: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _check_header_length(n: int, file_size: int, path: Any) -> None:
    if n > MAX_HEADER_BYTES:
        raise _fail(
            path,
            f"safetensors header length {n} exceeds the {MAX_HEADER_BYTES // 1_000_000} MB limit "
            "(corrupt or not a safetensors file)",
        )
    if n > file_size - 8:
        raise _fail(
            path,
            f"safetensors header length {n} goes beyond the end of the file ({file_size} bytes; "
            "truncated, corrupt or not a safetensors file)",
        )


def _too_short(path: Any, size: int) -> CheckpointError:
    return _fail(
        path,
        f"file is {size} bytes, shorter than the 8-byte safetensors length prefix "
        "(empty, truncated or not a safetensors file)",
    )


# --------------------------------------------------------------------------------------------
# parsing


def parse_header(raw: bytes, file_size: int, path: Any) -> SafetensorsHeader:
    """Validate the first 8 + N bytes of a safetensors file of `file_size` bytes.

    Pure (no I/O). Bytes of `raw` past 8 + N are ignored. Raises CheckpointError, and only that.
    """
    try:
        return _parse_header(raw, file_size, path)
    except CheckpointError:
        raise
    except RecursionError:
        raise _fail(path, "safetensors header JSON is nested too deeply") from None
    except MemoryError:
        raise _fail(path, "safetensors header is too large to parse") from None


def _parse_header(raw: bytes, file_size: int, path: Any) -> SafetensorsHeader:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _fail(path, f"header bytes must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if not _is_int(file_size) or not 0 <= file_size <= MAX_DIM:
        raise _fail(path, f"invalid file size {_num(file_size) if _is_int(file_size) else _q(file_size)}")
    if file_size < 8:
        raise _too_short(path, file_size)
    if len(raw) < 8:
        raise _fail(path, f"header is truncated: got {len(raw)} bytes, expected at least 8")
    (n,) = struct.unpack("<Q", raw[:8])
    _check_header_length(n, file_size, path)
    if len(raw) < 8 + n:
        raise _fail(path, f"header is truncated: got {len(raw) - 8} of its {n} bytes")
    header_bytes = raw[8 : 8 + n]
    header_sha256 = hashlib.sha256(raw[: 8 + n]).hexdigest()
    data_start = 8 + n
    data_size = file_size - data_start

    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"safetensors header is not valid UTF-8 (byte {e.start} of the header)") from None
    try:
        doc = loads_strict(text)
    except RecursionError:
        raise _fail(path, "safetensors header JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"safetensors header is not valid JSON ({e.msg} at char {e.pos})") from None
    except ValueError as e:  # NaN/Infinity, integers with too many digits
        raise _fail(path, f"safetensors header is not valid JSON ({value_error_text(e)})") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"safetensors header must be a JSON object, got {_kind(doc)}")

    dups = duplicates_of(doc)
    if dups:
        raise _fail(path, f"duplicate tensor name {_q(dups[0])} in the safetensors header")

    metadata: dict[str, str] | None = None
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        _check_unicode(name, "tensor name", path)
        if name == METADATA_KEY:
            metadata = _parse_metadata(info, path)
            continue
        tensors[name] = _parse_entry(name, info, data_size, path)

    _check_tiling(tensors, data_size, path)
    return SafetensorsHeader(
        path=Path(path),
        file_size=file_size,
        data_start=data_start,
        tensors=tensors,
        metadata=metadata,
        header_sha256=header_sha256,
    )


def _parse_metadata(info: Any, path: Any) -> dict[str, str]:
    if not isinstance(info, dict):
        raise _fail(path, f"{METADATA_KEY} must be an object of strings, got {_kind(info)}")
    dups = duplicates_of(info)
    if dups:
        raise _fail(path, f"duplicate key {_q(dups[0])} in {METADATA_KEY}")
    for key, value in info.items():
        _check_unicode(key, f"{METADATA_KEY} key", path)
        if not isinstance(value, str):
            raise _fail(path, f"{METADATA_KEY}[{_q(key)}] must be a string, got {_kind(value)}")
        _check_unicode(value, f"{METADATA_KEY}[{_q(key)}]", path)
    return dict(info)


def _parse_entry(name: str, info: Any, data_size: int, path: Any) -> TensorEntry:
    where = f"tensor {_q(name)}"
    if not isinstance(info, dict):
        raise _fail(path, f"{where}: entry must be an object, got {_kind(info)}")
    dups = duplicates_of(info)
    if dups:
        raise _fail(path, f"{where}: duplicate field {_q(dups[0])}")
    for field in _ENTRY_FIELDS:
        if field not in info:
            raise _fail(path, f"{where}: missing field {_q(field)}")
    extra = [k for k in info if k not in _ENTRY_FIELDS]
    if extra:
        raise _fail(path, f"{where}: unknown field {_q(extra[0])}")

    dtype = info["dtype"]
    if not isinstance(dtype, str):
        raise _fail(path, f"{where}: dtype must be a string, got {_kind(dtype)}")
    if dtype not in DTYPE_BITS:
        raise _fail(path, f"{where}: unknown dtype {_q(dtype)}")

    shape = info["shape"]
    if not isinstance(shape, list):
        raise _fail(path, f"{where}: shape must be an array of integers, got {_kind(shape)}")
    for dim in shape:
        if not _is_int(dim):
            raise _fail(path, f"{where}: shape {_q(shape)} has a non-integer dimension {_q(dim)}")
        if dim < 0:
            raise _fail(path, f"{where}: shape {_q(shape)} has a negative dimension {_num(dim)}")
        if dim > MAX_DIM:
            raise _fail(
                path, f"{where}: shape {_q(shape)} has a dimension {_num(dim)} over 2^63 - 1"
            )

    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        got = f"an array of {len(offsets)}" if isinstance(offsets, list) else _kind(offsets)
        raise _fail(path, f"{where}: data_offsets must be an array of 2 integers, got {got}")
    begin, end = offsets
    for value in offsets:
        if not _is_int(value):
            raise _fail(path, f"{where}: data_offsets {_q(offsets)} has a non-integer value {_q(value)}")
        if value < 0:
            raise _fail(path, f"{where}: data_offsets {_q(offsets)} has a negative value")
    if begin > end:
        raise _fail(path, f"{where}: data_offsets begin {_num(begin)} is after end {_num(end)}")
    if end > data_size:
        raise _fail(
            path,
            f"{where}: data_offsets [{_num(begin)}, {_num(end)}] go beyond the end of the file "
            f"(the data section is {data_size} bytes)",
        )

    # the element count, without building a huge integer from many hostile dims
    span = end - begin
    numel = 0 if 0 in shape else 1
    for dim in shape if numel else ():
        numel *= dim
        if numel > MAX_DIM:
            raise _fail(
                path,
                f"{where}: shape {_q(shape)} has over 2^63 elements but data_offsets "
                f"[{begin}, {end}] span {span} bytes",
            )
    nbytes = dtype_nbytes(dtype, numel)
    if nbytes is None:
        raise _fail(
            path, f"{where}: {numel} elements of {dtype} do not fill a whole number of bytes"
        )
    if nbytes != span:
        raise _fail(
            path,
            f"{where}: shape {_q(shape)} of {dtype} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] span {span}",
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(tensors: dict[str, TensorEntry], data_size: int, path: Any) -> None:
    """Sorted by offset, the tensors must cover [0, data_size) exactly once."""
    cursor = 0
    prev: TensorEntry | None = None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < cursor:
            assert prev is not None
            raise _fail(
                path,
                f"tensor {_q(t.name)} data_offsets [{t.begin}, {t.end}] overlap tensor "
                f"{_q(prev.name)} [{prev.begin}, {prev.end}]",
            )
        if t.begin > cursor:
            after = f"tensor {_q(prev.name)} ends at {cursor}" if prev else "the data section starts at 0"
            raise _fail(
                path,
                f"tensor {_q(t.name)} starts at data offset {t.begin} but {after}: "
                f"offsets are not contiguous ({t.begin - cursor} unaccounted bytes)",
            )
        prev, cursor = t, t.end  # t.begin == cursor <= t.end
    if cursor != data_size:
        raise _fail(
            path,
            f"tensors end at data offset {cursor} but the data section is {data_size} bytes: "
            f"{data_size - cursor} trailing bytes belong to no tensor",
        )


# --------------------------------------------------------------------------------------------
# reading from disk


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at `path` (never reads the data)."""
    try:
        # stat first: opening a FIFO or a device could block or never end
        mode = os.stat(path).st_mode
        if stat_mod.S_ISDIR(mode):
            raise _fail(path, "is a directory, not a safetensors file")
        if not stat_mod.S_ISREG(mode):
            raise _fail(path, "not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat_mod.S_ISREG(st.st_mode):
                raise _fail(path, "not a regular file")
            file_size = st.st_size
            if file_size < 8:
                raise _too_short(path, file_size)
            prefix = f.read(8)
            if len(prefix) != 8:
                raise _fail(path, "file shrank while its header was being read")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(n, file_size, path)  # before allocating n bytes
            body = f.read(n)
            if len(body) != n:
                raise _fail(path, "file shrank while its header was being read")
    except CheckpointError:
        raise
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a safetensors file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    return parse_header(prefix + body, file_size, path)


class TensorSize:
    """`numel` and `nbytes` from a handle's `shape` and `dtype`: shared by every kind of tensor
    handle (stored, LoRA-applied, vocabulary-aligned, FP8)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8
