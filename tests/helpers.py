"""Shared test utilities: recipes, running the CLI, and independent torch references."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, read with the safetensors library (not our reader)."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def resave_as_f64(model_dirs) -> None:
    """Rewrite every float tensor of the model directories as F64, each value nudged off the
    float32 grid (by 2**-30 relative), so that reading one must round it."""
    from safetensors.torch import save_file

    for d in model_dirs:
        for f in Path(d).glob("*.safetensors"):
            tensors = {k: v.double() * (1 + 2.0**-30) if v.is_floating_point() else v for k, v in load_file(f).items()}
            save_file(tensors, f, metadata={"format": "pt"})


def file_digest(directory: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(Path(directory).iterdir())
        if f.is_file()
    }


def gradient(value, t: float) -> float:
    """mergekit's numeric gradient: linear interpolation at t * (len - 1)."""
    if not isinstance(value, list):
        return float(value)
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def layer_t(name: str, num_layers: int) -> float:
    m = LAYER_RE.search(name)
    if not m:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def torch_task_arithmetic(base, models, weights, lam=1.0, normalize=False):
    """Reference in float32 torch, mergekit's operation order."""
    deltas = torch.stack([m.float() - base.float() for m in models])
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * base.dim()))
    mixed = (deltas * w).sum(dim=0)
    if normalize:
        div = w.sum(dim=0)
        div[div.abs() < 1e-8] = 1
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return base.float() + mixed


def torch_linear(models, weights, normalize=True):
    acc = torch.zeros_like(models[0], dtype=torch.float32)
    for m, w in zip(models, weights):
        acc.addcmul_(m.float(), torch.tensor(w, dtype=torch.float32))
    if normalize:
        acc = acc / torch.tensor(weights, dtype=torch.float32).sum()
    return acc
