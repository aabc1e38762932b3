"""Plotly figures from a results dict (``docs/results_schema.md``): no torch, no gradio.

Every builder also works on a partial results dict that is still growing (``ResultsAccumulator``),
so the app can redraw them live; with no data yet they return an empty figure saying so.

Colours are fixed per method (:func:`method_color`) in every figure; ranks of one method differ by
line dash. In the ΔM/ΔD panels the two axes have fixed colours (:data:`AXIS_COLORS`).
"""
from __future__ import annotations

import html
import math
import statistics
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots


METHOD_COLORS = {
    "full": "#444444", "lora": "#1f77b4", "rslora": "#17becf", "dora": "#d62728", "dora_col": "#ff7f0e",
    "dora_mag": "#e377c2", "bora": "#2ca02c", "mora": "#9467bd", "qlora": "#8c564b", "vera": "#bcbd22",
}
_PALETTE = ["#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
            "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
AXIS_COLORS = {"row": "#1f77b4", "col": "#ff7f0e"}
AXIS_NAMES = {"row": "row-wise (per output feature)", "col": "column-wise (per input feature)"}
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
SMOOTH_WINDOW = 10


def method_color(method: str) -> str:
    """A fixed colour per method name (known methods get curated colours, others a stable hash)."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _PALETTE[zlib.crc32(method.encode()) % len(_PALETTE)]


def _dash(results: dict, run: dict) -> str:
    ranks = sorted({r["rank"] for r in results.get("runs", []) if r["method"] == run["method"]})
    return _DASHES[ranks.index(run["rank"]) % len(_DASHES)] if run["rank"] in ranks else "solid"


def empty_figure(title: str, why: str = "no data yet") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14})
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def _loss_label(results: dict) -> str:
    kind = results.get("task", {}).get("kind")
    return "training loss (MSE)" if kind in ("synthetic", "regression") else "training loss (cross-entropy, nats)"


def _smooth(values: list[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing moving average (the first points average what exists)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if a is not None and math.isfinite(a)]
        out.append(statistics.fmean(finite) if finite else None)
    return out


def loss_figure(results: dict) -> go.Figure:
    """Training loss per step for every run: raw (faint) and a 10-step moving average."""
    title = "Training loss"
    runs = [r for r in results.get("runs", []) if r.get("history")]
    if not runs:
        return empty_figure(title)
    fig = go.Figure()
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        loss = [h["loss"] for h in run["history"]]
        color = method_color(run["method"])
        fig.add_scatter(x=steps, y=loss, mode="lines", line={"color": color, "width": 1}, opacity=0.25,
                        legendgroup=run["run_id"], showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=steps, y=_smooth(loss), mode="lines", name=run["run_id"], legendgroup=run["run_id"],
                        line={"color": color, "width": 2.5, "dash": _dash(results, run)})
    fig.update_layout(title=f"{title} (thick: {SMOOTH_WINDOW}-step moving average)",
                      xaxis_title="optimizer step", yaxis_title=_loss_label(results), hovermode="x unified")
    return fig


def metric_figure(results: dict, metric: str | None = None) -> go.Figure:
    """The task's primary eval metric (or ``metric``) per eval step, with the majority baseline."""
    task = results.get("task", {})
    metric = metric or task.get("metric") or "loss"
    title = f"Evaluation: {metric}"
    runs = [r for r in results.get("runs", []) if r.get("eval")]
    if not runs:
        return empty_figure(title)
    fig = go.Figure()
    for run in runs:
        pts = [(e["step"], e["metrics"].get(metric)) for e in run["eval"]]
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=run["run_id"],
                        line={"color": method_color(run["method"]), "dash": _dash(results, run)})
    return decorate_metric(fig, task, metric, title)


def decorate_metric(fig: go.Figure, task: dict, metric: str, title: str, note: str = "") -> go.Figure:
    """The metric figures' majority-class line, title (which way is better) and axis labels."""
    base = task.get("majority_baseline")
    if base is not None and metric == "accuracy":
        fig.add_hline(y=base, line={"dash": "dot", "color": "#999"},
                      annotation_text=f"majority class {base:.1%}", annotation_position="bottom right")
    better = "higher is better" if task.get("higher_is_better", True) else "lower is better"
    unit = {"accuracy": " (fraction correct)", "perplexity": " (exp nats/token)",
            "recovery_error": " (‖W−W*‖/‖W*−W0‖)"}.get(metric, "")
    fig.update_layout(title=f"{title} ({better}){note}", xaxis_title="optimizer step", yaxis_title=f"{metric}{unit}")
    return fig


def _series(run: dict, view: str, key: str, layer: int | None) -> tuple[list[int], list[float]]:
    snaps = [s for s in run.get("analysis", []) if view == "from_start" or s.get("prev_step") is not None]
    xs, ys = [], []
    for s in snaps:
        xs.append(s["step"])
        ys.append(s["mean"][view][key] if layer is None else s[view][key][layer])
    return xs, ys


