#!/usr/bin/env python
"""Kill `streammerge build` / `streammerge export` anywhere, resume, and check the result is identical.

For each merge method: build and export once without interruption (the reference), then run the
same commands on a fresh store in a loop, SIGKILLing each process after a random delay (from
startup and planning through store creation, merging and export) and running the same command
again, until the requested number of kills has landed. The final export's sha256 must equal the
reference's. After every kill it also checks that:

  * every completion marker's block holds exactly the reference's bytes (a marker never stands
    for a half-written block), whether in a zarr chunk or, in place, in the store's shards (a
    store created by `build --export`);
  * the output directory is either absent or a complete export identical to the reference;

and at the end that no `.partial` litter is left in the store nor `.OUT.partial-*` / `.OUT.old-*`
directories beside the output, and that the lock is released.

    python tools/fault_inject.py --kills 20 --methods task_arithmetic,ties,slerp

Exit status 0 when every check passed. Used by tests/test_fault_injection.py with fewer kills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth_checkpoints as synth  # noqa: E402

DEFAULT_SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)


def recipe_for(method: str, base: Path, fts: list[Path]) -> dict:
    """A small recipe of `method` over the synthetic family."""
    if method in ("slerp", "nearswap"):
        params = {"t": 0.4} if method == "slerp" else {"t": 0.01}
        return {"merge_method": method, "base_model": str(base), "models": [{"model": str(base)}, {"model": str(fts[0])}],
                "parameters": params, "dtype": "bfloat16"}
    weights = [0.5, 0.3, 0.2]
    models = []
    for f, w in zip(fts, weights):
        p: dict = {"weight": w}
        if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
            p["density"] = 0.5
        models.append({"model": str(f), "parameters": p})
    r = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        r["base_model"] = str(base)
    return r


def sha_dir(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


def streammerge(*args) -> list[str]:
    return [sys.executable, "-m", "streammerge", *map(str, args)]


def run_ok(cmd: list[str], timeout: float = 600) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


# ---- store inspection (file level, independent of the engine's code) --------------------------


def _markers(store: Path):
    """(array key relative to the store, block) for every completion marker of the merge stage."""
    root = store / "done" / "merge"
    if not root.is_dir():
        return
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for f in files:
            if not f.isdigit():
                continue
            # tensors/<name> (zarr.json absent where the store keeps the tensor in a shard), or
            # an array of another stage, or a bare tensor name (stores of older versions)
            key = rel if rel.parts[0] == "tensors" or (store / rel / "zarr.json").is_file() else Path("tensors") / rel
            yield key, int(f)


def _chunk_file(store: Path, key: Path, block: int) -> Path:
    meta = json.loads((store / key / "zarr.json").read_text())
    ndim = len(meta["shape"])
    enc = meta.get("chunk_key_encoding", {})
    sep = (enc.get("configuration") or {}).get("separator", "/")
    parts = [str(block)] + ["0"] * (ndim - 1)
    if enc.get("name", "default") == "default":
        return store / key / ("c" + sep + sep.join(parts))
    return store / key / sep.join(parts)


ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def _block_bytes(store: Path, key: Path, block: int) -> tuple[Path, bytes | None]:
    """(file, bytes) of block `block` of array `key`, its rows only (no chunk padding): from its
    zarr chunk, or from its shard where the manifest's tensor_files keeps the tensor there."""
    manifest = json.loads((store / "manifest.json").read_text())
    files = manifest.get("tensor_files") or {}
    name = key.relative_to("tensors").as_posix() if key.parts[0] == "tensors" else None
    if name in files.get("offsets", {}):
        t = next(t for t in manifest["tensors"] if t["name"] == name)
        shape = t["shape"] or [1]
        row_bytes = ITEMSIZE[t["dtype"]] * int(np.prod(shape[1:], dtype=np.int64))
        rows = min(t["block_rows"], shape[0] - block * t["block_rows"])
        fname, start = files["offsets"][name]
        path = store / files["dir"] / fname
        with open(path, "rb") as f:
            f.seek(start + block * t["block_rows"] * row_bytes)
            return path, f.read(rows * row_bytes)
    meta = json.loads((store / key / "zarr.json").read_text())
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    row_bytes = np.dtype(meta["data_type"]).itemsize * int(np.prod(chunks[1:], dtype=np.int64))
    rows = min(chunks[0], shape[0] - block * chunks[0])
    path = _chunk_file(store, key, block)
    return path, path.read_bytes()[: rows * row_bytes] if path.is_file() else None


