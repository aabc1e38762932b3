"""A run bigger than one device: data parallelism, gradient accumulation, gradient checkpointing.

Launched by ``accelerate launch`` (or ``torchrun``), every process trains every run of the
comparison; each step's batch (``cfg.batch_size`` examples, the *global* batch) is cut into
``world size × cfg.grad_accum`` equal micro-batches, process ``r`` takes its ``grad_accum`` of them,
and one all-reduce per step sums the gradients (and the loss) of all micro-batches before each
process divides by their number and takes the same optimizer step. So one process with
``grad_accum = k`` and ``k`` processes with ``grad_accum = 1`` compute the same micro-batches with
the same dropout masks (micro-batch ``g`` of step ``s`` draws from a stream seeded by
``(seed, s, g)``) and the same sums, and give the same numbers (tested). Against one process on the
whole batch the losses differ by float rounding (no dropout) or by which dropout masks are drawn.

* The process group starts from the launcher's environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on GPUs (one per process), gloo on CPUs.
* These runs take the per-copy path (the shared-base engine batches several runs into one forward);
  under a launcher they also run one after another, so that every process steps the same run at
  the same time (the all-reduces pair up).
* Every process evaluates on the whole eval set (the same numbers everywhere); only rank 0 saves
  (see :mod:`bora_lab.engine.launch`).
* With ``grad_accum == 1`` and one process the runs keep :meth:`RunState.train_step`: nothing
  changes for a plain comparison.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import torch

from ..config import RunConfig
from .pipeline import to_device
from .runstate import RunState, autocast, peak_memory_mb

StepFn = Callable[[int, dict], tuple[float, float, float, float]]


def world_size() -> int:
    """The number of processes training together: the process group's, else the launcher's ``WORLD_SIZE``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def start(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``; under a launcher, joins the process group first (once).

    Raises:
        ValueError: launched on several processes but torch has no ``torch.distributed``.
    """
    size = world_size()
    dist = torch.distributed
    if size == 1 or dist.is_initialized():
        return rank(), size
    if not dist.is_available():
        raise ValueError("launched on several processes, but this torch build has no torch.distributed")
    if device.type == "cuda":  # "cuda" then means this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def scaled(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s runs train with :func:`scaled_step` (several processes or micro-batches) or
    gradient checkpointing."""
    return world_size() > 1 or cfg.grad_accum > 1 or cfg.grad_checkpointing


def check(cfg: RunConfig) -> None:
    """Check the settings against the launch (no loading).

    Raises:
        ValueError: the batch does not split evenly, or the shared engine was asked for.
    """
    if not scaled(cfg):
        return
    parts, size = world_size() * cfg.grad_accum, world_size()
    if cfg.batch_size % parts:
        raise ValueError(f"batch_size {cfg.batch_size} does not split into {parts} equal micro-batches "
                         f"({size} process(es) x grad_accum {cfg.grad_accum}): choose a multiple of {parts}")
    if cfg.engine == "shared":
        raise ValueError("engine shared batches several runs into one forward; with grad_accum, gradient "
                         "checkpointing or several processes choose engine auto or per_copy")
    if size > 1 and cfg.ray:
        raise ValueError("ray spreads runs over workers, `accelerate launch` spreads one run over processes: "
                         "choose one")


def adjust(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``cfg`` as these runs train it (per copy; one run after another under a launcher), after joining
    the process group (see :func:`start`)."""
    if not scaled(cfg):
        return cfg
    _, size = start(device)
    return dataclasses.replace(cfg, engine="per_copy", lockstep=cfg.lockstep and size == 1)


def step_fn(state: RunState, cfg: RunConfig) -> StepFn:
    """The function that trains ``state`` one step: ``state.train_step``, or :func:`scaled_step`.

    Raises:
        ValueError: gradient checkpointing was asked for and this run cannot use it.
    """
    if cfg.grad_checkpointing:
        enable_checkpointing(state)
    if world_size() == 1 and cfg.grad_accum == 1:
        return state.train_step
    return functools.partial(scaled_step, state, accum=cfg.grad_accum)


def enable_checkpointing(state: RunState) -> None:
    """Hugging Face activation (gradient) checkpointing on the run's model, non-reentrant (the frozen
    base's inputs need no grad), after checking that it leaves the loss unchanged: it drops the
    key/value cache, which prefix tuning feeds the model.

    Raises:
        ValueError: the model has no checkpointing (e.g. the synthetic toy models), or it changes the loss.
    """
    model = state.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient checkpointing: {type(model).__name__} does not support it "
                         "(Hugging Face models do)")
    batch = to_device(next(iter(state.pipeline.train_batches)), state.device)

    def probe() -> torch.Tensor:  # the first batch's loss, same dropout masks every time; checkpointing
        with torch.random.fork_rng(devices=[state.device] if state.device.type == "cuda" else []):
            torch.manual_seed(0)  # only acts with gradients on: a forward with autograd, no backward
            with torch.enable_grad(), autocast(state.device):
                return state.pipeline.loss(model, batch).detach().float()

    before = probe()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not torch.allclose(before, probe(), rtol=1e-4, atol=1e-5):
        raise ValueError(f"gradient checkpointing changes what {state.method} computes (it drops the "
                         "key/value cache, e.g. prefix tuning's): train this method without it")


def micro_seed(seed: int, step: int, index: int) -> int:
    """The dropout seed of micro-batch ``index`` of ``step``: the same in any process layout."""
    return (seed * 1_000_003 + step * 4_099 + index) % 2**63


def scaled_step(state: RunState, step: int, batch: dict[str, torch.Tensor], accum: int = 1
                ) -> tuple[float, float, float, float]:
    """One optimizer step over this process's ``accum`` micro-batches of ``batch`` (the global batch).

    Each micro-batch's loss is backpropagated as it is (the gradients add up in ``.grad``); one
    all-reduce sums gradients and losses over the processes, then both are divided by the number of
    micro-batches: the gradient and loss of the mean over the batch (equal-sized micro-batches).
    The loss check and the optimizer step are :class:`RunState`'s own, on the same numbers in every
    process. Returns ``(loss, lr, step seconds, peak memory MiB)`` as ``RunState.train_step``.

    Raises:
        NonFiniteLoss: the mean loss is NaN/inf or diverged (in every process at once).
    """
    me, size = rank(), world_size()
    device, parts = state.device, size * accum
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lr = state.schedule.get_last_lr()[0]
    t0 = time.perf_counter()
    n = len(next(iter(batch.values())))
    micro = n // parts
    loss_sum = torch.zeros((), dtype=torch.float64)
    for j in range(accum):
        index = me * accum + j  # this micro-batch's place in the global batch
        part = to_device({k: v[index * micro:(index + 1) * micro] for k, v in batch.items()}, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(micro_seed(state.cfg.seed, step, index))
            with autocast(device):
                loss = state.pipeline.loss(state.model, part)
                total = loss + sum(m.regularization_loss() for m in state.reg_modules) if state.reg_modules else loss
            total.backward()
        loss_sum += loss.detach().double().cpu()
    value = _mean_over_micro_batches(state.params, loss_sum, parts, size)
    state.check_loss(step, value, lr)
    state.finish_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, lr, time.perf_counter() - t0, peak_memory_mb(device)


def _mean_over_micro_batches(params: list[torch.nn.Parameter], loss_sum: torch.Tensor, parts: int,
                             size: int) -> float:
    """Sum every parameter's gradient and the loss over the processes (one all-reduce per dtype),
    divide both by ``parts``; returns the mean loss."""
    if size > 1:  # a gradient unused here may be used in another process: every process sends all
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    if size > 1:
        dist = torch.distributed
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])  # one message per dtype
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        loss_sum = loss_sum.to(params[0].grad.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(loss_sum)
    for grads in by_dtype.values():
        for g in grads:
            g.div_(parts)
    return float(loss_sum) / parts
