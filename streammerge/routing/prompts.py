"""Prompt files: JSON Lines, one object per line with a `prompt` (or `text`) string.

Blank lines are skipped. Anything else that is not such an object is an error naming the file
and the line: `math.jsonl:12: not valid JSON (Expecting ',' delimiter)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import StreammergeError

FIELDS = ("prompt", "text")


def read_prompt_records(path) -> list[tuple[str, dict]]:
    """(prompt text, the line's object as it was) for each record of a prompt file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StreammergeError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise StreammergeError(f"{path}: is a directory, not a prompt file") from None
    except OSError as e:
        raise StreammergeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise StreammergeError(f"{path}:{line}: not UTF-8 text") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            msg = getattr(e, "msg", str(e))
            raise StreammergeError(f"{path}:{n}: not valid JSON ({msg})") from None
        if not isinstance(obj, dict):
            raise StreammergeError(f"{path}:{n}: expected a JSON object with a 'prompt' field, got {type(obj).__name__}")
        field = next((f for f in FIELDS if f in obj), None)
        if field is None:
            raise StreammergeError(f"{path}:{n}: no 'prompt' (or 'text') field")
        value = obj[field]
        if not isinstance(value, str):
            raise StreammergeError(f"{path}:{n}: '{field}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise StreammergeError(f"{path}:{n}: '{field}' is empty")
        records.append((value, obj))
    if not records:
        raise StreammergeError(f"{path}: no prompts (expected JSON Lines with a 'prompt' field)")
    return records


def read_prompts(path) -> list[str]:
    return [text for text, _ in read_prompt_records(path)]


def parse_labelled(specs) -> list[tuple[str, Path]]:
    """["math=math.jsonl", ...] -> [("math", Path("math.jsonl")), ...]."""
    out = []
    for spec in specs:
        task, sep, file = str(spec).partition("=")
        if not sep or not task.strip() or not file.strip():
            raise StreammergeError(f"--prompts {spec!r}: expected TASK=FILE, e.g. math=math.jsonl")
        out.append((task.strip(), Path(file.strip())))
    return out
