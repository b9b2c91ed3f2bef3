"""Floating-point storage dtypes and the conversions the engine needs.

Tensors travel as their raw storage (bf16 as uint16, since neither zarr nor older numpy know
bfloat16) and are computed in float32. float32 -> bf16/fp16 rounds to nearest even. float64
inputs are read (rounded to nearest float32, as mergekit's `dtype: float32` casts them) and may
be written, but nothing is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .jit import jit, loaded
from .workspace import thread_buffer

# ml_dtypes is imported where its types are first needed, not with this module: its import
# registers its casts and ufunc loops with numpy, ~0.5 s of every command here, and the CPU
# merge path never needs it (bf16 travels as uint16 bits, converted by shifts below).


def ml_dtype(name: str) -> np.dtype:
    """The numpy dtype of ml_dtypes' type `name` ("bfloat16", "float8_e4m3fn", ...), imported on first use."""
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


@dataclass(frozen=True)
class FloatType:
    name: str  # canonical name, as in torch and HF config.json: "bfloat16", "float16", "float32", "float64"
    st: str  # safetensors header name
    storage: np.dtype  # numpy dtype used on disk and in zarr (uint16 for bf16)
    logical_name: str  # numpy (or ml_dtypes, for bf16) name of the dtype with the value semantics

    @property
    def logical(self) -> np.dtype:
        """numpy dtype with the value semantics (ml_dtypes.bfloat16 for bf16)."""
        return ml_dtype(self.logical_name) if self.storage.name != self.logical_name else self.storage

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


BF16 = FloatType("bfloat16", "BF16", np.dtype(np.uint16), "bfloat16")
F16 = FloatType("float16", "F16", np.dtype(np.float16), "float16")
F32 = FloatType("float32", "F32", np.dtype(np.float32), "float32")
F64 = FloatType("float64", "F64", np.dtype(np.float64), "float64")

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
FP8_TYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # safetensors name -> ml_dtypes name
_FP8_TABLES: dict[str, np.ndarray] = {}
_FP8_PAIRS: dict[str, np.ndarray] = {}


def _fp8_table(st: str) -> np.ndarray:
    """float32 value of each of the 256 bytes of FP8 type `st` (built on first use)."""
    table = _FP8_TABLES.get(st)
    if table is None:
        table = _FP8_TABLES[st] = np.arange(256, dtype=np.uint8).view(ml_dtype(FP8_TYPES[st])).astype(np.float32)
    return table


def _fp8_pairs(st: str) -> np.ndarray:
    """uint64 table: entry v holds the two float32 values of the byte pair stored as uint16 v."""
    table = _FP8_PAIRS.get(st)
    if table is None:
        pairs = np.arange(65536, dtype=np.uint16).view(np.uint8).reshape(-1, 2)  # bytes in memory order
        table = _FP8_PAIRS[st] = np.ascontiguousarray(_fp8_table(st)[pairs]).view(np.uint64).reshape(-1)
    return table


def fp8_to_float32(raw: np.ndarray, st: str, out: np.ndarray) -> np.ndarray:
    """The FP8 values of the flat uint8 array `raw` (safetensors dtype `st`) into flat float32 `out`."""
    even = raw.size & ~1
    if even:
        _fp8_pairs(st).take(raw[:even].view(np.uint16), out=out[:even].view(np.uint64), mode="clip")
    if raw.size & 1:
        out[-1] = _fp8_table(st)[raw[-1]]
    return out


def to_float32(raw: np.ndarray, ftype: FloatType, out: np.ndarray) -> np.ndarray:
    """Convert raw storage values into the float32 array `out` (same shape), without allocating.

    bf16 is the top half of a float32: widening is a 16-bit shift of the bits (NaN payloads
    included), ~3x as fast as ml_dtypes' cast here (tests/test_foundations.py compares all 65536
    patterns); once numba is loaded, one compiled pass (~2x faster again)."""
    if ftype is BF16:
        if out.flags.c_contiguous and raw.flags.c_contiguous and loaded():
            _widen_bf16(raw.reshape(-1).view(np.uint16), out.reshape(-1).view(np.uint32))
        else:  # widen, then shift in place: 0.8x the time of one shift that casts as it goes
            wide = out.view(np.uint32)
            np.copyto(wide, raw.view(np.uint16))
            np.left_shift(wide, 16, out=wide)
    else:
        np.copyto(out, raw.view(ftype.logical), casting="unsafe")
    return out


