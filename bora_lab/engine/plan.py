"""What a comparison needs before its first step: checks, pipelines, memory and threads.

Split from :mod:`bora_lab.engine.trainer` (which re-exports ``validate``, ``make_pipeline`` and
``checkpoint_steps``), so that the training loop stays one readable file.
"""
from __future__ import annotations

import importlib.util

import torch

from .. import methods
from ..config import RunConfig
from . import dataparallel
from .pipeline import Pipeline, TextPipeline
from .runstate import select_analysed
from .synthetic import SyntheticPipeline
from .tasks import TASKS, Task
from .threads import choose_threads


def validate(cfg: RunConfig) -> None:
    """Check what can be checked without loading anything (methods and their options).

    Raises:
        ValueError: one line naming the problem.
    """
    for m in cfg.methods:
        methods.registry.get(m)  # unknown method -> ValueError listing the valid names
    if cfg.match_params:
        methods.registry.get(cfg.match_params)
    if cfg.sweeps_lr() and not cfg.val_samples and not cfg.task.startswith("synthetic"):
        raise ValueError("a learning-rate sweep chooses each method's rate on a validation split: "
                         "set val_samples (e.g. 200)")
    for m in cfg.methods:
        opts = dict(cfg.method_options.get(m, {}))
        methods.registry.make_config(m, rank=cfg.ranks[0], alpha=cfg.alpha, **opts)
    if cfg.baseline:
        from ..record.aggregate import group_key

        keys = {group_key({"method": m, "rank": r}) for _, m, r in cfg.run_specs()}
        if cfg.baseline not in keys and cfg.baseline not in cfg.methods:
            raise ValueError(f"baseline {cfg.baseline!r} is not one of this comparison's methods or runs: "
                             f"{', '.join(sorted(keys))}")
    if len(set(cfg.run_ids())) != len(cfg.run_ids()):
        raise ValueError(f"duplicate runs in methods {cfg.methods} x ranks {cfg.ranks}")
    if (cfg.text_column or cfg.label_column) and cfg.task in TASKS:
        raise ValueError(f"text_column and label_column apply to a datasets id; task {cfg.task!r} is built in "
                         "(leave them empty)")
    if cfg.ray and importlib.util.find_spec("ray") is None:
        raise ValueError(f"ray={cfg.ray!r} needs Ray, which is not installed here: pip install '.[ray]' "
                         "(or pip install 'ray[default]')")
    dataparallel.check(cfg)


def make_pipeline(cfg: RunConfig, task: Task, eval_seed: int | None = None) -> Pipeline:
    """The pipeline for ``task`` (loads the model and tokenises the data); ``eval_seed`` picks the eval
    subset (default ``cfg.seed``), so that every seed of a comparison is evaluated on the same examples."""
    if task.kind == "synthetic":
        return SyntheticPipeline(cfg, task, eval_seed=eval_seed)
    return TextPipeline(cfg, task, eval_seed=eval_seed)


def fits_side_by_side(model: torch.nn.Module, n_runs: int, device: torch.device) -> bool:
    """Whether ``n_runs`` copies of ``model`` (plus optimizer state and activations) fit in memory."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    need = 1.5 * size * (n_runs + 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.7 * free
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return True
    return need < 0.7 * avail


def analysis_module_for(cfg: RunConfig, pipeline: Pipeline) -> str | None:
    """The module type to analyse: the user's, else the model's attention query (None = all layers).

    Raises:
        ValueError: the chosen module or layers do not exist in the model.
    """
    module = cfg.analysis_module or pipeline.default_analysis_module()
    if cfg.analysis_module or cfg.analysis_layers:
        select_analysed(pipeline.pristine(), module, cfg.analysis_layers)  # fail before training
    return module


def checkpoint_steps(cfg: RunConfig) -> set[int]:
    """Analysis steps whose weights are kept for "Inside a layer": step 0 and up to
    ``cfg.layer_checkpoints`` later ones, evenly spaced over the analysis steps, the last included."""
    if cfg.layer_checkpoints == 0:
        return set()
    snaps = sorted({0, cfg.steps, *range(cfg.analyze_every, cfg.steps + 1, cfg.analyze_every)})
    n = min(len(snaps), cfg.layer_checkpoints + 1)
    return {snaps[round(i * (len(snaps) - 1) / max(1, n - 1))] for i in range(n)}


def cpu_threads(cfg: RunConfig, pipeline: Pipeline) -> tuple[int, str]:
    """Torch CPU threads for training and why (see :mod:`bora_lab.engine.threads`)."""
    if cfg.num_threads:
        return cfg.num_threads, "set by num_threads"
    if pipeline.num_threads:
        return pipeline.num_threads, "the task's choice: its small matmuls run faster on one thread"
    return choose_threads(torch.get_num_threads())
