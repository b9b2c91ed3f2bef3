"""Inference for routing stores (Mediator, 1bit-Merging): a task router and a routed model.

    streammerge router fit job.zarr --prompts math=math.jsonl --prompts code=code.jsonl
    streammerge generate job.zarr --prompt "What is 17*23?" --show-routing

    from streammerge.routing import RoutedModel
    RoutedModel.from_store("job.zarr", device="cuda").generate(prompts)

Needs torch and transformers (not dependencies of the merge engine). Modules: decision.py
(probabilities -> decision), router.py (features, classifier, fit/save/load), encoded.py
(the store's encodings decoded into torch), deltas.py (DeltaRuntime: each batch row computed
with its own decision in one forward, from the encodings; `streammerge serve` runs it too) with
modules.py (the routed modules' forwards), terms.py (each method's routed tensors and their
delta products) and compact.py (a sparse delta resident compressed), model.py (RoutedModel on that runtime), runtime.py (devices, dtypes, the cached merged export,
prompt encoding), prompts.py (JSONL).
"""

from .decision import STATIC, Decision, forced, normalized_entropy, route_decision

__all__ = ["STATIC", "Decision", "RoutedModel", "Router", "fit_router", "forced", "normalized_entropy", "route_decision"]


def __getattr__(name):  # torch is imported only when a model or router is used
    if name == "RoutedModel":
        from .model import RoutedModel

        return RoutedModel
    if name == "Router":
        from .router import Router

        return Router
    if name == "fit_router":
        from .router import fit_router

        return fit_router
    raise AttributeError(name)
