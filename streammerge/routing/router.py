"""The task router (docs/methods.md section 5): features, classifier, fitting, saving, loading.

Features: the mean over positions of the last hidden state (after the final norm) of the store's
merged model on the raw prompt (tokenizer special tokens, no chat template), standardised with
the training set's mean and standard deviation.

Classifiers:
  mlp     Twin-Merging's router: Linear d->2d, BatchNorm, LeakyReLU, Dropout, Linear 2d->2d,
          BatchNorm, LeakyReLU, Dropout, Linear 2d->N
  logreg  multinomial logistic regression: Linear d->N

Trained with cross-entropy and Adam on labelled prompts (labels: the store's task names from
method.json), a stratified held-out split reports accuracy. Background prompts (`background`:
text of none of the tasks, e.g. general text like the base model's) add a last class, "none of
the tasks" (decision.NONE), whose expert is the merged model; decision.py says how its
probability is used and why. Seeded: the split, the
initialisation, dropout and the mini-batch order all come from the seed (torch's global RNG is
forked, not disturbed), so a fit on the same machine and device is reproducible.

Saved in the store, `job.zarr/inference/router/`: router.safetensors (the network's state and
the feature mean / std) and router.json (classifier, sizes, tasks, hyper-parameters, accuracy,
the store manifest digest it was fit on). No pickle anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json
from ..store.store import Store, atomic_write
from .decision import NONE
from .runtime import require_torch

ROUTER_FORMAT = 1
ROUTER_DIR = "router"
CLASSIFIERS = ("mlp", "logreg")
DEFAULTS = {
    "mlp": {"epochs": 40, "lr": 1e-3, "dropout": 0.2, "weight_decay": 0.0},
    "logreg": {"epochs": 100, "lr": 1e-2, "dropout": 0.0, "weight_decay": 1e-4},
}


def build_network(classifier: str, dim: int, n_classes: int, dropout: float = 0.2):
    torch, _ = require_torch()
    nn = torch.nn
    if classifier == "logreg":
        return nn.Sequential(nn.Linear(dim, n_classes))
    if classifier != "mlp":
        raise StreammergeError(f"unknown classifier {classifier!r} (use {' or '.join(CLASSIFIERS)})")
    h = 2 * dim
    return nn.Sequential(
        nn.Linear(dim, h),
        nn.BatchNorm1d(h),
        nn.LeakyReLU(),
        nn.Dropout(dropout),
        nn.Linear(h, h),
        nn.BatchNorm1d(h),
        nn.LeakyReLU(),
        nn.Dropout(dropout),
        nn.Linear(h, n_classes),
    )


def router_dir(store: Store) -> Path:
    return store.path / "inference" / ROUTER_DIR


@dataclass
class Router:
    """A fitted router: features (n, d) -> probabilities (n, N), or (n, N + 1) with a background
    class (the last column: none of the tasks)."""

    net: object
    mean: object  # (d,) float32
    std: object  # (d,) float32
    tasks: list[str]
    meta: dict

    @property
    def background(self) -> bool:
        return bool(self.meta.get("background"))

    @property
    def classes(self) -> list[str]:
        return [*self.tasks, NONE] if self.background else list(self.tasks)

    def to(self, device) -> "Router":
        self.net.to(device)
        self.mean = self.mean.to(device)
        self.std = self.std.to(device)
        return self

    def logits(self, features):
        torch, _ = require_torch()
        dev = self.mean.device
        x = (features.to(dev, torch.float32) - self.mean) / self.std
        self.net.eval()
        with torch.inference_mode():
            return self.net(x)

    def probs(self, features) -> np.ndarray:
        """float64 softmax probabilities, one column per class."""
        torch, _ = require_torch()
        if features.shape[0] == 0:
            return np.zeros((0, len(self.classes)))
        return torch.softmax(self.logits(features).double(), dim=-1).cpu().numpy()

    def save(self, store: Store) -> Path:
        from safetensors.torch import save_file

        d = router_dir(store)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["feature_mean"] = self.mean.detach().cpu().contiguous()
        tensors["feature_std"] = self.std.detach().cpu().contiguous()
        tmp = d / ".router.safetensors.partial"
        save_file(tensors, str(tmp), metadata={"format": str(ROUTER_FORMAT)})
        tmp.replace(d / "router.safetensors")
        atomic_write(d / "router.json", (json.dumps(self.meta, indent=1) + "\n").encode())
        return d

    @classmethod
    def load(cls, store: Store, tasks: Sequence[str] | None = None) -> "Router":
        torch, _ = require_torch()
        from safetensors.torch import load_file

        d = router_dir(store)
        if not (d / "router.json").is_file() or not (d / "router.safetensors").is_file():
            raise StreammergeError(
                f"{store.path}: no router fitted; run `streammerge router fit {store.path} --prompts TASK=FILE ...` "
                "(or pass a task explicitly)"
            )
        meta = read_json(d / "router.json", DOCUMENT.named("router.json"))
        if not isinstance(meta, dict):
            raise StreammergeError(f"{d / 'router.json'}: router.json must be a JSON object")
        if meta.get("format") != ROUTER_FORMAT:
            raise StreammergeError(f"{d / 'router.json'}: router format {meta.get('format')!r} is not supported")
        if meta.get("store_digest") != store.digest:
            raise StreammergeError(f"{d}: the router was fit on another build of this store; run `streammerge router fit` again")
        if tasks is not None and list(meta["tasks"]) != list(tasks):
            raise StreammergeError(f"{d}: router tasks {meta['tasks']} differ from the store's {list(tasks)}; fit it again")
        tensors = load_file(str(d / "router.safetensors"))
        n_classes = len(meta["tasks"]) + bool(meta.get("background"))
        net = build_network(meta["classifier"], int(meta["dim"]), n_classes, float(meta.get("dropout", 0.0)))
        try:
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        except RuntimeError as e:
            raise StreammergeError(f"{d / 'router.safetensors'}: does not match router.json ({str(e).splitlines()[0]})") from None
        net.eval()
        return cls(net, tensors["feature_mean"].float(), tensors["feature_std"].float(), list(meta["tasks"]), meta)


def stratified_split(labels: Sequence[int], holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: per label, round(holdout * n) held out (at least 1 when the
    label has >= 2 examples and holdout > 0, always leaving one for training), seeded."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, held = [], []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = int(round(holdout * idx.size)) if holdout > 0 else 0
        if holdout > 0 and idx.size >= 2:
            k = max(1, k)
        k = min(k, idx.size - 1)
        held.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def _batches(n: int, batch_size: int, rng) -> list[np.ndarray]:
    perm = rng.permutation(n)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and out[-1].size < 2:  # BatchNorm needs two examples per batch in training
        out[-2] = np.concatenate([out[-2], out[-1]])
        out.pop()
    return out


def train_classifier(
    features,
    labels: Sequence[int],
    n_classes: int,
    *,
    classifier: str = "mlp",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 32,
    dropout: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
):
    """(net, mean, std) trained on float32 features (n, d) with integer labels; seeded."""
    torch, _ = require_torch()
    if classifier not in CLASSIFIERS:
        raise StreammergeError(f"unknown classifier {classifier!r} (use {' or '.join(CLASSIFIERS)})")
    d = DEFAULTS[classifier]
    epochs = d["epochs"] if epochs is None else int(epochs)
    lr = d["lr"] if lr is None else float(lr)
    dropout = d["dropout"] if dropout is None else float(dropout)
    weight_decay = d["weight_decay"] if weight_decay is None else float(weight_decay)
    x = features.to(torch.float32)
    n, dim = x.shape
    if n < 2:
        raise StreammergeError(f"router: {n} training prompt(s); at least 2 are needed")
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=x.device)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        net = build_network(classifier, dim, n_classes, dropout).to(x.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        rng = np.random.default_rng(seed + 1)
        net.train()
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in _batches(n, max(2, batch_size), rng):
                    it = torch.as_tensor(idx, device=x.device)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(net(xs[it]), y[it])
                    loss.backward()
                    opt.step()
    net.eval()
    hyper = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "dropout": dropout, "weight_decay": weight_decay}
    return net, mean, std, hyper


def _accuracy(router: Router, feats, labels: np.ndarray, classes: Sequence[str]) -> dict:
    if len(labels) == 0:
        return {"accuracy": None, "per_task": {}, "n": 0}
    pred = router.probs(feats).argmax(axis=1)
    per = {}
    for c, t in enumerate(classes):
        m = labels == c
        if m.any():
            per[t] = float((pred[m] == c).mean())
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for a, b in zip(labels, pred):
        confusion[a, b] += 1
    return {"accuracy": float((pred == labels).mean()), "per_task": per, "n": int(len(labels)), "confusion": confusion.tolist()}


def fit_router(
    store_path,
    prompts: Sequence[tuple[str, object]],
    *,
    background: Sequence[object] = (),
    classifier: str = "mlp",
    holdout: float = 0.2,
    seed: int = 0,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 32,
    dropout: float | None = None,
    weight_decay: float | None = None,
    device="auto",
    dtype="auto",
    max_tokens: int | None = 512,
    feature_batch_size: int = 16,
    model=None,
) -> dict:
    """Fit and save the router of a mediator / 1bit store from labelled prompt files.

    prompts: [(task, path to JSONL), ...] (a task may appear several times), or
    [(task, [prompt, ...]), ...]. background: JSONL paths or lists of prompts of none of the
    tasks (the background class; none: no such class). Returns the report that router.json
    also holds.
    """
    torch, _ = require_torch()
    from .prompts import read_prompts
    from .runtime import (
        encode_for_features,
        load_merged_model,
        mean_hidden_features,
        open_routing_store,
        pad_id,
        resolve_device,
        resolve_dtype,
    )

    if classifier not in CLASSIFIERS:
        raise StreammergeError(f"unknown classifier {classifier!r} (use {' or '.join(CLASSIFIERS)})")
    if not 0 <= holdout < 1:
        raise StreammergeError(f"holdout must be within [0, 1), got {holdout}")
    store, method = open_routing_store(store_path)
    tasks = list(method["tasks"])
    texts, labels, sources = [], [], {}  # sources: class -> {files, prompts}

    def add(cls: str, src) -> None:
        items = read_prompts(src) if isinstance(src, (str, Path)) else [str(p) for p in src]
        texts.extend(items)
        labels.extend([len(tasks) if cls == NONE else tasks.index(cls)] * len(items))
        info = sources.setdefault(cls, {"files": [], "prompts": 0})
        info["prompts"] += len(items)
        if isinstance(src, (str, Path)):
            info["files"].append(str(src))

    for task, src in prompts:
        if task not in tasks:
            raise StreammergeError(f"--prompts {task}=...: {task!r} is not a task of {store.path} (tasks: {', '.join(tasks)})")
        add(task, src)
    if not texts:
        raise StreammergeError("router: no prompts given (--prompts TASK=FILE)")
    missing = [t for t in tasks if t not in sources]
    for src in background:
        add(NONE, src)
    bg_info = sources.pop(NONE, None)
    classes = [*tasks, NONE] if bg_info else tasks
    t0 = time.perf_counter()
    if model is None:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, store)
        lm, tok = load_merged_model(store, dev, dt)
    else:  # a RoutedModel (its merged weights are applied for the features)
        lm, tok, dev, dt = model.model, model.tokenizer, model.device, model.dtype
        model.apply(None)
    seqs = encode_for_features(tok, texts, max_tokens)
    feats = mean_hidden_features(lm, seqs, pad_id(tok), feature_batch_size)
    t_feat = time.perf_counter() - t0
    y = np.asarray(labels, dtype=np.int64)
    train, held = stratified_split(y, holdout, seed)
    net, mean, std, hyper = train_classifier(
        feats[torch.as_tensor(train, device=feats.device)], y[train], len(classes), classifier=classifier, epochs=epochs, lr=lr,
        batch_size=batch_size, dropout=dropout, weight_decay=weight_decay, seed=seed,
    )
    meta = {
        "format": ROUTER_FORMAT,
        "classifier": classifier,
        "tasks": tasks,
        "dim": int(feats.shape[1]),
        "hidden": 2 * int(feats.shape[1]) if classifier == "mlp" else None,
        "features": "mean over positions of the last hidden state of the merged model (inference/merged), raw prompt "
        "with the tokenizer's special tokens, standardised",
        "max_tokens": max_tokens,
        "feature_dtype": str(dt).removeprefix("torch."),
        "feature_device": str(dev),
        "seed": seed,
        "holdout": holdout,
        **hyper,
        "store_digest": store.digest,
        "prompts": sources,
        "background": bg_info,
        "n_train": int(len(train)),
        "n_heldout": int(len(held)),
        "tasks_without_prompts": missing,
    }
    router = Router(net, mean, std, tasks, meta)
    ix = lambda a: torch.as_tensor(a, device=feats.device)  # noqa: E731
    meta["train"] = _accuracy(router, feats[ix(train)], y[train], classes)
    meta["heldout"] = _accuracy(router, feats[ix(held)], y[held], classes)
    meta["seconds"] = {"features": round(t_feat, 3), "total": round(time.perf_counter() - t0, 3)}
    router.to("cpu")
    meta["path"] = str(router.save(store))
    return meta
