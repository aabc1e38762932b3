"""Seeds, intervals and paired comparisons through the whole stack (config, engine, record, figures, CLI)."""
from __future__ import annotations

import json

import pytest

from bora_lab.config import RunConfig, SettingError
from bora_lab.engine.trainer import run
from bora_lab.record import load_results, save_results
from bora_lab.record.aggregate import aggregate, aggregate_rows, group_key, paired_against


def test_run_plan_with_and_without_seeds():
    one = RunConfig(methods=["lora", "bitfit"], ranks=[4, 8])
    assert [r[0] for r in one.run_plan()] == ["lora-r4", "lora-r8", "bitfit"]
    many = RunConfig(methods=["lora", "bitfit"], ranks=[4], seeds=[3, 1], per_method_lr=False)
    assert many.run_plan() == [("lora-r4-s3", "lora", 4, 3, 1e-3), ("lora-r4-s1", "lora", 4, 1, 1e-3),
                               ("bitfit-s3", "bitfit", 0, 3, 1e-3), ("bitfit-s1", "bitfit", 0, 1, 1e-3)]
    assert many.seed == 3  # the comparison's seed (its eval subset) is the first
    assert RunConfig(seeds=[]).seeds is None
    with pytest.raises(SettingError, match="seeds"):
        RunConfig(seeds=[1.5])
    with pytest.raises(SettingError, match="seeds"):
        RunConfig(seeds=[-1])


def test_each_method_at_its_suggested_rate_where_the_rates_were_measured():
    from bora_lab.config import lr_choice
    from bora_lab.methods.rates import suggested_lr

    cfg = RunConfig(methods=["lora", "full", "prompt"])  # MiniLM on fine_foods: each at its own rate
    assert [lr for *_, lr in cfg.run_plan()] == [suggested_lr("lora"), suggested_lr("full"), suggested_lr("prompt")]
    assert len({lr for *_, lr in cfg.run_plan()}) == 3
    assert {lr for *_, lr in RunConfig(methods=["lora", "full"], per_method_lr=False).run_plan()} == {1e-3}
    other = RunConfig(methods=["lora", "full"], task="synthetic_col", model="linear", lr=0.01)
    assert {lr for *_, lr in other.run_plan()} == {0.01}  # measured on the default task only
    assert lr_choice({"lr": 0.002}) == {"lr": 0.002, "per_method_lr": False}  # an old file: its rate is kept
    assert lr_choice({"lr": 0.002, "per_method_lr": True}) == {"lr": 0.002, "per_method_lr": True}
    assert RunConfig.from_dict({"methods": ["full"], "lr": 0.002}).run_plan()[0][-1] == 0.002


def test_form_parses_seed_ranges_with_a_bound():
    from bora_lab.ui.form import _int_list

    assert _int_list("0-2, 7", "seeds") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="at most 4,096"):
        _int_list("0-4000000000", "seeds")


def _synthetic(**kw) -> RunConfig:
    base = dict(task="synthetic_col", methods=["lora", "dora_col", "rslora"], ranks=[1], seeds=[0, 1, 2],
                steps=150, lr=0.03, batch_size=32, warmup_ratio=0.0, eval_every=150, analyze_every=50)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def synthetic_results():
    return run(_synthetic())


def test_known_answers_on_synthetic_col(synthetic_results):
    """A column scaling: dora_col can express it, rank-1 LoRA cannot, so dora_col's error is lower on
    every seed; rsLoRA at rank 1 is LoRA exactly (alpha/sqrt(1) = alpha/1), so no difference at all."""
    agg = synthetic_results["aggregate"]
    assert agg["baseline"] == "lora-r1" and agg["seeds"] == [0, 1, 2]
    groups = {g["key"]: g for g in agg["groups"]}
    col = groups["dora_col-r1"]["vs_baseline"]
    assert col["distinguishable"] and col["high"] < 0 and col["score"] == "squared_error"
    assert "better than lora-r1" in groups["dora_col-r1"]["verdict"]
    same = groups["rslora-r1"]["vs_baseline"]
    assert same["difference"] == 0 and not same["distinguishable"]
    assert "not distinguishable" in groups["rslora-r1"]["verdict"]
    st = groups["lora-r1"]["stats"]["eval_metric"]
    assert st["n"] == 3 and st["low"] < st["mean"] < st["high"]


