"""The "Inside a layer" view: plotly figures of one module's weights at one checkpoint (numpy, no torch).

Inputs are what ``bora_lab.record.layer_store.LayerStore`` holds: ``W0`` and ``ΔW`` (``[out, in]``
arrays) and the module's ``inspect()`` dict. Matrices larger than ``MAX_CELLS`` on a side are
block-averaged for display and the title says so. Which method-specific figure is drawn depends on
the keys ``inspect()`` returned (``touched``, ``mora``, ``nf4``, ``budget``), never on the method name.

    figs = layer_figures(store, "sbora_fa-r8", 150, "bert.encoder.layer.0.attention.self.query")
    figs["matrices"].show()   # also "norms", "spectrum", "method"
"""
from __future__ import annotations

import contextlib
import math
import re
import textwrap
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .runs import AXIS_COLORS, empty_figure

MAX_CELLS = 96  # heatmaps show at most 96 x 96 cells
FLOOR = 1e-6  # singular values below FLOOR * the largest are not drawn
FIGURES = ("matrices", "norms", "spectrum", "method")
_BEFORE, _MAG = "#9e9e9e", "#2ca02c"


def _one_blas_thread():
    """One BLAS thread for the SVD: on a busy 2-core CPU OpenBLAS's threads wait on each other
    (measured: a 384x384 SVD took 1.7 s on 2 threads beside other jobs, 35 ms on one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it numpy keeps its own thread count
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lines(fig: go.Figure, xs: list[float], color: str, dash: str = "solid", vertical: bool = True,
           xref: str = "x", yref: str = "y", labels: list[str] | None = None, width: float = 1.0,
           opacity: float = 1.0, label_at: str = "top") -> None:
    """Add full-height (or full-width) lines in one layout update (``add_vline`` costs ~50 ms each)."""
    span = f"{yref} domain" if vertical else f"{xref} domain"
    shapes, notes = list(fig.layout.shapes), list(fig.layout.annotations)
    for k, v in enumerate(xs):
        pos = {"x0": v, "x1": v, "y0": 0, "y1": 1, "xref": xref, "yref": span} if vertical else \
              {"y0": v, "y1": v, "x0": 0, "x1": 1, "yref": yref, "xref": span}
        shapes.append({"type": "line", "line": {"color": color, "dash": dash, "width": width}, "opacity": opacity,
                       **pos})
        if labels and labels[k]:
            notes.append({"text": labels[k], "x": v, "y": 1 if label_at == "top" else 0, "xref": xref, "yref": span,
                          "showarrow": False, "xanchor": "left", "yanchor": label_at, "font": {"color": color, "size": 11}})
    fig.update_layout(shapes=shapes, annotations=notes)


def short_module(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``layer 3: attention.self.query``."""
    m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return f"layer {m.group(1)}: {m.group(2)}" if m else name


def not_applicable(title: str, why: str) -> go.Figure:
    """A figure that says why there is nothing to draw (never an empty plot)."""
    fig = empty_figure(title, "<br>".join(textwrap.wrap(why, 90)))
    fig.update_layout(height=260)
    return fig


