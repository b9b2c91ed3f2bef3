"""The store's encodings decoded into torch, on the device: what the routed runtime (deltas.py)
multiplies and what a decision's dense weights are made of.

  SparseDelta     one task's sparse delta of one tensor (Mediator's S_t; a 1bit "sparse" task
                  vector): flat indices (int32 when they fit) and the values as stored:
                  Values (bf16) or Int8Values (int8 codes, a float32 scale per 64)
  TaskPiece       one task's 1bit-Merging encoding of one tensor (packed sign bits with their
                  scale(s): per tensor, row or group of a row; a sparse or a dense task vector), decoded as tau_hat (float32), whole
                  or by row range
  OneBitEncodings the encoded tensors of a 1bit store: theta_0 (from the base checkpoint) and
                  every task's TaskPiece
  onebit_terms    tau_hat_k and lambda * TIES({tau_hat_j : j != k}) of a decision (the election
                  is ops/consensus.py's `ties_torch`)
  mediator_weight D + S_k, or D + sum p_t S_t, in float32
  onebit_weight   theta_0 + tau_hat_k + lambda * TIES(others), in float32

The two *_weight functions reproduce the float32 arithmetic of `export --variant task:NAME`
operation by operation (encodings/sparse.py `apply_sparse`, encodings/onebit.py
`dynamic_merge_block`), with the torch decoding of kernels/onebit.py: elementwise IEEE float32
ops in the same order, so the result rounded to the store's dtype is the exported tensor, bit for
bit. The runtime adds the same terms to the shared weight's product instead (deltas.py).
"""

from __future__ import annotations

import numpy as np

from ..analysis.summary import module_kind
from ..checkpoints.blocks import num_rows, row_elems
from ..dtypes import float_type
from ..encodings.onebit import group_of, packed_cols, resolve_precision, unpack_signs_flat
from ..encodings.sparse import GROUP, decode_sparse_codes, dequantize_int8
from ..errors import StreammergeError
from ..kernels.onebit import scaled_signs, two_bit_hat
from ..kernels.onebit import unpack_rows as _unpack
from ..ops.consensus import ties_torch
from .decision import STATIC, Decision
from .runtime import require_torch, torch_dtype


def torch_from_raw(raw: np.ndarray, dtype_name: str):
    """A torch tensor (CPU) of a store array's raw values (bf16 arrives as uint16)."""
    torch, _ = require_torch()
    ft = float_type(dtype_name)
    a = np.ascontiguousarray(raw).view(ft.storage)
    if ft.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


class Values:
    """A sparse delta's values held as one float tensor (the stored bf16 values, exact)."""

    def __init__(self, values):
        self.values = values

    def numel(self) -> int:
        return self.values.numel()

    def float(self, entries=None):
        """float32 values of `entries` (None: all; a slice, an index or a boolean tensor)."""
        return (self.values if entries is None else self.values[entries]).to(require_torch()[0].float32, copy=True)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


class Int8Values:
    """A sparse delta's int8 values as stored (`value_bits` 8): int8 codes and one float32 scale
    per group of GROUP consecutive entries of a blob, 1 + 4 / GROUP bytes an entry (about 1.06)
    instead of bf16's 2. `float` decodes bf16(code * scale) (the float32 product rounded once),
    the numbers encodings/sparse.py's `dequantize_int8` gives the export, bit for bit.

    The groups restart at each blob (a row block), so a blob whose count is not a multiple of
    GROUP ends in a short group. A span is a run of blobs that only its last blob ends so: in
    it, entry i is in group (i + shift) // GROUP, shift = GROUP * (its first group) - (its first
    entry). Spans (their first entries and shifts, 16 bytes a span on the device; none kept
    for one span, shift 0) find the groups of some entries; the whole decode repeats each scale
    GROUP times and takes each span's run of that, which is 4x faster than repeating each
    scale by its group's size (repeat_interleave) on CPU."""

    def __init__(self, codes, scales, spans: list):
        torch, _ = require_torch()
        self.codes, self.scales = codes, scales  # int8 (entries,), float32 (groups,)
        self.spans = spans  # [(first entry, shift)], ascending
        on = lambda v: torch.tensor(v, dtype=torch.int64, device=codes.device)  # noqa: E731
        self.span_first = on([e for e, _ in spans]) if len(spans) > 1 else None
        self.span_shift = on([d for _, d in spans]) if len(spans) > 1 else None

    @classmethod
    def from_blobs(cls, parts: list, device) -> "Int8Values":
        """From [(float32 scales, int8 codes)] of consecutive blobs."""
        torch, _ = require_torch()
        spans, entry, group, short = [], 0, 0, True
        for scale, q in parts:
            if short and q.size:  # the previous blob ended in a short group: a new span
                spans.append((entry, GROUP * group - entry))
            short = q.size % GROUP != 0 or (short and not q.size)
            entry, group = entry + q.size, group + scale.size
        codes = np.concatenate([q for _, q in parts]) if parts else np.zeros(0, np.int8)
        scales = np.concatenate([s for s, _ in parts]) if parts else np.zeros(0, np.float32)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return cls(t(codes), t(scales), spans or [(0, 0)])

    def numel(self) -> int:
        return self.codes.numel()

    def float(self, entries=None):
        """float32 values of `entries` (None: all; a slice, an index or a boolean tensor)."""
        torch, _ = require_torch()
        n = self.codes.numel()
        if entries is None:
            per_group = self.scales.view(-1, 1).expand(-1, GROUP).reshape(-1)
            ends = [e for e, _ in self.spans[1:]] + [n]
            runs = [per_group[e + d : end + d] for (e, d), end in zip(self.spans, ends)]
            scale, codes = runs[0] if len(runs) == 1 else torch.cat(runs), self.codes
        else:
            if isinstance(entries, slice):
                i = torch.arange(*entries.indices(n), device=self.codes.device)
            else:
                i = entries.nonzero().view(-1) if entries.dtype == torch.bool else entries.long()
            if self.span_first is not None:
                i_group = i + self.span_shift[torch.searchsorted(self.span_first, i, right=True) - 1]
            else:
                i_group = i
            scale, codes = self.scales[torch.div(i_group, GROUP, rounding_mode="floor")], self.codes[i]
        return codes.float().mul_(scale).to(torch.bfloat16).float()

    @property
    def nbytes(self) -> int:
        extra = [] if self.span_first is None else [self.span_first, self.span_shift]
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, *extra))


