"""One comparison per browser session: trained in a background thread, streamed to the page.

The trainer's generator runs in a worker thread that owns the ``ResultsAccumulator`` and saves the
results when it ends, however it ends (finished, Stop, an error, the tab closed). The Gradio
handler only reads: it drains the event queue, shows warnings, and redraws at most every
``interval`` seconds, where the interval grows with the cost of a redraw so that drawing stays a
small fraction of training time. Stop sets the ``threading.Event`` kept in the session's
``gr.State``; the trainer checks it between steps, so a stopped run keeps everything computed.
"""
from __future__ import annotations

import copy
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from bora_lab.config import RunConfig

from . import handlers

log = logging.getLogger(__name__)

OUTPUTS = ("status", "progress") + handlers.PLOTS  # the order of the run handler's outputs
MIN_INTERVAL_S = 1.0  # never redraw more often than this
MAX_INTERVAL_S = 2.0  # ... nor less often: the page updates at least every 2 s
COST_RATIO = 15.0  # interval >= 15 x the last redraw's cost, so drawing stays under ~7% of the time
STOP_WAIT_S = 120.0  # how long Stop waits for the trainer to reach a step boundary
_END = object()


def runs_dir() -> Path:
    """Where runs are saved: ``$BORA_LAB_RUNS`` or ``./runs``."""
    return Path(os.environ.get("BORA_LAB_RUNS", "runs"))


def new_run_dir(cfg: RunConfig, root: Path | None = None) -> Path:
    """Create and return a fresh folder ``<root>/<YYYYmmdd-HHMMSS>-<task>-<methods>[-n]``.

    Creating it reserves the name, so two visitors starting the same comparison in the same second
    get different folders.
    """
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.task}-{'-'.join(cfg.methods)}")[:60]
    base = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder next to {base}")


def _default_compare(cfg: RunConfig, cancel: threading.Event):
    from bora_lab.engine.trainer import compare  # imported on first Run: keeps the app's cold start short

    return compare(cfg, cancel)


