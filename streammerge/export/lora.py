"""LoRA adapters out of a fine-tune: its task vectors factored into a PEFT adapter, out of core.

For every targeted weight W (out x in), the task vector delta = W_finetune - W_base is
approximated by B @ A (B: out x r, A: r x in) with a randomized SVD (Halko, Martinsson & Tropp
2011, range finder with power iterations, their algorithms 4.4 and 5.1). Each of its products
with delta streams delta's row blocks, read from both checkpoints as any merge reads them, so
memory holds the (out + in) x (r + oversampling) sketches and one row block, never delta
itself: a 70B layer's MLP weight costs what its sketches cost. The passes over delta: one for
the range, two per power iteration, one to project, one to measure the error, and all of them
read the inputs again (from the page cache when it holds them).

The error of each tensor, ||delta - B A||_F / ||delta||_F, is measured exactly in the last
pass and written beside the adapter (`extraction.json`), and printed.

The adapter is what `peft` saves: `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` / `lora_B.weight` (singular values split as their
square roots between A and B, as mergekit-extract-lora does) and `adapter_config.json` with
lora_alpha = r, so the scaling is 1; tensors given a smaller rank by `sv_epsilon` are listed in
rank_pattern and alpha_pattern. Embeddings, lm_head and 1-D weights (norms) are not factored: when
they changed they are saved whole as `modules_to_save` (`modules_to_save="keep"`), again as
mergekit does by default, or left out (`"drop"`): vLLM and SGLang load only adapters without
modules_to_save (vllm-project/vllm#9280). What an adapter does not carry (dropped tensors, and
biases either way: bias "none") is reported with its task vector's norm, so the loss is known.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import __version__
from ..checkpoints import open_model
from ..checkpoints.blocks import read_rows
from ..dtypes import is_float_st
from ..errors import StreammergeError
from ..fsutil import publish_dir, remove_stale_temps, staging_dir
from ..geometry import numel, row_elems
from ..workspace import thread_buffer
from .safetensors_writer import ShardedWriter, TensorSpec

OVERSAMPLE = 8  # extra sketch columns: the range finder's error bound falls fast with them
POWER_ITERATIONS = 2  # each sharpens the sketch's spectrum (s_i^(2q+1)); two suffice for task vectors
BLOCK_ELEMS = 1 << 22  # elements per row block read (4 Mi: 16 MiB of float32 per input)
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|lm_head|embed_out|output)\.weight$")

MODULES_TO_SAVE = ("keep", "drop")  # what becomes of changed tensors that are not factored

RowBlocks = Callable[[], Iterator[tuple[int, int, np.ndarray]]]


@dataclass(frozen=True)
class LowRank:
    a: np.ndarray  # rank x in, float32
    b: np.ndarray  # out x rank, float32
    singular_values: np.ndarray  # the kept ones, descending
    rel_error: float  # ||delta - b @ a||_F / ||delta||_F (0 for a zero delta)
    delta_norm: float  # ||delta||_F


def _orth(y: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(y, mode="reduced")
    return q


def streamed_low_rank(blocks: RowBlocks, shape: tuple[int, int], rank: int, rng: np.random.Generator,
                      sv_epsilon: float = 0.0, power_iterations: int = POWER_ITERATIONS) -> LowRank:
    """Rank-`rank` factors of the matrix whose row blocks `blocks()` yields as (r0, r1, rows),
    in order, anew at every call (one call per pass). Sketches are float64; each block's product
    is taken in float32 and accumulated in float64."""
    m, n = shape
    k = min(rank + OVERSAMPLE, m, n)
    omega = rng.standard_normal((n, k)).astype(np.float32)
    y = np.empty((m, k), np.float64)
    for r0, r1, d in blocks():
        y[r0:r1] = d @ omega
    for _ in range(power_iterations):
        q = _orth(y).astype(np.float32)
        z = np.zeros((n, k), np.float64)
        for r0, r1, d in blocks():
            z += d.T @ q[r0:r1]
        z = _orth(z).astype(np.float32)
        for r0, r1, d in blocks():
            y[r0:r1] = d @ z
    q = _orth(y)
    q32 = q.astype(np.float32)
    proj = np.zeros((k, n), np.float64)
    for r0, r1, d in blocks():
        proj += q32[r0:r1].T @ d
    ub, s, vt = np.linalg.svd(proj, full_matrices=False)
    r = min(rank, int(s.size))
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    r = max(r, 1)  # PEFT has no rank-0 module; a zero delta gives zero factors
    root = np.sqrt(s[:r])
    b = ((q @ ub[:, :r]) * root).astype(np.float32)
    a = (root[:, None] * vt[:r]).astype(np.float32)
    err2 = norm2 = 0.0
    for r0, r1, d in blocks():
        norm2 += float(np.square(d, dtype=np.float64).sum())
        err2 += float(np.square(d - b[r0:r1] @ a, dtype=np.float64).sum())
    return LowRank(a, b, s[:r].astype(np.float32), float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0,
                   float(np.sqrt(norm2)))


def delta_norm(blocks: RowBlocks) -> float:
    """||delta||_F of the matrix `blocks()` yields, summed in float64."""
    return float(np.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for _r0, _r1, d in blocks())))


def _delta_blocks(ft, base, rows_per_block: int) -> RowBlocks:
    m, cols = ft.shape[0], row_elems(ft.shape)

    def blocks():
        # one buffer pair per thread for every tensor: a source's own would stay touched until the end
        buf_ft = thread_buffer(("export.lora", "ft"), rows_per_block * cols, at_least=BLOCK_ELEMS)
        buf_base = thread_buffer(("export.lora", "base"), rows_per_block * cols, at_least=BLOCK_ELEMS)
        for r0 in range(0, m, rows_per_block):
            r1 = min(m, r0 + rows_per_block)
            d = read_rows(ft, r0, r1, buf_ft).reshape(r1 - r0, cols)
            d -= read_rows(base, r0, r1, buf_base).reshape(r1 - r0, cols)
            yield r0, r1, d

    return blocks


def _row_blocks(h, rows_per_block: int) -> RowBlocks:
    m, cols = h.shape[0], row_elems(h.shape)

    def blocks():
        buf = thread_buffer(("export.lora", "target"), rows_per_block * cols, at_least=BLOCK_ELEMS)
        for r0 in range(0, m, rows_per_block):
            r1 = min(m, r0 + rows_per_block)
            yield r0, r1, read_rows(h, r0, r1, buf).reshape(r1 - r0, cols)

    return blocks


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class DeltaSource:
    """One tensor's task vector and the target tensor itself (for modules_to_save), each as row
    blocks (r0, r1, float32 rows reshaped (r1 - r0, -1)), re-iterable."""

    name: str
    shape: tuple[int, ...]
    blocks: RowBlocks
    target: RowBlocks


@dataclass(frozen=True)
class WholeTensor:
    """A tensor an adapter saves whole, written block by block (never held) in float32."""

    shape: tuple[int, ...]
    blocks: RowBlocks


def factor_into_adapter(sources: list[DeltaSource], rank: int, base_name: str, model_tensors, *,
                        modules_to_save: str = "keep", sv_epsilon: float = 0.0, seed: int = 0,
                        progress=None) -> tuple[dict, dict, dict]:
    """(adapter tensors, adapter_config, per-tensor report) for the task vectors of `sources`:
    2-D weights but embeddings factored at rank <= `rank`; the other weights whose task vector is
    not zero (embeddings, lm_head, 1-D) saved whole (modules_to_save "keep") or dropped ("drop");
    changed biases dropped either way (the config says bias "none", what engines serve). Every
    changed tensor's report has its `delta_norm`; a dropped one's rel_error is 1. `model_tensors`
    names every tensor of the model the adapter is for (see `_targets`)."""
    if modules_to_save not in MODULES_TO_SAVE:
        raise StreammergeError(f"--modules-to-save {modules_to_save}: use {' or '.join(MODULES_TO_SAVE)}")
    tensors: dict[str, np.ndarray | WholeTensor] = {}
    report: dict[str, dict] = {}
    ranks: dict[str, int] = {}
    saved: set[str] = set()
    bar = _bar(progress, len(sources))
    for src in sources:
        module = src.name[: -len(".weight")] if src.name.endswith(".weight") else src.name
        if factored(src.name, src.shape):
            rng = np.random.default_rng(_seed_for(src.name, seed))
            lr = streamed_low_rank(src.blocks, tuple(src.shape), rank, rng, sv_epsilon)
            tensors[f"base_model.model.{module}.lora_A.weight"] = lr.a
            tensors[f"base_model.model.{module}.lora_B.weight"] = lr.b
            ranks[module] = lr.a.shape[0]
            report[src.name] = {"rank": lr.a.shape[0], "rel_error": lr.rel_error,
                                "top_singular_value": float(lr.singular_values[0]), "delta_norm": lr.delta_norm}
        elif norm := delta_norm(src.blocks):
            if modules_to_save == "keep" and src.name.endswith(".weight"):
                tensors[f"base_model.model.{module}.weight"] = WholeTensor(tuple(src.shape), src.target)
                saved.add(module)  # full names: peft wants weights for every module a leaf name would match
                report[src.name] = {"rank": None, "saved_whole": True, "delta_norm": norm}
            else:
                report[src.name] = {"rank": None, "dropped": True, "rel_error": 1.0, "delta_norm": norm}
        bar.update(1)
    bar.close()
    max_rank = max(ranks.values(), default=rank)
    pattern = {m: r for m, r in ranks.items() if r != max_rank}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        "task_type": "CAUSAL_LM",
        "r": max_rank,
        "lora_alpha": max_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": _targets(set(ranks), model_tensors),
        "modules_to_save": sorted(saved) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    return tensors, config, report


def factored(name: str, shape) -> bool:
    """Whether a tensor's task vector becomes LoRA factors: 2-D weights but embeddings and lm_head."""
    return len(shape) == 2 and name.endswith(".weight") and not EMBEDDING.search(name)


