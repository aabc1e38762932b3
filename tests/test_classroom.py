"""A whole class at once: identical settings computed once, a fair visible queue, links, the Space.

The handler tests replace the trainer by a fake that counts its calls and trains until released, so
they take a second. The browser test assembles the Space (``scripts/build_space.py``), starts it the
way Hugging Face does (``python app.py`` in that folder with ``SPACE_ID``, ``GRADIO_SERVER_NAME=0.0.0.0``
and a port) and drives three visitors in headless Chromium (skipped without Chromium/Playwright).
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from served_app import free_port, serve_app

from bora_lab.config import RunConfig
from bora_lab.record.events import ComparisonDone, Progress, RunFinished, RunStarted, Step
from bora_lab.ui import form, links, reuse, space, tab_compare, training_queue, visitor

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(methods=["lora", "dora"], ranks=[4], num_layers=1, steps=6, batch_size=4, max_length=24, eval_samples=8,
            eval_every=3, analyze_every=3)
sys.path.insert(0, str(ROOT / "scripts"))
import build_space  # noqa: E402


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_LAB_RUNS", str(tmp_path / "runs"))
    for var in ("SPACE_ID", "BORA_LAB_PRIVATE_RUNS", "BORA_LAB_REUSE_RUNS", "SPACES_ZERO_GPU", "BORA_LAB_MAX_QUEUE",
                "BORA_LAB_MAX_COMPARISON_STEPS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tab_compare, "MIN_INTERVAL_S", 0.05)
    monkeypatch.setattr(tab_compare, "MAX_INTERVAL_S", 0.2)
    yield
    visitor.shutdown(5)  # no job of one test trains into the next


class Gated:
    """A fake trainer: counts its calls; each comparison steps until ``release`` is set (or Stop)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def __call__(self, cfg: RunConfig, cancel: threading.Event):
        self.calls += 1
        for rid, method, rank in cfg.run_specs():
            yield RunStarted(rid, method, rank, 10, 100, "cpu", [])
        step = 0
        while not self.release.is_set() and not cancel.is_set():
            step += 1
            for rid in cfg.run_ids():
                yield Step(rid, step, 1.0 / step, 1e-3, 0.01, 1.0)
            yield Progress(step, 10_000, 0.01 * step, 60.0)
            time.sleep(0.01)
        status = "cancelled" if cancel.is_set() else "done"
        for rid in cfg.run_ids():
            yield RunFinished(rid, status)
        yield ComparisonDone(status, 0.1)


def values(**change) -> list:
    v = form.ui_values(RunConfig(**{**TINY, **change}))
    return [v[k] for k in form.input_keys()]


def visitor_session(name: str) -> visitor.Session:
    s = visitor.Session()
    s.token = name * 32
    return s


def start(session, fake, **change):
    """Press Run in a page: the stream runs in its own thread (as Gradio's worker would); returns
    ``(thread, frames)``."""
    frames: list = []
    gen = tab_compare.run_comparison(session, *values(**change), compare_fn=fake)

    def consume():
        try:
            for frame in gen:
                frames.append(frame)
        except gr.Error as err:
            frames.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread, frames


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------------ the cache key
def test_config_key_ignores_only_what_does_not_change_the_numbers():
    base = RunConfig(**TINY)
    assert re.fullmatch(r"[0-9a-f]{32}", reuse.config_key(base))
    assert reuse.config_key(base) == reuse.config_key(RunConfig(**TINY, num_threads=1))
    assert reuse.config_key(base) == reuse.config_key(RunConfig(**{**TINY, "methods": ["lora", "dora"]}))
    for change in ({"steps": 7}, {"seed": 1}, {"methods": ["dora", "lora"]}, {"lr": 2e-3},
                   {"method_options": {"dora": {"detach_norm": False}}}):
        assert reuse.config_key(RunConfig(**{**TINY, **change})) != reuse.config_key(base), change


