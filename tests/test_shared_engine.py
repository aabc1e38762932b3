"""The shared-base engine gives the per-copy path's numbers, for every layer-level method.

Each test trains the same runs through both paths (same seed, batches and dropout streams: MiniLM
trains with dropout 0.1) and compares losses, evaluations, analysis snapshots and the trained
tensors. Tolerance: 1e-5 relative on losses and metrics, 1e-4 on tensors (float32 rounding of a
[k·B] matmul against k [B] matmuls; measured differences are below 3e-7 after a few steps).
"""
from __future__ import annotations

import threading

import pytest
import torch

from bora_lab import methods
from bora_lab.config import RunConfig
from bora_lab.engine.shared import FrozenBase, SharedGroup, eligible
from bora_lab.engine.trainer import compare
from bora_lab.record import ResultsAccumulator

LAYER_METHODS = [m for m in methods.available() if methods.info(m)["kind"] == "layer"]


def _train(cfg: RunConfig, cancel_after: int | None = None):
    acc, tensors, cancel, steps = ResultsAccumulator(cfg), {}, threading.Event(), 0
    for ev in compare(cfg, cancel):
        acc.update(ev)
        if ev.kind == "adapter_state" and ev.tensors is not None:
            tensors[ev.run_id] = ev.tensors
        if ev.kind == "step":
            steps += 1
            if cancel_after is not None and steps >= cancel_after:
                cancel.set()
    return acc.results, tensors


def _assert_same(a: dict, b: dict, ta: dict, tb: dict, rel: float = 1e-5) -> None:
    for ra, rb in zip(a["runs"], b["runs"], strict=True):
        rid = ra["run_id"]
        assert (rid, ra["status"]) == (rb["run_id"], rb["status"])
        assert [h["loss"] for h in ra["history"]] == pytest.approx([h["loss"] for h in rb["history"]], rel=rel), rid
        for ea, eb in zip(ra["eval"], rb["eval"], strict=True):
            assert ea["metrics"] == pytest.approx(eb["metrics"], rel=rel, abs=1e-7), rid
        for sa, sb in zip(ra["analysis"], rb["analysis"], strict=True):
            for key in ("from_start", "step_to_step"):
                for name, va in (sa.get(key) or {}).items():
                    assert va == pytest.approx(sb[key][name], rel=1e-3, abs=1e-6), (rid, sa["step"], key, name)
        assert ta.keys() == tb.keys()
        if rid in ta:
            assert ta[rid].keys() == tb[rid].keys(), rid
            for name, t in ta[rid].items():
                # Adam divides by sqrt(v): an element whose gradient is ~0 (PiSSA's residual-aligned
                # factors) can move by a good part of lr on a float-rounding difference of the two engines
                torch.testing.assert_close(t.double(), tb[rid][name].double(), rtol=1e-4, atol=5e-5,
                                           msg=lambda m: f"{rid} {name}: {m}")


def tiny(**kw) -> RunConfig:
    base = dict(methods=LAYER_METHODS, ranks=[4], num_layers=1, steps=3, batch_size=4, max_length=16,
                eval_samples=16, eval_every=3, analyze_every=1, layer_checkpoints=1, num_threads=1,
                per_method_lr=False)
    return RunConfig(**{**base, **kw})


@pytest.fixture
def batched(monkeypatch):
    """All runs of a group in one forward, as on a GPU (on a CPU the engine takes one run per forward)."""
    from bora_lab.engine import shared

    monkeypatch.setattr(shared, "runs_per_forward", lambda device, n: n)


def test_every_layer_method_same_numbers_on_minilm_with_dropout(batched):
    shared, ts = _train(tiny())
    per_copy, tp = _train(tiny(engine="per_copy"))
    assert set(shared["engines"].values()) == {"shared"}
    assert all(r["engine"] == "shared" for r in shared["runs"])
    assert all(r["status"] == "done" for r in shared["runs"])
    _assert_same(per_copy, shared, tp, ts)


def test_synthetic_mlp_and_model_level_methods_mixed(batched):
    cfg = dict(task="synthetic_mix", model="mlp", methods=["lora", "bitfit", "dora_col", "bora", "full"], ranks=[4],
               steps=12, batch_size=16, lr=0.01, eval_every=6, analyze_every=3, warmup_ratio=0.0)
    shared, ts = _train(RunConfig(**cfg))
    per_copy, tp = _train(RunConfig(**cfg, engine="per_copy"))
    assert shared["engines"]["bitfit"].startswith("bitfit is a model-level method")
    assert {k for k, v in shared["engines"].items() if v == "shared"} == {"lora-r4", "dora_col-r4", "bora-r4", "full"}
    _assert_same(per_copy, shared, tp, ts)


