"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): SVD-form update with importance-based rank allocation.

``ΔW = s · P diag(λ) Q`` with ``Q = lora_A: [r, in]``, ``P = lora_B: [out, r]``, ``λ = lora_E: [r]``
(zero init, so ``ΔW = 0``). During training the triplets ``(P[:, i], λ_i, Q[i, :])`` with the
lowest smoothed importance are pruned on a cubic budget schedule, with the budget shared by all
layers (``allocation="global"``), and an orthogonality regulariser keeps P and Q near orthonormal.

**Orthogonality regulariser** (``orth_reg``, weight ``γ = orth_reg_weight``, default 0.1), over the
``n`` AdaLoRA layers of one config:

* ``"paper"`` (default): AdaLoRA eq. 4, ``R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F`` (squared
  Frobenius norms), added as ``γ · Σ_k R(P_k, Q_k) / n``. The paper's training objective sums
  ``γ · R(P_k, Q_k)`` over the layers; we average, so that ``γ`` does not scale with the depth of
  the model. The Gram is taken over the shorter side of
  each factor (:func:`bora_lab.methods.budget.orth_penalty`; ``r×r`` whenever ``r ≤ in, out``).
* ``"peft"``: Hugging Face PEFT (``AdaLoraModel.forward``) and the official AdaLoRA code
  (``loralib/adalora.py``, ``compute_orth_regu``): the *unsquared* Frobenius norms of the ``r×r``
  Grams ``Q Qᵀ`` (``lora_A @ lora_A.T``) and ``PᵀP`` (``lora_B.T @ lora_B``), averaged over the
  ``2n`` matrices: ``γ · Σ_k (||P_kᵀP_k − I||_F + ||Q_kQ_kᵀ − I||_F) / (2n)``. PEFT's default weight
  is ``orth_reg_weight=0.5`` (the official code's 0.1); set it to reproduce PEFT's defaults.

Both are computed in float32.

**Importance and pruning** (:mod:`bora_lab.methods.budget`): sensitivity ``I = |w · ∂L/∂w|`` of every
entry of P, λ, Q (AdaLoRA eq. 8), smoothed ``Ī`` (eq. 9) and uncertainty ``Ū`` (eq. 10), entry score
``Ī·Ū`` (eq. 11), triplet score ``s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 7), cubic global
budget. ``mask_style`` chooses how a pruned ``λ_i`` is held at zero:

* ``"forward"`` (default): ``λ ⊙ mask`` in the forward; a pruned triplet gets no gradient.
* ``"peft"``: PEFT 0.21.2 / official code, the paper's truncation of the updated ``Λ̃`` (eq. 6):
  ``λ`` is zeroed in place after the step at each allocation (and every final-phase step), keeps
  its gradient and can regrow between allocations; importance stops one step before the final
  phase; ties at the threshold are all pruned. With ``orth_reg="peft"`` and
  ``alpha = lora_alpha · r / (r + 1e-5)`` (PEFT divides by ``r + 1e-5``) the sensitivities, scores
  and masks equal PEFT's step by step (``tests/test_fidelity_adalora_schedule.py``).

PEFT's ``AdaLoraConfig`` fields map to ours as ``init_r → rank``, ``target_r → target_rank``,
``tinit → round(warmup_frac · total_steps)``, ``tfinal → max(1, round(final_frac · total_steps))``
(ours always has a final step), ``deltaT → mask_interval``, ``beta1/beta2 → beta1/beta2``,
``total_step → total_steps`` of ``after_step``, ``lora_alpha → alpha`` (see above).

Trainer contract (see :mod:`bora_lab.methods.budget`): after ``optimizer.step()`` and before
``zero_grad()`` call ``after_step(step, total_steps)``; add ``regularization_loss()`` to the loss
before ``backward``. Without ``after_step`` no rank is ever pruned and AdaLoRA is a plain SVD-form
LoRA: the mistake the lecture warns about.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLinear, combined_weight
from .budget import (
    MASK_STYLES,
    BudgetConfig,
    PrunableDiagonal,
    Sensitivity,
    allocator_for,
    budget_report,
    gaussian_,
    orth_penalty,
    rank_history,
    regularization_loss,
    update_and_allocate,
)
from .registry import register

__all__ = ["AdaLoRAConfig", "AdaLoRALinear", "peft_orth_norm", "rank_history", "regularization_loss",
           "update_and_allocate"]

ORTH_REGS = ("paper", "peft")


