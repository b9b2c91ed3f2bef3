"""The model side of serving: the store's model, tokenizer and router, the running batch's KV
cache, routing, prefill, ONE batched decode forward per step, sampling.

Routing: a routed request's router features are the mean last hidden state of the static
(merged) model on its raw prompt (router.py); the requests admitted while the router was busy
are featurised together, in one forward with every row STATIC (`route`: the server runs it on its
own thread, beside the decoding steps). Its prompt is then prefilled with its decision's weights
(the static pass's KV cache is not reused: the routed layers' keys and values differ).

The batch's KV cache is one transformers DynamicCache, rows left-padded to the longest row with an
attention mask; each row's position ids count its own tokens, so a row computes what it would
alone. The requests admitted in a step are prefilled together (left-padded, one forward) and
padded into the batch cache; a request leaves by dropping its row, and columns that every
remaining row pads are trimmed. Each time the batch changes, its cache layers are allocated once
for the steps before a row must leave (the width plus the fewest tokens a row may still
generate; within the reservation the scheduler counted), and a step writes its keys and values
in place. A DynamicLayer concatenates instead, copying the whole cache every step: on CPU that
was ~10 % of a 32-token decode (tools/profile_serve.py), and it grows with the length.

Weights: the runtime (routing/deltas.py DeltaRuntime) computes row b with decision b's weights in the
same forward; `set_rows` is called with one decision per row before every forward. The batch's
rows are kept sorted by decision (a join reorders them), so each decision's rows are a
contiguous run the routed layers slice.

Sampling per request: greedy at temperature 0; else softmax(logits / temperature), nucleus
(top_p) filtered, drawn with the request's own torch.Generator (seeded: `seed` gives the same
tokens whatever else is in the batch).
"""

from __future__ import annotations

import contextlib
import inspect
import random
from dataclasses import dataclass
from typing import Sequence

from ..routing.decision import STATIC, forced, route_decision
from ..routing.runtime import encode_for_features, eos_ids, mean_hidden_features, pad_batch, pad_id, require_torch, resolve_budget
from .scheduler import Request, Sampling


@dataclass
class RowState:
    generator: object | None  # torch.Generator for sampling; None when greedy


