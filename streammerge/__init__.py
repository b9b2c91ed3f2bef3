"""streammerge: streaming, out-of-core merging of LLM checkpoints.

Layout (one place per concern):
  checkpoints/  reading safetensors checkpoints: header validation, model resolution, block reads
  recipe/       the mergekit-compatible YAML recipe: schema, validation, per-tensor parameters
  methods/      the merge math: pure functions on float32 arrays, registered by name
  plan/         which output tensors exist, from which inputs, in which row blocks
  store/        the zarr job store: layout, manifest, completion markers
  engine/       execution: one dask task per (tensor, row block), progress
  export/       streaming sharded safetensors writer and HF model directory output
"""

__version__ = "0.1.0"
