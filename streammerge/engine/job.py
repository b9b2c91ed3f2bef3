"""A build job: plan → (create | check and resume) store → run → optionally export.

This is what `streammerge build` does, as a function tests and other tools can call.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import StoreError
from ..export.hf import copy_hf_files
from ..plan.planner import Plan, make_plan
from ..recipe import Recipe, load_recipe
from ..store.store import FORMAT, Store, StoreLock
from .build import BuildReport, run_build


@dataclass
class JobResult:
    store: Store
    report: BuildReport
    seconds: float
    resumed: bool
    litter_removed: int
    warnings: list[str] = field(default_factory=list)


def manifest_for(plan: Plan, recipe_text: str) -> dict:
    recipe = plan.recipe
    return {
        "format": FORMAT,
        "streammerge_version": __version__,
        "recipe": {"text": recipe_text, "hash": recipe.recipe_hash(), "canonical": json.loads(recipe.canonical_json())},
        "method": plan.method.name,
        "seed": plan.seed,
        "inputs": {
            spec: {"directory": str(ck.directory), "files": ck.fingerprint()} for spec, ck in plan.checkpoints.items()
        },
        "hf_source": str(plan.hf_source.directory),
        "tensors": [
            {"name": j.name, "shape": list(j.shape), "dtype": j.dtype, "block_rows": j.block_rows, "nblocks": j.nblocks}
            for j in plan.jobs
        ],
    }


def what_changed(old: dict, new: dict) -> str | None:
    """A one-line description of why a store no longer matches the job, or None if it does."""
    if old["recipe"]["hash"] != new["recipe"]["hash"]:
        a, b = old["recipe"]["canonical"], new["recipe"]["canonical"]
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"the recipe changed since the store was started (fields: {', '.join(keys) or 'formatting'})"
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
    shapes_old = [(t["name"], t["shape"], t["dtype"]) for t in old["tensors"]]
    shapes_new = [(t["name"], t["shape"], t["dtype"]) for t in new["tensors"]]
    if shapes_old != shapes_new:
        return "the planned output tensors differ from the store's"
    return None


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
) -> JobResult:
    recipe_path = Path(recipe_path)
    store_path = Path(store_path)
    recipe_text = recipe_path.read_text()
    recipe = recipe or load_recipe(recipe_path)
    plan = make_plan(
        recipe,
        memory_limit=memory_limit,
        workers=workers,
        seed=seed,
        recipe_dir=recipe_path.parent,
        block_elems=block_elems,
    )
    manifest = manifest_for(plan, recipe_text)

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
            plan = plan.with_block_rows({t["name"]: t["block_rows"] for t in store.tensors})
            litter = store.clean_litter()
        else:
            _clear(store_path, restart)
            copy_hf_files(plan.hf_source.directory, store_path / "hf", plan.config_overrides)
            store = Store.create(store_path, manifest)
            litter = 0
        report = run_build(plan, store, workers=workers, progress=progress)
    return JobResult(store, report, time.perf_counter() - t0, resumed, litter, plan.warnings)


def _clear(store_path: Path, restart: bool) -> None:
    """Empty the directory for a new store; only ever deletes what a streammerge store contains."""
    entries = [p for p in store_path.iterdir() if p.name != "lock"]
    if not entries:
        return
    zarr_json = store_path / "zarr.json"
    ours = Store.exists(store_path) or (zarr_json.is_file() and "streammerge" in zarr_json.read_text())
    if not ours:
        raise StoreError(f"{store_path}: exists and is not a streammerge store; choose another path")
    if Store.exists(store_path) and not restart:
        raise StoreError(f"{store_path}: already holds a job")  # unreachable from build(); kept as a guard
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
