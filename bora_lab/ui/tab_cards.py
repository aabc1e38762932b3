"""The "Method cards" tab: one card per registered method, generated from the registry.

Nothing here names a method: the dropdown lists ``registry.available()`` and the card comes from
``bora_lab.teach.cards.method_card``, so a newly registered method appears with its card.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from bora_lab.methods import registry

from . import common, form
from .i18n import t

MODELS = ["minilm", "smollm2"]
RANKS = ["1", "2", "4", "8", "16", "32", "64"]
LATEX = [{"left": "$$", "right": "$$", "display": True}]


def layer_dropdown_choices(model: str) -> list[tuple[str, str]]:
    """``(label, "name|d_in|d_out")`` for each distinct target layer of ``model``."""
    from bora_lab.teach.cards import layer_choices

    return [(f"{c['name']}  [out {c['d_out']} × in {c['d_in']}]  ×{c['count']}", f"{c['name']}|{c['d_in']}|{c['d_out']}")
            for c in layer_choices(model)]


def _rank(value: Any) -> int:
    try:
        r = int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"rank must be a whole number, got {value!r}") from None
    if r < 1:
        raise ValueError("rank must be at least 1")
    return r


def render_card(method: str, model: str, layer: str | None, rank: Any) -> tuple[str, Any, list[list[Any]]]:
    """Markdown card, shapes figure and the all-methods table for the chosen method, model, layer, rank."""
    from bora_lab.figures.shapes import shapes_figure
    from bora_lab.teach.cards import card_markdown, cards_table, method_card

    try:
        r = _rank(rank)
        model = (model or "minilm").strip()
        if not layer:
            layer = layer_dropdown_choices(model)[0][1]
        _, d_in, d_out = layer.rsplit("|", 2)
        card = method_card(method, int(d_in), int(d_out), r, model=model)
        rows = cards_table(model, rank=r)
    except Exception as err:  # noqa: BLE001  bad rank, unknown model offline...: say so in the card
        return f"**Cannot build this card:** {common.error_message(err)}", None, []
    table = [[row["method"], row["kind"], row["trainable"], row["% of model"], row["magnitude axis"],
              "yes" if row["mergeable"] else "no", row["note"]] for row in rows]
    return card_markdown(card), shapes_figure(card), table


def build_cards_tab() -> None:
    """Add the "Method cards" tab (call inside the app's ``gr.Tabs()``)."""
    methods = registry.available()
    with gr.Tab(t("tab.cards"), id="cards") as tab:
        with gr.Row():
            first = "bora" if "bora" in methods else (methods[0] if methods else None)
            method = gr.Dropdown([(form.method_label(m), m) for m in methods], value=first,
                                 label=t("common.method"), elem_id="bl-card-method", scale=3)
            model = gr.Dropdown(MODELS, value="minilm", allow_custom_value=True, label=t("field.model"),
                                info=t("cards.model.help"), scale=1)
            layer = gr.Dropdown([], value=None, label=t("cards.layer"), info=t("cards.layer.help"), scale=2)
            rank = gr.Dropdown(RANKS, value="8", allow_custom_value=True, label=t("common.rank"), scale=1)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                card_md = gr.Markdown(t("cards.loading"), latex_delimiters=LATEX, elem_id="bl-card")
            with gr.Column(scale=2):
                shapes = gr.Plot(label=t("cards.shapes"), elem_id="bl-card-shapes")
        table = gr.Dataframe(headers=["method", "kind", "trainable", "% of model", "magnitude axis", "mergeable", "note"],
                             label=t("cards.table"), interactive=False, wrap=True, elem_id="bl-card-table")

    def on_model(model_v, method_v, rank_v):
        try:
            choices = layer_dropdown_choices((model_v or "minilm").strip())
        except Exception as err:  # noqa: BLE001  unknown model offline, unreadable config
            return gr.update(choices=[], value=None), f"**Cannot read this model:** {common.error_message(err)}", None, []
        first = choices[0][1] if choices else None
        return (gr.update(choices=choices, value=first), *render_card(method_v, model_v, first, rank_v))

    def on_open(model_v, method_v, layer_v, rank_v):  # keep the visitor's layer when they come back
        if layer_v:
            return (gr.update(), *render_card(method_v, model_v, layer_v, rank_v))
        return on_model(model_v, method_v, rank_v)

    outputs = [card_md, shapes, table]
    tab.select(on_open, [model, method, layer, rank], [layer, *outputs], concurrency_limit=None)
    model.input(on_model, [model, method, rank], [layer, *outputs], concurrency_limit=None)
    for widget in (method, layer, rank):
        widget.input(render_card, [method, model, layer, rank], outputs, concurrency_limit=None,
                     show_progress="minimal")
