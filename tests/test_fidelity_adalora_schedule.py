"""AdaLoRA's budget schedule and importance scores against Hugging Face PEFT 0.21.2.

Paper: Zhang et al., 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", arXiv:2303.10512. For every entry ``w`` of P, Λ, Q: sensitivity
``I = |w · ∂L/∂w|`` (eq. 8), smoothed sensitivity ``Ī ← β1 Ī + (1−β1) I`` (eq. 9), uncertainty
``Ū ← β2 Ū + (1−β2) |I − Ī|`` (eq. 10), entry score ``s = Ī · Ū`` (eq. 11); triplet score
``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 7); the triplets outside the top ``b(t)``
are truncated (eq. 6) with ``b(t)`` on a cubic schedule. PEFT: ``peft/tuners/adalora/layer.py``
(``RankAllocator.budget_schedule``, ``update_ipt``, ``_element_score``, ``_combine_ipt``,
``mask_to_budget``) and ``model.py`` (``AdaLoraModel.update_and_allocate``).

Option names: PEFT ``init_r → rank``, ``target_r → target_rank``, ``tinit → warmup_frac · total``,
``tfinal → final_frac · total`` (ours keeps at least one final step, so ``tfinal = 0`` is only
compared at the level of :func:`budget.budget_schedule`), ``deltaT → mask_interval``,
``beta1/beta2 → beta1/beta2``, ``total_step → total_steps`` of ``after_step``,
``orth_reg_weight → orth_reg_weight`` with ``orth_reg="peft"``, ``lora_alpha → alpha`` times
``r / (r + 1e-5)`` (PEFT divides by ``ranknum + 1e-5``).

What is compared:

* the budget of every step ``0..total_step`` and PEFT's "mask now?" flag: equal for every
  config PEFT accepts;
* which steps update the importance, re-allocate (and to what budget) or re-apply the frozen
  pattern, through the real allocators (ours: ``RankAllocator.step``; PEFT:
  ``AdaLoraModel.update_and_allocate``). With ``mask_style="peft"`` these are the same on every step;
  the default ``"forward"`` also updates the importance on the step that freezes the pattern;
* on a tiny two-layer model trained with the same batches and SGD: ``exp_avg_ipt`` (Ī),
  ``exp_avg_unc`` (Ū), the triplet scores, budgets and masks at every allocation, and the
  parameters. With ``mask_style="peft"`` they agree on every step (rtol 1e-6, float32). With the
  default ``"forward"`` style they agree up to and including the first allocation; afterwards a
  pruned λ gets no gradient in ours (λ ⊙ mask in the forward) while PEFT zeroes λ in place and
  lets it regrow between allocations.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bora_lab import methods
from bora_lab.methods import budget
from bora_lab.methods.budget import budget_schedule, keep_mask, phase_lengths

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig  # noqa: E402
from peft.tuners.adalora import AdaLoraModel  # noqa: E402

NAMES = ("up", "down")
N_LAYERS = len(NAMES)
RTOL = 1e-6  # float32, relative: the sensitivities are ~1e-4 and their products ~1e-9
ATOL = 1e-12

# (init_r, target_r, tinit, tfinal, deltaT, total_step)
SCHEDULES = [
    (12, 8, 0, 0, 1, 50),  # PEFT's defaults (tinit = tfinal = 0, deltaT = 1)
    (12, 4, 10, 20, 1, 100),  # the example of AdaLoraConfig's docstring
    (6, 2, 3, 7, 3, 37),
    (8, 0, 5, 1, 7, 64),
    (4, 3, 1, 10, 2, 25),
    (16, 1, 200, 300, 10, 1500),
]


class _Tiny(nn.Module):
    """Two Linear layers 16 → 24 → 12; returns ``.loss`` so that PEFT adds its regulariser to it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 12)

    def forward(self, x, y=None):
        out = self.down(torch.tanh(self.up(x)))
        loss = (out - y).pow(2).mean() if y is not None else None
        return SimpleNamespace(logits=out, loss=loss)


def _peft(model: nn.Module, init_r, target_r, tinit, tfinal, deltaT, total_step, **kw) -> AdaLoraModel:
    cfg = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                        total_step=total_step, target_modules=list(NAMES), **kw)
    return AdaLoraModel(model, cfg, "default")


