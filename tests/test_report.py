"""`streammerge report`: HTML page + PNG figures + --json, from a store's analysis/method/storage JSON."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

from streammerge.cli import main as cli

TASKS = ["math", "code", "chat"]
KINDS = ("attention", "mlp", "norm")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def analysis_doc(num_layers: int = 8) -> dict:
    layers = []
    for i in range(num_layers):
        # U-shaped conflict like the paper's observation: first and last layers highest
        d = round(0.20 + 0.03 * abs(i - (num_layers - 1) / 2), 4)
        layers.append({
            "layer": i,
            "n": 1000 + i,
            "d": d,
            "pairwise": round(d * 0.8, 4),
            "by_kind": {k: {"n": 300 + j, "d": round(d + 0.01 * j, 4), "pairwise": round(d * 0.7, 4)}
                        for j, k in enumerate(KINDS)},
            "norms": {t: round(1.1 + 0.1 * i + 0.01 * j, 4) for j, t in enumerate(TASKS)},
            "cosine": [[1.0 if a == b else 0.05 * (a + b) for b in range(3)] for a in range(3)],
        })
    return {
        "tasks": TASKS,
        "variant": "elected",
        "num_layers": num_layers,
        "layers": layers,
        "kinds": {k: {"n": 2400 + j, "d": 0.3 + 0.01 * j, "pairwise": 0.21} for j, k in enumerate(KINDS + ("embedding",))},
        "outside_layers": {"n": 640, "d": 0.287, "pairwise": 0.199},
        "norm_share": {
            "math": {"attention": 0.2, "mlp": 0.7, "norm": 0.01, "embedding": 0.09, "other": 0.0},
            "code": {"attention": 0.3, "mlp": 0.6, "norm": 0.02, "embedding": 0.08, "other": 0.0},
            "chat": {"attention": 0.55, "mlp": 0.35, "norm": 0.02, "embedding": 0.08, "other": 0.0},
        },
        "attention_vs_mlp": {
            "math": {"attention": 0.2222, "mlp": 0.7778},
            "code": {"attention": 0.3333, "mlp": 0.6667},
            "chat": {"attention": 0.6111, "mlp": 0.3889},
        },
        "cosine": [[1.0, 0.123, -0.045], [0.123, 1.0, 0.067], [-0.045, 0.067, 1.0]],
        "norms": {"math": 3.1416, "code": 2.7183, "chat": 1.4142},
    }


def storage_doc(method: str) -> dict:
    model = 988_000_000
    if method == "mediator":
        comps = [{"name": "averaged model", "bytes": model}, {"name": "dense experts (2 layers)", "bytes": 61_000_000}]
        comps += [{"name": f"sparse experts ({t})", "bytes": 12_345_678 + j} for j, t in enumerate(TASKS)]
    else:
        comps = [{"name": "base model", "bytes": model}]
        comps += [{"name": f"1-bit task vectors ({t})", "bytes": 45_678_901 + j} for j, t in enumerate(TASKS)]
    total = sum(c["bytes"] for c in comps)
    return {"components": comps, "total_bytes": total, "full_routing_bytes": 3 * model,
            "share_of_full_routing": total / (3 * model), "model_bytes": model, "n_tasks": 3}


def method_doc(method: str, mode: str = "top_k") -> dict:
    if method == "mediator":
        if mode == "top_k":
            return {"method": "mediator", "tasks": TASKS, "routed_layers": [7, 0], "selection": {"mode": "top_k", "k": 2,
                    "threshold": None}, "score": "d", "rho": 0.1, "eta": 0.5, "top_m": 0, "average": "mean"}
        return {"method": "mediator", "tasks": TASKS, "routed_layers": [0, 1, 6, 7],
                "selection": {"mode": "threshold", "k": None, "threshold": 0.26}, "rho": 0.1, "eta": 0.5, "average": "ties"}
    return {
        "method": "1bit", "tasks": TASKS, "preset": "auto",
        "precision": {
            "math": {"attention": "drop", "mlp": "1bit", "norm": "dense", "embedding": "drop", "other": "drop"},
            "code": {"attention": "drop", "mlp": "1bit", "norm": "dense", "embedding": "drop", "other": "drop"},
            "chat": {"attention": "1bit", "mlp": "1bit", "norm": "dense", "embedding": "drop", "other": "drop"},
        },
        "scale": "absmean", "granularity": "tensor", "lambda": 1.0,
        "why": {"math": "keeps mlp: 78% of its squared task-vector norm", "code": "keeps mlp: 67%",
                "chat": "keeps attention and mlp: 90%"},
    }


def make_store(root, method: str, *, analysis=None, meta=None, storage=True, mode="top_k"):
    store = root / f"{method}-{mode}.zarr"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": 1, "method": method, "tensors": [], "jobs": []}))
    if method in ("mediator", "1bit"):
        (store / "analysis.json").write_text(json.dumps(analysis or analysis_doc()))
        (store / "method.json").write_text(json.dumps(meta or method_doc(method, mode)))
        if storage:
            (store / "storage.json").write_text(json.dumps(storage_doc(method)))
    return store


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def check_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 300 and height > 150, (path, width, height)


FIGS = ("conflict_heatmap.png", "norm_shares.png", "layer_conflict.png", "storage.png")


def test_mediator_report_html_and_figures(tmp_path):
    store = make_store(tmp_path, "mediator")
    out = tmp_path / "rep"
    res = run("report", store, "-o", out)
    assert "index.html" in res.output and "4 figure(s)" in res.output
    for name in FIGS:
        check_png(out / name)
    page = (out / "index.html").read_text()
    for name in FIGS:
        assert f'src="{name}"' in page
    a, st = analysis_doc(), storage_doc("mediator")
    # routed layers: highlighted rows, and why
    assert page.count('<tr class="routed">') == 2
    assert "top-K by d_l (K = 2; rank 1 of 8)" in page and "top-K by d_l (K = 2; rank 2 of 8)" in page
    assert "Routed layers</dt><dd>2 of 8: layers 0, 7 (top-K" in page
    # per-layer d_l and kind d, 3 decimals
    for lay in a["layers"]:
        assert f'<td class="n">{lay["d"]:.3f}</td>' in page
        assert f'{lay["by_kind"]["mlp"]["d"]:.3f}' in page
    # norm shares per task, and which kind dominates
    assert "70.0%" in page and "55.0%" in page
    assert "<strong>math</strong>: MLP dominates (attention 22.2%, MLP 77.8%" in page
    assert "<strong>chat</strong>: attention dominates (attention 61.1%, MLP 38.9%" in page
    assert "agrees" in page and "does not agree" not in page
    # cosine matrix and norms
    assert "0.123" in page and "-0.045" in page and "3.142" in page
    # storage: bytes, MiB, % of full routing
    for c in st["components"]:
        assert f"{c['bytes']:,}" in page and f"{c['bytes'] / 2**20:,.2f}" in page
        assert f"{100 * c['bytes'] / st['full_routing_bytes']:.2f}%" in page
    assert f"{100 * st['share_of_full_routing']:.2f}%" in page
    assert "Check:" not in page  # consistent input: no warnings


def test_mediator_threshold_mode(tmp_path):
    store = make_store(tmp_path, "mediator", mode="threshold")
    out = tmp_path / "rep"
    run("report", store, "-o", out)
    page = (out / "index.html").read_text()
    assert page.count('<tr class="routed">') == 4
    assert "d_l &gt; γ (0.305 &gt; 0.260)" in page
    assert "averaged (ties)" in page
    check_png(out / "layer_conflict.png")


def test_1bit_report(tmp_path):
    store = make_store(tmp_path, "1bit")
    out = tmp_path / "rep"
    run("report", store, "-o", out)
    for name in FIGS:
        check_png(out / name)
    page = (out / "index.html").read_text()
    assert '<tr class="routed">' not in page and "Precision per task and module kind" in page
    assert "keeps mlp: 78% of its squared task-vector norm" in page
    assert "Preset</dt><dd>auto" in page and "55.02%" in page
    assert f"{45_678_901:,}" in page


def test_json_round_trips(tmp_path):
    store = make_store(tmp_path, "mediator")
    res = run("report", store, "--json")
    doc = json.loads(res.output)
    assert doc["analysis"] == analysis_doc()
    assert doc["method"] == method_doc("mediator")
    assert doc["storage"] == storage_doc("mediator")
    assert doc["figures"] == [] and doc["html"] is None
    assert doc["summary"]["routed_layers"] == [0, 7]
    assert doc["summary"]["dominant_kind"]["math"]["attention_vs_mlp"] == "mlp"
    assert [r["routed"] for r in doc["summary"]["layers"]] == [True] + [False] * 6 + [True]
    assert not (tmp_path / "rep").exists()
    # with -o as well: writes the page and lists the figures
    doc = json.loads(run("report", store, "-o", tmp_path / "rep", "--json").output)
    assert sorted(p.rsplit("/", 1)[-1] for p in doc["figures"]) == sorted(FIGS)
    assert doc["html"].endswith("index.html") and (tmp_path / "rep" / "index.html").is_file()


def test_escapes_text_from_the_store(tmp_path):
    evil = "<script>alert(1)</script>"
    a = analysis_doc(4)
    a["tasks"] = ["math", "code", evil]
    a["norm_share"][evil] = a["norm_share"].pop("chat")
    meta = method_doc("1bit")
    meta["why"]["math"] = '<img src=x onerror="boom">'
    store = make_store(tmp_path, "1bit", analysis=a, meta=meta)
    run("report", store, "-o", tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_static_store_and_bad_input_are_one_line_errors(tmp_path):
    store = make_store(tmp_path, "ties")
    res = run("report", store, "-o", tmp_path / "rep", ok=False)
    assert res.exit_code == 1
    assert res.output.strip() == (f"error: {store}: no analysis in this store (built with method ties); reports exist "
                                  "for mediator and 1bit builds")
    assert not (tmp_path / "rep").exists()
    # a routing store whose analysis pass has not run yet
    unfinished = make_store(tmp_path, "mediator", mode="unfinished")
    (unfinished / "analysis.json").unlink()
    res = run("report", unfinished, "--json", ok=False)
    assert res.exit_code == 1 and "no analysis in this store yet" in res.output
    # not a store / malformed JSON / neither -o nor --json
    res = run("report", tmp_path / "nope", "--json", ok=False)
    assert res.exit_code == 1 and "no such store" in res.output
    broken = make_store(tmp_path, "1bit", mode="broken")
    (broken / "analysis.json").write_text("{not json")
    res = run("report", broken, "--json", ok=False)
    assert res.exit_code == 1 and "analysis.json:1: analysis.json is not valid JSON" in res.output and len(res.output.strip().splitlines()) == 1
    res = run("report", broken, ok=False)
    assert res.exit_code == 2 and "-o OUTDIR" in res.output


def test_unfinished_build_and_inconsistent_routing_are_reported(tmp_path):
    meta = method_doc("mediator")
    meta["routed_layers"] = [0, 3]  # layer 7 has a higher d_l than layer 3
    store = make_store(tmp_path, "mediator", meta=meta, storage=False)
    res = run("report", store, "-o", tmp_path / "rep")
    assert "storage.json is missing" in res.output and "layer 7 (d_l 0.305) is not routed" in res.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Check:" in page and "No storage.json in this store yet" in page
    assert not (tmp_path / "rep" / "storage.png").exists()
    check_png(tmp_path / "rep" / "layer_conflict.png")


def test_mediator_ranked_by_pairwise(tmp_path):
    """conflict: pairwise ranks layers by the pairwise score, not d: the page follows method.json's score."""
    a = analysis_doc()
    for lay in a["layers"]:
        lay["pairwise"] = 0.5 - 0.01 * abs(lay["layer"] - 3.5)  # middle layers highest, unlike d
    meta = method_doc("mediator")
    meta.update(routed_layers=[3, 4], score="pairwise", scores=[lay["pairwise"] for lay in a["layers"]])
    store = make_store(tmp_path, "mediator", analysis=a, meta=meta)
    res = run("report", store, "-o", tmp_path / "rep")
    assert "warning" not in res.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "top-K by pairwise conflict (K = 2; rank 1 of 8)" in page and "Check:" not in page
    doc = json.loads(run("report", store, "--json").output)
    assert [r["layer"] for r in doc["summary"]["layers"] if r["routed"]] == [3, 4]
    assert doc["summary"]["score"] == "pairwise"


