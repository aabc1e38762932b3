"""Magnitude / direction analysis of weight matrices (BoRA eq. 5-6, DoRA figure 2).

Conventions (``design/methods.md``): a weight is ``[out, in]``. Axis ``"row"`` means the ``out``
vectors ``W[i, :]`` (norms ``W.norm(dim=1)``), axis ``"col"`` means the ``in`` vectors ``W[:, j]``
(norms ``W.norm(dim=0)``). For two weights ``W_a``, ``W_b`` of one layer and an axis ``d``::

    dM(a, b, d) = mean_i | ||W_a^(i,d)|| - ||W_b^(i,d)|| |          (BoRA eq. 5)
    dD(a, b, d) = mean_i (1 - cos(W_a^(i,d), W_b^(i,d)))            (BoRA eq. 6)

Numerics: everything runs in float32 (bf16/fp16 inputs are upcast; float64 stays float64) using
cancellation-free forms of the same quantities::

    ||a|| - ||b|| = <a - b, a + b> / (||a|| + ||b||)
    1 - cos(a, b) = || a/||a|| - b/||b|| ||^2 / 2

so step-to-step changes far below float32's ~1e-7 resolution of ``cos`` are still resolved.
Zero vectors (norm <= eps): if both are zero the direction change is 0; if exactly one is zero it
is 1 (cos taken as 0, as ``torch.nn.functional.cosine_similarity`` does). Nothing returns NaN.

Benchmark (2-core CPU, torch 2.13, median of 20 ``WeightTracker.snapshot`` calls)::

    import time, torch
    from bora_lab.analysis import WeightTracker
    for L, n in [(6, 384), (30, 576)]:
        w = {f"q{i}": torch.randn(n, n) for i in range(L)}
        tr = WeightTracker(); tr.snapshot(0, w)
        t = []
        for s in range(1, 21):
            t0 = time.perf_counter(); tr.snapshot(s, w); t.append(time.perf_counter() - t0)
        print(L, n, f"{1e3 * sorted(t)[10]:.1f} ms")

gives about 2.6 ms for 6 x (384 x 384) and 96 ms for 30 x (576 x 576) (2 CPU threads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

AXES = ("row", "col")
METRICS = ("dM_row", "dM_col", "dD_row", "dD_col")


def _reduce_dim(axis: str) -> int:
    """Dimension reduced to get one norm per vector of ``axis`` (works for ``(..., out, in)``)."""
    if axis == "row":
        return -1
    if axis == "col":
        return -2
    raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")


def _as_float(W: Tensor) -> Tensor:
    """Detached view in at least float32 precision (bf16/fp16/int are upcast, float64 kept)."""
    W = W.detach()
    return W if W.dtype in (torch.float32, torch.float64) else W.float()


def axis_norms(W: Tensor, axis: str) -> Tensor:
    """Norms of the vectors of one axis.

    Args:
        W: weight ``(out, in)`` (or batched ``(..., out, in)``).
        axis: ``"row"`` -> ``W.norm(dim=1)`` of shape ``(out,)``; ``"col"`` -> ``W.norm(dim=0)``
            of shape ``(in,)``.

    Returns:
        The norms, in at least float32.
    """
    return _as_float(W).norm(dim=_reduce_dim(axis))


def _vector_changes(
    Wa: Tensor, Wb: Tensor, prod: Tensor, axis: str, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-vector ``| ||a|| - ||b|| |`` and ``1 - cos(a, b)``, each ``(..., h_d)``.

    ``prod = (Wa - Wb) * (Wa + Wb)`` is shared by both axes.
    """
    dim = _reduce_dim(axis)
    na, nb = Wa.norm(dim=dim), Wb.norm(dim=dim)  # (..., h_d)
    dnorm = prod.sum(dim) / (na + nb).clamp_min(eps)  # ||a|| - ||b||, no cancellation
    ua = Wa / na.unsqueeze(dim).clamp_min(eps)  # unit vectors (zero vectors stay ~0)
    ub = Wb / nb.unsqueeze(dim).clamp_min(eps)
    one_minus_cos = 0.5 * (ua - ub).square().sum(dim)  # (..., h_d)
    za, zb = na <= eps, nb <= eps
    one_minus_cos = torch.where(za & zb, 0.0, torch.where(za ^ zb, 1.0, one_minus_cos))
    return dnorm.abs(), one_minus_cos.clamp(0.0, 2.0)


