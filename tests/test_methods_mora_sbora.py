"""MoRA (all four compress/decompress kinds) and SBoRA-FA/FB with Multi-SBoRA merging."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bora_lab import methods
from bora_lab.methods.mora import KINDS, mora_rank
from bora_lab.methods.sbora import choose_indices, merge_multi_sbora, merge_multi_sbora_model

SHAPES = [(24, 16, 4), (10, 40, 4), (40, 10, 2), (7, 5, 1)]  # (in, out, rank): r̂ below/above in and out


def _perturb(layer, scale=0.1):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _train(layer, steps=25, lr=0.02):
    """Fit a tiny regression problem; returns the losses."""
    d_in, d_out = layer.in_features, layer.out_features
    x = torch.randn(64, d_in)
    y = F.linear(x, layer.weight0 + 0.3 * torch.randn(d_out, d_in))
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- MoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_in,d_out,rank", [(24, 16, 4), (4096, 4096, 8), (768, 3072, 8), (5, 7, 1)])
def test_mora_matches_lora_budget(kind, d_in, d_out, rank):
    # default rounding is the official code's int(√budget + 0.5); rotation then rounds down to even
    budget = rank * (d_in + d_out)
    r_hat = mora_rank(rank, d_in, d_out, kind)
    nearest = int(math.sqrt(budget) + 0.5)
    assert r_hat == (nearest // 2 * 2 if kind == "rotation" else nearest)
    assert abs(nearest - math.sqrt(budget)) <= 0.5
    cfg = methods.registry.make_config("mora", rank=rank, kind=kind)
    assert methods.METHODS["mora"].num_params(d_in, d_out, cfg) == r_hat**2
    # rounding="floor" (the paper's ⌊·⌋) never exceeds LoRA's budget
    r_floor = mora_rank(rank, d_in, d_out, kind, "floor")
    assert r_floor**2 <= budget
    step = 2 if kind == "rotation" else 1
    assert (r_floor + step) ** 2 > budget
    if kind == "rotation":
        assert r_hat % 2 == 0 and r_floor % 2 == 0
    cfg = methods.registry.make_config("mora", rank=rank, kind=kind, rounding="floor")
    assert methods.METHODS["mora"].num_params(d_in, d_out, cfg) == r_floor**2


def test_mora_lecture_example():
    # lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), MoRA section: a 4096×4096 layer,
    # LoRA r=8 has 65,536 parameters, MoRA uses a 256×256 M
    assert mora_rank(8, 4096, 4096) == 256


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
def test_mora_forward_merge_identity_all_kinds(kind, d_in, d_out, rank):
    base = nn.Linear(d_in, d_out)
    layer = methods.wrap(base, "mora", rank=rank, kind=kind)
    x = torch.randn(2, 3, d_in)
    torch.testing.assert_close(layer(x), base(x))  # M = 0: identity at init
    _perturb(layer)
    y = layer(x).detach()
    torch.testing.assert_close(y, F.linear(x, layer.effective_weight(), base.bias), atol=1e-5, rtol=1e-5)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_mora_delta_structure():
    d_in, d_out = 24, 16  # budget 4·40 = 160: r̂ = 13 (nearest), 12 (floor)
    layers = {k: methods.wrap(nn.Linear(d_in, d_out), "mora", rank=4, kind=k, rounding="floor") for k in KINDS}
    layers["sharing_adjacent"] = methods.wrap(nn.Linear(d_in, d_out), "mora", rank=4, kind="sharing",
                                              rounding="floor", groups="adjacent")
    for layer in layers.values():
        _perturb(layer, 1.0)
    with torch.no_grad():
        m = layers["truncation"].mora_M  # r̂ = 12
        expected = torch.zeros(d_out, d_in)
        expected[:12, :12] = m
        torch.testing.assert_close(layers["truncation"].delta_weight(), expected)
        for name in ("sharing", "sharing_adjacent"):  # 24 = 2·12: no padding, ΔW = M[g_out][:, g_in]
            sh = layers[name]
            torch.testing.assert_close(sh.delta_weight(), sh.mora_M[sh.g_out][:, sh.g_in])
            assert sh.g_in.bincount().tolist() == [2] * 12
        assert layers["sharing"].g_in.tolist() == list(range(12)) * 2  # cyclic (default): j mod r̂
        assert layers["sharing_adjacent"].g_in.tolist() == [k // 2 for k in range(24)]  # adjacent pairs
        dec = layers["decomposition"]  # 2 input blocks of 12; 16 outputs = block 0 and 4 rows of block 1
        expected = torch.zeros(d_out, d_in)
        expected[:12, :12] = dec.mora_M
        expected[12:, 12:] = dec.mora_M[:4]
        torch.testing.assert_close(dec.delta_weight(), expected)
        rot = layers["rotation"]  # block 0 is not rotated (angle 0): M itself
        torch.testing.assert_close(rot.delta_weight()[:12, :12], rot.mora_M)
        assert not torch.allclose(rot.delta_weight()[12:, 12:], rot.mora_M[:4])


def test_mora_wrap_and_zero_padding():
    # r̂ = 13 (nearest): 24 inputs = 13 + 11, the last block is short by 2
    wrap = methods.wrap(nn.Linear(24, 16), "mora", rank=4, kind="decomposition")
    zero = methods.wrap(nn.Linear(24, 16), "mora", rank=4, kind="decomposition", pad="zero")
    assert wrap.r_hat == zero.r_hat == 13
    _perturb(wrap, 1.0)
    with torch.no_grad():
        zero.mora_M.copy_(wrap.mora_M)
        m, dw, dz = wrap.mora_M, wrap.delta_weight(), zero.delta_weight()
    expected = torch.zeros(16, 24)
    expected[:13, :13] = m
    expected[13:, 13:] = m[:3, :11]
    torch.testing.assert_close(dz, expected)  # zero padding: block diagonal
    extra = torch.zeros(16, 24)
    extra[13:, :2] = m[:3, 11:]  # wrap: inputs 0 and 1 fill the last block's slots 11 and 12
    torch.testing.assert_close(dw, expected + extra)


@pytest.mark.parametrize("kind", ["decomposition", "rotation"])
def test_mora_update_is_high_rank(kind):
    layer = methods.wrap(nn.Linear(64, 64), "mora", rank=2, kind=kind)  # r̂ = 16, LoRA would give rank 2
    _perturb(layer, 1.0)
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) > 16


@pytest.mark.parametrize("kind", KINDS)
def test_mora_trains_with_decreasing_loss(kind):
    losses = _train(methods.wrap(nn.Linear(24, 16), "mora", rank=4, kind=kind))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0]


def test_mora_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        methods.wrap(nn.Linear(8, 8), "mora", rank=2, kind="nope")


# -- SBoRA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,axis", [("sbora_fa", 1), ("sbora_fb", 0)])
def test_sbora_only_touched_columns_or_rows_change(name, axis):
    layer = methods.wrap(nn.Linear(24, 16), name, rank=4, index_seed=3)
    w0 = layer.weight0.detach().clone()
    losses = _train(layer, steps=20)
    assert losses[-1] < 0.9 * losses[0]
    changed = (layer.effective_weight().detach() != w0).any(dim=1 - axis)  # per column (FA) / row (FB)
    idx = layer.touched_indices()
    assert changed.nonzero().flatten().tolist() == idx.tolist()
    assert len(idx) == 4 and torch.equal(idx, idx.sort().values)


def test_sbora_halves_lora_params():
    lora = methods.wrap(nn.Linear(32, 32), "lora", rank=4)

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    fa = methods.wrap(nn.Linear(32, 32), "sbora_fa", rank=4)
    fb = methods.wrap(nn.Linear(32, 32), "sbora_fb", rank=4)
    assert count(fa) == count(fb) == count(lora) // 2
    assert fa.sbora_B.shape == (32, 4) and fb.sbora_A.shape == (4, 32)


def test_sbora_index_rules():
    base = nn.Linear(24, 16)
    a = methods.wrap(base, "sbora_fa", rank=4, index_seed=1).touched_indices()
    b = methods.wrap(base, "sbora_fa", rank=4, index_seed=1).touched_indices()
    c = methods.wrap(base, "sbora_fa", rank=4, index_seed=2).touched_indices()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        base.weight[:, [3, 17, 20, 5]] *= 10  # the four strongest columns
        base.weight[[2, 9, 11, 14]] *= 10  # the four strongest rows
    fa = methods.wrap(base, "sbora_fa", rank=4, index_rule="norm")
    fb = methods.wrap(base, "sbora_fb", rank=4, index_rule="norm")
    assert fa.touched_indices().tolist() == [3, 5, 17, 20]
    assert fb.touched_indices().tolist() == [2, 9, 11, 14]
    assert "sb_index" in fa.state_dict()


def test_sbora_task_ids_are_disjoint():
    w = torch.randn(16, 24)
    sets = [set(choose_indices(w, 4, 1, "random", 0, t).tolist()) for t in range(6)]
    assert set().union(*sets) == set(range(24))  # 6 tasks × 4 columns partition 24 columns
    with pytest.raises(ValueError, match="task_id 6"):
        choose_indices(w, 4, 1, "random", 0, 6)


@pytest.mark.parametrize("name,axis", [("sbora_fa", 1), ("sbora_fb", 0)])
def test_multi_sbora_merge_without_interference(name, axis):
    base = nn.Linear(24, 16)
    w0 = base.weight.detach().clone()
    tasks = [methods.wrap(base, name, rank=4, task_id=t) for t in range(2)]
    for t in tasks:
        _train(t, steps=10)
    merged = merge_multi_sbora(base, tasks)
    assert torch.equal(base.weight, w0)  # the input layer is left alone
    w = merged.weight.detach()
    touched = set()
    for t in tasks:
        idx = t.touched_indices()
        torch.testing.assert_close(w.index_select(axis, idx), t.effective_weight().detach().index_select(axis, idx))
        touched |= set(idx.tolist())
    rest = torch.tensor(sorted(set(range(w0.shape[axis])) - touched))
    assert torch.equal(w.index_select(axis, rest), w0.index_select(axis, rest))
    # Sequential: merging task 2 into the model that holds task 1 leaves task 1's region untouched.
    one = merge_multi_sbora(base, tasks[:1])
    both = merge_multi_sbora(one, tasks[1:])
    idx1 = tasks[0].touched_indices()
    assert torch.equal(both.weight.index_select(axis, idx1), one.weight.index_select(axis, idx1))
    torch.testing.assert_close(both.weight, merged.weight)
    x = torch.randn(5, 24)
    expected = base(x) + sum(F.linear(x, t.effective_weight() - w0) for t in tasks)
    torch.testing.assert_close(merged(x), expected.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="differs from adapter 0"):
        merge_multi_sbora(one, tasks[:1])  # task 1 merged twice


def test_multi_sbora_rejects_overlap_and_mixed_kinds():
    base = nn.Linear(24, 16)
    a = methods.wrap(base, "sbora_fa", rank=4, index_seed=0)
    b = methods.wrap(base, "sbora_fa", rank=4, index_seed=0)  # same indices
    with pytest.raises(ValueError, match="overlap"):
        merge_multi_sbora(base, [a, b])
    fb = methods.wrap(base, "sbora_fb", rank=4)
    with pytest.raises(ValueError, match="one kind"):
        merge_multi_sbora(base, [a, fb])


def test_multi_sbora_model_merge():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    import copy

    tasks = []
    for t in range(2):
        m = methods.apply(copy.deepcopy(base), "sbora_fa", rank=2, target_modules=["0", "2"], task_id=t)
        for _, layer in methods.adapter_layers(m):
            _perturb(layer, 0.5)
        tasks.append(m)
    merged = merge_multi_sbora_model(base, tasks)
    assert isinstance(merged[0], nn.Linear) and isinstance(merged[2], nn.Linear)
    for i in ("0", "2"):
        w = merged.get_submodule(i).weight
        for m in tasks:
            layer = m.get_submodule(i)
            idx = layer.touched_indices()
            torch.testing.assert_close(w[:, idx], layer.effective_weight().detach()[:, idx])
