#!/usr/bin/env python
"""Benchmark `streammerge extract-lora` against `mergekit-extract-lora` on the same checkpoints.

    python tools/bench_extract_lora.py --preset 0.5b --rank 32 --repeat 3 [--memcap 800]

The set is tools/bench_merge.py's (generated once under --data): the adapter approximates ft1
minus base. Both tools get the same job, their defaults: every 2-D weight factored at --rank,
embeddings, lm_head and norms saved whole (`modules_to_save`; streammerge saves those the
fine-tune changed, which is all of them in the synthetic set). Runs alternate (streammerge, mergekit, streammerge, ...),
each under `/usr/bin/time -v` after the same preparation as bench_merge.py (outputs removed,
`sync`, inputs read into the page cache). Prints each tool's wall time and peak RSS as the
median with min-max over --repeat runs, the error of each adapter (||delta - BA||_F / ||delta||_F
over all factored tensors, measured here in float32 from the written files: mergekit's truncated
SVD is the optimum at that rank), its logits against the fine-tune's (peft applies it to the base
model; see logit_errors) and the command line beside the table. mergekit runs with
HF_HUB_OFFLINE=1: if it cannot run offline on these checkpoints, its failure is printed as is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_merge import capped, synth_set, timed  # noqa: E402


def commands(data: Path, work: Path, rank: int) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    ft, base = data / "ft1", data / "base"
    return {
        "streammerge": [str(bin_dir / "streammerge"), "extract-lora", str(ft), "--base", str(base), "-o", str(work / "streammerge"),
                        "--rank", str(rank), "--no-progress"],
        "mergekit": [str(bin_dir / "mergekit-extract-lora"), "--model", str(ft), "--base-model", str(base), "--out-path",
                     str(work / "mergekit"), "--max-rank", str(rank), "--quiet"],
    }


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median (min-max)"""
    v = sorted(values)
    med = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{fmt.format(med)} ({fmt.format(v[0])}-{fmt.format(v[-1])})"