@torch.no_grad()
def md_changes_batch(Wa: Tensor, Wb: Tensor, eps: float = 1e-8) -> dict[str, Tensor]:
    """ΔM and ΔD on both axes for a stack of same-shaped layers, in one pass.

    Args:
        Wa: weights ``(L, out, in)`` (any leading dims work), any float dtype.
        Wb: weights of the same shape, e.g. the same layers at another step.
        eps: vectors with norm <= eps count as zero vectors (see module docstring).

    Returns:
        ``{"dM_row", "dM_col", "dD_row", "dD_col"}`` -> tensor ``(L,)`` in float32 (float64 if
        both inputs are float64).
    """
    if Wa.shape != Wb.shape or Wa.dim() < 2:
        raise ValueError(f"need two (..., out, in) tensors of equal shape: {Wa.shape}, {Wb.shape}")
    Wa, Wb = _as_float(Wa), _as_float(Wb)
    if Wa.dtype != Wb.dtype:
        Wa, Wb = Wa.float(), Wb.float()
    prod = (Wa - Wb) * (Wa + Wb)  # (L, out, in)
    out: dict[str, Tensor] = {}
    for axis in AXES:
        dm, dd = _vector_changes(Wa, Wb, prod, axis, eps)  # (L, h_d) each
        out[f"dM_{axis}"] = dm.mean(-1)
        out[f"dD_{axis}"] = dd.mean(-1)
    return {k: out[k] for k in METRICS}


def md_changes(Wa: Tensor, Wb: Tensor, eps: float = 1e-8) -> dict[str, float]:
    """ΔM and ΔD on both axes for one layer.

    Args:
        Wa: weight ``(out, in)``.
        Wb: weight ``(out, in)``.
        eps: zero-vector threshold.

    Returns:
        ``{"dM_row", "dM_col", "dD_row", "dD_col"}`` -> float.
    """
    if Wa.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(Wa.shape)}")
    res = md_changes_batch(Wa.unsqueeze(0), Wb.unsqueeze(0), eps)
    values = torch.stack([res[k] for k in METRICS]).squeeze(-1).tolist()  # one device sync
    return dict(zip(METRICS, values))


@torch.no_grad()
def delta_m(Wa: Tensor, Wb: Tensor, axis: str) -> float:
    """BoRA eq. 5: ``mean_i | ||Wa^(i,axis)|| - ||Wb^(i,axis)|| |`` for one layer ``(out, in)``."""
    Wa, Wb = _as_float(Wa), _as_float(Wb)
    dm, _ = _vector_changes(Wa, Wb, (Wa - Wb) * (Wa + Wb), axis, 1e-8)
    return dm.mean().item()


@torch.no_grad()
def delta_d(Wa: Tensor, Wb: Tensor, axis: str, eps: float = 1e-8) -> float:
    """BoRA eq. 6: ``mean_i (1 - cos(Wa^(i,axis), Wb^(i,axis)))`` for one layer ``(out, in)``.

    Args:
        Wa: weight ``(out, in)``.
        Wb: weight ``(out, in)``.
        axis: ``"row"`` or ``"col"``.
        eps: vectors with norm <= eps are zero vectors (both zero -> 0, one zero -> 1).
    """
    Wa, Wb = _as_float(Wa), _as_float(Wb)
    _, dd = _vector_changes(Wa, Wb, (Wa - Wb) * (Wa + Wb), axis, eps)
    return dd.mean().item()


