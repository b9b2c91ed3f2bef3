"""Recipe parsing, validation and per-tensor parameter resolution.

mergekit is the oracle: every valid recipe below is also parsed by mergekit, planned by
mergekit's own MergePlanner over a small Llama architecture (model configs stubbed, no weights
read), and every tensor's parameters as mergekit resolves them are compared with
`resolve_tensor_params`; `evaluate_setting` is compared with mergekit's on random settings.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.errors import RecipeError
from streammerge.methods import get_method
from streammerge.methods.base import Param
from streammerge.recipe import (
    evaluate_setting,
    layer_position,
    load_recipe,
    parse_recipe,
    parse_setting,
    recipe_hash,
    resolve_tensor_params,
    validate_value,
)

mk_config = pytest.importorskip("mergekit.config")


def _y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# ------------------------------------------------------------------------------------------
# the mergekit oracle


def _llama(n_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=n_layers,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=32,
        architectures=["LlamaForCausalLM"],
    )


N_LAYERS = 4  # every stubbed model has 4 layers (slices take sub-ranges of up to 8)


def mergekit_plan(text: str, monkeypatch) -> list[dict]:
    """Run mergekit's planner on the recipe; one record per output tensor with mergekit's
    resolution (or the exception it raised). Raises if mergekit rejects the config itself."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.common import ModelReference
    from mergekit.options import MergeOptions
    from mergekit.parameter_resolver import resolve_parameters
    from mergekit.plan import MergePlanner

    monkeypatch.setattr(ModelReference, "config", lambda self, trust_remote_code=False: _llama(N_LAYERS))
    cfg = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    records: list[dict] = []

    class Capture(MergePlanner):
        _layer = None

        def plan_layer(self, sources, layer_offset, t, cfg_reader, module_name):
            n = sources[0].layer_range[1] - sources[0].layer_range[0]
            self._layer = (layer_offset, n)
            try:
                super().plan_layer(sources, layer_offset, t, cfg_reader, module_name)
            finally:
                self._layer = None

        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            try:
                res = resolve_parameters(
                    self._method.spec,
                    tensor_name=weight.name,
                    inputs={m: w.name for m, w in zip(models, weights_in)},
                    sources=cfg_reader.parameter_sources,
                    base_model=cfg_reader.base_model,
                    t=cfg_reader.t,
                )
            except Exception as e:  # noqa: BLE001 - the oracle's verdict
                res = e
            module = next(
                name for name, m in self.config.modules.items() if m is cfg_reader.module
            )
            slices = self.config.modules[module].slices
            records.append(
                dict(
                    name=weight.name,
                    input_names=[w.name for w in weights_in],
                    models=[str(m) for m in models],
                    base=str(cfg_reader.base_model) if cfg_reader.base_model else None,
                    t=cfg_reader.t,
                    layer=self._layer,
                    slice=next(i for i, s in enumerate(slices) if s is cfg_reader.slice_out),
                    module=module,
                    result=res,
                )
            )

    planner = Capture(cfg, arch_info_for_config(_llama(N_LAYERS)), MergeOptions(), _llama(64))
    planner._plan()
    return records


def mergekit_rejects(text: str, monkeypatch) -> bool:
    try:
        records = mergekit_plan(text, monkeypatch)
    except Exception:  # noqa: BLE001
        return True
    return any(isinstance(r["result"], Exception) for r in records)


# ------------------------------------------------------------------------------------------
# valid recipes of every shape