def _our_options(init_r, target_r, tinit, tfinal, deltaT, total_step) -> dict:
    opts = dict(rank=init_r, target_rank=target_r, warmup_frac=tinit / total_step,
                final_frac=tfinal / total_step, mask_interval=deltaT)
    assert phase_lengths(methods.registry.make_config("adalora", **opts), total_step) == (tinit, tfinal)
    return opts


# -- 1. the budget of every step -------------------------------------------------------------------
@pytest.mark.parametrize("sched", SCHEDULES)
def test_budget_schedule_equals_peft_on_every_step(sched):
    init_r, target_r, tinit, tfinal, delta_t, total = sched
    ra = _peft(_Tiny(), *sched).rankallocator
    init_b, target_b = N_LAYERS * init_r, N_LAYERS * target_r
    assert (ra.init_bgt, ra.target_bgt) == (init_b, target_b)
    end = total - tfinal
    for step in range(total + 1):
        peft_budget, peft_mask = ra.budget_schedule(step)
        ours, phase = budget_schedule(step, total, init_b, target_b, tinit, tfinal)
        assert ours == peft_budget, step
        # our phases are PEFT's branches; step == end is PEFT's last cubic step (coefficient 0),
        # where AdaLoraModel.update_and_allocate forces the final mask: our first "final" step
        assert phase == ("warmup" if step <= tinit else "final" if step >= end else "prune"), step
        if phase == "warmup":
            assert not peft_mask, step
        elif phase == "prune":
            assert peft_mask == (step % delta_t == 0), step
        elif step > end:
            assert peft_mask, step  # PEFT re-applies the frozen pattern; ours enforces it every step
    assert budget_schedule(end, total, init_b, target_b, tinit, tfinal)[0] == target_b


# -- 2. when each allocator updates, allocates, re-applies ---------------------------------------
class _Stub(nn.Module):
    """Allocator protocol with fixed, distinct scores; logs the importance updates."""

    def __init__(self, rank: int, scores: torch.Tensor, log: list, mask_in_forward: bool):
        super().__init__()
        self.lora_E = budget.PrunableDiagonal(rank, torch.zeros(1), mask_in_forward=mask_in_forward)
        self.scores, self.log = scores, log

    def update_importance(self) -> bool:
        self.log.append("update")
        return True

    def triplet_scores(self) -> torch.Tensor:
        return self.scores


def _peft_events(sched) -> list[tuple]:
    """``(updated, allocation budget or None, re-applied)`` per step of PEFT's model-level loop."""
    pm = _peft(_Tiny(), *sched)
    ra, log = pm.rankallocator, []
    ra.update_ipt = lambda model: log.append("update")
    ra.mask_to_budget = lambda model, b: (log.append(("mask", b)), {"p": [True]})[1]
    ra.mask_using_rank_pattern = lambda model, pattern: log.append("reapply")
    events = []
    for step in range(sched[-1] + 1):
        log.clear()
        pm.update_and_allocate(step)
        masks = [b for e in log if isinstance(e, tuple) for b in e[1:]]
        events.append(("update" in log, masks[0] if masks else None, "reapply" in log))
    return events


def _our_events(sched, style: str) -> list[tuple]:
    init_r, target_r, tinit, tfinal, delta_t, total = sched
    cfg = methods.registry.make_config("adalora", mask_style=style,
                                       **_our_options(init_r, target_r, tinit, tfinal, delta_t, total))
    alloc, log = budget.RankAllocator(cfg), []
    gen = torch.Generator().manual_seed(0)
    for _ in NAMES:
        alloc.add(_Stub(init_r, torch.rand(init_r, generator=gen), log, mask_in_forward=style == "forward"))
    original = alloc._allocate
    alloc._allocate = lambda budgets: (log.append(("mask", budgets[0])), original(budgets))
    events = []
    for step in range(total + 1):
        log.clear()
        frozen = alloc.frozen
        alloc.step(step, total)
        masks = [b for e in log if isinstance(e, tuple) for b in e[1:]]
        events.append(("update" in log, masks[0] if masks else None, frozen))  # frozen: pattern re-applied
        if masks:
            assert sum(lay.lora_E.remaining() for lay in alloc.layers) == masks[0]
    return events


