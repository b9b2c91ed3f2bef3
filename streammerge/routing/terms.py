"""The routed tensors of each method, as the runtime (deltas.py) multiplies them: a Mediator
tensor's per-task sparse experts (`MediatorTensor`, over compact.py's CompactSparse) and a 1bit
tensor's task pieces (`OneBitTensor`: signs times scales, sparse or dense pieces), each giving
its terms' products x Delta^T for the rows that use them, and the cache of decoded terms that
--memory-budget allows (`_Cache`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .compact import CompactSparse, _rows_cols
from .decision import STATIC, Decision
from .encoded import CHUNK_ELEMENTS, SparseDelta, TaskPiece, Values, onebit_terms, onebit_weight
from .runtime import require_torch

_TABLES: dict = {}


def _sign_table(device):
    """(256, 8) float32: the +-1 sign of each bit of each byte value, in little bit order.
    Looking bytes up in it unpacks 4x faster than shifting and masking."""
    torch, _ = require_torch()
    t = _TABLES.get(device)
    if t is None:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        t = _TABLES[device] = bits.to(torch.float32).mul_(2).sub_(1)
    return t



class _Cache:
    """Decoded delta terms, least recently used out, within a byte budget. Thread-safe: the
    server's threads run forwards at once (deltas.py, Threads); a term is built once, under
    the lock, whichever thread asks first."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self.items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self._lock = threading.RLock()
        # the runtime sets it: whether every Mediator Linear's full weight of every task fits at
        # once (else the full weights would evict each other every step: built per product), on
        # CPU only (measured faster there)
        self.holds_mediator_full = False

    def get(self, key, build, nbytes):
        with self._lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit[0]
            value = build()
            size = nbytes(value)
            if size <= self.budget:
                self._evict(self.budget - size)
                self.items[key] = (value, size)
                self.bytes += size
            return value

    def holds(self, key) -> bool:
        return key in self.items

    def resize(self, budget: int) -> None:
        with self._lock:
            self.budget = max(0, int(budget))
            self._evict(self.budget)

    def _evict(self, keep: int) -> None:
        """Least recently used out until at most `keep` bytes are held."""
        while self.items and self.bytes > keep:
            _, (_, old) = self.items.popitem(last=False)
            self.bytes -= old


