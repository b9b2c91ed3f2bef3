"""Counter-based randomness: the random numbers of an element are a function of its flat position.

DARE and DELLA drop entries at random. To be independent of how a tensor is cut into blocks (and
of worker count, scheduling and device), element p of a stream uses the p-th 16-bit word of a
PCG64 generator seeded with the stream's key, reached directly with PCG64's exact O(log n)
`advance`:

    key    = blake2b(seed, tensor name, model index, purpose)   (64 bits)
    word p = uint16 number p of PCG64(key)'s output (each 64-bit output is 4 words, low first):
             advance(p // 4), draw, skip p % 4 words

numpy's C generator runs several times faster than hashing positions in numpy arithmetic
and releases the GIL. A Bernoulli(p) keep compares one word with round(p * 2**16), so keep
probabilities resolve to 2**-16; uniforms (DELLA) take two words, elements 2p and 2p + 1.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

_WORDS_PER_OUTPUT = 4
_TWO16 = float(2**16)


def stream_key(seed: int, tensor: str, model: int, purpose: str = "") -> int:
    """A 64-bit key naming one random stream: (seed, tensor, model index, purpose)."""
    h = hashlib.blake2b(digest_size=8, person=b"streammerge-rng")
    h.update(f"{int(seed)}\x00{tensor}\x00{int(model)}\x00{purpose}".encode())
    return int.from_bytes(h.digest(), "little")


class Stream:
    """Stream `key`, read by position. Seeding a PCG64 (~10 us) costs as much as drawing ~4000
    of its outputs, so a Stream keeps one generator and advances it from where the last read
    ended: a block read chunk by chunk seeds once. The words are those of a fresh seeding."""

    def __init__(self, key: int):
        self._gen = np.random.PCG64(int(key) % 2**64)
        self._next = 0  # the generator's next 64-bit output

    def bits16(self, start: int, count: int) -> np.ndarray:
        """uint16 random words for positions start .. start + count - 1."""
        first, skip = divmod(int(start), _WORDS_PER_OUTPUT)
        if first != self._next:  # a backward step wraps around the 2**128 period
            self._gen.advance((first - self._next) % 2**128)
        n = -(-(skip + count) // _WORDS_PER_OUTPUT)
        self._next = first + n
        return self._gen.random_raw(n).view(np.uint16)[skip : skip + count]

    def bits32(self, start: int, count: int) -> np.ndarray:
        """uint32 words for element positions start ..: words 2p (low half) and 2p + 1 (high half)."""
        return self.bits16(2 * int(start), 2 * count).view(np.uint32)

    def uniform32(self, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 uniforms in [0, 1) with 24 random bits (exact in float32)."""
        z = self.bits32(start, count) >> np.uint32(8)
        res = np.empty(count, np.float32) if out is None else out[:count]
        np.multiply(z, np.float32(2.0**-24), out=res, casting="unsafe")
        return res

    def bernoulli_keep(self, start: int, count: int, p: float, out: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask, True with probability p (resolved to 2**-16), for consecutive positions."""
        res = np.empty(count, bool) if out is None else out[:count]
        if p >= 1.0:
            res[:] = True
            return res
        if not p > 0.0:  # p <= 0 or NaN
            res[:] = False
            return res
        threshold = int(round(p * _TWO16))
        if threshold >= 2**16:
            res[:] = True
            return res
        return np.less(self.bits16(start, count), np.uint16(threshold), out=res)


class KeptMasks:
    """Boolean masks a method draws twice (DARE's l1 pass sums the masked task vector, then its
    merge applies the mask): the first draw is kept, packed 1 bit per entry, under a key naming
    the stream and the positions, and the second read takes it back instead of drawing again
    (~0.5 ns an entry of PCG64 words and comparison against ~0.05 to pack and unpack).

    Bounded: at most `budget` bytes of packed masks (one 0.5B embedding's three models take
    25 MB); past that the oldest are dropped. A mask taken is removed. A miss (dropped, another
    process, a resumed build whose pass is done) draws again: the words are the same, so what
    the cache holds never changes a result, only the time. Shared by the threads (a lock)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._masks: dict = {}  # key -> (packed bits, entries), oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key, mask: np.ndarray) -> None:
        if -(-mask.size // 8) > self.budget:
            return
        packed = np.packbits(mask)
        with self._lock:
            old = self._masks.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes
            while self._bytes + packed.nbytes > self.budget:
                self._bytes -= self._masks.pop(next(iter(self._masks)))[0].nbytes
            self._masks[key] = (packed, mask.size)
            self._bytes += packed.nbytes

    def take(self, key) -> np.ndarray | None:
        """The bool mask kept under `key` (removed from the cache), or None."""
        with self._lock:
            kept = self._masks.pop(key, None)
            if kept is None:
                return None
            self._bytes -= kept[0].nbytes
        return np.unpackbits(kept[0], count=kept[1]).view(bool)

    def __len__(self) -> int:
        return len(self._masks)


KEPT_MASKS = KeptMasks(48 * 2**20)


_local = threading.local()
_KEPT_STREAMS = 16  # per thread: the streams of the few tensors and models it is working on


def thread_stream(key: int) -> Stream:
    """This thread's Stream for `key`, kept from one call to the next (a method called row group
    by row group seeds each stream once, not once per group: ~8 us a seeding, with the GIL held).
    A Stream is read by position, so which one serves a read changes no word."""
    try:
        streams = _local.streams
    except AttributeError:
        streams = _local.streams = {}
    stream = streams.pop(key, None)
    if stream is None:
        stream = Stream(key)
        if len(streams) >= _KEPT_STREAMS:
            del streams[next(iter(streams))]  # the least recently used
    streams[key] = stream  # last: most recently used
    return stream


def bits16(key: int, start: int, count: int) -> np.ndarray:
    """uint16 random words for positions start .. start + count - 1 of stream `key`."""
    return Stream(key).bits16(start, count)


def bits32(key: int, start: int, count: int) -> np.ndarray:
    """uint32 words for element positions start ..: words 2p (low half) and 2p + 1 (high half)."""
    return Stream(key).bits32(start, count)


def uniform(key: int, start: int, count: int) -> np.ndarray:
    """float64 uniforms in [0, 1) with 32 random bits, for positions start .. start+count-1."""
    return bits32(key, start, count) * (1.0 / 2.0**32)


def uniform32(key: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32 uniforms in [0, 1) with 24 random bits (exact in float32)."""
    return Stream(key).uniform32(start, count, out)


def bernoulli_keep(key: int, start: int, count: int, p: float, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask, True with probability p (resolved to 2**-16), for consecutive positions."""
    return Stream(key).bernoulli_keep(start, count, p, out)
