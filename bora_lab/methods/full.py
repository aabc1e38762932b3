"""Full fine-tuning of a layer: every weight (and the bias) of the wrapped Linear is trainable."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear
from .registry import register


@register("full", AdapterConfig)
class FullLinear(AdapterLinear):
    """Full fine-tuning: a trainable copy ``W`` (and ``b``) of the layer; ``W0`` stays as reference."""

    description = "Full fine-tuning of the targeted layers (all their weights and biases)"
    uses_rank = False
    formula = r"W = W_0 + \Delta W,\ \Delta W \in \mathbb{R}^{out \times in}\ \text{dense}"
    paper = "Full fine-tuning (FT), the baseline of the LoRA, DoRA and BoRA papers"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), 'Full Fine-Tuning (FFT)'; "
              "Wang et al., 2024, BoRA, arXiv:2412.06441, figures 2-3 (full parameter tuning)")

    def __init__(self, base, cfg: AdapterConfig):
        super().__init__(base, cfg)
        self.full_weight = nn.Parameter(base.weight.detach().clone())
        self.full_bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())

    @property
    def bias(self) -> Tensor | None:
        return self.full_bias if self.full_bias is not None else self.base.bias

    def effective_weight(self) -> Tensor:
        return self.full_weight

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.full_weight, self.bias)

    def merge(self) -> None:
        """Merging full fine-tuning also writes the trained bias; unmerge restores both."""
        if self.merged:
            return
        super().merge()
        if self.full_bias is not None:
            self._b0_backup = self.base.bias.detach().clone()
            self.base.bias.data.copy_(self.full_bias.detach())

    def unmerge(self) -> None:
        if not self.merged:
            return
        super().unmerge()
        if self.full_bias is not None:
            self.base.bias.data.copy_(self._b0_backup)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig, bias: bool = True) -> int:
        return d_in * d_out + (d_out if bias else 0)
