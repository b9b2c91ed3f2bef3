"""Merge methods: one family per module, each registering its methods by name on import.

Every public module of this package (name not starting with "_", other than the
infrastructure modules base.py and inmemory.py) is a method family, imported by
`base.load_methods` at the first `get_method` / `method_names`: adding a method is adding a
file. Methods are numpy; the rules they share with their torch kernels live below both, in
ops/ (sparsification, sign consensus, random streams, streamed top-k, exact sums), and a
method's `kernel` comes from kernels/. The routing methods' per-tensor jobs are built here
too, from encodings/' formats: onebit.py (1-bit encode, static fallback), mediator.py (sparse
experts).

    ops/  <-  kernels/, encodings/  <-  methods/  <-  plan/, engine/
"""

from .base import Block, MergeMethod, Param, Pass, TensorParams, get_method, load_methods, method_names, register

__all__ = ["Block", "MergeMethod", "Param", "Pass", "TensorParams", "get_method", "load_methods", "method_names", "register"]
