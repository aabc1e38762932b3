"""The Compare tab's widgets: the settings form (drawn from ``RunConfig``'s field metadata and each
method's config dataclass), the plots column, and the cost line that follows the settings.

Widgets are keyed like ``form.input_keys()``; the wiring lives in :mod:`bora_lab.ui.tab_compare`.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from bora_lab.config import GROUPS, MAIN, RunConfig, settings
from bora_lab.methods import registry

from . import common, form
from .i18n import group_key, t

RANK_CHOICES = ["1", "2", "4", "8", "16", "32", "64", "128"]
COST_KEYS = ("methods", "ranks", "seeds", "lrs", "lr_auto", "steps", "batch_size", "max_length", "num_layers",
             "model", "eval_every", "eval_samples", "val_samples", "match_params")


def _model_choices() -> list[tuple[str, str]]:
    """The offline models, plus the toy bases the synthetic tasks suggest (free text allows any id)."""
    from bora_lab.engine.loading import OFFLINE_MODELS
    from bora_lab.engine.tasks import TASKS

    choices = [(f"{key}: " + t(f"model.{key}"), key) for key in OFFLINE_MODELS]  # names stay, descriptions translate
    toys = {s.defaults["model"] for s in TASKS.values() if s.defaults.get("model", "minilm") not in OFFLINE_MODELS}
    return choices + [(f"{m}: " + t("compare.model.toy"), m) for m in sorted(toys)]


def _task_choices() -> list[tuple[str, str]]:
    """``form.task_choices()`` with each task's description in the visitor's language (the name as it is)."""
    return [(f"{name}: " + t(f"task.{name}"), name) for _, name in form.task_choices()]


def _widget(name: str, value: Any) -> gr.components.Component:
    """The component for one RunConfig field; label, info and bounds come from the field's metadata
    (the label and info translated by key: ``field.<name>``, ``field.<name>.help``)."""
    meta = RunConfig.__dataclass_fields__[name].metadata
    kw = {"label": t(f"field.{name}"), "info": t(f"field.{name}.help"), "value": value, "elem_id": f"bl-field-{name}"}
    if name == "model":
        return gr.Dropdown(_model_choices(), allow_custom_value=True, **kw)
    if name == "task":
        return gr.Dropdown(_task_choices(), allow_custom_value=True, **kw)
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
    kw = {"label": f"{spec['method']}: {spec['name']}", "value": spec["default"],  # names as in the code
          "info": t(f"option.{spec['key']}") if spec.get("help") else None}
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
    with gr.Accordion(t("compare.options"), open=False):
        gr.Markdown(t("compare.options.note"))
        for method in dict.fromkeys(s["method"] for s in specs):
            with gr.Group(visible=method in values["methods"]) as groups[method]:
                for spec in (s for s in specs if s["method"] == method):
                    widgets[spec["key"]] = _option_widget({**spec, "default": values[spec["key"]]})
    return widgets, groups


def _method_lines(shown: list[str] | None = None) -> list[gr.Markdown]:
    """One Markdown line per registered method (its name and translated description), shown if in ``shown``."""
    return [gr.Markdown(f"- **{form.method_label(m)}**: " + t(f"method.{m}"), visible=shown is None or m in shown,
                        elem_classes=["bl-method-line"]) for m in registry.available()]


def methods_changed(selected: list[str] | None) -> tuple:
    """``form.methods_changed`` for this layout: the notes are one line per method (each translated), so
    the "select one" line and each method's line are shown or hidden, then the option groups."""
    chosen = set(selected or []) & set(registry.METHODS)
    return (gr.update(visible=not chosen), *(gr.update(visible=m in chosen) for m in registry.available()),
            *form.methods_changed(selected)[1:])


def settings_column(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, gr.Group], list[gr.Markdown]]:
    """The Compare tab's left column: ``({input key: component}, option groups, method notes)``; the notes
    are the outputs of :func:`methods_changed` before the groups' ("select one", then one per method)."""
    w: dict[str, gr.components.Component] = {}
    main = [f.name for f in settings(MAIN)]
    for name in main[:3]:  # model, task, methods: full width
        w[name] = _widget(name, values[name])
    with gr.Column(elem_id="bl-method-notes", elem_classes=["bl-method-list"]):
        notes = [gr.Markdown(t("compare.methods.none"), visible=not values["methods"])]
        notes += _method_lines(values["methods"])
    for i in range(3, len(main), 2):  # the rest of the main settings two by two
        with gr.Row():
            for name in main[i:i + 2]:
                w[name] = _widget(name, values[name])
    for group in GROUPS[1:]:  # one accordion per group of RunConfig's metadata
        fields = [f.name for f in settings(group)]
        if fields:
            with gr.Accordion(t(group_key(group)), open=False):
                for name in fields:
                    w[name] = _widget(name, values[name])
    option_widgets, groups = _method_options(values)
    w.update(option_widgets)
    with gr.Accordion(t("compare.all_methods"), open=False), gr.Column(elem_classes=["bl-method-list"]):
        _method_lines()
    return w, groups, notes


def plots_column() -> dict[str, gr.components.Component]:
    """The Compare tab's right column (status, progress, plots, table); returns ``{output: component}``."""
    out: dict[str, gr.components.Component] = {}
    empty = common.empty_plots()
    out["status"] = gr.Markdown(t("compare.status.start"), elem_id="bl-status")
    out["progress"] = gr.HTML(common.progress_html(0, 0, state="idle"), elem_id="bl-progress")
    with gr.Row(equal_height=True):
        out["loss"] = gr.Plot(empty["loss"], label="Training loss", show_label=False, elem_id="bl-loss")
        out["metric"] = gr.Plot(empty["metric"], label="Evaluation metric", show_label=False, elem_id="bl-metric")
    out["md_view"] = md_view_radio(info=t("compare.md_view.help"))
    out["md"] = gr.Plot(empty["md"], label="Magnitude and direction changes", show_label=False, elem_id="bl-md")
    out["scatter"] = gr.Plot(empty["scatter"], label="DoRA figure 2", show_label=False, elem_id="bl-scatter")
    out["forest"] = gr.Plot(empty["forest"], label="Difference from the baseline", show_label=False,
                            elem_id="bl-forest")
    out["table"] = gr.Dataframe(empty["table"], label=t("compare.results"), elem_id="bl-table", interactive=False,
                                wrap=False)
    return out


def md_view_radio(**kw: Any) -> gr.Radio:
    """The ΔM/ΔD view radio (Compare and History): its values stay the English labels of ``common.MD_VIEWS``."""
    keys = {"from_start": t("md_view.from_start"), "step_to_step": t("md_view.step_to_step")}
    return gr.Radio([(keys.get(v, label), label) for label, v in common.MD_VIEWS.items()], value=list(common.MD_VIEWS)[0],
                    label=t("md_view.label"), **kw)


def cost_text(*values: Any) -> str:
    """The Compare tab's cost line: runs, steps and the time estimate of the settings as they stand."""
    from bora_lab.engine.estimate import cost_text as text, matched_preview

    try:
        cfg = form.config_from_ui(**dict(zip(form.input_keys(), values)))
        matched = matched_preview(cfg)
    except ValueError as err:
        return f"*Cost: the settings need a fix first: {common.error_message(err)}*"
    return f"*Cost: {text(cfg, cfg.device)}.*" + (f"\n\n*Budgets {matched}.*" if matched else "")
