"""The LoRA rows: a routing store exported as the shipped model plus one PEFT adapter per task
(`streammerge export STORE OUT --variant lora --rank R`; SOURCES names the stores), served the way multi-LoRA engines
serve it: each prompt answered by the shipped model with the adapter of the task the store's
router picks (top-1), the adapter loaded by peft (`PeftModel.load_adapter` / `set_adapter`).

Storage is what is shipped: the model's tensors plus every adapter's tensors, as written
(streammerge writes adapters in float32). Exports live under <cache>/merges/lora-r<R>-<store>/
and are redone only when the store's digest or the rank changes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path


RANKS = (8, 32, 128)
# the routing stores each configuration exports: the best Mediator store without routed
# embeddings (README, Merge quality: 97 % of full routing) and the best 1bit-Merging store
# (99 %, lambda 0: its shipped model is the base); the smoke configuration's one Mediator store
_BEST = ("mediator-8-0.5", "1bit-uniform-row-lam0-rms-bits2")
SOURCES = {"full": _BEST, "scratch": _BEST, "smoke": ("mediator-0.5-0.1",)}


def row_name(rank: int, source: str) -> str:
    return f"lora-r{rank}-{source}"


def row_names(config_name: str, source: str) -> list[str]:
    """The LoRA rows that follow `source`'s row in the table (none for other stores)."""
    return [row_name(r, source) for r in RANKS] if source in SOURCES.get(config_name, ()) else []


def export(store_path: Path, workdir: Path, rank: int) -> dict:
    """`export --variant lora --rank R` of the store (or the previous one, when still current)."""
    from streammerge.export.variants import export_variant
    from streammerge.store.store import Store

    store = Store.open(store_path)
    out = workdir / row_name(rank, store_path.parent.name)
    stamp = out.parent / f"{out.name}.json"
    want = {"digest": store.digest, "rank": rank}
    if not (out.is_dir() and stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in want} == want):
        info = export_variant(store, out, "lora", rank=rank, overwrite=True, progress=False)
        stamp.write_text(json.dumps({**want, "rel_error": info["lora"]}))
    return {"dir": out, "rel_error": json.loads(stamp.read_text())["rel_error"]}


class LoraEval:
    """The shipped model with every task's adapter loaded by peft; generation switches adapters."""

    def __init__(self, out: Path, tasks: list[str], device: str = "cpu"):
        from peft import PeftModel

        from .evaluate import load_model

        model, self.tok = load_model(out, device)
        self.key = str(out)
        self.tasks = list(tasks)
        self.model = PeftModel.from_pretrained(model, str(out / "adapters" / tasks[0]), adapter_name=tasks[0])
        for t in tasks[1:]:
            self.model.load_adapter(str(out / "adapters" / t), adapter_name=t)
        self.model.eval()

    def generate(self, memo, picks: list[str], prompts: list[str], budget: int) -> list[str]:
        """Each prompt through the adapter `picks` names for it."""
        groups: OrderedDict = OrderedDict()
        for i, t in enumerate(picks):
            groups.setdefault(t, []).append(i)
        out = [None] * len(prompts)
        for t, ix in groups.items():
            self.model.set_adapter(t)
            for i, o in zip(ix, memo.run(self.key, f"adapter:{t}", self.model, self.tok, [prompts[i] for i in ix], budget)):
                out[i] = o
        return out


def evaluate_lora(le: LoraEval, routed, sets, memo) -> dict:
    """Router mode (the store's fitted router, top-1 over the tasks, as `routed.probs` gives it)
    and oracle mode (the true task's adapter; OOD prompts routed), as evaluate.RoutedEval does."""
    from .evaluate import _result, _sets

    per, oracle = {}, {}
    for name, prompts, _, true in _sets(sets):
        probs = routed.probs(name, prompts)
        picks = [le.tasks[int(p[: len(le.tasks)].argmax())] for p in probs]
        per[name] = le.generate(memo, picks, prompts, sets.budget[name])
        oracle[name] = per[name] if true is None else le.generate(memo, [true] * len(prompts), prompts, sets.budget[name])
    return {"router": _result(per, sets), "oracle": _result(oracle, sets)}


def lora_rows(source: str, store_path: Path, routed, sets, memo, device: str, *, tensor_bytes, full_bytes: int, row) -> list[dict]:
    """The table rows of `source`'s LoRA exports at every rank; `routed` is the store's
    RoutedEval with its default router fitted; `tensor_bytes(dir)` sums the tensor bytes of a
    directory's safetensors files; `row` builds a row as run.row does."""
    tasks = list(routed.rm.tasks)
    rows = []
    for rank in RANKS:
        exp = export(store_path, store_path.parent.parent, rank)
        out = exp["dir"]
        res = evaluate_lora(LoraEval(out, tasks, device), routed, sets, memo)
        shipped, adapters = tensor_bytes(out), sum(tensor_bytes(out / "adapters" / t) for t in tasks)
        errors = sorted(e for errs in exp["rel_error"].values() for e in errs)
        rows.append(row(
            row_name(rank, source), "lora", f"rank {rank} adapters of {source} (peft), top-1 router", res["router"], shipped + adapters,
            oracle_avg=res["oracle"]["avg"], oracle_acc=res["oracle"]["acc"],
            rel_error={"median": errors[len(errors) // 2], "max": errors[-1]} if errors else None,
            storage_detail={"model_bytes": shipped, "adapter_bytes": adapters, "full_routing_bytes": full_bytes},
        ))
    return rows
