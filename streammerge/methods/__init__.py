"""Merge methods: one family per module, each registering its methods by name on import.

Every public module of this package (name not starting with "_", other than the
infrastructure modules below) is imported here, so adding a method is adding a file.
"""

import importlib
import pkgutil

from .base import Block, MergeMethod, Param, Pass, TensorParams, get_method, method_names, register

_INFRASTRUCTURE = {"base", "inmemory"}

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")

_load_all = True

__all__ = ["Block", "MergeMethod", "Param", "Pass", "TensorParams", "get_method", "method_names", "register"]
