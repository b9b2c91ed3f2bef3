"""Aggregate per-tensor conflict statistics (conflict.py) into a per-layer / per-module summary.

Groups of parameters P (a layer, a module kind in a layer, a kind over the whole model, the
tensors outside the layers) get, from the per-tensor stats summed over the group's tensors:

    n         |P|, the number of parameters
    d         elected-sign conflict rate (docs/methods.md section 2):
              d = (1 / (N |P|)) * sum_t sum_p 1[tau_t,p != 0 and sign(tau_t,p) != s_p]
              = sum_t elected_conflict[t] / (N * n).  Denoised variant: the same with
              elected_conflict_denoised (conflicts among the counted entries, see conflict.py),
              still divided by N * |P|: roughly at most q.
    pairwise  mean over the task pairs t < u of the fraction of conflicting entries:
              elected variant:  pair_conflict[t, u] / |P|;
              denoised variant: pair_conflict_denoised[t, u] / pair_overlap_denoised[t, u], the
              fraction among the entries counted for both t and u (0 when there are none).
              Each fraction is a ratio of sums over the group's tensors (not a mean of per-tensor
              fractions). With one task there are no pairs and pairwise is 0.

Norms and cosines (always from all entries, whatever the variant): ||tau_t||_2 = sqrt(sum
sq_norm), cosine[t][u] = sum dot[t, u] / (||tau_t|| ||tau_u||), 0 where a norm is 0 (so the
diagonal is 1 unless the task vector is zero there).

Shares: norm_share[task][kind] = the share of sum_p tau_t,p^2 (whole model) lying in tensors of
that kind: all five kinds are listed and they sum to 1 (all 0 for a zero task vector).
attention_vs_mlp[task] = the same restricted to attention + MLP tensors (sums to 1, or 0 and 0).

Layers: a tensor belongs to layer i when its name has a component "layers.<i>." (also the
"h.<i>." of GPT-2, "layer.<i>." of BERT, "blocks.<i>."); tensors without one (embeddings, final
norm, lm_head) and those with i >= num_layers (e.g. DeepSeek's multi-token-prediction layers past
num_hidden_layers) form "outside_layers". A layer with no tensors reports n = 0 and zeros.

Stacks: layer i is layer i of the tensor's stack (checkpoints/stacks.py). "layers" holds the
text decoder's (a text-only model's only stack); each other stack given in `stack_layers` (a
vision tower) has its own rows under "stacks": {name: {"num_layers", "layers"}}, so its layers
are never summed into the decoder's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..checkpoints.stacks import layer_index, stack_of

KINDS = ("attention", "mlp", "norm", "embedding", "other")


def module_kind(name: str) -> str:
    """The module kind of a tensor name: "attention", "mlp", "norm", "embedding" or "other".

    Checked on the dotted components, in this order (so "post_attention_layernorm" is a norm and
    "self_attn.q_norm" too):
      norm       a component containing "norm" (layernorm, rmsnorm, input_layernorm, norm, ...)
                 or named ln / ln_* (GPT-2's ln_1, ln_f)
      embedding  a component containing "embed" (embed_tokens, word_embeddings, embed_in/out)
                 or named lm_head, wte, wpe
      attention  a component containing "attn" or "attention" (self_attn, attention, attn)
      mlp        a component containing "mlp", "feed_forward", "feedforward", "ffn" or "moe", or
                 named experts
      other      anything else
    """
    comps = name.lower().split(".")
    if any("norm" in c or c == "ln" or c.startswith("ln_") for c in comps):
        return "norm"
    if any("embed" in c or c in ("lm_head", "wte", "wpe") for c in comps):
        return "embedding"
    if any("attn" in c or "attention" in c for c in comps):
        return "attention"
    if any("mlp" in c or "feed_forward" in c or "feedforward" in c or "ffn" in c or "moe" in c or c == "experts" for c in comps):
        return "mlp"
    return "other"


class _Group:
    """Sums of the per-tensor stats over a group of tensors."""

    def __init__(self, N: int):
        self.N = N
        self.n = 0
        self.conflict = 0  # sum_t elected conflicts
        self.pair = np.zeros((N, N), np.int64)
        self.pair_den = np.zeros((N, N), np.int64)  # denoised: overlap; else unused (n)
        self.sq = np.zeros(N, np.float64)
        self.dot = np.zeros((N, N), np.float64)

    def add(self, st: "_Tensor") -> None:
        self.n += st.n
        self.conflict += st.conflict
        self.pair += st.pair
        if st.pair_den is not None:
            self.pair_den += st.pair_den
        self.sq += st.sq
        self.dot += st.dot

    def d(self) -> float:
        return self.conflict / (self.N * self.n) if self.n else 0.0

    def pairwise(self, denoised: bool) -> float:
        N = self.N
        if N < 2 or self.n == 0:
            return 0.0
        fr = []
        for t in range(N):
            for u in range(t + 1, N):
                den = int(self.pair_den[t, u]) if denoised else self.n
                fr.append(int(self.pair[t, u]) / den if den else 0.0)
        return float(sum(fr) / len(fr))

    def counts(self, denoised: bool) -> dict:
        return {"n": int(self.n), "d": float(self.d()), "pairwise": self.pairwise(denoised)}

    def norms(self) -> np.ndarray:
        return np.sqrt(self.sq)

    def cosine(self) -> list[list[float]]:
        nr = self.norms()
        out = []
        for t in range(self.N):
            row = []
            for u in range(self.N):
                den = nr[t] * nr[u]
                row.append(float(self.dot[t, u] / den) if den > 0 else 0.0)
            out.append(row)
        return out


class _Stack:
    """The per-layer groups of one stack of layers."""

    def __init__(self, N: int, num_layers: int):
        self.N = N
        self.num_layers = int(num_layers)
        self.layers = [_Group(N) for _ in range(self.num_layers)]
        self.kinds: list[dict[str, _Group]] = [{} for _ in range(self.num_layers)]

    def add(self, i: int | None, kind: str, st: "_Tensor") -> bool:
        """Add a tensor of layer i (False: outside this stack's layers)."""
        if i is None or not 0 <= i < self.num_layers:
            return False
        self.layers[i].add(st)
        self.kinds[i].setdefault(kind, _Group(self.N)).add(st)
        return True

    def rows(self, denoised: bool, task_map) -> list[dict]:
        return [
            {
                "layer": i,
                **g.counts(denoised),
                "by_kind": {k: self.kinds[i][k].counts(denoised) for k in KINDS if k in self.kinds[i]},
                "norms": task_map(g.norms()),
                "cosine": g.cosine(),
            }
            for i, g in enumerate(self.layers)
        ]


class _Tensor:
    def __init__(self, name: str, stats: Mapping[str, Any], N: int, denoised: bool):
        def arr(key, shape, dtype):
            if key not in stats:
                raise ValueError(
                    f"{name}: stats have no {key!r}"
                    + (" (denoised summary of stats computed without denoise_q < 1)" if "denoised" in key else "")
                )
            a = np.asarray(stats[key], dtype=dtype)
            if a.shape != shape:
                raise ValueError(f"{name}: {key} has shape {a.shape}, expected {shape} for {N} tasks")
            return a

        sfx = "_denoised" if denoised else ""
        self.n = int(np.asarray(stats["n"]))
        self.conflict = int(arr("elected_conflict" + sfx, (N,), np.int64).sum())
        self.pair = arr("pair_conflict" + sfx, (N, N), np.int64)
        self.pair_den = arr("pair_overlap_denoised", (N, N), np.int64) if denoised else None
        self.sq = arr("sq_norm", (N,), np.float64)
        self.dot = arr("dot", (N, N), np.float64)


def summarize(
    per_tensor: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    num_layers: int,
    denoised: bool,
    stack_layers: Mapping[str, int] | None = None,
) -> dict:
    """The JSON-serializable summary of the per-tensor conflict stats (module docstring).

    per_tensor: tensor name -> the stats of conflict_method (as returned, or reloaded from npz);
    tasks: the N task names, in the order of the stats; denoised: use the denoised counts;
    num_layers: the text decoder's layer count; stack_layers: the other stacks' (vision tower).
    """
    tasks = [str(t) for t in tasks]
    N = len(tasks)
    if N < 1:
        raise ValueError("summarize: no tasks")
    stacks = {None: _Stack(N, num_layers), **{s: _Stack(N, n) for s, n in (stack_layers or {}).items()}}
    kinds: dict[str, _Group] = {}
    outside = _Group(N)
    total = _Group(N)
    for name in sorted(per_tensor):
        st = _Tensor(name, per_tensor[name], N, denoised)
        kind = module_kind(name)
        total.add(st)
        kinds.setdefault(kind, _Group(N)).add(st)
        stack = stacks.get(stack_of(name), stacks[None])
        if not stack.add(layer_index(name), kind, st):
            outside.add(st)

    def task_map(values) -> dict:
        return {t: float(v) for t, v in zip(tasks, values)}

    norm_share = {}
    att_mlp = {}
    for t, task in enumerate(tasks):
        sq = {k: float(kinds[k].sq[t]) if k in kinds else 0.0 for k in KINDS}
        tot = math.fsum(sq.values())
        norm_share[task] = {k: (v / tot if tot > 0 else 0.0) for k, v in sq.items()}
        am = sq["attention"] + sq["mlp"]
        att_mlp[task] = {
            "attention": sq["attention"] / am if am > 0 else 0.0,
            "mlp": sq["mlp"] / am if am > 0 else 0.0,
        }

    return {
        "tasks": tasks,
        "variant": "denoised" if denoised else "elected",
        "num_layers": stacks[None].num_layers,
        "layers": stacks[None].rows(denoised, task_map),
        "stacks": {
            s: {"num_layers": stack.num_layers, "layers": stack.rows(denoised, task_map)}
            for s, stack in stacks.items()
            if s is not None
        },
        "kinds": {k: kinds[k].counts(denoised) for k in KINDS if k in kinds},
        "outside_layers": outside.counts(denoised),
        "norm_share": norm_share,
        "attention_vs_mlp": att_mlp,
        "cosine": total.cosine(),
        "norms": task_map(total.norms()),
    }
