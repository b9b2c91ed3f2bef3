"""The evaluation harness: greedy decoding, exact match per task, for every kind of model.

One generation function serves every model: a Hugging Face directory (base, experts, static
merges, mergekit's outputs) or a routing store, whose one loaded model runs each batch row with
its own decision (the delta runtime of `generate`, routing/deltas.py), so prompts with different
decisions are generated together. Prompts are encoded as
streammerge's routed inference encodes them (`encode_for_generation`), left-padded, batched by
length, decoded greedily until `</s>` or the set's token budget; exact match compares stripped
texts.

Model outputs are memoised per (model, weights, prompt) within a run, so evaluating a store
under several routers or entropy thresholds generates each (decision, prompt) once.

ServedEval scores a routing store's rows through `streammerge serve` instead (run.py
--via-server): the server started as a subprocess on a free 127.0.0.1 port, every prompt sent
with the official openai client (the chat endpoint when the tokenizer has a chat template, as
`encode_for_generation` uses it; else completions), greedy, concurrently; the server routes
(model `job`), forces the task (`job:task:T`) or serves the merged model (`job:static`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import tasks as T
from .config import Config


@dataclass
class EvalSets:
    tests: dict  # task -> [(prompt, answer)]
    ood: list  # [(kind, prompt, answer)]
    router: dict  # task -> [prompt] (labelled prompts to fit routers; from the fine-tuning pools, not the tests)
    background: list = field(default_factory=list)  # [prompt] of none of the tasks (routers' background class)
    budget: dict = field(default_factory=dict)  # set name -> max new tokens

    @classmethod
    def make(cls, cfg: Config, tok) -> EvalSets:
        d = cfg.difficulty
        tests = {t: T.test_set(t, cfg.n_test, d) for t in T.TASKS}
        ood = T.ood_set(cfg.n_ood, d)
        router = {}
        for t in T.TASKS:
            exclude = {p for p, _ in tests[t]}
            pool = T.train_set(t, 20 * cfg.n_router, d, exclude, seed=12345)
            seen, chosen = set(), []
            for p, _ in pool:
                if p and p not in seen:  # questions only (the facts pool also holds documents)
                    seen.add(p)
                    chosen.append(p)
                if len(chosen) == cfg.n_router:
                    break
            router[t] = chosen
        exclude = {p for pairs in tests.values() for p, _ in pairs} | {p for _, p, _ in ood}
        sets = cls(tests, ood, router, T.background_prompts(cfg.n_router, d, exclude))
        for name, pairs in [*tests.items(), ("ood", [(p, a) for _, p, a in ood])]:
            longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
            sets.budget[name] = longest + 3
        return sets


def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 64, before_batch=None) -> list[str]:
    """Greedy continuations of `prompts` (decoded, special tokens skipped), in order.
    before_batch(indices) runs before each batch (a routed model sets its rows' decisions)."""
    import torch

    from streammerge.routing.runtime import encode_for_generation, pad_batch, pad_id

    if not prompts:
        return []
    device = next(model.parameters()).device
    seqs = encode_for_generation(tok, prompts)
    pad = pad_id(tok)
    eos = tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: (len(seqs[i]), i))
    out: list[str | None] = [None] * len(prompts)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad, "left", device)
        if before_batch is not None:
            before_batch(idx)
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos)
        for row, i in zip(gen[:, ids.shape[1] :].tolist(), idx):
            if eos in row:
                row = row[: row.index(eos)]
            out[i] = tok.decode(row, skip_special_tokens=True)
    return out


def matches(outputs: list[str], answers: list[str]) -> list[bool]:
    """Per prompt: the output equals the answer, both stripped (exact match)."""
    return [o.strip() == a.strip() for o, a in zip(outputs, answers)]


def exact(outputs: list[str], answers: list[str]) -> float:
    return sum(matches(outputs, answers)) / max(1, len(answers))


