"""Plotly figures of a comparison's results dict (no torch, no gradio). See ``figures.py``."""
from .figures import (
    AXIS_COLORS,
    METHOD_COLORS,
    all_figures,
    dora_scatter_figure,
    loss_figure,
    md_figure,
    method_color,
    metric_figure,
    results_table,
    save_html,
)

__all__ = [
    "AXIS_COLORS", "METHOD_COLORS", "all_figures", "dora_scatter_figure", "loss_figure", "md_figure",
    "method_color", "metric_figure", "results_table", "save_html",
]
