"""From a recipe and the input checkpoints to a list of tensor jobs cut into row blocks.

The plan decides everything that determines the output bits (which tensors, from which input
tensors, with which parameters, in which dtype) and how work is cut (rows per block, from the
memory limit). It reads only headers: no tensor data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import ModelCheckpoint, TensorHandle, open_model
from ..checkpoints.blocks import num_rows, row_elems
from ..dtypes import float_type, is_float_st
from ..errors import RecipeError, StreammergeError
from ..methods import MergeMethod, TensorParams, get_method
from ..recipe import Recipe, layer_position, resolve_tensor_params

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Memory the process needs before any block: interpreter, numpy, zarr, dask, bookkeeping.
BASELINE_BYTES = 300 * 2**20
# Above this, bigger blocks buy no speed and cost memory and progress granularity.
MAX_BLOCK_ELEMS = 4 * 2**20
MIN_BLOCK_ELEMS = 64 * 2**10
# float32 working arrays per block besides the inputs: the method's result and temporaries.
WORK_ARRAYS = 3


@dataclass(frozen=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    dtype: str  # output float type name
    base: TensorHandle | None
    models: tuple[TensorHandle, ...]
    params: TensorParams
    block_rows: int

    @property
    def rows(self) -> int:
        return num_rows(self.shape)

    @property
    def row_elems(self) -> int:
        return row_elems(self.shape)

    @property
    def numel(self) -> int:
        return self.rows * self.row_elems

    @property
    def nblocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def block_range(self, i: int) -> tuple[int, int]:
        r0 = i * self.block_rows
        return r0, min(self.rows, r0 + self.block_rows)

    @property
    def inputs(self) -> tuple[TensorHandle, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def input_bytes(self) -> int:
        return sum(h.nbytes for h in self.inputs)

    @property
    def output_bytes(self) -> int:
        return self.numel * float_type(self.dtype).itemsize


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, ModelCheckpoint]  # by recipe spec
    base_spec: str | None
    model_specs: list[str]  # the models the method sees, in recipe order
    jobs: list[TensorJob]
    block_elems: int
    workers: int
    seed: int
    hf_source: ModelCheckpoint  # where config.json and tokenizer files come from
    warnings: list[str] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(j.output_bytes for j in self.jobs)

    @property
    def nblocks(self) -> int:
        return sum(j.nblocks for j in self.jobs)

    def memory_estimate(self) -> int:
        """Peak resident bytes: baseline + per worker, the float32 inputs and work arrays of a block."""
        n_inputs = len(self.model_specs) + (1 if self.base_spec else 0)
        biggest = max((min(j.block_rows * j.row_elems, j.numel) for j in self.jobs), default=0)
        return BASELINE_BYTES + self.workers * biggest * 4 * (n_inputs + WORK_ARRAYS)

    def with_block_rows(self, block_rows: dict[str, int]) -> "Plan":
        """The same plan cut as an existing store was (resuming keeps the store's chunking)."""
        jobs = [
            TensorJob(j.name, j.shape, j.dtype, j.base, j.models, j.params, block_rows.get(j.name, j.block_rows))
            for j in self.jobs
        ]
        return Plan(**{**self.__dict__, "jobs": jobs})


def _open(spec: str, recipe_dir: Path | None) -> ModelCheckpoint:
    # mergekit resolves model paths against the working directory; we also accept paths
    # relative to the recipe file so recipes can travel with their models.
    if recipe_dir is not None and not Path(spec).is_absolute() and not Path(spec).exists():
        candidate = recipe_dir / spec
        if candidate.exists():
            return open_model(str(candidate))
    return open_model(spec)


def block_elems_for(memory_limit: int, workers: int, n_inputs: int) -> int:
    per_worker = max(0, memory_limit - BASELINE_BYTES) // max(1, workers)
    elems = per_worker // (4 * (n_inputs + WORK_ARRAYS))
    return int(max(MIN_BLOCK_ELEMS, min(MAX_BLOCK_ELEMS, elems)))


def make_plan(
    recipe: Recipe,
    *,
    memory_limit: int = 2 * 2**30,
    workers: int = 2,
    seed: int = 0,
    recipe_dir: Path | None = None,
    block_elems: int | None = None,
) -> Plan:
    """Plan the job. `block_elems` overrides the block size derived from `memory_limit`."""
    try:
        method = get_method(recipe.merge_method)
    except KeyError:
        raise RecipeError(f"unknown merge_method {recipe.merge_method!r}") from None
    if recipe.slices:
        raise RecipeError("recipes with `slices` are not supported yet: use `models`")

    if recipe.modules:
        raise RecipeError("recipes with `modules` are not supported yet: use `models`")
    base_spec_used = recipe.base_for()
    model_specs = recipe.input_models()
    if not model_specs:
        raise RecipeError("the recipe lists no models to merge (besides the base)")

    checkpoints: dict[str, ModelCheckpoint] = {spec: _open(spec, recipe_dir) for spec in recipe.model_specs()}
    reference = checkpoints[base_spec_used or model_specs[0]]
    hf_source = checkpoints.get(recipe.base_model) or reference
    tok = recipe.tokenizer_settings()
    if tok.source == "union" or tok.tokens:
        raise RecipeError("building a union tokenizer or custom token embeddings is not supported yet; "
                          "use tokenizer_source: base or a model")
    if tok.source and tok.source != "base":
        if tok.source not in checkpoints:
            checkpoints[tok.source] = _open(tok.source, recipe_dir)
        hf_source = checkpoints[tok.source]

    n_layers = _num_layers(reference)
    n_inputs = len(model_specs) + (1 if base_spec_used else 0)
    block_elems = block_elems or block_elems_for(memory_limit, workers, n_inputs)
    out_dtype_name = recipe.out_dtype or recipe.dtype
    warnings: list[str] = list(recipe.warnings)

    jobs = []
    for name, ref in reference.tensors.items():
        if not is_float_st(ref.dtype):
            raise StreammergeError(f"{ref.path}: tensor {name} has dtype {ref.dtype}; only BF16, F16 and F32 can be merged")
        handles = {}
        for spec in ([base_spec_used] if base_spec_used else []) + model_specs:
            h = checkpoints[spec].tensors.get(name)
            if h is None:
                raise StreammergeError(f"{checkpoints[spec].directory}: tensor {name} is missing (present in {reference.directory})")
            if h.shape != ref.shape:
                raise StreammergeError(
                    f"{checkpoints[spec].directory}: tensor {name} has shape {list(h.shape)}, "
                    f"but {list(ref.shape)} in {reference.directory}"
                )
            if not is_float_st(h.dtype):
                raise StreammergeError(f"{h.path}: tensor {name} has dtype {h.dtype}; only BF16, F16 and F32 can be merged")
            handles[spec] = h
        m = LAYER_RE.search(name)
        t = layer_position(int(m.group(1)) if m else None, n_layers)
        params = resolve_tensor_params(recipe, method, name, t, model_specs, seed=seed)
        dtype = float_type(out_dtype_name).name if out_dtype_name else float_type(ref.dtype).name
        rows = num_rows(ref.shape)
        block_rows = max(1, min(rows, block_elems // max(1, row_elems(ref.shape))))
        jobs.append(
            TensorJob(
                name=name,
                shape=tuple(ref.shape),
                dtype=dtype,
                base=handles.get(base_spec_used) if base_spec_used else None,
                models=tuple(handles[s] for s in model_specs),
                params=params,
                block_rows=block_rows,
            )
        )
    for spec in model_specs:
        extra = sorted(set(checkpoints[spec].tensors) - set(reference.tensors))
        if extra:
            warnings.append(f"{spec}: {len(extra)} tensor(s) not in {base_spec_used or model_specs[0]} are ignored, e.g. {extra[0]}")

    return Plan(
        recipe=recipe,
        method=method,
        checkpoints=checkpoints,
        base_spec=base_spec_used,
        model_specs=model_specs,
        jobs=jobs,
        block_elems=block_elems,
        workers=workers,
        seed=seed,
        hf_source=hf_source,
        warnings=warnings,
    )


def _num_layers(model: ModelCheckpoint) -> int:
    cfg = model.config or {}
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return n
    idx = [int(m.group(1)) for name in model.tensors if (m := LAYER_RE.search(name))]
    return max(idx) + 1 if idx else 1
