"""The Compare tab: the settings form (generated from ``RunConfig``'s field metadata), Run/Stop, and
the live plots of the visitor's comparison, streamed from the ``Job`` in :mod:`bora_lab.ui.visitor`.

Each frame redraws only the plots that events made stale (:func:`bora_lab.ui.common.stale_plots`),
at most every ``interval`` seconds, the interval growing with the cost of a redraw so that drawing
stays a small fraction of training time.
"""
from __future__ import annotations

import functools
import queue
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from bora_lab.config import GROUPS, MAIN, RunConfig, settings
from bora_lab.methods import registry

from . import common, form
from .visitor import END, Job, Session, default_compare, job_of, new_run_dir, owner_id

ALREADY_RUNNING = "A comparison is already running in this tab: press Stop first, or wait for it to finish."

OUTPUTS = ("status", "progress") + common.PLOTS  # the order of the run handler's outputs
MIN_INTERVAL_S = 1.0  # never redraw more often than this
MAX_INTERVAL_S = 2.0  # ... nor less often: the page updates at least every 2 s
COST_RATIO = 15.0  # interval >= 15 x the last redraw's cost, so drawing stays under ~7% of the time
STOP_WAIT_S = 120.0  # how long Stop waits for the trainer to reach a step boundary
RANK_CHOICES = ["1", "2", "4", "8", "16", "32", "64", "128"]


def _model_choices() -> list[tuple[str, str]]:
    """The offline models, plus the toy bases the synthetic tasks suggest (free text allows any id)."""
    from bora_lab.engine.loading import OFFLINE_MODELS
    from bora_lab.engine.tasks import TASKS

    choices = [(f"{key}: {desc.split(' (PyPI')[0]}", key) for key, desc in OFFLINE_MODELS.items()]
    toys = {s.defaults["model"] for s in TASKS.values() if s.defaults.get("model", "minilm") not in OFFLINE_MODELS}
    return choices + [(f"{m}: toy base of the synthetic tasks", m) for m in sorted(toys)]


def _widget(name: str, value: Any) -> gr.components.Component:
    """The component for one RunConfig field; label, info and bounds come from the field's metadata."""
    meta = RunConfig.__dataclass_fields__[name].metadata
    kw = {"label": meta["label"], "info": meta["help"], "value": value, "elem_id": f"bl-field-{name}"}
    if name == "model":
        return gr.Dropdown(_model_choices(), allow_custom_value=True, **kw)
    if name == "task":
        return gr.Dropdown(form.task_choices(), allow_custom_value=True, **kw)
    if name == "methods":
        return gr.CheckboxGroup(form.method_choices(), **{**kw, "elem_id": "bl-methods"})
    if name == "ranks":
        return gr.Dropdown(RANK_CHOICES, multiselect=True, allow_custom_value=True, **kw)
    if meta.get("choices"):
        return gr.Radio(list(meta["choices"]), **kw)
    type_str = form.field_type(name)
    if type_str == "bool":
        return gr.Checkbox(**kw)
    if type_str.startswith(("int", "float")):
        return gr.Number(precision=0 if type_str.startswith("int") else None, **kw)  # bounds: RunConfig
    return gr.Textbox(max_lines=1, **kw)


def _option_widget(spec: dict[str, Any]) -> gr.components.Component:
    """The component for one method option (``form.option_specs()``)."""
    kw = {"label": f"{spec['method']}: {spec['name']}", "info": spec.get("help"), "value": spec["default"]}
    base = spec["type"].removesuffix("| None").strip()
    if spec.get("choices"):
        return gr.Dropdown(list(spec["choices"]), **kw)
    if base == "bool":
        return gr.Checkbox(**kw)
    if base in ("int", "float"):
        return gr.Number(precision=0 if base == "int" else None, minimum=spec.get("min"),
                         maximum=spec.get("max"), **kw)
    return gr.Textbox(max_lines=1, **kw)


def _method_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, gr.Group]]:
    """One group of option widgets per method (drawn from its config), shown while it is selected."""
    widgets: dict[str, gr.components.Component] = {}
    groups: dict[str, gr.Group] = {}
    specs = form.option_specs()
    with gr.Accordion("Method options", open=False):
        gr.Markdown("Options of the selected methods (rank and alpha are set above).")
        for method in dict.fromkeys(s["method"] for s in specs):
            with gr.Group(visible=method in values["methods"]) as groups[method]:
                for spec in (s for s in specs if s["method"] == method):
                    widgets[spec["key"]] = _option_widget({**spec, "default": values[spec["key"]]})
    return widgets, groups