def peft_orth_norm(lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """``||A Aᵀ − I||_F + ||BᵀB − I||_F`` (fp32 scalar, unsquared): PEFT's per-layer term, ``r×r`` Grams."""
    with torch.autocast(lora_a.device.type, enabled=False):
        a, b = lora_a.float(), lora_b.float()
        total = torch.zeros((), device=a.device)
        for g in (a @ a.T, b.T @ b):  # (r, r) each
            total = total + torch.linalg.matrix_norm(g - torch.eye(g.shape[0], device=g.device, dtype=g.dtype))
        return total


@dataclass
class AdaLoRAConfig(BudgetConfig):
    """AdaLoRA: ``rank`` is the initial rank of every layer (PEFT's ``init_r``)."""

    init_std: float = field(default=0.02, metadata={
        "help": "std of the Gaussian init of P and Q (PEFT: 0.02; λ starts at 0)", "min": 0.0})
    orth_reg: str = field(default="paper", metadata={
        "help": "orthogonality regulariser: paper = eq. 4, squared Frobenius ||PᵀP−I||²+||QQᵀ−I||², "
                "averaged over layers; peft = PEFT / official code, unsquared Frobenius norms averaged "
                "over the P and Q matrices (PEFT's default weight: 0.5)",
        "choices": list(ORTH_REGS)})
    mask_style: str = field(default="forward", metadata={
        "help": "how pruned singular values stay zero: forward = λ⊙mask in the forward, a pruned triplet "
                "gets no gradient; peft = PEFT / official code (paper eq. 6): λ zeroed in place after the "
                "step at each allocation, keeps its gradient and may regrow in between",
        "choices": list(MASK_STYLES)})

    def __post_init__(self):
        super().__post_init__()
        if self.orth_reg not in ORTH_REGS:
            raise ValueError(f"orth_reg must be one of {ORTH_REGS}, got {self.orth_reg!r}")
        if self.mask_style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {self.mask_style!r}")


@register("adalora", AdaLoRAConfig)
class AdaLoRALinear(AdapterLinear):
    """AdaLoRA: ``W = W0 + s · P diag(λ ⊙ mask) Q``, ``s = alpha / r``; ranks pruned by importance."""

    description = "AdaLoRA: SVD-form update P·Λ·Q; unimportant singular values pruned to a global budget"
    formula = (r"W = W_0 + \frac{\alpha}{r} P\,\Lambda\,Q,\ \Lambda=\operatorname{diag}(\lambda),\ \lambda_0=0,"
               r"\ \ \mathcal{R}=\lVert P^\top P-I\rVert_F^2+\lVert QQ^\top-I\rVert_F^2\ \text{(eq. 4)}")
    paper = ("Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
             "(arXiv:2303.10512)")
    source = "Zhang et al., 2024, LoRA2, arXiv:2408.06854, §2 (AdaLoRA, eq. 3) and §3.2"

    def __init__(self, base, cfg: AdaLoRAConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        w = base.weight
        self.lora_A = nn.Parameter(gaussian_(torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype),
                                             cfg.init_std))  # Q: (r, in)
        self.lora_B = nn.Parameter(gaussian_(torch.empty(self.out_features, cfg.rank, device=w.device, dtype=w.dtype),
                                             cfg.init_std))  # P: (out, r)
        self.lora_E = PrunableDiagonal(cfg.rank, w, mask_in_forward=cfg.mask_style == "forward")  # λ: (r,)
        self._sens = Sensitivity(cfg.beta1, cfg.beta2)
        self._allocator = allocator_for(cfg)
        self._allocator.add(self)

    def effective_weight(self) -> Tensor:
        return combined_weight(self.weight0, self.lora_A, self.lora_B * self.lora_E(), self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.lora_A)  # (..., r)
        h = h * self.lora_E().to(h.dtype)
        return F.linear(x, self.base.weight, self.base.bias) + F.linear(h, self.lora_B) * self.scale

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdaLoRAConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out) + cfg.rank

    # -- trainer hooks -----------------------------------------------------------------------
    def after_step(self, step: int, total_steps: int) -> None:
        """Importance update + budget allocation of this layer's group (once per step, any layer)."""
        self._allocator.step(step, total_steps)

    def regularization_loss(self) -> Tensor:
        """This layer's share of the orthogonality regulariser (fp32 scalar; summing every layer's
        share gives the whole term, see the module docstring):
        ``paper``: ``orth_reg_weight · (||PᵀP − I||²_F + ||QQᵀ − I||²_F) / n_layers``;
        ``peft``: ``orth_reg_weight · (||PᵀP − I||_F + ||QQᵀ − I||_F) / (2 · n_layers)``."""
        if self.cfg.orth_reg_weight == 0:
            return torch.zeros((), device=self.lora_A.device)
        if self.cfg.orth_reg == "peft":
            return self._allocator.reg_scale() / 2 * peft_orth_norm(self.lora_A, self.lora_B)
        return self._allocator.reg_scale() * (orth_penalty(self.lora_A) + orth_penalty(self.lora_B))

    # -- allocator protocol ------------------------------------------------------------------
    def update_importance(self) -> bool:
        return self._sens.update({"diag": self.lora_E.weight, "row": self.lora_A, "col": self.lora_B})

    def triplet_scores(self) -> Tensor:
        return self._sens.triplet_scores(self.lora_E.weight, self.lora_A, self.lora_B)

    def remaining_rank(self) -> int:
        """Number of singular values not pruned."""
        return self.lora_E.remaining()

    def inspect(self) -> dict:
        """Adds ``budget``: initial and remaining rank and the rank history (:func:`budget.budget_report`)."""
        return {**super().inspect(), "budget": budget_report(self)}

    @property
    def rank_history(self) -> list[tuple[int, int]]:
        """``[(step, remaining rank), ...]`` recorded at every ``after_step``."""
        return self.lora_E.history
