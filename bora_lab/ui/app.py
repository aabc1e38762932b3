"""The ``gr.Blocks`` of BoRA Lab: components and wiring only (logic lives in handlers/live/history).

Widgets are drawn from the code they configure: one per ``RunConfig`` field (hand-labelled where a
label helps, generic otherwise) and one per option of each registered method's config dataclass,
so a new method or a new config field needs no edit here.
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
from bora_lab.limits import limit

from . import tab_cards, tab_claims, tab_compare, tab_history, tab_inside, tab_lessons, tab_memory, tab_try, visitor

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
        gr.Markdown(
            f"# {TITLE}\nCompare parameter-efficient fine-tuning methods side by side on a real model: "
            "loss, accuracy, and how each method moves the weights' **magnitude** and **direction**, "
            "row-wise (per output feature) and column-wise (per input feature).",
            elem_id="bl-header",
        )
        with gr.Tabs():
            widgets = tab_compare.build_compare_tab(session, base, token, demo)
            with gr.Tab("History", id="history") as history_tab:
                list_inputs, list_outputs = tab_history.build_tab(session)
            tab_try.build_try_tab(session)  # type a text: each trained run's answer, disagreements, export
            tab_lessons.build_lessons_tab(widgets)  # teaching views: presets fill the Compare tab
            tab_inside.build_inside_tab(session)  # W0, W, ΔW, norms, spectrum per checkpoint
            tab_cards.build_cards_tab()
            tab_memory.build_memory_tab(session)
            tab_claims.build_claims_tab()  # each paper claim: the paper's value, ours with its interval
        history_tab.select(tab_history.list_runs, list_inputs, list_outputs, concurrency_limit=None)
    for fn in demo.fns.values():  # the app's events serve its own page; none is a public API endpoint
        fn.api_visibility = "private"
    # Training is limited to one at a time across all visitors by its own concurrency_limit=1 (Gradio's
    # default_concurrency_limit is also 1); calling demo.queue() again would only rebuild the server app.
    return demo


def launch(demo: gr.Blocks, **kwargs: Any):
    """``demo.launch`` with BoRA Lab's theme and CSS (Gradio 6 takes them here, not in ``Blocks``).

    The runs folder is never served as files (downloads are copies in a temporary bundle); uploads
    are capped at ``BORA_LAB_MAX_UPLOAD_MB``. On SIGTERM (a Space restarting) every running
    comparison is stopped and saved, marked "interrupted", before the server closes.
    ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` choose the address as usual.
    """
    kwargs.setdefault("theme", THEME)
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("max_file_size", f"{limit('upload_mb')}mb")

    def on_sigterm(signum, frame):
        visitor.shutdown()
        demo.close()
        sys.exit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return demo.launch(**kwargs)