@pytest.mark.parametrize("sched", [s for s in SCHEDULES if s[3] >= 1 and s[5] <= 200])
def test_allocation_steps_equal_peft(sched):
    peft_events = _peft_events(sched)
    assert _our_events(sched, "peft") == peft_events
    # default style: the same allocations and budgets; the importance is also updated on the
    # step that freezes the pattern (PEFT: only while global_step < total_step - tfinal)
    end = sched[5] - sched[3]
    ours = _our_events(sched, "forward")
    assert [e[1:] for e in ours] == [e[1:] for e in peft_events]
    assert [s for s, e in enumerate(ours) if e[0] != peft_events[s][0]] == [end]


# -- 3. importance scores on a tiny model ----------------------------------------------------------
def _pair(sched, style: str):
    """PEFT's AdaLoraModel and ours on the same tiny model, with the same P, Λ, Q."""
    init_r = sched[0]
    torch.manual_seed(0)
    tiny = _Tiny()
    # PEFT scales by lora_alpha / (ranknum + 1e-5) in float32; alpha / r must equal that
    alpha = float(init_r) * init_r / float(torch.tensor(init_r + 1e-5, dtype=torch.float32))
    ours = methods.apply(copy.deepcopy(tiny), "adalora", alpha=alpha, orth_reg="peft", orth_reg_weight=0.1,
                         beta1=0.85, beta2=0.85, mask_style=style, **_our_options(*sched))
    pm = _peft(tiny, *sched, lora_alpha=init_r, orth_reg_weight=0.1, beta1=0.85, beta2=0.85)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in NAMES:
            src, dst = ours.get_submodule(name), pm.model.get_submodule(name)
            src.lora_A.copy_(torch.randn(src.lora_A.shape, generator=gen) * 0.3)
            src.lora_B.copy_(torch.randn(src.lora_B.shape, generator=gen) * 0.3)
            dst.lora_A["default"].copy_(src.lora_A)
            dst.lora_B["default"].copy_(src.lora_B)
            dst.lora_E["default"].copy_(src.lora_E.weight[:, None])  # zeros in both
    return ours, pm


def _peft_tensors(pm, name: str) -> dict[str, torch.nn.Parameter]:
    lay = pm.model.get_submodule(name)
    return {"row": lay.lora_A["default"], "diag": lay.lora_E["default"], "col": lay.lora_B["default"]}


def _peft_key(name: str, part: str) -> str:
    return f"{name}.{ {'row': 'lora_A', 'diag': 'lora_E', 'col': 'lora_B'}[part] }.default"


def _peft_triplet_scores(ra, name: str) -> torch.Tensor:
    """``mask_to_budget``'s triplet score, from PEFT's own ``_element_score`` and ``_combine_ipt``."""
    ipt_a = ra._element_score(_peft_key(name, "row")).mean(dim=1, keepdim=True)
    ipt_b = ra._element_score(_peft_key(name, "col")).mean(dim=0).view(-1, 1)
    return ra._combine_ipt(ra._element_score(_peft_key(name, "diag")), torch.cat([ipt_a, ipt_b], dim=1))


