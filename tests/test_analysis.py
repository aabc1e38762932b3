"""Tests for bora_lab.analysis.weights against hand-computed values (BoRA eq. 5-6)."""
import json
import math

import pytest
import torch

from bora_lab.analysis import (
    METRICS,
    WeightTracker,
    asymmetry_ratio,
    axis_norms,
    delta_d,
    delta_m,
    dora_scatter_points,
    effective_rank,
    fit_line,
    md_changes,
    md_changes_batch,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=atol), k


# ---------------------------------------------------------------- hand-computed 2x3 cases


def test_axis_norms_hand():
    W = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    assert axis_norms(W, "row").tolist() == pytest.approx([5.0, 2.0])  # (out,) = W.norm(dim=1)
    assert axis_norms(W, "col").tolist() == pytest.approx([3.0, 4.0, 2.0])  # (in,): norm(dim=0)
    with pytest.raises(ValueError):
        axis_norms(W, "diag")


def test_hand_mixed_change():
    Wa = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    Wb = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    # rows: [3,4,0] vs [4,3,0]: norms 5, 5 -> |5-5| = 0; cos = (12+12)/25 = 0.96 -> 1-cos = 0.04
    #       [0,0,2] vs [0,0,1]: norms 2, 1 -> 1;          cos = 1             -> 0
    #   dM_row = (0 + 1)/2 = 0.5, dD_row = (0.04 + 0)/2 = 0.02
    # cols: [3,0] vs [4,0] -> |3-4| = 1, cos 1; [4,0] vs [3,0] -> 1, cos 1;
    #       [0,2] vs [0,1] -> |2-1| = 1, cos 1
    #   dM_col = 1, dD_col = 0
    want = {"dM_row": 0.5, "dM_col": 1.0, "dD_row": 0.02, "dD_col": 0.0}
    _close(md_changes(Wa, Wb), want)
    assert delta_m(Wa, Wb, "row") == pytest.approx(0.5)
    assert delta_m(Wa, Wb, "col") == pytest.approx(1.0)
    assert delta_d(Wa, Wb, "row") == pytest.approx(0.02, abs=1e-6)
    assert delta_d(Wa, Wb, "col") == pytest.approx(0.0, abs=1e-7)


def test_hand_pure_direction_change():
    Wa = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    Wb = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    # rows: [1,0,2] vs [0,1,2]: norms sqrt5, sqrt5 -> 0; cos = 4/5 -> 0.2
    #       [0,1,0] vs [1,0,0]: norms 1, 1 -> 0;         cos = 0   -> 1
    #   dM_row = 0, dD_row = (0.2 + 1)/2 = 0.6
    # cols: [1,0] vs [0,1] -> 0, 1-cos = 1; [0,1] vs [1,0] -> 0, 1; [2,0] vs [2,0] -> 0, 0
    #   dM_col = 0, dD_col = 2/3
    want = {"dM_row": 0.0, "dM_col": 0.0, "dD_row": 0.6, "dD_col": 2.0 / 3.0}
    _close(md_changes(Wa, Wb), want)


def test_hand_row_scaling():
    Wa = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])
    Wb = torch.tensor([[2.0, 4.0, 4.0], [0.0, 3.0, 4.0]])  # row 0 doubled
    # rows: norms 3 -> 6 and 5 -> 5: dM_row = (3 + 0)/2 = 1.5; directions unchanged: dD_row = 0
    # cols: [1,0]->[2,0]: |1-2| = 1, cos 1
    #       [2,3]->[4,3]: |sqrt13 - 5|,  cos = (8+9)/(5 sqrt13) = 17/(5 sqrt13)
    #       [2,4]->[4,4]: |sqrt20 - sqrt32|, cos = (8+16)/(sqrt20 sqrt32) = 24/sqrt640
    dm_col = (1.0 + (5.0 - math.sqrt(13)) + (math.sqrt(32) - math.sqrt(20))) / 3
    dd_col = ((1 - 1) + (1 - 17 / (5 * math.sqrt(13))) + (1 - 24 / math.sqrt(640))) / 3
    assert dm_col == pytest.approx(1.193056, abs=1e-6)
    assert dd_col == pytest.approx(0.036109, abs=1e-6)
    want = {"dM_row": 1.5, "dM_col": dm_col, "dD_row": 0.0, "dD_col": dd_col}
    _close(md_changes(Wa, Wb), want)


