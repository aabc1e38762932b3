"""``python -m bora_lab``: bad input gives one line and a non-zero exit; a tiny run writes its folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bora_lab.cli import build_parser, config_from_args, format_table, parse_method_options

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ["--task", "synthetic_col", "--methods", "lora,bora", "--ranks", "2", "--steps", "6", "--eval-every", "3",
         "--analyze-every", "3", "--quiet"]


def cli(*args: str, timeout: float = 120, text: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BORA_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("BORA_LAB_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bora_lab", *args], capture_output=True, text=text, cwd=ROOT,
                          env=env, timeout=timeout)


def _one_error_line(stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, needle", [
    (["compare", "--methods", "nope"], "unknown method 'nope'"),
    (["compare", "--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["compare", "--model", "no-such-org/no-such-model", "--num-layers", "1"], "no-such-org/no-such-model"),
])
def test_bad_input_one_line(args, needle):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    _one_error_line(out.stderr, needle)


@pytest.mark.parametrize("args, needle", [
    (["compare", "--ranks", "x"], "comma-separated integers"),
    (["compare", "--steps", "0"], "steps must be >= 1"),
    (["compare", "--method-option", "dora.bogus=1"], "no option(s) bogus"),
    (["compare", "--method-option", "nodot"], "METHOD.OPTION=VALUE"),
    (["compare", "--bogus-flag"], "unrecognized arguments"),
    (["compare", "--task", "glue/nope"], "unknown GLUE task"),
])
def test_bad_input_one_line_in_process(args, needle, capsys):
    from bora_lab.cli import main

    try:
        code = main(args)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    assert code == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_rank_too_large_fails_that_run(tmp_path):
    out = cli("compare", "--task", "synthetic_col", "--methods", "lora", "--ranks", "2,500", "--steps", "3",
              "--quiet", "--no-html", "--out", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: lora-r500: rank 500 is invalid for a layer of shape [out=48, in=64]: choose 1 <= rank <= 48"]
    assert "lora-r2" in out.stdout and json.loads((tmp_path / "results.json").read_text())["status"] == "done"


def test_nan_loss_exits_non_zero(tmp_path):
    out = cli("compare", *SYNTH, "--lr", "1e6", "--no-html", "--out", str(tmp_path))
    assert out.returncode == 1
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2 and all("try a smaller learning rate" in e for e in errors)


def test_tiny_run_writes_folder(tmp_path):
    out = cli("compare", *SYNTH, "--export-weights", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # --quiet: no progress bar
    header = out.stdout.splitlines()[0].split()
    assert header[:4] == ["run", "method", "rank", "status"] and "recovery_error" in header
    for name in ("results.json", "config.json", "steps.csv", "figures.html",
                 "weights/lora-r2/weights_start.safetensors", "weights/bora-r2/weights_end.safetensors"):
        assert (tmp_path / name).is_file(), name
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["lr"] == 0.01 and cfg["steps"] == 6  # task default lr, explicit steps


def test_progress_in_a_log_is_plain_lines(tmp_path):
    """stderr is a pipe here (a log): whole lines, no carriage-return frames."""
    out = cli("compare", *[a for a in SYNTH if a != "--quiet"], "--no-html", "--out", str(tmp_path), text=False)
    assert out.returncode == 0
    assert b"\r" not in out.stderr and b"12/12 steps (100%)" in out.stderr and b"ETA" in out.stderr
    assert len(out.stderr.splitlines()) <= 12  # at most one line per 10% (or 30 s), not one per step


def test_progress_on_a_terminal_uses_tqdm():
    import io

    from bora_lab.cli import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress(enabled=True, stream=stream)
    for done in range(1, 51):
        bar.update(done, 50, eta=0.0)
    bar.close()
    assert "50/50" in stream.getvalue() and "\r" in stream.getvalue()


def test_bare_command_prints_help_and_version():
    out = cli()
    assert out.returncode == 0 and "compare" in out.stdout and "usage: bora-lab" in out.stdout
    from bora_lab import __version__

    assert cli("--version").stdout.strip() == f"bora-lab {__version__}"


def test_every_flag_has_help_with_its_default():
    import re

    text = cli("compare", "--help").stdout
    flags = set(re.findall(r"^  (--[a-z-]+)", text, re.M))
    assert {"--steps", "--lr", "--layers", "--layer-checkpoints", "--config", "--grad-clip"} <= flags
    for f in build_parser()._subparsers._group_actions[0].choices["compare"]._actions:
        assert f.help, f.option_strings
    assert re.search(r"--steps STEPS\s+optimizer steps per run \(default: 150;", text)


def test_config_file_then_flags(tmp_path):
    from bora_lab.cli import read_config_file

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"task": "synthetic_col", "methods": ["lora"], "ranks": [2], "steps": 7}))
    cfg = config_from_args(build_parser().parse_args(["compare", "--config", str(saved), "--steps", "5"]))
    assert cfg.task == "synthetic_col" and cfg.methods == ["lora"] and cfg.steps == 5 and cfg.lr == 0.01
    lesson = tmp_path / "lesson.json"
    lesson.write_text(json.dumps({"id": "x", "settings": {"methods": ["bora"], "seed": 3}}))
    assert read_config_file(str(lesson)) == {"methods": ["bora"], "seed": 3}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="unknown setting.*stepz"):
        read_config_file(str(bad))
    out = cli("compare", "--config", str(tmp_path / "missing.json"))
    assert out.returncode == 2
    _one_error_line(out.stderr, "cannot read it")


def test_default_out_folders_differ():
    from bora_lab.cli import default_out_dir

    assert default_out_dir() != default_out_dir()


def test_list():
    out = cli("list")
    assert out.returncode == 0 and "bora" in out.stdout and "synthetic_col" in out.stdout


# ---------------------------------------------------------------- in-process helpers
def test_parse_method_options():
    opts = parse_method_options(["dora.detach_norm=false", "bora.eps=1e-8", "mora.kind=rotation", "x.n=3"])
    assert opts == {"dora": {"detach_norm": False}, "bora": {"eps": 1e-8}, "mora": {"kind": "rotation"},
                    "x": {"n": 3}}
    with pytest.raises(ValueError):
        parse_method_options(["dora=1"])


def test_config_from_args_layers_task_defaults_and_flags():
    args = build_parser().parse_args(["compare", "--task", "austen_lm", "--layers", "0,2", "--sequential",
                                      "--target-modules", "q_proj,v_proj", "--lr", "0.002"])
    cfg = config_from_args(args)
    assert cfg.model == "smollm2" and cfg.lr == 0.002 and cfg.analysis_layers == [0, 2]
    assert cfg.lockstep is False and cfg.target_modules == ["q_proj", "v_proj"]
    default = config_from_args(build_parser().parse_args(["compare"]))
    assert default.task == "fine_foods" and default.methods == ["lora", "dora", "bora"] and default.ranks == [8]


def test_format_table():
    text = format_table([{"run": "lora-r8", "params": 12345, "loss": 0.123456, "x": None}])
    assert "12,345" in text and "0.1235" in text and " -" in text
    assert format_table([]) == "(no runs)"


def test_ctrl_c_cancels_and_saves(tmp_path):
    import signal
    import threading
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--task", "synthetic_col", "--methods", "lora,bora", "--ranks", "2", "--steps", "20000", "--batch-size", "8",
            "--no-html", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "bora_lab", "compare", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = threading.Event()

    def watch():  # a progress line shows that training has started
        for line in proc.stderr:
            if b" steps (" in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(90), "no progress within 90 s"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "cancelled" and all(r["status"] == "cancelled" for r in results["runs"])
    assert all(0 < len(r["history"]) < 20000 for r in results["runs"])
    assert b"cancelled" in out


def test_app_command_builds_and_launches_the_app(monkeypatch):
    """`bora-lab app` opens the same app as `python app.py` (launch is replaced, nothing is served)."""
    from bora_lab import cli
    from bora_lab.ui import app

    seen = {}
    monkeypatch.setattr(app, "build_demo", lambda: "demo")
    monkeypatch.setattr(app, "launch", lambda demo, share=False: seen.update(demo=demo, share=share))
    assert cli.main(["app"]) == cli.EXIT_OK
    assert seen == {"demo": "demo", "share": False}