VALID = {
    "linear_scalar": """
        merge_method: linear
        models:
          - model: org/a
            parameters:
              weight: 1.0
          - model: org/b
            parameters:
              weight: 0.5
          - model: org/c@main
            parameters:
              weight: 2
        parameters:
          normalize: false
        dtype: float16
        """,
    "linear_gradient_filter": """
        # weights vary over the layers and by module
        merge_method: linear
        models:
          - model: a
            parameters:
              weight: [0, 0.25, 1]
          - model: b
            parameters:
              weight:
                - filter: self_attn
                  value: [1, 0]
                - filter: mlp
                  value: 0.75
                - value: 0.1
          - model: c
            parameters:
              weight:
                - filter: embed_tokens
                  value: 3
        parameters:
          weight: 0.5
          normalize: [true, false]
        out_dtype: torch.bfloat16
        tokenizer_source: union
        """,
    "linear_base_appended": """
        merge_method: linear
        base_model: base
        models:
          - model: a
            parameters: {weight: 2}
          - model: b
        parameters:
          weight: [1, 3]
        """,
    "task_arithmetic_models": """
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: base
            parameters: {weight: 9}  # ignored (mergekit's NON_BASE scope), with a warning
          - model: ft1
            parameters:
              weight: [0.2, 0.9, 0.4, 1e-3]
          - model: ft2
            parameters:
              weight:
                - filter: layers.2.
                  value: 0.0
                - filter: "*"
                  value: [1.5, -0.5]
        parameters:
          lambda: [1.0, 0.5]
          normalize:
            - filter: mlp
              value: true
            - value: false
          int8_mask: true
        dtype: bfloat16
        tokenizer:
          source: base
          tokens:
            <|im_start|>:
              source: ft1
            <|im_end|>:
              source: {kind: zero}
              force: true
            <pad>:
              source: {kind: model_token, model: ft2, token_id: 3}
          pad_to_multiple_of: 64
        chat_template: chatml
        """,
    "task_arithmetic_base_not_listed": """
        merge_method: task_arithmetic
        base_model: base
        models:
          - model: ft1
            parameters: {weight: 0.7}
          - model: ft2
            parameters: {weight: "0.3"}
        parameters:
          normalize: true
          lambda: 0.8
        """,
    "task_arithmetic_slices": """
        merge_method: task_arithmetic
        base_model: base
        slices:
          - sources:
              - model: base
                layer_range: [0, 3]
              - model: ft1
                layer_range: [0, 3]
                parameters:
                  weight: [0, 1]
              - model: ft2
                layer_range: [1, 4]
                parameters:
                  weight:
                    - filter: layers.3.
                      value: 5
            parameters:
              weight: 0.25
              lambda: 2
          - sources:
              - model: base
                layer_range: [3, 4]
              - model: ft1
                layer_range: [3, 4]
              - model: ft2
                layer_range: [5, 6]
            parameters:
              weight: [0.5, 0.75]
            residual_weight: 0.5  # accepted and ignored, as in mergekit
          - sources:
              - model: base
                layer_range: [4, 8]
              - model: ft1
                layer_range: [4, 8]
                parameters:
                  weight: [1, 2, 3]
              - model: ft2
                layer_range: [0, 4]
                parameters:
                  weight: 1
        parameters:
          normalize: true
        """,
    "task_arithmetic_slice_base_override": """
        merge_method: task_arithmetic
        base_model: base
        slices:
          - sources:
              - model: base
                layer_range: [0, 2]
              - model: ft1
                layer_range: [0, 2]
              - model: ft2
                layer_range: [0, 2]
                parameters: {weight: [2, 4]}
          # (mergekit plans the final norm / lm_head with the last slice's models but zips them
          # with one input name per source of the *first* slice: keep equal source counts)
          - base_model: ft2
            sources:
              - model: ft2
                layer_range: [2, 4]
              - model: ft1
                layer_range: [2, 4]
                parameters: {weight: 0.3}
              - model: base
                layer_range: [2, 4]
        parameters:
          weight: 1
        """,
    "linear_slices_passthrough_style": """
        merge_method: linear
        slices:
          - sources:
              - model: a
                layer_range: [0, 2]
          - sources:
              - model: b
                layer_range: [1, 4]
          - sources:
              - model: a
                layer_range: [3, 4]
        parameters:
          weight: 1.0
        name: frankenmerge
        """,
    "linear_modules": """
        merge_method: linear
        modules:
          default:
            models:
              - model: a
                parameters:
                  weight: [1, 2]
              - model: b
            parameters:
              weight: 0.5
              normalize: false
        parameters:
          weight: 100
          normalize: true
        """,
    "anchors_and_merge_keys": """
        merge_method: task_arithmetic
        base_model: base
        parameters: &shared
          weight: 0.4
        models:
          - model: ft1
            parameters:
              <<: *shared
          - model: ft2
            parameters:
              <<: *shared
              weight: [0.1, 0.2]
        """,
    # mergekit's mapping form of a model reference (ModelReference / ModelPath): read as the
    # string form it stands for, 'path@revision+adapter'
    "model_reference_mappings": """
        merge_method: task_arithmetic
        base_model: {model: {path: org/base, revision: main}}
        models:
          - model: {model: {path: org/base, revision: main}, lora: org/adapter}
            parameters: {weight: 0.5}
          - model: {model: org/base@main, lora: {path: org/other, revision: v1}}
            parameters: {weight: 0.5}
          - model: {model: org/ft}
            parameters: {weight: 0.5}
        """,
}
VALID = {k: _y(v) for k, v in VALID.items()}


