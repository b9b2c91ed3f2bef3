"""Export a finished store as a Hugging Face model directory, streaming block by block.

The output is assembled in a hidden sibling directory and renamed into place only when every
shard is written and fsynced, so `out/` is either absent, the previous export, or complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..checkpoints.buffers import raw_chunks
from ..checkpoints.fp8 import without_fp8_quantization
from ..checkpoints.safetensors_header import read_header
from ..checkpoints.tokenizer import TOKENIZER_FILES
from ..dtypes import FloatType, float_type, from_float32, to_float32
from ..engine.scheduler import run_graph
from ..errors import StoreError, StreammergeError
from ..limits import DOCUMENT, LISTING, read_json
from ..fsutil import atomic_write, publish_dir, remove_stale_temps, staging_dir
from ..store.store import Store
from .card import write_card
from .safetensors_writer import ShardedWriter, TensorSpec, holds_layout, shard_layout, write_index

# Files a model directory needs besides its weights: copied from the base (or tokenizer_source).
HF_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "chat_template.jinja", "chat_template.json")


def copy_hf_files(source_dir: Path, dest_dir: Path, config_overrides: dict | None = None) -> list[str]:
    """Copy the HF side files that exist in `source_dir` (following HF-cache symlinks).

    `config_overrides` are config.json keys the merge changed (layer count of a layer-stacking
    merge, vocabulary size when embeddings were cut to their common rows). An FP8 source's
    `quantization_config` is dropped: its weights were dequantized (checkpoints/fp8.py).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copyfile(src, dest_dir / name)
            copied.append(name)
    cfg_path = dest_dir / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path, DOCUMENT.named("config.json"))
        new = without_fp8_quantization({**cfg, **(config_overrides or {})})
        if new != cfg:
            cfg_path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    return copied


def _export_block(store: Store, writer: ShardedWriter, name: str, r0: int, r1: int, out: FloatType, block_fn=None, i=0) -> None:
    if block_fn is not None:  # a variant computes the block (float32) from the store
        raw = from_float32(block_fn(name, i, r0, r1), out)
    else:
        raw = store.read_block(name, r0, r1)
        src = store.dtype(name)
        if src is not out:
            values = to_float32(raw, src, np.empty(raw.shape, dtype=np.float32))
            raw = from_float32(values, out)
    row_bytes = raw[0:1].nbytes if raw.ndim else raw.nbytes
    writer.write(name, r0 * row_bytes, raw)


def export_store(
    store: Store,
    out_dir: Path,
    *,
    shard_size: int = 5 * 10**9,
    dtype: str | None = None,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool | None = None,
    scheduler=None,
    cluster: str | None = None,
    block_fn=None,
    extra=None,
) -> dict:
    """Write the store's model (tensors/) as a HF directory.

    `block_fn(name, block, r0, r1) -> float32 rows` replaces the stored values (export variants);
    `extra(tmp_dir)` writes additional files into the output before it is renamed into place and
    returns their names, a directory's with a trailing / (the summary lists them).
    """
    _check_complete(store)
    export = OpenExport(store, out_dir, shard_size=shard_size, dtype=dtype, overwrite=overwrite, link=block_fn is None)
    return export.finish(workers=workers, progress=progress, scheduler=scheduler, cluster=cluster, block_fn=block_fn, extra=extra)


EXPORTS_FILE = "exports.json"  # in the store: the `build --export` outputs it completed, to recognise them


def _export_options(dtype: str | None, shard_size: int) -> str:
    return f"dtype={dtype or 'store'};shard_size={shard_size}"


def _shard_files(out_dir: Path) -> list[str]:
    index = out_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(read_json(index, LISTING.named("the index"))["weight_map"].values()))
    return ["model.safetensors"]


def record_export(store: Store, out_dir: Path, *, dtype: str | None, shard_size: int) -> None:
    """Note in the store that `out_dir` is its complete export with these options (each shard's
    size and header digest), so that the same `build --export OUT` run again can say so. The
    export itself carries nothing of the store: exports of equal content stay byte-identical."""
    out_dir = Path(out_dir)
    shards = {}
    for name in _shard_files(out_dir):
        h = read_header(out_dir / name)
        shards[name] = [h.file_size, h.header_sha256]
    path = store.path / EXPORTS_FILE
    known = read_json(path, DOCUMENT.named(EXPORTS_FILE)) if path.is_file() else {}
    known[str(out_dir.absolute())] = {"options": _export_options(dtype, shard_size), "shards": shards}
    atomic_write(path, json.dumps(known, indent=1).encode())


