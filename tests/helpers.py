"""Shared test utilities: recipes, running the CLI, and independent torch references."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from streammerge.methods import TensorParams, get_method

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


# ---- method-level fixtures: a base with fine-tunes, a method's parameters --------------------


def make(shape, kind, nmodels=3, seed=0):
    """base + fine-tunes: 'cont' (continuous), 'bf16' (bf16-rounded, many equal deltas),
    'small' (deltas from a small set: massive ties)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    models = []
    for _ in range(nmodels):
        if kind == "cont":
            models.append(base + (rng.standard_normal(shape) * 1e-3).astype(np.float32))
        elif kind == "bf16":
            base = base.astype(ml_dtypes.bfloat16).astype(np.float32)
            m = base + (rng.standard_normal(shape) * 1e-3).astype(np.float32)
            models.append(m.astype(ml_dtypes.bfloat16).astype(np.float32))
        elif kind == "small":
            models.append(base + rng.integers(-4, 5, size=shape).astype(np.float32) * np.float32(0.25))
        else:
            raise ValueError(kind)
    return base, models


def tensor_params(name, nmodels, seed=0, **parameters):
    """The method's parameters, defaults filled in; per-model values may be lists."""
    glob, per_model = {}, [{} for _ in range(nmodels)]
    for p in get_method(name).params:
        value = parameters.get(p.name, p.default)
        if p.scope == "global":
            glob[p.name] = p.validate(value)
        else:
            for i in range(nmodels):
                v = value[i] if isinstance(value, (list, tuple)) else value
                per_model[i][p.name] = p.validate(v)
    return TensorParams(glob, tuple(per_model), seed)
