"""Plain-Python statistics of the analysis (no torch): the DoRA figure-2 fit and the asymmetry ratio.

Kept apart from ``weights.py`` so the plots and results code can use them without importing torch.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def fit_line(x: Iterable[float], y: Iterable[float]) -> dict:
    """Least-squares line ``y ≈ slope * x + intercept`` and Pearson r.

    Pairs where either value is not finite (NaN/inf/None) are dropped first.

    Args:
        x: abscissas (e.g. ΔD values).
        y: ordinates (e.g. ΔM values), same length as ``x``.

    Returns:
        ``{"slope", "intercept", "pearson_r", "n"}`` with ``n`` the number of pairs used.
        Fewer than 2 pairs or (numerically) constant ``x``: slope, intercept and r are None.
        Constant ``y`` (x varying): slope 0.0, intercept mean(y), r None (undefined).
    """
    pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if None not in (a, b)]
    pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)]
    n = len(pts)
    res = {"slope": None, "intercept": None, "pearson_r": None, "n": n}
    if n < 2:
        return res
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((a - mx) ** 2 for a in xs)
    syy = math.fsum((b - my) ** 2 for b in ys)
    sxy = math.fsum((a - mx) * (b - my) for a, b in pts)
    # "Constant" relative to the data's scale: rounding in the mean leaves ~1e-16 residues.
    if sxx <= n * (1e-12 * max(map(abs, xs))) ** 2:
        return res
    if syy <= n * (1e-12 * max(map(abs, ys))) ** 2:
        return {**res, "slope": 0.0, "intercept": my}
    slope, r = sxy / sxx, max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    return {**res, "slope": slope, "intercept": my - slope * mx, "pearson_r": r}


def dora_scatter_points(
    snapshots: Sequence[dict],
    axis: str = "row",
    modules: Sequence[str] | None = None,
    include_start: bool = False,
) -> list[tuple[float, float, int, int]]:
    """DoRA figure 2 points ``(ΔD(t,0), ΔM(t,0))`` per layer and checkpoint.

    Args:
        snapshots: dicts returned by ``WeightTracker.snapshot``.
        axis: magnitude axis of both ΔD and ΔM: ``"row"`` (per output feature, PEFT's DoRA) or
            ``"col"`` (per input feature).
        modules: keep only these module names (default: all).
        include_start: also emit the all-zero points of the start snapshot (``prev_step`` None),
            which otherwise pull the regression line through the origin.

    Returns:
        ``[(dD, dM, layer_idx, step), ...]`` where ``layer_idx`` is the module's position in the
        snapshot's ``"modules"`` list; ordered by snapshot, then module.
    """
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    points = []
    for snap in snapshots:
        if snap.get("prev_step") is None and not include_start:
            continue
        fs = snap["from_start"]
        for i, name in enumerate(snap["modules"]):
            if modules is None or name in modules:
                points.append((fs[f"dD_{axis}"][i], fs[f"dM_{axis}"][i], i, snap["step"]))
    return points


def asymmetry_ratio(dM_row: float, dM_col: float, eps: float = 1e-12) -> float:
    """``(ΔM_row + eps) / (ΔM_col + eps)``, from the start: > 1 means the per-output-feature norms
    moved more than the per-input-feature norms. Both zero gives 1.0; never divides by zero."""
    return (float(dM_row) + eps) / (float(dM_col) + eps)
