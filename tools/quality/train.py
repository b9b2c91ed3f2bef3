"""Train the tokenizer, the base model (pretraining on the mixed corpus) and one expert per task
(full fine-tuning of every weight from the base), and cache them as Hugging Face checkpoints.

    ckpt/tokenizer/                 tokenizer.json, tokenizer_config.json, ...
    ckpt/base/ ckpt/<task>/         config.json, generation_config.json, model.safetensors (bf16), tokenizer
    ckpt/train.json                 the configuration, its hash, timings and losses

Models: LlamaForCausalLM from a LlamaConfig of `Config.shape`, untied embeddings. Pretraining:
packed documents of `block` tokens, next-token loss on every token, AdamW (0.9, 0.95) with
warm-up and a cosine decay to 10 %. Fine-tuning: (prompt, answer) examples, loss on the answer
and `</s>` only, the same optimiser at `ft_lr`, no weight decay. bf16 autocast on CUDA, float32
on CPU; weights saved in bf16 (what the merges read). Seeded: data order, initialisation and
the data themselves; on CUDA deterministic algorithms are requested, so a rerun on the same
kind of device gives the same checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import time
from pathlib import Path

from . import tasks as T
from .config import Config
from .tok import BOS, EOS, PAD, save_tokenizer, train_tokenizer


def log(msg: str, fh=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def setup_torch(device: str, seed: int):
    import torch

    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    return torch


def llama_config(cfg: Config):
    from transformers import LlamaConfig

    s = cfg.shape
    return LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        initializer_range=0.02,
    )


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(torch, model, lr: float, weight_decay: float, device: str):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kw = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def _autocast(torch, device: str):
    import contextlib

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save(model, tok_dir: Path, out: Path) -> None:
    import torch

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(tmp))
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# Training state saved every SAVE_EVERY seconds, so that a run cut off (the GPU machine's
# commands end at 10 minutes) resumes where it was: the larger configuration's pretraining does
# not fit one command. Tensors and plain values only (torch.load weights_only: no pickle).
SAVE_EVERY = 90.0


class Resumable:
    """`path`: the state of one training loop (model, optimiser, schedule, data-order generator,
    step, losses); saved atomically, loaded if present."""

    def __init__(self, path: Path):
        self.path, self.last = Path(path), time.perf_counter()

    def load(self, torch, model, opt, sched, gen) -> tuple[int, dict]:
        if not self.path.is_file():
            return 0, {}
        st = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        return st["step"], st["extra"]

    def maybe_save(self, torch, step: int, model, opt, sched, gen, extra: dict, force: bool = False) -> None:
        if not force and time.perf_counter() - self.last < SAVE_EVERY:
            return
        tmp = self.path.with_name(self.path.name + ".partial")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "step": step, "extra": extra}, tmp)
        tmp.replace(self.path)
        self.last = time.perf_counter()

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def _corpus(cfg: Config, root: Path, fh=None):
    """The tokenizer (trained, saved under root/tokenizer) and the packed pretraining blocks
    (n_blocks, block) int64; both cached in root, so a resumed pretraining skips them."""
    import numpy as np
    import torch

    tr = cfg.training
    tok_dir, cached = root / "tokenizer", root / "corpus.npy"
    if cached.is_file() and (tok_dir / "tokenizer.json").is_file():
        blocks = np.load(cached)
        log(f"corpus: {blocks.size} tokens, {blocks.shape[0]} blocks of {tr.block} (cached)", fh)
        return tok_dir, torch.from_numpy(blocks.astype(np.int64)), int(blocks.size)
    t0 = time.perf_counter()
    docs = T.corpus(tr.corpus_docs, cfg.difficulty, seed=tr.seed, task_share=tr.task_share, n_test=cfg.n_test)
    fast = train_tokenizer(docs, cfg.shape.vocab)
    save_tokenizer(fast, tok_dir, cfg.shape.max_positions)
    ids = [e.ids for e in fast.encode_batch(docs)]  # with <s>, as AutoTokenizer encodes (parallel)
    stream = [t for seq in ids for t in (*seq, EOS)]
    n_blocks = len(stream) // tr.block
    blocks = np.asarray(stream[: n_blocks * tr.block], dtype=np.int32).reshape(n_blocks, tr.block)
    np.save(root / "corpus.partial.npy", blocks)
    (root / "corpus.partial.npy").replace(cached)
    log(f"corpus: {len(docs)} documents, {len(stream)} tokens, {n_blocks} blocks of {tr.block} ({time.perf_counter() - t0:.1f} s)", fh)
    return tok_dir, torch.from_numpy(blocks.astype(np.int64)), len(stream)


def pretrain(cfg: Config, root: Path, device: str, fh=None) -> dict:
    torch = setup_torch(device, cfg.training.seed)
    from transformers import LlamaForCausalLM

    tr = cfg.training
    tok_dir, data, n_tokens = _corpus(cfg, root, fh)
    n_blocks = data.shape[0]

    model = LlamaForCausalLM(llama_config(cfg)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base model: {n_params / 1e6:.2f} M parameters on {device}", fh)
    opt = _optimizer(torch, model, tr.pretrain_lr, tr.weight_decay, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, tr.pretrain_steps, tr.warmup))
    gen = torch.Generator().manual_seed(tr.seed)
    order, pos = torch.randperm(n_blocks, generator=gen), 0
    state = Resumable(root / "pretrain.state.pt")
    start, extra = state.load(torch, model, opt, sched, gen)
    losses, secs = extra.get("losses", []), extra.get("seconds", 0.0)
    if start:
        order, pos = extra["order"], extra["pos"]
        log(f"pretraining resumed at step {start} ({secs:.1f} s done)", fh)
    data = data.to(device)
    t1 = time.perf_counter()
    model.train()
    for step in range(start, tr.pretrain_steps):
        if pos + tr.pretrain_batch > n_blocks:
            order, pos = torch.randperm(n_blocks, generator=gen), 0
        batch = data[order[pos : pos + tr.pretrain_batch].to(device)]
        pos += tr.pretrain_batch
        with _autocast(torch, device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == tr.pretrain_steps - 1:
            losses.append((step, loss.item()))
            if step % 500 == 0 or step == tr.pretrain_steps - 1:
                log(f"pretrain step {step}: loss {losses[-1][1]:.4f} ({secs + time.perf_counter() - t1:.1f} s)", fh)
        state.maybe_save(torch, step + 1, model, opt, sched, gen,
                         {"order": order, "pos": pos, "losses": losses, "seconds": secs + time.perf_counter() - t1})
    secs += time.perf_counter() - t1
    _save(model, tok_dir, root / "base")
    state.done()
    log(f"pretraining: {tr.pretrain_steps} steps in {secs:.1f} s ({1000 * secs / tr.pretrain_steps:.1f} ms/step)", fh)
    return {"params": n_params, "seconds": round(secs, 2), "losses": losses, "tokens": n_tokens}


def encode_pairs(tok, pairs):
    """[(prompt ids with <s>, answer ids + </s>)]: prompt and answer encoded apart, exactly as
    generation encodes the prompt."""
    p_ids = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    a_ids = tok([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return [(list(p), list(a) + [EOS]) for p, a in zip(p_ids, a_ids)]


def _sft_batch(torch, examples, device):
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def finetune(cfg: Config, task: str, root: Path, device: str, fh=None, lr: float | None = None, out: Path | None = None) -> dict:
    """Fine-tune the base on `task` at `lr` (default ft_lr) into `out` (default root/task)."""
    torch = setup_torch(device, cfg.training.seed + 1 + T.TASKS.index(task))
    lr = cfg.training.ft_lr if lr is None else lr
    out = root / task if out is None else out
    from transformers import AutoTokenizer, LlamaForCausalLM

    tr = cfg.training
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    exclude = {p for p, _ in T.test_set(task, cfg.n_test, cfg.difficulty)} if task != "facts" else set()
    pool = encode_pairs(tok, T.train_set(task, tr.ft_examples, cfg.difficulty, exclude, seed=tr.seed))
    model = LlamaForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).to(device)
    opt = _optimizer(torch, model, lr, 0.0, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, tr.ft_steps, tr.ft_warmup))
    gen = torch.Generator().manual_seed(tr.seed * 100 + T.TASKS.index(task))
    state = Resumable(out.with_name(out.name + ".state.pt"))
    start, extra = state.load(torch, model, opt, sched, gen)
    losses, secs = extra.get("losses", []), extra.get("seconds", 0.0)
    if start:
        log(f"fine-tune {task} resumed at step {start}", fh)
    t1 = time.perf_counter()
    model.train()
    for step in range(start, tr.ft_steps):
        idx = torch.randint(len(pool), (tr.ft_batch,), generator=gen).tolist()
        ids, labels, mask = _sft_batch(torch, [pool[i] for i in idx], device)
        with _autocast(torch, device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == tr.ft_steps - 1:
            losses.append((step, loss.item()))
        state.maybe_save(torch, step + 1, model, opt, sched, gen, {"losses": losses, "seconds": secs + time.perf_counter() - t1})
    secs += time.perf_counter() - t1
    _save(model, root / "tokenizer", out)
    state.done()
    log(f"fine-tune {task} (lr {lr:g}): {tr.ft_steps} steps in {secs:.1f} s, loss {losses[0][1]:.3f} -> {losses[-1][1]:.4f}", fh)
    return {"seconds": round(secs, 2), "losses": losses, "pool": len(pool), "lr": lr}


def _ft_job(cfg: Config, task: str, root: str, device: str, lr: float, out: str) -> dict:
    """One fine-tune and the expert's scores on every test set (a worker process on CUDA)."""
    import warnings

    import transformers

    from .evaluate import EvalSets, Memo, eval_model

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    done = Path(out + ".json")  # this expert is trained (a resumed run scores it again, cheaply)
    if done.is_file() and (Path(out) / "model.safetensors").is_file():
        info = json.loads(done.read_text())
    else:
        info = finetune(cfg, task, Path(root), device, lr=lr, out=Path(out))
        done.write_text(json.dumps(info) + "\n")
    from transformers import AutoTokenizer

    sets = EvalSets.make(cfg, AutoTokenizer.from_pretrained(out))
    res = eval_model(Path(out), sets, Memo(), device)
    info["acc"] = res["acc"]
    return info


