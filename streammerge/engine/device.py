"""Running tensor jobs on a GPU (`build --device cuda`): one task per tensor.

The CPU path streams a tensor block by block through the method's passes and merge. On a GPU
a whole tensor fits, so a job whose method has a `kernel` becomes one task that

  1. reads every row block of every input on the host with `pread` into a pinned buffer
     (two per thread, alternating, so the next read overlaps the previous upload) and copies
     the raw 2-byte data to the device asynchronously;
  2. converts to float32 and checks for NaN/Inf there, then runs the kernel (thresholds,
     norms and sums included: no passes);
  3. rounds each output to its storage dtype on the device and brings it back block by block,
     writing the block's zarr chunk and then its completion marker, as the CPU path does.

Host memory stays at two staging buffers per worker thread; device memory is shared by the
worker threads through a budget (a tensor waits until enough is free, and one that could
never fit runs on the CPU path). Each thread issues its work on its own CUDA stream.
Resume works as on the CPU path: the tensor is recomputed, but only unmarked blocks are written.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from ..checkpoints.blocks import nonfinite_error, read_raw, read_rows
from ..dtypes import FLOAT_TYPES, float_type, torch_dtype
from ..errors import StreammergeError
from ..kernels import DeviceTensor
from ..plan.planner import TensorJob
from ..store.store import Store

# Float32 copies of the inputs plus this many tensor-sized float32 temporaries in a kernel.
KERNEL_TEMPORARIES = 8
# Share of the device memory free at the start that the worker threads may fill together.
DEVICE_MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class DeviceChoice:
    # A torch device string ("cuda", "cuda:1") for kernels, or None for the numpy CPU path.
    # (Tests also run the kernel path on torch's "cpu" device, to check it without a GPU.)
    device: str | None
    message: str | None = None  # said to the user when the request could not be honoured


def _nvidia_driver_present() -> bool:
    # Cheap test before importing torch (~1 s): a CPU box has no NVIDIA driver.
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")


def _known_without_torch(spec: str) -> DeviceChoice | None:
    """The choice for `spec` where it needs no torch (cpu; auto on a box without a driver), else
    None; an unknown spec is refused."""
    if spec == "cpu":
        return DeviceChoice(None)
    if spec != "auto" and spec != "cuda" and not spec.startswith("cuda:"):
        raise StreammergeError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "auto" and not _nvidia_driver_present():
        return DeviceChoice(None)
    return None


def choose_device(spec: str) -> DeviceChoice:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> where the build computes."""
    spec = (spec or "auto").strip().lower()
    known = _known_without_torch(spec)
    if known is not None:
        return known
    try:
        import torch
    except ImportError:
        why = "torch is not installed"
    else:
        if torch.cuda.is_available():
            device = "cuda" if spec == "auto" else spec
            index = torch.device(device).index or 0
            if index >= torch.cuda.device_count():
                raise StreammergeError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
            return DeviceChoice(device)
        why = "no CUDA device is available to torch"
    if spec == "auto":
        return DeviceChoice(None)
    return DeviceChoice(None, f"--device {spec}: {why}; computing on the CPU")


def start_device(spec: str) -> Future:
    """`choose_device(spec)` as a future, computed in a background thread that then starts the
    chosen device (its CUDA context): torch's import and CUDA's start-up, seconds of a GPU
    build, overlap the planning, the store's creation and the buffers' copy instead of preceding
    them (`build` waits for the choice only when it starts running tasks). A spec that is wrong,
    or that needs no torch, is answered at once."""
    norm = (spec or "auto").strip().lower()
    known = _known_without_torch(norm)
    future: Future = Future()
    if known is not None:
        future.set_result(known)
        return future

    def choose() -> None:
        try:
            choice = choose_device(norm)
        except BaseException as e:  # noqa: BLE001 - raised by whoever waits for the choice
            future.set_exception(e)
            return
        if choice.device is not None:
            try:
                import torch

                torch.empty(1, device=choice.device)  # creates the context now
            except Exception:  # noqa: BLE001 - the device task reports it, where it is used
                pass
        future.set_result(choice)

    threading.Thread(target=choose, name="streammerge-device-start", daemon=True).start()
    return future


def job_device_bytes(job: TensorJob) -> int:
    """Device memory a job needs at most: float32 inputs, the raw upload, kernel temporaries."""
    inputs = len(job.inputs)
    return job.numel * (4 * (inputs + KERNEL_TEMPORARIES) + max(2, element_bytes(job) - 4))


def element_bytes(job: TensorJob) -> int:
    """The widest element a block of `job` stages on the host: float32, or a wider raw input or
    output (float64)."""
    sizes = [float_type(h.dtype).itemsize for h in job.inputs if h.has_raw]
    sizes += [(FLOAT_TYPES.get(o.dtype) or np.dtype(o.dtype)).itemsize for o in job.output_list if not o.blob]
    return max([4, *sizes])


