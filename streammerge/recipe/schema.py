"""The recipe: mergekit's YAML merge configuration, validated strictly.

Every mergekit config that mergekit itself can merge is meant to load unchanged; on top of
mergekit's own schema (mergekit/config.py) this rejects, with one line naming the file line and
the field, what mergekit would silently ignore or only trip over mid-merge: unknown keys (typos),
duplicate YAML keys, unknown parameter names for the method, values the parameter cannot take
(every gradient endpoint and filter value is checked), required parameters missing for a model,
a method that needs a base model without one, malformed layer ranges, unknown dtypes.

Where mergekit accepts something that has no effect, this accepts it too and records a warning
in `Recipe.warnings` (an error with `strict=True`):

- a global-scope parameter (e.g. `normalize`) under `models[].parameters` or a slice source's
  `parameters`: mergekit looks shared parameters up only in the slice, module and top-level
  `parameters` (`resolve_parameters` calls `parameter_sources(None)`), so it ignores them there;
  so does streammerge;
- per-model parameters given to the base model of a base-using method (mergekit binds them to
  the non-base inputs only);
- `residual_weight` on a slice (in mergekit's schema, never read);
- `int8_mask` for mergekit's task-arithmetic family (it only picks the dtype of a boolean mask),
  and `density` / `rescale` for `task_arithmetic` (no sparsification: never read), when the
  streammerge method does not declare them.

Beyond mergekit: dtype aliases (bf16, fp16, half, fp32, float) are accepted; mergekit only knows
the full names (with or without "torch."). Differences the other way: a model reference is a
string (mergekit also takes a mapping, which is rejected; "model+lora" names a model and a LoRA adapter applied to it,
see checkpoints/lora.py; "path@revision" is passed on as is),
and parameter values of the wrong type are not coerced except from strings (see
`params.validate_value`).

Which models a method sees (`Recipe.input_models`) follows mergekit's planner
(`MergePlanner.normalize_config`): with `models:`, a `base_model` not listed is appended as one
more input; methods with a base (policy "required"/"optional") take it as the base and exclude it
from the inputs (their per-model parameters are mergekit's NON_BASE scope), while methods that do
not use a base (policy "unused", mergekit's IGNORED, e.g. linear) average it in like any other
input, so it needs a `weight` like any other input (mergekit fails the same way without one).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..dtypes import float_type
from ..errors import RecipeError
from ..methods import get_method, method_names
from ..methods.base import REQUIRED, MergeMethod
from .params import (
    SettingError,
    map_setting,
    parse_setting,
    setting_may_apply,
    setting_values,
    validate_value,
)

__all__ = [
    "InputModel",
    "InputSlice",
    "OutputModule",
    "OutputSlice",
    "Recipe",
    "TokenEmbedding",
    "TokenizerConfig",
    "TokenizerSettings",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
]

Path_ = tuple  # a location in the recipe: keys and list indices, e.g. ("models", 1, "parameters")


class _LocatedError(RecipeError):
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


def _describe(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        text = repr(v)
        return f"the list {text}" if len(text) <= 40 else "a list"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# pydantic models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # Our own check (rather than extra="forbid" alone) to name the allowed keys.
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    allowed = ", ".join(cls.model_fields)
                    near = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                    hint = f"did you mean {near[0]!r}? " if near else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        "{msg}",
                        {"msg": f"unknown key {key!r} ({hint}expected one of: {allowed})", "subloc": (key,)},
                    )
        elif not isinstance(data, BaseModel):
            raise PydanticCustomError(
                "not_mapping", "{msg}", {"msg": f"expected a mapping, got {_describe(data)}", "subloc": ()}
            )
        return data


def _setting(raw: Any) -> Any:
    try:
        return parse_setting(raw)
    except SettingError as e:
        raise PydanticCustomError("setting", "{msg}", {"msg": e.message, "subloc": e.subloc}) from None


def _model_name(v: Any) -> Any:
    if isinstance(v, str) and not v.strip():
        raise PydanticCustomError("empty", "{msg}", {"msg": "a model name or path must not be empty", "subloc": ()})
    if isinstance(v, str) and "+" in v and (v.count("+") != 1 or not all(p.strip() for p in v.split("+"))):
        raise PydanticCustomError(
            "lora",
            "{msg}",
            {"msg": f"{v!r}: mergekit's 'model+lora' form is one model path and one adapter path joined by '+'",
             "subloc": ()},
        )
    if isinstance(v, dict):
        raise PydanticCustomError(
            "model_ref",
            "{msg}",
            {"msg": "expected a model name or path (a string; 'path@revision' is allowed)", "subloc": ()},
        )
    return v


Setting = Annotated[Any, BeforeValidator(_setting)]
Parameters = dict[StrictStr, Setting]
ModelRef = Annotated[StrictStr, BeforeValidator(_model_name)]


class InputModel(_Strict):
    """One entry of `models:`."""

    model: ModelRef
    parameters: Parameters | None = None


class InputSlice(_Strict):
    """One entry of a slice's `sources:`: layers [start, end) of `model`."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range", mode="before")
    @classmethod
    def _layer_range(cls, v: Any) -> Any:
        ok = (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        )
        if not ok:
            raise PydanticCustomError(
                "layer_range", "{msg}", {"msg": f"expected [start, end] (two integers), got {_describe(v)}", "subloc": ()}
            )
        a, b = v
        if a < 0 or b <= a:
            raise PydanticCustomError(
                "layer_range",
                "{msg}",
                {"msg": f"expected 0 <= start < end (layers start..end-1), got [{a}, {b}]", "subloc": ()},
            )
        return (a, b)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_Strict):
    """One entry of `slices:`: output layers built from the same number of layers of each source."""

    sources: list[InputSlice]
    base_model: ModelRef | None = None  # mergekit: overrides the top-level base for this slice
    residual_weight: StrictFloat | StrictInt | None = None  # accepted like mergekit, which never reads it
    parameters: Parameters | None = None

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise PydanticCustomError("empty", "{msg}", {"msg": "a slice needs at least one source", "subloc": ()})
        n = v[0].num_layers
        for j, src in enumerate(v):
            if src.num_layers != n:
                raise PydanticCustomError(
                    "layer_count",
                    "{msg}",
                    {
                        "msg": f"covers {src.num_layers} layers but sources[0] covers {n}; "
                        "every source of a slice needs the same number of layers",
                        "subloc": (j, "layer_range"),
                    },
                )
        _no_duplicates([s.model for s in v], lambda j: (j, "model"), "sources")
        return v

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


