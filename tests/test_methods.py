"""Registry-wide contract tests: every layer-level method is tested with no new test code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bora_lab import methods
from bora_lab.methods import METHODS

LAYER_METHODS = [n for n, c in METHODS.items() if c.kind == "layer"]
D_IN, D_OUT, RANK = 24, 16, 4


def _perturb(layer: nn.Module, scale: float = 0.1) -> None:
    """Move every trainable tensor away from init (B = 0 would make many tests pass trivially)."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _layer(name: str, bias: bool = True, **opts) -> methods.AdapterLinear:
    return methods.wrap(nn.Linear(D_IN, D_OUT, bias=bias), name, rank=RANK, alpha=8, **opts)


def _tol(name):
    return getattr(METHODS[name], "test_atol", 1e-5)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_identity_at_init(name):
    if not METHODS[name].identity_at_init:
        pytest.skip(f"{name} does not start at the pretrained function by design")
    base = nn.Linear(D_IN, D_OUT)
    ref = nn.Linear(D_IN, D_OUT)
    ref.load_state_dict(base.state_dict())
    layer = methods.wrap(base, name, rank=RANK)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(layer(x), ref(x), atol=_tol(name), rtol=1e-5)
    reference = getattr(layer, "reference_weight", lambda: ref.weight)()
    torch.testing.assert_close(layer.effective_weight(), reference, atol=_tol(name), rtol=1e-5)


@pytest.mark.parametrize("name", LAYER_METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_effective_weight(name, bias):
    layer = _layer(name, bias=bias)
    _perturb(layer)
    x = torch.randn(2, 3, D_IN)
    expected = F.linear(x, layer.effective_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=_tol(name), rtol=1e-5)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_merge_unmerge_round_trip(name):
    if not METHODS[name].mergeable:
        pytest.skip(f"{name} is not mergeable")
    layer = _layer(name)
    _perturb(layer)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, D_IN)
    y = layer(x).detach()
    layer.merge()
    layer.merge()  # idempotent
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=_tol(name), rtol=1e-5)
    torch.testing.assert_close(layer.effective_weight(), layer.base.weight, atol=_tol(name), rtol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), y, atol=_tol(name), rtol=1e-5)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_only_adapter_trains(name):
    layer = _layer(name)
    _perturb(layer)
    w0 = layer.base.weight.detach().clone()
    b0 = layer.base.bias.detach().clone()
    trainable = {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable, f"{name} has no trainable tensor"
    assert not any(p.requires_grad for p in layer.base.parameters())
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(8, D_IN)).pow(2).sum().backward()
    assert layer.base.weight.grad is None
    opt.step()
    assert torch.equal(layer.base.weight, w0) and torch.equal(layer.base.bias, b0)
    for n, p in layer.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"{name}: {n} did not move"


@pytest.mark.parametrize("name", LAYER_METHODS)
@pytest.mark.parametrize("bias", [True, False])
def test_param_count_matches_formula(name, bias):
    layer = _layer(name, bias=bias)
    real = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert real == layer.num_params(D_IN, D_OUT, layer.cfg, bias)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_zero_row_and_column_give_no_nan(name):
    base = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        base.weight[3].zero_()
        base.weight[:, 5].zero_()
    opts = {"detach_norm": False} if "detach_norm" in {f["name"] for f in methods.config_fields(name)} else {}
    for o in ({}, opts):
        layer = methods.wrap(base, name, rank=RANK, **o)
        y = layer(torch.randn(4, D_IN))
        y.sum().backward()
        assert torch.isfinite(y).all()
        assert torch.isfinite(layer.effective_weight()).all()
        for p in layer.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), f"{name}: NaN gradient"


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_bf16_forward(name):
    layer = _layer(name).to(torch.bfloat16)
    y = layer(torch.randn(3, D_IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_detach_option_changes_only_gradients(name):
    fields = {f["name"] for f in methods.config_fields(name)}
    if "detach_norm" not in fields:
        pytest.skip("no norms to detach")
    base = nn.Linear(D_IN, D_OUT)
    a = methods.wrap(base, name, rank=RANK)
    _perturb(a)
    b = methods.wrap(base, name, rank=RANK, detach_norm=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(a(x), b(x))
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    grads_b = dict(b.named_parameters())
    assert any(not torch.allclose(p.grad, grads_b[n].grad) for n, p in a.named_parameters() if p.grad is not None)


def test_bora_columns_have_norms_m_c():
    layer = _layer("bora")
    _perturb(layer, 0.3)
    w = layer.effective_weight()
    torch.testing.assert_close(w.norm(dim=0), layer.m_c.abs(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(w.norm(dim=1), layer.m_r, atol=1e-3)


def test_dora_axes():
    row, col = _layer("dora"), _layer("dora_col")
    _perturb(row, 0.3)
    _perturb(col, 0.3)
    torch.testing.assert_close(row.effective_weight().norm(dim=1), row.magnitude.abs(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(col.effective_weight().norm(dim=0), col.magnitude.abs(), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    lin = nn.Linear(D_IN, D_OUT)
    with pytest.raises(ValueError, match="unknown method 'nope'.*lora"):
        methods.wrap(lin, "nope")
    with pytest.raises(ValueError, match=r"rank 17 is invalid.*<= 16"):
        methods.wrap(lin, "lora", rank=17)
    with pytest.raises(ValueError, match="rank 0"):
        methods.wrap(lin, "dora", rank=0)
    with pytest.raises(ValueError, match="no option.*bogus"):
        methods.wrap(lin, "lora", bogus=1)


def test_register_rejects_bad_names():
    from dataclasses import dataclass

    @dataclass
    class C:
        rank: int = 1

    with pytest.raises(ValueError, match="lowercase"):
        methods.register("BadName", C)
    with pytest.raises(ValueError, match="already registered"):
        methods.register("lora", C)(type("X", (), {}))


def test_every_method_declares_metadata():
    for name in methods.available():
        info = methods.info(name)
        assert info["description"] and info["formula"] and info["paper"], name