# ------------------------------------------------------------------------------ the queue
def test_queue_is_fifo_with_positions_and_start_estimates():
    q = training_queue.TrainingQueue()
    a, b, c = (SimpleNamespace(remaining_s=lambda s=s: s) for s in (120.0, 300.0, None))
    assert q.acquire(a)
    q.join(b)
    q.join(c)
    assert q.position(b) == (1, 2) and q.position(c) == (2, 2) and q.position(a) is None
    assert q.start_in_s(b) == 120.0 and q.start_in_s(c) == 420.0
    assert q.describe(b) == "position 1 of 2, starts in about 2 min"
    assert q.describe(c) == "position 2 of 2, starts in about 7 min"
    assert not q.acquire(c, timeout=0.05) and q.position(c) == (2, 2)  # a timeout keeps the place
    assert not q.acquire(b, cancelled=lambda: True) and q.position(c) == (1, 1)  # Stop leaves the line
    q.release(a)
    assert q.acquire(c, timeout=1) and q.waiting() == 0
    d = SimpleNamespace(remaining_s=lambda: 10.0)
    q.join(d)
    assert "start time unknown" in q.describe(d)  # c has no estimate


def test_a_claim_rerun_waits_in_the_same_queue():
    q = training_queue.TrainingQueue()
    holder = SimpleNamespace(remaining_s=lambda: 30.0)
    assert q.acquire(holder)

    def claim(x):
        yield (f"measured {x}", 1, 2, 3)

    wrapped = training_queue.queued_event(claim, 4, queue=q)
    gen = wrapped("c")
    first = next(gen)
    assert "Waiting" in first[0] and "position 1 of 1, starts in under a minute" in first[0] and first[1] == gr.skip()
    q.release(holder)
    assert list(gen)[-1] == ("measured c", 1, 2, 3) and q.waiting() == 0


# ------------------------------------------------------------------------------ a class in the handlers
def test_identical_settings_train_once_and_both_watch_live_a_third_waits_in_line():
    fake = Gated()
    alice, bob, carol = visitor_session("a"), visitor_session("b"), visitor_session("c")
    t_a, f_a = start(alice, fake)
    wait_for(lambda: alice.job is not None and alice.job.progress is not None)
    t_b, f_b = start(bob, fake)  # the same settings: watches alice's comparison
    wait_for(lambda: bob.job is alice.job and len(f_b) >= 2)
    assert bob.following and not alice.following and fake.calls == 1
    assert "watching a comparison another visitor started" in f_b[-1][0]
    assert "1 other visitor is watching it" in tab_compare.render(alice.job, (), "from_start", viewer=alice)[0]
    t_c, f_c = start(carol, fake, steps=7)  # other settings: in line behind alice's
    wait_for(lambda: len(f_c) >= 1)
    assert "Waiting** in the training queue: position 1 of 1, starts in about 1 min" in f_c[-1][0]
    with pytest.raises(gr.Error, match="already waiting in the training queue \\(position 1 of 1"):
        next(tab_compare.run_comparison(carol, *values(steps=8), compare_fn=fake))  # one per visitor
    with pytest.raises(gr.Error, match="press Stop to stop watching"):
        next(tab_compare.run_comparison(bob, *values(steps=9), compare_fn=fake))
    n = len(f_a)
    wait_for(lambda: len(f_a) > n + 2 and len(f_b) > 3)  # both pages keep receiving live frames
    fake.release.set()
    for t in (t_a, t_b, t_c):
        t.join(20)
    assert fake.calls == 2  # alice's (watched by bob) and carol's
    assert "Done" in f_a[-1][0] and "Done" in f_b[-1][0] and "Done" in f_c[-1][0]
    assert bob.run_dirs == alice.run_dirs and visitor.run_folders(bob, False) == [alice.run_dirs[0]]
    assert len([p for p in visitor.runs_dir().iterdir()]) == 2


def test_finished_settings_come_back_at_once_and_reuse_can_be_turned_off(monkeypatch):
    fake = Gated()
    fake.release.set()
    first = visitor_session("a")
    list(tab_compare.run_comparison(first, *values(), compare_fn=fake))
    later = visitor_session("d")
    t0 = time.monotonic()
    frames = list(tab_compare.run_comparison(later, *values(num_threads=1), compare_fn=fake))
    assert time.monotonic() - t0 < 5 and fake.calls == 1 and len(frames) == 1
    status, progress, loss, *_, table = frames[0]
    assert "computed earlier with exactly these settings" in status and first.run_dirs[0].name in status
    assert list(table["run"]) == RunConfig(**TINY).run_ids() and "finished" in progress
    assert later.job.reused and later.run_dirs == first.run_dirs
    monkeypatch.setenv("BORA_LAB_REUSE_RUNS", "0")
    list(tab_compare.run_comparison(visitor_session("e"), *values(), compare_fn=fake))
    assert fake.calls == 2