def test_model_reference_mapping_is_the_string_form():
    """The same recipe, hash included, whichever way the references are spelled."""
    mapping = parse_recipe(VALID["model_reference_mappings"], "m.yaml")
    strings = parse_recipe(_y("""
        merge_method: task_arithmetic
        base_model: org/base@main
        models:
          - model: org/base@main+org/adapter
            parameters: {weight: 0.5}
          - model: org/base@main+org/other@v1
            parameters: {weight: 0.5}
          - model: org/ft
            parameters: {weight: 0.5}
        """), "s.yaml")
    assert [e.model for e in mapping.models] == ["org/base@main+org/adapter", "org/base@main+org/other@v1", "org/ft"]
    assert mapping.recipe_hash() == strings.recipe_hash()


@pytest.fixture(scope="module")
def parsed():
    return {key: parse_recipe(text, f"{key}.yaml") for key, text in VALID.items()}


@pytest.mark.parametrize("key", sorted(VALID))
def test_valid_recipe_matches_mergekit(key, monkeypatch):
    text = VALID[key]
    recipe = parse_recipe(text, f"{key}.yaml")
    method = recipe.method

    # --- mergekit's own parse of the same YAML
    mk = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    assert recipe.merge_method == mk.merge_method
    assert recipe.base_model == (str(mk.base_model) if mk.base_model else None)
    assert set(recipe.referenced_models()) == {str(m) for m in mk.referenced_models()}
    assert recipe.chat_template == mk.chat_template
    if mk.models:
        assert [e.model for e in recipe.models] == [str(e.model) for e in mk.models]
    if mk.slices:
        assert len(recipe.slices) == len(mk.slices)
        for s, ms in zip(recipe.slices, mk.slices):
            assert [(x.model, x.layer_range) for x in s.sources] == [
                (str(x.model), tuple(x.layer_range)) for x in ms.sources
            ]
    tok = recipe.tokenizer_settings()
    mk_source = mk.tokenizer.source if mk.tokenizer else mk.tokenizer_source
    assert tok.source == (str(mk_source) if mk_source is not None else None)
    for name, dt in (("dtype", mk.dtype), ("out_dtype", mk.out_dtype)):
        if dt is not None:
            from mergekit.common import dtype_from_name

            assert str(dtype_from_name(dt)) == f"torch.{getattr(recipe, name)}"

    # --- mergekit's planner and parameter resolution, tensor by tensor
    records = mergekit_plan(text, monkeypatch)
    assert records
    model_names = {p.name for p in method.params if p.scope == "model"}
    global_names = {p.name for p in method.params if p.scope != "model"}
    opened = set(recipe.model_specs())
    for r in records:
        slice_index = None if (recipe.models or (recipe.modules and recipe.modules[r["module"]].models)) else r["slice"]
        module = r["module"] if recipe.modules else None
        # layer position: mergekit's t
        if r["layer"] is None:
            t = layer_position(None, 1)
        else:
            t = layer_position(*r["layer"])
        assert t == r["t"], r["name"]
        # the models the method sees
        inputs = recipe.input_models(slice_index, module)
        base = recipe.base_for(slice_index, module)
        expected_inputs = [m for m in r["models"] if method.base == "unused" or m != r["base"]]
        assert inputs == expected_inputs, r["name"]
        assert base == (r["base"] if method.base != "unused" else None)
        assert set(r["models"]) <= opened | ({r["base"]} if method.base == "unused" else set())
        input_names = [n for m, n in zip(r["models"], r["input_names"]) if m in inputs]
        mine = resolve_tensor_params(
            recipe, method, r["name"], t, inputs, slice_index=slice_index, module=module, input_names=input_names
        )
        assert not isinstance(r["result"], Exception), (r["name"], r["result"])
        mk_shared, mk_per_input = r["result"]
        mk_per_input = {str(k): v for k, v in mk_per_input.items()}
        assert dict(mine.globals) == {k: v for k, v in mk_shared.items() if k in global_names}, r["name"]
        for m, got in zip(inputs, mine.per_model):
            want = {k: v for k, v in mk_per_input[m].items() if k in model_names}
            assert dict(got) == want, (r["name"], m)
            for k in got:
                assert type(got[k]) is type(want[k])


