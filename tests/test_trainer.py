"""The headless trainer: event stream, fairness, determinism, cancellation, failures, results files."""
from __future__ import annotations

import csv
import json
import math
import threading
from dataclasses import dataclass, field

import pytest
import torch

from bora_lab import methods
from bora_lab.config import RunConfig
from bora_lab.methods import METHODS, registry
from bora_lab.methods.base import AdapterConfig
from bora_lab.methods.lora import LoRALinear
from bora_lab.record import ResultsAccumulator, fold, load_results, save_results
from bora_lab.engine.trainer import compare, run

QUERY = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def tiny(**kw) -> RunConfig:
    """MiniLM cut to 2 layers, a few steps of 4 short examples: seconds on 2 CPU cores."""
    base = dict(methods=["lora", "dora", "bora"], ranks=[4], num_layers=2, steps=4, batch_size=4, max_length=32,
                eval_samples=16, eval_every=2, analyze_every=2, num_threads=1)  # fixed threads: same numerics
    return RunConfig(**{**base, **kw})


def synthetic(**kw) -> RunConfig:
    base = dict(task="synthetic_col", methods=["lora", "bora"], ranks=[4], steps=20, batch_size=32, lr=0.01,
                eval_every=10, analyze_every=5, warmup_ratio=0.0)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_events():
    torch.manual_seed(0)
    return list(compare(tiny()))


def _by(events, kind, run_id=None):
    return [e for e in events if e.kind == kind and (run_id is None or e.run_id == run_id)]


def _numbers(results):
    """Everything numeric a run produced except wall-clock times and memory."""
    return {r["run_id"]: ([(h["step"], h["loss"], h["lr"]) for h in r["history"]],
                          [(e["step"], e["metrics"]) for e in r["eval"]],
                          [(a["step"], a["from_start"], a["step_to_step"]) for a in r["analysis"]])
            for r in results["runs"]}


# ---------------------------------------------------------------- event stream
def test_event_stream(tiny_events):
    assert tiny_events[-1].kind == "comparison_done"
    for rid in ("lora-r4", "dora-r4", "bora-r4"):
        evs = [e for e in tiny_events if getattr(e, "run_id", None) == rid]
        assert evs[0].kind == "run_started" and evs[-1].kind == "run_finished"
        assert evs[0].analysed_modules == QUERY  # default: the attention query of every layer
        assert [e.step for e in _by(evs, "step")] == [1, 2, 3, 4]
        assert [e.step for e in _by(evs, "analysis")] == [0, 2, 4]
        assert [e.step for e in _by(evs, "eval")] == [2, 4]
        assert set(_by(evs, "eval")[0].metrics) == {"accuracy", "f1", "loss"}
        assert evs[-1].status == "done"
    progress = _by(tiny_events, "progress")
    assert [p.done_steps for p in progress] == list(range(1, 13)) and progress[-1].total_steps == 12


def test_lockstep_order(tiny_events):
    steps = [(e.run_id, e.step) for e in _by(tiny_events, "step")]
    assert steps[:6] == [("lora-r4", 1), ("dora-r4", 1), ("bora-r4", 1), ("lora-r4", 2), ("dora-r4", 2),
                         ("bora-r4", 2)]


def test_same_start_for_every_run(tiny_events):
    """Same head, same batch, identity at init: the first loss is the same for every method."""
    first = [e.loss for e in _by(tiny_events, "step") if e.step == 1]
    assert len(first) == 3 and max(first) - min(first) < 1e-5


def test_summary_fields(tiny_events):
    summary = fold(tiny(), tiny_events).results["runs"][1]["summary"]
    assert summary["run_id"] == "dora-r4"
    for key in ("trainable_params", "total_params", "final_loss", "eval_metric", "median_step_s", "peak_mem_mb",
                "dM_row", "dM_col", "dD_row", "dD_col", "asymmetry_ratio", "analysis_overhead_pct"):
        assert summary[key] is not None, key
    assert summary["metric"] == "accuracy" and summary["steps_done"] == 4
    # DoRA's magnitude is per output feature: its row norms move more than its column norms.
    assert summary["asymmetry_ratio"] > 1.5


# ---------------------------------------------------------------- results dict and files
def test_accumulator_rebuilds_the_results(tiny_events):
    done = fold(tiny(), tiny_events).results
    assert done["status"] == "done" and done["elapsed_s"] > 0
    acc = ResultsAccumulator(tiny())
    for ev in tiny_events:
        acc.update(ev.to_dict() if ev.kind in ("step", "comparison_started") else ev)  # events or their dicts
    assert [r["run_id"] for r in acc.results["runs"]] == [r["run_id"] for r in done["runs"]]
    assert _numbers(acc.results) == _numbers(done)
    assert acc.results["task"]["name"] == "fine_foods" and acc.results["lockstep"] is True


