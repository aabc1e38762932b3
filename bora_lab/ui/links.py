"""Links to a setup, and presenter mode, from the page's address.

``?methods=lora,dora&ranks=8&steps=150&lr=0.001`` fills the Compare tab: each parameter is a
``RunConfig`` field or a method option (``dora.detach_norm=0``), written like the form's widgets
(lists comma-separated, switches 1/0). A link holds only what differs from ``RunConfig()``, or from
the lesson it names (``?lesson=lora-couples&steps=40``), so it means the same on every deployment.
It goes through ``form.config_from_ui``, the form's own checks: a malformed link shows one warning
that names the field and fills nothing. ``?present=1`` is presenter mode: the settings column folds
away (Run and Stop stay), plots and text grow for a projector (the ``bl-present`` class on the page's
main column, and larger figures).

The Compare tab's "Copy link" button writes the current settings' link into a text box and copies
it with ``navigator.clipboard`` (the box is the fallback where the browser does not allow it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import gradio as gr

from bora_lab.config import RunConfig
from bora_lab.teach import lessons as L

from . import form

RESERVED = ("lesson", "present", "view", "lang")  # read elsewhere (lesson; lang: bora_lab.ui.i18n), or Gradio's
PRESENT_CLASS = "bl-present"
NOT_APPLIED = "This link's settings were not applied: "
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
COPY_JS = """async (link) => {
  if (!link || !link.startsWith("?")) return link;
  const url = window.location.origin + window.location.pathname + link;
  try { await navigator.clipboard.writeText(url); } catch (e) { /* the box shows the link to copy by hand */ }
  return url;
}"""


def _is_switch(key: str) -> bool:
    if key in form.RUN_FIELDS:
        return form.field_type(key) == "bool"
    return any(s["key"] == key and s["type"] == "bool" for s in form.option_specs())


def _text(value: Any) -> str:
    """A widget value as a link writes it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse(key: str, raw: str) -> Any:
    """A link's text as the widget of ``key`` holds it (the form's own parsing does the rest)."""
    raw = raw.strip()
    if key in form.LIST_WIDGETS:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if _is_switch(key):
        if raw.lower() not in TRUE + FALSE:
            raise ValueError(f"{key} must be 1 or 0, got {raw!r}")
        return raw.lower() in TRUE
    return raw


def query_for(values: Mapping[str, Any], base: RunConfig | None = None) -> str:
    """``"?methods=lora,dora&steps=20"``: the settings in ``values`` (keyed like ``form.input_keys()``)
    that differ from ``base`` (default ``RunConfig()``); ``"?"`` when none do.

    Raises:
        ValueError: the settings do not pass the form's checks (the same sentence as Run gives).
    """
    cfg = form.config_from_ui(**values)
    now, ref = form.ui_values(cfg), form.ui_values(base or RunConfig())
    changed = [(k, _text(now[k])) for k in form.input_keys() if now[k] != ref[k]]
    return "?" + urlencode(changed, safe=",")


def values_from_query(params: Mapping[str, str],
                      base: RunConfig | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The widget values a link asks for, on top of ``base`` (default ``RunConfig()``), and warnings.

    Returns:
        ``(values or None, warnings)``: None when the link has no settings or they fail the form's
        checks (then a warning says why, naming the field: nothing is filled); unknown parameters
        are ignored with a warning. Warnings are sentences for people.
    """
    keys, notes, errors, given = set(form.input_keys()), [], [], {}
    for name, raw in params.items():
        if name in RESERVED or name.startswith("__"):
            continue
        if name not in keys:
            notes.append(f"The link's {name!r} is not a setting of BoRA Lab; it was ignored.")
            continue
        try:
            given[name] = _parse(name, str(raw))
        except ValueError as err:
            errors.append(f"{NOT_APPLIED}{err}.")
    if errors or not given:
        return None, notes + errors
    try:
        cfg = form.config_from_ui(**{**form.ui_values(base or RunConfig()), **given})
    except ValueError as err:
        return None, notes + [f"{NOT_APPLIED}{err}"]
    return form.ui_values(cfg), notes


def wants_present(params: Mapping[str, str]) -> bool:
    """``?present=1`` (or ``?present``): presenter mode."""
    return "present" in params and str(params["present"]).strip().lower() not in FALSE[:-1]


def _lesson_base(choice: str | None) -> tuple[dict[str, Any] | None, RunConfig]:
    lesson = L.get_lesson(choice) if choice and not choice.startswith("upload:") else None
    return lesson, (L.lesson_config(lesson, RunConfig()) if lesson else RunConfig())


def copy_link(choice: str | None, keys: list[str], *values: Any) -> dict[str, Any]:
    """The "Copy link" button: the link of the current settings (with the open built-in lesson)."""
    lesson, base = _lesson_base(choice)
    try:
        query = query_for(dict(zip(keys, values)), base)
    except ValueError as err:
        raise gr.Error(f"No link yet: the settings need a fix first: {err}", print_exception=False) from None
    if lesson is not None:
        query = f"?lesson={lesson['id']}" + ("&" + query[1:] if len(query) > 1 else "")
    return gr.update(value=query, visible=True)


def wire(demo: gr.Blocks, session: gr.State, main: gr.Column, widgets: dict[str, Any], parts: dict[str, Any],
         lesson_parts: dict[str, Any]) -> None:
    """Wire the Copy link button and the page-load reading of ``?lesson=``, settings and ``?present=1``.

    Args:
        demo: the app.
        session: the visitor's ``gr.State``.
        main: the column around the page (gets ``bl-present``).
        widgets: the Compare tab's widgets by input key.
        parts: ``build_compare_tab``'s ``copy_link`` and ``link``.
        lesson_parts: the Lessons tab's ``picker`` and ``text``.
    """
    from . import tab_lessons

    keys = list(widgets)
    targets = [widgets[k] for k in keys]
    picker, text = lesson_parts["picker"], lesson_parts["text"]

    def make(choice, *values):
        return copy_link(choice, keys, *values)

    parts["copy_link"].click(make, [picker, *targets], parts["link"], concurrency_limit=None,
                             show_progress="hidden").success(None, parts["link"], parts["link"], js=COPY_JS)

    def from_url(sess, request: gr.Request):
        params = dict(getattr(request, "query_params", None) or {})
        sess.present = wants_present(params)
        lesson = tab_lessons.lesson_from_url(request)
        _, base = _lesson_base(lesson["id"] if lesson else None)
        values, warnings = values_from_query(params, base)
        for w in warnings:
            gr.Warning(w)
        wrapper = gr.update(elem_classes=[PRESENT_CLASS]) if sess.present else gr.update()
        if values is not None:
            fills = [gr.update(value=values[k]) if k in values else gr.update() for k in keys]
        else:
            fills = tab_lessons.lesson_updates(lesson, keys)
        head = ([gr.update(value=lesson["id"]), tab_lessons.lesson_markdown(lesson, tab_lessons.request_locale(request))]
                if lesson else [gr.update()] * 2)
        return [wrapper, *head, *fills]

    demo.load(from_url, [session], [main, picker, text, *targets], concurrency_limit=None, show_progress="hidden")