def test_model_specs_and_inputs(parsed):
    ta = parsed["task_arithmetic_models"]
    assert ta.model_specs() == ["base", "ft1", "ft2"]
    assert ta.input_models() == ["ft1", "ft2"] and ta.base_for() == "base"
    lb = parsed["linear_base_appended"]
    assert lb.model_specs() == ["base", "a", "b"]
    assert lb.input_models() == ["a", "b", "base"] and lb.base_for() is None
    sl = parsed["task_arithmetic_slices"]
    assert sl.model_specs() == ["base", "ft1", "ft2"]
    assert sl.input_models(2) == ["ft1", "ft2"]
    ov = parsed["task_arithmetic_slice_base_override"]
    assert ov.base_for(1) == "ft2" and ov.input_models(1) == ["ft1", "base"]
    with pytest.raises(ValueError):
        sl.input_models()  # slices need a slice index
    fr = parsed["linear_slices_passthrough_style"]
    assert fr.model_specs() == ["a", "b"] and fr.input_models(1) == ["b"]


def test_values_are_validated_and_coerced(parsed):
    ta = parsed["task_arithmetic_models"]
    # YAML 1.1 reads 1e-3 as a string; mergekit's pydantic makes it a float, so do we
    assert ta.models[1].parameters["weight"] == [0.2, 0.9, 0.4, 0.001]
    assert parsed["task_arithmetic_base_not_listed"].models[1].parameters["weight"] == 0.3
    assert ta.dtype == "bfloat16" and parsed["linear_gradient_filter"].out_dtype == "bfloat16"
    assert parsed["linear_scalar"].models[2].parameters["weight"] == 2.0
    assert ta.warnings == [
        "task_arithmetic_models.yaml:5: models[0].parameters: 'weight' of the base model 'base' is ignored: "
        "task_arithmetic applies per-model parameters to the other models only (as mergekit does)",
        "task_arithmetic_models.yaml:22: parameters.int8_mask: 'int8_mask' has no effect on task_arithmetic "
        "(in mergekit either); ignored",
    ]
    assert any("residual_weight" in w for w in parsed["task_arithmetic_slices"].warnings)
    assert parsed["linear_scalar"].warnings == []


def test_resolution_fallthrough_and_errors(parsed):
    r = parsed["linear_gradient_filter"]
    lin = get_method("linear")
    # c's filter does not match a layer tensor: falls through to the global weight
    p = resolve_tensor_params(r, lin, "model.layers.1.mlp.up_proj.weight", 0.25, ["a", "b", "c"])
    assert p.model_values("weight") == [0.125, 0.75, 0.5]
    assert p.globals["normalize"] is True  # a bool gradient selects values[int(0.25 * 1)]
    p = resolve_tensor_params(r, lin, "model.layers.1.mlp.up_proj.weight", 1.0, ["a", "b", "c"])
    assert p.globals["normalize"] is False
    p = resolve_tensor_params(r, lin, "model.embed_tokens.weight", 0.0, ["a", "b", "c"], seed=7)
    assert p.model_values("weight") == [0.0, 0.1, 3.0] and p.seed == 7
    # int-valued gradients that land between integers are an error at that tensor
    rec = parse_recipe(
        _y(
            """
            merge_method: linear
            models:
              - model: a
                parameters:
                  weight:
                    - filter: mlp
                      value: 1
            """
        ),
        "f.yaml",
    )
    with pytest.raises(RecipeError) as e:
        resolve_tensor_params(rec, lin, "model.layers.0.self_attn.q_proj.weight", 0.0, ["a"])
    msg = str(e.value)
    assert msg.startswith("f.yaml:3: models[0]: no value of required parameter 'weight'") and "\n" not in msg
    assert "model.layers.0.self_attn.q_proj.weight" in msg


# ------------------------------------------------------------------------------------------
# evaluate_setting against mergekit's, on random settings

