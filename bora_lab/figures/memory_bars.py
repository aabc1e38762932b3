"""Stacked bar of a memory estimate (``bora_lab.teach.memory``), with the measured peak beside it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

COMPONENT_COLORS = {"weights": "#4c72b0", "adapter": "#55a868", "gradients": "#dd8452",
                    "optimizer": "#c44e52", "activations": "#8172b3"}
MEASURED_COLOR = "#7f7f7f"
MIB = 2**20


def _unit(max_bytes: float) -> tuple[float, str]:
    return (1e9, "GB") if max_bytes >= 1e9 else (1e6, "MB")


def memory_figure(breakdown: Mapping[str, Any] | Mapping[str, Mapping[str, Any]], measured_mb: float | None = None,
                  measured_label: str = "measured peak", title: str | None = None) -> go.Figure:
    """Stacked bar per estimate (weights, adapter, gradients, optimizer, activations).

    Args:
        breakdown: one ``estimate_memory`` result, or ``{label: result}`` to compare several.
        measured_mb: a measured peak in MiB (``peak_mem_mb`` of a run); drawn as its own bar.
        measured_label: what was measured (e.g. "process peak RSS (CPU)").
        title: figure title; default names the model and the total.
    """
    many = dict(breakdown) if "components" not in breakdown else {"estimate": breakdown}
    measured = measured_mb * MIB if measured_mb else None
    top = max([b["total"] for b in many.values()] + [measured or 0.0])
    div, unit = _unit(top)
    fig = go.Figure()
    labels = list(many)
    for comp, color in COMPONENT_COLORS.items():
        ys = [b["components"].get(comp, 0.0) / div for b in many.values()]
        paged = [bool(b["details"].get("optimizer_paged")) and comp == "optimizer" for b in many.values()]
        fig.add_bar(name=comp, x=labels, y=ys, marker_color=color,
                    marker_pattern_shape=["/" if p else "" for p in paged],
                    hovertemplate=f"%{{x}}<br>{comp}: %{{y:.3f}} {unit}<extra></extra>")
    for label, b in many.items():
        fig.add_annotation(x=label, y=b["total"] / div, text=f"{b['total'] / div:.2f} {unit}", showarrow=False,
                           yshift=10)
    if measured:
        fig.add_bar(name=measured_label, x=[measured_label], y=[measured / div], marker_color=MEASURED_COLOR,
                    hovertemplate=f"{measured_label}: %{{y:.3f}} {unit}<extra></extra>")
        fig.add_annotation(x=measured_label, y=measured / div, text=f"{measured / div:.2f} {unit}",
                           showarrow=False, yshift=10)
    if title is None:
        first = next(iter(many.values()))
        title = f"Training memory estimate: {first['model']['name']}"
    fig.update_layout(barmode="stack", title=title, yaxis_title=f"memory ({unit}, 10^{9 if unit == 'GB' else 6} bytes)",
                      legend_title_text="component", margin={"t": 60, "b": 40, "l": 60, "r": 20}, height=420)
    return fig
