"""Plotly figures of a comparison's results dict (no torch, no gradio).

``runs`` (loss, metric, ΔM/ΔD small multiples, the DoRA-figure-2 scatter, the HTML report),
``layer_views`` (Inside a layer), ``shapes`` (a method card's shapes), ``memory_bars`` (the memory bill).
"""
from .runs import (
    AXIS_COLORS,
    METHOD_COLORS,
    all_figures,
    dora_scatter_figure,
    empty_figure,
    loss_figure,
    md_figure,
    method_color,
    metric_figure,
    page_html,
    report_html,
    save_html,
)

__all__ = [
    "AXIS_COLORS", "METHOD_COLORS", "all_figures", "dora_scatter_figure", "empty_figure", "loss_figure",
    "md_figure", "method_color", "metric_figure", "page_html", "report_html", "save_html",
]
