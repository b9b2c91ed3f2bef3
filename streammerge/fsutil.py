"""Small filesystem and process helpers shared by the store, the exporter and the converters."""

from __future__ import annotations

import errno
import os
import queue
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from .workspace import page_aligned, thread_buffer


def memory_available() -> int | None:
    """Bytes this process may still fill: the kernel's MemAvailable, or less where the process's
    memory cgroup (v2 memory.max, v1 memory.limit_in_bytes) sets a lower limit; elsewhere the
    free pages; None where nothing is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found.append(next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        lines = []
    for hier, ctrls, path in (x for x in lines if len(x) == 3):
        if hier == "0" and not ctrls:
            limit_file = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in ctrls.split(","):
            limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or v1's huge number: no limit
            found.append(int(text))
    return min(found) if found else None


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing/the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves neither the old file changed nor a partial one
        tmp.unlink(missing_ok=True)


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists on this host (litter of dead ones can be removed)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- output directories written beside their final name, then renamed into place ----------------
# An export (or an adapter) is written under `.OUT.partial-<pid>-<id>` beside OUT and renamed
# over it when complete, so OUT is the old output or the whole new one, never half of either. A
# killed writer's litter names its pid: the next writer of OUT removes it once that pid is gone.


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden name beside `out_dir` to write it under (not created)."""
    return out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Make `tmp`'s files and entries durable, then rename it to `out_dir`, replacing what was there
    (moved aside first, removed after). Files named *.safetensors were fsynced by their writer."""
    for f in tmp.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_path(tmp)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    _fsync_path(out_dir.parent)
    remove_stale_temps(out_dir)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(out_dir: Path) -> int:
    """Remove what killed writers left beside OUT: `.OUT.partial-<pid>-<id>` directories, and,
    once OUT exists, `.OUT.old-<pid>-<id>` (a replaced output), whose process <pid> is gone."""

    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    removed = 0
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return 0
    for p in entries:
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or pid_alive(pid) or (m.group(1) == "old" and not out_dir.exists()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    return removed


# ---- writes that bypass the page cache ----------------------------------------------------------
# Measured here, buffered writes of fresh files cost ~2.5 s of kernel time per GB (allocating
# page cache), which on 2 cores is as much as the merge arithmetic; O_DIRECT writes of whole
# 4 KiB pages stream to disk with almost none, and leave the page cache (which a memory cap
# counts) to the inputs. Filesystems without O_DIRECT (tmpfs) fall back to buffered writes.

DIRECT_ALIGN = 4096
_direct_supported = hasattr(os, "O_DIRECT")


def open_direct(path, flags: int = os.O_WRONLY) -> int | None:
    """An O_DIRECT descriptor on `path`, or None where the filesystem has none (tmpfs)."""
    global _direct_supported
    if not _direct_supported:
        return None
    try:
        return os.open(path, flags | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _direct_supported = False
        return None


def aligned_buffer(nbytes: int) -> memoryview:
    """A per-thread page-aligned staging buffer of `nbytes` (O_DIRECT needs aligned memory)."""
    return memoryview(thread_buffer("fsutil.staging", nbytes, np.uint8, at_least=DIRECT_ALIGN))


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0


def pwrite_loop(fd: int, view: memoryview, pos: int) -> None:
    while view:
        n = os.pwrite(fd, view, pos)
        view = view[n:]
        pos += n


def pwrite_direct(fd: int, view: memoryview, pos: int, direct_fd: int | None = None) -> None:
    """Write `view` at `pos`: its whole 4 KiB pages through `direct_fd` when there is one, the
    partial pages at either end through `fd` (Linux keeps the two coherent)."""
    end = pos + len(view)
    a = -(-pos // DIRECT_ALIGN) * DIRECT_ALIGN
    b = end // DIRECT_ALIGN * DIRECT_ALIGN
    if direct_fd is None or b - a < DIRECT_ALIGN:
        pwrite_loop(fd, view, pos)
        return
    pwrite_loop(fd, view[: a - pos], pos)
    whole = view[a - pos : b - pos]
    if _address(whole) % DIRECT_ALIGN:  # else written from where it is (WriteBehind places it so)
        staged = aligned_buffer(b - a)
        staged[:] = whole
        whole = staged
    pwrite_loop(direct_fd, whole, a)
    pwrite_loop(fd, view[b - pos :], b)


def _write_direct(fd: int, data: memoryview, padded: int) -> None:
    """`data` zero-padded to `padded` bytes (a multiple of DIRECT_ALIGN) through the O_DIRECT
    `fd`: its whole pages from where they are when `data` starts on a page (WriteBehind places
    blocks so), the rest staged in this thread's aligned buffer by numpy's copy, which releases
    the GIL (a memoryview assignment holds it through the memcpy: on 16 threads the store's
    writer thread staging whole chunks that way held the GIL for an eighth of the workers'
    GIL-held time, py-spy --gil on a 0.5B-shaped ties build)."""
    head = len(data) // DIRECT_ALIGN * DIRECT_ALIGN if _address(data) % DIRECT_ALIGN == 0 else 0
    if head:
        pwrite_loop(fd, data[:head], 0)
    if head == padded:
        return
    staged = np.frombuffer(aligned_buffer(padded - head), np.uint8)
    tail = len(data) - head
    np.copyto(staged[:tail], np.frombuffer(data, np.uint8)[head:])
    staged[tail:] = 0
    pwrite_loop(fd, memoryview(staged), head)


def write_new_file(path: Path, data: memoryview, size: int | None = None) -> None:
    """Create `path` holding `data` zero-padded to `size` bytes, atomically (a `.partial` file
    renamed into place, as zarr's local store does), bypassing the page cache where possible."""
    path = Path(path)
    size = len(data) if size is None else size
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    fd = open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL) if size >= DIRECT_ALIGN else None
    try:
        if fd is not None:
            _write_direct(fd, data, padded)
            if padded != size:
                os.ftruncate(fd, size)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            pwrite_loop(fd, data, 0)
            if len(data) < size:
                os.ftruncate(fd, size)  # the zero padding, as a hole
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


