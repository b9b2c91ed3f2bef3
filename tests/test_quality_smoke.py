"""The quality benchmark's CPU smoke configuration end to end (tools/quality, README "Merge
quality"): train a tiny tokenizer + base + four experts for seconds, build one merge of each
family with streammerge (and mergekit), evaluate them all with greedy exact match, write the
table and the plot; for two seeds, each in OUT/seed-N, and their means with min-max in OUT."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from quality import adapters as LR
from quality import run as Q
from quality import table as TB
from quality import tasks as T
from quality.config import LARGE, SMOKE

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    args = ["--smoke", "--seeds", ",".join(map(str, SEEDS)), "--out", str(tmp / "out"), "--cache", str(tmp / "cache"),
            "--pack", str(tmp / "pack"), "--train-device", "cpu"]
    assert Q.main(args) == 0
    return tmp


@pytest.mark.parametrize("where", ["seed-0", "seed-1", "."])
def test_outputs_written(smoke, where):
    out = smoke / "out" / where
    assert (out / "accuracy_vs_storage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    names = {r["name"] for r in res["rows"]}
    want = {"base", *(f"expert-{t}" for t in T.TASKS), "full-routing-oracle", "full-routing-router", "linear", "ta-1",
            "ties-0.5-1", "dare-0.5-0.5", "1bit-paper", "1bit-auto", "1bit-uniform", "mediator-0.5-0.1",
            "lora-r8-mediator-0.5-0.1", "lora-r32-mediator-0.5-0.1", "lora-r128-mediator-0.5-0.1"}
    try:
        import mergekit  # noqa: F401

        want |= {"mergekit-ta-1", "mergekit-ties-0.5-1"}
    except ImportError:
        pass
    assert want <= names
    md = (out / "results.md").read_text()
    for name in want:
        assert f"| {name} |" in md
    assert "Targets:" in md and "1bit-Merging" in md and "Mediator" in md and "OOD" in md
    for r in res["rows"]:
        assert set(r["acc"]) == set(T.TASKS)
        assert all(0.0 <= v <= 1.0 for v in r["acc"].values())
    # the OOD target: Mediator's router with a background class against both top-1s
    ood = res["ood_routing"]["mediator-0.5-0.1"]
    assert ood["router"] == Q.OOD_ROUTER and ood["plain_router"] == Q.PLAIN_ROUTER and 0 <= ood["top1_plain"] <= 1
    assert set(res["eta_sweep"]["mediator-0.5-0.1"]) == set(Q.ROUTERS)


def test_background_prompts_are_of_no_task():
    d = SMOKE.difficulty
    exclude = {p for t in T.TASKS for p, _ in T.test_set(t, 50, d)} | {p for _, p, _ in T.ood_set(20, d)}
    bg = T.background_prompts(200, d, exclude)
    assert len(set(bg)) == 200 and bg == T.background_prompts(200, d, exclude)
    assert not set(bg) & exclude
    assert not [p for p in bg if p.startswith(("calc ", "py ", "Q:", "en2zo:"))]  # no task's prompt format


def test_experts_beat_the_base_on_their_own_task(smoke):
    res = json.loads((smoke / "out" / "seed-0" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    for t in T.TASKS:
        assert rows[f"expert-{t}"]["acc"][t] > rows["base"]["acc"][t], t
    # full routing with the oracle is each expert on its own task; the fitted router finds the tasks
    oracle = rows["full-routing-oracle"]
    assert oracle["acc"] == {t: rows[f"expert-{t}"]["acc"][t] for t in T.TASKS}
    assert all(a >= 0.9 for a in rows["full-routing-router"]["router_accuracy"].values())
    assert res["reference_avg"] == oracle["avg"] > rows["base"]["avg"]


def test_storage_accounting(smoke):
    res = json.loads((smoke / "out" / "seed-0" / "results.json").read_text())
    full = res["full_routing_bytes"]
    assert full == len(T.TASKS) * res["model_bytes"]
    for r in res["rows"]:
        share = r["storage_bytes"] / full
        if r["family"] in ("1bit", "mediator"):
            assert r["storage_detail"]["full_routing_bytes"] == full
            assert 1 / len(T.TASKS) < share < 0.5  # one model plus small per-task parts
        elif r["family"] == "full routing":
            assert share == 1.0
        elif r["family"] == "lora":  # the shipped model plus every adapter's tensors, as written
            d = r["storage_detail"]
            assert r["storage_bytes"] == d["model_bytes"] + d["adapter_bytes"] and d["model_bytes"] == res["model_bytes"]
        else:
            assert share == 1 / len(T.TASKS)


def test_cached_checkpoints_skip_training_and_training_is_deterministic(smoke, tmp_path):
    from quality.train import cache_dir, is_trained, pretrain

    root = cache_dir(SMOKE, smoke / "cache")
    assert is_trained(root, SMOKE)
    info = json.loads((root / "train.json").read_text())
    assert Q.train_all(SMOKE, root, "cpu") == info  # cached: nothing retrained
    pretrain(SMOKE, tmp_path, "cpu")  # the same seeds give the same base, bit for bit
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == (root / "base" / "model.safetensors").read_bytes()


class _Cut(Exception):
    """A training run killed mid-loop (the GPU machine's 10-minute command limit)."""


def _cut_after(monkeypatch, step_to_cut: int):
    """Every step's state saved; the loop stops dead after saving step `step_to_cut`."""
    from quality import train as TR

    save = TR.Resumable.maybe_save

    def save_then_cut(self, torch, step, *a, **kw):
        save(self, torch, step, *a, force=True)
        if step == step_to_cut:
            raise _Cut

    monkeypatch.setattr(TR.Resumable, "maybe_save", save_then_cut)


def _steps_run(monkeypatch) -> list:
    """The steps the training loop runs from here on (each one passes maybe_save)."""
    from quality import train as TR

    seen, save = [], TR.Resumable.maybe_save

    def record(self, torch, step, *a, **kw):
        seen.append(step)
        return save(self, torch, step, *a, **kw)

    monkeypatch.setattr(TR.Resumable, "maybe_save", record)
    return seen


def test_training_cut_off_resumes_to_the_same_checkpoints(smoke, tmp_path, monkeypatch):
    """Pretraining and fine-tuning killed mid-loop resume from their saved state and end with
    the same weights, bit for bit, as the run that was never interrupted (the smoke cache);
    a finished base is not pretrained again."""
    import shutil

    from quality import train as TR

    root = TR.cache_dir(SMOKE, smoke / "cache")
    with monkeypatch.context() as m:
        _cut_after(m, SMOKE.training.pretrain_steps // 3)
        with pytest.raises(_Cut):
            TR.pretrain(SMOKE, tmp_path, "cpu")
    assert (tmp_path / "pretrain.state.pt").is_file() and not (tmp_path / "base").exists()
    with monkeypatch.context() as m:
        steps = _steps_run(m)
        TR.pretrain(SMOKE, tmp_path, "cpu")  # resumes: corpus and tokenizer cached, state loaded
    assert steps[0] == SMOKE.training.pretrain_steps // 3 + 1 and steps[-1] == SMOKE.training.pretrain_steps
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == (root / "base" / "model.safetensors").read_bytes()
    assert not (tmp_path / "pretrain.state.pt").exists()

    task = T.TASKS[0]
    with monkeypatch.context() as m:
        _cut_after(m, SMOKE.training.ft_steps // 2)
        with pytest.raises(_Cut):
            TR.finetune(SMOKE, task, tmp_path, "cpu")
    with monkeypatch.context() as m:
        steps = _steps_run(m)
        TR.finetune(SMOKE, task, tmp_path, "cpu")
    assert steps[0] == SMOKE.training.ft_steps // 2 + 1
    assert (tmp_path / task / "model.safetensors").read_bytes() == (root / task / "model.safetensors").read_bytes()

    # train_all after a cut-off past the base: the base is kept (not pretrained again)
    (tmp_path / "pretrain.json").write_text(json.dumps({"seconds": 1.0, "marker": True}))
    for t in T.TASKS[1:]:
        shutil.copytree(root / t, tmp_path / t)
    info = TR.train_all(SMOKE, tmp_path, "cpu")
    assert info["pretrain"]["marker"] and TR.is_trained(tmp_path, SMOKE)


def test_mediator_rows_that_route_every_layer_are_named_by_the_layer_count():
    """mediator-8-* on the full configuration (8 layers), mediator-12-* on the large one (12):
    the rows compared across configurations route every layer of each."""
    from quality import merges as M
    from quality.config import FULL

    for cfg in (FULL, LARGE):
        names = {m.name: m for m in M.merges(cfg)}
        every = names[f"mediator-{cfg.shape.layers}-0.5-outside"]
        assert every.params["route"] == cfg.shape.layers and every.params["route_outside"]
        assert f"mediator-{cfg.shape.layers}-0.5-outside-int8" in names


def test_only_run_merges_into_previous_results(smoke, tmp_path):
    """--only re-evaluates the named rows and keeps every other row of OUT/results.json."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(smoke / "out" / "seed-0", out)
    before = json.loads((out / "results.json").read_text())
    args = ["--smoke", "--out", str(out), "--cache", str(smoke / "cache"), "--train-device", "cpu", "--only", "linear"]
    assert Q.main(args) == 0
    after = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in after["rows"]] == [r["name"] for r in before["rows"]]
    old = {r["name"]: r for r in before["rows"]}
    for r in after["rows"]:
        if r["family"] in ("1bit", "mediator", "mergekit", "ties"):
            assert r == old[r["name"]]  # not re-evaluated: kept as they were
        else:  # re-evaluated (deterministic): the same accuracy
            assert r["acc"] == old[r["name"]]["acc"], r["name"]
    assert after["eta_sweep"] == before["eta_sweep"] and after["command"] == before["command"]
    assert after["reruns"][-1]["rows"][-1] == "linear" and "--only linear" in after["reruns"][-1]["command"]
    assert "Rows re-evaluated since" in (out / "results.md").read_text()


def test_fresh_only_run_of_a_routing_row_writes_its_table(smoke, tmp_path):
    """`--only <routing store> --fresh`: no static merge among the rows, so the Mediator target
    (10 points over the best static merge) is written as not judged instead of crashing."""
    out = tmp_path / "out"
    args = ["--smoke", "--out", str(out), "--cache", str(smoke / "cache"), "--train-device", "cpu",
            "--only", "mediator-0.5-0.1", "--fresh"]
    assert Q.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert "mediator-0.5-0.1" in {r["name"] for r in res["rows"]}
    assert not [r for r in res["rows"] if r["family"] in TB.STATIC_FAMILIES]
    assert res["targets"]["mediator"]["met"] is None and res["targets"]["best_static"] is None
    md = (out / "results.md").read_text()
    assert "| mediator-0.5-0.1 |" in md and "best static merge: **not judged** (mediator-0.5-0.1" in md


def test_mediator_target_is_judged_against_the_best_static_row_only_when_there_is_one():
    rows = [{"name": "full-routing-oracle", "family": "full-routing", "avg": 0.8, "storage_bytes": 100},
            {"name": "mediator-0.5-0.1", "family": "mediator", "avg": 0.78, "storage_bytes": 40}]
    results = {"reference_avg": 0.8, "full_routing_bytes": 100, "rows": rows}
    t = TB.targets(results)
    assert t["mediator"]["met"] is None and t["mediator"]["margin_over_best_static"] is None
    assert "**not judged** (mediator-0.5-0.1, the best below full routing's storage: 97.5% of full routing at 40.0% " \
           "of its storage, no static merge among these rows)" in TB.targets_markdown(t)
    rows.append({"name": "ta-1", "family": "task_arithmetic", "avg": 0.6, "storage_bytes": 50})
    t = TB.targets(results)
    assert t["mediator"]["met"] is True and t["mediator"]["margin_over_best_static"] == pytest.approx(0.18)
    assert "**met** (mediator-0.5-0.1, the best below full routing's storage: 97.5% of full routing at 40.0% of its " \
           "storage, +18.0 points over ta-1 at 60.0)" in TB.targets_markdown(t)
    rows[-1]["avg"] = 0.7
    assert "**missed**" in TB.targets_markdown(TB.targets(results))


def test_issue_21_targets_take_the_best_row_within_the_storage_cap():
    """1bit-Merging >= 95 % at <= 35 % storage, Mediator >= 97 % at <= 60 %: a better row above
    the cap does not count, and each seed's share (the "share" key) is what is judged."""
    rows = [{"name": "full-routing-oracle", "family": "full-routing", "avg": 0.9, "storage_bytes": 100},
            {"name": "1bit-a", "family": "1bit", "avg": 0.89, "storage_bytes": 39},   # 98.9 %, over the cap
            {"name": "1bit-b", "family": "1bit", "avg": 0.84, "storage_bytes": 32},   # 93.3 %
            {"name": "med-a", "family": "mediator", "avg": 0.88, "storage_bytes": 59, "share": 0.975},
            {"name": "med-b", "family": "mediator", "avg": 0.89, "storage_bytes": 61}]
    results = {"reference_avg": 0.9, "full_routing_bytes": 100, "rows": rows}
    t = TB.targets(results)
    assert t["1bit_tight"]["row"] == "1bit-b" and t["1bit_tight"]["met"] is False
    assert t["1bit_tight"]["share_of_full"] == pytest.approx(0.84 / 0.9)
    assert t["mediator_tight"]["row"] == "med-a" and t["mediator_tight"]["met"] is True
    md = TB.targets_markdown(t)
    assert ("1bit-Merging >= 95% of full routing at <= 35% of its storage (issue #21): **missed** (1bit-b, the best "
            "within that storage: 93.3% of full routing at 32.0% of its storage; 1.7 points short)") in md
    assert "Mediator >= 97% of full routing at <= 60% of its storage (issue #21): **met** (med-a" in md
    rows[1]["storage_bytes"] = 35
    assert TB.targets(results)["1bit_tight"] == {"cap": 0.35, "need": 0.95, "row": "1bit-a", "met": True,
                                                  "share_of_full": pytest.approx(0.89 / 0.9), "storage_share": 0.35}


@pytest.mark.slow  # about 1 min a store on a loaded 2-core box: a server start and 3 x 120 requests
@pytest.mark.parametrize("store_name", ["mediator-0.5-0.1", "1bit-uniform"])
def test_routed_rows_through_the_server_give_the_same_answers(smoke, store_name, tmp_path):
    """`run.py --via-server` (tools/quality/evaluate.py via_server): a routing store's rows (its
    fitted router, the oracle task, the merged model) scored through `streammerge serve` on a
    loopback port with the openai client give the in-process answers of the same runtime, one by
    one, hence the same accuracy."""
    from quality.evaluate import EvalSets, Memo, RoutedEval, load_model, via_server
    from quality.train import cache_dir

    root = cache_dir(SMOKE, smoke / "cache")
    _, tok = load_model(root / "base", "cpu")
    sets = EvalSets.make(SMOKE, tok)
    ev = RoutedEval(root / "merges" / store_name / "job.zarr", sets, Memo())
    res = via_server(ev, log=tmp_path / "serve.log")
    assert set(res) == {"router", "oracle", "static"}
    for mode, r in res.items():
        assert r["answers"] >= len(T.TASKS) * SMOKE.n_test and r["differ"] == 0, (mode, r)
        assert r["avg"] == r["in_process_avg"], (mode, r)
    assert res["oracle"]["avg"] > 0  # the experts' answers, not empty strings


def test_lora_rows_are_the_store_export_served_by_peft(smoke):
    """The LoRA rows: adapter bytes are the files' tensors, growing with the rank; at full rank
    (128 > the smoke model's widths) the harness's peft model, switched to each task's adapter,
    computes that task's model (`export --variant task:NAME`, no LoRA involved), and the row
    answers every prompt as the Mediator store itself does under the same router."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from quality.train import cache_dir
    from streammerge.export.variants import export_variant
    from streammerge.store.store import Store

    res = json.loads((smoke / "out" / "seed-0" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    source, = LR.SOURCES["smoke"]
    merges = cache_dir(SMOKE, smoke / "cache") / "merges"
    sizes = []
    for rank in LR.RANKS:
        name = LR.row_name(rank, source)
        files = list((merges / name / "adapters").glob("*/adapter_model.safetensors"))
        assert len(files) == len(T.TASKS)
        nbytes = sum(a.nbytes for f in files for a in load_file(str(f)).values())
        assert rows[name]["storage_detail"]["adapter_bytes"] == nbytes
        sizes.append(nbytes)
    assert sizes == sorted(set(sizes))
    full = LR.row_name(max(LR.RANKS), source)
    assert rows[full]["rel_error"]["max"] < 1e-5
    assert rows[full]["samples"] == rows[source]["samples"]  # same picks, same weights
    assert rows[full]["oracle_acc"] == rows[source]["oracle_acc"]

    le = LR.LoraEval(merges / full, list(T.TASKS))
    ids = torch.tensor([le.tok("calc 1 + 2 = 3 py sum([1]) Q: A:")["input_ids"]])
    store = Store.open(merges / source / "job.zarr")
    for t in T.TASKS:
        ref_dir = smoke / f"task-{t}"
        export_variant(store, ref_dir, f"task:{t}", progress=False)
        ref = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
        le.model.set_adapter(t)
        with torch.inference_mode():
            got, want = le.model(input_ids=ids).logits, ref(input_ids=ids).logits
        # the task export is rounded to bf16, the shipped model + float32 adapter is not: 3e-4 of
        # the largest logit here, where another task's adapter is off by half of it
        assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max()), t


def _mean_min_max(values):
    return statistics.fmean(values), min(values), max(values)


def test_seeds_table_gives_mean_and_range_of_the_per_seed_values(smoke):
    """OUT/results.json and results.md against each seed's own results, recomputed here: a row's
    average is the mean of its per-task accuracies, its share of full routing is over the same
    seed's oracle full routing."""
    out = smoke / "out"
    res = json.loads((out / "results.json").read_text())
    per = {s: {r["name"]: r for r in json.loads((out / f"seed-{s}" / "results.json").read_text())["rows"]} for s in SEEDS}
    assert res["seeds"] == list(SEEDS) and res["config_detail"]["training"]["seed"] == list(SEEDS)
    assert [r["name"] for r in res["rows"]] == Q.row_order(SMOKE) == list(per[0]) == list(per[1])  # every row, every seed
    md = (out / "results.md").read_text()
    assert "Mean over seeds 0, 1" in md
    moved = 0
    for r in res["rows"]:
        avgs = [statistics.fmean(per[s][r["name"]]["acc"].values()) for s in SEEDS]
        refs = [statistics.fmean(per[s]["full-routing-oracle"]["acc"].values()) for s in SEEDS]
        avg, share, ood = (_mean_min_max(v) for v in (avgs, [a / f for a, f in zip(avgs, refs)],
                                                      [per[s][r["name"]]["ood_all"] for s in SEEDS]))
        assert r["avg"] == pytest.approx(avg[0]) and r["range"]["avg"] == pytest.approx(list(avg[1:]))
        assert r["share"] == pytest.approx(share[0]) and r["range"]["share"] == pytest.approx(list(share[1:]))
        assert r["ood_all"] == pytest.approx(ood[0]) and r["range"]["ood_all"] == pytest.approx(list(ood[1:]))
        for t in T.TASKS:
            assert r["acc"][t] == pytest.approx(statistics.fmean(per[s][r["name"]]["acc"][t] for s in SEEDS))
        spread = lambda m: f"({100 * m[1]:.1f}-{100 * m[2]:.1f})"
        cells = f"| **{100 * avg[0]:.1f}** {spread(avg)} | {100 * share[0]:.1f} {spread(share)} | {100 * ood[0]:.1f} {spread(ood)} |"
        assert f"| {r['name']} |" in md and cells in md, r["name"]
        moved += avg[1] != avg[2]
    assert moved  # the seeds trained different models: the ranges are not all empty
    assert res["reference_avg"] == pytest.approx(statistics.fmean(refs))


def test_seeds_are_cached_and_packed_apart_and_import_back(smoke, tmp_path):
    from quality.train import cache_dir, is_trained

    hashes = {s: SMOKE.with_seed(s).training_hash() for s in SEEDS}
    assert len(set(hashes.values())) == len(SEEDS) and hashes[0] == SMOKE.training_hash()
    for s in SEEDS:
        root = cache_dir(SMOKE.with_seed(s), smoke / "cache")
        assert is_trained(root, SMOKE.with_seed(s))
        assert json.loads((smoke / "pack" / f"seed-{s}" / "train.json").read_text())["hash"] == hashes[s]
    # --import with --seeds unpacks each seed's tars into its own cache: nothing is retrained
    cache = tmp_path / "cache"
    args = ["--smoke", "--seeds", "0,1", "--cache", str(cache), "--import", str(smoke / "pack"), "--train-only", "--train-device", "cpu"]
    assert Q.main(args) == 0
    for s in SEEDS:
        got, want = cache_dir(SMOKE.with_seed(s), cache), cache_dir(SMOKE.with_seed(s), smoke / "cache")
        assert (got / "train.json").read_text() == (want / "train.json").read_text()
        assert (got / "math" / "model.safetensors").read_bytes() == (want / "math" / "model.safetensors").read_bytes()
    # a seed's checkpoints imported as another seed's are refused, not silently retrained
    with pytest.raises(SystemExit, match="error: --import .*seed-1: not the checkpoints of configuration smoke, seed 0"):
        Q.main(["--smoke", "--cache", str(tmp_path / "other"), "--import", str(smoke / "pack" / "seed-1"), "--train-only"])


def test_seeds_run_apart_aggregate_to_the_same_table(smoke, tmp_path):
    """Seeds scored by separate runs (one machine each), gathered under one OUT: --report-only
    --seeds gives back the table one run over every seed wrote; a missing seed is named."""
    import shutil

    out = tmp_path / "out"
    for s in SEEDS:
        shutil.copytree(smoke / "out" / f"seed-{s}", out / f"seed-{s}")
    assert Q.main(["--smoke", "--report-only", "--seeds", ",".join(map(str, SEEDS)), "--out", str(out)]) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, smoke / "out"))
    assert got["rows"] == want["rows"] and got["targets"] == want["targets"] and got["seeds"] == want["seeds"]
    assert TB.markdown_table(got) == TB.markdown_table(want)
    assert "Mean over seeds 0, 1" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="seed-7/results.json is missing"):
        Q.main(["--smoke", "--report-only", "--seeds", "0,7", "--out", str(out)])


