"""LoRA (Hu et al., arXiv:2106.09685) and rsLoRA (Kalajdzievski, arXiv:2312.03732)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .base import AdapterConfig, AdapterLinear, combined_weight, lora_delta, low_rank_pair
from .registry import register


@register("lora", AdapterConfig)
class LoRALinear(AdapterLinear):
    """LoRA: ``W = W0 + s · B @ A``, ``A: [r, in]``, ``B: [out, r]`` (zero init), ``s = alpha / r``."""

    description = "Low-rank update W0 + s·BA; no magnitude vector"
    formula = r"W = W_0 + \frac{\alpha}{r} B A"
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), LoRA section; "
              "Wang et al., 2024, BoRA, arXiv:2412.06441, §2.2")

    def __init__(self, base, cfg: AdapterConfig):
        super().__init__(base, cfg)
        self.scale = self.scaling(cfg)
        self.lora_A, self.lora_B = low_rank_pair(self.in_features, self.out_features, cfg.rank, base.weight)

    @staticmethod
    def scaling(cfg: AdapterConfig) -> float:
        return cfg.alpha / cfg.rank

    def effective_weight(self) -> Tensor:
        return combined_weight(self.weight0, self.lora_A, self.lora_B, self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight, self.base.bias) + lora_delta(x, self.lora_A, self.lora_B, self.scale)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig, bias: bool = True) -> int:
        return cfg.rank * (d_in + d_out)


@register("rslora", AdapterConfig)
class RsLoRALinear(LoRALinear):
    """rsLoRA: LoRA with the rank-stabilised scaling ``s = alpha / sqrt(r)``."""

    description = "LoRA with rank-stabilised scaling s = alpha/sqrt(r)"
    formula = r"W = W_0 + \frac{\alpha}{\sqrt{r}} B A"
    paper = "Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (arXiv:2312.03732)"
    source = "Wang et al., 2024, BoRA, arXiv:2412.06441, §4.1 (baselines)"

    @staticmethod
    def scaling(cfg: AdapterConfig) -> float:
        return cfg.alpha / math.sqrt(cfg.rank)
