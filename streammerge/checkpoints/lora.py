"""PEFT LoRA adapters as merge inputs: a base model plus an adapter, read as one model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. Applying it
to a base checkpoint yields a `ModelCheckpoint` whose handles are the base's, except:

- a targeted weight W (a `lora_A`/`lora_B` or `lora_embedding_A`/`lora_embedding_B` pair) is a
  `LoraHandle`: its rows are read as W[r0:r1] + scale * (B @ A)[r0:r1] in float32, with B's rows
  read per block and A (rank x width) whole, so no merged model is ever written or held;
- a full tensor in the adapter (`modules_to_save`, a trained bias, an embedding's saved
  `base_layer`) replaces the base's.

The delta is computed as peft's `get_delta_weight` does, (B @ A) * scale in float32
(transposed for embeddings and `fan_in_fan_out`), added to the base in float32 and rounded to
the base's dtype: `merge_and_unload()` adds in place into the base-dtype weight (for embeddings
it rounds the delta to that dtype first), and mergekit's `model+lora` saves that merged model
(transformers 5 loads it in its own dtype), so these roundings are what make the inputs theirs.
Without them a bf16 base would differ by up to one bf16 step per element. B @ A itself is the
exact sum's float32 rounding (`_product`), where peft's float32 gemm sums in its BLAS's order:
the same bits on any machine and for any rows read, and peft's within its own rounding.

Refused with a one-line error naming the file: PEFT types other than LORA, DoRA and the other
LoRA variants whose merge is not W + scale * B @ A, pickled adapters (unless --allow-pickle),
tensors of another shape or rank than the base and the config say, modules the base lacks, and
an adapter whose config names another architecture than the base's.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from ..dtypes import float_type, is_float_st
from ..errors import CheckpointError
from ..jit import available, jit
from ..limits import DOCUMENT
from .blocks import read_rows, read_rows_at, row_elems
from .model import ModelCheckpoint, TensorHandle, _open_shard, _read_json_file, open_model, resolve_model_dir
from .safetensors_header import TensorSize, _q

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own names
_CHUNK = 1 << 20  # delta elements computed and added at a time (4 MiB of float32; smaller chunks
# cost more in BLAS calls than they save: 2^16 took 5x as long on the 1024 x 2816 tensor)

# adapter_config.json settings under which the merged weight is not W + scale * B @ A; a truthy
# value is refused (peft's defaults are all falsy).
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each merged column by a magnitude vector",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "layer_replication": "layer_replication duplicates base layers",
    "target_parameters": "target_parameters adapts nn.Parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "use_qalora": "QALoRA (use_qalora) pools the input groups",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
}

_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class LoraHandle(TensorSize):
    """A base tensor with a LoRA delta added as its rows are read (see the module docstring).

    Small and picklable like `TensorHandle`; the reads go through `blocks.read_rows` /
    `read_rows_at`, which hand handles without raw storage (`has_raw = False`) to the methods
    here, so the engine's raw-byte fast paths read these as float32 rows instead.
    """

    name: str
    base: TensorHandle  # the weight the delta is added to (the base's, or the adapter's copy)
    # lora_A (r, in) / lora_embedding_A (r, rows), read whole; lora_B (out, r) / lora_embedding_B
    # (cols, r). None for an adapter's full tensor in another dtype: only rounded to `dtype`.
    a: TensorHandle | None
    b: TensorHandle | None
    scale: float  # lora_alpha / r, or / sqrt(r) with use_rslora
    transposed: bool  # delta = ((B @ A) * scale).T: embeddings and fan_in_fan_out layers
    dtype: str  # the merged weight's dtype: the base model's
    # peft's Embedding.merge rounds the delta to the weight's dtype before adding it (its
    # Linear.merge adds the float32 delta): bit-identity needs the same double rounding
    round_delta: bool = False
    check_finite: bool = True  # as TensorHandle's; passed on to the base and factor reads
    has_raw: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def path(self) -> str:
        return self.base.path

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(h.path for h in (self.base, self.a, self.b) if h is not None)

    def _part(self, h: TensorHandle) -> TensorHandle:
        return h if self.check_finite or not h.check_finite else replace(h, check_finite=False)

    def read_rows(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        return self._merged(read_rows(self._part(self.base), r0, r1, out), np.arange(r0, r1))

    def read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        return self._merged(read_rows_at(self._part(self.base), rows, out), rows)

    def _merged(self, dest: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`dest` (the base's rows `rows`, float32) plus the delta's same rows, rounded to the
        base dtype. The delta is (B @ A) * scale in float32, as peft's get_delta_weight; when
        `transposed` its rows are A[:, rows].T @ B.T. Of the tall factor only the rows needed
        are read (B's, or A's columns), and the delta is added `_CHUNK` elements at a time, so
        that the temporaries stay small whatever the block size."""
        flat = dest.reshape(rows.size, row_elems(self.shape))
        if self.a is not None and rows.size:
            a = _whole(self._part(self.a))
            b = self._part(self.b)
            if self.transposed:
                tall, wide = np.ascontiguousarray(a[:, rows].T), np.ascontiguousarray(_whole(b).T)
            else:
                tall, wide = read_rows_at(b, rows, np.empty(rows.size * b.shape[1], np.float32)), a
        step = max(2, _CHUNK // max(1, flat.shape[1]))
        for s in range(0, rows.size, step):
            part = flat[s : s + step]
            if self.a is not None:
                delta = _product(tall[s : s + step], wide)
                delta *= np.float32(self.scale)
                part += self._rounded(delta) if self.round_delta else delta
            self._rounded(part)
        return dest

    def _rounded(self, x: np.ndarray) -> np.ndarray:
        """`x` rounded in place to the base dtype (module docstring), still float32."""
        logical = float_type(self.dtype).logical
        if logical != np.float32:
            np.copyto(x, x.astype(logical))
        return x


def _product(tall: np.ndarray, wide: np.ndarray) -> np.ndarray:
    """tall (m, r) @ wide (r, width) in float32, each entry the same bits whatever the rows
    computed with it, the BLAS or the machine: the float32 rounding of the float64 rounding of
    the exact sum of its r products.

    A float32 gemm sums in an order that depends on the shapes and on the CPU's kernels (on an
    AVX2 EPYC, numpy's OpenBLAS gave other bits for a block's rows than for the whole product,
    and other bits than torch's MKL, in thousands of entries of a rank-16 product). Instead:
    the products of float32 numbers are exact in float64; BLAS sums them in float64 (`x`,
    within (r + 2) * 2^-53 * |tall_i| |wide_j| of the exact sum, whatever its order); and where
    x minus and x plus twice that bound round to the same float32, so does everything between,
    the exact sum included (rounding is monotonic): that float32 is the entry. The few entries
    where they differ (a handful in 10^7) are summed exactly (math.fsum) and rounded.
    """
    t64, w64 = tall.astype(np.float64), wide.astype(np.float64)
    x = t64 @ w64
    # twice the bound, per entry, as c * |tall row i|_2 * |wide column j|_2 (Cauchy-Schwarz)
    c = 2 * (tall.shape[1] + 2) * 2.0**-53
    t_norm = np.sqrt(np.einsum("ik,ik->i", t64, t64)) * c
    w_norm = np.sqrt(np.einsum("kj,kj->j", w64, w64))
    out = np.empty(x.shape, np.float32)
    if available():
        found = np.empty(_NEAR_KEPT, np.int64)
        n = _round_checked(x, t_norm, w_norm, out, found)
        near = np.unravel_index(found[:n], x.shape) if n <= _NEAR_KEPT else np.nonzero(_straddles(x, t_norm, w_norm))
    else:
        out[...] = x
        near = np.nonzero(_straddles(x, t_norm, w_norm))
    for i, j in zip(*near):
        try:
            out[i, j] = np.float32(math.fsum(t64[i] * w64[:, j]))
        except (ValueError, OverflowError):  # inf - inf, or beyond float64: x's own value stands
            pass
    return out


_NEAR_KEPT = 256  # entries `_round_checked` lists; more (NaN or inf factors) are found again by numpy


def _straddles(x: np.ndarray, t_norm: np.ndarray, w_norm: np.ndarray) -> np.ndarray:
    """Where x - b and x + b (b = t_norm_i * w_norm_j) round to different float32 numbers (or
    are NaN): the entries whose rounding the bound leaves open."""
    b = np.multiply.outer(t_norm, w_norm)
    with np.errstate(invalid="ignore", over="ignore"):
        return (x - b).astype(np.float32) != (x + b).astype(np.float32)


@jit
def _round_checked(x, t_norm, w_norm, out, found):
    """out = x rounded to float32, in one pass; returns how many entries `_straddles` flags,
    the first len(found) of them listed in `found` (flat indices)."""
    near = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j]
            b = t_norm[i] * w_norm[j]
            out[i, j] = np.float32(v)
            if np.float32(v - b) != np.float32(v + b):
                if near < found.shape[0]:
                    found[near] = i * x.shape[1] + j
                near += 1
    return near


