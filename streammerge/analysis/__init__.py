"""Analyses of task vectors (stats-only methods run by the engine's "analysis" stage)."""

from .conflict import analyze_tensor, conflict_method
from .summary import KINDS, layer_index, module_kind, summarize

__all__ = ["analyze_tensor", "conflict_method", "KINDS", "layer_index", "module_kind", "summarize"]
