"""A visitor's state: their running comparison (a ``Job`` in a background thread) and their runs.

The engine's generator runs in a worker thread that owns the ``ResultsAccumulator``. It flushes
the results to the run folder every ``CHECKPOINT_S`` seconds (status "running", so a crash or a
SIGTERM leaves a readable partial run that History shows as "interrupted") and saves them when it
ends, however it ends (finished, Stop, an error, a shutdown). One job trains at a time in the whole
process (``TRAIN_SLOT``); the others wait, saying so. Stop sets the job's ``threading.Event``; the
engine checks it between steps, so a stopped run keeps everything computed.

A visitor is known by a random token kept in their browser (``gr.BrowserState``): a reloaded page
finds its running job again (:func:`job_of`) and, when runs are private (``bora_lab.limits``), the
run folders marked with the token's hash are the only ones it can list, open or download.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import queue
import re
import secrets
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
OWNER_FILE = ".owner"  # sha256 of the visitor's token, in each run folder the app creates
CHECKPOINT_S = 20.0  # flush a running comparison to disk this often
TRAIN_SLOT = threading.Semaphore(1)  # one comparison trains at a time in this process
_JOBS: dict[str, "Job"] = {}  # visitor token -> their latest job (reattach after a reload)
_ACTIVE: set["Job"] = set()  # jobs whose worker is alive (shutdown, "interrupted" detection)
_REGISTRY_LOCK = threading.Lock()


def owner_id(token: str | None) -> str | None:
    """What a run folder stores of its visitor: a hash, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else None


def runs_dir() -> Path:
    """Where runs are saved: ``$BORA_LAB_RUNS`` or ``./runs``."""
    return Path(os.environ.get("BORA_LAB_RUNS", "runs"))


