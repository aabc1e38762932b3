"""The Lessons tab: one click fills the Compare tab with a teacher's preset and shows the lesson's recorded
result at once (replayed as if live on demand: ``lesson_replay``); save, upload, link.

Lessons are data (``bora_lab.teach.lessons``): validated JSON, never executed. A built-in lesson
opens from a URL too: ``http://host:7860/?lesson=lora-couples``, with settings on top if the link
has some (``?lesson=lora-couples&steps=40``; read on page load by ``bora_lab.ui.links``).
"""
from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from bora_lab.config import RunConfig
from bora_lab.teach import lessons as L

from . import form, lesson_replay

NONE_SELECTED = "Pick a lesson on the left: its settings fill the **Compare** tab, then press **Run** there."


def lesson_from_url(request: gr.Request | None) -> dict[str, Any] | None:
    """The built-in lesson named by ``?lesson=<id>`` in the page URL, or None."""
    if request is None:
        return None
    params = getattr(request, "query_params", None) or {}
    lesson_id = str(params.get("lesson", "") or "").strip()
    return L.get_lesson(lesson_id) if lesson_id else None


HEADINGS = {  # the lesson text's headings; the translated look_for names the view itself
    "en": {"predict": "Before you press Run, predict:", "look": "After the run, look at {view}.",
           "observed": "What we saw on this setup:"},
    "zh-CN": {"predict": "按“运行”之前，先预测：", "look": "运行之后，看这里：", "observed": "我们在这个设置上看到的："},
    "zh-TW": {"predict": "按「運行」之前，先預測：", "look": "運行之後，看這裡：", "observed": "我們在這個設定上看到的："},
}


def request_locale(request: gr.Request | None) -> str | None:
    """The visitor's lesson language: ``?lang=`` in the address, else the browser's Accept-Language."""
    if request is None:
        return None
    params = getattr(request, "query_params", None) or {}
    headers = getattr(request, "headers", None) or {}
    return L.locale_of(headers.get("accept-language"), params.get("lang"))


def lesson_markdown(lesson: dict[str, Any] | None, locale: str | None = None) -> str:
    """The lesson's texts (in ``locale`` where translated), settings and warnings, as Markdown."""
    if lesson is None:
        return NONE_SELECTED
    lesson = L.localized(lesson, locale)
    esc = html.escape
    head = HEADINGS.get(locale or "", HEADINGS["en"])
    look = head["look"].format(view=esc(L.VIEWS[lesson["view"]])) if locale not in HEADINGS else head["look"]
    parts = [f"### {esc(lesson['title'])}", esc(lesson["summary"]), f"**{head['predict']}** {esc(lesson['predict'])}",
             f"**{look}** {esc(lesson['look_for'])}"]
    if lesson.get("observed"):
        parts.append(f"**{head['observed']}** {esc(lesson['observed'])}")
    missing = L.missing_methods(lesson)
    if missing:
        parts.append(f"⚠️ Method(s) {', '.join(f'`{m}`' for m in missing)} not available in this installation; "
                     "the other methods are filled in.")
    shown = ", ".join(f"`{k}` = `{v}`" for k, v in lesson["settings"].items())
    parts.append(f"<details><summary>Settings</summary>\n\n{shown}\n\n</details>")
    if L.get_lesson(lesson["id"]) is not None:
        parts.append(f"Link to this lesson: add `?lesson={lesson['id']}` to the app's address.")
    return "\n\n".join(parts)


def lesson_updates(lesson: dict[str, Any] | None, keys: list[str]) -> list[Any]:
    """One ``gr.update`` per Compare-tab widget in ``keys``: RunConfig defaults + the lesson's settings."""
    if lesson is None:
        return [gr.update() for _ in keys]
    try:
        cfg = L.lesson_config(lesson, RunConfig())
    except ValueError as err:
        gr.Warning(str(err))
        return [gr.update() for _ in keys]
    values = form.ui_values(cfg)
    return [gr.update(value=values[k]) if k in values else gr.update() for k in keys]


