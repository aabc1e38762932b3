"""The contract every layer-level method follows, and the helpers methods share.

A layer-level method wraps one frozen ``nn.Linear`` (weight ``W0: [out, in]``) and adds trainable
tensors. It must provide:

* ``effective_weight()``: the dense merged weight ``W: [out, in]`` (used by merge and analysis);
* ``adapter_forward(x)``: a fast forward equal to ``F.linear(x, effective_weight(), bias)``
  that never builds ``W`` for the matmul (norm-based methods may build ``W0 + s·B@A`` for norms);
* ``num_params(d_in, d_out, cfg, bias)``: the analytic trainable parameter count.

``merge()``/``unmerge()`` live here once: merge writes ``W`` into the base layer and keeps a copy
of ``W0``; unmerge restores that copy exactly. Both are idempotent.
"""
from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AdapterConfig:
    """Options every method accepts. Rank/alpha are ignored by methods with ``uses_rank = False``."""

    rank: int = field(default=8, metadata={"help": "rank r of the update", "min": 1})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: s = alpha / r", "min": 0.0})


@dataclass
class NormConfig(AdapterConfig):
    """Options of the weight-decomposed methods (DoRA family, BoRA)."""

    detach_norm: bool = field(
        default=True, metadata={"help": "treat the norms as constants in backward (DoRA sec. 4.3, PEFT)"}
    )
    eps: float = field(default=1e-6, metadata={"help": "lower bound of every norm in a division", "min": 0.0})


