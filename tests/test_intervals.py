"""Intervals and paired comparisons: t distribution against scipy, bootstrap on data with known answers."""
from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest

from bora_lab.analysis import intervals
from bora_lab.analysis.intervals import (band, mean_interval, normal_quantile, paired_difference, paired_t,
                                         t_cdf, t_quantile, verdict)


def _accuracy_runs(p_a: float, p_b: float, seeds: int = 3, examples: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = (rng.random((seeds, examples)) < p_a).astype(float)
    b = (rng.random((seeds, examples)) < p_b).astype(float)
    return a, b


def test_module_imports_only_numpy_and_stdlib():
    tree = ast.parse(Path(intervals.__file__).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"__future__", "math", "typing", "numpy"}, roots


# ---------------------------------------------------------------- distributions

def test_t_quantile_matches_scipy_on_a_grid():
    stats = pytest.importorskip("scipy.stats")
    ps = np.concatenate([np.linspace(0.5005, 0.9995, 21), [0.501, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9999]])
    worst = 0.0
    for df in range(1, 201):
        ref = stats.t.ppf(ps, df)
        mine = np.array([t_quantile(p, df) for p in ps])
        worst = max(worst, float(np.max(np.abs(mine - ref))))
    assert worst < 1e-8


def test_t_quantile_symmetry_fractional_df_and_cdf():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.5, 1.5, 2.5, 7.3, 1000.0):
        for p in (0.6, 0.975, 0.9999):
            ref = stats.t.ppf(p, df)
            assert t_quantile(p, df) == pytest.approx(ref, rel=1e-10)
            assert t_quantile(1 - p, df) == pytest.approx(-ref, rel=1e-10)
            assert t_cdf(ref, df) == pytest.approx(p, rel=1e-12)
    assert t_quantile(0.5, 4) == 0.0
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, abs=1e-12)
    for x in (-40.0, -2.0, 0.0, 0.3, 5.0):
        assert t_cdf(x, 3) == pytest.approx(stats.t.cdf(x, 3), abs=1e-14)


def test_normal_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for p in (1e-12, 1e-4, 0.02, 0.3, 0.5, 0.7, 0.975, 0.9999):
        assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_quantiles_reject_p_outside_open_unit_interval(bad):
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(bad, 5)
    with pytest.raises(ValueError, match="p must be in"):
        normal_quantile(bad)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


# ---------------------------------------------------------------- mean_interval