def test_results_schema_and_files(tiny_events, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from bora_lab.record.schema import RESULTS_SCHEMA

    results = fold(tiny(), tiny_events).results
    save_results(results, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    jsonschema.validate(on_disk, RESULTS_SCHEMA)
    run0 = on_disk["runs"][0]
    for key in ("method", "rank", "trainable_params", "total_params", "history", "eval", "analysis",
                "median_step_s", "peak_mem_mb"):
        assert key in run0
    for view in ("from_start", "step_to_step"):
        assert set(run0["analysis"][-1][view]) == {"dM_row", "dM_col", "dD_row", "dD_col"}
    assert load_results(tmp_path) == on_disk
    env = on_disk["environment"]  # what produced it
    import bora_lab
    import torch
    import transformers

    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["transformers"] == transformers.__version__
    assert env["bora_lab"] == bora_lab.__version__ and env["python"] and env["device_name"]
    assert env["num_threads"] == on_disk["num_threads"] and set(env["packages"]) >= {"peft", "gradio", "datasets"}
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    assert json.loads((tmp_path / "config.json").read_text())["methods"] == ["lora", "dora", "bora"]
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0])[:8] == ["run_id", "method", "rank", "step", "loss", "lr", "step_s",
                                                       "peak_mem_mb"]
    assert rows[1]["eval_accuracy"] != "" and rows[0]["eval_accuracy"] == ""


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError):
        load_results(tmp_path)


# ---------------------------------------------------------------- fairness and determinism
def _flat(x, prefix=""):
    """Nested dicts/lists/tuples of numbers -> {path: number}."""
    if isinstance(x, dict):
        return {k2: v for k, val in x.items() for k2, v in _flat(val, f"{prefix}/{k}").items()}
    if isinstance(x, (list, tuple)):
        return {k2: v for i, val in enumerate(x) for k2, v in _flat(val, f"{prefix}/{i}").items()}
    return {prefix: x}


def assert_close_numbers(a, b, rel=1e-4, abs_=1e-6):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    bad = {k: (fa[k], fb[k]) for k in fa if fa[k] != pytest.approx(fb[k], rel=rel, abs=abs_, nan_ok=True)}
    assert not bad, f"{len(bad)} numbers differ, e.g. {list(bad.items())[:3]}"


def test_same_seed_same_numbers_lockstep_and_sequential(tiny_events):
    first = _numbers(fold(tiny(), tiny_events).results)  # lockstep: the shared-base engine
    again = _numbers(run(tiny()))
    per_copy = run(tiny(engine="per_copy"))
    sequential = run(tiny(lockstep=False))
    assert again == first
    assert set(per_copy["engines"].values()) == {"engine per_copy was chosen"}
    assert sequential["lockstep"] is False and _numbers(sequential) == _numbers(per_copy)  # bit for bit
    assert_close_numbers(_numbers(sequential), first)  # shared vs per-copy: float rounding only


# ---------------------------------------------------------------- cancellation
@pytest.mark.parametrize("engine, steps", [("per_copy", [3, 3, 2]), ("shared", [3, 3, 3])])
def test_cancel_keeps_partial_results(engine, steps):
    """Per-copy: the cancel falls between dora's and bora's step 3. Shared: the group had already taken
    step 3 for all three runs when lora asked for it, so bora's step 3 is reported too."""
    cancel = threading.Event()
    events = []
    for ev in compare(synthetic(methods=["lora", "dora", "bora"], engine=engine), cancel):
        events.append(ev)
        if ev.kind == "step" and ev.run_id == "dora-r4" and ev.step == 3:
            cancel.set()
    kinds = [e.kind for e in events]
    assert kinds[-2:] == ["cancelled", "comparison_done"]
    finished = _by(events, "run_finished")
    assert [e.run_id for e in finished] == ["lora-r4", "dora-r4", "bora-r4"]
    assert all(e.status == "cancelled" for e in finished)
    results = fold(synthetic(methods=["lora", "dora", "bora"], engine=engine), events).results
    assert results["status"] == "cancelled"
    assert [len(r["history"]) for r in results["runs"]] == steps  # stopped between steps
    assert [r["adapter"]["step"] for r in results["runs"]] == steps
    assert all(r["status"] == "cancelled" for r in results["runs"])
    assert not [e for e in events[kinds.index("run_finished"):] if e.kind == "step"]


def test_cancel_sequential_marks_pending_runs():
    cancel = threading.Event()
    events = []
    for ev in compare(synthetic(lockstep=False), cancel):
        events.append(ev)
        if ev.kind == "step" and ev.step == 2:
            cancel.set()
    results = fold(synthetic(lockstep=False), events).results
    assert [(r["run_id"], len(r["history"]), r["status"]) for r in results["runs"]] == [
        ("lora-r4", 2, "cancelled"), ("bora-r4", 0, "cancelled")]