scalars = st.one_of(
    st.booleans(),
    st.integers(-4, 4),
    st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["a", "b", "0.5", "1e-3", "true", "no", "3"]),
)
numbers = st.one_of(st.integers(-4, 4), st.floats(-8, 8, allow_nan=False, allow_infinity=False))
gradients = st.one_of(st.lists(scalars, max_size=5), st.lists(numbers, min_size=1, max_size=6))
filters = st.sampled_from([None, "*", "", "mlp", "self_attn", "layers.1.", "embed_tokens", "lm_head", "nomatch"])
conds = st.builds(
    lambda f, v, has_filter: {"filter": f, "value": v} if has_filter else {"value": v},
    filters,
    st.one_of(scalars, gradients),
    st.booleans(),
)
settings_ = st.one_of(scalars, gradients, conds, st.lists(conds, max_size=4))
tensor_names = st.sampled_from(
    [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "",
    ]
)
ts = st.one_of(st.sampled_from([0, 1, 0.0, 1.0, 0.5, 1 / 3, 2 / 3, 0.25]), st.floats(0, 1))
kinds = st.sampled_from([None, float, int, bool, str])


def _call(fn):
    try:
        return ("ok", fn())
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        return ("error", type(e).__name__)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=settings_, name=tensor_names, t=ts, kind=kinds)
def test_evaluate_setting_matches_mergekit(raw, name, t, kind):
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec
    from pydantic import TypeAdapter

    mk_setting = TypeAdapter(mk_config.ParameterSetting).validate_python(raw)
    if kind is None:
        mk_validate = my_validate = lambda v: v  # noqa: E731
    else:
        spec = ParameterSpec("p", kind, ParameterScope.SHARED)

        def mk_validate(v):
            # mergekit's validator, minus the lax non-string coercions streammerge rejects on
            # purpose (true as a number, 1 as a flag; see validate_value)
            if kind is not str and not isinstance(v, str):
                if (kind is bool) != isinstance(v, bool):
                    raise ValueError("type mix")
            return spec.validate(v)

        param = Param("p", kind)
        my_validate = lambda v: validate_value(param, v)  # noqa: E731
    want = _call(lambda: mk_config.evaluate_setting(name, mk_setting, t, validate=mk_validate))
    got_raw = _call(lambda: evaluate_setting(raw, name, t, validate=my_validate))
    got_parsed = _call(lambda: evaluate_setting(parse_setting(raw), name, t, validate=my_validate))
    for got in (got_raw, got_parsed):
        assert got[0] == want[0], (got, want)
        if want[0] == "ok":
            assert got[1] == want[1] and type(got[1]) is type(want[1]), (got, want)
            if isinstance(want[1], float):
                assert math.copysign(1, got[1]) == math.copysign(1, want[1])


