"""The `streammerge` group and what its commands share: sizes, error handling, SIGTERM, option sets."""

from __future__ import annotations

import contextlib
import errno
import functools
import re
import signal
import sys
import threading
from pathlib import Path

import click

from ..errors import StreammergeError

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


class BudgetType(SizeType):
    """A size, or `auto` / `none` (returned as those strings, lower-case)."""

    name = "size|auto|none"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() in ("auto", "none"):
            return value.strip().lower()
        return super().convert(value, param, ctx)


BUDGET = BudgetType()


class ThreadsType(click.ParamType):
    """A positive integer, or `auto` (returned as that string)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not 'auto' or a number of threads", param, ctx)
        if n < 1:
            self.fail(f"{n} threads: at least 1", param, ctx)
        return n


THREADS = ThreadsType()


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
            where = ctx.meta.get(WRITING_KEY) or e.filename2 or e.filename or kwargs.get("store_path") or kwargs.get("out")
            click.echo(f"error: {where}: no space left on device; free some space and run the same command "
                       "again to resume", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            click.echo("interrupted: run the same command again to resume where it stopped", err=True)
            sys.exit(getattr(e, "exit_code", 130))

    return wrapper


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITING_KEY = "streammerge.writing"  # ctx.meta key: the output being written (names a full disk)


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


def safety_options(*names):
    """Add the --allow-* flags `names` to a command; they reach the engine through `safety()`."""
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


def safety() -> dict:
    """The engine's keywords for this command's --allow-* flags (those it declared)."""
    return dict(click.get_current_context().meta.get(_SAFETY, {}))


def plan_safety() -> dict:
    """make_plan's keywords for `plan`: pickles are converted into a temporary directory."""
    flags = safety()
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


BUILD_OPTIONS = [
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
DASK_OPTIONS = [
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
        from ..engine.scheduler import parse_cluster

        try:
            parse_cluster(value)
        except StreammergeError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None
    return value


def apply_options(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


# extract-lora's and export --variant lora's: what becomes of the changed weights a LoRA cannot factor
MODULES_TO_SAVE_OPTION = [
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
