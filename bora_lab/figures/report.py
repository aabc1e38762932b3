"""The figures of a comparison as one set, and its standalone HTML page (``figures.html``).

With several seeds the loss and metric curves are the groups' means with 95% bands
(:mod:`.seeds`); the forest plot of differences from the baseline comes with every comparison that
has one.
"""
from __future__ import annotations

import plotly.graph_objects as go

from ..record.aggregate import aggregate_rows
from ..record.tables import results_table
from . import runs, seeds


def comparison_figures(results: dict) -> dict[str, go.Figure]:
    """Every figure of a comparison, keyed by a short name."""
    figs = runs.all_figures(results)
    if seeds.has_seeds(results):
        figs["loss"], figs["metric"] = seeds.loss_band_figure(results), seeds.metric_band_figure(results)
    figs["forest"] = seeds.forest_figure(results)
    return figs


def report_html(results: dict) -> str:
    """The standalone page of a comparison: its results table, the per-seed summary when there are
    several seeds, and every figure."""
    cfg = results.get("config", {})
    table = aggregate_rows(results) if seeds.has_seeds(results) else results_table(results)
    return runs.page_html(comparison_figures(results), table=table,
                          title=f"BoRA Lab: {cfg.get('task')} on {cfg.get('model')} ({results.get('status')})")
