"""The replacement forwards of the modules that hold routed tensors: `DeltaLinear` (the shared
product, then each term's delta product over its rows: per term, fused with a stack, or in
dense blocks), `DeltaEmbedding` (gathered delta rows) and `DeltaGrouped` (any other module:
affine ones, found by `AffineForm.probe`, in one pass with per-row scale and shift; the rest
once per decision). Each asks the runtime (deltas.py) for the batch's row plan.
"""

from __future__ import annotations

from ..errors import StreammergeError
from .runtime import require_torch
from .terms import OneBitTensor


class _Routed:
    """The replacement forward of one module: its routed tensors and the runtime's row plan."""

    def __init__(self, runtime, module, tensors: dict):  # runtime: deltas.py's DeltaRuntime (not imported: it imports this file)
        self.rt, self.module = runtime, module
        self.tensors = tensors  # attribute name ("weight", "bias", ...) -> MediatorTensor | OneBitTensor

    def _check(self, batch: int) -> None:
        n = self.rt.n_rows
        if n is not None and n != batch:
            raise StreammergeError(f"set_rows gave {n} decisions for a batch of {batch} rows")


class DeltaLinear(_Routed):
    def __call__(self, x):
        torch, _ = require_torch()
        m = self.module
        self._check(x.shape[0])
        w = self.tensors.get("weight")
        terms = self.rt.terms(w, x.shape[0]) if w is not None else []
        product = self.rt.product(m, x) if terms else "terms"
        if product == "fused":
            y = self._fused(x, terms)
            terms = []
        elif terms and w.full_fits() and (isinstance(w, OneBitTensor) or (product == "terms" and self.rt.top1(w, x.shape[0]))):
            y = self._full_weights(x, w, terms)
            terms = []
        elif product == "blocks":
            y = self._blocks(x, terms)
            terms = []
        else:
            y = torch.nn.functional.linear(x, m.weight, m.bias)
        if terms:
            xs = [_take(x, rows) for _, rows, _ in terms]
            ds = w.matmul_terms([key for key, _, _ in terms], [_float32(xr.reshape(-1, xr.shape[-1])) for xr in xs])
            for (_, rows, weights), xr, d in zip(terms, xs, ds):
                _add_rows(y, rows, d.reshape(*xr.shape[:-1], -1), weights)
        b = self.tensors.get("bias")
        if b is not None:
            for decision, rows in self.rt.groups(x.shape[0]):
                db = self.rt.small_delta(b, decision)
                if db is None:
                    continue
                db = db.reshape(-1).to(y.dtype)
                if rows is None:
                    y.add_(db)
                else:
                    y[rows] = y[rows] + db
        return y

    def _fused(self, x, terms):
        """Every row's weight in two products: y_all = x [W; W_1; ...; W_K]^T (the shared weight
        and the K stacked terms, bias on the shared block only), then y[b] = sum_j P[b, j] *
        y_all[b, j] with the plan's coefficients (P[b, 0] = 1; P[b, 1 + j] the row's weight of
        term j: 1 for a top-1 row, p_t for a mix, 0 for STATIC rows and other decisions)."""
        torch, _ = require_torch()
        m = self.module
        keys, wcat, bcat = self.rt.stack(m, self.tensors["weight"])
        p = self.rt.coefficients(keys, terms, x.shape[0], wcat.dtype)  # (batch, 1, 1 + K)
        y = torch.nn.functional.linear(x, wcat, bcat).view(-1, len(keys) + 1, m.out_features)
        if y.shape[0] != p.shape[0]:  # several tokens a row: each token takes its row's coefficients
            return torch.bmm(p.repeat_interleave(y.shape[0] // p.shape[0], dim=0), y).view(*x.shape[:-1], m.out_features)
        # one token a row (a decoding step, x (batch, 1, h)): bmm's (batch, 1, out) is the output's shape
        y = torch.bmm(p, y)
        return y if x.dim() == 3 else y.view(*x.shape[:-1], m.out_features)

    def _blocks(self, x, terms):
        """The shared product for every row, then each term's rows times its dense block of the
        stack (a long prefill: the fused product's (K+1)x FLOPs would not pay, and one dense
        product of a term's rows runs several times faster on a GPU than its sparse one)."""
        torch, _ = require_torch()
        m, F = self.module, torch.nn.functional
        keys, wcat, _ = self.rt.stack(m, self.tensors["weight"])
        n = m.out_features
        y = F.linear(x, m.weight, m.bias)
        for key, rows, weights in terms:
            j = 1 + keys.index(key)
            _add_rows(y, rows, F.linear(_take(x, rows), wcat[j * n : (j + 1) * n]), weights)
        return y

    def _full_weights(self, x, w, terms):
        """Each term's rows with its decision's full (cached) weight, the other rows with the
        shared one: one product per row, as the weight swap does, instead of shared + delta."""
        torch, _ = require_torch()
        m, F = self.module, torch.nn.functional
        if len(terms) == 1 and terms[0][1] is None:
            return F.linear(x, w.full(terms[0][0], m.weight), m.bias)
        y = torch.empty((*x.shape[:-1], m.out_features), dtype=x.dtype, device=x.device)
        for key, rows, _ in terms:
            _put(y, rows, F.linear(_take(x, rows), w.full(key, m.weight), m.bias))
        rest = self.rt.uncovered(w, x.shape[0])
        if rest is not None:
            _put(y, rest, F.linear(_take(x, rest), m.weight, m.bias))
        return y


class DeltaEmbedding(_Routed):
    def __call__(self, ids):
        torch, _ = require_torch()
        m = self.module
        self._check(ids.shape[0])
        y = torch.nn.functional.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        w = self.tensors["weight"]
        for key, rows, weights in self.rt.terms(w, ids.shape[0]):
            sel = _take(ids, rows)
            d = w.gather(key, sel.reshape(-1)).view(*sel.shape, -1)
            _add_rows(y, rows, d, weights)
        return y


class DeltaGrouped(_Routed):
    """Any other module (norms: 1-D weights). One whose output is affine in its 1-D tensors
    (AffineForm: RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm) runs ONCE over the batch with
    neutral tensors, then each row takes its decision's scale and shift; any other runs once
    per row group with the group's tensors. Both on a shallow copy of the module (thread-safe:
    the module itself is not touched)."""

    def __init__(self, runtime, module, tensors):
        super().__init__(runtime, module, tensors)
        self.forward = type(module).forward
        self.form = AffineForm.probe(module, tensors, self.forward)

    def __call__(self, x, *args, **kwargs):
        self._check(x.shape[0])
        groups = self.rt.groups(x.shape[0])
        if len(groups) > 1 and self.form is not None:
            return self.form.apply(self.forward, x, self.rt.row_params(self, x.shape[0]), *args, **kwargs)
        return self._per_group(groups, x, *args, **kwargs)

    def _per_group(self, groups: list, x, *args, **kwargs):
        torch, _ = require_torch()
        out = None
        for decision, rows in groups:
            params = self.rt.small_params(self.module, self.tensors, decision)
            if not params and rows is None:
                return self.forward(self.module, x, *args, **kwargs)
            shadow = _with_params(self.module, params)
            o = self.forward(shadow, _take(x, rows), *args, **kwargs)
            if rows is None:
                return o
            if out is None:
                out = torch.empty((x.shape[0], *o.shape[1:]), dtype=o.dtype, device=o.device)
            _put(out, rows, o)
        return out


class AffineForm:
    """A module whose output is, element by element of its last dimension, affine in its 1-D
    tensors of that length: y = (kappa + w) * n(x) + the sum of its shifts b, with at most one
    scale w (RMSNorm: kappa 0; Gemma's RMSNorm: kappa 1; LayerNorm: its bias a shift). A batch
    whose rows have different tensors then runs the module once with neutral ones (w = 1 - kappa,
    b = 0, so the output is n(x)) and applies each row's kappa + w and b after: one pass instead
    of one per row group.

    The form is found by running the module, never assumed from its class: on a probe input with
    every such tensor 0 (y0), then each at 1 (its coefficient c), then all random (r); the module
    qualifies when the random run gives y0 + sum r c, every c but one's (the scale's) is 1 and
    y0 = kappa * c of the scale."""

    # the probes run in float32: the random run differs from the affine prediction by rounding
    RTOL, ATOL = 1e-4, 1e-5

    def __init__(self, neutral, scale, kappa: float, shifts: tuple):
        self.neutral = neutral  # a shallow copy of the module holding the neutral tensors
        self.scale, self.kappa, self.shifts = scale, kappa, shifts  # attribute names

    @classmethod
    def probe(cls, module, routed: dict, forward) -> "AffineForm | None":
        """The module's form, or None (the per-group path) where it is not affine."""
        torch, _ = require_torch()
        own = dict(module.named_parameters(recurse=False))
        if not routed or any(own[a].dim() != 1 for a in routed):
            return None
        h = own[next(iter(routed))].shape[0]
        attrs = tuple(a for a, p in own.items() if p.dim() == 1 and p.shape[0] == h)
        if not set(routed) <= set(attrs):
            return None
        dev = own[attrs[0]].device
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((2, 3, h), generator=g, device=dev)
        fixed = {a: p.detach().float() for a, p in own.items()}

        def run(values: dict):
            with torch.no_grad():
                y = forward(_with_params(module, {**fixed, **values}), x)
            if not torch.is_tensor(y) or y.shape != x.shape:
                raise ValueError("not elementwise along the last dimension")
            return y.float()

        try:
            zero = {a: torch.zeros(h, device=dev) for a in attrs}
            y0 = run(zero)
            c = {a: run({**zero, a: torch.ones(h, device=dev)}) - y0 for a in attrs}
            r = {a: torch.randn(h, generator=g, device=dev) for a in attrs}
            y = run(r)
        except Exception:  # a module that cannot run on the probe keeps the per-group path
            return None
        tol = {"rtol": cls.RTOL, "atol": cls.ATOL * max(1.0, y.abs().max().item())}
        if not torch.allclose(y, y0 + sum(r[a] * c[a] for a in attrs), **tol):
            return None
        shifts = tuple(a for a in attrs if torch.allclose(c[a], torch.ones_like(c[a]), **tol))
        scales = [a for a in attrs if a not in shifts]
        if len(scales) > 1:
            return None
        scale, kappa = (scales[0] if scales else None), 0.0
        if scale is not None:  # y0 = kappa * c: kappa to 1/1024, so that 1 - kappa is exact
            cs = c[scale]
            kappa = round((y0 * cs).sum().item() / max((cs * cs).sum().item(), 1e-30) * 1024) / 1024
            if not torch.allclose(y0, kappa * cs, **tol):
                return None
        neutral = {a: torch.zeros_like(own[a]) for a in shifts}
        if scale is not None:
            neutral[scale] = torch.full_like(own[scale], 1.0 - kappa)
        return cls(_with_params(module, neutral), scale, kappa, shifts)

    def rows(self, module, groups: list, params_of, batch: int) -> tuple:
        """(scale, shift): float32 (batch, h) tensors, each row's kappa + w and sum of shifts
        (None where the form has none), from its group's tensors (params_of(decision): those
        that differ from the module's)."""
        torch, _ = require_torch()
        out = []
        for attrs, add in (((self.scale,) if self.scale else (), self.kappa), (self.shifts, 0.0)):
            t = None
            for decision, rows in groups if attrs else ():
                params = params_of(decision)
                v = sum(params.get(a, getattr(module, a)).float() for a in attrs) + add
                if t is None:
                    t = torch.empty((batch, v.shape[0]), dtype=torch.float32, device=v.device)
                _put(t, rows, v.expand(len(_indices(rows, batch)), -1))
            out.append(t)
        return tuple(out)

    def apply(self, forward, x, rows: tuple, *args, **kwargs):
        """The module once over the batch with the neutral tensors, then each row's scale and
        shifts (`rows`), in float32, rounded once to the module's output dtype."""
        torch, _ = require_torch()
        y = forward(self.neutral, x, *args, **kwargs)
        view = (y.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)
        scale, shift = (None if t is None else t.view(view) for t in rows)
        if scale is None:
            out = y.float() + shift
        elif shift is None:
            out = y.float() * scale
        else:
            out = torch.addcmul(shift, y.float(), scale)
        return out.to(y.dtype)


def _with_params(module, params: dict):
    import copy

    if not params:
        return module
    shadow = copy.copy(module)
    shadow._parameters = dict(module._parameters)
    shadow._parameters.update(params)
    return shadow


# Rows of a batch: None (all), a slice (a contiguous run: views, no copies; the serving runner
# keeps a batch's rows sorted by decision so that each group is one) or an int64 index tensor.


def _take(x, rows):
    """x[rows] along dim 0."""
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _float32(x):
    """x as float32 (itself when it is)."""
    torch, _ = require_torch()
    return x if x.dtype == torch.float32 else x.float()


def _put(y, rows, v) -> None:
    """y[rows] = v along dim 0."""
    if rows is None:
        y.copy_(v)
    elif isinstance(rows, slice):
        y[rows] = v
    else:
        y.index_copy_(0, rows, v)


def _add_rows(y, rows, d, weights) -> None:
    """y[rows] += weights[:, None...] * d (all of y when rows is None)."""
    if weights is not None:
        d = d * weights.view(-1, *([1] * (d.dim() - 1)))
    if d.dtype != y.dtype:
        d = d.to(y.dtype)
    if rows is None:
        y.add_(d)
    elif isinstance(rows, slice):
        y[rows].add_(d)  # in place on the view: `y[rows] += d` would copy it back onto itself
    else:
        y.index_add_(0, rows, d)


def _indices(rows, batch: int):
    """The row numbers of a rows value (None: all of the batch)."""
    if rows is None:
        return range(batch)
    if isinstance(rows, slice):
        return range(rows.start, rows.stop)
    return rows.tolist()
