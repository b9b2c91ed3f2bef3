"""What-if rows: a change to the routing methods that streammerge does not offer (yet),
simulated on the same checkpoints to measure what it would buy. They are labelled as such in
the results and are not streammerge output.

  1bit + dense embeddings   1bit-Merging's task:k model (theta_0 + tau_hat_k, from a store built
                            with lambda 0), with the embedding kind (embed_tokens, lm_head) of
                            task k kept dense (its exact bf16 fine-tuned values) instead of 1-bit.
                            A `precision` override per module kind would give this.

  1bit-rms-group<G>         1bit-Merging's task:k model at lambda 0 with one rms scale per
                            group of G consecutive entries of a row instead of one per row
                            (1-D tensors: one per tensor), computed here from the checkpoints:
                            theta_0 + rms_group(tau_k) * sign(tau_k). Storage: the base, one bit
                            per entry and a float32 scale per group, per task. The encoding and
                            its decode (serving's per-row scaled sign product) would need
                            per-group scales first; this says whether they are worth it.

  1bit-rms-rowcol           the same with a scale per row times one per column:
                            tau_hat[r, c] = a_r * b_c * sign(tau[r, c]), b_c the rms of column c,
                            a_r = ||tau[r]|| / ||b|| (each row keeps its norm; b constant gives
                            the rms row scale). The column factor applies to a layer's input, so
                            a sign product would stay one matmul: a * ((x * b) @ S^T).
                            Storage: bits, a float32 per row and per column, per task.

(Mediator with the tensors outside the layers routed, simulated here before, is its
`route_outside` option now: real rows of the table. A second bit or dense values for named
module kinds, simulated here before for the embeddings, is 1bit's `precision_by_kind` now.)

Evaluated with the oracle task (each test set through its task's model: the fitted routers are
100 % accurate on the tests), so they compare with the `oracle` numbers of the real stores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from . import tasks as T
from .evaluate import EvalSets, Memo, exact, load_model

EMBEDDING = ("model.embed_tokens.weight", "lm_head.weight")


def _export_task(store: Path, task: str, out: Path) -> None:
    from streammerge.export.variants import export_variant
    from streammerge.store.store import Store

    if not (out / "model.safetensors").is_file():
        export_variant(Store.open(store), out, f"task:{task}", overwrite=True, progress=False)


def _patch(model_dir: Path, tensors: dict) -> None:
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    state.update({k: v.contiguous() for k, v in tensors.items()})
    save_file(state, str(f), metadata={"format": "pt"})


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def group_rms_hat(tau, group: int):
    """rms per group of `group` consecutive entries of each row (the last group of a row may be
    shorter; float64 sums, float32 scales) times sign(tau) (+1 at zero); 1-D / 0-D tensors one
    rms for the whole tensor. float32 torch tensor of tau's shape."""
    import torch

    t = tau.float()
    t2 = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
    rows, cols = t2.shape
    g = group if t.dim() >= 2 else cols
    ng = -(-cols // g)
    sq = torch.zeros(rows, ng * g, dtype=torch.float64)
    sq[:, :cols] = t2.double() ** 2
    counts = torch.full((ng,), float(g), dtype=torch.float64)
    counts[-1] = cols - (ng - 1) * g
    scale = (sq.view(rows, ng, g).sum(-1) / counts).sqrt().float()
    full = scale.repeat_interleave(g, dim=1)[:, :cols]
    return torch.where(t2 >= 0, full, -full).reshape(t.shape)


def rowcol_rms_hat(tau):
    """a_r * b_c * sign(tau) (+1 at zero): b_c = rms of column c, a_r = ||tau[r]|| / ||b||
    (float64, scales rounded to float32, the product in float32); 1-D / 0-D tensors one rms for
    the whole tensor. float32 torch tensor of tau's shape."""
    import torch

    t = tau.float()
    if t.dim() < 2:
        return group_rms_hat(t, 1)
    t2 = t.reshape(t.shape[0], -1).double()
    b = t2.pow(2).mean(0).sqrt()
    nb = b.pow(2).sum().sqrt()
    a = torch.where(nb > 0, t2.pow(2).sum(1).sqrt() / torch.where(nb > 0, nb, 1.0), 0.0)
    mag = a.float()[:, None] * b.float()[None, :]
    return torch.where(t2 >= 0, mag, -mag).reshape(t.shape)


def rowcol_scale_bytes(shape) -> int:
    """Bytes of one task's row x column scaled encoding of a tensor: packed bits per row and a
    float32 per row and per column (1-D: bits and one float32)."""
    if len(shape) >= 2:
        rows, cols = shape[0], int(math.prod(shape[1:]))
        return rows * (-(-cols // 8)) + 4 * rows + 4 * cols
    return -(-int(math.prod(shape)) // 8) + 4


def group_scale_bytes(shape, group: int) -> int:
    """Bytes of one task's encoding of a tensor with per-group scales: packed bits per row
    (1-D: per tensor) and a float32 scale per group (1-D: one)."""
    if len(shape) >= 2:
        rows, cols = shape[0], int(math.prod(shape[1:]))
        return rows * (-(-cols // 8)) + 4 * rows * (-(-cols // group))
    n = int(math.prod(shape))
    return -(-n // 8) + 4


def _simulated_models(hat, nbytes, root: Path, work: Path) -> int:
    """Writes work/<task>/ (theta_0 + hat(tau_task), in the base's dtype, beside the base's
    config and tokenizer) for every task; returns the storage bytes: the base and, per task,
    nbytes(shape) per float tensor."""
    from safetensors.torch import save_file

    base = _load(root / "base")
    for t in T.TASKS:
        out = work / t
        if (out / "model.safetensors").is_file():
            continue
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(root / "base", out, ignore=shutil.ignore_patterns("*.safetensors"))
        expert = _load(root / t)
        state = {n: (b.float() + hat(expert[n].float() - b.float())).to(b.dtype) if b.is_floating_point() else b
                 for n, b in base.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    return base_bytes + len(T.TASKS) * sum(nbytes(tuple(v.shape)) for v in base.values() if v.is_floating_point())


def _dense_embedding_models(store: Path, root: Path, work: Path) -> int:
    storage = json.loads((store / "storage.json").read_text())
    experts = {t: _load(root / t) for t in T.TASKS}
    extra_bytes = 0
    for t in T.TASKS:
        out = work / t
        stamp = work / f"{t}.json"
        if not stamp.is_file():
            shutil.rmtree(out, ignore_errors=True)
            _export_task(store, t, out)
            patch = {n: experts[t][n] for n in EMBEDDING}
            nbytes = sum(v.numel() * 2 for v in patch.values())
            _patch(out, patch)
            stamp.write_text(json.dumps({"extra_bytes": nbytes}))
        extra_bytes += json.loads(stamp.read_text())["extra_bytes"]
    return storage["total_bytes"] + extra_bytes


def evaluate_whatif(kind: str, store: Path, root: Path, work: Path, sets: EvalSets, memo: Memo, device: str = "cpu") -> dict:
    """Per-task accuracy of the simulated task models (oracle task) and their storage bytes."""
    work.mkdir(parents=True, exist_ok=True)
    if kind == "1bit-dense-embeddings":
        storage_bytes = _dense_embedding_models(store, root, work)
    elif kind.startswith("1bit-rms-group") and kind[14:].isdigit() and int(kind[14:]) > 0:
        g = int(kind[14:])
        storage_bytes = _simulated_models(lambda t: group_rms_hat(t, g), lambda shape: group_scale_bytes(shape, g), root, work)
    elif kind == "1bit-rms-rowcol":
        storage_bytes = _simulated_models(rowcol_rms_hat, rowcol_scale_bytes, root, work)
    else:
        raise ValueError(f"unknown what-if {kind!r}")
    acc = {}
    for t in T.TASKS:
        model, tok = load_model(work / t, device)
        prompts = [p for p, _ in sets.tests[t]]
        outs = memo.run(str(work / t), "static", model, tok, prompts, sets.budget[t])
        acc[t] = exact(outs, [a for _, a in sets.tests[t]])
    avg = sum(acc.values()) / len(acc)
    return {"acc": acc, "avg": avg, "storage_bytes": storage_bytes, "store": store.name}
