"""The `streammerge` command line: plan, build, status, export, report, methods, router, generate, serve."""

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
from .limits import DOCUMENT, read_json

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
    click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
                 help="Seed for random methods (DARE, DELLA)."),
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
        "same paths on every worker. See README, Distributed.",
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


# extract-lora's and export --variant lora's: what becomes of the changed weights a LoRA cannot factor
_modules_to_save_option = [
    click.option(
        "--modules-to-save",
        type=click.Choice(["keep", "drop"]),  # export.lora.MODULES_TO_SAVE, not imported at start-up
        default="keep",
        show_default=True,
        help="Changed embeddings, lm_head and norms: keep saves them whole in PEFT's modules_to_save (exact; peft "
        "loads it, vLLM refuses it); drop leaves them out, writing the linear layers' LoRA factors only, which vLLM "
        "and SGLang serve, and reports each dropped tensor's ||delta|| and the share of the task vector lost.",
    ),
]


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
        "modules": p.module_models,
        "stacks": p.stacks,
        "tensors": len(p.jobs),
        "blocks": p.nblocks,
        "input_bytes": p.input_bytes,
        "read_bytes": p.read_bytes,
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
    for spec in [] if p.module_models else p.model_specs:
        click.echo(f"model         {spec}")
    for module, specs in p.module_models.items():
        click.echo(f"module        {module}: {', '.join(specs)}")
    if len(p.stacks) > 1:  # each stack numbers its own layers
        click.echo("stacks        " + ", ".join(f"{s}: {n} layers" for s, n in p.stacks.items()))
    click.echo(f"tensors       {len(p.jobs)}")
    click.echo(f"blocks        {p.nblocks} (up to {p.block_elems:,} elements each)")
    click.echo(f"input         {human(p.input_bytes)}")
    multi = p.read_bytes > p.input_bytes  # a method with passes reads (some of) its inputs again
    click.echo(f"read          {'up to ' if multi else ''}{human(p.read_bytes)} from disk"
               f"{', passes included' if multi else ''} (what the progress bar and build summary count)")
    click.echo(f"output        {human(p.output_bytes)}")
    mem = p.memory_estimate()
    libs = "dask, zarr" + (", transformers" if p.tokenizer_files is not None else "")
    click.echo(f"memory        ~{human(mem)} with {workers} worker(s): {human(p.baseline_bytes)} for the process (Python, numpy, "
               f"{libs}) + {human(mem - p.baseline_bytes)} of float32 blocks (inputs and work arrays per worker, writes queued)")
    for w in p.warnings:
        click.echo(f"warning: {w}", err=True)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--store", "store_path", type=click.Path(path_type=Path),
              help="Job store directory (created, or resumed). Default with OUT: OUT.zarr beside it.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), help="Also export the result to this directory (= OUT).")