def is_export_of(store: Store, out_dir: Path, *, dtype: str | None = None, shard_size: int = 5 * 10**9) -> bool:
    """Whether `out_dir` is the complete export of `store` with these options that `record_export`
    noted: config.json and the same shards, each still whole (its header's tensors tile the file)."""
    out_dir = Path(out_dir)
    try:
        known = read_json(store.path / EXPORTS_FILE, DOCUMENT.named(EXPORTS_FILE)).get(str(out_dir.absolute()))
        if not known or known["options"] != _export_options(dtype, shard_size) or not (out_dir / "config.json").is_file():
            return False
        if _shard_files(out_dir) != sorted(known["shards"]):
            return False
        for name, (size, sha) in known["shards"].items():
            h = read_header(out_dir / name)
            if [h.file_size, h.header_sha256] != [size, sha]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StreammergeError):
        return False
    return True


def _tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _check_complete(store: Store) -> None:
    if not store.is_complete():
        done, total = store.progress()
        raise StreammergeError(
            f"{store.path}: build is not finished ({done}/{total} merge blocks); run `streammerge build` again to complete it"
        )


def export_specs(tensors: list[dict], buffers: list[dict], out_type: FloatType | None = None) -> list[TensorSpec]:
    """What an export writes, in order, for a store's (or a planned manifest's) tensors and
    buffers: the tensors in `out_type` (None: each its own dtype), then the buffers."""
    specs = []
    for t in tensors:
        ftype = out_type or float_type(t["dtype"])
        specs.append(TensorSpec(t["name"], ftype.st, tuple(t["shape"]), int(np.prod(t["shape"], dtype=np.int64)) * ftype.itemsize))
    return specs + [TensorSpec(b["name"], b["dtype"], tuple(b["shape"]), b["nbytes"]) for b in buffers]


STORE_SHARDS = "shards"  # <store>/shards/: the merged tensors as the export's files (build --export)


def tensor_files(manifest: dict, *, shard_size: int = 5 * 10**9, dtype: str | None = None) -> dict | None:
    """The manifest's "tensor_files" for a store whose merged tensors are kept as the shards of
    the export asked for (`build --export`), so that exporting hard-links them instead of
    writing the model a second time; None where that export converts the tensors (another dtype)."""
    out_type = float_type(dtype) if dtype else None
    if not manifest["tensors"] or (out_type and any(float_type(t["dtype"]) is not out_type for t in manifest["tensors"])):
        return None
    layout = shard_layout(export_specs(manifest["tensors"], manifest.get("buffers", [])), shard_size)
    offsets = {name: [shard.name, pos] for shard in layout for name, pos in shard.offsets.items()}
    return {"dir": STORE_SHARDS, "shard_size": shard_size, "files": [shard.name for shard in layout], "offsets": offsets}


def write_tensor_files(store_path: Path, manifest: dict) -> None:
    """Create the files of the manifest's "tensor_files": headers written, data still holes."""
    files = manifest["tensor_files"]
    specs = export_specs(manifest["tensors"], manifest.get("buffers", []))
    ShardedWriter(Path(store_path) / files["dir"], specs, files["shard_size"]).close()


