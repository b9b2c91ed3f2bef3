#!/usr/bin/env bash
# Create (or reuse) ./.venv and install streammerge into it. Sourced by demo.sh and test.sh.
#   STREAMMERGE_EXTRAS="test"  also installs the test dependencies and the mergekit oracle.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${STREAMMERGE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_q() { pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
need_torch="${STREAMMERGE_TORCH:-0}"
if [ "${STREAMMERGE_EXTRAS:-}" = "test" ]; then need_torch=1; fi
if [ "$need_torch" = 1 ] && ! python -c "import torch" 2>/dev/null; then
    # Pinned on purpose: this version is the CPU wheel available locally. An unpinned torch
    # would pull several GB of CUDA packages onto a CPU box. Installed before anything that
    # depends on torch, so their resolvers find it satisfied.
    pip_q "torch==2.13.0"
fi
if [ "${STREAMMERGE_EXTRAS:-}" = "test" ]; then
    pip_q -e "$root[test]"
    # mergekit is only a test oracle (parity tests); it reuses the torch installed above.
    python -c "import mergekit" 2>/dev/null || pip_q "mergekit>=0.1.5"
else
    pip_q -e "$root" tokenizers
fi
python -c "import streammerge" >/dev/null
