"""`tokenizer_source` and the `tokenizer:` block, with mergekit as the oracle.

Tiny Llama checkpoints (transformers' own class) with real tokenizers (a WordLevel model from
the `tokenizers` library, saved by transformers): the base, a model with added tokens, one with
other added tokens and a larger embedding (config vocab_size past its tokenizer), and one whose
plain vocabulary differs. Each recipe is merged by mergekit's run_merge and by streammerge; the
outputs must have the same vocabulary and the same embed_tokens / lm_head rows, token by token
(mergekit adds the tokens the base lacks in an order that varies between runs: the Python set
order of the models, and the iteration order of each tokenizer's vocabulary, a Rust hash map; so
ids are compared exactly where the output vocabulary is one model's, and streammerge's order is
checked to be the reproducible one: recipe order, then each model's token ids). Every other tensor must be identical, and the output must load
in transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import load_model_tensors, write_recipe
from streammerge.cli import main as cli
from streammerge.engine.job import build
from streammerge.export.hf import export_store
from streammerge.plan.planner import make_plan
from streammerge.recipe import load_recipe
from streammerge.store.store import Store

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("mergekit")

WORDS = [f"w{i}" for i in range(30)]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def make_tokenizer(words: list[str], added: list[tuple[str, bool]]):
    """A WordLevel tokenizer over `words` (ids in that order, then <unk>) plus `added` tokens
    (content, special), as transformers saves it."""
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<unk>"] = len(vocab)
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    for content, special in added:
        tok.add_tokens([tokenizers.AddedToken(content, special=special, normalized=not special)], special_tokens=special)
    return tok


def make_model(path: Path, tok, seed: int, *, rows: int | None = None, tied: bool = False, template: str | None = None) -> Path:
    cfg = transformers.LlamaConfig(
        vocab_size=rows or len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1)
    model.save_pretrained(path, safe_serialization=True)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def family(root: Path, tied: bool) -> dict[str, str]:
    other = WORDS[:25] + ["x0", "x1", "x2"]
    specs = {
        "base": make_model(root / "base", make_tokenizer(WORDS, []), 0, tied=tied, template="base {{ messages[0]['content'] }}"),
        "a": make_model(root / "a", make_tokenizer(WORDS, [("<a1>", True), ("<shared>", False)]), 1, tied=tied),
        # more embedding rows than tokens: the rows past its tokenizer are unused
        "b": make_model(
            root / "b", make_tokenizer(WORDS, [("<shared>", False), ("<b1>", True)]), 2, rows=40, tied=tied,
            template="b {{ messages[0]['content'] }}",
        ),
        # another plain vocabulary, in another order
        "c": make_model(root / "c", make_tokenizer(list(reversed(other)), []), 3, tied=tied),
    }
    return {k: str(v) for k, v in specs.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("tok-family"), tied=False)


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("tok-tied"), tied=True)


def linear_recipe(m: dict, names: list[str], weights: list[float], **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in zip(names, weights)],
        "dtype": "float32",
        **extra,
    }


def mergekit_merge(recipe: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe)))
    run_merge(config, str(out), MergeOptions(quiet=True, write_model_card=False))
    return out


def streammerge_merge(recipe: dict, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = write_recipe(root / "recipe.yaml", recipe)
    build(path, root / "job.zarr", workers=2, progress=False, block_elems=40)  # several blocks per tensor
    export_store(Store.open(root / "job.zarr"), root / "out")
    return root / "out"


def both(recipe: dict, tmp_path: Path):
    """(streammerge's output dir, mergekit's), each with its tensors and vocabulary."""
    ours, theirs = streammerge_merge(recipe, tmp_path / "sm"), mergekit_merge(recipe, tmp_path / "mk")
    return [(d, load_model_tensors(d), transformers.AutoTokenizer.from_pretrained(d).get_vocab()) for d in (ours, theirs)]


def assert_same_rows(got: dict, got_vocab: dict, want: dict, want_vocab: dict, *, exact_ids: bool) -> None:
    """The same tensors; vocabulary tensors equal row for row by token (and by id when asked),
    with as many padding rows, equal within float32 rounding (a mean over every row, summed in
    another order)."""
    assert set(got_vocab) == set(want_vocab)
    if exact_ids:
        assert got_vocab == want_vocab
    assert set(got) == set(want)
    for name in want:
        if name not in VOCAB_TENSORS:
            assert torch.equal(got[name], want[name]), name
            continue
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        for token, i in want_vocab.items():
            assert torch.equal(got[name][got_vocab[token]], want[name][i]), (name, token)
        n = len(want_vocab)
        torch.testing.assert_close(got[name][n:], want[name][n:], rtol=1e-5, atol=1e-6)


def test_union_of_models_with_different_added_tokens_and_sizes(models, tmp_path):
    recipe = linear_recipe(models, ["base", "a", "b"], [0.5, 0.3, 0.2], base_model=models["base"], tokenizer_source="union")
    (ours, got, got_vocab), (theirs, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    assert len(got_vocab) == 34 and got["model.embed_tokens.weight"].shape[0] == 34
    # the base's ids stay; the rest follow the recipe: a's tokens, then b's
    order = sorted(got_vocab, key=got_vocab.get)
    assert order[:31] == WORDS + ["<unk>"] and order[31:] == ["<a1>", "<shared>", "<b1>"]
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    tok = transformers.AutoTokenizer.from_pretrained(ours)
    ids = tok("w1 <b1> <shared>", return_tensors="pt").input_ids
    assert ids[0].tolist() == [got_vocab["w1"], got_vocab["<b1>"], got_vocab["<shared>"]]
    assert model(ids).logits.shape == (1, 3, 34)


def test_union_with_another_plain_vocabulary(models, tmp_path):
    """A model whose plain vocabulary differs (other words, other ids): its rows move to the
    output's ids, and the base's rows stand in for the words it lacks."""
    recipe = linear_recipe(models, ["base", "c"], [0.6, 0.4], base_model=models["base"], tokenizer_source="union")
    (_, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    # c's new tokens follow the base's in c's id order (mergekit: the order of a Rust hash map)
    assert sorted(got_vocab, key=got_vocab.get)[31:] == ["x2", "x1", "x0"]


@pytest.mark.parametrize("source", ["base", "a", "b"])
def test_tokenizer_source_base_or_a_model(models, tmp_path, source):
    spec = models[source] if source != "base" else "base"
    recipe = linear_recipe(models, ["base", "a", "b"], [0.5, 0.3, 0.2], base_model=models["base"], tokenizer_source=spec)
    (ours, got, got_vocab), (theirs, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=True)
    assert transformers.AutoConfig.from_pretrained(ours).vocab_size == len(got_vocab)
    # the tokenizer's own chat template comes with it (a has none: not the base's either)
    template = transformers.AutoTokenizer.from_pretrained(ours).chat_template
    assert template == transformers.AutoTokenizer.from_pretrained(theirs).chat_template
    assert (template or "").split(" ")[0] == {"base": "base", "a": "", "b": "b"}[source]


def token_block(m: dict) -> dict:
    return {
        "source": "union",
        "pad_to_multiple_of": 16,
        "tokens": {
            "<a1>": {"source": {"kind": "model_token", "model": m["base"], "token": "w3"}},
            "<b1>": {"source": {"kind": "model_token", "model": m["a"], "token_id": 5}, "force": True},
            "<new>": {"source": {"kind": "zero"}},
            "w7": {"source": m["b"], "force": True},
            "<shared>": {"source": m["a"]},
        },
    }


def test_per_token_sources_force_and_padding(models, tmp_path):
    recipe = linear_recipe(models, ["base", "a", "b"], [0.5, 0.3, 0.2], base_model=models["base"], tokenizer=token_block(models))
    (ours, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == 48 and len(got_vocab) == 35
    assert torch.equal(emb[got_vocab["<new>"]], torch.zeros(16))
    assert transformers.AutoConfig.from_pretrained(ours).vocab_size == 48


def test_tied_embeddings(tied_models, tmp_path):
    m = tied_models
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [{"model": m["a"], "parameters": {"weight": 0.7}}, {"model": m["c"], "parameters": {"weight": 0.4}}],
        "dtype": "float32",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
    }
    (ours, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert "lm_head.weight" not in got
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_tied_model_lends_its_embedding_as_lm_head(models, tied_models, tmp_path):
    """A model without lm_head (tie_word_embeddings) merged with one that has its own: its
    embedding stands for its lm_head, as mergekit reads it."""
    recipe = {
        "merge_method": "linear",
        "base_model": models["base"],
        "models": [{"model": models["base"], "parameters": {"weight": 0.6}}, {"model": tied_models["a"], "parameters": {"weight": 0.4}}],
        "dtype": "float32",
        "tokenizer_source": "union",
    }
    (_, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert "lm_head.weight" in got
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=True)


@pytest.mark.parametrize("method, source", [("linear", None), ("task_arithmetic", "union")])
def test_a_tied_base_merged_with_an_untied_model_gets_an_lm_head(models, tied_models, tmp_path, method, source):
    """The base ties lm_head to its embedding (none stored), another input has its own: mergekit
    writes an lm_head (the base's embedding merged with the other's lm_head), so does streammerge,
    and unties it in config.json so that transformers (and vLLM) use it."""
    untied = make_model(tmp_path / "untied", make_tokenizer(WORDS, []), 5) if source is None else Path(models["a"])
    recipe = {
        "merge_method": method,
        "base_model": tied_models["base"],
        "models": [{"model": str(untied), "parameters": {"weight": 0.4}}],
        "dtype": "float32",
        **({"tokenizer_source": source} if source else {}),
    }
    if method == "linear":
        recipe["models"].insert(0, {"model": tied_models["base"], "parameters": {"weight": 0.6}})
    (ours, got, got_vocab), (theirs, want, want_vocab) = both(recipe, tmp_path)
    assert "lm_head.weight" in want and "lm_head.weight" in got
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=source is None)
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert transformers.AutoConfig.from_pretrained(ours).tie_word_embeddings is False
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    assert torch.equal(model.lm_head.weight, got["lm_head.weight"])


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
def test_a_vision_language_vocabulary_is_resized_in_text_config(tmp_path, arch):
    """LLaVA and Qwen2-VL give vocab_size in text_config only: the union's size is written there,
    and transformers loads the result with the embedding rows of a torch reference."""
    from test_modules_recipes import llava_config, qwen2vl_config

    cls, config = {
        "llava": (transformers.LlavaForConditionalGeneration, llava_config),
        "qwen2vl": (transformers.Qwen2VLForConditionalGeneration, qwen2vl_config),
    }[arch]
    n = config().text_config.vocab_size
    words = [f"v{i}" for i in range(n - 1)]  # + <unk>: one token per row
    torch.manual_seed(0)
    inputs = {}
    for name, added in (("base", []), ("ft", [("<x1>", True), ("<x2>", False)])):
        cfg = config()
        cfg.text_config.vocab_size = n + len(added)  # a fine-tune that trained rows for its added tokens
        model = cls(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 1)
        model.save_pretrained(tmp_path / name)
        make_tokenizer(words, added).save_pretrained(tmp_path / name)
        inputs[name] = model.get_input_embeddings().weight.detach()
    recipe = linear_recipe({k: str(tmp_path / k) for k in inputs}, ["base", "ft"], [0.7, 0.3], tokenizer_source="union")
    out = streammerge_merge(recipe, tmp_path / "sm")
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == n + 2
    merged = cls.from_pretrained(out)
    emb = merged.get_input_embeddings().weight.detach()
    assert emb.shape == (n + 2, config().text_config.hidden_size)
    assert merged.get_output_embeddings().weight.shape[0] == n + 2
    want = torch.cat([0.7 * inputs["base"] + 0.3 * inputs["ft"][:n], inputs["ft"][n:]])  # the new tokens: ft's rows
    torch.testing.assert_close(emb, want, rtol=1e-6, atol=1e-6)


def test_layer_stacking_takes_each_vocabulary_tensor_from_its_slice(models, tmp_path):
    """passthrough slices: the embedding comes from the first slice's model, lm_head from the
    last's, each re-ordered to the union (tokens that model lacks: zeros, as mergekit)."""
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": models["c"], "layer_range": [0, 1]}]},
            {"sources": [{"model": models["b"], "layer_range": [0, 1]}]},
        ],
        "dtype": "float32",
        "tokenizer_source": "union",
    }
    (ours, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    assert torch.equal(got["model.embed_tokens.weight"][got_vocab["<b1>"]], torch.zeros(16))
    plan = make_plan(load_recipe(tmp_path / "sm" / "recipe.yaml"))
    # c lacks w25-w29, <shared>, <b1>; b lacks x0-x2
    assert "model.embed_tokens.weight: 7 token(s) are in none of its inputs and get zero rows, e.g. 'w25'" in plan.warnings
    assert "lm_head.weight: 3 token(s) are in none of its inputs and get zero rows, e.g. 'x2'" in plan.warnings
    assert transformers.AutoModelForCausalLM.from_pretrained(ours).config.num_hidden_layers == 2


def test_plan_counts_the_tokenizer_libraries_in_its_memory_estimate(models, tmp_path):
    from streammerge.plan.planner import BASELINE_BYTES, TOKENIZER_LIBS_BYTES

    recipe = linear_recipe(models, ["base", "a"], [0.5, 0.5], base_model=models["base"])
    plain = make_plan(load_recipe(write_recipe(tmp_path / "plain.yaml", recipe)))
    built = make_plan(load_recipe(write_recipe(tmp_path / "union.yaml", {**recipe, "tokenizer_source": "union"})))
    assert plain.baseline_bytes == BASELINE_BYTES and built.baseline_bytes == BASELINE_BYTES + TOKENIZER_LIBS_BYTES
    assert "zarr, transformers) + " in run_cli("plan", tmp_path / "union.yaml")


def test_resume_finds_the_same_plan(models, tmp_path):
    """The vocabulary is built the same way again: a second build of the store resumes with nothing to do."""
    recipe = linear_recipe(models, ["base", "a", "b"], [0.5, 0.3, 0.2], base_model=models["base"], tokenizer=token_block(models))
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    first = build(path, tmp_path / "job.zarr", workers=2, progress=False, block_elems=40)
    again = build(path, tmp_path / "job.zarr", workers=2, progress=False, block_elems=40)
    assert first.report.blocks_run > 0 and again.resumed and again.report.blocks_run == 0


def test_resume_refuses_a_store_built_with_another_tokenizer(tmp_path):
    """An input's tokenizer re-ordered after the store was started (same tokens, same shapes):
    resuming would keep rows placed by the old ids, so it is refused as a changed input file is;
    --restart builds the rows mergekit builds from the new tokenizer."""
    from streammerge.errors import StoreError

    m = family(tmp_path / "models", tied=False)
    recipe = linear_recipe(m, ["base", "a"], [0.5, 0.5], base_model=m["base"], tokenizer=token_block(m) | {"tokens": {}})
    (tmp_path / "sm").mkdir()
    path = write_recipe(tmp_path / "sm" / "recipe.yaml", recipe)
    build(path, tmp_path / "sm" / "job.zarr", workers=2, progress=False, block_elems=40)
    for f in Path(m["a"]).glob("tokenizer*"):
        f.unlink()
    make_tokenizer(list(reversed(WORDS)), [("<shared>", False), ("<a1>", True)]).save_pretrained(m["a"])
    with pytest.raises(StoreError, match=rf"input {m['a']}: its tokenizer or vocab_size changed since the store was started; use --restart"):
        build(path, tmp_path / "sm" / "job.zarr", workers=2, progress=False, block_elems=40)
    build(path, tmp_path / "sm" / "job.zarr", workers=2, progress=False, block_elems=40, restart=True)
    export_store(Store.open(tmp_path / "sm" / "job.zarr"), tmp_path / "sm" / "out")
    theirs = mergekit_merge(recipe, tmp_path / "mk")
    got, want = load_model_tensors(tmp_path / "sm" / "out"), load_model_tensors(theirs)
    vocab = lambda d: transformers.AutoTokenizer.from_pretrained(d).get_vocab()  # noqa: E731
    assert_same_rows(got, vocab(tmp_path / "sm" / "out"), want, vocab(theirs), exact_ids=False)


def test_resume_refuses_a_store_whose_built_tokenizer_changed(tmp_path):
    """The base's tokenizer saved again with another chat template: the same rows, but the
    store's tokenizer files (written when it was started) are stale: refused too."""
    from streammerge.errors import StoreError

    m = family(tmp_path / "models", tied=False)
    recipe = linear_recipe(m, ["base", "a"], [0.5, 0.5], base_model=m["base"], tokenizer_source="base")
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    build(path, tmp_path / "job.zarr", workers=2, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(m["base"])
    tok.chat_template = "other {{ messages[0]['content'] }}"
    tok.save_pretrained(m["base"])
    with pytest.raises(StoreError, match="the built tokenizer changed since the store was started; use --restart"):
        build(path, tmp_path / "job.zarr", workers=2, progress=False)


def test_allow_nonfinite_reaches_the_rows_other_inputs_lend(models, tmp_path):
    """A NaN in the row model a lends the base for its added token: refused, and let through
    with --allow-nonfinite (the flag reaches the lent reads too)."""
    from safetensors.torch import load_file, save_file

    a = tmp_path / "a"
    shutil.copytree(models["a"], a)
    weights = load_file(a / "model.safetensors")
    vocab = transformers.AutoTokenizer.from_pretrained(a).get_vocab()
    weights["model.embed_tokens.weight"][vocab["<a1>"], 3] = float("nan")
    save_file(weights, a / "model.safetensors", metadata={"format": "pt"})
    recipe = linear_recipe({**models, "a": str(a)}, ["base", "a"], [0.5, 0.5], base_model=models["base"], tokenizer_source="union")
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = run_cli("build", path, "--store", tmp_path / "s.zarr", expect=1)
    assert "non-finite value (nan)" in out and "model.embed_tokens.weight" in out
    build(path, tmp_path / "ok.zarr", workers=2, progress=False, block_elems=40, allow_nonfinite=True)
    export_store(Store.open(tmp_path / "ok.zarr"), tmp_path / "out")
    emb = load_model_tensors(tmp_path / "out")["model.embed_tokens.weight"]
    assert torch.isnan(emb[vocab["<a1>"], 3]) and not torch.isnan(emb[: vocab["<a1>"]]).any()


def test_a_base_without_tokenizer_is_an_error_at_the_tokenizer_line(models, tmp_path):
    base = tmp_path / "bare"
    base.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(models["base"]) / f, base / f)
    recipe = linear_recipe({**models, "base": str(base)}, ["base", "a"], [0.5, 0.5], base_model=str(base), tokenizer_source="union")
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    line = 1 + path.read_text().splitlines().index("tokenizer_source: union")
    out = run_cli("build", path, "--store", tmp_path / "s.zarr", expect=1)
    assert out.startswith(f"error: {path}:{line}: tokenizer_source: the base model {base} has no tokenizer") and out.count("\n") == 1, out


def bpe_tokenizer(added: list[str]):
    """A small BPE tokenizer: letters, merges, <unk>, then q and hq (made by a merge), then `added`."""
    vocab = {c: i for i, c in enumerate("abcdefgh")}
    vocab.update({"ab": 8, "abc": 9, "de": 10, "<unk>": 11, "q": 12, "hq": 13})
    merges = [("a", "b"), ("ab", "c"), ("d", "e"), ("h", "q")]
    model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    tok.add_tokens([tokenizers.AddedToken(t, special=True) for t in added], special_tokens=True)
    return tok


def test_a_base_tokenizer_longer_than_its_embedding_is_trimmed(tmp_path):
    """The base's tokenizer has tokens past its vocab_size (q, hq with the merge that makes it,
    an added <extra>): they are dropped from it, as mergekit does; a model that has them lends
    them back to the union as added tokens."""
    base = make_model(tmp_path / "base", bpe_tokenizer(["<extra>"]), 0, rows=12)
    a = make_model(tmp_path / "a", bpe_tokenizer(["<a1>"]), 1)
    recipe = {
        "merge_method": "linear",
        "base_model": str(base),
        "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(a), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
        "tokenizer_source": "union",
    }
    (ours, got, got_vocab), (_, want, want_vocab) = both(recipe, tmp_path)
    assert_same_rows(got, got_vocab, want, want_vocab, exact_ids=False)
    assert "<extra>" not in got_vocab and sorted(got_vocab, key=got_vocab.get)[12:] == ["q", "hq", "<a1>"]
    assert transformers.AutoTokenizer.from_pretrained(ours)("abcde").input_ids == [got_vocab["abc"], got_vocab["de"]]


def run_cli(*args, expect=0) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res.output


@pytest.mark.parametrize(
    "token_cfg, needle, where, what",
    [
        ({"source": "nowhere/model"}, "source: nowhere/model", "tokenizer.tokens['<z>'].source", "'nowhere/model' is not one of the recipe's models"),
        ({"source": {"kind": "model_token", "token": "zz"}}, "token: zz", "tokenizer.tokens['<z>'].source.token", "'zz' is not in model"),
        ({"source": {"kind": "model_token", "token_id": 99}}, "token_id: 99", "tokenizer.tokens['<z>'].source.token_id", "out of range"),
    ],
    ids=["unknown-model", "missing-token", "bad-id"],
)
def test_bad_token_sources_are_one_line_errors(models, tmp_path, token_cfg, needle, where, what):
    """One line naming the recipe line of the bad entry, exit 1, no tensor built."""
    if isinstance(token_cfg["source"], dict):
        token_cfg = {"source": {**token_cfg["source"], "model": models["a"]}}
    recipe = linear_recipe(models, ["base", "a"], [0.5, 0.5], base_model=models["base"])
    recipe["tokenizer"] = {"source": "union", "tokens": {"<z>": token_cfg}}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    line = 1 + next(i for i, text in enumerate(path.read_text().splitlines()) if needle in text)
    out = run_cli("build", path, "--store", tmp_path / "s.zarr", expect=1)
    assert out.count("\n") == 1 and out.startswith(f"error: {path}:{line}: {where}: ") and what in out, out
    assert not (tmp_path / "s.zarr" / "tensors").exists()
