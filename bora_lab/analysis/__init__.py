"""Weight analysis: magnitude/direction changes (BoRA eq. 5-6), DoRA figure 2, spectra."""
from bora_lab.analysis.weights import (
    AXES,
    METRICS,
    WeightTracker,
    asymmetry_ratio,
    axis_norms,
    delta_d,
    delta_m,
    dora_scatter_points,
    effective_rank,
    fit_line,
    md_changes,
    md_changes_batch,
)

__all__ = [
    "AXES",
    "METRICS",
    "WeightTracker",
    "asymmetry_ratio",
    "axis_norms",
    "delta_d",
    "delta_m",
    "dora_scatter_points",
    "effective_rank",
    "fit_line",
    "md_changes",
    "md_changes_batch",
]
