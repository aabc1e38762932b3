"""The Compare tab: the settings form (:mod:`bora_lab.ui.compare_layout`), Run/Stop, and the live
plots of the visitor's comparison, streamed from the ``Job`` in :mod:`bora_lab.ui.visitor`.

Each frame redraws only the plots that events made stale (:func:`bora_lab.ui.common.stale_plots`),
at most every ``interval`` seconds, the interval growing with the cost of a redraw so that drawing
stays a small fraction of training time.

A whole class may press Run at once. Identical settings are computed once (``bora_lab.ui.reuse``):
settings that finished before are shown at once, settings queued or training now are watched live
(every page of the job gets every event). Other settings join the training queue
(``bora_lab.ui.training_queue``), which shows each waiting page its position and start estimate;
a visitor has one comparison queued, training or watched at a time. **Stop**: the visitor who
started a comparison stops it (for everyone watching, who then see it stopped); a visitor who is
only watching it stops watching, and it goes on.
"""
from __future__ import annotations

import functools
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from bora_lab.config import RunConfig
from bora_lab.limits import limit, reuse_runs

from . import common, form, links, reuse, training_queue, visitor
from .compare_layout import COST_KEYS, cost_text, methods_changed, plots_column, settings_column
from .i18n import t
from .visitor import END, Job, Session, default_compare, job_of, new_run_dir, owner_id

__all__ = ["COST_KEYS", "cost_text", "run_comparison", "stop_comparison", "attach", "render", "build_compare_tab"]

ALREADY_RUNNING = "Your comparison is already running: press Stop first, or wait for it to finish."
WATCHING = ("You are watching another visitor's comparison (the same settings, computed once for both of you): "
            "press Stop to stop watching, then Run.")
OUTPUTS = ("status", "progress") + common.PLOTS  # the order of the run handler's outputs
MIN_INTERVAL_S = 1.0  # never redraw more often than this
MAX_INTERVAL_S = 2.0  # ... nor less often: the page updates at least every 2 s
COST_RATIO = 15.0  # interval >= 15 x the last redraw's cost, so drawing stays under ~7% of the time
STOP_WAIT_S = 120.0  # how long Stop waits for the trainer to reach a step boundary
_START_LOCK = threading.Lock()  # "is someone computing these settings?" and "start them" as one step


def _status(job: Job, state: str, viewer: Session | None = None) -> str:
    cfg = job.cfg
    runs = ", ".join(cfg.run_ids())
    device = "/".join(sorted(job.devices)) or cfg.device
    p = job.progress
    following = viewer is not None and viewer.following
    failed = f" ({len(job.run_errors)} of {len(cfg.run_ids())} runs failed)" if job.run_errors else ""
    where = training_queue.QUEUE.describe(job)
    head = {
        "waiting": (f"**Waiting** in the training queue: {where} (one comparison trains at a time); then {runs}…"
                    if where else f"**Waiting** for the training slot; then {runs}…"),
        "loading": f"**Loading** `{cfg.model}` and `{cfg.task}` for {runs}…",
        "running": f"**Training** {runs} on `{cfg.task}` with `{cfg.model}` ({device}; {job.threads})",
        "done": (f"**Done**: {runs}, computed earlier with exactly these settings: shown at once, nothing "
                 "trained again" if job.reused else
                 f"**Done**{failed}: {runs} in {common.fmt_duration(time.monotonic() - job.started_at)}"),
        "stopped": (f"**Stopped**{' by the visitor who started it' if following else ''} after "
                    f"{p.done_steps} of {p.total_steps} steps (all runs together): everything computed so far "
                    "is shown and kept" if p else
                    f"**Stopped**{' by the visitor who started it' if following else ''} before it trained: "
                    "nothing was computed, nothing is kept"),
        "error": f"**Failed**: {job.error}",
    }[state]
    lines = [head]
    if following and job.running:
        lines.append("You are watching a comparison another visitor started with identical settings: it trains "
                     "once for both of you. Your Stop only stops your watching.")
    elif job.followers and job.running:
        n = len(job.followers)
        lines.append(f"{n} other visitor{'s are' if n != 1 else ' is'} watching it (identical settings).")
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
    return "stopped" if job.cancelled or job.cancel.is_set() else "done"


