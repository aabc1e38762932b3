"""PiSSA (Meng et al., arXiv:2404.02948): LoRA initialised from the principal singular vectors of W0.

``W0 = U S Vᵀ``; with ``s = alpha / r``: ``A = sqrt(S_r / s) V_rᵀ: [r, in]``, ``B = U_r sqrt(S_r / s): [out, r]``,
so ``s · B @ A = U_r S_r V_rᵀ`` is the principal part of ``W0``. The residual
``W_res = W0 − s · B @ A`` (the minor singular components) is stored frozen and the layer computes
``W = W_res + s · B @ A``. At init ``W = W0`` as a function (up to float rounding), but the split
is not the identity of the parameters: ``B ≠ 0`` and the gradients of A and B differ from LoRA's
(PiSSA trains the principal directions, LoRA a zero update).

Memory: ``W_res`` is one extra frozen ``[out, in]`` buffer per wrapped layer (PEFT instead overwrites
the base weight with ``W_res``). Keeping ``base.weight = W0`` keeps ``weight0`` the pretrained weight,
lets ``merge`` write ``W_res + s·B@A`` into ``base.weight`` and ``unmerge`` restore ``W0`` bit for bit,
and never changes the ``nn.Linear`` that was wrapped. ``W_res`` is not saved: it is recomputed from
``W0`` (it depends only on the top-r singular subspace, not on the signs the SVD picks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear, combined_weight, lora_delta
from .registry import register


@dataclass
class PiSSAConfig(AdapterConfig):
    """PiSSA options."""

    svd_niter: int = field(default=0, metadata={
        "help": "0: exact SVD; n > 0: randomized torch.svd_lowrank with n power iterations (PEFT's pissa_niter_n)",
        "min": 0, "max": 64})


def principal_factors(w: Tensor, rank: int, scale: float, niter: int = 0) -> tuple[Tensor, Tensor]:
    """PiSSA's ``A: [r, in]`` and ``B: [out, r]`` (fp32) with ``scale · B @ A`` the top-``rank`` SVD of ``w``.

    Args:
        w: weight ``[out, in]`` (any float dtype; the SVD runs in fp32).
        rank: number of singular triplets.
        scale: the LoRA scaling ``s`` the factors will be multiplied by.
        niter: 0 for the exact SVD, otherwise power iterations of ``torch.svd_lowrank``.
    """
    w = w.detach().float()
    if niter > 0:
        u, s, v = torch.svd_lowrank(w, q=min(rank + 10, *w.shape), niter=niter)  # v: (in, q)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = (s / scale).sqrt()  # (r,)
    return root.unsqueeze(1) * vh, u * root  # A (r, in), B (out, r)


@register("pissa", PiSSAConfig)
class PiSSALinear(AdapterLinear):
    """PiSSA: ``W = W_res + s · B @ A`` with A, B from the top-r SVD of W0 and ``W_res`` frozen."""

    description = "PiSSA: LoRA initialised from W0's principal singular vectors; minor part frozen"
    formula = (r"W_0 = U S V^\top,\ A_0 = \sqrt{S_r/s}\,V_r^\top,\ B_0 = U_r\sqrt{S_r/s},"
               r"\ W = \underbrace{W_0 - sB_0A_0}_{W_{res}\ \text{frozen}} + sBA")
    paper = ("Meng et al. 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation of "
             "Large Language Models (arXiv:2404.02948)")
    source = ("Wang et al., 2024, BoRA, arXiv:2412.06441, §4 baselines and table 1; "
              "shape conventions: docs/conventions.md")

    def __init__(self, base, cfg: PiSSAConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        w = base.weight
        a, b = principal_factors(w, cfg.rank, self.scale, cfg.svd_niter)
        self.lora_A = nn.Parameter(a.to(w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(b.to(w.dtype))  # (out, r)
        with torch.no_grad():
            res = torch.addmm(w.detach().float(), b, a, alpha=-self.scale)  # W0 − s·B@A (out, in)
        self.register_buffer("w_res", res.to(w.dtype), persistent=False)

    def effective_weight(self) -> Tensor:
        return combined_weight(self.w_res, self.lora_A, self.lora_B, self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_res, self.base.bias) + lora_delta(x, self.lora_A, self.lora_B, self.scale)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: PiSSAConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out)
