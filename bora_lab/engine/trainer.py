"""The headless trainer: one loop for every method, several runs side by side, events out.

    from bora_lab.config import RunConfig
    from bora_lab.engine.trainer import compare, run
    for event in compare(RunConfig(methods=["lora", "dora", "bora"])):
        print(event.kind)
    results = run(RunConfig(task="synthetic_col", methods=["lora", "bora"]), out_dir="runs/demo")

Guarantees: every run gets the same seed, the same initial model and head (deep copies of one
pristine model), the same adapter initialisation, the same batches in the same order and its own
identical dropout RNG stream. Runs advance in lockstep (round-robin, one step each) so all curves
grow together; when the copies would not fit in memory (or ``cfg.lockstep`` is False) they run one
after another, which gives the same numbers.

Threads (CPU): ``cfg.num_threads`` if set; else the pipeline's choice (the synthetic tasks use one
thread: their 64x48 matmuls run several times faster than on two); else torch's default, lowered to
the cores that other processes leave idle now (:mod:`bora_lab.engine.threads`: a 0.25 s sample of
``/proc/stat`` minus this process's own CPU time). The count and the reason travel in
``ComparisonStarted``; the previous count is restored when the generator finishes or is closed.

Errors: config problems that concern the whole comparison (unknown task, method, option or
model, analysis module not found, device unavailable) raise ``ValueError`` with one line before any
training. Per-run problems (a rank too large, NaN loss, out of memory) yield ``RunError`` for that
run and the other runs go on. Cancellation (``cancel.set()``) is checked between steps.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import methods
from ..config import RunConfig
from ..record.events import (
    AdapterState,
    Analysis,
    Cancelled,
    ComparisonDone,
    ComparisonStarted,
    Eval,
    Event,
    LayerCheckpoint,
    Progress,
    RunError,
    RunFinished,
    RunStarted,
    Step,
)
from . import dataparallel
from .environment import environment
from .pipeline import Pipeline
from ..record import ResultsAccumulator, save_results
from .plan import analysis_module_for, checkpoint_steps, cpu_threads, fits_side_by_side, make_pipeline, validate
from .shared import build_group
from .runstate import PEAK_MEM_KIND, NonFiniteLoss, RunState, describe_error, pick_device
from .tasks import load_task

__all__ = ["checkpoint_steps", "compare", "make_pipeline", "run", "validate"]  # the last three: from .plan

_TICK = object()  # a run generator yields this after each optimizer step
_READY = object()  # ... and a shared-base run this before its first step (see _schedule)


@dataclass
class _Seed:
    """What the runs of one seed share: the config with that seed, the pipeline (model with its head
    initialised, batch order), and the shared-base group of its layer-level runs (or None)."""

    cfg: RunConfig
    pipeline: Pipeline
    group: Any = None


@dataclass
class _Context:
    cfg: RunConfig
    pipeline: Pipeline  # the first seed's (task info, analysis module)
    device: torch.device
    task_info: dict[str, Any]
    analysis_module: str | None
    lockstep: bool
    total_steps: int
    engines: dict[str, str] = field(default_factory=dict)  # run id -> "shared" or why per-copy
    units: dict[int, _Seed] = field(default_factory=dict)  # seed -> its config, pipeline and shared group
    seed_of: dict[str, int] = field(default_factory=dict)  # run id -> seed
    lr_of: dict[str, float] = field(default_factory=dict)  # run id -> learning rate
    done_steps: int = 0
    t0: float = field(default_factory=time.perf_counter)
    states: dict[str, RunState] = field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    def unit(self, run_id: str) -> _Seed:
        return self.units[self.seed_of[run_id]]


def compare(cfg: RunConfig, cancel: threading.Event | None = None,
            only: Collection[tuple[str, int]] | None = None) -> Iterator[Event]:
    """Train every (method, rank) run of ``cfg`` side by side and yield events.

    Yields, per run: ``RunStarted`` (or ``RunError`` if the method cannot be applied), ``Step``
    after every optimizer step, ``Analysis`` at step 0, every ``analyze_every`` steps and at the
    end (layer-level methods only), ``Eval`` every ``eval_every`` steps and at the end, and
    ``RunFinished`` with its status; ``LayerCheckpoint`` after the ``Analysis`` of the steps of
    :func:`checkpoint_steps`; a ``Progress`` after every step of every run. First comes
    ``ComparisonStarted`` (task, device, threads, environment), last ``ComparisonDone``. On cancel:
    each unfinished run's ``RunFinished`` (status "cancelled"), then ``Cancelled``, then
    ``ComparisonDone``. The engine keeps no results: fold the events with
    ``bora_lab.record.ResultsAccumulator`` (as :func:`run` does).

    Args:
        cfg: the comparison.
        cancel: set it (from any thread) to stop between steps, keeping everything computed so far.
        only: train only the runs of these ``(method, seed)`` pairs (a Ray worker's group).

    With ``cfg.ray`` the runs train on Ray workers (:mod:`bora_lab.engine.distributed`) and the same
    events come back; under ``accelerate launch`` each run trains data-parallel
    (:mod:`bora_lab.engine.dataparallel`).

    Raises:
        ValueError: a problem with the whole comparison (see the module docstring).
    """
    if cfg.ray:
        from .distributed import compare_on_ray

        yield from compare_on_ray(cfg, cancel, compare)
        return
    validate(cfg)
    device = pick_device(cfg.device)
    cfg = dataparallel.adjust(cfg, device)
    mine = (lambda plan: plan) if only is None else (lambda plan: [p for p in plan if (p[1], p[3]) in set(only)])
    plan = mine(cfg.run_plan())
    task = load_task(cfg)
    units, engines, matched = {}, {}, None
    for seed in dict.fromkeys(s for *_, s, _ in plan):
        cfg_s = dataclasses.replace(cfg, seed=seed, seeds=None)
        pipeline = make_pipeline(cfg_s, task, eval_seed=cfg.seed)
        if not units:
            analysis_module = analysis_module_for(cfg, pipeline)
            if cfg.match_params:  # equal budgets: each method's ranks, from the model's shapes
                matched = methods.matching.match_ranks(pipeline.pristine(), cfg.methods, cfg.match_params, cfg.ranks,
                                                       cfg.alpha, cfg.target_modules, cfg.method_options)
                cfg = dataclasses.replace(cfg, method_ranks=matched["ranks"])
                plan = mine(cfg.run_plan())
        if matched:
            cfg_s = dataclasses.replace(cfg, seed=seed, seeds=None)
        specs = [(rid, m, r, lr) for rid, m, r, s, lr in plan if s == seed]
        group, reasons = build_group(cfg_s, pipeline, device, analysis_module, specs)
        units[seed], engines = _Seed(cfg_s, pipeline, group), {**engines, **reasons}
    pipeline = next(iter(units.values())).pipeline
    groups = sum(u.group is not None for u in units.values())
    copies = sum(e != "shared" for e in engines.values()) + groups
    lockstep = cfg.lockstep and (copies <= 1 or fits_side_by_side(pipeline.pristine(), copies, device))
    ctx = _Context(cfg, pipeline, device, pipeline.info(), analysis_module, lockstep or groups > 0,
                   total_steps=len(plan) * cfg.steps, engines={rid: engines[rid] for rid, *_ in plan},
                   units=units, seed_of={rid: s for rid, _, _, s, _ in plan},
                   lr_of={rid: lr for rid, *_, lr in plan})
    alive = {rid: _drive(ctx, rid, m, r) for rid, m, r, *_ in plan}
    threads = torch.get_num_threads()
    num_threads, reason = None, f"{device.type}: torch CPU threads do not apply"
    if device.type == "cpu":
        num_threads, reason = cpu_threads(cfg, pipeline)
        torch.set_num_threads(num_threads)
    try:
        yield ComparisonStarted(ctx.task_info, str(device), PEAK_MEM_KIND.get(device.type, "process_peak_rss"),
                                ctx.lockstep, num_threads, reason, environment(device, num_threads), ctx.engines,
                                config=cfg.to_dict(), matched=matched)
        ctx.t0 = time.perf_counter()
        yield from _schedule(ctx, alive, cancel)
    finally:
        torch.set_num_threads(threads)


def _schedule(ctx: _Context, alive: dict[str, Iterator], cancel: threading.Event | None) -> Iterator[Event]:
    """Advance the runs (round-robin in lockstep, else one after another) until done or cancelled."""
    for rid in [r for r in alive if ctx.engines.get(r) == "shared"]:  # step 0 of every shared run before
        for ev in alive[rid]:                                          # the group's first step moves them all
            if ev is _READY:
                break
            yield ev
        else:
            del alive[rid]
    while alive:
        for rid in list(alive) if ctx.lockstep else [next(iter(alive))]:
            if cancel is not None and cancel.is_set():
                yield from _cancel(ctx, alive)
                return
            for ev in alive[rid]:  # advance this run by one step
                if ev is _TICK:
                    ctx.done_steps += 1
                    elapsed = time.perf_counter() - ctx.t0
                    eta = elapsed / ctx.done_steps * max(0, ctx.total_steps - ctx.done_steps)
                    yield Progress(ctx.done_steps, ctx.total_steps, elapsed, eta)
                    break
                yield ev
            else:  # the run's generator is exhausted
                del alive[rid]
    yield ComparisonDone("done", time.perf_counter() - ctx.t0, weights=ctx.weights)


def _cancel(ctx: _Context, alive: dict[str, Iterator]) -> Iterator[Event]:
    for rid in alive:  # steps the shared group already took but its runs have not reported yet
        pending = ctx.unit(rid).group.pending(rid) if ctx.engines.get(rid) == "shared" else None
        if pending is not None:
            yield Step(rid, pending[0], *pending[1])
    for rid, gen in alive.items():
        state = ctx.states.get(rid)
        if ctx.cfg.export_weights and state is not None:
            ctx.weights.setdefault(rid, {})["end"] = state.weights()
        if state is not None:
            yield _adapter_event(rid, state)
        gen.close()  # runs the generator's cleanup (frees the model)
        yield RunFinished(rid, "cancelled")
    yield Cancelled("cancelled by the user; results so far are kept")
    yield ComparisonDone("cancelled", time.perf_counter() - ctx.t0, weights=ctx.weights)


def _adapter_event(run_id: str, state: RunState) -> AdapterState:
    tensors, reason = state.adapter_state()
    return AdapterState(run_id, state.steps_done, tensors, dict(getattr(state.model, "bora_lab_config", {})), reason)


def _drive(ctx: _Context, run_id: str, method: str, rank: int) -> Iterator[Any]:
    """One run as a generator of events, pausing (``_TICK``) after every optimizer step."""
    unit, step = ctx.unit(run_id), 0
    cfg, group, pipeline = unit.cfg, unit.group, unit.pipeline
    shared = ctx.engines.get(run_id) == "shared"
    try:
        if shared and run_id in group.errors:
            raise group.errors[run_id]
        state = (group.states[run_id] if shared else
                 RunState(run_id, method, rank, cfg, pipeline, ctx.device, ctx.analysis_module, lr=ctx.lr_of[run_id]))
        train_step = None if shared else dataparallel.step_fn(state, cfg)  # state.train_step, or data parallel
    except Exception as err:  # noqa: BLE001 - a bad rank/option fails this run only
        message, status = describe_error(err)
        ctx.total_steps -= cfg.steps
        yield RunError(run_id, message, status=status)
        yield RunFinished(run_id, status)
        return
    ctx.states[run_id] = state
    try:
        info = {"task": ctx.task_info, "trainable_pct": state.counts["percent"], "lockstep": ctx.lockstep,
                "adapter_params": state.counts["adapter"], "head_params": state.counts["head"],
                "magnitude_axis": state.info["magnitude_axis"], "target_modules": state.targets,
                "peak_mem_kind": PEAK_MEM_KIND.get(ctx.device.type, "process_peak_rss"),
                "engine": ctx.engines.get(run_id, "per-copy"), "seed": cfg.seed,
                "lr": ctx.lr_of[run_id]}
        yield RunStarted(run_id, method, rank, state.counts["trainable"], state.counts["total"], str(ctx.device),
                         [n for n, _ in state.analysed], info=info)
        ckpt_steps = checkpoint_steps(cfg) if state.analysed else set()
        ckpt_modules = state.layer_modules(len(ckpt_steps))

        def layer_checkpoint(at: int) -> LayerCheckpoint:
            deltas, info, w0, cost = state.layer_checkpoint(ckpt_modules)
            return LayerCheckpoint(run_id, at, deltas, info, w0=w0, cost_s=cost)

        if state.analysed:
            snap, cost = state.snapshot(0)
            yield Analysis(run_id, 0, snap, cost_s=cost)
            if 0 in ckpt_steps:
                yield layer_checkpoint(0)
            if cfg.export_weights:
                ctx.weights[run_id] = {"start": state.weights()}
        if shared:
            yield _READY
        for step, batch in enumerate(pipeline.train_batches, start=1):
            loss, lr, step_s, peak = (group.result(run_id, step, batch) if shared
                                      else train_step(step, batch))
            yield Step(run_id, step, loss, lr, step_s, peak)
            last = step == cfg.steps
            if state.analysed and (step % cfg.analyze_every == 0 or last):
                snap, cost = state.snapshot(step)
                yield Analysis(run_id, step, snap, cost_s=cost)
                if step in ckpt_steps:
                    yield layer_checkpoint(step)
            if step % cfg.eval_every == 0 or last:  # every example's score: paired comparisons
                metrics, examples = state.evaluate(per_example=True)
                val = state.evaluate(split="val") if pipeline.has_validation else None
                yield Eval(run_id, step, metrics, per_example=examples, val_metrics=val)
            yield _TICK
        if cfg.export_weights and state.analysed:
            ctx.weights.setdefault(run_id, {})["end"] = state.weights()
        yield _adapter_event(run_id, state)
        yield RunFinished(run_id, "done")
    except Exception as err:  # noqa: BLE001 - NaN, OOM or a method bug stops this run only
        message, status = describe_error(err, step=None if isinstance(err, NonFiniteLoss) else step)
        ctx.total_steps -= cfg.steps - max(step - 1, 0)  # this step's tick never came
        yield RunError(run_id, message, status=status)
        yield RunFinished(run_id, status)
    finally:
        ctx.states.pop(run_id, None)
        if shared:
            group.drop(run_id)
        state.close()


def run(cfg: RunConfig, cancel: threading.Event | None = None, on_event: Callable[[Event], None] | None = None,
        out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run :func:`compare` to the end and return the results dict (what ``results.json`` holds).

    Args:
        cfg: the comparison.
        cancel: optional cancel flag (see :func:`compare`).
        on_event: called with every event (e.g. to print progress).
        out_dir: if given, ``bora_lab.record.save_results`` writes results.json, steps.csv, config.json,
            the layer checkpoints (``layers/``) and (with ``cfg.export_weights``) the
            weights there.
    """
    acc, weights = ResultsAccumulator(cfg), {}
    for ev in compare(cfg, cancel):
        acc.update(ev)
        if on_event is not None:
            on_event(ev)
        if isinstance(ev, ComparisonDone):
            weights = ev.weights
    if out_dir is not None:
        save_results(acc.results, out_dir, weights=weights, layers=acc.layers, adapters=acc.adapters)
    return acc.results
