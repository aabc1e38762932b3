"""LoRA2 (Zhang et al., 2024, arXiv:2408.06854): multi-scale orthogonal low-rank approximation with rank pruning.

Paper eq. 4 (``x @ W`` layout): ``ΔW = P Λ Q = (v u) Λ (𝒰 𝒱)`` with two LoRA pairs, one on each
side of a diagonal ``Λ``. In our ``[out, in]`` layout (``W = W0 + ΔW``, ``y = x Wᵀ``):

* input plane ``Q = in_u @ in_v: [r, in]`` with ``in_v: [k, in]`` (paper ``vᵀ``), ``in_u: [r, k]`` (``uᵀ``);
* output plane ``P = out_V @ out_U: [out, r]`` with ``out_U: [k, r]`` (``𝒰ᵀ``), ``out_V: [out, k]`` (``𝒱ᵀ``);
* ``ΔW = s · P diag(λ ⊙ mask) Q``, ``λ: [r]`` zero-initialised, ``s = alpha / r``.

``k`` is the config's ``rank`` (it sets the parameter count, ``k·(in+out) + 2kr + r``, close to LoRA
at rank ``k``: the paper matches its K to the baselines' R); ``r = lambda_rank`` is the number of
prunable singular values (paper figure 3: r = 8).

Regularisers (eq. 5, weight ``orth_reg_weight``): ``||XᵀX − I||²_F`` on the shorter-side Gram of
``v, u`` ("uv"), ``𝒰, 𝒱`` ("UV") and ``P, Q`` ("PQ"); ``orth_targets`` picks them (paper table 3
ablation; "all" is the paper's best).

Importance (our reading of the garbled eq. 6-9): triplet ``i`` scores ``S(λ_i)`` plus the mean
score of the ``k`` entries tied to ``i`` in each small factor, ``in_u[i, :]`` and ``out_U[:, i]``
(the ``C(K, ·, i)/K`` terms), with AdaLoRA's smoothed sensitivity × uncertainty per entry. The big
factors ``in_v, out_V`` have no index ``i``: their sum is the same for every triplet and cannot
change the ranking, so it is skipped (the paper's "98.5 % fewer sensitivity computations").
Pruning follows AdaLoRA's cubic budget schedule, by default on a budget shared by all layers.

Trainer contract: see :mod:`bora_lab.methods.budget` (``after_step`` after ``optimizer.step()``
and before ``zero_grad()``; ``regularization_loss()`` added before ``backward``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLinear, check_rank, combined_weight
from .budget import (
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

__all__ = [
    "ORTH_TARGETS",
    "LoRA2Config",
    "LoRA2Linear",
    "rank_history",
    "regularization_loss",
    "update_and_allocate",
]

# Which factor groups each ``orth_targets`` choice regularises (paper table 3).
ORTH_TARGETS = {"all": ("uv", "UV", "PQ"), "uv+UV": ("uv", "UV"), "PQ": ("PQ",), "uv": ("uv",), "UV": ("UV",)}


@dataclass
class LoRA2Config(BudgetConfig):
    """LoRA2: ``rank`` is k (each LoRA pair's inner size); ``lambda_rank`` is r (the size of Λ)."""

    lambda_rank: int = field(default=8, metadata={
        "help": "r: number of prunable singular values in Λ (rank is k, the pairs' inner size)", "min": 1})
    orth_targets: str = field(default="all", metadata={
        "help": "factors the orthogonality regulariser acts on (paper table 3)", "choices": list(ORTH_TARGETS)})

    def __post_init__(self):
        super().__post_init__()
        if self.orth_targets not in ORTH_TARGETS:
            raise ValueError(f"orth_targets must be one of {list(ORTH_TARGETS)}, got {self.orth_targets!r}")


@register("lora2", LoRA2Config)
class LoRA2Linear(AdapterLinear):
    """LoRA2: ``W = W0 + s · (out_V out_U) diag(λ ⊙ mask) (in_u in_v)``; Λ zero-init and pruned."""

    description = "LoRA2: two LoRA pairs on orthogonal planes around a prunable diagonal Λ"
    formula = (r"W = W_0 + \frac{\alpha}{r}\,\underbrace{\mathcal{V}^\top\mathcal{U}^\top}_{P:\,out\times r}\,"
               r"\Lambda\,\underbrace{u^\top v^\top}_{Q:\,r\times in},\ \Lambda=\operatorname{diag}(\lambda),"
               r"\ \lambda_0=0,\ \ \mathcal{R}=\sum_{X}\lVert X^\top X-I\rVert_F^2")
    paper = ("Zhang et al. 2024, LoRA2: Multi-Scale Low-Rank Approximations for Fine-Tuning Large Language Models "
             "(arXiv:2408.06854)")
    source = ("Zhang et al., 2024, LoRA2, arXiv:2408.06854, §3.1 (eq. 4-5) and §3.2 (eq. 6-9, algorithm 1), "
              "figure 3")

    def __init__(self, base, cfg: LoRA2Config):
        super().__init__(base, cfg)
        k, r = cfg.rank, cfg.lambda_rank
        check_rank(r, self.in_features, self.out_features)
        self.scale = cfg.alpha / r
        w = base.weight

        def factor(*shape: int) -> nn.Parameter:
            # Gaussian (paper) with std 1/sqrt(longer side): each factor starts near orthonormal.
            return nn.Parameter(gaussian_(torch.empty(*shape, device=w.device, dtype=w.dtype)))

        self.in_v = factor(k, self.in_features)  # (k, in)
        self.in_u = factor(r, k)  # (r, k)
        self.lora_E = PrunableDiagonal(r, w)  # λ: (r,)
        self.out_U = factor(k, r)  # (k, r)
        self.out_V = factor(self.out_features, k)  # (out, k)
        self._sens = Sensitivity(cfg.beta1, cfg.beta2)
        self._allocator = allocator_for(cfg)
        self._allocator.add(self)

    def planes(self) -> tuple[Tensor, Tensor]:
        """``P = out_V @ out_U: [out, r]`` and ``Q = in_u @ in_v: [r, in]``."""
        return self.out_V @ self.out_U, self.in_u @ self.in_v

    def effective_weight(self) -> Tensor:
        with torch.autocast(self.weight0.device.type, enabled=False):  # dense W in the weights' dtype
            p, q = self.planes()
            return combined_weight(self.weight0, q, p * self.lora_E(), self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        h = F.linear(F.linear(x, self.in_v), self.in_u)  # (..., k) -> (..., r)
        h = h * self.lora_E().to(h.dtype)
        h = F.linear(F.linear(h, self.out_U), self.out_V)  # (..., k) -> (..., out)
        return F.linear(x, self.base.weight, self.base.bias) + h * self.scale

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: LoRA2Config, bias: bool = True) -> int:
        k, r = cfg.rank, cfg.lambda_rank
        return k * (d_in + d_out) + 2 * k * r + r

    # -- trainer hooks -----------------------------------------------------------------------
    def after_step(self, step: int, total_steps: int) -> None:
        """Importance update + budget allocation of this layer's group (once per step, any layer)."""
        self._allocator.step(step, total_steps)

    def orthogonality(self, targets: tuple[str, ...] = ("uv", "UV", "PQ")) -> dict[str, Tensor]:
        """Penalties ``{"uv", "UV", "PQ"}`` (fp32 scalars) of the requested factor groups."""
        out = {}
        if "uv" in targets:
            out["uv"] = orth_penalty(self.in_u) + orth_penalty(self.in_v)
        if "UV" in targets:
            out["UV"] = orth_penalty(self.out_U) + orth_penalty(self.out_V)
        if "PQ" in targets:
            p, q = self.planes()
            out["PQ"] = orth_penalty(p) + orth_penalty(q)
        return out

    def regularization_loss(self) -> Tensor:
        """``orth_reg_weight · Σ_{orth_targets} penalty / n_layers`` (fp32 scalar)."""
        if self.cfg.orth_reg_weight == 0:
            return torch.zeros((), device=self.in_v.device)
        pen = self.orthogonality(ORTH_TARGETS[self.cfg.orth_targets])
        return self._allocator.reg_scale() * sum(pen.values())

    # -- allocator protocol ------------------------------------------------------------------
    def update_importance(self) -> bool:
        return self._sens.update({"diag": self.lora_E.weight, "row": self.in_u, "col": self.out_U})

    def triplet_scores(self) -> Tensor:
        """LoRA2 eq. 9: ``S(λ_i) + mean_j S(in_u[i, j]) + mean_j S(out_U[j, i])``."""
        return self._sens.triplet_scores(self.lora_E.weight, self.in_u, self.out_U)

    def remaining_rank(self) -> int:
        """Number of singular values of Λ not pruned."""
        return self.lora_E.remaining()

    def inspect(self) -> dict:
        """Adds ``budget``: initial and remaining rank and the rank history (:func:`budget.budget_report`)."""
        rank = min(self.cfg.rank, self.cfg.lambda_rank)  # ΔW = P Λ Q has rank <= min(k, r)
        return {**super().inspect(), "rank": rank, "budget": budget_report(self)}

    @property
    def rank_history(self) -> list[tuple[int, int]]:
        """``[(step, remaining rank), ...]`` recorded at every ``after_step``."""
        return self.lora_E.history
