"""`streammerge serve`: load the store's model, start the engine thread, serve the API."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import StreammergeError


def model_name(store: Path, name: str | None) -> str:
    n = name if name is not None else Path(store).name.removesuffix(".zarr")
    if not n or ":" in n or any(c.isspace() for c in n):
        raise StreammergeError(f"--name {n!r}: a model name has no ':' or spaces (NAME:task:T and NAME:static are derived)")
    return n


def build_engine(store: Path, device: str, dtype: str, max_batch: int, max_queue: int, memory_budget: int | str | None,
                 eta: float | None = None, top_m: int | None = None, fused: str = "auto"):
    """(engine, runner), the engine not started."""
    from .engine import Engine
    from .runner import ModelRunner
    from .scheduler import Scheduler

    runner = ModelRunner.from_store(store, device=device, dtype=dtype, memory_budget=memory_budget, eta=eta,
                                    top_m=top_m, fused=fused, max_batch=max_batch)
    scheduler = Scheduler(max_batch, runner.kv_bytes_per_token, runner.kv_budget, max_queue)
    return Engine(runner, scheduler), runner


def set_compute_threads(threads: int | str, device) -> str:
    """Set torch's intra-op threads for a server on `device`; returns what was chosen, for the
    start-up line. auto, on CPU: one fewer than the CPUs this process may run on (at most torch's
    own count, which OMP_NUM_THREADS sets). The HTTP front end and the engine's Python need a core
    of their own: with every core in torch's parallel regions, each region waits for the thread the
    front end preempted (2-core box, Mediator through the server: routed 66-68 % of static with 2
    threads, 70-76 % with 1; docs/serving.md). On a GPU the host threads only launch kernels: left
    as they are."""
    import os

    import torch

    if threads == "auto":
        if device.type != "cpu":
            return f"{torch.get_num_threads()} CPU thread(s)"
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        n = max(1, min(torch.get_num_threads(), cpus - 1))
        torch.set_num_threads(n)
        return f"{n} compute thread(s) of {cpus} CPU(s), one left to the HTTP front end" if cpus > 1 else "1 compute thread"
    torch.set_num_threads(int(threads))
    return f"{int(threads)} compute thread(s)"


def rebuild_note(runtime) -> str | None:
    """The start-up line telling a user of a 1bit store with lambda != 0 and no budget what it
    costs (README, Serving: 7-9x the static model's time a decoding step on CPU) and what helps."""
    rebuilt = runtime.rebuilt_tensors()
    if not rebuilt or runtime.memory_budget is not None:
        return None
    return (f"note: {rebuilt} routed tensor(s) have task terms no compressed delta gives (1bit, lambda != 0): "
            "with no memory budget every forward rebuilds them from all tasks' encodings (on CPU 7-9x the "
            "static model's time a decoding step); --memory-budget auto (the default) or a size lets the "
            "runtime keep them decoded")


def serve(store: Path, host: str, port: int, device: str, dtype: str, max_batch: int, max_queue: int,
          memory_budget: int | str | None, api_key: str | None, name: str | None, eta: float | None, top_m: int | None,
          fused: str = "auto", threads: int | str = "auto") -> None:
    import uvicorn

    from .api import create_app

    name = model_name(store, name)
    engine, runner = build_engine(store, device, dtype, max_batch, max_queue, memory_budget, eta, top_m, fused)
    app = create_app(engine, name, api_key=api_key)
    compute = set_compute_threads(threads, runner.device)
    engine.start()
    models = ([name] if runner.router is not None else []) + [f"{name}:static", f"{name}:task:<{'|'.join(runner.tasks)}>"]
    stacked, linears = runner.runtime.fused_layers()
    print(f"serving {', '.join(models)} on http://{host}:{port}/v1 ({runner.device}, {compute}, max batch {max_batch}; "
          f"fused {fused}: {stacked} of {linears} routed linear layers stacked)",
          file=sys.stderr, flush=True)
    for note in (runner.budget_note, rebuild_note(runner.runtime)):
        if note:
            print(note, file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
