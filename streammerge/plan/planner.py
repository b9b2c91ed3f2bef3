"""From a recipe and the input checkpoints to a list of tensor jobs cut into row blocks.

The plan decides everything that determines the output bits (which tensors, from which input
tensors, with which parameters, in which dtype) and how work is cut (rows per block, from the
memory limit). It reads only headers: no tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..checkpoints import ModelCheckpoint, TensorHandle, looks_like_path, resolve_model_dir
from ..checkpoints.blocks import num_rows, row_elems
from ..checkpoints.buffers import Buffer, agreed_buffer
from ..checkpoints.chat_template import resolve_chat_template
from ..checkpoints.lora import open_input, spec_paths
from ..checkpoints.tokenizer import (
    Vocabulary,
    VocabularyError,
    build_vocabulary,
    check_token_sources,
    is_vocab_tensor,
    row_maps,
    tied_embedding,
    unfound,
    vocab_handles,
)
from ..checkpoints.stacks import Stacks, layer_index, with_layer
from ..dtypes import float_type, is_float_st
from ..errors import CheckpointError, RecipeError, StreammergeError
from ..fsutil import WRITE_BEHIND_DEPTH, store_writers
from ..methods import MergeMethod, TensorParams, get_method
from ..methods.base import SCAN_MAX_ELEMS, Output, Pass
from ..recipe import Recipe, layer_position, resolve_tensor_params

# Memory the process needs before any block: interpreter, numpy, zarr, dask, bookkeeping.
BASELINE_BYTES = 300 * 2**20
# What building a tokenizer adds to it: transformers and the torch it imports (measured: a build
# with `tokenizer: {source: union}` peaked at 658-742 MB resident against 292-308 MB without).
TOKENIZER_LIBS_BYTES = 400 * 2**20
# Above this, bigger blocks buy no speed and cost memory and progress granularity.
MAX_BLOCK_ELEMS = 4 * 2**20
MIN_BLOCK_ELEMS = 64 * 2**10
# float32 working arrays per block besides the inputs: the method's result and temporaries.
WORK_ARRAYS = 3


# Bytes per element of the piece a method scans at once (methods.base.scan_elems: a block or row
# group whole, up to SCAN_MAX_ELEMS): its float32 and bool temporaries (ties: |tau|, the keep
# masks, the election's sums and signs; the top-k collect's comparisons).
SCAN_BYTES_PER_ELEM = 32


def scan_bytes(block_elems: int) -> int:
    """Per worker: the temporaries of the piece a method scans at once of blocks of `block_elems`."""
    return SCAN_BYTES_PER_ELEM * min(SCAN_MAX_ELEMS, block_elems)


def writer_blocks(workers: int) -> int:
    """Block copies waiting in the store's write-behind threads (fsutil.WriteBehind), at most
    WRITE_BEHIND_DEPTH each (`build --export` adds none: the export links the store's shards)."""
    return store_writers(workers) * WRITE_BEHIND_DEPTH


@dataclass(frozen=True)
class TensorJob:
    """One tensor's work in one stage: read its inputs block by block, run `method`, write `outputs`.

    Static merges have one job per output tensor (stage "merge", key "tensors/<name>", one
    output: the merged tensor). Other stages (analyses, encodings, experts) use their own keys
    and outputs; a job with no outputs only computes stats.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # dtype of the main output (the tensor itself for static merges)
    base: TensorHandle | None
    models: tuple[TensorHandle, ...]
    params: TensorParams
    block_rows: int
    method: MergeMethod | None = None  # None: the plan's method
    stage: str = "merge"
    key: str = ""  # store path of the job's arrays, markers and stats; "" means tensors/<name>
    outputs: tuple[Output, ...] | None = None  # None: one output, the tensor itself in `dtype`

    @property
    def store_key(self) -> str:
        return self.key or f"tensors/{self.name}"

    @property
    def output_list(self) -> tuple[Output, ...]:
        return self.outputs if self.outputs is not None else (Output("", self.dtype),)

    def output_path(self, out: Output) -> str:
        """The store path of output `out`: the job's key for the tensor itself, else key/name."""
        return self.store_key if not out.name else f"{self.store_key}/{out.name}"

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

    def block_bytes(self, i: int, rows: np.ndarray | None = None) -> int:
        """Bytes read from disk for block i of every input (only `rows` of it, when given)."""
        r0, r1 = self.block_range(i)
        nrows = r1 - r0 if rows is None else rows_in(rows, r0, r1).size
        return sum(nrows * self.row_elems * float_type(h.dtype).itemsize for h in self.inputs)

    def pass_rows(self, p: Pass) -> np.ndarray | None:
        """The only rows pass `p` reads (None: all)."""
        return None if p.rows is None else p.rows(self.shape, self.params)

    def read_bytes(self, method: MergeMethod) -> int:
        """Bytes read from disk to build this job, the one figure plan, progress bar and build
        summary report: every pass over the inputs (of the rows it declares), then the merge.
        An upper bound before the build: a pass found not needed reads nothing."""
        passes = sum(self.block_bytes(i, self.pass_rows(p)) for p in method.passes for i in range(self.nblocks))
        merges = self.input_bytes if self.output_list and method.merge is not None else 0
        return passes + merges


def rows_in(rows: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """The entries of the ascending `rows` within [r0, r1)."""
    return rows[np.searchsorted(rows, r0) : np.searchsorted(rows, r1)]


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, ModelCheckpoint]  # by recipe spec
    base_spec: str | None  # of the first slice (the whole recipe with `models:`)
    model_specs: list[str]  # the models the method sees, in recipe order (first slice)
    jobs: list[TensorJob]
    block_elems: int
    workers: int
    seed: int
    hf_source: ModelCheckpoint  # where config.json and tokenizer files come from
    warnings: list[str] = field(default_factory=list)
    config_overrides: dict = field(default_factory=dict)  # config.json keys the output changes
    buffers: list[Buffer] = field(default_factory=list)  # non-float tensors, copied (checkpoints/buffers.py)
    chat_template: str | None = None  # written into the output's tokenizer files (export/chat_template.py)
    tokenizer_files: dict[str, bytes] | None = None  # the built tokenizer's (checkpoints/tokenizer.py)
    vocabulary: dict | None = None  # its Vocabulary.fingerprint: what resuming checks
    module_models: dict[str, list[str]] = field(default_factory=dict)  # with `modules:`: the models each module merges

    @property
    def stacks(self) -> dict[str, int]:
        """The output's layers per stack (checkpoints/stacks.py), text decoder first."""
        return Stacks.of([j.name for j in self.jobs], None).layers

    @property
    def input_bytes(self) -> int:
        return sum(j.input_bytes for j in self.jobs)

    @property
    def output_bytes(self) -> int:
        return sum(j.output_bytes for j in self.jobs)

    @property
    def read_bytes(self) -> int:
        """Bytes the build reads from disk, counting passes (TensorJob.read_bytes), at most."""
        return sum(j.read_bytes(j.method or self.method) for j in self.jobs)

    @property
    def nblocks(self) -> int:
        return sum(j.nblocks for j in self.jobs)

    @property
    def baseline_bytes(self) -> int:
        """Resident bytes before any block: the process, and the libraries a tokenizer build loads."""
        return BASELINE_BYTES + (TOKENIZER_LIBS_BYTES if self.tokenizer_files is not None else 0)

    def memory_estimate(self) -> int:
        """Peak resident bytes: baseline + per worker, the float32 inputs and work arrays of a
        block and the temporaries of the piece it scans at once."""
        n_inputs = len(self.model_specs) + (1 if self.base_spec else 0)
        biggest = max((min(j.block_rows * j.row_elems, j.numel) for j in self.jobs), default=0)
        per_elem = 4 * (self.workers * (n_inputs + WORK_ARRAYS) + writer_blocks(self.workers))
        return self.baseline_bytes + self.workers * scan_bytes(biggest) + biggest * per_elem

    def with_block_rows(self, block_rows: dict[str, int]) -> "Plan":
        """The same plan cut as an existing store was (resuming keeps the store's chunking)."""
        jobs = [replace(j, block_rows=block_rows.get(j.store_key, j.block_rows)) for j in self.jobs]
        return Plan(**{**self.__dict__, "jobs": jobs})


def _local_spec(spec: str, recipe_dir: Path | None) -> str:
    # mergekit resolves model paths against the working directory; we also accept paths
    # relative to the recipe file so recipes can travel with their models (and a missing one
    # there, `models/ft9` beside an existing `models/`, is reported as that path).
    if recipe_dir is not None and not Path(spec).is_absolute() and not Path(spec).exists():
        candidate = recipe_dir / spec
        if candidate.exists() or (not looks_like_path(spec) and looks_like_path(spec, recipe_dir)):
            return str(candidate)
    return spec


def _open_named(recipe: Recipe, spec: str, recipe_dir: Path | None, pickle_cache: Path | None) -> ModelCheckpoint:
    """Open the model `spec` of `recipe` (a model, or a LoRA adapter on its base: checkpoints/lora.py);
    one that cannot be found is reported at the recipe line naming it."""
    locate = lambda s: _local_spec(s, recipe_dir)  # noqa: E731
    try:
        for path in spec_paths(spec, locate):
            resolve_model_dir(path)
    except CheckpointError as e:
        raise recipe.error(_named_at(recipe, spec), str(e)) from None
    return open_input(spec, locate=locate, default_base=recipe.base_model, pickle_cache=pickle_cache)


def _named_at(recipe: Recipe, spec: str) -> tuple:
    """The recipe path of the first entry naming `spec` (base_model, a models[] or sources[] entry, the tokenizer)."""
    if recipe.base_model == spec:
        return ("base_model",)
    for module, i in recipe.groups():
        path = recipe.model_entry_path(spec, slice_index=i, module=module)
        if path[-1] != "base_model":
            return path + ("model",)
        if len(path) > 1:  # a slice's base_model (("base_model",) alone: not in this slice)
            return path
    return ("tokenizer", "source") if recipe.tokenizer is not None else ("tokenizer_source",)


def _check_architectures(checkpoints: dict[str, ModelCheckpoint]) -> None:
    """Models whose config.json names a different architecture or model_type cannot be merged
    (mergekit's "crimes"); `--allow-crimes` skips this check. Models without config are not compared."""
    ref = None
    for spec, ck in checkpoints.items():
        cfg = ck.config or {}
        ident = {k: cfg.get(k) for k in ("architectures", "model_type") if cfg.get(k) is not None}
        if not ident:
            continue
        if ref is None:
            ref = (spec, ck, ident)
            continue
        for k in ident:
            if k in ref[2] and ident[k] != ref[2][k]:
                raise StreammergeError(
                    f"{ck.directory / 'config.json'}: {k} {ident[k]!r} of model {spec} differs from {ref[2][k]!r} of "
                    f"model {ref[0]} ({ref[1].directory}); merging different architectures is refused "
                    "(pass --allow-crimes to merge anyway)"
                )


def block_elems_for(memory_limit: int, workers: int, n_inputs: int) -> int:
    workers = max(1, workers)
    free = max(0, memory_limit - BASELINE_BYTES)
    per_elem = 4 * (workers * (n_inputs + WORK_ARRAYS) + writer_blocks(workers))
    # the largest block whose memory_estimate fits: scan pieces capped at SCAN_MAX_ELEMS, or
    # (a smaller block) each block scanned whole
    elems = (free - workers * scan_bytes(SCAN_MAX_ELEMS)) // per_elem
    if elems < SCAN_MAX_ELEMS:
        elems = free // (per_elem + workers * SCAN_BYTES_PER_ELEM)
    return int(max(MIN_BLOCK_ELEMS, min(MAX_BLOCK_ELEMS, elems)))


def make_plan(
    recipe: Recipe,
    *,
    memory_limit: int = 2 * 2**30,
    workers: int = 2,
    seed: int = 0,
    recipe_dir: Path | None = None,
    block_elems: int | None = None,
    allow_crimes: bool = False,
    pickle_cache: Path | None = None,
) -> Plan:
    """Plan the job. `block_elems` overrides the block size derived from `memory_limit`.

    `allow_crimes` skips the same-architecture check; `pickle_cache` (--allow-pickle) is where
    pickle checkpoints are converted to safetensors (None: they are refused).
    """
    try:
        method = get_method(recipe.merge_method)
    except KeyError:
        raise RecipeError(f"unknown merge_method {recipe.merge_method!r}") from None
    checkpoints: dict[str, ModelCheckpoint] = {
        spec: _open_named(recipe, spec, recipe_dir, pickle_cache) for spec in recipe.model_specs()
    }
    if not allow_crimes:
        _check_architectures(checkpoints)
    if recipe.modules:
        _check_modules(recipe, checkpoints)
    hf_source = checkpoints.get(recipe.base_model) or checkpoints[recipe.model_specs()[0]]
    tok = recipe.tokenizer_settings()
    vocabulary = None
    if tok.source is not None:
        named = None
        if tok.source not in ("base", "union"):
            named = checkpoints.get(tok.source) or _open_named(recipe, tok.source, recipe_dir, pickle_cache)
        vocabulary = _vocabulary(recipe, tok, checkpoints, hf_source.spec, named)

    modules = _groups(recipe, checkpoints)
    groups = [g for module in modules for g in module]
    n_inputs = max(len(g.models) + (g.base is not None) for g in groups)
    libs = TOKENIZER_LIBS_BYTES if vocabulary is not None else 0
    block_elems = block_elems or block_elems_for(memory_limit - libs, workers, n_inputs)
    out_dtype_name = recipe.out_dtype or recipe.dtype
    warnings: list[str] = list(recipe.warnings)
    try:
        chat_template = resolve_chat_template(recipe.chat_template, [ck.directory for ck in checkpoints.values()])
    except ValueError as e:
        raise recipe.error(("chat_template",), str(e)) from None
    if chat_template is not None and vocabulary is None and not (hf_source.directory / "tokenizer_config.json").is_file():
        warnings.append(f"chat_template: {hf_source.spec} has no tokenizer_config.json; the chat template is not written")
        chat_template = None
    config_overrides: dict = {}
    for module in modules:
        if module[0].slice_index is not None:
            _restack_config(config_overrides, hf_source, module)

    jobs = []
    buffers = []
    for out_name, group, layer_offset, t in _output_tensors(modules, checkpoints, warnings):
        specs = ([group.base] if group.base else []) + group.models
        names = [_input_name(out_name, group, spec, layer_offset) for spec in specs]
        handles = []
        for spec, in_name in zip(specs, names):
            h = checkpoints[spec].tensors.get(in_name) or tied_embedding(checkpoints[spec], in_name)
            if h is None:
                raise StreammergeError(f"{checkpoints[spec].directory}: tensor {in_name} is missing")
            handles.append(h)
        if not all(is_float_st(h.dtype) for h in handles):
            buffers.append(agreed_buffer(out_name, handles, specs))
            continue
        if vocabulary is not None and is_vocab_tensor(out_name):
            handles = _vocab_aligned(recipe, vocabulary, tok, out_name, handles, specs, group.base, warnings)
            _set_text_config(config_overrides, hf_source.config, "vocab_size", vocabulary.rows)
        shape = _common_shape(out_name, handles, checkpoints, specs, warnings, config_overrides, hf_source.config)
        params = resolve_tensor_params(
            recipe,
            method,
            out_name,
            t,
            group.models,
            seed=seed,
            slice_index=group.slice_index,
            module=group.module,
            input_names=names[len(names) - len(group.models):],
        )
        ref = handles[0]
        dtype = float_type(out_dtype_name).name if out_dtype_name else float_type(ref.dtype).name
        rows = num_rows(shape)
        block_rows = max(1, min(rows, block_elems // max(1, row_elems(shape))))
        jobs.append(
            TensorJob(
                name=out_name,
                shape=shape,
                dtype=dtype,
                base=handles[0] if group.base else None,
                models=tuple(handles[1:] if group.base else handles),
                params=params,
                block_rows=block_rows,
            )
        )
    if any(j.name not in hf_source.tensors and tied_embedding(hf_source, j.name) for j in jobs):
        # an lm_head the config's model ties to its embedding, merged apart from it: untied, or
        # loaders that honour the tie (vLLM) would drop it
        _set_text_config(config_overrides, hf_source.config, "tie_word_embeddings", False)
    if recipe.models:
        g = groups[0]
        written = {j.name for j in jobs}
        for spec in g.models:
            extra = sorted(set(checkpoints[spec].tensors) - written - {b.name for b in buffers})
            if extra:
                warnings.append(f"{spec}: {len(extra)} tensor(s) not in {g.base or g.models[0]} are ignored, e.g. {extra[0]}")

    tokenizer_files = vocabulary.files() if vocabulary is not None else None
    return Plan(
        recipe=recipe,
        method=method,
        checkpoints=checkpoints,
        base_spec=groups[0].base,
        model_specs=groups[0].models,
        jobs=jobs,
        block_elems=block_elems,
        workers=workers,
        seed=seed,
        hf_source=hf_source,
        warnings=warnings,
        config_overrides=config_overrides,
        buffers=buffers,
        chat_template=chat_template,
        tokenizer_files=tokenizer_files,
        vocabulary=vocabulary.fingerprint(tokenizer_files) if vocabulary is not None else None,
        module_models={
            g[0].module: list(dict.fromkeys(spec for x in g for spec in x.models)) for g in modules if g[0].module
        },
    )


def _tokenizer_path(recipe: Recipe, sub: tuple) -> tuple:
    """Where a tokenizer setting is in the recipe: below `tokenizer:`, or `tokenizer_source`."""
    return ("tokenizer", *sub) if recipe.tokenizer is not None else ("tokenizer_source",)


def _vocabulary(recipe: Recipe, tok, checkpoints: dict[str, ModelCheckpoint], base: str, named: ModelCheckpoint | None) -> Vocabulary:
    """The output vocabulary the recipe's tokenizer settings ask for (checkpoints/tokenizer.py);
    `named`: the model a `tokenizer_source: <model>` names."""
    specs = [base] + [s for s in checkpoints if s != base]
    try:
        vocab = build_vocabulary(
            tok.source,
            base,
            specs,
            {s: checkpoints[s].directory for s in specs},
            {s: checkpoints[s].config for s in specs},
            list(tok.tokens),
            tok.pad_to_multiple_of,
            source_dir=named.directory if named is not None else None,
        )
        check_token_sources(vocab, tok.tokens)
    except VocabularyError as e:
        raise recipe.error(_tokenizer_path(recipe, e.path), str(e)) from None
    return vocab


def _vocab_aligned(recipe: Recipe, vocab: Vocabulary, tok, name: str, handles: list, specs: list[str], base: str | None, warnings: list[str]) -> list:
    """The inputs of vocabulary tensor `name`, their rows re-ordered to the output vocabulary."""
    try:
        maps = row_maps(vocab, specs, base, [h.shape[0] for h in handles], tok.tokens)
    except VocabularyError as e:
        raise recipe.error(_tokenizer_path(recipe, e.path), f"{name}: {e}") from None
    missing = unfound(vocab, maps, tok.tokens)
    if missing:
        warnings.append(f"{name}: {len(missing)} token(s) are in none of its inputs and get zero rows, e.g. {missing[0]!r}")
    return vocab_handles(name, handles, maps)


@dataclass(frozen=True)
class _Group:
    """The inputs of one `slices:` entry (or of a whole `models:` list), of one module (`modules:`)."""

    slice_index: int | None
    base: str | None
    models: list[str]
    layer_start: dict[str, int]  # spec -> first input layer (slices only)
    layers: range  # output layer indices this group produces (slices only)
    module: str | None = None  # the recipe's module; None: the whole model


def _groups(recipe: Recipe, checkpoints: dict[str, ModelCheckpoint]) -> list[list[_Group]]:
    """The groups of each module of the recipe, in recipe order (one module, None, without `modules:`)."""
    if recipe.modules:
        return [_module_groups(recipe, checkpoints, name, mod.slices) for name, mod in recipe.modules.items()]
    return [_module_groups(recipe, checkpoints, None, recipe.slices)]


def _module_groups(recipe: Recipe, checkpoints: dict[str, ModelCheckpoint], module: str | None, slices) -> list[_Group]:
    if not slices:
        base, models = recipe.base_for(module=module), recipe.input_models(module=module)
        if not models:
            raise RecipeError("the recipe lists no models to merge (besides the base)")
        return [_Group(None, base, models, {}, range(0), module)]
    prefix = ("modules", module) if module is not None else ()
    groups, out_layer = [], 0
    for k, sl in enumerate(slices):
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        starts = {src.model: src.layer_range[0] for src in sl.sources}
        for src in sl.sources:
            have = _stack_layers(recipe, checkpoints[src.model], module)
            if src.layer_range[1] > have:
                where = f"{'.'.join(prefix)}.slices[{k}]" if prefix else f"slices[{k}]"
                raise RecipeError(f"{where}: layer_range {list(src.layer_range)} of {src.model} exceeds its {have} layers")
        groups.append(
            _Group(k, recipe.base_for(k, module), recipe.input_models(k, module), starts, range(out_layer, out_layer + n), module)
        )
        out_layer += n
    return groups


def _stack_layers(recipe: Recipe, model: ModelCheckpoint, module: str | None) -> int:
    """The layer count of the stack a slice of `module` takes layers from (top-level slices: the
    model's only stack; mergekit refuses them on a model of several modules too)."""
    stacks = _stacks(model)
    if module is None:
        if len(stacks.layers) > 1:
            raise recipe.error(
                ("slices",),
                f"{model.spec} has several modules ({', '.join(stacks.layers)}), each numbering its own layers: "
                "slice them under `modules:`, as mergekit requires",
            )
        return next(iter(stacks.layers.values()))
    return stacks.layers[module]


def _stacks(model: ModelCheckpoint) -> Stacks:
    return Stacks.of(model.tensors, model.config)


def _check_modules(recipe: Recipe, checkpoints: dict[str, ModelCheckpoint]) -> None:
    """Every module a recipe names is one the models have (mergekit's module names). A routing
    method decides from one set of tasks and settings for the whole model: it takes `models:`
    (and routes each stack apart by itself)."""
    if recipe.method.pipeline:
        raise recipe.error(
            ("modules",),
            f"{recipe.merge_method} routes every stack by itself from one `models:` list; use `models:` instead of `modules:`",
        )
    for module, slice_index in recipe.groups():
        for spec in [recipe.base_for(slice_index, module)] + recipe.input_models(slice_index, module):
            if spec is None:
                continue
            have = _stacks(checkpoints[spec]).layers
            if module not in have:
                raise recipe.error(
                    ("modules", module), f"{spec} has no module {module!r} (its modules: {', '.join(have)})"
                )


def _output_tensors(modules: list[list[_Group]], checkpoints: dict[str, ModelCheckpoint], warnings: list[str]):
    """(output name, group, offset within the group's layers, gradient position t), in output order.

    Layers are numbered per stack (checkpoints/stacks.py): a gradient spans the layers of the
    tensor's own stack. With `modules:`, as in mergekit, only the listed modules are written.
    """
    for groups in modules:
        yield from _module_tensors(groups, checkpoints)
    first = modules[0][0]
    if first.module is not None:
        reference = checkpoints[first.base or first.models[0]]
        stacks = _stacks(reference)
        listed = {g[0].module for g in modules}
        left = [n for n in reference.tensors if stacks.module(n) not in listed]
        if left:
            unlisted = sorted({stacks.module(n) for n in left})
            warnings.append(
                f"modules: not listed, so not written (as in mergekit): {', '.join(unlisted)} ({len(left)} tensor(s), e.g. {left[0]})"
            )


def _module_tensors(groups: list[_Group], checkpoints: dict[str, ModelCheckpoint]):
    """The output tensors of one module (or of the whole model).

    With slices, tensors outside the layers follow mergekit: embeddings come from the first
    slice's models, everything after the layers (final norm, lm_head) from the last slice's.
    """
    first = groups[0]
    reference = checkpoints[first.base or first.models[0]]
    stacks = _stacks(reference)
    inputs = [checkpoints[s] for g in groups for s in dict.fromkeys([g.base, *g.models]) if s is not None]
    names = [n for n in _tensor_names(reference, inputs) if first.module is None or stacks.module(n) == first.module]
    if first.slice_index is None:
        for name in names:
            yield name, first, None, layer_position(layer_index(name), stacks.layers[stacks.module(name)])
        return
    outside = [n for n in names if layer_index(n) is None]
    pre = [n for n in outside if "embed" in n]
    post = [n for n in outside if "embed" not in n]
    for name in pre:
        yield name, first, None, 0.0
    for g in groups:
        ref_spec = g.base or g.models[0]
        ref_names = [n for n in checkpoints[ref_spec].tensors if first.module is None or stacks.module(n) == first.module]
        for offset in range(len(g.layers)):
            layer_in = g.layer_start[ref_spec] + offset
            t = offset / (len(g.layers) - 1) if len(g.layers) > 1 else 1.0
            for name in ref_names:
                if layer_index(name) == layer_in:
                    yield with_layer(name, g.layers[offset]), g, offset, t
    for name in post:
        yield name, groups[-1], None, 0.0


def _tensor_names(reference: ModelCheckpoint, inputs: list[ModelCheckpoint]) -> list[str]:
    """The output's tensors: the reference's, and an output embedding (lm_head) it ties to its
    input embedding but another input stores, as mergekit writes it (from the tied model's
    embedding merged with the others' lm_head)."""
    names = list(reference.tensors)
    for ck in inputs:
        names += [n for n in ck.tensors if n.endswith("lm_head.weight") and n not in names and tied_embedding(reference, n)]
    return names


def _set_text_config(overrides: dict, config: dict | None, key: str, value) -> None:
    """Set the text model's config.json `key` wherever the config gives it: the top level, and
    `text_config` (vision-language configs such as LLaVA and Qwen2-VL keep vocab_size there,
    which transformers reads); the top level when neither has it. A nested mapping is
    overridden whole."""
    config = config or {}
    text = overrides.get("text_config") or config.get("text_config")
    nested = isinstance(text, dict) and key in text
    if key in config or not nested:
        overrides[key] = value
    if nested:
        overrides["text_config"] = {**text, key: value}


def _restack_config(overrides: dict, source: ModelCheckpoint, groups: list[_Group]) -> None:
    """The config.json entries a layer-stacking module changes: its stack's layer count, wherever
    config.json gives it (a VL config may give the decoder's twice: top level and text_config),
    and the per-layer lists beside it (e.g. sliding vs full attention), which follow the layers
    they came from. A nested mapping (text_config, vision_config) is overridden whole."""
    config = source.config or {}
    stacks = _stacks(source)
    for *outer, count in stacks.config_keys[groups[0].module or next(iter(stacks.layers))]:
        if outer:
            holder = overrides[outer[0]] = dict(overrides.get(outer[0]) or config.get(outer[0]) or {})
            current = holder
        else:
            holder, current = overrides, config
        holder[count] = sum(len(g.layers) for g in groups)
        types = current.get("layer_types")
        if isinstance(types, list):
            holder["layer_types"] = [
                types[min(len(types) - 1, g.layer_start[g.base or g.models[0]] + i)] for g in groups for i in range(len(g.layers))
            ]


def _input_name(out_name: str, group: _Group, spec: str, layer_offset: int | None) -> str:
    if layer_offset is None:
        return out_name
    return with_layer(out_name, group.layer_start[spec] + layer_offset)


def _common_shape(out_name, handles, checkpoints, specs, warnings, config_overrides, config) -> tuple[int, ...]:
    """The shape all inputs share; embeddings whose vocabularies differ keep their common rows."""
    shapes = {h.shape for h in handles}
    if len(shapes) == 1:
        return tuple(handles[0].shape)
    ref = handles[0]
    vocab_like = ("embed_tokens" in out_name or "lm_head" in out_name) and all(
        len(h.shape) == len(ref.shape) and h.shape[1:] == ref.shape[1:] for h in handles
    )
    if not vocab_like:
        i = next(i for i, h in enumerate(handles) if h.shape != ref.shape)
        raise StreammergeError(
            f"{checkpoints[specs[i]].directory}: tensor {handles[i].name} has shape {list(handles[i].shape)}, "
            f"but {list(ref.shape)} in {checkpoints[specs[0]].directory}"
        )
    rows = min(h.shape[0] for h in handles)
    sizes = ", ".join(f"{s}: {h.shape[0]}" for s, h in zip(specs, handles))
    warnings.append(
        f"{out_name}: vocabulary sizes differ ({sizes}); keeping the {rows} rows they share "
        "(tokens past that are dropped; use the same tokenizer for all models)"
    )
    _set_text_config(config_overrides, config, "vocab_size", rows)
    return (rows, *ref.shape[1:])
