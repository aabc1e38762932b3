"""The Lessons tab shows a lesson's recording at once and replays it as if live (tiny recording)."""
from __future__ import annotations

import pytest

from bora_lab.teach import lessons as L
from bora_lab.teach import recordings as R
from bora_lab.ui import lesson_replay

TINY = {"model": "minilm", "task": "fine_foods", "num_layers": 2, "max_length": 32, "batch_size": 4, "steps": 6,
        "eval_every": 3, "eval_samples": 16, "analyze_every": 2, "layer_checkpoints": 3, "seed": 0,
        "methods": ["lora", "sbora_fa"], "ranks": [4], "num_threads": 1}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    lesson = L.validate_lesson({"id": "tiny-replay", "title": "Tiny", "summary": "s", "predict": "p",
                                "look_for": "l", "view": "inside", "settings": TINY})
    R.record(lesson, folder)
    return lesson, folder


def test_recorded_result_shows_at_once_and_replays(recorded, monkeypatch):
    lesson, folder = recorded
    monkeypatch.setattr(R, "RECORDING_DIR", folder)
    status, loss, metric, view, table = lesson_replay.show(lesson)
    assert "Recorded result" in status and len(table) == 2  # one row per run
    assert view.layout.title.text  # the lesson's view: a layer figure of the featured run (SBoRA here)
    assert "threads" in status and "⚠️" not in status  # made from these very settings: current
    monkeypatch.setattr(lesson_replay, "MAX_REPLAY_S", 0.0)
    frames = list(lesson_replay.replay(lesson, "30×"))
    assert len(frames) >= 3 and "Replaying" in frames[0][0] and frames[-1][0] == status
    steps = [max((len(r.x or []) for r in f[1].data), default=0) for f in frames[:-1]]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # the loss curve grows frame by frame


def test_no_recording_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "RECORDING_DIR", tmp_path)
    lesson = L.get_lesson("lora-couples")
    assert "no recording yet" in lesson_replay.show(lesson)[0]
    assert lesson_replay.show(None)[0] == lesson_replay.NO_LESSON
    assert len(list(lesson_replay.replay(lesson, "10×"))) == 1


@pytest.mark.parametrize("lesson", L.builtin_lessons(), ids=lambda les: les["id"])
def test_builtin_lessons_learn(lesson):
    """No built-in lesson leaves every run at the majority class (checked on its recording)."""
    from bora_lab.record.tables import at_majority

    rec = R.load_recording(lesson)
    if rec is None:
        pytest.skip(f"no recording of {lesson['id']}: python scripts/record_lessons.py {lesson['id']}")
    results = rec["results"]
    task = results.get("task") or {}
    finals = [r["summary"].get("eval_metric") for r in results["runs"]]
    assert all(r["status"] == "done" for r in results["runs"])
    if task.get("majority_baseline") is not None:
        assert not all(at_majority(m, task) for m in finals), f"{lesson['id']}: every run at the majority class"


def test_lessons_in_chinese():
    """Every built-in lesson's texts come in Simplified and Traditional Chinese, chosen from the browser's
    language (or ?lang=); method names stay as they are."""
    from bora_lab.ui.tab_lessons import lesson_markdown

    assert L.locale_of("zh-CN,zh;q=0.9,en;q=0.8") == "zh-CN" and L.locale_of("zh-HK,zh;q=0.9") == "zh-TW"
    assert L.locale_of("en-US,zh;q=0.5") is None and L.locale_of(None) is None and L.locale_of("", "zh-TW") == "zh-TW"
    for lesson in L.builtin_lessons():
        for locale in L.LOCALES:
            texts = lesson["translations"][locale]
            assert {"title", "summary", "predict", "look_for"} <= set(texts), (lesson["id"], locale)
            md = lesson_markdown(lesson, locale)
            assert texts["title"] in md and lesson["title"] not in md
        names = [m for m in ("LoRA", "DoRA", "BoRA") if m in lesson["summary"]]
        assert all(m in lesson["translations"]["zh-CN"]["summary"] for m in names), lesson["id"]
    with pytest.raises(L.LessonError, match="translations.fr"):
        L.validate_lesson({**L.get_lesson("rank-sweep"), "translations": {"fr": {"title": "x"}}})
    with pytest.raises(L.LessonError, match="translations.zh-CN.colour"):
        L.validate_lesson({**L.get_lesson("rank-sweep"), "translations": {"zh-CN": {"colour": "x"}}})