class AdapterLinear(nn.Module, metaclass=ABCMeta):
    """Base of every layer-level method. Freezes ``base``; all other parameters are the adapter.

    Subclasses set the class metadata below (the registry and method cards read it).
    """

    name: str = ""  # set by @register
    config_cls: type = AdapterConfig  # set by @register
    kind = "layer"  # "layer": wraps nn.Linear; "model": changes the model around the layers
    description = ""  # one line for the UI
    magnitude_axis = "none"  # "none" | "row (per output feature)" | "column (per input feature)" | "row + column"
    mergeable = True
    has_effective_weight = True
    uses_rank = True
    identity_at_init = True
    formula = ""  # LaTeX
    paper = ""
    source = ""  # where in the paper / lecture notes: section, equation, table

    def __init__(self, base: nn.Linear, cfg: AdapterConfig):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        if self.uses_rank:
            check_rank(cfg.rank, self.in_features, self.out_features)
        self.base = base
        self.cfg = cfg
        for p in base.parameters():
            p.requires_grad_(False)
        self.merged = False
        self.register_buffer("_w0_backup", None, persistent=False)

    # -- what subclasses implement -------------------------------------------------------------
    @abstractmethod
    def effective_weight(self) -> Tensor:
        """The dense merged weight ``W: [out, in]``."""

    @abstractmethod
    def adapter_forward(self, x: Tensor) -> Tensor:
        """Unmerged forward, equal to ``F.linear(x, self.effective_weight(), self.bias)``."""

    @staticmethod
    @abstractmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig, bias: bool = True) -> int:
        """Analytic trainable parameter count of one wrapped ``[d_out, d_in]`` layer."""

    def magnitudes(self) -> dict[str, Tensor]:
        """The method's magnitude vectors, e.g. ``{"m_r": [out]}``; empty if it has none."""
        return {}

    @torch.no_grad()
    def inspect(self) -> dict[str, Any]:
        """What the "Inside a layer" view shows besides ``W``: plain JSON-ready lists and numbers.

        Returns ``{"rank": chosen rank or None, "magnitudes": {"m_r": [out], ...}}``; methods add
        their own keys (SBoRA ``touched``, MoRA ``mora`` and ``rank_name``, QLoRA ``nf4``,
        LoRA2/AdaLoRA ``budget``).
        """
        mags = {k: v.detach().float().cpu().tolist() for k, v in self.magnitudes().items()}
        return {"rank": self.cfg.rank if self.uses_rank else None, "magnitudes": mags}

    # -- shared machinery ----------------------------------------------------------------------
    @property
    def weight0(self) -> Tensor:
        """The pretrained weight ``W0`` (also while merged)."""
        return self._w0_backup if self.merged else self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        return self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``effective_weight()`` into the base layer (idempotent)."""
        if self.merged:
            return
        w = self.effective_weight().to(self.base.weight.dtype)
        self._w0_backup = self.base.weight.detach().clone()
        self.base.weight.copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact ``W0`` saved by :meth:`merge` (idempotent)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    def extra_repr(self) -> str:
        r = f", rank={self.cfg.rank}" if self.uses_rank else ""
        return f"method={self.name}, in={self.in_features}, out={self.out_features}{r}"


# -- helpers shared by methods (composition, not inheritance) -----------------------------------
def check_rank(rank: int, d_in: int, d_out: int) -> None:
    """Raise a ValueError unless ``1 <= rank <= min(d_in, d_out)``."""
    if not isinstance(rank, int) or rank < 1 or rank > min(d_in, d_out):
        raise ValueError(
            f"rank {rank} is invalid for a layer of shape [out={d_out}, in={d_in}]: "
            f"choose 1 <= rank <= {min(d_in, d_out)}"
        )


def low_rank_pair(d_in: int, d_out: int, rank: int, like: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's ``A: [r, in]`` (Kaiming-uniform, as PEFT) and ``B: [out, r]`` (zeros, so ΔW = 0 at init)."""
    a = torch.empty(rank, d_in, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(d_out, rank, device=like.device, dtype=like.dtype)
    return nn.Parameter(a), nn.Parameter(b)


def lora_delta(x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``s · (x @ A.T) @ B.T`` without building ``B @ A``."""
    return F.linear(F.linear(x, a), b) * scale


def combined_weight(w0: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``V = W0 + s · B @ A`` as one fused ``addmm`` (the only dense matrix norm methods need).

    Computed in the weights' own dtype even under autocast: norms of a bf16-rounded ``V`` would
    drift from those of the fp32 weights that merge() writes.
    """
    with torch.autocast(w0.device.type, enabled=False):
        return torch.addmm(w0, b.to(w0.dtype), a.to(w0.dtype), alpha=scale)


def safe_norm(v: Tensor, dim: int, eps: float) -> Tensor:
    """``||v||`` along ``dim``, bounded below by ``eps``, returned in v's dtype.

    Accumulated in at least fp32: bf16/fp16 are upcast to fp32, fp32 and fp64 keep their own dtype
    (``vector_norm`` refuses to narrow fp64 to fp32, so a fixed fp32 accumulator broke fp64 weights).
    """
    acc = torch.promote_types(v.dtype, torch.float32)
    return torch.linalg.vector_norm(v, dim=dim, dtype=acc).clamp_min(eps).to(v.dtype)


class ModelMethod:
    """Base of model-level methods (adapters, prompts, BitFit, head only...).

    They change the model around its layers instead of wrapping one Linear, so they have no
    ``effective_weight()`` (the analysis says "not applicable") and usually no merge.
    Subclasses implement :meth:`apply_to_model` and :meth:`count_params`.
    """

    name: str = ""
    config_cls: type = AdapterConfig
    kind = "model"
    description = ""
    magnitude_axis = "none"
    mergeable = False
    has_effective_weight = False
    uses_rank = False
    identity_at_init = True
    formula = ""
    paper = ""
    source = ""

    @classmethod
    def default_targets(cls, model: nn.Module) -> list[str]:
        """Module names the method targets when the caller names none; ``[]`` if it targets no layer."""
        return []

    @classmethod
    def apply_to_model(cls, model: nn.Module, cfg, target_modules: list[str] | None) -> None:
        """Modify ``model`` in place; every parameter left with ``requires_grad`` is the method's."""
        raise TypeError(f"{cls.__name__} must implement apply_to_model()")

    @classmethod
    def count_params(cls, model: nn.Module, cfg, target_modules: list[str] | None) -> int:
        """Analytic trainable parameter count on ``model`` (checked against the real count in tests)."""
        raise TypeError(f"{cls.__name__} must implement count_params()")
