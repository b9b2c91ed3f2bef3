"""Crash-proofing with real processes: SIGKILL anywhere, SIGINT/SIGTERM, one writer per store.

The kill loop itself is tools/fault_inject.py (run it with --kills 20 for the full check); here
it runs with fewer kills to stay fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fault_inject
import synth_checkpoints as synth
from helpers import file_digest, write_recipe

SHAPE = synth.ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
INTERRUPTED = "interrupted: run the same command again to resume"


def sm(*args) -> list[str]:
    return [sys.executable, "-m", "streammerge", *map(str, args)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A family, a task_arithmetic recipe with many small blocks, and its uninterrupted export."""
    root = tmp_path_factory.mktemp("faults")
    base, fts = synth.make_family(root / "m", SHAPE, n_finetunes=3, dtype="bfloat16")
    recipe = write_recipe(root / "r.yaml", fault_inject.recipe_for("task_arithmetic", base, fts))
    build = sm("build", recipe, "--block-elements", 128, "--workers", 1, "--no-progress")
    subprocess.run(build + ["--store", root / "ref.zarr", "--export", root / "ref"], check=True, capture_output=True)
    return {"root": root, "recipe": recipe, "build": build, "ref": file_digest(root / "ref"), "ref_store": root / "ref.zarr"}


def _markers(store: Path) -> int:
    return fault_inject.count_markers(store)


def _default_sigint():
    """In the child before exec: SIGINT back to its default. A shell starts background jobs
    with SIGINT ignored (`pytest ... &`), exec keeps it ignored, and Python then leaves it so:
    the build would never see the test's Ctrl-C (it finished, exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_when(cond, proc, sig, timeout=60.0) -> bool:
    """Send `sig` once cond() holds, checking with the process frozen (SIGSTOP, then SIGCONT):
    it cannot finish between the check and the signal however late this test is scheduled (a
    loaded box made a fast build end first: exit 0 instead of 130)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGSTOP)
        try:
            if cond():
                proc.send_signal(sig)
                return True
        finally:
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.003)
    return False


