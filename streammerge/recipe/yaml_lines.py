"""Recipe YAML -> data plus a line index: path -> the file line it was given on.

PyYAML composes the document into nodes first; duplicate keys are rejected on the nodes (PyYAML
itself silently keeps the last), and the index lets every later error name the recipe line.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import RecipeError
from ..limits import RECIPE, YamlLimitExceeded, bounded_yaml_loader
from .messages import one_line

__all__ = ["index_lines", "load_yaml"]


def _check_duplicate_keys(root: yaml.Node, loader) -> None:
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[tuple, int] = {}
            for k, v in node.value:
                stack.append(v)
                if isinstance(k, yaml.ScalarNode):
                    if k.tag == "tag:yaml.org,2002:merge":
                        continue
                    ident = (k.tag, k.value)
                    if ident in keys:
                        raise _YamlProblem(
                            k.start_mark.line + 1,
                            f"duplicate key {k.value!r} (first given at line {keys[ident]})",
                        )
                    keys[ident] = k.start_mark.line + 1
                else:
                    stack.append(k)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


class _YamlProblem(Exception):
    def __init__(self, line: int, msg: str):
        self.line, self.msg = line, msg


def index_lines(root: yaml.Node, loader) -> dict:
    """path -> line (the key's line for mapping entries, the item's for list items)."""
    lines: dict = {(): root.start_mark.line + 1}
    todo = [((), root, 0)]
    while todo:
        path, node, depth = todo.pop()
        if depth > 64:
            continue
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                try:
                    key = loader.construct_object(k)
                except yaml.YAMLError:
                    continue
                p = path + (key,)
                lines[p] = k.start_mark.line + 1
                todo.append((p, v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                todo.append((p, v, depth + 1))
    return lines


def load_yaml(text: str, source: str) -> tuple[Any, dict]:
    """The recipe's data and line index, under the `RECIPE` limits (size, values with aliases
    expanded, nesting, entries per list or mapping) checked before anything is built."""
    loader = bounded_yaml_loader(text, source, RECIPE, RecipeError)
    try:
        try:
            root = loader.get_single_node()
            if root is None:
                raise RecipeError(f"{source}:1: the recipe is empty")
            _check_duplicate_keys(root, loader)
            data = loader.construct_document(root)  # also flattens `<<:` merge keys in the nodes
        except _YamlProblem as e:
            raise RecipeError(f"{source}:{e.line}: {one_line(e.msg)}") from None
        except YamlLimitExceeded as e:
            raise RecipeError(f"{source}:{e.line}: {e.message}") from None
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 1
            what = " ".join(x for x in (e.context, e.problem) if x)
            raise RecipeError(f"{source}:{line}: invalid YAML: {one_line(what)}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{source}: invalid YAML: {one_line(e)}") from None
        except RecursionError:
            raise RecipeError(f"{source}: invalid YAML: nested too deeply") from None
        lines = index_lines(root, loader)
    finally:
        loader.dispose()
    return data, lines
