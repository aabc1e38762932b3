"""MoRA (Jiang et al., 2024, arXiv:2405.12130): high-rank updating with one square matrix.

``ΔW x = f_decomp(M · f_comp(x))`` with a trainable ``M: [r̂, r̂]`` (zero init) and fixed,
parameter-free compress/decompress operators (paper section 3.1, eqs. 5-9). Defaults follow the
official code (github kongds/MoRA, ``peft-mora/src/peft/tuners/lora/layer.py``, ``update_layer`` and
``_apply_mora``); the options reach the other readings:

* ``r̂`` (``rounding``): ``"nearest"`` (default, official code:
  ``int(√(r·(in+out)) + 0.5)``) or ``"floor"`` (the paper's text ``⌊√(r·(in+out))⌋``, so
  ``r̂² ≤ r·(in+out)``, never above LoRA's budget at rank ``r``; nearest may exceed it by up to about r̂).
  The rotation kind then rounds ``r̂`` down to even (official code) for its 2-D rotations.
  E.g. 384×1536 at r=8 (budget 15360, √ = 123.94): nearest 124 (rotation 124), floor 123
  (rotation 122); 384×384 at r=8 (√6144 = 78.38): 78 either way.
* ``pad``: when ``in`` is not a multiple of ``r̂`` the last block of ``r̂`` inputs is short by
  ``p = n·r̂ − in``. ``"wrap"`` (default, official code: ``torch.cat([x, x[..., :p]])``) fills it with
  the first inputs ``x_0 … x_{p−1}`` (cyclically, ``x[j mod in]``, when ``p > in``); ``"zero"`` pads
  with zeros, the paper's equations taken literally. Used by ``sharing`` (cyclic) and by
  ``decomposition``/``rotation``.

The four kinds (``kind``):

* ``truncation`` (paper eq. 5; not in the official code): ``f_comp(x) = x_{1:r̂}``,
  ``f_decomp(z) = [z; 0]``, i.e. ``ΔW = M`` in the top-left corner.
* ``sharing`` (paper eq. 6, row/column sharing): ``f_comp(x)_k = Σ_{j ∈ g_k} x_j`` and
  ``f_decomp(z)_i = z_{g'(i)}``. ``groups="cyclic"`` (default; official ``mora_type=1``, which its
  README names "Eq. 6 in paper"): ``g_k = {j : j ≡ k mod r̂}`` on the padded input and
  ``g'(i) = i mod r̂``, ``ΔW[i, j] = M[i mod r̂, j mod r̂]`` (plus, with ``pad="wrap"``, the
  wrapped columns ``j < p`` also get ``M[:, (in + j) mod r̂]``). ``groups="adjacent"`` (official
  ``mora_type=2``): balanced contiguous groups (sizes differ by ≤ 1, larger groups first) on both
  sides, ``ΔW[i, j] = M[g_out(i), g_in(j)]``; no padding.
* ``decomposition`` (paper eqs. 7-8): ``f_comp`` cuts the padded ``x`` into ``n = ⌈in/r̂⌉`` blocks
  of ``r̂``, ``M`` acts on each, ``ΔW = diag(M, M, …)`` (cut to ``[out, in]``); ``f_decomp``
  concatenates the blocks and cuts to ``out``, repeating them when ``out > n·r̂`` (official code).
  The official code has no un-rotated decomposition type; this is its ``mora_type=6`` without the
  rotation.
* ``rotation`` (paper eq. 9, official ``mora_type=6``; the paper's choice for small ranks):
  decomposition with block ``t`` rotated RoPE-style before ``M``: ``ΔW = diag(M R_0, M R_1, …)``,
  ``R_t`` rotating the pairs ``(k, k + r̂/2)`` by ``t · 10000^{-2k/r̂}``.

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
ROUNDINGS = ("nearest", "floor")
PADS = ("wrap", "zero")
GROUPS = ("cyclic", "adjacent")
MAX_INSPECT_M = 128  # inspect() includes M (r̂ x r̂ floats) up to this r̂


@dataclass
class MoRAConfig(AdapterConfig):
    """MoRA options: ``rank`` sets the budget ``r̂ ≈ √(rank·(in+out))`` (``rounding``); ``alpha`` is unused."""

    kind: str = field(default="rotation", metadata={
        "help": "compress/decompress operators: truncation (eq. 5), sharing (eq. 6: sum groups of inputs, "
                "repeat outputs), decomposition (eqs. 7-8: block-diagonal M), rotation (eq. 9: decomposition "
                "+ RoPE-style rotation per block; the paper's choice for small ranks)",
        "choices": list(KINDS)})
    rounding: str = field(default="nearest", metadata={
        "help": "r̂ from LoRA's budget r·(in+out): nearest = int(√budget + 0.5) (official code), "
                "floor = ⌊√budget⌋ (paper text; r̂² never exceeds the budget)",
        "choices": list(ROUNDINGS)})
    pad: str = field(default="wrap", metadata={
        "help": "filling of the last, short block of r̂ inputs (sharing cyclic, decomposition, rotation): "
                "wrap = the first inputs again (official code), zero = zeros",
        "choices": list(PADS)})
    groups: str = field(default="cyclic", metadata={
        "help": "sharing only: cyclic = feature j shares slot j mod r̂ (official type 1, eq. 6); "
                "adjacent = balanced runs of neighbouring features share a slot (official type 2)",
        "choices": list(GROUPS)})

    def __post_init__(self):
        for name, allowed in (("kind", KINDS), ("rounding", ROUNDINGS), ("pad", PADS), ("groups", GROUPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoRA {name} must be one of {allowed}, got {getattr(self, name)!r}")


def mora_rank(rank: int, d_in: int, d_out: int, kind: str = "rotation", rounding: str = "nearest") -> int:
    """``r̂`` for LoRA's parameter budget ``rank·(in+out)`` (even for ``rotation``).

    ``rounding="nearest"``: ``int(√budget + 0.5)`` as the official code; ``"floor"``: ``⌊√budget⌋``.
    """
    budget = rank * (d_in + d_out)
    if rounding == "nearest":
        r_hat = int(math.sqrt(budget) + 0.5)
    elif rounding == "floor":
        r_hat = math.isqrt(budget)
    else:
        raise ValueError(f"MoRA rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if kind == "rotation":
        r_hat = max(2, r_hat - r_hat % 2)
    return max(1, r_hat)


def _groups(n: int, r_hat: int, device) -> Tensor:
    """Balanced contiguous groups: feature ``j`` of ``n`` -> group in ``0..r̂-1`` (sizes differ by ≤ 1,
    the larger groups first, as the official ``mora_type=2``)."""
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
               r"\ M\in\mathbb{R}^{\hat r\times\hat r},\ \hat r \approx \sqrt{r(d_{in}+d_{out})}")
    paper = "Jiang et al. 2024, MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (arXiv:2405.12130)"
    source = ("Jiang et al. 2024 (arXiv:2405.12130), sec. 3.1, eqs. 5-9, and the official code "
              "(github kongds/MoRA, peft-mora, lora/layer.py: update_layer, _apply_mora); lecture notes "
              "'Parameter-Efficient Fine-Tuning' (EE4016), MoRA section: square matrix, four compress/decompress kinds")

    def __init__(self, base, cfg: MoRAConfig):
        super().__init__(base, cfg)
        self.kind = cfg.kind
        self.r_hat = r = mora_rank(cfg.rank, self.in_features, self.out_features, cfg.kind, cfg.rounding)
        w = base.weight
        self.mora_M = nn.Parameter(torch.zeros(r, r, device=w.device, dtype=w.dtype))
        self.n_blocks = -(-self.in_features // r)
        self.n_pad = self.n_blocks * r - self.in_features  # length of the missing tail of the last block
        # wrap: the tail is x[in], x[in+1], ... read cyclically, i.e. x[0], x[1], ... (official code)
        self.register_buffer("wrap_idx", torch.arange(self.in_features, self.in_features + self.n_pad,
                                                      device=w.device) % self.in_features, persistent=False)
        if cfg.kind == "sharing":
            if cfg.groups == "adjacent":
                g_in, g_out = _groups(self.in_features, r, w.device), _groups(self.out_features, r, w.device)
            else:
                g_in = torch.arange(self.in_features, device=w.device) % r
                g_out = torch.arange(self.out_features, device=w.device) % r
            self.register_buffer("g_in", g_in, persistent=False)  # (in,) slot of input j (before wrap)
            self.register_buffer("g_out", g_out, persistent=False)  # (out,) slot read by output i
        if cfg.kind == "rotation":
            cos, sin = _rope_tables(self.n_blocks, r, w.device)
            self.register_buffer("rope_cos", cos.to(w.dtype), persistent=False)
            self.register_buffer("rope_sin", sin.to(w.dtype), persistent=False)

    def _blocks(self, x: Tensor) -> Tensor:
        """``x: (..., in)`` padded to ``n·r̂`` (``cfg.pad``) and cut into ``(..., n, r̂)`` blocks."""
        if self.n_pad:
            if self.cfg.pad == "wrap":
                tail = x.index_select(-1, self.wrap_idx)
            else:
                tail = x.new_zeros(*x.shape[:-1], self.n_pad)
            x = torch.cat([x, tail], dim=-1)
        return x.reshape(*x.shape[:-1], self.n_blocks, self.r_hat)

    def delta(self, x: Tensor) -> Tensor:
        """``ΔW x`` for ``x: (..., in)`` without building ``ΔW``: returns ``(..., out)``."""
        r, d_in, d_out = self.r_hat, self.in_features, self.out_features
        lead = x.shape[:-1]
        if self.kind == "truncation":  # eq. 5
            z = F.pad(x[..., :r], (0, max(0, r - d_in))) @ self.mora_M.T  # (..., r̂)
            return F.pad(z[..., :d_out], (0, max(0, d_out - r)))
        if self.kind == "sharing":  # eq. 6
            if self.cfg.groups == "adjacent":
                comp = x.new_zeros(*lead, r).index_add(-1, self.g_in, x)  # (..., r̂): sums over groups
            else:
                comp = self._blocks(x).sum(dim=-2)  # (..., r̂): slot k sums x_j, j ≡ k (mod r̂)
            return (comp @ self.mora_M.T).index_select(-1, self.g_out)  # (..., out)
        blocks = self._blocks(x)  # (..., n, r̂), eq. 7
        if self.kind == "rotation":  # eq. 9
            half = r // 2
            rotated = torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1)
            blocks = blocks * self.rope_cos + rotated * self.rope_sin
        out = (blocks @ self.mora_M.T).reshape(*lead, self.n_blocks * r)  # (..., n·r̂), eq. 8
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
        return mora_rank(cfg.rank, d_in, d_out, cfg.kind, cfg.rounding) ** 2

    @torch.no_grad()
    def inspect(self) -> dict:
        """Adds ``mora``: kind, ``r̂``, where each input feature goes (``in_slot``, ``in_block``) and
        where each output feature comes from (``out_slot``, ``out_block``; -1 = none), and ``M``
        itself when ``r̂ <= MAX_INSPECT_M``. With ``pad="wrap"`` the first ``wrapped`` inputs are
        read a second time, at the end of the last block (slots ``r̂ − wrapped … r̂ − 1``); the slot
        lists give each input's first place. ``rank`` is ``r̂`` (named by ``rank_name``), the rank
        ``M`` can reach; ΔW repeats it over the blocks."""
        r, d_in, d_out = self.r_hat, self.in_features, self.out_features
        j, i = torch.arange(d_in), torch.arange(d_out)
        wrapped = 0
        if self.kind == "truncation":
            in_slot, in_block = torch.where(j < r, j, -1), torch.where(j < r, 0, -1)
            out_slot, out_block = torch.where(i < r, i, -1), torch.where(i < r, 0, -1)
        elif self.kind == "sharing" and self.cfg.groups == "adjacent":
            in_slot, out_slot = self.g_in.cpu(), self.g_out.cpu()
            in_block, out_block = torch.zeros_like(j), torch.zeros_like(i)
        elif self.kind == "sharing":  # cyclic: block = which pass of r̂ features
            in_slot, in_block, out_slot, out_block = j % r, j // r, i % r, i // r
            wrapped = self.n_pad if self.cfg.pad == "wrap" else 0
        else:  # decomposition/rotation: x is cut into blocks of r̂; outputs repeat the blocks
            in_slot, in_block = j % r, j // r
            o = i % (self.n_blocks * r)
            out_slot, out_block = o % r, o // r
            wrapped = self.n_pad if self.cfg.pad == "wrap" else 0
        m = self.mora_M.detach().float().cpu()
        mora = {"kind": self.kind, "r_hat": r, "lora_rank": self.cfg.rank, "n_blocks": self.n_blocks,
                "rounding": self.cfg.rounding, "pad": self.cfg.pad, "wrapped": wrapped,
                "groups": self.cfg.groups if self.kind == "sharing" else None,
                "in_slot": in_slot.tolist(), "in_block": in_block.tolist(),
                "out_slot": out_slot.tolist(), "out_block": out_block.tolist(),
                "M": m.tolist() if r <= MAX_INSPECT_M else None}
        return {**super().inspect(), "rank": r, "rank_name": "r̂", "mora": mora}

    def extra_repr(self) -> str:
        extra = f", groups={self.cfg.groups}" if self.kind == "sharing" else ""
        return super().extra_repr() + f", kind={self.kind}, r_hat={self.r_hat}, pad={self.cfg.pad}{extra}"
