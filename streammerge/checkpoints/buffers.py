"""Non-float tensors: integer and boolean buffers (position ids, attention masks, token type
tables...) that models keep beside their weights. Nothing can be merged in them, so they are
copied: from the base (or the first model) when every input holds the same bytes, and refused,
naming the tensor and the input that differs, when they do not.

They do not go through the row-block engine: a build copies each into the store once
(`buffers/<index>` files, checked against the digest taken while planning), and an export writes
them from there, so the store stays enough to export without its inputs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError
from .model import TensorHandle

# Copied as bytes. Other non-float dtypes (FP8 formats other than the block-scaled E4M3 / E5M2
# of checkpoints/fp8.py, sub-byte floats) are refused: they hold values a merge would have to
# compute with.
BUFFER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
CHUNK = 4 << 20  # bytes per read: bounds memory whatever the buffer's size


@dataclass(frozen=True)
class Buffer:
    name: str  # output tensor name
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    source: TensorHandle  # where the build copies it from

    def manifest(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes, "sha256": self.sha256}


def raw_chunks(path: str | Path, offset: int, nbytes: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < nbytes:
            data = os.pread(fd, min(CHUNK, nbytes - pos), offset + pos)
            if not data:
                raise CheckpointError(f"{path}: ends inside a tensor ({nbytes - pos} bytes missing at {offset + pos})")
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def digest(h: TensorHandle) -> str:
    sha = hashlib.sha256()
    for data in raw_chunks(h.path, h.offset, h.nbytes):
        sha.update(data)
    return sha.hexdigest()


def agreed_buffer(name: str, handles: list[TensorHandle], specs: list[str]) -> Buffer:
    """The buffer all inputs hold, or a one-line error naming the first input that differs.
    `handles` hold at least one tensor that is not BF16, F16 or F32."""
    first = handles[0]
    if first.dtype in BUFFER_DTYPES:
        odd = next((h for h in handles if h.dtype != first.dtype), None)
    elif first.dtype in ("BF16", "F16", "F32"):
        odd = next(h for h in handles if h.dtype not in ("BF16", "F16", "F32"))
    else:
        odd = first
    if odd is not None:
        other = f" but {first.dtype} in {specs[0]}" if odd is not first else ""
        raise CheckpointError(
            f"{odd.path}: tensor {odd.name} has dtype {odd.dtype}{other}; only BF16, F16, F32, F64 and block-scaled FP8 are merged, and "
            f"integer or boolean tensors ({', '.join(sorted(BUFFER_DTYPES))}) copied when every input holds the same one"
        )
    want = digest(first)
    for h, spec in zip(handles[1:], specs[1:]):
        if h.shape != first.shape:
            raise CheckpointError(
                f"{h.path}: tensor {h.name} has shape {list(h.shape)} but {list(first.shape)} in {specs[0]}; "
                "non-float tensors are copied, not merged, so every input must hold the same one"
            )
        if digest(h) != want:
            raise CheckpointError(
                f"{h.path}: tensor {h.name} ({h.dtype}) holds other values than in {specs[0]}; "
                "non-float tensors are copied, not merged, so every input must hold the same values"
            )
    return Buffer(name, first.dtype, tuple(first.shape), first.nbytes, want, first)


def copy_buffer(b: Buffer, dest: Path) -> None:
    """Copy `b` from its input into `dest` (a new file, renamed into place once its digest is
    the one taken while planning: an input changed since is an error, not a wrong copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.partial")
    sha = hashlib.sha256()
    with open(tmp, "wb") as f:
        for data in raw_chunks(b.source.path, b.source.offset, b.nbytes):
            sha.update(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if sha.hexdigest() != b.sha256:
        tmp.unlink()
        raise CheckpointError(f"{b.source.path}: tensor {b.source.name} changed while the build was running")
    os.replace(tmp, dest)