def _close(ours: torch.Tensor, theirs: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")


def _run(sched, style: str, steps: int | None = None):
    """Train both models; return per-step records. Gradients are computed by both models and
    compared, then PEFT's are copied into ours, so that the allocators see identical inputs."""
    total = sched[5]
    ours, pm = _pair(sched, style)
    layers = dict(methods.adapter_layers(ours))
    ra = pm.rankallocator
    alloc = layers[NAMES[0]]._allocator
    peft_masks, our_masks = {}, {}
    clock = {"step": None}

    peft_mask_to_budget = ra.mask_to_budget

    def peft_capture(model, b):
        snap = {n: _peft_triplet_scores(ra, n).detach().clone() for n in NAMES}
        ipt = {k: (ra.exp_avg_ipt[k].clone(), ra.exp_avg_unc[k].clone()) for k in ra.exp_avg_ipt}
        pattern = peft_mask_to_budget(model, b)
        peft_masks[clock["step"]] = (b, snap, ipt, {n: torch.tensor(pattern[_peft_key(n, "diag")]) for n in NAMES})
        return pattern

    ra.mask_to_budget = peft_capture
    our_allocate = alloc._allocate

    def our_capture(budgets):
        snap = {n: layers[n].triplet_scores().detach().clone() for n in NAMES}
        our_allocate(budgets)
        our_masks[clock["step"]] = (budgets[0], snap, {n: layers[n].lora_E.mask.clone() for n in NAMES})

    alloc._allocate = our_capture
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    teacher = nn.Linear(16, 12)
    records = []
    for step in range(1, (steps or total) + 1):
        clock["step"] = step
        x = torch.randn(8, 16, generator=gen)
        y = teacher(x).detach()
        loss_p = pm(x, y).loss  # PEFT adds orth_reg_weight · mean ||G − I||_F
        loss_o = ours(x, y).loss + budget.regularization_loss(ours)
        torch.testing.assert_close(loss_o, loss_p, rtol=1e-5, atol=1e-7)
        loss_p.backward()
        loss_o.backward()
        grads = {}
        for name in NAMES:
            mine = {"row": layers[name].lora_A, "diag": layers[name].lora_E.weight, "col": layers[name].lora_B}
            for part, p in _peft_tensors(pm, name).items():
                grads[(name, part)] = (mine[part].grad.clone(), p.grad.detach().reshape(mine[part].shape).clone())
                mine[part].grad.copy_(p.grad.reshape(mine[part].shape))
        opt_p.step()
        opt_o.step()
        pm.update_and_allocate(step)
        budget.update_and_allocate(ours, step, total)
        rec = {"step": step, "grads": grads, "params": {}, "ipt": {}}
        for name in NAMES:
            mine = {"row": layers[name].lora_A, "diag": layers[name].lora_E.weight, "col": layers[name].lora_B}
            for part, p in _peft_tensors(pm, name).items():
                rec["params"][(name, part)] = (mine[part].detach().clone(), p.detach().clone())
                key = _peft_key(name, part)
                if key in ra.exp_avg_ipt:  # PEFT resets them when the final phase starts
                    sens = layers[name]._sens
                    rec["ipt"][(name, part)] = (sens.avg[part].clone(), ra.exp_avg_ipt[key].clone(),
                                                sens.unc[part].clone(), ra.exp_avg_unc[key].clone())
        records.append(rec)
        opt_p.zero_grad()
        opt_o.zero_grad()
    return records, peft_masks, our_masks


def _check_step(rec) -> None:
    step = rec["step"]
    for (name, part), (mine, theirs) in rec["grads"].items():
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"grad {name}.{part} @ {step}: {m}")
    for (name, part), (avg, peft_avg, unc, peft_unc) in rec["ipt"].items():
        _close(avg, peft_avg, f"exp_avg_ipt {name}.{part} @ {step}")
        _close(unc, peft_unc, f"exp_avg_unc {name}.{part} @ {step}")
    for (name, part), (mine, theirs) in rec["params"].items():
        _close(mine, theirs, f"{name}.{part} @ {step}")


def _check_allocation(step, peft_masks, our_masks) -> None:
    b, peft_scores, peft_ipt, peft_keep = peft_masks[step]
    ours_b, our_scores, our_keep = our_masks[step]
    assert ours_b == b, step
    assert sum(int(k.sum()) for k in peft_keep.values()) == b, "ties at PEFT's threshold"
    for name in NAMES:
        _close(our_scores[name], peft_scores[name], f"triplet scores {name} @ {step}")
        assert torch.equal(our_keep[name], peft_keep[name]), (step, name)


SMALL = [(6, 2, 2, 4, 2, 20), (4, 1, 3, 5, 1, 20)]