def test_mean_interval_matches_scipy_t_interval():
    stats = pytest.importorskip("scipy.stats")
    x = np.array([0.712, 0.734, 0.701, 0.745, 0.728])
    for level in (0.9, 0.95, 0.99):
        res = mean_interval(x, level=level)
        low, high = stats.t.interval(level, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert res["low"] == pytest.approx(low, abs=1e-12) and res["high"] == pytest.approx(high, abs=1e-12)
        assert res["half_width"] == pytest.approx((high - low) / 2, abs=1e-12)
    assert res["std"] == pytest.approx(x.std(ddof=1)) and res["n"] == 5 and res["mean"] == pytest.approx(x.mean())


def test_mean_interval_drops_nan_single_value_and_empty():
    assert mean_interval([1.0, np.nan, 3.0])["n"] == 2
    assert mean_interval([1.0, np.nan, 3.0])["mean"] == 2.0
    one = mean_interval([0.8, np.nan])
    assert one == {"mean": 0.8, "std": None, "n": 1, "low": None, "high": None, "half_width": None}
    same = mean_interval([0.5, 0.5, 0.5])
    assert same["low"] == same["high"] == 0.5
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([np.nan, np.nan])
    with pytest.raises(ValueError, match="level"):
        mean_interval([1, 2], level=95)


# ---------------------------------------------------------------- paired_t

def test_paired_t_matches_scipy_ttest_rel():
    stats = pytest.importorskip("scipy.stats")
    a = np.array([0.812, 0.798, 0.825, 0.806, 0.819])
    b = np.array([0.801, 0.795, 0.809, 0.807, 0.800])
    res = paired_t(a, b)
    ref = stats.ttest_rel(a, b)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert res["df"] == 4 and res["difference"] == pytest.approx((a - b).mean())
    low, high = stats.t.interval(0.95, 4, loc=(a - b).mean(), scale=stats.sem(a - b))
    assert res["low"] == pytest.approx(low, abs=1e-12) and res["high"] == pytest.approx(high, abs=1e-12)
    assert res["distinguishable"] == (low > 0 or high < 0)
    # 2-D per-example scores are averaged over examples first
    sa, sb = _accuracy_runs(0.8, 0.7, seeds=4, examples=50)
    assert paired_t(sa, sb)["t"] == pytest.approx(stats.ttest_rel(sa.mean(1), sb.mean(1)).statistic)


def test_paired_t_edge_cases():
    with pytest.raises(ValueError, match="at least 2"):
        paired_t([0.8], [0.7])
    with pytest.raises(ValueError, match="same shape"):
        paired_t([0.8, 0.7], [0.7, 0.6, 0.5])
    with pytest.raises(ValueError, match="empty"):
        paired_t([], [])
    same = paired_t([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])
    assert same["difference"] == 0 and same["p_value"] == 1.0 and not same["distinguishable"]
    shift = paired_t([0.75, 0.5, 1.0], [0.5, 0.25, 0.75])
    assert shift["p_value"] == 0.0 and shift["distinguishable"] and shift["t"] == math.inf


# ---------------------------------------------------------------- paired_difference (bootstrap)

def test_bootstrap_identical_methods_give_zero():
    a, _ = _accuracy_runs(0.8, 0.8)
    res = paired_difference(a, a.copy())
    assert res["difference"] == 0.0 and res["low"] <= 0.0 <= res["high"]
    assert not res["distinguishable"] and res["p_value"] == 1.0
    assert verdict(res, "LoRA") == "0.0 points [0.0, 0.0]: not distinguishable from LoRA at this budget"


def test_bootstrap_clearly_better_method_is_distinguishable():
    a, b = _accuracy_runs(0.85, 0.75, seed=1)
    t0 = time.perf_counter()
    res = paired_difference(a, b)
    elapsed = time.perf_counter() - t0
    # speed is measured by benchmarks, not here: this only catches a pathologically slow bootstrap
    # (0.03 s alone on 2 cores; a loaded CI machine may take many times that)
    assert elapsed < 30, f"2000 resamples of 3x1000 took {elapsed:.2f}s"
    assert res["difference"] == pytest.approx((a - b).mean())
    assert res["distinguishable"] and res["p_value"] < 0.01
    assert 0.06 < res["low"] < res["difference"] < res["high"] < 0.15
    assert abs((res["low"] + res["high"]) / 2 - 0.10) < 0.03
    assert res["method"] == "hierarchical bootstrap" and (res["n_seeds"], res["n_examples"]) == (3, 1000)
    assert verdict(res, "LoRA").endswith(": better than LoRA")
    flipped = paired_difference(b, a)
    assert flipped["high"] < 0 and verdict(flipped, "LoRA").endswith(": worse than LoRA")
    assert paired_difference(a, b) == res  # deterministic for a fixed seed


def test_bootstrap_null_coverage_is_near_nominal():
    rng = np.random.default_rng(2024)
    excluded = 0
    for i in range(200):
        a = (rng.random((3, 200)) < 0.7).astype(float)
        b = (rng.random((3, 200)) < 0.7).astype(float)
        excluded += paired_difference(a, b, n_boot=200, seed=i)["distinguishable"]
    assert 0 <= excluded / 200 <= 0.12


def test_bootstrap_se_matches_analytic_se_on_one_seed():
    rng = np.random.default_rng(7)
    a = (rng.random(2000) < 0.8).astype(float)
    b = np.where(rng.random(2000) < 0.9, a, 1 - a)  # correlated with a, as paired predictions are
    res = paired_difference(a, b)
    analytic = (a - b).std(ddof=1) / math.sqrt(a.size)
    assert res["method"] == "example bootstrap" and res["n_seeds"] == 1
    assert abs(res["se"] / analytic - 1) < 0.15


def test_bootstrap_custom_metric():
    a, b = _accuracy_runs(0.85, 0.75, seeds=2, examples=300, seed=3)
    mean_metric = paired_difference(a, b, n_boot=300, metric=lambda x: x.mean(axis=-1))
    default = paired_difference(a, b, n_boot=300)
    assert mean_metric["difference"] == pytest.approx(default["difference"])
    assert mean_metric["se"] == pytest.approx(default["se"], rel=0.25)
    with pytest.raises(ValueError, match="reduce the last axis"):
        paired_difference(a, b, n_boot=20, metric=lambda x: x)


def test_bootstrap_input_errors():
    a, b = _accuracy_runs(0.8, 0.7, seeds=2, examples=10)
    with pytest.raises(ValueError, match="empty"):
        paired_difference(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(ValueError, match="empty"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:, :9])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:1])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(np.full((2, 3), np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[seeds, examples\]"):
        paired_difference(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


# ---------------------------------------------------------------- verdict

def test_verdict_formats_signs_and_units():
    d = {"difference": 0.008, "low": -0.006, "high": 0.022}
    assert verdict(d, "LoRA") == "+0.8 points [\u22120.6, +2.2]: not distinguishable from LoRA at this budget"
    d = {"difference": 0.031, "low": 0.012, "high": 0.050}
    assert verdict(d, "LoRA") == "+3.1 points [+1.2, +5.0]: better than LoRA"
    d = {"difference": -0.4, "low": -0.6, "high": -0.2}
    assert verdict(d, "DoRA", unit="", scale=1, digits=2) == "\u22120.40 [\u22120.60, \u22120.20]: worse than DoRA"
    assert verdict(d, "DoRA", unit="nats", scale=1, higher_is_better=False).endswith("better than DoRA")
    assert "cannot be judged" in verdict({"difference": 0.01, "low": None, "high": None}, "LoRA")


# ---------------------------------------------------------------- band

def test_band_equal_length_matches_mean_interval_per_point():
    curves = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 2.0], [0.5, 2.2, 4.0]])
    res = band(curves)
    for j in range(3):
        ref = mean_interval(curves[:, j])
        assert res["mean"][j] == pytest.approx(ref["mean"])
        assert res["low"][j] == pytest.approx(ref["low"]) and res["high"][j] == pytest.approx(ref["high"])
    assert res["step"].tolist() == [0, 1, 2] and res["n"].tolist() == [3, 3, 3]


def test_band_unequal_lengths_steps_and_nan():
    res = band([[1.0, 2.0, 3.0], [3.0, np.nan]])
    assert res["n"].tolist() == [2, 1, 1]
    assert res["mean"].tolist() == [2.0, 2.0, 3.0]
    assert np.isnan(res["low"][1]) and np.isnan(res["high"][2]) and not np.isnan(res["low"][0])
    res = band([[0.1, 0.2], [0.3]], steps=[[10, 20], [20]])
    assert res["step"].tolist() == [10, 20] and res["mean"].tolist() == pytest.approx([0.1, 0.25])
    res = band([{0: 1.0, 50: 2.0}, {50: 4.0, 100: 5.0}])
    assert res["step"].tolist() == [0, 50, 100] and res["n"].tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="at least one"):
        band([])
    with pytest.raises(ValueError, match="one sequence per series"):
        band([[1.0], [2.0]], steps=[[0]])
    with pytest.raises(ValueError, match="repeats a step"):
        band([[1.0, 2.0]], steps=[[5, 5]])
