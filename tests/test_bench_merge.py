"""tools/bench_merge.py: the floor, this tree's streammerge and a baseline tree's, in the same rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_baseline_tree_runs_alternating_with_this_one(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_merge.py"), "--preset", "tiny", "--methods", "task_arithmetic",
         "--repeat", "2", "--skip-mergekit", "--baseline", str(ROOT), "--data", str(tmp_path / "data"),
         "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())["results"][0]
    tools = res["tools"]
    assert set(tools) == {"streammerge", "baseline", "floor"}
    assert set(res["warmup_s"]) == {"streammerge", "baseline"}  # untimed first runs (numba's compile)
    assert all(t["failed"] == 0 and len(t["wall_s"]["runs"]) == 2 for t in tools.values())
    ratio = res["baseline_over_streammerge"]
    walls = [tools[t]["wall_s"]["runs"] for t in ("baseline", "streammerge")]
    assert np.allclose(ratio["runs"], [b / s for b, s in zip(*walls)])
    assert "baseline / streammerge" in p.stdout
    # both trees merged the same recipe to the same bytes
    work = tmp_path / "work" / "task_arithmetic"
    a, b = (load_file(next((work / d).glob("*.safetensors"))) for d in ("sm-out", "base-out"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
