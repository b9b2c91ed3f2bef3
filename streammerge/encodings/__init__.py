"""Compact per-task encodings of task vectors, for the routing methods (docs/methods.md 3 and 4).

onebit: 1-bit task vectors (sign bits + scale), sparse / dense alternatives per (task, tensor),
        1bit-Merging's static fallback and dynamic merge.
sparse: top-rho entries as per-block blobs (int32 offsets + bf16 values), Mediator's experts.

Pure numpy: methods here are `MergeMethod`s the engine runs block by block (not registered:
the routed planner builds them per tensor).
"""

from .onebit import (
    dynamic_merge_block,
    fallback_merge_block,
    onebit_encode_method,
    onebit_fallback_method,
    onebit_outputs,
    pack_signs,
    reconstruct_from_outputs,
    reconstruct_task,
    ties_merge,
    unpack_signs,
)
from .sparse import apply_sparse, decode_sparse, encode_sparse, expert_block, expert_outputs, mediator_expert_method

__all__ = [
    "apply_sparse",
    "decode_sparse",
    "dynamic_merge_block",
    "encode_sparse",
    "expert_block",
    "expert_outputs",
    "fallback_merge_block",
    "mediator_expert_method",
    "onebit_encode_method",
    "onebit_fallback_method",
    "onebit_outputs",
    "pack_signs",
    "reconstruct_from_outputs",
    "reconstruct_task",
    "ties_merge",
    "unpack_signs",
]
