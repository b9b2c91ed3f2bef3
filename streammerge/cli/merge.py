"""The merge commands: plan, build, status, export, extract-lora, report, methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json
from .main import (BUILD_OPTIONS, DASK_OPTIONS, MODULES_TO_SAVE_OPTION, SIZE, WRITING_KEY, apply_options, human, main,
                   plan_safety, safety, safety_options, user_errors)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@apply_options(BUILD_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@safety_options("allow_pickle", "allow_crimes")
@user_errors
def plan(recipe: Path, workers: int, memory_limit: int, seed: int, block_elements, as_json: bool) -> None:
    """Dry run: list tensors, bytes, blocks and the memory estimate; reads only headers."""
    from ..plan.planner import make_plan
    from ..recipe import load_recipe

    p = make_plan(
        load_recipe(recipe),
        memory_limit=memory_limit,
        workers=workers,
        seed=seed,
        recipe_dir=recipe.parent,
        block_elems=block_elements,
        **plan_safety(),
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
@apply_options(BUILD_OPTIONS)
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
@apply_options(DASK_OPTIONS)
@safety_options("allow_nonfinite", "allow_pickle", "allow_crimes")
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
    from ..engine.device import start_device
    from ..engine.scheduler import dask_client

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
    from ..engine.job import build as run

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
        **safety(),
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    r = result.report
    if r.on_cpu:
        device = device.result().device if hasattr(device, "result") else device
        click.echo(f"note: no {device} kernel for {', '.join(r.on_cpu)}: computed on the CPU", err=True)
    verb = "resumed" if result.resumed else "built"
    # The device starts beside the planning (engine/device.py); the rest of its start-up is said
    # apart, so that the rate is the build's own.
    wait = result.device_wait if result.device_wait >= 0.05 else 0.0
    rate = r.input_bytes / (result.seconds - wait) if result.seconds > wait else 0
    waited = f", {wait:.1f}s of it waiting for the device to start" if wait else ""
    click.echo(
        f"{verb} {Path(store_path).absolute()}: {r.blocks_run} block(s) computed, {r.blocks_skipped} already done, "
        f"{human(r.input_bytes)} read in {result.seconds:.1f}s{waited} ({human(rate)}/s)"
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
    from ..store.store import Store

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
@apply_options(MODULES_TO_SAVE_OPTION)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@apply_options(DASK_OPTIONS)
@user_errors
def export(store, out, shard_size, dtype, workers, overwrite, variant, rank, modules_to_save, progress, scheduler,
           cluster):
    """Write a finished store as a Hugging Face model directory (sharded safetensors)."""
    from ..engine.scheduler import dask_client
    from ..store.store import Store

    st = Store.open(store)
    with dask_client(scheduler, cluster) as client:  # None: the threaded scheduler
        _export(st, out, shard_size, dtype, workers, overwrite, progress, client, variant=variant, rank=rank,
                modules_to_save=modules_to_save)


def _export(store, out, shard_size, dtype, workers, overwrite, progress, client=None, variant="merged", rank=32,
            modules_to_save="keep"):
    import time

    from ..export.variants import export_variant

    t0 = time.perf_counter()
    click.get_current_context().meta[WRITING_KEY] = out  # a full disk from here on is out's
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
@apply_options(MODULES_TO_SAVE_OPTION)
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
    from ..export.lora import extract_lora

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
    from ..export.lora import dropped_share

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
    from ..report import load_report, write_report

    if out is None and not as_json:
        raise click.UsageError("give -o OUTDIR (HTML report), --json (stdout), or both")
    rep = load_report(store)
    written = None
    if out is not None:
        click.get_current_context().meta[WRITING_KEY] = out  # a full disk from here on is out's
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
    from ..methods import get_method, method_names

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
    from ..recipe.example import example_recipe

    _print_method(m)
    click.echo("\nexample recipe:\n")
    click.echo("    " + example_recipe(m).rstrip("\n").replace("\n", "\n    "))


def _print_method(m) -> None:
    from ..methods.base import REQUIRED

    click.echo(f"{m.name}: {m.summary}  (base model: {m.base})")
    for p in m.params:
        default = "required" if p.default is REQUIRED else repr(p.default)
        click.echo(f"    {p.name:<18} {p.kind.__name__:<6} {p.scope:<6} default {default:<9} range {p.range_text():<24} {p.help}")
