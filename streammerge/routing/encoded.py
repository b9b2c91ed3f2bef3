"""The weights of a routing decision, built on the device from the store's encodings.

Only the tensors routing changes are built (Mediator: the tensors of the routed layers, i.e.
those with an `experts/` job; 1bit-Merging: those with an `encodings/` job); every other tensor
of the merged model is already what every decision uses.

The pieces are read from the store once and kept on the device in compact form:
  Mediator  the dense expert D (the merged model's own tensor when the compute dtype holds it
            exactly, else a copy in the store's dtype) and, per task, the sparse expert S_t as
            flat indices (int32 when they fit) and bf16 values;
  1bit      theta_0 of the encoded tensors (in the base's dtype) and, per task, packed sign
            bits (uint8) with their scale (1bit / 1bit-row; 2bit: two of each), or sparse /
            dense task vectors.

A build reproduces the float32 arithmetic of `export --variant task:NAME` operation by
operation (encodings/sparse.py `apply_sparse`, encodings/onebit.py `dynamic_merge_block`), with
the torch decoding of kernels/onebit.py and the sign election of ops/consensus.py (`ties_torch`):
elementwise IEEE float32 ops with no reassociation, so the result, rounded to the store's dtype
(nearest even, as the export writes it), is bit-identical to the exported tensor; it is then cast
to the model's compute dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..analysis.summary import module_kind
from ..checkpoints.blocks import num_rows, row_elems
from ..dtypes import float_type
from ..encodings.onebit import packed_cols, resolve_precision, unpack_signs_flat
from ..encodings.sparse import decode_sparse
from ..errors import StreammergeError
from ..kernels.onebit import scaled_signs, two_bit_hat
from ..kernels.onebit import unpack_rows as _unpack
from ..ops.consensus import ties_torch
from .decision import Decision
from .runtime import require_torch, torch_dtype


def _torch_from_raw(raw: np.ndarray, dtype_name: str):
    """A torch tensor (CPU) of a store array's raw values (bf16 arrives as uint16)."""
    torch, _ = require_torch()
    ft = float_type(dtype_name)
    a = np.ascontiguousarray(raw).view(ft.storage)
    if ft.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


class _Sparse:
    """One task's sparse pieces of one tensor: flat indices and bf16 values, on the device."""

    def __init__(self, store, path: str, job: dict, device):
        torch, _ = require_torch()
        per_block = job["block_rows"] * row_elems(tuple(job["shape"]))
        n = int(np.prod(job["shape"], dtype=np.int64)) if job["shape"] else 1
        offs, vals = [], []
        for b in range(job["nblocks"]):
            # the block's element count bounds (and checks) the blob's offsets
            off, val = decode_sparse(store.read_blob(path, b), size=min(per_block, n - b * per_block))
            offs.append(off + b * per_block)
            vals.append(val)
        off = np.concatenate(offs) if offs else np.zeros(0, np.int64)
        val = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        self.size = n
        itype = np.int32 if n < 2**31 else np.int64
        self.index = torch.from_numpy(off.astype(itype)).to(device)
        self.value = torch.from_numpy(val).to(torch.bfloat16).to(device)  # exact: values are bf16

    def add_into(self, flat, weight=None, start: int = 0):
        """flat[index - start] += weight * value for the indices in [start, start + flat.numel())
        (float32: the product rounded once, then the sum)."""
        torch, _ = require_torch()
        index, value = self.index, self.value
        if index.numel() == 0:
            return flat
        if start or flat.numel() < self.size:  # a row range: the indices are sorted
            bounds = torch.tensor([start, start + flat.numel()], dtype=index.dtype, device=index.device)
            lo, hi = torch.searchsorted(index, bounds).tolist()
            index, value = index[lo:hi] - start, value[lo:hi]
            if index.numel() == 0:
                return flat
        v = value.float()
        if weight is not None:
            v.mul_(weight)
        flat.index_add_(0, index, v)  # indices are unique within a task
        return flat

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.value.numel() * 2


class WeightBuilder:
    """Builds {tensor name: weight on the device, in the compute dtype} for a decision."""

    method: str
    names: list[str]

    def build(self, decision: Decision) -> dict:
        raise NotImplementedError

    @property
    def device_bytes(self) -> int:
        return 0


class MediatorWeights(WeightBuilder):
    method = "mediator"

    def __init__(self, store, method: dict, device, dtype, merged: Callable[[str], object]):
        torch, _ = require_torch()
        self.tasks = list(method["tasks"])
        self.dtype = dtype
        self.store_dtype: dict[str, object] = {}
        self.dense: dict[str, object] = {}
        self.experts: dict[str, dict[str, _Sparse]] = {}
        self.names = []
        for job in store.jobs:
            if job["stage"] != "experts":
                continue
            name = job["name"]
            self.names.append(name)
            sd = torch_dtype(store.dtype(name).name)
            self.store_dtype[name] = sd
            if dtype == sd or dtype == torch.float32:
                self.dense[name] = merged(name)  # D is the merged model's tensor: no copy
            else:
                raw = store.read_block(name, 0, num_rows(tuple(job["shape"])))
                self.dense[name] = _torch_from_raw(raw, store.dtype(name).name).reshape(job["shape"]).to(device)
            self.experts[name] = {t: _Sparse(store, f"{job['key']}/{t}", job, device) for t in self.tasks}

    def build(self, decision: Decision) -> dict:
        torch, _ = require_torch()
        if decision.mode == "static":
            raise ValueError("the static decision is the merged model itself")
        out = {}
        for name in self.names:
            D = self.dense[name]
            w = D.to(torch.float32, copy=True).contiguous()
            flat = w.view(-1)
            for task, p in decision.weights:
                sp = self.experts[name][task]
                if decision.mode == "mix":
                    sp.add_into(flat, torch.tensor(p, dtype=torch.float32, device=w.device))
                else:
                    sp.add_into(flat)
            out[name] = w.to(self.store_dtype[name]).to(self.dtype)
        return out

    @property
    def device_bytes(self) -> int:
        return sum(s.nbytes for e in self.experts.values() for s in e.values())


