"""The `streammerge` command line: plan, build, status, export, methods."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import re
import signal
import sys
import threading
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
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except StreammergeError as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:  # a full disk is the user's to fix, and resumable: one line, exit 1
            if e.errno not in _DISK_FULL or click.get_current_context().find_root().params.get("debug"):
                raise
            ctx = click.get_current_context()
            # an export names OUT (not its hidden temporary); else the file (filename2: a copy's
            # destination, shutil names the source first), else the store
            where = ctx.meta.get(_WRITING) or e.filename2 or e.filename or kwargs.get("store_path") or kwargs.get("out")
            click.echo(f"error: {where}: no space left on device; free some space and run the same command "
                       "again to resume", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            click.echo("interrupted: run the same command again to resume where it stopped", err=True)
            sys.exit(getattr(e, "exit_code", 130))

    return wrapper


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_WRITING = "streammerge.writing"  # ctx.meta key: the output being written (names a full disk)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs; exit 143."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM stops it like SIGINT (locks released, temporaries removed).

    The first SIGTERM raises `Terminated`; the handler then reverts to the default, so a second
    one ends the process at once (the store stays valid either way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_SAFETY = "streammerge.safety"  # ctx.meta key: the --allow-* flags of this command


def _safety_options(*names):
    """Add the --allow-* flags `names` to a command; they reach the engine through `_safety()`."""
    helps = {
        "allow_nonfinite": "Merge inputs that hold NaN or Inf (refused by default, naming the tensor and index).",
        "allow_pickle": "Load pickle checkpoints (.bin, .pt) with torch.load(weights_only=True), converted once to "
        "safetensors (in the store). Only for files you trust.",
        "allow_crimes": "Merge models whose config.json names different architectures or model types.",
    }

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            click.get_current_context().meta[_SAFETY] = {n: bool(kwargs.pop(n)) for n in names}
            return fn(*args, **kwargs)

        for n in reversed(names):
            wrapper = click.option(f"--{n.replace('_', '-')}", n, is_flag=True, help=helps[n])(wrapper)
        return wrapper

    return deco


def _safety() -> dict:
    return dict(click.get_current_context().meta.get(_SAFETY, {}))


def _plan_safety() -> dict:
    """make_plan's keywords for `plan`: pickles are converted into a temporary directory."""
    flags = _safety()
    cache = None
    if flags.get("allow_pickle"):
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="streammerge-plan-")
        click.get_current_context().call_on_close(tmp.cleanup)
        cache = Path(tmp.name)
    return {"allow_crimes": flags.get("allow_crimes", False), "pickle_cache": cache}


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

# Where the dask graph runs (default: threads in this process). Needs `streammerge[distributed]`.
_dask_options = [
    click.option(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="Run on an existing dask.distributed cluster (e.g. tcp://host:8786); inputs and store must be at the "
        "same paths on every worker. See docs/distributed.md.",
    ),
    click.option(
        "--cluster",
        metavar="local:N",
        default=None,
        callback=lambda ctx, param, value: _check_cluster(value),
        help="Start a dask LocalCluster of N worker processes (1 thread each) for this command.",
    ),
]


def _check_cluster(value):
    if value is not None:
        from .engine.scheduler import parse_cluster

        try:
            parse_cluster(value)
        except StreammergeError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None
    return value


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
@_safety_options("allow_pickle", "allow_crimes")
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
        **_plan_safety(),
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
@_apply(_dask_options)
@_safety_options("allow_nonfinite", "allow_pickle", "allow_crimes")
@user_errors
def build(
    recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype, overwrite, progress,
    scheduler, cluster,
):
    """Run (or resume) the merge described by RECIPE into a job store.

    Running it again on the same store resumes where it stopped. A store whose recipe or
    inputs changed is refused; --restart discards it.
    """
    from .engine.scheduler import dask_client

    with dask_client(scheduler, cluster) as client:  # None: the threaded scheduler
        _build(recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype,
               overwrite, progress, client)


def _build(recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype,
           overwrite, progress, client):
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
        scheduler=client,
        **_safety(),
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
    _print_storage(result.store)
    if export_dir is not None:
        _export(result.store, export_dir, shard_size, dtype, workers, overwrite, progress, client)


