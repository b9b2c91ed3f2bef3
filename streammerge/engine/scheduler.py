"""Where a dask graph runs: the local threaded scheduler (default) or a dask.distributed cluster.

`build` and `export` both hand their graph to `run_graph`:

- no `scheduler` and no `cluster`: `dask.threaded.get` with `workers` threads in this process,
  progress through the `BytesProgress` dask callback (nothing to start, no extra dependency);
- `cluster="local:N"`: a `distributed.LocalCluster` of N worker processes (one thread each) is
  started for the duration of the call (or of a `dask_client` block) and closed afterwards;
- `scheduler="tcp://host:8786"`: the graph runs on an existing cluster; the inputs and the store
  must be at the same paths on every worker (a shared filesystem): this is checked before any
  task is submitted.
- `scheduler=<distributed.Client>`: an open client (see `dask_client`), so that `build --export`
  starts one LocalCluster for both graphs.

Under dask.distributed the graph's arguments are pickled and sent to the workers: tensor handles
(path, offset, dtype, shape), the job store (its path and a manifest digest: `Store.__getstate__`),
the output writer (directory and file names: `ShardedWriter.__getstate__`) and merge methods (by
registry name): a few KB per task, never tensor data. Each worker process reads the input files
and reopens the store lazily. Progress: `dask.diagnostics` callbacks do not fire under a
distributed client, so the same tqdm bar is fed from an `as_completed` loop over the futures.

`distributed` is an optional dependency (`pip install 'streammerge[distributed]'`), imported only
when a scheduler or cluster is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import StreammergeError

INSTALL_HINT = "pip install 'streammerge[distributed]' (or: pip install distributed)"
_CLUSTER_RE = re.compile(r"^local(?::(\d+))?$")


def _distributed():
    try:
        import distributed
    except ImportError:
        raise StreammergeError(
            f"--scheduler and --cluster need the dask.distributed package, which is not installed: {INSTALL_HINT}"
        ) from None
    return distributed


def parse_cluster(spec: str) -> int:
    """'local:N' -> N worker processes ('local' alone: one per CPU core)."""
    m = _CLUSTER_RE.match(str(spec).strip())
    if not m:
        raise StreammergeError(f"--cluster {spec!r}: expected local:N (N worker processes, e.g. local:4)")
    n = int(m.group(1)) if m.group(1) else (os.cpu_count() or 1)
    if n < 1:
        raise StreammergeError(f"--cluster {spec!r}: the number of worker processes must be at least 1")
    return n


def is_client(obj: Any) -> bool:
    return type(obj).__name__ == "Client" and type(obj).__module__.startswith("distributed")


@contextmanager
def dask_client(scheduler: Any = None, cluster: str | None = None) -> Iterator[Any]:
    """A `distributed.Client` for the duration of the block, or None for the threaded scheduler.

    `scheduler` is an address (tcp://host:8786) or an already open Client (yielded as is and not
    closed); `cluster` is "local:N". At most one of them.
    """
    if scheduler is not None and cluster is not None:
        raise StreammergeError("--scheduler and --cluster are mutually exclusive: pick one")
    if scheduler is None and cluster is None:
        yield None
        return
    if is_client(scheduler):
        yield scheduler
        return
    distributed = _distributed()
    if cluster is not None:
        n = parse_cluster(cluster)
        with distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as lc, distributed.Client(lc) as client:
            yield client
        return
    try:
        client = distributed.Client(str(scheduler))
    except (OSError, TimeoutError) as e:
        raise StreammergeError(f"--scheduler {scheduler}: cannot connect to the dask scheduler ({e})") from None
    try:
        yield client
    finally:
        client.close()


def run_graph(
    dsk: dict,
    targets: list,
    task_bytes: dict,
    *,
    workers: int,
    scheduler: Any = None,
    cluster: str | None = None,
    desc: str,
    progress: bool | None = None,
    done_bytes: int = 0,
) -> None:
    """Compute `targets` of the dask graph `dsk`, with a bytes/s progress bar (`task_bytes[key]`;
    it starts at `done_bytes`, the work already done).

    `workers` is the thread count of the default threaded scheduler; under dask.distributed the
    cluster's workers are used instead.
    """
    if not targets:
        return
    if scheduler is None and cluster is None:
        import dask

        from .progress import BytesProgress

        with BytesProgress(task_bytes, desc, enabled=progress, done_bytes=done_bytes):
            dask.threaded.get(dsk, targets, num_workers=workers)
        return
    with dask_client(scheduler, cluster) as client:
        check_workers_see(client, graph_paths(dsk))
        _run_distributed(client, dsk, targets, task_bytes, desc, progress, done_bytes)


def _run_distributed(client, dsk: dict, targets: list, task_bytes: dict, desc: str, progress, done_bytes: int = 0) -> None:
    from distributed import as_completed

    from .progress import BytesProgress

    # Futures for the targets only: a future per intermediate task (the passes' maps, ~100k for
    # an 80-layer ties job) costs ~9 KB in this process and ~0.6 ms of scheduling. The bytes of
    # a target's not-yet-counted ancestors (its tensor's pass maps) are counted when the target
    # finishes, so the bar still ends at the total.
    futures = client.get(_as_expr(dsk), list(targets), sync=False)
    pending = {f.key: f for f in futures}
    del futures
    bar = BytesProgress(task_bytes, desc, enabled=progress, done_bytes=done_bytes).bar
    counted: set = set()
    try:
        for fut in as_completed(list(pending.values())):
            pending.pop(fut.key, None)
            if fut.status != "finished":
                fut.result()  # raises the task's exception here, with its remote traceback
            n = _uncounted_bytes(dsk, fut.key, task_bytes, counted)
            if n:
                bar.update(n)
            del fut
    except BaseException:
        if pending:
            client.cancel(list(pending.values()))
        raise
    finally:
        bar.close()


def _uncounted_bytes(dsk: dict, key, task_bytes: dict, counted: set) -> int:
    """Bytes of `key` and of its ancestors not counted yet (each task is visited once overall)."""
    from dask.core import get_dependencies

    total, stack = 0, [key]
    while stack:
        k = stack.pop()
        if k in counted or k not in dsk:
            continue
        counted.add(k)
        total += task_bytes.get(k, 0)
        stack.extend(get_dependencies(dsk, k))
    return total


def _as_expr(dsk: dict):
    """The graph wrapped as `Client.get` would wrap it, but named by a random token.

    `Client.get` otherwise tokenizes the whole graph deterministically, walking every argument
    of every task (slow at 10k tasks, and it refuses objects such as sentinels in method
    parameters). A build is never deduplicated against another graph, so a unique name is right.
    """
    try:
        from dask._expr import LLGExpr
    except ImportError:  # other dask versions: let Client.get wrap (and tokenize) the dict
        return dsk
    return LLGExpr(dsk, _determ_token=uuid.uuid4().hex)


# ---- shared filesystem check --------------------------------------------------------------------


def graph_paths(dsk: dict) -> list[str]:
    """The files and directories the graph's tasks open: input checkpoints, the store, the output."""
    from ..checkpoints import TensorHandle
    from ..export.safetensors_writer import ShardedWriter
    from ..plan.planner import TensorJob
    from ..store.store import Store

    paths: set[str] = set()
    seen: set[int] = set()
    for task in dsk.values():
        if not isinstance(task, tuple):
            continue
        args = list(task[1:])
        if dataclasses.is_dataclass(task[0]):  # a typed node (engine/build.py) holds its arguments
            args += [getattr(task[0], f.name) for f in dataclasses.fields(task[0])]
        for arg in args:
            if id(arg) in seen:
                continue
            seen.add(id(arg))
            if isinstance(arg, Store):
                paths.add(os.path.abspath(arg.path))
            elif isinstance(arg, ShardedWriter):
                paths.add(os.path.abspath(arg.directory))
            elif isinstance(arg, TensorJob):
                paths.update(p for h in arg.inputs for p in h.paths)
            elif isinstance(arg, TensorHandle):
                paths.update(arg.paths)
    return sorted(paths)


def missing_paths(paths: list[str]) -> list[str]:
    """Runs on each worker: the paths it cannot see."""
    return [p for p in paths if not os.path.exists(p)]


def check_workers_see(client, paths: list[str]) -> None:
    if not paths:
        return
    info = client.scheduler_info()
    if not info.get("workers"):
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            raise StreammergeError("the dask cluster has no workers (waited 60 s for one to connect)") from None
    for worker, missing in sorted(client.run(missing_paths, paths).items()):
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise StreammergeError(
                f"dask worker {worker} cannot see {missing[0]}{more}: the inputs and the store must be at the "
                "same paths on every machine (a shared filesystem)"
            )
