"""A safetensors writer that never holds the model: plan, pre-size, then write blocks anywhere.

Every tensor's offset is fixed up front, the header (JSON padded with spaces to a multiple of 8)
is written first, the file is truncated to its full size, and blocks are `pwrite`n at their
offsets by any thread in any order. `finish` fsyncs. Sharding follows Hugging Face:
`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`, or a single
`model.safetensors` when everything fits in one shard.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fsutil import DIRECT_ALIGN, open_direct, pwrite_direct

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


def shard_tensors(tensors: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard closes when the next tensor would push it over `shard_size`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int, prefix: str = "model") -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(tensors: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict = {"__metadata__": metadata}
    offsets = {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Spaces pad the header (the format allows it) so tensor data starts on a 4 KiB boundary:
    # block writes can then bypass the page cache (fsutil.pwrite_direct).
    raw += b" " * (-(8 + len(raw)) % DIRECT_ALIGN)
    return len(raw).to_bytes(8, "little") + raw, offsets


@dataclass(frozen=True)
class Shard:
    """One file of a sharded layout: its name, header bytes, size and tensors' absolute offsets."""

    name: str
    header: bytes
    size: int
    offsets: dict[str, int]


def shard_layout(tensors: list[TensorSpec], shard_size: int, metadata=None, prefix: str = "model") -> list[Shard]:
    """The files `ShardedWriter` writes for `tensors`: a pure function of its arguments, so a
    directory can be checked against it (`holds_layout`) and planned before it is written."""
    groups = shard_tensors(tensors, shard_size)
    shards = []
    for fname, group in zip(shard_names(len(groups), prefix), groups):
        head, offsets = _header(group, metadata or {"format": "pt"})
        size = len(head) + sum(t.nbytes for t in group)
        shards.append(Shard(fname, head, size, {name: len(head) + pos for name, pos in offsets.items()}))
    return shards


def holds_layout(directory: Path, layout: list[Shard]) -> bool:
    """Whether `directory` has exactly `layout`'s files, each with its header and size."""
    try:
        for shard in layout:
            path = Path(directory) / shard.name
            if path.stat().st_size != shard.size:
                return False
            with open(path, "rb") as f:
                if f.read(len(shard.header)) != shard.header:
                    return False
    except OSError:
        return False
    return True


class ShardedWriter:
    """Pre-sized shard files in `directory`; `write` is thread-safe (pwrite at distinct offsets)."""

    def __init__(self, directory: Path, tensors: list[TensorSpec], shard_size: int, metadata=None, prefix: str = "model"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        layout = shard_layout(tensors, shard_size, metadata, prefix)
        self.prefix = prefix
        self.files = [shard.name for shard in layout]
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int | None, int]] = {}  # name -> (fd, direct fd, offset)
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(t.nbytes for t in tensors)
        try:
            for shard in layout:
                fd = os.open(self.directory / shard.name, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
                self._fds.append(fd)
                os.pwrite(fd, shard.header, 0)
                os.ftruncate(fd, shard.size)
                dfd = open_direct(self.directory / shard.name)
                if dfd is not None:
                    self._fds.append(dfd)
                for name, offset in shard.offsets.items():
                    self._where[name] = (fd, dfd, offset)
                    self.weight_map[name] = shard.name
        except BaseException:
            self.close()
            raise

    # ---- pickling (dask.distributed) --------------------------------------------------------
    # A writer pickles as its directory and file names; the copy in a worker process finds each
    # tensor's offset in the shard headers (already on disk) and opens the file by path for each
    # write: pwrite at fixed, distinct offsets from several processes is safe, and closing after
    # each write flushes it on network filesystems (close-to-open). `finish` stays with the
    # original, whose fsync covers every process's writes to these files.
    def __getstate__(self) -> dict:
        if self._fds and not getattr(self, "_headers_synced", False):
            for fd in self._fds:  # make the headers visible to other machines before they read them
                os.fsync(fd)
            self._headers_synced = True
        return {"directory": os.path.abspath(self.directory), "files": list(self.files)}

    def __setstate__(self, state: dict) -> None:
        self.directory = Path(state["directory"])
        self.files = list(state["files"])
        self._fds = []
        self._where = None  # a copy: offsets from the headers, files opened per write
        self.weight_map = {}
        self.total_size = None

    def _write_copy(self, name: str, byte_offset: int, data: np.ndarray) -> None:
        path, start = _shard_layout(self.directory, tuple(self.files))[name]
        fd = os.open(path, os.O_WRONLY)
        dfd = open_direct(path)
        try:
            pwrite_direct(fd, _bytes(data), start + byte_offset, dfd)
        finally:
            os.close(fd)
            if dfd is not None:
                os.close(dfd)

    def write(self, name: str, byte_offset: int, data: np.ndarray) -> None:
        if self._where is None:
            return self._write_copy(name, byte_offset, data)
        fd, dfd, start = self._where[name]
        pwrite_direct(fd, _bytes(data), start + byte_offset, dfd)

    def finish(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            write_index(self.directory, self.weight_map, self.total_size, self.prefix)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def write_index(directory: Path, weight_map: dict[str, str], total_size: int, prefix: str = "model") -> None:
    """`<prefix>.safetensors.index.json`, as Hugging Face writes it for a sharded model."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (Path(directory) / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _bytes(data: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(data)).cast("B")


# Shard layouts read back from the headers in this process (writer copies in dask.distributed
# workers), by (directory, file names); an export's directory is unique (a temporary name).
_LAYOUTS: dict[tuple[str, tuple[str, ...]], dict[str, tuple[str, int]]] = {}
_LAYOUTS_MAX = 8
_layouts_lock = threading.Lock()


def _shard_layout(directory: Path, files: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """name -> (shard path, absolute offset of its data), from the headers written up front."""
    key = (str(directory), files)
    layout = _LAYOUTS.get(key)
    if layout is None:
        with _layouts_lock:
            layout = _LAYOUTS.get(key)
            if layout is None:
                layout = {}
                for fname in files:
                    path = str(Path(directory) / fname)
                    with open(path, "rb") as f:
                        n = int.from_bytes(f.read(8), "little")
                        header = json.loads(f.read(n))
                    header.pop("__metadata__", None)
                    for name, info in header.items():
                        layout[name] = (path, 8 + n + info["data_offsets"][0])
                if len(_LAYOUTS) >= _LAYOUTS_MAX:
                    _LAYOUTS.pop(next(iter(_LAYOUTS)))
                _LAYOUTS[key] = layout
    return layout
