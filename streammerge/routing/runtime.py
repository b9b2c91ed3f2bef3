"""What the router and the routed model share: torch and transformers, devices and dtypes, the
cached export of the merged model, prompt encoding and the router's features.

The merged (static) model of a routing store is exported once into the store itself,
`job.zarr/inference/merged/` (a plain Hugging Face directory), with `inference/merged.json`
naming the store manifest digest it was exported from; a store rebuilt since is re-exported.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

from ..errors import StreammergeError
from ..fsutil import memory_available
from ..limits import DOCUMENT, read_json
from ..store.store import Store, atomic_write

INFERENCE_DIR = "inference"
MERGED_DIR = "merged"


@functools.cache  # called in every routed module's forward: the imports once (a failure is not cached)
def require_torch():
    """torch and transformers, or a one-line error saying how to get them."""
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - both are installed in the test environment
        raise StreammergeError(
            f"routing needs torch and transformers ({e.name} is missing): pip install torch transformers"
        ) from None
    return torch, transformers


def resolve_device(device=None):
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or a torch.device."""
    torch, _ = require_torch()
    if isinstance(device, torch.device):
        dev = device
    else:
        text = "auto" if device is None else str(device).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise StreammergeError(f"device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreammergeError(f"device {device}: CUDA is not available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StreammergeError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    require_torch()  # a clear error where torch is missing
    from ..dtypes import torch_dtype as by_name

    return by_name(name)


def store_dtype_name(store: Store) -> str:
    """The dtype most of the store's tensors have (the merged export's)."""
    counts: dict[str, int] = {}
    for t in store.tensors:
        counts[t["dtype"]] = counts.get(t["dtype"], 0) + 1
    return max(sorted(counts), key=lambda k: counts[k]) if counts else "float32"


def resolve_dtype(dtype, device, store: Store):
    """Compute dtype: 'auto' is float32 on CPU (bf16 matmuls are slow there) and the store's
    dtype elsewhere. Routed weights are rounded to the store's dtype first either way, so their
    values are those of `export --variant task:NAME`."""
    torch, _ = require_torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype is None else str(dtype).strip().lower()
    if name == "auto":
        name = "float32" if device.type == "cpu" else store_dtype_name(store)
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
    if name not in TORCH_DTYPE_NAMES:
        raise StreammergeError(f"dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return torch_dtype(name)


# ---- the store's method and the merged model -----------------------------------------------


def open_routing_store(path) -> tuple[Store, dict]:
    """The store and its method.json (a mediator or 1bit store, fully built)."""
    from ..export.variants import load_decision

    store = Store.open(Path(path))
    if not (store.path / "method.json").is_file():
        raise StreammergeError(
            f"{store.path}: routing needs a mediator or 1bit store (this one was built with {store.manifest['method']})"
        )
    method = load_decision(store)
    if method.get("method") not in ("mediator", "1bit"):
        raise StreammergeError(f"{store.path}: method.json names {method.get('method')!r}; routing needs mediator or 1bit")
    if not store.is_complete():
        done, total = store.progress()
        raise StreammergeError(
            f"{store.path}: build is not finished ({done}/{total} merge blocks); run `streammerge build` again to complete it"
        )
    return store, method


def inference_dir(store: Store) -> Path:
    return store.path / INFERENCE_DIR


def ensure_merged_export(store: Store, workers: int = 2) -> Path:
    """`job.zarr/inference/merged/`: the merged variant exported once (again if the store changed)."""
    from ..export.variants import export_variant

    d = inference_dir(store)
    out = d / MERGED_DIR
    stamp = d / f"{MERGED_DIR}.json"
    if out.is_dir() and stamp.is_file():
        try:
            if read_json(stamp, DOCUMENT.named(stamp.name)).get("store_digest") == store.digest:
                return out
        except (StreammergeError, AttributeError):
            pass  # rewritten below
    d.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    export_variant(store, out, "merged", overwrite=True, workers=workers, progress=False)
    atomic_write(stamp, json.dumps({"store_digest": store.digest, "variant": "merged"}, indent=1).encode())
    return out


# the share of the memory still free after loading that `--memory-budget auto` adds to what the
# model and the encodings take: most of a GPU (activations and the libraries' workspaces live
# outside the budget), half of a machine's RAM (other processes share it)
AUTO_SHARE = {"cuda": 0.8, "cpu": 0.5}


def resolve_budget(memory_budget: int | str | None, fixed: int, device) -> tuple[int | None, str | None]:
    """(bytes or None, how an automatic budget was chosen) of a --memory-budget value: a size,
    None or "none" (no budget), or "auto" (`auto_budget` of the `fixed` bytes loaded already)."""
    if memory_budget == "auto":
        return auto_budget(fixed, device)
    return (None if memory_budget == "none" else memory_budget), None


def auto_budget(fixed: int, device) -> tuple[int | None, str]:
    """(budget, how it was chosen): `fixed` (the model, the encodings and the row plan, loaded
    already) plus AUTO_SHARE of the device's free memory now; (None, why) where that is unknown."""
    free = free_memory(device)
    if free is None:
        return None, f"memory budget auto: the free memory of {device} is unknown, so none (no cache, no KV limit)"
    share = AUTO_SHARE.get(device.type, AUTO_SHARE["cpu"])
    budget = fixed + int(share * free)
    return budget, (f"memory budget auto: {budget / 2**30:.2f} GiB = the model, the encodings and the row plan "
                    f"({fixed / 2**30:.2f} GiB) + {share:.0%} of the {free / 2**30:.2f} GiB free on {device}")


def free_memory(device) -> int | None:
    """Bytes free on `device` now: CUDA's free memory, or what this process may still fill on
    the machine (fsutil.memory_available: MemAvailable, or a lower memory cgroup limit); None
    where unknown."""
    torch = require_torch()[0]
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    return memory_available()


def load_merged_model(store: Store, device, dtype):
    """(model, tokenizer): the merged model on `device` in `dtype`, and the base's tokenizer
    (from `job.zarr/hf/`), set up for batched generation."""
    torch, transformers = require_torch()
    path = ensure_merged_export(store)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise StreammergeError(f"{path}: transformers cannot load the merged model ({_one_line(e)})") from None
    model.to(device)
    model.eval()
    tok = load_tokenizer(store)
    return model, tok


def load_tokenizer(store: Store):
    _, transformers = require_torch()
    hf = store.path / "hf"
    if not (hf / "tokenizer.json").is_file() and not (hf / "tokenizer.model").is_file() and not (hf / "vocab.json").is_file():
        raise StreammergeError(f"{hf}: no tokenizer files (the base model had none); routing needs the base's tokenizer")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    except (OSError, ValueError, KeyError) as e:
        raise StreammergeError(f"{hf}: cannot load the tokenizer ({_one_line(e)})") from None
    return tok


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def eos_ids(model, tok) -> set[int]:
    """Every id that ends a generation: the generation config's, the model config's and the
    tokenizer's eos_token_id (each an int or a list)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tok):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def pad_id(tok) -> int:
    """The id padding uses: pad, else eos, else unk, else 0 (padding is always masked)."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def encode_for_features(tok, prompts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of the raw prompts (with the tokenizer's special tokens, no chat template):
    what the router sees, at fit time and at inference alike."""
    out = []
    for p in prompts:
        ids = list(tok(p, add_special_tokens=True)["input_ids"])
        if max_tokens:
            ids = ids[:max_tokens]
        if not ids:
            raise StreammergeError(f"prompt {p[:40]!r} has no tokens")
        out.append(ids)
    return out


def encode_for_generation(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids the model generates from: the chat template when the tokenizer has one (one
    user message, generation prompt added), else the raw prompt with special tokens."""
    if getattr(tok, "chat_template", None):
        out = []
        for p in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
        return out
    return [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, side: str, device):
    """(input_ids, attention_mask) long tensors, padded on `side`."""
    torch, _ = require_torch()
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


# What one more forward costs, in padded tokens' worth of compute: on this project's 2-core CPU a
# forward of the 5M-parameter serving model costs ~2.4 ms plus ~0.047 ms a token (50 tokens); a
# larger model raises the per-token cost, so 64 overstates the overhead there and splits less. On a
# GPU a forward of a few thousand tokens is bound by its launches, not by padding.
BATCH_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 4096}


def length_batches(lengths: Sequence[int], max_rows: int, overhead: int) -> list[list[int]]:
    """Indices of `lengths` in batches for right-padded forwards: sorted by length, then cut where
    the padded tokens saved pay for another forward (each batch costs `overhead` plus its rows
    times its longest length; exact over contiguous runs of the sorted order, at most `max_rows`
    a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n, rows = len(order), max(1, int(max_rows))
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - rows), j):
            c = best[i] + overhead + longest * (j - i)
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def mean_hidden_features(model, seqs: Sequence[Sequence[int]], pad: int, batch_size: int = 16):
    """Router features: the mean over positions of the last hidden state (after the final norm)
    of `model`, one row per sequence, float32 on the model's device. Sequences are batched by
    length (length_batches: at most `batch_size` a batch), right-padded, and padding is excluded
    from the mean."""
    torch, _ = require_torch()
    device = next(model.parameters()).device
    overhead = BATCH_OVERHEAD_TOKENS.get(device.type, BATCH_OVERHEAD_TOKENS["cuda"])
    rows: dict[int, object] = {}
    inner = model.base_model
    with torch.inference_mode():
        for idx in length_batches([len(s) for s in seqs], batch_size, overhead):
            ids, mask = pad_batch([seqs[i] for i in idx], pad, "right", device)
            h = inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
            m = mask.unsqueeze(-1).to(h.dtype)
            feat = (h * m).sum(dim=1) / m.sum(dim=1)
            for j, i in enumerate(idx):
                rows[i] = feat[j]
    if not rows:
        return torch.zeros((0, model.config.hidden_size), dtype=torch.float32, device=device)
    return torch.stack([rows[i] for i in range(len(seqs))])