class Memo:
    """Outputs per (model id, weights key, prompt)."""

    def __init__(self):
        self.cache: dict[tuple, str] = {}
        self.generated = 0
        self.seconds = 0.0

    def run(self, model_key, weights_key, model, tok, prompts, budget):
        return self.run_rows(model_key, [weights_key] * len(prompts), model, tok, prompts, budget)

    def run_rows(self, model_key, weights_keys, model, tok, prompts, budget, set_rows=None):
        """Prompt i with weights_keys[i]; the ones not memoised are generated together, and
        set_rows(keys of a batch's rows) is called before each batch (a routed model's rows)."""
        todo = list(dict.fromkeys((k, p) for k, p in zip(weights_keys, prompts) if (model_key, k, p) not in self.cache))
        if todo:
            t0 = time.perf_counter()
            hook = None if set_rows is None else (lambda idx: set_rows([todo[i][0] for i in idx]))
            for (k, p), o in zip(todo, greedy(model, tok, [p for _, p in todo], budget, before_batch=hook)):
                self.cache[(model_key, k, p)] = o
            self.seconds += time.perf_counter() - t0
            self.generated += len(todo)
        return [self.cache[(model_key, k, p)] for k, p in zip(weights_keys, prompts)]


def _sets(sets: EvalSets):
    """[(set name, prompts, answers, true task or None)] for the tests and the OOD prompts."""
    out = [(t, [p for p, _ in pairs], [a for _, a in pairs], t) for t, pairs in sets.tests.items()]
    out.append(("ood", [p for _, p, _ in sets.ood], [a for _, _, a in sets.ood], None))
    return out


def _result(per_set: dict, sets: EvalSets, extra: dict | None = None) -> dict:
    """per_set: name -> outputs. Accuracy per task, average over the tasks, OOD per kind."""
    res = {"acc": {}, "ood": {}}
    for name, prompts, answers, _ in _sets(sets):
        outs = per_set[name]
        if name == "ood":
            res["ood_all"] = exact(outs, answers)
            for kind in T.OOD_KINDS:
                ix = [i for i, (k, _, _) in enumerate(sets.ood) if k == kind]
                res["ood"][kind] = exact([outs[i] for i in ix], [answers[i] for i in ix])
        else:
            res["acc"][name] = exact(outs, answers)
    res["avg"] = sum(res["acc"].values()) / len(res["acc"])
    res["samples"] = {name: list(zip(prompts[:3], per_set[name][:3])) for name, prompts, _, _ in _sets(sets)}
    if extra:
        res.update(extra)
    return res


# ---- plain models ---------------------------------------------------------------------------


