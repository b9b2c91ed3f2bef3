"""The model card (README.md) and recipe (mergekit_config.yml) written beside an export.

The Hub reads a model card's YAML front matter: `base_model` links the model to the models it
was made from (only Hub repo ids mean anything there, so models read from a local directory
are named in the text alone), `tags: [merge]` lists it among merges and `library_name` says
what loads it. `mergekit_config.yml` is the recipe as the user wrote it, under the name
mergekit gives it, so a merge made here is reproduced by either tool.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .. import __version__
from ..store.store import Store

RECIPE_FILE = "mergekit_config.yml"
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[\w.-]+$")


def _models(canonical: dict) -> list[str]:
    """The recipe's model specs, base first, each once, in recipe order."""
    specs: list[str] = []

    def add(spec) -> None:
        if isinstance(spec, str) and spec not in specs:
            specs.append(spec)

    add(canonical.get("base_model"))
    for entry in canonical.get("models") or []:
        add(entry.get("model") if isinstance(entry, dict) else None)
    for sl in canonical.get("slices") or []:
        for src in sl.get("sources", []) if isinstance(sl, dict) else []:
            add(src.get("model") if isinstance(src, dict) else None)
    return specs


def hub_repo(directory: str | Path | None) -> str | None:
    """`org/name` when `directory` is a snapshot in a Hugging Face cache (models--org--name/...;
    Hub ids never contain '--'), else None."""
    for part in Path(str(directory or "")).parts:
        if part.startswith("models--") and len(part) > len("models--"):
            repo = part[len("models--"):].replace("--", "/")
            return repo if _HUB_ID.match(repo) else None
    return None


def _link(directory: str | None, written: str) -> str:
    repo = hub_repo(directory)
    return f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{written}`"


def _entry(spec: str, info: dict, base: str | None) -> str:
    """A bullet of "Models merged": the model as linked, or an adapter input as its adapter and
    the base model it was applied to."""
    role = " (base model)" if spec == base else ""
    if not info.get("adapter"):
        return f"- {_link(info.get('directory'), spec)}{role}"
    return (f"- `{spec}`{role}: LoRA adapter {_link(info['adapter'], info['adapter'])} applied to "
            f"{_link(info.get('directory'), str(info.get('directory')))}")


def model_card(store: Store) -> str:
    """The card's text: a function of the store alone, so exports of one store are identical
    whatever their directory's name."""
    manifest = store.manifest
    recipe = manifest["recipe"]
    canonical = recipe["canonical"]
    inputs = manifest.get("inputs", {})
    specs = _models(canonical)
    hub: list[str] = []
    for spec in specs:
        info = inputs.get(spec) or {}
        for directory in (info.get("directory"), info.get("adapter")):
            repo = hub_repo(directory)
            if repo and repo not in hub:
                hub.append(repo)
    meta: dict = {}
    if hub:
        meta["base_model"] = hub
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "streammerge", str(manifest["method"])]
    method = manifest["method"]
    base = canonical.get("base_model")
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# A {manifest['method']} merge",
        "",
        f"This model is a `{method}` merge, made with streammerge {manifest.get('streammerge_version', __version__)}.",
        "",
        "## Models merged",
        "",
    ]
    lines += [_entry(spec, inputs.get(spec) or {}, base) for spec in specs]
    lines += ["", "## Recipe", "", f"Also in `{RECIPE_FILE}`:", "", "```yaml", recipe["text"].rstrip("\n"), "```", ""]
    return "\n".join(lines)


def write_card(store: Store, dest: Path) -> None:
    (dest / "README.md").write_text(model_card(store))
    (dest / RECIPE_FILE).write_text(store.manifest["recipe"]["text"])
