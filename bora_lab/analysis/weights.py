"""Magnitude / direction analysis of weight matrices (BoRA eq. 5-6, DoRA figure 2).

Conventions (``docs/conventions.md``): a weight is ``[out, in]``. Axis ``"row"`` means the ``out``
vectors ``W[i, :]`` (norms ``W.norm(dim=1)``), axis ``"col"`` means the ``in`` vectors ``W[:, j]``
(norms ``W.norm(dim=0)``). For two weights ``W_a``, ``W_b`` of one layer and an axis ``d``::

    dM(a, b, d) = mean_i | ||W_a^(i,d)|| - ||W_b^(i,d)|| |          (BoRA eq. 5)
    dD(a, b, d) = mean_i (1 - cos(W_a^(i,d), W_b^(i,d)))            (BoRA eq. 6)

Numerics: float32 (bf16/fp16 inputs are upcast; float64 stays float64), with ``d = a - b`` and
cancellation-free forms of the same quantities::

    ||a|| - ||b|| = (2 <d, b> + ||d||^2) / (||a|| + ||b||)
    1 - cos(a, b) = (||d||^2 - (||a|| - ||b||)^2) / (2 ||a|| ||b||)

so step-to-step changes far below float32's ~1e-7 resolution of ``cos`` are still resolved.
Zero vectors (norm <= eps): if both are zero the direction change is 0; if exactly one is zero it
is 1 (cos taken as 0, as ``torch.nn.functional.cosine_similarity`` does). Nothing returns NaN.

Benchmark (``WeightTracker.snapshot``, median of 20, 2-core CPU shared with other jobs)::

    w = {f"q{i}": torch.randn(n, n) for i in range(L)}
    tr = WeightTracker(); tr.snapshot(0, w)
    %timeit tr.snapshot(1, w)    # L, n = 6, 384: ~4.6 ms;  L, n = 30, 576: ~48 ms

A full fine-tuning step of a MiniLM-sized BERT (6 x 384, batch 16 x 64) takes ~950 ms on the same
machine, so tracking its 6 query matrices costs ~0.5% of a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .stats import asymmetry_ratio, dora_scatter_points, fit_line  # noqa: F401 (re-exported)

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


def _norms(W: Tensor) -> dict[str, Tensor]:
    """Row norms ``(..., out)`` and column norms ``(..., in)`` of ``W`` ``(..., out, in)``."""
    return {axis: torch.linalg.vector_norm(W, dim=_reduce_dim(axis)) for axis in AXES}


def _changes(
    cur: Tensor,
    cur_n: dict[str, Tensor],
    ref: Tensor,
    ref_n: dict[str, Tensor],
    eps: float,
    work: Tensor | None = None,
) -> dict[str, Tensor]:
    """ΔM/ΔD of ``cur`` vs ``ref`` (both ``(..., out, in)``) given their axis norms.

    Per vector, with ``d = a - b`` (a = cur, b = ref) and no catastrophic cancellation::

        ||a|| - ||b|| = (2 <d, b> + ||d||^2) / (||a|| + ||b||)
        1 - cos(a, b) = (||d||^2 - (||a|| - ||b||)^2) / (2 ||a|| ||b||)

    ``work`` (same shape and dtype) is an optional scratch buffer, so repeated calls allocate
    nothing large.
    """
    d = cur - ref if work is None else torch.sub(cur, ref, out=work)  # (..., out, in)
    d2 = {axis: torch.linalg.vector_norm(d, dim=_reduce_dim(axis)).square() for axis in AXES}
    db = d.mul_(ref)  # <d, b> summands, reusing d's memory
    out: dict[str, Tensor] = {}
    for axis in AXES:
        dim = _reduce_dim(axis)
        na, nb = cur_n[axis], ref_n[axis]  # (..., h_d)
        dn = (2 * db.sum(dim) + d2[axis]) / (na + nb).clamp_min(eps)  # ||a|| - ||b||
        omc = (d2[axis] - dn.square()) / (2 * na.clamp_min(eps) * nb.clamp_min(eps))
        za, zb = na <= eps, nb <= eps  # zero vectors: both -> 0, exactly one -> 1
        omc = torch.where(za & zb, 0.0, torch.where(za ^ zb, 1.0, omc.clamp(0.0, 2.0)))
        out[f"dM_{axis}"] = dn.abs().mean(-1)
        out[f"dD_{axis}"] = omc.mean(-1)
    return {k: out[k] for k in METRICS}


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
    return _changes(Wa, _norms(Wa), Wb, _norms(Wb), eps)


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


def delta_m(Wa: Tensor, Wb: Tensor, axis: str) -> float:
    """BoRA eq. 5: ``mean_i | ||Wa^(i,axis)|| - ||Wb^(i,axis)|| |`` for one layer ``(out, in)``."""
    _reduce_dim(axis)  # validate
    return md_changes(Wa, Wb)[f"dM_{axis}"]


def delta_d(Wa: Tensor, Wb: Tensor, axis: str, eps: float = 1e-8) -> float:
    """BoRA eq. 6: ``mean_i (1 - cos(Wa^(i,axis), Wb^(i,axis)))`` for one layer ``(out, in)``.

    Args:
        Wa: weight ``(out, in)``.
        Wb: weight ``(out, in)``.
        axis: ``"row"`` or ``"col"``.
        eps: vectors with norm <= eps are zero vectors (both zero -> 0, one zero -> 1).
    """
    _reduce_dim(axis)
    return md_changes(Wa, Wb, eps)[f"dD_{axis}"]


@dataclass
class _Group:
    """Modules sharing one shape and device, stored stacked as ``(L, out, in)`` float32."""

    index: list[int]  # positions in WeightTracker.modules
    start: Tensor  # (L, out, in) weights at the first snapshot
    start_n: dict[str, Tensor]  # their row (L, out) and column (L, in) norms
    prev: Tensor  # (L, out, in) weights at the previous snapshot (is `start` until the 2nd snapshot)
    prev_n: dict[str, Tensor]
    spare: Tensor  # (L, out, in) receives the next snapshot; recycled from the old `prev`
    work: Tensor  # (L, out, in) scratch for _changes


class WeightTracker:
    """Tracks ΔM/ΔD of a fixed set of weights from the start and step to step (BoRA fig. 2, 3).

    Per module it holds detached float32 copies (on the weights' device) of W at the first
    snapshot and at the previous snapshot. Modules with the same shape and device are stacked
    and measured in one batched pass; buffers are recycled, so a snapshot allocates nothing large
    and costs one copy plus ~8 elementwise/reduction passes per reference. Memory: 4 float32
    copies of the tracked weights (start, previous, incoming, scratch).

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
        """Forget everything (and free the buffers); the next snapshot becomes the new start."""
        self.modules: list[str] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._groups: list[_Group] = []
        self._prev_step: int | None = None

    @property
    def started(self) -> bool:
        """Whether a start snapshot has been recorded."""
        return bool(self.modules)

    @torch.no_grad()
    def _fill(self, out: Tensor, index: list[int], weights: Mapping[str, Tensor]) -> Tensor:
        """Copy (and cast) the current weights of ``index`` into ``out`` ``(L, out, in)``."""
        for row, i in enumerate(index):
            out[row].copy_(weights[self.modules[i]].detach())
        return out

    @torch.no_grad()
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
            start = torch.empty((len(index), *shape), dtype=torch.float32, device=device)
            start, spare, work = self._fill(start, index, weights), start.clone(), start.clone()
            norms = _norms(start)
            self._groups.append(_Group(index, start, norms, start, norms, spare, work))

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
        fs_out, ss_out = {k: [0.0] * n for k in METRICS}, {k: [0.0] * n for k in METRICS}
        with torch.no_grad():
            for group in self._groups:
                cur = self._fill(group.spare, group.index, weights)  # (L, out, in)
                cur_n = _norms(cur)
                fs = _changes(cur, cur_n, group.start, group.start_n, self.eps, group.work)
                ss = _changes(cur, cur_n, group.prev, group.prev_n, self.eps, group.work)
                table = torch.stack([fs[k] for k in METRICS] + [ss[k] for k in METRICS])  # (8, L)
                values = table.cpu().tolist()  # one device sync per group
                for m, key in enumerate(METRICS):
                    for row, i in enumerate(group.index):
                        fs_out[key][i], ss_out[key][i] = values[m][row], values[m + 4][row]
                # Rotate buffers: the old `prev` (unless it is `start`) takes the next snapshot.
                old = group.prev
                group.spare = torch.empty_like(cur) if old is group.start else old
                group.prev, group.prev_n = cur, cur_n
        prev_step, self._prev_step = self._prev_step, int(step)
        return self._result(step, prev_step, fs_out, ss_out)

    def _result(self, step: int, prev_step: int | None, fs: dict, ss: dict) -> dict:
        def mean(d: dict) -> dict:
            return {k: math.fsum(v) / len(v) for k, v in d.items()}

        return {"step": int(step), "prev_step": prev_step, "modules": list(self.modules),
                "from_start": fs, "step_to_step": ss,
                "mean": {"from_start": mean(fs), "step_to_step": mean(ss)}}


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
