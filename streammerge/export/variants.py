"""Export variants of routing-method stores (Mediator, 1bit-Merging).

    merged     the static model in tensors/ (Mediator: averaged layers and dense experts;
               1bit-Merging: the fallback theta_0 + lambda * TIES(all))
    task:NAME  the model a router would run for task NAME (docs/methods.md sections 3.5 and 4.4):
               Mediator: D + S_NAME on routed layers, the averaged layers elsewhere;
               1bit-Merging: theta_0 + tau_NAME + lambda * TIES({tau_j : j != NAME}) with every
               tau reconstructed from its encoding
    routed     what a runtime needs to route: the model shards (Mediator: the averaged model;
               1bit-Merging: the base model), the experts or encodings in routing*.safetensors
               and routing.json describing them (docs in README "Routed export")

Every variant streams block by block like the plain export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..analysis.summary import module_kind
from ..checkpoints import open_model
from ..checkpoints.blocks import read_rows, row_elems
from ..dtypes import BF16, float_type, from_float32, to_float32
from ..encodings.onebit import dynamic_merge_block, reconstruct_from_outputs, unpack_signs_flat
from ..encodings.sparse import apply_sparse, decode_sparse
from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json
from ..store.store import Store
from .hf import export_store
from .lora import DeltaSource, dropped_share, factor_into_adapter, write_adapter_files
from .safetensors_writer import ShardedWriter, TensorSpec

ROUTING_FORMAT = 1
DEFAULT_LORA_RANK = 32


def load_decision(store: Store) -> dict:
    p = store.path / "method.json"
    if not p.is_file():
        raise StreammergeError(
            f"{store.path}: export variants other than 'merged' need a mediator or 1bit store "
            f"(this one was built with {store.manifest['method']})"
        )
    return read_json(p, DOCUMENT.named("method.json"))


def _f32(store: Store, name: str, r0: int, r1: int) -> np.ndarray:
    raw = store.read_block(name, r0, r1)
    return to_float32(raw, store.dtype(name), np.empty(raw.shape, np.float32))


def base_checkpoint(store: Store):
    """The base model of a 1bit store, checked against the fingerprint taken at build time."""
    base_spec = store.manifest["recipe"]["canonical"].get("base_model")
    info = store.manifest["inputs"][base_spec]
    ck = open_model(info["directory"])
    if ck.fingerprint() != info["files"]:
        raise StreammergeError(f"{info['directory']}: the base model changed since the store was built; rebuild with --restart")
    return ck


class TaskBlocks:
    """block_fn of the task:NAME variant (picklable: holds paths and small metadata only)."""

    def __init__(self, store: Store, decision: dict, task: str):
        self.store, self.decision, self.task = store, decision, task
        # tensors with sparse experts: the routed layers' and, with route_outside, embeddings/lm_head/norm
        self.routed = {j["name"] for j in store.jobs if j["stage"] == "experts"}
        self._base = None

    def _base_handles(self):
        if self._base is None:
            self._base = base_checkpoint(self.store).tensors
        return self._base

    def __call__(self, name: str, i: int, r0: int, r1: int) -> np.ndarray:
        if self.decision["method"] == "mediator":
            block = _f32(self.store, name, r0, r1)
            if name in self.routed:
                apply_sparse(block.reshape(r1 - r0, -1), self.store.read_blob(f"experts/{name}/{self.task}", i))
            return block
        return self._onebit(name, i, r0, r1)

    def _onebit(self, name: str, i: int, r0: int, r1: int) -> np.ndarray:
        base = read_base_rows(self._base_handles()[name], r0, r1)
        kind = module_kind(name)
        taus = {}
        for t in self.decision["tasks"]:
            taus[t] = task_tau(self.store, self.decision, name, t, kind, i, r0, r1, base.shape)
        return dynamic_merge_block(base, taus, self.task, self.decision["lambda"])


def task_tau(store: Store, decision: dict, name: str, task: str, kind: str, i: int, r0: int, r1: int, shape) -> np.ndarray | None:
    """The reconstructed task vector of one block (None where the task's precision is drop)."""
    precision = decision["precision"][task][kind]
    if precision == "drop":
        return None
    key = f"encodings/{name}"
    job = store.job(key)
    outputs = {}
    for out in job["outputs"]:
        if not out["name"].startswith(f"{task}."):
            continue
        path = f"{key}/{out['name']}"
        outputs[out["name"]] = store.read_blob(path, i) if out.get("blob") else store.array_at(path)[r0:r1]
    stats = store.load_stats("encode", key) or {}
    return reconstruct_from_outputs(task, precision, job["shape"], r1 - r0, outputs, stats, decision["granularity"])


class BaseBlocks:
    """block_fn writing the base model itself (the 1bit routed variant's model shards)."""

    def __init__(self, store: Store):
        self.store = store
        self._handles = None

    def __call__(self, name: str, i: int, r0: int, r1: int) -> np.ndarray:
        if self._handles is None:
            self._handles = base_checkpoint(self.store).tensors
        return read_base_rows(self._handles[name], r0, r1)


def read_base_rows(handle, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a base-model tensor as a fresh float32 array."""
    return read_rows(handle, r0, r1, np.empty((r1 - r0) * row_elems(handle.shape), np.float32))


def _routing_tensors(store: Store) -> list[tuple[TensorSpec, callable]]:
    """(spec, write(writer)) for every expert / encoding piece, in job order."""
    items = []
    for job in store.jobs:
        if job["stage"] not in ("experts", "encode"):
            continue
        stats = store.load_stats(job["stage"], job["key"]) or {}
        for out in job["outputs"]:
            path = f"{job['key']}/{out['name']}"
            base_name = f"{job['name']}::{out['name']}"
            if out.get("blob") and out["name"].endswith(".bits"):
                # 1-D tensors' sign bits come in per-block blobs: repacked as one row here.
                n = int(np.prod(job["shape"], dtype=np.int64)) if job["shape"] else 1

                def write_bits(w, path=path, name=base_name, nblocks=job["nblocks"], br=job["block_rows"], n=n):
                    signs = [
                        unpack_signs_flat(store.read_blob(path, b), min(n, (b + 1) * br) - b * br) for b in range(nblocks)
                    ]
                    w.write(name, 0, np.packbits(np.concatenate(signs) > 0, bitorder="little"))

                items.append((TensorSpec(base_name, "U8", (-(-n // 8),), -(-n // 8)), write_bits))
            elif out.get("blob"):
                counts = [len(decode_sparse(store.read_blob(path, b))[0]) for b in range(job["nblocks"])]
                k = sum(counts)
                per_row = row_elems(tuple(job["shape"]))

                def write_sparse(w, path=path, base_name=base_name, nblocks=job["nblocks"], br=job["block_rows"], re_=per_row, counts=counts):
                    pos = 0
                    for b in range(nblocks):
                        off, val = decode_sparse(store.read_blob(path, b))
                        w.write(f"{base_name}.index", pos * 8, off.astype(np.int64) + b * br * re_)
                        w.write(f"{base_name}.value", pos * 2, from_float32(val, BF16))
                        pos += counts[b]

                items.append((TensorSpec(f"{base_name}.index", "I64", (k,), 8 * k), write_sparse))
                items.append((TensorSpec(f"{base_name}.value", "BF16", (k,), 2 * k), None))
            else:
                a = store.array_at(path)
                logical = a.attrs.get("dtype", str(a.dtype))
                try:
                    st, itemsize = float_type(logical).st, float_type(logical).itemsize
                except KeyError:
                    st, itemsize = {"uint8": "U8", "int32": "I32", "int64": "I64"}[logical], a.dtype.itemsize
                shape = tuple(a.shape)

                def write_dense(w, path=path, name=f"{base_name}", br=job["block_rows"], n=shape[0]):
                    arr = store.array_at(path)
                    for r0 in range(0, n, br):
                        block = np.ascontiguousarray(arr[r0:min(n, r0 + br)])
                        w.write(name, r0 * (block[0:1].nbytes if block.ndim else block.nbytes), block)

                items.append((TensorSpec(base_name, st, shape, int(np.prod(shape, dtype=np.int64)) * itemsize), write_dense))
        for key, value in stats.items():
            if key.endswith(".alpha"):
                arr = np.asarray(value, dtype=np.float32).reshape(())
                items.append((TensorSpec(f"{job['name']}::{key}", "F32", (), 4), lambda w, n=f"{job['name']}::{key}", a=arr: w.write(n, 0, a)))
    return items


def export_variant(store: Store, out_dir: Path, variant: str, rank: int = DEFAULT_LORA_RANK,
                   modules_to_save: str = "keep", **kw) -> dict:
    if variant != "lora" and modules_to_save != "keep":
        raise StreammergeError(f"--modules-to-save {modules_to_save}: only for --variant lora (this is {variant})")
    if variant == "merged":
        return export_store(store, out_dir, **kw)
    decision = load_decision(store)
    if variant.startswith("task:"):
        task = variant[5:]
        if task not in decision["tasks"]:
            raise StreammergeError(f"{store.path}: no task {task!r} (tasks: {', '.join(decision['tasks'])})")
        return export_store(store, out_dir, block_fn=TaskBlocks(store, decision, task), **kw)
    if variant == "lora":
        return _export_lora(store, out_dir, decision, rank, modules_to_save, **kw)
    if variant != "routed":
        raise StreammergeError(f"unknown export variant {variant!r}: use merged, task:NAME, routed or lora")

    def extra(tmp: Path) -> list[str]:
        items = _routing_tensors(store)
        w = ShardedWriter(tmp, [spec for spec, _ in items], kw.get("shard_size", 5 * 10**9), prefix="routing")
        try:
            for _spec, write in items:
                if write is not None:
                    write(w)
        finally:
            w.finish()
        meta = {
            "format": ROUTING_FORMAT,
            "method": decision["method"],
            "decision": decision,
            "model_shards": "model*.safetensors: " + ("the averaged model (dense experts in routed layers)" if decision["method"] == "mediator" else "the base model theta_0"),
            "files": w.files,
            "naming": {
                "<tensor>::<task>": "Mediator sparse expert S_task of <tensor>: .index (I64 flat indices into the tensor, sorted) and .value (BF16)",
                "<tensor>::<task>.bits": "1bit: packed sign bits (bit 1: tau >= 0, i.e. +alpha; 0: -alpha), numpy packbits bitorder little: "
                "uint8 [rows, ceil(cols/8)] along each row for tensors of rank >= 2, uint8 [ceil(n/8)] for 1-D tensors",
                "<tensor>::<task>.alpha": "1bit: per-tensor scale (F32 scalar); tau ~ alpha * sign",
                "<tensor>::<task>.scale": "1bit-row: per-row scale, F32 [rows]; 1bit-group (granularity group:G in the decision): "
                "one scale per G consecutive entries of a row, F32 [rows, ceil(cols/G)]",
                "<tensor>::<task>.sparse": "sparse precision: .index / .value as above, of tau itself",
                "<tensor>::<task>.dense": "dense precision: tau in BF16",
            },
        }
        (tmp / "routing.json").write_text(json.dumps(meta, indent=1) + "\n")
        index = [f"{w.prefix}.safetensors.index.json"] if len(w.files) > 1 else []
        return [*w.files, *index, "routing.json"]

    block_fn = BaseBlocks(store) if decision["method"] == "1bit" else None
    return export_store(store, out_dir, block_fn=block_fn, extra=extra, **kw)


def task_delta_sources(store: Store, decision: dict, task: str) -> list[DeltaSource]:
    """Task `task`'s weights minus the shipped model's (Mediator: the averaged model, so the
    sparse experts; 1bit: the base model), for every tensor routing changes, block by block."""
    task_rows = TaskBlocks(store, decision, task)
    if decision["method"] == "mediator":
        stage = "experts"

        def shipped(name, i, r0, r1):
            return _f32(store, name, r0, r1)
    else:
        stage = "encode"
        shipped = BaseBlocks(store)
    sources = []
    for job in store.jobs:
        if job["stage"] != stage:
            continue
        name = job["name"]
        t = store.tensor(name)
        shape, br, n = tuple(t["shape"]), t["block_rows"], t["nblocks"]
        rows = shape[0] if shape else 1

        def blocks(name=name, br=br, n=n, rows=rows):
            for i in range(n):
                r0, r1 = i * br, min(rows, (i + 1) * br)
                yield r0, r1, (task_rows(name, i, r0, r1) - shipped(name, i, r0, r1)).reshape(r1 - r0, -1)

        def target(name=name, br=br, n=n, rows=rows):
            for i in range(n):
                r0, r1 = i * br, min(rows, (i + 1) * br)
                yield r0, r1, task_rows(name, i, r0, r1).reshape(r1 - r0, -1)

        sources.append(DeltaSource(name, shape, blocks, target))
    return sources


def _export_lora(store: Store, out_dir: Path, decision: dict, rank: int, modules_to_save: str, **kw) -> dict:
    """The shipped model (as `routed`), one PEFT adapter per task under adapters/<task>/ that
    approximates that task's model against it, and the router (router/) when one was fitted.
    `modules_to_save`: see factor_into_adapter."""
    if rank < 1:
        raise StreammergeError(f"--rank {rank}: must be at least 1")
    reports: dict[str, dict] = {}

    def extra(tmp: Path) -> list[str]:
        for task in decision["tasks"]:
            sources = task_delta_sources(store, decision, task)
            tensors, config, report = factor_into_adapter(sources, rank, str(Path(out_dir).resolve()),
                                                          [t["name"] for t in store.tensors], modules_to_save=modules_to_save)
            summary = {"store": str(store.path), "task": task, "rank": rank, "modules_to_save": modules_to_save,
                       "dropped_share": dropped_share(report), "tensors": report}
            write_adapter_files(tmp / "adapters" / task, tensors, config, summary)
            reports[task] = report
        router = store.path / "inference" / "router"  # routing/router.py router_dir (routing imports export)
        if router.is_dir():
            shutil.copytree(router, tmp / "router")
        meta = {
            "format": ROUTING_FORMAT,
            "method": decision["method"],
            "tasks": decision["tasks"],
            "rank": rank,
            "model_shards": "model*.safetensors: " + ("the averaged model" if decision["method"] == "mediator" else "the base model theta_0"),
            "adapters": {t: f"adapters/{t}" for t in decision["tasks"]},
            "router": "router/" if router.is_dir() else None,
        }
        (tmp / "lora.json").write_text(json.dumps(meta, indent=1) + "\n")
        return ["adapters/", *(["router/"] if router.is_dir() else []), "lora.json"]

    block_fn = BaseBlocks(store) if decision["method"] == "1bit" else None
    info = export_store(store, out_dir, block_fn=block_fn, extra=extra, **kw)
    info["lora"] = {
        task: sorted(r["rel_error"] for r in rep.values() if r.get("rank")) for task, rep in reports.items()
    }
    info["lora_reports"] = reports  # every tensor's entry, the dropped ones included
    return info
