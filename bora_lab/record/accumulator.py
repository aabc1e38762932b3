"""The results dict of a comparison, folded from the engine's events: the one accumulator.

``ResultsAccumulator.update(event)`` builds the dict incrementally. The engine keeps none of its
own: the CLI, the app and ``engine.run`` each fold the event stream once, with this class. The
schema is documented in ``docs/results_schema.md``. Importing this module loads no torch (the run
order of a config reads the method registry, which does, on first use).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

from .layer_store import LayerStore

SCHEMA_VERSION = 2  # 2: seeds, per-example scores, validation, aggregates (1 still opens)
FINAL_LOSS_WINDOW = 10  # "final loss" = mean training loss of the last 10 steps (single steps are noisy)
STATUSES = ("pending", "running", "done", "nan", "diverged", "oom", "error", "cancelled", "interrupted")


def _get(event: Any, key: str, default: Any = None) -> Any:
    """Field of an event object or of its ``to_dict()`` form."""
    if isinstance(event, dict):
        return event.get(key, default)
    return getattr(event, key, default)


def new_run_entry(run_id: str, method: str, rank: int) -> dict[str, Any]:
    """An empty per-run record (see the schema)."""
    return {"run_id": run_id, "method": method, "rank": rank, "status": "pending", "error": None,
            "trainable_params": None, "total_params": None, "trainable_pct": None, "adapter_params": None,
            "head_params": None, "magnitude_axis": None,
            "device": None, "target_modules": [], "analysed_modules": [], "history": [], "eval": [], "analysis": [],
            "median_step_s": None, "peak_mem_mb": None, "summary": {}}


def _run_specs(cfg: Any, cfg_dict: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(run_id, method, rank) of every run, as ``RunConfig.run_specs`` (methods outer, ranks inner)."""
    if hasattr(cfg, "run_specs"):
        return cfg.run_specs()
    from ..config import RunConfig

    try:
        return RunConfig.from_dict(cfg_dict).run_specs()
    except (ValueError, TypeError):  # an old or partial config: every (method, rank) pair
        return [(f"{m}-r{r}", m, r) for m in cfg_dict.get("methods", []) for r in cfg_dict.get("ranks", [])]



def improves(new: float | None, old: float | None, higher_is_better: bool = True) -> bool:
    """The rule that picks a run's best checkpoint: ``new`` is finite and strictly better than ``old``
    (None: no best yet), so the first of equal evaluations wins. The results (``best``) and the saved
    adapter (``adapter_best``) both use it."""
    if not _finite(new):
        return False
    return old is None or (new > old if higher_is_better else new < old)


