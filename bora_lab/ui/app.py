"""The ``gr.Blocks`` of BoRA Lab: components and wiring only (logic lives in the tab modules).

Widgets are drawn from the code they configure: one per ``RunConfig`` field (hand-labelled where a
label helps, generic otherwise) and one per option of each registered method's config dataclass,
so a new method or a new config field needs no edit here. The page's address may carry a lesson,
settings and presenter mode (``bora_lab.ui.links``); the footer says where runs are kept. Every
text is translated by Gradio in the browser's language or the header's choice (``bora_lab.ui.i18n``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import gradio as gr

from bora_lab.config import RunConfig, lr_choice
from bora_lab.limits import limit, reuse_runs

from . import (i18n, links, space, tab_cards, tab_claims, tab_compare, tab_history, tab_inside, tab_lessons,
               tab_memory, tab_try, training_queue, visitor)
from .i18n import t

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
#bl-footer {font-size: var(--text-sm); opacity: .75; margin-top: 8px}
#bl-lang {max-width: 260px}
.bl-method-list {gap: 0 !important}
/* presenter mode (?present=1): the settings fold away except Run/Stop, text and plots grow */
.bl-present #bl-header, .bl-present #bl-settings > :not(#bl-actions), .bl-present #bl-copy-link
  {display: none !important}
.bl-present #bl-settings {flex: 0 0 160px !important; min-width: 160px !important}
.bl-present #bl-actions {flex-direction: column}
.bl-present #bl-status, .bl-present #bl-status *, .bl-present .bl-progress-text, .bl-present #bl-table
  {font-size: 1.3rem !important}
.bl-present .bl-progress {height: 18px}
"""
# Labels and hints of the RunConfig fields; fields not listed get a generic widget from their type.
def default_config() -> RunConfig:
    """``RunConfig()`` updated with the JSON in ``$BORA_LAB_DEFAULTS`` (e.g. ``{"steps": 20}``)."""
    overrides = json.loads(os.environ.get("BORA_LAB_DEFAULTS", "") or "{}")
    return RunConfig.from_dict({**RunConfig().to_dict(), **lr_choice(overrides)})


def build_demo(defaults: RunConfig | None = None) -> gr.Blocks:
    """Build the app without launching it.

    Args:
        defaults: initial widget values; default ``RunConfig()`` with ``$BORA_LAB_DEFAULTS`` applied.

    Returns:
        The ``gr.Blocks``; one training runs at a time across visitors, the others wait in the queue.
    """
    base = defaults or default_config()
    with gr.Blocks(title=TITLE) as demo:
        session = gr.State(visitor.Session(), delete_callback=visitor.Session.close)
        token = gr.BrowserState(None, storage_key="bora_lab_visitor")
        with gr.Column(elem_id="bl-main") as main:  # ?present=1 adds the class bl-present here
            with gr.Row(equal_height=False, elem_id="bl-header"):
                gr.Markdown(f"# {TITLE}\n" + t("app.intro"))  # one key per string: the title stays as is
                picker = i18n.language_picker()
            with gr.Tabs():
                widgets, compare_parts = tab_compare.build_compare_tab(session, base, token, demo)
                with gr.Tab(t("tab.history"), id="history") as history_tab:
                    list_inputs, list_outputs = tab_history.build_tab(session)
                tab_try.build_try_tab(session)  # type a text: each trained run's answer, disagreements, export
                lesson_parts = tab_lessons.build_lessons_tab(widgets, read_url=False)  # presets fill Compare
                tab_inside.build_inside_tab(session)  # W0, W, ΔW, norms, spectrum per checkpoint
                tab_cards.build_cards_tab()
                tab_memory.build_memory_tab(session)
                tab_claims.build_claims_tab()  # each paper claim: the paper's value, ours with its interval
            with gr.Column(elem_id="bl-footer"):
                gr.Markdown(t(f"footer.storage.{space.runs_root()[1]}"))  # where runs are kept (space.py)
                gr.Markdown(t("footer.queue.shared") if reuse_runs() else t("footer.queue"))
        _translate_lessons_tab(demo)
        i18n.wire_picker(demo, picker)
        history_tab.select(tab_history.list_runs, list_inputs, list_outputs, concurrency_limit=None)
        links.wire(demo, session, main, widgets, compare_parts, lesson_parts)  # Copy link; ?lesson=, settings
    for fn in demo.fns.values():  # the app's events serve its own page; none is a public API endpoint
        fn.api_visibility = "private"
        if fn.name == "run_claim":  # a paper claim's re-run trains: it waits in the same queue as comparisons
            fn.fn = training_queue.queued_event(fn.fn, len(fn.outputs))
    # Comparisons wait in training_queue (one trains at a time, positions shown), not in Gradio's queue;
    # calling demo.queue() again would only rebuild the server app.
    return demo


def _translate_lessons_tab(demo: gr.Blocks) -> None:
    """The Lessons tab's title in the visitor's language (the tab itself is built by ``tab_lessons``)."""
    for block in demo.blocks.values():
        if isinstance(block, gr.Tab) and block.id == "lessons":
            block.label = t("tab.lessons")


def launch(demo: gr.Blocks, **kwargs: Any):
    """``demo.launch`` with BoRA Lab's theme, CSS and translations (Gradio 6 takes them here, not in ``Blocks``).

    The runs folder is never served as files (downloads are copies in a temporary bundle); uploads
    are capped at ``BORA_LAB_MAX_UPLOAD_MB``. On SIGTERM (a Space restarting) every running
    comparison is stopped and saved, marked "interrupted", before the server closes. Each page
    streaming a comparison holds one of Gradio's worker threads, so a class gets 200 of them. On a
    ZeroGPU Space the GPU trainer is declared before the server starts (``bora_lab.ui.space``).
    ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` choose the address as usual.
    """
    kwargs.setdefault("theme", THEME)
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("max_file_size", f"{limit('upload_mb')}mb")
    kwargs.setdefault("max_threads", 200)
    kwargs.setdefault("i18n", i18n.i18n())  # English, 简体中文, 繁體中文: the browser's language or the picker
    space.prepare()

    def on_sigterm(signum, frame):
        visitor.shutdown()
        demo.close()
        sys.exit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return demo.launch(**kwargs)
