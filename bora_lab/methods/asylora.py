"""AsyLoRA (Zhu et al., arXiv:2402.16842): LoRA with ``A`` frozen at a random matrix, only ``B`` trained.

The asymmetry paper finds that ``B`` does the learning and a random ``A`` serves as well as a trained
one, so freezing ``A`` halves LoRA's trainable parameters to ``r · out`` per layer.

``A`` is a non-persistent buffer drawn from a CPU generator seeded with ``seed`` (device
independent, and the same for every layer of one shape), so a file holding only ``B`` reproduces
the model. ``B = 0`` at init: the layer starts at the pretrained function.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear, combined_weight, lora_delta
from .registry import register
from .vera import INITS, frozen_random


@dataclass
class AsyLoRAConfig(AdapterConfig):
    """AsyLoRA options."""

    seed: int = field(default=0, metadata={"help": "seed of the frozen random A", "min": 0})
    a_init: str = field(default="kaiming_uniform", metadata={
        "help": "distribution of the frozen A (kaiming_uniform = LoRA's A init)", "choices": list(INITS)})

    def __post_init__(self):
        if self.a_init not in INITS:
            raise ValueError(f"a_init must be one of {list(INITS)}, got {self.a_init!r}")


@register("asylora", AsyLoRAConfig)
class AsyLoRALinear(AdapterLinear):
    """AsyLoRA: ``W = W0 + s · B @ A`` with ``A: [r, in]`` frozen random and ``B: [out, r]`` trained (zero init)."""

    description = "AsyLoRA: LoRA with A frozen at random, only B trained (half of LoRA's parameters)"
    formula = r"W = W_0 + \frac{\alpha}{r} B A,\ A\ \text{frozen random},\ B_0 = 0"
    paper = "Zhu et al. 2024, Asymmetry in Low-Rank Adapters of Foundation Models (arXiv:2402.16842)"
    source = ("Wang et al., 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation, arXiv:2412.06441, "
              "§4 baselines and table 1; "
              "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), MoRA section (comparison table)")

    def __init__(self, base, cfg: AsyLoRAConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        w = base.weight
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("lora_A", frozen_random((cfg.rank, self.in_features), g, cfg.a_init, w),
                             persistent=False)  # (r, in), frozen
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))

    def effective_weight(self) -> Tensor:
        return combined_weight(self.weight0, self.lora_A, self.lora_B, self.scale)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight, self.base.bias) + lora_delta(x, self.lora_A, self.lora_B, self.scale)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AsyLoRAConfig, bias: bool = True) -> int:
        return cfg.rank * d_out
