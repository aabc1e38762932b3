"""A claim's value as text, with its interval (the command line and the app show it alike)."""
from __future__ import annotations

from typing import Any


def format_value(ours: dict[str, Any] | None, unit: str = "") -> str:
    """``"4.04 [3.45, 4.62] (n=3)"`` for an interval, ``"2.318"`` for an exact value, ``"—"`` for none."""
    if not ours:
        return "—"
    if ours.get("exact"):
        return f"{ours['value']:.4g}"
    digits = 2 if abs(ours["mean"]) >= 1 or unit == "accuracy points" else 3
    if ours.get("low") is None:
        return f"{ours['mean']:.{digits}f} (n={ours['n']})"
    return f"{ours['mean']:.{digits}f} [{ours['low']:.{digits}f}, {ours['high']:.{digits}f}] (n={ours['n']})"
