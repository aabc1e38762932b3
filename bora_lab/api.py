"""The Python API in one import: train a comparison, get its results, save it with its figures.

    from bora_lab.api import RunConfig, run
    results = run(RunConfig(task="synthetic_col", methods=["lora", "dora", "bora"]), out_dir="runs/demo")

``run`` is ``bora_lab.engine.run`` plus the standalone ``figures.html`` report in ``out_dir`` (the
engine itself knows nothing of figures). For the live event stream use ``compare`` and fold it
with ``bora_lab.record.ResultsAccumulator``.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import RunConfig
from .engine.trainer import compare
from .engine.trainer import run as _run
from .record import load_results, results_table

__all__ = ["RunConfig", "compare", "load_results", "results_table", "run"]


def run(cfg: RunConfig, cancel: threading.Event | None = None, on_event: Callable[[Any], None] | None = None,
        out_dir: str | os.PathLike | None = None, html: bool = True) -> dict[str, Any]:
    """Train ``cfg`` to the end and return the results dict (what ``results.json`` holds).

    With ``out_dir``: results.json, config.json, steps.csv, the layer checkpoints, exported weights
    (``cfg.export_weights``) and, unless ``html`` is False, figures.html.
    """
    results = _run(cfg, cancel=cancel, on_event=on_event, out_dir=out_dir)
    if out_dir is not None and html:
        from .figures import report_html

        (Path(out_dir) / "figures.html").write_text(report_html(results), encoding="utf-8")
    return results
