"""Bounded reading of untrusted YAML and JSON: recipes, model-directory and store files, requests.

A recipe copied from a model card, a config.json in a downloaded model, a router.json in a store
someone sent you: each is parsed here under stated limits before anything else looks at it, so a
hostile file costs at most a second or two and a few tens of MB, and is refused in one line that
names the limit and where (file:line, or the JSON path).

- Size: the bytes are refused before they are parsed (`max_bytes`).
- YAML (the recipe): a composer that counts nodes as it composes them, an alias counting as the
  size of what it points to, so an alias bomb is refused after a few hundred bytes of input,
  without ever building its expansion (`max_nodes`); nesting is counted the same way
  (`max_depth`), and no list or mapping may hold more than `max_items` entries: a recipe's
  lists are gradients, slices and models, which no model has thousands of.
- JSON: the objects and arrays are counted in the raw bytes before parsing (`max_nodes`; the
  scalars are bounded by the size), then the parsed document's nesting and its longest array or
  object are checked (`max_depth`, `max_items`). Parsing memory is then at most about 12 times
  the size plus 72 bytes per object or array.

This module imports nothing of streammerge but `errors`, so `recipe/`, `checkpoints/`, `store/`,
`routing/` and a server can all use it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.resolver import Resolver

from .errors import StreammergeError

__all__ = [
    "DOCUMENT",
    "LISTING",
    "Limits",
    "RECIPE",
    "REQUEST",
    "YamlLimitExceeded",
    "bounded_yaml_loader",
    "parse_json",
    "parse_request_body",
    "read_bounded",
    "read_json",
    "value_error_text",
]


@dataclass(frozen=True)
class Limits:
    """The bounds for one kind of file."""

    what: str  # the subject of messages: "the recipe", "config.json"
    max_bytes: int
    max_nodes: int  # YAML: every value, aliases expanded; JSON: objects and arrays
    max_items: int  # entries of one list or mapping
    max_depth: int = 64

    def named(self, what: str) -> "Limits":
        """The same limits, with messages about `what` ("the index", "router.json")."""
        return replace(self, what=what)


# A recipe is a few kilobytes; the largest models have about 200 layers, so 4,096 entries is far
# more than any gradient, slice list or model list can use.
RECIPE = Limits("the recipe", max_bytes=1_000_000, max_nodes=200_000, max_items=4_096)
# config.json, router.json, method/analysis/storage json, zarr.json: kilobytes in practice.
DOCUMENT = Limits("the file", max_bytes=4_000_000, max_nodes=100_000, max_items=100_000)
# Files with one entry per tensor (the safetensors index, the store manifest): about 100 bytes
# per tensor, and the largest checkpoints have about 100,000 tensors.
LISTING = Limits("the file", max_bytes=32_000_000, max_nodes=2_000_000, max_items=2_000_000)
# Bodies of HTTP requests (an OpenAI chat request): prompts, not models.
REQUEST = Limits("the request body", max_bytes=4_000_000, max_nodes=100_000, max_items=100_000)


def _n(x: int) -> str:
    return f"{x:,}"


def _nested(limits: Limits) -> str:
    return f"is nested too deeply (over the limit of {limits.max_depth} levels)"


# --------------------------------------------------------------------------------------------
# bytes


def read_bounded(path: Path, limits: Limits, error: type[StreammergeError] = StreammergeError) -> bytes:
    """The file's bytes, refused (one line) when larger than `limits.max_bytes`.

    A regular file's size is checked before reading; then at most max_bytes + 1 bytes are read,
    so a file growing meanwhile, or a pipe, is bounded too. OSError passes through: callers
    word a missing file their own way.
    """
    with open(path, "rb") as f:
        _check_size(os.fstat(f.fileno()).st_size, str(path), limits, error)
        data = f.read(limits.max_bytes + 1)
    _check_size(len(data), str(path), limits, error)
    return data


def _check_size(size: int, where: str, limits: Limits, error: type[StreammergeError]) -> None:
    if size > limits.max_bytes:
        raise error(f"{where}: {limits.what} is larger than the limit of {_n(limits.max_bytes)} bytes")


# --------------------------------------------------------------------------------------------
# JSON


def read_json(
    path: Path,
    limits: Limits = DOCUMENT,
    error: type[StreammergeError] = StreammergeError,
    *,
    loads: Callable[[str], Any] = json.loads,
) -> Any:
    """Read and parse a JSON file under `limits`; every problem is one line naming `path`."""
    try:
        data = read_bounded(path, limits, error)
    except OSError as e:
        raise error(f"{path}: cannot read {limits.what}: {e.strerror or e}") from None
    return parse_json(data, str(path), limits, error, loads=loads)


def parse_request_body(body: bytes, where: str = "request body") -> Any:
    """A JSON request body as Python objects, under `REQUEST` limits (for the HTTP server).

    Raises StreammergeError with one line (`where: what`), which the server answers with a 4xx.
    """
    return parse_json(body, where, REQUEST)


def parse_json(
    data: bytes,
    where: str,
    limits: Limits = DOCUMENT,
    error: type[StreammergeError] = StreammergeError,
    *,
    loads: Callable[[str], Any] = json.loads,
) -> Any:
    """Parse JSON bytes under `limits`. `loads` may add checks (duplicate keys, NaN)."""
    _check_size(len(data), where, limits, error)
    # Objects and arrays are the costly values (56+ bytes for 2 bytes of input): count them in
    # the bytes before building any. Brackets inside strings count too, erring on the safe side.
    containers = data.count(b"{") + data.count(b"[")
    if containers > limits.max_nodes:
        raise error(
            f"{where}: {limits.what} has more objects and arrays than the limit of {_n(limits.max_nodes)}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: {limits.what} is not valid UTF-8 (byte {e.start})") from None
    try:
        doc = loads(text)
    except RecursionError:
        raise _too_deep(text, where, limits, error) from None
    except json.JSONDecodeError as e:
        raise error(f"{where}:{e.lineno}: {limits.what} is not valid JSON ({e.msg})") from None
    except (ValueError, MemoryError) as e:
        raise error(f"{where}: {limits.what} is not valid JSON ({value_error_text(e)})") from None
    _check_shape(doc, text, where, limits, error)
    return doc


def value_error_text(e: BaseException) -> str:
    """A one-line, bounded reason for a ValueError raised by json.loads."""
    text = str(e)
    if "Exceeds the limit" in text and "digits" in text:
        return "an integer literal has too many digits"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _check_shape(doc: Any, text: str, where: str, limits: Limits, error) -> None:
    """Nesting depth and the longest array/object of a parsed document, without recursion."""
    todo: list[tuple[Any, int, tuple]] = [(doc, 1, ())]
    while todo:
        value, depth, path = todo.pop()
        if isinstance(value, dict):
            children = value.items()
        elif isinstance(value, list):
            children = enumerate(value)
        else:
            continue
        if depth > limits.max_depth:
            raise _too_deep(text, where, limits, error)
        if len(value) > limits.max_items:
            raise error(
                f"{where}: {_json_path(path)} has {_n(len(value))} entries, over the limit of "
                f"{_n(limits.max_items)} entries per array or object"
            )
        todo.extend((v, depth + 1, path + (k,)) for k, v in children if isinstance(v, (dict, list)))


def _json_path(path: tuple) -> str:
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f"[{json.dumps(k)[:60]}]" for k in path)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(text: str, where: str, limits: Limits, error) -> StreammergeError:
    """The error for nesting past max_depth, at the line where it happens (found by a scan that
    skips strings and stops there)."""
    depth, line = 0, None
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in ("[", "{"):
            depth += 1
            if depth > limits.max_depth:
                line = text.count("\n", 0, m.start()) + 1
                break
        elif tok in ("]", "}"):
            depth -= 1
    at = f"{where}:{line}" if line else where
    return error(f"{at}: {limits.what} {_nested(limits)}")


# --------------------------------------------------------------------------------------------
# YAML


class YamlLimitExceeded(Exception):
    """A YAML document past one of its limits; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


