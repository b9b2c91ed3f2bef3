"""Chat templates: the recipe's `chat_template:` (mergekit's key), written into the output's
tokenizer files.

    chat_template: auto          the template most of the input models carry (first seen wins a tie)
    chat_template: chatml        a named format: alpaca, chatml, llama3, mistral
    chat_template: "{% for ... %}"   a Jinja template of one's own

The named formats render what mergekit's templates of the same names render (tested against
them, conversation by conversation); they are written here in our own words.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import StreammergeError
from ..limits import DOCUMENT, read_json

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# mergekit's llama3 ends every message with a newline after <|eot_id|> (Meta's own template
# does not): kept, so that a recipe renders the same prompts with either tool.
LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{- bos_token }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MISTRAL = (
    "{%- set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{{- bos_token }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != loop.index0 is even %}"
    "{{- raise_exception('after an optional system message, roles must alternate user/assistant') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and messages[0]['role'] == 'system' %}"
    "{{- ' [INST] ' + messages[0]['content'] + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('only user and assistant roles, after an optional system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# The last system message, a blank line, then "### Instruction:" / "### Input:" / "### Response:"
# sections separated by a blank line; a generation prompt opens a response (mergekit's layout,
# which puts it right after the last section's text).
ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{- ((system | last).content | trim if system else '') + '\\n\\n' }}"
    "{%- set heads = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
    "{%- set sections = messages | selectattr('role', 'in', heads) | list %}"
    "{%- for message in sections %}"
    "{{- '### ' + heads[message['role']] + ':\\n' + message['content'] | trim }}"
    "{%- if not loop.last %}{{- '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '### Response:\\n' }}{%- endif %}"
)

NAMED = {"alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}


def template_of(model_dir: Path) -> str | None:
    """The chat template a model directory carries (chat_template.jinja, else tokenizer_config.json)."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    template = read_json(cfg_path, DOCUMENT.named("tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def resolve_chat_template(setting: str | None, model_dirs: list[Path]) -> str | None:
    """The template `setting` names (None: keep the tokenizer's own). Raises ValueError with the
    reason for a setting that is neither auto, a known name, nor a template."""
    if setting is None:
        return None
    if setting == "auto":
        found = [t.strip() for t in (template_of(d) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if setting in NAMED:
        return NAMED[setting]
    if "{" not in setting:
        raise ValueError(f"unknown chat template {setting!r}: use auto, {', '.join(sorted(NAMED))} or a Jinja template")
    return setting


def write_chat_template(hf_dir: Path, template: str) -> None:
    """Into the tokenizer files of `hf_dir`: chat_template.jinja (what transformers 5 reads) and
    tokenizer_config.json's chat_template (what older versions read)."""
    cfg_path = hf_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise StreammergeError(f"{hf_dir}: no tokenizer_config.json to set the chat template in")
    cfg = read_json(cfg_path, DOCUMENT.named("tokenizer_config.json"))
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (hf_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    stale = hf_dir / "chat_template.json"
    if stale.is_file():
        stale.unlink()
