"""The mergekit-compatible YAML recipe: schema, validation, per-tensor parameters."""

from .params import (
    Conditional,
    evaluate_setting,
    layer_position,
    parse_setting,
    resolve_tensor_params,
    validate_value,
)
from .schema import (
    InputModel,
    InputSlice,
    OutputModule,
    OutputSlice,
    Recipe,
    TokenEmbedding,
    TokenizerConfig,
    TokenizerSettings,
    format_path,
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