def _whole(h: TensorHandle) -> np.ndarray:
    rows = h.shape[0]
    return read_rows(h, 0, rows, np.empty(h.numel, np.float32))


# --------------------------------------------------------------------------------------------
# finding adapters


def is_adapter_dir(directory: Path) -> bool:
    """A PEFT adapter directory: adapter_config.json and no full model weights beside it."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return False
    full = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return not any((directory / n).exists() for n in full)


def adapter_dir(spec: str) -> Path | None:
    """The adapter directory `spec` names (local or in the offline HF cache), else None."""
    try:
        directory = resolve_model_dir(spec)
    except CheckpointError:
        return None
    return directory if is_adapter_dir(directory) else None


def read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    cfg = _read_json_file(path, ADAPTER_CONFIG, DOCUMENT)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: {ADAPTER_CONFIG} must be a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {_q(peft_type)} is not supported; only LoRA adapters (peft_type \"LORA\") can be merged"
        )
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{path}: {key} is set: {why}, which streammerge does not merge")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise CheckpointError(f"{path}: {key} must be a positive number, got {_q(v)}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{path}: {key} must be an object of module pattern -> number")
    return cfg


def declared_base(directory: Path) -> str | None:
    """The adapter config's base_model_name_or_path (what peft loads the adapter onto)."""
    base = read_adapter_config(directory).get("base_model_name_or_path")
    return base if isinstance(base, str) and base.strip() else None