def check_store(store: Path, ref: Path) -> tuple[int, int]:
    """Every marked block equals the reference's; returns (markers, .partial files)."""
    n = 0
    for key, block in _markers(store):
        (mine, data), (_, theirs) = _block_bytes(store, key, block), _block_bytes(ref, key, block)
        if data is None:
            raise AssertionError(f"{store}: marker {key}/{block} but no chunk file {mine}")
        if data != theirs:
            raise AssertionError(f"{store}: marker {key}/{block} but its bytes in {mine} differ from the reference")
        n += 1
    partial = sum(1 for _d, _s, files in os.walk(store) for f in files if f.endswith(".partial")) if store.is_dir() else 0
    return n, partial


def export_litter(out: Path) -> list[str]:
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-") or p.name.startswith(f".{out.name}.old-"))


def count_markers(store: Path) -> int:
    return sum(1 for _ in _markers(store))


def phase_of(store: Path, out: Path, markers_before: int, is_export: bool) -> str:
    """Where a kill landed, from what is on disk (and the markers when the command started)."""
    if export_litter(out):
        return "export (writing shards)"
    if not store.is_dir() or not any(p.name != "lock" for p in store.iterdir()):
        return "startup/plan"
    if not (store / "manifest.json").is_file():
        return "store creation"
    if is_export:
        return "export (startup or rename)"
    if count_markers(store) > markers_before:
        return "merge"
    return "startup/plan/resume"


# ---- the loop -----------------------------------------------------------------------------------


def pick_trigger(rng: random.Random, is_export: bool, t_start: float, t_est: float, blocks_left: int):
    """When to kill: after a random delay, around the end of startup, or at a random point of the
    merge (after a random number of new markers) or of the shard writing (after the temporary
    export directory appears, plus a random delay)."""
    r = rng.random()
    if r < 0.25:
        return ("delay", rng.uniform(0.0, 1.1 * t_est))
    if r < 0.45:
        return ("startup", rng.uniform(0.8, 1.3) * t_start)
    if is_export:
        return ("writing", rng.uniform(0.0, max(0.05, t_est - t_start)))
    return ("blocks", rng.randint(1, max(1, blocks_left)))


def wait_for_trigger(proc: subprocess.Popen, trigger, store: Path, out: Path, before: int) -> bool:
    """Wait until the trigger fires (True: kill now) or the process ends (False)."""
    kind, value = trigger
    if kind in ("delay", "startup"):
        try:
            proc.wait(timeout=value)
            return False
        except subprocess.TimeoutExpired:
            return True
    deadline = time.perf_counter() + 120
    while proc.poll() is None and time.perf_counter() < deadline:
        if kind == "blocks" and count_markers(store) >= before + value:
            return True
        if kind == "writing" and export_litter(out):
            try:
                proc.wait(timeout=value)
                return False
            except subprocess.TimeoutExpired:
                return True
        time.sleep(0.002)
    return proc.poll() is None




@dataclass
class MethodReport:
    method: str
    kills: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    completed_runs: int = 0
    rounds: int = 0
    max_partial_seen: int = 0
    identical: bool = False
    blocks: int = 0


