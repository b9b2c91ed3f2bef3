"""Serving routing stores behind an OpenAI-compatible HTTP API (`streammerge serve`).

Modules, one role each (vLLM's split): api.py (HTTP routes only), engine.py (the thread that
drives the steps and hands results to the requests), scheduler.py (request states, admission,
queue; pure Python), runner.py (the model, KV caches, routing, one batched forward per step,
sampling), metrics.py (Prometheus text). The per-row routed weights are routing/deltas.py's
DeltaRuntime, the same runtime `generate` and RoutedModel use.
"""
