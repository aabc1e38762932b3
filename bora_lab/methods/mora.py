"""MoRA (Jiang et al., arXiv:2405.12130): high-rank updating with one square matrix.

``ΔW x = f_decomp(M · f_comp(x))`` with a trainable ``M: [r̂, r̂]`` (zero init) and fixed,
parameter-free compress/decompress operators. ``r̂ = ⌊√(r·(in+out))⌋`` so that ``r̂² ≤ r·(in+out)``,
LoRA's budget at rank ``r`` (the official code rounds to nearest instead; flooring never exceeds
the budget; the rotation kind rounds ``r̂`` down to even for its 2-D rotations). The four kinds of
the lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016, MoRA section) and the paper (section 3.1):

* ``truncation``: keep the first ``r̂`` inputs, pad the output with zeros: ``ΔW = M`` in the
  top-left corner.
* ``sharing``: adjacent inputs are summed into ``r̂`` groups and each output row repeats its
  group's result (row/column sharing): ``ΔW[i, j] = M[g_out(i), g_in(j)]``.
* ``decomposition``: cut ``x`` into ``⌈in/r̂⌉`` blocks of ``r̂`` (zero-padded) and apply ``M`` to each:
  ``ΔW = diag(M, M, …)``, cut to ``[out, in]``; if ``out`` is longer, the blocks repeat (as the
  official code).
* ``rotation``: decomposition, with block ``t`` rotated RoPE-style before ``M``:
  ``ΔW = diag(M R_0, M R_1, …)``, ``R_t`` rotating pairs ``(k, k + r̂/2)`` by ``t · 10000^{-2k/r̂}``.

MoRA has no scaling: like the official code, ``alpha`` is ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear
from .registry import register

KINDS = ("truncation", "sharing", "decomposition", "rotation")
MAX_INSPECT_M = 128  # inspect() includes M (r̂ x r̂ floats) up to this r̂


@dataclass
class MoRAConfig(AdapterConfig):
    """MoRA options: ``rank`` sets the budget ``r̂ = ⌊√(rank·(in+out))⌋``; ``alpha`` is unused."""

    kind: str = field(default="rotation", metadata={
        "help": "compress/decompress operators: truncation, sharing (sum groups of inputs, repeat "
                "outputs), decomposition (block-diagonal M), rotation (decomposition + RoPE-style "
                "rotation per block; the paper's choice for small ranks)",
        "choices": list(KINDS)})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"MoRA kind must be one of {KINDS}, got {self.kind!r}")


def mora_rank(rank: int, d_in: int, d_out: int, kind: str = "rotation") -> int:
    """``r̂`` matching LoRA's parameter budget ``rank·(in+out)`` (even for ``rotation``)."""
    r_hat = math.isqrt(rank * (d_in + d_out))
    if kind == "rotation":
        r_hat = max(2, r_hat - r_hat % 2)
    return max(1, r_hat)


def _groups(n: int, r_hat: int, device) -> Tensor:
    """Balanced contiguous groups: feature ``j`` of ``n`` -> group in ``0..r̂-1`` (sizes differ by ≤ 1)."""
    small, extra = divmod(n, r_hat)
    sizes = torch.tensor([small + 1] * extra + [small] * (r_hat - extra), device=device)
    return torch.repeat_interleave(torch.arange(r_hat, device=device), sizes)  # (n,)


