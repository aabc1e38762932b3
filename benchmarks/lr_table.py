"""The learning-rate table of docs/measured/learning_rates.md, from the folders of the sweep that measured it.

    python -m bora_lab compare --methods full,full_model,head,features --seeds 0 --lr-auto --val-samples 200 --out runs/lr1
    ...                                                     # one folder per group of methods (see the doc)
    python benchmarks/lr_table.py runs/lr1 runs/lr2 ...     # Markdown: validation accuracy by rate, the choice

Each method's rate is chosen on the validation split (final evaluation), as ``--lr-auto`` does; the
test accuracy at that rate is shown beside it, with the majority-class rate for reference. A choice at
the edge of the grid is marked: the best rate may lie beyond it.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(folders: list[str]) -> None:
    from bora_lab.record import load_results
    from bora_lab.record.aggregate import base_key

    by_method: dict[str, dict[float, tuple[float, float]]] = {}
    majority = None
    for folder in folders:
        res = load_results(folder)
        majority = res.get("task", {}).get("majority_baseline", majority)
        for run in res["runs"]:
            if run.get("status") != "done" or not run.get("eval"):
                continue
            last = run["eval"][-1]
            val, test = (last.get("val_metrics") or {}).get("accuracy"), last["metrics"].get("accuracy")
            if val is not None:
                by_method.setdefault(base_key(run), {})[run["lr"]] = (val, test)
    print("| method | " + " | ".join(["validation accuracy by rate (chosen in bold)", "chosen rate", "test accuracy"]) + " |")
    print("| --- | --- | ---: | ---: |")
    for key, rates in by_method.items():
        best = max(rates, key=lambda lr: (rates[lr][0], -abs(lr - 1e-3)))  # ties: the rate nearer LoRA's
        cells = ", ".join((f"**{lr:g}: {v:.3f}**" if lr == best else f"{lr:g}: {v:.3f}") for lr, (v, _) in sorted(rates.items()))
        edge = " (edge of the grid)" if len(rates) > 1 and best in (min(rates), max(rates)) else ""
        test = rates[best][1]
        stuck = " (majority class)" if majority is not None and test <= majority + 0.005 else ""
        print(f"| {key} | {cells} | {best:g}{edge} | {test:.3f}{stuck} |")
    if majority is not None:
        print(f"\nMajority class on the test reviews: {majority:.3f}.")


if __name__ == "__main__":
    main(sys.argv[1:])