@pytest.mark.parametrize("sched", SMALL)
def test_peft_style_importance_scores_and_masks_equal_peft(sched):
    records, peft_masks, our_masks = _run(sched, "peft")
    for rec in records:
        _check_step(rec)
    end = sched[5] - sched[3]
    assert sorted(peft_masks) == sorted(our_masks)
    assert max(peft_masks) == end and len(peft_masks) > 3
    for step in peft_masks:
        _check_allocation(step, peft_masks, our_masks)
    # the final-phase pattern uses Ī, Ū as of step end − 1 in both (no update on step end)
    _, _, peft_ipt, _ = peft_masks[end]
    for (name, part), (avg, *_rest) in records[end - 2]["ipt"].items():
        _close(avg, peft_ipt[_peft_key(name, part)][0], f"Ī frozen at end − 1, {name}.{part}")
    # between allocations (deltaT > 1) a pruned λ regrows in both: PEFT zeroes it only when masking
    if sched[4] > 1:
        first = min(peft_masks)
        mine, theirs = records[first]["params"][("up", "diag")]  # step first + 1, not an allocation step
        pruned = ~our_masks[first][2]["up"]
        assert pruned.any() and torch.all(mine[pruned] != 0) and torch.all(theirs.view(-1)[pruned] != 0)


def test_forward_style_equals_peft_up_to_the_first_allocation():
    sched = SMALL[0]
    first = sched[2] + 1 + (-(sched[2] + 1)) % sched[4]  # first step after tinit divisible by deltaT
    records, peft_masks, our_masks = _run(sched, "forward", steps=first + 1)
    assert min(peft_masks) == min(our_masks) == first
    for rec in records[:first]:
        _check_step(rec)
    _check_allocation(first, peft_masks, our_masks)
    # afterwards a pruned λ gets no gradient in ours (λ ⊙ mask in the forward) but does in PEFT
    (mine_g, peft_g), pruned = records[first]["grads"][("up", "diag")], ~our_masks[first][2]["up"]
    assert pruned.any() and torch.all(mine_g[pruned] == 0) and torch.all(peft_g[pruned] != 0)


# -- 4. PEFT's threshold rule with ties ------------------------------------------------------------
def test_peft_style_prunes_ties_at_the_threshold_like_mask_to_budget():
    sched = (6, 2, 2, 4, 1, 20)
    ours, pm = _pair(sched, "peft")
    layers = dict(methods.adapter_layers(ours))
    ra = pm.rankallocator
    e_scores = {"up": torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 3.0]),
                "down": torch.tensor([0.0, 1.0, 1.0, 2.0, 5.0, 5.0])}
    for name in NAMES:  # element scores Ī·Ū: the crafted values on λ, zero on P and Q
        sens = layers[name]._sens
        for part, p in _peft_tensors(pm, name).items():
            ipt = e_scores[name] if part == "diag" else torch.zeros(p.shape)
            ra.exp_avg_ipt[_peft_key(name, part)] = ipt.view(p.shape).clone()
            ra.exp_avg_unc[_peft_key(name, part)] = torch.ones(p.shape)
            sens.avg[part], sens.unc[part] = ipt.clone(), torch.ones(ipt.shape)
    for b in (7, 5, 1, 0):
        pattern = ra.mask_to_budget(pm.model, b)
        layers[NAMES[0]]._allocator._allocate([b])
        for name in NAMES:
            assert layers[name].lora_E.mask.tolist() == pattern[_peft_key(name, "diag")], (b, name)
        if b == 7:  # 7 of 12 asked: the 5th smallest score is 1, every score <= 1 goes, 6 stay
            assert sum(sum(pattern[_peft_key(n, "diag")]) for n in NAMES) == 6
    flat = torch.cat([e_scores[n] for n in NAMES])
    assert int(keep_mask(flat, 7, "forward").sum()) == 7  # default style: exactly the budget
    assert bool(keep_mask(flat, 12, "peft").all())  # budget = n keeps all (PEFT's kthvalue(k=0) raises)


def test_mask_style_option():
    layer = methods.wrap(nn.Linear(8, 8), "adalora", rank=2)
    assert layer.cfg.mask_style == "forward" and layer.lora_E.mask_in_forward
    assert not methods.wrap(nn.Linear(8, 8), "adalora", rank=2, mask_style="peft").lora_E.mask_in_forward
    with pytest.raises(ValueError, match="mask_style"):
        methods.wrap(nn.Linear(8, 8), "adalora", rank=2, mask_style="nope")