@pytest.mark.slow
def test_decoder_same_numbers(batched):
    cfg = dict(model="smollm2", task="austen_lm", methods=["lora", "dora", "bora"], ranks=[4], num_layers=1, steps=3,
               batch_size=2, max_length=16, eval_samples=4, eval_every=3, analyze_every=3, layer_checkpoints=0)
    shared, ts = _train(RunConfig(**cfg))
    per_copy, tp = _train(RunConfig(**cfg, engine="per_copy"))
    assert set(shared["engines"].values()) == {"shared"}
    _assert_same(per_copy, shared, tp, ts)


def test_nan_run_stops_alone_and_the_others_keep_their_numbers(monkeypatch, batched):
    from bora_lab.engine import pipeline

    real = pipeline.TextPipeline.losses
    calls = {"n": 0}

    def poisoned(self, model, batch, n):  # run 2 of 3 (dora) gets a NaN loss at the second step
        out = real(self, model, batch, n)
        calls["n"] += 1
        if calls["n"] == 2:
            out[1] = out[1] * float("nan")
        return out

    monkeypatch.setattr(pipeline.TextPipeline, "losses", poisoned)
    shared, ts = _train(tiny(methods=["lora", "dora", "bora"], steps=4, eval_every=2))
    monkeypatch.setattr(pipeline.TextPipeline, "losses", real)
    runs = {r["run_id"]: r for r in shared["runs"]}
    assert runs["dora-r4"]["status"] == "nan" and len(runs["dora-r4"]["history"]) == 1
    assert runs["lora-r4"]["status"] == runs["bora-r4"]["status"] == "done"
    per_copy, tp = _train(tiny(methods=["lora", "bora"], steps=4, eval_every=2, engine="per_copy"))
    shared["runs"] = [runs["lora-r4"], runs["bora-r4"]]
    _assert_same(per_copy, shared, tp, {k: v for k, v in ts.items() if k != "dora-r4"})


def test_one_run_per_forward_same_numbers():  # the CPU default
    shared, ts = _train(tiny(methods=["lora", "dora", "bora", "adalora"]))
    per_copy, tp = _train(tiny(methods=["lora", "dora", "bora", "adalora"], engine="per_copy"))
    _assert_same(per_copy, shared, tp, ts)


def test_cancel_keeps_every_shared_run(batched):
    results, tensors = _train(tiny(methods=["lora", "bora"], steps=6), cancel_after=5)
    assert results["status"] == "cancelled"
    assert [r["status"] for r in results["runs"]] == ["cancelled", "cancelled"]
    # the cancel came between lora's and bora's reports of step 3; the group had stepped both
    assert [len(r["history"]) for r in results["runs"]] == [3, 3]
    assert [r["adapter"]["step"] for r in results["runs"]] == [3, 3]
    assert set(tensors) == {"lora-r4", "bora-r4"}


def test_the_base_is_stored_once():
    from bora_lab.engine.pipeline import TextPipeline
    from bora_lab.engine.tasks import load_task

    cfg = tiny(methods=["lora", "dora", "bora", "pissa"])
    pipe = TextPipeline(cfg, load_task(cfg))
    group = SharedGroup([(rid, m, r, lr) for rid, m, r, _, lr in cfg.run_plan()], cfg, pipe, torch.device("cpu"), None)
    pristine = {n: p.data_ptr() for n, p in pipe.pristine().named_parameters()}
    frozen = {n: p.data_ptr() for n, p in group.frozen.model.named_parameters()}
    assert frozen == pristine  # on the CPU the frozen base aliases the pristine model: no copy
    for rid, state in group.states.items():
        own = {n for n, p in state.model.named_parameters() if p.data_ptr() not in set(pristine.values())}
        trainable = {n for n, p in state.model.named_parameters() if p.requires_grad}
        assert own == trainable, rid  # nothing but the adapter and the head is per run
        assert not any(p.requires_grad for p in group.frozen.model.parameters())


def test_eligibility_is_stated():
    assert eligible("bora") is None
    assert "model-level" in eligible("prefix")
    assert isinstance(FrozenBase, type)
