#!/usr/bin/env bash
# The whole job on an embedded default: set up ./.venv, generate a tiny base model and three
# fine-tunes, plan, build a task_arithmetic merge into a job store, show its status, export it.
#   bash tools/demo.sh [--dir DIR]     (default ./demo)
# Running it again replaces only what the demo wrote there itself (listed in DIR/.streammerge-demo);
# a folder the demo did not make is refused unless it is empty, and files you added are kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
demo="$root/demo"
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) [ $# -ge 2 ] || { echo "error: demo.sh: --dir needs a folder" >&2; exit 1; }
               demo="$2"; shift 2 ;;
        -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: demo.sh: unknown argument $1 (usage: demo.sh [--dir DIR])" >&2; exit 1 ;;
    esac
done
case "$demo" in /*) ;; *) demo="$PWD/$demo" ;; esac   # --dir is relative to where you are
cd "$root"
marker="$demo/.streammerge-demo"

# Remove what an earlier run listed in the marker: its files first, then its folders, deepest
# first, each only if nothing else is left in it.
forget_previous_run() {
    local path
    while IFS= read -r path; do
        if [ -f "$demo/$path" ] || [ -L "$demo/$path" ]; then rm -f -- "$demo/$path"; fi
    done <"$marker"
    while IFS= read -r path; do
        if [ -d "$demo/$path" ]; then rmdir -- "$demo/$path" 2>/dev/null || :; fi
    done < <(LC_ALL=C sort -r "$marker")
    rm -f -- "$marker"
}

listing() { (cd "$demo" && find . -mindepth 1 ! -name .streammerge-demo | sed 's|^\./||' | LC_ALL=C sort); }

if [ -f "$marker" ]; then
    forget_previous_run
elif [ -e "$demo" ] && [ -n "$(ls -A "$demo" 2>/dev/null)" ]; then
    echo "error: demo.sh: $demo exists and was not made by the demo; move it or pick --dir" >&2
    exit 1
fi
. tools/env.sh

mkdir -p "$demo"
before="$(listing)"
# The marker is written on any exit, so a failed or interrupted run is cleaned up next time too.
trap 'LC_ALL=C comm -13 <(echo "$before") <(listing) >"$marker"' EXIT

python tools/synth_checkpoints.py "$demo/models" --preset tiny --finetunes 3
cat > "$demo/recipe.yaml" <<YAML
# Task arithmetic over three fine-tunes of one base (mergekit YAML).
merge_method: task_arithmetic
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 0.5}
  - model: models/ft2
    parameters: {weight: [0.2, 0.5]}   # a gradient over the layers
  - model: models/ft3
    parameters: {weight: 0.3}
parameters:
  lambda: 1.0
dtype: float32
out_dtype: bfloat16
YAML
cd "$demo"
streammerge plan recipe.yaml
streammerge build recipe.yaml --store job.zarr --memory-limit 400MB
streammerge status job.zarr
streammerge export job.zarr merged --shard-size 100KB
ls -l merged
