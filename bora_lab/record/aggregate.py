"""Seeds folded together: means with 95% intervals, and every method against a baseline, paired.

A comparison with several seeds has one run per (method, rank, seed). Runs of the same (method,
rank) form a *group*; :func:`aggregate` gives each group the mean, standard deviation and t
interval (over seeds) of its final metrics and ΔM/ΔD summaries, and its difference from the
baseline group on the final evaluation, paired on seeds and on test examples:

* the per-example scores of the final evaluation (``run["per_example"]``: correctness for
  classification, squared error for regression and the synthetic tasks, token loss for causal LM)
  of the runs of both groups that share a seed form two ``[seeds, examples]`` matrices;
* with one seed the interval is an example bootstrap (test-set noise only: it says nothing about
  another seed); with two or more seeds it is the hull of a two-level bootstrap (seeds, then
  examples) and a paired t interval over seeds. The bootstrap alone is too narrow with few seeds
  (it cannot see a seed-to-seed spread from 3 draws); the t interval is honest about seeds but
  ignores that the test set is a sample. Taking the wider of the two keeps both sources of noise.
* a verdict in words: "+0.8 points [−0.6, +2.2]: not distinguishable from lora-r8 at this budget".

Torch-free (numpy through ``bora_lab.analysis.intervals``).
"""
from __future__ import annotations

from typing import Any

QUANTITIES = ("eval_metric", "best_eval_metric", "final_loss", "dM_row", "dM_col", "dD_row", "dD_col", "asymmetry_ratio", "dora_slope")
# per-example score -> (what the difference is in, scale for the sentence, unit, higher is better)
SCORES = {"correct": ("accuracy", 100.0, "points", True), "squared_error": ("squared error", 1.0, "", False),
          "token_loss": ("token loss", 1.0, "", False)}


def _overlay_label(run: dict[str, Any]) -> str:
    """The `` (label)`` History appends to the run ids of an overlay of several comparisons, or ``""``."""
    rid = str(run.get("run_id", ""))
    return rid[rid.index(" ("):] if " (" in rid and rid.endswith(")") else ""


def base_key(run: dict[str, Any]) -> str:
    """``"lora-r8"``: the method and rank, whatever the seed and learning rate."""
    return run["method"] if not run.get("rank") else f"{run['method']}-r{run['rank']}"


def group_key(run: dict[str, Any]) -> str:
    """``"lora-r8"`` for every seed of LoRA at rank 8; ``"bitfit"`` for a method without a rank;
    ``"lora-r8-lr0.001"`` in a learning-rate sweep; in an overlay of several comparisons each keeps
    its own groups (``"lora-r8 (label)"``)."""
    swept = "-lr" in str(run.get("run_id", "")) and run.get("lr") is not None
    return base_key(run) + (f"-lr{run['lr']:g}" if swept else "") + _overlay_label(run)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def _pick_baseline(keys: list[str], groups: dict[str, list[dict]], baseline: str | None,
                   results_lr: dict | None = None) -> str | None:
    if not keys:
        return None
    if baseline:
        if baseline in groups:
            return baseline
        named = [k for k in keys if groups[k][0]["method"] == baseline]
        if named:
            return named[0]
    lora = [k for k in keys if groups[k][0]["method"] == "lora"] or keys
    lr = (results_lr or {}).get("lr")  # in a sweep: the comparison's own rate first
    return next((k for k in lora if groups[k][0].get("lr") == lr), lora[0])


def _scores(run: dict[str, Any], at: str = "final") -> tuple[str, list[float]] | None:
    pe = run.get("per_example" if at == "final" else "per_example_best")
    if run.get("status") != "done" or not pe or not pe.get("values"):
        return None
    return pe["name"], pe["values"]