def test_kill_anywhere_resumes_to_identical_export(tmp_path):
    """SIGKILL build and export at random points (several methods), rerun, compare sha256."""
    reports = fault_inject.run(6, ["task_arithmetic", "ties"], tmp_path, seed=1, block_elements=512, log=lambda *_: None)
    assert sum(r.kills for r in reports) == 6
    assert all(r.identical for r in reports)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_build_cleanly_and_resumes(job, tmp_path, sig, code):
    store = tmp_path / "job.zarr"
    proc = subprocess.Popen(job["build"] + ["--store", store], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    assert _signal_when(lambda: _markers(store) >= 30, proc, sig), "the build should still be running"
    t0 = time.time()
    out, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert proc.returncode == code, err
    assert INTERRUPTED in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (store / "lock").exists(), "the lock must be released"
    done = _markers(store)
    status = json.loads(subprocess.run(sm("status", store, "--json"), capture_output=True, text=True, check=True).stdout)
    assert 0 < status["stages"]["merge"]["done"] == done < status["stages"]["merge"]["total"]
    fault_inject.check_store(store, job["ref_store"])  # every marked chunk is complete and right
    r = subprocess.run(job["build"] + ["--store", store, "--export", tmp_path / "out"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    assert file_digest(tmp_path / "out") == job["ref"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_export_cleanly(job, tmp_path, sig, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an older export")
    before = file_digest(out)
    cmd = sm("export", job["ref_store"], out, "--overwrite", "--workers", 1, "--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    assert _signal_when(lambda: fault_inject.export_litter(out), proc, sig), "the export should still be running"
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert INTERRUPTED in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert file_digest(out) == before, "an interrupted export leaves the existing output alone"
    assert fault_inject.export_litter(out) == []
    subprocess.run(cmd, check=True, capture_output=True)
    assert file_digest(out) == job["ref"]


def test_killed_export_temp_dirs_are_cleaned_on_rerun(job, tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        stale = tmp_path / f".out.partial-{dead.pid}-0123abcd"
        live = tmp_path / f".out.partial-{sleeper.pid}-0123abcd"  # another export still running
        other = tmp_path / f".other.partial-{dead.pid}-0123abcd"  # not this OUT's
        for d in (stale, live, other):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"half")
        subprocess.run(sm("export", job["ref_store"], out, "--no-progress"), check=True, capture_output=True)
        assert not stale.exists() and live.exists() and other.exists()
        assert file_digest(out) == job["ref"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_second_writer_fails_at_once_and_stale_lock_is_taken_over(job, tmp_path):
    store = tmp_path / "job.zarr"
    subprocess.run(job["build"] + ["--store", store, "--block-elements", "100000"], check=True, capture_output=True)
    # another process writing the store: it holds the lock (as a build does) until killed
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from streammerge.store.store import StoreLock\n"
         "with StoreLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)", str(store)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        second = subprocess.run(job["build"] + ["--store", store, "--block-elements", "100000"], capture_output=True,
                                text=True, timeout=60)
        assert time.time() - t0 < 15
        assert second.returncode == 1
        assert second.stderr.startswith(f"error: {store}: in use by process {holder.pid} on {socket.gethostname()}")
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    finally:
        holder.kill()  # SIGKILL: the lock stays, naming a dead process on this host
        holder.wait()
    assert json.loads((store / "lock").read_text())["pid"] == holder.pid
    r = subprocess.run(job["build"] + ["--store", store, "--block-elements", "100000"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (store / "lock").exists()


def test_lock_of_another_host_or_live_process_is_respected(job, tmp_path):
    from streammerge.errors import StoreError
    from streammerge.store.store import StoreLock

    (tmp_path / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(StoreError, match="in use by process 1 on elsewhere.example"):
        StoreLock(tmp_path).__enter__()
    (tmp_path / "lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(StoreError, match=f"in use by process {os.getppid()}"):
        StoreLock(tmp_path).__enter__()
    # a lock naming this very process that it does not hold is stale (pid reuse)
    (tmp_path / "lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with StoreLock(tmp_path):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
        with pytest.raises(StoreError, match="in use"):
            StoreLock(tmp_path).__enter__()  # held: not stale
    assert not (tmp_path / "lock").exists()
    assert not list(tmp_path.glob(".lock.*"))


def test_simultaneous_takeovers_of_a_stale_lock_let_one_writer_in(tmp_path):
    """Several processes finding the same stale lock at once: exactly one takes it over. (Each
    judging the lock stale, then deleting whatever lock is there, could delete the lock that
    another had just taken, and two writers would hold the store.)"""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    start = time.time() + 3.0
    release = tmp_path / "release"
    # each process judges the lock stale, then waits 0.3 s before acting on it: the window in
    # which another's takeover could land, made wide enough to be hit every run. A holder keeps
    # the lock until the others are done, however slowly they start.
    script = (
        "import os, sys, time\nfrom streammerge.errors import StoreError\nfrom streammerge.store import store\n"
        "from streammerge.store.store import StoreLock\n"
        "judge = store._lock_is_stale\n"
        "def slow(*a):\n    r = judge(*a)\n    time.sleep(0.3)\n    return r\n"
        "store._lock_is_stale = slow\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    with StoreLock(sys.argv[1]):\n        print('held', flush=True)\n"
        "        t = time.time()\n        while not os.path.exists(sys.argv[3]) and time.time() - t < 60:\n            time.sleep(0.05)\n"
        "except StoreError:\n    print('busy', flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start), str(release)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    t0 = time.time()
    while sum(p.poll() is not None for p in procs) < 5 and time.time() - t0 < 60:
        time.sleep(0.05)
    release.touch()
    outs = [p.communicate(timeout=90)[0].strip() for p in procs]
    assert sorted(outs) == ["busy"] * 5 + ["held"], outs
    assert not (tmp_path / "lock").exists()
