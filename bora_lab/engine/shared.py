"""The shared-base engine: k runs of layer-level methods on one frozen base, one batched step.

The per-copy path deep-copies the whole model for every run and steps each copy in turn. Here:

* :class:`FrozenBase` holds one frozen alias of the pristine model (its tensors, no copies; on a
  GPU, one copy on the device). A run is built as before (deep copy, ``methods.apply`` under the
  seed, so the adapter initialisation is identical), then *rebased*: only the modules that differ
  from the pristine model (the wrapped target layers, the trained head) are kept; everything else
  is the shared frozen base. A wrapped layer whose frozen ``W0`` equals the base's points at the
  shared ``nn.Linear`` too, so k runs cost the base once plus k adapters, heads and optimizers.
* :class:`SharedGroup` steps every live run at once: the step's batch is repeated once per run
  (``[k·B, ...]``), one forward runs the frozen parts once on the whole batch and each run's own
  modules on its chunk (:class:`Router`), per-run losses come from the chunks, and one backward
  gives each run exactly its own gradients (the runs share no trainable tensor). Each run keeps
  its optimizer, schedule, gradient clipping, NaN/divergence check and dropout stream
  (:mod:`bora_lab.engine.streams`), so the numbers equal the per-copy path's within float rounding
  (tested for every layer method).

Model-level methods (full, full_model, bitfit, prompt, prefix, ptuning, adapter, head, features)
change the model around its layers, or train the base itself, so they keep the per-copy path
(:func:`eligible` says why for each run); one comparison may mix both.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import Tensor, nn

from .. import methods
from .pipeline import Pipeline, to_device
from .runstate import RunState, autocast, peak_memory_mb

ENGINE_CHOICES = ("auto", "shared", "per_copy")


def eligible(method: str) -> str | None:
    """None if ``method``'s runs can share the base, else why not (one line for people)."""
    info = methods.info(method)
    if info["kind"] != "layer":
        return f"{method} is a model-level method (it changes the model around its layers): per-copy path"
    return None


def runs_per_forward(device: torch.device, n_runs: int) -> int:
    """How many runs one batched forward holds (the rest follow in further forwards of the same step).

    On a GPU all of them: one large batch instead of k small ones is where the speed is. On a CPU
    training is compute-bound: measured on 2 cores (``benchmarks/engine.py``), one forward of 3 or 8
    runs is no faster than 3 or 8 forwards of one, while it holds every run's activations at once
    (8 MiniLM runs at batch 8 × 40 tokens: 1.2 GB). So one run per forward: the base is still held
    once, the step's memory is one run's activations.
    """
    return n_runs if device.type in ("cuda", "mps") else 1


def _alias(model: nn.Module) -> dict[int, Any]:
    """deepcopy memo that makes copies share ``model``'s parameters and buffers."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return memo


def _direct_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def _same(run_mod: nn.Module, base_mod: nn.Module | None) -> bool:
    """Whether ``run_mod`` (own tensors only) is the frozen ``base_mod``: same type, same frozen values."""
    if base_mod is None or type(run_mod) is not type(base_mod):
        return False
    mine, theirs = _direct_tensors(run_mod), _direct_tensors(base_mod)
    if mine.keys() != theirs.keys():
        return False
    for name, t in mine.items():
        other = theirs[name]
        if t is None or other is None:
            if t is not other:
                return False
        elif getattr(t, "requires_grad", False) or t.shape != other.shape or t.dtype != other.dtype \
                or not torch.equal(t, other):
            return False
    return True


class FrozenBase:
    """One frozen, shared copy of the pristine model on ``device``; builds the runs' views."""

    def __init__(self, pristine: nn.Module, device: torch.device):
        self.pristine = pristine
        memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in pristine.parameters()}
        memo.update({id(b): b for b in pristine.buffers()})
        self.model = copy.deepcopy(pristine, memo).to(device)  # on the CPU: aliases, no copy
        self.model.requires_grad_(False)
        self._names = dict(pristine.named_modules())
        self._frozen = dict(self.model.named_modules())

    def routing_points(self, run_model: nn.Module) -> list[str]:
        """The top-most modules of ``run_model`` that differ from the pristine model (see :func:`_same`)."""
        points: list[str] = []
        for name, module in run_model.named_modules():
            if any(name.startswith(p + ".") for p in points) or name == "":
                continue
            if not _same(module, self._names.get(name)):
                points.append(name)
        return points

    def rebase(self, run_model: nn.Module, device: torch.device) -> tuple[nn.Module, dict[str, nn.Module]]:
        """``(view, own)``: the run's model with every module but ``own`` (its routing points) shared."""
        own = {}
        for name in self.routing_points(run_model):
            module = run_model.get_submodule(name)
            base = getattr(module, "base", None)
            shared = self._frozen.get(name)
            if (isinstance(module, methods.AdapterLinear) and type(base) is nn.Linear
                    and _same(base, self._names.get(name))):
                module.base = shared  # the frozen W0 (and bias) of this layer, once for all runs
            own[name] = module.to(device)
        view = copy.deepcopy(self.model, _alias(self.model))
        for name, module in own.items():
            _set_module(view, name, module)
        for key, value in vars(run_model).items():  # plain attributes, e.g. bora_lab_config
            if not key.startswith("_") and key not in vars(view) and not isinstance(value, nn.Module):
                setattr(view, key, value)
        return view, own


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class Router(nn.Module):
    """At one routing point: chunk i of the batched input goes to live run i's own module."""

    def __init__(self, modules: list[nn.Module], active: list[int]):
        super().__init__()
        self.runs = nn.ModuleList(modules)
        self.active = active  # shared with the group: indices of the runs in this forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        n = len(self.active)
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        total = first.shape[0]

        def piece(v: Any, i: int) -> Any:
            return v.chunk(n)[i] if isinstance(v, Tensor) and v.dim() and v.shape[0] == total else v

        outs = [self.runs[r](*(piece(a, i) for a in args), **{k: piece(v, i) for k, v in kwargs.items()})
                for i, r in enumerate(self.active)]
        if isinstance(outs[0], Tensor):
            return torch.cat(outs)
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*outs))
        raise TypeError(f"cannot batch the output of {type(self.runs[0]).__name__} ({type(outs[0]).__name__})")


