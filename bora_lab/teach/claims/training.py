"""Claims checked by training: a comparison with several seeds, then our value with its 95% interval.

Every check reads the comparison's results the way the app shows them: the seed aggregate of
``bora_lab.record.aggregate`` (t intervals over seeds; paired differences against a baseline, on seeds
and test examples), the ΔM/ΔD snapshots, the step times and the layer checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bora_lab.analysis.intervals import mean_interval
from bora_lab.config import RunConfig


def claim_config(claim: dict[str, Any], seeds: list[int] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The comparison a training claim runs: its settings, then ``overrides``, with its (or the given) seeds."""
    from bora_lab.config import lr_choice
    from bora_lab.engine.tasks import task_defaults

    exp = claim["experiment"]
    chosen = lr_choice({**exp["settings"], **(overrides or {})}, overrides or {})
    settings = {**task_defaults(chosen.get("task", RunConfig.task)), **chosen}  # as the CLI: the task's suggestions
    return RunConfig(**{**settings, "seeds": list(seeds or exp["seeds"])})


def cache_dir(cfg: RunConfig) -> Path:
    """Where the comparison of ``cfg`` is kept: ``$BORA_LAB_CLAIMS_CACHE`` (default ``$BORA_LAB_RUNS/claims``,
    else ``runs/claims``) / its :meth:`~bora_lab.config.RunConfig.results_key`.
    Several claims share one comparison (the catalogue gives them the same settings): it trains once."""
    root = os.environ.get("BORA_LAB_CLAIMS_CACHE") or os.path.join(os.environ.get("BORA_LAB_RUNS", "runs"), "claims")
    return Path(root) / cfg.results_key()[:16]


def cached_results(folder: Path) -> dict[str, Any] | None:
    """The finished comparison saved in ``folder``, or None (absent, unfinished or unreadable)."""
    from bora_lab.record import load_results

    try:
        results = load_results(folder)
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "done" else None


def budget_text(cfg: RunConfig, results: dict[str, Any]) -> str:
    runs = results.get("runs", [])
    rates = sorted({r.get("lr") for r in runs if r.get("lr")})
    layers = "all layers" if not cfg.num_layers else f"{cfg.num_layers} layers"
    return (f"{cfg.model} ({layers}) on {cfg.task}: {len(runs)} runs ({', '.join(dict.fromkeys(r['method'] for r in runs))}; "
            f"seeds {', '.join(map(str, cfg.run_seeds()))}), {cfg.steps} steps × batch {cfg.batch_size} × {cfg.max_length} "
            f"tokens, learning rate{'s' if len(rates) > 1 else ''} {', '.join(f'{x:g}' for x in rates)}, "
            f"{results.get('elapsed_s', 0):.0f} s on {results.get('device', 'cpu')}")


def _interval(values: list[float]) -> dict[str, Any] | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")]
    if not values:
        return None
    iv = mean_interval(values)
    return {"mean": iv["mean"], "low": iv.get("low"), "high": iv.get("high"), "n": len(values)}


def _runs(results: dict[str, Any], method: str) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["method"] == method and r.get("status") == "done"]


def _within(iv: dict | None, lo: float, hi: float) -> str:
    """"inside" when the interval lies in [lo, hi], "outside" when it misses it, else "overlaps"."""
    if not iv or iv.get("low") is None:
        return "overlaps"
    if iv["low"] >= lo and iv["high"] <= hi:
        return "inside"
    return "outside" if iv["high"] < lo or iv["low"] > hi else "overlaps"


def _step_ratio(run: dict[str, Any]) -> float | None:
    """ΔM row / ΔM col step to step: the mean over snapshots of each axis, then their ratio."""
    snaps = [a["mean"]["step_to_step"] for a in run.get("analysis", []) if a.get("prev_step") is not None]
    rows, cols = [s["dM_row"] for s in snaps], [s["dM_col"] for s in snaps]
    return sum(rows) / sum(cols) if snaps and sum(cols) > 0 else None