def render(job: Job, names, md_view: str, empty: bool = False, viewer: Session | None = None) -> tuple:
    """The run handler's outputs (see :data:`OUTPUTS`); plots not in ``names`` are skipped.

    ``empty=True`` shows the blank plots (the first frame of a run, before any data); ``viewer`` is
    the page's session (a follower's status lines; presenter mode's larger plots).
    """
    state = _state(job)
    if empty:
        plots = common.empty_plots()
    else:
        plots = common.render_plots(job.results(), names, md_view) if names else {}
    if viewer is not None and viewer.present:
        plots = common.for_projector(plots)
    return (_status(job, state, viewer), _progress(job, state)) + tuple(plots.get(n, gr.skip()) for n in common.PLOTS)


def _timed_render(job: Job, names, session: Session) -> tuple[tuple, float]:
    t0 = time.perf_counter()
    out = render(job, names, session.md_view, viewer=session)
    cost = time.perf_counter() - t0
    job.render_s += cost
    return out, cost


def stream(job: Job, session: Session, poll_s: float = 0.2, fresh: bool = True) -> Iterator[tuple]:
    """Yield output tuples while ``job`` trains, redrawing only stale plots, then a final full one.

    ``fresh`` starts from blank plots (a new Run); a reattached or following page starts from what is
    there. While the job waits in the queue, the status (position, start estimate) is refreshed every
    ``MAX_INTERVAL_S``. A follower's Stop (``session.watch_epoch``) ends the stream, not the job.
    """
    events = job.watch()
    epoch = session.watch_epoch
    try:
        stale: set[str] = set()
        changed = False  # any event since the last frame (no event: nothing to redraw)
        yield render(job, common.PLOTS, session.md_view, empty=fresh, viewer=session)
        last, interval = time.monotonic(), MIN_INTERVAL_S
        while True:
            if session.watch_epoch != epoch:
                return
            try:
                ev = events.get(timeout=poll_s)
            except queue.Empty:
                ev = None
            if ev is END:
                break
            if ev is not None:
                if ev.kind == "error":  # a run stopped (NaN loss, out of memory, rank too large)
                    gr.Warning(f"{ev.run_id}: {ev.message}")
                stale |= common.stale_plots([ev])
                changed = True
            now = time.monotonic()
            if changed and now - last >= interval:
                out, cost = _timed_render(job, stale, session)
                stale.clear()
                changed = False
                last, interval = time.monotonic(), min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, COST_RATIO * cost))
                yield out
            elif job.waiting and now - last >= MAX_INTERVAL_S:  # the queue moves: new position and estimate
                last = now
                yield render(job, (), session.md_view, viewer=session)
        yield _timed_render(job, common.PLOTS, session)[0]
        if job.error:
            raise gr.Error(job.error, print_exception=False)
    finally:
        job.unwatch(events)


def _busy_message(session: Session, job: Job) -> str:
    if session.following:
        return WATCHING
    where = training_queue.QUEUE.describe(job)
    if where:
        return (f"Your comparison is already waiting in the training queue ({where}): one comparison per "
                "visitor at a time. Press Stop to leave the queue.")
    return ALREADY_RUNNING


def _check_capacity(cfg: RunConfig) -> None:
    """A new comparison must fit the operator's limits for the shared queue (``bora_lab.limits``)."""
    runs = len(cfg.run_plan())
    most = limit("comparison_steps")
    if runs * cfg.steps > most:
        raise gr.Error(f"These settings train {runs * cfg.steps:,} steps ({runs} runs × {cfg.steps:,}); this server "
                       f"takes at most {most:,} per comparison (BORA_LAB_MAX_COMPARISON_STEPS): choose fewer "
                       "methods, ranks, seeds or steps.", print_exception=False)
    waiting, most = training_queue.QUEUE.waiting(), limit("queue")
    if waiting >= most:
        raise gr.Error(f"The training queue is full ({waiting} comparisons waiting, BORA_LAB_MAX_QUEUE): try again "
                       "in a few minutes.", print_exception=False)


