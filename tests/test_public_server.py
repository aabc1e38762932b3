"""A public Space survives its visitors: the probes of an adversarial visitor, replayed.

Each numbered group replays one probe (the UI's handlers with the values a visitor or an API client
can send, the CLI, and a running server through ``gradio_client`` and plain HTTP) and checks that it
is answered with a message naming the field, leaves the server responsive and loses nothing computed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gradio as gr
import pytest

from bora_lab.config import RunConfig
from bora_lab.record import load_results
from bora_lab.teach import lessons as L
from bora_lab.ui import form, tab_compare, tab_history, tab_memory, visitor

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(methods=["lora", "bora"], ranks=[4], num_layers=1, steps=6, batch_size=4, max_length=24,
            eval_samples=8, eval_every=3, analyze_every=3, num_threads=1)


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_LAB_RUNS", str(tmp_path / "runs"))
    for var in ("SPACE_ID", "BORA_LAB_PRIVATE_RUNS", "BORA_LAB_ALLOW_LOCAL_PATHS", "BORA_LAB_SHARED_HISTORY"):
        monkeypatch.delenv(var, raising=False)


def ui(**change):
    """``config_from_ui`` with the form's defaults and ``change``: what a click or an API call sends."""
    return form.config_from_ui(**{**form.ui_values(RunConfig(**TINY)), **change})


def drain(gen):
    return list(gen)


# 1. a range of layers that would expand into a billion-item list ------------------------------
@pytest.mark.parametrize("value", ["0-999999999", "0-9999999", "3, 99999999999999999999"])
def test_1_huge_layer_range_is_refused_before_expanding(value):
    with pytest.raises(ValueError, match=r"Analysis layers: .* goes past 1,000"):
        ui(analysis_layers=value)


# 2. the memory calculator with absurd sizes ---------------------------------------------------
def test_2_memory_estimate_with_huge_sizes_answers_at_once():
    args = dict(source="typed sizes", model_id="", num_layers=0, name="x", params=1e15, layers=100000, hidden=4096,
                vocab=32000, heads=32, kv_heads=8, method="lora", rank=8, precision="bf16", optimizer="adamw",
                batch=1, seq=128, checkpointing=False, flash=False, trainable=0, adapter_prec="auto",
                grad_prec="auto", compute_prec="auto", quantize_all=False, measured=0, measured_kind="")
    fig, rows, note = tab_memory.estimate(*args.values())
    assert fig is None and "Cannot estimate" in note and "must be <=" in note
    fig, rows, note = tab_memory.estimate(*{**args, "params": 7e9, "layers": 32, "batch": 10**9}.values())
    assert fig is None and "Batch size must be between 0 and 65,536" in note


# 3. a server folder as task or model ---------------------------------------------------------
@pytest.mark.parametrize("field, value", [("task", "/etc"), ("task", "../secrets"), ("model", "/etc"),
                                          ("model", "~/.cache"), ("task", "C:\\data")])
def test_3_server_paths_are_not_accepted(field, value):
    with pytest.raises(ValueError, match="paths on the server are not accepted"):
        ui(**{field: value})


