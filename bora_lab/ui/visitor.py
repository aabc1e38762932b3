"""A visitor's state: their running comparison (a ``Job`` in a background thread) and their runs.

The engine's generator runs in a worker thread that owns the ``ResultsAccumulator``. It flushes
the results to the run folder every ``CHECKPOINT_S`` seconds (status "running", so a crash or a
SIGTERM leaves a readable partial run that History shows as "interrupted") and saves them when it
ends, however it ends (finished, Stop, an error, a shutdown). One job trains at a time in the whole
process: the others wait in ``training_queue.QUEUE``, which tells each its position. Stop sets the
job's ``threading.Event``; the engine checks it between steps, so a stopped run keeps everything computed.

Several pages may watch one job: the visitor who started it (the *starter*), the same visitor's
reloaded page, and *followers*, visitors who asked for identical settings while it was queued or
training (``bora_lab.ui.reuse``). Each page gets every event through its own queue (:meth:`Job.watch`).
The starter's Stop stops the job; a follower's Stop only stops their own watching.

A visitor is known by a random token kept in their browser (``gr.BrowserState``): a reloaded page
finds its running job again (:func:`job_of`) and, when runs are private (``bora_lab.limits``), the
run folders marked with the token's hash (in ``.owner``, or in ``.shared_with`` for a comparison
they followed or got from the cache) are the only ones it can list, open or download.
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

from . import common, space, training_queue

log = logging.getLogger(__name__)

END = object()  # the job's last item in its event queue
RESULTS_FILE = "results.json"
OWNER_FILE = ".owner"  # sha256 of the visitor's token, in each run folder the app creates
SHARED_FILE = ".shared_with"  # one owner hash per line: visitors who followed it or got it from the cache
CHECKPOINT_S = 20.0  # flush a running comparison to disk this often
_JOBS: dict[str, "Job"] = {}  # visitor token -> their latest job, started or followed (reattach after a reload)
_ACTIVE: set["Job"] = set()  # jobs whose worker is alive (shutdown, "interrupted" detection)
_REGISTRY_LOCK = threading.Lock()


def owner_id(token: str | None) -> str | None:
    """What a run folder stores of its visitor: a hash, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else None


def runs_dir() -> Path:
    """Where runs are saved: ``$BORA_LAB_RUNS``; on a Space /data/runs or a temporary folder; else ``./runs``."""
    return space.runs_root()[0]


