"""The app's default comparison, first Run and second Run back to back: time and CPU threads.

    python benchmarks/app_runs.py              # the app's defaults (MiniLM, fine_foods, lora/dora/bora r8, 150 steps)
    python benchmarks/app_runs.py --steps 20   # a shorter check

It builds the app as ``python app.py`` does (``build_demo()``, so the start-up's own CPU work comes
just before the first Run), then presses Run twice through the Run button's own handler
(``tab_compare.run_comparison`` with the form's default values), and prints for each Run the CPU
thread count the engine chose and why, the wall time and the median step time per method. Run it on
a quiet machine: both Runs should get every core (the thread choice ignores BoRA Lab's own work).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BORA_LAB_REUSE_RUNS", "0")  # time real training: the app would reuse the first Run's results
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bora_lab.ui import form, tab_compare, visitor  # noqa: E402
from bora_lab.ui.app import build_demo, default_config  # noqa: E402


def one_run(values: dict) -> dict:
    session = visitor.Session()
    t0 = time.perf_counter()
    for _ in tab_compare.run_comparison(session, *[values[k] for k in form.input_keys()]):
        pass
    wall = time.perf_counter() - t0
    res = session.job.results()
    steps = {r["run_id"]: statistics.median(h["step_s"] for h in r["history"]) for r in res["runs"] if r["history"]}
    return {"wall_s": wall, "threads": res.get("num_threads"), "why": res.get("threads_reason"), "median_step_s": steps,
            "status": res["status"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="steps per run (default: the app's)")
    args = p.parse_args()
    os.environ.setdefault("BORA_LAB_RUNS", tempfile.mkdtemp(prefix="bora_lab_app_runs_"))
    t0 = time.perf_counter()
    build_demo()
    print(f"app built in {time.perf_counter() - t0:.1f} s; load average now {os.getloadavg()[0]:.2f}")
    cfg = default_config()
    values = form.ui_values(cfg)
    if args.steps:
        values["steps"] = args.steps
    for i in (1, 2):
        r = one_run(values)
        steps = ", ".join(f"{k} {v:.3f} s" for k, v in r["median_step_s"].items())
        print(f"Run {i}: {r['status']} in {r['wall_s']:.0f} s, {r['threads']} thread(s) ({r['why']}); "
              f"median step {steps}; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