def test_per_example_scores_are_saved_and_reload(synthetic_results, tmp_path):
    save_results(synthetic_results, tmp_path)
    back = load_results(tmp_path)
    run0 = back["runs"][0]
    assert run0["seed"] == 0 and run0["per_example"]["name"] == "squared_error"
    assert len(run0["per_example"]["values"]) == 1024
    assert aggregate(back)["groups"][1]["verdict"] == synthetic_results["aggregate"]["groups"][1]["verdict"]
    assert json.loads((tmp_path / "results.json").read_text())["aggregate"]["baseline"] == "lora-r1"


def test_baseline_choice_and_bad_baseline():
    results = {"runs": [], "task": {}}
    assert aggregate(results)["baseline"] is None
    with pytest.raises(ValueError, match="baseline 'nope'"):
        run(_synthetic(baseline="nope", steps=1))


def test_paired_against_needs_shared_seeds():
    a = [{"run_id": "a", "method": "a", "rank": 1, "seed": 0, "status": "done",
          "per_example": {"name": "correct", "values": [1, 0, 1, 1]}}]
    b = [{"run_id": "b", "method": "b", "rank": 1, "seed": 1, "status": "done",
          "per_example": {"name": "correct", "values": [1, 0, 0, 1]}}]
    assert paired_against(a, b) is None
    b[0]["seed"] = 0
    diff = paired_against(a, b, n_boot=200)
    assert diff["difference"] == pytest.approx(0.25) and "one seed" in diff["method"]
    assert group_key({"method": "bitfit", "rank": 0}) == "bitfit"


def test_figures_and_cli_lines(synthetic_results):
    from bora_lab.cli_output import verdict_lines
    from bora_lab.figures import comparison_figures, has_seeds, report_html
    from bora_lab.ui.common import render_plots

    assert has_seeds(synthetic_results)
    figs = comparison_figures(synthetic_results)
    assert any(t.fill == "toself" for t in figs["loss"].data)  # bands
    assert any("mean of 3 seeds" in (t.name or "") for t in figs["metric"].data)
    forest = figs["forest"]
    assert {t.name for t in forest.data} == {"dora_col-r1", "rslora-r1"}
    rows = aggregate_rows(synthetic_results)
    assert [r["run"] for r in rows] == ["lora-r1", "dora_col-r1", "rslora-r1"] and rows[0]["seeds"] == 3
    page = report_html(synthetic_results)
    assert "better than lora-r1" in page and "plotly" in page
    ui = render_plots(synthetic_results, ("loss", "metric", "forest", "table"))
    assert list(ui["table"]["run"]) == ["lora-r1", "dora_col-r1", "rslora-r1"]
    text = verdict_lines(synthetic_results)
    assert "Over 3 seeds" in text and "dora_col-r1: " in text and "better than lora-r1" in text


def test_every_seed_is_evaluated_on_the_same_examples():
    from bora_lab.engine.pipeline import TextPipeline
    from bora_lab.engine.tasks import load_task

    cfg = RunConfig(num_layers=1, steps=2, batch_size=4, max_length=16, eval_samples=24)
    task = load_task(cfg)
    p0 = TextPipeline(cfg, task, eval_seed=5)
    p1 = TextPipeline(RunConfig(num_layers=1, steps=2, batch_size=4, max_length=16, eval_samples=24, seed=9), task,
                      eval_seed=5)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(p0.eval_batches, p1.eval_batches))
    assert not (p0.train_batches[0]["input_ids"].shape == p1.train_batches[0]["input_ids"].shape
                and (p0.train_batches[0]["input_ids"] == p1.train_batches[0]["input_ids"]).all())