# ---------------------------------------------------------------- properties


def test_row_scaling_moves_row_magnitude_only():
    W = torch.randn(6, 5)
    s = torch.tensor([0.5, 2.0, 1.0, 1.5, 0.8, 3.0])
    got = md_changes(W, s[:, None] * W)  # diag(s) @ W
    assert got["dD_row"] == pytest.approx(0.0, abs=1e-7)
    want_dm = ((s - 1).abs() * W.norm(dim=1)).mean().item()
    assert got["dM_row"] == pytest.approx(want_dm, rel=1e-5)
    assert got["dD_col"] > 1e-3  # columns rotate when rows are scaled unevenly


def test_col_scaling_moves_col_magnitude_only():
    W = torch.randn(4, 7)
    c = torch.linspace(0.3, 2.5, 7)
    got = md_changes(W, W * c[None, :])  # W @ diag(c)
    assert got["dD_col"] == pytest.approx(0.0, abs=1e-7)
    want_dm = ((c - 1).abs() * W.norm(dim=0)).mean().item()
    assert got["dM_col"] == pytest.approx(want_dm, rel=1e-5)
    assert got["dD_row"] > 1e-3


def test_identity_gives_zeros():
    W = torch.randn(8, 3)
    for v in md_changes(W, W.clone()).values():
        assert v == pytest.approx(0.0, abs=1e-7)


def test_zero_vectors_do_not_give_nan():
    Wa = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    same = md_changes(Wa, Wa.clone())  # zero row unchanged -> no change; zero col 0 unchanged too
    assert all(math.isfinite(v) for v in same.values())
    _close(same, dict.fromkeys(METRICS, 0.0))
    Wb = torch.tensor([[0.0, 3.0, 4.0], [1.0, 2.0, 2.0]])  # zero row becomes [0,3,4]
    # rows: |0-5| = 5, 1-cos := 1 (one zero vector); row 1 unchanged -> dM_row 2.5, dD_row 0.5
    # cols: [0,1]->[0,1]: 0, 0; [0,2]->[3,2]: |2-sqrt13|, 1-2/sqrt13... ; [0,2]->[4,2]: |2-sqrt20|
    got = md_changes(Wa, Wb)
    assert all(math.isfinite(v) for v in got.values())
    assert got["dM_row"] == pytest.approx(2.5)
    assert got["dD_row"] == pytest.approx(0.5)
    dd_col = (0 + (1 - 4 / (2 * math.sqrt(13))) + (1 - 4 / (2 * math.sqrt(20)))) / 3
    assert got["dD_col"] == pytest.approx(dd_col, abs=1e-6)


def test_small_changes_resolved_in_float32():
    """Step-to-step changes ~1e-6 are below float32's cos resolution; the stable forms see them."""
    Wa = torch.randn(64, 48)
    Wb = Wa + 1e-6 * torch.randn(64, 48)
    a, b = Wa.double(), Wb.double()  # reference on the same (float32-rounded) inputs
    for axis, dim in (("row", 1), ("col", 0)):
        ref_dm = (a.norm(dim=dim) - b.norm(dim=dim)).abs().mean().item()
        ref_dd = (1 - torch.nn.functional.cosine_similarity(a, b, dim=dim)).mean().item()
        assert ref_dd > 0
        assert delta_m(Wa, Wb, axis) == pytest.approx(ref_dm, rel=0.02)
        assert delta_d(Wa, Wb, axis) == pytest.approx(ref_dd, rel=0.05)


