"""Synthetic weight recovery: which changes of ``W0`` can each method express?

A seeded random base (one ``Linear`` 64→48, or a 64→96→48 MLP with ``model="mlp"``) holds ``W0``.
A teacher holds ``W* = change(W0)`` for one of these changes (``tasks.synthetic_*``):

* ``row``: ``W* = diag(r) W0`` (a scale per output feature);
* ``col``: ``W* = W0 diag(c)`` (a scale per input feature);
* ``rank``: ``W* = W0 + U Vᵀ`` with ``U: [out, 4]``, ``V: [in, 4]``;
* ``mix``: all three, smaller.

The student is the base adapted by a method and trained with MSE to the teacher's outputs on
Gaussian inputs (``E||(W - W*)x||² = ||W - W*||_F²``, so the loss measures the weight error).
Eval reports ``recovery_error = ||W - W*||_F / ||W* - W0||_F`` over the adapted layers (1 = nothing
recovered, 0 = exact) and ``mse``. A column scaling is full-rank, so LoRA cannot express it at low
rank, nor can DoRA's per-row magnitude; DoRA's column variant, BoRA and full fine-tuning can.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from .pipeline import Pipeline
from .tasks import Task

D_IN, D_HIDDEN, D_OUT = 64, 96, 48
CHANGE_RANK = 4
SCALE_SPREAD = 0.4  # log-normal spread of the row/column scales
EVAL_SIZE = 1024


class ToyLinear(nn.Module):
    """One ``Linear`` layer named ``proj`` (``[out, in] = [48, 64]``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x: Tensor) -> Tensor:  # (B, in) -> (B, out)
        return self.proj(x)


class ToyMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with ``fc1: [96, 64]`` and ``fc2: [48, 96]``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, D_HIDDEN), nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def changed_weight(w0: Tensor, change: str, gen: torch.Generator) -> Tensor:
    """``W*`` for ``W0: [out, in]`` and a change ``row`` | ``col`` | ``rank`` | ``mix``."""
    out_f, in_f = w0.shape
    strength = 0.6 if change == "mix" else 1.0

    def scales(n: int) -> Tensor:
        return torch.exp(strength * SCALE_SPREAD * torch.randn(n, generator=gen))

    def low_rank() -> Tensor:  # a rank-k update with ||ΔW||_F = 0.5·strength·||W0||_F
        u, v = torch.randn(out_f, CHANGE_RANK, generator=gen), torch.randn(in_f, CHANGE_RANK, generator=gen)
        delta = u @ v.T
        return delta * (0.5 * strength * w0.norm() / delta.norm())

    if change == "row":
        return scales(out_f).unsqueeze(1) * w0
    if change == "col":
        return w0 * scales(in_f).unsqueeze(0)
    if change == "rank":
        return w0 + low_rank()
    if change == "mix":
        return scales(out_f).unsqueeze(1) * (w0 + low_rank()) * scales(in_f).unsqueeze(0)
    raise ValueError(f"unknown synthetic change {change!r}; choose row, col, rank or mix")


def layer_weight(module: nn.Module) -> Tensor:
    """The current dense ``[out, in]`` weight of a wrapped layer or a plain ``nn.Linear``."""
    if hasattr(module, "effective_weight"):
        return module.effective_weight()
    return module.weight


class SyntheticPipeline(Pipeline):
    """Student/teacher regression on Gaussian inputs; every run sees the same inputs."""

    num_threads = 1  # 64x48 matmuls: one thread is several times faster than two

    def __init__(self, cfg: RunConfig, task: Task, eval_seed: int | None = None):
        """``eval_seed`` is ignored: base, teacher and eval inputs are all drawn from ``cfg.seed``, so
        each seed is its own task (runs are paired on examples within a seed)."""
        self.cfg, self.task = cfg, task
        self.model_name = cfg.model if cfg.model in ("linear", "mlp") else "linear"
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.base = ToyMLP() if self.model_name == "mlp" else ToyLinear()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.teacher = copy.deepcopy(self.base)
        self.layers = [n for n, m in self.base.named_modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for name in self.layers:
                lin = self.teacher.get_submodule(name)
                lin.weight.copy_(changed_weight(lin.weight, task.change, gen))
        xs = torch.randn(cfg.steps, cfg.batch_size, D_IN, generator=gen)  # (steps, B, in)
        with torch.no_grad():
            ys = self.teacher(xs)
        self.train_batches = [{"x": x, "y": y} for x, y in zip(xs, ys)]
        self.eval_x = torch.randn(EVAL_SIZE, D_IN, generator=gen)
        with torch.no_grad():
            self.eval_y = self.teacher(self.eval_x)

    def pristine(self) -> nn.Module:
        return self.base

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(model(batch["x"]).float(), batch["y"])

    def losses(self, model: nn.Module, batch: dict[str, Tensor], n: int) -> list[Tensor]:
        pred = model(batch["x"]).float()
        return [F.mse_loss(p, y) for p, y in zip(pred.chunk(n), batch["y"].chunk(n))]

    def target(self, name: str) -> Tensor:
        """Teacher weight ``W*`` of layer ``name``."""
        return self.teacher.get_submodule(name).weight

    @torch.no_grad()
    def recovery_error(self, model: nn.Module) -> float:
        """``||W - W*||_F / ||W* - W0||_F`` over all layers (each layer's W from the adapted model)."""
        num = den = 0.0
        for name in self.layers:
            w = layer_weight(model.get_submodule(name)).float().cpu()
            w_star, w0 = self.target(name), self.base.get_submodule(name).weight
            num += float((w - w_star).square().sum())
            den += float((w_star - w0).square().sum())
        return (num / den) ** 0.5 if den > 0 else 0.0

    has_validation = False  # the weight-recovery tasks select nothing

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, per_example: bool = False, split: str = "test"):
        """Metrics; with ``per_example`` also each eval input's squared error (mean over outputs)."""
        pred = model(self.eval_x.to(device)).float().cpu()
        mse = float(F.mse_loss(pred, self.eval_y))
        try:
            rec = self.recovery_error(model)
        except (AttributeError, ValueError):  # a model-level method that replaced the layers
            rec = float("nan")
        metrics = {"recovery_error": rec, "mse": mse, "loss": mse}
        if not per_example:
            return metrics
        errors = (pred - self.eval_y).square().mean(1).tolist()
        return metrics, {"name": "squared_error", "values": errors, "higher_is_better": False}

    def info(self) -> dict[str, Any]:
        """Adds the teacher's own ΔM/ΔD from ``W0`` (what a perfect recovery would show)."""
        from ..analysis.weights import md_changes

        changes = {n: md_changes(self.target(n), self.base.get_submodule(n).weight) for n in self.layers}
        return {**self.task.info(), "model": self.model_name, "layers": self.layers, "target_changes": changes}
