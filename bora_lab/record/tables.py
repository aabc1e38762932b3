"""The results table: one row per run, for the CLI's printout, the app and the HTML report."""
from __future__ import annotations

import math
from typing import Any

from .accumulator import summarize


def _round(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float) and math.isfinite(v) and v != 0:
        return round(v, max(0, digits - 1 - int(math.floor(math.log10(abs(v))))))
    return v


def at_majority(metric: Any, task: dict) -> bool:
    """Whether a classification run's accuracy is no better than always answering the majority class
    (within half a point): it has not learned anything the test set can see."""
    base = task.get("majority_baseline")
    return (task.get("metric") == "accuracy" and isinstance(base, float) and isinstance(metric, (int, float))
            and metric <= base + 0.005)


def results_table(results: dict) -> list[dict[str, Any]]:
    """One row per run (works on partial results): the CLI prints it, the app shows it.

    Columns: run, method, rank, status, lr (when the runs' rates differ), trainable params, trainable %, adapter params, head params
    (trainable params split into the method's own and the task head's), final loss, the task's
    metric, median step (s), peak mem (MiB), ΔM row, ΔM col, ΔD row, ΔD col (mean over analysed
    modules, from the start), ΔM row/col (the asymmetry ratio); with a validation split also the
    test metric at the best validation step and that step; ``note`` says when a classification run is at
    the majority class (:func:`at_majority`). Missing values are None.
    """
    task = results.get("task", {})
    metric = task.get("metric") or "metric"
    rows = []
    rates = {run.get("lr") for run in results.get("runs", [])}
    for run in results.get("runs", []):
        s = run.get("summary") or summarize(run, task)
        rows.append({
            "run": run["run_id"], "method": run["method"], "rank": run["rank"] or "-", "status": s.get("status") or run.get("status"),
            **({"lr": run.get("lr")} if len(rates) > 1 else {}),  # each method at its own rate
            "trainable params": s.get("trainable_params"), "trainable %": _round(s.get("trainable_pct"), 3),
            "adapter params": s.get("adapter_params"), "head params": s.get("head_params"),
            "final loss": _round(s.get("final_loss")), metric: _round(s.get("eval_metric")),
            "median step (s)": _round(s.get("median_step_s"), 3), "peak mem (MiB)": _round(s.get("peak_mem_mb"), 4),
            "ΔM row": _round(s.get("dM_row"), 3), "ΔM col": _round(s.get("dM_col"), 3),
            "ΔD row": _round(s.get("dD_row"), 3), "ΔD col": _round(s.get("dD_col"), 3),
            "ΔM row/col": _round(s.get("asymmetry_ratio"), 3),
        })
        if at_majority(s.get("eval_metric"), task):
            rows[-1]["note"] = "at the majority class: did not learn at this budget (more steps or another rate may help)"
        if s.get("best_step") is not None:  # a validation split: the best checkpoint, chosen on it
            rows[-1][f"{metric} at best val step"] = _round(s.get("best_eval_metric"))
            rows[-1]["best step"] = s["best_step"]
    return rows