class _BoundedComposer(Composer):
    """PyYAML's composer, counting what the document would expand to while composing it.

    Every node composed adds one; an alias adds the expanded size of the node it names (known,
    since that node is complete), so the count is the size of the fully expanded document and
    grows past `max_nodes` after a few hundred bytes of an alias bomb, before any construction.
    An alias to a node still open (a cycle) has no finite size and is refused.
    """

    def _init_bounds(self, limits: Limits) -> None:
        self._limits = limits
        self._nodes = 0
        self._size: dict[int, int] = {}  # id(collection node) -> expanded node count
        self._height: dict[int, int] = {}  # id(collection node) -> expanded nesting depth
        self._open: list[list] = []  # per open collection: [entries composed, max child height, mapping?]

    def get_single_node(self):
        try:
            return super().get_single_node()
        except yaml.MarkedYAMLError as e:
            # libyaml's scanner reads ahead through a run of '[' and stops at its own cap (1,000
            # levels) before our count sees the events: the same limit, reported as ours.
            if "maximum nesting depth" in str(e.problem) and e.problem_mark is not None:
                raise self._too_deep(e.problem_mark.line + 1) from None
            raise

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        lim = self._limits
        if self._open:
            entry = self._open[-1]
            entry[0] += 1
            per_item = 2 if entry[2] else 1  # a mapping composes a key and a value per entry
            if entry[0] > lim.max_items * per_item:
                kind = "mapping" if entry[2] else "list"
                raise YamlLimitExceeded(
                    line, f"a {kind} with more entries than the limit of {_n(lim.max_items)}"
                )
        if isinstance(event, AliasEvent):
            node = super().compose_node(parent, index)
            if isinstance(node, yaml.ScalarNode):
                size, height = 1, 0
            elif id(node) in self._size:
                size, height = self._size[id(node)], self._height[id(node)]
            else:
                raise YamlLimitExceeded(line, f"the alias *{event.anchor} refers to a node that contains it")
            self._count(size, height, line)
            return node
        if not isinstance(event, (SequenceStartEvent, MappingStartEvent)):
            self._count(1, 0, line)
            return super().compose_node(parent, index)
        if len(self._open) >= lim.max_depth:
            raise self._too_deep(line)
        before = self._nodes
        self._count(1, 0, line)
        self._open.append([0, 0, isinstance(event, MappingStartEvent)])
        try:
            node = super().compose_node(parent, index)
        finally:
            child_height = self._open.pop()[1]
        self._size[id(node)] = self._nodes - before
        self._height[id(node)] = child_height + 1
        if self._open:
            self._open[-1][1] = max(self._open[-1][1], child_height + 1)
        return node

    def _count(self, size: int, height: int, line: int) -> None:
        lim = self._limits
        self._nodes += size
        if self._nodes > lim.max_nodes:
            raise YamlLimitExceeded(
                line,
                f"{lim.what} expands to more values than the limit of {_n(lim.max_nodes)} "
                "(an alias counts as the values it repeats)",
            )
        if len(self._open) + height > lim.max_depth:
            raise self._too_deep(line)
        if self._open and height:
            self._open[-1][1] = max(self._open[-1][1], height)

    def _too_deep(self, line: int) -> YamlLimitExceeded:
        lim = self._limits
        return YamlLimitExceeded(line, f"{lim.what} {_nested(lim)}")