# ---------------------------------------------------------------- failures stop one run only
@dataclass
class TrapConfig(AdapterConfig):
    fail_at: int = field(default=0, metadata={"help": "step at which to fail (0: never)"})
    fail: str = field(default="nan", metadata={"help": "nan or oom"})


class TrapLinear(LoRALinear):
    """LoRA with the trainer hooks, that can fail on purpose at a given step."""

    calls: dict = {}

    def __init__(self, base, cfg):
        super().__init__(base, cfg)
        self.seen = 0

    def after_step(self, step, total):
        self.seen = step
        TrapLinear.calls.setdefault("after_step", []).append((step, total))

    def regularization_loss(self):
        TrapLinear.calls["reg"] = TrapLinear.calls.get("reg", 0) + 1
        return 0.0 * self.lora_A.sum()

    def adapter_forward(self, x):
        y = super().adapter_forward(x)
        if self.cfg.fail_at and self.seen + 1 >= self.cfg.fail_at:
            if self.cfg.fail == "oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return y * float("nan")
        return y


@pytest.fixture
def trap():
    registry.register("trap_test", TrapConfig)(TrapLinear)
    TrapLinear.calls = {}
    yield TrapLinear
    METHODS.pop("trap_test", None)


def test_hooks_are_called(trap):
    results = run(synthetic(methods=["trap_test"], steps=5))
    assert results["runs"][0]["status"] == "done"
    assert trap.calls["after_step"] == [(s, 5) for s in range(1, 6)]
    assert trap.calls["reg"] == 5


def test_nan_stops_that_run_only(trap):
    cfg = synthetic(methods=["lora", "trap_test"], eval_every=20, method_options={"trap_test": {"fail_at": 3}})
    events = list(compare(cfg))
    err = _by(events, "error")
    assert len(err) == 1 and err[0].run_id == "trap_test-r4" and err[0].status == "nan"
    assert err[0].message.startswith("loss became NaN at step 3") and "smaller learning rate" in err[0].message
    runs = {r["run_id"]: r for r in fold(cfg, events).results["runs"]}
    assert runs["trap_test-r4"]["status"] == "nan" and len(runs["trap_test-r4"]["history"]) == 2
    assert runs["lora-r4"]["status"] == "done" and len(runs["lora-r4"]["history"]) == 20
    assert _by(events, "progress")[-1].total_steps == 20 + 2


def test_huge_learning_rate_is_reported(trap):
    results = run(synthetic(lr=1e6, steps=5))  # finite but astronomically large losses: diverged, not NaN
    for r in results["runs"]:
        assert r["status"] == "diverged" and "try a smaller learning rate" in r["error"], r["error"]


def test_divergence_short_of_nan_is_flagged():
    """lr 1e3 on fine_foods keeps the loss finite (~5e4, from 0.69): the run must not end as "done"."""
    results = run(tiny(methods=["lora"], lr=1e3, steps=12, eval_every=12, analyze_every=12))
    r = results["runs"][0]
    assert r["status"] == "diverged" and "over the last 10 steps" in r["error"], r["error"]
    assert r["history"] and all(math.isfinite(h["loss"]) for h in r["history"])


def test_oom_and_bad_rank_are_run_errors(trap):
    cfg = synthetic(methods=["lora", "trap_test"], ranks=[4, 1000], steps=4,
                    method_options={"trap_test": {"fail_at": 2, "fail": "oom"}})
    runs = {r["run_id"]: r for r in run(cfg)["runs"]}
    assert runs["lora-r4"]["status"] == "done"
    assert runs["lora-r1000"]["status"] == "error" and "rank 1000 is invalid" in runs["lora-r1000"]["error"]
    assert runs["trap_test-r4"]["status"] == "oom" and "smaller batch size" in runs["trap_test-r4"]["error"]


def test_config_errors_raise_one_line():
    for cfg, match in [(RunConfig(methods=["nope"]), "unknown method 'nope'"),
                       (RunConfig(method_options={"dora": {"bogus": 1}}), "no option"),
                       (tiny(analysis_module="nothing_like_this"), "modules available"),
                       (tiny(analysis_layers=[7]), "layers available: \\[0, 1\\]")]:
        with pytest.raises(ValueError, match=match):
            next(compare(cfg))


# ---------------------------------------------------------------- analysis choices, model-level methods
def test_analysis_module_and_layers():
    events = list(compare(tiny(methods=["lora"], steps=2, analysis_module="value", analysis_layers=[1],
                               eval_every=2)))
    assert _by(events, "run_started")[0].analysed_modules == ["bert.encoder.layer.1.attention.self.value"]


