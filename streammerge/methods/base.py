"""What a merge method is, to the engine.

A method is pure math on float32 numpy arrays: no I/O, no dask, no knowledge of files or
stores. The engine hands it one row block of one tensor at a time (a `Block`) with the
tensor's resolved parameters, and writes what it returns.

Methods that need tensor-wide quantities (top-k thresholds, norms, dot products) declare
`passes`: each pass maps every block of the tensor to a small partial result, then reduces the
partials (in block order) into `stats`, a dict of numbers and small numpy arrays that later
passes and `merge` receive. The engine runs pass 1 over all blocks, reduces, runs pass 2, ...,
then `merge` over all blocks. Stats are persisted in the store, so a resumed job does not redo
finished passes. Results must not depend on how the tensor is cut into blocks: use
`Block.start` (the flat index of the block's first element) for anything positional, such as
random masks or tie-breaking.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

Stats = Mapping[str, Any]  # values: int, float, bool, or small numeric numpy arrays

REQUIRED = object()  # sentinel default: the recipe must give a value


@dataclass(frozen=True)
class Param:
    """One recipe parameter a method accepts.

    scope "global": set under the recipe's top-level `parameters:` (or a slice's).
    scope "model":  set per input model under `models[].parameters:`, falling back to global.
    """

    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    scope: Literal["global", "model"] = "global"
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None  # the values accepted (str, or int/float kinds: within min/max too)
    help: str = ""
    # A value `streammerge methods NAME` puts in its example recipe (None: the default, if any).
    example: Any = None
    # str parameters: checks a value beyond its choices (a structured string); raises ValueError.
    check: Callable[[Any], Any] | None = None

    def range_text(self) -> str:
        """The values this parameter accepts, as `streammerge methods` shows them."""
        if self.kind is bool:
            return "true/false"
        if self.kind is str:
            return "|".join(self.choices) if self.choices else "text"
        if self.choices:
            return "|".join(f"{c:g}" for c in self.choices)
        lo, hi = (None if b is None else f"{b:g}" for b in (self.min, self.max))
        if lo is not None and hi is not None:
            return f"[{lo}, {hi}]"
        if lo is not None or hi is not None:
            return f">= {lo}" if hi is None else f"<= {hi}"
        return "any " + ("integer" if self.kind is int else "number")

    def validate(self, value: Any) -> Any:
        """Coerce `value` to this parameter's kind; raise ValueError with a readable reason."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"expected a number, got {value!r}")
            if self.kind is int:
                if float(value) != int(value):
                    raise ValueError(f"expected an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if self.min is not None and value < self.min:
                raise ValueError(f"must be >= {self.min}, got {value}")
            if self.max is not None and value > self.max:
                raise ValueError(f"must be <= {self.max}, got {value}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(f'{c:g}' for c in self.choices)}, got {value:g}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
            if self.check is not None:
                self.check(value)
            return value
        raise TypeError(f"unsupported parameter kind {self.kind}")


@dataclass(frozen=True)
class Block:
    """One row block of one tensor, as float32 arrays of shape (rows, *shape[1:])."""

    tensor: str  # output tensor name
    shape: tuple[int, ...]  # full tensor shape
    start: int  # flat (row-major) index of the block's first element within the tensor
    base: np.ndarray | None  # the base model's block, when the method uses a base
    models: tuple[np.ndarray, ...]  # one block per input model (recipe order, base excluded)
    # For a pass that declares `Pass.rows`: the tensor rows the arrays hold (ascending, all in
    # the block), when the engine read only those. None: all the block's rows, from `start`.
    rows: np.ndarray | None = None
    # Where `merge` may write the tensor's float32 result (the block's shape), through
    # `result_array`: the engine hands each thread one array, reused block after block (fresh
    # memory costs a page fault per 4 KiB here). None: `result_array` allocates one.
    out: np.ndarray | None = None


def result_array(block: Block) -> np.ndarray:
    """The float32 array a method's `merge` writes the merged block into and returns:
    `block.out` when the engine provides one, else a new array of the block's shape."""
    like = block.base if block.base is not None else block.models[0]
    if block.out is not None:
        return block.out.reshape(like.shape)
    return np.empty(like.shape, np.float32)


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one tensor (gradients and filters already applied)."""

    globals: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]  # aligned with Block.models
    seed: int = 0

    def model_values(self, name: str) -> list:
        return [p[name] for p in self.per_model]


def _always(params: "TensorParams", stats: Stats) -> bool:
    return True


@dataclass(frozen=True)
class Pass:
    """A tensor-wide reduction: `map` each block to a small partial, `reduce` the partials.

    `needed(params, stats)` says whether the pass has work for this tensor given the stats so
    far (e.g. a top-k refinement after the bracket already resolved the threshold); when it is
    false the engine reads no block for it and the stats pass through unchanged.

    `rows(shape, params)`, when given, names the only rows `map` looks at (ascending tensor row
    indices, or None: all): the engine then reads just those rows of each block and hands `map`
    a Block holding them (`Block.rows`), possibly none. `map` must return the same for the
    whole block (picking the rows itself), so a caller may ignore `rows`.

    `row_groups` True: `map` may be called on any run of consecutive rows, and `reduce` takes
    the partials of runs (in order) as it takes those of blocks; the engine then maps a block
    group of rows by group of rows, each converted into cache-sized buffers (as `MergeMethod.
    row_groups` merges), and reduces the groups' partials.
    """

    name: str
    map: Callable[[Block, TensorParams, Stats], Any]
    reduce: Callable[[Sequence[Any], TensorParams, Stats], Stats]
    needed: Callable[[TensorParams, Stats], bool] = _always
    rows: Callable[[tuple[int, ...], TensorParams], np.ndarray | None] | None = None
    row_groups: bool = False


BasePolicy = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class Output:
    """One array a job writes, chunked by the tensor's row blocks.

    `name` "" is the tensor itself (what static merges produce); other names sit beside it
    (e.g. "bits", "scale" of a 1-bit encoding). Float dtypes ("bfloat16", "float16", "float32")
    are rounded to nearest even from the float32 result; other numpy dtypes ("uint8", "int32")
    are stored as returned. `trailing` is the shape after the row axis (None: the tensor's).
    A `blob` output stores one variable-length byte string per row block (e.g. sparse entries).
    """

    name: str = ""
    dtype: str = "float32"
    trailing: tuple[int, ...] | None = None
    blob: bool = False


@dataclass(frozen=True)
class MergeMethod:
    """`merge` returns the float32 merged block, or a dict {output name: array or bytes} for
    jobs with several outputs; `merge` may be None for stats-only jobs (analyses)."""


    name: str
    merge: Callable[[Block, TensorParams, Stats], np.ndarray | dict] | None
    params: tuple[Param, ...] = ()
    # A rule across a tensor's resolved parameters that their ranges cannot say: check(params)
    # returns why they cannot be merged (a recipe error at plan time), or None.
    check: Callable[[TensorParams], str | None] | None = None
    base: BasePolicy = "required"
    passes: tuple[Pass, ...] = ()
    summary: str = ""
    # Routing methods (mediator, 1bit) are not one function per tensor but a multi-stage build
    # (analysis, then merged model and encodings): the name of their planner in plan/routed.py.
    pipeline: str | None = None
    # The same method on a whole tensor in torch, for `build --device cuda` (kernels/__init__.py):
    # kernel(x: DeviceTensor, params) returns what `merge` returns for every block at once.
    # None: the method runs on the CPU path whatever the device.
    kernel: Callable[[Any, TensorParams], Any] | None = None
    # True: the engine may call `merge` on cache-sized groups of a block's rows (row_group_elems),
    # converting the inputs and rounding the outputs group by group, so that a block
    # travels through memory once instead of once per step (engine/build.py). A method sets it
    # when `merge` gives the same rows for any run of rows it is handed (not only for the blocks
    # its passes saw) and costs little per call. A function (stats, b0, b1) -> bool says it per
    # block (flat range [b0, b1)): top-k methods, whose tie cut may lie in one block that their
    # merge must see whole (ops/topk.py).
    row_groups: bool | Callable[[Stats, int, int], bool] = False
    # With row_groups: flat spans [s0, s1) within the block [b0, b1) that one call of `merge`
    # must hold whole, as unsplit(stats, b0, b1) lists them: the engine widens a group that
    # would cut one to its end (a top-k tie cut deferred to a span of the passes, which the
    # merge scans: ops/topk.py). None: any rows.
    unsplit: Callable[[Stats, int, int], Sequence[tuple[int, int]]] | None = None
    # True: a NaN or Inf in any input leaves the float32 result non-finite at that element
    # (sums, differences and products of every input: 0 * inf is NaN; no selection or
    # comparison that could drop one). The engine then checks the result of a row group for
    # NaN/Inf instead of each input, and the inputs only where the result is not finite.
    nonfinite_spreads: bool = False
    # With row_groups and nonfinite_spreads: the merge of a row group from the inputs' stored
    # bf16 bits straight into the output's, in one compiled pass (ops/fused.py), for jobs whose
    # inputs and output are all bf16, where numba is importable:
    # merge_bf16(base bits, [model bits], params, out bits) -> whether every result was finite,
    # giving the bits that `merge` and the engine's rounding give. Each input's float32
    # conversion, the float32 result and its rounding then never touch memory: 0.5B
    # task_arithmetic spent more time in those three passes than in its arithmetic.
    merge_bf16: Callable[[np.ndarray, list, TensorParams, np.ndarray], bool] | None = None
    # How many input models besides the base the example recipe of `streammerge methods NAME` lists.
    example_models: int = 2
    # The most input models besides the base it merges (None: any number); more is a recipe error.
    max_models: int | None = None

    def in_row_groups(self, stats: Stats, b0: int, b1: int) -> bool:
        """Whether the engine may merge the block of flat range [b0, b1) in row groups."""
        return self.row_groups(stats, b0, b1) if callable(self.row_groups) else bool(self.row_groups)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def __reduce_ex__(self, protocol):
        # A registered method pickles as its name (dask.distributed workers look it up in their
        # own registry): its functions and closures never travel. Others pickle by value.
        if _REGISTRY.get(self.name) is self:
            return (get_method, (self.name,))
        return super().__reduce_ex__(protocol)


# Elementwise methods walk a block in slices of this many elements so that the handful of
# temporaries they chain stays in cache: 2-3x faster than whole-block numpy ops here.
CACHE_ELEMS = 1 << 17


def row_group_elems(workers: int) -> int:
    """Elements per call of a `row_groups` method (at least one row is taken). For a few threads,
    cache-sized: the inputs, their float32 conversions and the method's temporaries stay in the
    core's cache (on 2 cores, whole 4 Mi-element blocks cost 20 % more CPU than 128 Ki groups).
    More threads share the GIL, and every call holds it for some Python, so groups grow with
    them (0.5B task_arithmetic on 16 cores, 16 threads: 3.6-3.9 s of merge with 128 Ki groups,
    2.8-2.9 s with 1 Mi, 2.4-2.6 s with whole blocks)."""
    return CACHE_ELEMS * max(1, workers // 2)


# The most elements a method scans of a block in one piece: the engine's row group up to 16
# threads (row_group_elems). A row group is scanned whole, so that the numpy calls of each piece,
# whose Python holds the GIL, do not multiply as the groups grow with the threads; a larger
# block (a pass not in row groups) goes in cache-sized pieces.
SCAN_MAX_ELEMS = 1 << 20


def scan_elems(nb: int) -> int:
    """Elements per piece when a method scans a block of `nb` elements: the whole block up to
    SCAN_MAX_ELEMS (a row group: cache-sized on a few threads, larger with more), else
    CACHE_ELEMS. A 0.5B-shaped ties build with 16 threads (on 2 cores, py-spy --gil): the
    workers' GIL-held samples 527 -> 454, the top-k selection's 115 -> 65, the merge's 98 -> 74;
    with 2 threads the row group is CACHE_ELEMS and only the selection's pieces change (64 Ki
    -> 128 Ki elements), same time."""
    return nb if nb <= SCAN_MAX_ELEMS else CACHE_ELEMS


def cache_slices(size: int, step: int = CACHE_ELEMS):
    """slice objects covering range(size) in cache-sized pieces."""
    for s in range(0, size, step):
        yield slice(s, min(size, s + step))


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def load_methods() -> None:
    """Import every method module of this package, which registers its methods.

    A module is a method family when its name does not start with "_" and it is not one of the
    infrastructure modules: adding a method is adding a file. The modules are found by name, at
    the first lookup, so that nothing imported by a method (ops/, kernels/, encodings/) pulls in
    the other methods or closes a circle through this package.
    """
    global _loaded
    with _load_lock:  # engine threads look methods up by name (unpickling) concurrently
        if _loaded:
            return
        package = __name__.rpartition(".")[0]
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if not info.name.startswith("_") and info.name not in _INFRASTRUCTURE:
                importlib.import_module(f"{package}.{info.name}")
        _loaded = True


_INFRASTRUCTURE = {"base", "inmemory"}
_load_lock = threading.RLock()
_loaded = False


def get_method(name: str) -> MergeMethod:
    load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(name) from None


def method_names() -> list[str]:
    load_methods()
    return sorted(_REGISTRY)