def test_layer_position():
    assert layer_position(None, 32) == 0.0
    assert layer_position(0, 1) == 1.0
    assert [layer_position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        layer_position(5, 5)


# ------------------------------------------------------------------------------------------
# invalid recipes: exact line and field in a one-line message

# (yaml, line, path, fragment of the message, mergekit rejects it too)
INVALID = [
    ("merge_method: linear\nmodel:\n  - model: a\n", 2, "model", "unknown key 'model' (did you mean 'models'?", False),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    paramters: {weight: 1}\n",
        4, "models[0].paramters", "unknown key 'paramters'", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters:\n      weight: abc\n",
        7, "models[1].parameters.weight", "expected a number, got 'abc'", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [0, 1, x]\n",
        5, "models[0].parameters.weight[2]", "expected a number, got 'x'", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n"
        "        - filter: mlp\n          value: 1\n        - value: zz\n",
        8, "models[0].parameters.weight[1].value", "expected a number, got 'zz'", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      wieght: 1\n",
        5, "models[0].parameters.wieght", "unknown parameter 'wieght' for merge method linear (did you mean 'weight'? valid: weight, normalize)", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n  - model: b\n",
        6, "models[1]", "model 'b' has no value for required parameter 'weight'", True,
    ),
    (
        "merge_method: linear\nbase_model: c\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n",
        2, "base_model", "including base_model 'c'", True,
    ),
    (
        "merge_method: task_arithmetic\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n",
        1, "merge_method", "needs a base_model", True,
    ),
    ("merge_method: linear\nmodels:\n  - model: a\n   parameters: [\n", 4, "", "invalid YAML", True),
    ("", 1, "", "the recipe is empty", True),
    ("# only a comment\n", 1, "", "the recipe is empty", True),
    ("- a\n- b\n", 1, "", "a recipe is a mapping", True),
    ("just a string\n", 1, "", "a recipe is a mapping", True),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\n",
        6, "", "duplicate key 'weight' (first given at line 5)", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nslices:\n"
        "  - sources:\n    - model: a\n      layer_range: [0, 2]\n",
        5, "slices", "exactly one of 'models', 'slices' or 'modules'", True,
    ),
    ("merge_method: linear\n", 1, "", "exactly one of 'models', 'slices' or 'modules'", True),
    ("merge_method: linear\nmodels: []\n", 1, "", "exactly one of", True),
    ("merge_method: lineer\nmodels:\n  - model: a\n", 1, "merge_method", "unknown merge method 'lineer' (did you mean 'linear'?", True),
    ("merge_method: linear\ndtype: fp8\nmodels:\n  - model: a\n    parameters: {weight: 1}\n", 2, "dtype", "unknown dtype 'fp8'", False),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nout_dtype: float128\n",
        5, "out_dtype", "unknown dtype 'float128' (expected bfloat16, float16, float32 or float64", False,
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2]\n"
        "      parameters: {weight: 1}\n    - model: b\n      layer_range: [2, 5]\n      parameters: {weight: 1}\n",
        8, "slices[0].sources[1].layer_range", "covers 3 layers but sources[0] covers 2", True,
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n    - model: a\n      layer_range: [3, 2]\n",
        5, "slices[0].sources[0].layer_range", "expected 0 <= start < end", False,
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2, 4]\n",
        5, "slices[0].sources[0].layer_range", "expected [start, end]", True,
    ),
    (
        "merge_method: linear\nslices:\n  - sources:\n    - model: a\n",
        4, "slices[0].sources[0]", "missing required key 'layer_range'", True,
    ),
    ("merge_method: linear\nslices:\n  - sources: []\n", 3, "slices[0].sources", "at least one source", False),
    ("merge_method: linear\nmodels:\n  - a\n", 3, "models[0]", "expected a mapping, got 'a'", True),
    ("merge_method: linear\nmodels:\n  - model:\n", 3, "models[0].model", "expected a string, got nothing (null)", True),
    ("models:\n  - model: a\n    parameters: {weight: 1}\n", 1, "", "missing required key 'merge_method'", True),
    (
        "merge_method: linear\ntokenizer_source: union\ntokenizer: {source: base}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        3, "tokenizer", "either 'tokenizer_source' or 'tokenizer'", True,
    ),
    (
        "merge_method: linear\ntokenizer:\n  source: union\n  tokens:\n    '<x>':\n      source: {kind: bogus}\n"
        "models:\n  - model: a\n    parameters: {weight: 1}\n",
        6, "tokenizer.tokens['<x>'].source", "expected a model name, {kind: zero}", True,
    ),
    (
        "merge_method: linear\ntokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, model: a}\n"
        "models:\n  - model: a\n    parameters: {weight: 1}\n",
        # mergekit reads this mapping as a reference to model "a" (its ModelReference ignores `kind`)
        5, "tokenizer.tokens.x.source", "exactly one of 'token_id' or 'token'", False,
    ),
    (
        "merge_method: linear\ntokenizer_source: base\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        2, "tokenizer_source", "needs a base_model", False,
    ),
    (
        "merge_method: linear\nparameters:\n  normalize: maybe\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        3, "parameters.normalize", "expected true or false, got 'maybe'", True,
    ),
    ("merge_method: linear\n---\nfoo: 1\n", 2, "", "invalid YAML", True),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [[1, 2]]\n",
        5, "models[0].parameters.weight[0]", "expected a scalar or a {filter, value} mapping", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n",
        5, "models[0].parameters.weight", "got nothing (null)", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n        - filtr: mlp\n          value: 1\n",
        6, "models[0].parameters.weight[0].filtr", "unknown key 'filtr'", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n        - filter: mlp\n",
        6, "models[0].parameters.weight[0]", "missing required key 'value'", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [1, {filter: x, value: 2}]\n",
        5, "models[0].parameters.weight[1]", "expected a scalar", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n"
        "  - model: a\n    parameters: {weight: 2}\n",
        7, "models[2].model", "model 'a' appears twice (also models[0])", True,
    ),
    (
        "merge_method: task_arithmetic\nbase_model: base\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2]\n"
        "      parameters: {weight: 1}\n",
        4, "slices[0].sources", "the base model 'base' must be one of this slice's sources", True,
    ),
    (
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\nparameters:\n  weight: []\n",
        4, "models[0]", "model 'a' has no value for required parameter 'weight'", True,
    ),
    (
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "parameters:\n  lambda: [1, true]\n",
        # mergekit's pydantic reads true as 1.0; streammerge coerces only strings (see validate_value)
        7, "parameters.lambda[1]", "expected a number, got True", False,
    ),
    (
        "merge_method: linear\nmodules:\n  default:\n    models:\n      - model: a\n    slices:\n"
        "      - sources: [{model: a, layer_range: [0, 1]}]\n",
        3, "modules.default", "exactly one of 'models' or 'slices'", True,
    ),
    (
        "merge_method: linear\nmodules:\n  default:\n    models:\n      - model: a\n        parameters: {weight: 1}\n"
        "    parameterz: {}\n",
        7, "modules.default.parameterz", "unknown key 'parameterz'", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nparameters:\n  1: 2\n",
        6, "parameters[1]", "expected a string", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: {model: x, lora: y, override_architecture: LlamaForCausalLM}\n"
        "    parameters: {weight: 1}\n",
        3, "models[0].model.override_architecture", "override_architecture is not supported", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: {lora: y}\n    parameters: {weight: 1}\n",
        3, "models[0].model", "needs 'model'", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: {model: x, adapter: y}\n    parameters: {weight: 1}\n",
        3, "models[0].model.adapter", "unknown key 'adapter'", False,  # mergekit ignores it
    ),
    (
        "merge_method: linear\nmodels:\n  - model: {model: {path: x, rev: y}}\n    parameters: {weight: 1}\n",
        3, "models[0].model.model", "expected a path", False,  # mergekit ignores rev
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a+loras/a+loras/b\n    parameters: {weight: 1}\n",
        3, "models[0].model", "'model+lora' form is one model path and one adapter path", True,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nchat_template: 3\n",
        5, "chat_template", "expected a string, got 3", False,
    ),
    (
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\ntokenizer:\n  pad_to_multiple_of: 0\n",
        6, "tokenizer.pad_to_multiple_of", "must be a positive integer", False,
    ),
]


