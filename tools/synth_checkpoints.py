#!/usr/bin/env python
"""Synthetic Hugging Face Llama-family checkpoints for tests and benchmarks (no network).

Writes model directories that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
``config.json``, ``generation_config.json``, safetensors weights (one ``model.safetensors`` or
HF-style shards plus ``model.safetensors.index.json``) and, optionally, a tiny working tokenizer.

Tensor names, shapes and dtypes are those of transformers' ``LlamaForCausalLM`` state dict, or
``Qwen2ForCausalLM`` when the shape has q/k/v biases. Values: weights ~ N(0, 0.02), RMSNorm weights
~ 1 + N(0, 0.02), biases ~ N(0, 0.01). A fine-tune is ``base + task vector``: a dense Gaussian
delta of std ``delta_scale`` on every tensor plus, with ``emphasis="attention"`` or ``"mlp"``, an
extra Gaussian delta of std ``emphasis_factor * delta_scale`` on that module kind (the two are drawn
as one Gaussian of the combined variance).

Generation is streamed: tensors are cut into fixed chunks of ``CHUNK`` elements (flat, row-major),
each chunk drawn from its own PCG64 stream seeded by (seed, role, tensor name, chunk index), so the
bytes do not depend on the number of worker threads, on sharding or on tensor order. Chunks are
computed by a small thread pool (numpy's generator releases the GIL) and written in order, so at
most a few chunks (tens of MB) are ever in memory, whatever the model size. float32 -> bf16/fp16
rounding is round-to-nearest-even (ml_dtypes / numpy casts).

Usable as a module (``make_base``, ``make_finetune``, ``make_family``, ``read_checkpoint``) and as
a CLI: ``python tools/synth_checkpoints.py OUT_DIR --preset tiny`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import string
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "ModelShape",
    "PRESETS",
    "make_base",
    "make_finetune",
    "make_family",
    "read_checkpoint",
    "tensor_specs",
    "checkpoint_files",
    "build_tokenizer",
    "parse_size",
]

if sys.byteorder != "little":  # safetensors is little-endian; we write native arrays
    raise RuntimeError("synth_checkpoints needs a little-endian host")

WEIGHT_STD = 0.02  # linear and embedding weights
NORM_NOISE = 0.02  # RMSNorm weights are 1 + N(0, NORM_NOISE)
BIAS_STD = 0.01  # q/k/v biases (qwen2)
CHUNK = 1 << 22  # elements per independently seeded chunk (16 MiB of float32)

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 (Llama convention)
MAX_POSITIONS = 2048

_ROLE_BASE = 1
_ROLE_FINETUNE = 2


# --------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    qkv_bias: bool = False  # Qwen2-style q/k/v biases -> Qwen2ForCausalLM, model_type qwen2
    tied_embeddings: bool = False  # no lm_head.weight tensor, tie_word_embeddings true

    def __post_init__(self) -> None:
        for f in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"ModelShape.{f} must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.vocab < len(SPECIAL_TOKENS):
            raise ValueError(f"vocab must be >= {len(SPECIAL_TOKENS)} (the special tokens)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def model_type(self) -> str:
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def architecture(self) -> str:
        return "Qwen2ForCausalLM" if self.qkv_bias else "LlamaForCausalLM"

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for _, s, _ in tensor_specs(self))


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(),
    "0.5b": ModelShape(hidden=2048, intermediate=5632, layers=8, heads=32, kv_heads=4, vocab=32000),
    "70b": ModelShape(hidden=8192, intermediate=28672, layers=2, heads=64, kv_heads=8, vocab=32000),
}


def tensor_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in file order; kind is "weight", "norm" or "bias"."""
    h, i, kv, v = shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (v, h), "weight")]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        for proj, out in (("q", h), ("k", kv), ("v", kv)):
            specs.append((f"{p}self_attn.{proj}_proj.weight", (out, h), "weight"))
            if shape.qkv_bias:
                specs.append((f"{p}self_attn.{proj}_proj.bias", (out,), "bias"))
        specs.append((f"{p}self_attn.o_proj.weight", (h, h), "weight"))
        specs.append((f"{p}mlp.gate_proj.weight", (i, h), "weight"))
        specs.append((f"{p}mlp.up_proj.weight", (i, h), "weight"))
        specs.append((f"{p}mlp.down_proj.weight", (h, i), "weight"))
        specs.append((f"{p}input_layernorm.weight", (h,), "norm"))
        specs.append((f"{p}post_attention_layernorm.weight", (h,), "norm"))
    specs.append(("model.norm.weight", (h,), "norm"))
    if not shape.tied_embeddings:
        specs.append(("lm_head.weight", (v, h), "weight"))
    return specs


