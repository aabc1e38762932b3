"""A visitor's state: their running comparison (a ``Job`` in a background thread) and their runs.

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


from bora_lab.config import RunConfig

from . import common

log = logging.getLogger(__name__)

END = object()  # the job's last item in its event queue
RESULTS_FILE = "results.json"


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


def default_compare(cfg: RunConfig, cancel: threading.Event):
    from bora_lab.engine.trainer import compare  # imported on first Run: keeps the app's cold start short

    return compare(cfg, cancel)


@dataclass
class Job:
    """One comparison: its config, the worker thread, what it produced so far, and where it is saved."""

    cfg: RunConfig
    out_dir: Path
    compare_fn: Callable[[RunConfig, threading.Event], Iterator[Any]] = default_compare
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
            self.error = common.error_message(err, ", ".join(sorted(self.devices)))
        finally:
            self._save()
            self.finished.set()
            self.events.put(END)

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
            self.save_error = common.error_message(err)

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




def shared_history_default() -> bool:
    """Whether the tab lists every saved run by default (see the module docstring)."""
    flag = os.environ.get("BORA_LAB_SHARED_HISTORY")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes")
    return "SPACE_ID" not in os.environ


def run_folders(session: Session, show_all: bool, root: Path | None = None) -> list[Path]:
    """The run folders this visitor may open, newest first."""
    root = root or runs_dir()
    if show_all and root.is_dir():
        found = [p.parent for p in root.glob(f"*/{RESULTS_FILE}")]
    else:
        found = [p for p in session.run_dirs if (p / RESULTS_FILE).is_file()]
    return sorted(set(found), key=lambda p: (p / RESULTS_FILE).stat().st_mtime, reverse=True)
