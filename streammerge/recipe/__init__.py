"""The mergekit-compatible YAML recipe: schema, validation, per-tensor parameters.

Modules, each importing only those listed before it:

- `messages`: recipe paths, lines and one-line error texts;
- `yaml_lines`: YAML text -> data plus a path -> line index (duplicate keys rejected);
- `params`: the grammar of one setting (scalars, gradients, filters) and its evaluation;
- `entries`: the pydantic models of a recipe's entries (models, slices, modules, tokenizer);
- `schema`: `Recipe`, its semantic checks and queries, `parse_recipe` / `load_recipe`;
- `resolve`: one tensor's parameter values through the recipe's scopes (for the planner).
"""

from .messages import format_path
from .params import (
    Conditional,
    evaluate_setting,
    layer_position,
    parse_setting,
    validate_value,
)
from .resolve import resolve_tensor_params
from .schema import (
    InputModel,
    InputSlice,
    OutputModule,
    OutputSlice,
    Recipe,
    TokenEmbedding,
    TokenizerConfig,
    TokenizerSettings,
    load_recipe,
    parse_recipe,
    recipe_hash,
)

__all__ = [
    "Conditional",
    "InputModel",
    "InputSlice",
    "OutputModule",
    "OutputSlice",
    "Recipe",
    "TokenEmbedding",
    "TokenizerConfig",
    "TokenizerSettings",
    "evaluate_setting",
    "format_path",
    "layer_position",
    "load_recipe",
    "parse_recipe",
    "parse_setting",
    "recipe_hash",
    "resolve_tensor_params",
    "validate_value",
]