def _rope_tables(n_blocks: int, r_hat: int, device) -> tuple[Tensor, Tensor]:
    """cos/sin ``[n_blocks, r̂]`` of RoPE angles ``t·10000^{-2k/r̂}`` (block index ``t`` as position)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, device=device, dtype=torch.float32) / r_hat))
    angles = torch.outer(torch.arange(n_blocks, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)  # (n_blocks, r̂)
    return emb.cos(), emb.sin()


@register("mora", MoRAConfig)
class MoRALinear(AdapterLinear):
    """MoRA: ``y = W0 x + f_decomp(M f_comp(x)) + b``, ``M: [r̂, r̂]`` zero-initialised."""

    description = "One square r̂×r̂ matrix between fixed compress/decompress maps: high-rank update, LoRA's budget"
    formula = (r"W = W_0 + \Delta W,\ \Delta W x = f_{\text{decomp}}\!\big(M f_{\text{comp}}(x)\big),"
               r"\ M\in\mathbb{R}^{\hat r\times\hat r},\ \hat r = \lfloor\sqrt{r(d_{in}+d_{out})}\rfloor")
    paper = "Jiang et al. 2024, MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (arXiv:2405.12130)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), MoRA section: "
              "square matrix, four compress/decompress kinds")

    def __init__(self, base, cfg: MoRAConfig):
        super().__init__(base, cfg)
        self.kind = cfg.kind
        self.r_hat = r = mora_rank(cfg.rank, self.in_features, self.out_features, cfg.kind)
        w = base.weight
        self.mora_M = nn.Parameter(torch.zeros(r, r, device=w.device, dtype=w.dtype))
        self.n_blocks = -(-self.in_features // r)
        if cfg.kind == "sharing":
            self.register_buffer("g_in", _groups(self.in_features, r, w.device), persistent=False)
            self.register_buffer("g_out", _groups(self.out_features, r, w.device), persistent=False)
        if cfg.kind == "rotation":
            cos, sin = _rope_tables(self.n_blocks, r, w.device)
            self.register_buffer("rope_cos", cos.to(w.dtype), persistent=False)
            self.register_buffer("rope_sin", sin.to(w.dtype), persistent=False)

    def delta(self, x: Tensor) -> Tensor:
        """``ΔW x`` for ``x: (..., in)`` without building ``ΔW``: returns ``(..., out)``."""
        r, d_in, d_out = self.r_hat, self.in_features, self.out_features
        lead = x.shape[:-1]
        if self.kind == "truncation":
            z = F.pad(x[..., :r], (0, max(0, r - d_in))) @ self.mora_M.T  # (..., r̂)
            return F.pad(z[..., :d_out], (0, max(0, d_out - r)))
        if self.kind == "sharing":
            comp = x.new_zeros(*lead, r).index_add(-1, self.g_in, x)  # (..., r̂): sums over groups
            return (comp @ self.mora_M.T).index_select(-1, self.g_out)  # (..., out)
        blocks = F.pad(x, (0, self.n_blocks * r - d_in)).view(*lead, self.n_blocks, r)  # (..., n, r̂)
        if self.kind == "rotation":
            half = r // 2
            rotated = torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1)
            blocks = blocks * self.rope_cos + rotated * self.rope_sin
        out = (blocks @ self.mora_M.T).reshape(*lead, self.n_blocks * r)  # (..., n·r̂)
        reps = -(-d_out // out.shape[-1])
        return (out.repeat(*([1] * len(lead)), reps) if reps > 1 else out)[..., :d_out]

    def delta_weight(self) -> Tensor:
        """Dense ``ΔW: [out, in]``, built by applying the operator to the identity (exact)."""
        eye = torch.eye(self.in_features, device=self.mora_M.device, dtype=self.mora_M.dtype)
        return self.delta(eye).T  # row j of delta(I) is ΔW e_j, i.e. column j of ΔW

    def effective_weight(self) -> Tensor:
        return self.weight0 + self.delta_weight()

    def adapter_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight, self.base.bias) + self.delta(x)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: MoRAConfig, bias: bool = True) -> int:
        return mora_rank(cfg.rank, d_in, d_out, cfg.kind) ** 2

    @torch.no_grad()
    def inspect(self) -> dict:
        """Adds ``mora``: kind, ``r̂``, where each input feature goes (``in_slot``, ``in_block``) and
        where each output feature comes from (``out_slot``, ``out_block``; -1 = none), and ``M``
        itself when ``r̂ <= MAX_INSPECT_M``. ``rank`` is ``r̂`` (named by ``rank_name``), the rank
        ``M`` can reach; ΔW repeats it over the blocks."""
        r, d_in, d_out = self.r_hat, self.in_features, self.out_features
        j, i = torch.arange(d_in), torch.arange(d_out)
        if self.kind == "truncation":
            in_slot, in_block = torch.where(j < r, j, -1), torch.where(j < r, 0, -1)
            out_slot, out_block = torch.where(i < r, i, -1), torch.where(i < r, 0, -1)
        elif self.kind == "sharing":
            in_slot, out_slot = self.g_in.cpu(), self.g_out.cpu()
            in_block, out_block = torch.zeros_like(j), torch.zeros_like(i)
        else:  # decomposition/rotation: x is cut into blocks of r̂; outputs repeat the blocks
            in_slot, in_block = j % r, j // r
            o = i % (self.n_blocks * r)
            out_slot, out_block = o % r, o // r
        m = self.mora_M.detach().float().cpu()
        mora = {"kind": self.kind, "r_hat": r, "lora_rank": self.cfg.rank, "n_blocks": self.n_blocks,
                "in_slot": in_slot.tolist(), "in_block": in_block.tolist(),
                "out_slot": out_slot.tolist(), "out_block": out_block.tolist(),
                "M": m.tolist() if r <= MAX_INSPECT_M else None}
        return {**super().inspect(), "rank": r, "rank_name": "r̂", "mora": mora}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kind={self.kind}, r_hat={self.r_hat}"
