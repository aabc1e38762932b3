"""Weight analysis: magnitude/direction changes (BoRA eq. 5-6), DoRA figure 2, spectra.

``stats`` is plain Python (the plots use it without torch); ``weights`` holds the torch functions.
Names are resolved lazily so that importing ``bora_lab.analysis.stats`` does not import torch.
"""
from __future__ import annotations

import importlib

_WEIGHTS = ("AXES", "METRICS", "WeightTracker", "axis_norms", "delta_d", "delta_m", "effective_rank",
            "md_changes", "md_changes_batch")
_STATS = ("asymmetry_ratio", "dora_scatter_points", "fit_line")
__all__ = sorted(_WEIGHTS + _STATS)


def __getattr__(name: str):
    if name in _WEIGHTS:
        return getattr(importlib.import_module(".weights", __name__), name)
    if name in _STATS:
        return getattr(importlib.import_module(".stats", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