def open_input(
    spec: str, *, locate: Callable[[str], str] = str, default_base: str | None = None, pickle_cache: Path | None = None
) -> ModelCheckpoint:
    """The model a recipe's `spec` names: a model (`open_model`), or mergekit's `BASE+ADAPTER`,
    or a PEFT adapter directory alone, applied to its base. An adapter directory's base is
    `default_base` (the recipe's base_model), else its config's base_model_name_or_path: a path
    written in the adapter's own files is followed only when the recipe names no base.
    `locate` maps a path as written to where it is (the planner: relative to the recipe too)."""
    paths = spec_paths(spec, locate)
    if len(paths) == 2:
        base_path, adapter_path = paths
        directory = resolve_model_dir(adapter_path)
        if not is_adapter_dir(directory):
            raise CheckpointError(f"{directory}: not a PEFT adapter directory (no {ADAPTER_CONFIG}), in {spec}")
    else:
        directory = adapter_dir(paths[0])
        if directory is None:
            return open_model(paths[0], pickle_cache=pickle_cache)
        if default_base in (None, spec):
            return _on_declared_base(spec, directory, locate, pickle_cache)
        base_path = locate(default_base)
    return apply_adapter(open_model(base_path, pickle_cache=pickle_cache), directory, spec=spec, pickle_cache=pickle_cache)


def spec_paths(spec: str, locate: Callable[[str], str] = str) -> list[str]:
    """The located paths a recipe's model reference names: [model], or mergekit's
    `BASE+ADAPTER` as [base, adapter] (unless a directory is really named so)."""
    if "+" in spec and not Path(locate(spec)).exists():
        return [locate(part) for part in spec.split("+", 1)]
    return [locate(spec)]


