"""PiSSA (Meng et al., 2024): LoRA initialised from the principal singular vectors of W0.

Reference: Meng, Wang and Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", arXiv:2404.02948. Checked against Hugging Face PEFT's
``LoraConfig(init_lora_weights="pissa")`` (``peft/tuners/lora/layer.py``, ``pissa_init``).

``W0 = U S Vᵀ``; with ``s = alpha / r``: ``A = sqrt(S_r / s) V_rᵀ: [r, in]``, ``B = U_r sqrt(S_r / s): [out, r]``,
so ``s · B @ A = U_r S_r V_rᵀ`` is the principal part of ``W0``. The residual
``W_res = W0 − s · B @ A`` (the minor singular components) is stored frozen and the layer computes
``W = W_res + s · B @ A``. At init ``W = W0`` as a function (up to float rounding), but the split
is not the identity of the parameters: ``B ≠ 0`` and the gradients of A and B differ from LoRA's
(PiSSA trains the principal directions, LoRA a zero update). This is PEFT's ``"pissa"`` init
(exact SVD, ``svd_niter=0``, our default): same A, B (up to the sign of each singular pair, which
the SVD routine picks), same residual, same outputs.

SVD: PEFT runs it in fp32 and refuses fp64 weights; we run it in fp32 for fp32/bf16/fp16 weights
and in fp64 for fp64 weights, so an fp64 layer has ``W_res + s·B@A = W0`` to fp64 precision.

Fast init (``svd_niter = n > 0``): randomized SVD (``torch.svd_lowrank``, Halko, Martinsson and
Tropp, 2011, arXiv:0909.4061; PiSSA's paper also offers a fast-SVD initialisation) with ``n``
power iterations and ``q = min(r + svd_oversample, in, out)`` random columns. PEFT's
``init_lora_weights="pissa_niter_[n]"`` calls ``svd_lowrank(W, r, niter=n)``, i.e. ``q = r``, no
oversampling: ``svd_oversample=0`` is exactly PEFT's (same draws from torch's global generator,
so the same A, B for the same ``torch.manual_seed``). Our default ``svd_oversample=10`` (Halko et
al.'s usual oversampling) gives a top-r subspace closer to the exact SVD's.

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
        "help": ("0: exact SVD (PEFT's init_lora_weights='pissa'); n > 0: randomized torch.svd_lowrank with n "
                 "power iterations and q = min(rank + svd_oversample, in, out) columns "
                 "(PEFT's 'pissa_niter_[n]' uses q = rank: svd_oversample=0)"),
        "min": 0, "max": 64})
    svd_oversample: int = field(default=10, metadata={
        "help": ("extra random columns of the randomized SVD when svd_niter > 0: q = rank + svd_oversample "
                 "(Halko et al., 2011). 0 reproduces PEFT's pissa_niter_[n] exactly; ignored by the exact SVD"),
        "min": 0, "max": 256})


def principal_factors(w: Tensor, rank: int, scale: float, niter: int = 0,
                      oversample: int = 10) -> tuple[Tensor, Tensor]:
    """PiSSA's ``A: [r, in]`` and ``B: [out, r]`` with ``scale · B @ A`` the top-``rank`` SVD of ``w``.

    Args:
        w: weight ``[out, in]``; the SVD runs in fp32, or in fp64 for fp64 weights, and the
            factors come back in that dtype.
        rank: number of singular triplets.
        scale: the LoRA scaling ``s`` the factors will be multiplied by.
        niter: 0 for the exact SVD (``torch.linalg.svd``, as PEFT's ``"pissa"``), otherwise the
            power iterations of ``torch.svd_lowrank``.
        oversample: with ``niter > 0``, ``q = min(rank + oversample, *w.shape)``; 0 is PEFT's
            ``"pissa_niter_[n]"`` (``q = rank``).
    """
    w = w.detach().to(torch.promote_types(w.dtype, torch.float32))
    if niter > 0:
        q = min(rank + oversample, *w.shape)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)  # v: (in, q)
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
    source = ("Meng et al., 2024, PiSSA, arXiv:2404.02948 (init from the top-r SVD, residual frozen); "
              "as Hugging Face PEFT's init_lora_weights='pissa'; "
              "Wang et al., 2024, BoRA, arXiv:2412.06441, §4 baselines and table 1; "
              "shape conventions: docs/conventions.md")

    def __init__(self, base, cfg: PiSSAConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        w = base.weight
        a, b = principal_factors(w, cfg.rank, self.scale, cfg.svd_niter, cfg.svd_oversample)
        self.lora_A = nn.Parameter(a.to(w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(b.to(w.dtype))  # (out, r)
        with torch.no_grad():
            res = torch.addmm(w.detach().to(a.dtype), b, a, alpha=-self.scale)  # W0 − s·B@A (out, in), fp32/fp64
        self.register_buffer("w_res", res.to(w.dtype), persistent=False)

    def effective_weight(self) -> Tensor:
        return combined_weight(self.w_res, self.lora_A, self.lora_B, self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_res, self.base.bias) + lora_delta(x, self.lora_A, self.lora_B, self.scale)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: PiSSAConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out)
