"""Equal budgets: each method's rank chosen so its trainable parameters match a reference method's.

The BoRA paper compares methods at matched trainable parameters (Wang et al. 2024, arXiv:2412.06441,
table 3: LoRA r=66, DoRA r=65, BoRA r=64 on LLaMA). :func:`match_ranks` does the same on any model:
for each rank ``r`` of the reference, every other method with a rank gets the largest rank whose
adapter parameter count (the analytic ``num_params`` summed over the target layers; the task head is
left out, as in the papers) is not above the reference's at ``r``. Methods without a rank keep their
one configuration and are reported with their count.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from . import registry
from .whole_model import default_targets, find_targets


def _shapes(model: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every target layer (a GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    out = []
    for name in find_targets(model, targets):
        m = model.get_submodule(name)
        w = m.weight
        out.append((w.shape[0], w.shape[1]) if type(m).__name__ == "Conv1D" else (w.shape[1], w.shape[0]))
    return out


def adapter_count(shapes: list[tuple[int, int]], method: str, rank: int, alpha: float = 16.0,
                  **options: Any) -> int:
    """Trainable parameters of a layer-level ``method`` at ``rank`` over layers of ``shapes``."""
    cls = registry.get(method)
    cfg = registry.make_config(method, rank=rank, alpha=alpha, **options)
    return sum(cls.num_params(d_in, d_out, cfg) for d_in, d_out in shapes)


def match_ranks(model: nn.Module, methods: list[str], reference: str, ranks: list[int], alpha: float = 16.0,
                target_modules: list[str] | None = None,
                options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ranks that match ``reference``'s trainable parameters at each of ``ranks``.

    Returns:
        ``{"reference", "targets", "table": [{"method", "reference_rank", "rank", "params",
        "reference_params"}], "ranks": {method: [matched rank per reference rank]}}``. A layer method
        that cannot get below the reference even at rank 1 gets rank 1 (and the table shows it above).

    Raises:
        ValueError: ``reference`` is not a layer-level method with a rank.
    """
    options = options or {}
    ref_cls = registry.get(reference)
    if ref_cls.kind != "layer" or not ref_cls.uses_rank:
        raise ValueError(f"match the parameters of a layer-level method with a rank, not {reference!r}")
    targets = list(target_modules or default_targets(model))
    shapes = _shapes(model, targets)
    top = min(min(s) for s in shapes)
    table, matched = [], {}
    for r in ranks:
        ref = adapter_count(shapes, reference, r, alpha, **options.get(reference, {}))
        for m in methods:
            cls = registry.get(m)
            if cls.kind != "layer" or not cls.uses_rank:
                continue
            count = lambda k: adapter_count(shapes, m, k, alpha, **options.get(m, {}))  # noqa: E731
            lo, hi = 1, top  # counts grow with the rank: the largest k with count(k) <= ref
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(mid) <= ref else (lo, mid - 1)
            matched.setdefault(m, []).append(lo)
            table.append({"method": m, "reference_rank": r, "rank": lo, "params": count(lo), "reference_params": ref})
    return {"reference": reference, "targets": targets, "table": table,
            "ranks": {m: list(dict.fromkeys(rs)) for m, rs in matched.items()}}
