"""BoRA (Wang et al., 2024, arXiv:2412.06441, §3.2, eq. 3): bi-dimensional weight decomposition.

1. ``V = W0 + s·B@A``; normalise rows and rescale by ``m_r: [out]``: ``M = diag(m_r/||V||_row) V``.
2. normalise the columns of ``M`` and rescale by ``m_c: [in]``: ``W = M diag(m_c/||M||_col)``.

After any step the columns of ``W`` have norms exactly ``m_c``; the rows do not have norms ``m_r``.
Both norms are taken without building ``V`` where that is faster (see :func:`base.factored_norm_stats`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (AdapterLinear, NormConfig, combined_weight, factored_norm_stats, lora_delta, low_rank_pair,
                   lowrank_row_sq_norms, lowrank_weighted_col_sq_norms, safe_norm, sq_norm_to_norm)
from .registry import register


@register("bora", NormConfig)
class BoRALinear(AdapterLinear):
    """BoRA: ``W = diag(m_r/||V||_row) · V · diag(m_c/c)``, ``c = ||diag(m_r/||V||_row) V||_col``."""

    description = "BoRA: LoRA direction + magnitudes on both axes (rows, then columns)"
    magnitude_axis = "row + column"
    formula = (
        r"V = W_0 + sBA,\quad M = \operatorname{diag}\!\left(\tfrac{m_r}{\lVert V\rVert_{\text{row}}}\right)V,"
        r"\quad W = M\,\operatorname{diag}\!\left(\tfrac{m_c}{\lVert M\rVert_{\text{col}}}\right)"
    )
    paper = "Wang et al. 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation (arXiv:2412.06441)"
    source = ("Wang et al., 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation, arXiv:2412.06441, "
              "§3.2, eq. 3")
    norm_path = "auto"  # "auto" (measured rule) | "dense" | "factored": see base.factored_norm_stats

    def __init__(self, base, cfg: NormConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        self.lora_A, self.lora_B = low_rank_pair(self.in_features, self.out_features, cfg.rank, base.weight)
        with torch.no_grad():
            self.m_r = nn.Parameter(safe_norm(base.weight, 1, 0.0).clone())  # [out]
            self.m_c = nn.Parameter(safe_norm(base.weight, 0, 0.0).clone())  # [in]

    def magnitudes(self) -> dict[str, Tensor]:
        return {"m_r": self.m_r, "m_c": self.m_c}

    def _norms(self, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``||V||_row`` (``[out]``) and ``c = ||diag(m_r/||V||_row) V||_col`` (``[in]``), at least ``eps``.

        From ``v`` (the dense ``V``) when given; otherwise factored (:func:`base.lowrank_row_sq_norms`,
        :func:`base.lowrank_weighted_col_sq_norms`), or from a dense ``V`` where that is faster.
        """
        eps = self.cfg.eps
        stats = None if v is not None else factored_norm_stats(self, "bora")
        if stats is None:
            if v is None:
                v = combined_weight(self.weight0, self.lora_A, self.lora_B, self.scale)  # (out, in)
            v2 = v.square()
            row = v2.sum(1).clamp_min(eps * eps).sqrt()  # ||V||_row: (out,)
            # ||diag(m_r/row) V||_col without a second scaled copy of V: sqrt((m_r/row)^2 @ V∘V)
            col = ((self.m_r / row).square() @ v2).clamp_min(eps * eps).sqrt()  # (in,)
            return row, col
        w0, a, b = self.base.weight, self.lora_A, self.lora_B
        row = sq_norm_to_norm(lowrank_row_sq_norms(w0, a, b, self.scale, stats), eps, w0.dtype)  # (out,)
        d2 = (self.m_r / row).square()  # (out,)
        col = sq_norm_to_norm(lowrank_weighted_col_sq_norms(w0, a, b, self.scale, d2, stats), eps, w0.dtype)
        return row, col

    def _scales(self, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Row scale ``m_r/||V||_row`` ([out]) and column scale ``m_c/c`` ([in]).

        The norms are constants in backward unless ``detach_norm=False``; ``v``: the dense ``V`` if
        the caller has built it already.
        """
        if self.cfg.detach_norm:
            with torch.no_grad():
                row, col = self._norms(v)
        else:
            row, col = self._norms(v)
        return self.m_r / row, self.m_c / col

    def effective_weight(self) -> Tensor:
        v = combined_weight(self.weight0, self.lora_A, self.lora_B, self.scale)  # (out, in)
        r, c = self._scales(v)
        return r.unsqueeze(1) * v * c.unsqueeze(0)

    def adapter_forward(self, x: Tensor) -> Tensor:
        r, c = self._scales()
        xs = x * c.to(x.dtype)  # (..., in)
        y = F.linear(xs, self.base.weight) + lora_delta(xs, self.lora_A, self.lora_B, self.scale)
        y = y * r.to(y.dtype)  # (..., out)
        return y if self.base.bias is None else y + self.base.bias

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: NormConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out) + d_in + d_out