@pytest.mark.parametrize("text,line,path,fragment,mk", INVALID, ids=[f"{i}" for i in range(len(INVALID))])
def test_invalid_recipe(text, line, path, fragment, mk, monkeypatch):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    prefix = f"r.yaml:{line}: " + (f"{path}: " if path else "")
    assert msg.startswith(prefix), msg
    assert fragment in msg, msg
    if mk:
        assert mergekit_rejects(text, monkeypatch), "mergekit accepts it"


def test_global_param_in_model_params_is_ignored_like_mergekit(monkeypatch):
    text = _y(
        """
        merge_method: linear
        models:
          - model: a
            parameters: {weight: 1, normalize: false}
          - model: b
            parameters: {weight: 3}
        """
    )
    r = parse_recipe(text, "g.yaml")
    assert r.warnings == [
        "g.yaml:4: models[0].parameters.normalize: 'normalize' is a global parameter of linear: "
        "it is ignored here, as in mergekit; set it in the top-level (or slice) parameters"
    ]
    p = resolve_tensor_params(r, None, "model.norm.weight", 0.0, r.input_models())
    assert p.globals["normalize"] is True  # the default: the per-model setting is ignored
    (rec, *_) = mergekit_plan(text, monkeypatch)
    assert rec["result"][0]["normalize"] is True
    with pytest.raises(RecipeError, match=r"^g.yaml:4: models\[0\].parameters.normalize: "):
        parse_recipe(text, "g.yaml", strict=True)