def _tensor_bytes(t) -> int:
    if t.layout != require_torch()[0].strided:  # sparse CSR
        return sum(x.numel() * x.element_size() for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


class MediatorTensor:
    """A routed tensor of a Mediator store: D is the model's own tensor; per task the sparse S_t.
    Terms are tasks (linear in the decision's weights)."""

    def __init__(self, name: str, shape, experts: dict, cache: _Cache):
        self.name, self.shape = name, tuple(shape)
        self.rows, self.cols = _rows_cols(shape)
        self.experts = experts  # task -> CompactSparse
        self.cache = cache

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def _product(self, task, x):
        """x S_task^T: from the cached decoded form where the cache holds or takes it, else
        decoded row range by row range (nothing kept)."""
        e, key = self.experts[task], (self.name, task)
        if self.cache.holds(key) or e.decoded_nbytes() <= self.cache.budget:
            return CompactSparse.product(self.cache.get(key, e.decoded, _tensor_bytes), x)
        return e.product_in_rows(x)

    def matmul_terms(self, tasks: list, xs: list) -> list:
        """[x S_task^T for each term], x (m, cols) float32 -> (m, rows)."""
        return [self._product(task, x) for task, x in zip(tasks, xs)]

    def gather(self, task, ids):
        return self.experts[task].gather_rows(ids)

    def full_fits(self) -> bool:
        """Whether the cache holds every task's full weight of every routed Linear at once (then,
        on the per-term path, a Linear layer's top-1 rows take full(): one dense product a task
        instead of the shared product plus a sparse one, docs/serving.md)."""
        return self.cache.holds_mediator_full

    def full(self, task, shared):
        """D + S_task, in the shared weight's dtype (cached)."""
        build = lambda: (shared.float() + self.experts[task].dense().view(shared.shape)).to(shared.dtype)  # noqa: E731
        return self.cache.get((self.name, "full", task), build, _tensor_bytes)

    def stack_keys(self) -> list:
        """The terms a fused stack holds (every task: any row may weigh any of them)."""
        return list(self.experts)

    def dense_term(self, task):
        """S_task, float32 (rows x cols): a block of the fused stack."""
        return self.experts[task].dense()

    def decision_delta(self, decision: Decision):
        """The whole delta of a decision (small tensors): sum_t w_t S_t, or None for STATIC."""
        if decision.mode == "static":
            return None
        out = None
        for task, w in decision.weights:
            d = self.experts[task].dense()
            d = d if decision.mode != "mix" else d * w
            out = d if out is None else out.add_(d)
        return out


class OneBitTensor:
    """An encoded tensor of a 1bit store. The model holds the STATIC decision's weight, the
    merged model M = theta_0 + lambda * TIES(all), computed once at load (`merged`); a term is
    a task decision k, its delta relative to M:
        Delta_k = theta_0 + tau_hat_k + lambda * TIES(others) - M
                = tau_hat_k + lambda * (TIES({tau_hat_j : j != k}) - TIES(all))
    which is zero when task k has no piece here (its others are all), and (1 - lambda) tau_hat_k
    when k's piece is the only one (TIES of one vector is that vector): a scaled compressed
    delta. Only where two or more tasks have pieces and lambda != 0 is Delta_k nonlinear in the
    encodings: built from them in row chunks per forward, or cached within the budget."""

    def __init__(self, name: str, shape, pieces: dict, lam: float, device, cache: _Cache):
        self.name, self.shape = name, tuple(shape)
        self.pieces = pieces  # task -> TaskPiece | None (dropped)
        self.lam, self.device, self.cache = lam, device, cache
        self.rows, self.cols = _rows_cols(shape)
        self.present = [t for t, pc in pieces.items() if pc is not None]

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self.pieces.values() if pc is not None)

    def own_scale(self, key: tuple) -> float | None:
        """c where Delta_k = c * tau_hat_k (lambda 0, or k's the only piece), else None."""
        if self.lam == 0 or self.present == [key[1]]:
            return 1.0 - self.lam
        return None

    def has_delta(self, key: tuple) -> bool:
        if key == STATIC.key or self.pieces[key[1]] is None:
            return False
        return self.own_scale(key) != 0.0

    def merged(self, base):
        """M = theta_0 + lambda * TIES(all) of the whole tensor, float32, in row chunks (base:
        theta_0, any float dtype): the export's arithmetic for the merged model, unrounded."""
        torch, _ = require_torch()
        base = base.reshape(self.rows, self.cols)
        out = torch.empty((self.rows, self.cols), dtype=torch.float32, device=self.device)
        rows = len(self.shape) >= 2
        for r0 in range(0, self.rows, self._chunk_rows()):
            r1 = min(self.rows, r0 + self._chunk_rows())
            hat = lambda t: self.pieces[t].tau_hat(self.shape, self.device, (r0, r1) if rows else None)  # noqa: E731
            out[r0:r1] = onebit_weight(base[r0:r1], hat, self.pieces, STATIC.key, self.lam, self.device).reshape(r1 - r0, -1)
        return out.reshape(self.shape)

    def _combine(self, key: tuple, hat):
        """Delta_k from hat(task) -> float32 tau_hat (of the same rows); None: no delta."""
        return self._combine_many([key], hat)[0]

    def _combine_many(self, keys: list, hat) -> list:
        """[Delta_k for k in keys] from hat(task) -> float32 tau_hat (of the same rows), None
        where no delta; each task decoded once, lambda * TIES(all) elected once for all keys."""
        hats: dict = {}
        memo = lambda t: hats[t] if t in hats else hats.setdefault(t, hat(t))  # noqa: E731
        ties_all, out = None, []
        for key in keys:
            c = self.own_scale(key) if self.has_delta(key) else 0.0
            if c == 0.0:
                out.append(None)
            elif c is not None:
                out.append(memo(key[1]) * c)
            else:  # two or more pieces: k's others are not empty
                if ties_all is None:
                    ties_all = onebit_terms(memo, self.pieces, STATIC.key, self.lam, self.device)[1]
                own, ties = onebit_terms(memo, self.pieces, key, self.lam, self.device)
                out.append(ties.sub_(ties_all).add_(own))
        return out

    def delta_rows(self, key: tuple, r0: int, r1: int):
        """The delta of rows [r0, r1) as (r1 - r0, cols) float32 (None: no delta)."""
        rows = (r0, r1) if len(self.shape) >= 2 else None
        d = self._combine(key, lambda t: self.pieces[t].tau_hat(self.shape, self.device, rows))
        return None if d is None else d.reshape(r1 - r0, self.cols)

    def _dense(self, key: tuple):
        return self.delta_rows(key, 0, self.rows)

    def stack_keys(self) -> list:
        """The terms a fused stack holds: the task decisions with a delta here."""
        return [("task", t) for t in self.pieces if self.has_delta(("task", t))]

    def dense_term(self, key: tuple):
        """Delta_k, float32 (rows x cols): a block of the fused stack."""
        return self._dense(key)

    def _chunk_rows(self) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, self.cols))

    def full_fits(self) -> bool:
        """Whether a decision's full weight fits the cache (then Linear layers use full())."""
        return self.rows * self.cols * 4 <= self.cache.budget

    def full(self, key: tuple, shared):
        """M + the decision's delta, in the shared weight's dtype (cached)."""
        build = lambda: (shared.float() + self._dense(key).view(shared.shape)).to(shared.dtype)  # noqa: E731
        return self.cache.get((self.name, key), build, _tensor_bytes)

    def matmul_terms(self, keys: list, xs: list) -> list:
        """[x Delta_k^T for each term], x (m, cols) float32, from the encodings: a scaled
        sign-bits term as the signs' product scaled; the others' deltas built together (each
        task decoded once per row chunk) and multiplied chunk by chunk."""
        torch, _ = require_torch()
        out, built = [], []
        for key, x in zip(keys, xs):
            c, piece = self.own_scale(key), self.pieces[key[1]]
            if c is not None and piece.kind in SIGN_KINDS and len(self.shape) >= 2:
                y = signs_product(x, piece, self._chunk_rows())
                out.append(y if c == 1.0 else y.mul_(c))
            else:
                out.append(torch.empty((x.shape[0], self.rows), dtype=torch.float32, device=x.device))
                built.append(len(out) - 1)
        step = self._chunk_rows()
        for r0 in range(0, self.rows if built else 0, step):
            r1 = min(self.rows, r0 + step)
            rows = (r0, r1) if len(self.shape) >= 2 else None
            deltas = self._combine_many([keys[i] for i in built], lambda t: self.pieces[t].tau_hat(self.shape, self.device, rows))
            for i, d in zip(built, deltas):
                torch.matmul(xs[i], d.reshape(r1 - r0, self.cols).t(), out=out[i][:, r0:r1])
        return out

    def gather(self, key: tuple, ids):
        """Rows `ids` of the delta (embeddings): the pieces' rows gathered, then combined."""
        uniq, inverse = require_torch()[0].unique(ids, return_inverse=True)
        shape = (uniq.numel(), *self.shape[1:])
        d = self._combine(key, lambda t: _gathered(self.pieces[t], uniq, self.rows).tau_hat(shape, self.device))
        return d.reshape(uniq.numel(), self.cols)[inverse]

    def decision_delta(self, decision: Decision):
        key = decision.key
        if not self.has_delta(key):
            return None
        return self._dense(key).reshape(self.shape)


