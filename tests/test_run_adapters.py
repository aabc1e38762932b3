"""Every run keeps what it trained: reloading a run folder gives the model as it was at the end."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from bora_lab import api
from bora_lab.config import RunConfig
from bora_lab.engine import runstate
from bora_lab.engine.reload import load_run

BASE = dict(ranks=[4], num_layers=2, steps=4, batch_size=4, max_length=24, eval_samples=8, eval_every=4,
            analyze_every=2, num_threads=1)


@pytest.fixture
def end_logits(monkeypatch):
    """Logits of each run's model on the pipeline's first eval batch, taken just before it is freed."""
    seen: dict[str, torch.Tensor] = {}
    close = runstate.RunState.close

    def record(self):
        if hasattr(self, "model"):
            seen[self.run_id] = _logits(self.model, self.pipeline)
        close(self)

    monkeypatch.setattr(runstate.RunState, "close", record)
    return seen


@torch.no_grad()
def _logits(model, pipeline) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        batch = next(iter(pipeline.train_batches))
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return model(**batch).logits.detach().clone()
    finally:
        model.train(was)


@pytest.mark.parametrize("methods", [["lora", "dora", "bora"], ["adalora", "vera", "mora"], ["bitfit", "prefix"]])
def test_reloaded_runs_give_the_end_of_training_logits(tmp_path, end_logits, methods):
    results = api.run(RunConfig(methods=methods, **BASE), out_dir=tmp_path, html=False)
    assert all(r["adapter"]["saved"] for r in results["runs"])
    for run in results["runs"]:
        loaded = load_run(tmp_path, run["run_id"])
        torch.testing.assert_close(_logits(loaded.model, loaded.pipeline), end_logits[run["run_id"]],
                                   atol=1e-6, rtol=1e-6)
        meta = json.loads((tmp_path / "adapters" / run["run_id"] / "adapter_config.json").read_text())
        assert meta["method"] == run["method"] and meta["step"] == 4


def test_adapters_are_small_and_full_model_is_not_kept(tmp_path):
    results = api.run(RunConfig(methods=["lora", "full_model"], **{**BASE, "steps": 1, "eval_every": 1}),
                      out_dir=tmp_path, html=False)
    runs = {r["run_id"]: r for r in results["runs"]}
    size = (tmp_path / "adapters" / "lora-r4" / "adapter.safetensors").stat().st_size
    assert size < 2 * 2**20  # the adapter and the head, not the base (MiniLM is ~90 MB)
    assert not runs["full_model"]["adapter"]["saved"] and "not kept" in runs["full_model"]["adapter"]["reason"]
    with pytest.raises(ValueError, match="kept no tensors"):
        load_run(tmp_path, "full_model")


def test_a_cancelled_run_keeps_what_it_has(tmp_path, end_logits):
    cancel = threading.Event()

    def on_event(ev):
        if ev.kind == "step" and ev.step == 2:
            cancel.set()

    cfg = RunConfig(methods=["lora"], **{**BASE, "steps": 50, "eval_every": 50, "analyze_every": 25})
    results = api.run(cfg, cancel=cancel, on_event=on_event, out_dir=tmp_path, html=False)
    run = results["runs"][0]
    assert run["status"] == "cancelled" and run["adapter"] == {"step": 2, "saved": True, "reason": None}
    loaded = load_run(tmp_path, "lora-r4")
    torch.testing.assert_close(_logits(loaded.model, loaded.pipeline), end_logits["lora-r4"], atol=1e-6, rtol=1e-6)


def test_cli_predict_uses_the_trained_run(tmp_path, capsys):
    from bora_lab.cli import main

    api.run(RunConfig(methods=["lora"], **{**BASE, "steps": 2, "eval_every": 2}), out_dir=tmp_path, html=False)
    texts = ["Great coffee, would buy again.", "Stale and overpriced."]
    assert main(["predict", str(tmp_path), "--run", "lora-r4", "--json", *texts]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert set(r["probabilities"]) == {"great", "other"} and r["label"] in ("great", "other")
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6
    assert main(["predict", str(tmp_path), "--run", "lora-r4", texts[0]]) == 0
    assert texts[0] in capsys.readouterr().out
    assert main(["predict", str(tmp_path), "--run", "nope-r1", "x"]) == 2
    assert "no saved adapter for run 'nope-r1'" in capsys.readouterr().err


def test_predict_refuses_a_task_without_text(tmp_path):
    from bora_lab.engine.reload import predict

    api.run(RunConfig(task="synthetic_col", methods=["lora"], ranks=[2], steps=2, eval_every=2, analyze_every=2),
            out_dir=tmp_path, html=False)
    with pytest.raises(ValueError, match="takes no text"):
        predict(load_run(tmp_path, "lora-r2"), ["hello"])


@pytest.mark.parametrize("method", ["lora", "bora", "qlora", "bitfit"])
def test_merged_export_loads_without_bora_lab_and_gives_the_same_logits(tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    from bora_lab.engine.reload import export_merged

    api.run(RunConfig(methods=[method], **{**BASE, "steps": 2, "eval_every": 2}), out_dir=tmp_path / "run", html=False)
    run_id = f"{method}-r4" if method != "bitfit" else "bitfit"
    loaded = load_run(tmp_path / "run", run_id)
    reference = _logits(loaded.model, loaded.pipeline)
    export_merged(loaded, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("Adapter" in type(m).__name__ for m in plain.modules())
    torch.testing.assert_close(_logits(plain, loaded.pipeline), reference, atol=1e-5, rtol=1e-5)


def test_peft_export_of_a_saved_run_and_methods_without_a_merged_form(tmp_path):
    import copy

    peft = pytest.importorskip("peft")
    from bora_lab.engine.reload import export_merged, export_peft

    api.run(RunConfig(methods=["dora", "prefix"], **{**BASE, "steps": 2, "eval_every": 2}), out_dir=tmp_path / "run",
            html=False)
    loaded = load_run(tmp_path / "run", "dora-r4")
    reference = _logits(loaded.model, loaded.pipeline)
    export_peft(loaded, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(loaded.pipeline.pristine()), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(theirs, loaded.pipeline), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no merged export"):
        export_merged(load_run(tmp_path / "run", "prefix"), tmp_path / "merged")


def test_cli_export(tmp_path, capsys):
    from bora_lab.cli import main

    api.run(RunConfig(methods=["lora", "prompt"], **{**BASE, "steps": 1, "eval_every": 1}), out_dir=tmp_path / "run",
            html=False)
    assert main(["export", str(tmp_path / "run"), "--run", "lora-r4", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and "as merged" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run"), "--run", "prompt", "--out", str(tmp_path / "p")]) == 2
    assert "no merged export" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--run", "lora-r4", "--format", "peft", "--out",
                 str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_reload_rebuilds_each_seed_of_a_comparison(tmp_path, end_logits):
    """A run of a multi-seed comparison comes back with its own seed: with an untrained (seeded, unsaved)
    head, the comparison's first seed would give other logits, and the comparison's eval subset."""
    cfg = RunConfig(methods=["lora", "vera"], seeds=[0, 1], head="none", **{**BASE, "steps": 2, "eval_every": 2})
    results = api.run(cfg, out_dir=tmp_path, html=False)
    runs = {r["run_id"]: r for r in results["runs"]}
    for run_id in ("lora-r4-s1", "vera-r4-s1"):
        loaded = load_run(tmp_path, run_id)
        assert loaded.cfg.seed == 1 and loaded.cfg.seeds is None and loaded.which == "final" and loaded.step == 2
        torch.testing.assert_close(_logits(loaded.model, loaded.pipeline), end_logits[run_id], atol=1e-6, rtol=1e-6)
        metrics = loaded.pipeline.evaluate(loaded.model, torch.device("cpu"))
        recorded = runs[run_id]["eval"][-1]["metrics"]
        assert metrics.keys() == recorded.keys()
        assert all(abs(float(metrics[k]) - recorded[k]) < 1e-6 for k in recorded)
    with pytest.raises(FileNotFoundError, match="no validation split"):
        load_run(tmp_path, "lora-r4-s1", which="best")


def test_best_validation_checkpoint_is_saved_and_reloads(tmp_path, monkeypatch):
    """With a validation split every run also keeps its adapter at its best validation evaluation (the
    accumulator's best_step), and a cancelled run keeps the best it reached."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    evaluate = runstate.RunState.evaluate

    def record(self, per_example=False, split="test"):
        if split == "val":
            seen[self.run_id, self.steps_done] = _logits(self.model, self.pipeline)
        return evaluate(self, per_example=per_example, split=split)

    monkeypatch.setattr(runstate.RunState, "evaluate", record)
    cancel = threading.Event()

    def on_event(ev):
        if ev.kind == "step" and ev.step == 3:
            cancel.set()

    cfg = RunConfig(methods=["lora"], val_samples=16, lr=0.02, **{**BASE, "steps": 50, "eval_every": 1,
                                                                   "analyze_every": 25})
    results = api.run(cfg, cancel=cancel, on_event=on_event, out_dir=tmp_path, html=False)
    run = results["runs"][0]
    best = run["summary"]["best_step"]
    assert run["status"] == "cancelled" and best in (1, 2, 3) and {k for k, _ in seen} == {"lora-r4"}
    folder = tmp_path / "adapters" / "lora-r4"
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["best_step"] == best and meta["step"] == 3 and (folder / "adapter_best.safetensors").is_file()
    loaded = load_run(tmp_path, "lora-r4", which="best")
    assert loaded.which == "best" and loaded.step == best
    torch.testing.assert_close(_logits(loaded.model, loaded.pipeline), seen["lora-r4", best], atol=1e-6, rtol=1e-6)
    metric = results["task"]["metric"]
    val = loaded.pipeline.evaluate(loaded.model, torch.device("cpu"), split="val")
    assert abs(float(val[metric]) - run["summary"]["best_val_metric"]) < 1e-6
    final = load_run(tmp_path, "lora-r4")
    torch.testing.assert_close(_logits(final.model, final.pipeline), seen["lora-r4", 3], atol=1e-6, rtol=1e-6)
    if best != 3:  # (ties keep the first: here step 1) the two files hold different models
        assert not torch.allclose(seen["lora-r4", best], seen["lora-r4", 3])
    from bora_lab.cli import main

    assert main(["predict", str(tmp_path), "--run", "lora-r4", "--checkpoint", "best", "--json", "fine"]) == 0
    assert main(["export", str(tmp_path), "--run", "lora-r4", "--checkpoint", "best", "--format", "peft",
                 "--out", str(tmp_path / "best_peft")]) == 0
    assert (tmp_path / "best_peft" / "adapter_model.safetensors").is_file()
    base = json.loads((tmp_path / "best_peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "sentence-transformers/all-MiniLM-L6-v2"  # never this machine's folder
