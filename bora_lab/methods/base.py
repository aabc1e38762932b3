"""The contract every layer-level method follows, and the helpers methods share.

A layer-level method wraps one frozen ``nn.Linear`` (weight ``W0: [out, in]``) and adds trainable
tensors. It must provide:

* ``effective_weight()``: the dense merged weight ``W: [out, in]`` (used by merge and analysis);
* ``adapter_forward(x)``: a fast forward equal to ``F.linear(x, effective_weight(), bias)``
  that never builds ``W`` for the matmul (norm-based methods may build ``W0 + s·B@A`` for norms,
  or take its norms factored, see :func:`lowrank_row_sq_norms`);
* ``num_params(d_in, d_out, cfg, bias)``: the analytic trainable parameter count.

``merge()``/``unmerge()`` live here once: merge writes ``W`` into the base layer and keeps a copy
of ``W0``; unmerge restores that copy exactly. Both are idempotent.
"""
from __future__ import annotations

import math
import weakref
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


# -- norms of V = W0 + s·B@A without building V ------------------------------------------------
# DoRA (Liu et al. 2024, arXiv:2402.09353) and BoRA (Wang et al. 2024, arXiv:2412.06441, §3.2,
# eq. 3) need only norms of V = W0 + s·B@A (W0: [out, in], A: [r, in], B: [out, r]). Expanding
# the squares gives them from statistics of the frozen W0 (cached) and thin matmuls:
#   rows    ||V_i:||²      = ||W0_i:||² + 2s<(W0 Aᵀ)_i:, B_i:> + s²<(B A Aᵀ)_i:, B_i:>            [out]
#   columns ||V_:j||²      = ||W0_:j||² + 2s<A_:j, (Bᵀ W0)_:j> + s²<A_:j, (BᵀB A)_:j>              [in]
#   BoRA    Σ_i d_i² V_ij² = (d²)ᵀ(W0∘W0) + 2s<A_:j, ((d²∘B)ᵀ W0)_:j> + s²<A_:j, (Bᵀ(d²∘B) A)_:j> [in]
# Sums are taken in at least fp32 (as safe_norm). The expansion cancels where ||V|| << ||W0||, so
# squared norms may come out slightly negative: callers clamp them at eps² (see sq_norm_to_norm).

_STATS_ATTR = "_frozen_weight_stats"


class FrozenStats:
    """Statistics of one frozen weight, kept as a plain attribute of the module that owns it.

    Every adapter wrapping the same base ``nn.Linear`` reads the same cache. It is no buffer
    (never in ``state_dict``, not moved by ``.to()``), and deep copies and pickles start empty.
    """

    __slots__ = ("ref", "stamp", "values")

    def __init__(self, w: Tensor | None = None, stamp: tuple = ()):
        self.ref = weakref.ref(w) if w is not None else None
        self.stamp = stamp
        self.values: dict[Any, Tensor] = {}

    def matches(self, w: Tensor, stamp: tuple) -> bool:
        return self.ref is not None and self.ref() is w and self.stamp == stamp

    def __deepcopy__(self, memo) -> "FrozenStats":
        return FrozenStats()

    def __reduce__(self):
        return (FrozenStats, ())


def frozen_stats(owner: nn.Module, w: Tensor) -> dict[Any, Tensor]:
    """The cache of statistics of the frozen weight ``w`` held by ``owner`` (e.g. ``base.weight``).

    Emptied when ``w`` is another tensor or its storage, version counter, dtype or shape changed
    (``w.copy_``, ``load_state_dict``, merge, ``.to()``). Writes through ``w.data`` bypass the version
    counter: call :func:`forget_frozen_stats` after them. For an inference tensor (no version
    counter) the dict returned is a fresh one that nothing keeps.
    """
    try:
        stamp = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), w.stride())
    except RuntimeError:  # inference tensors track no version
        return {}
    holder = owner.__dict__.get(_STATS_ATTR)
    if not isinstance(holder, FrozenStats) or not holder.matches(w, stamp):
        holder = FrozenStats(w, stamp)
        object.__setattr__(owner, _STATS_ATTR, holder)
    return holder.values