def paired_against(runs: list[dict], base: list[dict], *, level: float = 0.95, n_boot: int = 2000,
                   at: str = "final") -> dict | None:
    """The difference ``runs`` − ``base`` on their shared seeds (see the module docstring), or None
    when they share no seed with per-example scores of one kind and length. ``at="best"``: at each
    run's best evaluation on the validation split instead of its final one."""
    import numpy as np

    from ..analysis.intervals import paired_difference, paired_t

    mine = {r.get("seed"): _scores(r, at) for r in runs}
    theirs = {r.get("seed"): _scores(r, at) for r in base}
    seeds = [s for s in mine if mine[s] and theirs.get(s) and mine[s][0] == theirs[s][0]
             and len(mine[s][1]) == len(theirs[s][1])]
    if not seeds or len({len(mine[s][1]) for s in seeds}) != 1:
        return None
    name = mine[seeds[0]][0]
    a = np.array([mine[s][1] for s in seeds], dtype=float)
    b = np.array([theirs[s][1] for s in seeds], dtype=float)
    boot = paired_difference(a, b, level=level, n_boot=n_boot)
    out = {"score": name, "seeds": seeds, "difference": boot["difference"], "low": boot["low"],
           "high": boot["high"], "p_value": boot["p_value"], "bootstrap": [boot["low"], boot["high"]],
           "method": boot["method"] + (" (one seed: test-set noise only)" if len(seeds) == 1 else "")}
    if len(seeds) >= 2:
        t = paired_t(a, b, level=level)
        out["paired_t"] = [t["low"], t["high"]]
        out["low"], out["high"] = min(boot["low"], t["low"]), max(boot["high"], t["high"])
        out["p_value"] = max(boot["p_value"], t["p_value"])
        out["method"] = "wider of a two-level bootstrap (seeds, examples) and a paired t over seeds"
    out["distinguishable"] = bool(out["low"] > 0 or out["high"] < 0)
    return out


def aggregate(results: dict[str, Any], baseline: str | None = None, *, level: float = 0.95,
              n_boot: int = 2000, at: str = "final") -> dict[str, Any]:
    """Groups of ``results["runs"]`` over seeds, their intervals, and their differences from ``baseline``.

    Args:
        results: a results dict (``runs`` with ``summary``, ``seed`` and ``per_example``).
        baseline: a group key (``"lora-r8"``) or a method name (its first group); default: the first
            LoRA group, else the first group.

    Returns:
        ``{"level", "baseline", "seeds", "groups": [{"key", "method", "rank", "runs", "seeds", "n",
        "stats": {quantity: mean_interval dict or None}, "vs_baseline": dict or None, "verdict": str or
        None}]}``. ``n`` counts the runs that finished (status ``done``); only they enter the statistics.
    """
    from ..analysis.intervals import mean_interval, verdict

    groups: dict[str, list[dict]] = {}
    for run in results.get("runs", []):
        groups.setdefault(group_key(run), []).append(run)
    keys = list(groups)
    base_key = _pick_baseline(keys, groups, baseline, results.get("config"))
    out = {"level": level, "at": at, "baseline": base_key, "seeds": sorted({r.get("seed") for r in results.get("runs", [])
                                                                  if r.get("seed") is not None}), "groups": []}
    for key in keys:
        runs = groups[key]
        done = [r for r in runs if r.get("status") == "done"]
        stats = {}
        for q in QUANTITIES:
            values = [r.get("summary", {}).get(q) for r in done]
            values = [v for v in values if _finite(v)]
            stats[q] = mean_interval(values, level=level) if values else None
        entry = {"key": key, "method": runs[0]["method"], "rank": runs[0].get("rank", 0),
                 "runs": [r["run_id"] for r in runs], "seeds": [r.get("seed") for r in done], "n": len(done),
                 "stats": stats, "vs_baseline": None, "verdict": None}
        same_comparison = _overlay_label(runs[0]) == _overlay_label(groups[base_key][0]) if base_key else False
        if base_key is not None and key != base_key and same_comparison:
            diff = paired_against(runs, groups[base_key], level=level, n_boot=n_boot, at=at)
            if diff is not None:
                what, scale, unit, higher = SCORES.get(diff["score"], (diff["score"], 1.0, "", True))
                entry["vs_baseline"] = {**diff, "quantity": what}
                entry["verdict"] = verdict(diff, base_key, unit=unit, scale=scale, digits=1 if scale > 1 else 4,
                                           higher_is_better=higher)
        out["groups"].append(entry)
    return out