def adapter_error(adapter: Path, data: Path) -> tuple[float, int] | None:
    """(sqrt(sum ||delta - s BA||^2 / sum ||delta||^2), tensors) over the adapter's LoRA pairs,
    delta = ft1 - base in float32, s = lora_alpha / r (per module with rank_pattern); None when
    the adapter was not written."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    from streammerge.checkpoints import open_model
    from streammerge.checkpoints.blocks import read_rows

    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        return None
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(f))
    ft, base = open_model(str(data / "ft1")), open_model(str(data / "base"))
    err = norm = 0.0
    n = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
        s = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"]) / r
        h, bh = ft.tensors[f"{module}.weight"], base.tensors[f"{module}.weight"]
        d = read_rows(h, 0, h.shape[0], np.empty(h.shape, np.float32)) - read_rows(bh, 0, bh.shape[0], np.empty(bh.shape, np.float32))
        err += float(np.square(d - s * (b.astype(np.float32) @ a.astype(np.float32)), dtype=np.float64).sum())
        norm += float(np.square(d, dtype=np.float64).sum())
        n += 1
    return (float(np.sqrt(err / norm)) if norm else 0.0), n


def logit_errors(adapters: dict[str, Path], data: Path, tokens: int = 64) -> dict[str, float | None]:
    """Per adapter: ||logits(base + adapter) - logits(ft1)||_F / ||logits(base) - logits(ft1)||_F
    on two sequences of `tokens` random ids, the models in float32 and the adapter applied by
    peft: the share of the fine-tune's change to the logits the adapter misses (0: the
    fine-tune's logits; 1: no closer than the base model). None where the adapter was not written."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    def model(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    out: dict[str, float | None] = {}
    with torch.no_grad():
        ft = model(data / "ft1")
        ids = torch.randint(0, ft.config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
        want = ft(ids).logits.double()
        del ft
        change = torch.linalg.norm(model(data / "base")(ids).logits.double() - want)
        for tool, adapter in adapters.items():
            if not (adapter / "adapter_config.json").is_file():
                out[tool] = None
                continue
            got = peft.PeftModel.from_pretrained(model(data / "base"), adapter).eval()(ids).logits.double()
            out[tool] = float(torch.linalg.norm(got - want) / change)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b", help="synthetic model shape (tiny, 0.5b, 70b)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool, alternating")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "data", help="checkpoint cache directory")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "extract-lora", help="scratch directory for outputs")
    ap.add_argument("--memcap", type=int, default=0, help="also run each tool once under this memory cap (MB)")
    ap.add_argument("--skip-mergekit", action="store_true")
    a = ap.parse_args(argv)

    data = synth_set(a.data, a.preset, a.layers)
    a.work.mkdir(parents=True, exist_ok=True)
    cmds = commands(data, a.work, a.rank)
    if a.skip_mergekit or not Path(cmds["mergekit"][0]).exists():
        del cmds["mergekit"]
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # inherited by both tools' runs

    def fresh(tool: str) -> None:
        shutil.rmtree(a.work / tool, ignore_errors=True)
        os.sync()
        subprocess.run(["cat", *map(str, data.rglob("*.safetensors"))], stdout=subprocess.DEVNULL)

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {tool: [] for tool in cmds}
    for i in range(a.repeat):
        for tool, cmd in cmds.items():
            fresh(tool)
            runs[tool].append(r := timed(cmd))
            # each run as it ends: a run cut short still leaves the rounds it finished
            print(f"round {i + 1} {tool}: exit {r['rc']}, wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    errors = {tool: adapter_error(a.work / tool, data) for tool in cmds}
    logits = logit_errors({tool: a.work / tool for tool in cmds}, data)
    caps = {}
    if a.memcap:
        for tool, cmd in cmds.items():
            fresh(tool)
            caps[tool] = capped(cmd, a.memcap)

    size = sum(f.stat().st_size for f in (data / "base").rglob("*.safetensors"))
    size += sum(f.stat().st_size for f in (data / "ft1").rglob("*.safetensors"))
    print(f"\ninput: {data}/ft1 against {data}/base ({size / 1e9:.2f} GB both), rank {a.rank}, {os.cpu_count()} cores, "
          f"{a.repeat} runs per tool alternating\n")
    for tool, cmd in cmds.items():
        print(f"  {tool}: {' '.join(cmd)}")
        failed = [r for r in runs[tool] if r["rc"] != 0]
        if failed:
            print(f"  {tool} failed (exit {failed[0]['rc']}) on {len(failed)} of {len(runs[tool])} runs; its output ends:")
            print("    " + failed[0]["tail"].strip().replace("\n", "\n    "))
    print()
    cap_col = f" | under {a.memcap} MB cap" if a.memcap else ""
    print(f"| tool | wall (s), median (min-max) | CPU (s), median (min-max) | peak RSS (MB), median (min-max) "
          f"| relative error (tensors) | logits error{cap_col} |")
    print("|---|---:|---:|---:|---:|---:|" + ("---|" if a.memcap else ""))
    for tool in cmds:
        ok = [r for r in runs[tool] if r["rc"] == 0]
        if not ok:
            print(f"| {tool} | failed | failed | failed | | |" + (" |" if a.memcap else ""))
            continue
        e = errors[tool]
        cap = ""
        if a.memcap:
            c = caps[tool]
            cap = " | " + ("completed" if c.get("ok") else "killed/failed") + f" (max {c.get('maxusage_mb')} MB)"
        print(f"| {tool} | {spread([r['wall_s'] for r in ok])} | {spread([r['cpu_s'] for r in ok])} "
              f"| {spread([r['peak_rss_mb'] for r in ok], '{:.0f}')} | "
              + (f"{e[0]:.4f} ({e[1]})" if e else "") + " | "
              + (f"{logits[tool]:.4f}" if logits[tool] is not None else "") + f"{cap} |")
    print("\nload average (1/5/15 min): before " + " ".join(f"{x:.2f}" for x in load_before)
          + ", after " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"command: python tools/bench_extract_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0 if all(r["rc"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