class SparseDelta:
    """One task's sparse delta of one tensor: flat indices (int32 when they fit) and the values
    as stored (Values: bf16; Int8Values: int8 groups), on the device."""

    def __init__(self, store, path: str, job: dict, device):
        torch, _ = require_torch()
        self.size = n = tensor_elems(job)
        itype = np.int32 if n < 2**31 else np.int64
        offs, blobs = [], []
        for start, off, scale, val in sparse_blocks(store, path, job):
            offs.append((off + start).astype(itype))  # narrowed a block at a time: 4 bytes an entry, not 8
            blobs.append((scale, val))
        self.index = torch.from_numpy(np.concatenate(offs) if offs else np.zeros(0, itype)).to(device)
        self.value = stored_values(blobs, device)

    def add_into(self, flat, weight=None, start: int = 0):
        """flat[index - start] += weight * value for the indices in [start, start + flat.numel())
        (float32: the product rounded once, then the sum)."""
        torch, _ = require_torch()
        index, entries = self.index, None
        if index.numel() == 0:
            return flat
        if start or flat.numel() < self.size:  # a row range: the indices are sorted
            bounds = torch.tensor([start, start + flat.numel()], dtype=index.dtype, device=index.device)
            lo, hi = torch.searchsorted(index, bounds).tolist()
            index, entries = index[lo:hi] - start, slice(lo, hi)
            if index.numel() == 0:
                return flat
        v = self.value.float(entries)
        if weight is not None:
            v.mul_(weight)
        flat.index_add_(0, index, v)  # indices are unique within a task
        return flat

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.value.nbytes


def tensor_elems(job: dict) -> int:
    return int(np.prod(job["shape"], dtype=np.int64)) if job["shape"] else 1


def sparse_blocks(store, path: str, job: dict, blobs: list | None = None):
    """Each stored block of one task's sparse tensor, decoded and checked: (its first entry in
    the flattened tensor, int64 offsets within the block, scales or None, values as stored:
    int8 codes with their scales, else a bf16 tensor, narrowed at once: 2 bytes an entry, not
    float32's 4), from encodings/sparse.py `decode_sparse_codes`. `blobs`: the blocks' bytes
    already read (each is dropped from the list once decoded)."""
    per_block = job["block_rows"] * row_elems(tuple(job["shape"]))
    n = tensor_elems(job)
    for b in range(job["nblocks"]):
        blob = store.read_blob(path, b) if blobs is None else blobs[b]
        if blobs is not None:
            blobs[b] = None
        # the block's element count bounds (and checks) the blob's offsets
        off, scale, val = decode_sparse_codes(blob, size=min(per_block, n - b * per_block))
        yield b * per_block, off, scale, bf16_values(None, val) if scale is None else val


def stored_values(blobs: list, device):
    """The values of consecutive blobs [(scales or None, values)] as `sparse_blocks` gives them:
    Int8Values when every blob holds int8 groups, else Values in bf16 (exact: int8 groups
    decode to bf16 numbers), each int8 blob's narrowed to bf16 before they are joined."""
    torch, _ = require_torch()
    if blobs and all(scale is not None for scale, _ in blobs):
        return Int8Values.from_blobs(blobs, device)
    vals = [v if scale is None else bf16_values(scale, v) for scale, v in blobs]
    return Values((torch.cat(vals) if vals else torch.zeros(0, dtype=torch.bfloat16)).to(device))