def _show(session: Session, job: Job, following: bool) -> None:
    """This page now shows ``job``; a comparison it did not start is shared with the visitor."""
    session.job, session.following = job, following
    if following or job.reused:
        job.follow(session.token)
        visitor.share(job.out_dir, session.token)
    if job.out_dir not in session.run_dirs:
        session.run_dirs.append(job.out_dir)


def run_comparison(session: Session, *values: Any, compare_fn: Callable | None = None) -> Iterator[tuple]:
    """The Run button: check the widgets, then show the comparison of those settings, computed once.

    Args:
        session: this visitor's :class:`Session` (from ``gr.State``).
        *values: widget values in the order of ``form.input_keys()``.
        compare_fn: the trainer entry point (tests pass a fake); default ``bora_lab.engine.trainer.compare``.
    """
    try:
        cfg = form.config_from_ui(**dict(zip(form.input_keys(), values)))
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None
    for busy in (session.job, job_of(session.token)):
        if busy is not None and busy.running:
            raise gr.Error(_busy_message(session, busy), print_exception=False)
    key = reuse.config_key(cfg)
    with _START_LOCK:
        shared = visitor.running_job(key) if reuse_runs() else None
        folder = reuse.cached_folder(key, visitor.runs_dir()) if reuse_runs() and shared is None else None
        if shared is None and folder is None:
            _check_capacity(cfg)
            job = Job(cfg, new_run_dir(cfg, owner=owner_id(session.token)), compare_fn or default_compare,
                      token=session.token, key=key)
            reuse.mark(job.out_dir, key)
            job.start()
    if folder is not None:  # finished before: shown at once
        _show(session, Job.from_folder(cfg, folder), following=False)
        yield render(session.job, common.PLOTS, session.md_view, viewer=session)
        return
    if shared is not None:  # queued or training now: watch it live
        _show(session, shared, following=True)
        gr.Info("Another visitor is running exactly these settings: you are watching their comparison live.")
        yield from stream(shared, session, fresh=False)
        return
    _show(session, job, following=False)
    # A closed or reloaded page ends this generator but not the job: it trains on, saves, and the
    # reloaded page reattaches to it (attach). Stop cancels it explicitly.
    yield from stream(job, session)


def attach(session: Session, token: str | None, request: gr.Request = None):
    """Page load: keep the visitor's browser token; a reloaded page finds its comparison again.

    Yields ``(token, *OUTPUTS)``: the token (new if the browser had none) and, when the visitor
    has a job in this process (started or watched), its frames (streamed while it still trains;
    presenter-sized with ``?present=1``).
    """
    if request is not None:
        session.present = links.wants_present(dict(getattr(request, "query_params", None) or {}))
    if not (isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token)):
        token = secrets.token_urlsafe(24)
    session.token = token
    job = job_of(token)
    if job is None:
        yield (token,) + tuple(gr.skip() for _ in OUTPUTS)
        return
    _show(session, job, following=job.token != token and not job.reused)
    if not job.running:
        yield (token,) + render(job, common.PLOTS, session.md_view, viewer=session)
        return
    for frame in stream(job, session, fresh=False):
        yield (token,) + frame