class OpenExport:
    """An export being written into a hidden sibling of `out_dir`, renamed into place by `finish`.

    Opened before a build (`build --export`), so that an existing OUT is refused before any
    work. Where the store keeps its tensors as exactly the shards this export writes
    (`tensor_files`: `build --export` made it so), `finish` hard-links them (copies them where
    links are impossible, e.g. another filesystem) and writes nothing else of the model; with
    `link` False (a variant computing other values), or other shards, it writes every block.
    """

    def __init__(self, store: Store, out_dir: Path, *, shard_size: int = 5 * 10**9, dtype: str | None = None,
                 overwrite: bool = False, link: bool = True):
        self.store = store
        self.out_dir = out_dir = Path(out_dir)
        if out_dir.exists() and not overwrite:
            raise StreammergeError(f"{out_dir}: already exists (use --overwrite to replace it)")
        self.out_type = float_type(dtype) if dtype else None
        self._layout: dict[str, tuple[FloatType, int, int]] = {}  # name -> (output type, rows, elements per row)
        for t in store.tensors:
            row_elems = int(np.prod(t["shape"][1:], dtype=np.int64))
            self._layout[t["name"]] = (self.out_type or float_type(t["dtype"]), t["shape"][0] if t["shape"] else 1, row_elems)
        specs = export_specs(store.tensors, store.buffers, self.out_type)
        layout = shard_layout(specs, shard_size)
        kept = store.tensor_files()
        self.linked = link and kept is not None and kept[1] == [sh.name for sh in layout] and holds_layout(kept[0], layout)
        self._weight_map = {name: sh.name for sh in layout for name in sh.offsets}
        self._total_size = sum(t.nbytes for t in specs)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)
        self.tmp = staging_dir(out_dir)
        self.writer: ShardedWriter | None = None
        try:
            with self._naming_out_dir():
                if self.linked:
                    self.tmp.mkdir()
                else:
                    self.writer = ShardedWriter(self.tmp, specs, shard_size)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def finish(self, *, workers: int = 2, progress=None, scheduler=None, cluster=None, block_fn=None, extra=None) -> dict:
        """Write (or link) the shards, the side files, and rename into place."""
        try:
            _check_complete(self.store)
            with self._naming_out_dir():
                if self.writer is None:
                    files = self._link_store_files()
                else:
                    self._write_blocks(workers, progress, scheduler, cluster, block_fn)
                    files = self.writer.files
                _write_side_files(self.store, self.tmp, self.out_type)
                extra_files = list(extra(self.tmp) or ()) if extra is not None else []
                extra_size = sum(_tree_size(self.tmp / f) for f in extra_files)
                publish_dir(self.tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return {"files": files, "total_size": self._total_size, "path": str(self.out_dir),
                "extra_files": extra_files, "extra_size": extra_size, "linked": self.writer is None}

    def _write_blocks(self, workers, progress, scheduler, cluster, block_fn) -> None:
        """Every block of every tensor, then the buffers, into this export's own shards."""
        dsk, task_bytes = {}, {}
        for t in self.store.tensors:
            ftype, rows, row_elems = self._layout[t["name"]]
            for i in range(t["nblocks"]):
                r0, r1 = i * t["block_rows"], min(rows, (i + 1) * t["block_rows"])
                key = ("export", t["name"], i)
                dsk[key] = (_export_block, self.store, self.writer, t["name"], r0, r1, ftype, block_fn, i)
                task_bytes[key] = (r1 - r0) * row_elems * ftype.itemsize
        if dsk:
            run_graph(dsk, list(dsk), task_bytes, workers=workers, scheduler=scheduler, cluster=cluster, desc="export", progress=progress)
        for i, b in enumerate(self.store.buffers):
            _export_buffer(self.store, self.writer.write, i, b)
        self.writer.finish()

    def _link_store_files(self) -> list[str]:
        """The store's shards, made durable, hard-linked into the export (copied where no link
        can be made); the buffers' bytes are first written into their slots there."""
        directory, files = self.store.tensor_files()
        for i, b in enumerate(self.store.buffers):
            _export_buffer(self.store, self.store.write_bytes, i, b)
        for name in files:
            fd = os.open(directory / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _link_or_copy(directory / name, self.tmp / name)
        if len(files) > 1:
            write_index(self.tmp, self._weight_map, self._total_size)
        return files

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @contextlib.contextmanager
    def _naming_out_dir(self):
        """A full disk while exporting is reported as OUT's (shard writes name no file, others
        the hidden temporary)."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(e.errno, e.strerror, str(self.out_dir)) from e
            raise


def _export_buffer(store: Store, write, i: int, b: dict) -> None:
    """Copy a non-float tensor from the store with `write(name, pos, data)`, checking it is what
    the build copied."""
    sha, pos = hashlib.sha256(), 0
    for data in raw_chunks(store.buffer_path(i), 0, b["nbytes"]):
        sha.update(data)
        write(b["name"], pos, np.frombuffer(data, np.uint8))
        pos += len(data)
    if sha.hexdigest() != b["sha256"]:
        raise StoreError(f"{store.buffer_path(i)}: tensor {b['name']} is not the one the build copied (sha256 differs)")


def _write_side_files(store: Store, dest: Path, out_type: FloatType | None) -> None:
    write_card(store, dest)
    hf = store.path / "hf"
    if hf.is_dir():
        for f in hf.iterdir():
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
    cfg_path = dest / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path, DOCUMENT.named("config.json"))
        dtypes = {t["dtype"] for t in store.tensors}
        name = out_type.name if out_type else (dtypes.pop() if len(dtypes) == 1 else "float32")
        # transformers < 5 reads `torch_dtype`, >= 5 writes `dtype`: keep both in agreement.
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _link_or_copy(src: Path, dest: Path) -> None:
    """`dest` as a hard link to `src`; a copy where the filesystem refuses (another device, no links)."""
    try:
        os.link(src, dest)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(src, dest)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


