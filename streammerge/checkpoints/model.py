"""Resolving a model spec to a directory and opening its safetensors checkpoint.

A spec is a local directory, or (when no such directory exists) a Hugging Face repo id
`org/name[@revision]` looked up OFFLINE in the local HF cache. Opening a model reads and
validates every shard's header (never the data) and yields one small, picklable
`TensorHandle` per tensor: what dask tasks receive to memory-map their block lazily.

Weights are found in this order: `model.safetensors.index.json` (its `weight_map` names the
shard of every tensor), `model.safetensors`, any `*.safetensors`. Pickle checkpoints (`*.bin`,
`*.pt`, `*.pth`, `*.ckpt`) are refused: unpickling can execute arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from streammerge.checkpoints.safetensors_header import (
    SafetensorsHeader,
    TensorSize,
    _q,
    duplicates_of,
    loads_strict,
    read_header,
)
from streammerge.checkpoints.fp8 import dequantized
from streammerge.errors import CheckpointError
from streammerge.limits import DOCUMENT, LISTING, Limits, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# org/name[@revision]; HF names are [A-Za-z0-9._-], a revision may be a branch with slashes.
_REPO_ID = re.compile(
    r"^(?P<org>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
    r"(?:@(?P<rev>[A-Za-z0-9._/-]+))?$"
)


@dataclass(frozen=True)
class TensorHandle(TensorSize):
    """Where one tensor's bytes are. Small and picklable: dask tasks get these, never data."""

    name: str
    path: str  # absolute (symlink-resolved) path of the .safetensors file
    offset: int  # absolute byte offset of the tensor's first byte in that file
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    # read_rows refuses NaN/Inf in this tensor; False under `build --allow-nonfinite` (travels
    # with the task to any worker, thread or process)
    check_finite: bool = True
    # Its rows are stored bytes: read_raw may read them (a LoraHandle's are computed; zarr-style,
    # the capability is declared so the engine's raw fast paths know to read float32 rows instead)
    has_raw: ClassVar[bool] = True

    @property
    def paths(self) -> tuple[str, ...]:
        """The files a read opens."""
        return (self.path,)


@dataclass(frozen=True)
class ModelCheckpoint:
    spec: str  # as the user wrote it
    directory: Path  # the resolved model directory
    files: tuple[Path, ...]  # the safetensors files (as named in the directory), in order
    tensors: dict[str, TensorHandle]  # file order, then header order
    config: dict | None  # parsed config.json, if present
    adapter: Path | None = None  # the LoRA adapter directory applied to `directory` (checkpoints/lora.py)
    # {file name: {"size", "mtime_ns", "header_sha256"}}, captured when the headers were read
    _fingerprint: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    def fingerprint(self) -> dict[str, dict]:
        """Identity of every shard as opened: {file name: {size, mtime_ns, header_sha256}}.

        Captured at open time (the same moment the handles' offsets were read), so a store can
        record it and a later `open_model(spec).fingerprint()` tells whether the inputs changed.
        """
        return {name: dict(fp) for name, fp in self._fingerprint.items()}


# --------------------------------------------------------------------------------------------
# resolving a spec


