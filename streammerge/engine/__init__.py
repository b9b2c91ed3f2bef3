"""Execution: build/resume orchestration (job.py), the dask graph (build.py: one typed node per
pass map, reduce, stats save and merged block; device.py: one node per tensor on a GPU), where
a graph runs (scheduler.py, which export/ uses too) and progress. Builds on plan/, store/,
methods/ (the contract), kernels/ (DeviceTensor), checkpoints/ and workspace.py."""