def _on_declared_base(spec: str, directory: Path, locate: Callable[[str], str], pickle_cache: Path | None) -> ModelCheckpoint:
    """Adapter `directory` applied to the base its adapter_config.json names."""
    where = directory / ADAPTER_CONFIG
    base_spec = declared_base(directory)
    if base_spec is None:
        raise CheckpointError(f"{where}: names no base_model_name_or_path, and the recipe has no base_model to apply the adapter to")
    try:
        base = open_model(locate(base_spec), pickle_cache=pickle_cache)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: base_model_name_or_path: {e} (or give the recipe a base_model)") from None
    return apply_adapter(base, directory, spec=spec, pickle_cache=pickle_cache)


# --------------------------------------------------------------------------------------------
# applying an adapter to a base checkpoint


def apply_adapter(
    base: ModelCheckpoint, directory: Path, *, spec: str, pickle_cache: Path | None = None
) -> ModelCheckpoint:
    """`base` with the adapter in `directory` applied (handles only: nothing is read but headers)."""
    config_path = directory / ADAPTER_CONFIG
    cfg = read_adapter_config(directory)
    _check_architecture(cfg, base, config_path)
    weights = _weights_file(directory, pickle_cache)
    header, real, st = _open_shard(weights)
    handles = {
        name: TensorHandle(name=name, path=str(real), offset=header.data_start + e.begin, dtype=e.dtype, shape=e.shape)
        for name, e in header.tensors.items()
    }
    tensors = dict(base.tensors)
    pairs, replacements = _classify(handles, weights)
    for target, h in replacements.items():
        tensors[target] = _replacement(tensors, target, h, weights, base)
    for module, (a, b, embedding) in pairs.items():
        target = f"{module}.weight"
        tensors[target] = _lora(cfg, config_path, tensors, module, target, a, b, embedding, weights, base)
    fingerprint = base.fingerprint()
    fingerprint[f"adapter/{ADAPTER_CONFIG}"] = _file_fingerprint(config_path)
    fingerprint[f"adapter/{weights.name}"] = {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "header_sha256": header.header_sha256,
    }
    return replace(base, spec=spec, files=(*base.files, weights), tensors=tensors, adapter=directory, _fingerprint=fingerprint)


def _weights_file(directory: Path, pickle_cache: Path | None) -> Path:
    path = directory / ADAPTER_WEIGHTS
    if path.exists() or path.is_symlink():
        return path
    pickled = directory / ADAPTER_PICKLE
    if not pickled.exists():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    if pickle_cache is None:
        raise CheckpointError(
            f"{pickled}: a pickled adapter; streammerge reads only safetensors because loading a pickle can "
            "execute arbitrary code (pass --allow-pickle if you trust it: it is loaded with "
            "torch.load(weights_only=True) and converted once)"
        )
    from .pickles import converted_dir

    return converted_dir(directory, Path(pickle_cache), (".bin",)) / ADAPTER_WEIGHTS


def _file_fingerprint(path: Path) -> dict:
    """A small file's identity, in the form a shard's fingerprint has (the digest is the whole file's)."""
    try:
        data = path.read_bytes()
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": hashlib.sha256(data).hexdigest()}


def _check_architecture(cfg: dict, base: ModelCheckpoint, config_path: Path) -> None:
    """peft records the class it wrapped (auto_mapping.base_model_class): it must be the base's."""
    wrapped = (cfg.get("auto_mapping") or {}).get("base_model_class") if isinstance(cfg.get("auto_mapping"), dict) else None
    archs = (base.config or {}).get("architectures")
    if isinstance(wrapped, str) and isinstance(archs, list) and archs and wrapped not in archs:
        raise CheckpointError(
            f"{config_path}: the adapter was made for a {wrapped}, but the base model {base.directory} is a "
            f"{archs[0]} (an adapter for another architecture)"
        )


