"""Wall time of one comparison in process against the same comparison on a local Ray (``--ray auto``).

    pip install ".[ray]"
    python benchmarks/ray_wall.py                 # 8 runs (4 methods × 2 seeds, 20 steps, 2 layers), 2 rounds
    python benchmarks/ray_wall.py --steps 150 --rounds 1

Each round runs the two commands one after the other (in process first, then Ray, alternating the
order every round so that neither always runs on a warm disk cache), as subprocesses, exactly as a user
types them. Printed: the wall time of each command, the training time it reports (``elapsed_s``: from
the first step to the last result, Ray's start-up and the workers' model loads included for Ray), and the
ratio Ray / in process. Run it alone on the machine: a second busy process distorts both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(args: list[str], out: Path) -> tuple[float, float]:
    """``(wall seconds, elapsed_s from results.json)`` of ``python -m bora_lab compare ARGS --out OUT``."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bora_lab", "compare", *args, "--out", str(out), "--no-html"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "results.json").read_text())["elapsed_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="lora,dora,bora,rslora")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = ["--methods", args.methods, "--seeds", args.seeds, "--steps", str(args.steps),
            "--num-layers", str(args.num_layers)]
    ways = {"in process": base, "local Ray (--ray auto)": base + ["--ray", "auto"]}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]
            for name in order:
                times[name].append(one(ways[name], Path(tmp) / f"{r}-{len(times[name])}-{name[:5].strip()}"))
                print(f"round {r + 1}: {name}: {times[name][-1][0]:.1f} s wall, {times[name][-1][1]:.1f} s training",
                      flush=True)
    runs = len(args.methods.split(",")) * len(args.seeds.split(","))
    print(f"\n{runs} runs × {args.steps} steps, MiniLM {args.num_layers} layers, {args.rounds} round(s); median:\n")
    print("| | wall time of the command | training (`elapsed_s`) |\n| --- | ---: | ---: |")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(e for _, e in v)) for k, v in times.items()}
    for name, (wall, train) in med.items():
        print(f"| {name} | {wall:.1f} s | {train:.1f} s |")
    (a_wall, a_train), (b_wall, b_train) = med.values()
    print(f"\nRay / in process: wall {b_wall / a_wall:.2f}×, training {b_train / a_train:.2f}×")


if __name__ == "__main__":
    main()
