"""What-if rows: a change to the routing methods that streammerge does not offer (yet),
simulated on the same checkpoints to measure what it would buy. They are labelled as such in
the results and are not streammerge output.

  1bit + dense embeddings   1bit-Merging's task:k model (theta_0 + tau_hat_k, from a store built
                            with lambda 0), with the embedding kind (embed_tokens, lm_head) of
                            task k kept dense (its exact bf16 fine-tuned values) instead of 1-bit.
                            A `precision` override per module kind would give this.

(Mediator with the tensors outside the layers routed, simulated here before, is its
`route_outside` option now: real rows of the table.)

Evaluated with the oracle task (each test set through its task's model: the fitted routers are
100 % accurate on the tests), so they compare with the `oracle` numbers of the real stores.
"""

from __future__ import annotations

import json
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


def evaluate_whatif(kind: str, store: Path, root: Path, work: Path, sets: EvalSets, memo: Memo, device: str = "cpu") -> dict:
    """Per-task accuracy of the simulated task models (oracle task) and their storage bytes."""
    if kind != "1bit-dense-embeddings":
        raise ValueError(f"unknown what-if {kind!r}")
    work.mkdir(parents=True, exist_ok=True)
    storage = json.loads((store / "storage.json").read_text())
    experts = {t: _load(root / t) for t in T.TASKS}
    acc, extra_bytes = {}, 0
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
        model, tok = load_model(out, device)
        prompts = [p for p, _ in sets.tests[t]]
        outs = memo.run(str(out), "static", model, tok, prompts, sets.budget[t])
        acc[t] = exact(outs, [a for _, a in sets.tests[t]])
    avg = sum(acc.values()) / len(acc)
    return {"acc": acc, "avg": avg, "storage_bytes": storage["total_bytes"] + extra_bytes, "store": store.name}
