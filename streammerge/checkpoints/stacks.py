"""The stacks of layers a checkpoint holds, and which stack each tensor belongs to.

A vision-language checkpoint holds several stacks, each numbered from 0 with its own layer
count: the text decoder (`model.layers.<i>`, LLaVA's `language_model.model.layers.<i>`), the
vision tower (Qwen2-VL's `visual.blocks.<i>`, CLIP's `vision_tower.encoder.layers.<i>`) and the
projector between them (no layers). mergekit calls them modules and names them `text_decoder`,
`vision_tower` and `multi_modal_projector` (its architecture files for Qwen2-VL, Mistral 3,
Gemma 3); a text-only model has one module, `default`. Recipes name them under `modules:`.

A stack is what a layer number is relative to: a gradient spans one stack's layers (t = i/(L-1)
with L that stack's layer count, as mergekit plans each module), and the routing methods score
and route each stack's layers apart, so vision-tower layer 3 is never decoder layer 3.

The stack of a tensor is read from its name (the first rule below whose pattern is a dotted
component sequence of it; everything else is the text decoder); a stack's layer count from
config.json (the first key of its rule present there, else the highest layer index + 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["DEFAULT", "PROJECTOR", "TEXT", "VISION", "Stacks", "layer_index", "stack_of", "with_layer"]

TEXT = "text_decoder"
VISION = "vision_tower"
PROJECTOR = "multi_modal_projector"
DEFAULT = "default"  # mergekit's name for the only module of a text-only model


@dataclass(frozen=True)
class _Rule:
    name: str
    match: re.Pattern  # tensor names of this stack
    layer: re.Pattern | None  # group 1: the layer index (None: a stack without layers)
    config_keys: tuple[tuple[str, ...], ...]  # config.json paths of its layer count


# "layers.<i>." and also GPT-2's "h.<i>.", BERT's "layer.<i>.", "blocks.<i>."
_LAYERS = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")

_RULES = (
    _Rule(PROJECTOR, re.compile(r"(?:^|\.)(?:multi_modal_projector|mm_projector|visual\.merger)\."), None, ()),
    _Rule(
        VISION,
        re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual)\."),
        _LAYERS,
        (("vision_config", "num_hidden_layers"), ("vision_config", "depth")),
    ),
    _Rule(TEXT, re.compile(""), _LAYERS, (("num_hidden_layers",), ("text_config", "num_hidden_layers"))),
)
_BY_NAME = {r.name: r for r in _RULES}


def _rule(tensor: str) -> _Rule:
    return next(r for r in _RULES if r.match.search(tensor))


def stack_of(tensor: str) -> str:
    """The stack a tensor belongs to: text_decoder, vision_tower or multi_modal_projector."""
    return _rule(tensor).name


def layer_index(tensor: str) -> int | None:
    """The tensor's layer number within its stack (None: outside the layers)."""
    pattern = _rule(tensor).layer
    m = pattern.search(tensor) if pattern is not None else None
    return int(m.group(1)) if m else None


def with_layer(tensor: str, layer: int) -> str:
    """The same tensor name in layer `layer` of its stack (the tensor must be in a layer)."""
    m = _rule(tensor).layer.search(tensor)
    return tensor[: m.start(1)] + str(layer) + tensor[m.end(1):]


def _config_value(config: Mapping, path: tuple[str, ...]):
    cur = config
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


@dataclass(frozen=True)
class Stacks:
    """The stacks of one checkpoint: name -> layer count, text decoder first; a text-only
    checkpoint has one stack, named `default` as mergekit names its module."""

    layers: dict[str, int]
    config_keys: dict[str, tuple[tuple[str, ...], ...]]  # where config.json gives each stack's layer count

    @classmethod
    def of(cls, tensors: Iterable[str], config: Mapping | None) -> "Stacks":
        config = config or {}
        seen: dict[str, int] = {}
        for name in tensors:
            stack, i = stack_of(name), layer_index(name)
            seen[stack] = max(seen.get(stack, 0), i + 1 if i is not None else 0)
        layers, keys = {}, {}
        for rule in _RULES[::-1]:  # text decoder first
            if rule.name not in seen:
                continue
            present = tuple(p for p in rule.config_keys if _positive_int(_config_value(config, p)))
            name = DEFAULT if set(seen) == {TEXT} else rule.name
            layers[name] = _config_value(config, present[0]) if present else seen[rule.name]
            # a text model's count is written as num_hidden_layers even where its config had none
            keys[name] = present or (rule.config_keys[:1] if rule.name == TEXT else ())
        return cls(layers, keys)

    def module(self, tensor: str) -> str:
        """The stack (mergekit's module name) of a tensor of this checkpoint."""
        return DEFAULT if DEFAULT in self.layers else stack_of(tensor)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0
