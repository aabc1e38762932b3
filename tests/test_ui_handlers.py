"""The app's handlers without a browser: widgets <-> RunConfig, events -> updates, bad input -> messages.

The trainer is replaced by ``fake_compare``, which yields hand-made events (with real
``WeightTracker`` snapshots) in the order the real trainer does, so these tests take a second.
One test runs the real trainer on the synthetic task (a toy linear layer, seconds).
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go
import pytest
import torch

from bora_lab import methods
from bora_lab.analysis import WeightTracker
from bora_lab.config import RunConfig
from bora_lab.methods import registry
from bora_lab.record.events import (Analysis, Cancelled, ComparisonDone, Eval, Progress, RunError, RunFinished,
                                   RunStarted, Step)
from bora_lab.record import ResultsAccumulator, load_results
from bora_lab.ui import common, form, tab_compare, tab_history, visitor

TASK = {"name": "fine_foods", "kind": "classification", "metric": "accuracy", "higher_is_better": True}
TINY = dict(methods=["lora", "dora", "bora"], ranks=[4], steps=6, analyze_every=2, eval_every=3)


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_LAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(tab_compare, "MIN_INTERVAL_S", 0.05)  # redraw often so the tests see live updates


@dataclass
class Fake:
    """A stand-in for ``trainer.compare``: configurable delay, NaN run, failure."""

    delay: float = 0.0  # seconds per step
    nan_run: str | None = None  # run id whose loss turns NaN at step 2
    fail: Exception | None = None  # raised before any event (e.g. a model that cannot load)

    def __call__(self, cfg: RunConfig, cancel: threading.Event):
        if self.fail is not None:
            raise self.fail
        acc = ResultsAccumulator(cfg)
        gen = torch.Generator().manual_seed(0)
        weights = {rid: {f"layer.{i}.query": torch.randn(8, 6, generator=gen) for i in range(2)}
                   for rid in cfg.run_ids()}
        trackers = {rid: WeightTracker() for rid in cfg.run_ids()}
        alive = list(cfg.run_ids())

        def emit(ev):
            acc.update(ev)
            return ev

        for rid in alive:
            method, _, rank = rid.rpartition("-r")
            yield emit(RunStarted(rid, method, int(rank), 100 * int(rank), 10_000, "cpu", list(weights[rid]),
                                  info={"task": TASK, "trainable_pct": int(rank), "magnitude_axis": "none"}))
            yield emit(Analysis(rid, 0, trackers[rid].snapshot(0, weights[rid])))
        done, total = 0, cfg.steps * len(alive)
        for step in range(1, cfg.steps + 1):
            for rid in list(alive):
                if cancel.is_set():
                    for r in alive:
                        yield emit(RunFinished(r, "cancelled"))
                    yield emit(Cancelled("cancelled by the user; results so far are kept"))
                    yield emit(ComparisonDone("cancelled", 0.01))
                    return
                time.sleep(self.delay)
                if rid == self.nan_run and step == 2:
                    alive.remove(rid)
                    total -= cfg.steps - 1
                    yield emit(RunError(rid, "loss became NaN at step 2; try a smaller learning rate", status="nan"))
                    yield emit(RunFinished(rid, "nan"))
                    continue
                for w in weights[rid].values():
                    w.add_(0.01 * torch.randn(w.shape, generator=gen))
                yield emit(Step(rid, step, 1.0 / step, 1e-3, 0.01, 100.0))
                if step % cfg.analyze_every == 0:
                    yield emit(Analysis(rid, step, trackers[rid].snapshot(step, weights[rid])))
                if step % cfg.eval_every == 0:
                    yield emit(Eval(rid, step, {"accuracy": 0.5 + step / 100, "f1": 0.5}))
                done += 1
                yield emit(Progress(done, total, 0.01 * done, 0.01 * (total - done)))
        for rid in alive:
            yield emit(RunFinished(rid, "done"))
        yield emit(ComparisonDone("done", 0.01))


def values_for(cfg: RunConfig) -> list:
    v = form.ui_values(cfg)
    return [v[k] for k in form.input_keys()]


def drain(gen) -> list[tuple]:
    return list(gen)


def traces_named(fig: go.Figure) -> set[str]:
    return {t.name for t in fig.data if t.name}


# --------------------------------------------------------------------------- widgets <-> RunConfig
@pytest.mark.parametrize("cfg", [
    RunConfig(),
    RunConfig(model="roberta-base", task="stanfordnlp/imdb", methods=["dora", "bora"], ranks=[16, 4], alpha=8.0, lr=3e-4,
              steps=7, batch_size=3, seed=5, num_layers=2, analysis_layers=[0, 1], analysis_module="value",
              target_modules=["query", "value"], device="cpu", lockstep=False, text_column="sentence",
              method_options={"dora": {"detach_norm": False}, "bora": {"eps": 1e-5}}),
])
def test_widgets_round_trip(cfg):
    assert form.config_from_ui(**form.ui_values(cfg)) == cfg


def test_every_registered_method_and_option_has_a_widget():
    labels = dict((v, k) for k, v in form.method_choices())
    assert list(labels) == registry.available()
    assert labels["lora"] == "lora" and labels["dora"] == "dora (row)" and labels["bora"] == "bora (row+col)"
    notes = form.method_notes(["lora", "bora"])
    assert registry.info("bora")["description"] in notes and "magnitude row + column" in notes
    assert "no magnitude vector" in notes and "**dora**" not in notes
    keys = {s["key"] for s in form.option_specs()}
    assert "dora.detach_norm" in keys and not any(k.endswith((".rank", ".alpha")) for k in keys)


def test_a_new_method_needs_no_ui_code():
    from dataclasses import dataclass, field

    @dataclass
    class ToyConfig(methods.AdapterConfig):
        knob: int = field(default=3, metadata={"help": "a toy knob", "min": 1, "max": 9})

    try:
        @registry.register("toy_method", ToyConfig)
        class Toy(methods.AdapterLinear):
            description, magnitude_axis = "a toy", "row (per output feature)"

        assert "toy_method" in dict((v, k) for k, v in form.method_choices())
        values = form.ui_values(RunConfig(methods=["toy_method"]))
        assert values["toy_method.knob"] == 3
        cfg = form.config_from_ui(**{**values, "toy_method.knob": 5})
        assert cfg.method_options == {"toy_method": {"knob": 5}}
        with pytest.raises(ValueError, match="toy_method.knob must be <= 9"):
            form.config_from_ui(**{**values, "toy_method.knob": 10})
    finally:
        registry.METHODS.pop("toy_method", None)


@pytest.mark.parametrize("change, message", [
    ({"methods": []}, "Select at least one method"),
    ({"ranks": []}, "at least one rank"),
    ({"ranks": ["8", "x"]}, "'x' is not a whole number"),
    ({"ranks": ["0"]}, "at least 1"),
    ({"steps": 0}, "Steps must be >= 1"),
    ({"steps": 2.5}, "Steps must be a whole number"),
    ({"lr": "fast"}, "Learning rate must be a number"),
    ({"lr": 0}, "Learning rate must be > 0, got 0"),
    ({"batch_size": None}, "Batch size is empty"),
    ({"model": "  "}, "Enter a model"),
    ({"analysis_layers": "0, two"}, "'two' is not a whole number"),
    ({"dora.eps": -1.0}, "dora.eps must be >= 0"),
])
def test_bad_widget_values_give_specific_messages(change, message):
    values = {**form.ui_values(), **change}
    with pytest.raises(ValueError, match=message):
        form.config_from_ui(**values)


def test_task_suggests_its_settings_and_switching_back_restores_them():
    from bora_lab.engine.tasks import task_defaults

    suggested = task_defaults("synthetic_col")
    synthetic = form.task_values("synthetic_col")
    assert synthetic["model"] == suggested["model"] != RunConfig().model and synthetic["lr"] == suggested["lr"]
    back = form.task_values("fine_foods")
    assert back["model"] == RunConfig().model and back["lr"] == RunConfig().lr


# --------------------------------------------------------------------------- events -> updates
def test_stale_plots_follow_the_events():
    assert common.stale_plots([Step("a", 1, 0.5, 1e-3, 0.1, 1.0)]) == {"loss"}
    assert common.stale_plots([Analysis("a", 2, {})]) == {"md", "scatter", "table"}
    assert common.stale_plots([Progress(1, 2, 0.1, 0.1)]) == set()


def test_progress_bar_and_durations():
    html = common.progress_html(30, 120, 65, 195)
    assert 'style="width:25.0%"' in html and "30 / 120 steps" in html and "1:05 elapsed" in html
    assert "about 3:15 left" in html
    assert common.fmt_duration(3725) == "1:02:05" and common.fmt_duration(None) == "?"


def test_error_messages_are_one_line_and_suggest_a_fix():
    class OutOfMemoryError(RuntimeError):
        pass

    oom = common.error_message(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\ntrace"), "cuda")
    assert "smaller batch size" in oom and "rank" in oom and "\n" not in oom
    assert common.error_message(ValueError("unknown model 'x' (offline)\nmore")) == "Unknown model 'x' (offline)"
    assert common.error_message(RuntimeError("boom")) == "RuntimeError: boom"


def test_run_streams_live_plots_of_every_run_and_saves_them():
    session = visitor.Session()
    cfg = RunConfig(**TINY)
    outs = drain(tab_compare.run_comparison(session, *values_for(cfg), compare_fn=Fake(delay=0.02)))
    assert len(outs) >= 3  # a first frame, live redraws, the final frame
    status, progress, loss, metric, md, scatter, forest, table = outs[-1]
    runs = set(cfg.run_ids())
    assert "Done" in status and "Saved as `" in status and str(visitor.runs_dir()) not in status and "18 / 18 steps" in progress
    assert runs <= {n.split(" ")[0] for n in traces_named(loss)}
    assert isinstance(md, go.Figure) and isinstance(scatter, go.Figure) and isinstance(metric, go.Figure)
    assert list(table["run"]) == cfg.run_ids()
    saved = load_results(session.run_dirs[-1])
    assert saved["status"] == "done" and len(saved["runs"][0]["history"]) == cfg.steps
    assert (session.run_dirs[-1] / "steps.csv").is_file() and (session.run_dirs[-1] / "figures.html").is_file()


def test_live_frames_skip_plots_that_did_not_change():
    session = visitor.Session()
    drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY)), compare_fn=Fake()))
    frame = tab_compare.render(session.job, common.stale_plots([Step("lora-r4", 9, 0.1, 1e-3, 0.1, 1.0)]), "from_start")
    assert dict(zip(tab_compare.OUTPUTS, frame)).keys() == set(tab_compare.OUTPUTS)
    assert isinstance(frame[2], go.Figure)
    assert frame[3] == frame[4] == frame[5] == frame[6] == frame[7] == gr.skip()


def test_bad_input_raises_a_gradio_error_without_starting():
    session = visitor.Session()
    values = values_for(RunConfig(**TINY))
    values[form.input_keys().index("methods")] = []
    with pytest.raises(gr.Error, match="Select at least one method"):
        drain(tab_compare.run_comparison(session, *values, compare_fn=Fake()))
    assert session.job is None


def test_model_that_cannot_load_becomes_one_line_error_and_no_folder():
    session = visitor.Session()
    fake = Fake(fail=ValueError("cannot load model 'nobody/nothing': the Hugging Face hub is unreachable (offline)"))
    with pytest.raises(gr.Error, match="hub is unreachable"):
        drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY)), compare_fn=fake))
    assert not session.run_dirs[-1].exists()


def test_nan_run_stops_with_a_warning_and_the_others_finish():
    session = visitor.Session()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY)),
                                         compare_fn=Fake(nan_run="dora-r4")))
    assert any("dora-r4: loss became NaN" in str(w.message) for w in caught)
    status, table = outs[-1][0], outs[-1][7]
    assert "loss became NaN at step 2" in status
    assert dict(zip(table["run"], table["status"])) == {"lora-r4": "done", "dora-r4": "nan", "bora-r4": "done"}


def test_stop_keeps_and_saves_partial_results():
    session = visitor.Session()
    cfg = RunConfig(**{**TINY, "steps": 200})
    gen = tab_compare.run_comparison(session, *values_for(cfg), compare_fn=Fake(delay=0.01))
    consumer = threading.Thread(target=drain, args=(gen,))  # Gradio iterates the generator in a worker
    consumer.start()
    deadline = time.monotonic() + 30
    while session.job is None or session.job.progress is None or session.job.progress.done_steps < 9:
        assert time.monotonic() < deadline, "the fake comparison never reached step 9"
        time.sleep(0.01)
    status, progress, loss, *_, table = tab_compare.stop_comparison(session)
    consumer.join(10)
    assert "Stopped" in status and "kept" in status and "Saved as `" in status and str(visitor.runs_dir()) not in status
    assert set(table["status"]) == {"cancelled"}
    saved = load_results(session.run_dirs[-1])
    steps = len(saved["runs"][0]["history"])
    assert saved["status"] == "cancelled" and 3 <= steps < cfg.steps


def test_stop_when_nothing_runs_is_harmless():
    assert all(o == gr.skip() for o in tab_compare.stop_comparison(visitor.Session()))


def test_session_state_is_private_per_visitor():
    import copy

    first = visitor.Session()
    first.run_dirs.append("x")
    second = copy.deepcopy(first)  # what gr.State does for each new visitor
    assert second.run_dirs == [] and second.job is None


def test_md_view_switch_redraws_the_last_comparison():
    session = visitor.Session()
    drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY)), compare_fn=Fake()))
    fig = tab_compare.change_md_view(session, "step to step (t vs t-1)")
    assert isinstance(fig, go.Figure) and session.md_view == "step_to_step"


# --------------------------------------------------------------------------- history
def test_history_lists_reopens_overlays_and_downloads(tmp_path):
    session = visitor.Session()
    for seed in (0, 1):
        drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY, seed=seed)), compare_fn=Fake()))
    frame, choices = tab_history.list_runs(session, show_all=False)
    names = [d.name for d in reversed(session.run_dirs)]
    assert list(frame["run folder"]) == names and choices["choices"] == names
    one = tab_history.open_runs(session, False, names[:1], "from the start (t vs 0)")
    assert list(one[6]["run"]) == RunConfig(**TINY).run_ids()
    assert {p.rsplit(".", 1)[-1] for p in one[7]} >= {"json", "csv", "html"}
    both = tab_history.open_runs(session, False, names, "from the start (t vs 0)")
    assert len(both[6]) == 6 and any(tab_history.short_label(names[1]) in r for r in both[6]["run"])
    assert {p.rsplit(".", 1)[-1] for p in both[7]} >= {"json", "csv", "html"}
    with pytest.raises(gr.Error, match="not in your list"):
        tab_history.open_runs(visitor.Session(), False, names[:1], "from the start (t vs 0)")  # another visitor
    bundle = session.bundle_dir
    session.close()  # what the app's delete_callback does when the page goes away
    assert bundle is not None and not bundle.exists()


def test_history_opens_an_uploaded_cli_results_file():
    session = visitor.Session()
    drain(tab_compare.run_comparison(session, *values_for(RunConfig(**TINY)), compare_fn=Fake()))
    out = tab_history.open_upload(visitor.Session(), str(session.run_dirs[-1] / "results.json"), "from the start (t vs 0)")
    assert "uploaded" in out[0] and len(out[6]) == 3


# --------------------------------------------------------------------------- the real trainer
def test_real_trainer_on_the_synthetic_task():
    session = visitor.Session()
    cfg = RunConfig(task="synthetic_col", model="linear", methods=["lora", "bora"], ranks=[2], steps=8,
                    batch_size=16, lr=0.02, eval_every=4, analyze_every=2, warmup_ratio=0.0, device="cpu")
    outs = drain(tab_compare.run_comparison(session, *values_for(cfg)))
    status, _, loss, *_, table = outs[-1]
    assert "Done" in status and list(table["run"]) == cfg.run_ids()
    assert load_results(session.run_dirs[-1])["status"] == "done"
