"""Compact per-task encodings of task vectors, for the routing methods (docs/methods.md 3 and 4).

onebit: 1-bit task vectors (sign bits + scale), sparse / dense alternatives per (task, tensor):
        their layout, scales, pack/unpack, the outputs a job declares, reconstruction, and
        1bit-Merging's dynamic merge of reconstructed blocks.
sparse: top-rho entries as per-block blobs (int32 offsets or a bitmask + bf16 values), Mediator's
        experts' format, their decoding and application.

Formats only, pure numpy: they use ops/consensus.py (1bit-Merging's TIES over decoded task
vectors) and methods/base.py's `Output` (the arrays a job declares), and know nothing of
kernels or methods. The jobs that write them
(`MergeMethod`s with their device kernels) are built in methods/onebit.py and
methods/mediator.py.
"""

from .onebit import (
    dynamic_merge_block,
    fallback_merge_block,
    onebit_outputs,
    pack_signs,
    reconstruct_from_outputs,
    reconstruct_task,
    ties_merge,
    unpack_signs,
)
from .sparse import apply_sparse, decode_sparse, encode_sparse, expert_block, expert_outputs

__all__ = [
    "apply_sparse",
    "decode_sparse",
    "dynamic_merge_block",
    "encode_sparse",
    "expert_block",
    "expert_outputs",
    "fallback_merge_block",
    "onebit_outputs",
    "pack_signs",
    "reconstruct_from_outputs",
    "reconstruct_task",
    "ties_merge",
    "unpack_signs",
]