def stop_comparison(session: Session) -> tuple:
    """The Stop button: the starter stops the comparison (at the next step; what was computed is
    shown and kept); a follower stops watching it, and it goes on for the others."""
    job = session.job
    if (job is None or not job.running) and job_of(session.token) is not None:  # another tab of this visitor
        job = job_of(session.token)
        session.job, session.following = job, job.token != session.token
    if job is None or not job.running:
        gr.Info("Nothing is running.")
        return tuple(gr.skip() for _ in OUTPUTS)
    if session.following:
        job.unfollow(session.token)
        session.watch_epoch += 1
        session.job, session.following = None, False
        return ((f"**Stopped watching.** The comparison goes on for the visitor who started it; it is saved as "
                 f"`{job.out_dir.name}` in your History when it ends."),) + tuple(gr.skip() for _ in OUTPUTS[1:])
    job.cancel.set()
    if not job.finished.wait(STOP_WAIT_S):
        gr.Warning("The trainer has not reached a step boundary yet; it will stop and save shortly.")
        return tuple(gr.skip() for _ in OUTPUTS)
    return render(job, common.PLOTS, session.md_view, viewer=session)


def change_md_view(session: Session, label: str):
    """The ΔM/ΔD view radio: redraw the small multiples of the current (or last) comparison."""
    session.md_view = common.MD_VIEWS.get(label, label)
    if session.job is None:
        return gr.skip()
    md = common.render_plots(session.job.results(), ("md",), session.md_view)
    return (common.for_projector(md) if session.present else md)["md"]


def build_compare_tab(session: gr.State, base: RunConfig, token: gr.BrowserState | None = None,
                      demo: gr.Blocks | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Compare tab and its wiring.

    With ``token`` and ``demo``: on page load, the visitor's browser token is read (or made) and a
    reloaded page reattaches to its running (or watched) comparison.

    Returns:
        ``(widgets, parts)``: the settings widgets by input key (the Lessons tab fills them) and the
        "Copy link" button and link box (``"copy_link"``, ``"link"``; wired by ``bora_lab.ui.links``).
    """
    values = form.ui_values(base)
    with gr.Tab(t("tab.compare"), id="compare"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=380, elem_id="bl-settings"):
                widgets, option_groups, method_notes = settings_column(values)
                with gr.Row(elem_id="bl-actions"):
                    run_btn = gr.Button(t("compare.run"), variant="primary", elem_id="bl-run")
                    stop_btn = gr.Button(t("compare.stop"), variant="stop", elem_id="bl-stop")
                    copy_btn = gr.Button(t("compare.copy_link"), variant="secondary", elem_id="bl-copy-link")
                link = gr.Textbox(label=t("compare.link"), elem_id="bl-link", visible=False, lines=2,
                                  max_lines=4, info=t("compare.link.help"))
                cost = gr.Markdown(cost_text(*[values[k] for k in form.input_keys()]), elem_id="bl-cost")
            with gr.Column(scale=5, elem_id="bl-plots"):
                plots = plots_column()
    inputs = [session] + [widgets[k] for k in form.input_keys()]
    outputs = [plots[k] for k in OUTPUTS]
    # Not limited by Gradio: identical settings are watched, others wait in training_queue (with positions).
    run_evt = run_btn.click(run_comparison, inputs, outputs, concurrency_limit=None,
                            show_progress="minimal", show_progress_on=[plots["status"]])
    stop_btn.click(stop_comparison, [session], outputs, cancels=[run_evt], concurrency_limit=None,
                   show_progress="hidden")
    plots["md_view"].change(change_md_view, [session, plots["md_view"]], plots["md"], concurrency_limit=None,
                            show_progress="hidden")
    for key in COST_KEYS:  # the cost line follows every setting that changes it
        widgets[key].change(cost_text, inputs[1:], cost, concurrency_limit=None, show_progress="hidden")
    widgets["methods"].change(methods_changed, widgets["methods"],
                              method_notes + [option_groups[m] for m in form.option_methods()],
                              concurrency_limit=None, show_progress="hidden")
    widgets["task"].input(functools.partial(form.task_changed, base=base), widgets["task"],
                          [widgets[k] for k in form.task_default_keys()], concurrency_limit=None,
                          show_progress="hidden")
    if token is not None and demo is not None:
        demo.load(attach, [session, token], [token] + outputs, concurrency_limit=None, show_progress="hidden")
    return widgets, {"copy_link": copy_btn, "link": link}