@pytest.mark.parametrize("num_layers", [80])
def test_many_layers(tmp_path, num_layers):
    meta = method_doc("mediator")
    meta["routed_layers"] = [0, 79]
    store = make_store(tmp_path, "mediator", analysis=analysis_doc(num_layers), meta=meta)
    run("report", store, "-o", tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count('<tr class="routed">') == 2
    check_png(tmp_path / "rep" / "conflict_heatmap.png")


def test_1bit_report_has_its_own_captions(tmp_path):
    # 1bit routes task vectors per prompt by module kind, not layers: no "routed layers in red"
    page = (tmp_path / "r1").joinpath("index.html")
    run("report", make_store(tmp_path, "1bit"), "-o", tmp_path / "r1")
    text = page.read_text()
    assert "routed layers in red" not in text and "framed in red" not in text
    assert "not by layer, so no layer is marked" in text and "1-bit task vector" in text
    run("report", make_store(tmp_path, "mediator"), "-o", tmp_path / "rm")
    assert "routed layers in red" in (tmp_path / "rm" / "index.html").read_text()


def test_one_routed_layer_0_reads_as_one_layer(tmp_path):
    meta = method_doc("mediator")
    meta["routed_layers"] = [0]
    meta["selection"]["k"] = 1
    run("report", make_store(tmp_path, "mediator", meta=meta), "-o", tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Routed layers</dt><dd>1 of 8: layer 0 (top-K" in page