def test_stop_rule_the_starter_stops_it_a_follower_only_stops_watching():
    fake = Gated()
    alice, bob = visitor_session("a"), visitor_session("b")
    t_a, f_a = start(alice, fake)
    wait_for(lambda: alice.job is not None and alice.job.progress is not None)
    t_b, f_b = start(bob, fake)
    wait_for(lambda: bob.job is alice.job)
    job = alice.job
    status = tab_compare.stop_comparison(bob)[0]
    assert "Stopped watching" in status and job.running and not job.cancel.is_set()
    assert bob.job is None and visitor.job_of(bob.token) is None
    t_b.join(30)  # generous: on a loaded 2-core machine the stream notices within its next refresh
    assert not t_b.is_alive()  # bob's stream ended; alice's goes on
    next(tab_compare.run_comparison(bob, *values(steps=7), compare_fn=fake))  # bob may run his own now
    assert "Stopped" in tab_compare.stop_comparison(bob)[0]
    t_c, f_c = start(visitor_session("c"), fake)  # a new follower of alice's comparison
    wait_for(lambda: len(f_c) >= 1)
    out = tab_compare.stop_comparison(alice)  # the starter's Stop stops it, for everyone watching
    t_a.join(30)
    t_c.join(30)
    assert "Stopped" in out[0] and not job.running
    assert "Stopped** by the visitor who started it" in f_c[-1][0]


def test_shared_queue_limits(monkeypatch):
    monkeypatch.setenv("BORA_LAB_MAX_COMPARISON_STEPS", "10")
    with pytest.raises(gr.Error, match=r"12 steps \(2 runs × 6\); this server takes at most 10 per comparison"):
        next(tab_compare.run_comparison(visitor_session("a"), *values(), compare_fn=Gated()))
    monkeypatch.delenv("BORA_LAB_MAX_COMPARISON_STEPS")
    monkeypatch.setenv("BORA_LAB_MAX_QUEUE", "1")
    fake = Gated()
    start(visitor_session("a"), fake)
    wait_for(lambda: training_queue.QUEUE.waiting() == 0 and fake.calls == 1)
    start(visitor_session("b"), fake, steps=7)
    wait_for(lambda: training_queue.QUEUE.waiting() == 1)
    with pytest.raises(gr.Error, match="The training queue is full"):
        next(tab_compare.run_comparison(visitor_session("c"), *values(steps=8), compare_fn=fake))
    fake.release.set()


# ------------------------------------------------------------------------------ links
def test_links_hold_only_changes_and_read_back_through_the_form():
    v = dict(zip(form.input_keys(), values()))
    query = links.query_for(v)
    assert query.startswith("?") and "methods=lora,dora" in query and "num_layers=1" in query and "lr=" not in query
    params = dict(p.split("=", 1) for p in query[1:].split("&"))
    back, warnings = links.values_from_query(params)
    assert warnings == [] and form.config_from_ui(**back) == RunConfig(**TINY)
    back, _ = links.values_from_query({"methods": "lora,dora", "ranks": "8", "steps": "150", "lr": "0.001",
                                       "dora.detach_norm": "0", "lesson": "x", "present": "1", "__theme": "dark"})
    cfg = form.config_from_ui(**back)
    assert cfg.methods == ["lora", "dora"] and cfg.method_options == {"dora": {"detach_norm": False}}
    assert links.values_from_query({}) == (None, [])


@pytest.mark.parametrize("params, message", [
    ({"steps": "abc"}, "not applied: Steps must be a number, got 'abc'"),
    ({"methods": "lora,nope"}, "not applied: Unknown method 'nope'"),
    ({"steps": "-3"}, "not applied: Steps must be >= 1"),
    ({"dora.detach_norm": "maybe"}, "dora.detach_norm must be 1 or 0"),
])
def test_a_malformed_link_gives_one_clear_warning_and_fills_nothing(params, message):
    got, warnings = links.values_from_query(params)
    assert got is None and len(warnings) == 1 and message in warnings[0]


