"""The store's own chunk I/O (write_block / read_block bypass zarr's codec pipeline and event loop)
against zarr reading and writing the same arrays, and the write-behind thread of `build --export`."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import zarr

from streammerge.errors import StoreError
from streammerge.fsutil import WriteBehind, write_new_file
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
    chunk = store.path / "tensors" / "w" / "c" / "0" / "0"
    os.truncate(chunk, 1000)
    with pytest.raises(StoreError, match="truncated") as e:
        store.read_block("w", 0, 4)
    assert str(chunk) in str(e.value)


def test_block_larger_than_its_chunk_is_refused(tmp_path):
    store = make_store(tmp_path, (8, 16), 4)
    with pytest.raises(ValueError, match="more than its chunk"):
        store.write_block("tensors/w", 0, np.ones((5, 16), np.uint16))


@pytest.mark.parametrize("size,data_len", [(10_000, 10_000), (12_288, 5_000), (100, 100), (4096 * 3, 4096 * 3)])
def test_write_new_file_pads_with_zeros_and_leaves_no_partial(tmp_path, size, data_len):
    data = np.random.default_rng(1).integers(0, 256, data_len, dtype=np.uint8)
    write_new_file(tmp_path / "f", memoryview(data), size)
    got = (tmp_path / "f").read_bytes()
    assert got == data.tobytes() + bytes(size - data_len)
    assert os.listdir(tmp_path) == ["f"]


def test_write_behind_copies_the_data_keeps_order_and_raises_the_first_error(tmp_path):
    written = []
    behind = WriteBehind(lambda key, pos, view: written.append((key, pos, bytes(view))), depth=2)
    buf = np.zeros(1000, np.uint8)
    for i in range(20):
        buf[:] = i  # the caller reuses its buffer at once
        behind.submit(i, i * 1000, memoryview(buf))
    behind.close()
    assert written == [(i, i * 1000, bytes([i]) * 1000) for i in range(20)]

    seen = threading.Event()

    def failing(key, pos, view):
        seen.set()
        raise OSError(28, "No space left on device")

    behind = WriteBehind(failing, depth=1)
    behind.submit("a", 0, memoryview(b"x"))
    seen.wait(5)
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):  # a later submit raises once the error is known
            behind.submit("b", 0, memoryview(b"y"))
    with pytest.raises(OSError, match="No space"):
        behind.close()
