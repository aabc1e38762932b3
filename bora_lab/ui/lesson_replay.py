"""A lesson's recorded result in the Lessons tab: shown at once, replayed as if live at a chosen speed.

Every built-in lesson ships a recording of its own run (``bora_lab.teach.recordings``, made by
``scripts/record_lessons.py``). Opening the lesson draws the recorded curves, the lesson's view and
the table at once; Replay grows them step by step; Run (Compare tab) trains live as before.
"""
from __future__ import annotations

import html
import time
from typing import Any

import gradio as gr

from . import common

SPEEDS = {"1× (as recorded)": 1.0, "5×": 5.0, "10×": 10.0, "30×": 30.0}
FRAMES = 40  # frames of a replay, whatever its length
MAX_REPLAY_S = 90.0  # a replay never takes longer than this, whatever the speed
CONCURRENCY = 4  # replays drawing at once (each frame redraws the figures)
NO_LESSON = "Pick a lesson to see its recorded result."


def _recording(lesson: dict[str, Any] | None) -> dict[str, Any] | None:
    from bora_lab.teach import recordings

    if lesson is None:
        return None
    try:
        return recordings.load_recording(lesson)
    except (recordings.RecordingError, ValueError):
        return None


def status_text(lesson: dict[str, Any] | None, rec: dict[str, Any] | None) -> str:
    if lesson is None:
        return NO_LESSON
    if rec is None:
        return "This lesson has no recording yet: press **Run** in the Compare tab to train it live."
    env = rec.get("environment") or {}
    where = (f"{env.get('device_name') or env.get('device') or 'cpu'} ({env.get('machine')}), "
             f"{env.get('num_threads') or '?'} threads") if env else "this project's CPU"
    text = (f"**Recorded result** ({rec.get('created', '')[:10]}, {rec.get('elapsed_s', 0):.0f} s of training on "
            f"{html.escape(where)}): shown at once; **Replay** grows the curves as they grew live; **Run** "
            "(Compare tab) trains it again here.")
    if rec.get("stale"):
        text += (" ⚠️ The lesson's settings changed since this recording ("
                 + html.escape("; ".join(rec.get("stale_reasons") or [])) + "): press Run for the current ones.")
    return text


def _view_figure(lesson: dict[str, Any], rec: dict[str, Any], results: dict[str, Any]) -> Any:
    """The lesson's own view: ΔM/ΔD, the DoRA figure-2 scatter, or a layer's ΔW spectrum ("inside")."""
    view = lesson.get("view")
    if view in ("scatter", "forest"):
        return common.render_plots(results, [view])[view]
    if view == "inside" and rec.get("layers"):
        from bora_lab.figures.layer_views import layer_figures
        from bora_lab.teach.recordings import layer_store_from

        store = layer_store_from(rec)
        run_id = store.run_ids()[-1]  # the lesson's featured method comes last (lora first, then it)
        step = max((e["step"] for r in results["runs"] if r["run_id"] == run_id for e in r.get("history", [])), default=0)
        module = store.modules(run_id)[0]
        kept = [s for s in store.steps(run_id) if s <= step] or store.steps(run_id)[:1]
        return layer_figures(store, run_id, kept[-1], module)["spectrum" if "mora" in run_id else "method"]
    return common.render_plots(results, ["md"])["md"]


def frame_outputs(lesson: dict[str, Any], rec: dict[str, Any], results: dict[str, Any]) -> list[Any]:
    plots = common.render_plots(results, ["loss", "metric", "table"])
    return [plots["loss"], plots["metric"], _view_figure(lesson, rec, results), plots["table"]]


def show(lesson: dict[str, Any] | None) -> list[Any]:
    """Status, loss, metric, view and table of ``lesson``'s recording (its final state), or empty ones."""
    rec = _recording(lesson)
    if lesson is None or rec is None:
        empty = common.empty_plots()
        return [status_text(lesson, rec), empty["loss"], empty["metric"], empty["md"], empty["table"]]
    return [status_text(lesson, rec), *frame_outputs(lesson, rec, rec["results"])]


def replay(lesson: dict[str, Any] | None, speed: str):
    """Generator: the recording's frames, paced as recorded divided by ``speed`` (at most MAX_REPLAY_S)."""
    from bora_lab.teach.recordings import replay_frames

    rec = _recording(lesson)
    if lesson is None or rec is None:
        yield show(lesson)
        return
    factor = SPEEDS.get(speed, 10.0)
    pause = min(float(rec.get("elapsed_s") or 60.0) / factor, MAX_REPLAY_S) / FRAMES
    for i, frame in enumerate(replay_frames(rec, FRAMES)):
        done = frame.get("progress", {})
        status = f"Replaying at {html.escape(speed)}: frame {i + 1} of {FRAMES}" if done else "Replaying"
        t0 = time.monotonic()
        yield [status, *frame_outputs(lesson, rec, frame)]
        time.sleep(max(0.0, pause - (time.monotonic() - t0)))
    yield show(lesson)


def build_replay(lesson_state: gr.State) -> tuple[list[Any], gr.Button, gr.Dropdown]:
    """The recorded-result block (call inside the Lessons tab's column). Returns its outputs, the Replay
    button and the speed choice; the tab wires them to the chosen lesson (``lesson_state``)."""
    with gr.Group(elem_id="bl-lesson-recording"):
        status = gr.Markdown(NO_LESSON, elem_id="bl-lesson-rec-status")
        with gr.Row():
            speed = gr.Dropdown(list(SPEEDS), value="10×", label="Replay speed", scale=1)
            button = gr.Button("Replay", elem_id="bl-lesson-replay", scale=0)
        with gr.Row():
            loss = gr.Plot(label="Training loss (recorded)", elem_id="bl-lesson-rec-loss")
            metric = gr.Plot(label="Evaluation (recorded)", elem_id="bl-lesson-rec-metric")
        view = gr.Plot(label="The lesson's view (recorded)", elem_id="bl-lesson-rec-view")
        table = gr.Dataframe(label="Results (recorded)", interactive=False, wrap=True, elem_id="bl-lesson-rec-table")
    outputs = [status, loss, metric, view, table]
    button.click(replay, [lesson_state, speed], outputs, concurrency_limit=CONCURRENCY, concurrency_id="replay")
    return outputs, button, speed
