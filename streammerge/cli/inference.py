"""The commands for routing stores: router fit / show, generate, serve."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json
from .main import BUDGET, THREADS, WRITING_KEY, main, user_errors


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
    from ..routing.prompts import parse_labelled
    from ..routing.router import fit_router

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
    from ..routing.decision import NONE
    from ..routing.router import router_dir
    from ..store.store import Store

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
@click.option("--memory-budget", type=BUDGET, default="auto", show_default=True,
              help="Device memory for the weights: the model, the encodings and a cache of decoded deltas "
              "(e.g. 2GB; faster where it fits). auto: the model and the encodings plus 80% of the GPU's free "
              "memory after loading them (CUDA), or half of the available memory (CPU; a memory cgroup's limit "
              "counted); none: no cache.")
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
    from ..fsutil import atomic_write
    from ..routing.model import RoutedModel
    from ..routing.prompts import read_prompt_records

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
        click.get_current_context().meta[WRITING_KEY] = output_path  # a full disk from here on is its
        output_path.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({**rec, "output": g.text, "routing": g.decision.as_dict(), "new_tokens": g.new_tokens},
                            ensure_ascii=False) + "\n" for (_, rec), g in zip(records, gens))
        atomic_write(output_path, "".join(lines).encode("utf-8"))
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
@click.option("--memory-budget", type=BUDGET, default="auto", show_default=True,
              help="Device memory for the weights, a cache of decoded deltas and the KV cache (e.g. 20GB); "
              "requests wait while their KV cache would not fit. auto: the model and the encodings plus 80% of "
              "the GPU's free memory after loading them (CUDA), or half of the available memory (CPU; a memory "
              "cgroup's limit counted). none: no cache, and no limit but --max-batch.")
@click.option("--api-key", default=None, envvar="STREAMMERGE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--name", default=None, help="Model name clients use (default: the store's name without .zarr).")
@click.option("--eta", type=click.FloatRange(0, 1), default=None, help="Mediator: entropy threshold (default: method.json's).")
@click.option("--top-m", type=click.IntRange(0), default=None, help="Mediator: experts mixed when uncertain (default: method.json's).")
@click.option("--fused", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Routed linear layers of a decoding step as one stacked product (the shared weight and every "
              "task's delta, within --memory-budget): auto = on CUDA for small batches, where it was measured faster.")
@click.option("--threads", type=THREADS, default="auto", show_default=True,
              help="torch's compute threads, for the decoding steps and for the router's forward each (they run "
              "beside each other). auto: on CPU one fewer than the CPUs (the HTTP front end keeps one; measured "
              "faster on 2 cores), on CUDA torch's default.")
@user_errors
def serve(store, host, port, device, compute_dtype, max_batch, max_queue, memory_budget, api_key, name, eta, top_m, fused,
          threads):
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
    from ..serve.server import serve as run_server

    _quiet_transformers()
    run_server(store, host, port, device, compute_dtype, max_batch, max_queue, memory_budget, api_key, name, eta, top_m, fused,
               threads)
