"""A build job: plan → (create | check and resume) store → run → optionally export.

This is what `streammerge build` does, as a function tests and other tools can call.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..checkpoints.buffers import copy_buffer
from ..checkpoints.chat_template import write_chat_template
from ..checkpoints.tokenizer import write_tokenizer_files
from ..errors import StoreError
from ..limits import DOCUMENT, read_bounded
from ..export.hf import HF_FILES, copy_hf_files, is_export_of, record_export, tensor_files, write_tensor_files
from ..plan.planner import Plan, make_plan
from ..recipe import Recipe, load_recipe
from ..recipe.diff import describe_changes
from ..store.store import FORMAT, TAKEOVER_FILE, Store, StoreLock
from .build import BuildReport, run_build

CONVERTED_DIR = "converted"  # <store>/converted/<key>/: pickle checkpoints as safetensors (--allow-pickle)


@dataclass
class JobResult:
    store: Store
    report: BuildReport
    seconds: float
    resumed: bool
    litter_removed: int
    warnings: list[str] = field(default_factory=list)
    export: dict | None = None  # with `export=`: files, total_size, path, seconds
    device_wait: float = 0.0  # of `seconds`: waiting for a device started beside the planning (torch, CUDA)


def manifest_for(plan: Plan, recipe_text: str) -> dict:
    recipe = plan.recipe
    return {
        "format": FORMAT,
        "streammerge_version": __version__,
        "recipe": {"text": recipe_text, "hash": recipe.recipe_hash(), "canonical": json.loads(recipe.canonical_json())},
        "method": plan.method.name,
        "seed": plan.seed,
        "inputs": {spec: input_manifest(ck) for spec, ck in plan.checkpoints.items()},
        "hf_source": str(plan.hf_source.directory),
        "tensors": tensors_manifest(plan.jobs),
        "buffers": [b.manifest() for b in plan.buffers],
        "jobs": jobs_manifest(plan.jobs),
        "vocabulary": plan.vocabulary,
    }


def input_manifest(ck) -> dict:
    """Where an input was read from (its adapter's directory too, for the model card) and its
    files' fingerprints (what resuming checks)."""
    info = {"directory": str(ck.directory), "files": ck.fingerprint()}
    if ck.adapter is not None:
        info["adapter"] = str(ck.adapter)
    return info


def jobs_manifest(jobs) -> list[dict]:
    return [
        {
            "stage": j.stage,
            "key": j.store_key,
            "name": j.name,
            "shape": list(j.shape),
            "block_rows": j.block_rows,
            "nblocks": j.nblocks,
            "outputs": [
                {"name": o.name, "dtype": o.dtype, "trailing": None if o.trailing is None else list(o.trailing), "blob": o.blob}
                for o in (j.output_list if (j.method is None or j.method.merge is not None) else ())
            ],
        }
        for j in jobs
    ]


def tensors_manifest(jobs) -> list[dict]:
    """The model tensors export writes: the main output of merge-stage jobs at tensors/<name>."""
    return [
        {"name": j.name, "shape": list(j.shape), "dtype": j.dtype, "block_rows": j.block_rows, "nblocks": j.nblocks}
        for j in jobs
        if j.stage == "merge" and j.store_key == f"tensors/{j.name}"
    ]


def what_changed(old: dict, new: dict) -> str | None:
    """A one-line description of why a store no longer matches the job, or None if it does."""
    if old["recipe"]["hash"] != new["recipe"]["hash"]:
        changes = describe_changes(old["recipe"]["canonical"], new["recipe"]["canonical"])
        return f"the recipe changed since the store was started ({changes})"
    if old.get("seed") != new.get("seed"):
        return f"the seed changed since the store was started ({old.get('seed')} -> {new.get('seed')})"
    for spec, info in new["inputs"].items():
        before = old["inputs"].get(spec)
        if before is None:
            return f"input {spec} was not part of this store"
        for fname, fp in info["files"].items():
            prev = before["files"].get(fname)
            if prev is None:
                return f"input {spec}: {fname} is new since the store was started"
            diffs = [k for k in ("size", "mtime_ns", "header_sha256") if prev.get(k) != fp.get(k)]
            if diffs:
                return f"input {spec}: {fname} changed since the store was started ({', '.join(diffs)})"
        gone = set(before["files"]) - set(info["files"])
        if gone:
            return f"input {spec}: {sorted(gone)[0]} is gone since the store was started"
    if "vocabulary" in old:  # (stores made before it was recorded: not compared)
        change = vocabulary_changed(old["vocabulary"], new["vocabulary"])
        if change:
            return change
    # Later phases add jobs to the store's manifest: the new plan's jobs must all be there, alike.
    before_jobs = {j["key"]: (j["shape"], j["outputs"]) for j in old["jobs"]}
    for j in new["jobs"]:
        if before_jobs.get(j["key"]) != (j["shape"], j["outputs"]):
            return f"the planned output {j['key']} differs from the store's"
    return None


def vocabulary_changed(old: dict | None, new: dict | None) -> str | None:
    """Why the rows of a `tokenizer` build no longer match the store (Vocabulary.fingerprint), or None."""
    if old == new or old is None or new is None:
        return None  # with no vocabulary before or after, the recipe's tokenizer settings changed: said above
    for spec, digest in new["inputs"].items():
        if old["inputs"].get(spec) != digest:
            return f"input {spec}: its tokenizer or vocab_size changed since the store was started"
    return "the built tokenizer changed since the store was started"


def build(
    recipe_path: str | Path,
    store_path: str | Path,
    *,
    workers: int = 2,
    memory_limit: int = 2 * 2**30,
    seed: int = 0,
    restart: bool = False,
    progress: bool | None = None,
    recipe: Recipe | None = None,
    block_elems: int | None = None,
    scheduler=None,
    cluster: str | None = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    allow_crimes: bool = False,
    device: "str | None | Future" = None,
    export: dict | None = None,
) -> JobResult:
    """allow_nonfinite: merge inputs holding NaN/Inf (refused by default); allow_pickle: load
    pickle checkpoints with torch.load(weights_only=True), converted once into <store>/converted;
    allow_crimes: merge models whose config.json names different architectures; device: a torch
    device ("cuda") for methods with a kernel (engine/device.py), None for the numpy CPU path, or
    a future of a DeviceChoice (engine.device.start_device), awaited once the store is ready;
    export: also export the merged model, `OpenExport` keywords (out_dir, shard_size, dtype,
    overwrite). A new store then keeps a static merge's tensors as that export's shards, which
    the export hard-links: the merged model is written once."""
    recipe_path = Path(recipe_path)
    store_path = Path(store_path)
    recipe = recipe or load_recipe(recipe_path)  # first: a missing recipe is a one-line error
    recipe_text = recipe_path.read_text()
    plan = make_plan(
        recipe,
        memory_limit=memory_limit,
        workers=workers,
        seed=seed,
        recipe_dir=recipe_path.parent,
        block_elems=block_elems,
        allow_crimes=allow_crimes,
        pickle_cache=store_path / CONVERTED_DIR if allow_pickle else None,
    )
    if allow_nonfinite:
        plan = _nonfinite_allowed(plan)
    full_plan = plan
    if plan.method.pipeline:  # routing methods: phase A (analysis) now, phase B once it is done
        from ..plan.routed import analysis_jobs

        plan = replace(plan, jobs=analysis_jobs(plan))
    manifest = manifest_for(plan, recipe_text)
    if export is not None and not plan.method.pipeline:
        # the merged tensors are kept as the export's shards: the export links them (written once)
        files = tensor_files(manifest, shard_size=export.get("shard_size", 5 * 10**9), dtype=export.get("dtype"))
        if files is not None:
            manifest["tensor_files"] = files

    t0 = time.perf_counter()
    if store_path.exists() and not store_path.is_dir():
        raise StoreError(f"{store_path}: exists and is not a directory")
    store_path.mkdir(parents=True, exist_ok=True)
    with StoreLock(store_path):
        resumed = Store.exists(store_path) and not restart
        if resumed:
            store = Store.open(store_path)
            change = what_changed(store.manifest, manifest)
            if change:
                raise StoreError(f"{store_path}: {change}; use --restart to discard the store and start over")
            plan = plan.with_block_rows({j["key"]: j["block_rows"] for j in store.jobs})
            litter = store.clean_litter()
        else:
            _clear(store_path, restart)
            copy_hf_files(plan.hf_source.directory, store_path / "hf", plan.config_overrides)
            if plan.tokenizer_files is not None:
                write_tokenizer_files(store_path / "hf", plan.tokenizer_files, HF_FILES)
            if plan.chat_template is not None:
                write_chat_template(store_path / "hf", plan.chat_template)
            store = Store.create(store_path, manifest, functools.partial(write_tensor_files, manifest=manifest))
            litter = 0
        for i, b in enumerate(plan.buffers):
            if not store.has_buffer(i):
                copy_buffer(b, store.buffer_path(i))
        device_wait = 0.0
        if isinstance(device, Future):  # started beside the planning: needed from here on
            waited = time.perf_counter()
            device = device.result().device
            device_wait = time.perf_counter() - waited
        run = dict(workers=workers, progress=progress, scheduler=scheduler, cluster=cluster, device=device)
        exported = None
        if resumed and export is not None and _exported_already(store, export):
            # the same `build --export OUT` run again on a finished store: nothing to build or write
            exported = {"path": str(export["out_dir"]), "already": True}
            export = None
        # opened first, so that an existing OUT is refused before any work; routing methods add
        # their tensors in phase B: their export opens once the build is done
        exporting = _open_export(store, export) if export is not None and not full_plan.method.pipeline else None
        try:
            report = run_build(plan, store, **run)
            if full_plan.method.pipeline:
                report = _routed_phase_b(full_plan, plan, store, report, run)
        except BaseException:
            if exporting is not None:
                exporting.abort()
            raise
        seconds = time.perf_counter() - t0
        if export is not None:
            t1 = time.perf_counter()
            exporting = exporting or _open_export(store, export)
            exported = exporting.finish(workers=workers, progress=progress, scheduler=scheduler, cluster=cluster)
            record_export(store, exporting.out_dir, dtype=export.get("dtype"), shard_size=export.get("shard_size", 5 * 10**9))
            exported["seconds"] = time.perf_counter() - t1
    return JobResult(store, report, seconds, resumed, litter, plan.warnings, exported, device_wait)


def _exported_already(store: Store, export: dict) -> bool:
    """Whether the export asked for (OpenExport keywords) exists as this finished store's complete export."""
    out = Path(export["out_dir"])
    return (not export.get("overwrite") and out.is_dir() and store.is_complete()
            and is_export_of(store, out, dtype=export.get("dtype"), shard_size=export.get("shard_size", 5 * 10**9)))


def _open_export(store: Store, export: dict):
    from ..export.hf import OpenExport

    return OpenExport(store, **export)


def _routed_phase_b(full_plan: Plan, analysis_plan: Plan, store: Store, report: BuildReport, run: dict) -> BuildReport:
    """Summarize the analysis, decide (routed layers / precision plan), build the rest."""
    from ..analysis.summary import summarize
    from ..checkpoints.stacks import Stacks
    from ..plan.routed import decide, phase_b_jobs, storage, task_names
    from ..fsutil import atomic_write

    per_tensor = {j.name: store.load_stats(j.stage, j.store_key) for j in analysis_plan.jobs}
    # layers per stack, from the tensors merged: the text decoder's first, a vision tower's apart
    counts = Stacks.of([j.name for j in full_plan.jobs], None).layers
    primary = next(iter(counts), None)
    others = {s: n for s, n in counts.items() if s != primary and n}
    denoised = float(full_plan.jobs[0].params.globals.get("denoise_q", 1.0)) < 1.0
    summary = summarize(per_tensor, task_names(full_plan), counts.get(primary, 0), denoised, others)
    atomic_write(store.path / "analysis.json", json.dumps(summary, indent=1).encode())
    decision = decide(full_plan, summary)
    atomic_write(store.path / "method.json", json.dumps(decision, indent=1).encode())
    jobs = phase_b_jobs(full_plan, decision)
    known = {j["key"]: j["block_rows"] for j in store.jobs}
    jobs = [replace(j, block_rows=known.get(j.store_key, j.block_rows)) for j in jobs]
    store.add_jobs(jobs_manifest(jobs), tensors_manifest(jobs))
    second = run_build(replace(full_plan, jobs=jobs), store, **run)
    atomic_write(store.path / "storage.json", json.dumps(storage(store, full_plan, decision), indent=1).encode())
    return BuildReport(
        blocks_run=report.blocks_run + second.blocks_run,
        blocks_skipped=report.blocks_skipped + second.blocks_skipped,
        input_bytes=report.input_bytes + second.input_bytes,
        on_cpu=tuple(sorted({*report.on_cpu, *second.on_cpu})),
    )


def _nonfinite_allowed(plan: Plan) -> Plan:
    """--allow-nonfinite: every input handle lets NaN/Inf through. The flag is on the handles, so
    it reaches every task wherever it runs (threads here, or dask.distributed workers)."""

    def off(h):
        return h if h is None else replace(h, check_finite=False)

    checkpoints = {
        spec: replace(ck, tensors={n: off(h) for n, h in ck.tensors.items()}) for spec, ck in plan.checkpoints.items()
    }
    jobs = [replace(j, base=off(j.base), models=tuple(off(h) for h in j.models)) for j in plan.jobs]
    return replace(plan, checkpoints=checkpoints, jobs=jobs)


def _written_by_us(zarr_json: Path) -> bool:
    """A zarr.json streammerge wrote names it; one over the JSON size limit is not ours."""
    try:
        return b"streammerge" in read_bounded(zarr_json, DOCUMENT, StoreError)
    except (OSError, StoreError):
        return False


def _clear(store_path: Path, restart: bool) -> None:
    """Empty the directory for a new store; only ever deletes what a streammerge store contains."""
    # the lock (and its takeover flock file) are ours to keep; converted/ is a cache of pickle
    # conversions the plan already uses
    entries = [p for p in store_path.iterdir() if p.name not in ("lock", TAKEOVER_FILE, CONVERTED_DIR)]
    if not entries:
        return
    zarr_json = store_path / "zarr.json"
    ours = Store.exists(store_path) or (zarr_json.is_file() and _written_by_us(zarr_json))
    # A creation killed (or out of space) while copying hf/, before zarr.json: only hf/ files.
    hf = store_path / "hf"
    ours = ours or all(
        (p == hf and p.is_dir() and not p.is_symlink() and all(f.name in HF_FILES for f in p.iterdir()))
        or (p.name.startswith(".lock.") and p.name.endswith(".partial"))
        for p in entries
    )
    if not ours:
        raise StoreError(f"{store_path}: exists and is not a streammerge store; choose another path")
    if Store.exists(store_path) and not restart:
        raise StoreError(f"{store_path}: already holds a job")  # unreachable from build(); kept as a guard
    # manifest.json first: killed midway, what is left is an unfinished creation, never a job
    entries.sort(key=lambda p: p.name != "manifest.json")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
