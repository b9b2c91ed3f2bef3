"""Floating-point storage dtypes and the conversions the engine needs.

Tensors travel as their raw storage (bf16 as uint16, since neither zarr nor older numpy know
bfloat16) and are computed in float32. float32 -> bf16/fp16 rounds to nearest even. float64
inputs are read (rounded to nearest float32, as mergekit's `dtype: float32` casts them) and may
be written, but nothing is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class FloatType:
    name: str  # canonical name, as in torch and HF config.json: "bfloat16", "float16", "float32", "float64"
    st: str  # safetensors header name
    logical: np.dtype  # numpy dtype with the value semantics (ml_dtypes.bfloat16 for bf16)
    storage: np.dtype  # numpy dtype used on disk and in zarr (uint16 for bf16)

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


BF16 = FloatType("bfloat16", "BF16", np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16))
F16 = FloatType("float16", "F16", np.dtype(np.float16), np.dtype(np.float16))
F32 = FloatType("float32", "F32", np.dtype(np.float32), np.dtype(np.float32))
F64 = FloatType("float64", "F64", np.dtype(np.float64), np.dtype(np.float64))

FLOAT_TYPES = {t.name: t for t in (BF16, F16, F32, F64)}
_BY_ST = {t.st: t for t in (BF16, F16, F32, F64)}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}


def float_type(name: str) -> FloatType:
    """Look up by canonical name, alias ("bf16") or safetensors name ("BF16")."""
    if name in _BY_ST:
        return _BY_ST[name]
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FLOAT_TYPES:
        raise KeyError(name)
    return FLOAT_TYPES[key]


def is_float_st(st: str) -> bool:
    return st in _BY_ST


# FP8 storage types (safetensors name -> ml_dtypes type). They are never computed in or written:
# checkpoints/fp8.py dequantizes them on read with their block scales. Decoding is a table
# lookup giving the values torch's float8_e4m3fn / float8_e5m2 give, two bytes at a time: a
# 65536-entry table of float32 pairs (512 KiB, built on first use) decodes ~940 M elements/s
# here, against ~100-170 M/s for one byte at a time or ml_dtypes' cast.
FP8_TYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_FP8_TABLES = {st: np.arange(256, dtype=np.uint8).view(t).astype(np.float32) for st, t in FP8_TYPES.items()}
_FP8_PAIRS: dict[str, np.ndarray] = {}


def _fp8_pairs(st: str) -> np.ndarray:
    """uint64 table: entry v holds the two float32 values of the byte pair stored as uint16 v."""
    table = _FP8_PAIRS.get(st)
    if table is None:
        pairs = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)  # bytes in memory order
        table = _FP8_PAIRS[st] = np.ascontiguousarray(_FP8_TABLES[st][pairs]).view(np.uint64).reshape(-1)
    return table


def fp8_to_float32(raw: np.ndarray, st: str, out: np.ndarray) -> np.ndarray:
    """The FP8 values of the flat uint8 array `raw` (safetensors dtype `st`) into flat float32 `out`."""
    even = raw.size & ~1
    if even:
        _fp8_pairs(st).take(raw[:even].view(np.uint16), out=out[:even].view(np.uint64), mode="clip")
    if raw.size & 1:
        out[-1] = _FP8_TABLES[st][raw[-1]]
    return out


def to_float32(raw: np.ndarray, ftype: FloatType, out: np.ndarray) -> np.ndarray:
    """Convert raw storage values into the float32 array `out` (same shape), without allocating."""
    np.copyto(out, raw.view(ftype.logical), casting="unsafe")
    return out


def from_float32(values: np.ndarray, ftype: FloatType) -> np.ndarray:
    """float32 -> raw storage of `ftype`, rounding to nearest even."""
    if ftype is F32:
        return values
    return values.astype(ftype.logical).view(ftype.storage)


def round_to(values: np.ndarray, ftype: FloatType) -> np.ndarray:
    """float32 values rounded to `ftype` (nearest even) and back: what a store of `ftype` returns."""
    return np.asarray(values, dtype=np.float32).astype(ftype.logical).astype(np.float32)


# torch is imported inside these: importing this module never imports torch.


def torch_dtype(name: str):
    """The torch dtype of a canonical dtype name ("bfloat16", "float16", "float32", "float64")."""
    import torch

    return getattr(torch, float_type(name).name)


def round_to_torch(t, name: str):
    """`round_to` on a float32 torch tensor: rounded to dtype `name` (nearest even), float32 again."""
    return t.to(torch_dtype(name)).float()