def _settings(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, gr.Group], gr.Markdown]:
    """The Compare tab's left column: ``({input key: component}, option groups, method notes)``."""
    w: dict[str, gr.components.Component] = {}
    main = [f.name for f in settings(MAIN)]
    for name in main[:3]:  # model, task, methods: full width
        w[name] = _widget(name, values[name])
    notes = gr.Markdown(form.method_notes(values["methods"]), elem_id="bl-method-notes")
    for i in range(3, len(main), 2):  # the rest of the main settings two by two
        with gr.Row():
            for name in main[i:i + 2]:
                w[name] = _widget(name, values[name])
    for group in GROUPS[1:]:  # one accordion per group of RunConfig's metadata
        fields = [f.name for f in settings(group)]
        if fields:
            with gr.Accordion(group, open=False):
                for name in fields:
                    w[name] = _widget(name, values[name])
    option_widgets, groups = _method_options(values)
    w.update(option_widgets)
    with gr.Accordion("All methods", open=False):
        gr.Markdown("\n".join(f"- {form.method_line(m)}" for m in registry.available()))
    return w, groups, notes


def _plots() -> dict[str, gr.components.Component]:
    """The Compare tab's right column (status, progress, plots, table); returns ``{output: component}``."""
    out: dict[str, gr.components.Component] = {}
    empty = common.empty_plots()
    out["status"] = gr.Markdown("Choose methods and ranks, then press **Run**.", elem_id="bl-status")
    out["progress"] = gr.HTML(common.progress_html(0, 0, state="idle"), elem_id="bl-progress")
    with gr.Row(equal_height=True):
        out["loss"] = gr.Plot(empty["loss"], label="Training loss", show_label=False, elem_id="bl-loss")
        out["metric"] = gr.Plot(empty["metric"], label="Evaluation metric", show_label=False, elem_id="bl-metric")
    out["md_view"] = gr.Radio(list(common.MD_VIEWS), value=list(common.MD_VIEWS)[0], label="ΔM / ΔD view",
                              info="BoRA figures 2 and 3: change of magnitude (ΔM) and direction (ΔD), "
                              "row-wise and column-wise")
    out["md"] = gr.Plot(empty["md"], label="Magnitude and direction changes", show_label=False, elem_id="bl-md")
    out["scatter"] = gr.Plot(empty["scatter"], label="DoRA figure 2", show_label=False, elem_id="bl-scatter")
    out["forest"] = gr.Plot(empty["forest"], label="Difference from the baseline", show_label=False,
                            elem_id="bl-forest")
    out["table"] = gr.Dataframe(empty["table"], label="Results", elem_id="bl-table", interactive=False, wrap=False)
    return out


def _status(job: Job, state: str) -> str:
    cfg = job.cfg
    runs = ", ".join(cfg.run_ids())
    device = "/".join(sorted(job.devices)) or cfg.device
    p = job.progress
    failed = f" ({len(job.run_errors)} of {len(cfg.run_ids())} runs failed)" if job.run_errors else ""
    head = {
        "waiting": f"**Waiting** for another visitor's comparison to finish (one trains at a time); then {runs}…",
        "loading": f"**Loading** `{cfg.model}` and `{cfg.task}` for {runs}…",
        "running": f"**Training** {runs} on `{cfg.task}` with `{cfg.model}` ({device}; {job.threads})",
        "done": f"**Done**{failed}: {runs} in {common.fmt_duration(time.monotonic() - job.started_at)}",
        "stopped": (f"**Stopped** after {p.done_steps if p else 0} of {p.total_steps if p else '?'} steps "
                    "(all runs together): everything computed so far is shown and kept"),
        "error": f"**Failed**: {job.error}",
    }[state]
    lines = [head]
    if job.cancelled and state != "stopped":
        lines.append(job.cancelled)
    lines += [f"⚠ {msg}" for msg in job.run_errors]
    if job.saved:
        lines.append(f"Saved as `{job.out_dir.name}` (open it in the History tab).")
    elif job.save_error:
        lines.append(f"⚠ Could not save the results: {job.save_error}")
    return "  \n".join(lines)


