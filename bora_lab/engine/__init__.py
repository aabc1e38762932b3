"""Training: tasks, the headless trainer and its events, results files.

The heavy modules (torch, transformers) load on first use, so ``from bora_lab.engine import events``
and ``from bora_lab.record import load_results`` stay cheap for the UI.

    from bora_lab.engine import compare, run, RunConfig
"""
from __future__ import annotations

from typing import Any

from ..config import RunConfig

_LAZY = {
    "compare": "trainer", "run": "trainer", "validate": "trainer",
    "ResultsAccumulator": "results", "save_results": "results", "load_results": "results",
    "list_results": "results", "summarize": "results",
    "TASKS": "tasks", "available_tasks": "tasks", "get_task_spec": "tasks", "load_task": "tasks",
    "task_defaults": "tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RunConfig", *list(_LAZY)]  # noqa: PLE0604