class ModelRunner:
    def __init__(self, model, tokenizer, runtime, method: dict, device, router=None, eta: float | None = None,
                 top_m: int | None = None):
        self.torch, _ = require_torch()
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.method, self.tasks = method, list(method["tasks"])
        self.device, self.router = device, router
        self.eta = float(method.get("eta", 0.5)) if eta is None else float(eta)
        self.top_m = int(method.get("top_m", 0) or 0) if top_m is None else int(top_m)
        self.pad = pad_id(tokenizer)
        self.eos = eos_ids(self.model, self.tokenizer)
        cfg = model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the batch: rows in order, their cache, attention mask and next position
        self.rows: list[Request] = []
        self.cache = None
        self.mask = None  # (B, T) long
        self.next_pos = None  # (B,) long: each row's count of real tokens in the cache
        self.kv_budget: int | None = None  # bytes the KV cache may take (None: no limit)
        self.budget_note: str | None = None  # how an automatic memory budget was chosen
        self._stream = None  # the routing forwards' CUDA stream (_routing_stream)

    @classmethod
    def from_store(cls, path, device="auto", dtype="auto", memory_budget: int | str | None = None, eta: float | None = None,
                   top_m: int | None = None, fused: str = "auto", max_batch: int | None = None) -> "ModelRunner":
        """The runner of a store. `memory_budget` (bytes) bounds weights + row plan + decoded-term
        cache + KV cache: what the model, the encodings and the row plan of `max_batch` rows
        (the runtime's reserve for a step's per-row tensors) leave is split in halves, one for
        the runtime's cache of decoded terms, one for the KV cache (`kv_budget`). "auto": those
        plus a share of the memory still free once they are loaded (`resolve_budget`); None or
        "none": no cache and no KV limit. `fused`: the runtime's fused-product policy
        (DeltaRuntime.fused), set before the budget is split."""
        from ..routing.router import Router, router_dir
        from ..routing.runtime import load_merged_model, open_routing_store, resolve_device, resolve_dtype
        from ..routing.deltas import DeltaRuntime

        store, method = open_routing_store(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, store)
        router = Router.load(store, method["tasks"]).to(dev) if (router_dir(store) / "router.json").is_file() else None
        model, tok = load_merged_model(store, dev, dt)
        runtime = DeltaRuntime(model, store, method, dev, dt, None)
        runtime.fused = fused
        runtime.reserve_rows(max_batch or 0)
        kv_budget = None
        memory_budget, note = resolve_budget(memory_budget, runtime.fixed_bytes(), dev)
        if memory_budget is not None:
            runtime.set_memory_budget(memory_budget)  # refuses a budget the model, the encodings and the plan fill
            kv_budget = (memory_budget - runtime.fixed_bytes()) // 2
            runtime.set_memory_budget(memory_budget - kv_budget)
        runner = cls(model, tok, runtime, method, dev, router=router, eta=eta, top_m=top_m)
        runner.kv_budget = kv_budget
        runner.budget_note = note
        return runner

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token over all layers."""
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * heads * head_dim * elem

    # ---- routing --------------------------------------------------------------------------------
    def decide(self, reqs: Sequence[Request]) -> None:
        """Set each request's decision: forced, static, or routed (`route`, for the routed ones
        not routed yet)."""
        for r in reqs:
            if r.target[0] == "static":
                r.decision = STATIC
            elif r.target[0] == "task":
                r.decision = forced(r.target[1], self.tasks)
        self.route([r for r in reqs if r.target[0] == "routed" and r.decision is None])

    def route(self, reqs: Sequence[Request]) -> None:
        """Route requests: one STATIC forward over their raw prompts (the router's features),
        then the router. Thread-safe against the decoding steps: the server runs it on its
        router thread while the engine decodes (the runtime's rows are per thread; on CUDA it
        runs on its own stream, so its kernels need not wait behind a step's)."""
        if not reqs:
            return
        torch = self.torch
        seqs = encode_for_features(self.tokenizer, [r.features_text for r in reqs], self.router.meta.get("max_tokens"))
        stream = self._routing_stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self.runtime.set_rows([STATIC] * len(seqs))
            feats = mean_hidden_features(self.model, seqs, self.pad, batch_size=len(seqs))
            probs = self.router.probs(feats)  # on the host: the stream's work is done
        for r, p in zip(reqs, probs):
            r.decision = route_decision(p, self.tasks, self.method["method"], self.eta, self.top_m,
                                        background=self.router.background)

    def _routing_stream(self):
        """The CUDA stream of the routing forwards (None on CPU), one per runner."""
        torch = self.torch
        if torch.device(self.device).type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    # ---- the batch ------------------------------------------------------------------------------
    def prefill(self, reqs: Sequence[Request]) -> list[int]:
        """Run the prompts, each with its request's weights, in one forward (left-padded, each
        row's positions its own), and join the batch; returns each request's first token."""
        torch = self.torch
        from transformers import DynamicCache

        # sorted by decision, as the batch is (_join): each decision's rows one slice of the prefill
        order = sorted(range(len(reqs)), key=lambda i: reqs[i].decision.key)
        asked, reqs = reqs, [reqs[i] for i in order]
        for r in reqs:
            r.runner_state = RowState(self._generator(r.sampling))
        ids, mask = pad_batch([r.prompt_ids for r in reqs], self.pad, "left", self.device)
        self.runtime.set_rows([r.decision for r in reqs])
        cache = DynamicCache()
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        tokens = dict(zip(map(id, reqs), self._sample(out.logits[:, -1, :], reqs)))
        self._join(reqs, [(layer.keys, layer.values) for layer in cache.layers], mask)
        return [tokens[id(r)] for r in asked]

    def decode(self, last_tokens: Sequence[int]) -> list[int]:
        """One token for every row (in self.rows order), in one forward."""
        torch = self.torch
        ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device).unsqueeze(1)
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        self.runtime.set_rows([r.decision for r in self.rows])
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=self.next_pos.unsqueeze(1),
                             use_cache=True, **{self._cache_kw: self.cache})
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return self._sample(out.logits[:, -1, :], self.rows)

    def _join(self, reqs: Sequence[Request], layers: list, mask) -> None:
        """Add rows (their cache layers and (n, L) mask) to the batch, left-padding the narrower."""
        torch = self.torch
        next_pos = mask.sum(dim=1)
        if self.rows:
            width = max(self.mask.shape[1], mask.shape[1])
            layers = [(torch.cat([_left_pad(k0, width), _left_pad(k1, width)]), torch.cat([_left_pad(v0, width), _left_pad(v1, width)]))
                      for (k0, v0), (k1, v1) in zip(((la.keys, la.values) for la in self.cache.layers), layers)]
            mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
            next_pos = torch.cat([self.next_pos, next_pos])
        rows = [*self.rows, *reqs]
        # rows sorted by decision: each decision's rows are one contiguous run, which the
        # runtime's routed layers slice instead of gathering and scattering (stable: the rows
        # of a decision keep their order)
        order = sorted(range(len(rows)), key=lambda i: rows[i].decision.key)
        if order != list(range(len(rows))):
            idx = torch.tensor(order, dtype=torch.long, device=self.device)
            layers = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in layers]
            mask, next_pos = mask.index_select(0, idx), next_pos.index_select(0, idx)
            rows = [rows[i] for i in order]
        self.rows = rows
        self.mask, self.next_pos = mask, next_pos
        self.cache = self._cache_of(layers, self._steps_left())

    def remove(self, reqs: Sequence[Request]) -> None:
        """Drop the requests' rows (those not in the batch are ignored) and trim the padding."""
        gone = {id(r) for r in reqs}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_pos = [], None, None, None
            return
        torch = self.torch
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(dim=0) > 0).nonzero()[0])  # leading columns every kept row pads
        self.mask = mask[:, start:]
        self.next_pos = self.next_pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        layers = [(layer.keys.index_select(0, idx)[..., start:, :], layer.values.index_select(0, idx)[..., start:, :])
                  for layer in self.cache.layers]
        self.cache = self._cache_of(layers, self._steps_left())

    def _steps_left(self) -> int:
        """Decoding steps before the batch's rows change for sure: the fewest tokens a row may
        still generate (then it leaves, and `remove` builds the cache again). The width after
        them stays within the longest row's reservation, prompt plus max_tokens, which the
        scheduler counted for every row."""
        return min(r.sampling.max_tokens - r.generated for r in self.rows)

    @staticmethod
    def _cache_of(layers, steps: int):
        """A cache holding `layers` (each (keys, values)) with room for `steps` more tokens."""
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = [preallocated_layer(k, v, k.shape[-2] + max(0, steps)) for k, v in layers]
        return cache

    # ---- sampling -------------------------------------------------------------------------------
    def _generator(self, s: Sampling):
        if s.temperature <= 0:
            return None
        g = self.torch.Generator(device=self.device)
        g.manual_seed(s.seed if s.seed is not None else random.SystemRandom().randrange(2**63))
        return g

    def _sample(self, logits, reqs: Sequence[Request]) -> list[int]:
        torch = self.torch
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            s = r.sampling
            if s.temperature <= 0:
                out.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always)
                drop = (sorted_p.cumsum(0) - sorted_p) >= s.top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out.append(int(torch.multinomial(probs, 1, generator=r.runner_state.generator)))
        return out

    def resident_bytes(self) -> dict:
        out = dict(self.runtime.resident_bytes())
        cache = self.cache  # read from the API's thread while the engine's replaces it
        out["kv_cache"] = sum(layer.allocated_bytes() for layer in cache.layers) if cache else 0
        return out


