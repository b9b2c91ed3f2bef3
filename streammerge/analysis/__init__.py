"""Analyses of task vectors (stats-only methods run by the engine's "analysis" stage).

Built on ops/topk.py (the exact streamed top-k) and the method contract (methods/base.py);
plan/routed.py and engine/job.py use them, nothing here imports a method, kernel or encoding.
"""

from .conflict import analyze_tensor, conflict_method
from .summary import KINDS, layer_index, module_kind, summarize

__all__ = ["analyze_tensor", "conflict_method", "KINDS", "layer_index", "module_kind", "summarize"]
