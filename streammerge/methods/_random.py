"""Counter-based randomness: the random numbers of an element are a function of its flat position.

DARE and DELLA drop entries at random. To be independent of how a tensor is cut into blocks (and
of worker count, scheduling and device), element p of a stream draws the p-th 32-bit word of a
Philox4x64 counter-based generator keyed by (seed, tensor name, model index, purpose):

    key    = blake2b(seed, tensor name, model index, purpose)   (64 bits; Philox's key)
    word p = uint32 number p of Philox(key) started at counter 0  (each counter value yields
             4 x 64 bits = 8 words, low half first), reached directly by setting the counter
             to p // 8 and skipping p % 8 words

Philox is numpy's own C implementation (Salmon et al. 2011, passes BigCrush), several times
faster than hashing positions in numpy arithmetic.
"""

from __future__ import annotations

import hashlib

import numpy as np

_WORDS_PER_COUNTER = 8
_TWO32 = float(2**32)


def stream_key(seed: int, tensor: str, model: int, purpose: str = "") -> int:
    """A 64-bit key naming one random stream: (seed, tensor, model index, purpose)."""
    h = hashlib.blake2b(digest_size=8, person=b"streammerge-rng")
    h.update(f"{int(seed)}\x00{tensor}\x00{int(model)}\x00{purpose}".encode())
    return int.from_bytes(h.digest(), "little")


def bits32(key: int, start: int, count: int) -> np.ndarray:
    """uint32 random words for flat positions start .. start + count - 1 of stream `key`."""
    skip = int(start) % _WORDS_PER_COUNTER
    gen = np.random.Philox(key=int(key) % 2**64, counter=int(start) // _WORDS_PER_COUNTER)
    raw = gen.random_raw(-(-(skip + count) // 2)).view(np.uint32)
    return raw[skip : skip + count]


def uniform(key: int, start: int, count: int) -> np.ndarray:
    """float64 uniforms in [0, 1) with 32 random bits, for positions start .. start+count-1."""
    return bits32(key, start, count) * (1.0 / _TWO32)


def uniform32(key: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 uniforms in [0, 1) with 24 random bits (exact in float32)."""
    z = bits32(key, start, count) >> np.uint32(8)
    res = np.empty(count, np.float32) if out is None else out[:count]
    np.multiply(z, np.float32(2.0**-24), out=res, casting="unsafe")
    return res


def bernoulli_keep(key: int, start: int, count: int, p: float, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask, True with probability p, for consecutive positions.

    Compared in integers: keep where word < round(p * 2**32) (p resolved to 2**-32).
    """
    res = np.empty(count, bool) if out is None else out[:count]
    if p >= 1.0:
        res[:] = True
        return res
    if not p > 0.0:  # p <= 0 or NaN
        res[:] = False
        return res
    threshold = np.uint32(min(2**32 - 1, int(round(p * _TWO32))))
    return np.less(bits32(key, start, count), threshold, out=res)
