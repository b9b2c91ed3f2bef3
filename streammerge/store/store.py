"""The job store: a directory holding a zarr v3 group plus streammerge's own bookkeeping.

Layout of `job.zarr/`:

    zarr.json                  zarr group metadata (attribute streammerge.format = 1)
    manifest.json              what the job is: recipe text and hash, input fingerprints,
                               output tensors (name, shape, dtype, block rows), options
    tensors/<name>/            one zarr array per output tensor; chunks are row blocks, so
                               one task writes exactly one chunk (chunk file c.<block>[.0]). bf16 is stored as uint16
                               with attribute "dtype": "bfloat16". No compression: merged
                               weights barely compress and the codec would cost more than disk.
    stats/<stage>/<key>.npz    tensor-wide statistics a method's passes reduced (resume skips them)
    done/<stage>/<key>/<i>     empty file: block i of that job (stage, key) is complete
    shards/                    with `build --export` (a static merge exported in the store's dtype):
                               the merged tensors are kept here instead of in tensors/, in the
                               export's own safetensors files (manifest "tensor_files": file and
                               offset of each tensor), written in place block by block; the export
                               hard-links them, so the merged bytes are written once
    blobs/<key>/<name>/<i>     variable-length payload of row block i (e.g. sparse entries),
                               written atomically; zarr v3 has no stable variable-length type
    <key>/...                  arrays of other stages (encodings, experts): one zarr array per
                               output, chunked by the tensor's row blocks
    hf/                        config.json, tokenizer and generation files copied from the base
    exports.json               the `build --export` outputs completed (shard sizes and header digests):
                               the same command run again recognises them
    lock                       pid and host of the process writing the store
    lock.takeover              flocked while a dead owner's lock is taken over (StoreLock)

A chunk is written (to `<key>.<uuid>.partial`, renamed into place, by `committing`; or in place in
its shard) before its marker, so a marker always means a complete block; a killed process leaves
at worst `.partial` litter and blocks without markers, which are cleaned and recomputed on resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import FloatType, float_type
from ..errors import StoreError
from ..limits import DOCUMENT, LISTING, read_json
from ..fsutil import (
    WRITE_BEHIND_DEPTH,
    WriteBehind,
    atomic_write,
    open_direct,
    pid_alive,
    pwrite_direct,
    write_new_file,
)

FORMAT = 1
MERGE_STAGE = "merge"
_STATS_LOCK = threading.Lock()  # Store.load_stats: one np.load at a time (see there)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (the same for the in-memory dict and its file)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# Stores reopened in this process from a pickle (dask.distributed workers), by (path, manifest
# digest): every task unpickled here shares one manifest and one cache of open zarr arrays.
_REOPENED: dict[tuple[str, str], "Store"] = {}
_REOPENED_MAX = 16
_reopened_lock = threading.Lock()


class Store:
    """A job store on local disk. Open with `Store.create` or `Store.open`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays: dict = {}  # path -> zarr.Array (array_at)
        self._metas: dict[str, _ArrayMeta] = {}  # path -> what chunk I/O needs of its zarr.json
        self._tensors = {t["name"]: t for t in manifest["tensors"]}
        self._dirs: set[Path] = set()  # chunk and marker directories known to exist
        self._behind: list[WriteBehind] = []  # within `writing_behind`: the background writers

    # ---- pickling (dask.distributed) --------------------------------------------------------
    # A store pickles as its path and manifest digest (~150 bytes, not the manifest nor open
    # zarr arrays): a worker process reopens it lazily from the (shared) filesystem, once per
    # process, and refuses a store whose manifest is not the one the graph was planned with.
    @property
    def digest(self) -> str:
        d = self.__dict__.get("_digest")
        if d is None:
            d = self._digest = manifest_digest(self.manifest)
        return d

    def __getstate__(self) -> dict:
        return {"path": os.path.abspath(self.path), "digest": self.digest}  # workers have another cwd

    def __setstate__(self, state: dict) -> None:
        key = (state["path"], state["digest"])
        with _reopened_lock:
            src = _REOPENED.get(key)
            if src is None:
                src = Store.open(Path(state["path"]))
                if src.digest != state["digest"]:
                    raise StoreError(
                        f"{state['path']}: the store's manifest on this machine is not the one the job was planned "
                        "with (is the same store at the same path on every machine?)"
                    )
                if len(_REOPENED) >= _REOPENED_MAX:
                    _REOPENED.pop(next(iter(_REOPENED)))
                _REOPENED[key] = src
        self.__dict__.update(src.__dict__)  # shares that process-wide instance's array cache

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, manifest: dict, write_tensor_files=None) -> "Store":
        """Create the store's arrays in `path` (empty but for `hf/` and the lock: the caller's job).
        A manifest with "tensor_files" needs `write_tensor_files(path)` to create those files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # attributes in the first write of zarr.json: a creation killed at any point is recognisable
        _write_node(path, _group_doc({"streammerge": {"format": FORMAT}}))
        in_files = {f"tensors/{name}" for name in (manifest.get("tensor_files") or {}).get("offsets", ())}
        _create_arrays(path, manifest["jobs"], skip=in_files)
        if in_files:
            write_tensor_files(path)
        (path / "done").mkdir()
        (path / "stats").mkdir()
        # The manifest goes last: a store without one is an unfinished creation, not a job.
        atomic_write(path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return cls(path, manifest)

    def add_jobs(self, jobs: list[dict], tensors: list[dict] = ()) -> None:
        """Register jobs planned after creation (a later phase); idempotent on resume."""
        known = {j["key"] for j in self.manifest["jobs"]}
        new = [j for j in jobs if j["key"] not in known]
        if not new:
            return
        _create_arrays(self.path, new)
        self.manifest["jobs"] = self.manifest["jobs"] + new
        names = {t["name"] for t in self.manifest["tensors"]}
        self.manifest["tensors"] = self.manifest["tensors"] + [t for t in tensors if t["name"] not in names]
        self._tensors = {t["name"]: t for t in self.manifest["tensors"]}
        atomic_write(self.path / "manifest.json", json.dumps(self.manifest, indent=1, sort_keys=True).encode())
        self.__dict__.pop("_digest", None)  # pickles (dask.distributed) now name the new manifest

    @classmethod
    def open(cls, path: Path) -> "Store":
        path = Path(path)
        mpath = path / "manifest.json"
        if not path.is_dir():
            raise StoreError(f"{path}: no such store")
        if not mpath.is_file():
            raise StoreError(f"{path}: not a streammerge store (no manifest.json)")
        manifest = read_json(mpath, LISTING.named("the manifest"), StoreError)
        if not isinstance(manifest, dict):
            raise StoreError(f"{mpath}: the manifest must be a JSON object")
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: store format {manifest.get('format')!r} is not supported (expected {FORMAT})")
        return cls(path, manifest)

    @staticmethod
    def exists(path: Path) -> bool:
        return (Path(path) / "manifest.json").is_file()

    # ---- tensors ----------------------------------------------------------------------------
    @property
    def tensors(self) -> list[dict]:
        return self.manifest["tensors"]

    def tensor(self, name: str) -> dict:
        return self._tensors[name]

    def dtype(self, name: str) -> FloatType:
        return float_type(self._tensors[name]["dtype"])

    def array(self, name: str):
        """The merged tensor `name` as a zarr array."""
        return self.array_at(f"tensors/{name}")

    def array_at(self, path: str):
        """The zarr array at `path` (zarr-python opens it: for whole-array reads)."""
        a = self._arrays.get(path)
        if a is None:
            import zarr  # not on the build's path: 0.2 s to import
            from zarr.storage import LocalStore

            a = zarr.open_array(LocalStore(self.path / path), mode="r+")
            self._arrays[path] = a
        return a

    def _meta(self, path: str) -> "_ArrayMeta":
        m = self._metas.get(path)
        if m is None:
            m = self._metas[path] = _ArrayMeta.load(self.path / path)
        return m

    def write_blob(self, path: str, block: int, data: bytes) -> None:
        d = self.path / "blobs" / path
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{block}.{uuid.uuid4().hex}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, d / str(block))

    def read_blob(self, path: str, block: int) -> bytes:
        return (self.path / "blobs" / path / str(block)).read_bytes()

    def write_block(self, path: str, block: int, raw: np.ndarray) -> None:
        """Store row block `block` of the array at `path` (raw storage values, any shape of that size).

        The chunk file is written here rather than through zarr: our arrays have no compressor
        and only zarr's `bytes` codec (little-endian, C order), so a chunk's encoding is its raw
        bytes at the full chunk shape (the last chunk padded with the fill value 0, as zarr
        does). Like zarr's local store (>= 3.1.3), it goes to `<key>.<uuid>.partial` and is
        renamed into place; unlike it, whole pages bypass the page cache (fsutil.write_new_file:
        ~2.5 s of kernel time per GB saved here) and no event-loop thread is involved.
        """
        self._write_chunk(path, block, raw, None)

    @contextlib.contextmanager
    def committing(self, stage: str, key: str, block: int):
        """Block `block` of job (stage, key): write its outputs with the object this yields
        (`.array(path, raw)`, `.blob(path, data)`); leaving without an error records the block
        as complete. Within `writing_behind` the chunks and the marker go, in that order, to one
        writer thread chosen here once, so even a task still running when the build is
        interrupted never leaves a marker before its chunks (a writer closed meanwhile refuses
        them)."""
        commit = _BlockCommit(self, block, self._writer(block))
        yield commit
        if commit.writer is None:
            self.mark_done(stage, key, block)
        else:
            commit.writer.call(functools.partial(self.mark_done, stage, key, block))

    def _write_chunk(self, path: str, block: int, raw: np.ndarray, writer: WriteBehind | None) -> None:
        name = path[len("tensors/") :] if path.startswith("tensors/") else None
        if name is not None and self.tensor_file(name) is not None:
            row_bytes = self._row_bytes(name)
            self._write_in_file(name, block * self._tensors[name]["block_rows"] * row_bytes, raw, writer)
            return
        arr = self._meta(path)
        data = memoryview(np.ascontiguousarray(raw, dtype=arr.dtype.newbyteorder("<"))).cast("B")
        full = int(np.prod(arr.chunks, dtype=np.int64)) * arr.dtype.itemsize
        if len(data) > full:
            raise ValueError(f"{path}: block {block} has {len(data)} bytes, more than its chunk ({full})")
        chunk = self._chunk_file(path, arr, block, create=True)
        if writer is not None:
            writer.submit(data, functools.partial(write_new_file, chunk, size=full))
        else:
            write_new_file(chunk, data, full)

    # ---- tensors kept in files (manifest "tensor_files": the shards of `build --export`) -----
    def tensor_file(self, name: str) -> tuple[Path, int] | None:
        """(file, offset of its bytes) of tensor or buffer `name` if the store keeps it in a file."""
        files = self.manifest.get("tensor_files")
        where = files["offsets"].get(name) if files else None
        return None if where is None else (self.path / files["dir"] / where[0], int(where[1]))

    def tensor_files(self) -> tuple[Path, list[str]] | None:
        """(directory, file names) of the files the store keeps its tensors in, if any."""
        files = self.manifest.get("tensor_files")
        return (self.path / files["dir"], list(files["files"])) if files else None

    def _row_bytes(self, name: str) -> int:
        return int(np.prod(self._tensors[name]["shape"][1:], dtype=np.int64)) * self.dtype(name).itemsize

    def _write_in_file(self, name: str, pos: int, raw: np.ndarray, writer: WriteBehind | None = None) -> None:
        """Bytes `pos`.. of tensor (or buffer) `name`, in place in its file."""
        file, start = self.tensor_file(name)
        data = memoryview(np.ascontiguousarray(raw)).cast("B")
        t = self._tensors.get(name)
        end = int(np.prod(t["shape"], dtype=np.int64)) * self.dtype(name).itemsize if t else None
        if end is not None and pos + len(data) > end:
            raise ValueError(f"{name}: {len(data)} bytes at {pos} overrun the tensor ({end} bytes)")
        write = functools.partial(_pwrite_file, file, start + pos)
        if writer is not None:
            writer.submit(data, write, phase=start + pos)
        else:
            write(data)

    def write_bytes(self, name: str, pos: int, data: np.ndarray) -> None:
        """Write `data` at byte `pos` of tensor or buffer `name` kept in a file (ShardedWriter.write's
        signature: the export fills the buffers' slots of the store's shards with it)."""
        self._write_in_file(name, pos, data)

    @contextlib.contextmanager
    def writing_behind(self, writers: int = 1, depth: int = WRITE_BEHIND_DEPTH):
        """Within: the chunk files and markers of `committing` are written by `writers` background
        threads while the caller's threads compute; everything of block i (of any job) goes to
        thread i % writers, in the order it was handed over, so a marker still follows its
        chunks. Several threads keep several writes in flight (a fast disk wants them; one
        thread is enough for two workers). Leaving waits for every pending write and raises the
        first error; a write error also surfaces in the next block's writes."""
        if self._behind:  # nested: the outer one drains
            yield self
            return
        behind = self._behind = [WriteBehind(depth) for _ in range(max(1, writers))]
        failed = False
        try:
            yield self
        except BaseException:
            failed = True
            raise
        finally:
            self._behind = []
            errors = []
            for b in behind:
                try:
                    b.close()
                except BaseException as e:  # noqa: BLE001 - the first one is raised below
                    errors.append(e)
            if errors and not failed:  # else the error in flight is the one to report
                raise errors[0]

    def _writer(self, block: int) -> WriteBehind | None:
        behind = self._behind
        return behind[block % len(behind)] if behind else None

    def _chunk_file(self, path: str, arr: "_ArrayMeta", block: int, create: bool = False) -> Path:
        f = self.path / path / arr.chunk_key(block)
        if create and f.parent not in self._dirs:
            f.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(f.parent)
        return f

    def read_block(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Raw storage values of rows [r0, r1) (bf16 as uint16), shaped like the tensor.

        Read from the chunk files directly (the layout `write_block` writes; a chunk never
        written reads as the fill value 0, as in zarr): ~3x faster than zarr's read path here,
        which matters most when the chunks come from disk."""
        where = self.tensor_file(name)
        if where is not None:
            return self._read_in_file(name, where, r0, r1)
        path = f"tensors/{name}"
        arr = self._meta(path)
        cr = arr.chunks[0]
        row_bytes = int(np.prod(arr.chunks[1:], dtype=np.int64)) * arr.dtype.itemsize
        out = np.empty((r1 - r0, *arr.shape[1:]), dtype=arr.dtype)
        view = memoryview(out).cast("B")
        for c in range(r0 // cr, -(-r1 // cr)):
            a, b = max(r0, c * cr), min(r1, (c + 1) * cr)
            dest = view[(a - r0) * row_bytes : (b - r0) * row_bytes]
            f = self._chunk_file(path, arr, c)
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                dest[:] = bytes(len(dest))
                continue
            try:
                _pread_exact(fd, dest, (a - c * cr) * row_bytes, f, f"chunk file is truncated (expected {cr * row_bytes} bytes)")
            finally:
                os.close(fd)
        shape = tuple(self._tensors[name]["shape"])
        return out.reshape(shape) if not shape else out

    def _read_in_file(self, name: str, where: tuple[Path, int], r0: int, r1: int) -> np.ndarray:
        shape = tuple(self._tensors[name]["shape"])
        out = np.empty((r1 - r0, *shape[1:]), dtype=self.dtype(name).storage)
        file, start = where
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{file}: missing (the store keeps its merged tensors there)") from None
        try:
            _pread_exact(fd, memoryview(out).cast("B"), start + r0 * self._row_bytes(name), file, "file is truncated")
        finally:
            os.close(fd)
        return out.reshape(shape) if not shape else out

    # ---- completion markers ---------------------------------------------------------------
    def _marker_dir(self, stage: str, key: str) -> Path:
        return self.path / "done" / stage / key

    def mark_done(self, stage: str, key: str, block: int) -> None:
        """Record block `block` of job (stage, key) as complete, at once (`committing` orders it
        after the block's writes)."""
        d = self._marker_dir(stage, key)
        if d not in self._dirs:
            d.mkdir(parents=True, exist_ok=True)
            self._dirs.add(d)
        # Creating an empty file is atomic: it exists completely or not at all.
        os.close(os.open(d / str(block), os.O_CREAT | os.O_WRONLY, 0o644))

    def done_blocks(self, stage: str, key: str) -> set[int]:
        d = self._marker_dir(stage, key)
        if not d.is_dir():
            return set()
        return {int(p) for p in os.listdir(d) if p.isdigit()}

    # ---- tensor-wide statistics -------------------------------------------------------------
    def _stats_path(self, stage: str, key: str) -> Path:
        return self.path / "stats" / stage / f"{key}.npz"

    def save_stats(self, stage: str, key: str, stats: dict[str, Any]) -> None:
        p = self._stats_path(stage, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in stats.items()})
        atomic_write(p, buf.getvalue())

    def load_stats(self, stage: str, key: str) -> dict[str, Any] | None:
        p = self._stats_path(stage, key)
        if not p.is_file():
            return None
        # One thread at a time: numpy parses each member's header with ast.literal_eval, which
        # CPython 3.11 can fail spuriously from concurrent threads ("SystemError: AST constructor
        # recursion depth mismatch", python/cpython#106905), and the engine's threads load a
        # tensor's stats as its blocks start.
        with _STATS_LOCK, np.load(p, allow_pickle=False) as z:
            return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}

    # ---- housekeeping -----------------------------------------------------------------------
    def clean_litter(self) -> int:
        """Remove `.partial` files a killed process left behind; returns how many."""
        n = 0
        for dirpath, _dirs, files in os.walk(self.path):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
        return n

    @property
    def jobs(self) -> list[dict]:
        return self.manifest["jobs"]

    def job(self, key: str) -> dict:
        for j in self.jobs:
            if j["key"] == key:
                return j
        raise KeyError(key)

    def stages(self) -> list[str]:
        return list(dict.fromkeys(j["stage"] for j in self.jobs))

    def job_done(self, job: dict) -> bool:
        if not job["outputs"]:  # stats-only job: done when its stats are saved
            return self._stats_path(job["stage"], job["key"]).is_file()
        return len(self.done_blocks(job["stage"], job["key"])) == job["nblocks"]

    def progress(self, stage: str = MERGE_STAGE) -> tuple[int, int]:
        """(blocks done, blocks total) over the jobs of `stage` (a stats-only job counts as one)."""
        done = total = 0
        for j in self.jobs:
            if j["stage"] != stage:
                continue
            if j["outputs"]:
                total += j["nblocks"]
                done += len(self.done_blocks(stage, j["key"]))
            else:
                total += 1
                done += self.job_done(j)
        return done, total

    def is_complete(self) -> bool:
        return all(self.job_done(j) for j in self.jobs) and all(self.has_buffer(i) for i in range(len(self.buffers)))

    # ---- buffers: non-float tensors, copied whole (checkpoints/buffers.py) -----------------
    @property
    def buffers(self) -> list[dict]:
        return self.manifest.get("buffers", [])  # stores made before buffers were copied have none

    def buffer_path(self, i: int) -> Path:
        return self.path / "buffers" / str(i)

    def has_buffer(self, i: int) -> bool:
        p = self.buffer_path(i)
        return p.is_file() and p.stat().st_size == self.buffers[i]["nbytes"]