def bf16_values(scale, values):
    """A blob's values (float32, or int8 codes with their scales) as a bf16 tensor on the CPU:
    exact, the stored values are bf16 numbers."""
    torch, _ = require_torch()
    return torch.from_numpy(values if scale is None else dequantize_int8(scale, values)).to(torch.bfloat16)


class TaskPiece:
    """One task's encoding of one tensor, reconstructed on the device as tau_hat (float32)."""

    def __init__(self, kind: str, **parts):
        self.kind = kind
        self.parts = parts

    def tau_hat(self, shape, device, rows: tuple[int, int] | None = None):
        """tau_hat of the whole tensor, or of rows [r0, r1) (tensors of rank >= 2)."""
        torch, _ = require_torch()
        p = self.parts
        shape = tuple(shape)
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        out_shape = (r1 - r0, *shape[1:]) if rows is not None else shape
        def row_scale(name):
            return (p[name] if rows is None else p[name][r0:r1]).reshape(-1, 1)

        if self.kind in ("1bit", "1bit-row"):
            scale = p["alpha"] if self.kind == "1bit" else row_scale("scale")
            return scaled_signs(_unpack(p["bits"], p["cols"], rows), scale).reshape(out_shape)
        if self.kind == "1bit-group":  # (rows, groups) scales, each over `group` columns
            g = p["scale"] if rows is None else p["scale"][r0:r1]
            scale = g.repeat_interleave(p["group"], dim=1)[:, : p["cols"]]
            return scaled_signs(_unpack(p["bits"], p["cols"], rows), scale).reshape(out_shape)
        if self.kind == "2bit":
            m1, m2 = (_unpack(p[bits], p["cols"], rows) for bits in ("bits", "bits2"))
            return two_bit_hat(m1, m2, row_scale("scale"), row_scale("scale2")).reshape(out_shape)
        n = int(np.prod(out_shape, dtype=np.int64)) if out_shape else 1
        if self.kind == "sparse":
            flat = torch.zeros(n, dtype=torch.float32, device=device)
            p["sparse"].add_into(flat, start=r0 * row_elems(shape) if rows is not None else 0)
            return flat.reshape(out_shape)
        d = p["dense"] if rows is None else p["dense"][r0:r1]
        return d.to(torch.float32).reshape(out_shape)  # dense: bf16 task vector

    @property
    def nbytes(self) -> int:
        n = 0
        for v in self.parts.values():
            if isinstance(v, SparseDelta):
                n += v.nbytes
            elif hasattr(v, "element_size"):
                n += v.numel() * v.element_size()
        return n


CHUNK_ELEMENTS = 1 << 24  # decoding works on row ranges of about this many elements (bounds float32 temporaries)


