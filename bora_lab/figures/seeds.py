"""Figures of a comparison with several seeds: mean curves with 95% bands, and the forest plot.

Runs of one (method, rank) over seeds form a group (``record.aggregate.group_key``). The curves show
the group's mean and a shaded pointwise t interval over seeds; the forest plot shows each group's
paired difference from the baseline with its interval (``results["aggregate"]``).
"""
from __future__ import annotations

import math
import plotly.graph_objects as go

from ..record.aggregate import group_key, has_repeats, headline
from .runs import SMOOTH_WINDOW, _loss_label, _smooth, decorate_metric, empty_figure, method_color

_DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]


def has_seeds(results: dict) -> bool:
    """Whether some (method, rank) ran more than once (seeds or a learning-rate sweep): then the
    curves are group means with bands and the table has one row per (method, rank)."""
    return has_repeats(results)


def _groups(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in results.get("runs", []):
        out.setdefault(group_key(run), []).append(run)
    return out


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


def _clean(values) -> list[float | None]:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def _band_traces(fig: go.Figure, key: str, method: str, series: list[tuple[list[int], list[float]]],
                 dash: str) -> None:
    """Mean line and shaded band of ``series`` (one ``(steps, values)`` per seed)."""
    from ..analysis.intervals import band

    series = [(s, v) for s, v in series if s]
    if not series:
        return
    b = band([v for _, v in series], steps=[s for s, _ in series])
    steps = [int(s) for s in b["step"]]
    color = method_color(method)
    low, high = _clean(b["low"]), _clean(b["high"])
    if any(v is not None for v in low):
        fig.add_scatter(x=steps + steps[::-1], y=high + low[::-1], fill="toself", fillcolor=_rgba(color, 0.18),
                        line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=key)
    n = int(max(b["n"]))
    fig.add_scatter(x=steps, y=_clean(b["mean"]), mode="lines", name=f"{key} (mean of {n} seed{'s' * (n > 1)})",
                    legendgroup=key, line={"color": color, "width": 2.5, "dash": dash})


def loss_band_figure(results: dict) -> go.Figure:
    """Training loss per group: mean over seeds of the 10-step moving average, with a 95% band."""
    title = "Training loss"
    groups = {k: [r for r in runs if r.get("history")] for k, runs in _groups(results).items()}
    if not any(groups.values()):
        return empty_figure(title)
    fig = go.Figure()
    for key, runs in groups.items():
        series = [([h["step"] for h in r["history"]], _smooth([h["loss"] for h in r["history"]])) for r in runs]
        _band_traces(fig, key, runs[0]["method"] if runs else key, series, _DASHES[0])
    fig.update_layout(title=f"{title}: mean over seeds ({SMOOTH_WINDOW}-step moving average), band: 95% interval",
                      xaxis_title="optimizer step", yaxis_title=_loss_label(results), hovermode="x unified")
    return fig


def metric_band_figure(results: dict, metric: str | None = None) -> go.Figure:
    """The primary eval metric per group: mean over seeds with a 95% band."""
    task = results.get("task", {})
    metric = metric or task.get("metric") or "loss"
    title = f"Evaluation: {metric}"
    groups = {k: [r for r in runs if r.get("eval")] for k, runs in _groups(results).items()}
    if not any(groups.values()):
        return empty_figure(title)
    fig = go.Figure()
    for key, runs in groups.items():
        series = [([e["step"] for e in r["eval"]], [e["metrics"].get(metric, float("nan")) for e in r["eval"]])
                  for r in runs]
        _band_traces(fig, key, runs[0]["method"] if runs else key, series, _DASHES[0])
    return decorate_metric(fig, task, metric, title, note=": mean over seeds, band: 95% interval")


def forest_figure(results: dict) -> go.Figure:
    """Each group's difference from the baseline on the final evaluation, with its 95% interval."""
    title = "Difference from the baseline"
    agg = headline(results)
    rows = [g for g in agg.get("groups", []) if g.get("vs_baseline")]
    if not rows:
        why = "needs finished runs with per-example scores and a baseline" if agg.get("baseline") else "no baseline"
        return empty_figure(title, why)
    d0 = rows[0]["vs_baseline"]
    scale = 100.0 if d0["score"] == "correct" else 1.0
    unit = "accuracy points" if d0["score"] == "correct" else d0["quantity"]
    fig = go.Figure()
    for g in rows[::-1]:
        d = g["vs_baseline"]
        mid, low, high = d["difference"] * scale, d["low"] * scale, d["high"] * scale
        color = method_color(g["method"]) if d["distinguishable"] else "#888888"
        fig.add_scatter(x=[mid], y=[g["key"]], mode="markers", marker={"color": color, "size": 11},
                        error_x={"type": "data", "symmetric": False, "array": [high - mid], "arrayminus": [mid - low],
                                 "color": color, "thickness": 2},
                        name=g["key"], showlegend=False,
                        hovertemplate=f"{g['key']}<br>{g['verdict']}<br>{d['method']}<extra></extra>")
    fig.add_vline(x=0, line={"color": "#444", "dash": "dot"})
    seeds = len(agg.get("seeds") or [None])
    tuned = " (each at its chosen learning rate)" if "lr" in rows[0] else ""
    fig.update_layout(title=f"{title} ({agg['baseline']}){tuned}: {unit}, 95% interval, paired on "
                            f"{seeds} seed{'s' * (seeds > 1)} and the test examples (grey: not distinguishable)",
                      xaxis_title=f"difference in {unit} (method − {agg['baseline']})", yaxis_title="",
                      height=max(260, 70 * len(rows) + 140))
    return fig
