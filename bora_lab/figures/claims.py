"""The figure of a paper claim's record: our value per row with its 95% interval, the paper's beside it.

Rows in one unit share a panel; numeric paper values are drawn as open diamonds, ours as dots with
interval bars (exact counts have none), coloured by the row's verdict.
"""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from .runs import empty_figure

VERDICT_COLORS = {"reproduced": "#059669", "partly reproduced": "#d97706", "not reproduced at this scale": "#6b7280",
                  "not reproduced": "#dc2626", "opposite": "#dc2626", "": "#94a3b8"}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def claim_figure(record: dict[str, Any] | None) -> go.Figure:
    """Horizontal dot-and-interval plot of ``record["rows"]`` (the first unit's rows; context rows last)."""
    if not record or not record.get("rows"):
        return empty_figure("No recorded result for this claim yet: press Run to measure it.")
    units = list(dict.fromkeys(r["unit"] for r in record["rows"] if r.get("verdict")))
    rows = [r for r in record["rows"] if r["unit"] == units[0]] if units else record["rows"]
    labels = [r["label"] for r in rows][::-1]
    rows = rows[::-1]
    fig = go.Figure()
    ours = [r.get("ours") or {} for r in rows]
    x = [o.get("value", o.get("mean")) for o in ours]
    lo = [(xi - o["low"]) if o.get("low") is not None and xi is not None else None for xi, o in zip(x, ours)]
    hi = [(o["high"] - xi) if o.get("high") is not None and xi is not None else None for xi, o in zip(x, ours)]
    fig.add_trace(go.Scatter(
        x=x, y=labels, mode="markers", name="BoRA Lab (95% interval)",
        marker={"size": 11, "color": [VERDICT_COLORS.get(r.get("verdict", ""), "#94a3b8") for r in rows]},
        error_x={"type": "data", "symmetric": False, "array": [h or 0 for h in hi], "arrayminus": [m or 0 for m in lo],
                 "thickness": 2, "width": 6},
        customdata=[r.get("verdict") or "context" for r in rows],
        hovertemplate="%{y}<br>ours %{x:.4g}<br>%{customdata}<extra></extra>"))
    paper = [_number(r.get("paper")) for r in rows]
    if any(p is not None for p in paper):
        fig.add_trace(go.Scatter(x=paper, y=labels, mode="markers", name="paper",
                                 marker={"symbol": "diamond-open", "size": 13, "color": "#111827", "line": {"width": 2}},
                                 hovertemplate="%{y}<br>paper %{x:.4g}<extra></extra>"))
    if units and units[0] in ("accuracy points", "slope"):
        fig.add_vline(x=0, line_dash="dot", line_color="#9ca3af")
    if units and units[0] in ("ratio", "×"):
        fig.add_vline(x=1, line_dash="dot", line_color="#9ca3af")
    fig.update_layout(title=f"{record.get('title', '')}: {record.get('verdict', '')}", xaxis_title=units[0] if units else "",
                      height=max(260, 70 + 38 * len(rows)), margin={"l": 10, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.25}, template="plotly_white")
    fig.update_yaxes(automargin=True)
    return fig