def forget_frozen_stats(owner: nn.Module) -> None:
    """Drop the statistics cached on ``owner`` (after writing its weight through ``.data``)."""
    owner.__dict__.pop(_STATS_ATTR, None)


def _upcast(w0: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    acc = torch.promote_types(torch.promote_types(w0.dtype, a.dtype), torch.promote_types(b.dtype, torch.float32))
    return w0.to(acc), a.to(acc), b.to(acc), acc


def _stat(stats: dict | None, key: tuple, fn) -> Tensor:
    """``stats[key]``, computed by ``fn()`` (as a constant, outside inference mode) when missing."""
    value = None if stats is None else stats.get(key)
    if value is None:
        with torch.no_grad(), torch.inference_mode(False):
            value = fn()
        if stats is not None:
            stats[key] = value
    return value


def lowrank_row_sq_norms(w0: Tensor, a: Tensor, b: Tensor, scale: float, stats: dict | None = None) -> Tensor:
    """Squared row norms ``||V_i:||²`` (``[out]``) of ``V = W0 + s·B@A`` without building ``V``.

    ``w0: [out, in]``, ``a: [r, in]``, ``b: [out, r]``; ``stats`` caches ``||W0_i:||²`` (see
    :func:`frozen_stats`; ``None``: computed here). Differentiable in A and B (W0 is a constant);
    returned unclamped in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """
    with torch.autocast(w0.device.type, enabled=False):
        w0, a, b, acc = _upcast(w0, a, b)
        w0_row2 = _stat(stats, ("row2", acc), lambda: w0.square().sum(1))  # [out]
        # both terms in one [out, r] product: 2s·W0 Aᵀ + s²·B (A Aᵀ), then <·_i:, B_i:> per row
        x = torch.addmm(F.linear(w0, a), b, a @ a.T, beta=2.0 * scale, alpha=scale * scale)
        return torch.linalg.vecdot(x, b, dim=1) + w0_row2


def lowrank_col_sq_norms(w0: Tensor, a: Tensor, b: Tensor, scale: float, stats: dict | None = None) -> Tensor:
    """Squared column norms ``||V_:j||²`` (``[in]``) of ``V = W0 + s·B@A`` without building ``V``.

    Shapes, caching and dtypes as :func:`lowrank_row_sq_norms` (``stats`` caches ``||W0_:j||²``).
    """
    with torch.autocast(w0.device.type, enabled=False):
        w0, a, b, acc = _upcast(w0, a, b)
        w0_col2 = _stat(stats, ("col2", acc), lambda: w0.square().sum(0))  # [in]
        # 2s·Bᵀ W0 + s²·(BᵀB) A: [r, in], then <A_:j, ·_:j> per column
        x = torch.addmm(b.T @ w0, b.T @ b, a, beta=2.0 * scale, alpha=scale * scale)
        return torch.linalg.vecdot(x, a, dim=0) + w0_col2


def lowrank_weighted_col_sq_norms(w0: Tensor, a: Tensor, b: Tensor, scale: float, d2: Tensor,
                                  stats: dict | None = None) -> Tensor:
    """``Σ_i d2_i · V_ij²`` (``[in]``): the squared column norms of ``diag(d) V`` for ``d2 = d²: [out]``.

    BoRA's column norms (Wang et al. 2024, arXiv:2412.06441, §3.2, eq. 3) with ``d = m_r/||V||_row``.
    ``stats`` caches ``W0∘W0`` (``[out, in]`` in the accumulation dtype: as large as W0 in fp32).
    Differentiable in A, B and ``d2``; shapes and dtypes otherwise as :func:`lowrank_row_sq_norms`.
    """
    with torch.autocast(w0.device.type, enabled=False):
        w0, a, b, acc = _upcast(w0, a, b)
        d2 = d2.to(acc)
        w0_sq = _stat(stats, ("sq", acc), lambda: w0.square())  # W0∘W0: [out, in]
        db = d2.unsqueeze(1) * b  # diag(d²) B: [out, r]
        # 2s·(d²∘B)ᵀ W0 + s²·(Bᵀ diag(d²) B) A: [r, in], then <A_:j, ·_:j> per column
        x = torch.addmm(db.T @ w0, b.T @ db, a, beta=2.0 * scale, alpha=scale * scale)
        return torch.linalg.vecdot(x, a, dim=0) + d2 @ w0_sq


def sq_norm_to_norm(sq: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """``sqrt(max(sq, eps²))`` in ``dtype``: a squared norm from the functions above as a safe norm."""
    return sq.clamp_min(eps * eps).sqrt().to(dtype)


# When the factored norms pay (benchmarks/norms.py; CPU, fp32, 2 threads; ratio = factored/dense time
# of the norms alone; "nd": forward+backward with detach_norm=False; 384×384, 1536×384, 2048×2048).
# Factored does one thin [out,in]×r matmul (BoRA: two) plus O((out+in)·r²); dense does one (B@A into
# W0) plus passes over the [out,in] V, cheap while V sits in cache. Measured:
# * dora_col: the dense column norm is a strided reduction; factored 0.1-0.8 for r ≤ min/8 on every
#   shape, 1.0 at 384×384, r = 64, 1.35-1.9 at r = 2/3·min. Rule: r ≤ min(out,in)/4.
# * dora (rows): dense wins on 384×384 and 1536×384 (1.2-2.5); at 2048×2048 factored 0.3-0.96
#   (nd 0.8-0.94) for r ≤ 64, 1.07-1.2 at r = 256. Rule: out·in ≥ 2048² and r ≤ min/32.
# * bora: dense wins on every shape (1.4-4.5) while the norms are detached, except at 2048², r = 8
#   when each dense [out,in] temporary is page-faulted afresh (glibc returning it to the OS: 0.3-0.45;
#   1.2 with MALLOC_MMAP_THRESHOLD_ raised). nd at 2048², r ≤ 64: 0.7-1.0. Rule: dense; with
#   detach_norm=False, factored when out·in ≥ 2048² and r ≤ min/32 (W0∘W0 is cached only then).
# Between 1536×384 and 2048×2048 nothing was measured: the rules keep dense there.
def prefer_factored(method: str, rank: int, d_out: int, d_in: int, detach_norm: bool = True) -> bool:
    """Whether the factored norms beat building ``V`` for ``method`` at this shape (measured rule above)."""
    if method == "dora_col":
        return 4 * rank <= min(d_out, d_in)
    large_low_rank = d_out * d_in >= 2048 * 2048 and 32 * rank <= min(d_out, d_in)
    return large_low_rank and (method == "dora" or (method == "bora" and not detach_norm))


def factored_norm_stats(layer: AdapterLinear, method: str) -> dict[Any, Tensor] | None:
    """The cache to take ``layer``'s norms factored with, or ``None`` for the dense path.

    ``method``: ``"dora"`` (rows), ``"dora_col"`` (columns) or ``"bora"``. ``layer.norm_path``:
    ``"auto"`` (:func:`prefer_factored`), ``"dense"`` or ``"factored"``. Dense whatever it says when
    ``W0`` is not the base ``nn.Linear``'s own frozen ``weight`` (merged: W0 is the backup copy; NF4
    bases dequantise a fresh W0 per call, so there is nothing to cache) or W0 trains.
    """
    path, base = getattr(layer, "norm_path", "auto"), layer.base
    if (path == "dense" or layer.merged or not isinstance(base, nn.Linear) or base.weight.requires_grad
            or type(layer).weight0 is not AdapterLinear.weight0):  # W0 is not base.weight
        return None
    shape = (layer.out_features, layer.in_features)
    if path == "auto" and not prefer_factored(method, layer.cfg.rank, *shape, layer.cfg.detach_norm):
        return None
    return frozen_stats(base, base.weight)


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