def from_float32(values: np.ndarray, ftype: FloatType) -> np.ndarray:
    """float32 -> raw storage of `ftype`, rounding to nearest even."""
    if ftype is F32:
        return values
    return float32_into(values, ftype, np.empty(np.shape(values), ftype.storage))


_ROUND_SLICE = 1 << 16  # elements rounded at a time: the integer temporaries stay in cache


def float32_into(values: np.ndarray, ftype: FloatType, dest: np.ndarray) -> np.ndarray:
    """float32 `values` rounded to nearest even into `dest`, an array of `ftype`'s storage dtype
    with as many elements (any shapes); returns `dest`.

    bf16 is rounded on the bits, as ml_dtypes does it (same bits, NaN as sign | 0x7fc0) in
    about 0.7x its time: bf16 = (x + 0x7fff + lowest kept bit) >> 16, which carries into the
    exponent exactly as rounding does (to inf past the largest bf16)."""
    if ftype is not BF16:  # no finiteness pass where nobody asks for it
        np.copyto(dest.reshape(-1).view(ftype.logical), np.reshape(values, -1), casting="unsafe")
    else:
        float32_into_finite(values, ftype, dest)
    return dest


def float32_into_finite(values: np.ndarray, ftype: FloatType, dest: np.ndarray) -> bool:
    """`float32_into`, saying whether every value was finite: the bf16 rounding looks for NaNs
    anyway, and looks for Inf in the same pass (the engine's NaN/Inf check of a result)."""
    if ftype is not BF16:
        np.copyto(dest.reshape(-1).view(ftype.logical), np.reshape(values, -1), casting="unsafe")
        return bool(np.isfinite(values).all())
    finite = True
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    out = dest.reshape(-1).view(np.uint16)
    if loaded():  # numba is in the process: one compiled pass (jit.loaded)
        return _round_bf16(x, out) != 0x7F800000
    t = thread_buffer("dtypes.round", _ROUND_SLICE, np.uint32)
    nan = thread_buffer("dtypes.nan", _ROUND_SLICE, bool)
    for s in range(0, x.size, _ROUND_SLICE):
        e = min(x.size, s + _ROUND_SLICE)
        xs, ts, ns = x[s:e], t[: e - s], nan[: e - s]
        np.right_shift(xs, 16, out=ts)
        np.bitwise_and(ts, 1, out=ts)
        np.add(ts, 0x7FFF, out=ts)
        np.add(ts, xs, out=ts)
        np.right_shift(ts, 16, out=out[s:e], casting="unsafe")
        if not np.isfinite(xs.view(np.float32), out=ns).all():
            finite = False
            if np.isnan(xs.view(np.float32), out=ns).any():  # the carry would make NaNs inf or wrap
                out[s:e][ns] = (xs[ns] >> 16) & 0x8000 | 0x7FC0
    return finite


@jit
def _widen_bf16(raw, out):
    """to_float32's bf16 case in one pass: raw uint16 bits -> out uint32 bits."""
    for j in range(raw.shape[0]):
        out[j] = np.uint32(raw[j]) << np.uint32(16)


@jit
def _round_bf16(x, out):
    """float32_into_finite's bf16 case in one pass (float32 bits x -> bf16 bits out, the same
    rounding and NaNs); returns the largest exponent field seen, 0x7F800000 if any value was
    not finite (an integer max: it vectorizes where a flag would not)."""
    top = np.uint32(0)
    for j in range(x.shape[0]):
        v = x[j]
        r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = ((v >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
        out[j] = np.uint16(nan if (v & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r)
        top = max(top, v & np.uint32(0x7F800000))
    return top


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
