"""Identical comparisons are computed once.

A comparison is deterministic for a given configuration (every run is seeded), so the app keys each
comparison by a hash of its ``RunConfig`` (:func:`config_key`) and stores the key in its run folder.
A visitor who asks for settings that finished before gets that folder at once (its results, plots
and table; it joins their History as a reference, nothing is copied); one who asks for settings
that are training or queued right now watches that comparison live (``bora_lab.ui.tab_compare``).

Only comparisons that finished with every run done are reused: a stopped, interrupted or failed one
(an out-of-memory error depends on the moment) trains again. ``BORA_LAB_REUSE_RUNS=0`` turns reuse
off (``bora_lab.limits.reuse_runs``), e.g. to time the same comparison twice.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bora_lab import __version__
from bora_lab.config import RunConfig

KEY_FILE = ".config_key"  # in each run folder the app creates: the config_key of its settings
# Settings that change how fast a comparison runs, never the numbers it computes.
NOT_NUMERIC = ("num_threads",)


def config_key(cfg: RunConfig) -> str:
    """A hash of everything in ``cfg`` that changes the results (and of BoRA Lab's version).

    Two configurations get the same key exactly when their ``to_dict()`` agree on every field outside
    :data:`NOT_NUMERIC` and their run plans (each run's seed and learning rate) agree; a new BoRA Lab
    version starts a fresh cache (its code may compute otherwise).
    """
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_NUMERIC}
    plan = cfg.run_plan()  # each run's seed and rate: the suggested rates may change between versions
    blob = json.dumps({"bora_lab": __version__, "config": settings, "plan": plan}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def mark(folder: Path, key: str) -> None:
    """Record ``key`` in a run folder, so that later visitors (and a restarted app) find it."""
    (folder / KEY_FILE).write_text(key)


def reusable(results: dict) -> bool:
    """Whether a results dict may stand for its settings: finished, with every run done."""
    runs = results.get("runs") or []
    return results.get("status") == "done" and bool(runs) and all(r.get("status") == "done" for r in runs)


def cached_folder(key: str, root: Path) -> Path | None:
    """The newest run folder under ``root`` that finished ``key``'s settings with every run done."""
    from bora_lab.record import load_results

    if not root.is_dir():
        return None
    found = []
    for mark_file in root.glob(f"*/{KEY_FILE}"):
        try:
            if mark_file.read_text().strip() != key or not (mark_file.parent / "results.json").is_file():
                continue
            if reusable(load_results(mark_file.parent)):
                found.append(mark_file.parent)
        except Exception:  # noqa: BLE001 - a half-written or foreign folder is simply not reused
            continue
    return max(found, key=lambda p: (p / "results.json").stat().st_mtime, default=None)
