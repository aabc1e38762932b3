"""How much the app's own work (figures, table, serialisation) adds to training time.

    python benchmarks/ui_overhead.py                       # MiniLM (6 layers), lora/dora/bora r8, 30 steps
    python benchmarks/ui_overhead.py --steps 20 --num-layers 2 --repeat 2

Two ways to run the same comparison, alternated ``--repeat`` times:

* ``trainer``: ``for ev in compare(cfg): acc.update(ev)``: what the CLI does, no UI;
* ``app``: the Run button's path without a browser: ``tab_compare.run_comparison`` (training in its worker
  thread, the page thread redrawing stale plots every 1-2 s), and every frame it yields put through
  Gradio's own ``postprocess`` (plotly figure -> JSON, DataFrame -> table payload), as the server would.

It prints the wall time of each, the overhead ``app / trainer - 1``, and the directly measured UI
work: the time the page thread spent building and serialising frames, as a share of the wall time.
Run it on a quiet machine: two CPU-heavy processes on 2 cores distort both numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradio as gr  # noqa: E402

from bora_lab.config import RunConfig  # noqa: E402
from bora_lab.record import ResultsAccumulator  # noqa: E402
from bora_lab.engine.trainer import compare  # noqa: E402
from bora_lab.ui import form, tab_compare, visitor  # noqa: E402


def trainer_only(cfg: RunConfig) -> float:
    t0 = time.perf_counter()
    acc = ResultsAccumulator(cfg)
    for ev in compare(cfg):
        acc.update(ev)
    return time.perf_counter() - t0


def with_app(cfg: RunConfig) -> tuple[float, float, int]:
    """Wall time, seconds of UI work in the page thread, number of frames."""
    serialisers = {"loss": gr.Plot(render=False), "metric": gr.Plot(render=False), "md": gr.Plot(render=False),
                   "scatter": gr.Plot(render=False), "table": gr.Dataframe(render=False)}
    values = form.ui_values(cfg)
    session = visitor.Session()
    gen = tab_compare.run_comparison(session, *[values[k] for k in form.input_keys()])
    ui_s, frames = 0.0, 0
    t0 = time.perf_counter()
    for frame in gen:  # building a frame is timed inside `live` (job.render_s); serialising here
        t_frame = time.perf_counter()
        for name, value in zip(tab_compare.OUTPUTS[2:], frame[2:]):
            if not (isinstance(value, dict) and value == gr.skip()):
                serialisers[name].postprocess(value)
        ui_s += time.perf_counter() - t_frame
        frames += 1
    wall = time.perf_counter() - t0
    return wall, ui_s + session.job.render_s, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-layers", type=int, default=0, help="0 = the whole model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--runs-dir", default="/tmp/bora_lab_ui_overhead")
    args = parser.parse_args()
    os.environ["BORA_LAB_RUNS"] = args.runs_dir
    cfg = RunConfig(methods=["lora", "dora", "bora"], ranks=[8], steps=args.steps, batch_size=args.batch_size,
                    num_layers=args.num_layers or None, eval_every=max(1, args.steps // 2), eval_samples=200,
                    device="cpu")
    print(f"config: {cfg.model} / {cfg.task}, {', '.join(cfg.run_ids())}, {cfg.steps} steps, batch {cfg.batch_size}, "
          f"layers {cfg.num_layers or 'all'}")
    trainer_only(RunConfig(**{**cfg.to_dict(), "steps": 1, "eval_every": 1, "eval_samples": 8}))  # warm caches
    plain, app, ui = [], [], []
    for i in range(args.repeat):
        if i % 2:  # alternate the order, so a drift in machine load does not favour one side
            wall, ui_s, frames = with_app(cfg)
            plain.append(trainer_only(cfg))
        else:
            plain.append(trainer_only(cfg))
            wall, ui_s, frames = with_app(cfg)
        app.append(wall)
        ui.append(ui_s)
        print(f"repeat {i + 1}: trainer {plain[-1]:.1f} s, app {wall:.1f} s ({frames} frames, "
              f"UI work {ui_s:.2f} s = {100 * ui_s / wall:.1f}% of the wall time)")
    p, a, u = statistics.median(plain), statistics.median(app), statistics.median(ui)
    print(f"median: trainer {p:.1f} s, app {a:.1f} s, overhead {100 * (a / p - 1):+.1f}%; "
          f"UI work {u:.2f} s = {100 * u / a:.1f}% of the app's wall time")


if __name__ == "__main__":
    main()