def test_3_a_folder_that_exists_is_refused_without_saying_so(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "reviews"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("text,label\nsk-SECRET-5678,x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        ui(task="data/reviews")
    assert "SECRET" not in str(err.value) and "train.csv" not in str(err.value)
    monkeypatch.setenv("BORA_LAB_ALLOW_LOCAL_PATHS", "1")  # an operator on their own machine
    assert ui(task="data/reviews").task == "data/reviews"


def test_3_hub_ids_are_still_accepted():
    assert ui(model="sentence-transformers/all-MiniLM-L6-v2", task="glue/sst2").task == "glue/sst2"


# 4. privacy on a Space -----------------------------------------------------------------------
def _fake_compare(cfg, cancel):
    from bora_lab.record.events import ComparisonDone, RunFinished, RunStarted, Step

    for rid, method, rank in cfg.run_specs():
        yield RunStarted(rid, method, rank, 10, 100, "cpu", [])
        yield Step(rid, 1, 0.5, 1e-3, 0.01, 1.0)
        yield RunFinished(rid, "done")
    yield ComparisonDone("done", 0.01)


def _visitor_run(token: str, **change) -> visitor.Session:
    session = visitor.Session()
    session.token = token
    values = form.ui_values(RunConfig(**{**TINY, **change}))
    drain(tab_compare.run_comparison(session, *[values[k] for k in form.input_keys()], compare_fn=_fake_compare))
    return session


def test_4_on_a_space_visitors_see_only_their_own_runs(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "org/bora-lab")
    alice, bob = _visitor_run("a" * 32), _visitor_run("b" * 32, seed=1)  # other settings: private to each
    assert not visitor.shared_history_default()
    mine = visitor.run_folders(alice, show_all=True)  # asking for everything does not widen it
    assert [f.name for f in mine] == [alice.run_dirs[0].name]
    with pytest.raises(gr.Error, match="not in your list"):
        tab_history.open_runs(alice, True, [bob.run_dirs[0].name], "from the start (t vs 0)")
    # a reloaded page (new Session, same browser token) still owns the run, even after a restart
    again = visitor.Session()
    again.token = "a" * 32
    assert [f.name for f in visitor.run_folders(again, False)] == [alice.run_dirs[0].name]
    assert (alice.run_dirs[0] / visitor.OWNER_FILE).read_text() != "a" * 32  # a hash, not the token


def test_4_identical_settings_are_shared_and_nothing_else(monkeypatch):
    """A visitor asking for settings another visitor finished gets that run (computed once); it joins
    their list as a reference; the first visitor's other runs stay hidden from them."""
    monkeypatch.setenv("SPACE_ID", "org/bora-lab")
    alice = _visitor_run("a" * 32)
    _visitor_run("a" * 32, seed=1)
    carol = _visitor_run("c" * 32)  # the same settings as alice's first run
    assert carol.job.reused and carol.run_dirs == [alice.run_dirs[0]]
    assert [f.name for f in visitor.run_folders(carol, True)] == [alice.run_dirs[0].name]
    assert len(list(visitor.runs_dir().iterdir())) == 2  # nothing copied, nothing trained again
    again = visitor.Session()
    again.token = "c" * 32  # after a reload or a restart, the shared run is still in carol's list
    assert [f.name for f in visitor.run_folders(again, False)] == [alice.run_dirs[0].name]
    assert "c" * 32 not in (alice.run_dirs[0] / visitor.SHARED_FILE).read_text()  # hashes, not tokens


def test_4_downloads_are_temporary_copies_and_status_names_no_server_path(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "org/bora-lab")
    alice = _visitor_run("a" * 32)
    status = tab_compare.render(alice.job, (), "from_start")[0]
    assert alice.run_dirs[0].name in status and str(visitor.runs_dir()) not in status
    out = tab_history.open_runs(alice, False, [alice.run_dirs[0].name], "from the start (t vs 0)")
    files = [Path(p) for p in out[-1]]
    assert files and all(p.parent == alice.bundle_dir for p in files)
    assert not any(str(p).startswith(str(visitor.runs_dir().resolve())) for p in files)
    first = alice.bundle_dir
    tab_history.open_runs(alice, False, [alice.run_dirs[0].name], "from the start (t vs 0)")
    assert not first.exists() and alice.bundle_dir.exists()  # one bundle per visitor at a time
    alice.close()
    assert alice.bundle_dir is None


# 5. uploads ---------------------------------------------------------------------------------
def test_5_uploads_are_capped_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("BORA_LAB_MAX_UPLOAD_MB", "1")
    big = tmp_path / "results.json"
    big.write_text(json.dumps({"runs": [{} for _ in range(400_000)]}))  # ~1.2 MB of {}
    with pytest.raises(gr.Error, match="at most 1 MB"):
        tab_history.open_upload(visitor.Session(), str(big), "from the start (t vs 0)")
    assert not big.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": [{"run_id": 3, "history": "nope"}]}))
    with pytest.raises(gr.Error):
        tab_history.open_upload(visitor.Session(), str(bad), "from the start (t vs 0)")
    assert not bad.exists()


# 6. no upper bounds ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"steps": 10**9}, "Steps must be <= 100,000"),
    ({"steps": 10**6}, "Steps must be <= 100,000"),
    ({"num_threads": 64}, "CPU threads must be <= "),
    ({"layer_checkpoints": 10**6}, "Layer checkpoints must be <= 64"),
    ({"steps": 50_000, "analyze_every": 1}, "Analyse every 1 with 50,000 steps"),
    ({"batch_size": 10**5}, "Batch size must be <= 1,024"),
    ({"max_length": 100_000}, "Max tokens must be <= 8,192"),
])
def test_6_bounds_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ui(**change)


def test_6_a_space_has_tighter_bounds(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "org/bora-lab")
    with pytest.raises(ValueError, match="Steps must be <= 2,000"):
        ui(steps=5000, analyze_every=50)
    monkeypatch.setenv("BORA_LAB_MAX_STEPS", "6000")  # the operator's choice wins
    assert ui(steps=5000, analyze_every=50).steps == 5000
    with pytest.raises(ValueError, match="at most 500: analyse every 10 steps or more"):
        ui(steps=5000, analyze_every=3)