def module_kind(name: str) -> str:
    """"attention", "mlp" or "other" (embeddings, norms, lm_head)."""
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


# --------------------------------------------------------------------------------------------
# dtypes and sizes


_DTYPES = {  # name -> (safetensors name, numpy dtype holding the values)
    "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
    "float16": ("F16", np.dtype(np.float16)),
    "float32": ("F32", np.dtype(np.float32)),
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_ST_TO_NAME = {st: name for name, (st, _) in _DTYPES.items()}


def _dtype_name(dtype: str) -> str:
    key = str(dtype).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return key


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal, as HF), '512MiB' -> 536_870_912, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    base = 1024 if "I" in unit else 1000
    return int(num * base**power)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


# --------------------------------------------------------------------------------------------
# safetensors writing / reading (streamed; no full tensor or shard ever held in memory)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # our dtype name
    # fill(start, stop, values, scratch): write the float32 values of flat elements [start, stop)
    # into `values` (length stop - start); `scratch` is a spare CHUNK * 4 byte buffer. Runs in a
    # worker thread, on preallocated buffers (fresh allocations page-fault, which serializes threads).
    fill: Callable[[int, int, np.ndarray, np.ndarray], None]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][1].itemsize


def _chunk_rng(seed: int, role: int, name: str, chunk: int) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    words = [int.from_bytes(digest[k : k + 4], "little") for k in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), role, *words, chunk])))


def _gaussian(seed: int, role: int, name: str, start: int, out: np.ndarray) -> np.ndarray:
    """Standard normal values of flat elements [start, start + len(out)) into `out`."""
    assert start % CHUNK == 0 and out.size <= CHUNK
    return _chunk_rng(seed, role, name, start // CHUNK).standard_normal(dtype=np.float32, out=out)


def _workers(workers: int | None) -> int:
    if workers:
        return max(1, int(workers))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, min(os.cpu_count() or 1, 8))


