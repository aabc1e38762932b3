"""Importance-based rank pruning shared by AdaLoRA and LoRA2 (AdaLoRA, arXiv:2303.10512, sec. 3).

Both methods write their update with a diagonal ``Λ = diag(λ)`` of trainable "singular values"
between two factors, and prune entries of ``λ`` whose triplet is unimportant:

* sensitivity of a tensor entry ``I = |p · ∂L/∂p|`` (AdaLoRA eq. 8), smoothed
  ``Ī ← β1 Ī + (1-β1) I`` (eq. 9) and its uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|`` (eq. 10);
  the entry's score is ``Ī · Ū`` (eq. 11);
* the score of triplet ``i`` is the score of ``λ_i`` plus the mean score of the factor entries tied
  to ``i`` (AdaLoRA eq. 7; LoRA2 eq. 9 applies it to its two small ``k×r`` factors);
* a cubic budget schedule (warm-up at the initial budget, cubic decrease, final phase at the
  target budget with the rank pattern frozen) decides how many triplets stay.

**Trainer contract.** After ``optimizer.step()`` and *before* ``optimizer.zero_grad()`` the trainer
calls ``module.after_step(step, total_steps)`` on every module that has it, where ``step`` is the
number of optimizer steps done so far (1 after the first step; 0-based counting also reaches the
target because the final phase always lasts at least one step) and ``total_steps`` the planned
number of optimizer steps of the run. The gradients still in ``.grad`` are read (never modified).
Before ``backward`` it adds ``module.regularization_loss()`` (a scalar tensor) of every module that
has it. :func:`update_and_allocate` and :func:`regularization_loss` do both for a whole model.

**Global allocation.** ``apply`` builds every wrapped layer with the *same* config object, so layers
that share a config form one allocation group: :func:`allocator_for` returns one
:class:`RankAllocator` per config object. The first ``after_step`` of a step updates and prunes the
whole group, later calls with the same ``step`` return at once. The allocator holds the layers
(deep copies of a model copy the group along with it).

**Mask styles** (``mask_style`` of the config; configs without that option, LoRA2's, use
``"forward"``). Both prune to the same budgets on the same steps (checked against PEFT 0.21.2's
``RankAllocator.budget_schedule`` in ``tests/test_fidelity_adalora_schedule.py``):

* ``"forward"`` (default): the mask multiplies ``λ`` in the forward, so a pruned triplet gets no
  gradient: its ``λ`` stays 0 and its importance only decays until an allocation re-selects it. The
  importance is updated on every step up to and including the one that freezes the pattern.
* ``"peft"``: Hugging Face PEFT 0.21.2 (``AdaLoraModel.update_and_allocate``) and the official
  AdaLoRA code, i.e. the paper's truncation ``Λ⁽ᵗ⁺¹⁾ = T(Λ̃⁽ᵗ⁾, S⁽ᵗ⁾)`` (AdaLoRA eq. 6) of the
  gradient-updated ``Λ̃``: ``λ`` enters the forward as is and pruned entries are zeroed in place
  after the optimizer step, at every allocation of the pruning phase (every ``mask_interval``
  steps) and on every step of the final phase. A pruned ``λ`` keeps its gradient, so its
  sensitivity stays live and between two allocations (``mask_interval > 1``) it regrows. The
  importance is last updated on the step before the final phase (PEFT: ``global_step <
  total_step - tfinal``), and the allocation prunes every triplet whose score is ``<=`` the
  ``(n - budget)``-th smallest score (``torch.kthvalue``), so ties at the threshold are all pruned
  (``"forward"`` keeps exactly ``budget`` triplets, ``torch.topk``).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterConfig

MASK_STYLES = ("forward", "peft")


@dataclass
class BudgetConfig(AdapterConfig):
    """Options of the rank-pruning methods (AdaLoRA, LoRA2)."""

    target_rank: int = field(default=4, metadata={
        "help": "average rank per layer left at the end (clamped to the initial rank)", "min": 0})
    allocation: str = field(default="global", metadata={
        "help": "global: one budget shared by all layers (AdaLoRA); per_layer: every layer keeps target_rank",
        "choices": ["global", "per_layer"]})
    warmup_frac: float = field(default=0.1, metadata={
        "help": "fraction of the steps trained at the initial rank before pruning (t_init)", "min": 0.0, "max": 0.9})
    final_frac: float = field(default=0.2, metadata={
        "help": "fraction of the steps trained at the target rank, pattern frozen (t_final; at least 1 step)",
        "min": 0.0, "max": 0.9})
    mask_interval: int = field(default=1, metadata={"help": "steps between two re-allocations (ΔT)", "min": 1})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity Ī", "min": 0.0, "max": 0.999})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty Ū", "min": 0.0, "max": 0.999})
    orth_reg_weight: float = field(default=0.1, metadata={
        "help": "weight of the orthogonality regulariser, averaged over layers (LoRA2: ||XᵀX − I||²_F; "
                "AdaLoRA: see orth_reg)", "min": 0.0})

    def __post_init__(self):
        if self.allocation not in ("global", "per_layer"):
            raise ValueError(f"allocation must be 'global' or 'per_layer', got {self.allocation!r}")
        if self.target_rank < 0:
            raise ValueError(f"target_rank must be >= 0, got {self.target_rank}")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.final_frac < 1):
            raise ValueError("warmup_frac and final_frac must lie in [0, 1)")
        if self.mask_interval < 1:
            raise ValueError(f"mask_interval must be >= 1, got {self.mask_interval}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in [0, 1)")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")


def budget_schedule(step: int, total_steps: int, init_budget: int, target_budget: int,
                    warmup_steps: int, final_steps: int) -> tuple[int, str]:
    """AdaLoRA's cubic budget schedule (PEFT ``RankAllocator.budget_schedule``).

    Args:
        step: optimizer steps done so far.
        total_steps: planned optimizer steps of the run.
        init_budget, target_budget: total rank at the start and at the end.
        warmup_steps: steps at ``init_budget`` before pruning starts (``t_init``).
        final_steps: steps at ``target_budget`` at the end (``t_final``).

    Returns:
        ``(budget, phase)`` with phase ``"warmup"``, ``"prune"`` or ``"final"``. From step
        ``total_steps - final_steps`` on, the budget is exactly ``target_budget``.

    PEFT's names: ``init_budget = init_r · n_layers``, ``target_budget = target_r · n_layers``,
    ``warmup_steps = tinit``, ``final_steps = tfinal``, ``total_steps = total_step``. The budget
    equals PEFT's on every step whenever PEFT accepts the config (``tinit < total_step - tfinal``;
    checked in ``tests/test_fidelity_adalora_schedule.py``). Step ``total_step - tfinal`` itself is
    PEFT's last cubic step (coefficient 0, budget ``target``) and the step where
    ``AdaLoraModel.update_and_allocate`` forces the final mask: our first ``"final"`` step.
    """
    end = total_steps - final_steps
    if step >= end:
        return target_budget, "final"
    if step <= warmup_steps:
        return init_budget, "warmup"
    frac = 1.0 - (step - warmup_steps) / (end - warmup_steps)  # in (0, 1)
    return int(target_budget + (init_budget - target_budget) * frac ** 3), "prune"


def phase_lengths(cfg: BudgetConfig, total_steps: int) -> tuple[int, int]:
    """``(warmup_steps, final_steps)`` of a run of ``total_steps``; the final phase lasts >= 1 step."""
    return round(cfg.warmup_frac * total_steps), max(1, round(cfg.final_frac * total_steps))


def orth_penalty(x: Tensor) -> Tensor:
    """``||G − I||²_F`` with ``G`` the Gram matrix over the shorter side of ``x`` (fp32 scalar).

    For ``A: [r, in]`` that is ``A Aᵀ`` (orthonormal rows), for ``B: [out, r]`` it is ``Bᵀ B``
    (orthonormal columns): the only Gram of a thin matrix that can equal the identity.
    """
    with torch.autocast(x.device.type, enabled=False):  # a bf16 Gram would hide small deviations
        x = x.float()
        g = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # (short, short)
        return (g - torch.eye(g.shape[0], device=g.device, dtype=g.dtype)).pow(2).sum()


class PrunableDiagonal(nn.Module):
    """``Λ = diag(λ ⊙ mask)``: trainable singular values (zero init) with a pruning mask.

    ``mask`` is a persistent bool buffer; pruned entries of ``λ`` are also set to zero, so a file
    holding only the trainable tensors (``save_adapter``) keeps the pruned function.
    ``mask_in_forward=False`` (mask style ``"peft"``) returns ``λ`` as is: the mask then acts only
    through the in-place zeroing of :meth:`keep` and :meth:`enforce` (PEFT's ``masked_fill_``).
    """

    def __init__(self, rank: int, like: Tensor, mask_in_forward: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rank, device=like.device, dtype=like.dtype))  # (r,)
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool, device=like.device))
        self.mask_in_forward = mask_in_forward
        self.history: list[tuple[int, int]] = []  # (step, remaining rank) after every after_step

    def forward(self) -> Tensor:
        return self.weight * self.mask if self.mask_in_forward else self.weight  # (r,)

    @torch.no_grad()
    def keep(self, keep: Tensor) -> None:
        """Keep the entries where ``keep`` (bool ``[r]``) is true and prune the others."""
        self.mask.copy_(keep.to(self.mask.device))
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the pruned entries of ``λ`` (the optimizer's momentum may have moved them)."""
        self.weight.masked_fill_(~self.mask, 0.0)

    def remaining(self) -> int:
        return int(self.mask.sum())


class Sensitivity:
    """Smoothed sensitivity ``Ī`` and uncertainty ``Ū`` of named tensors, in fp32 (AdaLoRA eqs. 8-11).

    ``I = |p · ∂L/∂p|`` (eq. 8), ``Ī ← β1 Ī + (1-β1) I`` (eq. 9), ``Ū ← β2 Ū + (1-β2) |I − Ī|``
    with the *new* ``Ī`` (eq. 10), entry score ``s = Ī · Ū`` (eq. 11); both averages start at 0.
    ``p`` is read after ``optimizer.step()``, as PEFT's ``RankAllocator.update_ipt`` does.
    """

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, tensors: dict[str, Tensor]) -> bool:
        """Fold ``|p · p.grad|`` of every tensor into the averages; False if none had a gradient."""
        seen = False
        for name, p in tensors.items():
            if p.grad is None:
                continue
            seen = True
            ipt = (p.detach().float() * p.grad.detach().float()).abs()
            avg = self.avg.get(name, torch.zeros_like(ipt))
            unc = self.unc.get(name, torch.zeros_like(ipt))
            avg = self.beta1 * avg + (1 - self.beta1) * ipt
            self.avg[name] = avg
            self.unc[name] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()
        return seen

    def score(self, name: str, like: Tensor) -> Tensor:
        """Entry scores ``Ī · Ū`` shaped like ``like`` (zeros before the first update)."""
        if name not in self.avg:
            return torch.zeros(like.shape, device=like.device, dtype=torch.float32)
        return self.avg[name] * self.unc[name]

    def triplet_scores(self, diag: Tensor, row_factor: Tensor, col_factor: Tensor) -> Tensor:
        """Score of triplet ``i`` (AdaLoRA eq. 7):
        ``s(λ_i) + mean_j s(row_factor[i, j]) + mean_j s(col_factor[j, i])``."""
        return (self.score("diag", diag) + self.score("row", row_factor).mean(dim=1)
                + self.score("col", col_factor).mean(dim=0))  # (r,)