class _PyBoundedLoader(_BoundedComposer, yaml.SafeLoader):
    """PyYAML's Python scanner and parser under the bounded composer."""

    def __init__(self, text: str, limits: Limits):
        yaml.SafeLoader.__init__(self, text)
        self._init_bounds(limits)


_BoundedLoader: type = _PyBoundedLoader

if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser

    class _CBoundedLoader(_BoundedComposer, CParser, SafeConstructor, Resolver):
        """libyaml's scanner and parser (about 20 times faster than PyYAML's) under the bounded
        composer: composing, where the bounds are counted, and constructing stay in Python."""

        def __init__(self, text: str, limits: Limits):
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_bounds(limits)

    _BoundedLoader = _CBoundedLoader


def bounded_yaml_loader(text: str, where: str, limits: Limits, error: type[StreammergeError] = StreammergeError):
    """A SafeLoader-like loader for `text` whose composition raises YamlLimitExceeded past
    `limits` (use get_single_node, then construct_document; dispose when done). The size is
    checked here, before any parsing."""
    size = len(text)
    if limits.max_bytes // 4 < size <= limits.max_bytes:  # characters take up to 4 bytes
        size = len(text.encode("utf-8"))
    _check_size(size, where, limits, error)
    return _BoundedLoader(text, limits)