def _progress(job: Job, state: str) -> str:
    p = job.progress
    total = p.total_steps if p else job.cfg.steps * len(job.cfg.run_ids())
    done = p.done_steps if p else 0
    elapsed = time.monotonic() - job.started_at
    return common.progress_html(done, total, elapsed, p.eta_s if p else None, state)


def _state(job: Job) -> str:
    if job.running:
        return "running" if job.progress is not None else ("waiting" if job.waiting else "loading")
    if job.error:
        return "error"
    return "stopped" if job.cancelled else "done"


def render(job: Job, names, md_view: str, empty: bool = False) -> tuple:
    """The run handler's outputs (see :data:`OUTPUTS`); plots not in ``names`` are skipped.

    ``empty=True`` shows the blank plots (the first frame of a run, before any data).
    """
    state = _state(job)
    if empty:
        plots = common.empty_plots()
    else:
        plots = common.render_plots(job.results(), names, md_view) if names else {}
    return (_status(job, state), _progress(job, state)) + tuple(plots.get(n, gr.skip()) for n in common.PLOTS)


def _timed_render(job: Job, names, md_view: str) -> tuple[tuple, float]:
    t0 = time.perf_counter()
    out = render(job, names, md_view)
    cost = time.perf_counter() - t0
    job.render_s += cost
    return out, cost


def stream(job: Job, session: Session, poll_s: float = 0.2, fresh: bool = True) -> Iterator[tuple]:
    """Yield output tuples while ``job`` trains, redrawing only stale plots, then a final full one.

    ``fresh`` starts from blank plots (a new Run); a reattached page starts from what is there.
    """
    stale: set[str] = set()
    changed = False  # any event since the last frame (no event: nothing to redraw)
    yield render(job, common.PLOTS, session.md_view, empty=fresh)  # a new Run clears the previous plots
    last, interval = time.monotonic(), MIN_INTERVAL_S
    while True:
        try:
            ev = job.events.get(timeout=poll_s)
        except queue.Empty:
            ev = None
        if ev is END:
            break
        if ev is not None:
            if ev.kind == "error":  # a run stopped (NaN loss, out of memory, rank too large)
                gr.Warning(f"{ev.run_id}: {ev.message}")
            stale |= common.stale_plots([ev])
            changed = True
        if changed and time.monotonic() - last >= interval:
            out, cost = _timed_render(job, stale, session.md_view)
            stale.clear()
            changed = False
            last, interval = time.monotonic(), min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, COST_RATIO * cost))
            yield out
    yield _timed_render(job, common.PLOTS, session.md_view)[0]
    if job.error:
        raise gr.Error(job.error, print_exception=False)


def run_comparison(session: Session, *values: Any, compare_fn: Callable | None = None) -> Iterator[tuple]:
    """The Run button: check the widgets, start the job, and stream updates until it ends.

    Args:
        session: this visitor's :class:`Session` (from ``gr.State``).
        *values: widget values in the order of ``form.input_keys()``.
        compare_fn: the trainer entry point (tests pass a fake); default ``bora_lab.engine.trainer.compare``.
    """
    try:
        cfg = form.config_from_ui(**dict(zip(form.input_keys(), values)))
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None
    if session.job is not None and session.job.running:
        raise gr.Error(ALREADY_RUNNING, print_exception=False)
    job = Job(cfg, new_run_dir(cfg, owner=owner_id(session.token)), compare_fn or default_compare,
              token=session.token).start()
    session.job = job
    session.run_dirs.append(job.out_dir)
    # A closed or reloaded page ends this generator but not the job: it trains on, saves, and the
    # reloaded page reattaches to it (attach). Stop cancels it explicitly.
    yield from stream(job, session)


def warn_if_running(session: Session) -> None:
    """The Run button's instant answer while a comparison runs (the Run itself waits in the queue)."""
    if session.job is not None and session.job.running:
        gr.Warning(ALREADY_RUNNING)


