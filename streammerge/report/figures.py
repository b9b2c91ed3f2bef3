"""The report's PNG figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: it keeps global state (and may pick an interactive backend), while a `Figure` on a
`FigureCanvasAgg` is private to the call, so rendering is safe inside a larger process.
Each function takes the loaded report (see `streammerge.report.load_report`) and returns PNG
bytes, or None when the store holds no data for that figure.
"""

from __future__ import annotations

import io
import math

KIND_ORDER = ("attention", "mlp", "norm", "embedding", "other")
KIND_COLORS = {
    "attention": "#4C72B0",
    "mlp": "#DD8452",
    "norm": "#55A868",
    "embedding": "#8172B3",
    "other": "#937860",
}
ROUTED_COLOR = "#C44E52"
PLAIN_COLOR = "#8C9DB5"
DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata: the same store gives the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _float(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def kind_order(kinds) -> list[str]:
    """Known module kinds in their usual order, then any others alphabetically."""
    kinds = set(kinds)
    return [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))


def _layer_ticks(ax, n: int, axis: str = "x") -> None:
    from matplotlib.ticker import MaxNLocator

    loc = MaxNLocator(nbins=min(n, 24), integer=True)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(loc)


def conflict_heatmap(rep: dict) -> bytes | None:
    """Module kind (rows) x layer (columns), colour = conflict d of that kind in that layer."""
    import numpy as np

    layers = rep["analysis"]["layers"]
    kinds = kind_order(k for lay in layers for k in (lay.get("by_kind") or {}))
    if not layers or not kinds:
        return None
    data = np.array(
        [[_float(((lay.get("by_kind") or {}).get(k) or {}).get("d")) for lay in layers] for k in kinds], dtype=float
    )
    L = len(layers)
    fig = _figure(max(6.0, min(16.0, 2.5 + 0.28 * L)), 1.4 + 0.45 * len(kinds))
    ax = fig.add_subplot()
    cmap = _cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    idx = [lay.get("layer", i) for i, lay in enumerate(layers)]
    if L <= 40:
        ax.set_xticks(range(L), [str(i) for i in idx], fontsize=8 if L > 20 else 9)
    else:
        _layer_ticks(ax, L)
    ax.set_xlabel("layer")
    routed = set(rep["summary"].get("routed_layers") or ())
    for col, i in enumerate(idx):
        if i in routed:
            ax.add_patch(_rect(col - 0.5, -0.5, 1, len(kinds), ROUTED_COLOR))
    if L <= 16:  # room for the numbers
        finite = data[np.isfinite(data)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for r in range(len(kinds)):
            for c in range(L):
                if np.isfinite(data[r, c]):
                    ax.text(c, r, f"{data[r, c]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if data[r, c] < mid else "black")
    fig.colorbar(im, ax=ax, label="d (sign conflict)", pad=0.01)
    title = "Sign conflict per layer and module kind"
    ax.set_title(title + (" (red frame: routed layer)" if routed else ""), fontsize=10)
    return _png(fig)


def layer_conflict(rep: dict) -> bytes | None:
    """The routing score per layer (d_l, or the pairwise conflict) as bars, routed layers in red, gamma as a line."""
    rows = rep["summary"]["layers"]
    if not rows:
        return None
    L = len(rows)
    fig = _figure(max(6.0, min(16.0, 2.5 + 0.28 * L)), 3.6)
    ax = fig.add_subplot()
    xs = list(range(L))
    ds = [_float(r["score"]) for r in rows]
    pairwise = rep["summary"].get("score") == "pairwise"
    colors = [ROUTED_COLOR if r["routed"] else PLAIN_COLOR for r in rows]
    ax.bar(xs, [0 if math.isnan(d) else d for d in ds], color=colors, width=0.8)
    if L <= 40:
        ax.set_xticks(xs, [str(r["layer"]) for r in rows], fontsize=8 if L > 20 else 9)
    else:
        _layer_ticks(ax, L)
    ax.set_xlabel("layer")
    ax.set_ylabel("pairwise conflict" if pairwise else f"d_l ({rep['summary'].get('variant') or 'conflict'})")
    ax.set_xlim(-0.6, L - 0.4)
    handles = []
    from matplotlib.patches import Patch

    if rep["summary"].get("routed_layers") is not None:
        handles = [Patch(color=ROUTED_COLOR, label="routed"), Patch(color=PLAIN_COLOR, label="averaged")]
    gamma = rep["summary"].get("threshold")
    if isinstance(gamma, (int, float)):
        line = ax.axhline(gamma, color="black", linestyle="--", linewidth=1, label=f"γ = {gamma:.3g}")
        handles.append(line)
    if handles:
        ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, 1.0))
        top = max([d for d in ds if not math.isnan(d)] + [gamma if isinstance(gamma, (int, float)) else 0, 1e-9])
        ax.set_ylim(0, top * 1.2)
    ax.set_title("Pairwise conflict per layer (the routing score)" if pairwise else "Conflict d_l per layer", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig)


