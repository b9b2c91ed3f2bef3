"""The report page: one self-contained index.html (inline CSS, no scripts) beside its PNG figures.

Every piece of text that comes from the store (task names, component names, reasons) goes
through `esc`: a task called `<script>` shows as text.
"""

from __future__ import annotations

import html
import math

from .. import __version__
from .figures import KIND_COLORS, kind_order

MIB = 2**20

CAPTIONS = {
    "layer_conflict.png": "Conflict d_l per layer; routed layers in red, the threshold γ dashed when routing is by threshold.",
    "conflict_heatmap.png": "Sign conflict d per layer (columns) and module kind (rows); routed layers framed in red.",
    "norm_shares.png": "Share of each task's squared task-vector norm per module kind.",
    "storage.png": "Bytes per stored component, the total, and full task-specific routing (N fine-tuned models).",
}
# Stores that route no layers (1bit-Merging routes whole task vectors per prompt, by module kind):
# their per-layer figures mark nothing, and say why.
CAPTIONS_NO_LAYER_ROUTING = {
    **CAPTIONS,
    "layer_conflict.png": "Conflict d_l per layer, for reference: this method routes each prompt to a task's "
    "1-bit task vector by module kind, not by layer, so no layer is marked.",
    "conflict_heatmap.png": "Sign conflict d per layer (columns) and module kind (rows); the precision table below "
    "says which module kinds each task keeps.",
    "storage.png": "Bytes per stored component (the base model and each task's 1-bit task vector), the total, and "
    "full task-specific routing (N fine-tuned models).",
}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1150px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; margin-bottom: .1em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.sub { color: #666; margin-top: 0; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: .25em 1.2em; }
dl.summary dt { font-weight: 600; color: #444; }
dl.summary dd { margin: 0; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5em .9em; margin: 1em 0; }
.warn ul { margin: .2em 0; padding-left: 1.2em; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1.2em; }
figure { margin: 0; }
figure.wide { grid-column: 1 / -1; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #d8d8d8; padding: .25em .6em; }
th { background: #f5f5f5; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.routed td { background: #fde2e1; }
tr.total td { font-weight: 600; background: #fafafa; }
.kind { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .3em;
        vertical-align: -.05em; }
.muted { color: #888; }
details summary { cursor: pointer; color: #335; }
p.note { color: #555; font-size: .9em; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _isnum(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def f3(x) -> str:
    """Conflict scores and cosines: three decimals."""
    return f"{x:.3f}" if _isnum(x) else "–"


def g4(x) -> str:
    """Norms: four significant digits."""
    return f"{x:.4g}" if _isnum(x) else "–"


def pct(x, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage."""
    return f"{100 * x:.{digits}f}%" if _isnum(x) else "–"


def nbytes(x) -> str:
    return f"{int(x):,}" if _isnum(x) else "–"


def mib(x) -> str:
    return f"{x / MIB:,.2f}" if _isnum(x) else "–"


def count(x) -> str:
    return f"{int(x):,}" if _isnum(x) else "–"


def _td(text: str, num: bool = True, style: str = "") -> str:
    cls = ' class="n"' if num else ""
    st = f' style="{style}"' if style else ""
    return f"<td{cls}{st}>{text}</td>"


def _kind_label(k: str) -> str:
    color = KIND_COLORS.get(k)
    swatch = f'<span class="kind" style="background:{color}"></span>' if color else ""
    return swatch + esc(k)


def _table(head: list[str], rows: list[str], cls: str = "") -> str:
    h = "".join(f"<th>{c}</th>" for c in head)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{h}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


# ---- sections -----------------------------------------------------------------------------------


def _summary(rep: dict) -> str:
    s, m, st = rep["summary"], rep["method"] or {}, rep["storage"] or {}
    items = [
        ("Store", f"<code>{esc(rep['store'])}</code>"),
        ("Method", esc(s["method"] or rep.get("built_with") or "?")),
        ("Tasks", ", ".join(esc(t) for t in s["tasks"]) or "–"),
        ("Layers", esc(s["num_layers"])),
        ("Conflict score d", esc(s["variant"] or "–") + ' <span class="muted">(elected: sign(Σ<sub>t</sub> τ) vs each τ<sub>t</sub>; '
         "pairwise: mean over task pairs)</span>"),
    ]
    if s["method"] == "mediator" and rep["method"] is not None:
        sel = m.get("selection") if isinstance(m.get("selection"), dict) else {}
        routed = s["routed_layers"] or []
        by = "pairwise conflict" if s["score"] == "pairwise" else "d_l"
        if sel.get("mode") == "top_k":
            rule = f"top-K by {by}, K = {esc(_k(sel.get('k')))}"
        elif sel.get("mode") == "threshold":
            rule = f"every layer with {by} &gt; γ = {f3(sel.get('threshold'))}"
        else:
            rule = esc(sel.get("mode") or "?")
        items += [
            ("Routed layers", _routed_text(routed, s["num_layers"]) + f" ({rule})"),
            ("Other layers", "averaged: " + esc(m.get("average") or "mean")),
            ("Sparse experts", f"ρ = {esc(m.get('rho', '–'))} (top-ρ of θ<sub>t</sub> − D per routed layer and task)"),
            ("Inference", f"top-1 expert when normalised entropy ≤ η = {esc(m.get('eta', '–'))}, else a weighted mix of "
             + ("all experts" if not m.get("top_m") else f"the top {esc(m['top_m'])}")),
        ]
    elif s["method"] == "1bit" and rep["method"] is not None:
        items += [
            ("Preset", esc(m.get("preset", "–"))),
            ("1-bit scale", f"{esc(m.get('scale', '–'))}, one per {esc(m.get('granularity', '–'))}"),
            ("λ", esc(m.get("lambda", "–")) + ' <span class="muted">(weight of the other tasks\' TIES merge)</span>'),
        ]
    if rep["storage"] is not None:
        items.append((
            "Storage",
            f"{mib(st.get('total_bytes'))} MiB = {pct(st.get('share_of_full_routing'))} of full routing "
            f"({mib(st.get('full_routing_bytes'))} MiB for {esc(st.get('n_tasks', '?'))} fine-tuned models)",
        ))
    out = '<dl class="summary">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"
    if s["warnings"]:
        out += '<div class="warn"><strong>Check:</strong><ul>' + "".join(f"<li>{esc(w)}</li>" for w in s["warnings"]) + "</ul></div>"
    return out


def _routed_text(routed: list, num_layers) -> str:
    """`2 of 24: layers 0, 23`: the count first, so a routed layer 0 never reads as "0 routed"."""
    if not routed:
        return f"none of {esc(num_layers)}"
    which = ("layer " if len(routed) == 1 else "layers ") + ", ".join(esc(r) for r in routed)
    return f"{len(routed)} of {esc(num_layers)}: {which}"


def _k(k) -> str:
    if isinstance(k, float) and 0 < k < 1:
        return f"{100 * k:g}% of layers"
    return str(k)


def _figures(written: list[str], num_layers: int, layer_routing: bool = True) -> str:
    from .figures import FIGURES

    captions = CAPTIONS if layer_routing else CAPTIONS_NO_LAYER_ROUTING
    if not written:
        return '<p class="muted">No figures (no data for them in this store).</p>'
    out = ['<div class="figs">']
    for name in FIGURES:
        if name in written:
            # per-layer figures of deep models get the whole width
            wide = ' class="wide"' if name in ("layer_conflict.png", "conflict_heatmap.png") and num_layers > 24 else ""
            out.append(f'<figure{wide}><img src="{esc(name)}" alt="{esc(captions[name])}">'
                       f"<figcaption>{esc(captions[name])}</figcaption></figure>")
    out.append("</div>")
    return "\n".join(out)


def _layers(rep: dict) -> str:
    """The text decoder's layer table, then one per other stack (a vision tower numbers its own layers)."""
    a, s = rep["analysis"], rep["summary"]
    out = "<h3>text_decoder</h3>" if s.get("stacks") else ""
    out += _layer_table(a.get("layers") or [], s, s)
    for stack, rows in s.get("stacks", {}).items():
        out += f"<h3>{esc(stack)}: its own {len(rows['layers'])} layers, ranked and routed apart</h3>"
        out += _layer_table(a["stacks"][stack]["layers"], rows, s)
    return out


def _layer_table(layers: list, rows_doc: dict, s: dict) -> str:
    if not layers:
        return '<p class="muted">analysis.json lists no layers.</p>'
    kinds = kind_order(k for lay in layers for k in (lay.get("by_kind") or {}))
    routing = rows_doc["routed_layers"] is not None
    rank = "rank by pairwise" if s["score"] == "pairwise" else "rank"
    head = ["layer", "d<sub>l</sub>", rank, "pairwise", "entries"] + [f"d {_kind_label(k)}" for k in kinds]
    if routing:
        head += ["routed", "why"]
    rows = []
    for lay, row in zip(layers, rows_doc["layers"]):
        bk = lay.get("by_kind") or {}
        cells = [_td(esc(row["layer"])), _td(f3(lay.get("d"))), _td(esc(row["rank"] or "–")), _td(f3(lay.get("pairwise"))),
                 _td(count(lay.get("n")))]
        cells += [_td(f3((bk.get(k) or {}).get("d"))) for k in kinds]
        if routing:
            cells += [_td("<strong>routed</strong>" if row["routed"] else "–", num=False), _td(esc(row["why"]), num=False)]
        cls = ' class="routed"' if row["routed"] else ""
        rows.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    by = "pairwise conflict" if s["score"] == "pairwise" else "d<sub>l</sub>"
    note = (f'<p class="note">Rank 1 = highest {by}. Highlighted rows are routed: a dense expert plus one sparse '
            "expert per task is stored for them. The paper observes the first and last layers conflict most.</p>"
            if routing else f'<p class="note">Rank 1 = highest {by}.</p>')
    return _table(head, rows) + note


def _kinds(rep: dict) -> str:
    a = rep["analysis"]
    kinds = a.get("kinds") or {}
    rows = []
    for k in kind_order(kinds):
        v = kinds[k] if isinstance(kinds[k], dict) else {}
        rows.append(f"<tr><td>{_kind_label(k)}</td>{_td(count(v.get('n')))}{_td(f3(v.get('d')))}{_td(f3(v.get('pairwise')))}</tr>")
    ol = a.get("outside_layers")
    if isinstance(ol, dict):
        rows.append(f'<tr><td>outside the layers <span class="muted">(embeddings, final norm, head)</span></td>'
                    f"{_td(count(ol.get('n')))}{_td(f3(ol.get('d')))}{_td(f3(ol.get('pairwise')))}</tr>")
    if not rows:
        return ""
    return "<h3>Conflict by module kind, whole model</h3>" + _table(["module kind", "entries", "d", "pairwise"], rows)


def _shares(rep: dict) -> str:
    a, s = rep["analysis"], rep["summary"]
    shares = a.get("norm_share") or {}
    dom = s["dominant_kind"]
    if not dom:
        return '<p class="muted">analysis.json has no per-task norm shares.</p>'
    kinds = kind_order(k for t in shares.values() if isinstance(t, dict) for k in t)
    head = ["task"] + [_kind_label(k) for k in kinds] + ["largest", "attention : MLP", "paper expects", "agrees"]
    rows, lines = [], []
    for t, d in dom.items():
        sh = shares.get(t) if isinstance(shares.get(t), dict) else {}
        cells = [_td(esc(t), num=False)] + [_td(pct(sh.get(k))) for k in kinds]
        cells.append(_td(f"{esc(d['kind'])} ({pct(d['share'])})" if d["kind"] else "–", num=False))
        cells.append(_td(f"{pct(d['attention'])} : {pct(d['mlp'])}"))
        cells.append(_td(esc(d["paper_expects"] or "–"), num=False))
        cells.append(_td({True: "yes", False: "<strong>no</strong>", None: "–"}[d["agrees"]], num=False))
        rows.append("<tr>" + "".join(cells) + "</tr>")
        if d["attention_vs_mlp"] in ("attention", "mlp"):
            lines.append(f"<li><strong>{esc(t)}</strong>: {'MLP' if d['attention_vs_mlp'] == 'mlp' else 'attention'} dominates "
                         f"(attention {pct(d['attention'])}, MLP {pct(d['mlp'])} of the attention + MLP squared norm)"
                         + (f"; largest kind overall: {esc(d['kind'])} with {pct(d['share'])}" if d["kind"] else "")
                         + (f" — the paper expects {esc(d['paper_expects'])}: "
                            + ("agrees" if d["agrees"] else "does not agree") if d["agrees"] is not None else "")
                         + "</li>")
    text = ('<p class="note">1bit-Merging observes that chat-like tasks hold their knowledge in attention modules and '
            "math/code tasks in MLP modules. Measured here, per task:</p><ul>" + "".join(lines) + "</ul>") if lines else ""
    return _table(head, rows) + text


def _precision(rep: dict) -> str:
    m = rep["method"] or {}
    prec = m.get("precision")
    if rep["summary"]["method"] != "1bit" or not isinstance(prec, dict):
        return ""
    why = m.get("why") if isinstance(m.get("why"), dict) else {}
    kinds = kind_order(k for v in prec.values() if isinstance(v, dict) for k in v)
    rows = []
    for t, kv in prec.items():
        kv = kv if isinstance(kv, dict) else {}
        cells = [_td(esc(t), num=False)]
        for k in kinds:
            p = kv.get(k)
            style = "color:#999" if p == "drop" else "font-weight:600" if p not in (None, "drop") else ""
            cells.append(_td(esc(p if p is not None else "–"), num=False, style=style))
        cells.append(_td(esc(why.get(t, "")), num=False))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<h2>Precision per task and module kind</h2>"
            + _table(["task"] + [_kind_label(k) for k in kinds] + ["why"], rows)
            + f'<p class="note">Preset {esc(m.get("preset", "?"))}: drop = not stored, 1bit = sign bits + one scale, '
              "1bit-row = one scale per row, sparse-ρ = top-ρ entries, dense = kept in full.</p>")


def _cos_style(v) -> str:
    if not _isnum(v):
        return ""
    a = min(1.0, abs(v)) * 0.55
    return f"background: rgba(76,114,176,{a:.2f})" if v >= 0 else f"background: rgba(196,78,82,{a:.2f})"


def _cosine(rep: dict) -> str:
    a, s = rep["analysis"], rep["summary"]
    tasks = s["tasks"]
    cos = a.get("cosine")
    norms = a.get("norms") or {}
    if not isinstance(cos, list) or not tasks:
        return '<p class="muted">analysis.json has no cosine matrix.</p>'
    rows = []
    for i, t in enumerate(tasks):
        row = cos[i] if i < len(cos) and isinstance(cos[i], list) else []
        cells = [_td(esc(t), num=False)] + [_td(f3(row[j] if j < len(row) else None), style=_cos_style(row[j] if j < len(row) else None))
                                            for j in range(len(tasks))]
        cells.append(_td(g4(norms.get(t))))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = _table(["cos(τ<sub>t</sub>, τ<sub>u</sub>)"] + [esc(t) for t in tasks] + ["‖τ<sub>t</sub>‖<sub>2</sub>"], rows)
    return table + _layer_norms(rep)


def _layer_norms(rep: dict) -> str:
    a, tasks = rep["analysis"], rep["summary"]["tasks"]
    layers = [lay for lay in a.get("layers") or [] if isinstance(lay.get("norms"), dict)]
    if not layers:
        return ""
    rows = []
    for i, lay in enumerate(layers):
        cells = [_td(esc(lay.get("layer", i)))] + [_td(g4(lay["norms"].get(t))) for t in tasks]
        c = lay.get("cosine")
        if isinstance(c, list) and len(tasks) > 1:
            off = [c[p][q] for p in range(len(tasks)) for q in range(p + 1, len(tasks))
                   if p < len(c) and isinstance(c[p], list) and q < len(c[p]) and _isnum(c[p][q])]
            cells.append(_td(f3(sum(off) / len(off)) if off else "–"))
        else:
            cells.append(_td("–"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = ["layer"] + [f"‖τ‖ {esc(t)}" for t in tasks] + ["mean pairwise cos"]
    return "<details><summary>Per-layer task-vector norms and mean pairwise cosine</summary>" + _table(head, rows) + "</details>"


def _storage(rep: dict) -> str:
    st = rep["storage"]
    if st is None:
        return '<p class="muted">No storage.json in this store yet.</p>'
    full = st.get("full_routing_bytes")

    def share(b):
        return pct(b / full, 2) if _isnum(b) and _isnum(full) and full > 0 else "–"

    rows = []
    for c in st.get("components") or []:
        if isinstance(c, dict):
            b = c.get("bytes")
            rows.append(f"<tr><td>{esc(c.get('name', '?'))}</td>{_td(nbytes(b))}{_td(mib(b))}{_td(share(b))}</tr>")
    tot = st.get("total_bytes")
    rows.append(f'<tr class="total"><td>total</td>{_td(nbytes(tot))}{_td(mib(tot))}{_td(pct(st.get("share_of_full_routing"), 2) if _isnum(st.get("share_of_full_routing")) else share(tot))}</tr>')
    rows.append(f'<tr><td>full routing: {esc(st.get("n_tasks", "N"))} fine-tuned models</td>{_td(nbytes(full))}{_td(mib(full))}{_td(share(full))}</tr>')
    if _isnum(st.get("model_bytes")):
        mb = st["model_bytes"]
        rows.append(f'<tr><td class="muted">one model</td>{_td(nbytes(mb))}{_td(mib(mb))}{_td(share(mb))}</tr>')
    note = ""
    if rep["summary"]["method"] == "1bit":
        note = ('<p class="note">For reference, the 1bit-Merging paper reports 55.02% of full routing\'s storage '
                "(Mistral-7B, chat + math + code).</p>")
    return _table(["component", "bytes", "MiB", "% of full routing"], rows) + note


def render(rep: dict, figures: list[str]) -> str:
    """The whole page; `figures` names the PNGs written beside it."""
    s = rep["summary"]
    name = rep["store"].rstrip("/").split("/")[-1] or rep["store"]
    method = s["method"] or rep.get("built_with") or "?"
    title = f"streammerge report: {name} ({method})"
    conflict_heading = "Routing per layer" if s["routed_layers"] is not None else "Conflict per layer"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">What the {esc(method)} build measured and decided, from <code>analysis.json</code>, '
        "<code>method.json</code> and <code>storage.json</code> in the store.</p>",
        "<h2>Summary</h2>",
        _summary(rep),
        "<h2>Figures</h2>",
        _figures(figures, len(rep["analysis"].get("layers") or []), rep["summary"]["method"] != "1bit"),
        f"<h2>{conflict_heading}</h2>",
        _layers(rep),
        _kinds(rep),
        "<h2>Where each task's update lies: norm share by module kind</h2>",
        _shares(rep),
        _precision(rep),
        "<h2>Task vectors: pairwise cosine and norms</h2>",
        _cosine(rep),
        "<h2>Storage</h2>",
        _storage(rep),
        f'<p class="note muted">streammerge {esc(__version__)}</p>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
