"""The `streammerge` command line: plan, build, status, export, methods."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import click

from .errors import StreammergeError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'800MB' -> 800e6 bytes, '2GiB' -> 2 * 2**30, '1024' -> 1024."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise click.BadParameter(f"{text!r} is not a size such as 800MB, 2GB or 1.5GiB")
    number, unit, binary = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * ((1024 if binary else 1000) ** power))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def user_errors(fn):
    """Print StreammergeError as one line and exit 1 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StreammergeError as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to resume where it stopped", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="streammerge")
def main(debug: bool) -> None:
    """Merge fine-tunes of one base model, out of core.

    Recipes are mergekit YAML files. A build streams the checkpoints block by block into a
    resumable job store (a zarr directory); `export` writes it as a Hugging Face model.

    \b
      streammerge plan   recipe.yaml
      streammerge build  recipe.yaml --store job.zarr --export out/
      streammerge status job.zarr
      streammerge export job.zarr out/ --shard-size 5GB
    """


_build_options = [
    click.option("--workers", "-j", type=click.IntRange(1), default=2, show_default=True, help="Worker threads."),
    click.option(
        "--memory-limit",
        type=SIZE,
        default="2GB",
        show_default=True,
        help="Memory budget for the whole process; sets the rows per block (e.g. 800MB, 4GiB).",
    ),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods (DARE, DELLA)."),
    click.option(
        "--block-elements",
        type=click.IntRange(1),
        default=None,
        help="Elements per row block, overriding the size derived from --memory-limit (fixed when a store is created).",
    ),
]


def _apply(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_apply(_build_options)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(recipe: Path, workers: int, memory_limit: int, seed: int, block_elements, as_json: bool) -> None:
    """Dry run: list tensors, bytes, blocks and the memory estimate; reads only headers."""
    from .plan.planner import make_plan
    from .recipe import load_recipe

    p = make_plan(
        load_recipe(recipe),
        memory_limit=memory_limit,
        workers=workers,
        seed=seed,
        recipe_dir=recipe.parent,
        block_elems=block_elements,
    )
    info = {
        "method": p.method.name,
        "base_model": p.base_spec,
        "models": p.model_specs,
        "tensors": len(p.jobs),
        "blocks": p.nblocks,
        "input_bytes": p.input_bytes,
        "output_bytes": p.output_bytes,
        "block_elements": p.block_elems,
        "workers": workers,
        "memory_estimate_bytes": p.memory_estimate(),
        "warnings": p.warnings,
    }
    if as_json:
        info["tensor_list"] = [
            {"name": j.name, "shape": list(j.shape), "dtype": j.dtype, "block_rows": j.block_rows, "blocks": j.nblocks}
            for j in p.jobs
        ]
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"method        {p.method.name}")
    click.echo(f"base model    {p.base_spec or '-'}")
    for spec in p.model_specs:
        click.echo(f"model         {spec}")
    click.echo(f"tensors       {len(p.jobs)}")
    click.echo(f"blocks        {p.nblocks} (up to {p.block_elems:,} elements each)")
    click.echo(f"input         {human(p.input_bytes)}")
    click.echo(f"output        {human(p.output_bytes)}")
    click.echo(f"memory        ~{human(p.memory_estimate())} with {workers} worker(s)")
    for w in p.warnings:
        click.echo(f"warning: {w}", err=True)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path), help="Job store directory (created, or resumed).")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), help="Also export the result to this directory.")
@_apply(_build_options)
@click.option("--restart", is_flag=True, help="Discard an existing store for this path and start over.")
@click.option("--shard-size", type=SIZE, default="5GB", show_default=True, help="With --export: max bytes per shard.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="With --export: output dtype.")
@click.option("--overwrite", is_flag=True, help="With --export: replace an existing output directory.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def build(recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype, overwrite, progress):
    """Run (or resume) the merge described by RECIPE into a job store.

    Running it again on the same store resumes where it stopped. A store whose recipe or
    inputs changed is refused; --restart discards it.
    """
    from .engine.job import build as run

    result = run(
        recipe,
        store_path,
        workers=workers,
        memory_limit=memory_limit,
        seed=seed,
        restart=restart,
        progress=progress,
        block_elems=block_elements,
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    r = result.report
    verb = "resumed" if result.resumed else "built"
    rate = r.input_bytes / result.seconds if result.seconds > 0 else 0
    click.echo(
        f"{verb} {store_path}: {r.blocks_run} block(s) computed, {r.blocks_skipped} already done, "
        f"{human(r.input_bytes)} read in {result.seconds:.1f}s ({human(rate)}/s)"
    )
    if export_dir is not None:
        _export(result.store, export_dir, shard_size, dtype, workers, overwrite, progress)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def status(store: Path, as_json: bool) -> None:
    """Blocks done / total, per stage, for a job store."""
    from .store.store import MERGE_STAGE, Store

    s = Store.open(store)
    done, total = s.progress(MERGE_STAGE)
    info = {
        "store": str(store),
        "method": s.manifest["method"],
        "stages": {MERGE_STAGE: {"done": done, "total": total}},
        "complete": done == total,
        "tensors_complete": sum(len(s.done_blocks(MERGE_STAGE, t["name"])) == t["nblocks"] for t in s.tensors),
        "tensors": len(s.tensors),
    }
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"store    {store}  ({info['method']})")
    pct = 100.0 * done / total if total else 100.0
    click.echo(f"{MERGE_STAGE:<8} {done}/{total} blocks ({pct:.1f}%), {info['tensors_complete']}/{info['tensors']} tensors")
    click.echo("complete" if done == total else "incomplete: run `streammerge build` again to resume")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", type=SIZE, default="5GB", show_default=True, help="Max bytes per safetensors shard.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Output dtype (default: the store's).")
@click.option("--workers", "-j", type=click.IntRange(1), default=2, show_default=True, help="Worker threads.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new export is complete).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def export(store, out, shard_size, dtype, workers, overwrite, progress):
    """Write a finished store as a Hugging Face model directory (sharded safetensors)."""
    from .store.store import Store

    _export(Store.open(store), out, shard_size, dtype, workers, overwrite, progress)


def _export(store, out, shard_size, dtype, workers, overwrite, progress):
    import time

    from .export.hf import export_store

    t0 = time.perf_counter()
    info = export_store(store, out, shard_size=shard_size, dtype=dtype, workers=workers, overwrite=overwrite, progress=progress)
    click.echo(f"exported {out}: {len(info['files'])} shard(s), {human(info['total_size'])} in {time.perf_counter() - t0:.1f}s")


@main.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from .methods import get_method, method_names
    from .methods.base import REQUIRED

    for name in method_names():
        m = get_method(name)
        click.echo(f"{name}: {m.summary}  (base model: {m.base})")
        for p in m.params:
            default = "required" if p.default is REQUIRED else repr(p.default)
            click.echo(f"    {p.name:<18} {p.kind.__name__:<6} {p.scope:<6} default {default}  {p.help}")


if __name__ == "__main__":
    main()
