"""Importing ``app.py`` builds the whole UI without launching a server."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import gradio as gr

from bora_lab.methods import registry

ROOT = Path(__file__).resolve().parents[1]


def _app():
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("app")
    finally:
        sys.path.remove(str(ROOT))


def test_import_app_builds_demo_without_launching():
    demo = _app().demo
    assert isinstance(demo, gr.Blocks)
    assert not demo.is_running and getattr(demo, "server", None) is None


def test_compare_tab_draws_every_registered_method_and_its_options():
    config = _app().demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
    for elem_id in ("bl-run", "bl-stop", "bl-loss", "bl-metric", "bl-md", "bl-scatter", "bl-table", "bl-progress"):
        assert elem_id in by_id, elem_id
    choices = [value for _, value in by_id["bl-methods"]["props"]["choices"]]
    assert choices == registry.available()
    labels = {c["props"].get("label") for c in config["components"]}
    assert "dora: detach_norm" in labels and "bora: eps" in labels


def test_training_is_queued_one_at_a_time_and_stop_cancels_it():
    demo = _app().demo
    fns = {f.name: f for f in demo.fns.values()}
    train = fns["run_comparison"]
    # Gradio does not hold Run back: comparisons wait in the app's own training queue, which shows each
    # waiting page its position, and identical settings are watched instead of queued twice.
    assert train.concurrency_limit is None
    assert fns["run_claim"].fn.__wrapped__.__name__ == "run_claim"  # a claim re-run waits in the same queue
    stop_index = next(i for i, f in demo.fns.items() if f.name == "run_comparison")
    assert any(stop_index in (f.cancels or []) for f in demo.fns.values())
    assert fns["stop_comparison"].concurrency_limit is None  # Stop never waits behind a training
