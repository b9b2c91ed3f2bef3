"""Recipe error messages: where in the recipe (path and line) and what, on one line.

A location in a recipe is a path of keys and list indices, e.g. ("models", 1, "parameters"),
printed as `models[1].parameters`; `yaml_lines.index_lines` maps paths to file lines. Schema
validation (pydantic) errors become `path: what is wrong` here, with the line of the nearest
enclosing entry the recipe has.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import RecipeError

__all__ = [
    "LocatedError",
    "Path_",
    "describe",
    "format_path",
    "format_validation_error",
    "line_for",
    "one_line",
]

Path_ = tuple  # a location in the recipe: keys and list indices, e.g. ("models", 1, "parameters")


class LocatedError(RecipeError):
    """A semantic error at a recipe path; parse_recipe turns it into `file:line: path: msg`."""

    def __init__(self, path: Path_, message: str):
        self.path = tuple(path)
        self.message = message
        super().__init__(f"{format_path(self.path)}: {message}" if self.path else message)


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(path: Path_) -> str:
    out = ""
    for el in path:
        if isinstance(el, int):
            out += f"[{el}]"
        elif isinstance(el, str) and _IDENT.match(el):
            out += f".{el}" if out else el
        else:
            out += f"[{el!r}]"
    return out


def describe(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        text = repr(v)
        return f"the list {text}" if len(text) <= 40 else "a list"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def line_for(lines: dict, path: Path_) -> int:
    """The line of the longest prefix of `path` present in the index (unknown elements skipped)."""
    cur: Path_ = ()
    for el in path:
        cand = cur + (el,)
        if cand in lines:
            cur = cand
    return lines.get(cur, 1)


def _data_path(data: Any, loc: Path_) -> Path_:
    """The elements of a pydantic loc that are real keys/indices in the data (drops union tags)."""
    out: list = []
    cur = data
    for el in loc:
        if isinstance(cur, dict) and el in cur:
            out.append(el)
            cur = cur[el]
        elif isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur):
            out.append(el)
            cur = cur[el]
        elif isinstance(cur, (dict, list)):
            continue
        else:
            break
    return tuple(out)


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def format_validation_error(err: dict, data: Any, lines: dict) -> tuple[int, str]:
    """(line, `path: what`) for one pydantic error dict over the recipe `data`."""
    loc = tuple(err["loc"])
    typ = err["type"]
    ctx = err.get("ctx") or {}
    if "subloc" in ctx:
        loc = loc + tuple(ctx["subloc"])
    path = _data_path(data, loc)
    if typ == "missing":
        key = loc[-1]
        parent = _data_path(data, loc[:-1])
        text = f"missing required key {key!r}"
        path = parent
    elif "msg" in ctx:
        text = ctx["msg"]
    elif typ in _EXPECTED:
        text = f"expected {_EXPECTED[typ]}, got {describe(err.get('input'))}"
    elif typ == "extra_forbidden":
        text = f"unknown key {loc[-1]!r}"
    else:
        text = err.get("msg", typ).removeprefix("Value error, ")
    line = line_for(lines, path)
    return line, (f"{format_path(path)}: {text}" if path else text)
