"""Fair comparisons: a validation split, learning-rate sweeps, matched parameter budgets, the cost line."""
from __future__ import annotations

import numpy as np
import pytest

from bora_lab.cli import build_parser, config_from_args
from bora_lab.config import RunConfig
from bora_lab.engine.pipeline import split_validation
from bora_lab.engine.trainer import run
from bora_lab.record.tables import results_table

TINY = dict(num_layers=1, steps=4, batch_size=4, max_length=16, eval_samples=16, eval_every=2, analyze_every=2,
            layer_checkpoints=0, num_threads=1)


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 70 + [1] * 30)
    val, rest = split_validation(labels, 100, 20, seed=0)
    assert len(val) == 20 and len(rest) == 80 and not set(val) & set(rest)
    assert (labels[val] == 1).sum() == 6  # 30% of 20
    assert np.array_equal(split_validation(labels, 100, 20, seed=0)[0], val)
    assert not np.array_equal(split_validation(labels, 100, 20, seed=1)[0], val)
    assert len(split_validation(None, 10, 3, seed=0)[0]) == 3
    with pytest.raises(ValueError, match="no training example"):
        split_validation(labels, 100, 100, seed=0)


def test_validation_metrics_and_the_best_checkpoint():
    res = run(RunConfig(methods=["lora", "bora"], ranks=[4], val_samples=24, **TINY))
    r = res["runs"][0]
    assert all("val_metrics" in e for e in r["eval"]) and r["best"]["step"] in (2, 4)
    best_eval = next(e for e in r["eval"] if e["step"] == r["best"]["step"])
    assert r["summary"]["best_eval_metric"] == best_eval["metrics"]["accuracy"]  # test metric at the best val step
    assert r["per_example_best"]["step"] == r["best"]["step"]
    assert "aggregate_best" in res and res["aggregate_best"]["at"] == "best"
    assert "accuracy at best val step" in results_table(res)[0]


def test_learning_rate_sweep_chooses_on_validation_and_reports_each_at_its_rate():
    res = run(RunConfig(task="synthetic_col", methods=["lora", "dora_col"], ranks=[1], lrs=[0.003, 0.03], seeds=[0, 1],
                        steps=60, batch_size=32, warmup_ratio=0.0, eval_every=60, analyze_every=30))
    assert [r["run_id"] for r in res["runs"]][:2] == ["lora-r1-lr0.003-s0", "lora-r1-lr0.003-s1"]
    assert {r["lr"] for r in res["runs"]} == {0.003, 0.03}
    tuned = {g["key"]: g for g in res["aggregate_tuned"]["groups"]}
    assert set(tuned) == {"lora-r1", "dora_col-r1"}
    for g in tuned.values():
        assert g["chosen_on"] == "evaluation"  # the synthetic tasks have no validation split
        best = min(g["by_lr"], key=g["by_lr"].get)  # recovery error: lower is better
        assert g["lr"] == best and g["n"] == 2
    assert "better than lora-r1" in tuned["dora_col-r1"]["verdict"]


def test_a_sweep_on_a_text_task_needs_a_validation_split():
    with pytest.raises(ValueError, match="set val_samples"):
        run(RunConfig(methods=["lora"], lrs=[1e-4, 1e-3], **TINY))


def test_auto_grid_centres_on_each_methods_suggested_rate():
    from bora_lab import methods

    cfg = RunConfig(methods=["lora", "vera", "bitfit"], lr_auto=True, val_samples=8)
    assert cfg.run_lrs("vera") == [0.01, 0.03, 0.09]  # vera's measured rate, 3e-2, /3 x1 x3
    assert cfg.run_lrs("lora") == [0.000333, 0.001, 0.003]
    assert [r[0] for r in cfg.run_plan()][:3] == ["lora-r8-lr0.000333", "lora-r8-lr0.001", "lora-r8-lr0.003"]
    assert methods.info("full")["suggested_lr"] < methods.info("lora")["suggested_lr"] < methods.info("prompt")["suggested_lr"]


def test_matched_parameter_budgets():
    res = run(RunConfig(methods=["lora", "dora", "bora", "bitfit"], ranks=[8], match_params="bora", **TINY))
    ids = [r["run_id"] for r in res["runs"]]
    assert ids == ["lora-r9", "dora-r8", "bora-r8", "bitfit"]  # LoRA gains a rank: no magnitude vectors to pay
    table = {row["method"]: row for row in res["matched"]["table"]}
    for m in ("lora", "dora"):
        assert table[m]["params"] <= table[m]["reference_params"]
    counts = {r["run_id"]: r["adapter_params"] for r in res["runs"]}
    assert counts["lora-r9"] == table["lora"]["params"] <= counts["bora-r8"]  # the analytic count is the real one
    assert all(r["status"] == "done" for r in res["runs"])
    with pytest.raises(ValueError, match="layer-level method with a rank"):
        run(RunConfig(methods=["lora"], match_params="bitfit", **TINY))


def test_cost_line_before_training():
    from bora_lab.engine.estimate import cost_text, estimate

    default = RunConfig(seeds=[0, 1, 2])
    e = estimate(default)
    assert e["runs"] == 9 and e["steps"] == 9 * 150 and e["seconds"] > 0
    assert cost_text(default).startswith("9 runs × 150 steps: about ")
    assert "no time estimate" in cost_text(RunConfig(model="smollm2", task="austen_lm"))
    assert estimate(RunConfig(num_layers=2))["seconds"] < estimate(RunConfig())["seconds"]


def test_matched_ranks_show_before_anything_loads():
    from bora_lab.engine.estimate import matched_preview
    from bora_lab.ui import form, tab_compare

    line = matched_preview(RunConfig(methods=["lora", "dora", "bora"], match_params="bora"))
    assert line.startswith("matched to bora (r8: ") and "lora r9" in line and "dora r8" in line
    values = form.ui_values(RunConfig(methods=["lora", "bora"], match_params="bora", seeds=[0, 1]))
    text = tab_compare.cost_text(*[values[k] for k in form.input_keys()])
    assert "4 runs × 150 steps: about" in text and "lora r9" in text
    values["steps"] = "zero"
    assert "need a fix" in tab_compare.cost_text(*[values[k] for k in form.input_keys()])


def test_cli_flags_for_fair_comparisons():
    args = build_parser().parse_args(["compare", "--seeds", "0,1,2", "--lrs", "3e-4,1e-3", "--val-samples", "100",
                                      "--match-params", "bora", "--baseline", "dora", "--engine", "per_copy"])
    cfg = config_from_args(args)
    assert cfg.seeds == [0, 1, 2] and cfg.lrs == [3e-4, 1e-3] and cfg.val_samples == 100
    assert cfg.match_params == "bora" and cfg.baseline == "dora" and cfg.engine == "per_copy" and not cfg.lr_auto
    assert config_from_args(build_parser().parse_args(["compare", "--lr-auto", "--val-samples", "8"])).lr_auto


def test_one_rule_picks_the_best_checkpoint():
    """The results' ``best`` and the saved ``adapter_best`` use the same rule: finite and strictly better."""
    from bora_lab.record.accumulator import improves

    assert improves(0.7, None) and improves(0.71, 0.7) and not improves(0.7, 0.7)  # the first of equals wins
    assert improves(0.3, 0.4, higher_is_better=False) and not improves(0.5, 0.4, higher_is_better=False)
    assert not improves(float("nan"), None) and not improves(float("inf"), 0.7) and not improves(None, None)
