"""Where does DoRA's figure 2 pattern appear? The slope of ΔM against ΔD for FT, LoRA and DoRA, per regime.

Liu et al. 2024 (DoRA, arXiv:2402.09353), section 2.2, figure 2: over layers and checkpoints, full
fine-tuning and DoRA show a negative ΔM–ΔD slope, LoRA a positive one. This script runs the
``dora-slopes`` claim (bora_lab/teach/claims) in several regimes, each with seeds, and prints one row
per (regime, method): the mean slope with its 95% t interval over seeds and whether its sign is the
paper's.

    python benchmarks/dora_fig2_regimes.py                  # the cheap synthetic regimes (about 2 min)
    python benchmarks/dora_fig2_regimes.py --minilm         # also MiniLM: 150, 450 and 1,350 steps (about 65 min)
    python benchmarks/dora_fig2_regimes.py --markdown docs/measured/dora_fig2.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTHETIC = [
    ("linear, synthetic_row (true update scales rows), 600 steps, lr 1e-2", {"task": "synthetic_row", "model": "linear"}),
    ("linear, synthetic_col (scales columns), 600 steps, lr 1e-2", {"task": "synthetic_col", "model": "linear"}),
    ("linear, synthetic_rank (low-rank update), 600 steps, lr 1e-2", {"task": "synthetic_rank", "model": "linear"}),
    ("linear, synthetic_row, 2,000 steps, lr 3e-3", {"task": "synthetic_row", "model": "linear", "steps": 2000,
                                                     "lr": 3e-3, "analyze_every": 50}),
]
THREE = {"methods": ["full", "lora", "dora"]}  # the longer budgets train only the claim's three methods
MINILM = [
    ("MiniLM 6 layers, fine_foods, 150 steps, per-method rates", {}),
    ("MiniLM 6 layers, fine_foods, 450 steps, per-method rates",
     {**THREE, "steps": 450, "eval_every": 150, "analyze_every": 30}),
    ("MiniLM 6 layers, fine_foods, 1,350 steps, per-method rates",
     {**THREE, "steps": 1350, "eval_every": 450, "analyze_every": 90}),
]


def main() -> None:
    from bora_lab.teach import claims
    from bora_lab.teach.claims.text import format_value

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM regimes (minutes per run)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--markdown", help="write the table to this file")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = ["| regime | method | slope ΔM/ΔD [95% interval] | paper's sign | verdict |", "| --- | --- | --- | --- | --- |"]
    t0 = time.perf_counter()
    for name, overrides in SYNTHETIC + (MINILM if args.minilm else []):
        rec = claims.reproduce("dora-slopes", seeds=seeds, overrides=overrides)
        for r in rec["rows"]:
            line = f"| {name} | {r['label'].split(':')[0]} | {format_value(r['ours'], r['unit'])} | {r['paper']} | {r['verdict']} |"
            rows.append(line)
            print(line, flush=True)
    text = "\n".join(rows) + f"\n\nSeeds {', '.join(map(str, seeds))}; {time.perf_counter() - t0:.0f} s in all.\n"
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