def _header_bytes(tensors: Sequence[_Tensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as the safetensors library does: data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


class _Slot:
    """Reusable per-chunk buffers."""

    def __init__(self) -> None:
        self.values = np.empty(CHUNK, np.float32)
        self.out = np.empty(CHUNK * 4, np.uint8)
        self.scratch = np.empty(CHUNK * 4, np.uint8)


def _write_safetensors(path: Path, tensors: Sequence[_Tensor], workers: int) -> int:
    """Stream `tensors` into one safetensors file, chunk by chunk; returns the file size."""
    depth = workers + 2  # chunks in flight (computing or waiting to be written)
    pool: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(depth):
        pool.put(_Slot())

    def jobs() -> Iterator[tuple[_Tensor, int, int]]:
        for t in tensors:
            for start in range(0, t.numel, CHUNK):
                yield t, start, min(start + CHUNK, t.numel)

    def compute(job: tuple[_Tensor, int, int]) -> tuple[_Slot, np.ndarray]:
        t, start, stop = job
        slot = pool.get()
        n = stop - start
        values = slot.values[:n]
        t.fill(start, stop, values, slot.scratch)
        np_dtype = _DTYPES[t.dtype][1]
        if np_dtype == values.dtype:
            return slot, values.view(np.uint8)
        out = slot.out[: n * np_dtype.itemsize].view(np_dtype)
        np.copyto(out, values, casting="unsafe")  # round to nearest even
        return slot, out.view(np.uint8)

    tmp = path.with_name(path.name + ".tmp")
    header = _header_bytes(tensors)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for slot, raw in _ordered_map(compute, jobs(), workers, depth):
                f.write(raw)
                pool.put(slot)
            size = f.tell()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    expected = len(header) + sum(t.nbytes for t in tensors)
    if size != expected:  # pragma: no cover - internal consistency
        raise AssertionError(f"{path}: wrote {size} bytes, expected {expected}")
    os.replace(tmp, path)
    return size


def _ordered_map(fn: Callable, items: Iterable, workers: int, depth: int) -> Iterator:
    """map(fn, items) over a thread pool, in order, with at most `depth` items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="synth") as ex:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                if len(pending) >= depth:
                    yield pending.popleft().result()
                pending.append(ex.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise EOFError("unexpected end of safetensors file")
        done += n


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model dir (index order, or the single model.safetensors)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {d}")


@dataclass(frozen=True)
class _Stored:
    path: Path
    dtype: str  # our dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `path`
    nbytes: int


def _stored_tensors(model_dir: Path) -> dict[str, _Stored]:
    """name -> where its data lies, in file order (shards in order, tensors by offset)."""
    out: dict[str, _Stored] = {}
    for path in checkpoint_files(model_dir):
        header, data_start = _read_header(path)
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_TO_NAME:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            out[name] = _Stored(path, _ST_TO_NAME[info["dtype"]], tuple(info["shape"]), data_start + begin, end - begin)
    return out


def read_checkpoint(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a model dir as read-only memory-mapped numpy arrays (bf16 as ml_dtypes),
    in file order."""
    maps: dict[Path, np.memmap] = {}
    out = {}
    for name, st in _stored_tensors(Path(model_dir)).items():
        if st.path not in maps:
            maps[st.path] = np.memmap(st.path, dtype=np.uint8, mode="r")
        raw = maps[st.path][st.offset : st.offset + st.nbytes]
        out[name] = raw.view(_DTYPES[st.dtype][1]).reshape(st.shape)
    return out


def _plan_shards(tensors: Sequence[_Tensor], shard_size: int) -> list[list[_Tensor]]:
    """Greedy, in order, like transformers' shard_checkpoint: a new shard when the next tensor would
    overflow the current one; a tensor bigger than shard_size gets a shard of its own."""
    shards: list[list[_Tensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def _write_weights(out_dir: Path, tensors: Sequence[_Tensor], shard_size: int | None, workers: int) -> list[Path]:
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    if shard_size is None:
        path = out_dir / "model.safetensors"
        _write_safetensors(path, tensors, workers)
        return [path]
    shard_size = parse_size(shard_size)
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    shards = _plan_shards(tensors, shard_size)
    n = len(shards)
    paths, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        path = out_dir / f"model-{k:05d}-of-{n:05d}.safetensors"
        _write_safetensors(path, shard, workers)
        paths.append(path)
        weight_map.update({t.name: path.name for t in shard})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out_dir / "model.safetensors.index.json", index)
    return paths


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# config files


def model_config(shape: ModelShape, dtype: str) -> dict:
    cfg: dict[str, object] = {
        "architectures": [shape.architecture],
        "model_type": shape.model_type,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6 if shape.qkv_bias else 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": shape.tied_embeddings,
        "torch_dtype": _dtype_name(dtype),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "initializer_range": WEIGHT_STD,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if shape.qkv_bias:
        cfg.update(use_sliding_window=False, sliding_window=MAX_POSITIONS, max_window_layers=shape.layers)
    else:
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return cfg


def _generation_config() -> dict:
    return {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _shape_from_config(cfg: dict) -> ModelShape:
    return ModelShape(
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        vocab=cfg["vocab_size"],
        qkv_bias=cfg.get("model_type") == "qwen2",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------------------------
# tokenizer

_META = "\u2581"  # sentencepiece's word-boundary marker
_COMMON_WORDS = """the of and to in is was that for it as with he be on by at his are this from
have not or had but an which one were they all you her she there been has we their would more
if will can who so what when no my out up about into them some time could him only other then
than its now two may over new first these any also like after where most our made way between
many before did through years much even should because each those people how work world day
good me year state long use still great must just down own see here might make life being
under never same another while last know us back part few also number very place little while
model data text merge layer weight token train learn code math chat answer question hello
""".split()
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _synthetic_words() -> Iterator[str]:
    seen: set[str] = set()
    for w in _COMMON_WORDS:
        if w not in seen:
            seen.add(w)
            yield w
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    for n in itertools.count(1):
        for parts in itertools.product(syllables, repeat=n):
            w = "".join(parts)
            if w not in seen:
                yield w


def _vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary of exactly `vocab_size` tokens: specials, the metaspace marker, printable
    ASCII characters, then whole-word prefixes built by merge chains ("▁t"+"h" -> "▁th", ...).
    Deterministic and prefix-stable: a larger vocab extends a smaller one with the same ids."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    merges: list[tuple[str, str]] = []
    alphabet = [_META] + list(string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation)
    for ch in alphabet:
        if len(tokens) == vocab_size:
            break
        tokens.append(ch)
    known = set(tokens)
    if len(tokens) < vocab_size:
        for word in _synthetic_words():
            piece = _META
            for ch in word:
                nxt = piece + ch
                if nxt not in known:
                    merges.append((piece, ch))
                    tokens.append(nxt)
                    known.add(nxt)
                    if len(tokens) == vocab_size:
                        break
                piece = nxt
            if len(tokens) == vocab_size:
                break
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer(vocab_size: int):
    """A small working `tokenizers.Tokenizer` (BPE with metaspace, Llama-like) of exactly
    `vocab_size` tokens; unknown characters map to <unk>, <s> is prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _vocab_and_merges(vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS[UNK_ID], fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="first")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:  # pragma: no cover
        raise AssertionError("tokenizer vocabulary size mismatch")
    return tok


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int) -> None:
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    unk, bos, eos = SPECIAL_TOKENS
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": added,
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": unk,
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos, "unk_token": unk})


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------
# public API


def make_base(
    out_dir: str | os.PathLike,
    shape: ModelShape,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_size: int | str | None = None,
    tokenizer: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a random base model of `shape` into `out_dir` (created if needed); returns it."""
    dtype = _dtype_name(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def maker(name: str, kind: str) -> Callable[[int, int, np.ndarray, np.ndarray], None]:
        std, mean = {"weight": (WEIGHT_STD, 0.0), "norm": (NORM_NOISE, 1.0), "bias": (BIAS_STD, 0.0)}[kind]

        def fill(start: int, stop: int, z: np.ndarray, scratch: np.ndarray) -> None:
            _gaussian(seed, _ROLE_BASE, name, start, z)
            z *= np.float32(std)
            if mean:
                z += np.float32(mean)

        return fill

    tensors = [_Tensor(name, s, dtype, maker(name, kind)) for name, s, kind in tensor_specs(shape)]
    _write_weights(out, tensors, shard_size, _workers(workers))
    _write_json(out / "config.json", model_config(shape, dtype))
    _write_json(out / "generation_config.json", _generation_config())
    for f in _TOKENIZER_FILES:
        (out / f).unlink(missing_ok=True)
    if tokenizer:
        write_tokenizer(out, shape.vocab)
    return out


def make_finetune(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    delta_scale: float = 0.002,
    emphasis: str | None = None,
    shard_size: int | str | None = None,
    dtype: str | None = None,
    vocab: int | None = None,
    emphasis_factor: float = 5.0,
    workers: int | None = None,
) -> Path:
    """Write `base + task vector` into `out_dir`; returns it.

    The task vector is N(0, delta_scale) on every tensor plus, when `emphasis` is "attention" or
    "mlp", an extra N(0, emphasis_factor * delta_scale) on that module kind's tensors. `dtype`
    defaults to the base's. `vocab` (>= the base's) adds embedding / lm_head rows ~ N(0, 0.02),
    updates config vocab_size and extends the tokenizer (same ids for the base's tokens).
    Config, generation config and tokenizer files are otherwise copied from the base.
    """
    if emphasis not in (None, "attention", "mlp"):
        raise ValueError(f"emphasis must be None, 'attention' or 'mlp', not {emphasis!r}")
    base, out = Path(base_dir), Path(out_dir)
    if base.resolve() == out.resolve():
        raise ValueError("out_dir must differ from base_dir")
    cfg = json.loads((base / "config.json").read_text())
    stored = _stored_tensors(base)
    base_vocab = int(cfg["vocab_size"])
    new_vocab = base_vocab if vocab is None else int(vocab)
    if new_vocab < base_vocab:
        raise ValueError(f"vocab ({new_vocab}) must be >= the base's ({base_vocab})")
    base_dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if base_dtype is None:
        base_dtype = next(iter(stored.values())).dtype
    out_dtype = _dtype_name(dtype if dtype is not None else base_dtype)
    out.mkdir(parents=True, exist_ok=True)
    fds: dict[Path, int] = {}

    def maker(name: str, src: _Stored) -> Callable[[int, int, np.ndarray, np.ndarray], None]:
        std = float(delta_scale)
        if emphasis is not None and module_kind(name) == emphasis:
            std = float(np.hypot(delta_scale, emphasis_factor * delta_scale))
        src_dtype = _DTYPES[src.dtype][1]
        n_src = src.nbytes // src_dtype.itemsize
        fd = fds[src.path]

        def fill(start: int, stop: int, z: np.ndarray, scratch: np.ndarray) -> None:
            _gaussian(seed, _ROLE_FINETUNE, name, start, z)
            k = max(0, min(stop, n_src) - start)  # leading elements that exist in the base
            if k:
                raw = scratch[: k * src_dtype.itemsize]
                _pread_into(fd, raw, src.offset + start * src_dtype.itemsize)
                head = z[:k]
                head *= np.float32(std)
                np.add(head, raw.view(src_dtype), out=head)
            if k < stop - start:  # new vocabulary rows
                z[k:] *= np.float32(WEIGHT_STD)

        return fill

    try:
        tensors = []
        for name, src in stored.items():
            if src.path not in fds:
                fds[src.path] = os.open(src.path, os.O_RDONLY)
            shape = src.shape
            if new_vocab != base_vocab and name in ("model.embed_tokens.weight", "lm_head.weight"):
                shape = (new_vocab, *shape[1:])
            tensors.append(_Tensor(name, tuple(shape), out_dtype, maker(name, src)))
        _write_weights(out, tensors, shard_size, _workers(workers))
    finally:
        for fd in fds.values():
            os.close(fd)

    if new_vocab == base_vocab and out_dtype == cfg.get("torch_dtype"):
        shutil.copyfile(base / "config.json", out / "config.json")
    else:
        cfg["vocab_size"] = new_vocab
        cfg["torch_dtype"] = out_dtype
        cfg.pop("dtype", None)
        _write_json(out / "config.json", cfg)
    for f in ("generation_config.json",):
        if (base / f).exists():
            shutil.copyfile(base / f, out / f)
    for f in _TOKENIZER_FILES:
        (out / f).unlink(missing_ok=True)
    if (base / "tokenizer.json").exists():
        if new_vocab == base_vocab:
            for f in _TOKENIZER_FILES:
                if (base / f).exists():
                    shutil.copyfile(base / f, out / f)
        else:
            write_tokenizer(out, new_vocab)
    return out


def make_family(
    root: str | os.PathLike,
    shape: ModelShape,
    *,
    n_finetunes: int = 3,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_size: int | str | None = None,
    emphases: Sequence[str | None] | None = None,
    **kw,
) -> tuple[Path, list[Path]]:
    """root/base plus root/ft1..ftN; emphasis cycles attention, mlp, None unless `emphases` is
    given. Fine-tune i uses seed `seed * 1000 + i`. `tokenizer` and `workers` in `kw` go to
    make_base; the rest of `kw` (delta_scale, emphasis_factor, vocab, workers) to make_finetune."""
    root = Path(root)
    cycle = ("attention", "mlp", None)
    base_kw = {k: kw.pop(k) for k in ("tokenizer",) if k in kw}
    if "workers" in kw:
        base_kw["workers"] = kw["workers"]
    base = make_base(root / "base", shape, dtype=dtype, seed=seed, shard_size=shard_size, **base_kw)
    fts = []
    for i in range(1, n_finetunes + 1):
        emph = emphases[i - 1] if emphases is not None else cycle[(i - 1) % len(cycle)]
        fts.append(
            make_finetune(base, root / f"ft{i}", seed=seed * 1000 + i, emphasis=emph, shard_size=shard_size, **kw)
        )
    return base, fts


# --------------------------------------------------------------------------------------------
# CLI


def _dir_size(d: Path) -> tuple[int, int]:
    files = [p for p in d.iterdir() if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="synth_checkpoints.py",
        description="Generate a synthetic Llama-family checkpoint family (OUT_DIR/base and "
        "OUT_DIR/ft1..ftN) as Hugging Face model directories, offline and deterministically.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to create base/ and ft*/ in")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model shape: tiny (hidden 64, 2 layers, vocab 256), 0.5b (hidden 2048, 8 layers, "
        "~0.48B params, ~0.97 GB bf16), 70b (Llama-70B-sized layers, 2 of them, ~2.2B params)",
    )
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--finetunes", type=int, default=3, help="number of fine-tunes (emphasis cycles attention, mlp, none)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="storage dtype")
    p.add_argument("--qkv-bias", action="store_true", help="Qwen2-style q/k/v biases (Qwen2ForCausalLM)")
    p.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (no lm_head.weight)")
    p.add_argument(
        "--shard-size",
        default=None,
        help="write HF-style shards of at most this size (e.g. 2GB = 2e9 bytes, 512MiB) plus "
        "model.safetensors.index.json; default: a single model.safetensors",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed; fine-tune i uses seed*1000+i")
    p.add_argument("--delta-scale", type=float, default=0.002, help="std of the fine-tunes' dense task-vector delta")
    p.add_argument(
        "--emphasis-factor", type=float, default=5.0, help="emphasized module kind gets an extra delta of this times delta-scale"
    )
    p.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer")
    p.add_argument("--workers", type=int, default=None, help="generator threads (default: the available cores, at most 8)")
    a = p.parse_args(argv)

    shape = PRESETS[a.preset]
    if a.layers is not None:
        shape = replace(shape, layers=a.layers)
    if a.vocab is not None:
        shape = replace(shape, vocab=a.vocab)
    shape = replace(shape, qkv_bias=a.qkv_bias, tied_embeddings=a.tied)
    shard_size = parse_size(a.shard_size) if a.shard_size else None

    print(f"{shape.architecture}: {shape} = {shape.n_params / 1e6:.1f}M params, {a.dtype}", flush=True)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    base = make_base(
        a.out_dir / "base", shape, dtype=a.dtype, seed=a.seed, shard_size=shard_size,
        tokenizer=not a.no_tokenizer, workers=a.workers,
    )
    written = []

    def report(d: Path, t_start: float, what: str) -> None:
        n, size = _dir_size(d)
        written.append(size)
        print(f"  {d}  [{what}]  {n} files, {_fmt_bytes(size)}, {time.perf_counter() - t_start:.1f}s", flush=True)

    report(base, t0, "base")
    cycle = ("attention", "mlp", None)
    for i in range(1, a.finetunes + 1):
        emph = cycle[(i - 1) % 3]
        t0 = time.perf_counter()
        ft = make_finetune(
            base, a.out_dir / f"ft{i}", seed=a.seed * 1000 + i, delta_scale=a.delta_scale, emphasis=emph,
            emphasis_factor=a.emphasis_factor, shard_size=shard_size, workers=a.workers,
        )
        report(ft, t0, f"fine-tune, emphasis={emph or 'none'}")
    print(f"total {_fmt_bytes(sum(written))} in {time.perf_counter() - t_all:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
