"""The "Inside a layer" tab: what a method did to one weight matrix, checkpoint by checkpoint.

Pick a comparison (the one running or just finished in this session, or a saved run folder), one
of its runs, one checkpointed module and a step; the tab draws ``W0``, ``W``, ``ΔW``, the row and
column norms, the spectrum of ``ΔW`` and the method's own structure (``bora_lab.figures.layer_views``).
Play steps through the checkpoints. Data come from ``LayerStore`` (numpy, no torch): the live job's
``acc.layers`` in memory, or ``layers/`` in a run folder (``bora_lab.record.layer_store``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from . import common, visitor
from .i18n import t

LIVE = "live"  # source value of this session's current (or last) comparison
PLAY_DELAY_S = 0.8  # pause between frames of Play
PLOTS = ("matrices", "norms", "spectrum", "method")
_EMPTY_MSG = "Run a comparison (Compare tab) or pick a saved run, then a run, a module and a step."


def _store_and_results(session: visitor.Session, source: str | None) -> tuple[Any, dict[str, Any]]:
    """``(LayerStore, results dict)`` of a source: the live job (a consistent copy) or a run folder."""
    from bora_lab.record.layer_store import LayerStore
    from bora_lab.record import load_results

    if not source:
        return LayerStore(), {}
    if source == LIVE:
        job = session.job
        if job is None:
            return LayerStore(), {}
        with job.lock:
            store = job.acc.layers.copy()
        return store, job.results()
    folders = {f.name: f for f in visitor.run_folders(session, visitor.shared_history_default())}
    if source not in folders:
        raise gr.Error("That run folder is not in your list any more; press Refresh.", print_exception=False)
    folder: Path = folders[source]
    return LayerStore.load(folder), load_results(folder)


def source_choices(session: visitor.Session) -> list[tuple[str, str]]:
    """The live comparison of this session (if any), then the saved run folders, newest first."""
    out = []
    if session.job is not None:
        state = "running" if session.job.running else "last"
        out.append((f"this session: {state} comparison ({session.job.out_dir.name})", LIVE))
    out += [(f.name, f.name) for f in visitor.run_folders(session, visitor.shared_history_default())]
    return out


def _why_not(results: dict[str, Any], run_id: str) -> str:
    """Why a run has no layer checkpoint, for people."""
    run = next((r for r in results.get("runs", []) if r["run_id"] == run_id), None)
    if run is None:
        return f"{run_id} is not part of this comparison."
    if run.get("status") in ("pending", "running") and not run.get("analysed_modules") and not run.get("history"):
        return f"{run_id} has not started yet: its first checkpoint comes at step 0."
    if run.get("status") in ("error", "nan", "oom") and not run.get("history"):
        return f"{run_id} failed before training: {run.get('error') or run.get('status')}."
    if not run.get("analysed_modules"):
        return (f"Not applicable: {run['method']} is a model-level method. It changes the model around the "
                "layers (new modules, tokens, biases or the head) and has no merged weight W = W0 + ΔW to look "
                "inside. Pick a layer-level run (LoRA, DoRA, BoRA, ...).")
    if (results.get("config") or {}).get("layer_checkpoints") == 0:
        return f"{run_id} kept no layer checkpoints (layer_checkpoints = 0 in its settings)."
    return f"{run_id} has no layer checkpoint yet (older runs saved before this view existed have none)."


def _blank(why: str) -> dict[str, Any]:
    from bora_lab.figures.layer_views import not_applicable

    titles = {"matrices": "W0, W and ΔW", "norms": "Row and column norms", "spectrum": "Singular values of ΔW",
              "method": "Method-specific view"}
    return {k: not_applicable(titles[k], why) for k in PLOTS}


def _describe(store: Any, run_id: str, step: int, module: str) -> str:
    import numpy as np

    from bora_lab.figures.layer_views import short_module

    steps = store.steps(run_id)
    w0, dw = store.w0(run_id, module).astype(np.float32), store.delta(run_id, step, module).astype(np.float32)
    rel = float(np.linalg.norm(dw) / max(np.linalg.norm(w0), 1e-30))
    info = store.info(run_id, step, module)
    rank = f", {info.get('rank_name', 'chosen rank')} {info['rank']}" if info.get("rank") else ""
    return (f"**{run_id}**, {short_module(module)} `[{w0.shape[0]} out × {w0.shape[1]} in]`{rank}, **step {step}** "
            f"(checkpoints: {', '.join(map(str, steps))}).  \n"
            f"‖ΔW‖_F = {np.linalg.norm(dw):.3g}, that is {100 * rel:.3g}% of ‖W0‖_F.")


def render(session: visitor.Session, source: str | None, run_id: str | None, module: str | None,
           step: float | None) -> tuple:
    """``(status, matrices, norms, spectrum, method)`` for the chosen checkpoint (nearest step)."""
    from bora_lab.figures.layer_views import layer_figures

    if not source or not run_id:
        return (_EMPTY_MSG, *_blank("nothing chosen yet").values())
    store, results = _store_and_results(session, source)
    steps = store.steps(run_id)
    if not steps:
        why = _why_not(results, run_id)
        return (why, *_blank(why).values())
    modules = store.modules(run_id)
    module = module if module in modules else modules[0]
    step = min(steps, key=lambda s: (abs(s - (step if step is not None else steps[-1])), s))
    try:
        figs = layer_figures(store, run_id, step, module)
        text = _describe(store, run_id, step, module)
    except Exception as err:  # noqa: BLE001 - a damaged or partial file: say so, keep the tab working
        raise gr.Error(f"Could not draw this checkpoint: {common.error_message(err)}", print_exception=False) from None
    return (text, *(figs[k] for k in PLOTS))


def _controls(store: Any, results: dict[str, Any], run_id: str | None) -> tuple[dict, dict]:
    """Updates of the module dropdown and the step slider for ``run_id``."""
    steps = store.steps(run_id) if run_id else []
    modules = store.modules(run_id) if run_id else []
    if not steps:
        return (gr.update(choices=[], value=None),
                gr.update(minimum=0, maximum=1, value=0, info="no checkpoints for this run"))
    return (gr.update(choices=modules, value=modules[0]),
            gr.update(minimum=0, maximum=max(steps[-1], 1), value=steps[-1],
                      info=f"checkpoints at steps {', '.join(map(str, steps))} (the nearest one is shown)"))


def pick_source(session: visitor.Session, source: str | None):
    """A comparison was chosen: fill the run list (layer-level runs first) and draw its first run."""
    store, results = _store_and_results(session, source)
    ids = [r["run_id"] for r in results.get("runs", [])] or store.run_ids()
    with_ckpt = set(store.run_ids())
    ids = sorted(ids, key=lambda r: r not in with_ckpt)  # stable: runs with checkpoints first
    run_id = ids[0] if ids else None
    modules, slider = _controls(store, results, run_id)
    labels = [(r if r in with_ckpt else f"{r} (no layer checkpoints)", r) for r in ids]
    out = render(session, source, run_id, None, None) if run_id else (_EMPTY_MSG, *_blank("no runs here").values())
    return (gr.update(choices=labels, value=run_id), modules, slider, *out)


def pick_run(session: visitor.Session, source: str | None, run_id: str | None):
    """A run was chosen: its modules and checkpoints, drawn at the last checkpoint."""
    store, results = _store_and_results(session, source)
    modules, slider = _controls(store, results, run_id)
    return (modules, slider, *render(session, source, run_id, None, None))


def refresh(session: visitor.Session, source: str | None):
    """Re-list the sources (keeping the choice when it still exists)."""
    choices = source_choices(session)
    values = [v for _, v in choices]
    value = source if source in values else (values[0] if values else None)
    return gr.update(choices=choices, value=value)


def play(session: visitor.Session, source: str | None, run_id: str | None, module: str | None):
    """Step through every checkpoint of the run (slider and plots move together)."""
    store, _ = _store_and_results(session, source)
    steps = store.steps(run_id) if run_id else []
    if not steps:
        gr.Info("This run has no layer checkpoints to play.")
        return
    for i, step in enumerate(steps):
        if i:
            time.sleep(PLAY_DELAY_S)
        yield (gr.update(value=step), *render(session, source, run_id, module, step))


def build_inside_tab(session: gr.State) -> gr.Tab:
    """Build the "Inside a layer" tab (inside a ``gr.Tabs``) and its wiring; returns the tab."""
    with gr.Tab(t("tab.inside"), id="inside") as tab:
        gr.Markdown(t("inside.intro"))
        with gr.Row(equal_height=True):
            source = gr.Dropdown([], label=t("common.comparison"), info=t("inside.source.help"),
                                 scale=4, elem_id="bl-inside-source")
            run = gr.Dropdown([], label=t("common.run"), scale=2, elem_id="bl-inside-run")
            module = gr.Dropdown([], label=t("inside.module"), scale=3, elem_id="bl-inside-module")
            again = gr.Button(t("common.refresh"), size="sm", scale=0, elem_id="bl-inside-refresh")
        with gr.Row(equal_height=True):
            step = gr.Slider(0, 1, value=0, step=1, label=t("inside.step"), scale=5, elem_id="bl-inside-step")
            play_btn = gr.Button("▶ " + t("inside.play"), scale=0, elem_id="bl-inside-play")
        status = gr.Markdown(t("inside.empty"), elem_id="bl-inside-status")  # _EMPTY_MSG, translated
        blank = _blank("nothing chosen yet")
        plots = {k: gr.Plot(blank[k], show_label=False, elem_id=f"bl-inside-{k}") for k in PLOTS}
    shown = [status] + [plots[k] for k in PLOTS]
    fast = {"concurrency_limit": None, "show_progress": "minimal"}
    tab.select(refresh, [session, source], source, concurrency_limit=None).then(
        pick_source, [session, source], [run, module, step] + shown, **fast)
    again.click(refresh, [session, source], source, concurrency_limit=None).then(
        pick_source, [session, source], [run, module, step] + shown, **fast)
    source.input(pick_source, [session, source], [run, module, step] + shown, **fast)
    run.input(pick_run, [session, source, run], [module, step] + shown, **fast)
    module.input(render, [session, source, run, module, step], shown, **fast)
    step.release(render, [session, source, run, module, step], shown, **fast)
    play_btn.click(play, [session, source, run, module], [step] + shown, **fast)
    return tab