def finetune_all(cfg: Config, root: Path, device: str, fh=None) -> dict:
    """Every expert at ft_lr, or at every candidate of ft_lrs then the selection (see config).
    On CUDA the fine-tunes run in parallel worker processes (each is launch-bound), which also
    score each expert on every test set; on CPU, one lr: one after the other, in process."""
    tr = cfg.training
    lrs = tr.ft_lrs or (tr.ft_lr,)
    if len(lrs) == 1 and not device.startswith("cuda"):
        return {"experts": {t: finetune(cfg, t, root, device, fh) for t in T.TASKS}}
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = [(t, lr) for lr in lrs for t in T.TASKS]
    outs = {(t, lr): root / t if len(lrs) == 1 else root / f"ft-lr{lr:g}" / t for t, lr in jobs}
    workers = len(jobs) if device.startswith("cuda") else 1
    results = {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_ft_job, cfg, t, str(root), device, lr, str(outs[t, lr])): (t, lr) for t, lr in jobs}
        for f in cf.as_completed(futs):
            t, lr = futs[f]
            results[t, lr] = f.result()
            log(f"fine-tune {t} (lr {lr:g}): {results[t, lr]['seconds']} s, own-task accuracy {100 * results[t, lr]['acc'][t]:.1f}", fh)
    if len(lrs) == 1:
        return {"experts": {t: results[t, lrs[0]] for t in T.TASKS}}
    own = {lr: sum(results[t, lr]["acc"][t] for t in T.TASKS) / len(T.TASKS) for lr in lrs}
    best = max(own.values())
    chosen = min(lr for lr in lrs if own[lr] >= 0.9 * best)
    log("fine-tune learning rates, mean own-task accuracy: " + ", ".join(f"{lr:g}: {100 * a:.1f}" for lr, a in own.items())
        + f" -> {chosen:g}", fh)
    for t in T.TASKS:
        shutil.rmtree(root / t, ignore_errors=True)
        shutil.copytree(outs[t, chosen], root / t)
    return {
        "experts": {t: results[t, chosen] for t in T.TASKS},
        "lr_selection": {"own_task_accuracy": {f"{lr:g}": a for lr, a in own.items()}, "chosen": chosen,
                         "scores": {f"{t}@{lr:g}": results[t, lr]["acc"] for t, lr in jobs},
                         "seconds": {f"{t}@{lr:g}": results[t, lr]["seconds"] for t, lr in jobs}},
    }


