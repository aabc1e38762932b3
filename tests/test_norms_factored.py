"""DoRA/BoRA norms taken without building ``V = W0 + s·B@A`` equal the dense ones.

The references below are written from the papers' formulas on a dense ``V`` (DoRA: Liu et al. 2024,
arXiv:2402.09353; BoRA: Wang et al. 2024, arXiv:2412.06441, §3.2, eq. 3), independently of the
layers' code.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bora_lab import methods
from bora_lab.methods import base as mbase
from bora_lab.methods.base import (factored_norm_stats, forget_frozen_stats, frozen_stats, lowrank_col_sq_norms,
                                   lowrank_row_sq_norms, lowrank_weighted_col_sq_norms)

NORM_METHODS = ["dora", "dora_col", "bora"]
# (out, in, rank): square, tall, wide, rank 1 and rank = min(out, in)
SHAPES = [(16, 24, 4), (24, 16, 16), (12, 12, 12), (40, 30, 1), (9, 33, 9)]


def _factors(d_out, d_in, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(rank, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    b = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    return w0.to(dtype), a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("d_out,d_in,rank", SHAPES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_formulas_equal_dense_norms(d_out, d_in, rank, dtype, rtol):
    w0, a, b = _factors(d_out, d_in, rank, dtype)
    s = 0.7
    v = (w0.double() + s * b.double() @ a.double())  # the exact V of these (rounded) inputs
    d2 = torch.rand(d_out, dtype=torch.float64) + 0.5
    for stats in (None, {}):  # uncached, and filling a cache
        row2 = lowrank_row_sq_norms(w0, a, b, s, stats)
        col2 = lowrank_col_sq_norms(w0, a, b, s, stats)
        wcol2 = lowrank_weighted_col_sq_norms(w0, a, b, s, d2.to(dtype), stats)
        assert row2.shape == (d_out,) and col2.shape == (d_in,) and wcol2.shape == (d_in,)
        assert row2.dtype == col2.dtype == wcol2.dtype == dtype  # fp32 accumulates in fp32, fp64 in fp64
        torch.testing.assert_close(row2.double(), v.square().sum(1), rtol=rtol, atol=0)
        torch.testing.assert_close(col2.double(), v.square().sum(0), rtol=rtol, atol=0)
        torch.testing.assert_close(wcol2.double(), d2.to(dtype).double() @ v.square(), rtol=rtol, atol=0)


def test_half_precision_accumulates_in_fp32_without_autocast():
    w0, a, b = _factors(32, 48, 8, torch.bfloat16)
    v = w0.double() + 0.5 * b.double() @ a.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row2 = lowrank_row_sq_norms(w0, a, b, 0.5)
    assert row2.dtype == torch.float32
    torch.testing.assert_close(row2.double(), v.square().sum(1), rtol=1e-5, atol=0)


# -- the layers ----------------------------------------------------------------------------------
def _layer(name, d_out=16, d_in=24, rank=4, dtype=torch.float64, base=None, **opts):
    torch.manual_seed(0)
    base = base if base is not None else nn.Linear(d_in, d_out, dtype=dtype)
    layer = methods.wrap(base, name, rank=rank, alpha=8, **opts)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return layer


def _reference_weight(layer, detach: bool) -> torch.Tensor:
    """The paper's merged weight from a dense ``V``, with the norms detached or not."""
    v = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
    nd = (lambda t: t.detach()) if detach else (lambda t: t)
    if layer.name == "dora":
        return (layer.magnitude / nd(v.norm(dim=1))).unsqueeze(1) * v
    if layer.name == "dora_col":
        return v * (layer.magnitude / nd(v.norm(dim=0))).unsqueeze(0)
    m = (layer.m_r / nd(v.norm(dim=1))).unsqueeze(1) * v  # M = diag(m_r/||V||_row) V
    col = (m.detach() if detach else m).norm(dim=0)
    return m * (layer.m_c / col).unsqueeze(0)


