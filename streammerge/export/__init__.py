"""Output: the streaming sharded safetensors writer, HF model directories and export variants
(a routing store's per-task models, decoded with encodings/). Reads store/ and checkpoints/;
runs its graph with engine/scheduler.py."""
