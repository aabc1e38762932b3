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
from pathlib import Path

from bora_lab import __version__
from bora_lab.config import RunConfig

KEY_FILE = ".config_key"  # in each run folder the app creates: the config_key of its settings


def config_key(cfg: RunConfig) -> str:
    """:meth:`RunConfig.results_key` with BoRA Lab's version: a new version starts a fresh cache (its code
    may compute otherwise)."""
    return hashlib.sha256(f"{__version__}:{cfg.results_key()}".encode()).hexdigest()[:32]


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