@dataclass
class Job:
    """One comparison: its config, the worker thread, what it produced so far, and where it is saved."""

    cfg: RunConfig
    out_dir: Path
    compare_fn: Callable[[RunConfig, threading.Event], Iterator[Any]] = _default_compare
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acc: Any = None  # ResultsAccumulator
    threads: str = ""  # "2 CPU threads (auto: ...)", from ComparisonStarted
    progress: Any = None  # the last Progress event
    devices: set[str] = field(default_factory=set)
    run_errors: list[str] = field(default_factory=list)  # "dora-r8: loss became NaN at step 12..."
    cancelled: str | None = None  # the trainer's Cancelled message
    error: str | None = None  # an exception that ended the whole comparison, for people
    saved: bool = False
    save_error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    render_s: float = 0.0  # time the page thread spent drawing frames (benchmarks/ui_overhead.py)

    def start(self) -> "Job":
        from bora_lab.record import ResultsAccumulator

        self.acc = ResultsAccumulator(self.cfg)
        threading.Thread(target=self._work, name=f"bora-lab-{self.out_dir.name}", daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def _work(self) -> None:
        try:
            for ev in self.compare_fn(self.cfg, self.cancel):
                with self.lock:
                    self.acc.update(ev)
                    self._record(ev)
                self.events.put(ev)
        except Exception as err:  # the page shows one line; the log keeps the traceback of a bug
            if isinstance(err, ValueError):  # a bad model/task/option: the trainer's one-line message
                log.info("comparison refused: %s", err)
            else:
                log.exception("comparison failed")
            self.error = handlers.error_message(err, ", ".join(sorted(self.devices)))
        finally:
            self._save()
            self.finished.set()
            self.events.put(_END)

    def results(self) -> dict[str, Any]:
        """A private copy of the results so far, safe to draw while the worker keeps adding.

        The accumulator only appends new rows to a run's lists and never edits old rows, so copying
        the dicts and the lists (not the rows) is enough, and costs microseconds, not a deep copy.
        """
        with self.lock:
            res = self.acc.results
            runs = [{**run, **{k: list(run[k]) for k in ("history", "eval", "analysis") if k in run}}
                    for run in res.get("runs", [])]
            return {**copy.deepcopy({k: v for k, v in res.items() if k != "runs"}), "runs": runs}

    def _save(self) -> None:
        from bora_lab.figures import report_html
        from bora_lab.record import save_results

        results = self.results()
        if all(run["status"] == "pending" for run in results.get("runs", [])):
            if self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()  # nothing trained (e.g. the model failed to load): no empty folder
            return
        if results.get("status") == "running":  # the trainer raised before ComparisonDone
            results["status"], results["message"] = "error", self.error
        try:
            save_results(results, self.out_dir, layers=self.acc.layers,  # + layers/ for "Inside a layer"
                         figures_html=report_html(results))
            self.saved = True
        except Exception as err:
            log.exception("saving %s failed", self.out_dir)
            self.save_error = handlers.error_message(err)

    def _record(self, ev: Any) -> None:
        """Keep what the status line needs from one event (worker thread, under the lock)."""
        if ev.kind == "progress":
            self.progress = ev
        elif ev.kind == "run_started":
            self.devices.add(ev.device)
        elif ev.kind == "error":
            self.run_errors.append(f"{ev.run_id}: {ev.message}")
        elif ev.kind == "cancelled":
            self.cancelled = ev.message
        elif ev.kind == "comparison_started":
            n, why = ev.num_threads, ev.threads_reason
            self.threads = f"{n} CPU thread{'s' if n != 1 else ''}: {why}" if n else why


class Session:
    """Per-visitor state kept in ``gr.State``: the current job and this visitor's saved runs."""

    def __init__(self) -> None:
        self.job: Job | None = None
        self.run_dirs: list[Path] = []  # every run this visitor started, newest last
        self.md_view = "from_start"
        self.history_results: dict[str, Any] | None = None  # what the History tab shows

    def __deepcopy__(self, memo) -> "Session":
        return Session()  # gr.State deep-copies its initial value for each new visitor

    def close(self) -> None:
        """Stop this visitor's training (the tab was closed); the run is still saved."""
        if self.job is not None:
            self.job.cancel.set()


def _status(job: Job, state: str) -> str:
    cfg = job.cfg
    runs = ", ".join(cfg.run_ids())
    device = "/".join(sorted(job.devices)) or cfg.device
    p = job.progress
    failed = f" ({len(job.run_errors)} of {len(cfg.run_ids())} runs failed)" if job.run_errors else ""
    head = {
        "loading": f"**Loading** `{cfg.model}` and `{cfg.task}` for {runs}…",
        "running": f"**Training** {runs} on `{cfg.task}` with `{cfg.model}` ({device}; {job.threads})",
        "done": f"**Done**{failed}: {runs} in {handlers.fmt_duration(time.monotonic() - job.started_at)}",
        "stopped": (f"**Stopped** after {p.done_steps if p else 0} of {p.total_steps if p else '?'} steps "
                    "(all runs together): everything computed so far is shown and kept"),
        "error": f"**Failed**: {job.error}",
    }[state]
    lines = [head]
    if job.cancelled and state != "stopped":
        lines.append(job.cancelled)
    lines += [f"⚠ {msg}" for msg in job.run_errors]
    if job.saved:
        lines.append(f"Saved to `{job.out_dir}` (open it in the History tab).")
    elif job.save_error:
        lines.append(f"⚠ Could not save the results: {job.save_error}")
    return "  \n".join(lines)


def _progress(job: Job, state: str) -> str:
    p = job.progress
    total = p.total_steps if p else job.cfg.steps * len(job.cfg.run_ids())
    done = p.done_steps if p else 0
    elapsed = time.monotonic() - job.started_at
    return handlers.progress_html(done, total, elapsed, p.eta_s if p else None, state)


def _state(job: Job) -> str:
    if job.running:
        return "running" if job.progress is not None else "loading"
    if job.error:
        return "error"
    return "stopped" if job.cancelled else "done"


def render(job: Job, names, md_view: str, empty: bool = False) -> tuple:
    """The run handler's outputs (see :data:`OUTPUTS`); plots not in ``names`` are skipped.

    ``empty=True`` shows the blank plots (the first frame of a run, before any data).
    """
    state = _state(job)
    if empty:
        plots = handlers.empty_plots()
    else:
        plots = handlers.render_plots(job.results(), names, md_view) if names else {}
    return (_status(job, state), _progress(job, state)) + tuple(plots.get(n, gr.skip()) for n in handlers.PLOTS)


def _timed_render(job: Job, names, md_view: str) -> tuple[tuple, float]:
    t0 = time.perf_counter()
    out = render(job, names, md_view)
    cost = time.perf_counter() - t0
    job.render_s += cost
    return out, cost


def stream(job: Job, session: Session, poll_s: float = 0.2) -> Iterator[tuple]:
    """Yield output tuples while ``job`` trains, redrawing only stale plots, then a final full one."""
    stale: set[str] = set()
    changed = False  # any event since the last frame (no event: nothing to redraw)
    yield render(job, handlers.PLOTS, session.md_view, empty=True)  # clears the previous run's plots
    last, interval = time.monotonic(), MIN_INTERVAL_S
    while True:
        try:
            ev = job.events.get(timeout=poll_s)
        except queue.Empty:
            ev = None
        if ev is _END:
            break
        if ev is not None:
            if ev.kind == "error":  # a run stopped (NaN loss, out of memory, rank too large)
                gr.Warning(f"{ev.run_id}: {ev.message}")
            stale |= handlers.stale_plots([ev])
            changed = True
        if changed and time.monotonic() - last >= interval:
            out, cost = _timed_render(job, stale, session.md_view)
            stale.clear()
            changed = False
            last, interval = time.monotonic(), min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, COST_RATIO * cost))
            yield out
    yield _timed_render(job, handlers.PLOTS, session.md_view)[0]
    if job.error:
        raise gr.Error(job.error, print_exception=False)


def run_comparison(session: Session, *values: Any, compare_fn: Callable | None = None) -> Iterator[tuple]:
    """The Run button: check the widgets, start the job, and stream updates until it ends.

    Args:
        session: this visitor's :class:`Session` (from ``gr.State``).
        *values: widget values in the order of ``handlers.input_keys()``.
        compare_fn: the trainer entry point (tests pass a fake); default ``bora_lab.engine.trainer.compare``.
    """
    try:
        cfg = handlers.config_from_ui(**dict(zip(handlers.input_keys(), values)))
    except ValueError as err:
        raise gr.Error(str(err), print_exception=False) from None
    if session.job is not None and session.job.running:
        raise gr.Error("A comparison is already running in this tab: press Stop first.", print_exception=False)
    job = Job(cfg, new_run_dir(cfg), compare_fn or _default_compare).start()
    session.job = job
    session.run_dirs.append(job.out_dir)
    try:
        yield from stream(job, session)
    finally:
        job.cancel.set()  # closed early (Stop's `cancels=`, a closed tab): stop training; no-op when done


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
    return render(job, handlers.PLOTS, session.md_view)


def change_md_view(session: Session, label: str):
    """The ΔM/ΔD view radio: redraw the small multiples of the current (or last) comparison."""
    session.md_view = handlers.MD_VIEWS.get(label, label)
    if session.job is None:
        return gr.skip()
    return handlers.render_plots(session.job.results(), ("md",), session.md_view)["md"]
