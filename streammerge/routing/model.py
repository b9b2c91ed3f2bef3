"""A routed model: one transformers model whose routed tensors are swapped per prompt.

    rm = RoutedModel.from_store("job.zarr", device="cuda")
    answers = rm.generate(["What is 17*23?", "Write a haiku"])

The merged model of the store (`inference/merged/`, exported once) is loaded with
`AutoModelForCausalLM`; its tensors that routing changes (weights.py) are kept aside as the
"static" state. For each prompt the router (router.py) gives task probabilities, decision.py
turns them into a decision, and the decision's tensors are built on the device (weights.py),
kept in an LRU cache of a few decisions, and applied by pointing the model's parameters at
them (`param.data = tensor`: no copy, every other tensor stays shared). A batch of prompts is
grouped by decision, so each group costs one switch.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import StreammergeError
from .decision import STATIC, Decision, forced, route_decision
from .runtime import (
    encode_for_features,
    encode_for_generation,
    load_merged_model,
    mean_hidden_features,
    open_routing_store,
    pad_batch,
    pad_id,
    require_torch,
    resolve_device,
    resolve_dtype,
)
from .weights import make_builder


@dataclass
class Generation:
    prompt: str
    text: str
    decision: Decision
    new_tokens: int

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "output": self.text, "routing": self.decision.as_dict(), "new_tokens": self.new_tokens}


@dataclass
class Timings:
    route_s: float = 0.0  # router features + classifier
    build_s: float = 0.0  # building decisions' weights (cache misses)
    switch_s: float = 0.0  # applying weights (pointer swaps), builds excluded
    generate_s: float = 0.0
    new_tokens: int = 0
    groups: int = 0
    builds: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


class RoutedModel:
    """The merged model of a routing store plus what it takes to route it (not thread-safe:
    one generate at a time, since the weights are swapped in the one model)."""

    def __init__(self, store, method: dict, model, tokenizer, device, dtype, router=None, cache_size: int | str = "auto",
                 eta: float | None = None, top_m: int | None = None, max_tokens: int | None = None):
        torch, _ = require_torch()
        self.store, self.method = store, method
        self.tasks = list(method["tasks"])
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.router = router
        self.eta = float(method.get("eta", 0.5)) if eta is None else float(eta)
        self.top_m = int(method.get("top_m", 0) or 0) if top_m is None else int(top_m)
        self.max_tokens = router.meta.get("max_tokens") if (router is not None and max_tokens is None) else max_tokens
        params = dict(model.named_parameters(remove_duplicate=False))
        self.builder = make_builder(store, method, device, dtype, merged=lambda n: self._param(params, n).data)
        self._params = {n: self._param(params, n) for n in self.builder.names}
        self._static = {n: p.data for n, p in self._params.items()}
        self.decision_bytes = sum(p.numel() * p.element_size() for p in self._params.values())
        self.cache_size = self._auto_cache_size() if cache_size == "auto" else max(1, int(cache_size))
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._applied: tuple = STATIC.key
        self.timings = Timings()

    def _auto_cache_size(self) -> int:
        """Every top-1 decision plus one weighted one, as far as half the free memory allows."""
        torch, _ = require_torch()
        free = None
        try:
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            elif self.device.type == "cpu":
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, RuntimeError, AttributeError):
            free = None
        want = len(self.tasks) + 1
        if not free or not self.decision_bytes:
            return want
        return max(1, min(want, int(0.5 * free // self.decision_bytes)))

    @staticmethod
    def _param(params: dict, name: str):
        p = params.get(name)
        if p is None:
            raise StreammergeError(
                f"tensor {name} of the store is not a parameter of the loaded model "
                "(routing needs the checkpoint's tensor names as the model's parameter names)"
            )
        return p

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_store(cls, path, device="auto", dtype="auto", *, router: bool | str = "auto", cache_size: int | str = "auto",
                   eta: float | None = None, top_m: int | None = None) -> "RoutedModel":
        """Load a built mediator / 1bit store. router: True (required), False (none: pass a task
        or static=True to generate), "auto" (load it when one was fitted). cache_size: decisions
        whose tensors stay built ("auto": every top-1 decision plus one, within half the free
        memory of the device)."""
        from .router import Router, router_dir

        store, method = open_routing_store(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, store)
        r = None
        if router is True or (router == "auto" and (router_dir(store) / "router.json").is_file()):
            r = Router.load(store, method["tasks"]).to(dev)
        model, tok = load_merged_model(store, dev, dt)
        return cls(store, method, model, tok, dev, dt, router=r, cache_size=cache_size, eta=eta, top_m=top_m)

    # ---- routing --------------------------------------------------------------------------------
    def features(self, prompts: Sequence[str], batch_size: int = 16):
        """Router features of the prompts, computed with the merged (static) weights."""
        self.apply(STATIC)
        seqs = encode_for_features(self.tokenizer, prompts, self.max_tokens)
        return mean_hidden_features(self.model, seqs, pad_id(self.tokenizer), batch_size)

    def probabilities(self, prompts: Sequence[str]):
        if self.router is None:
            raise StreammergeError(
                f"{self.store.path}: no router fitted; run `streammerge router fit {self.store.path} --prompts TASK=FILE ...` "
                "or give a task (--task NAME) or --static"
            )
        return self.router.probs(self.features(prompts))

    def decide(self, probs: Sequence[float], eta: float | None = None, top_m: int | None = None) -> Decision:
        return route_decision(
            probs, self.tasks, self.method["method"], self.eta if eta is None else eta, self.top_m if top_m is None else top_m,
            background=self.router is not None and self.router.background,
        )

    def route(self, prompts: Sequence[str], eta: float | None = None, top_m: int | None = None) -> list[Decision]:
        t0 = time.perf_counter()
        probs = self.probabilities(list(prompts))
        out = [self.decide(p, eta, top_m) for p in probs]
        self.timings.route_s += time.perf_counter() - t0
        return out

    # ---- weights --------------------------------------------------------------------------------
    def weights(self, decision: Decision) -> dict:
        """The decision's tensors (built on the device, LRU-cached)."""
        if decision.mode == "static":
            return self._static
        key = decision.key
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
            return w
        t0 = time.perf_counter()
        w = self.builder.build(decision)
        if self.device.type == "cuda":
            require_torch()[0].cuda.synchronize(self.device)
        self.timings.build_s += time.perf_counter() - t0
        self.timings.builds += 1
        self._cache[key] = w
        for old in list(self._cache):  # least recently used first; never what the model points at
            if len(self._cache) <= self.cache_size:
                break
            if old not in (key, self._applied):
                del self._cache[old]
        return w

    def apply(self, decision: Decision | str | None) -> Decision:
        """Point the model at the decision's weights (None or STATIC: the merged model; a task
        name: that task's top-1 weights). Returns the decision applied."""
        if decision is None:
            decision = STATIC
        elif isinstance(decision, str):
            decision = forced(decision, self.tasks)
        if decision.key == self._applied:
            return decision
        w = self.weights(decision)
        t0 = time.perf_counter()
        for name, p in self._params.items():
            p.data = w[name]
        self._applied = decision.key
        self.timings.switch_s += time.perf_counter() - t0
        return decision

    @property
    def applied(self) -> tuple:
        return self._applied

    # ---- generation -----------------------------------------------------------------------------
    def logits(self, prompt: str, decision: Decision | str | None = None):
        """Next-token logits over the generation input of one prompt, with `decision` applied
        (default: route it)."""
        torch, _ = require_torch()
        if decision is None:
            decision = self.route([prompt])[0]
        self.apply(decision)
        ids = encode_for_generation(self.tokenizer, [prompt])[0]
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        task: str | None = None,
        static: bool = False,
        decisions: Sequence[Decision] | None = None,
        eta: float | None = None,
        top_m: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        details: bool = False,
    ):
        """Generate for each prompt with its routed weights (greedy unless temperature > 0).

        Returns the texts (a str for a str), or Generation records with details=True. task
        forces one task for all prompts; static=True uses the merged model; `decisions` gives
        them explicitly (one per prompt).
        """
        torch, _ = require_torch()
        single = isinstance(prompts, str)
        plist = [prompts] if single else list(prompts)
        if not plist:
            return []
        if decisions is not None:
            decs = list(decisions)
            if len(decs) != len(plist):
                raise ValueError(f"{len(decs)} decisions for {len(plist)} prompts")
        elif static:
            decs = [STATIC] * len(plist)
        elif task is not None:
            decs = [forced(task, self.tasks)] * len(plist)
        else:
            decs = self.route(plist, eta, top_m)
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, d in enumerate(decs):
            groups.setdefault(d.key, []).append(i)
        if self._applied in groups:  # start with what is applied: one switch less
            groups.move_to_end(self._applied, last=False)
        seqs = encode_for_generation(self.tokenizer, plist)
        pad = pad_id(self.tokenizer)
        eos = self._eos_ids()
        texts: list[str | None] = [None] * len(plist)
        counts = [0] * len(plist)
        gen_kwargs = {"max_new_tokens": int(max_new_tokens), "pad_token_id": pad}
        if min_new_tokens:
            gen_kwargs["min_new_tokens"] = int(min_new_tokens)
        if temperature and temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
            if seed is not None:
                torch.manual_seed(seed)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        for key, idx in groups.items():
            self.apply(decs[idx[0]])
            self.timings.groups += 1
            idx = sorted(idx, key=lambda i: (len(seqs[i]), i))
            for b0 in range(0, len(idx), max(1, batch_size)):
                chunk = idx[b0 : b0 + batch_size]
                ids, mask = pad_batch([seqs[i] for i in chunk], pad, "left", self.device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings.generate_s += time.perf_counter() - t0
                new = out[:, ids.shape[1] :].cpu()
                for row, i in zip(new.tolist(), chunk):
                    n = len(row)
                    for j, t in enumerate(row):
                        if t in eos:
                            n = j + 1
                            break
                    counts[i] = n
                    self.timings.new_tokens += n
                    texts[i] = self.tokenizer.decode(row[:n], skip_special_tokens=True)
        if not details:
            return texts[0] if single else texts
        res = [Generation(p, t, d, c) for p, t, d, c in zip(plist, texts, decs, counts)]
        return res[0] if single else res

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            v = getattr(src, "eos_token_id", None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids

    def reset_timings(self) -> None:
        self.timings = Timings()

    def describe(self, decision: Decision) -> str:
        return decision.describe(self.method)