class _TaskPiece:
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
            if isinstance(v, _Sparse):
                n += v.nbytes
            elif hasattr(v, "element_size"):
                n += v.numel() * v.element_size()
        return n


CHUNK_ELEMENTS = 1 << 24  # a 1bit build works on row ranges of about this many elements


class OneBitWeights(WeightBuilder):
    method = "1bit"

    def __init__(self, store, method: dict, device, dtype):
        torch, _ = require_torch()
        from ..export.variants import base_checkpoint, read_base_rows

        self.tasks = list(method["tasks"])
        self.lam = float(method["lambda"])
        self.dtype = dtype
        self.device = device
        self.names = []
        self.shape: dict[str, tuple] = {}
        self.store_dtype: dict[str, object] = {}
        self.base: dict[str, object] = {}
        self.pieces: dict[str, dict[str, _TaskPiece | None]] = {}
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
    def _piece(store, method, job, task, kind, stats, device) -> _TaskPiece | None:
        torch, _ = require_torch()
        shape = tuple(job["shape"])
        k, _rho = resolve_precision(method["precision"][task][kind], method["granularity"], shape, method["rho"])
        if k == "drop":
            return None
        key = job["key"]
        if k in ("1bit", "1bit-row"):
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
            else:
                scale = np.asarray(store.array_at(f"{key}/{task}.scale")[:], dtype=np.float32)
                parts["scale"] = torch.from_numpy(scale.copy()).to(device)
            return _TaskPiece(k, **parts)
        if k == "2bit":
            parts = {"cols": int(np.prod(shape[1:], dtype=np.int64))}
            for name in ("bits", "bits2"):
                packed = np.asarray(store.array_at(f"{key}/{task}.{name}")[:], dtype=np.uint8).reshape(shape[0], packed_cols(shape))
                parts[name] = torch.from_numpy(np.ascontiguousarray(packed)).to(device)
            for name in ("scale", "scale2"):
                parts[name] = torch.from_numpy(np.asarray(store.array_at(f"{key}/{task}.{name}")[:], dtype=np.float32).copy()).to(device)
            return _TaskPiece("2bit", **parts)
        if k == "sparse":
            return _TaskPiece("sparse", sparse=_Sparse(store, f"{key}/{task}.sparse", job, device))
        raw = store.array_at(f"{key}/{task}.dense")[:]
        return _TaskPiece("dense", dense=_torch_from_raw(raw, "bfloat16").to(device))

    def build(self, decision: Decision) -> dict:
        torch, _ = require_torch()
        if decision.mode == "static":
            raise ValueError("the static decision is the merged model itself")
        if decision.mode == "mix":
            raise ValueError("1bit-Merging routes top-1 only")
        k = decision.task
        lam = torch.tensor(self.lam, dtype=torch.float32, device=self.device)
        out = {}
        for name in self.names:
            shape = self.shape[name]
            if len(shape) < 2:
                out[name] = self._merge(name, k, lam, None)
                continue
            # row ranges bound the float32 temporaries (N task vectors, TIES) whatever the tensor
            step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
            if step >= shape[0]:
                out[name] = self._merge(name, k, lam, None)
                continue
            res = torch.empty(shape, dtype=self.dtype, device=self.device)
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                res[r0:r1] = self._merge(name, k, lam, (r0, r1))
            out[name] = res
        return out

    def _merge(self, name: str, k: str, lam, rows):
        """theta_0 + tau_hat_k + lambda * TIES(others) of a tensor or of its rows [r0, r1),
        rounded to the store's dtype, in the compute dtype (elementwise: chunking changes nothing)."""
        torch, _ = require_torch()
        shape = self.shape[name]
        base = self.base[name] if rows is None else self.base[name][rows[0] : rows[1]]
        w = base.to(torch.float32, copy=True)
        hats = {t: (pc.tau_hat(shape, self.device, rows) if pc is not None else None) for t, pc in self.pieces[name].items()}
        if hats[k] is not None:
            w.add_(hats[k])
        others = [h for t, h in hats.items() if t != k and h is not None]
        if others:
            w.add_(ties_torch(others).mul_(lam))
        return w.to(self.store_dtype[name]).to(self.dtype)

    @property
    def device_bytes(self) -> int:
        n = sum(b.numel() * b.element_size() for b in self.base.values())
        return n + sum(pc.nbytes for ps in self.pieces.values() for pc in ps.values() if pc is not None)


def make_builder(store, method: dict, device, dtype, merged: Callable[[str], object]) -> WeightBuilder:
    if method["method"] == "mediator":
        return MediatorWeights(store, method, device, dtype, merged)
    return OneBitWeights(store, method, device, dtype)
