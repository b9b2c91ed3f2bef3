"""An example recipe for one merge method, made from its declared parameters (`streammerge methods NAME`).

The models are placeholders (`models/base`, `models/ft1`, ...), as in recipes/*.yaml. Every
parameter with a value appears: a required one with its `Param.example`, the others with their
example or default, per-model parameters under each model and global ones under `parameters:`.
"""

from __future__ import annotations

import yaml

from ..methods.base import REQUIRED, MergeMethod, Param


def _value(p: Param):
    """The value the example shows for `p`, or None to leave it out."""
    if p.example is not None:
        return p.example
    return None if p.default is REQUIRED else p.default


def example_recipe(method: MergeMethod) -> str:
    """A recipe (YAML text) that uses `method` with every parameter that has a value."""
    per_model = {p.name: _value(p) for p in method.params if p.scope == "model" and _value(p) is not None}
    shared = {p.name: _value(p) for p in method.params if p.scope != "model" and _value(p) is not None}
    doc: dict = {"merge_method": method.name}
    if method.base != "unused":
        doc["base_model"] = "models/base"
    models = []
    for i in range(1, method.example_models + 1):
        entry: dict = {"model": f"models/ft{i}"}
        if per_model:
            entry["parameters"] = dict(per_model)
        models.append(entry)
    doc["models"] = models
    if shared:
        doc["parameters"] = shared
    doc["dtype"] = "bfloat16"
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