# ---- zarr v3 metadata ------------------------------------------------------------------------
# The store's zarr.json documents are written here rather than by zarr-python, whose import
# (0.2 s) and per-array creation (3 ms each, through its event loop) were a fifth of a 0.5B
# build's serial start. They are the documents zarr-python writes for these arrays (uncompressed,
# `bytes` codec, regular row-block chunks); tests/test_store_io.py has zarr open and read them.


def _group_doc(attributes: dict) -> dict:
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def _array_doc(shape, chunks, dtype: np.dtype, attributes: dict) -> dict:
    return {
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        # chunk files c.<i>.0 beside zarr.json, not c/<i>/0: one directory fewer to create per
        # block (creating files and directories was a fifth of a build's CPU time here)
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0,
        # (single-byte types have no byte order, and zarr writes none)
        "codecs": [{"name": "bytes", **({"configuration": {"endian": "little"}} if np.dtype(dtype).itemsize > 1 else {})}],
        "attributes": attributes,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _write_node(directory: Path, doc: dict) -> None:
    """zarr.json in `directory`, whole or not at all (renamed into place, as zarr does; no fsync:
    a store is only valid once its manifest, written last with one, is there)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".zarr.json.{uuid.uuid4().hex}.partial"
    tmp.write_bytes(json.dumps(doc, indent=2).encode())
    os.replace(tmp, directory / "zarr.json")


def _pread_exact(fd: int, dest: memoryview, pos: int, file: Path, truncated: str) -> None:
    got = 0
    while got < len(dest):
        n = os.preadv(fd, [dest[got:]], pos + got)
        if n == 0:
            raise StoreError(f"{file}: {truncated} (ends at {pos + got})")
        got += n


def _pwrite_file(file: Path, pos: int, data: memoryview) -> None:
    """`data` written at `pos` of an existing `file` (whole pages bypassing the page cache)."""
    try:
        fd = os.open(file, os.O_WRONLY)
    except FileNotFoundError:
        raise StoreError(f"{file}: missing (the store keeps its merged tensors there)") from None
    dfd = open_direct(file)
    try:
        pwrite_direct(fd, data, pos, dfd)
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)


def _create_arrays(root: Path, jobs: list[dict], skip: set[str] = frozenset()) -> None:
    groups = set()
    for spec in _array_specs(jobs):
        if spec["name"] in skip:  # kept in a file of its own (tensor_files)
            continue
        parts = spec["name"].split("/")
        for k in range(1, len(parts)):  # the groups between the root and the array, as zarr does
            group = "/".join(parts[:k])
            if group not in groups and not (root / group / "zarr.json").is_file():
                _write_node(root / group, _group_doc({}))
            groups.add(group)
        _write_node(root / spec["name"], _array_doc(spec["shape"], spec["chunks"], spec["dtype"], spec["attributes"]))


@dataclass(frozen=True)
class _ArrayMeta:
    """What chunk I/O needs of an array's zarr.json (any store: also those zarr-python created)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    encoding: str  # "default" (c<sep>i<sep>j) or "v2" (i<sep>j)
    separator: str

    @classmethod
    def load(cls, directory: Path) -> "_ArrayMeta":
        f = directory / "zarr.json"
        try:
            doc = read_json(f, DOCUMENT.named("zarr.json"), StoreError)
            enc = doc.get("chunk_key_encoding") or {"name": "default"}
            name = enc.get("name", "default")
            sep = (enc.get("configuration") or {}).get("separator", "/" if name == "default" else ".")
            meta = cls(tuple(doc["shape"]), tuple(doc["chunk_grid"]["configuration"]["chunk_shape"]),
                       np.dtype(doc["data_type"]), name, sep)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{f}: unreadable array metadata ({e})") from None
        if name not in ("default", "v2") or [c["name"] for c in doc.get("codecs", [])] != ["bytes"]:
            raise StoreError(f"{f}: not an array streammerge writes (chunk keys {name!r}, codecs {doc.get('codecs')})")
        return meta

    def chunk_key(self, block: int) -> str:
        coords = [str(block)] + ["0"] * (len(self.chunks) - 1)
        key = self.separator.join(coords)
        return f"c{self.separator}{key}" if self.encoding == "default" else key


def _array_specs(jobs: list[dict]):
    for j in jobs:
        shape = tuple(j["shape"]) or (1,)
        for out in j["outputs"]:
            if out.get("blob"):
                continue
            path = j["key"] if not out["name"] else f"{j['key']}/{out['name']}"
            trailing = tuple(out["trailing"]) if out.get("trailing") is not None else shape[1:]
            dtype = out["dtype"]
            try:
                logical, storage = float_type(dtype).name, float_type(dtype).storage
            except KeyError:
                logical, storage = dtype, np.dtype(dtype)
            yield dict(
                name=path,
                shape=(shape[0], *trailing),
                chunks=(j["block_rows"], *trailing),
                dtype=storage,
                attributes={"dtype": logical, "tensor": j["name"], "tensor_shape": list(j["shape"])},
            )


@dataclass
class _BlockCommit:
    """What `Store.committing` yields: the block's writes, through the writer chosen for it."""

    store: Store
    block: int
    writer: WriteBehind | None

    def array(self, path: str, raw: np.ndarray) -> None:
        self.store._write_chunk(path, self.block, raw, self.writer)

    def blob(self, path: str, data: bytes) -> None:
        self.store.write_blob(path, self.block, data)


class StoreLock:
    """One writer per store: `lock` holds the owner's pid and host; a dead owner's lock is taken over."""

    def __init__(self, path: Path):
        self.file = Path(path) / "lock"
        self.owned = False

    def __enter__(self) -> "StoreLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        # The lock appears complete or not at all: its content is written to a temporary file
        # first, then hard-linked as `lock` (fails if it exists). A kill or a full disk can never
        # leave an empty lock that nobody could take over.
        tmp = self.file.with_name(f".lock.{me['pid']}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(me, f)
            return self._take(me, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _take(self, me: dict, tmp: Path) -> "StoreLock":
        for stale in self.file.parent.glob(".lock.*.tmp"):  # left by processes killed right here
            pid = stale.name.split(".")[2]
            if pid.isdigit() and int(pid) != me["pid"] and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        try:
            self._link(me, tmp)
        except FileExistsError:
            # Taking over a dead owner's lock is judged and done under an flock, one process
            # at a time: two processes that both judged the same lock stale could otherwise each
            # delete "the" lock, the second deleting the one the first had just taken.
            with _flocked(self.file.with_name(TAKEOVER_FILE)):
                try:
                    self._link(me, tmp)  # released meanwhile
                except FileExistsError:
                    owner = self._owner()
                    if not (owner.get("host") == me["host"] and _lock_is_stale(owner, str(self.file))):
                        raise self._in_use(owner) from None
                    self.file.unlink(missing_ok=True)  # stale: its process is gone
                    try:
                        self._link(me, tmp)
                    except FileExistsError:  # taken between the two by a process not taking over
                        raise self._in_use(self._owner()) from None
        self.owned = True
        _HELD.add(str(self.file))
        return self

    def _link(self, me: dict, tmp: Path) -> None:
        """Create `lock` from `tmp`, complete; FileExistsError if there is one."""
        try:
            os.link(tmp, self.file)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem: exclusive create, then write
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)

    def _owner(self) -> dict:
        try:
            owner = read_json(self.file, DOCUMENT.named("the lock"), StoreError)
        except StoreError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _in_use(self, owner: dict) -> StoreError:
        return StoreError(
            f"{self.file.parent}: in use by process {owner.get('pid', '?')} on {owner.get('host', '?')}"
            f" (if that process is gone, delete {self.file})"
        )

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.file.unlink(missing_ok=True)
            self.owned = False
            _HELD.discard(str(self.file))


_HELD: set[str] = set()  # lock files this process holds
TAKEOVER_FILE = "lock.takeover"  # flocked while a stale lock is judged and replaced; kept


@contextlib.contextmanager
def _flocked(path: Path):
    """An exclusive flock on `path` (created if missing) for the block; where flock does not
    exist (not POSIX), nothing: takeovers are then not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_is_stale(owner: dict, file: str) -> bool:
    """A same-host lock whose process is gone. A lock naming this very process but not held by
    it is stale too (pid reused, e.g. the same low pid in a restarted container)."""
    pid = owner.get("pid")
    if pid == os.getpid():
        return file not in _HELD
    return not pid_alive(pid)