@_apply(_build_options)
@click.option("--restart", is_flag=True, help="Discard an existing store for this path and start over.")
@click.option("--shard-size", "--out-shard-size", "shard_size", type=SIZE, default="5GB", show_default=True,
              help="With an output: max bytes per shard.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="With --export: output dtype.")
@click.option("--overwrite", is_flag=True, help="With --export: replace an existing output directory.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda[:N]",
    help="Where tensors are merged. cuda: each tensor is uploaded whole to the GPU and merged there "
    "(same bits as the CPU path); methods without a GPU kernel, and tensors too large for the GPU, stay "
    "on the CPU. auto: cuda when a GPU is present. Without a GPU, cuda falls back to the CPU with a message.",
)
@click.option("--cuda", is_flag=True, help="mergekit's flag: the same as --device cuda.")
@click.option("--copy-tokenizer", is_flag=True, hidden=True)  # mergekit's default, and ours: accepted, changes nothing
@click.option("--lazy-unpickle", is_flag=True, hidden=True)  # mergekit's flag: accepted with a note (see below)
@_apply(_dask_options)
@_safety_options("allow_nonfinite", "allow_pickle", "allow_crimes")
@user_errors
def build(
    recipe, out, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype, overwrite,
    progress, device, cuda, copy_tokenizer, lazy_unpickle, scheduler, cluster,
):
    """Run (or resume) the merge described by RECIPE; with OUT, export the merged model there.

    `streammerge build recipe.yaml merged/` works as `mergekit-yaml recipe.yaml merged/` does;
    the job store (resume state) is then merged.zarr beside it unless --store says otherwise.
    Running the same command again resumes where it stopped, and exits at once when OUT is
    already this store's complete export. A store whose recipe or inputs changed is refused;
    --restart discards it. mergekit's --out-shard-size, --random-seed, --cuda, --allow-crimes
    and --copy-tokenizer (tokenizer files are always copied) work here; --lazy-unpickle is
    accepted and does nothing (inputs are always read lazily; pickles need --allow-pickle).
    """
    from .engine.device import start_device
    from .engine.scheduler import dask_client

    if out is not None and export_dir is not None and Path(out) != Path(export_dir):
        raise click.UsageError(f"OUT ({out}) and --export ({export_dir}) name different directories: give one")
    export_dir = export_dir if export_dir is not None else out
    if store_path is None:
        if export_dir is None:
            raise click.UsageError("give an output directory (streammerge build RECIPE OUT) or a job store (--store PATH)")
        store_path = export_dir.parent / f"{export_dir.name}.zarr"
        click.echo(f"store: {store_path.absolute()} (resume state: run the same command again to resume)", err=True)
    if lazy_unpickle:
        click.echo("note: --lazy-unpickle does nothing here: inputs are always read lazily (pickles need --allow-pickle)",
                   err=True)
    if cuda:
        device = "cuda"
    choice = start_device(device)  # torch and CUDA start while the build plans (engine/device.py)
    with dask_client(scheduler, cluster) as client:  # None: the threaded scheduler
        _build(recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype,
               overwrite, progress, client, choice)


def _note_device_choice(future) -> None:
    """Say why a requested device is not used, once the choice is made (the error, if any, is
    raised where the build waits for it)."""
    if future.exception() is None and future.result().message:
        click.echo(f"note: {future.result().message}", err=True)


def _build(recipe, store_path, export_dir, workers, memory_limit, seed, block_elements, restart, shard_size, dtype,
           overwrite, progress, client, device=None):
    """`device`: a torch device string, None, or a future of the DeviceChoice (start_device)."""
    from .engine.job import build as run

    if hasattr(device, "add_done_callback"):
        device.add_done_callback(_note_device_choice)
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
        device=device,
        export=None if export_dir is None else dict(out_dir=export_dir, shard_size=shard_size, dtype=dtype, overwrite=overwrite),
        **_safety(),
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    r = result.report
    if r.on_cpu:
        device = device.result().device if hasattr(device, "result") else device
        click.echo(f"note: no {device} kernel for {', '.join(r.on_cpu)}: computed on the CPU", err=True)
    verb = "resumed" if result.resumed else "built"
    rate = r.input_bytes / result.seconds if result.seconds > 0 else 0
    click.echo(
        f"{verb} {Path(store_path).absolute()}: {r.blocks_run} block(s) computed, {r.blocks_skipped} already done, "
        f"{human(r.input_bytes)} read in {result.seconds:.1f}s ({human(rate)}/s)"
    )
    _print_storage(result.store)
    if result.export is not None:
        _print_exported(result.export)


def _print_storage(store) -> None:
    """Routing methods: bytes per component and the share of full routing (N fine-tuned models)."""
    p = store.path / "storage.json"
    if not p.is_file():
        return
    info = read_json(p, DOCUMENT.named("storage.json"))
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
    "routed (model shards + experts/encodings + routing.json for a runtime), or lora (model shards + one PEFT "
    "LoRA adapter per task under adapters/, for serving engines' multi-LoRA routing).",
)
@click.option("--rank", type=click.IntRange(1), default=32, show_default=True,
              help="With --variant lora: the adapters' rank (each approximates its task's model by a randomized SVD).")
@_apply(_modules_to_save_option)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@_apply(_dask_options)
@user_errors
def export(store, out, shard_size, dtype, workers, overwrite, variant, rank, modules_to_save, progress, scheduler,
           cluster):
    """Write a finished store as a Hugging Face model directory (sharded safetensors)."""
    from .engine.scheduler import dask_client
    from .store.store import Store

    st = Store.open(store)
    with dask_client(scheduler, cluster) as client:  # None: the threaded scheduler
        _export(st, out, shard_size, dtype, workers, overwrite, progress, client, variant=variant, rank=rank,
                modules_to_save=modules_to_save)


