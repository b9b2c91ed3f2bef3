#!/usr/bin/env bash
# The whole job on an embedded default: set up ./.venv, generate a tiny base model and three
# fine-tunes, plan, build a task_arithmetic merge into a job store, show its status, export it.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/env.sh
demo="${1:-demo}"
rm -rf "$demo"
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