def inject(method: str, base: Path, fts: list[Path], work: Path, kills: int, rng: random.Random, *,
           block_elements: int, workers: int, log=print) -> MethodReport:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(method, base, fts), sort_keys=False))
    common = ["--workers", workers, "--no-progress"]
    build = lambda store: streammerge("build", recipe, "--store", store, "--block-elements", block_elements, *common)  # noqa: E731
    export = lambda store, out: streammerge("export", store, out, "--overwrite", *common)  # noqa: E731

    ref_store, ref_out = work / "ref.zarr", work / "ref_out"
    for p in (ref_store, ref_out):
        shutil.rmtree(p, ignore_errors=True)
    t_build = run_ok(build(ref_store))
    t_export = run_ok(export(ref_store, ref_out))
    t_start = run_ok(streammerge("plan", recipe, "--block-elements", block_elements))  # import + headers
    want = sha_dir(ref_out)
    status = json.loads(subprocess.run(streammerge("status", ref_store, "--json"), capture_output=True, text=True, check=True).stdout)
    rep = MethodReport(method, blocks=status["stages"]["merge"]["total"])
    log(f"[{method}] reference: {rep.blocks} blocks, build {t_build:.1f}s, export {t_export:.1f}s")

    store, out = work / "job.zarr", work / "out"
    while rep.kills < kills:
        rep.rounds += 1
        for p in (store, out):
            shutil.rmtree(p, ignore_errors=True)
        for name in export_litter(out):
            shutil.rmtree(out.parent / name, ignore_errors=True)
        # one round: build (sometimes with --export) until complete, then export until complete
        cmds = [build(store) + (["--export", out, "--overwrite"] if rng.random() < 0.3 else []), export(store, out)]
        est = [t_build + (t_export if "--export" in cmds[0] else 0), t_export]
        for cmd, t_est in zip(cmds, est):
            while True:
                is_export = cmd[3] == "export"
                before = count_markers(store)
                trigger = None if rng.random() < 0.3 else pick_trigger(rng, is_export, t_start, t_est, rep.blocks - before)
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if trigger is not None and wait_for_trigger(proc, trigger, store, out, before):
                    phase = phase_of(store, out, before, is_export)
                    proc.kill()  # SIGKILL
                    proc.communicate()
                    rep.kills += 1
                    rep.phases[phase] = rep.phases.get(phase, 0) + 1
                    _, partial = check_store(store, ref_store) if (store / "manifest.json").is_file() else (0, 0)
                    rep.max_partial_seen = max(rep.max_partial_seen, partial)
                    if out.exists() and sha_dir(out) != want:
                        raise AssertionError(f"[{method}] after a kill, {out} exists but differs from the reference")
                    log(f"[{method}] kill {rep.kills}/{kills} after {time.perf_counter() - t0:.2f}s ({trigger[0]}) in {phase}"
                        f"{f' ({partial} .partial file(s) left)' if partial else ''}")
                    if rep.kills >= kills:
                        break
                    continue  # run the same command again
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise AssertionError(f"[{method}] {' '.join(map(str, cmd))} failed ({proc.returncode}): "
                                         f"{err.decode(errors='replace').strip()[-2000:]}")
                rep.completed_runs += 1
                break
            if rep.kills >= kills:
                break

    # finish: the same commands, uninterrupted, then the checks
    run_ok(build(store))
    run_ok(export(store, out))
    markers, partial = check_store(store, ref_store)
    if partial:
        raise AssertionError(f"[{method}] {partial} .partial file(s) left in {store} after a complete build")
    if markers != rep.blocks:
        raise AssertionError(f"[{method}] {markers} markers, expected {rep.blocks}")
    if (store / "lock").exists():
        raise AssertionError(f"[{method}] {store / 'lock'} left behind")
    litter = export_litter(out)
    if litter:
        raise AssertionError(f"[{method}] temporary export directories left beside {out}: {litter}")
    got = sha_dir(out)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise AssertionError(f"[{method}] the export after {rep.kills} kills differs from the reference: {diff}")
    rep.identical = True
    log(f"[{method}] {rep.kills} kills over {rep.rounds} round(s), phases {rep.phases}: export identical "
        f"(sha256 of {len(got)} files)")
    return rep


def run(kills: int, methods: list[str], work: Path, *, seed: int = 0, block_elements: int = 256, workers: int = 2,
        shape: synth.ModelShape = DEFAULT_SHAPE, log=print) -> list[MethodReport]:
    rng = random.Random(seed)
    base, fts = synth.make_family(work / "models", shape, n_finetunes=3, dtype="bfloat16")
    per = [kills // len(methods) + (1 if i < kills % len(methods) else 0) for i in range(len(methods))]
    return [
        inject(m, base, fts, work / m, k, rng, block_elements=block_elements, workers=workers, log=log)
        for m, k in zip(methods, per)
        if k > 0
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="total SIGKILLs, spread over the methods (default 20)")
    ap.add_argument("--methods", default="task_arithmetic,ties,slerp", help="comma-separated merge methods")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    ap.add_argument("--block-elements", type=int, default=256, help="elements per block (small: many blocks)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    tmp = None
    work = args.workdir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="streammerge-faults-")
        work = Path(tmp)
    try:
        reports = run(args.kills, methods, work, seed=args.seed, block_elements=args.block_elements, workers=args.workers)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(r.kills for r in reports)
    phases: dict[str, int] = {}
    for r in reports:
        for k, v in r.phases.items():
            phases[k] = phases.get(k, 0) + v
    print(f"OK: {total} kills over {len(reports)} method(s) ({', '.join(methods)}), phases {phases}; "
          f"every final export identical to its uninterrupted reference ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