def load_model(path: Path, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def eval_model(path: Path, sets: EvalSets, memo: Memo, device: str = "cpu") -> dict:
    model, tok = load_model(path, device)
    per = {name: memo.run(str(path), "static", model, tok, prompts, sets.budget[name]) for name, prompts, _, _ in _sets(sets)}
    return _result(per, sets)


# ---- full routing (one fine-tuned model per task) -------------------------------------------


def features(model, tok, prompts: list[str]):
    from streammerge.routing.runtime import (
        encode_for_features,
        mean_hidden_features,
        pad_id,
    )

    return mean_hidden_features(model, encode_for_features(tok, prompts, 512), pad_id(tok), 64)


def fit_classifier(model, tok, sets: EvalSets, seed: int = 0):
    """streammerge's router classifier (Twin-Merging's MLP) on `model`'s features of the labelled
    router prompts; returns predict(prompts) -> task probabilities (numpy)."""
    import torch

    from streammerge.routing.router import Router, train_classifier

    texts, labels = [], []
    for i, t in enumerate(T.TASKS):
        texts += sets.router[t]
        labels += [i] * len(sets.router[t])
    feats = features(model, tok, texts)
    net, mean, std, _ = train_classifier(feats, labels, len(T.TASKS), classifier="mlp", seed=seed)
    router = Router(net, mean, std, list(T.TASKS), {})

    def predict(prompts):
        with torch.inference_mode():
            return router.probs(features(model, tok, prompts))

    return predict


def eval_full_routing(root: Path, sets: EvalSets, memo: Memo, device: str = "cpu") -> dict:
    """Oracle: each test set through its own expert (OOD: no oracle exists; the router's choice).
    Router: the classifier on the base model's features picks the expert per prompt."""
    experts = {t: load_model(root / t, device) for t in T.TASKS}
    base, btok = load_model(root / "base", device)
    predict = fit_classifier(base, btok, sets)
    oracle, routed, router_acc = {}, {}, {}
    for name, prompts, _, true in _sets(sets):
        picks = [T.TASKS[i] for i in predict(prompts).argmax(axis=1)]
        per = [None] * len(prompts)
        for t in T.TASKS:
            ix = [i for i, k in enumerate(picks) if k == t]
            outs = memo.run(str(root / t), "static", *experts[t], [prompts[i] for i in ix], sets.budget[name])
            for i, o in zip(ix, outs):
                per[i] = o
        routed[name] = per
        if true is not None:
            oracle[name] = memo.run(str(root / true), "static", *experts[true], prompts, sets.budget[name])
            router_acc[name] = sum(p == true for p in picks) / len(picks)
    oracle["ood"] = routed["ood"]
    return {"oracle": _result(oracle, sets), "router": _result(routed, sets, {"router_accuracy": router_acc})}


# ---- routing stores (Mediator, 1bit-Merging) ------------------------------------------------


# Bytes the routed runtime's weights may take (model + encodings + decoded deltas): room for
# the hot decisions' decoded deltas of the harness's models, which runs them several times
# faster than decoding every forward (1bit with lambda != 0: the TIES of the others).
MEMORY_BUDGET = 8 << 30


class RoutedEval:
    """A routing store loaded once: fit its router, then evaluate under several settings."""

    def __init__(self, store: Path, sets: EvalSets, memo: Memo, device: str = "cpu", router_kw: dict | None = None,
                 memory_budget: int | None = MEMORY_BUDGET):
        from streammerge.routing.model import RoutedModel

        self.store, self.sets, self.memo = Path(store), sets, memo
        self.memory_budget = memory_budget
        self.rm = RoutedModel.from_store(store, device=device, router=False, memory_budget=memory_budget)
        self.refit(router_kw)

    def refit(self, router_kw: dict | None = None) -> None:
        """Fit (again) the store's router on the labelled prompts, as `streammerge router fit`
        does (router_kw: its classifier, epochs, weight_decay, ...; background: True fits the
        background class on the sets' background prompts, as `--background` does)."""
        from streammerge.routing.router import Router, fit_router

        self.router_kw = dict(router_kw or {})
        kw = dict(self.router_kw)
        background = [self.sets.background] if kw.pop("background", False) else ()
        self._probs: dict[str, object] = {}
        self.router_report = fit_router(self.store, [(t, self.sets.router[t]) for t in T.TASKS], background=background, model=self.rm,
                                        seed=0, **kw)
        self.rm.router = Router.load(self.rm.store, self.rm.tasks).to(self.rm.device)

    def _gen(self, decisions, prompts, budget):
        """Every prompt with its decision, in batches that mix decisions (each row its own)."""
        by_key = {d.key: d for d in decisions}
        return self.memo.run_rows(str(self.store), [d.key for d in decisions], self.rm.model, self.rm.tokenizer, prompts,
                                  budget, set_rows=lambda keys: self.rm.runtime.set_rows([by_key[k] for k in keys]))

    def probs(self, name, prompts):
        if name not in self._probs:
            self._probs[name] = self.rm.probabilities(prompts)
        return self._probs[name]

    def evaluate(self, mode: str, eta: float | None = None) -> dict:
        """mode: oracle (the true task forced; OOD routed top-1), router (the fitted router; eta
        for Mediator's entropy threshold), static (the merged fallback model)."""
        from streammerge.routing.decision import STATIC, forced

        per, extra = {}, {}
        mix_share = {}
        for name, prompts, _, true in _sets(self.sets):
            if mode == "static":
                decs = [STATIC] * len(prompts)
            elif mode == "oracle" and true is not None:
                decs = [forced(true, self.rm.tasks)] * len(prompts)
            else:
                e = 1.0 if mode == "oracle" else eta
                decs = [self.rm.decide(p, eta=e) for p in self.probs(name, prompts)]
            mix_share[name] = sum(d.mode == "mix" for d in decs) / len(decs)
            per[name] = self._gen(decs, prompts, self.sets.budget[name])
        extra["mixed_share"] = mix_share
        extra["outputs"] = per
        if mode != "static" and self.router_report:
            extra["router_heldout"] = self.router_report["heldout"]["accuracy"]
        return _result(per, self.sets, extra)

    def entropies(self) -> dict:
        from streammerge.routing.decision import normalized_entropy

        return {name: [normalized_entropy(p) for p in self.probs(name, prompts)] for name, prompts, _, _ in _sets(self.sets)}


# ---- the same rows through `streammerge serve` ----------------------------------------------


class ServedEval:
    """A routing store served by `streammerge serve` (a subprocess on a free 127.0.0.1 port),
    evaluated through the openai client: the router the store holds now (fit it first, e.g.
    with RoutedEval), the oracle task forced, or the merged model. Use as a context manager."""

    NAME = "job"

    def __init__(self, store: Path, sets: EvalSets, device: str = "cpu", eta: float | None = None, concurrency: int = 16,
                 log: Path | None = None, memory_budget: int | None = MEMORY_BUDGET):
        self.store, self.sets, self.device, self.eta = Path(store), sets, device, eta
        self.memory_budget = memory_budget
        self.concurrency = concurrency
        self.log = log
        self.server = None

    def __enter__(self) -> "ServedEval":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120) -> None:
        import tempfile

        from serve_process import ServeProcess  # tools/, on the path as for every harness module

        from streammerge.routing.runtime import load_tokenizer
        from streammerge.store.store import Store

        self.chat = bool(getattr(load_tokenizer(Store.open(self.store)), "chat_template", None))
        args = ["--device", self.device, "--name", self.NAME, "--max-batch", self.concurrency]
        if self.eta is not None:
            args += ["--eta", self.eta]
        # the server gives half of what the weights leave to the KV cache; no budget in process is
        # none on the server (its default is auto)
        args += ["--memory-budget", "none" if self.memory_budget is None else 2 * self.memory_budget]
        self.log = self.log or Path(tempfile.mkstemp(prefix="quality-serve-", suffix=".log")[1])
        self.server = ServeProcess(self.store, *args, log=self.log, timeout=timeout)
        self.base = self.server.base

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _answers(self, model: str, prompts: list[str], budget: int) -> list[tuple[str, dict | None]]:
        """(text, routing) per prompt, greedy, `concurrency` requests at a time."""
        import concurrent.futures as cf

        import openai

        client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300)

        def ask(p: str):
            if self.chat:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=budget,
                                                   temperature=0)
                return r.choices[0].message.content, getattr(r, "routing", None)
            r = client.completions.create(model=model, prompt=p, max_tokens=budget, temperature=0)
            return r.choices[0].text, getattr(r, "routing", None)

        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(ask, prompts))

    def evaluate(self, mode: str) -> dict:
        """mode: router (model `job`, routed by the server), oracle (`job:task:T`; OOD routed),
        static (`job:static`). Also the per-set outputs (`outputs`) and the decisions' modes."""
        per, modes = {}, {}
        for name, prompts, _, true in _sets(self.sets):
            model = {"static": f"{self.NAME}:static", "oracle": f"{self.NAME}:task:{true}"}.get(mode, self.NAME)
            if mode == "oracle" and true is None:
                model = self.NAME
            got = self._answers(model, prompts, self.sets.budget[name])
            per[name] = [t for t, _ in got]
            modes[name] = [(r or {}).get("mode") for _, r in got]
        return _result(per, self.sets, {"outputs": per, "decision_modes": modes})


def via_server(ev: RoutedEval, device: str = "cpu", modes=("router", "oracle", "static"), log: Path | None = None) -> dict:
    """The store's rows through `streammerge serve` against the same rows in this process (ev:
    its router fitted, eta its default): per mode the served accuracy and how many answers
    differ. Oracle's OOD prompts are left out of the comparison: in process they are routed
    top-1 (eta 1), the server routes them at its one eta."""
    out = {}
    with ServedEval(ev.store, ev.sets, device, eta=ev.rm.eta, log=log, memory_budget=ev.memory_budget) as srv:
        for mode in modes:
            here = ev.evaluate(mode, eta=ev.rm.eta)
            served = srv.evaluate(mode)
            names = [n for n, _, _, true in _sets(ev.sets) if not (mode == "oracle" and true is None)]
            differ = sum(a != b for n in names for a, b in zip(here["outputs"][n], served["outputs"][n]))
            out[mode] = {"avg": served["avg"], "acc": served["acc"], "ood_all": served["ood_all"], "in_process_avg": here["avg"],
                         "answers": sum(len(here["outputs"][n]) for n in names), "differ": differ}
    return out
