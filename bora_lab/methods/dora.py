"""DoRA (Liu et al., arXiv:2402.09353) on both axes, and its magnitude-only ablation.

``V = W0 + s·B@A`` is the direction; a trainable magnitude rescales it per row (output feature,
what PEFT's ``use_dora`` and the official code do) or per column (input feature, the BoRA paper's
reading). Norms are constants in backward by default (DoRA section 4.3). The norms are taken
without building ``V`` where that is faster (see :func:`base.factored_norm_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (AdapterConfig, AdapterLinear, NormConfig, combined_weight, factored_norm_stats, lora_delta,
                   low_rank_pair, lowrank_col_sq_norms, lowrank_row_sq_norms, safe_norm, sq_norm_to_norm)
from .registry import register


class _NormedLowRank(AdapterLinear):
    """Shared state of DoRA-style layers: A, B, scale and the direction norm along ``norm_dim``."""

    norm_dim = 1  # 1: row norms [out]; 0: column norms [in]
    norm_path = "auto"  # "auto" (measured rule) | "dense" | "factored": see base.factored_norm_stats

    def __init__(self, base, cfg: NormConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        self.lora_A, self.lora_B = low_rank_pair(self.in_features, self.out_features, cfg.rank, base.weight)
        with torch.no_grad():
            self.magnitude = nn.Parameter(safe_norm(base.weight, self.norm_dim, 0.0).clone())

    def direction(self) -> Tensor:
        """The dense ``V = W0 + s·B@A`` (``[out, in]``)."""
        return combined_weight(self.weight0, self.lora_A, self.lora_B, self.scale)

    def direction_norm(self, v: Tensor | None = None) -> Tensor:
        """``||V||`` along the method's axis (``[out]`` rows or ``[in]`` columns), at least ``eps``.

        From ``v`` (the dense ``V``) when given; otherwise factored from ``W0``'s cached norms and
        thin matmuls with ``A``/``B`` (:func:`base.lowrank_row_sq_norms`), or from a dense ``V`` where
        that is faster. Both are differentiable in ``A`` and ``B``.
        """
        stats = None if v is not None else factored_norm_stats(self, "dora" if self.norm_dim == 1 else "dora_col")
        if stats is None:
            return safe_norm(self.direction() if v is None else v, self.norm_dim, self.cfg.eps)
        w0 = self.base.weight
        sq_norms = lowrank_row_sq_norms if self.norm_dim == 1 else lowrank_col_sq_norms
        return sq_norm_to_norm(sq_norms(w0, self.lora_A, self.lora_B, self.scale, stats), self.cfg.eps, w0.dtype)

    def scale_vector(self, v: Tensor | None = None) -> Tensor:
        """``m / ||V||`` along the method's axis; the norm is detached unless ``detach_norm=False``.

        ``v``: the dense ``V`` if the caller has built it already (its norms are then read from it).
        """
        if self.cfg.detach_norm:
            with torch.no_grad():
                norm = self.direction_norm(v)
        else:
            norm = self.direction_norm(v)
        return self.magnitude / norm

    def magnitudes(self) -> dict[str, Tensor]:
        return {"m_r" if self.norm_dim == 1 else "m_c": self.magnitude}


@register("dora", NormConfig)
class DoRALinear(_NormedLowRank):
    """DoRA, magnitude per output feature (row): ``W = diag(m / ||V||_row) @ V``, ``m: [out]``."""

    description = "DoRA: LoRA direction + trainable magnitude per output feature (as PEFT use_dora)"
    magnitude_axis = "row (per output feature)"
    formula = r"W = \operatorname{diag}\!\left(\frac{m}{\lVert W_0 + sBA \rVert_{\text{row}}}\right)(W_0 + sBA),\ m\in\mathbb{R}^{out}"
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"
    source = ("Liu et al., 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv:2402.09353, "
              "§3 (weight decomposition analysis) and §4 (method); "
              "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), DoRA section")
    norm_dim = 1

    def effective_weight(self) -> Tensor:
        v = self.direction()  # (out, in)
        return self.scale_vector(v).unsqueeze(1) * v

    def adapter_forward(self, x: Tensor) -> Tensor:
        # y = (m/||V||_row) * (x @ W0.T + s (x @ A.T) @ B.T) + b   -- (..., out)
        y = F.linear(x, self.base.weight) + lora_delta(x, self.lora_A, self.lora_B, self.scale)
        y = y * self.scale_vector().to(y.dtype)  # keep bf16 activations bf16 under autocast
        return y if self.base.bias is None else y + self.base.bias

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: NormConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out) + d_out


@register("dora_col", NormConfig)
class DoRAColLinear(_NormedLowRank):
    """DoRA, magnitude per input feature (column): ``W = V @ diag(m / ||V||_col)``, ``m: [in]``."""

    description = "DoRA with the magnitude per input feature (the BoRA paper's reading of DoRA)"
    magnitude_axis = "column (per input feature)"
    formula = r"W = (W_0 + sBA)\operatorname{diag}\!\left(\frac{m}{\lVert W_0 + sBA \rVert_{\text{col}}}\right),\ m\in\mathbb{R}^{in}"
    paper = ("Liu et al. 2024 (DoRA, arXiv:2402.09353) as read by Wang et al. 2024 (BoRA, arXiv:2412.06441): "
             "column magnitude")
    source = ("Wang et al., 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation, arXiv:2412.06441, "
              "§3.1 (eq. 1) and §4.4.2 (table 4, ablation of direction); "
              "axis conventions: docs/conventions.md")
    norm_dim = 0

    def effective_weight(self) -> Tensor:
        v = self.direction()  # (out, in)
        return v * self.scale_vector(v).unsqueeze(0)

    def adapter_forward(self, x: Tensor) -> Tensor:
        xs = x * self.scale_vector().to(x.dtype)  # scale inputs: (..., in)
        return F.linear(xs, self.base.weight, self.base.bias) + lora_delta(xs, self.lora_A, self.lora_B, self.scale)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: NormConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out) + d_in


@dataclass
class MagnitudeConfig(AdapterConfig):
    """Magnitude-only DoRA: ``W0``'s norms are constants, so there is nothing to detach."""

    eps: float = field(default=1e-6, metadata={"help": "lower bound of ||W0||_row in the division", "min": 0.0})