def _no_duplicates(names: list[str], subloc, where: str) -> None:
    seen: dict[str, int] = {}
    for j, m in enumerate(names):
        if m in seen:
            raise PydanticCustomError(
                "duplicate",
                "{msg}",
                {"msg": f"model {m!r} appears twice (also {where}[{seen[m]}]); mergekit rejects duplicate inputs",
                 "subloc": subloc(j)},
            )
        seen[m] = j


def _check_models_list(v: list[InputModel] | None) -> list[InputModel] | None:
    if v:
        _no_duplicates([e.model for e in v], lambda j: (j, "model"), "models")
    return v


class OutputModule(_Strict):
    """One entry of `modules:` (multi-module architectures): either `models` or `slices`."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[InputModel] | None) -> list[InputModel] | None:
        return _check_models_list(v)

    @model_validator(mode="after")
    def _one_of(self) -> "OutputModule":
        if bool(self.slices) == bool(self.models):
            raise PydanticCustomError(
                "module", "{msg}", {"msg": "a module needs exactly one of 'models' or 'slices' (non-empty)", "subloc": ()}
            )
        return self


class ModelTokenSource(_Strict):
    kind: Literal["model_token"]
    model: ModelRef
    token_id: StrictInt | None = None
    token: StrictStr | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise PydanticCustomError(
                "token", "{msg}", {"msg": "give exactly one of 'token_id' or 'token'", "subloc": ()}
            )
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


def _token_source_tag(v: Any) -> str | None:
    if isinstance(v, str):
        return "model"
    if isinstance(v, dict):
        return v.get("kind") if v.get("kind") in ("model_token", "zero") else None
    if isinstance(v, BaseModel):
        return v.kind  # type: ignore[attr-defined]
    return None


TokenSource = Annotated[
    Union[
        Annotated[ModelRef, Tag("model")],
        Annotated[ModelTokenSource, Tag("model_token")],
        Annotated[ZeroSource, Tag("zero")],
    ],
    Discriminator(
        _token_source_tag,
        custom_error_type="token_source",
        custom_error_message="expected a model name, {kind: zero} or {kind: model_token, model: ..., token_id: ...}",
    ),
]


class TokenEmbedding(_Strict):
    """`tokenizer.tokens.<token>`: where the embedding of an added token comes from."""

    source: TokenSource | None = None
    force: StrictBool = False


class TokenizerConfig(_Strict):
    """mergekit's newer `tokenizer:` section."""

    source: ModelRef = "union"  # "union", "base" or a model
    tokens: dict[StrictStr, TokenEmbedding] | None = None
    pad_to_multiple_of: StrictInt | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise PydanticCustomError("pad", "{msg}", {"msg": f"must be a positive integer, got {v}", "subloc": ()})
        return v


