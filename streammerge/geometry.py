"""How a tensor is seen as rows: the one row geometry of the engine, methods, kernels and formats.

A tensor of shape (r, *rest) is r rows of prod(rest) elements; a 1-D tensor has rows of one
element, and a 0-d tensor is one row of one element. Row blocks, chunked passes, sign-bit
packing and the device kernels all cut tensors this way, so they share these functions.
"""

from __future__ import annotations

import math
from typing import Sequence


def numel(shape: Sequence[int]) -> int:
    """Elements of a tensor of `shape` (a 0-d tensor has one). Python integers, exact: called
    per block and per chunk, where np.prod's ~3 us held the GIL (math.prod: ~0.1 us)."""
    return math.prod(map(int, shape))


def num_rows(shape: Sequence[int]) -> int:
    return shape[0] if len(shape) >= 1 else 1


def row_elems(shape: Sequence[int]) -> int:
    """Elements per row: a 0-d tensor is one row of one element; 1-D tensors have 1-element rows."""
    return numel(shape[1:]) if len(shape) > 1 else 1


def block_shape(shape: Sequence[int], r0: int, r1: int) -> tuple[int, ...]:
    """The shape of rows [r0, r1) of a tensor of `shape` (a 0-d tensor's block is (1,))."""
    return (r1 - r0, *shape[1:]) if len(shape) >= 1 else (1,)
