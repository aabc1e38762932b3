"""VeRA (Kopiczko et al., arXiv:2310.11454) and DVoRA (VeRA + DoRA's magnitude, Liu et al. 2024).

VeRA freezes one pair of random matrices ``A: [r, in]``, ``B: [out, r]`` shared by the layers and
trains only two scaling vectors: ``ΔW = diag(b) B diag(d) A`` with ``d: [r]`` (init ``d_initial``)
and ``b: [out]`` (init 0, so ``ΔW = 0``). Trainable: ``r + out`` per layer.

Sharing: A and B are drawn (Kaiming-uniform, as VeRA and PEFT) from a CPU generator seeded with
``seed``, so every layer of one shape gets the same matrices on any device, and a file holding the
trainable vectors reproduces the model. Memory: each layer keeps its own copy of the frozen pair as
non-persistent buffers, ``r·(in + out)`` values per layer; PEFT keeps one ``[r, max_in]`` and
``[max_out, r]`` pair for the whole model and slices it, which saves that memory but ties layers of
different shapes to overlapping slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear, NormConfig, safe_norm
from .registry import register

INITS = ("kaiming_uniform", "orthogonal", "gaussian")


def frozen_random(shape: tuple[int, int], generator: torch.Generator, init: str, like: Tensor) -> Tensor:
    """A random matrix drawn on the CPU from ``generator`` (device independent), cast like ``like``.

    Args:
        shape: ``(rows, cols)``.
        generator: seeded CPU generator; draws advance it.
        init: ``"kaiming_uniform"`` (LoRA's A init, bound ``1/sqrt(cols)``), ``"orthogonal"``
            (orthonormal rows or columns) or ``"gaussian"`` (std ``1/sqrt(cols)``).
        like: tensor whose device and dtype the result takes.
    """
    t = torch.empty(shape)
    if init == "kaiming_uniform":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    elif init == "orthogonal":
        nn.init.orthogonal_(t, generator=generator)
    elif init == "gaussian":
        nn.init.normal_(t, 0.0, 1.0 / math.sqrt(shape[1]), generator=generator)
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return t.to(device=like.device, dtype=like.dtype)


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA options. ``alpha`` is not used: the vectors ``b`` and ``d`` carry the scale."""

    seed: int = field(default=0, metadata={"help": "seed of the shared frozen random A and B", "min": 0})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every entry of d (PEFT: 0.1)"})


@dataclass
class DVoRAConfig(VeRAConfig, NormConfig):
    """DVoRA options: VeRA's plus DoRA's norm handling."""


class VeRAProjection(nn.Module):
    """The shared frozen pair ``A: [r, in]``, ``B: [out, r]`` and the trainable vectors ``d: [r]``, ``b: [out]``."""

    def __init__(self, d_in: int, d_out: int, cfg: VeRAConfig, like: Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("A", frozen_random((cfg.rank, d_in), g, "kaiming_uniform", like), persistent=False)
        self.register_buffer("B", frozen_random((d_out, cfg.rank), g, "kaiming_uniform", like), persistent=False)
        self.d = nn.Parameter(torch.full((cfg.rank,), float(cfg.d_initial), device=like.device, dtype=like.dtype))
        self.b = nn.Parameter(torch.zeros(d_out, device=like.device, dtype=like.dtype))

    def delta_weight(self) -> Tensor:
        """``ΔW = diag(b) B diag(d) A``: ``[out, in]``, in the vectors' dtype even under autocast."""
        with torch.autocast(self.A.device.type, enabled=False):
            return (self.b.unsqueeze(1) * self.B) @ (self.d.unsqueeze(1) * self.A)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ ΔWᵀ`` without building ``ΔW``: ``b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ)``."""
        h = F.linear(x, self.A)  # (..., r)
        y = F.linear(h * self.d.to(h.dtype), self.B)  # (..., out)
        return y * self.b.to(y.dtype)


@register("vera", VeRAConfig)
class VeRALinear(AdapterLinear):
    """VeRA: ``W = W0 + diag(b) B diag(d) A`` with A, B frozen, random and shared."""

    description = "VeRA: shared frozen random A, B; trains only the scaling vectors d (rank) and b (output)"
    formula = r"W = W_0 + \operatorname{diag}(b)\,B\,\operatorname{diag}(d)\,A,\ A,B\ \text{frozen random, shared},\ b_0=0"
    paper = "Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), DoRA summary (VeRA/DVoRA); "
              "shape conventions: docs/conventions.md")

    def __init__(self, base, cfg: VeRAConfig):
        super().__init__(base, cfg)
        self.vera = VeRAProjection(self.in_features, self.out_features, cfg, base.weight)

    def effective_weight(self) -> Tensor:
        return self.weight0 + self.vera.delta_weight()

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight, self.base.bias) + self.vera(x)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: VeRAConfig, bias: bool = True) -> int:
        return cfg.rank + d_out


@register("dvora", DVoRAConfig)
class DVoRALinear(AdapterLinear):
    """DVoRA: ``V = W0 + diag(b) B diag(d) A``, ``W = diag(m / ||V||_row) V``, ``m: [out]``."""

    description = "DVoRA: VeRA direction + trainable magnitude per output feature (DoRA on VeRA)"
    magnitude_axis = "row (per output feature)"
    formula = (r"V = W_0 + \operatorname{diag}(b)\,B\,\operatorname{diag}(d)\,A,\ "
               r"W = \operatorname{diag}\!\left(\frac{m}{\lVert V \rVert_{\text{row}}}\right) V,\ m\in\mathbb{R}^{out}")
    paper = "Liu et al. 2024, DoRA (arXiv:2402.09353) section 5 (DVoRA), on VeRA (arXiv:2310.11454)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), DoRA summary: "
              "'Improved VeRA performance'; "
              "Liu et al., 2024, DoRA, arXiv:2402.09353")

    def __init__(self, base, cfg: DVoRAConfig):
        super().__init__(base, cfg)
        self.vera = VeRAProjection(self.in_features, self.out_features, cfg, base.weight)
        with torch.no_grad():
            self.magnitude = nn.Parameter(safe_norm(base.weight, 1, 0.0).clone())  # (out,)

    def magnitudes(self) -> dict[str, Tensor]:
        return {"m_r": self.magnitude}

    def direction(self) -> Tensor:
        """The dense ``V = W0 + ΔW`` (``[out, in]``)."""
        return self.weight0 + self.vera.delta_weight()

    def scale_vector(self) -> Tensor:
        """``m / ||V||_row`` (``[out]``); the norm is detached unless ``detach_norm=False``."""
        if self.cfg.detach_norm:
            with torch.no_grad():
                norm = safe_norm(self.direction(), 1, self.cfg.eps)
        else:
            norm = safe_norm(self.direction(), 1, self.cfg.eps)
        return self.magnitude / norm

    def effective_weight(self) -> Tensor:
        return self.scale_vector().unsqueeze(1) * self.direction()

    def adapter_forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight) + self.vera(x)  # (..., out)
        y = y * self.scale_vector().to(y.dtype)  # keep bf16 activations bf16 under autocast
        return y if self.base.bias is None else y + self.base.bias

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: DVoRAConfig, bias: bool = True) -> int:
        return cfg.rank + 2 * d_out
