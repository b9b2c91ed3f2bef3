"""The old weight-swap path, kept in tools/ as a baseline for the benchmarks (bench_serve.py,
bench_deltas.py, bench_routing.py) and as an independent reference for tests; the package
never builds a decision's dense weights (streammerge/routing/deltas.py serves every decision
from the encodings).

    swap = WeightSwapModel.load("job.zarr", device="cpu", dtype="float32")
    texts = swap.generate(prompts, decisions, max_new_tokens=32)

A decision's dense weights are materialised with the public decoding functions of
streammerge/routing/encoded.py (`mediator_weight`, `onebit_weight`), rounded to the store's
dtype as `export --variant task:NAME` writes them (bit for bit), then cast to the compute dtype.
WeightSwapModel loads its own copy of the merged model and points its routed parameters at a
decision's weights (`param.data = tensor`: every other tensor stays the merged model's), keeps
`cache` decisions built (least recently used out), and generates one decision group at a time.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np


class DenseDecisions:
    """{tensor name: dense weight} of a decision, for the tensors routing changes."""

    def __init__(self, store, method: dict, device, dtype, merged: dict):
        """merged: tensor name -> the merged model's tensor (Mediator's D where the compute dtype
        holds it exactly)."""
        import torch

        from streammerge.checkpoints.blocks import num_rows
        from streammerge.routing.encoded import OneBitEncodings, SparseDelta, torch_from_raw
        from streammerge.routing.runtime import torch_dtype

        self.kind, self.tasks = method["method"], list(method["tasks"])
        self.device, self.dtype = device, dtype
        self.store_dtype = {}
        if self.kind == "mediator":
            self.dense, self.experts = {}, {}
            for job in store.jobs:
                if job["stage"] != "experts":
                    continue
                name, sd = job["name"], torch_dtype(store.dtype(job["name"]).name)
                self.store_dtype[name] = sd
                if dtype in (sd, torch.float32):
                    self.dense[name] = merged[name]  # D is the merged model's tensor: no copy
                else:
                    raw = store.read_block(name, 0, num_rows(tuple(job["shape"])))
                    self.dense[name] = torch_from_raw(raw, store.dtype(name).name).reshape(job["shape"]).to(device)
                self.experts[name] = {t: SparseDelta(store, f"{job['key']}/{t}", job, device) for t in self.tasks}
            self.names = list(self.dense)
        else:
            self.enc = OneBitEncodings(store, method, device)
            self.names = list(self.enc.names)
            self.store_dtype = self.enc.store_dtype

    def weights(self, decision) -> dict:
        from streammerge.routing.encoded import mediator_weight

        if self.kind == "mediator":
            return {n: self._round(n, mediator_weight(self.dense[n], self.experts[n], decision)) for n in self.names}
        return {n: self._onebit(n, decision) for n in self.names}

    def _onebit(self, name: str, decision):
        """Row ranges of about CHUNK_ELEMENTS bound the float32 temporaries (N task vectors, TIES)."""
        import torch

        from streammerge.routing.encoded import CHUNK_ELEMENTS, onebit_weight

        e, shape = self.enc, self.enc.shape[name]

        def rows(r):
            hat = lambda t: e.pieces[name][t].tau_hat(shape, self.device, r)  # noqa: E731
            base = e.base[name] if r is None else e.base[name][r[0] : r[1]]
            return self._round(name, onebit_weight(base, hat, e.pieces[name], decision.key, e.lam, self.device))

        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64)))) if len(shape) >= 2 else None
        if step is None or step >= shape[0]:
            return rows(None)
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        for r0 in range(0, shape[0], step):
            out[r0 : r0 + step] = rows((r0, min(shape[0], r0 + step)))
        return out

    def _round(self, name: str, w):
        """Rounded to the store's dtype (the export's tensor), then the compute dtype."""
        return w.to(self.store_dtype[name]).to(self.dtype)


class WeightSwapModel:
    """A copy of the merged model whose routed parameters are pointed at each decision's dense
    weights in turn (not thread-safe: one decision at a time in the one model)."""

    def __init__(self, store, method: dict, model, tokenizer, device, dtype, cache: int):
        from streammerge.routing.decision import STATIC

        self.store, self.method, self.model, self.tokenizer = store, method, model, tokenizer
        self.tasks = list(method["tasks"])
        self.device, self.dtype = device, dtype
        params = dict(model.named_parameters(remove_duplicate=False))
        self.dense = DenseDecisions(store, method, device, dtype, {n: p.data for n, p in params.items()})
        self.params = {n: params[n] for n in self.dense.names}
        self.static = {n: p.data for n, p in self.params.items()}
        self.cache_size = max(1, int(cache))
        self.built: OrderedDict[tuple, dict] = OrderedDict()
        self.applied = STATIC.key
        self.stats = {"build_s": 0.0, "builds": 0, "switches": 0, "generate_s": 0.0, "new_tokens": 0}

    @classmethod
    def load(cls, path, device="cpu", dtype="auto", cache: int | None = None) -> "WeightSwapModel":
        """cache: decisions kept built (default: every task's top-1 plus one)."""
        from streammerge.routing.runtime import load_merged_model, open_routing_store, resolve_device, resolve_dtype

        store, method = open_routing_store(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, store)
        model, tok = load_merged_model(store, dev, dt)
        return cls(store, method, model, tok, dev, dt, cache if cache is not None else len(method["tasks"]) + 1)

    @property
    def decision_bytes(self) -> int:
        """Bytes of one built decision's weights."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    def weights(self, decision) -> dict:
        if decision.mode == "static":
            return self.static
        w = self.built.get(decision.key)
        if w is not None:
            self.built.move_to_end(decision.key)
            return w
        t0 = time.perf_counter()
        w = self.dense.weights(decision)
        self.stats["build_s"] += time.perf_counter() - t0
        self.stats["builds"] += 1
        self.built[decision.key] = w
        for old in [k for k in self.built if k not in (decision.key, self.applied)]:  # least recently used first
            if len(self.built) <= self.cache_size:
                break
            del self.built[old]
        return w

    def apply(self, decision) -> None:
        if decision.key == self.applied:
            return
        w = self.weights(decision)
        for name, p in self.params.items():
            p.data = w[name]
        self.applied = decision.key
        self.stats["switches"] += 1

    def generate(self, prompts, decisions, max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
        """Greedy texts (EOS excluded), one decision group at a time, batches of `batch_size`."""
        import torch

        from streammerge.routing.runtime import encode_for_generation, pad_batch, pad_id

        seqs = encode_for_generation(self.tokenizer, prompts)
        pad, eos = pad_id(self.tokenizer), self.tokenizer.eos_token_id
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, d in enumerate(decisions):
            groups.setdefault(d.key, []).append(i)
        out: list[str | None] = [None] * len(prompts)
        for idx in groups.values():
            self.apply(decisions[idx[0]])
            idx = sorted(idx, key=lambda i: (len(seqs[i]), i))
            for b0 in range(0, len(idx), batch_size):
                chunk = idx[b0 : b0 + batch_size]
                ids, mask = pad_batch([seqs[i] for i in chunk], pad, "left", self.device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                              temperature=None, top_p=None, top_k=None, pad_token_id=pad)
                self.stats["generate_s"] += time.perf_counter() - t0
                for row, i in zip(gen[:, ids.shape[1] :].tolist(), chunk):
                    n = row.index(eos) if eos in row else len(row)
                    self.stats["new_tokens"] += n + (eos in row)
                    out[i] = self.tokenizer.decode(row[:n], skip_special_tokens=True)
        return out