def md_figure(results: dict, view: str = "from_start", layer: int | None = None) -> go.Figure:
    """ΔM (top row) and ΔD (bottom row) per run (columns), row-wise and column-wise (BoRA figs. 2/3).

    Args:
        results: the results dict.
        view: ``"from_start"`` (ΔX(t, 0)) or ``"step_to_step"`` (ΔX(t, previous snapshot)).
        layer: index into the run's analysed modules; None averages over them.
    """
    if view not in ("from_start", "step_to_step"):
        raise ValueError(f"view must be 'from_start' or 'step_to_step', got {view!r}")
    label = "from the start" if view == "from_start" else "step to step"
    title = f"Magnitude and direction changes, {label}"
    runs = [r for r in results.get("runs", []) if len(r.get("analysis", [])) > (view == "step_to_step")]
    if not runs:
        return empty_figure(title, "no weight analysis yet (model-level methods have none)")
    titles = []
    for run in runs:
        mods = run.get("analysed_modules") or []
        where = f"mean of {len(mods)} modules" if layer is None else (mods[layer] if layer < len(mods) else "?")
        titles.append(f"{run['run_id']}<br><sub>{where}</sub>")
    fig = make_subplots(rows=2, cols=len(runs), shared_xaxes=True, shared_yaxes=True, subplot_titles=titles,
                        vertical_spacing=0.1, horizontal_spacing=0.03)
    for c, run in enumerate(runs, start=1):
        for r, what in enumerate(("dM", "dD"), start=1):
            for axis in ("row", "col"):
                xs, ys = _series(run, view, f"{what}_{axis}", layer)
                fig.add_scatter(x=xs, y=ys, mode="lines+markers", row=r, col=c, name=AXIS_NAMES[axis],
                                legendgroup=axis, showlegend=(c == 1 and r == 1), marker={"size": 4},
                                line={"color": AXIS_COLORS[axis], "dash": "solid" if axis == "row" else "dash"})
    fig.update_yaxes(title_text="ΔM (mean |Δ‖w‖|, weight units)", row=1, col=1)
    fig.update_yaxes(title_text="ΔD (mean 1 − cos)", row=2, col=1)
    for c in range(1, len(runs) + 1):
        fig.update_xaxes(title_text="optimizer step", row=2, col=c)
    fig.update_layout(title=title, height=560, legend={"orientation": "h", "y": -0.15})
    return fig


def _fit(xs: list[float], ys: list[float]) -> dict:
    from ..analysis.stats import fit_line

    return fit_line(xs, ys)


def dora_scatter_figure(results: dict, axis: str = "row") -> go.Figure:
    """DoRA figure 2: ``(ΔD(t,0), ΔM(t,0))`` per analysed layer and checkpoint, with a fitted line.

    The legend gives each run's least-squares slope and Pearson r (negative slope: magnitude and
    direction move in opposite amounts, as full fine-tuning and DoRA; positive: LoRA).
    """
    title = f"DoRA figure 2: ΔM vs ΔD per layer and checkpoint ({AXIS_NAMES[axis]})"
    runs = [r for r in results.get("runs", []) if len(r.get("analysis", [])) > 1]
    if not runs:
        return empty_figure(title, "no weight analysis yet (model-level methods have none)")
    fig = go.Figure()
    for run in runs:
        pts = [(s["from_start"][f"dD_{axis}"][i], s["from_start"][f"dM_{axis}"][i], m, s["step"])
               for s in run["analysis"] if s.get("prev_step") is not None for i, m in enumerate(s["modules"])]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        fit = _fit(xs, ys)
        fmt = lambda v, f: "n/a" if v is None else format(v, f)
        name = f"{run['run_id']}: slope {fmt(fit['slope'], '.3g')}, r {fmt(fit['pearson_r'], '.2f')}"
        color = method_color(run["method"])
        fig.add_scatter(x=xs, y=ys, mode="markers", name=name, legendgroup=run["run_id"],
                        marker={"color": color, "size": 6, "opacity": 0.7},
                        text=[f"{p[2]} @ step {p[3]}" for p in pts], hovertemplate="%{text}<br>ΔD %{x:.3g}<br>ΔM %{y:.3g}")
        if fit["slope"] is not None and xs:
            lo, hi = min(xs), max(xs)
            fig.add_scatter(x=[lo, hi], y=[fit["intercept"] + fit["slope"] * v for v in (lo, hi)], mode="lines",
                            line={"color": color, "dash": "dot"}, legendgroup=run["run_id"], showlegend=False)
    fig.update_layout(title=title, xaxis_title="ΔD from start (mean 1 − cos)",
                      yaxis_title="ΔM from start (mean |Δ‖w‖|, weight units)")
    return fig


def all_figures(results: dict) -> dict[str, go.Figure]:
    """Every figure, keyed by a short name (used for the HTML report)."""
    return {"loss": loss_figure(results), "metric": metric_figure(results),
            "md_from_start": md_figure(results, "from_start"), "md_step_to_step": md_figure(results, "step_to_step"),
            "dora_scatter": dora_scatter_figure(results)}


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{'' if v is None else html.escape(str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def page_html(figs: dict[str, go.Figure] | Iterable[go.Figure], table: list[dict[str, Any]] | None = None,
              title: str = "BoRA Lab comparison") -> str:
    """The figures (and optionally a results table) as one standalone HTML page (plotly.js embedded once,
    so it works offline)."""
    figs = list(figs.values()) if isinstance(figs, dict) else list(figs)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2>", _table_html(table or [])]
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)


def save_html(figs: dict[str, go.Figure] | Iterable[go.Figure], out_dir: str | Path, filename: str = "figures.html",
              table: list[dict[str, Any]] | None = None, title: str = "BoRA Lab comparison") -> Path:
    """Write :func:`page_html` to ``out_dir/filename``; returns the file path."""
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html(figs, table, title), encoding="utf-8")
    return path
