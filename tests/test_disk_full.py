"""Disk full: build and export onto a small tmpfs, fail with one line, grow it, resume, same bytes.

Needs to mount a tmpfs (root, or CAP_SYS_ADMIN); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fault_inject
import synth_checkpoints as synth
from helpers import file_digest, write_recipe

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)


def sm(*args, check=False):
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True, check=check)


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size: int) -> None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): needs root or CAP_SYS_ADMIN")
        self.mounted = True

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


@pytest.fixture
def tmpfs(tmp_path):
    if os.name != "posix" or not Path("/proc/mounts").exists():
        pytest.skip("tmpfs mounts need Linux")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = Tmpfs(mnt)
    yield fs
    fs.umount()


def test_disk_full_mid_build_and_mid_export_then_resume(tmp_path, tmpfs):
    base, fts = synth.make_family(tmp_path / "m", SHAPE, n_finetunes=3, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", fault_inject.recipe_for("ties", base, fts))
    mnt = tmpfs.path
    store, out = mnt / "job.zarr", mnt / "out"
    build = ["build", recipe, "--store", store, "--block-elements", 256, "--workers", 1, "--no-progress"]

    # reference, on a roomy tmpfs: the bytes, and how much room the store and the export take
    tmpfs.mount(64 * 2**20)
    sm(*build, "--export", out, check=True)
    need_store = tmpfs.used() - sum(f.stat().st_size for f in out.iterdir())
    ref = file_digest(out)
    need_all = tmpfs.used()
    tmpfs.umount()

    # 1. full mid-build
    tmpfs.mount(need_store // 2)
    r = sm(*build, "--export", out)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "Traceback" not in line, r.stderr
    assert "no space left on device" in line and str(store) in line, line
    assert not (store / "lock").exists()
    status = json.loads(sm("status", store, "--json", check=True).stdout)
    assert 0 < status["stages"]["merge"]["done"] < status["stages"]["merge"]["total"], "full in the middle of the build"
    fault_inject.check_store(store, store)  # markers only for chunks that exist
    assert not out.exists()

    # 2. more room, not enough for the store and the export, which is written during the build
    # (build --export writes each merged block to both): whichever write fails is named
    tmpfs.resize(need_store + (need_all - need_store) // 3)
    r = sm(*build, "--export", out)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "no space left on device" in line and (str(out) in line or str(store) in line), r.stderr
    fault_inject.check_store(store, store)
    assert not out.exists() and fault_inject.export_litter(out) == [], "a failed export leaves nothing behind"

    # 3. room enough: the same command finishes, identical to the reference
    tmpfs.resize(64 * 2**20)
    r = sm(*build, "--export", out)
    assert r.returncode == 0, r.stderr
    assert file_digest(out) == ref
    assert not any(f.endswith(".partial") for _d, _s, files in os.walk(store) for f in files)


def test_disk_full_on_export_only(tmp_path, tmpfs):
    """`streammerge export` alone onto a full disk: one line naming OUT, nothing left, then it works."""
    base, fts = synth.make_family(tmp_path / "m", SHAPE, n_finetunes=2, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", fault_inject.recipe_for("task_arithmetic", base, fts))
    store = tmp_path / "job.zarr"
    sm("build", recipe, "--store", store, "--no-progress", check=True)
    tmpfs.mount(64 * 2**10)
    out = tmpfs.path / "out"
    r = sm("export", store, out)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {out}") and "no space left on device" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmpfs.path.iterdir()) == []
    tmpfs.resize(16 * 2**20)
    sm("export", store, out, check=True)
    ref = tmp_path / "ref"
    sm("export", store, ref, check=True)
    assert file_digest(out) == file_digest(ref)


def test_disk_full_on_the_export_written_during_the_build(tmp_path, tmpfs):
    """`build --export` with OUT on a full disk and the store elsewhere: the failing write is the
    export's (its copy of the store's shards: no hard link across filesystems), so the line names
    OUT; the store stays valid and the same command then finishes."""
    base, fts = synth.make_family(tmp_path / "m", SHAPE, n_finetunes=3, dtype="bfloat16")
    recipe = write_recipe(tmp_path / "r.yaml", fault_inject.recipe_for("task_arithmetic", base, fts))
    build = ["build", recipe, "--block-elements", 256, "--workers", 2, "--no-progress"]
    sm(*build, "--store", tmp_path / "ref.zarr", "--export", tmp_path / "ref", check=True)
    size = sum(f.stat().st_size for f in (tmp_path / "ref").iterdir())

    tmpfs.mount(size // 3)
    store, out = tmp_path / "job.zarr", tmpfs.path / "out"
    r = sm(*build, "--store", store, "--export", out)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {out}: no space left on device"), r.stderr
    fault_inject.check_store(store, store)
    assert list(tmpfs.path.iterdir()) == [], "a failed export leaves nothing behind"

    tmpfs.resize(16 * 2**20)
    sm(*build, "--store", store, "--export", out, check=True)
    assert file_digest(out) == file_digest(tmp_path / "ref")