class RankAllocator:
    """One allocation group: the layers built with one config object (see the module docstring).

    A layer joins with :meth:`add` and must provide ``lora_E`` (:class:`PrunableDiagonal`),
    ``update_importance() -> bool`` and ``triplet_scores() -> Tensor [r]``.
    """

    def __init__(self, cfg: BudgetConfig):
        self.cfg = cfg
        self.style = getattr(cfg, "mask_style", "forward")  # see "Mask styles" in the module docstring
        if self.style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {self.style!r}")
        self.layers: list[nn.Module] = []
        self.last_step: int | None = None
        self.frozen = False  # True once the final phase fixed the rank pattern
        self._warned = False

    def add(self, layer: nn.Module) -> None:
        self.layers.append(layer)

    def budgets(self, step: int, total_steps: int) -> tuple[list[int], str]:
        """Per-layer budgets at ``step`` (global: one budget, split by score at allocation time)."""
        warm, final = phase_lengths(self.cfg, total_steps)
        ranks = [lay.lora_E.weight.numel() for lay in self.layers]
        targets = [min(self.cfg.target_rank, r) for r in ranks]
        if self.cfg.allocation == "global":
            budget, phase = budget_schedule(step, total_steps, sum(ranks), sum(targets), warm, final)
            return [budget], phase
        out = [budget_schedule(step, total_steps, r, t, warm, final) for r, t in zip(ranks, targets)]
        return [b for b, _ in out], out[0][1]

    @torch.no_grad()
    def step(self, step: int, total_steps: int) -> None:
        """Update importance, prune to the scheduled budget and record the ranks (once per step)."""
        if step == self.last_step:
            return
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"after_step needs the planned number of optimizer steps, got total_steps={total_steps!r}")
        self.last_step = step
        budgets, phase = self.budgets(step, total_steps)
        peft = self.style == "peft"
        if not self.frozen and not (peft and phase == "final"):  # peft: last update before the final phase
            seen = [lay.update_importance() for lay in self.layers]
            if not any(seen) and not self._warned:
                self._warned = True
                warnings.warn("rank allocation found no gradients: call after_step() after optimizer.step() "
                              "and before optimizer.zero_grad()", RuntimeWarning, stacklevel=3)
        if (phase == "prune" and step % self.cfg.mask_interval == 0) or (phase == "final" and not self.frozen):
            self._allocate(budgets)  # keep() zeroes the pruned λ
        if phase == "final":
            self.frozen = True
        for lay in self.layers:
            if not peft or phase == "final":  # peft: between allocations a pruned λ may regrow
                lay.lora_E.enforce()
            lay.lora_E.history.append((int(step), lay.lora_E.remaining()))

    def _allocate(self, budgets: list[int]) -> None:
        scores = [lay.triplet_scores().float().cpu() for lay in self.layers]
        if self.cfg.allocation == "global":
            keep = keep_mask(torch.cat(scores), budgets[0], self.style)
            for lay, k in zip(self.layers, keep.split([s.numel() for s in scores])):
                lay.lora_E.keep(k)
            return
        for lay, s, b in zip(self.layers, scores, budgets):
            lay.lora_E.keep(keep_mask(s, b, self.style))

    def reg_scale(self) -> float:
        """``orth_reg_weight / n_layers``: summing every layer's term gives the weighted layer mean."""
        return self.cfg.orth_reg_weight / max(1, len(self.layers))


