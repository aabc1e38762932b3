"""Fidelity of MoRA and AdaLoRA to their reference implementations.

MoRA: the official code (github kongds/MoRA, ``peft-mora/src/peft/tuners/lora/layer.py``:
``update_layer`` for r̂, ``_apply_mora`` for the forward, ``get_delta_weight`` for the merged ΔW)
is re-derived below in plain torch, independently of ``bora_lab.methods.mora``, and compared on
MiniLM-sized layers (384×384 and 384×1536) at LoRA rank 8. Official ``mora_type`` 1 is our
``sharing`` (cyclic), 2 ``sharing`` with ``groups="adjacent"``, 6 ``rotation``; ``decomposition`` is
type 6 without the rotation and ``truncation`` the paper's eq. 5 (neither is in the official code).

AdaLoRA: the ``orth_reg="peft"`` regulariser must equal the term Hugging Face PEFT's
``AdaLoraModel.forward`` adds to the loss, on the same P, Λ, Q.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bora_lab import methods
from bora_lab.methods import budget
from bora_lab.methods.mora import mora_rank

SHAPES = [(384, 384), (384, 1536)]  # MiniLM attention / FFN-up at LoRA rank 8
RANK = 8


# -- official MoRA, re-derived ---------------------------------------------------------------------
def official_r_hat(rank: int, d_in: int, d_out: int, mora_type: int) -> int:
    """``update_layer``: round to nearest, then down to even for the RoPE type 6."""
    new_r = int(math.sqrt((d_in + d_out) * rank) + 0.5)
    return new_r // 2 * 2 if mora_type == 6 else new_r


def _ceil_div(a: int, b: int) -> int:
    return a // b + (a % b != 0)


def _wrap_blocks(x: torch.Tensor, r: int) -> torch.Tensor:
    """Pad the input with its own first entries to a multiple of r, then cut into blocks: (..., n, r)."""
    d_in = x.shape[-1]
    pad = (r - d_in % r) % r
    if pad:
        x = torch.cat([x, x[..., :pad]], dim=-1)
    return x.view(*x.shape[:-1], -1, r)


def _rope(n: int, r: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    freqs = torch.outer(torch.arange(n).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (n, r)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _adjacent_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Type 2 compress: the first ``in mod r`` groups take one input more."""
    d = x.shape[-1]
    big, small = d // r + 1, d // r
    m = d - r * small  # number of big groups
    parts = [x[..., : m * big].reshape(*x.shape[:-1], m, big).sum(-1)] if m else []
    parts.append(x[..., m * big:].reshape(*x.shape[:-1], r - m, small).sum(-1))
    return torch.cat(parts, dim=-1)


def _adjacent_repeat(z: torch.Tensor, d: int, dim: int = -1) -> torch.Tensor:
    """Type 2 decompress along ``dim``: slot k repeated over its group of adjacent features."""
    r = z.shape[dim]
    big, small = d // r + 1, d // r
    m = d - r * small
    head, tail = z.narrow(dim, 0, m), z.narrow(dim, m, r - m)
    return torch.cat([head.repeat_interleave(big, dim=dim), tail.repeat_interleave(small, dim=dim)], dim=dim)