def test_unknown_link_parameters_are_ignored_with_a_note_and_lessons_are_the_base():
    got, warnings = links.values_from_query({"steps": "40", "utm_source": "slides"})
    assert got["steps"] == 40 and "'utm_source' is not a setting" in warnings[0]
    from bora_lab.teach import lessons as L

    lesson_cfg = L.lesson_config(L.get_lesson("lora-couples"), RunConfig())
    keys, same = form.input_keys(), form.ui_values(lesson_cfg)
    update = links.copy_link("lora-couples", keys, *[same[k] for k in keys])
    assert update["value"] == "?lesson=lora-couples" and update["visible"]
    changed = {**same, "steps": 40}
    assert links.copy_link("lora-couples", keys, *[changed[k] for k in keys])["value"] == "?lesson=lora-couples&steps=40"
    assert links.wants_present({"present": "1"}) and links.wants_present({"present": ""})
    assert not links.wants_present({"present": "0"}) and not links.wants_present({})


# ------------------------------------------------------------------------------ the Space
def test_runs_folder_on_a_space_is_persistent_storage_or_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("BORA_LAB_RUNS")
    assert space.runs_root() == (Path("runs"), "local")
    monkeypatch.setenv("SPACE_ID", "org/bora-lab")
    monkeypatch.setattr(space, "PERSISTENT", tmp_path / "data")
    folder, kind = space.runs_root()
    assert kind == "temporary" and folder.is_dir() and "vanish when the Space restarts" in space.storage_note()
    (tmp_path / "data").mkdir()
    assert space.runs_root() == (tmp_path / "data" / "runs", "persistent")
    assert space.storage_note().startswith("Runs are kept in persistent storage /data")
    assert visitor.runs_dir() == tmp_path / "data" / "runs"


def test_zero_gpu_wraps_the_real_trainer_in_spaces_gpu_and_passes_stop_on(monkeypatch):
    def fake_compare(cfg, cancel):
        yield "x"

    assert space.on_device(fake_compare, visitor.default_compare) is fake_compare
    assert space.on_device(visitor.default_compare, visitor.default_compare) is visitor.default_compare
    seen = {}

    def gpu(duration):
        def decorate(fn):
            def run(cfg, stop_file):  # what ZeroGPU's fork sees: plain arguments, no threading.Event
                seen["duration"] = duration(cfg, stop_file)
                while not os.path.exists(stop_file):
                    yield "step"
                    time.sleep(0.05)
                yield "stopped"
            return run
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", SimpleNamespace(GPU=gpu))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    space._gpu_trainer.cache_clear()
    try:
        cancel = threading.Event()
        gen = space.on_device(visitor.default_compare, visitor.default_compare)(RunConfig(**TINY), cancel)
        assert next(gen) == "step"
        cancel.set()
        assert list(gen)[-1] == "stopped"
        assert 60 <= seen["duration"] <= 600
    finally:
        space._gpu_trainer.cache_clear()


def test_space_front_matter_matches_the_lock_and_the_build_has_only_the_app(tmp_path):
    assert build_space.check() == []
    meta = build_space.front_matter((ROOT / "README.md").read_text())
    assert meta["sdk_version"] == gr.__version__ and meta["python_version"] == "3.11"
    out = build_space.build(tmp_path / "space")
    names = {p.name for p in out.iterdir()}
    assert names == {"app.py", "bora_lab", "requirements.txt", "README.md", ".gitattributes"}
    assert (out / "bora_lab" / "data" / "fine_foods_train.parquet").is_file()
    assert not list(out.rglob("__pycache__")) and not list(out.rglob("test_*.py"))
    with pytest.raises(ValueError, match="not empty"):
        build_space.build(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "README.md").write_text("---\nsdk: gradio\nsdk_version: 1.0\napp_file: app.py\n---\n")
    (bad / "requirements.txt").write_text("gradio==6.31.0\npytest==9.0\n")
    problems = build_space.check(bad)
    assert any("sdk_version" in p for p in problems) and any("test tools: pytest" in p for p in problems)


# ------------------------------------------------------------------------------ a class in the browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
LESSON = "lora-couples"  # lora and dora, MiniLM cut to 2 layers; the link below makes it tiny
SHRINK = "steps=100&eval_every=50&eval_samples=16&batch_size=4&max_length=24"  # about 10 s of training