def test_seeds_argument_is_checked():
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(SystemExit):
            Q.main(["--smoke", "--seeds", bad, "--out", "/nonexistent"])


def test_large_configuration_shape():
    """--config large: ~50-100M parameters (counted on the meta device against the Llama
    formula), longer contexts than full, and a valid GQA shape."""
    import torch
    from transformers import LlamaForCausalLM

    from quality.config import FULL
    from quality.train import llama_config

    s = LARGE.shape
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(llama_config(LARGE)).parameters())
    head = s.hidden // s.heads
    layer = 2 * s.hidden * s.hidden + 2 * s.hidden * head * s.kv_heads + 3 * s.hidden * s.intermediate + 2 * s.hidden
    assert n == 2 * s.vocab * s.hidden + s.layers * layer + s.hidden
    assert 50e6 <= n <= 100e6
    assert s.max_positions > FULL.shape.max_positions and LARGE.training.block > FULL.training.block
    assert LARGE.training.block <= s.max_positions and s.hidden % s.heads == 0 and s.heads % s.kv_heads == 0
    assert "large" in Q.CONFIGS and LARGE.training_hash() != FULL.training_hash()


def test_one_learning_rate_everywhere():
    """Issue #21: no per-machine learning-rate selection in the reported configurations."""
    for cfg in Q.CONFIGS.values():
        assert cfg.training.ft_lrs == () and cfg.training.ft_warmup < cfg.training.ft_steps


