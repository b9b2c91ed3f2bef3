"""Per-tensor parameter values: settings, gradients, filters, precedence.

A recipe *setting* is what the YAML gives for one parameter name in one `parameters:` mapping:

- a scalar (number, true/false, string): the value everywhere;
- a list of scalars (a *gradient*): numeric lists are interpolated linearly at t·(len−1),
  where t is the layer position (`layer_position`); non-numeric lists select
  `values[int(t·(len−1))]`;
- a list of `{filter, value}` entries (or one such mapping): the first entry whose filter is
  omitted, "*", or a substring of the tensor name applies, and its value may be a scalar or a
  gradient. If none applies the setting gives nothing, and resolution falls through to the next
  scope (as an empty list does).

This is exactly mergekit's `evaluate_setting` (mergekit/config.py), including the order of the
interpolation arithmetic, so a gradient yields bit-identical floats. Values go through the
parameter's validator before the numeric/non-numeric decision and again after interpolation,
as in mergekit: with mergekit's pydantic (lax) coercion first, so `density: 1e-3` (which YAML
1.1 reads as the *string* "1e-3") is the number 0.001, as it is in mergekit, then
`Param.validate` for streammerge's kinds, ranges and choices.

Precedence (mergekit's `ConfigReader.parameter_sources`), highest first:

- a model-scope parameter for model m: m's own `parameters` (its `models[]` entry, or in a
  slice every `sources[]` entry naming m) → the slice's `parameters` → the module's
  `parameters` (only with `modules:`) → the top-level `parameters` → the method's default;
- a global-scope parameter: the slice's → the module's → the top-level `parameters` → default.

A missing value for a parameter without default is an error naming the model and the tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ..methods.base import Param

__all__ = [
    "Conditional",
    "Setting",
    "SettingError",
    "evaluate_setting",
    "layer_position",
    "parse_setting",
    "setting_values",
    "validate_value",
]

SCALAR_TYPES = (bool, int, float, str)


class Conditional(BaseModel):
    """One `{filter, value}` entry of a filtered setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: Any  # a scalar or a list of scalars (a gradient)

    def matches(self, tensor_name: str) -> bool:
        """mergekit's rule: no filter, "*", or a substring of a non-empty tensor name."""
        f = self.filter
        return f is None or f == "*" or bool(tensor_name and f in tensor_name)


# A parsed setting: a scalar, a list of scalars, or a list of Conditional.
Setting = Any


class SettingError(ValueError):
    """A malformed setting; `subloc` is the path inside the setting (list indices, "value")."""

    def __init__(self, message: str, subloc: tuple = ()):
        super().__init__(message)
        self.message = message
        self.subloc = subloc


_SHAPES = "a number, true/false, a string, a list of numbers (gradient) or a list of {filter, value}"


def _is_scalar(v: Any) -> bool:
    return isinstance(v, SCALAR_TYPES)