_LAYER_CLASS = None


def preallocated_layer(keys, values, capacity: int):
    """A transformers cache layer holding `keys` and `values` ((B, H, T, D)) in buffers of
    `capacity` positions: `update` writes the new positions in place and returns views of the
    filled part (a DynamicLayer concatenates, copying the cache). Past the capacity it doubles."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        from transformers.cache_utils import DynamicLayer

        class PreallocatedLayer(DynamicLayer):
            def fill(self, keys, values, capacity: int):
                self.lazy_initialization(keys, values)
                self._length = 0
                self._k = keys.new_empty((*keys.shape[:-2], max(capacity, keys.shape[-2]), keys.shape[-1]))
                self._v = values.new_empty((*values.shape[:-2], self._k.shape[-2], values.shape[-1]))
                return self.update(keys, values)

            def update(self, key_states, value_states, *args, **kwargs):
                n, t = self._length, key_states.shape[-2]
                if n + t > self._k.shape[-2]:  # not reserved (the runner sizes it): grow, amortised
                    cap = max(n + t, 2 * self._k.shape[-2])
                    k, v = self._k, self._v
                    self._k = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
                    self._v = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
                    self._k[..., :n, :], self._v[..., :n, :] = k[..., :n, :], v[..., :n, :]
                self._k[..., n : n + t, :] = key_states
                self._v[..., n : n + t, :] = value_states
                self._length = n + t
                self.keys, self.values = self._k[..., : n + t, :], self._v[..., : n + t, :]
                return self.keys, self.values

            def allocated_bytes(self) -> int:
                return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

        _LAYER_CLASS = PreallocatedLayer
    layer = _LAYER_CLASS()
    layer.fill(keys, values, capacity)
    return layer


def _left_pad(t, width: int):
    """Pad dim -2 (the sequence of a (B, H, T, D) cache) or the last dim (a (B, T) mask) on the
    left with zeros up to `width`."""
    torch = require_torch()[0]
    dim = -2 if t.dim() == 4 else -1
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