def test_oracle_rows_agree_with_run(smoke, tmp_path):
    """tools/quality/oracle_rows.py (the true task forced through the routed runtime, tests
    only) gives run.py's full-routing oracle and a 1bit row's oracle accuracies on the same
    checkpoints, store built apart."""
    from quality import oracle_rows

    res = json.loads((smoke / "out" / "seed-0" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    out = tmp_path / "o.json"
    assert oracle_rows.main(["--config", "smoke", "--seed", "0", "--cache", str(smoke / "cache"), "--work", str(tmp_path / "w"),
                             "--out", str(out), "--rows", "full,1bit-uniform"]) == 0
    got = json.loads(out.read_text())
    assert got["full"]["acc"] == rows["full-routing-oracle"]["acc"]
    assert got["1bit-uniform"]["acc"] == rows["1bit-uniform"]["oracle_acc"]
    assert got["1bit-uniform"]["bytes"] == rows["1bit-uniform"]["storage_bytes"]
    assert oracle_rows.main(["--config", "smoke", "--out", str(out), "--rows", "nope"]) == 1


def test_restricted_sweep_equals_the_full_sweeps_cells(smoke, tmp_path):
    """--sweep-routers / --sweep-etas: only that grid is evaluated, each cell as the full sweep
    scored it (routers are refitted with a fixed seed); a grid without what the OOD target
    compares is refused before any work."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(smoke / "out" / "seed-0", out)
    before = json.loads((out / "results.json").read_text())["eta_sweep"]["mediator-0.5-0.1"]
    grid = [Q.PLAIN_ROUTER, Q.OOD_ROUTER]
    args = ["--smoke", "--out", str(out), "--cache", str(smoke / "cache"), "--train-device", "cpu", "--only", "mediator-0.5-0.1",
            "--sweep-routers", ",".join(grid), "--sweep-etas", f"1,{Q.OOD_ETA:g}"]
    assert Q.main(args) == 0
    after = json.loads((out / "results.json").read_text())
    sweep = after["eta_sweep"]["mediator-0.5-0.1"]
    assert list(sweep) == [r for r in Q.ROUTERS if r in grid]
    for r in grid:
        assert list(sweep[r]["sweep"]) == [f"{Q.OOD_ETA:g}", "1"]
        for eta, cell in sweep[r]["sweep"].items():
            assert cell["ood_all"] == before[r]["sweep"][eta]["ood_all"] and cell["avg"] == before[r]["sweep"][eta]["avg"], (r, eta)
    assert after["ood_routing"]["mediator-0.5-0.1"]["router"] == Q.OOD_ROUTER
    with pytest.raises(SystemExit, match="the sweep must hold"):
        Q.main(args[:-4] + ["--sweep-routers", "mlp"])