def test_batch_equals_loop_and_bf16():
    Wa, Wb = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    batch = md_changes_batch(Wa, Wb)
    for k in METRICS:
        assert batch[k].shape == (4,) and batch[k].dtype == torch.float32
    for layer in range(4):
        _close({k: batch[k][layer].item() for k in METRICS}, md_changes(Wa[layer], Wb[layer]))
    bf = md_changes_batch(Wa.bfloat16(), Wb.bfloat16())
    ref = md_changes_batch(Wa.bfloat16().float(), Wb.bfloat16().float())
    for k in METRICS:
        assert bf[k].dtype == torch.float32
        torch.testing.assert_close(bf[k], ref[k])
    with pytest.raises(ValueError):
        md_changes_batch(Wa, Wb[:, :4])


# ---------------------------------------------------------------- tracker


def test_tracker_from_start_vs_step_to_step():
    W0 = {"q0": torch.randn(5, 4), "q1": torch.randn(5, 4), "out": torch.randn(3, 5)}
    W1 = {k: v + 0.1 * torch.randn_like(v) for k, v in W0.items()}
    W2 = {k: v + 0.1 * torch.randn_like(v) for k, v in W1.items()}
    tr = WeightTracker()
    s0 = tr.snapshot(0, W0)
    assert s0["step"] == 0 and s0["prev_step"] is None and s0["modules"] == ["q0", "q1", "out"]
    for view in ("from_start", "step_to_step"):
        assert s0[view] == {k: [0.0, 0.0, 0.0] for k in METRICS}
        assert s0["mean"][view] == dict.fromkeys(METRICS, 0.0)
    s1 = tr.snapshot(10, W1)
    s2 = tr.snapshot(20, {k: W2[k] for k in ("out", "q1", "q0")})  # dict order is irrelevant
    assert s1["prev_step"] == 0 and s2["prev_step"] == 10
    for i, name in enumerate(s2["modules"]):
        first, start, step = md_changes(W0[name], W1[name]), md_changes(W0[name], W2[name]), \
            md_changes(W1[name], W2[name])
        for k in METRICS:
            assert s1["from_start"][k][i] == pytest.approx(first[k], abs=1e-6)
            assert s1["step_to_step"][k][i] == pytest.approx(first[k], abs=1e-6)
            assert s2["from_start"][k][i] == pytest.approx(start[k], abs=1e-6)
            assert s2["step_to_step"][k][i] == pytest.approx(step[k], abs=1e-6)
    for k in METRICS:
        assert s2["mean"]["from_start"][k] == pytest.approx(sum(s2["from_start"][k]) / 3)
    json.dumps([s0, s1, s2])  # plain floats / lists only
    # Later snapshots recycle buffers; the start and the previous weights must stay intact.
    W3 = {k: v + 0.1 * torch.randn_like(v) for k, v in W2.items()}
    W4 = {k: v + 0.1 * torch.randn_like(v) for k, v in W3.items()}
    tr.snapshot(30, W3)
    s4 = tr.snapshot(40, W4)
    for i, name in enumerate(s4["modules"]):
        start, step = md_changes(W0[name], W4[name]), md_changes(W3[name], W4[name])
        for k in METRICS:
            assert s4["from_start"][k][i] == pytest.approx(start[k], abs=1e-6)
            assert s4["step_to_step"][k][i] == pytest.approx(step[k], abs=1e-6)


def test_tracker_stores_detached_copies():
    p = torch.nn.Parameter(torch.randn(4, 4))
    tr = WeightTracker()
    tr.snapshot(0, {"w": p})
    start = p.detach().clone()
    with torch.no_grad():
        p.mul_(2.0)  # in-place update must not leak into the stored start
    snap = tr.snapshot(1, {"w": p})
    assert snap["from_start"]["dM_row"][0] == pytest.approx(start.norm(dim=1).mean().item(), 1e-5)
    assert snap["from_start"]["dD_row"][0] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        tr.snapshot(2, {"other": p})
    with pytest.raises(ValueError):
        tr.snapshot(2, {"w": torch.randn(4, 5)})
    tr.reset()
    assert not tr.started