def _export(store, out, shard_size, dtype, workers, overwrite, progress, client=None, variant="merged", rank=32,
            modules_to_save="keep"):
    import time

    from .export.variants import export_variant

    t0 = time.perf_counter()
    click.get_current_context().meta[_WRITING] = out  # a full disk from here on is out's
    info = export_variant(
        store, out, variant, rank=rank, modules_to_save=modules_to_save, shard_size=shard_size, dtype=dtype,
        workers=workers, overwrite=overwrite, progress=progress, scheduler=client,
    )
    info["seconds"] = time.perf_counter() - t0
    _print_exported(info)
    for task, errs in info.get("lora", {}).items():
        if errs:
            click.echo(f"adapter {task}: {len(errs)} tensor(s), relative error median {errs[len(errs) // 2]:.4f}, "
                       f"worst {errs[-1]:.4f}")
        _print_dropped(f"adapter {task}", info["lora_reports"][task])


def _print_exported(info: dict) -> None:
    if info.get("already"):
        click.echo(f"exported {Path(info['path']).absolute()}: already this store's complete export; nothing written")
        return
    extra = info.get("extra_files") or []  # routed: the routing files beside the model's shards
    besides = f" + {', '.join(extra)}" if extra else ""
    size = info["total_size"] + info.get("extra_size", 0)
    click.echo(f"exported {Path(info['path']).absolute()}: {len(info['files'])} shard(s){besides}, {human(size)} "
               f"in {info['seconds']:.1f}s")


@main.command("extract-lora")
@click.argument("finetune")
@click.option("--base", required=True, help="The base model the fine-tune was trained from (directory or org/name).")
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path), metavar="ADAPTER_DIR",
              help="Directory for the PEFT adapter (adapter_config.json, adapter_model.safetensors).")
