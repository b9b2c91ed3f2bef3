#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install streammerge into it; sourced by demo.sh and
# test.sh, and runnable alone (`bash tools/env.sh`). Each step prints one line on stderr; a failed
# install stops with `error: set-up: ...` and the end of pip's output.
#   STREAMMERGE_VENV=DIR          the environment (default ./.venv)
#   STREAMMERGE_EXTRAS=test       also the test dependencies, torch and the mergekit oracle
#   STREAMMERGE_TORCH=1           also torch (for `router fit` / `generate` / --device cuda)
#   STREAMMERGE_TORCH_SPEC=SPEC   which torch to install when none is importable (torch==2.13.0)
#   STREAMMERGE_TORCH_INDEX=URL   where to look for it first (default: PyTorch's CPU index on a
#                                 machine without an NVIDIA GPU, pip's own configuration otherwise;
#                                 empty: pip's configuration only)
#   STREAMMERGE_INSTALL=0         use the environment as it is: no pip at all
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${STREAMMERGE_VENV:-$root/.venv}"
cpu_index="https://download.pytorch.org/whl/cpu"

step() { echo "set-up: $*" >&2; }
fail() { echo "error: set-up: $*" >&2; exit 1; }

# pip_install WHAT ARGS...: one quiet pip run; its output is kept in a log and shown only when it
# fails, so a failure stops the set-up with pip's own explanation.
pip_install() {
    local what="$1" log rc=0 t0=$SECONDS
    shift
    log="$(mktemp "${TMPDIR:-/tmp}/streammerge-pip.XXXXXX")"
    printf 'set-up: installing %s ... ' "$what" >&2
    pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        echo "failed" >&2
        grep -v "is ignored: it is neither" "$log" | tail -n 15 >&2 || :
        rm -f "$log"
        echo "error: set-up: pip install $* failed (exit $rc)" >&2
        return 1
    fi
    rm -f "$log"
    echo "done in $((SECONDS - t0)) s" >&2
}

# grep reads all of nvidia-smi's output (no -q): an early exit could kill nvidia-smi with SIGPIPE,
# which pipefail would report as "no GPU".
has_nvidia_gpu() { nvidia-smi -L 2>/dev/null | grep '^GPU' >/dev/null; }

# A torch wheel fitting the machine. The pin keeps set-up from pulling whatever torch an index
# offers (PyPI's Linux wheels bundle several GB of CUDA libraries); a machine without an NVIDIA
# GPU looks in PyTorch's CPU index first (pip's configured sources still take part, so a local
# wheel or mirror works too), then in pip's configuration alone.
install_torch() {
    local spec="${STREAMMERGE_TORCH_SPEC:-torch==2.13.0}" index="${STREAMMERGE_TORCH_INDEX-}"
    if [ -z "${STREAMMERGE_TORCH_INDEX+set}" ] && ! has_nvidia_gpu; then index="$cpu_index"; fi
    if [ -n "$index" ]; then
        # A short timeout and no retries: an index that cannot be reached costs seconds, not minutes.
        if pip_install "$spec from $index" --index-url "$index" --timeout 10 --retries 0 "$spec"; then
            return 0
        fi
        step "$index did not provide $spec; trying pip's configured sources"
    fi
    pip_install "$spec from pip's configured sources" "$spec" ||
        fail "no torch could be installed ($spec). Install one that fits this machine" \
            "(https://pytorch.org/get-started/locally/) into $venv and run this again."
}

if [ ! -x "$venv/bin/python" ]; then
    [ "${STREAMMERGE_INSTALL:-1}" != 0 ] || fail "$venv has no python and STREAMMERGE_INSTALL=0"
    step "creating the virtual environment $venv"
    python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if [ "${STREAMMERGE_INSTALL:-1}" = 0 ]; then
    step "using $venv as it is (STREAMMERGE_INSTALL=0)"
else
    need_torch="${STREAMMERGE_TORCH:-0}"
    if [ "${STREAMMERGE_EXTRAS:-}" = "test" ]; then need_torch=1; fi
    # Installed before anything that depends on torch, so their resolvers find it satisfied;
    # a torch already there (any recent version) is kept.
    if [ "$need_torch" = 1 ]; then
        if python -c "import torch" 2>/dev/null; then
            step "torch $(python -c 'import torch; print(torch.__version__)') is already installed"
        else
            install_torch
            python -W ignore -c "import torch" || fail "torch was installed but does not import (see above)"
        fi
    fi
    if [ "${STREAMMERGE_EXTRAS:-}" = "test" ]; then
        pip_install "streammerge with its test dependencies" -e "$root[test]" || exit 1
        # mergekit is only a test oracle (parity tests); it reuses the torch installed above.
        if python -c "import mergekit" 2>/dev/null; then
            step "mergekit (the parity oracle) is already installed"
        else
            pip_install "mergekit (the parity oracle)" "mergekit>=0.1.5" || exit 1
        fi
    else
        pip_install "streammerge" -e "$root" tokenizers || exit 1
    fi
fi
python -c "import streammerge" || fail "streammerge does not import from $venv"
step "ready: $venv"
