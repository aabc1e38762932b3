"""LoRA2 and AdaLoRA: orthogonality regulariser, importance scores, budget schedule, rank history."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from bora_lab import methods
from bora_lab.methods import adalora, budget, lora2
from bora_lab.methods.budget import Sensitivity, budget_schedule, phase_lengths


def _toy() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 8))


def _train(model: nn.Module, steps: int, lr: float = 1e-2, reg: bool = True, zero_based: bool = False) -> list[float]:
    """The trainer's call order: loss (+ reg) → backward → step → after_step → zero_grad."""
    torch.manual_seed(1)
    teacher = nn.Linear(16, 8)
    x = torch.randn(64, 16)
    y = teacher(x).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for t in range(steps):
        loss = (model(x) - y).pow(2).mean()
        losses.append(loss.item())
        if reg:
            loss = loss + budget.regularization_loss(model)
        loss.backward()
        opt.step()
        budget.update_and_allocate(model, t if zero_based else t + 1, steps)
        opt.zero_grad()
    return losses


def test_budget_schedule_is_cubic_and_reaches_target():
    total, warm, final = 100, 10, 20
    out = [budget_schedule(t, total, 48, 12, warm, final) for t in range(1, total + 1)]
    assert all(b == 48 and ph == "warmup" for b, ph in out[:warm])
    budgets = [b for b, _ in out]
    assert all(a >= b for a, b in pairwise(budgets))  # never grows
    assert all(b == 12 and ph == "final" for b, ph in out[total - final - 1:])
    t = 45  # cubic in between: target + (init - target) * (1 - (t - warm) / (end - warm))^3
    assert budgets[t - 1] == int(12 + 36 * (1 - (t - warm) / (total - final - warm)) ** 3)
    assert phase_lengths(methods.registry.make_config("adalora", final_frac=0.0), 10) == (1, 1)  # final phase >= 1 step


def test_sensitivity_matches_adalora_equations():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([3.0, 4.0])
    s = Sensitivity(beta1=0.5, beta2=0.5)
    assert s.update({"diag": p})
    ipt = torch.tensor([3.0, 8.0])
    avg = 0.5 * ipt
    torch.testing.assert_close(s.avg["diag"], avg)
    torch.testing.assert_close(s.score("diag", p), avg * 0.5 * (ipt - avg).abs())
    q = nn.Parameter(torch.ones(2))
    assert not s.update({"x": q})  # no gradient, nothing folded in


def test_adalora_global_budget_reaches_target_and_records_history():
    model = methods.apply(_toy(), "adalora", rank=6, target_rank=2, warmup_frac=0.1, final_frac=0.2)
    layers = dict(methods.adapter_layers(model))
    assert len(layers) == 3 and len({id(m._allocator) for m in layers.values()}) == 1  # one global group
    steps = 40
    losses = _train(model, steps)
    assert losses[-1] < losses[0]
    hist = adalora.rank_history(model)
    assert set(hist) == set(layers)
    assert all(len(h) == steps for h in hist.values())  # one record per step, not one per layer call
    warm, final = phase_lengths(model.get_submodule("0").cfg, steps)
    for t in range(1, steps + 1):
        total = sum(h[t - 1][1] for h in hist.values())
        assert total == budget_schedule(t, steps, 18, 6, warm, final)[0], t
    assert sum(m.remaining_rank() for m in layers.values()) == 6  # target: 2 per layer on average
    for m in layers.values():  # pruned singular values are zero in the parameter too (save_adapter keeps them)
        assert torch.all(m.lora_E.weight[~m.lora_E.mask] == 0)


def test_adalora_zero_based_steps_and_per_layer_allocation():
    model = methods.apply(_toy(), "adalora", rank=5, target_rank=3, allocation="per_layer", final_frac=0.0)
    _train(model, 12, zero_based=True)
    assert [m.remaining_rank() for _, m in methods.adapter_layers(model)] == [3, 3, 3]


def test_adalora_pruning_changes_the_function_and_merge_follows():
    layer = methods.wrap(nn.Linear(12, 10), "adalora", rank=4, target_rank=1, warmup_frac=0.0, final_frac=0.0)
    with torch.no_grad():
        layer.lora_E.weight.normal_()
    x = torch.randn(3, 12)
    layer(x).pow(2).sum().backward()
    layer.after_step(1, 1)  # a one-step run goes straight to the final budget
    assert layer.remaining_rank() == 1
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.effective_weight(), layer.bias))
    y = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), y)


def test_after_step_without_gradients_warns():
    layer = methods.wrap(nn.Linear(8, 8), "adalora", rank=4)
    with pytest.warns(RuntimeWarning, match="before optimizer.zero_grad"):
        layer.after_step(1, 10)