def norm_shares(rep: dict) -> bytes | None:
    """One stacked bar per task: the share of its squared task-vector norm in each module kind."""
    shares = rep["analysis"].get("norm_share") or {}
    tasks = [t for t in rep["summary"]["tasks"] if isinstance(shares.get(t), dict)]
    tasks += [t for t in shares if t not in tasks and isinstance(shares[t], dict)]
    if not tasks:
        return None
    kinds = kind_order(k for t in tasks for k in shares[t])
    fig = _figure(max(5.0, 2.8 + 1.0 * len(tasks)), 4.0)
    ax = fig.add_subplot()
    bottom = [0.0] * len(tasks)
    for k in kinds:
        vals = [_float(shares[t].get(k)) for t in tasks]
        vals = [0.0 if math.isnan(v) else 100 * v for v in vals]
        bars = ax.bar(range(len(tasks)), vals, bottom=bottom, color=KIND_COLORS.get(k), label=k, width=0.6)
        for b, v, y0 in zip(bars, vals, bottom):
            if v >= 6:
                ax.text(b.get_x() + b.get_width() / 2, y0 + v / 2, f"{v:.0f}%", ha="center", va="center",
                        fontsize=8, color="white")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("share of squared task-vector norm (%)")
    ax.set_ylim(0, max(100, max(bottom)) * 1.02)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.set_title("Where each task's update lies, by module kind", fontsize=10)
    return _png(fig)


def storage(rep: dict) -> bytes | None:
    """Horizontal bars: bytes of each stored component, the total, and full routing (N models)."""
    st = rep.get("storage")
    comps = [c for c in (st or {}).get("components") or [] if isinstance(c, dict)]
    if not comps:
        return None
    names = [str(c.get("name", "?")) for c in comps]
    vals = [_float(c.get("bytes")) for c in comps]
    colors = ["#4C72B0"] * len(comps)
    for label, key, color in (("total", "total_bytes", "#2F4B7C"), ("full routing (N models)", "full_routing_bytes", "#999999")):
        if isinstance(st.get(key), (int, float)):
            names.append(label)
            vals.append(float(st[key]))
            colors.append(color)
    finite = [v for v in vals if not math.isnan(v)] or [0.0]
    unit, div = _unit(max(finite))
    fig = _figure(6.4, 1.3 + 0.42 * len(names))
    ax = fig.add_subplot()
    ys = list(range(len(names)))[::-1]
    scaled = [0 if math.isnan(v) else v / div for v in vals]
    ax.barh(ys, scaled, color=colors, height=0.65)
    ax.set_yticks(ys, names, fontsize=9)
    ax.set_xlabel(unit)
    top = max(scaled) if scaled else 1
    ax.set_xlim(0, top * 1.35 or 1)
    full = st.get("full_routing_bytes")
    for y, v in zip(ys, vals):
        if math.isnan(v):
            continue
        txt = f"{v / div:,.2f}"
        if isinstance(full, (int, float)) and full > 0:
            txt += f"  ({100 * v / full:.1f}%)"
        ax.text(v / div + top * 0.01, y, txt, va="center", fontsize=8.5)
    ax.set_title("Storage by component (% of full routing)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _png(fig)


def _unit(n: float) -> tuple[str, float]:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return unit, float(div)
    return "bytes", 1.0


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].copy()


def _rect(x, y, w, h, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=2.0)


# name in OUTDIR -> drawing function, in the order the page shows them
FIGURES = {
    "layer_conflict.png": layer_conflict,
    "conflict_heatmap.png": conflict_heatmap,
    "norm_shares.png": norm_shares,
    "storage.png": storage,
}
