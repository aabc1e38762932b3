"""Ray: a comparison's runs spread over processes, GPUs or machines, with the same events coming back.

``compare(RunConfig(..., ray="auto"))`` (CLI ``--ray auto``) starts a local Ray (or joins one that this
process or ``RAY_ADDRESS`` already names); ``ray="ray://host:10001"`` (or any address ``ray.init``
takes) joins a cluster. Ray is an optional extra: ``pip install '.[ray]'``.

* **Groups**: the runs are split into groups that train independently: for every seed, the runs
  that share one frozen base (:mod:`bora_lab.engine.shared`) form one group, and every other
  (method, seed) is a group of its own. Each group is one Ray task running the ordinary
  ``compare(cfg, cancel, only=group)`` on its worker, so every run gets the numbers it gets in
  process (same seeds, same initial model, same batches; tested to 1e-6).
* **Resources**: one GPU per group when the cluster has GPUs (and the device is auto or cuda), else
  ``num_cpus`` = the cluster's cores / groups (at most one node's cores), which also sets the
  worker's torch threads when ``num_threads`` is 0. No ``memory`` is reserved: a run's memory is
  not known before its model loads; a worker that runs out is reported as a lost worker (below).
* **Events**: workers put every event on a ``ray.util.queue.Queue``; this generator yields the same
  event objects live (the app's and the CLI's plots grow as in process). One ``ComparisonStarted``
  (the first group's, with the planned engine of every run and ``environment["ray"]``), one
  ``Progress`` per step over all groups, one ``ComparisonDone`` (the groups' weights merged).
  The caller folds them with the one accumulator and saves once, as in process.
* **Stop**: setting ``cancel`` sets a flag actor that every worker polls; a worker then finishes
  its step and reports its runs cancelled (with their trained tensors), as in process. Groups that
  have not started are cancelled with ``ray.cancel``; a worker still busy after ``GRACE_S`` is killed.
* **Faults**: a worker that dies (its process exits, its node goes, Ray's memory monitor kills it)
  is reported on each of its unfinished runs: ``RunError("worker lost at step N ...")`` and
  ``RunFinished(status="error")``. Its group is then retried once from the start (``RETRIES``); the
  retry's events that repeat what was already reported are dropped, so the curves carry on where
  they stopped and a retried run ends "done" with the loss noted in its ``error``. Finished runs
  are never redone; the other groups carry on. An exception in a worker's own code (a bad option,
  a model missing on that node) is not retried: it fails that group's runs with its message (or,
  before anything has started, raises ``ValueError`` as in process).

Test hook: ``BORA_LAB_RAY_FAULT="<run id>:<step>"`` makes the worker exit (``os._exit(1)``) when
that run reaches that step on its group's first attempt (``tests/test_distributed.py``).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..limits import on_space
from ..record.events import Cancelled, ComparisonDone, ComparisonStarted, Event, Progress, RunError, RunFinished
from . import dataparallel
from .plan import validate
from .shared import eligible

INSTALL = "pip install '.[ray]' (or pip install 'ray[default]')"
FAULT_ENV = "BORA_LAB_RAY_FAULT"
RETRIES = 1  # a group whose worker is lost is retried this many times from the start
GRACE_S = 60.0  # after Stop, a worker still busy this long is killed
POLL_S = 0.1  # how long the driver waits for a group to finish between reads of the queue

Key = tuple[str, int]  # (method, seed): what a group trains, whatever ranks the methods end up with


def import_ray():
    """The ``ray`` module, or ``ValueError`` saying how to install it."""
    try:
        import ray
        import ray.util.queue  # noqa: F401 - the event queue
    except ImportError as err:
        raise ValueError(f"ray is set but Ray is not installed: {INSTALL}") from err
    return ray


def groups(cfg: RunConfig) -> list[list[Key]]:
    """The groups of ``cfg``'s runs, each trained by one worker: per seed, the (method, seed) pairs
    whose runs share a frozen base (the rule of ``shared.build_group``), then one group per other pair."""
    plan, out = cfg.run_plan(), []
    for seed in cfg.run_seeds():
        specs = [(m, rid) for rid, m, _, s, _ in plan if s == seed]
        can = [] if (cfg.engine == "per_copy" or not cfg.lockstep or dataparallel.scaled(cfg)) else \
            [m for m, _ in specs if eligible(m) is None]
        if cfg.engine == "auto" and len(can) < 2:
            can = []
        sharing = list(dict.fromkeys(can))
        if sharing:
            out.append([(m, seed) for m in sharing])
        out.extend([(m, seed)] for m in dict.fromkeys(m for m, _ in specs) if m not in sharing)
    return out


def _connect(ray, address: str) -> dict[str, Any]:
    """Start or join Ray (once per process); returns what ``environment["ray"]`` records."""
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray.init(**kw) if address == "auto" else ray.init(address=address, **kw)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": address, "nodes": len(nodes), "cluster": {k: v for k, v in ray.cluster_resources().items()
                                                                 if k in ("CPU", "GPU", "memory")}}


def _resources(ray, cfg: RunConfig, n_groups: int) -> dict[str, float]:
    """``num_cpus`` / ``num_gpus`` of one group's task (see the module docstring).

    Raises:
        ValueError: device cuda on a cluster without GPUs.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = [n.get("CPU", 0) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if cfg.device in ("auto", "cuda") and gpus >= 1:
        per_node = max(n.get("GPU", 0) for n in nodes)
        return {"num_gpus": 1, "num_cpus": max(1, int(min(cpus) // max(1, per_node)))}
    if cfg.device == "cuda":
        raise ValueError("device cuda: the Ray cluster has no GPU; choose device auto or cpu")
    return {"num_cpus": max(1, min(int(min(cpus)), int(sum(cpus)) // max(1, n_groups)))}


def _work(compare: Callable, cfg: RunConfig, keys: list[Key], queue: Any, flag: Any, index: int, attempt: int,
          threads: int, fault: str | None) -> None:
    """One group on a Ray worker: ``compare(cfg, cancel, only=keys)``, every event onto ``queue``.

    ``compare`` comes as an argument (Ray pickles it by reference) so that this module does not
    import the trainer that imports it.
    """
    import ray

    if threads and not cfg.num_threads and not (cfg.device in ("auto", "cuda") and ray.get_gpu_ids()):
        cfg = dataclasses.replace(cfg, num_threads=threads)  # the group's cores, not an idle-core guess
    cancel, done = threading.Event(), threading.Event()

    def watch():  # Stop: the driver sets the flag actor
        while not done.wait(0.5):
            if ray.get(flag.is_set.remote()):
                cancel.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    run_id, _, at = (fault or "").rpartition(":")
    try:
        for ev in compare(cfg, cancel, only=keys):
            if attempt == 0 and ev.kind == "step" and ev.run_id == run_id and str(ev.step) == at:
                os._exit(1)  # test hook: this worker dies mid-run
            queue.put((index, attempt, ev))
    finally:
        done.set()


class _Flag:
    """The Stop flag every worker polls (a Ray actor)."""

    def __init__(self):
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


@dataclass
class _Group:
    index: int
    keys: list[Key]
    attempt: int = 0
    seen: bool = False  # an event of this attempt arrived: the worker is training
    skip: dict[str, int] = field(default_factory=dict)  # run id -> events of a retry already reported
    tick_skipped: bool = False  # the last run event was a repeat: so is the Progress after it


class _Merge:
    """Turns the groups' event streams into one comparison's stream (see the module docstring)."""

    def __init__(self, cfg: RunConfig, info: dict[str, Any], n_groups: int):
        self.cfg, self.run_cfg, self.info = cfg, cfg, info
        self.started = False
        self.emitted: dict[str, int] = {}  # run id -> its events yielded so far
        self.last_step: dict[str, int] = {}
        self.finished: set[str] = set()
        self.done, self.total = 0, len(cfg.run_plan()) * cfg.steps
        self.t0, self.weights = time.perf_counter(), {}
        info["groups"] = n_groups

    def runs(self, group: _Group) -> list[str]:
        keys = set(group.keys)
        return [rid for rid, m, _, s, _ in self.run_cfg.run_plan() if (m, s) in keys]

    def _planned_engines(self) -> dict[str, str]:
        shared = {k for g in groups(self.run_cfg) if len(g) > 1 for k in g}
        return {rid: "shared" if (m, s) in shared else (eligible(m) or "its own group: per-copy")
                for rid, m, _, s, _ in self.run_cfg.run_plan()}

    def start(self, ev: ComparisonStarted | None = None) -> Iterator[Event]:
        """The comparison's one ``ComparisonStarted``: the first group's, else (nothing started) a bare one."""
        if self.started:
            return
        self.started, self.t0 = True, time.perf_counter()
        if ev is None:
            yield ComparisonStarted({}, "ray", None, self.cfg.lockstep, None, "on Ray workers",
                                    {"ray": self.info}, self._planned_engines(), config=self.cfg.to_dict())
            return
        config = {**(ev.config or {}), "ray": self.cfg.ray, "num_threads": self.cfg.num_threads}
        self.run_cfg = dataclasses.replace(self.cfg, method_ranks=config.get("method_ranks") or {})
        each = ", ".join(f"{v:g} {k.removeprefix('num_').upper().rstrip('S')}" for k, v in self.info.get("per_group", {}).items())
        yield dataclasses.replace(
            ev, threads_reason=f"{ev.threads_reason}; Ray: {self.info['groups']} groups, each {each}",
            environment={**ev.environment, "ray": self.info}, engines={**self._planned_engines(), **ev.engines},
            config=config)

    def take(self, group: _Group, ev: Event) -> Iterator[Event]:
        """Yield what ``ev`` (from ``group``'s worker) adds to the comparison's stream."""
        group.seen = True
        if ev.kind == "comparison_started":
            yield from self.start(ev)
        elif ev.kind == "progress":
            if not group.tick_skipped:
                self.done += 1
                elapsed = time.perf_counter() - self.t0
                yield Progress(self.done, self.total, elapsed, elapsed / self.done * max(0, self.total - self.done))
        elif ev.kind == "comparison_done":
            self.weights.update(ev.weights)
        elif ev.kind != "cancelled":  # the comparison's one Cancelled comes at the end
            rid = getattr(ev, "run_id", None)
            if group.skip.get(rid, 0) > 0:  # a retry repeating what was reported
                group.skip[rid] -= 1
                group.tick_skipped = True
                return
            group.tick_skipped = False
            if rid is not None:
                self.emitted[rid] = self.emitted.get(rid, 0) + 1
            if ev.kind == "step":
                self.last_step[rid] = ev.step
            elif ev.kind == "error":
                self.total -= self.cfg.steps - self.last_step.get(rid, 0)
            elif ev.kind == "run_finished":
                self.finished.add(rid)
            yield ev

    def end_runs(self, group: _Group, status: str, message: Callable[[int], str] | None = None,
                 final: bool = True) -> Iterator[Event]:
        """``RunError(message(step the run was on))`` and ``RunFinished(status)`` for the group's
        unfinished runs; with ``final`` False (a retry follows) they stay unfinished."""
        yield from self.start()
        for rid in self.runs(group):
            if rid in self.finished:
                continue
            if message is not None:
                yield RunError(rid, message(self.last_step.get(rid, 0) + 1), status="error")
            yield RunFinished(rid, status)
            if final:
                self.finished.add(rid)
                if status != "cancelled":
                    self.total -= self.cfg.steps - self.last_step.get(rid, 0)

    def retry(self, group: _Group) -> None:
        """Set ``group`` up for its next attempt: only its unfinished pairs, repeats dropped."""
        left = {(m, s) for rid, m, _, s, _ in self.run_cfg.run_plan() if rid not in self.finished}
        group.keys = [k for k in group.keys if k in left]
        group.attempt += 1
        group.seen, group.tick_skipped = False, False
        group.skip = {rid: self.emitted.get(rid, 0) for rid in self.runs(group)}


def compare_on_ray(cfg: RunConfig, cancel: threading.Event | None, compare: Callable) -> Iterator[Event]:
    """``compare(cfg)`` with its groups on Ray workers; yields the in-process events (module docstring).

    Args:
        cfg: the comparison (``cfg.ray``: ``"auto"`` or an address).
        cancel: the Stop flag.
        compare: the in-process ``trainer.compare``, which every worker runs on its group.

    Raises:
        ValueError: Ray is missing, a problem with the whole comparison, or this is a public Space.
    """
    validate(cfg)
    if on_space() and os.environ.get("BORA_LAB_ALLOW_RAY", "").strip().lower() not in ("1", "true", "yes", "on"):
        raise ValueError("ray is off on a public Space (the operator may set BORA_LAB_ALLOW_RAY=1)")
    ray = import_ray()
    keys = groups(cfg)
    info = _connect(ray, cfg.ray)
    per = _resources(ray, cfg, len(keys))
    info["per_group"] = per
    queue = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    flag = ray.remote(num_cpus=0)(_Flag).remote()
    task = ray.remote(_work).options(max_retries=0, **per)
    worker_cfg = dataclasses.replace(cfg, ray=None)
    fault, threads = os.environ.get(FAULT_ENV), int(per["num_cpus"])
    merge, by_index = _Merge(cfg, info, len(keys)), [_Group(i, k) for i, k in enumerate(keys)]

    def submit(g: _Group):
        return task.remote(compare, worker_cfg, g.keys, queue, flag, g.index, g.attempt, threads, fault)

    def drain() -> Iterator[Event]:  # every event already put (puts are synchronous)
        n = queue.qsize()
        for index, attempt, ev in queue.get_nowait_batch(n) if n else []:
            g = by_index[index]
            if attempt == g.attempt:  # not a late event of a lost attempt
                yield from merge.take(g, ev)

    pending = {submit(g): g for g in by_index}
    stopping, forced = None, False
    try:
        while pending:
            yield from drain()
            if cancel is not None and cancel.is_set() and stopping is None:
                stopping = time.monotonic()
                flag.set.remote()
                for ref, g in pending.items():
                    if not g.seen:  # queued or loading: nothing to keep
                        ray.cancel(ref)
            if stopping is not None and not forced and time.monotonic() - stopping > GRACE_S:
                forced = True
                for ref in pending:
                    ray.cancel(ref, force=True)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                g = pending.pop(ref)
                yield from drain()
                outcome, err = _outcome(ray, ref)
                if stopping is not None or outcome in ("ok", "cancelled"):
                    yield from merge.end_runs(g, "cancelled" if stopping is not None else "error",
                                              None if stopping is not None else lambda n: "its worker ended without it")
                elif outcome == "error":
                    if not merge.started and isinstance(err, ValueError):
                        raise ValueError(str(err))  # a problem with the whole comparison, as in process
                    yield from merge.end_runs(g, "error", lambda n: f"{err} (on its Ray worker)")
                else:  # lost
                    again = g.attempt < RETRIES
                    then = "; retrying its group from the start" if again else "; no retry left"
                    yield from merge.end_runs(g, "error", lambda n: f"worker lost at step {n} "
                                              f"({type(err).__name__}){then}", final=not again)
                    if again:
                        merge.retry(g)
                        pending[submit(g)] = g
        yield from drain()
        yield from merge.start()
        if stopping is not None:
            yield Cancelled("cancelled by the user; results so far are kept")
        yield ComparisonDone("cancelled" if stopping is not None else "done", time.perf_counter() - merge.t0,
                             weights=merge.weights)
    finally:
        flag.set.remote()  # a closed generator (the app's Stop, an error) stops every worker
        for ref in pending:
            ray.cancel(ref, force=True)
        for actor in (flag, queue.actor):
            ray.kill(actor)


def _outcome(ray, ref) -> tuple[str, BaseException | None]:
    """``("ok" | "cancelled" | "error" | "lost", exception)`` of a finished group task."""
    try:
        ray.get(ref)
        return "ok", None
    except ray.exceptions.TaskCancelledError as err:
        return "cancelled", err
    except ray.exceptions.RayTaskError as err:  # the worker's own code raised
        return "error", getattr(err, "cause", None) or err
    except ray.exceptions.RayError as err:  # the worker process or its node is gone
        return "lost", err