def _hf_cache_dir() -> tuple[Path, str]:
    """The HF hub cache directory and a description of where it came from."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser(), "$HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "$HF_HOME/hub"
    return Path("~/.cache/huggingface/hub").expanduser(), "the default cache"


def _safe_rel(rev: str) -> bool:
    parts = rev.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _os_error(e: OSError, fallback: Any) -> CheckpointError:
    """An unexpected OSError (permissions, name too long, ...) as a one-line CheckpointError."""
    where = e.filename if e.filename is not None else fallback
    return CheckpointError(f"{where}: cannot access: {e.strerror or e}")


def looks_like_path(spec: str, root: Path | None = None) -> bool:
    """Whether `spec` was meant as a directory rather than a Hub id `org/name`: it starts with
    ./ ../ / or ~, or its first part is an existing directory (under `root`, default the cwd),
    as `models/ft9` is when `models/` holds the other checkpoints."""
    if spec.startswith(("./", "../", "/", "~")):
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and first not in ("", ".", "..") and ((root or Path.cwd()) / first).is_dir()


def resolve_model_dir(spec: str) -> Path:
    """A local directory (relative to the cwd), else `org/name[@rev]` from the offline HF cache."""
    try:
        return _resolve_model_dir(spec)
    except OSError as e:
        raise _os_error(e, spec) from None


def _resolve_model_dir(spec: str) -> Path:
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError(f"{spec!r}: empty model path")
    if "\x00" in spec:
        raise CheckpointError(f"{_q(spec)}: model path contains a NUL byte")
    local = Path(spec).expanduser()
    try:
        if local.is_dir():
            return local.resolve()
        exists = local.exists() or local.is_symlink()
    except OSError as e:
        raise CheckpointError(f"{spec}: cannot access: {e.strerror or e}") from None
    if exists:
        if local.is_symlink() and not local.exists():
            raise CheckpointError(f"{spec}: is a dangling symlink, not a model directory")
        raise CheckpointError(
            f"{spec}: is a file, not a model directory (give the directory that holds the "
            "safetensors files and config.json)"
        )

    m = _REPO_ID.match(spec)
    if not m or ".." in spec.split("@")[0] or (m.group("rev") and not _safe_rel(m.group("rev"))) or looks_like_path(spec):
        where = "" if local.is_absolute() else f" ({Path.cwd() / local})"
        raise CheckpointError(f"{spec}: no such model directory{where}")
    org, name, rev = m.group("org"), m.group("name"), m.group("rev") or "main"
    cache, source = _hf_cache_dir()
    repo_dir = cache / f"models--{org}--{name}"
    if not repo_dir.is_dir():
        raise CheckpointError(
            f"{spec}: no such directory, and no Hugging Face cache entry at {repo_dir} "
            f"(offline lookup in {source}; download it first, e.g. `huggingface-cli download "
            f"{org}/{name}`)"
        )
    ref_file = repo_dir / "refs" / rev
    snapshots = repo_dir / "snapshots"
    if ref_file.is_file():
        try:
            with open(ref_file, "rb") as f:
                commit = f.read(1024).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{ref_file}: cannot read the revision ref: {e}") from None
        if not commit or not re.fullmatch(r"[A-Za-z0-9._-]+", commit) or commit in (".", ".."):
            raise CheckpointError(f"{ref_file}: does not hold a commit hash (got {_q(commit)})")
        snap = snapshots / commit
        if not snap.is_dir():
            raise CheckpointError(
                f"{spec}: revision {rev!r} points to commit {commit} but {snap} does not exist "
                "(incomplete download?)"
            )
        return snap.resolve()
    snap = snapshots / rev
    if "/" not in rev and snap.is_dir():  # a commit hash naming a snapshot directly
        return snap.resolve()
    raise CheckpointError(
        f"{spec}: revision {rev!r} not found in the Hugging Face cache (looked for {ref_file} "
        f"and {snap}; offline lookup in {source})"
    )


# --------------------------------------------------------------------------------------------
# opening


def _read_json_file(path: Path, what: str, limits: Limits, strict: bool = True) -> Any:
    """Parse a JSON file of the model directory under `limits`; any problem is one line.

    strict: record duplicate keys (see `duplicates_of`) and refuse NaN/Infinity. config.json is
    read leniently, as transformers writes it (json.dumps may emit NaN).
    """
    return read_json(path, limits.named(what), CheckpointError, loads=loads_strict if strict else json.loads)


def _check_shard_name(index_path: Path, tensor: str, fname: Any) -> str:
    """A weight_map value must be a plain file name inside the model directory."""
    where = f"{index_path}: weight_map[{_q(tensor)}]"
    if not isinstance(fname, str):
        raise CheckpointError(f"{where} must be a file name string, got {type(fname).__name__}")
    if not fname:
        raise CheckpointError(f"{where} is an empty file name")
    if "/" in fname or "\\" in fname or os.sep in fname or (os.altsep and os.altsep in fname):
        raise CheckpointError(
            f"{where} = {_q(fname)}: shard names must be plain file names in the model "
            "directory (no directories, absolute paths or '..')"
        )
    if fname in (".", "..") or "\x00" in fname:
        raise CheckpointError(f"{where} = {_q(fname)} is not a valid file name")
    if not fname.endswith(".safetensors"):
        raise CheckpointError(f"{where} = {_q(fname)}: shard files must be .safetensors files")
    return fname


def _read_index(directory: Path) -> dict[str, str]:
    """weight_map of model.safetensors.index.json: tensor name -> shard file name."""
    index_path = directory / INDEX_NAME
    doc = _read_json_file(index_path, "the index", LISTING)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{index_path}: the index must be a JSON object")
    if duplicates_of(doc):
        raise CheckpointError(f"{index_path}: duplicate key {_q(duplicates_of(doc)[0])}")
    if "weight_map" not in doc:
        raise CheckpointError(f"{index_path}: the index has no 'weight_map'")
    wm = doc["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object of tensor name -> file name")
    if duplicates_of(wm):
        raise CheckpointError(f"{index_path}: tensor {_q(duplicates_of(wm)[0])} is listed twice in weight_map")
    if not wm:
        raise CheckpointError(f"{index_path}: 'weight_map' is empty")
    return {tensor: _check_shard_name(index_path, tensor, fname) for tensor, fname in wm.items()}


def _pickle_refusal(directory: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return CheckpointError(
        f"{directory}: only pickle checkpoints found ({shown}); streammerge reads only "
        "safetensors because loading a pickle can execute arbitrary code. If you trust the "
        "files, pass --allow-pickle (torch.load(weights_only=True), converted once to safetensors "
        "in the store), or convert them yourself with: python -c \"from transformers import "
        f"AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{directory}')"
        ".save_pretrained('OUT', safe_serialization=True)\" and use OUT"
    )


def _list_dir(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot list the model directory: {e.strerror or e}") from None


def _has_safetensors(directory: Path) -> bool:
    return any((directory / n).exists() or (directory / n).is_symlink() for n in (INDEX_NAME, SINGLE_NAME)) or any(
        n.endswith(".safetensors") for n in _list_dir(directory)
    )


def _find_weights(directory: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names in order, weight_map or None)."""
    if (directory / INDEX_NAME).exists() or (directory / INDEX_NAME).is_symlink():
        wm = _read_index(directory)
        return sorted(set(wm.values())), wm
    if (directory / SINGLE_NAME).exists() or (directory / SINGLE_NAME).is_symlink():
        return [SINGLE_NAME], None
    names = _list_dir(directory)
    # dangling links (an incomplete HF download) are kept so that opening them reports it
    shards = [n for n in names if n.endswith(".safetensors") and not (directory / n).is_dir()]
    if shards:
        return shards, None
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json")]
    if pickles:
        raise _pickle_refusal(directory, pickles)
    raise CheckpointError(
        f"{directory}: no weights found (expected {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files)"
    )