def keep_mask(scores: Tensor, budget: int, style: str = "forward") -> Tensor:
    """Which triplets stay (bool, shaped like the 1-D ``scores``) under a budget of ``budget``.

    ``"forward"``: exactly ``min(budget, n)`` triplets, the highest scores (``torch.topk``; ties
    broken arbitrarily). ``"peft"``: PEFT's ``mask_to_budget``: prune every score ``<=`` the
    ``(n - budget)``-th smallest (``torch.kthvalue``), so tied scores at the threshold are all
    pruned and fewer than ``budget`` may stay; ``budget >= n`` keeps all (PEFT's ``kthvalue`` with
    ``k = 0`` would raise).
    """
    n = scores.numel()
    budget = max(0, min(int(budget), n))
    if style == "peft":
        if budget == n:
            return torch.ones(n, dtype=torch.bool)
        return scores > torch.kthvalue(scores, n - budget).values
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(scores, budget).indices] = True
    return keep


_GROUPS: weakref.WeakValueDictionary[int, RankAllocator] = weakref.WeakValueDictionary()


def allocator_for(cfg: BudgetConfig) -> RankAllocator:
    """The allocation group of ``cfg`` (created on first use; layers sharing ``cfg`` share it).

    Keyed by ``id(cfg)``: the group lives as long as a layer holds it, and each layer also holds
    ``cfg``, so the id cannot be reused by another config while the group exists.
    """
    group = _GROUPS.get(id(cfg))
    if group is None or group.cfg is not cfg:
        group = RankAllocator(cfg)
        _GROUPS[id(cfg)] = group
    return group