class OneBitEncodings:
    """theta_0 and every task's encoding of each encoded tensor of a 1bit store, on the device
    (theta_0 in the base's dtype)."""

    def __init__(self, store, method: dict, device):
        torch, _ = require_torch()
        from ..export.variants import base_checkpoint, read_base_rows

        self.tasks = list(method["tasks"])
        self.lam = float(method["lambda"])
        self.device = device
        self.names = []
        self.shape: dict[str, tuple] = {}
        self.store_dtype: dict[str, object] = {}
        self.base: dict[str, object] = {}
        self.pieces: dict[str, dict[str, TaskPiece | None]] = {}
        jobs = [j for j in store.jobs if j["stage"] == "encode"]
        handles = base_checkpoint(store).tensors if jobs else {}
        for job in jobs:
            name, shape = job["name"], tuple(job["shape"])
            self.names.append(name)
            self.shape[name] = shape
            self.store_dtype[name] = torch_dtype(store.dtype(name).name)
            h = handles.get(name)
            if h is None:
                raise StreammergeError(f"{store.path}: tensor {name} is not in the base model any more; rebuild with --restart")
            base32 = read_base_rows(h, 0, num_rows(shape))
            bt = float_type(h.dtype).name
            self.base[name] = torch.from_numpy(np.ascontiguousarray(base32)).to(torch_dtype(bt)).reshape(shape).to(device)
            stats = store.load_stats("encode", job["key"]) or {}
            kind = module_kind(name)
            self.pieces[name] = {t: self._piece(store, method, job, t, kind, stats, device) for t in self.tasks}

    @staticmethod
    def _piece(store, method, job, task, kind, stats, device) -> TaskPiece | None:
        torch, _ = require_torch()
        shape = tuple(job["shape"])
        k, _rho = resolve_precision(method["precision"][task][kind], method["granularity"], shape, method["rho"])
        if k == "drop":
            return None
        key = job["key"]
        if k in ("1bit", "1bit-row", "1bit-group"):
            path = f"{key}/{task}.bits"
            if len(shape) >= 2:
                packed = np.asarray(store.array_at(path)[:], dtype=np.uint8).reshape(shape[0], packed_cols(shape))
                cols = int(np.prod(shape[1:], dtype=np.int64))
            else:  # 1-D / 0-D: per-block blobs of the flat signs, repacked as one row
                n = int(np.prod(shape, dtype=np.int64)) if shape else 1
                br = job["block_rows"]
                signs = [unpack_signs_flat(store.read_blob(path, b), min(n, (b + 1) * br) - b * br) for b in range(job["nblocks"])]
                packed = np.packbits(np.concatenate(signs) > 0, bitorder="little").reshape(1, -1)
                cols = n
            parts = {"bits": torch.from_numpy(np.ascontiguousarray(packed)).to(device), "cols": cols}
            if k == "1bit":
                alpha = stats.get(f"{task}.alpha")
                if alpha is None:
                    raise StreammergeError(f"{store.path}: no scale for task {task} of {job['name']} (stats missing); rebuild")
                parts["alpha"] = torch.tensor(np.float32(alpha), dtype=torch.float32, device=device)
            else:  # 1bit-row: (rows,); 1bit-group: (rows, groups)
                scale = np.asarray(store.array_at(f"{key}/{task}.scale")[:], dtype=np.float32)
                parts["scale"] = torch.from_numpy(scale.copy()).to(device)
                if k == "1bit-group":
                    parts["group"] = group_of(method["granularity"])
            return TaskPiece(k, **parts)
        if k == "2bit":
            parts = {"cols": int(np.prod(shape[1:], dtype=np.int64))}
            for name in ("bits", "bits2"):
                packed = np.asarray(store.array_at(f"{key}/{task}.{name}")[:], dtype=np.uint8).reshape(shape[0], packed_cols(shape))
                parts[name] = torch.from_numpy(np.ascontiguousarray(packed)).to(device)
            for name in ("scale", "scale2"):
                parts[name] = torch.from_numpy(np.asarray(store.array_at(f"{key}/{task}.{name}")[:], dtype=np.float32).copy()).to(device)
            return TaskPiece("2bit", **parts)
        if k == "sparse":
            return TaskPiece("sparse", sparse=SparseDelta(store, f"{key}/{task}.sparse", job, device))
        raw = store.array_at(f"{key}/{task}.dense")[:]
        return TaskPiece("dense", dense=torch_from_raw(raw, "bfloat16").to(device))

    @property
    def nbytes(self) -> int:
        n = sum(b.numel() * b.element_size() for b in self.base.values())
        return n + sum(pc.nbytes for ps in self.pieces.values() for pc in ps.values() if pc is not None)


# ---- a decision's terms and weights ---------------------------------------------------------


def onebit_terms(hat, pieces: dict, key: tuple, lam: float, device):
    """(tau_hat_k, lambda * TIES({tau_hat_j : j != k})) of decision `key` (task k, or STATIC: no
    own term, TIES of all), each None where absent. hat(task) -> that task's float32 tau_hat
    (of whatever rows the caller decodes); pieces: task -> TaskPiece | None (dropped)."""
    torch, _ = require_torch()
    k = None if key == STATIC.key else key[1]
    own = hat(k) if k is not None and pieces[k] is not None else None
    ties = None
    if lam != 0:
        others = [hat(t) for t, pc in pieces.items() if t != k and pc is not None]
        if others:
            ties = ties_torch(others).mul_(torch.tensor(lam, dtype=torch.float32, device=device))
    return own, ties


def onebit_weight(base, hat, pieces: dict, key: tuple, lam: float, device):
    """theta_0 + tau_hat_k + lambda * TIES(others) in float32, in the export's order of
    operations (base: theta_0 of the same rows, any float dtype)."""
    w = base.to(require_torch()[0].float32, copy=True)
    for term in onebit_terms(hat, pieces, key, lam, device):
        if term is not None:
            w.add_(term)
    return w


def mediator_weight(dense, experts: dict, decision: Decision):
    """D + S_k (top-1), D + sum_t p_t S_t (mix: each product rounded once, then the sum) or D
    (STATIC), float32; dense: D, experts: task -> SparseDelta of the same tensor."""
    torch, _ = require_torch()
    w = dense.to(torch.float32, copy=True).contiguous()
    flat = w.view(-1)
    for task, p in decision.weights:
        weight = torch.tensor(p, dtype=torch.float32, device=w.device) if decision.mode == "mix" else None
        experts[task].add_into(flat, weight)
    return w