@click.option("--rank", "-r", required=True, type=click.IntRange(1), help="LoRA rank (the largest; see --sv-epsilon).")
@click.option("--sv-epsilon", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Drop singular values at or below this (absolute, as mergekit-extract-lora): lower ranks per tensor.")
@_apply(_modules_to_save_option)
@click.option("--include", multiple=True, metavar="REGEX", help="Only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip tensors whose name matches (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD's sketches.")
@click.option("--overwrite", is_flag=True, help="Replace ADAPTER_DIR if it exists (only once the new one is complete).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def extract_lora_cmd(finetune, base, out, rank, sv_epsilon, modules_to_save, include, exclude, seed, overwrite, progress):
    """Factor FINETUNE - BASE into a LoRA adapter (PEFT format), out of core.

    Every 2-D weight's task vector is approximated at rank R by a randomized SVD whose passes
    stream the tensor's row blocks (memory: the rank-R sketches and one block). Embeddings,
    lm_head and norms, when changed, are saved whole (modules_to_save), or dropped with
    --modules-to-save drop for vLLM and SGLang. The relative error of each tensor, and what was
    dropped, is printed and kept in ADAPTER_DIR/extraction.json. Load the result with
    `peft.PeftModel.from_pretrained(base_model, ADAPTER_DIR)`.
    """
    from .export.lora import extract_lora

    if progress is None:
        progress = sys.stderr.isatty()
    info = extract_lora(finetune, base, out, rank, modules_to_save=modules_to_save, sv_epsilon=sv_epsilon,
                        include=list(include), exclude=list(exclude), seed=seed, overwrite=overwrite, progress=progress)
    factored = {n: t for n, t in info["tensors"].items() if t.get("rank")}
    errs = sorted(t["rel_error"] for t in factored.values())
    worst = max(factored, key=lambda n: factored[n]["rel_error"])
    click.echo(f"extracted {len(factored)} tensor(s) at rank <= {rank} into {out.resolve()}")
    click.echo(f"relative error ||delta - BA|| / ||delta||: median {errs[len(errs) // 2]:.4f}, "
               f"worst {errs[-1]:.4f} ({worst})")
    whole = [n for n, t in info["tensors"].items() if t.get("saved_whole")]
    if whole:  # every norm of a 70B model is a long line: the count and the first few
        more = f", ... ({len(whole)} in all)" if len(whole) > 4 else ""
        click.echo(f"saved whole (modules_to_save): {', '.join(whole[:4])}{more}")
    _print_dropped("adapter", info["tensors"])


def _print_dropped(what: str, tensors: dict) -> None:
    """One line naming the changed tensors the adapter does not carry and their share of the task vector."""
    from .export.lora import dropped_share

    dropped = {n: t["delta_norm"] for n, t in tensors.items() if t.get("dropped")}
    if dropped:
        worst = max(dropped, key=dropped.get)
        click.echo(f"{what}: dropped {len(dropped)} changed tensor(s) without a LoRA form, "
                   f"{100 * dropped_share(tensors):.2f} % of the task vector's norm "
                   f"(largest {worst}: ||delta|| {dropped[worst]:.4g}; see extraction.json)")


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
@click.argument("name", required=False)
@user_errors
def methods(name) -> None:
    """List the merge methods and their parameters; with NAME, one method and an example recipe.

    \b
      streammerge methods          # every method, its parameters and their ranges
      streammerge methods ties     # one method, with an example recipe
    """
    from .methods import get_method, method_names

    if name is None:
        for n in method_names():
            _print_method(get_method(n))
        return
    try:
        m = get_method(name)
    except KeyError:
        import difflib

        near = difflib.get_close_matches(name, method_names(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise StreammergeError(f"methods: unknown merge method {name!r} ({hint}available: {', '.join(method_names())})") from None
    from .recipe.example import example_recipe

    _print_method(m)
    click.echo("\nexample recipe:\n")
    click.echo("    " + example_recipe(m).rstrip("\n").replace("\n", "\n    "))


def _print_method(m) -> None:
    from .methods.base import REQUIRED

    click.echo(f"{m.name}: {m.summary}  (base model: {m.base})")
    for p in m.params:
        default = "required" if p.default is REQUIRED else repr(p.default)
        click.echo(f"    {p.name:<18} {p.kind.__name__:<6} {p.scope:<6} default {default:<9} range {p.range_text():<24} {p.help}")


# ---- inference for routing stores (streammerge/routing): router fit / show, generate ----------


def _quiet_transformers() -> None:
    """No transformers progress bars or advisory warnings on the command line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the routing module says what is missing
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


_DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N."
_DTYPE_OPTION = click.option(
    "--dtype",
    "compute_dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Compute dtype of the model (auto: float32 on CPU, the store's dtype on GPU).",
)


@main.group()
def router() -> None:
    """The task router of a mediator or 1bit store.

    \b
      streammerge router fit job.zarr --prompts math=math.jsonl --prompts code=code.jsonl --prompts chat=chat.jsonl
      streammerge router fit job.zarr --prompts ... --background general.jsonl
      streammerge router show job.zarr
    """


@router.command("fit")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_specs", multiple=True, required=True, metavar="TASK=FILE",
              help="Labelled prompts: JSON Lines with a 'prompt' (or 'text') field; TASK is one of the store's tasks "
              "(method.json). Repeat for each task.")
@click.option("--background", "background", multiple=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Prompts of none of the tasks (JSON Lines, as --prompts), e.g. general text like the base model's: "
              "the router learns a 'none' class, whose expert is the merged model. Prompts unlike every task then "
              "lean towards the merged model instead of being sent to one expert with confidence. Repeatable.")
@click.option("--classifier", type=click.Choice(["mlp", "logreg"]), default="mlp", show_default=True,
              help="mlp: Twin-Merging's router (d->2d->2d->N, BatchNorm, LeakyReLU, dropout); logreg: logistic regression.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of each task's prompts held out to measure accuracy (0: train on all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, the initialisation and the batches.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs (default: 40 mlp, 100 logreg).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Adam learning rate (default: 1e-3 mlp, 1e-2 logreg).")
@click.option("--batch-size", type=click.IntRange(2), default=32, show_default=True, help="Training mini-batch size.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Prompt tokens the features read (the first ones).")
@click.option("--device", default="auto", show_default=True, help="Where the merged model computes the features: " + _DEVICE_HELP)
@_DTYPE_OPTION
@user_errors
def router_fit(store, prompt_specs, background, classifier, holdout, seed, epochs, lr, batch_size, max_tokens, device, compute_dtype):
    """Fit the task router on labelled prompts; saved in STORE/inference/router/.

    Features are the mean last hidden state of the merged model (exported once to
    STORE/inference/merged/). Prints the held-out accuracy.
    """
    from .routing.prompts import parse_labelled
    from .routing.router import fit_router

    _quiet_transformers()
    rep = fit_router(
        store, parse_labelled(prompt_specs), background=background, classifier=classifier, holdout=holdout, seed=seed,
        epochs=epochs, lr=lr, batch_size=batch_size, max_tokens=max_tokens, device=device, dtype=compute_dtype,
    )
    for t in rep["tasks_without_prompts"]:
        click.echo(f"warning: task {t} has no prompts: the router never picks it", err=True)
    click.echo(f"router ({classifier}, {rep['dim']}-d features) fit on {rep['n_train']} prompt(s), {rep['n_heldout']} held out, "
               f"in {rep['seconds']['total']:.1f}s")
    held = rep["heldout"]
    if held["accuracy"] is not None:
        per = ", ".join(f"{t} {100 * a:.1f}%" for t, a in held["per_task"].items())
        click.echo(f"held-out accuracy {100 * held['accuracy']:.1f}% ({per}); train {100 * rep['train']['accuracy']:.1f}%")
    else:
        click.echo(f"train accuracy {100 * rep['train']['accuracy']:.1f}% (no held-out split)")
    click.echo(f"saved {rep['path']}")


@router.command("show")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print router.json.")
@user_errors
def router_show(store, as_json):
    """The fitted router: classifier, tasks, prompts, accuracy."""
    from .routing.decision import NONE
    from .routing.router import router_dir
    from .store.store import Store

    st = Store.open(store)
    p = router_dir(st) / "router.json"
    if not p.is_file():
        raise StreammergeError(f"{store}: no router fitted; run `streammerge router fit {store} --prompts TASK=FILE ...`")
    meta = read_json(p, DOCUMENT.named("router.json"))
    if as_json:
        click.echo(json.dumps(meta, indent=1))
        return
    click.echo(f"classifier  {meta['classifier']} ({meta['dim']}-d features, seed {meta['seed']})")
    click.echo(f"tasks       {', '.join(meta['tasks'])}")
    for t, info in meta["prompts"].items():
        click.echo(f"prompts     {t}: {info['prompts']} ({', '.join(info['files']) or 'given in Python'})")
    if meta.get("background"):
        bg = meta["background"]
        click.echo(f"background  {bg['prompts']} ({', '.join(bg['files']) or 'given in Python'}): class {NONE}, the merged model")
    held = meta["heldout"]
    if held["accuracy"] is not None:
        click.echo(f"held-out    {100 * held['accuracy']:.1f}% of {held['n']}")
    click.echo(f"train       {100 * meta['train']['accuracy']:.1f}% of {meta['train']['n']}")
    if meta.get("store_digest") != st.digest:
        click.echo("warning: fit on another build of this store: fit it again", err=True)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", "prompt_texts", multiple=True, help="A prompt (repeatable).")
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Prompts as JSON Lines with a 'prompt' (or 'text') field.")
@click.option("--output", "-o", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JSON Lines: each input record plus 'output', 'routing' and 'new_tokens'.")
@click.option("--show-routing", is_flag=True, help="Print each prompt's task probabilities, entropy and the weights applied.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy; > 0: sampling.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="With --temperature.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Prompts decoded together, whatever their routing decisions.")
@click.option("--task", default=None, help="Skip the router: every prompt gets this task's weights.")
@click.option("--static", is_flag=True, help="Skip the router: the merged (static) model.")
@click.option("--eta", type=click.FloatRange(0, 1), default=None, help="Mediator: entropy threshold (default: method.json's).")
@click.option("--top-m", type=click.IntRange(0), default=None, help="Mediator: experts mixed when uncertain (0: all; default: method.json's).")
@click.option("--memory-budget", type=SIZE, default=None,
              help="Device memory for the weights: the model, the encodings and a cache of decoded deltas "
              "(e.g. 2GB; faster where it fits). Default: no cache.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@_DTYPE_OPTION
@user_errors
def generate(store, prompt_texts, input_path, output_path, show_routing, max_new_tokens, temperature, top_p, seed, batch_size,
             task, static, eta, top_m, memory_budget, device, compute_dtype):
    """Generate with the routed model of a mediator or 1bit store.

    Each prompt is routed (router fit first) and answered with the base model's tokenizer and
    chat template; prompts with different decisions decode together, each batch row adding its
    own task's delta, computed from the store's encodings, to the shared weights' products.

    \b
      streammerge generate job.zarr --prompt "What is 17*23?" --show-routing
      streammerge generate job.zarr --input prompts.jsonl --output answers.jsonl --device cuda
    """
    import os
    import uuid

    from .routing.model import RoutedModel
    from .routing.prompts import read_prompt_records

    if task is not None and static:
        raise click.UsageError("give --task or --static, not both")
    records = [(p, {"prompt": p}) for p in prompt_texts]
    if input_path is not None:
        records += read_prompt_records(input_path)
    if not records:
        raise click.UsageError("give --prompt TEXT or --input FILE")
    _quiet_transformers()
    use_router = task is None and not static
    rm = RoutedModel.from_store(store, device=device, dtype=compute_dtype, router=use_router, eta=eta, top_m=top_m,
                                memory_budget=memory_budget)
    gens = rm.generate(
        [text for text, _ in records], max_new_tokens=max_new_tokens, batch_size=batch_size, task=task, static=static,
        temperature=temperature, top_p=top_p, seed=seed, details=True,
    )
    if output_path is not None:
        click.get_current_context().meta[_WRITING] = output_path  # a full disk from here on is its
        output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = output_path.with_name(f".{output_path.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for (_, rec), g in zip(records, gens):
                    f.write(json.dumps({**rec, "output": g.text, "routing": g.decision.as_dict(), "new_tokens": g.new_tokens},
                                       ensure_ascii=False) + "\n")
            os.replace(tmp, output_path)
        finally:
            if tmp.exists():
                tmp.unlink()
    for i, g in enumerate(gens):
        if show_routing:
            click.echo(f"routing: {rm.describe(g.decision)}")
        if output_path is None:
            click.echo(g.text)
            if i + 1 < len(gens):
                click.echo("")
    if output_path is not None:
        applied: dict[str, int] = {}
        for g in gens:
            label = g.decision.task or g.decision.mode
            applied[label] = applied.get(label, 0) + 1
        t = rm.timings
        click.echo(
            f"wrote {len(gens)} answer(s) to {output_path} ({', '.join(f'{k} {v}' for k, v in applied.items())}; "
            f"{t.new_tokens} tokens in {t.generate_s:.1f}s)"
        )



@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Only this machine can connect unless you give another (then use --api-key).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@_DTYPE_OPTION
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Requests decoded together in one forward pass; more wait in the queue.")
@click.option("--max-queue", type=click.IntRange(0), default=256, show_default=True,
              help="Requests waiting beyond --max-batch; a request beyond that gets 429 with Retry-After.")
@click.option("--memory-budget", type=SIZE, default=None,
              help="Device memory for weights plus KV cache (e.g. 20GB); requests wait while their KV cache "
              "would not fit. Default: no limit but --max-batch.")
@click.option("--api-key", default=None, envvar="STREAMMERGE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--name", default=None, help="Model name clients use (default: the store's name without .zarr).")
@click.option("--eta", type=click.FloatRange(0, 1), default=None, help="Mediator: entropy threshold (default: method.json's).")
@click.option("--top-m", type=click.IntRange(0), default=None, help="Mediator: experts mixed when uncertain (default: method.json's).")
@click.option("--fused", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Routed linear layers of a decoding step as one stacked product (the shared weight and every "
              "task's delta, within --memory-budget): auto = on CUDA for small batches, where it was measured faster.")
@user_errors
def serve(store, host, port, device, compute_dtype, max_batch, max_queue, memory_budget, api_key, name, eta, top_m, fused):
    """Serve a mediator or 1bit store behind an OpenAI-compatible HTTP API.

    \b
    Models (NAME: --name, default the store's name):
      NAME           routed per request by the store's router (router fit first)
      NAME:task:T    forced to task T
      NAME:static    the merged model
    \b
    Routes: POST /v1/completions, POST /v1/chat/completions (the base tokenizer's chat template),
    GET /v1/models, GET /health, GET /metrics (Prometheus). Responses carry a `routing` field.
    \b
      streammerge serve job.zarr --port 8000
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "job", "prompt": "What is 17*23?", "max_tokens": 32, "temperature": 0}'
    """
    from .serve.server import serve as run_server

    _quiet_transformers()
    run_server(store, host, port, device, compute_dtype, max_batch, max_queue, memory_budget, api_key, name, eta, top_m, fused)

if __name__ == "__main__":
    main()
