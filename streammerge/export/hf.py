"""Export a finished store as a Hugging Face model directory, streaming block by block.

The output is assembled in a hidden sibling directory and renamed into place only when every
shard is written and fsynced, so `out/` is either absent, the previous export, or complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..dtypes import FloatType, float_type, from_float32, to_float32
from ..engine.scheduler import run_graph
from ..errors import StreammergeError
from ..fsutil import pid_alive
from ..store.store import Store
from .safetensors_writer import ShardedWriter, TensorSpec

# Files a model directory needs besides its weights: copied from the base (or tokenizer_source).
HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_hf_files(source_dir: Path, dest_dir: Path, config_overrides: dict | None = None) -> list[str]:
    """Copy the HF side files that exist in `source_dir` (following HF-cache symlinks).

    `config_overrides` are config.json keys the merge changed (layer count of a layer-stacking
    merge, vocabulary size when embeddings were cut to their common rows).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copyfile(src, dest_dir / name)
            copied.append(name)
    cfg_path = dest_dir / "config.json"
    if config_overrides and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg.update(config_overrides)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
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
    `extra(tmp_dir)` writes additional files into the output before it is renamed into place.
    """
    out_dir = Path(out_dir)
    if not store.is_complete():
        done, total = store.progress()
        raise StreammergeError(
            f"{store.path}: build is not finished ({done}/{total} merge blocks); run `streammerge build` again to complete it"
        )
    if out_dir.exists() and not overwrite:
        raise StreammergeError(f"{out_dir}: already exists (use --overwrite to replace it)")
    out_type = float_type(dtype) if dtype else None

    specs = []
    for t in store.tensors:
        ftype = out_type or float_type(t["dtype"])
        n = 1
        for d in t["shape"]:
            n *= d
        specs.append(TensorSpec(t["name"], ftype.st, tuple(t["shape"]), n * ftype.itemsize))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        writer = ShardedWriter(tmp, specs, shard_size)
        dsk, task_bytes = {}, {}
        for t in store.tensors:
            ftype = out_type or float_type(t["dtype"])
            rows = t["shape"][0] if t["shape"] else 1
            for i in range(t["nblocks"]):
                r0, r1 = i * t["block_rows"], min(rows, (i + 1) * t["block_rows"])
                key = ("export", t["name"], i)
                dsk[key] = (_export_block, store, writer, t["name"], r0, r1, ftype, block_fn, i)
                row_elems = 1
                for d in t["shape"][1:]:
                    row_elems *= d
                task_bytes[key] = (r1 - r0) * row_elems * ftype.itemsize
        run_graph(
            dsk, list(dsk), task_bytes, workers=workers, scheduler=scheduler, cluster=cluster, desc="export", progress=progress
        )
        writer.finish()
        _write_side_files(store, tmp, out_type)
        if extra is not None:
            extra(tmp)
        _fsync_dir(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"files": writer.files, "total_size": writer.total_size, "path": str(out_dir)}


def _write_side_files(store: Store, dest: Path, out_type: FloatType | None) -> None:
    hf = store.path / "hf"
    if hf.is_dir():
        for f in hf.iterdir():
            if f.is_file():
                shutil.copyfile(f, dest / f.name)
    cfg_path = dest / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        dtypes = {t["dtype"] for t in store.tensors}
        name = out_type.name if out_type else (dtypes.pop() if len(dtypes) == 1 else "float32")
        # transformers < 5 reads `torch_dtype`, >= 5 writes `dtype`: keep both in agreement.
        cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _fsync_dir(path: Path) -> None:
    """Make the side files and the directory entries durable (shards were fsynced by the writer)."""
    for f in path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    remove_stale_temps(out_dir)


def remove_stale_temps(out_dir: Path) -> int:
    """Remove what killed exports left beside OUT: `.OUT.partial-<pid>-<id>` directories, and,
    once OUT exists, `.OUT.old-<pid>-<id>` (a replaced export), whose process <pid> is gone."""

    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    removed = 0
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return 0
    for p in entries:
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or pid_alive(pid) or (m.group(1) == "old" and not out_dir.exists()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    return removed