def dropped_share(report: dict) -> float:
    """||dropped tensors' task vectors|| / ||all reported task vectors||: the fraction of the
    task vector's norm the adapter does not carry at all (its factors' error aside)."""
    total = sum(t.get("delta_norm", 0.0) ** 2 for t in report.values())
    lost = sum(t["delta_norm"] ** 2 for t in report.values() if t.get("dropped"))
    return float(np.sqrt(lost / total)) if total else 0.0


def _targets(factored: set[str], model_tensors) -> list[str]:
    """PEFT target_modules: a leaf name (q_proj) where every module of the model with that leaf
    is factored, as engines expect; the factored modules' full names for a leaf some modules of
    which are not (a leaf name would give those modules LoRA layers the adapter has no weights for)."""
    modules: dict[str, set[str]] = {}
    for name in model_tensors:
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            modules.setdefault(module.rsplit(".", 1)[-1], set()).add(module)
    out: set[str] = set()
    for leaf in {m.rsplit(".", 1)[-1] for m in factored}:
        mine = {m for m in factored if m.rsplit(".", 1)[-1] == leaf}
        out |= {leaf} if modules.get(leaf, set()) <= mine else mine
    return sorted(out)


def extract_lora(finetune: str, base: str, out: Path, rank: int, *, modules_to_save: str = "keep",
                 sv_epsilon: float = 0.0, include: list[str] = (), exclude: list[str] = (), seed: int = 0,
                 overwrite: bool = False, progress=None) -> dict:
    """Write a PEFT LoRA adapter approximating `finetune` - `base` into `out`; returns the report."""
    if rank < 1:
        raise StreammergeError(f"--rank {rank}: must be at least 1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise StreammergeError(f"{out}: already exists (use --overwrite to replace it)")
    ft_ck, base_ck = open_model(finetune), open_model(base)
    inc, exc = _regexes("--include", include), _regexes("--exclude", exclude)

    def wanted(name: str) -> bool:
        return (not inc or any(p.search(name) for p in inc)) and not any(p.search(name) for p in exc)

    sources = []
    for name, h in ft_ck.tensors.items():
        if not h.shape or not is_float_st(h.dtype) or not wanted(name):
            continue
        bh = base_ck.tensors.get(name)
        if bh is None:
            raise StreammergeError(f"{base_ck.directory}: tensor {name} of {finetune} is not in the base model")
        if tuple(bh.shape) != tuple(h.shape):
            raise StreammergeError(
                f"{ft_ck.directory}: tensor {name} is {list(h.shape)} but {list(bh.shape)} in the base model {base}"
            )
        rows = max(1, BLOCK_ELEMS // row_elems(h.shape))
        sources.append(DeltaSource(name, tuple(h.shape), _delta_blocks(h, bh, rows), _row_blocks(h, rows)))
    if not any(factored(s.name, s.shape) for s in sources):
        raise StreammergeError(f"{finetune}: no 2-D weight to extract (check --include / --exclude)")
    tensors, config, report = factor_into_adapter(sources, rank, base, ft_ck.tensors, modules_to_save=modules_to_save,
                                                  sv_epsilon=sv_epsilon, seed=seed, progress=progress)
    summary = {
        "streammerge_version": __version__,
        "finetune": finetune,
        "base": base,
        "rank": rank,
        "sv_epsilon": sv_epsilon,
        "seed": seed,
        "modules_to_save": modules_to_save,
        "dropped_share": dropped_share(report),
        "tensors": report,
    }
    _write_adapter(out, tensors, config, summary)
    return summary


def _regexes(flag: str, texts) -> list[re.Pattern]:
    out = []
    for text in texts:
        try:
            out.append(re.compile(text))
        except re.error as e:
            raise StreammergeError(f"{flag} {text!r}: not a regular expression ({e})") from None
    return out


def write_adapter_files(directory: Path, tensors: dict[str, np.ndarray | WholeTensor], config: dict,
                        summary: dict) -> None:
    """adapter_model.safetensors (float32; WholeTensor entries written block by block),
    adapter_config.json and extraction.json into `directory`."""
    specs = [TensorSpec(name, "F32", tuple(t.shape), 4 * numel(t.shape)) for name, t in tensors.items()]
    w = ShardedWriter(directory, specs, shard_size=1 << 62, metadata={"format": "pt"}, prefix="adapter_model")
    try:
        for name, t in tensors.items():
            if isinstance(t, WholeTensor):
                for r0, _r1, rows in t.blocks():
                    w.write(name, 4 * r0 * row_elems(t.shape), rows.astype(np.float32, copy=False))
            else:
                w.write(name, 0, t.astype(np.float32, copy=False))
    finally:
        w.finish()
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "extraction.json").write_text(json.dumps(summary, indent=1) + "\n")


def _write_adapter(out: Path, tensors: dict, config: dict, summary: dict) -> None:
    """Written under a hidden name beside `out`, renamed into place when complete (fsutil)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = staging_dir(out)
    tmp.mkdir()
    try:
        write_adapter_files(tmp, tensors, config, summary)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress, total: int):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="extract-lora", unit="tensor")