def new_run_dir(cfg: RunConfig, root: Path | None = None, owner: str | None = None) -> Path:
    """Create and return a fresh folder ``<root>/<YYYYmmdd-HHMMSS>-<task>-<methods>-<random>``.

    The random part makes names unguessable and unique (creating the folder reserves it); ``owner``
    (:func:`owner_id`) is written into it, so private runs can be told apart after a restart.
    """
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.task}-{'-'.join(cfg.methods)}")[:60]
    for _ in range(100):
        path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        if owner:
            (path / OWNER_FILE).write_text(owner)
        return path
    raise RuntimeError("cannot create a run folder")


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
    waiting: bool = True  # for the training slot (another visitor's comparison is training)
    token: str | None = None  # the visitor's browser token
    interrupted: bool = False  # stopped by a server shutdown, not by the visitor

    __hash__ = object.__hash__

    def start(self) -> "Job":
        from bora_lab.record import ResultsAccumulator

        self.acc = ResultsAccumulator(self.cfg)
        with _REGISTRY_LOCK:
            _ACTIVE.add(self)
            if self.token:
                _JOBS[self.token] = self
        threading.Thread(target=self._work, name=f"bora-lab-{self.out_dir.name}", daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def _work(self) -> None:
        slot = False
        try:
            while not (slot := TRAIN_SLOT.acquire(timeout=0.5)):
                if self.cancel.is_set():  # stopped while waiting: nothing trained
                    return
            self.waiting = False
            last_flush = time.monotonic()
            for ev in self.compare_fn(self.cfg, self.cancel):
                with self.lock:
                    self.acc.update(ev)
                    self._record(ev)
                self.events.put(ev)
                if time.monotonic() - last_flush >= CHECKPOINT_S:
                    self._flush()
                    last_flush = time.monotonic()
        except Exception as err:  # the page shows one line; the log keeps the traceback of a bug
            if isinstance(err, ValueError):  # a bad model/task/option: the trainer's one-line message
                log.info("comparison refused: %s", err)
            else:
                log.exception("comparison failed")
            self.error = common.error_message(err, ", ".join(sorted(self.devices)))
        finally:
            if slot:
                TRAIN_SLOT.release()
            self.waiting = False
            self._save()
            with _REGISTRY_LOCK:
                _ACTIVE.discard(self)
            self.finished.set()
            self.events.put(END)

    def _flush(self) -> None:
        """Write what is there so far (status "running"): a crash leaves a readable partial run."""
        from bora_lab.record import save_results

        try:
            save_results(self.results(), self.out_dir, layers=self.acc.layers)
        except Exception:  # noqa: BLE001 - a failed checkpoint must not stop training
            log.exception("checkpoint of %s failed", self.out_dir.name)

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
            if self.out_dir.is_dir() and not [p for p in self.out_dir.iterdir() if p.name != OWNER_FILE]:
                (self.out_dir / OWNER_FILE).unlink(missing_ok=True)
                self.out_dir.rmdir()  # nothing trained (e.g. the model failed to load): no empty folder
            return
        if results.get("status") == "running":  # the trainer raised before ComparisonDone
            results["status"], results["message"] = "error", self.error
        if self.interrupted:
            results["status"], results["message"] = "interrupted", "the server stopped; the steps so far are kept"
        try:
            save_results(results, self.out_dir, layers=self.acc.layers, adapters=self.acc.adapters,
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
    """Per-visitor state kept in ``gr.State``: the token, the current job, and this visitor's runs."""

    def __init__(self) -> None:
        self.token: str | None = None  # from the browser (gr.BrowserState), set when the page loads
        self.job: Job | None = None
        self.run_dirs: list[Path] = []  # every run this visitor started in this process, newest last
        self.md_view = "from_start"
        self.history_results: dict[str, Any] | None = None  # what the History tab shows
        self.bundle_dir: Path | None = None  # the last download bundle (removed when the next is made)

    def __deepcopy__(self, memo) -> "Session":
        return Session()  # gr.State deep-copies its initial value for each new visitor

    def close(self) -> None:
        """The page went away: the job goes on (a reload finds it again); temporary files go."""
        if self.bundle_dir is not None:
            import shutil

            shutil.rmtree(self.bundle_dir, ignore_errors=True)
            self.bundle_dir = None


def job_of(token: str | None) -> Job | None:
    """The latest job of the visitor with ``token`` (running or finished in this process)."""
    with _REGISTRY_LOCK:
        return _JOBS.get(token) if token else None


def is_active(folder: Path) -> bool:
    """Whether a job of this process is still writing ``folder``."""
    with _REGISTRY_LOCK:
        return any(job.out_dir.resolve() == folder.resolve() for job in _ACTIVE)


def shutdown(timeout_s: float = 15.0) -> None:
    """Stop every job (SIGTERM: a Space restarting) and wait, up to ``timeout_s``, for them to save."""
    with _REGISTRY_LOCK:
        jobs = list(_ACTIVE)
    for job in jobs:
        job.interrupted = True
        job.cancel.set()
    deadline = time.monotonic() + timeout_s
    for job in jobs:
        job.finished.wait(max(0.0, deadline - time.monotonic()))


def shared_history_default() -> bool:
    """Whether History lists every saved run by default: not when runs are private (a Space);
    ``BORA_LAB_SHARED_HISTORY=0/1`` chooses on your own machine."""
    from bora_lab.limits import private_runs

    if private_runs():
        return False
    flag = os.environ.get("BORA_LAB_SHARED_HISTORY")
    return True if flag is None else flag.strip().lower() in ("1", "true", "yes")


def run_folders(session: Session, show_all: bool, root: Path | None = None) -> list[Path]:
    """The run folders this visitor may open, newest first: every saved run when ``show_all`` (and
    runs are not private), else the visitor's own (this process's, or marked with their token)."""
    from bora_lab.limits import private_runs

    root = root or runs_dir()
    if show_all and not private_runs() and root.is_dir():
        found = [p.parent for p in root.glob(f"*/{RESULTS_FILE}")]
    else:
        found = [p for p in session.run_dirs if (p / RESULTS_FILE).is_file()]
        me = owner_id(session.token)
        if me and root.is_dir():
            for mark in root.glob(f"*/{OWNER_FILE}"):
                try:
                    if mark.read_text().strip() == me and (mark.parent / RESULTS_FILE).is_file():
                        found.append(mark.parent)
                except OSError:
                    continue
    return sorted(set(found), key=lambda p: (p / RESULTS_FILE).stat().st_mtime, reverse=True)