@dataclass(frozen=True)
class TokenizerSettings:
    """The tokenizer to build, from `tokenizer_source` or `tokenizer` (None: keep the base's)."""

    source: str | None  # "union", "base", a model, or None
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


# mergekit parameters that never change the result, accepted (with a warning) when the
# streammerge method does not declare them: {name: methods (mergekit names) it is allowed for}.
_GTA_FAMILY = frozenset(
    {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
)
_NOOP_PARAMS: dict[str, frozenset[str]] = {
    "int8_mask": _GTA_FAMILY,  # only the dtype of a 0/1 mask; the mask is boolean anyway
    "density": frozenset({"task_arithmetic"}),  # no sparsification in task_arithmetic
    "rescale": frozenset({"task_arithmetic"}),
}


class Recipe(_Strict):
    """A validated merge recipe (mergekit's `MergeConfiguration`, plus `name`)."""

    merge_method: StrictStr
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[StrictStr, OutputModule] | None = None
    parameters: Parameters | None = None
    dtype: StrictStr | None = None
    out_dtype: StrictStr | None = None
    tokenizer_source: ModelRef | None = None  # "union", "base" or a model
    tokenizer: TokenizerConfig | None = None
    chat_template: StrictStr | None = None
    name: StrictStr | None = None

    _source: str | None = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)
    _warnings: list = PrivateAttr(default_factory=list)

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[InputModel] | None) -> list[InputModel] | None:
        return _check_models_list(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return float_type(v.removeprefix("torch.")).name
        except KeyError:
            raise PydanticCustomError(
                "dtype",
                "{msg}",
                {"msg": f"unknown dtype {v!r} (expected bfloat16, float16 or float32; "
                 "aliases bf16, fp16, half, fp32, float)", "subloc": ()},
            ) from None

    @field_validator("merge_method")
    @classmethod
    def _method_name(cls, v: str) -> str:
        names = method_names()
        if v not in names:
            near = difflib.get_close_matches(v, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise PydanticCustomError(
                "method",
                "{msg}",
                {"msg": f"unknown merge method {v!r} ({hint}available: {', '.join(names)})", "subloc": ()},
            )
        return v

    # ---------------------------------------------------------------- semantic validation

    @model_validator(mode="after")
    def _semantics(self, info: ValidationInfo) -> "Recipe":
        strict = bool((info.context or {}).get("strict")) if info is not None else False
        warnings: list[tuple[Path_, str]] = []

        def warn(path: Path_, msg: str) -> None:
            if strict:
                raise _LocatedError(path, msg)
            warnings.append((tuple(path), msg))

        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            path = (given[1],) if len(given) > 1 else ()
            raise _LocatedError(
                path, "a recipe needs exactly one of 'models', 'slices' or 'modules' (non-empty)"
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise _LocatedError(("tokenizer",), "give either 'tokenizer_source' or 'tokenizer', not both")
        tok = self.tokenizer_settings()
        if tok.source == "base" and self.base_model is None:
            where = ("tokenizer", "source") if self.tokenizer is not None else ("tokenizer_source",)
            raise _LocatedError(where, "the tokenizer source 'base' needs a base_model")

        method = self.method
        for path, settings, per_model in self._parameter_blocks():
            for name in list(settings):
                self._check_setting(method, path + (name,), settings, name, per_model, warn)

        for group in self._groups():
            self._check_group(method, group, warn)
        self._warnings = warnings
        return self

    def _parameter_blocks(self):
        """(path, parameters dict, is_per_model) for every `parameters:` in the recipe."""
        if self.parameters:
            yield ("parameters",), self.parameters, False

        def walk(prefix: Path_, models, slices):
            for i, e in enumerate(models or []):
                if e.parameters:
                    yield prefix + ("models", i, "parameters"), e.parameters, True
            for i, s in enumerate(slices or []):
                for j, src in enumerate(s.sources):
                    if src.parameters:
                        yield prefix + ("slices", i, "sources", j, "parameters"), src.parameters, True
                if s.parameters:
                    yield prefix + ("slices", i, "parameters"), s.parameters, False

        yield from walk((), self.models, self.slices)
        for mname, mod in (self.modules or {}).items():
            if mod.parameters:
                yield ("modules", mname, "parameters"), mod.parameters, False
            yield from walk(("modules", mname), mod.models, mod.slices)

    def _check_setting(self, method: MergeMethod, path: Path_, settings: dict, name: str, per_model: bool, warn):
        param = method.param(name)
        if param is None:
            if method.name in _NOOP_PARAMS.get(name, ()):
                warn(path, f"{name!r} has no effect on {method.name} (in mergekit either); ignored")
                return
            valid = ", ".join(p.name for p in method.params) or "none"
            near = difflib.get_close_matches(name, [p.name for p in method.params], n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise _LocatedError(path, f"unknown parameter {name!r} for merge method {method.name} ({hint}valid: {valid})")
        if per_model and param.scope != "model":
            warn(
                path,
                f"{name!r} is a global parameter of {method.name}: it is ignored here, as in mergekit; "
                "set it in the top-level (or slice) parameters",
            )
        setting = settings[name]
        for sub, value in setting_values(setting):
            try:
                validate_value(param, value)
            except ValueError as e:
                raise _LocatedError(path + sub, str(e)) from None
        settings[name] = map_setting(setting, lambda v: validate_value(param, v))

    def _groups(self):
        """Every merge group: (module or None, slice index or None)."""
        if self.modules:
            for mname, mod in self.modules.items():
                if mod.models:
                    yield (mname, None)
                else:
                    for i in range(len(mod.slices)):
                        yield (mname, i)
        elif self.models:
            yield (None, None)
        else:
            for i in range(len(self.slices)):
                yield (None, i)

    def _check_group(self, method: MergeMethod, group, warn) -> None:
        module, slice_index = group
        prefix, models, slices = self._container(module)
        base = self._group_base(slice_index, module)
        if method.base != "unused" and base is not None:
            # mergekit binds per-model parameters of base-using methods to the non-base inputs
            # only (NON_BASE scope): the base's own per-model settings are never read.
            where = self.model_entry_path(base, slice_index=slice_index, module=module)
            entry = self._entry(where)
            model_level = [p.name for p in method.params if p.scope == "model"]
            given = [k for k in (getattr(entry, "parameters", None) or {}) if k in model_level]
            if given:
                warn(
                    where + ("parameters",),
                    f"{', '.join(map(repr, given))} of the base model {base!r} "
                    f"{'is' if len(given) == 1 else 'are'} ignored: {method.name} applies per-model "
                    "parameters to the other models only (as mergekit does)",
                )
        if slices is not None:
            s = slices[slice_index]
            spath = prefix + ("slices", slice_index)
            if s.residual_weight is not None:
                warn(spath + ("residual_weight",), "residual_weight is ignored (mergekit never reads it either)")
            if method.base == "required" and base is None:
                # point at the slice when other slices have their own base_model
                per_slice = any(x.base_model for x in slices)
                raise _LocatedError(
                    spath if per_slice else ("merge_method",),
                    f"merge method {method.name} needs a base_model",
                )
            if method.base != "unused" and base is not None and base not in [src.model for src in s.sources]:
                # mergekit: "Base input is not present in merge inputs"; the base's layers come
                # from its entry in the sources.
                raise _LocatedError(
                    spath + ("sources",),
                    f"the base model {base!r} must be one of this slice's sources (it gives the base's layer_range)",
                )
        elif method.base == "required" and base is None:
            raise _LocatedError(("merge_method",), f"merge method {method.name} needs a base_model")

        inputs = self.input_models(slice_index, module)
        for p in method.params:
            if p.default is not REQUIRED:
                continue
            if p.scope == "model":
                for m in inputs:
                    sources = self.parameter_sources(m, slice_index=slice_index, module=module)
                    if not any(st and p.name in st and setting_may_apply(st[p.name]) for _, st in sources):
                        where = self.model_entry_path(m, slice_index=slice_index, module=module)
                        if where == ("base_model",):
                            msg = (
                                f"{method.name} merges every input, including base_model {m!r} "
                                f"(mergekit appends it to the models), and it has no {p.name!r}: list it "
                                f"under models with a {p.name}, give a top-level {p.name}, or drop base_model"
                            )
                        else:
                            msg = (
                                f"model {m!r} has no value for required parameter {p.name!r} "
                                f"({method.name}); set it in {format_path(where + ('parameters',))} "
                                "or in the top-level parameters"
                            )
                        raise _LocatedError(where, msg)
            else:
                sources = self.parameter_sources(None, slice_index=slice_index, module=module)
                if not any(st and p.name in st and setting_may_apply(st[p.name]) for _, st in sources):
                    raise _LocatedError(
                        ("parameters",) if self.parameters is not None else (),
                        f"missing required parameter {p.name!r} of merge method {method.name}",
                    )

    # ---------------------------------------------------------------- queries

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def warnings(self) -> list[str]:
        """One line per accepted-but-ignored setting (see the module docstring)."""
        ordered = sorted(self._warnings, key=lambda w: self.line_of(w[0]) or 0)
        return [self._format(path, msg) for path, msg in ordered]

    @property
    def source(self) -> str | None:
        return self._source

    def _container(self, module: str | None):
        """(path prefix, models list or None, slices list or None) for a module (or the top level)."""
        if self.modules:
            if module is None:
                raise ValueError("this recipe uses 'modules:'; pass module=")
            if module not in self.modules:
                raise ValueError(f"no module {module!r} in this recipe")
            mod = self.modules[module]
            return ("modules", module), mod.models, mod.slices
        return (), self.models, self.slices

    def _slice(self, slice_index: int | None, module: str | None):
        prefix, models, slices = self._container(module)
        if slices is None:
            return prefix, None
        if slice_index is None:
            raise ValueError("this recipe uses 'slices:'; pass slice_index=")
        return prefix + ("slices", slice_index), slices[slice_index]

    def base_for(self, slice_index: int | None = None, module: str | None = None) -> str | None:
        """The base model the method sees (Block.base; None for methods that do not use a base)."""
        if self.method.base == "unused":
            return None
        return self._group_base(slice_index, module)

    def _group_base(self, slice_index: int | None, module: str | None) -> str | None:
        """The configured base of a group: the slice's own base_model, else the top-level one."""
        _, s = self._slice(slice_index, module)
        if s is not None and s.base_model is not None:
            return s.base_model
        return self.base_model

    def input_models(self, slice_index: int | None = None, module: str | None = None) -> list[str]:
        """The models the method sees (Block.models), in recipe order, following mergekit.

        Base-using methods: the listed models (or the slice's sources) without the base.
        Methods without a base: every listed model, plus (with `models:`) a `base_model` that is
        not listed, appended last, as mergekit's planner does.
        """
        prefix, models, slices = self._container(module)
        base = self._group_base(slice_index, module)
        if models is not None:
            listed = [e.model for e in models]
        else:
            _, s = self._slice(slice_index, module)
            listed = [src.model for src in s.sources]
        if self.method.base == "unused":
            if models is not None and base is not None and base not in listed:
                listed.append(base)
            return listed
        return [m for m in listed if m != base]

    def model_specs(self) -> list[str]:
        """The distinct models whose tensors the merge reads, base first: what to open."""
        out: list[str] = []
        for module, slice_index in self._groups():
            for m in [self.base_for(slice_index, module)] + self.input_models(slice_index, module):
                if m is not None and m not in out:
                    out.append(m)
        base = self.base_model
        if base in out:
            out.remove(base)
            out.insert(0, base)
        return out

    def referenced_models(self) -> list[str]:
        """Every model named anywhere (mergekit's referenced_models, ordered): base first."""
        out: list[str] = []

        def add(m):
            if m is not None and m not in out:
                out.append(m)

        add(self.base_model)

        def walk(models, slices):
            for e in models or []:
                add(e.model)
            for s in slices or []:
                for src in s.sources:
                    add(src.model)
                add(s.base_model)

        walk(self.models, self.slices)
        for mod in (self.modules or {}).values():
            walk(mod.models, mod.slices)
        return out

    def parameter_sources(
        self, model: str | None, *, slice_index: int | None = None, module: str | None = None
    ) -> list[tuple[Path_, dict | None]]:
        """The `parameters:` mappings to search, highest precedence first, with their paths.

        model=None gives the sources of global-scope parameters (mergekit's
        `ConfigReader.parameter_sources`).
        """
        prefix, models, slices = self._container(module)
        out: list[tuple[Path_, dict | None]] = []
        if slices is not None:
            spath, s = self._slice(slice_index, module)
            if model is not None:
                for j, src in enumerate(s.sources):
                    if src.model == model:
                        out.append((spath + ("sources", j, "parameters"), src.parameters))
            out.append((spath + ("parameters",), s.parameters))
        elif model is not None:
            for i, e in enumerate(models):
                if e.model == model:
                    out.append((prefix + ("models", i, "parameters"), e.parameters))
        if module is not None:
            out.append((prefix + ("parameters",), self.modules[module].parameters))
        out.append((("parameters",), self.parameters))
        return out

    def model_entry_path(self, model: str, *, slice_index: int | None = None, module: str | None = None) -> Path_:
        """Where `model` is listed for this group (its models[i] / sources[j] entry)."""
        prefix, models, slices = self._container(module)
        if slices is not None:
            spath, s = self._slice(slice_index, module)
            for j, src in enumerate(s.sources):
                if src.model == model:
                    return spath + ("sources", j)
            if s.base_model == model:
                return spath + ("base_model",)
        else:
            for i, e in enumerate(models):
                if e.model == model:
                    return prefix + ("models", i)
        return ("base_model",)

    def _entry(self, path: Path_) -> Any:
        cur: Any = self
        for el in path:
            if isinstance(el, int):
                cur = cur[el]
            elif isinstance(cur, dict):
                cur = cur[el]
            else:
                cur = getattr(cur, el)
        return cur

    def tokenizer_settings(self) -> TokenizerSettings:
        if self.tokenizer is not None:
            return TokenizerSettings(
                source=self.tokenizer.source,
                tokens=dict(self.tokenizer.tokens or {}),
                pad_to_multiple_of=self.tokenizer.pad_to_multiple_of,
            )
        return TokenizerSettings(source=self.tokenizer_source)

    # ---------------------------------------------------------------- errors and identity

    def line_of(self, path: Path_) -> int | None:
        """The recipe line of `path` (or of its nearest enclosing entry), when parsed from text."""
        if not self._lines:
            return None
        return _line_for(self._lines, tuple(path))

    def _format(self, path: Path_, msg: str) -> str:
        text = f"{format_path(path)}: {msg}" if path else msg
        if self._source is None:
            return text
        line = self.line_of(path)
        return f"{self._source}:{line}: {text}" if line else f"{self._source}: {text}"

    def error(self, path: Path_, msg: str) -> RecipeError:
        """A one-line RecipeError located at `path` of this recipe."""
        return RecipeError(_one_line(self._format(tuple(path), msg)))

    def canonical_data(self) -> dict:
        data = self.model_dump(mode="python", exclude_none=True, exclude_defaults=True)
        return _clean(data)

    def canonical_json(self) -> str:
        """The recipe as canonical JSON: validated values (dtype aliases resolved, parameter values
        coerced to their kinds), no nulls, no empty `parameters`, sorted keys, no whitespace."""
        return json.dumps(self.canonical_data(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def recipe_hash(self) -> str:
        """sha256 (hex) of `canonical_json()`: equal for recipes that differ only in layout,
        comments, key order, aliases or number spelling."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


def recipe_hash(recipe: Recipe) -> str:
    return recipe.recipe_hash()


def _clean(v: Any) -> Any:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="python", exclude_none=True, exclude_defaults=True)
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            x = _clean(x)
            if x is None or (k == "parameters" and x == {}):
                continue
            out[k] = x
        return out
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# YAML -> nodes, lines, errors


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _line_for(lines: dict, path: Path_) -> int:
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


def _format_validation_error(err: dict, data: Any, lines: dict) -> tuple[int, str]:
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
        text = f"expected {_EXPECTED[typ]}, got {_describe(err.get('input'))}"
    elif typ == "extra_forbidden":
        text = f"unknown key {loc[-1]!r}"
    else:
        text = err.get("msg", typ).removeprefix("Value error, ")
    line = _line_for(lines, path)
    return line, (f"{format_path(path)}: {text}" if path else text)


def _check_duplicate_keys(root: yaml.Node, loader: yaml.SafeLoader) -> None:
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


def _index_lines(root: yaml.Node, loader: yaml.SafeLoader) -> dict:
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


def _load_yaml(text: str, source: str) -> tuple[Any, dict]:
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
            if root is None:
                raise RecipeError(f"{source}:1: the recipe is empty")
            _check_duplicate_keys(root, loader)
            data = loader.construct_document(root)  # also flattens `<<:` merge keys in the nodes
        except _YamlProblem as e:
            raise RecipeError(f"{source}:{e.line}: {_one_line(e.msg)}") from None
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 1
            what = " ".join(x for x in (e.context, e.problem) if x)
            raise RecipeError(f"{source}:{line}: invalid YAML: {_one_line(what)}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{source}: invalid YAML: {_one_line(e)}") from None
        except RecursionError:
            raise RecipeError(f"{source}: invalid YAML: nested too deeply") from None
        lines = _index_lines(root, loader)
    finally:
        loader.dispose()
    return data, lines


def parse_recipe(text: str, source: str = "<recipe>", *, strict: bool = False) -> Recipe:
    """Parse and validate a recipe. Raises RecipeError: `source:line: path: what is wrong`.

    strict=True turns the warnings (settings mergekit accepts but ignores) into errors.
    """
    if not isinstance(text, str):
        raise TypeError("parse_recipe takes the YAML text")
    data, lines = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}:{lines[()]}: a recipe is a mapping (merge_method: ..., models: ...), got {_describe(data)}"
        )
    try:
        recipe = Recipe.model_validate(data, context={"strict": strict})
    except ValidationError as e:
        errs = [_format_validation_error(err, data, lines) for err in e.errors()]
        line, text_ = min(errs, key=lambda x: x[0])
        raise RecipeError(_one_line(f"{source}:{line}: {text_}")) from None
    except _LocatedError as e:
        line = _line_for(lines, e.path)
        where = f"{format_path(e.path)}: " if e.path else ""
        raise RecipeError(_one_line(f"{source}:{line}: {where}{e.message}")) from None
    recipe._source = source
    recipe._lines = lines
    return recipe


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    """Read and validate a recipe file (errors name the file and line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a directory, not a recipe file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    return parse_recipe(text, str(p), strict=strict)
