"""Per-row routed weights in one forward pass: the runtime behind `streammerge serve`, `generate`
and RoutedModel (model.py).

    rt = DeltaRuntime(model, store, method, device, dtype, memory_budget=None)
    rt.set_rows([forced("math", tasks), STATIC, mix_decision])   # one decision per batch row
    logits = model(input_ids=ids).logits                          # row b ran with decision b

The model is the store's merged model as `load_merged_model` gives it: STATIC rows run it as it
is, with no delta. For Mediator its routed tensors are the dense experts D. For 1bit-Merging the
runtime replaces every encoded tensor by the STATIC weight M = theta_0 + lambda * TIES(all)
computed once at load from theta_0 (the base checkpoint's tensor, then dropped) and the
encodings, unrounded: the request-independent part is computed once, never per forward, and the
model stays one model.

Per forward, a module that holds a routed tensor computes the shared product once for the whole
batch, then adds each row group's delta, taken from the compressed encodings on the device:
  Linear     y = x W^T (+ b), then y[rows] += w_row * (x[rows] Delta^T) for each delta term
  Embedding  y = W[ids], then y[rows] += w_row * Delta[ids[rows]] (rows of Delta, gathered)
  any other  (norm weights, 1-D tensors) a module found affine in its tensors (AffineForm:
             y = (kappa + w) * n(x) + b, RMSNorm, LayerNorm, ...) runs once with neutral tensors,
             then y[b] = (kappa + w_b) * n(x[b]) + b_b with each row's tensors (static + delta,
             stacked per row once per row plan); any other module runs once per row group
The modules stay where they are, so parameter names, state_dict and hooks are unchanged; only
their `forward` is replaced (modules.py: DeltaLinear, DeltaEmbedding, DeltaGrouped). `close()`
restores it. The routed tensors and their delta products are terms.py's (MediatorTensor,
OneBitTensor), a sparse expert's resident form compact.py's (CompactSparse); this file is the
runtime that loads them, plans each batch's rows and budgets the memory.

Delta terms:
  Mediator  one term per task present in the batch, over the rows using it, with the rows'
            weights: top-1 / forced rows weight 1 (D + S_k), an uncertain row p_t for each of
            its tasks (D + sum p_t S_t), STATIC rows none (D). S_t stays sparse (`CompactSparse`:
            int32 row pointers, the positions as int16 columns or as the packed bitmask,
            whichever is smaller, then columns for the sparsest while the extra bytes fit
            COLUMNS_ALLOWANCE of the storage figure; the values as stored: bf16, or int8 codes with a float32
            scale per 64), decoded per product (or once, cached within the budget) into a
            float32 CSR matrix for torch.sparse.mm or, for a bitmask from DENSE_FROM up, a
            dense float32 matrix (see CompactSparse for the bytes and the measured costs;
            int8 values: 1.1-1.3x the bf16 store's decoding step on CPU without a budget,
            hidden 256, rho 0.1-0.5, measured with int16 columns). (One sparse product of the
            stacked [S_1; ...; S_N] for all rows, then each row's mix, was measured no faster on
            CPU at 32 tokens and slower above: not kept.)
  1bit      one term per task decision present in the batch: Delta_k = tau_hat_k + lambda *
            (TIES({tau_hat_j : j != k}) - TIES(all)), k's weight less M. Per tensor it is zero
            where task k has no piece (k's others are all the pieces) and (1 - lambda) tau_hat_k
            where k's piece is the only one (TIES of one vector is itself), a scaled sign-bits
            product (`signs_product`: the +-1 of each byte looked up, multiplied, then scaled),
            as is every term with lambda = 0. Where two or more tasks have pieces and lambda !=
            0 the term is nonlinear in the encodings: no sum of per-task compressed deltas gives
            it. It is built from the packed bits and scales in row chunks (encoded.py
            `TaskPiece.tau_hat`, `onebit_terms`) and multiplied chunk by chunk, every forward
            (no memory beyond the encodings, at the cost of decoding all N tasks' bits and two
            elections per term), or cached within the budget: 4 bytes per routed parameter
            (float32 compute) per hot task decision, N at most.

Measured (tools/bench_deltas.py --repeat 5: hidden 512, intermediate 1376, 4 layers, vocab
4096; one forward of 32 rows over 3 tasks; CPU time on one thread; ratio to the static model's
forward of the same batch; swap = the old per-decision dense weights (now tools/weight_swap.py),
one forward per task group; a 2-core box shared with other jobs at load 13-17, about +-30 %):
                       decoding step (1 token/row)      prefill (32 tokens/row)
                       no cache   cache   swap          no cache   cache   swap
  Mediator (rho 0.1)   1.7        1.2     2.8           1.4        1.3     1.0
  1bit lambda 0        6.3        3.4     3.3           2.6        1.3     1.2
  1bit lambda 1        91         2.6     2.2           9.6        1.5     1.1
The cache held 14 MB (Mediator: float32 CSR) / 164 MB
(1bit: 3 decisions' full float32 weights) against encodings of 7.1 / 5.9 MB and a 30 MB bf16
model. Mediator's products from the resident CSR form cost 1.7x the static forward, against
5.5x measured before, when the store's bitmask was decoded into a CSR matrix every forward. With
preset uniform every task has a piece in every tensor, so every 1bit term is a full-size
product: 3 products per layer instead of 1. Served from the encodings, lambda != 0 costs about
15x lambda 0's time per decoding step (N tau_hats and N + 1 elections per row chunk per
forward); cached, the same as lambda 0. Where a preset drops a task's modules (paper, auto),
those terms vanish (see OneBitTensor).

Cache: with `memory_budget` (bytes the weights may take on the device: model + encodings +
row plan + cache), the decoded form of a term is kept, least recently used first out, in what
the model, the encodings and the row plan's reserve leave: Mediator the decoded S_t (float32
CSR, or dense: CompactSparse.decoded); 1bit a task decision's full weight M + Delta_k of each Linear, so that its rows run one
product with it, as the weight swap does, instead of shared + delta (in the compute dtype: on
bf16 that is the export's rounding).
(Mediator's full weights D + S_k instead were measured no faster for a decoding step on CPU,
with 5x the cache: not kept.) Without a budget nothing is cached (and nothing fused): resident
weights are the model plus the encodings. The row plan is what a forward keeps for its batch's
decisions until they change (row indices, each decision's small tensors, a routed norm's
per-row scale and shift, the fused coefficients); the budget reserves its worst case for the
largest batch (`plan_bound`, `reserve_rows`: the server's --max-batch). resident_bytes()
reports the four (the fused stacks under "cache").

Threads: the decisions set_rows gives and the row plan built from them belong to the calling
thread (`_RowState`), so two threads may run forwards at once, each with its own rows: the
server's engine decodes its batch while its router thread runs the routing forward (all rows
STATIC) of the requests that arrived meanwhile. The decoded-term cache and the fused stacks are
shared, built under a lock. The budget reserves one thread's row plan (`plan_bound`): an all-STATIC
forward, the router's, keeps none.

Fused products (DeltaLinear._fused): on CUDA, for a batch of at most FUSED_MAX_TOKENS tokens
(decoding steps), a routed Linear whose stack fits the budget runs in two kernels whatever the
batch's decisions: y_all = x [W; W_1; ...; W_K]^T, the shared weight stacked with its K terms
(Mediator: every task's S_t, dense; 1bit: each task decision's Delta_k), then
y[b] = sum_j P[b, j] y_all[b, j] with one coefficient row per batch row, built once per row plan:
P[b, 0] = 1, P[b, 1 + j] = the row's weight of term j (1 top-1, p_t a mix, 0 STATIC). The stacks
are built on first use, in the model's dtype (on bf16 each term is rounded once, as the export
rounds its weights; so are a mix's p_t), and take their share of the budget before the cache,
Linear by Linear in module order while they fit; the others and CPU keep the per-term
products. A longer batch (a prefill) of a Linear with a stack runs the shared product, then
each term's rows times its dense block of the stack (DeltaLinear._blocks: one dense product per
term instead of a sparse one; measured on an H100 below FUSED_MAX_TOKENS). `rt.fused =
"always"` forces the fused product on any device and batch (tests), "never" turns it off; see
FUSED_MAX_TOKENS for the policy.

Exactness: `export --variant task:k` rounds W = D + S_k (1bit: theta_0 + tau_hat_k + lambda *
TIES) to the store's dtype once; the delta path computes x D^T + x S_k^T in float32 without that
rounding. The difference is one rounding of the changed weights, a relative 2^-9 (bf16) of each
changed entry (1bit STATIC rows too: M is not rounded): the logits agree with the export's within EXPORT_REL of the row's largest |logit|
and with the unrounded float32 weights within EXACT_ATOL (float32 compute); greedy tokens are the
export's on the test models.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from functools import partial
from typing import Sequence

from ..errors import StreammergeError
from .compact import CompactSparse
from .decision import STATIC, Decision
from .encoded import OneBitEncodings
from .modules import DeltaEmbedding, DeltaGrouped, DeltaLinear, _indices
from .runtime import require_torch
from .terms import MediatorTensor, OneBitTensor, _Cache, _tensor_bytes

# The stated tolerances of the delta path (float32 compute), see "Exactness" above: against the
# model `export --variant task:k` writes (weights rounded to bf16 once), |logit difference| <=
# EXPORT_REL * max |logit| of the row (measured on the test models: <= 1/140 for 1bit, whose every
# weight is rounded, <= 1/1800 for Mediator); against the same float32 weights never rounded
# (the export's numpy block functions), <= EXACT_ATOL (measured: 4e-7).
EXPORT_REL = 1 / 64
EXACT_ATOL = 1e-5


# The fused product (DeltaLinear._fused) computes every routed Linear of a batch in one matmul
# with the shared weight and the K stacked terms, then one contraction with each row's
# coefficients: (K + 1)x the FLOPs and weight reads of the shared product, for 2 kernels instead
# of ~5 per term (gather, cast, sparse product, scale, scatter-add) on top of the shared one. It
# pays where a step's time is launches, not arithmetic: on a GPU, for a batch of few tokens
# (decoding steps; up to this many tokens, rows x sequence). Longer batches (prefills) take
# each term's dense block of the stack over its rows only (DeltaLinear._blocks). On CPU each
# term's product is arithmetic-bound already (see the table above): the per-term path stays.
FUSED_MAX_TOKENS = 128
FUSED_MODES = ("auto", "always", "never")  # DeltaRuntime.fused; `serve --fused`


def fused_pays(device, tokens: int) -> bool:
    """The "auto" policy of the fused product: CUDA, at most FUSED_MAX_TOKENS tokens."""
    torch, _ = require_torch()
    return torch.device(device).type == "cuda" and tokens <= FUSED_MAX_TOKENS


# Of the store's storage figure (storage.json), the bytes the runtime may spend on int16 columns
# instead of bitmasks (DeltaRuntime._columns_where_they_fit): products from columns cost 2x (rho
# 0.5) to 7x (rho 0.1) less than decoding a mask each time (CompactSparse), and this keeps the
# resident weights within 10 % of the storage figure with room for the row pointers and the plan.
COLUMNS_ALLOWANCE = 0.05


class DeltaRuntime:
    """Wraps a loaded transformers model (the store's merged model; for 1bit-Merging its encoded
    tensors hold the STATIC merge M computed at load) so that ONE forward pass over a batch
    computes, for batch row b, the weights of decision b (set_rows). See the module docstring.

    Interface for serving (stable): __init__(model, store, method, device, dtype,
    memory_budget=None), set_rows(decisions), resident_bytes(), tasks, close(), and
    set_memory_budget(bytes) to change the budget later (no second runtime needed); `fused`
    ("auto" | "always" | "never") picks when routed Linears run the fused product.
    """

    def __init__(self, model, store, method: dict, device, dtype, memory_budget: int | None = None):
        torch, _ = require_torch()
        self.model, self.store, self.method = model, store, method
        self.kind = method["method"]
        self.tasks: list[str] = list(method["tasks"])
        self.device, self.dtype = device, dtype
        self.cache = _Cache(0)
        self._fused_mode = "auto"
        self._fusable: dict = {}  # id(Linear module) -> its stack's keys, reserved in the budget
        self._stacks: dict = {}  # id(Linear module) -> (keys, stacked weight, stacked bias or None)
        params = dict(model.named_parameters(remove_duplicate=False))
        self.tensors = self._load(params)  # store tensor name -> MediatorTensor | OneBitTensor
        self._lock = threading.RLock()  # the shared cache and stacks (built from any thread)
        self._rows_of_threads = weakref.WeakSet()  # every live thread's _RowState: resident_bytes counts their plans
        self._local = threading.local()
        self.plan_rows = 0  # the rows whose row plan the budget reserves (reserve_rows)
        self._patched = self._patch(params)
        self.set_memory_budget(memory_budget)

    def set_memory_budget(self, memory_budget: int | None) -> None:
        """Bytes the weights may take (model + encodings + row plan + cache; None: no cache);
        the cache gets what the model, the encodings and the row plan's reserve (`plan_bound`
        of `plan_rows`) leave, least recently used terms out first."""
        torch, _ = require_torch()
        used = self.resident_bytes()
        weights = used["model"] + used["encodings"]
        fixed = weights + self.plan_bound(self.plan_rows)
        if memory_budget is not None and memory_budget <= fixed:
            plan = f", with the row plan of {self.plan_rows} rows {fixed}" if fixed > weights else ""
            raise StreammergeError(f"memory budget {memory_budget} bytes: the model and the encodings alone take {weights}{plan}")
        self.memory_budget = memory_budget
        left = 0 if memory_budget is None else int(memory_budget) - fixed
        self._stacks = {}
        self.cache.resize(left - self._reserve_stacks(left))
        full = sum(len(t.experts) * t.rows * t.cols * m.weight.element_size() for m, t in self._linear_weights()
                   if isinstance(t, MediatorTensor))
        # measured faster on CPU (docs/serving.md); a GPU without a stack keeps the per-term path
        self.cache.holds_mediator_full = (memory_budget is not None and full <= self.cache.budget
                                          and torch.device(self.device).type == "cpu")

    def fixed_bytes(self) -> int:
        """What the budget holds before any cache: the model, the encodings and the reserve of
        the row plan of `plan_rows` rows."""
        used = self.resident_bytes()
        return used["model"] + used["encodings"] + self.plan_bound(self.plan_rows)

    def reserve_rows(self, rows: int) -> None:
        """Reserve the row plan of forwards of up to `rows` rows in the budget (it only grows:
        the server reserves its --max-batch at load; set_rows reserves any larger batch, taking
        it from the cache and the stacks)."""
        if rows > self.plan_rows:
            self.plan_rows = int(rows)
            if self.memory_budget is not None:
                self.set_memory_budget(self.memory_budget)

    # ---- fused products -------------------------------------------------------------------------
    @property
    def fused(self) -> str:
        """When routed Linear layers run the fused product: "auto" (on CUDA, for at most
        FUSED_MAX_TOKENS tokens), "always" (any device and batch: for tests), "never"."""
        return self._fused_mode

    @fused.setter
    def fused(self, mode: str) -> None:
        if mode not in FUSED_MODES:
            raise StreammergeError(f"fused mode {mode!r}: one of {', '.join(FUSED_MODES)}")
        self._fused_mode = mode
        self.set_memory_budget(self.memory_budget)  # the stacks' share of the budget

    def _linear_weights(self) -> list:
        """[(module, its routed weight tensor)] of the routed Linear layers."""
        return [(m, m.forward.tensors["weight"]) for m in self._patched
                if isinstance(m.forward, DeltaLinear) and "weight" in m.forward.tensors]

    def _reserve_stacks(self, left: int) -> int:
        """Which routed Linear layers get a fused stack: in module order, while their stacks
        fit what the model and the encodings leave of the budget; returns the bytes reserved
        (taken from the cache's share, built on first use)."""
        self._fusable = {}
        if self.memory_budget is None or self.fused == "never" or (self.fused == "auto" and not fused_pays(self.device, 1)):
            return 0
        reserved = 0
        for module, weight in self._linear_weights():
            keys = weight.stack_keys()
            need = (len(keys) + 1) * sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)
            if keys and reserved + need <= left:
                self._fusable[id(module)] = keys
                reserved += need
        return reserved

    def rebuilt_tensors(self) -> int:
        """Routed tensors with a task term that no compressed delta gives (1bit with lambda != 0
        where two or more tasks have pieces: OneBitTensor's nonlinear Delta_k): each product
        builds it from every task's encodings unless the cache, within the memory budget, holds it."""
        return sum(
            isinstance(t, OneBitTensor) and any(t.own_scale(("task", k)) is None for k in t.present)
            for t in self.tensors.values()
        )

    def fused_layers(self) -> tuple[int, int]:
        """(routed Linear layers whose fused stack is reserved in the budget, routed Linear layers)."""
        return len(self._fusable), len(self._linear_weights())

    def product(self, module, x) -> str:
        """How this product of a routed Linear (input x) adds its terms: "fused" (the stack in
        one product, see FUSED_MAX_TOKENS), "blocks" (a batch of more tokens, where the module
        has a stack: each term's rows times its dense block) or "terms" (no stack: the
        per-term products from the encodings or the cache)."""
        if id(module) not in self._fusable:
            return "terms"
        if self.fused == "always" or fused_pays(x.device, x.numel() // max(1, x.shape[-1])):
            return "fused"
        return "blocks"

    def stack(self, module, tensor) -> tuple:
        """(keys, [W; W_k for k in keys], [b; 0...] or None) of a fusable Linear, built once,
        in the module's dtype: W the model's weight, W_k the term's dense delta."""
        torch, _ = require_torch()
        hit = self._stacks.get(id(module))
        if hit is not None:
            return hit
        with self._lock:  # built once, whichever thread's forward comes first
            hit = self._stacks.get(id(module))
            if hit is None:
                keys, w, bias = self._fusable[id(module)], module.weight, module.bias
                with torch.no_grad():
                    stacked = torch.cat([w, *(tensor.dense_term(k).view(w.shape).to(w.dtype) for k in keys)])
                    if bias is not None:
                        bias = torch.cat([bias, bias.new_zeros(len(keys) * bias.numel())])
                hit = self._stacks[id(module)] = (keys, stacked, bias)
        return hit

    def coefficients(self, keys: list, terms: list, batch: int, dtype):
        """P (batch, 1, 1 + len(keys)), bmm's left operand: each row's weight of the shared
        block (1) and of each stacked term, from the plan's terms (cached with the plan)."""
        plan = self._state().plan
        torch, _ = require_torch()
        # a tensor's terms are the batch's decisions with a delta among its keys: the same for
        # every tensor with the same keys (Mediator: all of them)
        plan_key = ("coef", tuple(keys), batch, dtype)
        if plan_key not in plan:
            p = torch.zeros((batch, 1 + len(keys)), dtype=torch.float32)
            p[:, 0] = 1.0
            for key, rows, weights in terms:
                idx = torch.as_tensor(list(_indices(rows, batch)), dtype=torch.long)
                p[idx, 1 + keys.index(key)] = 1.0 if weights is None else weights.cpu()
            plan[plan_key] = p.to(device=self.device, dtype=dtype).unsqueeze(1)
        return plan[plan_key]

    # ---- loading --------------------------------------------------------------------------------
    def _load(self, params: dict) -> dict:
        torch, _ = require_torch()
        out = {}
        if self.kind == "mediator":
            for job in self.store.jobs:
                if job["stage"] != "experts":
                    continue
                name, shape = job["name"], tuple(job["shape"])
                _param(params, name)
                experts = {t: CompactSparse.load(self.store, f"{job['key']}/{t}", job, self.device) for t in self.tasks}
                out[name] = MediatorTensor(name, shape, experts, self.cache)
            self._columns_where_they_fit(out)
            return out
        enc = OneBitEncodings(self.store, self.method, self.device)
        for name in enc.names:
            p = _param(params, name)
            t = OneBitTensor(name, enc.shape[name], enc.pieces[name], enc.lam, self.device, self.cache)
            # the STATIC weight, unrounded, replaces the stored merged tensor; theta_0 is dropped
            p.data = t.merged(enc.base.pop(name)).to(self.dtype).reshape(p.shape)
            out[name] = t
        return out

    def _columns_where_they_fit(self, tensors: dict) -> None:
        """Mediator experts loaded in their smaller position form (mostly the mask) go to int16
        columns, sparsest first (the most speed for the fewest extra bytes), while the extra
        bytes fit COLUMNS_ALLOWANCE of the storage figure (none without storage.json)."""
        path = self.store.path / "storage.json"
        if not path.is_file():
            return
        from ..limits import DOCUMENT, read_json

        allowance = COLUMNS_ALLOWANCE * float(read_json(path, DOCUMENT.named("storage.json"))["total_bytes"])
        masks = [e for t in tensors.values() for e in t.experts.values() if e.layout == "mask"]
        for e in sorted(masks, key=lambda e: e.density):
            extra = e.columns_extra_bytes()
            if extra > allowance:
                continue
            allowance -= extra
            e.to_columns()

    def _patch(self, params: dict) -> list:
        """Replace the forward of every module that holds a routed tensor."""
        torch, _ = require_torch()
        by_id = {id(params[n]): t for n, t in self.tensors.items()}
        patched, seen = [], set()
        for _, module in self.model.named_modules(remove_duplicate=False):
            if id(module) in seen:
                continue
            mine = {a: by_id[id(p)] for a, p in module.named_parameters(recurse=False) if id(p) in by_id}
            if not mine:
                continue
            seen.add(id(module))
            if isinstance(module, torch.nn.Linear):
                fwd = DeltaLinear(self, module, mine)
            elif isinstance(module, torch.nn.Embedding) and set(mine) == {"weight"}:
                fwd = DeltaEmbedding(self, module, mine)
            else:
                fwd = DeltaGrouped(self, module, mine)
            module.forward = fwd
            patched.append(module)
        return patched

    def close(self) -> None:
        """Give the modules their own forward back (the weights stay: the merged model, 1bit its STATIC merge M)."""
        for m in self._patched:
            del m.forward
        self._patched = []

    # ---- the rows of the next forward -----------------------------------------------------------
    def set_rows(self, decisions: Sequence[Decision]) -> None:
        """One decision per batch row of this thread's next forward(s)."""
        decisions = list(decisions)
        for d in decisions:
            for task, _ in d.weights:
                if task not in self.tasks:
                    raise StreammergeError(f"no task {task!r} (tasks: {', '.join(self.tasks)})")
            if self.kind == "1bit" and d.mode == "mix":
                raise StreammergeError("1bit-Merging routes top-1 only (no weighted decisions)")
        state = self._state()
        if state.decisions is None or [d.key for d in decisions] != [d.key for d in state.decisions]:
            state.plan = {}  # the same decisions as the last forward (a decoding step): same plan
        self.reserve_rows(len(decisions))
        state.decisions = decisions
        state.n_rows = None if len({d.key for d in decisions}) <= 1 else len(decisions)

    def _state(self) -> "_RowState":
        """The calling thread's rows (made, and registered for resident_bytes, on first use)."""
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _RowState()
            with self._lock:
                self._rows_of_threads.add(state)
        return state

    @property
    def decisions(self) -> list[Decision] | None:
        """This thread's decisions, one per row, as set_rows gave them (None: none set)."""
        return self._state().decisions

    @property
    def n_rows(self) -> int | None:
        """Rows this thread's decisions are for (None: one decision for any batch, or none set: static)."""
        return self._state().n_rows

    def groups(self, batch: int) -> list:
        """[(decision, rows or None for all)] for a batch of `batch` rows."""
        plan, key = self._state().plan, ("groups", batch)
        if key not in plan:
            plan[key] = self._groups(batch)
        return plan[key]

    def _groups(self, batch: int) -> list:
        torch, _ = require_torch()
        decs = self._state().decisions or [STATIC]
        if len({d.key for d in decs}) == 1:
            return [(decs[0], None)]
        by_key: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, d in enumerate(decs):
            by_key.setdefault(d.key, []).append(i)
        return [(decs[idx[0]], self._rows(idx, batch)) for idx in by_key.values()]

    def _rows(self, idx: list[int], batch: int):
        """Row indices (ascending) as None (all), a slice (a contiguous run) or an index tensor."""
        torch, _ = require_torch()
        if len(idx) == batch:
            return None
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return slice(idx[0], idx[0] + len(idx))
        return torch.tensor(idx, dtype=torch.long, device=self.device)

    def uncovered(self, tensor, batch: int):
        """The rows no term of `tensor` covers (None: none), for a top-1 plan (disjoint terms)."""
        plan = self._state().plan
        key = ("uncovered", id(tensor), batch)
        if key not in plan:
            covered = set()
            for _, rows, _ in self.terms(tensor, batch):
                covered.update(_indices(rows, batch))
            rest = [i for i in range(batch) if i not in covered]
            plan[key] = self._rows(rest, batch) if rest else None
        return plan[key]

    def top1(self, tensor, batch: int) -> bool:
        """Whether each row of the batch takes at most one term of `tensor`, whole (no row
        mixes tasks): then each row has one decision's full weight (DeltaLinear._full_weights)."""
        plan = self._state().plan
        key = ("top1", id(tensor), batch)
        if key not in plan:
            terms = self.terms(tensor, batch)
            rows = [i for _, r, _ in terms for i in _indices(r, batch)]
            plan[key] = all(w is None for _, _, w in terms) and len(rows) == len(set(rows))
        return plan[key]

    def terms(self, tensor, batch: int) -> list:
        """[(term key, rows or None, row weights or None)] of the delta products of `tensor`."""
        plan = self._state().plan
        key = ("terms", id(tensor), batch)
        if key not in plan:
            plan[key] = self._terms(tensor, batch)
        return plan[key]

    def _terms(self, tensor, batch: int) -> list:
        torch, _ = require_torch()
        groups = self.groups(batch)
        if self.kind == "1bit":  # a term per decision: its delta is nonlinear in the tasks
            return [(d.key, rows, None) for d, rows in groups if tensor.has_delta(d.key)]
        uses: OrderedDict[str, tuple[list, list]] = OrderedDict((t, ([], [])) for t in self.tasks)
        for d, rows in groups:
            if d.mode == "static":
                continue
            idx = _indices(rows, batch)
            for task, w in d.weights:
                uses[task][0].extend(idx)
                uses[task][1].extend([w if d.mode == "mix" else 1.0] * len(idx))
        out = []
        for task, (idx, ws) in uses.items():
            if not idx:
                continue
            order = sorted(range(len(idx)), key=idx.__getitem__)  # ascending rows: runs become slices
            idx, ws = [idx[i] for i in order], [ws[i] for i in order]
            rows = self._rows(idx, batch)
            weights = None if all(w == 1.0 for w in ws) else torch.tensor(ws, dtype=torch.float32, device=self.device)
            out.append((task, rows, weights))
        return out

    def small_params(self, module, tensors: dict, decision: Decision) -> dict:
        """{attribute: the module's tensor + the decision's delta} of its routed small tensors
        (those with a delta), in the module's dtype (cached with the plan)."""
        plan = self._state().plan
        key = ("params", id(module), decision.key)
        if key not in plan:
            params = {}
            for attr, t in tensors.items():
                d = self.small_delta(t, decision)
                if d is not None:
                    base = getattr(module, attr)
                    params[attr] = (base.float() + d.view(base.shape)).to(base.dtype)
            plan[key] = params
        return plan[key]

    def row_params(self, grouped: "DeltaGrouped", batch: int) -> tuple:
        """An affine module's per-row (scale, shift) tensors (AffineForm.rows), cached with the plan."""
        plan = self._state().plan
        key = ("rows", id(grouped.module), batch)
        if key not in plan:
            params_of = partial(self.small_params, grouped.module, grouped.tensors)
            plan[key] = grouped.form.rows(grouped.module, self.groups(batch), params_of, batch)
        return plan[key]

    def small_delta(self, tensor, decision: Decision):
        """A small routed tensor's delta for a decision (cached with the plan), or None."""
        plan = self._state().plan
        key = ("small", id(tensor), decision.key)
        if key not in plan:
            plan[key] = tensor.decision_delta(decision)
        return plan[key]

    # ---- memory ---------------------------------------------------------------------------------
    def resident_bytes(self) -> dict:
        """Bytes on the device: the model's tensors, the encodings, the row plan of the current
        decisions (the tensors `_plan` holds), the cache of decoded terms (and the fused stacks)."""
        torch, _ = require_torch()
        seen, model = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                model += t.numel() * t.element_size()
        enc = sum(t.nbytes for t in self.tensors.values())
        stacks = sum(_tensor_bytes(w) + (0 if b is None else _tensor_bytes(b)) for _, w, b in self._stacks.values())
        with self._lock:
            states = list(self._rows_of_threads)
        todo = [v for state in states for v in dict(state.plan).values()]  # copies: the plans are other threads'
        plan, seen = 0, set()
        while todo:
            v = todo.pop()
            if isinstance(v, (list, tuple)):
                todo.extend(v)
            elif isinstance(v, dict):
                todo.extend(v.values())
            elif torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                plan += v.numel() * v.element_size()
        return {"model": model, "encodings": enc, "plan": plan, "cache": self.cache.bytes + stacks}

    def plan_bound(self, rows: int) -> int:
        """The most bytes the row plan holds for a batch of at most `rows` rows, one decision a
        row (so at most `rows` distinct decisions): per routed small tensor (norm weights, Linear
        biases) a float32 delta per decision, and a norm's own tensor per decision; per norm
        run in one pass (AffineForm) its (rows, h) float32 scale and shift; per routed product
        (Linear and Embedding weights) each term's rows (int64) and weights (float32) and the
        rows no term covers; the fused products' coefficients, (rows, 1 + terms) in the model's
        dtype per set of terms; the row groups' indices."""
        if rows <= 0:
            return 0
        total, coefficients = 8 * rows, {}
        for module in self._patched:
            fwd = module.forward
            for attr, tensor in fwd.tensors.items():
                own = getattr(module, attr)
                if isinstance(fwd, DeltaGrouped):
                    total += rows * own.numel() * (4 + own.element_size())
                elif attr != "weight":  # a Linear's bias: its delta
                    total += rows * own.numel() * 4
                else:
                    total += rows * (12 * len(self.tasks) + 8)
                    if isinstance(fwd, DeltaLinear):
                        coefficients[tuple(tensor.stack_keys())] = own.element_size()
            if isinstance(fwd, DeltaGrouped) and fwd.form is not None:
                h = getattr(module, next(iter(fwd.tensors))).shape[0]
                total += rows * h * 4 * ((fwd.form.scale is not None) + bool(fwd.form.shifts))
        return total + sum(rows * (1 + len(keys)) * size for keys, size in coefficients.items() if keys)



class _RowState:
    """One thread's rows: the decisions of its next forward(s) and the row plan built from them."""

    __slots__ = ("decisions", "n_rows", "plan", "__weakref__")

    def __init__(self):
        self.decisions: list[Decision] | None = None
        self.n_rows: int | None = None
        self.plan: dict = {}


def _param(params: dict, name: str):
    p = params.get(name)
    if p is None:
        raise StreammergeError(
            f"tensor {name} of the store is not a parameter of the loaded model "
            "(routing needs the checkpoint's tensor names as the model's parameter names)"
        )
    return p