def official_forward(x: torch.Tensor, m: torch.Tensor, d_out: int, kind: str) -> torch.Tensor:
    """``ΔW x`` as ``_apply_mora`` computes it (``lora_A`` is ``nn.Linear(r, r)`` with weight ``m``)."""
    r = m.shape[0]
    if kind == "truncation":  # paper eq. 5: keep x_{1:r}, output [z; 0]
        z = x[..., :r] @ m.T
        return torch.cat([z, z.new_zeros(*z.shape[:-1], d_out - r)], dim=-1)
    if kind == "sharing":  # type 1
        z = _wrap_blocks(x, r).sum(dim=-2) @ m.T
        return torch.cat([z] * _ceil_div(d_out, r), dim=-1)[..., :d_out]
    if kind == "sharing_adjacent":  # type 2
        return _adjacent_repeat(_adjacent_sum(x, r) @ m.T, d_out)
    blocks = _wrap_blocks(x, r)  # type 6 (rotation) / without the rotation (decomposition)
    if kind == "rotation":
        cos, sin = _rope(blocks.shape[-2], r, x.dtype)
        rotated = torch.cat([-blocks[..., r // 2:], blocks[..., : r // 2]], dim=-1)
        blocks = blocks * cos + rotated * sin
    out = (blocks @ m.T).reshape(*x.shape[:-1], -1)[..., :d_out]
    if out.shape[-1] < d_out:
        out = torch.cat([out] * _ceil_div(d_out, out.shape[-1]), dim=-1)[..., :d_out]
    return out


def official_delta_weight(m: torch.Tensor, d_in: int, d_out: int, kind: str) -> torch.Tensor:
    """Merged ``ΔW: [out, in]`` as ``get_delta_weight`` builds it (types 1, 2, 6; 6 also without rotation)."""
    r = m.shape[0]
    pad = (r - d_in % r) % r
    if kind == "sharing":  # type 1: column i % in collects column i % r of M
        w = m.new_zeros(r, d_in)
        for i in range(d_in + pad):
            w[:, i % d_in] += m[:, i % r]
        return torch.cat([w] * _ceil_div(d_out, r), dim=0)[:d_out]
    if kind == "sharing_adjacent":  # type 2
        return _adjacent_repeat(_adjacent_repeat(m, d_in, dim=1), d_out, dim=0)
    n = _ceil_div(d_in, r)
    cos, sin = _rope(n, r, m.dtype)
    if kind == "decomposition":
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    m2 = torch.cat([m[:, r // 2:], -m[:, : r // 2]], dim=-1)
    w = m.new_zeros(d_in + pad, d_in)
    for t in range(n):
        blk = m2 * sin[t] + m * cos[t]  # M R_t
        if t < n - 1:
            w[t * r:(t + 1) * r, t * r:(t + 1) * r] = blk
        else:  # the last block: its first r - pad columns are real inputs, the rest wrap to 0..pad-1
            w[t * r:, t * r:] = blk[:, : r - pad]
            if pad:
                w[t * r:, :pad] = blk[:, r - pad:]
    if d_in < d_out:
        return torch.cat([w] * _ceil_div(d_out, r), dim=0)[:d_out]
    return w[:d_out]


def _layer(d_in: int, d_out: int, kind: str, **opts):
    torch.manual_seed(0)
    if kind == "sharing_adjacent":
        kind, opts = "sharing", {**opts, "groups": "adjacent"}
    layer = methods.wrap(nn.Linear(d_in, d_out).double(), "mora", rank=RANK, kind=kind, **opts)
    with torch.no_grad():
        layer.mora_M.normal_()
    return layer


# -- r̂ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_in,d_out,expected", [(384, 384, 78), (384, 1536, 124), (4096, 4096, 256)])
def test_mora_r_hat_rounds_to_nearest_as_the_official_code(d_in, d_out, expected):
    for kind, mora_type in (("sharing", 1), ("decomposition", 1), ("truncation", 1), ("rotation", 6)):
        assert mora_rank(RANK, d_in, d_out, kind) == official_r_hat(RANK, d_in, d_out, mora_type) == expected
        if d_in < 4096:
            assert _layer(d_in, d_out, kind).r_hat == expected


def test_mora_floor_rounding_option():
    # budget 8·(384+1536) = 15360, √ = 123.94: the paper's ⌊·⌋ gives 123 (rotation: 122), nearest 124
    assert mora_rank(RANK, 384, 1536, "sharing", "floor") == 123
    assert mora_rank(RANK, 384, 1536, "rotation", "floor") == 122
    assert mora_rank(RANK, 384, 384, "sharing", "floor") == 78
    layer = _layer(384, 1536, "rotation", rounding="floor")
    assert layer.r_hat == 122 and sum(p.numel() for p in layer.parameters() if p.requires_grad) == 122**2


# -- ΔW and forward against the official equations ------------------------------------------------
@pytest.mark.parametrize("kind", ["truncation", "sharing", "sharing_adjacent", "decomposition", "rotation"])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_mora_matches_official_equations(kind, d_in, d_out):
    layer = _layer(d_in, d_out, kind)
    m = layer.mora_M.detach()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    expected = official_forward(x, m, d_out, kind)
    with torch.no_grad():
        got = layer(x) - layer.base(x)  # the layer's real forward, base output removed
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.delta(x), expected, atol=1e-10, rtol=1e-10)
        dw = layer.delta_weight()
    # the official forward is linear in x: its ΔW is official_forward(I)ᵀ
    torch.testing.assert_close(dw, official_forward(torch.eye(d_in, dtype=m.dtype), m, d_out, kind).T)
    if kind != "truncation":  # the official merge (get_delta_weight) builds the same ΔW
        torch.testing.assert_close(dw, official_delta_weight(m, d_in, d_out, kind), atol=1e-12, rtol=1e-12)


def test_mora_zero_padding_differs_only_in_the_wrapped_columns():
    # 384×384, r̂ = 78: 5 blocks = 390 slots, the last block is short by 6 -> inputs 0..5 wrap
    wrap, zero = _layer(384, 384, "decomposition"), _layer(384, 384, "decomposition", pad="zero")
    torch.testing.assert_close(wrap.mora_M, zero.mora_M)
    with torch.no_grad():
        diff = (wrap.delta_weight() - zero.delta_weight()).abs().sum(dim=0)
    assert torch.nonzero(diff).flatten().tolist() == list(range(6))
    assert wrap.inspect()["mora"]["wrapped"] == 6 and zero.inspect()["mora"]["wrapped"] == 0
    # zero padding is the block diagonal diag(M, M, ...) of the paper's eq. 8, cut to 384 x 384
    m = zero.mora_M.detach()
    torch.testing.assert_close(zero.delta_weight().detach(), torch.block_diag(*[m] * 5)[:384, :384])


def test_mora_cyclic_sharing_with_zero_padding_is_j_mod_r_hat():
    layer = _layer(384, 1536, "sharing", pad="zero")  # r̂ = 124
    m = layer.mora_M.detach()
    i, j = torch.arange(1536), torch.arange(384)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight(), m[i % 124][:, j % 124])


# -- AdaLoRA: PEFT's orthogonality regulariser ------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 8)

    def forward(self, x):
        out = self.down(torch.tanh(self.up(x)))
        return SimpleNamespace(logits=out, loss=out.sum() * 0.0)  # zero loss: PEFT adds its term to it


@pytest.mark.parametrize("weight", [0.5, 0.1])
def test_adalora_peft_orth_reg_equals_peft(weight):
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    torch.manual_seed(0)
    tiny = _Tiny()
    ours = methods.apply(copy.deepcopy(tiny), "adalora", rank=4, alpha=4.0, orth_reg="peft", orth_reg_weight=weight)
    cfg = AdaLoraConfig(init_r=4, target_r=2, target_modules=["up", "down"], total_step=10,
                        orth_reg_weight=weight, lora_alpha=4)
    peft_model = AdaLoraModel(tiny, cfg, "default")
    with torch.no_grad():
        for name in ("up", "down"):
            src, dst = ours.get_submodule(name), peft_model.model.get_submodule(name)
            src.lora_A.normal_(0.0, 0.3)  # far from orthonormal: every norm is clearly > 0
            src.lora_B.normal_(0.0, 0.3)
            src.lora_E.weight.normal_()
            dst.lora_A["default"].copy_(src.lora_A)
            dst.lora_B["default"].copy_(src.lora_B)
            dst.lora_E["default"].copy_(src.lora_E.weight[:, None])
    x = torch.randn(5, 16)
    out = peft_model(x)
    # same P, Λ, Q, same function (PEFT scales by alpha / (r + 1e-5))
    torch.testing.assert_close(out.logits, ours(x).logits, atol=1e-5, rtol=1e-4)
    peft_term = out.loss  # 0 + orth_reg_weight * Σ ||G − I||_F / (number of lora_A and lora_B)
    ours_term = budget.regularization_loss(ours)
    torch.testing.assert_close(ours_term, peft_term, atol=1e-6, rtol=1e-6)
    # the gradient PEFT's term sends to P and Q is the same too
    ours_term.backward()
    peft_term.backward()
    for name in ("up", "down"):
        src, dst = ours.get_submodule(name), peft_model.model.get_submodule(name)
        torch.testing.assert_close(src.lora_A.grad, dst.lora_A["default"].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(src.lora_B.grad, dst.lora_B["default"].grad, atol=1e-6, rtol=1e-5)


def test_adalora_paper_orth_reg_is_eq4_squared_and_the_default():
    torch.manual_seed(0)
    model = methods.apply(_Tiny(), "adalora", rank=4)
    layers = [m for _, m in methods.adapter_layers(model)]
    assert all(m.cfg.orth_reg == "paper" and m.cfg.orth_reg_weight == 0.1 for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_A.normal_(0.0, 0.3)
            m.lora_B.normal_(0.0, 0.3)

    def sq(g):
        return (g - torch.eye(g.shape[0])).pow(2).sum()

    expected = 0.1 * sum(sq(m.lora_B.T @ m.lora_B) + sq(m.lora_A @ m.lora_A.T) for m in layers) / len(layers)
    torch.testing.assert_close(budget.regularization_loss(model), expected)
    peft_form = 0.1 * sum(torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - torch.eye(4))
                          + torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - torch.eye(4)) for m in layers) / 4
    for m in layers:
        m.cfg.orth_reg = "peft"  # the layers share one config object
    torch.testing.assert_close(budget.regularization_loss(model), peft_form)


def test_adalora_rejects_unknown_orth_reg():
    with pytest.raises(ValueError, match="orth_reg"):
        methods.wrap(nn.Linear(8, 8), "adalora", rank=2, orth_reg="nope")
