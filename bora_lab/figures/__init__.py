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
    save_html,
)
from .report import comparison_figures, report_html
from ..record.aggregate import aggregate_rows
from .seeds import forest_figure, has_seeds, loss_band_figure, metric_band_figure

__all__ = [
    "AXIS_COLORS", "METHOD_COLORS", "all_figures", "dora_scatter_figure", "empty_figure", "loss_figure",
    "md_figure", "method_color", "metric_figure", "page_html", "report_html", "save_html",
    "comparison_figures", "aggregate_rows", "forest_figure", "has_seeds", "loss_band_figure", "metric_band_figure",
]
