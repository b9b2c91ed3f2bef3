"""What changed between two recipes, in words: `models[1] (models/ft2) parameters.density 0.5 -> 0.7`.

Used when a store refuses to resume with a changed recipe. Works on `Recipe.canonical_data()`
(the validated values, as stored in a store's manifest), so layout, comments and number
spelling never count as changes.
"""

from __future__ import annotations

from typing import Any, Iterator

_MISSING = object()
SHOWN = 3  # differences spelled out; the rest are counted


def _label(key: Any, value: Any) -> str:
    """A path element; a list entry that names a model says which (`models[1] (models/ft2)`)."""
    if not isinstance(key, int):
        return str(key)
    model = value.get("model") if isinstance(value, dict) else None
    return f"[{key}] ({model})" if isinstance(model, str) else f"[{key}]"


def _join(path: str, label: str) -> str:
    return path + label if label.startswith("[") or not path else f"{path}.{label}"


def _show(v: Any) -> str:
    if v is _MISSING:
        return "(unset)"
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, old value, new value) for every leaf that differs; a missing key is `_MISSING`.

    Lists of different lengths (a model added or removed) differ as a whole; entries of lists of
    the same length are compared one by one."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            a, b = old.get(k, _MISSING), new.get(k, _MISSING)
            yield from differences(a, b, _join(path, _label(k, a if b is _MISSING else b)))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            label = _label(i, b) if _label(i, a) == _label(i, b) else f"[{i}]"
            yield from differences(a, b, _join(path, label))
    elif old != new:
        yield path, old, new


def describe_changes(old: dict, new: dict) -> str:
    """`path old -> new; ...` for the first SHOWN differences, or "formatting" if none."""
    diffs = list(differences(old, new))
    if not diffs:
        return "formatting"
    text = "; ".join(f"{p} {_show(a)} -> {_show(b)}" for p, a, b in diffs[:SHOWN])
    more = len(diffs) - SHOWN
    return text + (f"; and {more} more" if more > 0 else "")