class SharedGroup:
    """The runs that share one frozen base; :meth:`step` trains all live runs by one step.

    Args:
        specs: ``(run_id, method, rank, lr)`` of the runs.
        cfg, pipeline, device, analysis_module: as for :class:`RunState`.

    A run that cannot be built (bad rank, option) is left out; its error is in ``errors``.
    """

    def __init__(self, specs, cfg, pipeline: Pipeline, device: torch.device, analysis_module: str | None):
        from .streams import replace_dropouts, use_stream_attention

        self.cfg, self.pipeline, self.device = cfg, pipeline, device
        self.frozen = FrozenBase(pipeline.pristine(), device)
        self.states: dict[str, RunState] = {}
        self.errors: dict[str, Exception] = {}
        owns: list[dict[str, nn.Module]] = []
        for run_id, method, rank, lr in specs:
            try:
                state = RunState(run_id, method, rank, cfg, pipeline, device, analysis_module, frozen=self.frozen, lr=lr)
            except Exception as err:  # noqa: BLE001 - this run fails alone, when it is driven
                self.errors[run_id] = err
                continue
            self.states[run_id] = state
            owns.append(state.own)
        self.order = list(self.states)
        self.live = list(range(len(self.order)))  # runs still training
        self.active: list[int] = []  # runs in the current forward (a slice of live)
        self.runs_per_forward = runs_per_forward(device, len(self.order))
        self.executor = copy.deepcopy(self.frozen.model, _alias(self.frozen.model))
        points = sorted({p for own in owns for p in own}, key=lambda p: (p.count("."), p))
        for point in points:  # a run without its own module there uses the shared one
            if any(point.startswith(q + ".") for q in points if q != point):
                raise ValueError(f"nested routing points at {point!r}")
            shared = self.executor.get_submodule(point)
            _set_module(self.executor, point, Router([own.get(point, shared) for own in owns], self.active))
        self.executor.train()
        replace_dropouts(self.executor)
        self.fallback_reason = use_stream_attention(self.executor) if len(self.order) else None
        self._results: dict[int, dict[str, Any]] = {}  # the latest group step's outcome per run
        self._taken: set[str] = set()  # runs that have reported it

    def drop(self, run_id: str) -> None:
        """Stop stepping ``run_id`` (finished, failed or cancelled)."""
        if run_id in self.order and self.order.index(run_id) in self.live:
            self.live.remove(self.order.index(run_id))

    def result(self, run_id: str, step: int, batch: dict[str, Tensor]) -> tuple[float, float, float, float]:
        """Run ``run_id``'s ``step``: the group steps all live runs the first time any of them asks.

        Raises:
            NonFiniteLoss / Diverged / any error of this run at this step (the others go on).
        """
        if step not in self._results:
            self._results, self._taken = {step: self._step(step, batch)}, set()
        self._taken.add(run_id)
        outcome = self._results[step][run_id]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def pending(self, run_id: str) -> tuple[int, tuple[float, float, float, float]] | None:
        """``(step, result)`` of a step the group took for ``run_id`` that the run has not reported yet
        (a cancel between two runs of one round), else None."""
        for step, outcomes in self._results.items():
            if run_id not in self._taken and isinstance(outcomes.get(run_id), tuple):
                return step, outcomes[run_id]
        return None

    def _streams(self, live: list[RunState]):
        from .streams import StreamPlan

        states: list[tuple[Tensor, Tensor | None]] = []
        chunk_stream = []
        for s in live:
            j = next((j for j, st in enumerate(states) if torch.equal(st[0], s._rng[0])
                      and (st[1] is None or torch.equal(st[1], s._rng[1]))), None)
            if j is None:
                states.append(s._rng)
                j = len(states) - 1
            chunk_stream.append(j)
        return StreamPlan(chunk_stream, states, self.device)

    def _step(self, step: int, batch: dict[str, Tensor]) -> dict[str, Any]:
        live = [self.states[self.order[i]] for i in self.live]
        n, out, healthy = len(live), {}, []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        batch = to_device(batch, self.device)
        lrs = {s.run_id: s.schedule.get_last_lr()[0] for s in live}
        size = self.runs_per_forward
        for part in (self.live[i:i + size] for i in range(0, n, size)):
            states = [self.states[self.order[i]] for i in part]
            self.active[:] = part
            big = {k: torch.cat([v] * len(part)) for k, v in batch.items()}
            try:
                healthy += self._forward_backward(step, states, big, self._streams(states),
                                                  [lrs[s.run_id] for s in states], out)
            except Exception:  # noqa: BLE001 - which run failed is unknown: step each run alone instead
                for s in states:
                    s.optimizer.zero_grad(set_to_none=True)
                out.update(self._one_by_one(step, batch, states))
        self.active[:] = []
        for s, value, lr in healthy:
            try:
                s.finish_step(step)
            except Exception as err:  # noqa: BLE001 - e.g. a method hook failing: this run only
                out[s.run_id] = err
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_s, peak = (time.perf_counter() - t0) / n, peak_memory_mb(self.device)
        for s, value, lr in healthy:
            out.setdefault(s.run_id, (value, lr, step_s, peak))
        for run_id in out:
            if isinstance(out[run_id], Exception):
                self.drop(run_id)
        return out

    def _forward_backward(self, step, live, big, plan, lrs, out) -> list[tuple[RunState, float, float]]:
        """The batched forward and one backward; NaN/diverged runs go to ``out`` and get no gradient."""
        from .streams import planned

        n = len(live)
        with planned(plan), autocast(self.device):
            losses = self.pipeline.losses(self.executor, big, n)
            regs = [sum(m.regularization_loss() for m in s.reg_modules) if s.reg_modules else 0.0 for s in live]
        total, healthy = 0.0, []
        for s, loss, reg, lr in zip(live, losses, regs, lrs):
            try:
                s.check_loss(step, float(loss.detach()), lr)
            except Exception as err:  # noqa: BLE001 - NaN or divergence stops this run alone
                out[s.run_id] = err
                continue
            total = total + loss + reg
            healthy.append((s, float(loss.detach()), lr))
        if healthy:
            total.backward()
        for s, chunk in zip(live, plan.chunk_stream):  # the streams advance only once the step has gone through
            s._rng = plan.states[chunk]
        return healthy

    def _one_by_one(self, step: int, batch: dict[str, Tensor], live: list[RunState]) -> dict[str, Any]:
        """Fallback when the batched step raised: each run steps alone (same numbers, per-run errors)."""
        out: dict[str, Any] = {}
        for s in live:
            try:
                out[s.run_id] = s.train_step(step, batch)
            except Exception as err:  # noqa: BLE001 - this run fails alone
                out[s.run_id] = err
                self.drop(s.run_id)
        return out


def build_group(cfg, pipeline: Pipeline, device: torch.device, analysis_module: str | None,
                specs: list[tuple[str, str, int, float]]):
    """``(group or None, {run id: "shared" or why it takes the per-copy path})`` for the runs ``specs`` of
    one seed: layer-level runs share the base when two or more can (or ``cfg.engine`` is ``shared``)."""
    reasons = {rid: eligible(m) for rid, m, *_ in specs}
    if cfg.engine == "per_copy":
        reasons = {rid: "engine per_copy was chosen" for rid in reasons}
    elif not cfg.lockstep:
        reasons = {rid: "lockstep is off: runs go one after another" for rid in reasons}
    chosen = [s for s in specs if reasons[s[0]] is None]
    if cfg.engine == "auto" and len(chosen) < 2:
        for rid, *_ in chosen:
            reasons[rid] = "the only run that could share the base: nothing to share"
        chosen = []
    group = SharedGroup(chosen, cfg, pipeline, device, analysis_module) if chosen else None
    if group is not None and group.fallback_reason:
        for rid, *_ in chosen:
            reasons[rid] = group.fallback_reason
        group = None
    return group, {rid: r or "shared" for rid, r in reasons.items()}