class ResultsAccumulator:
    """Builds the results dict from trainer events (objects or their ``to_dict()``).

    Args:
        cfg: the ``RunConfig`` (or its dict) of the comparison; fixes the runs and their order.
    """

    def __init__(self, cfg: Any):
        cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        runs = [new_run_entry(rid, m, r) for rid, m, r in _run_specs(cfg, cfg_dict)]
        self.results: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "status": "running", "message": None, "config": cfg_dict, "task": {}, "device": None,
            "peak_mem_kind": None, "progress": None, "runs": runs,
        }
        self._index = {r["run_id"]: r for r in runs}
        self.layers = LayerStore()  # the LayerCheckpoint events' arrays (not part of the JSON results)
        self.adapters: dict[str, Any] = {}  # run id -> its AdapterState event (tensors, not JSON)

    def run(self, run_id: str) -> dict[str, Any]:
        """The entry of ``run_id`` (created on the fly for ids outside the config)."""
        if run_id not in self._index:
            method, sep, rank = run_id.rpartition("-r")
            if not (sep and rank.isdigit()):  # a method without a rank: the id is the method name
                method, rank = run_id, "0"
            entry = new_run_entry(run_id, method, int(rank))
            self.results["runs"].append(entry)
            self._index[run_id] = entry
        return self._index[run_id]

    def update(self, event: Any) -> dict[str, Any]:
        """Fold one event into the results; returns the (same, mutated) results dict."""
        kind = _get(event, "kind")
        res = self.results
        if kind == "comparison_started":
            res.update(task=_get(event, "task"), device=_get(event, "device"),
                       peak_mem_kind=_get(event, "peak_mem_kind"), lockstep=_get(event, "lockstep"),
                       num_threads=_get(event, "num_threads"), threads_reason=_get(event, "threads_reason"),
                       environment=_get(event, "environment"), engines=_get(event, "engines", None) or {})
            if _get(event, "matched"):
                res["matched"] = _get(event, "matched")
            if _get(event, "config") and _get(event, "config") != res["config"]:  # e.g. matched ranks: new run ids
                res["config"] = _get(event, "config")
                specs = _run_specs(None, res["config"])
                res["runs"] = [self._index.get(rid) or new_run_entry(rid, m, r) for rid, m, r in specs]
                self._index = {r["run_id"]: r for r in res["runs"]}
            return res
        if kind == "comparison_done":
            res["elapsed_s"] = _get(event, "elapsed_s")
            return self.finish(_get(event, "status"))
        if kind == "progress":
            res["progress"] = {k: _get(event, k) for k in ("done_steps", "total_steps", "elapsed_s", "eta_s")}
        elif kind == "cancelled":
            res["status"], res["message"] = "cancelled", _get(event, "message")
        elif kind == "layer_checkpoint" and _get(event, "deltas") is not None:  # to_dict() forms carry no arrays
            self.layers.add(_get(event, "run_id"), _get(event, "step"), _get(event, "deltas"), _get(event, "info"),
                            w0=_get(event, "w0"))
        elif kind == "adapter_state":
            if _get(event, "tensors") is not None or _get(event, "reason"):  # to_dict() forms carry no tensors
                self.adapters[_get(event, "run_id")] = event
            self.run(_get(event, "run_id"))["adapter"] = (
                {"step": _get(event, "step"), "saved": _get(event, "tensors") is not None, "reason": _get(event, "reason")})
        elif kind in ("run_started", "step", "eval", "analysis", "run_finished", "error"):
            self._update_run(self.run(_get(event, "run_id")), kind, event)
        return res

    def _update_run(self, entry: dict, kind: str, ev: Any) -> None:
        if kind == "run_started":
            info = _get(ev, "info") or {}
            entry.update(status="running", trainable_params=_get(ev, "trainable_params"),
                         total_params=_get(ev, "total_params"), device=_get(ev, "device"),
                         analysed_modules=list(_get(ev, "analysed_modules") or []),
                         trainable_pct=info.get("trainable_pct"), magnitude_axis=info.get("magnitude_axis"),
                         adapter_params=info.get("adapter_params"), head_params=info.get("head_params"),
                         target_modules=list(info.get("target_modules") or []), engine=info.get("engine"),
                         seed=info.get("seed"), lr=info.get("lr"))
            if info.get("task"):
                self.results["task"] = info["task"]
            self.results["device"] = _get(ev, "device")
            self.results["peak_mem_kind"] = info.get("peak_mem_kind")
            if "lockstep" in info:
                self.results["lockstep"] = info["lockstep"]
        elif kind == "step":
            row = {k: _get(ev, k) for k in ("step", "loss", "lr", "step_s", "peak_mem_mb")}
            entry["history"].append(row)
            entry["peak_mem_mb"] = max(entry["peak_mem_mb"] or 0.0, row["peak_mem_mb"] or 0.0)
        elif kind == "eval":
            row = {"step": _get(ev, "step"), "metrics": dict(_get(ev, "metrics"))}
            if _get(ev, "val_metrics"):
                row["val_metrics"] = dict(_get(ev, "val_metrics"))
            entry["eval"].append(row)
            if _get(ev, "per_example"):  # the latest evaluation's, and the best one's on validation
                entry["per_example"] = {**_get(ev, "per_example"), "step": row["step"]}
                if row.get("val_metrics") and self._is_best(entry, row):
                    entry["best"] = {"step": row["step"], "val_metrics": row["val_metrics"], "metrics": row["metrics"]}
                    entry["per_example_best"] = entry["per_example"]
        elif kind == "analysis":
            entry["analysis"].append({**_get(ev, "snapshot"), "cost_s": _get(ev, "cost_s", 0.0)})
        elif kind == "error":
            entry["status"], entry["error"] = _get(ev, "status", "error"), _get(ev, "message")
        elif kind == "run_finished":
            summary = summarize(entry, self.results.get("task"), status=_get(ev, "status"))
            entry["summary"] = summary
            entry["status"] = summary["status"]
            entry["median_step_s"] = summary.get("median_step_s")
            entry["peak_mem_mb"] = summary.get("peak_mem_mb", entry["peak_mem_mb"])

    def _is_best(self, entry: dict, row: dict) -> bool:
        """Whether ``row`` beats the run's best evaluation so far on the validation split's primary metric."""
        task = self.results.get("task") or {}
        metric = task.get("metric") or "loss"
        old = (entry.get("best") or {}).get("val_metrics", {}).get(metric)
        return improves(row["val_metrics"].get(metric), old, task.get("higher_is_better", True))

    def finish(self, status: str = "done") -> dict[str, Any]:
        """Mark the comparison finished (a cancelled one stays cancelled) and return the results."""
        if self.results["status"] == "running":
            self.results["status"] = status
        from .aggregate import aggregate, tuned

        baseline = (self.results.get("config") or {}).get("baseline")
        self.results["aggregate"] = aggregate(self.results, baseline=baseline)
        if any(r.get("per_example_best") for r in self.results["runs"]):  # best checkpoints, chosen on validation
            self.results["aggregate_best"] = aggregate(self.results, baseline=baseline, at="best")
        swept = tuned(self.results, baseline=baseline)  # each method at its own best learning rate
        if swept is not None:
            self.results["aggregate_tuned"] = swept
        return self.results