class DeviceBudget:
    """Bytes of device memory the worker threads may hold at once (a counting semaphore)."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._cond = threading.Condition()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.total

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.free >= nbytes)
            self.free -= nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.free += nbytes
            self._cond.notify_all()


_budgets: dict[str, DeviceBudget] = {}
_budgets_lock = threading.Lock()


def device_budget(device: str) -> DeviceBudget:
    """One budget per device and process (dask.distributed workers each get their own)."""
    with _budgets_lock:
        budget = _budgets.get(device)
        if budget is None:
            import torch

            if torch.device(device).type == "cuda":
                free, _total = torch.cuda.mem_get_info(torch.device(device))
            else:  # torch on the host (tests): what the machine has available
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = _budgets[device] = DeviceBudget(int(free * DEVICE_MEMORY_SHARE))
        return budget


# ---- per-thread resources ---------------------------------------------------------------------

_tls = threading.local()


class _Staging:
    """Two pinned host buffers used alternately: reading into one while the other uploads."""

    def __init__(self, nbytes: int, pinned: bool):
        import torch

        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def next(self, nbytes: int):
        """(pinned tensor of nbytes, its numpy view), once the previous copy out of it is done."""
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        t = self.buffers[i][:nbytes]
        return i, t, t.numpy()

    def copied(self, i: int, stream) -> None:
        if stream is not None:
            self.events[i] = stream.record_event()


def _thread_resources(device: str, block_bytes: int):
    """This thread's CUDA stream (None on the host) and staging buffers for `device`."""
    import torch

    res = getattr(_tls, "res", None)
    if res is None or res[0] != device or res[2].buffers[0].numel() < block_bytes:
        cuda = torch.device(device).type == "cuda"
        stream = torch.cuda.Stream(device=torch.device(device)) if cuda else None
        res = _tls.res = (device, stream, _Staging(block_bytes, pinned=cuda))
    return res[1], res[2]


# ---- the task ---------------------------------------------------------------------------------


def _torch_storage(ftype_name: str):
    import torch

    value = torch_dtype(ftype_name)
    return (torch.int16 if value == torch.bfloat16 else value), value  # bf16 travels as its bits


def _upload(job: TensorJob, device: str, stream, staging: _Staging):
    """Every input of `job` as a float32 device tensor of shape (rows, *shape[1:])."""
    import torch

    rows_shape = (job.rows, *job.shape[1:]) if job.shape else (1,)
    out = []
    for h in job.inputs:
        # stored bytes go up as they are and are widened on the device; a handle without them
        # (a LoRA-applied weight) is read as float32 rows on the host
        ftype = float_type(h.dtype if h.has_raw else "float32")
        raw_dtype, value_dtype = _torch_storage(ftype.name)
        raw = torch.empty(job.numel, dtype=raw_dtype, device=device)
        for i in range(job.nblocks):
            r0, r1 = job.block_range(i)
            n = (r1 - r0) * job.row_elems
            slot, pinned, host = staging.next(n * ftype.itemsize)
            if h.has_raw:
                read_raw(h, r0, r1, host)
            else:
                read_rows(h, r0, r1, host.view(np.float32))
            raw[r0 * job.row_elems : r1 * job.row_elems].copy_(pinned.view(raw_dtype), non_blocking=True)
            staging.copied(slot, stream)
        values = raw.view(value_dtype).float() if value_dtype is not torch.float32 else raw
        del raw
        if getattr(h, "check_finite", True):
            bad = ~torch.isfinite(values)
            if bool(bad.any()):
                index = int(bad.nonzero()[0, 0])
                raise nonfinite_error(h, index, float(values[index]))
        out.append(values.reshape(rows_shape))
    return out


def _storage_rows(value, out_dtype: str):
    """A result rounded to its storage dtype on the device (bf16 as int16 bits), and the numpy
    dtype the store keeps it as."""
    import torch

    try:
        ftype = float_type(out_dtype)
    except KeyError:  # packed bits, indices: stored as returned
        return value.to(getattr(torch, np.dtype(out_dtype).name)), np.dtype(out_dtype)
    raw_dtype, value_dtype = _torch_storage(ftype.name)
    rounded = value.to(value_dtype)  # round to nearest even, as dtypes.from_float32
    return rounded.view(raw_dtype), ftype.storage


def device_task(method, store: Store, job: TensorJob, todo: list[int], device: str) -> None:
    """Compute `job` on `device` with `method.kernel`; write the blocks in `todo`, then mark them."""
    import torch

    budget = device_budget(device)
    need = job_device_bytes(job)
    block_bytes = job.block_rows * job.row_elems * element_bytes(job)
    budget.acquire(need)
    try:
        stream, staging = _thread_resources(device, block_bytes)
        with torch.cuda.stream(stream) if stream is not None else nullcontext(), torch.inference_mode():
            arrays = _upload(job, device, stream, staging)
            base = arrays.pop(0) if job.base is not None else None
            x = DeviceTensor(job.name, job.shape, base, tuple(arrays), tuple(job.block_range(i) for i in range(job.nblocks)))
            result = method.kernel(x, job.params)
            del x, base, arrays
            _write_results(store, job, todo, result, staging)
    finally:
        budget.release(need)


def _write_results(store: Store, job: TensorJob, todo: list[int], result, staging: _Staging) -> None:
    stats = None
    if isinstance(result, tuple):  # (outputs, stats): stats later readers of the store need
        result, stats = result
    outputs = job.output_list
    if not isinstance(result, dict):
        result = {outputs[0].name: result}
    if stats is not None:
        store.save_stats(job.stage, job.store_key, stats)
    rounded = {}
    for out in outputs:
        if not out.blob:
            rounded[out.name] = _storage_rows(result[out.name], out.dtype)
    for i in todo:
        r0, r1 = job.block_range(i)
        with store.committing(job.stage, job.store_key, i) as block:
            for out in outputs:
                path = job.output_path(out)
                if out.blob:
                    block.blob(path, result[out.name][i])
                    continue
                values, storage = rounded[out.name]
                rows = values[r0:r1]
                # Through the pinned buffers: a fresh pageable array per block costs page faults.
                _, pinned, host = staging.next(rows.numel() * rows.element_size())
                pinned.view(rows.dtype).view(rows.shape).copy_(rows)
                block.array(path, host.view(storage))
