"""Every method's step time on the default model and task: the table behind the cost estimate.

    python benchmarks/step_times.py          # writes bora_lab/data/step_times.json and docs/measured/step_times.md

One comparison of every registered method (MiniLM, fine-food reviews, rank 8, batch 8 x 40 tokens,
2 CPU threads, the per-copy engine so each method's own step is timed), 10 steps each: the median
step time of steps 3-10 per method. The evaluation cost per example is timed on a LoRA model over
the 200 default eval examples (median of 3). Run it on a quiet machine.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from bora_lab import methods
    from bora_lab.config import RunConfig
    from bora_lab.engine.environment import environment
    from bora_lab.engine.runstate import RunState
    from bora_lab.engine.trainer import make_pipeline, run
    from bora_lab.engine.tasks import load_task

    torch.set_num_threads(2)
    base = dict(steps=10, eval_every=10, eval_samples=16, analyze_every=10, layer_checkpoints=0, num_threads=2,
                engine="per_copy")
    cfg = RunConfig(methods=methods.available(), **base)
    res = run(cfg)
    step_s = {}
    for r in res["runs"]:
        times = [h["step_s"] for h in r["history"][2:]]
        step_s[r["method"]] = round(statistics.median(times), 4) if times else None
    ecfg = RunConfig(methods=["lora"], num_threads=2)
    pipe = make_pipeline(ecfg, load_task(ecfg))
    state = RunState("lora-r8", "lora", 8, ecfg, pipe, torch.device("cpu"), None)
    evals = []
    for _ in range(3):
        t0 = time.perf_counter()
        state.evaluate()
        evals.append((time.perf_counter() - t0) / pipe.eval_size)
    env = environment(torch.device("cpu"), 2)
    out = {"model": "minilm", "task": "fine_foods", "batch_size": 8, "max_length": 40, "num_layers": 6, "rank": 8,
           "threads": 2, "cpu": env.get("device_name") or platform.processor(), "torch": torch.__version__,
           "measured": time.strftime("%Y-%m-%d"), "step_s": step_s,
           "eval_s_per_example": round(statistics.median(evals), 5)}
    (ROOT / "bora_lab" / "data" / "step_times.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Step time of every method (the cost estimate's table)", "",
             f"`python benchmarks/step_times.py` on {out['cpu']}, 2 threads, torch {out['torch']}, {out['measured']}: "
             "MiniLM on fine-food reviews, rank 8, batch 8 x 40 tokens, per-copy engine, median of steps 3-10.", "",
             "| method | step s | x LoRA |", "| --- | ---: | ---: |"]
    lora = step_s.get("lora") or 1.0
    for m, s in step_s.items():
        lines.append(f"| `{m}` | {s:.3f} | {s / lora:.2f} |" if s else f"| `{m}` | failed | |")
    lines += ["", f"Evaluation: {out['eval_s_per_example'] * 1000:.1f} ms per example (LoRA r8, 200 examples)."]
    (ROOT / "docs" / "measured" / "step_times.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