@pytest.mark.parametrize("name", NORM_METHODS)
@pytest.mark.parametrize("path", ["auto", "factored"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_and_effective_weight_unchanged(name, path, dtype, tol):
    for d_out, d_in, rank in [(16, 24, 4), (24, 16, 16)]:
        layer = _layer(name, d_out, d_in, rank, dtype=dtype)
        layer.norm_path = path
        x = torch.randn(3, d_in, dtype=dtype)
        with torch.no_grad():
            w_ref = _reference_weight(layer, detach=True)
            torch.testing.assert_close(layer(x), F.linear(x, w_ref, layer.bias), rtol=tol, atol=tol)
            torch.testing.assert_close(layer.effective_weight(), w_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NORM_METHODS)
@pytest.mark.parametrize("detach", [True, False])
def test_gradients_equal_dense(name, detach):
    layer = _layer(name, detach_norm=detach)
    x = torch.randn(5, 24, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = {}
    for path in ("dense", "factored"):
        layer.norm_path = path
        grads[path] = torch.autograd.grad(layer(x).sin().sum(), params)
    ref = torch.autograd.grad(F.linear(x, _reference_weight(layer, detach), layer.bias).sin().sum(), params)
    for g_dense, g_fact, g_ref in zip(grads["dense"], grads["factored"], ref):
        torch.testing.assert_close(g_fact, g_dense, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_fact, g_ref, rtol=1e-10, atol=1e-12)


def test_cache_is_shared_on_the_base_and_follows_its_weight():
    base = nn.Linear(24, 16, dtype=torch.float64)
    one, two = _layer("bora", base=base), _layer("dora", base=base)
    for layer in (one, two):
        layer.norm_path = "factored"
    x = torch.randn(3, 24, dtype=torch.float64)
    one(x)
    cache = frozen_stats(base, base.weight)
    cached = dict(cache)
    assert {k[0] for k in cached} == {"row2", "sq"}
    two(x)
    assert frozen_stats(base, base.weight) is cache  # the same dict, read by both adapters
    assert all(cache[k] is t for k, t in cached.items())  # nothing recomputed
    assert not any("stats" in k for k in list(one.state_dict()) + list(base.state_dict()))

    with torch.no_grad():  # an in-place change of the frozen weight (bumps its version)
        base.weight.mul_(1.5)
    assert frozen_stats(base, base.weight) is not cache
    for layer in (one, two):
        torch.testing.assert_close(layer(x), F.linear(x, _reference_weight(layer, True), base.bias))

    base.weight.data.mul_(2.0)  # .data bypasses the version counter: forget the cache by hand
    forget_frozen_stats(base)
    torch.testing.assert_close(one(x), F.linear(x, _reference_weight(one, True), base.bias))

    clone = copy.deepcopy(one)  # copies and pickles carry no cached tensors
    assert not clone.base._frozen_weight_stats.values
    assert not pickle.loads(pickle.dumps(one)).base._frozen_weight_stats.values


@pytest.mark.parametrize("name", NORM_METHODS)
def test_merged_and_unmerged(name):
    layer = _layer(name)
    layer.norm_path = "factored"
    x = torch.randn(4, 24, dtype=torch.float64)
    y = layer(x).detach()
    w = layer.effective_weight().detach()
    layer.merge()
    assert factored_norm_stats(layer, name) is None  # W0 is the backup copy now: dense path
    torch.testing.assert_close(layer.effective_weight(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert factored_norm_stats(layer, name) is not None
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.effective_weight(), w, rtol=1e-12, atol=1e-12)


def test_first_call_in_inference_mode_then_training():
    layer = _layer("bora", detach_norm=False)
    layer.norm_path = "factored"
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.inference_mode():
        y = layer(x)
    layer(x).sum().backward()  # the cached W0 statistics are no inference tensors
    torch.testing.assert_close(layer(x).detach(), y.clone())
    assert layer.lora_B.grad is not None


def test_path_choice():
    layer = _layer("dora")
    layer.norm_path = "dense"
    assert factored_norm_stats(layer, "dora") is None
    layer.norm_path = "auto"
    assert (factored_norm_stats(layer, "dora") is not None) == mbase.prefer_factored("dora", 4, 16, 24)
    # the measured rule (base.py): column norms factored at low rank on every shape; row norms and
    # BoRA only on large layers at low rank, BoRA only with gradients through the norms
    assert mbase.prefer_factored("dora_col", 8, 1536, 384) and not mbase.prefer_factored("dora_col", 256, 384, 384)
    assert mbase.prefer_factored("dora", 64, 2048, 2048) and not mbase.prefer_factored("dora", 256, 2048, 2048)
    assert not mbase.prefer_factored("dora", 8, 384, 384)
    assert not mbase.prefer_factored("bora", 8, 2048, 2048)
    assert mbase.prefer_factored("bora", 8, 2048, 2048, detach_norm=False)
    qdora = methods.wrap(nn.Linear(64, 32), "qdora", rank=4)
    qdora.norm_path = "factored"
    assert factored_norm_stats(qdora, "dora") is None  # NF4 base: W0 is dequantised per call
