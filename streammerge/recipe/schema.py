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

Beyond mergekit: dtype aliases (bf16, fp16, half, fp32, float, fp64, double) are accepted; mergekit only knows
the full names (with or without "torch."). Differences the other way: a model reference is a
string ("model+lora" names a model and a LoRA adapter applied to it, see checkpoints/lora.py; "path@revision" is
passed on as is; mergekit's mapping form {model: M, lora: L}, each a string or {path, revision}, is read as that string,
override_architecture refused),
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
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    PrivateAttr,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..dtypes import float_type
from ..errors import RecipeError
from ..limits import RECIPE, read_bounded
from ..methods import get_method, method_names
from ..methods.base import REQUIRED, MergeMethod
from .entries import (
    InputModel,
    InputSlice,
    ModelRef,
    OutputModule,
    OutputSlice,
    Parameters,
    Strict,
    TokenEmbedding,
    TokenizerConfig,
    TokenizerSettings,
    check_models_list,
)
from .messages import (
    LocatedError,
    Path_,
    describe,
    format_path,
    format_validation_error,
    line_for,
    one_line,
)
from .params import map_setting, setting_may_apply, setting_values, validate_value
from .yaml_lines import load_yaml

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


class Recipe(Strict):
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
        return check_models_list(v)

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
                {"msg": f"unknown dtype {v!r} (expected bfloat16, float16, float32 or float64; "
                 "aliases bf16, fp16, half, fp32, float, fp64, double)", "subloc": ()},
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
                raise LocatedError(path, msg)
            warnings.append((tuple(path), msg))

        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            path = (given[1],) if len(given) > 1 else ()
            raise LocatedError(
                path, "a recipe needs exactly one of 'models', 'slices' or 'modules' (non-empty)"
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise LocatedError(("tokenizer",), "give either 'tokenizer_source' or 'tokenizer', not both")
        tok = self.tokenizer_settings()
        if tok.source == "base" and self.base_model is None:
            where = ("tokenizer", "source") if self.tokenizer is not None else ("tokenizer_source",)
            raise LocatedError(where, "the tokenizer source 'base' needs a base_model")

        method = self.method
        for path, settings, per_model in self._parameter_blocks():
            for name in list(settings):
                self._check_setting(method, path + (name,), settings, name, per_model, warn)

        for group in self.groups():
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
            raise LocatedError(path, f"unknown parameter {name!r} for merge method {method.name} ({hint}valid: {valid})")
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
                raise LocatedError(path + sub, str(e)) from None
        settings[name] = map_setting(setting, lambda v: validate_value(param, v))

    def groups(self):
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
                raise LocatedError(
                    spath if per_slice else ("merge_method",),
                    f"merge method {method.name} needs a base_model",
                )
            if method.base != "unused" and base is not None and base not in [src.model for src in s.sources]:
                # mergekit: "Base input is not present in merge inputs"; the base's layers come
                # from its entry in the sources.
                raise LocatedError(
                    spath + ("sources",),
                    f"the base model {base!r} must be one of this slice's sources (it gives the base's layer_range)",
                )
        elif method.base == "required" and base is None:
            raise LocatedError(("merge_method",), f"merge method {method.name} needs a base_model")

        inputs = self.input_models(slice_index, module)
        others = [m for m in inputs if m != base]
        if method.max_models is not None and len(others) > method.max_models:
            raise LocatedError(
                prefix + (("slices", slice_index) if slices is not None else ("models",)),
                f"merge method {method.name} takes {method.max_models} model besides the base_model, got {len(others)}",
            )
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
                        raise LocatedError(where, msg)
            else:
                sources = self.parameter_sources(None, slice_index=slice_index, module=module)
                if not any(st and p.name in st and setting_may_apply(st[p.name]) for _, st in sources):
                    raise LocatedError(
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
        for module, slice_index in self.groups():
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
        return line_for(self._lines, tuple(path))

    def _format(self, path: Path_, msg: str) -> str:
        text = f"{format_path(path)}: {msg}" if path else msg
        if self._source is None:
            return text
        line = self.line_of(path)
        return f"{self._source}:{line}: {text}" if line else f"{self._source}: {text}"

    def error(self, path: Path_, msg: str) -> RecipeError:
        """A one-line RecipeError located at `path` of this recipe."""
        return RecipeError(one_line(self._format(tuple(path), msg)))

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


def parse_recipe(text: str, source: str = "<recipe>", *, strict: bool = False) -> Recipe:
    """Parse and validate a recipe. Raises RecipeError: `source:line: path: what is wrong`.

    strict=True turns the warnings (settings mergekit accepts but ignores) into errors.
    """
    if not isinstance(text, str):
        raise TypeError("parse_recipe takes the YAML text")
    data, lines = load_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}:{lines[()]}: a recipe is a mapping (merge_method: ..., models: ...), got {describe(data)}"
        )
    try:
        recipe = Recipe.model_validate(data, context={"strict": strict})
    except ValidationError as e:
        errs = [format_validation_error(err, data, lines) for err in e.errors()]
        line, text_ = min(errs, key=lambda x: x[0])
        raise RecipeError(one_line(f"{source}:{line}: {text_}")) from None
    except LocatedError as e:
        line = line_for(lines, e.path)
        where = f"{format_path(e.path)}: " if e.path else ""
        raise RecipeError(one_line(f"{source}:{line}: {where}{e.message}")) from None
    recipe._source = source
    recipe._lines = lines
    return recipe


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    """Read and validate a recipe file (errors name the file and line)."""
    p = Path(path)
    try:
        text = read_bounded(p, RECIPE, RecipeError).decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a directory, not a recipe file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    return parse_recipe(text, str(p), strict=strict)