def test_lora2_param_count_and_shapes():
    layer = methods.wrap(nn.Linear(20, 12), "lora2", rank=3, lambda_rank=5)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    assert shapes == {"in_v": (3, 20), "in_u": (5, 3), "lora_E.weight": (5,), "out_U": (3, 5), "out_V": (12, 3)}
    assert layer.num_params(20, 12, layer.cfg) == 3 * (20 + 12) + 2 * 3 * 5 + 5


def test_lora2_orthogonality_improves_under_its_regulariser():
    def run(weight: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = methods.apply(_toy(), "lora2", rank=4, lambda_rank=4, target_rank=4, orth_reg_weight=weight)
        pen = lambda: sum(sum(m.orthogonality().values()).item() for _, m in methods.adapter_layers(model))
        start = pen()
        _train(model, 30, lr=2e-2)
        return start, pen()

    start, free = run(0.0)
    start_reg, regularised = run(1.0)
    assert start == pytest.approx(start_reg)  # same init
    assert regularised < 0.5 * start  # the regulariser makes the factors more orthonormal...
    assert regularised < 0.5 * free  # ...than training without it


def test_lora2_ranks_pruned_on_schedule_and_history():
    model = methods.apply(_toy(), "lora2", rank=4, lambda_rank=6, target_rank=2, warmup_frac=0.2, final_frac=0.2)
    steps = 30
    _train(model, steps)
    hist = lora2.rank_history(model)
    assert list(hist) == ["0", "2", "4"] and all(len(h) == steps for h in hist.values())
    warm, final = phase_lengths(model.get_submodule("0").cfg, steps)
    totals = [sum(h[t][1] for h in hist.values()) for t in range(steps)]
    assert totals[:warm] == [18] * warm  # no pruning during warm-up
    assert totals == [budget_schedule(t, steps, 18, 6, warm, final)[0] for t in range(1, steps + 1)]
    assert totals[-1] == 6 and all(h[-1][0] == steps for h in hist.values())
    final_ranks = [m.remaining_rank() for _, m in methods.adapter_layers(model)]
    assert sum(final_ranks) == 6 and all(0 <= r <= 6 for r in final_ranks)


def test_lora2_importance_is_eq9_on_the_small_factors():
    layer = methods.wrap(nn.Linear(10, 8), "lora2", rank=3, lambda_rank=4, beta1=0.0, beta2=0.0)
    with torch.no_grad():
        layer.lora_E.weight.normal_()
    layer(torch.randn(5, 10)).pow(2).sum().backward()
    assert layer.update_importance()
    s = lambda p: (p * p.grad).abs()  # with beta1 = 0 the smoothed sensitivity is the raw |p · grad|
    torch.testing.assert_close(layer._sens.avg["diag"], s(layer.lora_E.weight).detach())
    torch.testing.assert_close(layer._sens.avg["row"], s(layer.in_u).detach())
    torch.testing.assert_close(layer._sens.avg["col"], s(layer.out_U).detach())
    assert set(layer._sens.avg) == {"diag", "row", "col"}  # in_v and out_V are never scored (eq. 9)


def test_separate_wraps_have_separate_groups_and_after_step_is_once_per_step():
    a = methods.wrap(nn.Linear(8, 8), "lora2", rank=2, lambda_rank=2)
    b = methods.wrap(nn.Linear(8, 8), "lora2", rank=2, lambda_rank=2)
    assert a._allocator is not b._allocator
    a(torch.randn(2, 8)).sum().backward()
    a.after_step(1, 10)
    a.after_step(1, 10)
    assert a.rank_history == [(1, 2)]


def test_regularization_loss_is_averaged_over_layers():
    model = methods.apply(_toy(), "adalora", rank=3, orth_reg_weight=0.5)
    layers = [m for _, m in methods.adapter_layers(model)]
    expected = 0.5 * sum(budget.orth_penalty(m.lora_A) + budget.orth_penalty(m.lora_B) for m in layers) / 3
    torch.testing.assert_close(budget.regularization_loss(model), expected)
    off = methods.wrap(nn.Linear(8, 8), "lora2", rank=2, orth_reg_weight=0.0)
    assert off.regularization_loss().item() == 0.0


def test_deepcopy_copies_the_allocation_group():
    import copy

    model = methods.apply(_toy(), "adalora", rank=4, target_rank=1)
    clone = copy.deepcopy(model)
    layers = [m for _, m in methods.adapter_layers(clone)]
    assert layers[0]._allocator is layers[1]._allocator is not model.get_submodule("0")._allocator
    assert layers[0]._allocator.layers == layers  # the copy's group holds the copied layers
    _train(clone, 5)
    assert all(m.rank_history == [] for _, m in methods.adapter_layers(model))
    assert sum(m.remaining_rank() for m in layers) == 3