def test_canonical_json_and_hash(tmp_path):
    a = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: 0.5}\ndtype: bf16\nparameters: {}\n"
    )
    b = parse_recipe(
        _y(
            """
            # same recipe, other spelling
            dtype: bfloat16
            models:
              - parameters:
                  weight: 1.0
                model: a
              - model: b
                parameters:
                  weight: 5.0e-1
            merge_method: linear
            """
        )
    )
    assert a.canonical_json() == b.canonical_json()
    assert recipe_hash(a) == recipe_hash(b) == a.recipe_hash()
    assert len(a.recipe_hash()) == 64
    c = parse_recipe(a.canonical_json().replace('"weight":0.5', '"weight":0.25'))  # JSON is YAML
    assert c.recipe_hash() != a.recipe_hash()
    # the canonical form is itself a recipe that parses to the same canonical form
    for text in VALID.values():
        r = parse_recipe(text)
        assert parse_recipe(r.canonical_json()).canonical_json() == r.canonical_json()
    # load_recipe names the file
    p = tmp_path / "merge.yaml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: nope\n")
    with pytest.raises(RecipeError, match=rf"^{p}:5: models\[0\].parameters.weight: expected a number"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    p.write_bytes(b"merge_method: \xff\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(p)


# ------------------------------------------------------------------------------------------
# generic over method.params: a method with every kind of parameter


@pytest.fixture
def fake_method(monkeypatch):
    import numpy as np

    from streammerge.methods import base as mbase

    m = mbase.MergeMethod(
        name="fake_sparse",
        merge=lambda block, params, stats: np.zeros_like(block.models[0]),
        base="required",
        params=(
            Param("weight", float, scope="model"),
            Param("density", float, 1.0, scope="model", min=0.0, max=1.0),
            Param("k", int, 3),
            Param("mode", str, "a", choices=("a", "b")),
            Param("flag", bool),
        ),
    )
    get_method("linear")  # load the registry first
    monkeypatch.setitem(mbase._REGISTRY, m.name, m)
    return m


FAKE = _y(
    """
    merge_method: fake_sparse
    base_model: base
    models:
      - model: x
        parameters:
          weight: 1
          density: [0.2, "1e-1"]
      - model: y
        parameters:
          weight: 0.5
    parameters:
      flag: "true"
      k: [1, 3]
      mode:
        - filter: mlp
          value: [a, b]
    """
)


def test_generic_parameters(fake_method):
    r = parse_recipe(FAKE, "fake.yaml")
    p = resolve_tensor_params(r, None, "model.layers.0.mlp.up_proj.weight", 0.5, r.input_models())
    assert dict(p.globals) == {"k": 2, "mode": "a", "flag": True}
    assert [dict(d) for d in p.per_model] == [{"weight": 1.0, "density": 0.15000000000000002}, {"weight": 0.5, "density": 1.0}]
    p = resolve_tensor_params(r, None, "model.layers.3.mlp.up_proj.weight", 1.0, r.input_models())
    assert dict(p.globals) == {"k": 3, "mode": "b", "flag": True}
    p = resolve_tensor_params(r, None, "model.norm.weight", 0.0, r.input_models())
    assert dict(p.globals) == {"k": 1, "mode": "a", "flag": True}
    with pytest.raises(RecipeError, match=r"^fake.yaml:13: parameters.k: for tensor 'model.layers.1.mlp.up_proj.weight' \(t=0.25\): expected an integer, got 1.5$"):
        resolve_tensor_params(r, None, "model.layers.1.mlp.up_proj.weight", 0.25, r.input_models())


@pytest.mark.parametrize(
    "old,new,line,path,fragment",
    [
        ('density: [0.2, "1e-1"]', "density: [0.2, 1.5]", 7, "models[0].parameters.density[1]", "must be <= 1.0, got 1.5"),
        ("value: [a, b]", "value: [a, c]", 16, "parameters.mode[0].value[1]", "must be one of a, b, got 'c'"),
        ('  flag: "true"\n', "", 11, "parameters", "missing required parameter 'flag' of merge method fake_sparse"),
        ("  k: [1, 3]", "  k: [1, 2.5]", 13, "parameters.k[1]", "expected an integer, got 2.5"),
        ("  flag: \"true\"", "  flag: 1", 12, "parameters.flag", "expected true or false, got 1"),
        ("  - model: x\n", "  - model: base\n  - model: x\n", 9, "models[1].parameters.weight", ""),
    ],
)
def test_generic_parameter_errors(fake_method, old, new, line, path, fragment):
    assert old in FAKE
    text = FAKE.replace(old, new)
    if not fragment:  # accepted, a warning; an error in strict mode
        assert parse_recipe(text).warnings == []
        text = text.replace("      weight: 0.5\n", "      weight: 0.5\n      k: 2\n")
        assert parse_recipe(text).warnings[0].startswith("<recipe>:12: models[2].parameters.k: 'k' is a global parameter")
        with pytest.raises(RecipeError, match=r"^fake.yaml:12: models\[2\].parameters.k: 'k' is a global parameter"):
            parse_recipe(text, "fake.yaml", strict=True)
        return
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "fake.yaml")
    assert str(e.value).startswith(f"fake.yaml:{line}: " + (f"{path}: " if path else "")), str(e.value)
    assert fragment in str(e.value)