def test_model_level_method_has_no_analysis():
    model_level = [n for n, c in METHODS.items() if c.kind == "model" and n in ("bitfit", "head", "adapter")]
    if not model_level:
        pytest.skip("no model-level method registered yet")
    cfg = tiny(methods=[model_level[0]], steps=2)
    events = list(compare(cfg))
    assert _by(events, "run_started")[0].analysed_modules == []
    assert not _by(events, "analysis") and fold(cfg, events).results["runs"][0]["status"] == "done"


def test_export_weights(tmp_path):
    from safetensors.torch import load_file

    from bora_lab.engine.loading import load_model

    cfg = tiny(methods=["lora"], steps=2, export_weights=True)
    events = list(compare(cfg))
    weights = events[-1].weights["lora-r4"]
    assert list(weights["start"]) == QUERY and list(weights["end"]) == QUERY
    w0 = load_model("minilm", "classification", 2, num_layers=2).model.get_submodule(QUERY[0]).weight
    assert torch.equal(weights["start"][QUERY[0]], w0)
    assert not torch.equal(weights["end"][QUERY[0]], w0)
    save_results(fold(cfg, events).results, tmp_path, weights=events[-1].weights)
    on_disk = load_file(str(tmp_path / "weights" / "lora-r4" / "weights_end.safetensors"))
    assert torch.equal(on_disk[QUERY[0]], weights["end"][QUERY[0]])


# ---------------------------------------------------------------- synthetic: which method recovers what
def test_only_column_capable_methods_recover_a_column_scaling():
    """W* = W0 diag(c): full-rank, so LoRA (rank 4) and DoRA's per-row magnitude cannot express it."""
    cfg = synthetic(methods=["lora", "dora", "dora_col", "bora", "full"], steps=400, eval_every=400,
                    analyze_every=100)
    err = {r["method"]: r["summary"]["eval_metric"] for r in run(cfg)["runs"]}
    for m in ("dora_col", "bora", "full"):
        assert err[m] < 0.2, err
    for m in ("lora", "dora"):
        assert err[m] > 0.4, err


def test_row_scaling_is_recovered_by_row_magnitude():
    cfg = synthetic(task="synthetic_row", methods=["lora", "dora", "dora_col"], steps=300, eval_every=300,
                    analyze_every=100)
    err = {r["method"]: r["summary"]["eval_metric"] for r in run(cfg)["runs"]}
    assert err["dora"] < 0.2 < min(err["lora"], err["dora_col"]), err


def test_run_writes_out_dir(tmp_path):
    from bora_lab import api

    results = api.run(synthetic(steps=4, eval_every=2, analyze_every=2), out_dir=tmp_path)
    assert results["status"] == "done"
    for name in ("results.json", "config.json", "steps.csv", "figures.html"):
        assert (tmp_path / name).is_file()
    engine_only = run(synthetic(steps=2, eval_every=2, analyze_every=2), out_dir=tmp_path / "engine")
    assert engine_only["status"] == "done" and not (tmp_path / "engine" / "figures.html").exists()
    assert results["task"]["target_changes"]["proj"]["dM_col"] > 0
    assert methods.info("bora")["has_weight"]


@pytest.mark.slow
def test_decoder_trains_on_austen():
    """SmolLM2 (cut to 2 layers) on the Austen causal-LM task: finite loss, perplexity, q_proj analysed."""
    cfg = RunConfig(task="austen_lm", model="smollm2", methods=["lora", "bora"], ranks=[4], num_layers=2, steps=3,
                    batch_size=2, max_length=32, eval_samples=4, eval_every=3, analyze_every=3, lr=5e-4,
                    num_threads=1)
    results = run(cfg)
    for r in results["runs"]:
        assert r["status"] == "done" and r["analysed_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
        ppl = r["eval"][-1]["metrics"]["perplexity"]  # 2 of 30 layers: a poor LM, but a finite one
        assert 1 < ppl < float("inf") and r["summary"]["final_loss"] > 0
    assert results["task"]["metric"] == "perplexity"


# ---------------------------------------------------------------- the head policy
@pytest.mark.parametrize("head, head_params", [("classifier+pooler", 147_840 + 770), ("classifier", 770), ("none", 0)])
def test_head_policy_is_explicit_and_counted_apart(head, head_params):
    results = run(tiny(methods=["lora"], steps=1, eval_every=1, analyze_every=1, head=head))
    r = results["runs"][0]
    # lora r4 on 2 layers: q, k, v, attention output 4 x 4(384+384) + FFN in/out 2 x 4(384+1536) = 27,648 per layer
    assert r["head_params"] == head_params and r["adapter_params"] == 2 * 27_648
    assert r["adapter_params"] + r["head_params"] == r["trainable_params"]
    row = __import__("bora_lab.record", fromlist=["results_table"]).results_table(results)[0]
    assert row["adapter params"] == r["adapter_params"] and row["head params"] == head_params