def _open_shard(path: Path) -> tuple[SafetensorsHeader, Path, os.stat_result]:
    if not (path.is_file()):
        what = "is a dangling symlink" if path.is_symlink() else "is missing or not a regular file"
        raise CheckpointError(f"{path}: {what}")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot resolve: {e}") from None
    header = read_header(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot stat: {e.strerror or e}") from None
    if st.st_size != header.file_size:
        raise CheckpointError(f"{path}: file changed while it was being opened")
    return header, real, st


def open_model(spec: str, *, pickle_cache: Path | None = None) -> ModelCheckpoint:
    """Resolve `spec`, validate every shard's header and index, and return the tensor handles.

    With `pickle_cache` (`--allow-pickle`), a directory whose only weights are pickles is
    converted once to safetensors under that cache (see pickles.py) and opened from there.
    """
    directory = resolve_model_dir(spec)
    try:
        if pickle_cache is not None and not _has_safetensors(directory):
            from streammerge.checkpoints.pickles import converted_dir

            directory = converted_dir(directory, Path(pickle_cache), PICKLE_SUFFIXES) or directory
        return _open_model(spec, directory)
    except OSError as e:
        raise _os_error(e, directory) from None


def _open_model(spec: str, directory: Path) -> ModelCheckpoint:
    config = None
    config_path = directory / CONFIG_NAME
    if config_path.is_symlink() and not config_path.exists():
        raise CheckpointError(f"{config_path}: is a dangling symlink (incomplete download?)")
    if config_path.exists():
        config = _read_json_file(config_path, "config.json", DOCUMENT, strict=False)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: config.json must be a JSON object")

    names, weight_map = _find_weights(directory)
    wanted_by_file: dict[str, list[str]] | None = None
    if weight_map is not None:
        wanted_by_file = {}
        for tensor, fname in weight_map.items():
            wanted_by_file.setdefault(fname, []).append(tensor)
        for fname in names:
            p = directory / fname
            if not p.is_file():
                raise CheckpointError(
                    f"{directory / INDEX_NAME}: references shard {fname!r}, but {p} "
                    f"{'is a dangling symlink' if p.is_symlink() else 'does not exist'}"
                )

    files: list[Path] = []
    tensors: dict[str, TensorHandle] = {}
    owner: dict[str, str] = {}
    fingerprint: dict[str, dict] = {}
    for fname in names:
        path = directory / fname
        header, real, st = _open_shard(path)
        files.append(path)
        fingerprint[fname] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "header_sha256": header.header_sha256,
        }
        for tname, entry in header.tensors.items():
            if tname in owner:
                raise CheckpointError(
                    f"{directory}: tensor {_q(tname)} appears in both {owner[tname]} and {fname}"
                )
            owner[tname] = fname
        if wanted_by_file is not None:
            for tname in wanted_by_file[fname]:
                if tname not in header.tensors:
                    raise CheckpointError(
                        f"{directory / INDEX_NAME}: maps tensor {_q(tname)} to {fname}, "
                        "but that file does not contain it"
                    )
        for tname, entry in header.tensors.items():
            if weight_map is not None and weight_map.get(tname) != fname:
                continue  # not listed by the index: not exposed
            tensors[tname] = TensorHandle(
                name=tname,
                path=str(real),
                offset=header.data_start + entry.begin,
                dtype=entry.dtype,
                shape=entry.shape,
            )
    if not tensors:
        raise CheckpointError(f"{directory}: the checkpoint contains no tensors")
    tensors = dequantized(tensors, config, config_path)  # FP8 weights: read through their scales
    return ModelCheckpoint(
        spec=spec,
        directory=directory,
        files=tuple(files),
        tensors=tensors,
        config=config,
        _fingerprint=fingerprint,
    )

