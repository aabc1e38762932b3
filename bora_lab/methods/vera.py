"""VeRA (Kopiczko et al., 2023) and DVoRA (VeRA + DoRA's magnitude, Liu et al., 2024).

References:
    Kopiczko, Blankevoort and Asano, 2023, "VeRA: Vector-based Random Matrix Adaptation",
    arXiv:2310.11454 (ICLR 2024). Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
    arXiv:2402.09353 (DVoRA: DoRA's magnitude on VeRA's update).

VeRA freezes one pair of random matrices ``A: [r, in]``, ``B: [out, r]`` shared by the layers and
trains only two scaling vectors: ``ΔW = diag(b) B diag(d) A`` with ``d: [r]`` (init ``d_initial``)
and ``b: [out]`` (init 0, so ``ΔW = 0``). Trainable: ``r + out`` per layer.

Init of A and B (option ``init``). The paper initialises the frozen pair with Kaiming
initialisation; Hugging Face PEFT (``peft/tuners/vera/model.py``, ``_kaiming_init``) draws
``U(-bound, bound)`` with ``bound = sqrt(3) · sqrt(2) / sqrt(fan_in) = sqrt(6 / fan_in)``, i.e.
Kaiming-uniform with gain ``sqrt(2)`` (He et al.'s ReLU gain), where ``fan_in`` is the second
dimension (``in`` for ``A``, ``r`` for ``B``). ``init="peft"`` (default) does exactly that: A is
drawn first, then B, from one CPU generator seeded with ``seed`` (PEFT: ``projection_prng_key``,
default 0 as ours). ``init="kaiming_a_sqrt5"`` is LoRA's A init (``kaiming_uniform_(a=sqrt(5))``,
``bound = 1 / sqrt(fan_in)``, ``sqrt(6)`` ≈ 2.45× smaller), what BoRA Lab used before; it is kept
only to reproduce old runs.

Sharing: every layer of one shape gets the same matrices on any device, and a file holding the
trainable vectors reproduces the model. When all targeted layers have one shape (e.g. square
attention projections only), our A and B are elementwise equal to PEFT's for the same seed.
Memory and mixed shapes: each layer keeps its own copy of the frozen pair as non-persistent buffers, ``r·(in + out)`` values per
layer, drawn for its own shape. PEFT keeps one ``[r, max_in]`` and ``[max_out, r]`` pair for the
whole model and slices ``A[:, :in]``, ``B[:out, :]``: that saves memory, but ties layers of
different shapes to overlapping slices, and a narrower layer's slice of A has PEFT's bound
``sqrt(6 / max_in)`` instead of our ``sqrt(6 / in)``. B's bound ``sqrt(6 / r)`` is the same in both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear, NormConfig, safe_norm
from .registry import register

INITS = ("kaiming_uniform", "orthogonal", "gaussian")  # frozen_random's (AsyLoRA's a_init)


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


VERA_INITS = ("peft", "kaiming_a_sqrt5")  # VeRAConfig.init: distribution of the frozen A, B


def vera_kaiming_bound(fan_in: int) -> float:
    """Half-width of VeRA's uniform init: ``sqrt(6 / fan_in)`` (Kaiming gain ``sqrt(2)``, as PEFT's ``_kaiming_init``)."""
    std = math.sqrt(2) / math.sqrt(fan_in)
    return math.sqrt(3.0) * std


def vera_random(shape: tuple[int, int], generator: torch.Generator, init: str, like: Tensor) -> Tensor:
    """One frozen VeRA matrix drawn on the CPU from ``generator``, cast like ``like``.

    ``init="peft"``: ``U(-b, b)`` with ``b = sqrt(6 / shape[1])`` (VeRA paper's Kaiming init as
    PEFT implements it); ``init="kaiming_a_sqrt5"``: LoRA's A init, ``b = 1 / sqrt(shape[1])``.
    """
    if init == "peft":
        bound = vera_kaiming_bound(shape[1])
        t = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        return t.to(device=like.device, dtype=like.dtype)
    if init == "kaiming_a_sqrt5":
        return frozen_random(shape, generator, "kaiming_uniform", like)
    raise ValueError(f"unknown VeRA init {init!r}; choose one of {', '.join(VERA_INITS)}")


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA options. ``alpha`` is not used: the vectors ``b`` and ``d`` carry the scale.

    PEFT's ``VeraConfig`` names: ``seed`` = ``projection_prng_key``, ``d_initial`` = ``d_initial``.
    """

    seed: int = field(default=0, metadata={"help": "seed of the shared frozen random A and B", "min": 0})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every entry of d (PEFT: 0.1)"})
    init: str = field(default="peft", metadata={
        "help": ("distribution of the frozen A, B. peft: Kaiming-uniform with gain sqrt(2), bound sqrt(6/fan_in), "
                 "as the VeRA paper (Kopiczko et al., 2023, arXiv:2310.11454) and PEFT's _kaiming_init; "
                 "kaiming_a_sqrt5: LoRA's A init, bound 1/sqrt(fan_in) (sqrt(6) times smaller; BoRA Lab's old init)"),
        "choices": list(VERA_INITS)})

    def __post_init__(self):
        if self.init not in VERA_INITS:
            raise ValueError(f"init must be one of {list(VERA_INITS)}, got {self.init!r}")


@dataclass
class DVoRAConfig(VeRAConfig, NormConfig):
    """DVoRA options: VeRA's plus DoRA's norm handling."""


class VeRAProjection(nn.Module):
    """The shared frozen pair ``A: [r, in]``, ``B: [out, r]`` and the trainable vectors ``d: [r]``, ``b: [out]``."""

    def __init__(self, d_in: int, d_out: int, cfg: VeRAConfig, like: Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        # A first, then B, from one generator: the order PEFT draws them in
        self.register_buffer("A", vera_random((cfg.rank, d_in), g, cfg.init, like), persistent=False)
        self.register_buffer("B", vera_random((d_out, cfg.rank), g, cfg.init, like), persistent=False)
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
    paper = "Kopiczko et al. 2023, VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)"
    source = ("Kopiczko et al., 2023, VeRA: Vector-based Random Matrix Adaptation, arXiv:2310.11454 "
              "(frozen A, B Kaiming-initialised; b = 0, d = d_initial); init of A, B as Hugging Face PEFT's "
              "VeRA (_kaiming_init: bound sqrt(6/fan_in)); "
              "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), DoRA summary (VeRA/DVoRA); "
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
    """DVoRA: ``V = W0 + diag(b) B diag(d) A``, ``W = diag(m / ||V||_row) V``, ``m: [out]``.

    A and B are VeRA's (same ``seed`` and ``init``, so the same matrices as ``vera``).
    """

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