def _print_storage(store) -> None:
    """Routing methods: bytes per component and the share of full routing (N fine-tuned models)."""
    p = store.path / "storage.json"
    if not p.is_file():
        return
    info = json.loads(p.read_text())
    click.echo("storage:")
    for c in info["components"]:
        click.echo(f"  {c['name']:<40} {human(c['bytes']):>12}")
    click.echo(
        f"  {'total':<40} {human(info['total_bytes']):>12}  = {100 * info['share_of_full_routing']:.1f}% of full routing "
        f"({info['n_tasks']} models, {human(info['full_routing_bytes'])})"
    )


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@user_errors
def status(store: Path, as_json: bool) -> None:
    """Blocks done / total, per stage, for a job store."""
    from .store.store import Store

    s = Store.open(store)
    stages = {}
    for stage in s.stages():
        done, total = s.progress(stage)
        jobs = [j for j in s.jobs if j["stage"] == stage]
        stages[stage] = {"done": done, "total": total, "jobs": len(jobs), "jobs_complete": sum(map(s.job_done, jobs))}
    complete = s.is_complete()
    info = {"store": str(store), "method": s.manifest["method"], "stages": stages, "complete": complete}
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"store    {store}  ({info['method']})")
    for stage, st in stages.items():
        pct = 100.0 * st["done"] / st["total"] if st["total"] else 100.0
        click.echo(f"{stage:<8} {st['done']}/{st['total']} blocks ({pct:.1f}%), {st['jobs_complete']}/{st['jobs']} tensors")
    click.echo("complete" if complete else "incomplete: run `streammerge build` again to resume")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", type=SIZE, default="5GB", show_default=True, help="Max bytes per safetensors shard.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Output dtype (default: the store's).")
@click.option("--workers", "-j", type=click.IntRange(1), default=2, show_default=True, help="Worker threads.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new export is complete).")
@click.option(
    "--variant",
    default="merged",
    show_default=True,
    help="Routing stores (mediator, 1bit): merged (the static model), task:NAME (the model routed to task NAME), "
    "or routed (model shards + experts/encodings + routing.json for a runtime).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@_apply(_dask_options)
@user_errors
def export(store, out, shard_size, dtype, workers, overwrite, variant, progress, scheduler, cluster):
    """Write a finished store as a Hugging Face model directory (sharded safetensors)."""
    from .engine.scheduler import dask_client
    from .store.store import Store

    st = Store.open(store)
    with dask_client(scheduler, cluster) as client:  # None: the threaded scheduler
        _export(st, out, shard_size, dtype, workers, overwrite, progress, client, variant=variant)


def _export(store, out, shard_size, dtype, workers, overwrite, progress, client=None, variant="merged"):
    import time

    from .export.variants import export_variant

    t0 = time.perf_counter()
    click.get_current_context().meta[_WRITING] = out  # a full disk from here on is out's
    info = export_variant(
        store, out, variant, shard_size=shard_size, dtype=dtype, workers=workers, overwrite=overwrite, progress=progress,
        scheduler=client,
    )
    click.echo(f"exported {out}: {len(info['files'])} shard(s), {human(info['total_size'])} in {time.perf_counter() - t0:.1f}s")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out", type=click.Path(path_type=Path), metavar="OUTDIR",
              help="Write index.html and the PNG figures here (created; our files in it are replaced).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (analysis, method, storage, derived summary, figures written) to stdout; "
              "with -o it also writes OUTDIR, without -o it writes nothing.")
@user_errors
def report(store: Path, out, as_json: bool) -> None:
    """Report on a mediator or 1bit build: conflict per layer, routing, norm shares, storage.

    \b
      streammerge report job.zarr -o report/          # open report/index.html in a browser
      streammerge report job.zarr --json              # the numbers only, on stdout
      streammerge report job.zarr -o report/ --json   # both
    """
    from .report import load_report, write_report

    if out is None and not as_json:
        raise click.UsageError("give -o OUTDIR (HTML report), --json (stdout), or both")
    rep = load_report(store)
    written = None
    if out is not None:
        click.get_current_context().meta[_WRITING] = out  # a full disk from here on is out's
        written = write_report(rep, out)
    if as_json:
        doc = {k: rep[k] for k in ("store", "built_with", "method", "analysis", "storage", "summary")}
        doc["html"] = written["html"] if written else None
        doc["figures"] = written["figures"] if written else []
        click.echo(json.dumps(doc, indent=1))
        return
    for w in rep["summary"]["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {written['html']} and {len(written['figures'])} figure(s)")


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
