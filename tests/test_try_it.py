"""The "Try it" tab without a browser: predictions, disagreements, exports and bad input.

The handlers run on a real tiny comparison (MiniLM cut to 2 layers, 4 steps: lora, dora, bora and
full_model, whose tensors are too large to keep); ``record.disagree`` is tested on fixed data, and
the streaming generation on the offline SmolLM2 cut to 2 layers (marked slow).
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile

import gradio as gr
import pandas as pd
import pytest

from bora_lab import api
from bora_lab.config import RunConfig
from bora_lab.record.disagree import disagreements, predicted
from bora_lab.ui import tab_history, tab_try, visitor

TINY = dict(ranks=[4], num_layers=2, steps=4, batch_size=4, max_length=24, eval_samples=24, eval_every=4,
            analyze_every=2, num_threads=1)
RUNS = ["lora-r4", "dora-r4", "bora-r4"]
REVIEW = "Great coffee, rich and smooth. I would buy it again."


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("try") / "runs"
    api.run(RunConfig(methods=["lora", "dora", "bora", "full_model"], **TINY), out_dir=root / "cmp", html=False)
    return root


@pytest.fixture(autouse=True)
def _env(runs_root, monkeypatch):
    monkeypatch.setenv("BORA_LAB_RUNS", str(runs_root))
    monkeypatch.setenv("BORA_LAB_SHARED_HISTORY", "0")  # only this visitor's runs


@pytest.fixture(scope="module")
def session(runs_root):
    """A visitor whose finished comparison is ``cmp`` (shared by the tests: loaded runs stay cached)."""
    s = visitor.Session()
    s.run_dirs.append(runs_root / "cmp")
    return s


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_the_comparison_is_listed_and_its_saved_runs_chosen(session):
    assert tab_try.refresh(session, None)["choices"] == [("this visit · cmp", "cmp")]
    runs, about, lm_opts, export_run, *_ = tab_try.pick_source(session, "cmp")
    assert runs["value"] == RUNS  # full_model kept no tensors
    assert ("full_model · done · no saved adapter", "full_model") in runs["choices"]
    assert "fine_foods" in about and lm_opts["visible"] is False and export_run["value"] == "lora-r4"
    assert tab_try.refresh(visitor.Session(), None)["choices"] == []  # another visitor sees nothing of it


def test_each_run_and_the_untrained_base_give_class_probabilities(session):
    import torch

    from bora_lab.engine.loading import load_model

    out = _last(tab_try.predict(session, "cmp", RUNS, REVIEW))
    status, labels = out[0], out[1:1 + tab_try.SLOTS]
    assert "end of its training" in status
    shown = [u for u in labels if u["visible"]]
    assert [u["label"].split(":")[0] for u in shown] == [*RUNS, tab_try.BASE_CLS]
    for u in shown:
        probs = u["value"]
        assert set(probs) == {"other", "great"} and abs(sum(probs.values()) - 1) < 1e-5
        assert u["label"].endswith(max(probs, key=probs.get))  # the title names the predicted label
    # the base is the pretrained model with the head the engine seeds, nothing trained
    base = load_model("minilm", "classification", num_labels=2, num_layers=2, seed=0)
    enc = base.tokenizer([REVIEW], truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        p = base.model.eval()(**enc).logits.softmax(-1)[0]
    assert shown[-1]["value"] == pytest.approx({"other": float(p[0]), "great": float(p[1])}, abs=1e-5)
    # the trained runs answer with their own weights, not the base's
    assert shown[0]["value"] != pytest.approx(shown[-1]["value"], abs=1e-7)


def test_loaded_runs_are_cached_per_visitor_and_bounded(session, monkeypatch):
    first = tab_try.loaded(session, session.run_dirs[0], "lora-r4")
    assert tab_try.loaded(session, session.run_dirs[0], "lora-r4") is first  # a second text: no reload
    other = visitor.Session()
    other.run_dirs.append(session.run_dirs[0])
    monkeypatch.setattr(tab_try, "MAX_RUNS", 2)
    for rid in RUNS:
        tab_try.loaded(other, other.run_dirs[0], rid)
    assert [k[1] for k in tab_try.state_of(other).runs] == ["dora-r4", "bora-r4"]  # least recently used went
    assert tab_try.loaded(other, other.run_dirs[0], "lora-r4") is not first  # per visitor


@pytest.mark.parametrize("text, runs, message", [
    ("", RUNS, "Type a text first"),
    ("   \n", RUNS, "Type a text first"),
    ("x" * (tab_try.MAX_CHARS + 1), RUNS, "at most 2,000"),
    (REVIEW, [], "Pick at least one run"),
    (REVIEW, None, "Pick at least one run"),
    (REVIEW, RUNS * 3, "at most 6 runs"),
])
def test_bad_input_gives_a_message(session, text, runs, message):
    with pytest.warns(UserWarning, match=message):
        outs = list(tab_try.predict(session, "cmp", runs, text))
    assert len(outs) == 1 and message in outs[0][0]


def test_runs_without_saved_tensors_say_why(session, runs_root):
    with pytest.warns(UserWarning, match="full_model: Run 'full_model' kept no tensors"):
        out = _last(tab_try.predict(session, "cmp", ["full_model", "lora-r4"], REVIEW))
    assert "kept no tensors" in out[0] and out[1]["visible"] and "lora-r4" in out[1]["label"]
    # a comparison saved before runs kept their adapters
    shutil.copytree(runs_root / "cmp", runs_root / "old", ignore=shutil.ignore_patterns("adapters"))
    session.run_dirs.append(runs_root / "old")
    try:
        assert tab_try.pick_source(session, "old")[0]["value"] == ["lora-r4", "dora-r4", "bora-r4"]
        with pytest.warns(UserWarning, match="No saved adapter for run 'lora-r4'"):
            out = _last(tab_try.predict(session, "old", ["lora-r4"], REVIEW))
        assert out[0].startswith("Nothing to run") and not any(u["visible"] for u in out[1:])
    finally:
        session.run_dirs.remove(runs_root / "old")
        shutil.rmtree(runs_root / "old")


@pytest.mark.parametrize("name", ["../cmp", "/etc", "cmp/../cmp", "nope", None])
def test_only_the_visitors_own_folders_open(session, name):
    with pytest.raises(gr.Error):
        tab_try.folder_of(session, name)
    with pytest.raises(gr.Error):
        list(tab_try.predict(session, name, RUNS, REVIEW))


def test_where_they_disagree_lists_texts_labels_and_each_runs_answer(session, runs_root):
    from bora_lab.engine.reload import predict

    summary, table = tab_try.disagree(session, "cmp", RUNS, "final evaluation")
    results = json.loads((runs_root / "cmp" / "results.json").read_text())
    values = {r["run_id"]: r["per_example"]["values"] for r in results["runs"]}
    differ = [i for i in range(24) if len({values[rid][i] for rid in RUNS}) > 1]
    expected = f"do not all agree on {len(differ)} of 24" if differ else "agree on all 24"
    assert f"{expected} test reviews" in summary
    assert list(table.columns) == ["#", "true label", *RUNS, "text"] and list(table["#"]) == differ
    examples = tab_try.state_of(session).examples["cmp"]
    assert len(examples) == 24 and all(e["text"] and e["label"] in (0, 1) for e in examples)
    # texts, labels and order line up with the stored scores: the run, asked again, is right where they say so
    answers = predict(tab_try.loaded(session, session.run_dirs[0], "lora-r4"), [e["text"] for e in examples])
    names = results["task"]["label_names"]
    assert [int(a["label"] == names[e["label"]]) for a, e in zip(answers, examples)] == values["lora-r4"]
    for row in table.itertuples(index=False):
        example = examples[row[0]]
        assert row[-1][:250] == " ".join(example["text"].split())[:250] and row[1] == names[example["label"]]
    pair, _ = tab_try.disagree(session, "cmp", RUNS[:2], "final evaluation")
    assert pair.startswith("lora-r4 and dora-r4 ")
    note, empty = tab_try.disagree(session, "cmp", RUNS[:1], "final evaluation")
    assert "two or more runs" in note and empty.empty
    best, _ = tab_try.disagree(session, "cmp", RUNS, "best checkpoint (on the validation split)")
    assert "no best checkpoint" in best  # this comparison had no validation split


def test_every_seeds_runs_are_shown_the_comparisons_test_texts(tmp_path):
    from bora_lab.engine.reload import load_run
    from bora_lab.record.disagree import eval_examples

    cfg = RunConfig(methods=["lora"], seeds=[0, 1], **{**TINY, "steps": 2, "eval_every": 2, "eval_samples": 12})
    api.run(cfg, out_dir=tmp_path, html=False)
    first = eval_examples(load_run(tmp_path, "lora-r4-s0").pipeline, 0)
    second = load_run(tmp_path, "lora-r4-s1").pipeline  # built with seed 1, evaluated on the seed-0 subset
    assert eval_examples(second, 0) == first and len(first) == 12


def test_export_lora_as_peft_and_bora_merged_and_say_why_not_otherwise(session, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    status, path = tab_try.export(session, "cmp", "lora-r4", "peft")
    assert "exported as a PEFT adapter" in status and path.endswith("lora-r4-peft.zip")
    assert {"lora-r4-peft/adapter_config.json", "lora-r4-peft/adapter_model.safetensors"} <= set(
        zipfile.ZipFile(path).namelist())
    status, path = tab_try.export(session, "cmp", "bora-r4", "merged")
    assert "merged model" in status
    zipfile.ZipFile(path).extractall(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bora-r4-merged").eval()
    run = tab_try.loaded(session, session.run_dirs[0], "bora-r4")
    enc = run.pipeline.tokenizer([REVIEW], truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, run.model(**enc).logits, atol=1e-5, rtol=1e-5)
    assert any(hasattr(m, "effective_weight") for m in run.model.modules())  # the cached run kept its adapter
    with pytest.warns(UserWarning, match="bora-r4 has no PEFT adapter export: PEFT export supports lora"):
        status, path = tab_try.export(session, "cmp", "bora-r4", "peft")
    assert status.startswith("⚠") and path is None and "--format" not in status
    with pytest.warns(UserWarning, match="kept no tensors"):
        assert tab_try.export(session, "cmp", "full_model", "merged")[1] is None
    with pytest.warns(UserWarning, match="Pick a run"):
        assert tab_try.export(session, "cmp", None, "peft")[1] is None


def test_history_exports_the_picked_run(session):
    update = tab_history.export_choices(session, False, ["cmp"])
    assert update["choices"] == [(rid, f"cmp|{rid}") for rid in RUNS]
    status, path = tab_history.export_picked(session, False, "cmp|dora-r4", "peft")
    assert path.endswith("dora-r4-peft.zip") and "exported" in status
    with pytest.raises(gr.Error):
        tab_history.export_picked(session, False, "../cmp|dora-r4", "peft")


# ----------------------------------------------------------------- record.disagree on fixed data
def _results(values: dict[str, list], name="correct", labels=("other", "great"), task="fine_foods", **extra):
    return {"task": {"name": task, "label_names": list(labels) if labels else None},
            "runs": [{"run_id": rid, "per_example": {"name": name, "values": v, "step": 10}, **extra.get(rid, {})}
                     for rid, v in values.items()]}


def test_two_runs_binary_disagreement_names_the_predictions():
    res = _results({"lora": [1, 1, 0, 0, 1], "dora": [1, 0, 0, 1, 1]})
    examples = [{"text": f"review {i}", "label": lab} for i, lab in enumerate([1, 0, 1, 0, 1])]
    found = disagreements(res, ["lora", "dora"], examples)
    assert found.summary.startswith("lora and dora disagree on 2 of 5 test reviews (final evaluation, step 10)")
    assert "lora is right on 1 of them, dora on 1" in found.summary
    assert found.rows == [[1, "other", "other ✓", "great ✗", "review 1"],
                          [3, "other", "great ✗", "other ✓", "review 3"]]
    assert found.count == 2 and found.total == 5 and found.pairs == {("lora", "dora"): 2}
    same = disagreements(_results({"a": [1, 0], "b": [1, 0], "c": [1, 0]}), ["a", "b"])
    assert same.summary == "a and b agree on all 2 test reviews (final evaluation, step 10)." and same.rows == []
    assert disagreements(_results({"a": [1], "b": [1], "c": [1]}), ["a", "b", "c"]).summary.startswith(
        "The 3 runs agree on all 1 test reviews")


def test_three_runs_multiclass_and_runs_left_out():
    res = _results({"a": [1, 0, 0], "b": [1, 1, 0], "c": [0, 1, 0]}, labels=("x", "y", "z"), task="austen_books")
    res["runs"].append({"run_id": "d", "status": "error"})
    found = disagreements(res, ["a", "b", "c", "d", "zz"], [{"text": "t", "label": 2}] * 3)
    assert "The 3 runs do not all agree on 2 of 3 test paragraphs" in found.summary
    assert "a vs b: 1; a vs c: 2; b vs c: 1" in found.summary and "two different wrong classes" in found.summary
    assert found.skipped == {"d": "no evaluation stored yet", "zz": "not in this comparison"}
    assert found.rows[0][2:] == ["z ✓", "z ✓", "not z ✗", "t"]
    assert predicted(0, 2, ["x", "y", "z"]) == "not z" and predicted(0, 0, ["n", "p"]) == "p"
    assert predicted(1, None, None) == "right"


def test_lengths_best_and_spread():
    res = _results({"a": [1, 0], "b": [1, 0, 1]})
    assert "at least two runs" in disagreements(res, ["a", "b"]).summary
    best = _results({"a": [1, 0], "b": [0, 0]}, **{"a": {"per_example_best": {"name": "correct", "values": [0, 0]}},
                                                   "b": {"per_example_best": {"name": "correct", "values": [0, 1]}}})
    assert "disagree on 1 of 2" in disagreements(best, ["a", "b"], at="best").summary
    assert disagreements(best, ["a", "b"], at="best").rows[0][0] == 1
    lm = _results({"a": [2.0, 3.0, 1.0], "b": [2.5, 1.0, 1.0]}, name="token_loss", labels=None, task="austen_lm")
    found = disagreements(lm, ["a", "b"], [{"text": f"p{i}", "label": None} for i in range(3)])
    assert "token loss" in found.summary and [r[0] for r in found.rows] == [1, 0, 2]
    assert found.columns == ["#", "a", "b", "text"] and found.rows[0] == [1, "3", "1", "p1"]
    assert found.pairs[("a", "b")] == pytest.approx(2.5 / 3)
    reg = _results({"a": [0.5, 0.0], "b": [0.1, 0.0]}, name="squared_error", labels=None, task="glue/stsb")
    found = disagreements(reg, ["a", "b"], [{"text": "s", "label": 3.25}, {"text": "t", "label": 1.0}])
    assert found.columns[:2] == ["#", "true value"] and found.rows[0] == [0, "3.25", "0.5", "0.1", "s"]


# ----------------------------------------------------------------- causal LM: streamed continuations
def test_side_by_side_steps_every_stream_in_turn_and_closes_the_rest():
    from bora_lab.engine.generate import side_by_side

    closed = []

    def stream(texts):
        try:
            yield from texts
        finally:
            closed.append(texts[0])

    rounds = side_by_side({"a": stream(["x", "xy", "xyz"]), "b": stream(["1"])})
    assert [next(rounds), next(rounds)] == [{"a": "x", "b": "1"}, {"a": "xy", "b": "1"}]
    rounds.close()  # the page went away: the stream still running is closed too
    assert closed == ["1", "x"]
    assert list(side_by_side({"a": iter(["p", "pq"])})) == [{"a": "p"}, {"a": "pq"}]


@pytest.mark.slow
def test_causal_lm_streams_each_run_greedy_and_sampled(tmp_path, monkeypatch):
    from bora_lab.engine.generate import stream_continuation
    from bora_lab.engine.reload import predict

    root = tmp_path / "runs"
    monkeypatch.setenv("BORA_LAB_RUNS", str(root))
    api.run(RunConfig(task="austen_lm", model="smollm2", methods=["lora", "dora"], ranks=[4], num_layers=2, steps=2,
                      batch_size=2, max_length=32, eval_samples=4, eval_every=2, analyze_every=2, num_threads=1),
            out_dir=root / "lm", html=False)
    s = visitor.Session()
    s.run_dirs.append(root / "lm")
    assert tab_try.pick_source(s, "lm")[2]["visible"] is True  # the decoding controls show
    prompt = "It is a truth universally acknowledged"
    frames = list(tab_try.predict(s, "lm", ["lora-r4", "dora-r4"], prompt, "greedy", 0.8, 6, 0))
    outs = frames[-1][1 + tab_try.SLOTS:]
    assert [u["label"] for u in outs[:3]] == ["lora-r4", "dora-r4", tab_try.BASE_LM] and "greedy" in frames[-1][0]
    run = tab_try.loaded(s, root / "lm", "lora-r4")
    assert outs[0]["value"] == predict(run, [prompt], 6)[0]["continuation"]  # the same call as the CLI's predict
    texts = list(stream_continuation(run.model, run.pipeline.tokenizer, prompt, 6))
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # grows token by token
    before = threading.active_count()
    stream = stream_continuation(run.model, run.pipeline.tokenizer, prompt, 100)
    next(stream)
    stream.close()  # stopped after one token: the generating thread ends too
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
    sampled = lambda seed: _last(tab_try.predict(s, "lm", ["lora-r4"], prompt, "sampled", 1.0, 6, seed))
    first, again = sampled(3), sampled(3)
    assert first[1 + tab_try.SLOTS]["value"] == again[1 + tab_try.SLOTS]["value"]  # seeded
    assert "temperature 1 with seed 3" in first[0]
    summary, table = tab_try.disagree(s, "lm", ["lora-r4", "dora-r4"], "final evaluation")
    assert "token loss" in summary and len(table) == 4 and isinstance(table, pd.DataFrame)