# --------------------------------------------------------------------------- per-run summary
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize(entry: dict[str, Any], task: dict[str, Any] | None = None, status: str | None = None) -> dict[str, Any]:
    """The run's row of the results table, from what its entry holds so far (works on partial runs).

    Keys: run_id, method, rank, status, error, trainable_params, total_params, trainable_pct,
    adapter_params, head_params (the trainable task head, counted apart),
    steps_done, final_loss, metric, eval_metric, eval_step, best_step, best_val_metric (the best
    evaluation on the validation split) and best_eval_metric (the test metric at that step),
    median_step_s, peak_mem_mb,
    dM_row, dM_col, dD_row, dD_col (mean over analysed modules, from the start, last snapshot),
    asymmetry_ratio, dora_slope, dora_r (DoRA fig. 2 fit on the row axis), analysis_overhead_pct.
    Missing values are None.
    """
    task = task or {}
    hist, evals, snaps = entry.get("history", []), entry.get("eval", []), entry.get("analysis", [])
    losses = [h["loss"] for h in hist[-FINAL_LOSS_WINDOW:] if _finite(h.get("loss"))]
    step_s = [h["step_s"] for h in hist if _finite(h.get("step_s"))]
    mems = [h["peak_mem_mb"] for h in hist if _finite(h.get("peak_mem_mb"))]
    metric = task.get("metric")
    last_eval = evals[-1] if evals else None
    out: dict[str, Any] = {
        "run_id": entry["run_id"], "method": entry["method"], "rank": entry["rank"],
        "status": status or entry.get("status"), "error": entry.get("error"),
        "trainable_params": entry.get("trainable_params"), "total_params": entry.get("total_params"),
        "trainable_pct": entry.get("trainable_pct"), "adapter_params": entry.get("adapter_params"),
        "head_params": entry.get("head_params"), "steps_done": hist[-1]["step"] if hist else 0,
        "final_loss": statistics.fmean(losses) if losses else None,
        "metric": metric,
        "eval_metric": (last_eval["metrics"].get(metric) if last_eval and metric else None),
        "eval_step": last_eval["step"] if last_eval else None,
        "best_step": (entry.get("best") or {}).get("step"),  # chosen on validation (val_samples > 0)
        "best_val_metric": (entry.get("best") or {}).get("val_metrics", {}).get(metric) if metric else None,
        "best_eval_metric": (entry.get("best") or {}).get("metrics", {}).get(metric) if metric else None,
        "median_step_s": statistics.median(step_s) if step_s else None,
        "peak_mem_mb": max(mems) if mems else None,
        "dM_row": None, "dM_col": None, "dD_row": None, "dD_col": None,
        "asymmetry_ratio": None, "dora_slope": None, "dora_r": None, "analysis_overhead_pct": None,
    }
    moved = [s for s in snaps if s.get("prev_step") is not None]
    if moved:
        from ..analysis.stats import asymmetry_ratio, dora_scatter_points, fit_line

        mean = moved[-1]["mean"]["from_start"]
        out.update({k: mean[k] for k in ("dM_row", "dM_col", "dD_row", "dD_col")})
        out["asymmetry_ratio"] = asymmetry_ratio(mean["dM_row"], mean["dM_col"])
        pts = dora_scatter_points(snaps, axis="row")
        fit = fit_line([p[0] for p in pts], [p[1] for p in pts])
        out["dora_slope"], out["dora_r"] = fit["slope"], fit["pearson_r"]
    if snaps and step_s:
        out["analysis_overhead_pct"] = 100.0 * sum(s.get("cost_s", 0.0) for s in snaps) / sum(step_s)
    return out


def fold(cfg: Any, events: Any) -> ResultsAccumulator:
    """An accumulator that has folded ``events`` (e.g. a list from ``engine.compare(cfg)``)."""
    acc = ResultsAccumulator(cfg)
    for ev in events:
        acc.update(ev)
    return acc
