"""Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...), converted once to safetensors.

Only with `--allow-pickle`: unpickling can execute code, so the files are loaded with
`torch.load(weights_only=True)` (torch's restricted unpickler: tensors and plain containers
only) and written as safetensors into a cache directory, `<cache>/<key>/`, where `key` hashes the
source files' paths, sizes and modification times. The rest of the engine then reads that
directory like any safetensors model; a changed source gets a new key, hence a new file, which
a store detects as a changed input. torch is imported lazily and only here.

A conversion is written into `<cache>/.<key>.<pid>.tmp/` and renamed into place when complete,
so a killed conversion is redone, never half-used; stale temporary directories of dead
processes are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from ..errors import CheckpointError
from ..fsutil import pid_alive
from ..limits import LISTING, read_json

CONVERTER_VERSION = 1
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Pickles a training run leaves beside the weights: never model weights.
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler", "trainer_state")
# Side files copied next to the converted weights (config, tokenizer, generation settings).
_SIDE_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def _pickle_files(directory: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The pickle weight files of `directory`: the index's shards, else the weight-looking pickles."""
    index = directory / PICKLE_INDEX
    if index.is_file():
        try:
            doc = read_json(index, LISTING.named("the pickle index"), CheckpointError)
            wm = doc["weight_map"]
            names = sorted(set(wm.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid pickle checkpoint index ({type(e).__name__})") from None
        for n in names:
            if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", "..") or "\x00" in n:
                raise CheckpointError(f"{index}: weight_map names {n!r}; shard names must be plain file names")
            if not (directory / n).is_file():
                raise CheckpointError(f"{index}: references shard {n!r}, but {directory / n} does not exist")
        return names
    names = sorted(
        n
        for n in os.listdir(directory)
        if n.endswith(suffixes) and (directory / n).is_file() and not n.startswith(_NOT_WEIGHTS)
    )
    return names


def _key(directory: Path, names: list[str]) -> str:
    h = hashlib.sha256(f"v{CONVERTER_VERSION}\0{directory.resolve()}".encode())
    for n in names:
        st = os.stat(directory / n)
        h.update(f"\0{n}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _state_dict(obj, path: Path) -> dict:
    import torch

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in ("state_dict", "model", "module"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: tensor key {bad[0]!r} is not a string")
    return tensors


def _load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: --allow-pickle needs torch to read pickle checkpoints, and torch is not installed "
            "(pip install torch, or convert the checkpoint to safetensors elsewhere)"
        ) from None
    try:
        with warnings.catch_warnings():  # torch warns on multiple lines; errors below are one line
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch's unpickler raises many types; none is a bug of ours
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {first}") from None
    return _state_dict(obj, path)


def _save(tensors: dict, dest: Path) -> None:
    from safetensors.torch import save_file

    seen: set = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen or not v.is_contiguous():
            v = v.contiguous().clone()  # shared (tied) or strided: safetensors wants its own storage
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v
    save_file(out, str(dest), metadata={"format": "pt"})
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())


def converted_dir(directory: Path, cache: Path, suffixes: tuple[str, ...]) -> Path | None:
    """The safetensors directory standing for pickle checkpoint `directory` (converted if needed).

    None when `directory` holds no pickle weights.
    """
    directory = Path(directory)
    names = _pickle_files(directory, suffixes)
    if not names:
        return None
    key = _key(directory, names)
    cache = Path(cache)
    final = cache / key
    if (final / ".complete").is_file():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for p in cache.iterdir():  # temporaries of conversions whose process is gone
            m = re.fullmatch(r"\.[0-9a-f]+\.(\d+)\.tmp", p.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
        tmp = cache / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            seen: dict[str, str] = {}
            for n in names:
                tensors = _load(directory / n)
                for t in tensors:
                    if t in seen:
                        raise CheckpointError(f"{directory}: tensor {t!r} appears in both {seen[t]} and {n}")
                    seen[t] = n
                stem = n.rsplit(".", 1)[0]
                _save(tensors, tmp / f"{stem}.safetensors")
                del tensors
            for f in sorted(os.listdir(directory)):
                src = directory / f
                if f.endswith(_SIDE_SUFFIXES) and f != PICKLE_INDEX and src.is_file() and src.stat().st_size < 100_000_000:
                    shutil.copyfile(src, tmp / f)
            (tmp / ".complete").write_text(json.dumps({"source": str(directory), "files": names}) + "\n")
            if final.exists():  # a half-made one from an older layout, or a concurrent conversion won
                if (final / ".complete").is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return final
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise CheckpointError(f"{e.filename or cache}: cannot write the converted checkpoint: {e.strerror or e}") from None
    return final