def cache_dir(cfg: Config, base: Path) -> Path:
    return Path(base) / f"{cfg.name}-{cfg.training_hash()}"


def is_trained(root: Path, cfg: Config) -> bool:
    stamp = root / "train.json"
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except ValueError:
        return False
    return info.get("hash") == cfg.training_hash() and all((root / m / "model.safetensors").is_file() for m in ("base", *T.TASKS))


def train_all(cfg: Config, root: Path, device: str, force: bool = False) -> dict:
    """Train (or find in the cache) the tokenizer, the base and every expert; returns train.json."""
    root = Path(root)
    if not force and is_trained(root, cfg):
        return json.loads((root / "train.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").unlink(missing_ok=True)
    with open(root / "train.log", "a") as fh:  # appended: a resumed run's lines follow the first's
        info = {"config": cfg.as_dict(), "hash": cfg.training_hash(), "device": describe_device(device)}
        done = root / "pretrain.json"  # the base is trained (a run cut off after it resumes with the experts)
        if done.is_file() and (root / "base" / "model.safetensors").is_file():
            info["pretrain"] = json.loads(done.read_text())
        else:
            info["pretrain"] = pretrain(cfg, root, device, fh)
            done.write_text(json.dumps(info["pretrain"]) + "\n")
        t1 = time.perf_counter()
        info["finetune"] = finetune_all(cfg, root, device, fh)
        info["finetune_seconds"] = round(time.perf_counter() - t1, 1)
        # pretraining's steps summed over the runs it took (the GPU machine's commands end at 10
        # minutes), plus this run's wall time after it (the fine-tunes)
        info["seconds"] = round(info["pretrain"]["seconds"] + time.perf_counter() - t1, 1)
        log(f"training done in {info['seconds']} s", fh)
    (root / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def describe_device(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


# ---- moving checkpoints between machines (one tar per model) -----------------------------


def pack(root: Path, out: Path) -> list[Path]:
    """One uncompressed tar per model directory, plus train.json, under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("base", *T.TASKS):
        dst = out / f"{name}.tar"
        with tarfile.open(dst, "w") as tf:
            tf.add(root / name, arcname=name)
        files.append(dst)
    shutil.copy2(root / "train.json", out / "train.json")
    files.append(out / "train.json")
    return files


def unpack(src: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("base", *T.TASKS):
        with tarfile.open(src / f"{name}.tar") as tf:
            tf.extractall(root, filter="data")
    shutil.copytree(root / "base", root / "tokenizer", dirs_exist_ok=True, ignore=lambda d, fs: [f for f in fs if not f.startswith(("tokenizer", "special"))])
    shutil.copy2(src / "train.json", root / "train.json")