def attach(session: Session, token: str | None):
    """Page load: keep the visitor's browser token; a reloaded page finds its comparison again.

    Yields ``(token, *OUTPUTS)``: the token (new if the browser had none) and, when the visitor
    has a job in this process, its frames (streamed while it still trains).
    """
    if not (isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token)):
        token = secrets.token_urlsafe(24)
    session.token = token
    job = job_of(token)
    if job is None:
        yield (token,) + tuple(gr.skip() for _ in OUTPUTS)
        return
    session.job = job
    if job.out_dir not in session.run_dirs:
        session.run_dirs.append(job.out_dir)
    if not job.running:
        yield (token,) + render(job, common.PLOTS, session.md_view)
        return
    for frame in stream(job, session, fresh=False):
        yield (token,) + frame


def stop_comparison(session: Session) -> tuple:
    """The Stop button: ask the trainer to stop at the next step, wait for it, show what was kept."""
    job = session.job
    if job is None or not job.running:
        gr.Info("Nothing is running.")
        return tuple(gr.skip() for _ in OUTPUTS)
    job.cancel.set()
    if not job.finished.wait(STOP_WAIT_S):
        gr.Warning("The trainer has not reached a step boundary yet; it will stop and save shortly.")
        return tuple(gr.skip() for _ in OUTPUTS)
    return render(job, common.PLOTS, session.md_view)


COST_KEYS = ("methods", "ranks", "seeds", "lrs", "lr_auto", "steps", "batch_size", "max_length", "num_layers",
             "model", "eval_every", "eval_samples", "val_samples", "match_params")


def cost_text(*values: Any) -> str:
    """The Compare tab's cost line: runs, steps and the time estimate of the settings as they stand."""
    from bora_lab.engine.estimate import cost_text as text, matched_preview

    try:
        cfg = form.config_from_ui(**dict(zip(form.input_keys(), values)))
        matched = matched_preview(cfg)
    except ValueError as err:
        return f"*Cost: the settings need a fix first: {common.error_message(err)}*"
    return f"*Cost: {text(cfg, cfg.device)}.*" + (f"\n\n*Budgets {matched}.*" if matched else "")


def change_md_view(session: Session, label: str):
    """The ΔM/ΔD view radio: redraw the small multiples of the current (or last) comparison."""
    session.md_view = common.MD_VIEWS.get(label, label)
    if session.job is None:
        return gr.skip()
    return common.render_plots(session.job.results(), ("md",), session.md_view)["md"]


def build_compare_tab(session: gr.State, base: RunConfig, token: gr.BrowserState | None = None,
                      demo: gr.Blocks | None = None) -> dict[str, Any]:
    """The Compare tab and its wiring; returns its widgets by input key (the Lessons tab fills them).

    With ``token`` and ``demo``: on page load, the visitor's browser token is read (or made) and a
    reloaded page reattaches to its running comparison.
    """
    values = form.ui_values(base)
    with gr.Tab("Compare", id="compare"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=380):
                widgets, option_groups, method_notes = _settings(values)
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="bl-run")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="bl-stop")
                cost = gr.Markdown(cost_text(*[values[k] for k in form.input_keys()]), elem_id="bl-cost")
            with gr.Column(scale=5):
                plots = _plots()
    inputs = [session] + [widgets[k] for k in form.input_keys()]
    outputs = [plots[k] for k in OUTPUTS]
    run_btn.click(warn_if_running, [session], None, concurrency_limit=None, show_progress="hidden")
    run_evt = run_btn.click(run_comparison, inputs, outputs, concurrency_limit=1, concurrency_id="train",
                            show_progress="minimal", show_progress_on=[plots["status"]])
    stop_btn.click(stop_comparison, [session], outputs, cancels=[run_evt], concurrency_limit=None,
                   show_progress="hidden")
    plots["md_view"].change(change_md_view, [session, plots["md_view"]], plots["md"], concurrency_limit=None,
                            show_progress="hidden")
    for key in COST_KEYS:  # the cost line follows every setting that changes it
        widgets[key].change(cost_text, inputs[1:], cost, concurrency_limit=None, show_progress="hidden")
    widgets["methods"].change(form.methods_changed, widgets["methods"],
                              [method_notes] + [option_groups[m] for m in form.option_methods()],
                              concurrency_limit=None, show_progress="hidden")
    widgets["task"].input(functools.partial(form.task_changed, base=base), widgets["task"],
                          [widgets[k] for k in form.task_default_keys()], concurrency_limit=None,
                          show_progress="hidden")
    if token is not None and demo is not None:
        demo.load(attach, [session, token], [token] + outputs, concurrency_limit=None, show_progress="hidden")
    return widgets