@pytest.mark.parametrize("settings, message", [
    ({"steps": 10**9}, "steps must be <= 100,000"),
    ({"ranks": [10**18]}, "ranks must be <= 4,096"),
    ({"steps": int("9" * 4000)}, "steps must be <= 100,000, got a 4,000-digit number"),
])
def test_6_lesson_files_meet_the_same_bounds(settings, message):
    lesson = {"schema_version": 1, "id": "big", "title": "T", "summary": "s", "predict": "p", "look_for": "l",
              "view": "loss", "settings": settings, "observed": ""}
    with pytest.raises(L.LessonError, match=message):
        L.parse_lesson(json.dumps(lesson))


def test_6_the_cli_refuses_a_billion_steps_at_once():
    out = subprocess.run([sys.executable, "-m", "bora_lab", "compare", "--steps", str(10**9)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and out.stderr.strip() == "error: steps must be <= 100,000, got 1,000,000,000"


# 7. SIGTERM and crashes -----------------------------------------------------------------------
def test_7_a_running_job_is_checkpointed_and_history_calls_a_dead_one_interrupted(monkeypatch):
    monkeypatch.setattr(visitor, "CHECKPOINT_S", 0.0)
    cfg = RunConfig(task="synthetic_col", methods=["lora"], ranks=[2], steps=2000, batch_size=8, eval_every=500,
                    analyze_every=500)
    job = visitor.Job(cfg, visitor.new_run_dir(cfg)).start()
    try:
        deadline = time.monotonic() + 60
        while not (job.out_dir / "results.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        on_disk = load_results(job.out_dir)
        assert on_disk["status"] == "running"
        assert tab_history.describe(job.out_dir)["state"] == "running"  # this process still writes it
    finally:
        visitor.shutdown()  # what SIGTERM does in the app
    saved = load_results(job.out_dir)
    assert saved["status"] == "interrupted" and 0 < len(saved["runs"][0]["history"]) < 2000
    # a folder left "running" by a process that died is shown as interrupted
    crashed = visitor.runs_dir() / "20260101-000000-crashed"
    crashed.mkdir()
    (crashed / "results.json").write_text(json.dumps({**on_disk, "status": "running"}))
    assert tab_history.describe(crashed)["state"] == "interrupted"


def _cli_run(tmp_path, *extra):
    args = ["--task", "synthetic_col", "--methods", "lora,bora", "--ranks", "2", "--steps", "100000",
            "--analyze-every", "1000", "--eval-every", "50000", "--no-html", "--out", str(tmp_path / "cli"), *extra]
    proc = subprocess.Popen([sys.executable, "-m", "bora_lab", "compare", *args], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = threading.Event()

    def watch():
        for line in proc.stderr:
            if b" steps (" in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(90), "no progress within 90 s"
    time.sleep(0.5)  # every run past its first step (lockstep), as test_cli's Ctrl-C test
    return proc


@pytest.mark.parametrize("signals, status", [((signal.SIGTERM,), "cancelled"),
                                             ((signal.SIGINT, signal.SIGTERM), "interrupted")])
def test_7_cli_saves_on_sigterm_and_on_a_second_signal(tmp_path, signals, status):
    proc = _cli_run(tmp_path)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    results = load_results(tmp_path / "cli")
    assert results["status"] == status and all(len(r["history"]) > 0 for r in results["runs"])


# 8. a reloaded page finds its run; a second Run click is answered ------------------------------
def test_8_reload_reattaches_and_a_second_run_is_refused_with_a_message():
    slow = threading.Event()

    def compare(cfg, cancel):
        from bora_lab.record.events import Progress

        yield from list(_fake_compare(cfg, cancel))[:-1]
        while not cancel.is_set() and not slow.is_set():
            yield Progress(1, 2, 0.1, 0.1)
            time.sleep(0.05)
        from bora_lab.record.events import ComparisonDone

        yield ComparisonDone("done", 0.2)

    first = visitor.Session()
    first.token = "t" * 32
    values = [form.ui_values(RunConfig(**TINY))[k] for k in form.input_keys()]
    gen = tab_compare.run_comparison(first, *values, compare_fn=compare)
    next(gen)
    gen.close()  # the page was reloaded: its stream ends, the job goes on
    assert first.job.running and not first.job.cancel.is_set()
    with pytest.raises(gr.Error, match="already running"):
        next(tab_compare.run_comparison(first, *values, compare_fn=compare))
    reloaded = visitor.Session()
    frames = tab_compare.attach(reloaded, "t" * 32)
    token, *outputs = next(frames)
    assert token == "t" * 32 and reloaded.job is first.job and len(outputs) == len(tab_compare.OUTPUTS)
    slow.set()
    rest = list(frames)
    assert "Done" in rest[-1][1]
    stranger = visitor.Session()
    token, *outputs = next(tab_compare.attach(stranger, "../../etc"))  # a forged token is replaced
    assert token != "../../etc" and stranger.job is None


# 9. divergence short of NaN; alpha NaN -----------------------------------------------------------
def test_9_alpha_nan_is_named_as_alpha():
    with pytest.raises(ValueError, match=r"Alpha \(lora scaling\) must be a finite number"):
        ui(alpha=float("nan"))
    out = subprocess.run([sys.executable, "-m", "bora_lab", "compare", "--alpha", "nan"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "alpha must be a finite number" in out.stderr


# 10. malformed files, huge numbers, field names ----------------------------------------------------
def test_10_a_wrong_typed_results_file_does_not_break_history():
    root = visitor.runs_dir()
    for name, text in [("20260101-000000-bad", json.dumps({"config": [1, 2], "runs": 7, "status": {}})),
                       ("20260101-000001-good", json.dumps({"config": {"model": "m", "task": "t", "steps": 3},
                                                            "runs": [{"run_id": "lora-r8"}], "status": "done"}))]:
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(text)
    frame, choices = tab_history.list_runs(visitor.Session(), show_all=True)
    states = dict(zip(frame["run folder"], frame["state"]))
    assert states["20260101-000001-good"] == "done" and states["20260101-000000-bad"].startswith("unreadable")


def test_10_text_column_on_a_built_in_task_is_refused():
    with pytest.raises(ValueError, match="datasets id only"):
        ui(task="fine_foods", text_column="review")


def test_10_max_length_beyond_the_model_is_refused_before_training():
    from bora_lab.engine.trainer import compare

    with pytest.raises(ValueError, match="max_length 600 is more than the 512 positions"):
        next(compare(RunConfig(**{**TINY, "max_length": 600})))


def test_10_number_widgets_leave_bounds_to_the_message_that_names_the_field():
    demo = __import__("bora_lab.ui.app", fromlist=["build_demo"]).build_demo(RunConfig(**TINY))
    numbers = [c for c in demo.blocks.values() if isinstance(c, gr.Number) and (c.elem_id or "").startswith("bl-field")]
    assert numbers and all(c.minimum is None and c.maximum is None for c in numbers)
    with pytest.raises(ValueError, match="Steps must be >= 1, got -1"):
        ui(steps=-1)


# 12. the running server: no public API, no files of the runs folder, responsive -----------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = textwrap.dedent("""
    import os, sys
    from bora_lab.config import RunConfig
    from bora_lab.ui import visitor
    from bora_lab.ui.app import build_demo, launch
    visitor.CHECKPOINT_S = 0.5
    demo = build_demo(RunConfig(num_layers=1, steps=6, batch_size=4, max_length=24, eval_samples=8))
    cfg = RunConfig(task="fine_foods", methods=["lora"], ranks=[2], num_layers=1, steps=2000, batch_size=4,
                    max_length=24, eval_samples=8, eval_every=1000, analyze_every=500, num_threads=1)
    job = visitor.Job(cfg, visitor.new_run_dir(cfg, owner=visitor.owner_id("x" * 32)), token="x" * 32).start()
    print("JOB", job.out_dir, flush=True)
    launch(demo, server_name="127.0.0.1", server_port=int(sys.argv[1]))
""")


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPACE_ID": "org/bora-lab", "BORA_LAB_RUNS": str(tmp_path / "runs"),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job_dir = None
    deadline = time.monotonic() + 120
    import httpx

    while time.monotonic() < deadline:
        if job_dir is None:
            line = proc.stdout.readline()
            if line.startswith("JOB "):
                job_dir = Path(line.split(" ", 1)[1].strip())
            continue
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the app did not start within 120 s")
    yield f"http://127.0.0.1:{port}", proc, job_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_12_and_7_running_server_has_no_public_api_serves_no_run_files_and_saves_on_sigterm(server):
    import httpx
    from gradio_client import Client

    url, proc, job_dir = server
    client = Client(url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    assert not api["named_endpoints"] and not api["unnamed_endpoints"]  # UI events are not public API
    with pytest.raises(Exception):
        client.predict(api_name="/run_comparison")
    deadline = time.monotonic() + 60
    while not (job_dir / "results.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    for path in (job_dir / "results.json", job_dir.parent):
        r = httpx.get(f"{url}/gradio_api/file={path}", timeout=10)
        assert r.status_code != 200, path  # the runs folder is never served as files
    assert httpx.get(f"{url}/config", timeout=10).status_code == 200  # a second client is still served
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    saved = load_results(job_dir)
    assert saved["status"] == "interrupted" and len(saved["runs"][0]["history"]) > 0
