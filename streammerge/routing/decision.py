"""Routing decisions: from the router's task probabilities to the weights a prompt runs with
(docs/methods.md sections 3.5 and 4.4).

1bit-Merging: always top-1: task k = argmax p (ties: the first task), weights
    theta_0 + tau_hat_k + lambda * TIES({tau_hat_j : j != k}).
Mediator: normalised entropy H = -sum p log p / log N (0 for N = 1; 0 log 0 = 0).
    H <= eta: top-1, theta = D + S_k on the routed layers;
    H >  eta: theta = D + sum_{t in top-m} p~_t S_t, p renormalised over the m most probable
              tasks (top_m = 0: all; ties by task order), applied in task order.

A router fitted with background prompts (`router fit --background`) has one more class, "none
of the tasks" (NONE, last), whose expert is the merged model itself: no task's weights, S = 0
for Mediator. Its probability counts like a task's: in H (over N + 1 classes), in the top-m and
in the renormalisation, so a prompt that looks like no task's gets a mix that leans towards the
merged model, and one confidently of no task gets the merged model (STATIC). This is outlier
exposure (Hendrycks et al., 2019) for the router: trained on task prompts only, a classifier
extrapolates with confidence to prompts unlike all of them; trained with examples of "none",
it learns where the tasks end.

A decision is hashable by `key` (what the weight cache and the grouping of a batch use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import StreammergeError


@dataclass(frozen=True)
class Decision:
    mode: str  # "top1" | "mix" | "static" (the merged model) | "forced" (a task given by the user)
    weights: tuple[tuple[str, float], ...] = ()  # (task, weight) in task order; top1/forced: ((k, 1.0),)
    probs: tuple[tuple[str, float], ...] | None = field(default=None, compare=False)
    entropy: float | None = field(default=None, compare=False)
    eta: float | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple:
        if self.mode in ("top1", "forced"):
            return ("task", self.weights[0][0])
        if self.mode == "static":
            return ("static",)
        return ("mix", self.weights)

    @property
    def task(self) -> str | None:
        """The task whose weights are applied (top-1 or forced), else None."""
        return self.weights[0][0] if self.mode in ("top1", "forced") else None

    def describe(self, method: dict | None = None) -> str:
        """One line: probabilities, entropy and what was applied."""
        parts = []
        if self.probs is not None:
            parts.append("p: " + " ".join(f"{t} {p:.3f}" for t, p in self.probs))
        if self.entropy is not None:
            rel = "<=" if self.eta is None or self.entropy <= self.eta else ">"
            parts.append(f"entropy {self.entropy:.3f}" + (f" {rel} eta {self.eta:g}" if self.eta is not None else ""))
        parts.append("-> " + self.applied(method))
        return " | ".join(parts)

    def applied(self, method: dict | None = None) -> str:
        m = (method or {}).get("method")
        if self.mode == "static":
            return "merged model (static)" + (": none of the tasks" if self.probs is not None else "")
        if self.mode == "mix":
            mix = " + ".join(f"{w:.3f}*S_{t}" for t, w in self.weights)
            where = f" on {_routed_where(method)}" if m == "mediator" else ""
            return f"weighted experts D + {mix}{where}"
        k = self.task
        prefix = "forced " if self.mode == "forced" else "top-1 "
        if m == "mediator":
            return f"{prefix}{k}: D + S_{k} on {_routed_where(method)}"
        if m == "1bit":
            others = ", ".join(t for t in method["tasks"] if t != k)
            return f"{prefix}{k}: theta_0 + tau_{k} + {method['lambda']:g}*TIES({others})"
        return f"{prefix}{k}"

    def as_dict(self) -> dict:
        d = {"mode": self.mode, "task": self.task, "weights": dict(self.weights)}
        if self.probs is not None:
            d["probs"] = dict(self.probs)
        if self.entropy is not None:
            d["entropy"] = self.entropy
        if self.eta is not None:
            d["eta"] = self.eta
        return d


STATIC = Decision("static")


def _routed_where(method: dict) -> str:
    """Where Mediator's experts apply: its routed layers, and the tensors outside them if routed
    (stores built before route_outside have no such key: not routed)."""
    where = f"{len(method['routed_layers'])} routed layer(s)"
    for stack, routed in (method.get("stacks") or {}).items():  # a vision tower's own layers
        where += f" + {len(routed.get('routed_layers') or [])} {stack} layer(s)"
    return where + (" + embeddings/lm_head/norm" if method.get("route_outside") else "")


def forced(task: str, tasks: Sequence[str]) -> Decision:
    if task not in tasks:
        raise StreammergeError(f"no task {task!r} (tasks: {', '.join(tasks)})")
    return Decision("forced", ((task, 1.0),))


def normalized_entropy(probs: Sequence[float]) -> float:
    n = len(probs)
    if n <= 1:
        return 0.0
    h = -sum(p * math.log(p) for p in probs if p > 0)
    return max(0.0, h / math.log(n))


NONE = "(none)"  # the background class: the prompt is of none of the tasks


def route_decision(
    probs: Sequence[float], tasks: Sequence[str], method: str, eta: float = 0.5, top_m: int = 0, background: bool = False
) -> Decision:
    """The decision for one prompt's probabilities (see the module docstring): one per task, in
    task order, then with `background` the probability of none of them."""
    p = [float(x) for x in probs]
    classes = [*tasks, NONE] if background else list(tasks)
    if len(p) != len(classes):
        raise ValueError(f"{len(p)} probabilities for {len(tasks)} tasks" + (" and the background class" if background else ""))
    if not p or any(not math.isfinite(x) or x < 0 for x in p):
        raise ValueError(f"probabilities must be finite and >= 0, got {p}")
    s = sum(p)
    if s <= 0:
        raise ValueError("probabilities sum to 0")
    p = [x / s for x in p]
    named = tuple(zip(classes, p))
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    k = classes[order[0]]

    def top1(**kw) -> Decision:
        if k == NONE:
            return Decision("static", probs=named, **kw)
        return Decision("top1", ((k, 1.0),), probs=named, **kw)

    if method == "1bit":
        return top1()
    if method != "mediator":
        raise ValueError(f"unknown routing method {method!r}")
    h = normalized_entropy(p)
    if h <= eta:
        return top1(entropy=h, eta=eta)
    m = len(p) if not top_m or top_m >= len(p) else int(top_m)
    chosen = sorted(order[:m])
    total = sum(p[i] for i in chosen)
    weights = tuple((classes[i], p[i] / total) for i in chosen if classes[i] != NONE)  # NONE's expert: S = 0
    if len(chosen) == 1:
        return top1(entropy=h, eta=eta)
    return Decision("mix", weights, probs=named, entropy=h, eta=eta)
