"""Presets: named settings of a registered method, not methods of their own.

DoRA† (Liu et al., 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv:2402.09353, table 1:
"the adjusted version of DoRA with the rank halved") is DoRA at half the rank, so it has about
half of DoRA's trainable parameters. A UI or CLI offers the preset names
next to :func:`bora_lab.methods.available` and calls :func:`resolve_preset` before building.
"""
from __future__ import annotations

import math
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "dora_dagger": {
        "method": "dora",
        "rank_factor": 0.5,
        "label": "DoRA†",
        "description": "DoRA† : DoRA with half the rank (DoRA paper table 1), about half the parameters",
    },
}


def resolve_preset(name: str, rank: int) -> tuple[str, int]:
    """The method and rank a preset stands for; a name that is not a preset passes through.

    The rank is ``rank · rank_factor`` rounded half up, at least 1 (DoRA† at rank 8 is DoRA at rank 4).

    Args:
        name: a preset name (``"dora_dagger"``) or a method name.
        rank: the rank the user chose.

    Returns:
        ``(method, rank)`` to hand to :func:`bora_lab.methods.apply` or ``wrap``.
    """
    preset = PRESETS.get(name)
    if preset is None:
        return name, rank
    return preset["method"], max(1, math.floor(rank * preset.get("rank_factor", 1.0) + 0.5))