# -- numbers ---------------------------------------------------------------------------------
def block_average(mat: np.ndarray, max_cells: int = MAX_CELLS) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Downsample ``mat`` ``[rows, cols]`` by averaging contiguous blocks to at most ``max_cells`` a side.

    Returns:
        ``(small, row_centres, col_centres, downsampled)``: the block means, the original index at
        the centre of each block (so axes keep the original feature numbers), and whether anything
        was averaged.
    """
    mat = np.asarray(mat, dtype=np.float32)
    edges = []
    for n in mat.shape:
        size = math.ceil(n / max_cells)
        edges.append(np.arange(0, n, size))
    small = mat
    for axis, starts in enumerate(edges):
        counts = np.diff(np.append(starts, mat.shape[axis]))
        small = np.add.reduceat(small, starts, axis=axis) / np.expand_dims(counts, 1 - axis)
    centres = [starts + (np.diff(np.append(starts, n)) - 1) / 2 for starts, n in zip(edges, mat.shape)]
    return small, centres[0], centres[1], small.shape != mat.shape


def spectrum(delta: np.ndarray) -> dict[str, Any]:
    """Singular values of ``ΔW`` (descending), effective rank and 99%-energy rank.

    Same definitions as ``bora_lab.analysis.weights.effective_rank`` (the exponential of the
    entropy of ``s / sum(s)``, Roy & Vetterli 2007), in numpy so the UI needs no torch.
    """
    with _one_blas_thread():
        s = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
    out = {"singular_values": s.tolist(), "effective_rank": 0.0, "rank_at_99": 0}
    if s.size == 0 or s.sum() <= 0:
        return out
    p = s / s.sum()
    p = p[p > 0]
    out["effective_rank"] = float(np.exp(-(p * np.log(p)).sum()))
    energy = np.cumsum(s**2) / (s**2).sum()
    out["rank_at_99"] = int(min(int((energy < 0.99 - 1e-12).sum()) + 1, s.size))
    return out


def _shape_note(shape: tuple[int, ...], downsampled: bool) -> str:
    if not downsampled:
        return f"{shape[0]}×{shape[1]}"
    return f"{shape[0]}×{shape[1]}, shown block-averaged to ≤ {MAX_CELLS}×{MAX_CELLS} (downsampled)"


# -- the generic figures -----------------------------------------------------------------------
def matrices_figure(w0: np.ndarray, delta: np.ndarray, title: str = "", touched: dict | None = None) -> go.Figure:
    """Heatmaps of ``W0``, the merged ``W = W0 + ΔW`` and ``ΔW`` (rows: output features, columns: inputs).

    ``W0`` and ``W`` share one colour scale, so they look alike unless the update is large: the
    point of the ``ΔW`` panel, which has its own scale. ``touched`` (SBoRA's ``inspect()["touched"]``)
    outlines the columns or rows the method can change.
    """
    w0 = np.asarray(w0, dtype=np.float32)
    delta = np.asarray(delta, dtype=np.float32)
    panels = [("W0 (step 0)", w0), ("W = W0 + ΔW", w0 + delta), ("ΔW = W − W0", delta)]
    small = [block_average(m) for _, m in panels]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.1)
    wmax = float(max(np.abs(small[0][0]).max(), np.abs(small[1][0]).max(), 1e-12))
    dmax = float(max(np.abs(small[2][0]).max(), 1e-12))
    for c, ((name, _), (mat, ys, xs, _)) in enumerate(zip(panels, small), start=1):
        zmax = dmax if c == 3 else wmax
        fig.add_heatmap(z=mat, x=xs, y=ys, row=1, col=c, colorscale="RdBu_r", zmin=-zmax, zmax=zmax, zmid=0,
                        colorbar={"len": 0.9, "x": 1.0 if c == 3 else 0.615, "thickness": 10,
                                  "title": {"text": "ΔW" if c == 3 else "W"}},
                        showscale=c in (2, 3), name=name,
                        hovertemplate="out %{y:.0f}, in %{x:.0f}<br>%{z:.4g}<extra>" + name + "</extra>")
    if touched and touched.get("indices"):  # outline what the method can change, on the ΔW panel
        _lines(fig, touched["indices"], "#2ca02c", vertical=touched.get("axis") == "col", xref="x3", yref="y3",
               opacity=0.5)
    fig.update_yaxes(autorange="reversed", title_text="output feature (row)", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="input feature (column)")
    fig.update_layout(title=f"{title}<br><sub>{_shape_note(w0.shape, small[0][3])}</sub>", height=420)
    return fig


def norms_figure(w0: np.ndarray, delta: np.ndarray, magnitudes: dict[str, list] | None = None,
                 title: str = "") -> go.Figure:
    """Row norms (per output feature) and column norms (per input feature) of ``W0`` and ``W``,
    their change (right axis: usually far smaller than the norms), and the method's magnitude
    vectors ``m_r`` / ``m_c`` where it has them."""
    w0 = np.asarray(w0, dtype=np.float32)
    w = w0 + np.asarray(delta, dtype=np.float32)
    magnitudes = magnitudes or {}
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.22, specs=[[{"secondary_y": True}]] * 2, subplot_titles=[
        "row norms ‖W[i, :]‖ (per output feature)", "column norms ‖W[:, j]‖ (per input feature)"])
    for r, (axis, dim, mag) in enumerate((("row", 1, "m_r"), ("col", 0, "m_c")), start=1):
        before, after = np.linalg.norm(w0, axis=dim), np.linalg.norm(w, axis=dim)
        x = np.arange(before.size)
        fig.add_scatter(x=x, y=before, mode="lines", name="before (W0)", line={"color": _BEFORE, "width": 1},
                        legendgroup="before", showlegend=r == 1, row=r, col=1)
        fig.add_scatter(x=x, y=after, mode="lines", name=f"after (W), {axis}s", row=r, col=1,
                        line={"color": AXIS_COLORS[axis], "width": 1.5})
        if magnitudes.get(mag) is not None:
            fig.add_scatter(x=x, y=magnitudes[mag], mode="markers", name=f"{mag} (learned magnitude)",
                            marker={"color": _MAG, "size": 3}, row=r, col=1)
        fig.add_bar(x=x, y=after - before, name="change after − before (right axis)", legendgroup="change",
                    showlegend=r == 1, marker={"color": "#7f7f7f"}, opacity=0.45, row=r, col=1, secondary_y=True)
        change = float(np.abs(after - before).mean())
        fig.layout.annotations[r - 1].text += f": mean |Δ‖·‖| = {change:.3g}"
        fig.update_yaxes(title_text="L2 norm", row=r, col=1, secondary_y=False)
        fig.update_yaxes(title_text="change", row=r, col=1, secondary_y=True, showgrid=False)
    fig.update_xaxes(title_text="output feature i", row=1, col=1)
    fig.update_xaxes(title_text="input feature j", row=2, col=1)
    fig.update_layout(title=title, height=560, legend={"orientation": "h", "y": -0.16}, bargap=0)
    return fig


def spectrum_figure(delta: np.ndarray, rank: int | None = None, title: str = "",
                    remaining_rank: int | None = None, rank_name: str = "chosen rank") -> go.Figure:
    """Singular values of ``ΔW`` (log scale) with its effective rank, and a line at the chosen rank
    (``rank_name``: what the method calls it, e.g. MoRA's ``r̂``)."""
    spec = spectrum(delta)
    head = f"Singular values of ΔW{': ' + title if title else ''}"
    if spec["effective_rank"] == 0.0:
        return not_applicable(head, "ΔW = 0 here (step 0, or the update has not moved yet): nothing to decompose")
    s = np.asarray(spec["singular_values"])
    shown = s[s > s[0] * FLOOR]  # exact zeros (SBoRA, truncation) would stretch the log axis to 1e-30
    fig = go.Figure()
    fig.add_scatter(x=np.arange(1, shown.size + 1), y=shown, mode="lines+markers", name="σ_k of ΔW",
                    marker={"size": 4}, line={"color": "#1f77b4"})
    hidden = f"; {s.size - shown.size} values below {FLOOR:g}·σ₁ not drawn" if shown.size < s.size else ""
    if rank:
        _lines(fig, [rank], "#d62728", "dash", labels=[f"{rank_name} {rank}"])
    if remaining_rank is not None and remaining_rank != rank:
        _lines(fig, [max(remaining_rank, 0.5)], "#9467bd", "dot", labels=[f"remaining rank {remaining_rank}"])
    _lines(fig, [spec["effective_rank"]], "#2ca02c", "dot", labels=[f"effective rank {spec['effective_rank']:.1f}"],
           label_at="bottom")
    fig.update_layout(title=f"{head}<br><sub>effective rank {spec['effective_rank']:.2f}, 99% of the energy in "
                            f"{spec['rank_at_99']} of {s.size} directions (ΔW stored in float16: the tail "
                            f"below ~1e-3 of σ₁ is rounding{hidden})</sub>",
                      xaxis_title="k (singular value index)", yaxis_title="σ_k", yaxis_type="log", height=400)
    return fig


# -- method-specific figures (chosen by the inspect() keys) ------------------------------------
def touched_figure(delta: np.ndarray, touched: dict, title: str = "") -> go.Figure:
    """SBoRA: the norm of every column (FA) or row (FB) of ``ΔW``; the touched ones highlighted."""
    col = touched.get("axis") == "col"
    norms = np.linalg.norm(np.asarray(delta, dtype=np.float32), axis=0 if col else 1)
    idx = list(touched.get("indices") or [])
    word, words = ("column (input feature)", "columns (input features)") if col else (
        "row (output feature)", "rows (output features)")
    fig = go.Figure()
    fig.add_bar(x=np.arange(norms.size), y=norms, name=f"‖ΔW‖ per {word}", marker={"color": "#bbbbbb"})
    fig.add_bar(x=idx, y=norms[idx] if idx else [], name=f"touched {words} ({len(idx)})",
                marker={"color": "#2ca02c"}, width=max(1.0, norms.size / 150))
    outside = float(np.delete(norms, idx).max()) if len(idx) < norms.size else 0.0
    fig.update_layout(title=f"SBoRA: only {len(idx)} of {norms.size} {words} can change{': ' + title if title else ''}"
                            f"<br><sub>largest change outside them: {outside:.3g}</sub>",
                      xaxis_title=word, yaxis_title="‖ΔW‖ (L2)", barmode="overlay", height=400)
    return fig


def mora_figure(mora: dict, title: str = "") -> go.Figure:
    """MoRA: the square matrix ``M`` and where compress/decompress send each feature."""
    has_m = mora.get("M") is not None
    cols = 3 if has_m else 2
    names = ([f"M ({mora['r_hat']}×{mora['r_hat']}, trainable)"] if has_m else []) + [
        "compress: input feature j → slot of M", "decompress: output feature i ← slot of M"]
    fig = make_subplots(rows=1, cols=cols, subplot_titles=names, horizontal_spacing=0.08)
    c = 1
    if has_m:
        m = np.asarray(mora["M"], dtype=np.float32)
        zmax = float(max(np.abs(m).max(), 1e-12))
        fig.add_heatmap(z=m, colorscale="RdBu_r", zmin=-zmax, zmax=zmax, showscale=False, row=1, col=1)
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        c = 2
    for k, (side, word) in enumerate((("in", "input feature j"), ("out", "output feature i"))):
        slot, block = np.asarray(mora[f"{side}_slot"]), np.asarray(mora[f"{side}_block"])
        keep = slot >= 0
        x = np.arange(slot.size)[keep]
        fig.add_scatter(x=x, y=slot[keep], mode="markers", row=1, col=c + k, showlegend=False,
                        marker={"size": 3, "color": block[keep], "colorscale": "Viridis"},
                        hovertemplate=word + " %{x} → slot %{y}<extra>block %{marker.color}</extra>")
        fig.update_xaxes(title_text=word, row=1, col=c + k)
        fig.update_yaxes(title_text="slot of M (0..r̂−1)", row=1, col=c + k)
    d_in, d_out, r = len(mora["in_slot"]), len(mora["out_slot"]), mora["r_hat"]
    extra = {"rotation": "; each block t is rotated (RoPE-style, angle t·10000^(−2k/r̂)) before M",
             "truncation": "; inputs and outputs beyond r̂ are dropped / zero",
             "sharing": ("; features j, j + r̂, j + 2r̂, ... share slot j mod r̂ (cyclic, eq. 6)"
                         if mora.get("groups", "cyclic") == "cyclic" else "; groups of adjacent features share a slot"),
             "decomposition": "; every block of r̂ inputs meets the same M"}.get(mora.get("kind"), "")
    fig.update_layout(title=f"MoRA ({mora.get('kind')}){': ' + title if title else ''}<br><sub>r̂ = {r}: {r * r:,} "
                            f"parameters vs LoRA rank {mora.get('lora_rank')}: {mora.get('lora_rank', 0) * (d_in + d_out):,}"
                            f"{extra}</sub>", height=420)
    return fig


def nf4_figure(nf4: dict, title: str = "") -> go.Figure:
    """QLoRA: the block-normalised pretrained weights, the 16 NF4 code values, and the error."""
    h, err = nf4["histogram"], nf4.get("error", {})
    edges = np.asarray(h["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=centres, y=h["counts"], name="weights / block absmax (histogram)", marker={"color": "#9ecae1"},
                width=float(edges[1] - edges[0]))
    fig.add_scatter(x=h["code_values"], y=h["code_counts"], mode="markers+lines", name="weights per NF4 code value",
                    marker={"color": "#8c564b", "size": 8, "symbol": "diamond"}, line={"dash": "dot"}, secondary_y=True)
    _lines(fig, h["code_values"], "#8c564b", opacity=0.35)

    def fmt(key: str, spec: str, scale: float = 1.0) -> str:
        v = err.get(key)
        return "n/a" if v is None else format(v * scale, spec)

    sub = (f"relative error ‖Ŵ−W‖/‖W‖ = {fmt('relative_error', '.2f', 100)}%, RMSE {fmt('rmse', '.3g')}, "
           f"max |error| {fmt('max_abs_error', '.3g')}, SQNR {fmt('sqnr_db', '.1f')} dB, "
           f"{fmt('bits_per_param', '.3f')} bits/weight (blocks of {nf4.get('blocksize')})")
    fig.update_layout(title=f"QLoRA: NF4 code values and the weights{': ' + title if title else ''}<br><sub>{sub}</sub>",
                      xaxis_title="weight / absmax of its block", height=420, legend={"orientation": "h", "y": -0.2})
    fig.update_yaxes(title_text="weights per histogram bin", secondary_y=False)
    fig.update_yaxes(title_text="weights per code value", secondary_y=True)
    return fig


def _rank_at(history: list, step: int, initial: int) -> int:
    rank = initial
    for s, r in history:
        if s > step:
            break
        rank = r
    return rank


def budget_figure(per_module: dict[str, dict], step: int, title: str = "") -> go.Figure:
    """LoRA2/AdaLoRA (LoRA2 figure 3): remaining rank of every checkpointed layer over the steps.

    Args:
        per_module: ``{module: inspect()["budget"]}`` at the shown checkpoint (histories up to it).
        step: the shown step (the x axis ends there).
    """
    names = list(per_module)
    steps = np.arange(0, max(int(step), 1) + 1)
    z = [[_rank_at(b["rank_history"], s, b["initial_rank"]) for s in steps] for b in per_module.values()]
    top = max((b["initial_rank"] for b in per_module.values()), default=1)
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[short_module(n) for n in names], colorscale="Blues", zmin=0, zmax=top,
                               colorbar={"title": {"text": "rank"}},
                               hovertemplate="%{y}<br>step %{x}: rank %{z}<extra></extra>"))
    now = ", ".join(f"{short_module(n)}: {b['remaining_rank']}" for n, b in per_module.items())
    fig.update_layout(title=f"Remaining rank per layer over training (LoRA2 fig. 3){': ' + title if title else ''}"
                            f"<br><sub>at step {step}: {now}</sub>",
                      xaxis_title="optimizer step", yaxis_title="layer", height=max(300, 60 + 28 * len(names)))
    return fig


def method_figure(info: dict, delta: np.ndarray, step: int, budgets: dict[str, dict] | None = None,
                  title: str = "") -> go.Figure:
    """The method-specific view, chosen by which ``inspect()`` key is present."""
    if info.get("touched"):
        return touched_figure(delta, info["touched"], title)
    if info.get("mora"):
        return mora_figure(info["mora"], title)
    if info.get("nf4"):
        return nf4_figure(info["nf4"], title)
    if info.get("budget"):
        return budget_figure(budgets or {"this layer": info["budget"]}, step, title)
    return not_applicable("Method-specific view", "this method has no extra structure to show here: "
                          "see ΔW, the norms and the spectrum")


# -- everything for one (run, step, module) ----------------------------------------------------
def layer_figures(store: Any, run_id: str, step: int, module: str) -> dict[str, go.Figure]:
    """The four figures of :data:`FIGURES` for one checkpoint of ``store`` (a ``LayerStore``).

    ``step`` snaps to the nearest checkpointed step; a run without checkpoints gets "not
    applicable" figures.
    """
    steps = store.steps(run_id)
    if not steps or module not in store.modules(run_id):
        why = f"{run_id} has no layer checkpoint of {module}"
        return {k: not_applicable(k, why) for k in FIGURES}
    step = min(steps, key=lambda s: (abs(s - step), s))
    w0, delta, info = store.w0(run_id, module), store.delta(run_id, step, module), store.info(run_id, step, module)
    where = f"{run_id}, {short_module(module)}, step {step}"
    budgets = None
    if info.get("budget"):
        at = store.infos(run_id).get(step, {})
        budgets = {m: i["budget"] for m, i in at.items() if i.get("budget")}
    remaining = (info.get("budget") or {}).get("remaining_rank")
    return {
        "matrices": matrices_figure(w0, delta, where, touched=info.get("touched")),
        "norms": norms_figure(w0, delta, info.get("magnitudes"), f"Norms before and after: {where}"),
        "spectrum": spectrum_figure(delta, info.get("rank"), where, remaining_rank=remaining,
                                    rank_name=info.get("rank_name", "chosen rank")),
        "method": method_figure(info, delta, step, budgets, where),
    }
