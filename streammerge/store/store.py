"""The job store: a directory holding a zarr v3 group plus streammerge's own bookkeeping.

Layout of `job.zarr/`:

    zarr.json                  zarr group metadata (attribute streammerge.format = 1)
    manifest.json              what the job is: recipe text and hash, input fingerprints,
                               output tensors (name, shape, dtype, block rows), options
    tensors/<name>/            one zarr array per output tensor; chunks are row blocks, so
                               one task writes exactly one chunk. bf16 is stored as uint16
                               with attribute "dtype": "bfloat16". No compression: merged
                               weights barely compress and the codec would cost more than disk.
    stats/<stage>/<name>.npz   tensor-wide statistics a method's passes reduced (resume skips them)
    done/<stage>/<name>/<i>    empty file: block i of that tensor and stage is complete
    hf/                        config.json, tokenizer and generation files copied from the base
    lock                       pid and host of the process writing the store

A chunk is written (zarr >= 3.1.3 writes `<key>.<uuid>.partial` and renames it) before its
marker, so a marker always means a complete chunk; a killed process leaves at worst `.partial`
litter and chunks without markers, which are cleaned and recomputed on resume.
"""

from __future__ import annotations

import io
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from ..dtypes import FloatType, float_type
from ..errors import StoreError

FORMAT = 1
MERGE_STAGE = "merge"


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing/the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    """A job store on local disk. Open with `Store.create` or `Store.open`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays: dict[str, zarr.Array] = {}
        self._zarr_store = LocalStore(self.path)
        self._tensors = {t["name"]: t for t in manifest["tensors"]}

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, manifest: dict) -> "Store":
        """Create the store's arrays in `path` (empty but for `hf/` and the lock: the caller's job)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        root = zarr.create_group(LocalStore(path), zarr_format=3)
        root.attrs["streammerge"] = {"format": FORMAT}
        for t in manifest["tensors"]:
            ftype = float_type(t["dtype"])
            shape = tuple(t["shape"]) or (1,)
            root.create_array(
                f"tensors/{t['name']}",
                shape=shape,
                chunks=(t["block_rows"], *shape[1:]),
                dtype=ftype.storage,
                compressors=None,
                fill_value=0,
                attributes={"dtype": ftype.name, "shape": list(t["shape"])},
            )
        (path / "done").mkdir()
        (path / "stats").mkdir()
        # The manifest goes last: a store without one is an unfinished creation, not a job.
        atomic_write(path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return cls(path, manifest)

    @classmethod
    def open(cls, path: Path) -> "Store":
        path = Path(path)
        mpath = path / "manifest.json"
        if not path.is_dir():
            raise StoreError(f"{path}: no such store")
        if not mpath.is_file():
            raise StoreError(f"{path}: not a streammerge store (no manifest.json)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{mpath}: unreadable manifest ({e})") from None
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

    def array(self, name: str) -> zarr.Array:
        a = self._arrays.get(name)
        if a is None:
            a = zarr.open_array(LocalStore(self.path / "tensors" / name), mode="r+")
            self._arrays[name] = a
        return a

    def write_block(self, name: str, block: int, raw: np.ndarray) -> None:
        """Store row block `block` of tensor `name` (raw storage values, any shape of that size).

        The chunk is handed to the zarr store as bytes: our arrays have no compressor and only
        zarr's `bytes` codec (little-endian, C order), so a chunk's encoding is its raw bytes at
        the full chunk shape (the last chunk is padded with the fill value, as zarr does). This
        skips zarr's codec pipeline, which copies the data several times (~5x slower here); the
        store still writes `<key>.<uuid>.partial` and renames it into place.
        """
        arr = self.array(name)
        chunk_rows = arr.chunks[0]
        raw = np.ascontiguousarray(raw, dtype=arr.dtype.newbyteorder("<")).reshape(-1)
        full = chunk_rows * int(np.prod(arr.chunks[1:], dtype=np.int64))
        if raw.size < full:
            raw = np.concatenate([raw, np.zeros(full - raw.size, dtype=raw.dtype)])
        key = f"tensors/{name}/" + arr.metadata.encode_chunk_key((block,) + (0,) * (len(arr.chunks) - 1))
        self._zarr_store.set_sync(key, default_buffer_prototype().buffer.from_bytes(memoryview(raw).cast("B")))

    def read_block(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Raw storage values of rows [r0, r1) (bf16 as uint16), shaped like the tensor."""
        data = self.array(name)[r0:r1]
        shape = tuple(self._tensors[name]["shape"])
        return data.reshape(shape) if not shape else data

    # ---- completion markers ---------------------------------------------------------------
    def _marker_dir(self, stage: str, name: str) -> Path:
        return self.path / "done" / stage / name

    def mark_done(self, stage: str, name: str, block: int) -> None:
        d = self._marker_dir(stage, name)
        d.mkdir(parents=True, exist_ok=True)
        # Creating an empty file is atomic: it exists completely or not at all.
        os.close(os.open(d / str(block), os.O_CREAT | os.O_WRONLY, 0o644))

    def done_blocks(self, stage: str, name: str) -> set[int]:
        d = self._marker_dir(stage, name)
        if not d.is_dir():
            return set()
        return {int(p) for p in os.listdir(d) if p.isdigit()}

    # ---- tensor-wide statistics -------------------------------------------------------------
    def _stats_path(self, stage: str, name: str) -> Path:
        return self.path / "stats" / stage / f"{name}.npz"

    def save_stats(self, stage: str, name: str, stats: dict[str, Any]) -> None:
        p = self._stats_path(stage, name)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in stats.items()})
        atomic_write(p, buf.getvalue())

    def load_stats(self, stage: str, name: str) -> dict[str, Any] | None:
        p = self._stats_path(stage, name)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
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

    def progress(self, stage: str = MERGE_STAGE) -> tuple[int, int]:
        total = sum(t["nblocks"] for t in self.tensors)
        done = sum(len(self.done_blocks(stage, t["name"])) for t in self.tensors)
        return done, total

    def is_complete(self) -> bool:
        done, total = self.progress()
        return done == total


class StoreLock:
    """One writer per store: `lock` holds the owner's pid and host; a dead owner's lock is taken over."""

    def __init__(self, path: Path):
        self.file = Path(path) / "lock"
        self.owned = False

    def __enter__(self) -> "StoreLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.file.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid")):
                    self.file.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise StoreError(
                    f"{self.file.parent}: in use by process {owner.get('pid', '?')} on {owner.get('host', '?')}"
                    f" (if that process is gone, delete {self.file})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.owned = True
            return self
        raise StoreError(f"{self.file.parent}: could not take the store lock")

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.file.unlink(missing_ok=True)
            self.owned = False


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
