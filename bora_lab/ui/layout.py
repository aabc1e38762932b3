"""The ``gr.Blocks`` of BoRA Lab: components and wiring only (logic lives in handlers/live/history).

Widgets are drawn from the code they configure: one per ``RunConfig`` field (hand-labelled where a
label helps, generic otherwise) and one per option of each registered method's config dataclass,
so a new method or a new config field needs no edit here.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import gradio as gr

from bora_lab.config import RunConfig
from bora_lab.methods import registry

from . import handlers, history, live, tab_cards, tab_inside, tab_lessons, tab_memory

TITLE = "BoRA Lab"
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="teal", neutral_hue="slate")
CSS = """
#bl-header h1 {margin-bottom: 0}
#bl-header p {margin-top: 2px; opacity: .8}
.bl-progress {height: 12px; border-radius: 6px; background: var(--neutral-200); overflow: hidden}
.dark .bl-progress {background: var(--neutral-700)}
.bl-progress-bar {height: 100%; background: var(--color-accent); transition: width .4s ease}
.bl-progress[data-state=stopped] .bl-progress-bar, .bl-progress[data-state=error] .bl-progress-bar
  {background: var(--error-text-color, #dc2626)}
.bl-progress-text {font-size: var(--text-sm); margin-top: 4px; opacity: .85}
"""
# Labels and hints of the RunConfig fields; fields not listed get a generic widget from their type.
LABELS: dict[str, tuple[str, str]] = {
    "model": ("Model", "offline: minilm (BERT encoder), smollm2 (Llama decoder); or any Hugging Face id"),
    "task": ("Task", "offline: fine-food reviews; online: glue/<name> or any datasets id"),
    "methods": ("Methods", "one run per method and rank, all on the same seed and batches"),
    "ranks": ("Ranks", "pick or type several"),
    "alpha": ("Alpha", "LoRA scaling s = alpha / r"),
    "lr": ("Learning rate", "AdamW peak"),
    "steps": ("Steps", "optimizer steps per run"),
    "batch_size": ("Batch size", "examples per step"),
    "seed": ("Seed", "same for every run"),
    "max_length": ("Max tokens", "per example"),
    "warmup_ratio": ("Warm-up ratio", "linear warm-up, then cosine decay"),
    "weight_decay": ("Weight decay", ""),
    "grad_clip": ("Gradient clipping", "max norm; 0 = off"),
    "eval_every": ("Evaluate every", "steps"),
    "eval_samples": ("Eval examples", "0 = the whole test split"),
    "analyze_every": ("Analyse every", "steps between ΔM/ΔD snapshots"),
    "target_modules": ("Target modules", "comma-separated; empty = the architecture's default "
                       "(BERT: query, key, value, dense)"),
    "analysis_module": ("Analysed module", "empty = attention query (as in the BoRA paper)"),
    "analysis_layers": ("Analysed layers", "e.g. 0, 2, 4 or 0-3; empty = all"),
    "device": ("Device", "auto = cuda, then mps, then cpu"),
    "num_layers": ("Layers kept", "first N transformer layers; 0 = all (fewer = faster demo)"),
    "lockstep": ("Lockstep", "advance all runs one step at a time, so curves grow together"),
    "train_samples": ("Training examples", "0 = all"),
    "text_column": ("Text column", "custom datasets only; empty = guess"),
    "label_column": ("Label column", "custom datasets only; empty = guess"),
}
MAIN = ("model", "task", "methods", "ranks", "alpha", "lr", "steps", "batch_size", "seed")
GROUPS = {  # accordion title -> fields; fields in no group go to "More settings"
    "Training details": ("max_length", "num_layers", "train_samples", "warmup_ratio", "weight_decay",
                         "grad_clip", "eval_every", "eval_samples", "lockstep", "device"),
    "Adapted and analysed modules": ("target_modules", "analysis_module", "analyze_every", "analysis_layers"),
    "Custom dataset columns": ("text_column", "label_column"),
}
RANK_CHOICES = ["1", "2", "4", "8", "16", "32", "64", "128"]


def default_config() -> RunConfig:
    """``RunConfig()`` updated with the JSON in ``$BORA_LAB_DEFAULTS`` (e.g. ``{"steps": 20}``)."""
    overrides = json.loads(os.environ.get("BORA_LAB_DEFAULTS", "") or "{}")
    return RunConfig.from_dict({**RunConfig().to_dict(), **overrides})


def _model_choices() -> list[tuple[str, str]]:
    """The offline models, plus the toy bases the synthetic tasks suggest (free text allows any id)."""
    from bora_lab.engine.loading import OFFLINE_MODELS
    from bora_lab.engine.tasks import TASKS

    choices = [(f"{key}: {desc.split(' (PyPI')[0]}", key) for key, desc in OFFLINE_MODELS.items()]
    toys = {s.defaults["model"] for s in TASKS.values() if s.defaults.get("model", "minilm") not in OFFLINE_MODELS}
    return choices + [(f"{m}: toy base of the synthetic tasks", m) for m in sorted(toys)]


def _widget(name: str, value: Any) -> gr.components.Component:
    """The component for one RunConfig field."""
    label, info = LABELS.get(name, (name.replace("_", " ").capitalize(), ""))
    kw = {"label": label, "info": info or None, "value": value, "elem_id": f"bl-field-{name}"}
    if name == "model":
        return gr.Dropdown(_model_choices(), allow_custom_value=True, **kw)
    if name == "task":
        return gr.Dropdown(handlers.task_choices(), allow_custom_value=True, **kw)
    if name == "methods":
        return gr.CheckboxGroup(handlers.method_choices(), **{**kw, "elem_id": "bl-methods"})
    if name == "ranks":
        return gr.Dropdown(RANK_CHOICES, multiselect=True, allow_custom_value=True, **kw)
    if name == "device":
        return gr.Radio(["auto", "cpu", "cuda", "mps"], **kw)
    type_str = handlers.field_type(name)
    if type_str == "bool":
        return gr.Checkbox(**kw)
    if type_str.startswith(("int", "float")):
        return gr.Number(precision=0 if type_str.startswith("int") else None, minimum=0, **kw)
    return gr.Textbox(max_lines=1, **kw)


def _option_widget(spec: dict[str, Any]) -> gr.components.Component:
    """The component for one method option (``handlers.option_specs()``)."""
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
    specs = handlers.option_specs()
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
    for name in ("model", "task", "methods"):
        w[name] = _widget(name, values[name])
    notes = gr.Markdown(handlers.method_notes(values["methods"]), elem_id="bl-method-notes")
    with gr.Row():
        for name in ("ranks", "alpha"):
            w[name] = _widget(name, values[name])
    with gr.Row():
        for name in ("lr", "steps"):
            w[name] = _widget(name, values[name])
    with gr.Row():
        for name in ("batch_size", "seed"):
            w[name] = _widget(name, values[name])
    grouped = {n for fields in GROUPS.values() for n in fields}
    rest = [n for n in handlers.RUN_FIELDS if n not in grouped and n not in MAIN]
    for title, fields in list(GROUPS.items()) + [("More settings", tuple(rest))]:
        if fields:
            with gr.Accordion(title, open=False):
                for name in fields:
                    w[name] = _widget(name, values[name])
    option_widgets, groups = _method_options(values)
    w.update(option_widgets)
    with gr.Accordion("All methods", open=False):
        gr.Markdown("\n".join(f"- {handlers.method_line(m)}" for m in registry.available()))
    return w, groups, notes


def _plots() -> dict[str, gr.components.Component]:
    """The Compare tab's right column (status, progress, plots, table); returns ``{output: component}``."""
    out: dict[str, gr.components.Component] = {}
    empty = handlers.empty_plots()
    out["status"] = gr.Markdown("Choose methods and ranks, then press **Run**.", elem_id="bl-status")
    out["progress"] = gr.HTML(handlers.progress_html(0, 0, state="idle"), elem_id="bl-progress")
    with gr.Row(equal_height=True):
        out["loss"] = gr.Plot(empty["loss"], label="Training loss", show_label=False, elem_id="bl-loss")
        out["metric"] = gr.Plot(empty["metric"], label="Evaluation metric", show_label=False, elem_id="bl-metric")
    out["md_view"] = gr.Radio(list(handlers.MD_VIEWS), value=list(handlers.MD_VIEWS)[0], label="ΔM / ΔD view",
                              info="BoRA figures 2 and 3: change of magnitude (ΔM) and direction (ΔD), "
                              "row-wise and column-wise")
    out["md"] = gr.Plot(empty["md"], label="Magnitude and direction changes", show_label=False, elem_id="bl-md")
    out["scatter"] = gr.Plot(empty["scatter"], label="DoRA figure 2", show_label=False, elem_id="bl-scatter")
    out["table"] = gr.Dataframe(empty["table"], label="Results", elem_id="bl-table", interactive=False, wrap=False)
    return out


def build_demo(defaults: RunConfig | None = None) -> gr.Blocks:
    """Build the app without launching it.

    Args:
        defaults: initial widget values; default ``RunConfig()`` with ``$BORA_LAB_DEFAULTS`` applied.

    Returns:
        The ``gr.Blocks``; one training runs at a time across visitors, the others wait in the queue.
    """
    base = defaults or default_config()
    values = handlers.ui_values(base)
    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(live.Session(), delete_callback=live.Session.close)
        gr.Markdown(
            f"# {TITLE}\nCompare parameter-efficient fine-tuning methods side by side on a real model: "
            "loss, accuracy, and how each method moves the weights' **magnitude** and **direction**, "
            "row-wise (per output feature) and column-wise (per input feature).",
            elem_id="bl-header",
        )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=380):
                        widgets, option_groups, method_notes = _settings(values)
                        with gr.Row():
                            run_btn = gr.Button("Run", variant="primary", elem_id="bl-run")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="bl-stop")
                    with gr.Column(scale=5):
                        plots = _plots()
            with gr.Tab("History", id="history") as history_tab:
                list_inputs, list_outputs = history.build_tab(session)
            tab_lessons.build_lessons_tab(widgets)  # teaching views: presets fill the Compare tab
            tab_inside.build_inside_tab(session)  # W0, W, ΔW, norms, spectrum per checkpoint
            tab_cards.build_cards_tab()
            tab_memory.build_memory_tab(session)
        inputs = [session] + [widgets[k] for k in handlers.input_keys()]
        outputs = [plots[k] for k in live.OUTPUTS]
        run_evt = run_btn.click(live.run_comparison, inputs, outputs, concurrency_limit=1,
                                concurrency_id="train", show_progress="minimal",
                                show_progress_on=[plots["status"]])
        stop_btn.click(live.stop_comparison, [session], outputs, cancels=[run_evt], concurrency_limit=None,
                       show_progress="hidden")
        plots["md_view"].change(live.change_md_view, [session, plots["md_view"]], plots["md"],
                                concurrency_limit=None, show_progress="hidden")
        widgets["methods"].change(handlers.methods_changed, widgets["methods"],
                                  [method_notes] + [option_groups[m] for m in handlers.option_methods()],
                                  concurrency_limit=None, show_progress="hidden")
        widgets["task"].input(functools.partial(handlers.task_changed, base=base), widgets["task"],
                              [widgets[k] for k in handlers.task_default_keys()], concurrency_limit=None,
                              show_progress="hidden")
        history_tab.select(history.list_runs, list_inputs, list_outputs, concurrency_limit=None)
    # Training is limited to one at a time across all visitors by its own concurrency_limit=1 (Gradio's
    # default_concurrency_limit is also 1); calling demo.queue() again would only rebuild the server app.
    return demo


def launch(demo: gr.Blocks, **kwargs: Any):
    """``demo.launch`` with BoRA Lab's theme and CSS (Gradio 6 takes them here, not in ``Blocks``).

    Runs under ``$BORA_LAB_RUNS`` are served for download; ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``
    choose the address as usual.
    """
    kwargs.setdefault("theme", THEME)
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("allowed_paths", [str(live.runs_dir().resolve())])
    return demo.launch(**kwargs)
