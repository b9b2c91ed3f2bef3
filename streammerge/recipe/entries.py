"""The entries of a recipe: the pydantic models below `Recipe` (models, slices, modules, tokenizer).

Every entry is `Strict`: unknown keys are rejected by name with the keys allowed there (and a
close match), and schema errors carry a `subloc` so `messages.format_validation_error` can point
at the offending key or list item. Parameter values are parsed by `params.parse_setting`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .messages import describe
from .params import SettingError, parse_setting

__all__ = [
    "InputModel",
    "InputSlice",
    "ModelRef",
    "OutputModule",
    "OutputSlice",
    "Parameters",
    "Strict",
    "TokenEmbedding",
    "TokenizerConfig",
    "TokenizerSettings",
    "check_models_list",
]


class Strict(BaseModel):
    """A recipe entry: an unknown key is refused by name, with the allowed keys and a close match."""

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
                "not_mapping", "{msg}", {"msg": f"expected a mapping, got {describe(data)}", "subloc": ()}
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
        return _model_name(_reference_string(v))
    return v


def _ref_error(msg: str, *subloc) -> PydanticCustomError:
    return PydanticCustomError("model_ref", "{msg}", {"msg": msg, "subloc": subloc})


def _path_string(v: Any, *subloc) -> str:
    """mergekit's ModelPath: a string, or {path, revision} (written here as 'path@revision')."""
    if isinstance(v, str):
        return v
    if not isinstance(v, dict) or set(v) - {"path", "revision"} or not isinstance(v.get("path"), str):
        raise _ref_error(f"expected a path (a string, or {{path: ..., revision: ...}}), got {describe(v)}", *subloc)
    rev = v.get("revision")
    if rev is not None and not (isinstance(rev, str) and rev):
        raise _ref_error(f"expected the revision as a string, got {describe(rev)}", *subloc, "revision")
    return v["path"] + (f"@{rev}" if rev else "")


def _reference_string(v: dict) -> str:
    """mergekit's mapping form of a model reference, {model: BASE, lora: ADAPTER}, as the string
    form it stands for ('BASE+ADAPTER', or 'BASE'): one spelling for the rest of streammerge."""
    for key in v:
        if key == "override_architecture":
            raise _ref_error("override_architecture is not supported: the architecture is the model's config.json's", key)
        if key not in ("model", "lora"):
            raise _ref_error(f"unknown key {key!r} (expected one of: model, lora)", key)
    if "model" not in v:
        raise _ref_error("a model reference mapping needs 'model' (and optionally 'lora')")
    model = _path_string(v["model"], "model")
    lora = v.get("lora")
    return model if lora is None else f"{model}+{_path_string(lora, 'lora')}"


Setting = Annotated[Any, BeforeValidator(_setting)]
Parameters = dict[StrictStr, Setting]
ModelRef = Annotated[StrictStr, BeforeValidator(_model_name)]


class InputModel(Strict):
    """One entry of `models:`."""

    model: ModelRef
    parameters: Parameters | None = None


class InputSlice(Strict):
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
                "layer_range", "{msg}", {"msg": f"expected [start, end] (two integers), got {describe(v)}", "subloc": ()}
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


class OutputSlice(Strict):
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


def check_models_list(v: list[InputModel] | None) -> list[InputModel] | None:
    if v:
        _no_duplicates([e.model for e in v], lambda j: (j, "model"), "models")
    return v


class OutputModule(Strict):
    """One entry of `modules:` (multi-module architectures): either `models` or `slices`."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[InputModel] | None) -> list[InputModel] | None:
        return check_models_list(v)

    @model_validator(mode="after")
    def _one_of(self) -> "OutputModule":
        if bool(self.slices) == bool(self.models):
            raise PydanticCustomError(
                "module", "{msg}", {"msg": "a module needs exactly one of 'models' or 'slices' (non-empty)", "subloc": ()}
            )
        return self


class ModelTokenSource(Strict):
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


class ZeroSource(Strict):
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


class TokenEmbedding(Strict):
    """`tokenizer.tokens.<token>`: where the embedding of an added token comes from."""

    source: TokenSource | None = None
    force: StrictBool = False


class TokenizerConfig(Strict):
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