def update_and_allocate(model: nn.Module, step: int, total_steps: int) -> None:
    """Call ``after_step(step, total_steps)`` on every module of ``model`` that has it.

    For notebooks and custom loops: call it after ``optimizer.step()`` and before ``zero_grad()``.
    """
    for m in model.modules():
        if hasattr(m, "after_step"):
            m.after_step(step, total_steps)


def regularization_loss(model: nn.Module) -> Tensor:
    """Sum of ``regularization_loss()`` over the modules of ``model`` (add it to the loss before backward)."""
    terms = [m.regularization_loss() for m in model.modules() if hasattr(m, "regularization_loss")]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def rank_history(model: nn.Module) -> dict[str, list[tuple[int, int]]]:
    """``{module name: [(step, remaining rank), ...]}`` of every pruning layer (paper figure 3 heatmap)."""
    return {name: list(m.lora_E.history) for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_E", None), PrunableDiagonal)}


def budget_report(layer: nn.Module) -> dict:
    """``inspect()`` data of a pruning layer: initial and remaining rank, and the rank history
    reduced to the steps where it changed (plus the last one), as ``[[step, rank], ...]``."""
    history = layer.lora_E.history
    changes = [[s, r] for k, (s, r) in enumerate(history) if k == 0 or r != history[k - 1][1]]
    if history and changes[-1][0] != history[-1][0]:
        changes.append(list(history[-1]))
    return {"initial_rank": layer.lora_E.weight.numel(), "remaining_rank": layer.lora_E.remaining(),
            "rank_history": changes}


def gaussian_(t: Tensor, std: float | None = None) -> Tensor:
    """Fill ``t`` from N(0, std²); ``std=None`` uses ``1/sqrt(longer side)``, which starts a thin
    matrix near the orthonormal set its regulariser targets."""
    with torch.no_grad():
        return t.normal_(0.0, std if std is not None else 1.0 / math.sqrt(max(t.shape)))