@dataclass
class _Group:
    """Modules sharing one shape and device, stored stacked as ``(L, out, in)`` float32."""

    index: list[int]  # positions in WeightTracker.modules
    start: Tensor  # (L, out, in) weights at the first snapshot
    prev: Tensor  # (L, out, in) weights at the previous snapshot


class WeightTracker:
    """Tracks ΔM/ΔD of a fixed set of weights from the start and step to step (BoRA fig. 2, 3).

    Per module it holds detached float32 copies (on the weights' device) of W at the first
    snapshot and at the previous snapshot. Modules with the same shape are stacked and measured
    in one batched call, so the cost is a copy plus a few elementwise passes per snapshot.

    ``snapshot(step, weights)`` returns a JSON-serialisable dict (plain ints, floats, lists)::

        {
          "step": int,                       # the step passed in
          "prev_step": int | None,           # step of the previous snapshot (None on the first)
          "modules": [name, ...],            # module order used by every list below
          "from_start":   {"dM_row": [float per module], "dM_col": [...],
                           "dD_row": [...], "dD_col": [...]},     # ΔX(t, 0)
          "step_to_step": {same keys},                            # ΔX(t, prev)
          "mean": {"from_start": {"dM_row": float, ...4 keys},    # mean over modules
                   "step_to_step": {...4 keys}},
        }

    The first call records the start and returns zeros everywhere. Later calls must pass the
    same module names with the same shapes (``ValueError`` otherwise); dict order of later calls
    does not matter.

    Example:
        tracker = WeightTracker()
        snap = tracker.snapshot(step, {name: layer.effective_weight() for name, layer in layers})
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next snapshot becomes the new start."""
        self.modules: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._groups: list[_Group] = []
        self._prev_step: int | None = None

    @property
    def started(self) -> bool:
        """Whether a start snapshot has been recorded."""
        return bool(self.modules)

    @torch.no_grad()
    def _stack(self, group: _Group, weights: Mapping[str, Tensor]) -> Tensor:
        """Copy the group's current weights into a fresh ``(L, out, in)`` float32 tensor."""
        cur = torch.empty_like(group.start)
        for row, i in enumerate(group.index):
            cur[row].copy_(weights[self.modules[i]].detach())
        return cur

    def _start(self, weights: Mapping[str, Tensor]) -> None:
        if not weights:
            raise ValueError("weights is empty")
        for name, w in weights.items():
            if w.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D weight, got {tuple(w.shape)}")
        self.modules = list(weights)
        self._shapes = {name: tuple(w.shape) for name, w in weights.items()}
        keys: dict[tuple, list[int]] = {}
        for i, name in enumerate(self.modules):
            keys.setdefault((self._shapes[name], weights[name].device), []).append(i)
        for (shape, device), index in keys.items():
            empty = torch.empty((len(index), *shape), dtype=torch.float32, device=device)
            group = _Group(index, empty, empty)
            group.start = group.prev = self._stack(group, weights)
            self._groups.append(group)

    def _check(self, weights: Mapping[str, Tensor]) -> None:
        if set(weights) != set(self.modules):
            raise ValueError(f"module names changed: {sorted(set(weights) ^ set(self.modules))}")
        for name, w in weights.items():
            if tuple(w.shape) != self._shapes[name]:
                raise ValueError(f"{name}: shape {tuple(w.shape)} != {self._shapes[name]}")

    def snapshot(self, step: int, weights: Mapping[str, Tensor]) -> dict:
        """Measure ``weights`` against the start and the previous snapshot, then store them.

        Args:
            step: training step of this snapshot (steps should increase).
            weights: module name -> current (merged/effective) weight ``(out, in)``, any dtype.

        Returns:
            The dict described in the class docstring.
        """
        n = len(weights)
        if not self.started:
            self._start(weights)
            self._prev_step = int(step)
            zeros = {k: [0.0] * n for k in METRICS}
            return self._result(step, None, zeros, {k: list(v) for k, v in zeros.items()})
        self._check(weights)
        views = {"from_start": {k: [0.0] * n for k in METRICS},
                 "step_to_step": {k: [0.0] * n for k in METRICS}}
        for group in self._groups:
            cur = self._stack(group, weights)  # (L, out, in)
            fs = md_changes_batch(group.start, cur, self.eps)
            ss = md_changes_batch(group.prev, cur, self.eps)
            table = torch.stack([fs[k] for k in METRICS] + [ss[k] for k in METRICS])  # (8, L)
            values = table.cpu().tolist()  # one device sync per group
            for m, key in enumerate(METRICS):
                for row, i in enumerate(group.index):
                    views["from_start"][key][i] = values[m][row]
                    views["step_to_step"][key][i] = values[m + len(METRICS)][row]
            group.prev = cur
        prev_step, self._prev_step = self._prev_step, int(step)
        return self._result(step, prev_step, views["from_start"], views["step_to_step"])

    def _result(self, step: int, prev_step: int | None, fs: dict, ss: dict) -> dict:
        mean = lambda d: {k: math.fsum(v) / len(v) for k, v in d.items()}  # noqa: E731
        return {"step": int(step), "prev_step": prev_step, "modules": list(self.modules),
                "from_start": fs, "step_to_step": ss,
                "mean": {"from_start": mean(fs), "step_to_step": mean(ss)}}


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
    pairs = [(float(a), float(b)) for a, b in zip(x, y, strict=True)
             if a is not None and b is not None]
    pts = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    n = len(pts)
    res = {"slope": None, "intercept": None, "pearson_r": None, "n": n}
    if n < 2:
        return res
    mx = math.fsum(p[0] for p in pts) / n
    my = math.fsum(p[1] for p in pts) / n
    sxx = math.fsum((a - mx) ** 2 for a, _ in pts)
    syy = math.fsum((b - my) ** 2 for _, b in pts)
    sxy = math.fsum((a - mx) * (b - my) for a, b in pts)
    # "Constant" relative to the data scale: rounding in the mean leaves ~1e-16 residues.
    tiny = lambda s, v: s <= n * (1e-12 * max(abs(t) for t in v)) ** 2  # noqa: E731
    if tiny(sxx, [p[0] for p in pts]):
        return res
    res["slope"] = sxy / sxx
    res["intercept"] = my - res["slope"] * mx
    if tiny(syy, [p[1] for p in pts]):
        res["slope"], res["intercept"] = 0.0, my
    else:
        res["pearson_r"] = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    return res


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
    _reduce_dim(axis)  # validate
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


@torch.no_grad()
def effective_rank(delta_W: Tensor) -> dict:
    """Spectrum summary of a weight update ``ΔW = W_t - W_0``.

    Args:
        delta_W: ``(out, in)``.

    Returns:
        ``{"singular_values": [float, ...] descending (min(out, in) values),
           "effective_rank": exp(entropy of p_k = s_k / sum(s)) (Roy & Vetterli 2007),
           "rank_at_99": smallest k with sum(s[:k]**2) / sum(s**2) >= 0.99}``.
        A zero matrix gives effective_rank 0.0 and rank_at_99 0.
    """
    s = torch.linalg.svdvals(_as_float(delta_W)).double().cpu()  # (min(out, in),) descending
    res = {"singular_values": s.tolist(), "effective_rank": 0.0, "rank_at_99": 0}
    if s.numel() == 0 or s.sum() <= 0:
        return res
    p = s / s.sum()
    res["effective_rank"] = math.exp(-torch.special.xlogy(p, p).sum().item())
    energy = torch.cumsum(s.square(), 0) / s.square().sum()
    res["rank_at_99"] = min(int((energy < 0.99 - 1e-12).sum().item()) + 1, s.numel())
    return res