def _describe(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_conditional(raw: Any, subloc: tuple) -> Conditional:
    if isinstance(raw, Conditional):
        return raw
    if not isinstance(raw, Mapping):
        raise SettingError(f"expected a {{filter, value}} mapping, got {_describe(raw)}", subloc)
    for key in raw:
        if key not in ("filter", "value"):
            raise SettingError(f"unknown key {key!r} (a filtered setting has 'filter' and 'value')", subloc + (key,))
    if "value" not in raw:
        raise SettingError("missing required key 'value'", subloc)
    filt = raw.get("filter")
    if filt is not None and not isinstance(filt, str):
        raise SettingError(f"expected a string, got {_describe(filt)}", subloc + ("filter",))
    value = raw["value"]
    if isinstance(value, list):
        for j, e in enumerate(value):
            if not _is_scalar(e):
                raise SettingError(
                    f"expected a scalar gradient endpoint, got {_describe(e)}", subloc + ("value", j)
                )
    elif not _is_scalar(value):
        raise SettingError(f"expected a scalar or a list of scalars, got {_describe(value)}", subloc + ("value",))
    return Conditional(filter=filt, value=list(value) if isinstance(value, list) else value)


def parse_setting(raw: Any) -> Setting:
    """Check the shape of one raw YAML setting and normalise it.

    A single `{filter, value}` mapping becomes a one-entry list (mergekit treats both alike).
    Raises SettingError (with the path inside the setting) for any other shape.
    """
    if _is_scalar(raw):
        return raw
    if isinstance(raw, (Mapping, Conditional)):
        return [_parse_conditional(raw, ())]
    if isinstance(raw, (list, tuple)):
        raw = list(raw)
        if all(_is_scalar(e) for e in raw):
            return raw
        if all(isinstance(e, (Mapping, Conditional)) for e in raw):
            return [_parse_conditional(e, (i,)) for i, e in enumerate(raw)]
        if _is_scalar(raw[0]):
            i = next(i for i, e in enumerate(raw) if not _is_scalar(e))
            what = "a scalar (a list of scalars is a gradient)"
        elif isinstance(raw[0], (Mapping, Conditional)):
            i = next(i for i, e in enumerate(raw) if not isinstance(e, (Mapping, Conditional)))
            what = "a {filter, value} mapping like the first entry"
        else:
            i, what = 0, "a scalar or a {filter, value} mapping"
        raise SettingError(f"expected {what}, got {_describe(raw[i])}", (i,))
    raise SettingError(f"expected {_SHAPES}, got {_describe(raw)}")


def setting_values(setting: Setting) -> list[tuple[tuple, Any]]:
    """Every scalar a parsed setting can produce, with its path inside the setting."""
    if _is_scalar(setting):
        return [((), setting)]
    out: list[tuple[tuple, Any]] = []
    for i, e in enumerate(setting):
        if isinstance(e, Conditional):
            if isinstance(e.value, list):
                out.extend(((i, "value", j), v) for j, v in enumerate(e.value))
            else:
                out.append(((i, "value"), e.value))
        else:
            out.append(((i,), e))
    return out


def map_setting(setting: Setting, fn: Callable[[Any], Any]) -> Setting:
    """Apply `fn` to every scalar of a parsed setting (used to store validated values)."""
    if _is_scalar(setting):
        return fn(setting)
    out = []
    for e in setting:
        if isinstance(e, Conditional):
            v = [fn(x) for x in e.value] if isinstance(e.value, list) else fn(e.value)
            out.append(Conditional(filter=e.filter, value=v))
        else:
            out.append(fn(e))
    return out


def setting_may_apply(setting: Setting) -> bool:
    """False only if the setting can never give a value (an empty list, or only empty lists)."""
    if _is_scalar(setting):
        return True
    if not setting:
        return False
    if all(isinstance(e, Conditional) for e in setting):
        return any(not (isinstance(e.value, list) and not e.value) for e in setting)
    return True


_ADAPTERS = {k: TypeAdapter(k) for k in SCALAR_TYPES}


def validate_value(param: Param, value: Any) -> Any:
    """Validate one scalar for `param`.

    mergekit validates parameter values with pydantic in lax mode. For *strings* do the same
    (YAML 1.1, which PyYAML speaks, reads `1e-3` as the string "1e-3"; a quoted "0.5" is a
    string too; mergekit reads both as floats, and "true"/"yes" as booleans), then
    `Param.validate` (kinds, ranges, choices), whose message is the one users see. Other type
    mixes that pydantic's lax mode would let through (true as a weight meaning 1.0, 1 as a flag
    meaning true) are rejected: a deliberate difference from mergekit, they are typos.
    """
    adapter = _ADAPTERS.get(param.kind)
    if adapter is not None and isinstance(value, str) and param.kind is not str:
        try:
            value = adapter.validate_python(value)
        except ValidationError:
            pass  # Param.validate rejects it with a readable reason
    return param.validate(value)


def _identity(v: Any) -> Any:
    return v


def evaluate_setting(
    setting: Setting,
    tensor_name: str,
    t: float = 0.0,
    *,
    validate: Callable[[Any], Any] | None = None,
) -> Any:
    """The value of one setting for one tensor at layer position t (mergekit's semantics).

    Returns None when the setting gives nothing for this tensor (an empty list, or no filter
    matches): the caller then falls through to the next scope. `validate` is applied to every
    scalar before the numeric/non-numeric decision and to the interpolated result (identity by
    default). Raw YAML shapes (dicts) are accepted as well as parsed settings.
    """
    validate = validate or _identity
    if isinstance(setting, (Conditional, Mapping)):
        setting = [setting]
    if isinstance(setting, SCALAR_TYPES):
        return validate(setting)
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(isinstance(e, SCALAR_TYPES) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            # same expression and order as mergekit, for bit-identical floats
            result = (1 - frac) * values[i0] + frac * values[i1]
            return validate(result)
        for cond in setting:
            if not isinstance(cond, Conditional):
                cond = _parse_conditional(cond, ())
            if cond.matches(tensor_name):
                return evaluate_setting(cond.value, tensor_name, t, validate=validate)
        return None
    raise TypeError(f"unexpected setting value: {setting!r}")


def layer_position(layer_index: int | None, num_layers: int) -> float:
    """mergekit's t for gradients.

    `layer_index` is the layer's index *within its output slice* (with `models:` the whole
    model is one slice) and `num_layers` the slice's number of layers: t = i/(L−1), and 1.0
    when the slice has a single layer (mergekit's `plan_slice`). Tensors outside the layers
    (embeddings, final norm, lm_head: `layer_index=None`) take t = 0 (mergekit plans them with
    a ConfigReader whose t is 0; they use the first slice's settings before the layers and the
    last slice's after, see `resolve.resolve_tensor_params`).
    """
    if layer_index is None:
        return 0.0
    if num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer index {layer_index} outside a slice of {num_layers} layers")
    if num_layers == 1:
        return 1.0
    return layer_index / (num_layers - 1)
