"""Serving routing stores behind an OpenAI-compatible HTTP API (`streammerge serve`).

Modules, one role each (vLLM's split): api.py (HTTP routes only), engine.py (the thread that
drives the steps and hands results to the requests), scheduler.py (request states, admission,
queue; pure Python), runner.py (the model, KV caches, routing, one batched forward per step,
sampling), deltas.py (per-row routed weights in one forward), metrics.py (Prometheus text).
"""
