"""numba, where it can be imported: the compiled loops of the merge's hot path (ops/fused.py,
the bf16 conversions of dtypes.py) are written once in plain Python and compiled by `jit`.

A streamed merge spends its time in elementwise passes that numpy makes at memory-copy speed
each (README, Benchmark); a loop compiled by numba does several of them in one pass over the
data, with the GIL released (`nogil`), so the engine's threads run it side by side. Where numba
cannot be imported (not installed, refusing this numpy, NUMBA_DISABLE_JIT, or
STREAMMERGE_NO_NUMBA=1) `available()` is False and every caller keeps its numpy code, which is
also the tests' reference (tests/test_fused.py). Compiled code is cached on disk (numba's
`cache=True`, beside the sources or in NUMBA_CACHE_DIR): the first use after an install compiles
(the TIES merge loop: ~2.5 s for each model count), later processes load it (numba's import and
the load: ~0.4 s and ~110 MB of RSS).

numba is imported on first use, not with this module, so that commands that never merge
(`status`, `serve`, `export` of a finished store) do not pay its ~0.2 s and ~70 MB.
"""

from __future__ import annotations

import gc
import os
import threading
import types

_lock = threading.Lock()
_numba = None
_state = None  # None: not tried yet; True / False: importable


def available() -> bool:
    """Whether compiled loops are used (imports numba on the first call)."""
    global _numba, _state
    if _state is None:
        with _lock:
            if _state is None:
                ok = False
                if os.environ.get("STREAMMERGE_NO_NUMBA", "") in ("", "0"):
                    try:
                        import numba

                        _numba, ok = numba, not numba.config.DISABLE_JIT
                    except ImportError:  # missing, or refusing this numpy
                        ok = False
                    else:
                        # numba, llvmlite and the scipy that numba imports leave ~100k
                        # long-lived objects that every later full collection, and the
                        # interpreter's exit, would traverse again: moved out of the collector's
                        # sight (a 0.5B task_arithmetic build's exit took 0.25-0.33 s without).
                        gc.freeze()
                _state = ok
    return _state


def loaded() -> bool:
    """Whether compiled loops are in use already (numba imported by an earlier `available()`),
    without importing it: for loops that pay off only where numba is in the process anyway
    (dtypes' bf16 conversions: for them alone numba's import and cache load, ~0.4 s, would
    cost a small build more than they save; a build of a method without compiled loops never
    imports it)."""
    return _state is True


def jit(fn):
    """`fn` compiled (nogil, cached, numpy's float semantics) when first called, where
    `available()`; else `fn` itself, which callers only reach through tests. Compiled code may
    call other `jit` functions of its module by name (compiled with it); keep such helpers in the
    caller's file: numba's disk cache is keyed on the caller's source file alone, so a helper
    changed in another file would leave the caller's cached code stale."""
    compiled = None

    def compile_():
        nonlocal compiled
        if compiled is None:
            if available():
                compiled = _numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)(_with_compiled_helpers(fn))
            else:
                compiled = fn
        return compiled

    def call(*args):
        return (compiled if compiled is not None else compile_())(*args)

    call.__wrapped__ = fn
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    call._jit_compiled = compile_
    return call


def _with_compiled_helpers(fn):
    """`fn`, with the `jit` functions it names as globals bound to their compiled code (inside
    compiled code numba can only call compiled functions, not the wrappers `jit` returns)."""
    helpers = {}
    for name in fn.__code__.co_names:
        compile_ = getattr(fn.__globals__.get(name), "_jit_compiled", None)
        if compile_ is not None:
            helpers[name] = compile_()
    if not helpers:
        return fn
    out = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__qualname__, out.__doc__ = fn.__qualname__, fn.__doc__
    return out
