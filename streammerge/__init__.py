"""streammerge: streaming, out-of-core merging of LLM checkpoints.

Layout (one place per concern):
  checkpoints/  reading safetensors checkpoints: header validation, model resolution, block reads
  recipe/       the mergekit-compatible YAML recipe: schema, validation, per-tensor parameters
  ops/          rules the numpy methods and the torch kernels share, written once
  kernels/      the merge math on whole tensors in torch (the GPU path)
  encodings/    formats of the routing methods' task vectors (1-bit, sparse blobs)
  methods/      the merge math: pure functions on float32 arrays, registered by name
  analysis/     conflict analyses of task vectors
  plan/         which output tensors exist, from which inputs, in which row blocks
  store/        the zarr job store: layout, manifest, completion markers
  engine/       execution: a dask graph of typed nodes per (tensor, row block), progress
  export/       streaming sharded safetensors writer and HF model directory output
  report/, routing/  the routing build's report; inference with a router
  dtypes.py, geometry.py, workspace.py  dtypes and rounding, row geometry, per-thread buffers

Imports point one way (tests/test_import_graph.py): dtypes/geometry/workspace/errors and
methods/base.py <- ops/ <- kernels/, encodings/, analysis/ <- methods/ <- plan/ <- engine/,
export/ <- routing/, cli/.
"""

__version__ = "0.1.0"