# ---------------------------------------------------------------- line fit, scatter, ratio, rank


def test_fit_line_exact_and_negative():
    x = [0.0, 1.0, 2.0, 3.0]
    up = fit_line(x, [1.0, 3.0, 5.0, 7.0])  # y = 2x + 1
    assert up["slope"] == pytest.approx(2.0) and up["intercept"] == pytest.approx(1.0)
    assert up["pearson_r"] == pytest.approx(1.0) and up["n"] == 4
    down = fit_line(x, [0.5, -2.5, -5.5, -8.5])  # y = -3x + 0.5
    assert down["slope"] == pytest.approx(-3.0) and down["intercept"] == pytest.approx(0.5)
    assert down["pearson_r"] == pytest.approx(-1.0)


def test_fit_line_noisy_and_degenerate():
    # hand: x = [0, 1, 2], y = [0, 2, 1]: mx = 1, my = 1, sxx = 2, sxy = 1, syy = 2
    #   slope = 1/2, intercept = 1 - 1/2 = 0.5, r = 1/sqrt(2*2) = 0.5
    res = fit_line([0.0, 1.0, 2.0, float("nan")], [0.0, 2.0, 1.0, 5.0])  # NaN pair dropped
    assert res == pytest.approx({"slope": 0.5, "intercept": 0.5, "pearson_r": 0.5, "n": 3})
    assert fit_line([1.0], [2.0]) == {"slope": None, "intercept": None, "pearson_r": None, "n": 1}
    assert fit_line([0.1, 0.1, 0.1], [1.0, 2.0, 3.0])["slope"] is None  # constant x
    flat = fit_line([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])  # constant y
    assert flat["slope"] == 0.0 and flat["intercept"] == 4.0 and flat["pearson_r"] is None


def test_dora_scatter_points_and_ratio():
    W0 = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    tr = WeightTracker()
    snaps = [tr.snapshot(0, W0)]
    for step in (5, 10):
        weights = {k: v * (1 + step / 10) + 0.05 * step for k, v in W0.items()}
        snaps.append(tr.snapshot(step, weights))
    pts = dora_scatter_points(snaps, axis="row")
    assert len(pts) == 4
    assert [(p[2], p[3]) for p in pts] == [(0, 5), (1, 5), (0, 10), (1, 10)]
    assert pts[3][:2] == (snaps[2]["from_start"]["dD_row"][1], snaps[2]["from_start"]["dM_row"][1])
    assert len(dora_scatter_points(snaps, axis="col", include_start=True)) == 6
    assert [p[2] for p in dora_scatter_points(snaps, modules=["b"])] == [1, 1]
    assert asymmetry_ratio(2.0, 1.0) == pytest.approx(2.0)
    assert asymmetry_ratio(0.0, 0.0) == 1.0
    assert math.isfinite(asymmetry_ratio(1.0, 0.0))


def test_effective_rank():
    u, v = torch.randn(6, 1), torch.randn(1, 5)
    r1 = effective_rank(u @ v)
    assert r1["effective_rank"] == pytest.approx(1.0, abs=1e-4) and r1["rank_at_99"] == 1
    assert len(r1["singular_values"]) == 5
    eye = effective_rank(torch.eye(4))
    assert eye["effective_rank"] == pytest.approx(4.0) and eye["rank_at_99"] == 4
    # diag(3, 4): p = (4/7, 3/7), erank = exp(-(4/7 ln 4/7 + 3/7 ln 3/7)); energy 16/25 < 0.99 -> 2
    d = effective_rank(torch.diag(torch.tensor([3.0, 4.0])))
    assert d["singular_values"] == pytest.approx([4.0, 3.0])
    h = -(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7))
    assert d["effective_rank"] == pytest.approx(math.exp(h)) and d["rank_at_99"] == 2
    z = effective_rank(torch.zeros(3, 2))
    assert z["effective_rank"] == 0.0 and z["rank_at_99"] == 0
