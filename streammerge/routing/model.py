"""A routed model: one transformers model whose forward computes each batch row with its own
routing decision (the runtime of deltas.py, the same one `streammerge serve` runs).

    rm = RoutedModel.from_store("job.zarr", device="cuda")
    answers = rm.generate(["What is 17*23?", "Write a haiku"])

The merged model of the store (`inference/merged/`, exported once) is loaded with
`AutoModelForCausalLM` and wrapped by a DeltaRuntime: the modules holding routed tensors
compute the shared weight's product once per batch plus each row's own delta product from the
encodings. For each prompt the router (router.py) gives task probabilities and decision.py
turns them into a decision; prompts with different decisions are batched and decoded together
(one `generate` per batch of `batch_size` prompts, whatever their decisions). No decision's
dense weights are ever built; `memory_budget` lets the runtime cache decoded terms (deltas.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import StreammergeError
from .decision import STATIC, Decision, forced, route_decision
from .runtime import (
    encode_for_features,
    encode_for_generation,
    eos_ids,
    load_merged_model,
    mean_hidden_features,
    open_routing_store,
    pad_batch,
    pad_id,
    require_torch,
    resolve_device,
    resolve_budget,
    resolve_dtype,
)


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
    generate_s: float = 0.0
    new_tokens: int = 0
    batches: int = 0  # generate calls (each may mix decisions)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


class RoutedModel:
    """The merged model of a routing store, its router and the delta runtime (one call at a
    time: the runtime holds the rows' decisions of the forward in progress)."""

    def __init__(self, store, method: dict, model, tokenizer, device, dtype, router=None, memory_budget: int | str | None = None,
                 eta: float | None = None, top_m: int | None = None, max_tokens: int | None = None):
        from .deltas import DeltaRuntime

        self.store, self.method = store, method
        self.tasks = list(method["tasks"])
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.router = router
        self.eta = float(method.get("eta", 0.5)) if eta is None else float(eta)
        self.top_m = int(method.get("top_m", 0) or 0) if top_m is None else int(top_m)
        self.max_tokens = router.meta.get("max_tokens") if (router is not None and max_tokens is None) else max_tokens
        self.runtime = DeltaRuntime(model, store, method, device, dtype, None)
        budget, self.budget_note = resolve_budget(memory_budget, self.runtime.fixed_bytes(), device)
        self.runtime.set_memory_budget(budget)
        self.timings = Timings()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_store(cls, path, device="auto", dtype="auto", *, router: bool | str = "auto", memory_budget: int | str | None = None,
                   eta: float | None = None, top_m: int | None = None, cache_size=None) -> "RoutedModel":
        """Load a built mediator / 1bit store. router: True (required), False (none: pass a task
        or static=True to generate), "auto" (load it when one was fitted). memory_budget: bytes
        the weights may take on the device (model + encodings + cache of decoded terms; None or
        "none": no cache; "auto": the model and the encodings plus a share of the memory free
        once they are loaded, runtime.resolve_budget). cache_size (the decision LRU of the weight
        swap) is gone: an error says so."""
        from .router import Router, router_dir

        if cache_size is not None:
            raise StreammergeError("cache_size: decisions' weights are no longer built (each row adds its delta from the "
                                   "encodings); give memory_budget=BYTES to cache decoded deltas instead")

        store, method = open_routing_store(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, store)
        r = None
        if router is True or (router == "auto" and (router_dir(store) / "router.json").is_file()):
            r = Router.load(store, method["tasks"]).to(dev)
        model, tok = load_merged_model(store, dev, dt)
        return cls(store, method, model, tok, dev, dt, router=r, memory_budget=memory_budget, eta=eta, top_m=top_m)

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
    def as_decision(self, decision: Decision | str | None) -> Decision:
        """None: STATIC (the merged model); a task name: that task forced; a Decision as is."""
        if decision is None:
            return STATIC
        if isinstance(decision, str):
            return forced(decision, self.tasks)
        return decision

    def apply(self, decision: Decision | str | None) -> Decision:
        """Every row of the model's next forwards runs with `decision` (None or STATIC: the
        merged model; a task name: that task's top-1 weights). Returns the decision."""
        decision = self.as_decision(decision)
        self.runtime.set_rows([decision])
        return decision

    def resident_bytes(self) -> dict:
        """Bytes on the device: the model, the encodings, the cache of decoded terms."""
        return self.runtime.resident_bytes()

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
        """Generate for each prompt with its routed weights (greedy unless temperature > 0); prompts
        are batched by length, whatever their decisions (each row runs its own; a batch's rows
        sorted by decision).

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
            decs = [self.as_decision(d) for d in decisions]
            if len(decs) != len(plist):
                raise ValueError(f"{len(decs)} decisions for {len(plist)} prompts")
        elif static:
            decs = [STATIC] * len(plist)
        elif task is not None:
            decs = [forced(task, self.tasks)] * len(plist)
        else:
            decs = self.route(plist, eta, top_m)
        seqs = encode_for_generation(self.tokenizer, plist)
        pad = pad_id(self.tokenizer)
        eos = eos_ids(self.model, self.tokenizer)
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
        order = sorted(range(len(plist)), key=lambda i: (len(seqs[i]), i))  # less padding
        for b0 in range(0, len(order), max(1, batch_size)):
            # a batch's rows sorted by decision: each decision's rows one run, which the routed
            # layers take as slices (views) instead of gathering and scattering index lists
            chunk = sorted(order[b0 : b0 + batch_size], key=lambda i: decs[i].key)
            ids, mask = pad_batch([seqs[i] for i in chunk], pad, "left", self.device)
            self.runtime.set_rows([decs[i] for i in chunk])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings.generate_s += time.perf_counter() - t0
            self.timings.batches += 1
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

    def reset_timings(self) -> None:
        self.timings = Timings()

    def describe(self, decision: Decision) -> str:
        return decision.describe(self.method)
