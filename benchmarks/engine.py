"""Per-copy path vs shared-base engine: end-to-end time and peak memory for k = 1, 3 and 8 runs.

    python benchmarks/engine.py                  # MiniLM on fine_foods, 30 steps, 2 repetitions
    python benchmarks/engine.py --steps 150 --reps 1 --sets 3   # the app's default comparison, full length

Time: both engines run the same comparison (same seed, batches and dropout streams) alternately in
this process, ``--reps`` times each; the table gives the median of ``elapsed_s`` (training, analysis
and evaluation; the model load before it is the same for both) and the ratio per-copy / shared.
Memory: every (engine, set) runs once more in a fresh subprocess, which reports its peak RSS
(``ru_maxrss``), so one configuration's peak does not hide another's. Run it on a quiet machine: two
busy processes on two cores distort every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = {
    "1": ["lora"],
    "3": ["lora", "dora", "bora"],
    "8": ["lora", "rslora", "dora", "dora_col", "bora", "vera", "asylora", "sbora_fa"],
}


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``). Not ``ru_maxrss``: a child started by
    ``subprocess`` inherits its parent's ``ru_maxrss``, so every child would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def config(methods: list[str], engine: str, steps: int, threads: int):
    from bora_lab.config import RunConfig

    return RunConfig(methods=methods, engine=engine, steps=steps, num_threads=threads)


def timed(methods: list[str], engine: str, steps: int, threads: int) -> dict:
    from bora_lab.engine.trainer import run

    res = run(config(methods, engine, steps, threads))
    bad = [r["run_id"] for r in res["runs"] if r["status"] != "done"]
    if bad:
        raise SystemExit(f"runs failed: {bad}")
    return {"elapsed_s": res["elapsed_s"], "engines": sorted(set(res["engines"].values())),
            "accuracy": {r["run_id"]: r["eval"][-1]["metrics"]["accuracy"] for r in res["runs"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="1,3,8", help="comma-separated keys of SETS")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory probes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # memory probe: one comparison, then the peak RSS
        engine, key = args.child.split(":")
        timed(SETS[key], engine, args.steps, args.threads)
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps, MiniLM fine_foods, batch 8, r8")
    rows = []
    for key in args.sets.split(","):
        times: dict[str, list[float]] = {"per_copy": [], "shared": []}
        acc = {}
        for _ in range(0 if args.memory_only else args.reps):
            for engine in times:
                out = timed(SETS[key], engine, args.steps, args.threads)
                times[engine].append(out["elapsed_s"])
                acc[engine] = out["accuracy"]
        mem = {}
        for engine in times:
            proc = subprocess.run([sys.executable, __file__, "--child", f"{engine}:{key}", "--steps", str(args.steps),
                                   "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            mem[engine] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        med = {e: statistics.median(t) if t else float("nan") for e, t in times.items()}
        rows.append((key, med, mem, acc))
        print(f"k={key}: per-copy {med['per_copy']:.1f}s, shared {med['shared']:.1f}s, "
              f"speed-up {med['per_copy'] / med['shared']:.2f}x; peak RSS {mem['per_copy']:.0f} / {mem['shared']:.0f} MB; "
              f"same accuracy: {acc.get('per_copy') == acc.get('shared')}", flush=True)
    print("\n| runs | per-copy s | shared s | speed-up | peak RSS per-copy MB | peak RSS shared MB |")
    print("|---|---|---|---|---|---|")
    for key, med, mem, _ in rows:
        print(f"| {key} | {med['per_copy']:.1f} | {med['shared']:.1f} | {med['per_copy'] / med['shared']:.2f}x | "
              f"{mem['per_copy']:.0f} | {mem['shared']:.0f} |")
    base = next((m for k, _, m, _ in rows if k == "1"), None)
    if base and any(k == "8" for k, *_ in rows):
        eight = next(m for k, _, m, _ in rows if k == "8")
        print(f"\npeak RSS at 8 runs / 1 run (shared): {eight['shared'] / base['shared']:.2f}x")


if __name__ == "__main__":
    main()