def _classify(handles: dict[str, TensorHandle], weights: Path):
    """({module: (lora_A, lora_B, is an embedding)}, {base tensor name: full tensor replacing it})."""
    factors: dict[str, dict[str, TensorHandle]] = {}
    kinds: dict[str, bool] = {}
    replacements: dict[str, TensorHandle] = {}
    for key, h in handles.items():
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: tensor {_q(key)} is not a PEFT adapter tensor (no {PEFT_PREFIX!r} prefix)")
        name = key[len(PEFT_PREFIX):]
        if not is_float_st(h.dtype):
            raise CheckpointError(f"{weights}: tensor {_q(key)} has dtype {h.dtype}; only BF16, F16 and F32 can be merged")
        if m := _LINEAR.match(name) or _EMBEDDING.match(name):
            embedding = m.re is _EMBEDDING
            if kinds.setdefault(m["module"], embedding) != embedding:
                raise CheckpointError(f"{weights}: module {m['module']} has both lora_A/B and lora_embedding_A/B tensors")
            factors.setdefault(m["module"], {})[m["ab"]] = h
        elif m := _BASE_LAYER.match(name):
            replacements[f"{m['module']}.{m['param']}"] = h
        elif "lora_" in name or ".base_layer." in name:
            raise CheckpointError(f"{weights}: tensor {_q(key)} is not a LoRA factor streammerge knows how to merge")
        else:  # modules_to_save, trained biases
            replacements[name] = h
    pairs = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            have, lack = next(iter(ab)), ({"A", "B"} - set(ab)).pop()
            raise CheckpointError(f"{weights}: module {module} has lora_{have} but no lora_{lack}")
        pairs[module] = (ab["A"], ab["B"], kinds[module])
    return pairs, replacements


def _absent(weights: Path, what: str, target: str, base: ModelCheckpoint) -> CheckpointError:
    return CheckpointError(f"{weights}: {what} {target}, which the base model {base.directory} does not have")


def _replacement(tensors: dict, target: str, h: TensorHandle, weights: Path, base: ModelCheckpoint):
    """The adapter's full copy of `target` (same trailing shape; the vocabulary may differ)."""
    old = tensors.get(target)
    if old is None:
        raise _absent(weights, "holds a full tensor for", target, base)
    if len(h.shape) != len(old.shape) or h.shape[1:] != old.shape[1:] or (len(h.shape) == 1 and h.shape != old.shape):
        raise CheckpointError(
            f"{weights}: tensor {target} has shape {list(h.shape)}, but the base's is {list(old.shape)}"
        )
    h = replace(h, name=target)
    if h.dtype == old.dtype:
        return h
    # peft loads it into the base-dtype module: the merged model holds it rounded to that dtype
    return LoraHandle(target, h, None, None, 0.0, False, old.dtype)


def _pattern_value(patterns: dict, module: str, default, where: str):
    """peft's per-module override: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        try:
            if not re.match(rf"(.*\.)?({pattern})$", module):
                continue
        except re.error as e:
            raise CheckpointError(f"{where}: pattern {_q(pattern)} is not a valid regular expression ({e})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise CheckpointError(f"{where}: pattern {_q(pattern)} must map to a positive number, got {_q(value)}")
        return value
    return default


def _lora(cfg, config_path, tensors, module, target, a, b, embedding, weights, base_ck) -> LoraHandle:
    base = tensors.get(target)
    if base is None:
        raise _absent(weights, "targets", module, base_ck)
    if isinstance(base, LoraHandle):  # a replacement in another dtype: the delta goes on its copy
        base = base.base
    if len(base.shape) != 2 or not is_float_st(base.dtype):
        raise CheckpointError(
            f"{weights}: targets {module}, whose weight {target} is not a float matrix ({base.dtype} {list(base.shape)})"
        )
    transposed = embedding or bool(cfg.get("fan_in_fan_out"))
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"], f"{config_path}: rank_pattern")
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"], f"{config_path}: alpha_pattern")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        raise CheckpointError(
            f"{weights}: {module}: rank mismatch: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, but "
            f"{ADAPTER_CONFIG} gives rank {r}"
        )
    out_dim, in_dim = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    if (out_dim, in_dim) != tuple(base.shape):
        raise CheckpointError(
            f"{weights}: {module}: shape mismatch: the adapter's delta is {[out_dim, in_dim]}, but {target} of the "
            f"base model is {list(base.shape)} (an adapter for another model?)"
        )
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    dtype = tensors[target].dtype
    return LoraHandle(target, base, a, b, float(scale), transposed, dtype, round_delta=embedding)