def _asymmetry(claim, results) -> tuple[list[dict], str]:
    exp = claim["experiment"]
    far = float(exp.get("far", 1.5))
    rows = []
    for method in exp["asymmetric"] + exp["symmetric"]:
        runs = _runs(results, method)
        for view, values in (("from the start", [r["summary"].get("asymmetry_ratio") for r in runs]),
                             ("step to step", [_step_ratio(r) for r in runs])):
            iv = _interval(values)
            where = _within(iv, 1 / far, far)
            if method in exp["asymmetric"]:
                v = {"outside": "reproduced", "inside": "opposite"}.get(where, "not reproduced at this scale")
                expect = f"outside [{1 / far:.2f}, {far:g}]"
            else:
                v = {"inside": "reproduced", "outside": "opposite"}.get(where, "not reproduced at this scale")
                expect = f"inside [{1 / far:.2f}, {far:g}]"
            rows.append({"label": f"{method}: ΔM row / ΔM col, {view}", "paper": expect, "ours": iv, "unit": "ratio",
                         "verdict": v})
    return rows, (f"A ratio counts as asymmetric when its 95% interval lies outside [{1 / far:.2f}, {far:g}] and as "
                  "symmetric when it lies inside (ΔM averaged over the analysed query layers).")


def _slopes(claim, results) -> tuple[list[dict], str]:
    rows = []
    for method, sign in claim["experiment"]["expected"].items():
        iv = _interval([r["summary"].get("dora_slope") for r in _runs(results, method)])
        where = "overlaps" if not iv or iv["low"] is None else (
            "negative" if iv["high"] < 0 else "positive" if iv["low"] > 0 else "overlaps")
        v = "reproduced" if where == sign else "opposite" if where != "overlaps" else "not reproduced at this scale"
        rows.append({"label": f"{method}: slope of ΔM against ΔD", "paper": sign, "ours": iv, "unit": "slope", "verdict": v})
    return rows, ("Least-squares slope of ΔM(t, 0) against ΔD(t, 0) over analysed layers and checkpoints (row axis, "
                  "DoRA's magnitude axis), per run; the interval is over seeds.")


def _group(agg: dict[str, Any], name: str) -> dict[str, Any]:
    for g in agg["groups"]:
        if g["key"] == name:
            return g
    for g in agg["groups"]:
        if g["method"] == name:
            return g
    raise ValueError(f"no run group {name!r} in this comparison")


def _difference(claim, results) -> tuple[list[dict], str]:
    from bora_lab.record.aggregate import aggregate

    exp = claim["experiment"]
    margin = float(exp.get("margin_points", 2.0))
    rows = []
    for a, b, expect in exp["pairs"]:
        base = _group(aggregate(results), b)["key"]
        agg = aggregate(results, baseline=base)
        ga = _group(agg, a)
        d = ga.get("vs_baseline")
        iv = None if not d else {"mean": 100 * d["difference"], "low": 100 * d["low"], "high": 100 * d["high"],
                                 "n": len(d.get("seeds", []))}
        if iv is None or iv["low"] == iv["high"]:  # identical predictions on every seed: the runs did not separate
            v = "not reproduced at this scale"
        elif expect == "greater":
            v = "reproduced" if iv["low"] > 0 else "opposite" if iv["high"] < 0 else "not reproduced at this scale"
        else:  # comparable: the interval holds zero and stays within the margin
            v = ("reproduced" if -margin <= iv["low"] and iv["high"] <= margin and iv["low"] <= 0 <= iv["high"] else
                 "not reproduced" if iv["low"] > 0 or iv["high"] < 0 else "not reproduced at this scale")
        paper = claim["paper_value"]["rows"].get(f"{a.split('-')[0]} - {b.split('-')[0]}") or \
            claim["paper_value"]["rows"].get(a.split("-")[-1]) or ("a > b" if expect == "greater" else "about 0")
        rows.append({"label": f"{ga['key']} − {base}: test accuracy", "paper": paper, "ours": iv,
                     "unit": "accuracy points", "verdict": v})
    for g in aggregate(results)["groups"]:
        st = g["stats"].get("eval_metric")
        if st:
            rows.append({"label": f"{g['key']}: test accuracy (context)", "paper": "", "unit": "accuracy",
                         "ours": {"mean": st["mean"], "low": st.get("low"), "high": st.get("high"), "n": g["n"]},
                         "verdict": ""})
    return rows, ("Differences are paired on seeds and test examples (the wider of a two-level bootstrap and a paired "
                  f"t interval). 'Comparable' needs the interval to hold 0 and stay within ±{margin:g} points; the paper "
                  "scores MT-Bench answers of 7B models, we score test accuracy of the offline model.")


