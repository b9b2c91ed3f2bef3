"""The store's own chunk I/O (write_block / read_block bypass zarr's codec pipeline and event loop)
against zarr reading and writing the same arrays, and the write-behind thread of `build --export`."""

from __future__ import annotations

import errno
import json
import os
import threading

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from streammerge.errors import StoreError
from streammerge import fsutil
from streammerge.fsutil import WriteBehind, atomic_write, write_new_file
from streammerge.workspace import page_aligned
from streammerge.store.store import Store


def make_store(tmp_path, shape, block_rows, dtype="bfloat16"):
    rows = shape[0] if shape else 1
    nblocks = -(-rows // block_rows)
    tensor = {"name": "w", "shape": list(shape), "dtype": dtype, "block_rows": block_rows, "nblocks": nblocks}
    job = {"key": "tensors/w", "name": "w", "stage": "merge", "shape": list(shape), "block_rows": block_rows,
           "nblocks": nblocks, "outputs": [{"name": "", "dtype": dtype}]}
    store = Store.create(tmp_path / "job.zarr", {"format": 1, "tensors": [tensor], "jobs": [job]})
    return store


@pytest.mark.parametrize("shape,block_rows", [((10, 1536), 3), ((7,), 2), ((), 1), ((5, 3, 700), 2)])
def test_chunks_written_by_the_store_read_back_by_zarr_and_by_the_store(tmp_path, shape, block_rows):
    store = make_store(tmp_path, shape, block_rows)
    rng = np.random.default_rng(0)
    full = rng.integers(0, 2**16, size=shape or (1,), dtype=np.uint16)
    rows = full.shape[0]
    for i in range(-(-rows // block_rows)):
        store.write_block("tensors/w", i, full[i * block_rows : (i + 1) * block_rows])
    by_zarr = zarr.open_array(store.path / "tensors" / "w", mode="r")[...]
    np.testing.assert_array_equal(by_zarr, full)
    for r0 in range(rows):
        for r1 in range(r0 + 1, rows + 1):
            got = store.read_block("w", r0, r1)
            want = full[r0:r1] if shape else full.reshape(())
            np.testing.assert_array_equal(got, want)
    assert not [f for _d, _s, fs in os.walk(store.path) for f in fs if f.endswith(".partial")]


@pytest.mark.parametrize("shape,dtype", [((10, 1536), "bfloat16"), ((7,), "float32"), ((), "float16"), ((5, 3, 700), "uint8")])
def test_array_metadata_is_what_zarr_writes(tmp_path, shape, dtype):
    """The store writes zarr.json itself; zarr-python, creating the same array, writes the same
    document (so any zarr reader sees the array it would have made)."""
    store = make_store(tmp_path, shape, 2, dtype)
    ours = json.loads((store.path / "tensors" / "w" / "zarr.json").read_text())
    storage = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    zarr.create_array(
        LocalStore(tmp_path / "by-zarr"), shape=tuple(shape) or (1,), chunks=(2, *shape[1:]), dtype=storage,
        compressors=None, fill_value=0, chunk_key_encoding={"name": "default", "separator": "."}, attributes=ours["attributes"],
    )
    theirs = json.loads((tmp_path / "by-zarr" / "zarr.json").read_text())
    assert ours == theirs
    assert json.loads((store.path / "tensors" / "zarr.json").read_text()) == {"attributes": {}, "zarr_format": 3, "node_type": "group"}
    assert zarr.open_group(store.path, mode="r").attrs["streammerge"] == {"format": 1}


def test_store_writes_and_reads_arrays_with_zarr_default_chunk_keys(tmp_path):
    """Stores created before the "." chunk keys (zarr's default c/<i>/<j>) keep working."""
    store = make_store(tmp_path, (9, 300), 4)
    zarr.create_array(LocalStore(store.path / "tensors" / "w"), shape=(9, 300), chunks=(4, 300), dtype=np.uint16,
                      compressors=None, fill_value=0, overwrite=True)
    store = Store.open(store.path)
    data = np.arange(9 * 300, dtype=np.uint16).reshape(9, 300)
    for i in range(3):
        store.write_block("tensors/w", i, data[4 * i : 4 * i + 4])
    assert (store.path / "tensors" / "w" / "c" / "2" / "0").is_file()
    np.testing.assert_array_equal(zarr.open_array(store.path / "tensors" / "w", mode="r")[...], data)
    np.testing.assert_array_equal(store.read_block("w", 1, 9), data[1:])


def test_store_reads_chunks_zarr_wrote_and_unwritten_chunks_as_zero(tmp_path):
    store = make_store(tmp_path, (9, 300), 4)
    a = zarr.open_array(store.path / "tensors" / "w", mode="r+")
    data = np.arange(4 * 300, dtype=np.uint16).reshape(4, 300)
    a[4:8] = data  # chunk 1 by zarr; chunks 0 and 2 never written
    got = store.read_block("w", 2, 9)
    want = np.zeros((7, 300), np.uint16)
    want[2:6] = data
    np.testing.assert_array_equal(got, want)


def test_truncated_chunk_is_an_error_naming_the_file(tmp_path):
    store = make_store(tmp_path, (8, 512), 4)
    store.write_block("tensors/w", 0, np.ones((4, 512), np.uint16))
    chunk = store.path / "tensors" / "w" / "c.0.0"
    os.truncate(chunk, 1000)
    with pytest.raises(StoreError, match="truncated") as e:
        store.read_block("w", 0, 4)
    assert str(chunk) in str(e.value)


def test_block_larger_than_its_chunk_is_refused(tmp_path):
    store = make_store(tmp_path, (8, 16), 4)
    with pytest.raises(ValueError, match="more than its chunk"):
        store.write_block("tensors/w", 0, np.ones((5, 16), np.uint16))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("size,data_len", [(10_000, 10_000), (12_288, 5_000), (100, 100), (4096 * 3, 4096 * 3), (4096 * 5, 4096 * 2)])
def test_write_new_file_pads_with_zeros_and_leaves_no_partial(tmp_path, monkeypatch, size, data_len, aligned):
    """Page-aligned data (as WriteBehind hands it) is written from where it is, its last partial
    page and the padding staged; other data is staged whole: the same bytes either way."""
    data = np.random.default_rng(1).integers(0, 256, data_len, dtype=np.uint8)
    if aligned:
        buf = page_aligned(data_len)
        buf[:] = data
        data = buf
    else:
        data = np.concatenate([np.zeros(1, np.uint8), data])[1:]  # one byte off any page
    writes = []
    real = fsutil.pwrite_loop
    monkeypatch.setattr(fsutil, "pwrite_loop", lambda fd, view, pos: (writes.append((fsutil._address(view), pos)), real(fd, view, pos)))
    write_new_file(tmp_path / "f", memoryview(data), size)
    if aligned and data_len >= 4096:
        assert writes[0] == (data.ctypes.data, 0)  # its whole pages written from where they are
    got = (tmp_path / "f").read_bytes()
    assert got == data.tobytes() + bytes(size - data_len)
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    """A full disk mid-write (here: at the fsync) raises, the old file is unchanged, and no
    hidden .partial file stays behind (`generate --output` and the store's JSON use it)."""
    path = tmp_path / "answers.jsonl"
    atomic_write(path, b"old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new\n" * 1000)
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]
    monkeypatch.undo()
    atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_write_behind_copies_the_data_keeps_order_and_raises_the_first_error(tmp_path):
    events = []
    behind = WriteBehind(depth=2)
    buf = np.zeros(1000, np.uint8)
    for i in range(20):
        buf[:] = i  # the caller reuses its buffer at once
        behind.submit(memoryview(buf), lambda view, i=i: events.append((i, bytes(view))))
        behind.call(lambda i=i: events.append(("marker", i)))  # runs after the write before it
    behind.close()
    assert events == [e for i in range(20) for e in ((i, bytes([i]) * 1000), ("marker", i))]

    seen = threading.Event()

    def failing(view):
        seen.set()
        raise OSError(28, "No space left on device")

    behind = WriteBehind(depth=1)
    behind.submit(memoryview(b"x"), failing)
    behind.call(lambda: events.append("after the error"))
    seen.wait(5)
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):  # a later submit raises once the error is known
            behind.submit(memoryview(b"y"), failing)
    with pytest.raises(OSError, match="No space"):
        behind.close()
    assert "after the error" not in events, "nothing runs after a failed write (no marker for a lost chunk)"


def test_store_writing_behind_several_writers_keeps_markers_after_their_chunks(tmp_path, monkeypatch):
    store = make_store(tmp_path, (40, 300), 4)
    data = np.arange(40 * 300, dtype=np.uint16).reshape(40, 300)
    with store.writing_behind(writers=3):
        for i in range(10):
            with store.committing("merge", "tensors/w", i) as block:
                block.array("tensors/w", data[4 * i : 4 * i + 4])
    assert store.done_blocks("merge", "tensors/w") == set(range(10))
    np.testing.assert_array_equal(store.read_block("w", 0, 40), data)

    # A chunk write that fails: its block gets no marker, the error comes out of the context.
    import streammerge.store.store as store_module

    store = make_store(tmp_path / "again", (40, 300), 4)
    real = store_module.write_new_file

    def write(path, view, size=None):
        if path.name.startswith("c.4."):
            raise OSError(28, "No space left on device", str(path))
        real(path, view, size)

    monkeypatch.setattr(store_module, "write_new_file", write)
    with pytest.raises(OSError, match="No space"), store.writing_behind(writers=3):
        for i in range(10):
            with store.committing("merge", "tensors/w", i) as block:
                block.array("tensors/w", data[4 * i : 4 * i + 4])
    done = store.done_blocks("merge", "tensors/w")
    assert 4 not in done and {0, 1, 2, 3} <= done
    for i in done:  # every marker stands for a complete chunk
        np.testing.assert_array_equal(store.read_block("w", 4 * i, 4 * i + 4), data[4 * i : 4 * i + 4])


def test_a_task_still_running_when_the_writers_close_leaves_no_marker(tmp_path):
    """A build stopped (error, SIGINT) leaves the tasks that were running to finish on their
    own: one whose writer closed meanwhile writes nothing, not a marker without its chunk."""
    store = make_store(tmp_path, (8, 300), 4)
    data = np.ones((8, 300), np.uint16)
    with store.writing_behind(writers=2):
        running = store.committing("merge", "tensors/w", 0)
        block = running.__enter__()
    with pytest.raises(RuntimeError, match="closed"):
        block.array("tensors/w", data[:4])
    with pytest.raises(RuntimeError, match="closed"):
        running.__exit__(None, None, None)
    assert store.done_blocks("merge", "tensors/w") == set()
    assert not any(f.startswith("c.0") for f in os.listdir(store.path / "tensors" / "w"))
    with store.committing("merge", "tensors/w", 1) as block:  # outside a build: written at once
        block.array("tensors/w", data[4:])
    assert store.done_blocks("merge", "tensors/w") == {1}
