"""Recorded lessons: record a tiny lesson, read it back, detect stale ones, replay it, rebuild its layers.

One real recording (MiniLM cut to 2 layers, 6 steps, LoRA and SBoRA-FA, about 5 s on 2 cores) is
made with the function the script calls (``recordings.record``); the layer checkpoints it trained
are caught from its events, as the reference for the matrices read back.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bora_lab.record import SCHEMA_VERSION
from bora_lab.record.layer_store import LayerStore
from bora_lab.teach import lessons as L
from bora_lab.teach import recordings as R

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "minilm", "task": "fine_foods", "num_layers": 2, "max_length": 32, "batch_size": 4, "steps": 6,
        "eval_every": 3, "eval_samples": 16, "analyze_every": 2, "layer_checkpoints": 3, "seed": 0,
        "methods": ["lora", "sbora_fa"], "ranks": [4], "num_threads": 1}


def tiny_lesson(view: str = "inside", **settings) -> dict:
    return L.validate_lesson({"id": "tiny-lesson", "title": "Tiny", "summary": "s", "predict": "p", "look_for": "l",
                              "view": view, "settings": {**TINY, **settings}})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """``(lesson, path, reference LayerStore)`` of one tiny recording."""
    out = tmp_path_factory.mktemp("recordings")
    reference = LayerStore()

    def catch(ev):
        if ev.kind == "layer_checkpoint":
            reference.add(ev.run_id, ev.step, ev.deltas, ev.info, w0=ev.w0)

    lesson = tiny_lesson()
    path = R.record(lesson, out, on_event=catch)
    return lesson, path, reference


def test_recording_file_is_small_and_complete(recorded):
    lesson, path, reference = recorded
    assert path == R.recording_path("tiny-lesson", path.parent) and path.name == "tiny-lesson.json.gz"
    assert path.stat().st_size < R.MAX_BYTES
    rec = json.loads(gzip.decompress(path.read_bytes()))  # plain gzip JSON
    assert rec["recording_version"] == R.RECORDING_VERSION == 1
    assert rec["schema_version"] == SCHEMA_VERSION
    assert rec["settings_hash"] == R.settings_hash(lesson) and len(rec["settings_hash"]) == 64
    assert rec["elapsed_s"] > 0 and rec["created"]
    assert {"torch", "transformers", "machine"} <= set(rec["environment"]) and rec["environment"]["torch"]
    results = rec["results"]
    assert results["status"] == "done" and [r["run_id"] for r in results["runs"]] == ["lora-r4", "sbora_fa-r4"]
    for run in results["runs"]:
        assert len(run["history"]) == 6 and run["eval"] and run["analysis"] and run["summary"]["steps_done"] == 6
        assert run["per_example"]
    # the inside view's matrices: W0 and ΔW of the first analysed module at step 0, a middle and the last
    # checkpoint (float16, since it fits), the inspect() of every checkpoint
    for run_id, part in rec["layers"].items():
        first = reference.modules(run_id)[0]
        assert part["modules"] == [first]
        assert reference.steps(run_id) == [0, 2, 4, 6] and [c["step"] for c in part["checkpoints"]] == [0, 4, 6]
        assert [i["step"] for i in part["info"]] == reference.steps(run_id)
    assert {a["dtype"] for a in rec["arrays"].values()} == {"float16"}
    # W0 (the same in both runs) and the zero ΔW of step 0 are stored once: 2 + 2 runs x 2 steps
    assert len(rec["arrays"]) == 6
    assert rec["layers"]["sbora_fa-r4"]["info"][-1]["modules"][first]["touched"]["axis"] == "col"


def test_round_trip_layer_store_is_exact_in_float16(recorded):
    lesson, path, reference = recorded
    store = R.layer_store_from(R.load_recording(lesson, path.parent))
    assert store.run_ids() == reference.run_ids()
    for run_id in store.run_ids():
        module = store.modules(run_id)[0]
        assert store.steps(run_id) == [0, 4, 6]
        assert np.array_equal(store.w0(run_id, module), reference.w0(run_id, module))
        for step in store.steps(run_id):
            assert store.delta(run_id, step, module).dtype == np.float16
            assert np.array_equal(store.delta(run_id, step, module), reference.delta(run_id, step, module))
            assert store.info(run_id, step, module) == json.loads(json.dumps(reference.info(run_id, step, module)))
    # what the "Inside a layer" view draws works on it
    from bora_lab.figures.layer_views import layer_figures

    figs = layer_figures(store, "sbora_fa-r4", 6, store.modules("sbora_fa-r4")[0])
    assert set(figs) == {"matrices", "norms", "spectrum", "method"}


def test_int8_layer_store_within_quantisation_error(recorded):
    """int8 with one scale per tensor: every element within s/2 + 2^-11·|ΔŴ| + 2^-25 of the float16
    original, where s = max|ΔW| / 127: the int8 rounding, plus float16's rounding of the dequantised
    value (half an ulp: relative 2^-11, absolute 2^-25 among float16's subnormals, below 6.1e-5)."""
    lesson, path, reference = recorded
    rec = R.build_recording(lesson, R.read_recording(path)["results"], reference, 1.0, dtype="int8", checkpoints=3)
    assert {a["dtype"] for a in rec["arrays"].values()} == {"int8"}
    store = R.layer_store_from(json.loads(gzip.decompress(R.pack(rec))))
    for run_id in reference.run_ids():
        module = reference.modules(run_id)[0]
        pairs = [(store.w0(run_id, module), reference.w0(run_id, module))]
        pairs += [(store.delta(run_id, s, module), reference.delta(run_id, s, module)) for s in store.steps(run_id)]
        for got, want in pairs:
            got, want = got.astype(np.float64), want.astype(np.float64)
            s = np.abs(want).max() / 127
            assert np.all(np.abs(got - want) <= s / 2 + 2.0 ** -11 * np.abs(got) + 2.0 ** -25)
            assert np.all(got[want == 0] == 0)  # SBoRA's untouched columns stay exactly zero
    assert len(R.pack(rec)) < len(R.pack(R.read_recording(path)))


def test_encodings_fall_back_to_fit(recorded):
    lesson, path, reference = recorded
    results = R.read_recording(path)["results"]
    full, enc = R.pack_within(lesson, results, reference)
    assert enc == ("float16", 3)
    # the file carries its creation time, so two packings can differ by a byte or two: ask for a
    # limit halfway between the full file and the next encoding's, not one byte under the full one
    next_size = len(R.pack(R.build_recording(lesson, results, reference, None, *R.ENCODINGS[1])))
    assert next_size < len(full) - 100
    smaller, enc = R.pack_within(lesson, results, reference, max_bytes=(len(full) + next_size) // 2)
    assert enc == R.ENCODINGS[1]
    assert len(smaller) < len(full)
    with pytest.raises(R.RecordingError, match="exceeds"):
        R.pack_within(lesson, results, reference, max_bytes=1000)
    # other views keep no matrices
    data, _ = R.pack_within(tiny_lesson(view="md"), results, None)
    rec = json.loads(gzip.decompress(data))
    assert rec["layers"] == {} and rec["arrays"] == {} and len(data) < 60_000
    assert R.layer_store_from(rec).run_ids() == []


def test_stale_detection(recorded, tmp_path):
    lesson, path, _ = recorded
    rec = R.load_recording(lesson, path.parent)
    assert rec["stale"] is False and rec["stale_reasons"] == []
    changed = tiny_lesson(steps=7)  # a setting changed -> another hash -> stale
    assert R.settings_hash(changed) != R.settings_hash(lesson)
    assert R.settings_hash(tiny_lesson(**dict(reversed(TINY.items())))) == R.settings_hash(lesson)  # key order
    rec = R.load_recording(changed, path.parent)
    assert rec["stale"] is True and "settings changed" in rec["stale_reasons"][0]
    # another results schema version -> stale
    old = json.loads(gzip.decompress(path.read_bytes()))
    old["schema_version"] = SCHEMA_VERSION - 1
    (tmp_path / path.name).write_bytes(gzip.compress(json.dumps(old).encode()))
    rec = R.load_recording(lesson, tmp_path)
    assert rec["stale"] is True and "schema" in rec["stale_reasons"][0]
    # none recorded, damaged, bad id
    assert R.load_recording(tiny_lesson() | {"id": "other"}, path.parent) is None
    assert R.load_recording("lora-couples", tmp_path) is None
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    with pytest.raises(R.RecordingError, match="broken"):
        R.read_recording(tmp_path / "broken.json.gz")
    with pytest.raises(R.RecordingError, match="lesson id"):
        R.recording_path("../etc/passwd")


def test_replay_frames_grow_and_end_on_the_results(recorded):
    rec = R.read_recording(recorded[1])
    results = rec["results"]
    frames = list(R.replay_frames(rec, 4))
    assert 2 <= len(frames) <= 4
    assert frames[-1] == results and frames[-1] is not results
    assert all(f["status"] == "running" for f in frames[:-1])
    for before, after in zip(frames, frames[1:]):
        for a, b in zip(before["runs"], after["runs"]):
            for key in ("history", "eval", "analysis"):
                assert b[key][: len(a[key])] == a[key] and len(b[key]) >= len(a[key])
            assert a["summary"]["steps_done"] <= b["summary"]["steps_done"]
        assert before["progress"]["done_steps"] <= after["progress"]["done_steps"]
    first = frames[0]["runs"][0]
    t = first["history"][-1]["step"]
    assert first["status"] == "running" and t < 6 and first["summary"]["steps_done"] == t
    assert all(e["step"] <= t for e in first["eval"] + first["analysis"]) and "aggregate" not in frames[0]
    assert len(list(R.replay_frames(rec, 100))) == 6  # one frame per step at most
    assert list(R.replay_frames(rec, 1)) == [results]
    with pytest.raises(ValueError):
        next(R.replay_frames(rec, 0))


def test_script_lists_without_training(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("record_lessons", ROOT / "scripts" / "record_lessons.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"{les['id']}" in out for les in L.builtin_lessons()) and "missing" in out
    with pytest.raises(SystemExit):
        script.main(["no-such-lesson"])


@pytest.mark.parametrize("lesson", L.builtin_lessons(), ids=lambda les: les["id"])
def test_builtin_recordings_are_current(lesson):
    rec = R.load_recording(lesson["id"])
    if rec is None:
        pytest.skip(f"lesson '{lesson['id']}' has no recording yet: python scripts/record_lessons.py {lesson['id']}")
    assert not rec["stale"], f"{lesson['id']}: {'; '.join(rec['stale_reasons'])}: re-run scripts/record_lessons.py"
    assert R.recording_path(lesson["id"]).stat().st_size < R.MAX_BYTES
    assert bool(rec["layers"]) == (lesson["view"] == "inside")
