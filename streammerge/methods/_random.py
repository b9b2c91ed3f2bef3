"""Counter-based randomness: the random stream of an element is a function of its flat position.

DARE and DELLA drop entries at random. To be independent of how a tensor is cut into blocks (and
of worker count, scheduling and device), the random number of an element is a hash of
(stream key, flat index) rather than the next draw of a stateful generator:

    key   = blake2b(seed, tensor name, model index, purpose)   (64 bits)
    z     = splitmix64_finalize(key + GOLDEN * (index + 1))      (64 bits, mod 2**64)
    u     = (z >> 11) * 2**-53                                   (uniform in [0, 1))

splitmix64's finalizer is a bijective mixer that passes BigCrush on counter inputs; the result
is what `numpy.random.SeedSequence`-style generators use to expand seeds. All arithmetic is
vectorised uint64 numpy (wrapping), about 2-3 ns per element.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S40 = np.uint64(40)

_TWO53 = float(2**53)


def stream_key(seed: int, tensor: str, model: int, purpose: str = "") -> int:
    """A 64-bit key naming one random stream: (seed, tensor, model index, purpose)."""
    h = hashlib.blake2b(digest_size=8, person=b"streammerge-rng")
    h.update(f"{int(seed)}\x00{tensor}\x00{int(model)}\x00{purpose}".encode())
    return int.from_bytes(h.digest(), "little")


_tls = threading.local()


def _pool() -> dict:
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
    return pool


def _buf(name: str, size: int, dtype) -> np.ndarray:
    """A per-thread reusable buffer (fresh memory is slow to touch)."""
    pool = _pool()
    a = pool.get(name)
    if a is None or a.size < size:
        a = pool[name] = np.empty(max(size, 1 << 16), dtype=dtype)
    return a[:size]


def _counting(size: int) -> np.ndarray:
    pool = _pool()
    a = pool.get("arange")
    if a is None or a.size < size:
        a = pool["arange"] = np.arange(max(size, 1 << 16), dtype=np.uint64)
    return a[:size]


def bits64(key: int, start: int, count: int, step: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """uint64 random words for flat positions start, start+step, ... (count of them).

    Written into `out` (uint64, >= count) if given, else into a fresh array.
    """
    z = np.empty(count, np.uint64) if out is None else out[:count]
    tmp = _buf("tmp", count, np.uint64)
    with np.errstate(over="ignore"):
        ar = _counting(count)
        if step != 1:
            np.multiply(ar, np.uint64(step), out=z)
            np.add(z, np.uint64((int(start) + 1) % 2**64), out=z)
        else:
            np.add(ar, np.uint64((int(start) + 1) % 2**64), out=z)
        # counter = key + GOLDEN * (position + 1), position = start + i*step
        np.multiply(z, _GOLDEN, out=z)
        np.add(z, np.uint64(key % 2**64), out=z)
        # splitmix64 finalizer
        np.right_shift(z, _S30, out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, _M1, out=z)
        np.right_shift(z, _S27, out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, _M2, out=z)
        np.right_shift(z, _S31, out=tmp)
        np.bitwise_xor(z, tmp, out=z)
    return z


def uniform(key: int, start: int, count: int) -> np.ndarray:
    """float64 uniforms in [0, 1) with 53 random bits, for positions start .. start+count-1."""
    z = bits64(key, start, count, out=_buf("z", count, np.uint64))
    np.right_shift(z, _S11, out=z)
    out = z.astype(np.float64)
    out *= 1.0 / _TWO53
    return out


def uniform32(key: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 uniforms in [0, 1) with 24 random bits (exact in float32)."""
    z = bits64(key, start, count, out=_buf("z", count, np.uint64))
    np.right_shift(z, _S40, out=z)
    zi = z.view(np.int64)  # < 2**24: int64 -> float32 converts faster than uint64
    res = np.empty(count, np.float32) if out is None else out[:count]
    np.copyto(res, zi, casting="unsafe")
    res *= np.float32(2.0**-24)
    return res


def bernoulli_keep(key: int, start: int, count: int, p: float, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask, True with probability p (u < p with 53-bit u), for consecutive positions.

    Compared in integers: u < p  <=>  (z >> 11) < ceil(p * 2**53), exact for any float p.
    """
    res = np.empty(count, bool) if out is None else out[:count]
    if p >= 1.0:
        res[:] = True
        return res
    if not p > 0.0:  # p <= 0 or NaN
        res[:] = False
        return res
    threshold = np.uint64(int(np.ceil(p * _TWO53)))
    z = bits64(key, start, count, out=_buf("z", count, np.uint64))
    np.right_shift(z, _S11, out=z)
    return np.less(z, threshold, out=res)