SIGN_KINDS = {"1bit": (("bits", "alpha"),), "1bit-row": (("bits", "scale"),), "2bit": (("bits", "scale"), ("bits2", "scale2"))}


def signs_product(x, piece: TaskPiece, step: int):
    """x (m, cols) float32 times tau_hat^T of a sign-bits piece (1bit: alpha * s; 1bit-row:
    scale_r * s; 2bit: the sum of two such), without tau_hat: the +-1 signs of each row chunk
    are looked up a byte at a time, multiplied, then the product is scaled per output row.
    Equals x @ piece.tau_hat(shape).T up to float32 rounding (the scale applied after the sum)."""
    torch, _ = require_torch()
    table = _sign_table(x.device)
    cols = piece.parts["cols"]
    out = None
    for bits_name, scale_name in SIGN_KINDS[piece.kind]:
        packed, scale = piece.parts[bits_name], piece.parts[scale_name]
        rows = packed.shape[0]
        y = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            signs = table.index_select(0, packed[r0:r1].reshape(-1).long()).view(r1 - r0, -1)[:, :cols]
            torch.matmul(x, signs.t(), out=y[:, r0:r1])
        y.mul_(scale if scale.dim() == 0 else scale.view(1, -1))
        out = y if out is None else out.add_(y)
    return out


_ROW_PARTS = {"bits", "bits2", "scale", "scale2", "dense"}  # parts with one entry per tensor row


def _gathered(piece: TaskPiece, ids, rows: int) -> TaskPiece:
    """The piece restricted to rows `ids` (sorted, unique) of its tensor."""
    torch, _ = require_torch()
    if piece.kind == "sparse":  # flat positions: keep the entries of those rows, renumbered
        sp, cols = piece.parts["sparse"], piece.parts["sparse"].size // rows
        r = torch.div(sp.index.long(), cols, rounding_mode="floor")
        pos = torch.searchsorted(ids, r).clamp_(max=ids.numel() - 1)
        keep = ids[pos] == r
        sub = object.__new__(SparseDelta)
        sub.size = ids.numel() * cols
        sub.index = (pos[keep] * cols + (sp.index.long() - r * cols)[keep]).to(sp.index.dtype)
        sub.value = Values(sp.value.float(keep))  # a temporary: float32
        return TaskPiece("sparse", sparse=sub)
    return TaskPiece(piece.kind, **{k: (v[ids] if k in _ROW_PARTS else v) for k, v in piece.parts.items()})