def share(folder: Path, token: str | None) -> None:
    """Add the visitor with ``token`` to a run folder's readers (a comparison they followed or reused)."""
    me = owner_id(token)
    if not me:
        return
    try:
        if (folder / OWNER_FILE).is_file() and (folder / OWNER_FILE).read_text().strip() == me:
            return
        shared = folder / SHARED_FILE
        if me not in (shared.read_text().split() if shared.is_file() else []):
            with shared.open("a") as f:
                f.write(me + "\n")
    except OSError:
        log.exception("could not share %s", folder.name)


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
    waiting: bool = True  # in the training queue (another comparison is training)
    token: str | None = None  # the browser token of the visitor who started it
    interrupted: bool = False  # stopped by a server shutdown, not by the visitor
    key: str | None = None  # reuse.config_key of cfg: visitors asking for the same settings follow this job
    followers: set[str] = field(default_factory=set)  # tokens of the visitors watching it without starting it
    reused: bool = False  # a finished comparison loaded from its folder (from_folder), nothing trains
    watchers: list[queue.Queue] = field(default_factory=list)  # one event queue per page streaming it

    __hash__ = object.__hash__

    @classmethod
    def from_folder(cls, cfg: RunConfig, folder: Path) -> "Job":
        """A finished job standing for a saved comparison (identical settings computed before)."""
        from types import SimpleNamespace

        from bora_lab.record import load_results
        from bora_lab.record.layer_store import LayerStore

        job = cls(cfg, folder, saved=True, waiting=False, reused=True)
        job.acc = SimpleNamespace(results=load_results(folder), layers=LayerStore.load(folder))
        job.finished.set()
        return job

    def start(self) -> "Job":
        from bora_lab.record import ResultsAccumulator

        self.acc = ResultsAccumulator(self.cfg)
        with _REGISTRY_LOCK:
            _ACTIVE.add(self)
            if self.token:
                _JOBS[self.token] = self
        training_queue.QUEUE.join(self)  # in line from now on: a waiting page can show its position
        threading.Thread(target=self._work, name=f"bora-lab-{self.out_dir.name}", daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def remaining_s(self) -> float | None:
        """Seconds of training left: the live ETA once it trains, else the estimate from step times."""
        if not self.running:
            return 0.0
        if self.progress is not None:
            return self.progress.eta_s
        from bora_lab.engine.estimate import estimate

        return estimate(self.cfg, self.cfg.device)["seconds"]

    def watch(self) -> queue.Queue:
        """A queue of every event from now on, ending with ``END``, for one page streaming this job."""
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.watchers.append(q)
            if self.finished.is_set():
                q.put(END)
        return q

    def unwatch(self, q: queue.Queue) -> None:
        with self.lock:
            if q in self.watchers:
                self.watchers.remove(q)

    def _emit(self, ev: Any) -> None:
        for q in list(self.watchers):
            q.put(ev)

    def follow(self, token: str | None) -> None:
        """The visitor with ``token`` watches this job (identical settings): it is theirs to reload and
        to find in History too, but not theirs to stop."""
        if token and token != self.token:
            with _REGISTRY_LOCK:
                self.followers.add(token)
                _JOBS[token] = self

    def unfollow(self, token: str | None) -> None:
        with _REGISTRY_LOCK:
            self.followers.discard(token)
            if token and _JOBS.get(token) is self:
                del _JOBS[token]

    def _work(self) -> None:
        try:
            if not training_queue.QUEUE.acquire(self, self.cancel.is_set):  # stopped while waiting
                return
            self.waiting = False
            last_flush = time.monotonic()
            for ev in space.on_device(self.compare_fn, default_compare)(self.cfg, self.cancel):
                with self.lock:
                    self.acc.update(ev)
                    self._record(ev)
                    self._emit(ev)
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
            training_queue.QUEUE.release(self)
            self.waiting = False
            self._save()
            with _REGISTRY_LOCK:
                _ACTIVE.discard(self)
            with self.lock:
                self.finished.set()
                self._emit(END)

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
            marks = [p for p in self.out_dir.iterdir() if p.name.startswith(".")] if self.out_dir.is_dir() else []
            if self.out_dir.is_dir() and len(marks) == len(list(self.out_dir.iterdir())):
                for mark in marks:  # .owner, .shared_with, .config_key
                    mark.unlink(missing_ok=True)
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
        self.job: Job | None = None  # the comparison this page shows: started, followed or reused
        self.following = False  # the job was started by another visitor (Stop only stops watching it)
        self.watch_epoch = 0  # a follower's Stop bumps it: the page's streams of the job end
        self.present = False  # ?present=1: plots for a projector
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


def running_job(key: str, root: Path | None = None) -> Job | None:
    """A job of this process with settings ``key`` that is queued or training now (saved under ``root``)."""
    root = (root or runs_dir()).resolve()
    with _REGISTRY_LOCK:
        jobs = [j for j in _ACTIVE if j.key == key and not j.cancel.is_set() and j.out_dir.resolve().parent == root]
    return min(jobs, key=lambda j: j.started_at, default=None)


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
            for name in (OWNER_FILE, SHARED_FILE):
                for mark in root.glob(f"*/{name}"):
                    try:
                        if me in mark.read_text().split() and (mark.parent / RESULTS_FILE).is_file():
                            found.append(mark.parent)
                    except OSError:
                        continue
    return sorted(set(found), key=lambda p: (p / RESULTS_FILE).stat().st_mtime, reverse=True)