def _step_time(claim, results) -> tuple[list[dict], str]:
    import statistics

    exp = claim["experiment"]
    tol = float(exp.get("tolerance", 0.15))
    median = {}
    for r in results["runs"]:
        times = [h["step_s"] for h in r.get("history", [])[2:] if h.get("step_s")]
        if r.get("status") == "done" and times:
            median[(r["method"], r.get("seed"))] = statistics.median(times)
    rows = []
    for method, paper in exp["ratios"].items():
        ratios = [median[(method, s)] / median[("lora", s)] for (m, s) in median if m == method and ("lora", s) in median]
        iv = _interval(ratios)
        v = ("not reproduced at this scale" if not iv else "opposite" if iv["high"] is not None and iv["high"] < 1 else
             "reproduced" if _within(iv, paper - tol, paper + tol) != "outside" else "not reproduced at this scale")
        rows.append({"label": f"{method} / lora: time per step", "paper": paper, "ours": iv, "unit": "×", "verdict": v})
    return rows, (f"Median step time of steps 3 onwards, one model copy per run, runs interleaved step by step; the ratio "
                  f"to LoRA's per seed. An interval that reaches within ±{tol:g} of the paper's ratio counts as reproduced.")


def _update_rank(claim, results, out_dir: Path) -> tuple[list[dict], str]:
    import numpy as np

    from bora_lab.record.layer_store import LayerStore

    tol = float(claim["experiment"].get("relative_tolerance", 0.01))
    store = LayerStore.load(out_dir)
    ranks: dict[str, list[float]] = {}
    for r in results["runs"]:
        if r.get("status") != "done" or r["run_id"] not in store.run_ids():
            continue
        last = store.steps(r["run_id"])[-1]
        per_module = []
        for module in store.modules(r["run_id"]):
            s = np.linalg.svd(store.delta(r["run_id"], last, module).astype(np.float64), compute_uv=False)
            per_module.append(int((s > tol * s[0]).sum()) if s[0] > 0 else 0)
        ranks.setdefault(r["method"], []).append(float(np.mean(per_module)))
    rank = claim["experiment"]["settings"]["ranks"][0]
    lora, mora = _interval(ranks.get("lora", [])), _interval(ranks.get("mora", []))
    rows = [{"label": "lora: rank of ΔW", "paper": f"≤ {rank}", "ours": lora, "unit": "rank",
             "verdict": "reproduced" if lora and lora["mean"] <= rank else "opposite"},
            {"label": "mora: rank of ΔW", "paper": f"> {rank} (up to r̂)", "ours": mora, "unit": "rank",
             "verdict": ("reproduced" if mora and (mora["low"] if mora["low"] is not None else mora["mean"]) > rank else
                         "opposite" if mora and mora["mean"] <= rank else "not reproduced at this scale")}]
    return rows, (f"Numerical rank of each analysed layer's ΔW at the last checkpoint (singular values above {tol:g} × "
                  "the largest; ΔW is stored in float16), averaged over the layers; the interval is over seeds.")


def run(claim: dict[str, Any], *, seeds: list[int] | None, overrides: dict[str, Any],
        cancel: threading.Event | None = None, on_event: Callable[[Any], None] | None = None,
        out_dir: str | Path | None = None) -> dict[str, Any]:
    """The record body of a training claim (see :func:`bora_lab.teach.claims.reproduce`)."""
    from bora_lab.engine.trainer import run as train

    from . import ClaimError, combine

    cfg = claim_config(claim, seeds, overrides)
    kind = claim["experiment"]["kind"]
    folder = Path(out_dir) if out_dir else cache_dir(cfg)
    results = cached_results(folder) if kind != "step_time" else None  # time is measured afresh, never cached
    if results is None:
        shutil.rmtree(folder / "layers", ignore_errors=True)  # an unfinished earlier attempt
        results = train(cfg, cancel=cancel, on_event=on_event, out_dir=folder)
    if results.get("status") != "done":
        raise ClaimError(f"the experiment did not finish ({results.get('status')}: {results.get('message') or ''}); "
                         f"nothing is recorded; its runs are in {folder}")
    if kind == "update_rank":
        rows, how = _update_rank(claim, results, folder)
    else:
        rows, how = {"asymmetry": _asymmetry, "slopes": _slopes, "difference": _difference,
                     "step_time": _step_time}[kind](claim, results)
    verdict = combine([r["verdict"] for r in rows if r["verdict"]])
    changed = {k: v for k, v in (overrides or {}).items() if claim["experiment"]["settings"].get(k) != v}
    note = f" Changed from the catalogue: {changed}." if changed else ""
    return {"rows": rows, "verdict": verdict, "explanation": how + note, "budget": budget_text(cfg, results),
            "seeds": cfg.run_seeds(), "config": dataclasses.asdict(cfg)}
