"""Shapes diagram of a method card (``bora_lab.teach.cards.method_card``): tensors drawn to scale."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

TRAINABLE = "#2ca02c"
FROZEN = "#9aa5b1"
GAP = 0.12  # space between tensors, as a fraction of the largest dimension


def _is_column_vector(t: dict[str, Any], d_in: int, d_out: int, axis: str) -> bool:
    """Draw a 1-D tensor vertically (one entry per output row) or horizontally (per input column)."""
    n = t["shape"][0]
    if n == d_out and n != d_in:
        return True
    if n == d_in and n != d_out:
        return False
    if n != d_in:  # rank-sized and other vectors: a small horizontal strip
        return False
    name = t["name"].lower()
    if name.endswith("_c") or "col" in name:
        return False
    if name.endswith("_r") or "row" in name:
        return True
    return not axis.startswith("column")


def shapes_figure(card: dict[str, Any]) -> go.Figure:
    """Each 1-D/2-D tensor of the card as a rectangle ``[rows × cols]`` drawn to one scale.

    Layer-level cards start with ``W0: [out, in]``; trainable tensors are green, frozen ones grey.
    Vectors are drawn along the axis they scale (rows: vertical, columns: horizontal). Thin tensors
    get a minimum visible thickness, so ``A: [8, 384]`` stays a visible strip.
    """
    lay = card.get("layer") or {}
    d_in, d_out = lay.get("d_in", 0), lay.get("d_out", 0)
    boxes: list[tuple[str, int, int, bool]] = []  # (label, rows, cols, trainable)
    if lay:
        boxes.append((f"W0 [{d_out}, {d_in}]", d_out, d_in, False))
    for t in card["tensors"]:
        if t["name"].startswith("base.") or len(t["shape"]) not in (1, 2) or t["numel"] == 0:
            continue
        shape = t["shape"]
        if len(shape) == 1:
            rows, cols = (shape[0], 1) if _is_column_vector(t, d_in, d_out, card.get("magnitude_axis", "")) else (1, shape[0])
        else:
            rows, cols = shape
        boxes.append((f"{t['name']} {shape}", rows, cols, t["trainable"]))
    fig = go.Figure()
    if not boxes:
        fig.add_annotation(text="no tensors to draw", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(height=200, xaxis_visible=False, yaxis_visible=False)
        return fig
    big = max(max(r, c) for _, r, c, _ in boxes)
    thin = 0.015 * big
    x = 0.0
    for i, (label, rows, cols, trainable) in enumerate(boxes):
        w, h = max(cols, thin), max(rows, thin)
        color = TRAINABLE if trainable else FROZEN
        fig.add_shape(type="rect", x0=x, x1=x + w, y0=0, y1=-h, fillcolor=color, opacity=0.75,
                      line={"color": "#333333", "width": 1})
        fig.add_annotation(x=x + w / 2, y=0, text=label, showarrow=False, yshift=12 + 16 * (i % 2),
                           font={"size": 11})
        fig.add_scatter(x=[x + w / 2], y=[-h / 2], mode="markers", marker={"opacity": 0}, showlegend=False,
                        hovertext=f"{label}: {rows * cols:,} values, {'trainable' if trainable else 'frozen'}",
                        hoverinfo="text")
        x += w + GAP * big
    fig.update_xaxes(visible=False, range=[-0.02 * big, x])
    fig.update_yaxes(visible=False, scaleanchor="x", range=[-1.05 * big, 0.2 * big])
    fig.update_layout(title=f"{card['name']}: tensors to scale (green trainable, grey frozen)", height=360,
                      margin={"t": 50, "b": 10, "l": 10, "r": 10}, plot_bgcolor="rgba(0,0,0,0)")
    return fig
