"""The recipe's chat_template: named formats render what mergekit's templates of the same names
render (mergekit's files are the oracle), `auto` takes the inputs' most common template, and the
export's tokenizer (loaded by transformers) carries the chosen one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streammerge.checkpoints.chat_template import NAMED
from streammerge.cli import main as cli

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "Translate"}, {"role": "user_context", "content": " le chat "}],
]


def run(*args, expect=0):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == expect, res.output
    return res.output


def renders(tok, template):
    tok.chat_template = template
    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as e:  # noqa: BLE001 - a template's refusal (mistral's roles) is part of its behaviour
                out.append(f"refused: {type(e).__name__}")
    return out


@pytest.fixture(scope="module")
def family(synth_family):
    return synth_family(n_finetunes=2)


@pytest.fixture(scope="module")
def tokenizer(family):
    base, _ = family
    return transformers.AutoTokenizer.from_pretrained(base)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates_render_as_mergekits(tokenizer, name):
    files = pytest.importorskip("mergekit._data.chat_templates")
    import importlib.resources

    theirs = importlib.resources.files(files).joinpath(f"{name}.jinja").read_text()
    assert renders(tokenizer, NAMED[name]) == renders(tokenizer, theirs)


def with_template(src: Path, dst: Path, template: str | None) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


def build(tmp_path, base, fts, setting):
    r = tmp_path / "r.yaml"
    r.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {base}\n"
        "models:\n" + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5}}\n" for f in fts)
        + (f"chat_template: {json.dumps(setting)}\n" if setting is not None else "")
    )
    out = tmp_path / "out"
    run("build", r, "--store", tmp_path / "j.zarr", "--export", out, "--no-progress")
    return transformers.AutoTokenizer.from_pretrained(out)


def test_named_template_reaches_the_export(family, tokenizer, tmp_path):
    base, fts = family
    tok = build(tmp_path, base, fts, "chatml")
    conv = CONVERSATIONS[1]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_auto_takes_the_most_common_template_of_the_inputs(family, tmp_path):
    base, fts = family
    one = "{% for m in messages %}ONE {{ m['content'] }}{% endfor %}"
    two = "{% for m in messages %}TWO {{ m['content'] }}{% endfor %}"
    b = with_template(base, tmp_path / "b", one)
    f1 = with_template(fts[0], tmp_path / "f1", two)
    f2 = with_template(fts[1], tmp_path / "f2", two)
    tok = build(tmp_path, b, [f1, f2], "auto")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "TWO x"


def test_a_template_of_ones_own(family, tmp_path):
    base, fts = family
    tok = build(tmp_path, base, fts, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<user>x"


def test_unknown_name_is_a_located_error(family, tmp_path):
    base, fts = family
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {base}\n  - model: {fts[0]}\n"
                 "chat_template: vicuna\n")
    out = run("build", r, "--store", tmp_path / "j.zarr", expect=1)
    assert out.count("\n") == 1 and f"{r}:6:" in out and "vicuna" in out and "chatml" in out
