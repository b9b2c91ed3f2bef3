"""One output tensor's parameter values, resolved through the recipe's scopes.

Precedence and gradient semantics are mergekit's (see `params`); the recipe supplies the
`parameters:` mappings to search (`Recipe.parameter_sources`) and the line for errors. This sits
above both `params` (the setting grammar) and `schema` (the recipe), so neither imports the other
back. Its caller is the planner.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..methods.base import REQUIRED, MergeMethod, Param, TensorParams
from .params import evaluate_setting, validate_value
from .schema import Recipe

__all__ = ["resolve_tensor_params"]


def _fmt_t(t: float) -> str:
    return f"{t:.6g}" if isinstance(t, float) and math.isfinite(t) else str(t)


def resolve_tensor_params(
    recipe: Recipe,
    method: MergeMethod | None,
    tensor_name: str,
    t: float,
    models: Sequence[str],
    seed: int = 0,
    *,
    slice_index: int | None = None,
    module: str | None = None,
    input_names: Sequence[str] | None = None,
) -> TensorParams:
    """Resolve every parameter of `method` for one output tensor.

    `models`: the models the method sees for this tensor, in order (Block.models; usually
    `recipe.input_models(slice_index, module)`). `slice_index`: which output slice the tensor
    belongs to when the recipe uses `slices:` (mergekit resolves embeddings with the first
    slice and the final norm / lm_head with the last one); ignored with `models:`. `module`:
    the module name with `modules:`. `input_names`: each model's own name for the tensor
    (aligned with `models`): mergekit matches per-model filters against the *input* tensor
    name, which differs from the output name when a slice takes layers from elsewhere
    (layer_range [8, 12] feeds output layer 0 from input layer 8); defaults to `tensor_name`.

    Raises RecipeError (one line, with the recipe line) for a missing required value or a
    value that fails validation after interpolation.
    """
    method = method or recipe.method
    if input_names is None:
        input_names = [tensor_name] * len(models)
    elif len(input_names) != len(models):
        raise ValueError("input_names must be aligned with models")
    model_params = [p for p in method.params if p.scope == "model"]
    global_params = [p for p in method.params if p.scope != "model"]

    shared_sources = recipe.parameter_sources(None, slice_index=slice_index, module=module)
    globals_ = {
        p.name: _resolve_one(recipe, method, p, shared_sources, tensor_name, t, None, None)
        for p in global_params
    }
    per_model = []
    for m, name in zip(models, input_names):
        sources = recipe.parameter_sources(m, slice_index=slice_index, module=module)
        where = recipe.model_entry_path(m, slice_index=slice_index, module=module)
        per_model.append(
            {p.name: _resolve_one(recipe, method, p, sources, name, t, m, where) for p in model_params}
        )
    params = TensorParams(globals=globals_, per_model=tuple(per_model), seed=seed)
    why = method.check(params) if method.check is not None else None
    if why:
        where = recipe.model_entry_path(models[0], slice_index=slice_index, module=module) if models else ()
        raise recipe.error(where, f"for tensor {tensor_name!r} (t={_fmt_t(t)}): {why}")
    return params


def _resolve_one(recipe, method, param: Param, sources, tensor_name, t, model, where) -> Any:
    for path, settings in sources:
        if settings is None or param.name not in settings:
            continue
        setting = settings[param.name]
        try:
            value = evaluate_setting(setting, tensor_name, t, validate=lambda v: validate_value(param, v))
        except ValueError as e:
            raise recipe.error(
                path + (param.name,), f"for tensor {tensor_name!r} (t={_fmt_t(t)}): {e}"
            ) from None
        if value is not None:
            return value
    if param.default is REQUIRED:
        who = f"model {model!r}" if model is not None else "the merge"
        raise recipe.error(
            where if where is not None else (),
            f"no value of required parameter {param.name!r} ({method.name}) applies to tensor "
            f"{tensor_name!r} for {who}: no filter matched and there is no default",
        )
    return param.default