# Writes a WriteBehind holds at most (each a copy of one block): the planner counts them.
WRITE_BEHIND_DEPTH = 4


def store_writers(workers: int) -> int:
    """Write-behind threads for a build with `workers` compute threads: one per 4, at most 4."""
    return min(4, max(1, -(-workers // 4)))


class WriteBehind:
    """Writes handed over by compute threads and done, in order, by one background thread, so
    that the disk works while they compute (a thread blocked in an O_DIRECT write computes
    nothing).

    `submit(data, write, phase)` copies `data` into one of `depth` reusable page-aligned buffers
    (waiting for a free one: at most `depth` writes are pending), `phase` bytes past a page
    boundary, and returns; the thread then calls `write(view)` on the copy. With `phase` the
    file offset modulo the page size, `pwrite_direct` writes the copy's whole pages as they are,
    without staging them again. `call(fn)` queues `fn()` behind the writes already submitted (e.g. a completion
    marker that must follow its data). The first error is raised by the next `submit` or
    `call` and by `close`, which waits for everything pending.
    """

    def __init__(self, depth: int = WRITE_BEHIND_DEPTH):
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(page_aligned(0))
        self._todo: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="streammerge-write-behind", daemon=True)
        self._thread.start()

    def submit(self, data: memoryview, write: Callable[[memoryview], None], phase: int = 0) -> None:
        while True:
            self._check()
            try:  # (not forever: a writer closed meanwhile gives no buffer back)
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        phase %= DIRECT_ALIGN
        if len(buf) < phase + len(data):
            buf = page_aligned(phase + len(data))  # grows to the largest block once, then is reused
        view = memoryview(buf)[phase : phase + len(data)]
        # numpy's copy releases the GIL (a memoryview assignment holds it through the memcpy,
        # stalling the other compute threads: a tenth of the GIL-held time of a task_arithmetic build)
        np.copyto(buf[phase : phase + len(data)], np.frombuffer(data, np.uint8))
        self._todo.put((write, view, buf))

    def call(self, fn: Callable[[], None]) -> None:
        self._check()
        self._todo.put((fn, None, None))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:  # a task still running after its build was stopped: write nothing
            raise RuntimeError("write-behind thread closed")

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            fn, view, buf = item
            try:
                if self._error is not None:
                    pass  # after a failed write nothing runs: no marker for a lost chunk
                elif view is None:
                    fn()
                else:
                    fn(view)
            except BaseException as e:  # noqa: BLE001 - handed to the submitting threads
                self._error = e
            finally:
                if view is not None:
                    view.release()
                    self._free.put(buf)

    def close(self) -> None:
        """Wait for everything pending; raise the first error. Later submits and calls raise."""
        self._closed = True
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
