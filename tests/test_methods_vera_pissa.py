"""PiSSA, AsyLoRA, VeRA/DVoRA and the DoRA† preset: their own properties."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bora_lab import methods
from bora_lab.methods.pissa import principal_factors
from bora_lab.methods.presets import PRESETS, resolve_preset


def _toy() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24))


def test_pissa_init_is_the_top_r_svd_and_reconstructs_w0():
    base = nn.Linear(20, 12)
    w0 = base.weight.detach().clone()
    layer = methods.wrap(base, "pissa", rank=3, alpha=6)
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(layer.scale * layer.lora_B @ layer.lora_A, principal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.w_res + layer.scale * layer.lora_B @ layer.lora_A, w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(layer.w_res)[:9], s[3:], atol=1e-5, rtol=1e-5)  # minor part
    assert torch.equal(base.weight, w0) and torch.equal(layer.weight0, w0)  # the wrapped Linear is untouched
    # A = sqrt(S/s) Vᵀ has orthogonal rows with norms S/s; B = U sqrt(S/s) orthogonal columns
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.diag(s[:3] / layer.scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.diag(s[:3] / layer.scale), atol=1e-5, rtol=1e-5)


def test_pissa_lowrank_svd_init_is_close_to_exact():
    torch.manual_seed(0)
    w = torch.randn(40, 6) @ torch.diag(torch.tensor([9.0, 7, 5, 1, 0.5, 0.1])) @ torch.randn(6, 30) / 10
    a, b = principal_factors(w, 3, 2.0, niter=4)
    a0, b0 = principal_factors(w, 3, 2.0)
    torch.testing.assert_close(b @ a, b0 @ a0, atol=1e-4, rtol=1e-4)


def test_pissa_merge_restores_w0_and_trains_principal_part():
    layer = methods.wrap(nn.Linear(20, 12), "pissa", rank=4)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    x = torch.randn(3, 20)
    y = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.weight0, w0)  # weight0 is W0 while merged, not W_res
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    assert not torch.allclose(layer.effective_weight(), w0)  # the update moved W away from W0


def test_asylora_a_is_a_frozen_seeded_buffer():
    layer = methods.wrap(nn.Linear(20, 12), "asylora", rank=4)
    assert "lora_A" in dict(layer.named_buffers()) and "lora_A" not in dict(layer.named_parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    assert layer.num_params(20, 12, layer.cfg) == 4 * 12
    a0 = layer.lora_A.clone()
    opt = torch.optim.SGD([layer.lora_B], lr=0.1)
    layer(torch.randn(5, 20)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.lora_A, a0) and layer.lora_B.abs().sum() > 0
    again = methods.wrap(nn.Linear(20, 12), "asylora", rank=4)
    other = methods.wrap(nn.Linear(20, 12), "asylora", rank=4, seed=1)
    assert torch.equal(again.lora_A, a0) and not torch.equal(other.lora_A, a0)
    ortho = methods.wrap(nn.Linear(20, 12), "asylora", rank=4, a_init="orthogonal")
    torch.testing.assert_close(ortho.lora_A @ ortho.lora_A.T, torch.eye(4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a_init"):
        methods.wrap(nn.Linear(20, 12), "asylora", rank=4, a_init="nope")


@pytest.mark.parametrize("name", ["vera", "dvora"])
def test_vera_shares_frozen_matrices_across_same_shape_layers(name):
    model = methods.apply(_toy(), name, rank=4)
    layers = dict(methods.adapter_layers(model))
    same = [layers["2"].vera, layers["4"].vera]  # both [24, 24]
    assert torch.equal(same[0].A, same[1].A) and torch.equal(same[0].B, same[1].B)
    assert not any(p.requires_grad for p in same[0].buffers())
    assert layers["0"].vera.A.shape == (4, 16)
    for lay in layers.values():
        trainable = {n for n, p in lay.named_parameters() if p.requires_grad}
        assert trainable == ({"vera.d", "vera.b"} | ({"magnitude"} if name == "dvora" else set()))
        torch.testing.assert_close(lay.vera.d, torch.full((4,), 0.1))
    expected = sum(lay.num_params(lay.in_features, lay.out_features, lay.cfg) for lay in layers.values())
    assert methods.trainable_summary(model)["trainable"] == expected
    assert expected == 3 * 4 + (24 * 3) * (2 if name == "dvora" else 1)


def test_dvora_rows_have_norm_m():
    layer = methods.wrap(nn.Linear(20, 12), "dvora", rank=4)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    torch.testing.assert_close(layer.effective_weight().norm(dim=1), layer.magnitude.abs(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vera", "asylora", "pissa"])
def test_trainable_tensors_alone_reproduce_the_model(name, tmp_path):
    """Frozen random/derived tensors are regenerated, so save_adapter's trainable tensors suffice."""
    torch.manual_seed(3)
    src = _toy()
    dst = _toy()
    dst.load_state_dict(src.state_dict())
    methods.apply(src, name, rank=4)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = methods.save_adapter(src, tmp_path / "a.safetensors")
    methods.load_adapter(dst, path)
    x = torch.randn(4, 16)
    torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)


def test_dora_dagger_preset_is_dora_at_half_rank():
    assert "dora_dagger" in PRESETS and "dora_dagger" not in methods.available()
    assert resolve_preset("dora_dagger", 8) == ("dora", 4)
    assert resolve_preset("dora_dagger", 3) == ("dora", 2)
    assert resolve_preset("dora_dagger", 1) == ("dora", 1)
    assert resolve_preset("lora", 8) == ("lora", 8)  # plain methods pass through
    method, rank = resolve_preset("dora_dagger", 8)
    dagger = methods.apply(_toy(), method, rank=rank)
    full = methods.apply(_toy(), "dora", rank=8)
    n_dagger, n_full = (methods.trainable_summary(m)["trainable"] for m in (dagger, full))
    assert 0.4 * n_full < n_dagger < 0.6 * n_full