def headline(results: dict) -> dict[str, Any]:
    """The aggregate a reader should see first: each method at its chosen learning rate after a sweep,
    else the plain one (computed when the results dict has none yet, e.g. while running)."""
    return results.get("aggregate_tuned") or results.get("aggregate") or aggregate(results)


def has_repeats(results: dict) -> bool:
    """Whether some (method, rank) ran more than once (several seeds, or a learning-rate sweep)."""
    keys = [base_key(r) + _overlay_label(r) for r in results.get("runs", [])]
    return len(keys) != len(set(keys))


def aggregate_rows(results: dict) -> list[dict[str, Any]]:
    """One row per (method, rank): mean ± 95% half-width of the primary metric over seeds, the chosen
    learning rate after a sweep, and the verdict against the baseline."""
    agg = headline(results)
    metric = (results.get("task") or {}).get("metric") or "metric"
    rows = []
    for g in agg.get("groups", []):
        st = g["stats"].get("eval_metric")
        shown = "" if not st else (f"{st['mean']:.4f}" if st.get("half_width") is None
                                   else f"{st['mean']:.4f} ± {st['half_width']:.4f}")
        ratio = g["stats"].get("asymmetry_ratio")
        row = {"run": g["key"], "seeds": g["n"], metric: shown}
        if "lr" in g:
            row["chosen lr"] = "" if g["lr"] is None else f"{g['lr']:g} (on {g['chosen_on']})"
        row["ΔM row/col"] = "" if not ratio else f"{ratio['mean']:.2f}"
        row[f"vs {agg['baseline']}"] = g["verdict"] or ("baseline" if g["key"] == agg["baseline"] else "")
        rows.append(row)
    return rows


def choose_rates(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each (method, rank)'s learning rate in a sweep: the best mean over seeds of the final
    evaluation's primary metric on the validation split (the test numbers play no part). Tasks
    without a validation split (the synthetic weight-recovery tasks, which draw fresh inputs for
    every evaluation) choose on their evaluation metric, and say so.

    Returns:
        ``{base key: {"lr", "group" (the chosen group's key), "on" ("validation" | "evaluation"),
        "by_lr": {lr: mean metric}}}``; empty when nothing was swept.
    """
    task = results.get("task") or {}
    metric, higher = task.get("metric") or "loss", task.get("higher_is_better", True)
    per: dict[str, dict[float, list[float]]] = {}
    on: dict[str, str] = {}
    for run in results.get("runs", []):
        if "-lr" not in str(run.get("run_id", "")) or run.get("status") != "done" or not run.get("eval"):
            continue
        last = run["eval"][-1]
        val = (last.get("val_metrics") or {}).get(metric)
        key = base_key(run) + _overlay_label(run)
        on[key] = "validation" if val is not None else "evaluation"
        value = val if val is not None else last["metrics"].get(metric)
        if _finite(value):
            per.setdefault(key, {}).setdefault(run["lr"], []).append(value)
    out = {}
    for key, by in per.items():
        means = {lr: sum(v) / len(v) for lr, v in by.items()}
        best = (max if higher else min)(means, key=means.get)
        out[key] = {"lr": best, "group": f"{key.split(' (')[0]}-lr{best:g}", "on": on[key], "by_lr": means}
    return out


def tuned(results: dict[str, Any], baseline: str | None = None, **kw: Any) -> dict[str, Any] | None:
    """:func:`aggregate` of each (method, rank) at its chosen learning rate (:func:`choose_rates`),
    with the groups keyed ``"lora-r8"`` again and ``"lr"`` / ``"chosen_on"`` added; None without a sweep."""
    chosen = choose_rates(results)
    if not chosen:
        return None
    runs = [r for r in results.get("runs", []) if chosen.get(base_key(r) + _overlay_label(r), {}).get("lr") == r.get("lr")]
    stripped = [{**r, "run_id": r["run_id"].replace(f"-lr{r['lr']:g}", "")} for r in runs]
    out = aggregate({**results, "runs": stripped}, baseline=baseline, **kw)
    for g in out["groups"]:
        c = chosen.get(g["key"], {})
        g["lr"], g["chosen_on"], g["by_lr"] = c.get("lr"), c.get("on"), c.get("by_lr")
    return out
