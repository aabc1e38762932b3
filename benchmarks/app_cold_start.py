"""Cold start of the app: a fresh Python imports ``app.py`` (Gradio, torch, the registry) and builds the UI.

    python benchmarks/app_cold_start.py            # 3 fresh interpreters, median of each phase

Each repeat runs in a new interpreter (nothing cached in memory; the OS file cache is warm after the
first). Phases: ``gradio`` (import gradio), ``bora_lab`` (import the UI package: torch, the method
registry, plotly), ``build`` (``build_demo()``), ``total`` = the whole run as seen from outside,
interpreter start-up included, and ``total CPU`` = the child's user + system CPU seconds (a figure
that other busy processes on the machine do not inflate). The target is 10 s.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, time
t0 = time.perf_counter()
import gradio
t1 = time.perf_counter()
import bora_lab.ui.app as app
t2 = time.perf_counter()
demo = app.build_demo()
t3 = time.perf_counter()
print(json.dumps({"gradio": t1 - t0, "bora_lab": t2 - t1, "build": t3 - t2}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["total"] = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row["total CPU"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows.append(row)
    for key in ("gradio", "bora_lab", "build", "total", "total CPU"):
        values = [r[key] for r in rows]
        print(f"{key:>10}: median {statistics.median(values):5.2f} s   (runs: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