@pytest.fixture(scope="module")
def space_app(tmp_path_factory):
    """The assembled Space, started as Hugging Face starts it."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    tmp = tmp_path_factory.mktemp("space")
    folder = build_space.build(tmp / "space")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORA_LAB_", "PYTHONPATH"))}
    env.update({"SPACE_ID": "teacher/bora-lab", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port),
                "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                "TMPDIR": str(tmp)})  # the Space has no /data: runs go to a temporary folder, here under tmp
    with serve_app(folder, env, tmp / "app.log", port, what="the Space") as url:
        yield url, tmp


def _status(page) -> str:
    return page.inner_text("#bl-status")


def _wait_text(page, selector: str, pattern: str, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = page.inner_text(selector)
        if re.search(pattern, text):
            return text
        if "Failed" in text:
            pytest.fail(f"the comparison failed: {text}")
        time.sleep(0.2)
    pytest.fail(f"{selector} never matched {pattern!r}; last: {text!r}")


@pytest.mark.browser
def test_a_class_two_visitors_share_one_training_a_third_sees_the_queue(space_app):
    from playwright.sync_api import sync_playwright

    url, tmp = space_app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pages = []
        for _ in range(3):  # three visitors: separate browser contexts, so separate tokens
            page = browser.new_context(viewport={"width": 1500, "height": 1000}).new_page()
            page.set_default_timeout(60_000)
            pages.append(page)
        alice, bob, carol = pages
        for page in (alice, bob):  # both open the same lesson from the teacher's link
            page.goto(f"{url}?lesson={LESSON}&{SHRINK}")
        carol.goto(f"{url}?lesson={LESSON}&{SHRINK}&steps=20")  # a different (shorter) setup
        for page, steps in zip(pages, ("100", "100", "20")):
            page.wait_for_function(f"() => document.querySelector('#bl-field-steps input')?.value === '{steps}'")
        assert "temporary folder and vanish when the Space restarts" in alice.inner_text("#bl-footer")
        assert alice.locator("#bl-methods input:checked").count() == 2  # lora and dora, from the lesson

        alice.click("#bl-run")
        _wait_text(alice, "#bl-status", r"Loading|Training")
        bob.click("#bl-run")
        _wait_text(bob, "#bl-status", r"watching a comparison another visitor started")
        carol.click("#bl-run")
        _wait_text(carol, "#bl-status", r"Waiting\*?\*? in the training queue: position 1 of 1, starts in")
        for page in (alice, bob):  # both see it live: the loss plot gains both runs while it trains
            page.wait_for_function("() => document.querySelectorAll('#bl-loss .legendtext').length >= 2 && "
                                   "/Training/.test(document.querySelector('#bl-status').innerText)", timeout=240_000)
        assert "1 other visitor is watching it" in _status(alice)
        _wait_text(alice, "#bl-status", r"Done")
        _wait_text(bob, "#bl-status", r"Done")
        _wait_text(carol, "#bl-status", r"Done", timeout_s=300)
        rows = [r.inner_text() for r in bob.locator("#bl-table .virtual-row").all()]
        assert len(rows) == 2 and all("done" in r for r in rows)

        runs = [json.loads(f.read_text()) for f in tmp.glob("bora_lab_runs_*/*/results.json")]
        assert sorted(r["config"]["steps"] for r in runs) == [20, 100]  # one training per distinct setup

        # Copy link: the settings of the open lesson, as a link (the box shows it)
        alice.click("#bl-copy-link")
        link = alice.locator("#bl-link textarea, #bl-link input").first
        alice.wait_for_function("() => /lesson=lora-couples/.test(document.querySelector('#bl-link textarea, "
                                "#bl-link input')?.value || '')")
        assert "steps=100" in link.input_value() and link.input_value().startswith("http")

        # presenter mode: the settings fold away, Run stays; a malformed link warns and fills nothing
        alice.goto(f"{url}?lesson={LESSON}&{SHRINK}&present=1")
        alice.wait_for_selector(".bl-present")
        assert not alice.locator("#bl-field-steps").is_visible() and alice.locator("#bl-run").is_visible()
        alice.wait_for_function("() => /Done/.test(document.querySelector('#bl-status').innerText)")  # reattached
        bob.goto(f"{url}?steps=abc")
        bob.get_by_text("This link's settings were not applied: Steps must be a number").first.wait_for()
        browser.close()
