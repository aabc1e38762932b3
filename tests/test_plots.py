"""Figure builders on a real tiny run, on partial (live) results and on empty ones."""
from __future__ import annotations

import sys

import plotly.graph_objects as go
import pytest

from bora_lab.config import RunConfig
from bora_lab.figures import (
    all_figures,
    dora_scatter_figure,
    loss_figure,
    md_figure,
    method_color,
    metric_figure,
    save_html,
)
from bora_lab.record import ResultsAccumulator, fold, results_table
from bora_lab.engine.trainer import compare

CFG = RunConfig(task="synthetic_mix", methods=["lora", "dora", "bora"], ranks=[2, 4], steps=12, batch_size=16,
                lr=0.01, eval_every=6, analyze_every=3)


@pytest.fixture(scope="module")
def events():
    return list(compare(CFG))


@pytest.fixture(scope="module")
def results(events):
    return fold(CFG, events).results


def test_every_builder_returns_a_figure_with_traces(results):
    figs = all_figures(results)
    assert set(figs) == {"loss", "metric", "md_from_start", "md_step_to_step", "dora_scatter"}
    for name, fig in figs.items():
        assert isinstance(fig, go.Figure) and len(fig.data) > 0, name
    assert len(loss_figure(results).data) == 2 * 6  # raw + smoothed per run
    assert len(metric_figure(results).data) == 6


def test_md_figure_small_multiples(results):
    fig = md_figure(results, "from_start")
    assert len(fig.data) == 6 * 2 * 2  # runs x (ΔM, ΔD) x (row, col)
    assert {t.name for t in fig.data} == {"row-wise (per output feature)", "column-wise (per input feature)"}
    assert fig.data[0].x[0] == 0  # from the start includes step 0
    s2s = md_figure(results, "step_to_step")
    assert s2s.data[0].x[0] == 3  # no step-0 point without a previous snapshot
    assert md_figure(results, layer=0).data[0].y is not None
    with pytest.raises(ValueError):
        md_figure(results, "sideways")
    assert "ΔM" in fig.layout.yaxis.title.text and "ΔD" in fig.layout.yaxis7.title.text


def test_dora_scatter_legend_has_slope_and_r(results):
    fig = dora_scatter_figure(results)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert len(names) == 6 and all("slope" in n and ", r " in n for n in names)
    assert "ΔD" in fig.layout.xaxis.title.text and "ΔM" in fig.layout.yaxis.title.text


def test_results_table(results):
    rows = results_table(results)
    assert [r["run"] for r in rows] == ["lora-r2", "lora-r4", "dora-r2", "dora-r4", "bora-r2", "bora-r4"]
    for key in ("method", "rank", "trainable params", "trainable %", "final loss", "recovery_error",
                "median step (s)", "peak mem (MiB)", "ΔM row", "ΔM col", "ΔD row", "ΔD col", "ΔM row/col"):
        assert key in rows[0], key
    assert all(r["status"] == "done" and r["final loss"] is not None for r in rows)


def test_partial_and_empty_results(events):
    acc = ResultsAccumulator(CFG)
    assert all(isinstance(f, go.Figure) for f in all_figures(acc.results).values())  # nothing yet
    assert results_table(acc.results)[0]["status"] == "pending"
    half = len(events) // 2
    for ev in events[:half]:
        acc.update(ev)
    figs = all_figures(acc.results)
    assert len(figs["loss"].data) > 0 and len(figs["md_from_start"].data) > 0
    rows = results_table(acc.results)
    assert any(r["status"] == "running" and r["final loss"] is not None for r in rows)


def test_method_colors_are_stable():
    assert method_color("lora") == method_color("lora") != method_color("dora")
    assert method_color("some_new_method") == method_color("some_new_method")


def test_save_html(results, tmp_path):
    path = save_html(all_figures(results), tmp_path, table=results_table(results))
    text = path.read_text()
    assert path.name == "figures.html" and text.count("plotly.js") >= 1 and "lora-r2" in text


def test_plots_do_not_import_torch_or_gradio():
    import subprocess

    code = "import sys, bora_lab.figures, bora_lab.record; print('torch' in sys.modules, 'gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
