"""A comparison on disk: ``results.json``, ``config.json``, ``steps.csv``, weights and layer checkpoints.

Writing figures is not done here (this package knows nothing of plotting): callers pass the page
that ``bora_lab.figures.report_html`` renders, if they want one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

from .accumulator import SCHEMA_VERSION
from .layer_store import LayerStore, json_safe


def _csv_rows(results: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    metric_names = sorted({k for r in results["runs"] for e in r["eval"] for k in e["metrics"]})
    header = ["run_id", "method", "rank", "step", "loss", "lr", "step_s", "peak_mem_mb"]
    header += [f"eval_{k}" for k in metric_names]
    rows = []
    for run in results["runs"]:
        evals = {e["step"]: e["metrics"] for e in run["eval"]}
        for h in run["history"]:
            row = {"run_id": run["run_id"], "method": run["method"], "rank": run["rank"], **h}
            for k in metric_names:
                row[f"eval_{k}"] = evals.get(h["step"], {}).get(k, "")
            rows.append(row)
    return header, rows


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader (History,
    while the app checkpoints a run) or a crash mid-write never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ADAPTERS_DIR = "adapters"
# Keys of ``AdapterState.tensors`` under this prefix are the copy taken at the best validation evaluation
# (``RunState.adapter_state``); module names never contain "/", so they cannot clash with the end tensors.
BEST_PREFIX = "best/"


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_adapters(adapters: dict[str, Any], out_dir: str | Path) -> None:
    """``adapters/<run_id>/adapter.safetensors`` (trained tensors at the end), ``adapter_best.safetensors``
    (the same tensors at the best validation evaluation, when the comparison has a validation split) and
    ``adapter_config.json`` (method, options, targets, head, step, ``best_step``) for every run's
    ``AdapterState`` that kept its tensors."""
    for run_id, ev in adapters.items():
        folder = Path(out_dir) / ADAPTERS_DIR / run_id
        folder.mkdir(parents=True, exist_ok=True)
        tensors = ev.tensors or {}
        best = {k[len(BEST_PREFIX):]: v for k, v in tensors.items() if k.startswith(BEST_PREFIX)}
        if ev.tensors is not None:
            _save_tensors({k: v for k, v in tensors.items() if not k.startswith(BEST_PREFIX)},
                          folder / "adapter.safetensors")
        if best:
            _save_tensors(best, folder / "adapter_best.safetensors")
        else:
            (folder / "adapter_best.safetensors").unlink(missing_ok=True)
        config = {k: v for k, v in ev.config.items() if best or k != "best_step"}
        _write_atomic(folder / "adapter_config.json", json.dumps(json_safe(
            {"run_id": run_id, "step": ev.step, "saved": ev.tensors is not None, "reason": ev.reason,
             **config}), indent=1, default=str))


def save_results(results: dict[str, Any], out_dir: str | Path, weights: dict[str, Any] | None = None,
                 layers: LayerStore | None = None, figures_html: str | None = None,
                 adapters: dict[str, Any] | None = None) -> Path:
    """Write a comparison to ``out_dir``.

    Files: ``results.json`` (the results dict), ``config.json`` (the RunConfig), ``steps.csv``
    (one row per run and step: run_id, method, rank, step, loss, lr, step_s, peak_mem_mb and
    ``eval_<metric>`` where an eval happened at that step), ``figures.html`` when ``figures_html``
    is given (``bora_lab.figures.report_html(results)``), and with ``weights`` (``ComparisonDone.weights``)
    ``weights/<run_id>/weights_start.safetensors`` and ``weights_end.safetensors`` keyed by module name,
    with ``adapters`` (``ResultsAccumulator.adapters``) each run's trained tensors under ``adapters/``
    (:func:`save_adapters`; reload with ``bora_lab.engine.reload.load_run``), and with ``layers``
    (``ResultsAccumulator.layers``) the layer checkpoints under ``layers/``
    (:mod:`bora_lab.record.layer_store`).

    Returns:
        The folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(json_safe(results), indent=1, allow_nan=False))
    _write_atomic(out / "config.json", json.dumps(results.get("config", {}), indent=1))
    header, rows = _csv_rows(results)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "steps.csv", buffer.getvalue())
    if weights:
        from safetensors.torch import save_file

        for run_id, pair in weights.items():
            folder = out / "weights" / run_id
            folder.mkdir(parents=True, exist_ok=True)
            for when, tensors in pair.items():
                if tensors:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"weights_{when}.safetensors"))
    if layers:
        layers.save(out)
    if adapters:
        save_adapters(adapters, out)
    if figures_html is not None:
        _write_atomic(out / "figures.html", figures_html)
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` from a folder written by :func:`save_results` (or the file itself).

    Raises:
        FileNotFoundError: no results.json there.
        ValueError: the file is not a BoRA Lab results file of a known schema version.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"no results.json at {p}")
    results = json.loads(p.read_text())
    if not isinstance(results, dict) or "runs" not in results:
        raise ValueError(f"{p} is not a BoRA Lab results file")
    if results.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{p} has schema version {results['schema_version']}; this BoRA Lab reads <= {SCHEMA_VERSION}")
    return results


def list_results(root: str | Path = "runs") -> list[dict[str, Any]]:
    """Saved comparisons under ``root`` (newest first): path, created, task, methods, ranks, status."""
    found = []
    for f in Path(root).glob("*/results.json"):
        try:
            r = load_results(f)
        except (ValueError, OSError):
            continue
        cfg = r.get("config", {})
        found.append({"path": str(f.parent), "created": r.get("created"), "task": cfg.get("task"),
                      "model": cfg.get("model"), "methods": cfg.get("methods"), "ranks": cfg.get("ranks"),
                      "status": r.get("status")})
    return sorted(found, key=lambda d: d["created"] or "", reverse=True)