def _choices(uploaded: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    built = [(les["title"], les["id"]) for les in L.builtin_lessons()]
    return built + [(f"{les['title']} (uploaded)", f"upload:{key}") for key, les in uploaded.items()]


def _find(choice: str | None, uploaded: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if not choice:
        return None
    if choice.startswith("upload:"):
        return uploaded.get(choice.removeprefix("upload:"))
    return L.get_lesson(choice)


def build_lessons_tab(apply_to: dict[str, gr.components.Component],
                      read_url: bool = True) -> dict[str, gr.components.Component]:
    """Add the "Lessons" tab (call inside the app's ``gr.Tabs()``).

    Args:
        apply_to: the Compare tab's widgets keyed like ``form.input_keys()`` (``"steps"``,
            ``"methods"``, ``"dora.detach_norm"``...); opening a lesson updates each of them.
            Saving a lesson reads their current values.
        read_url: open the lesson named by ``?lesson=`` when the page loads (the app passes False:
            ``bora_lab.ui.links`` reads the lesson and the link's settings together, in one step).

    Returns:
        ``{"picker", "text"}``: the lesson list and the lesson's text (``?lesson=`` fills them).
    """
    keys = list(apply_to)
    targets = [apply_to[k] for k in keys]
    with gr.Tab("Lessons", id="lessons"):
        uploaded = gr.State({})
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=280):
                picker = gr.Radio(_choices({}), value=None, label="Lessons", elem_id="bl-lesson-picker",
                                  info="one click fills the Compare tab")
                upload = gr.File(label="Open a lesson file (.json)", file_types=[".json"], type="filepath",
                                 elem_id="bl-lesson-upload")
            with gr.Column(scale=5):
                text = gr.Markdown(NONE_SELECTED, elem_id="bl-lesson-text")
                current = gr.State(None)  # the open lesson, for its recording
                recorded, _, _ = lesson_replay.build_replay(current)
                with gr.Accordion("Save the current Compare settings as a lesson", open=False):
                    with gr.Row():
                        title = gr.Textbox(label="Title", max_lines=1)
                        lesson_id = gr.Textbox(label="Id (for ?lesson=...)", max_lines=1,
                                               info="empty = from the title")
                        view = gr.Dropdown([(v, k) for k, v in L.VIEWS.items()], value="table",
                                           label="Where to look after the run")
                    summary = gr.Textbox(label="Summary", lines=2)
                    predict = gr.Textbox(label="Predict before Run", lines=2)
                    look_for = gr.Textbox(label="Look for after the run", lines=2)
                    save = gr.Button("Save lesson", elem_id="bl-lesson-save")
                    saved = gr.File(label="Lesson file", interactive=False, elem_id="bl-lesson-file")

    def pick(choice, store, request: gr.Request):
        lesson = _find(choice, store)
        return [lesson_markdown(lesson, request_locale(request)), *lesson_updates(lesson, keys)]

    def open_file(path, store):
        if not path:
            return [gr.update(), store, gr.update(), *[gr.update() for _ in keys]]
        try:
            lesson = L.load_lesson(path)
        except L.LessonError as err:
            Path(path).unlink(missing_ok=True)  # the server keeps no uploads
            gr.Warning(str(err))
            return [gr.update(), store, f"**Could not open this lesson.** {html.escape(str(err))}",
                    *[gr.update() for _ in keys]]
        Path(path).unlink(missing_ok=True)
        store = {**store, lesson["id"]: lesson}
        choice = f"upload:{lesson['id']}"
        return [gr.update(choices=_choices(store), value=choice), store, lesson_markdown(lesson),
                *lesson_updates(lesson, keys)]

    def save_lesson(title_v, id_v, view_v, summary_v, predict_v, look_v, *values):
        try:
            cfg = form.config_from_ui(**dict(zip(keys, values)))
            text_json = L.save_lesson(cfg, title_v.strip() or "My lesson", summary_v, predict_v, look_v,
                                      view_v or "table", id_v.strip() or None)
        except ValueError as err:
            gr.Warning(str(err))
            return None
        lesson = L.parse_lesson(text_json)
        path = Path(tempfile.mkdtemp(prefix="bora_lesson_")) / f"{lesson['id']}.json"
        path.write_text(text_json, encoding="utf-8")
        return str(path)

    def from_url(request: gr.Request):
        lesson = lesson_from_url(request)
        if lesson is None:
            return [gr.update(), gr.update(), *[gr.update() for _ in keys]]
        return [gr.update(value=lesson["id"]), lesson_markdown(lesson, request_locale(request)),
                *lesson_updates(lesson, keys)]

    def show_recording(choice, store):
        lesson = _find(choice, store)
        return [lesson, *lesson_replay.show(lesson)]

    picker.input(pick, [picker, uploaded], [text, *targets], concurrency_limit=None, show_progress="hidden")
    # any change of the lesson (a click, an upload, ?lesson= in the address) shows its recorded result
    picker.change(show_recording, [picker, uploaded], [current, *recorded], concurrency_limit=None,
                  show_progress="hidden")
    upload.upload(open_file, [upload, uploaded], [picker, uploaded, text, *targets], concurrency_limit=None)
    save.click(save_lesson, [title, lesson_id, view, summary, predict, look_for, *targets], saved,
               concurrency_limit=None)
    root = gr.context.Context.root_block
    if read_url and root is not None:  # ?lesson=<id> preselects a lesson when the page opens
        root.load(from_url, None, [picker, text, *targets], concurrency_limit=None, show_progress="hidden")
    return {"picker": picker, "text": text}