@register("dora_mag", MagnitudeConfig)
class DoRAMagLinear(AdapterLinear):
    """Magnitude-only DoRA: the direction stays ``W0``; ``W = diag(m / ||W0||_row) @ W0``."""

    description = "Magnitude only: train one scale per output feature, direction frozen at W0"
    magnitude_axis = "row (per output feature)"
    uses_rank = False
    formula = r"W = \operatorname{diag}\!\left(\frac{m}{\lVert W_0 \rVert_{\text{row}}}\right) W_0"
    paper = "Liu et al. 2024 (DoRA, arXiv:2402.09353), magnitude-only ablation"
    source = ("Liu et al., 2024, DoRA, arXiv:2402.09353, table 6 (magnitude-only modules); "
              "axis conventions: docs/conventions.md")

    def __init__(self, base, cfg: MagnitudeConfig):
        super().__init__(base, cfg)
        with torch.no_grad():
            norm = safe_norm(base.weight, 1, 0.0)
            self.magnitude = nn.Parameter(norm.clone())
            self.register_buffer("w0_norm", norm.clamp_min(cfg.eps).clone(), persistent=False)

    def magnitudes(self) -> dict[str, Tensor]:
        return {"m_r": self.magnitude}

    def effective_weight(self) -> Tensor:
        return (self.magnitude / self.w0_norm).unsqueeze(1) * self.weight0

    def adapter_forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight)
        y = y * (self.magnitude / self.w0_norm).to(y.dtype)
        return y if self.base.bias is None else y + self.base.bias

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: MagnitudeConfig, bias: bool = True) -> int:
        return d_out
