"""SBoRA (Po et al., arXiv:2407.05413): LoRA with one factor fixed to standard basis vectors.

* **SBoRA-FA**: ``A = [e_{i_1}; …; e_{i_r}]`` (one-hot rows, fixed), ``B: [out, r]`` trains (zero
  init), so ``ΔW = s·B A`` is non-zero only in the ``r`` *columns* (input features) ``i_k``:
  ``ΔW[:, i_k] = s·B[:, k]``.
* **SBoRA-FB**: ``B = [e_{i_1}, …, e_{i_r}]`` (one-hot columns, fixed), ``A: [r, in]`` trains (zero
  init), so ``ΔW`` is non-zero only in the ``r`` *rows* (output features) ``i_k``.

Half of LoRA's trainable parameters, and the one-hot factor is never materialised: the forward
uses ``index_select`` (FA) / ``index_add`` (FB). The indices come from a stated, seeded rule
and are stored in the buffer ``sb_index`` (:meth:`touched_indices`).

**Multi-SBoRA**: adapters for different tasks with disjoint index sets touch disjoint columns
(rows), so :func:`merge_multi_sbora` adds them all into one Linear without interference. Give
each task the same rule and seed and a different ``task_id``: task ``t`` takes the ``t``-th run
of ``r`` indices of the same ordering, so the sets are disjoint by construction.
"""
from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLinear
from .registry import register

INDEX_RULES = ("random", "norm")


@dataclass
class SBoRAConfig(AdapterConfig):
    """SBoRA options: how the ``rank`` standard-basis indices are chosen."""

    index_rule: str = field(default="random", metadata={
        "help": "random: a seeded random choice (index_seed); norm: the columns (FA) / rows (FB) of W0 "
                "with the largest L2 norm (a heuristic: update where the weight is already strong)",
        "choices": list(INDEX_RULES)})
    index_seed: int = field(default=0, metadata={"help": "seed of the random index rule", "min": 0})
    task_id: int = field(default=0, metadata={
        "help": "Multi-SBoRA: task t takes indices t·r … (t+1)·r−1 of the rule's ordering, so tasks "
                "with the same rule and seed get disjoint sets", "min": 0})

    def __post_init__(self):
        if self.index_rule not in INDEX_RULES:
            raise ValueError(f"index_rule must be one of {INDEX_RULES}, got {self.index_rule!r}")
        if self.task_id < 0:
            raise ValueError(f"task_id must be >= 0, got {self.task_id}")


def choose_indices(w0: Tensor, rank: int, dim: int, rule: str = "random", seed: int = 0,
                   task_id: int = 0) -> Tensor:
    """The sorted standard-basis indices along ``dim`` of ``w0`` (1: columns for FA, 0: rows for FB).

    Args:
        w0: the pretrained weight ``[out, in]``.
        rank: how many indices.
        dim: 1 picks input features (columns), 0 output features (rows).
        rule: ``"random"`` (a permutation seeded by ``seed``) or ``"norm"`` (descending L2 norm of
            the columns/rows of ``w0``, ties by index).
        seed: seed of the random rule.
        task_id: take the ``task_id``-th run of ``rank`` indices of the ordering (Multi-SBoRA).
    """
    n = w0.shape[dim]
    if (task_id + 1) * rank > n:
        raise ValueError(f"task_id {task_id} with rank {rank} needs {(task_id + 1) * rank} indices; "
                         f"the layer has {n} {'columns' if dim == 1 else 'rows'}")
    if rule == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    elif rule == "norm":
        norms = torch.linalg.vector_norm(w0.detach().float(), dim=1 - dim).cpu()  # (n,)
        order = torch.argsort(norms, descending=True, stable=True)
    else:
        raise ValueError(f"unknown index rule {rule!r}; choose one of {INDEX_RULES}")
    return order[task_id * rank:(task_id + 1) * rank].sort().values.to(w0.device)


class _SBoRALinear(AdapterLinear):
    """Shared state of SBoRA-FA/FB: the scale and the standard-basis indices."""

    axis = 1  # dimension of W that the update touches: 1 = columns (FA), 0 = rows (FB)

    def __init__(self, base, cfg: SBoRAConfig):
        super().__init__(base, cfg)
        self.scale = cfg.alpha / cfg.rank
        idx = choose_indices(base.weight, cfg.rank, self.axis, cfg.index_rule, cfg.index_seed, cfg.task_id)
        self.register_buffer("sb_index", idx)  # (r,) long, saved with the state dict

    def touched_indices(self) -> Tensor:
        """The columns (FA) or rows (FB) of ``W`` that this adapter can change, sorted ``[r]``."""
        return self.sb_index.clone()

    def inspect(self) -> dict:
        """Adds ``touched``: the axis (``"col"`` for FA, ``"row"`` for FB) and the sorted indices."""
        touched = {"axis": "col" if self.axis == 1 else "row", "indices": self.sb_index.cpu().tolist()}
        return {**super().inspect(), "touched": touched}

    @abstractmethod
    def delta_block(self) -> Tensor:
        """The non-zero part of ``ΔW``: ``s·B`` (``[out, r]``, FA) or ``s·A`` (``[r, in]``, FB)."""

    def effective_weight(self) -> Tensor:
        return torch.index_add(self.weight0, self.axis, self.sb_index, self.delta_block())


@register("sbora_fa", SBoRAConfig)
class SBoRAFALinear(_SBoRALinear):
    """SBoRA-FA: ``W = W0 + s·B·A_sb``; only the ``r`` columns ``sb_index`` of ``W`` change."""

    description = "LoRA with A fixed to r one-hot rows: only B trains, only r input columns of W change"
    formula = (r"W = W_0 + \frac{\alpha}{r} B A_{sb},\ A_{sb} = [e_{i_1};\dots;e_{i_r}]"
               r"\ \Rightarrow\ \Delta W_{:,i_k} = \tfrac{\alpha}{r} B_{:,k}")
    paper = "Po et al. 2024, SBoRA: Low-Rank Adaptation with Regional Weight Updates (arXiv:2407.05413)"
    source = "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), SBoRA section: SBoRA-FA"
    axis = 1

    def __init__(self, base, cfg: SBoRAConfig):
        super().__init__(base, cfg)
        w = base.weight
        self.sbora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype))

    def delta_block(self) -> Tensor:
        return self.sbora_B * self.scale

    def adapter_forward(self, x: Tensor) -> Tensor:
        picked = x.index_select(-1, self.sb_index)  # (..., r) = x @ A_sb.T without the one-hot matmul
        return F.linear(x, self.base.weight, self.base.bias) + F.linear(picked, self.sbora_B) * self.scale

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: SBoRAConfig, bias: bool = True) -> int:
        return cfg.rank * d_out


@register("sbora_fb", SBoRAConfig)
class SBoRAFBLinear(_SBoRALinear):
    """SBoRA-FB: ``W = W0 + s·B_sb·A``; only the ``r`` rows ``sb_index`` of ``W`` change."""

    description = "LoRA with B fixed to r one-hot columns: only A trains, only r output rows of W change"
    formula = (r"W = W_0 + \frac{\alpha}{r} B_{sb} A,\ B_{sb} = [e_{i_1},\dots,e_{i_r}]"
               r"\ \Rightarrow\ \Delta W_{i_k,:} = \tfrac{\alpha}{r} A_{k,:}")
    paper = "Po et al. 2024, SBoRA: Low-Rank Adaptation with Regional Weight Updates (arXiv:2407.05413)"
    source = "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), SBoRA section: SBoRA-FB"
    axis = 0

    def __init__(self, base, cfg: SBoRAConfig):
        super().__init__(base, cfg)
        w = base.weight
        self.sbora_A = nn.Parameter(torch.zeros(cfg.rank, self.in_features, device=w.device, dtype=w.dtype))

    def delta_block(self) -> Tensor:
        return self.sbora_A * self.scale

    def adapter_forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)  # (..., out)
        return y.index_add(-1, self.sb_index, F.linear(x, self.sbora_A) * self.scale)  # adds into r outputs

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: SBoRAConfig, bias: bool = True) -> int:
        return cfg.rank * d_in


# -- Multi-SBoRA ---------------------------------------------------------------------------------
def merge_multi_sbora(linear: nn.Linear, adapters: Sequence[_SBoRALinear], check_base: bool = True,
                      atol: float = 1e-6) -> nn.Linear:
    """Merge several SBoRA task adapters into one copy of ``linear`` (``linear`` is not modified).

    Args:
        linear: the pretrained layer (or one that already holds other tasks' merged updates).
        adapters: SBoRA layers of one kind (all FA or all FB) trained from the same ``W0``.
        check_base: require ``linear`` to equal each adapter's ``W0`` on that adapter's columns
            (rows), so an adapter never lands on a region another task already changed.
        atol: tolerance of that check.

    Raises:
        ValueError: mixed FA/FB (a column set and a row set always intersect), a shape mismatch,
            overlapping index sets (naming the tasks and indices), or a failed base check.
    """
    if not adapters:
        return copy.deepcopy(linear)
    kinds = {type(a) for a in adapters}
    if len(kinds) > 1 or not issubclass(next(iter(kinds)), _SBoRALinear):
        raise ValueError("Multi-SBoRA merges adapters of one kind (all sbora_fa or all sbora_fb): "
                         f"got {sorted(k.__name__ for k in kinds)}")
    shape = (linear.out_features, linear.in_features)
    owner: dict[int, int] = {}
    for t, a in enumerate(adapters):
        if (a.out_features, a.in_features) != shape:
            raise ValueError(f"adapter {t} wraps [{a.out_features}, {a.in_features}], the layer is {list(shape)}")
        clash = sorted(i for i in a.sb_index.tolist() if i in owner)
        if clash:
            raise ValueError(f"adapters {owner[clash[0]]} and {t} overlap on "
                             f"{'columns' if a.axis == 1 else 'rows'} {clash}: Multi-SBoRA needs disjoint "
                             "index sets (use the same rule and seed with a different task_id)")
        owner.update({i: t for i in a.sb_index.tolist()})
    merged = copy.deepcopy(linear)
    with torch.no_grad():
        w = merged.weight
        for t, a in enumerate(adapters):
            idx = a.sb_index.to(w.device)
            if check_base and not torch.allclose(w.index_select(a.axis, idx).float(),
                                                 a.weight0.index_select(a.axis, a.sb_index).float().to(w.device),
                                                 atol=atol, rtol=0.0):
                raise ValueError(f"the layer differs from adapter {t}'s W0 on its indices: another update "
                                 "was merged there, or the adapter was trained from another base")
            w.index_add_(a.axis, idx, a.delta_block().detach().to(device=w.device, dtype=w.dtype))
    return merged


def merge_multi_sbora_model(base_model: nn.Module, task_models: Sequence[nn.Module]) -> nn.Module:
    """Merge SBoRA task models (each from ``methods.apply(copy_of_base, "sbora_fa"/"sbora_fb", ...)``).

    Returns a deep copy of ``base_model`` whose targeted layers hold every task's update (as plain
    ``nn.Linear``). Task heads are not merged: they differ per task and stay in the task models.
    """
    from .whole_model import as_linear, adapter_layers

    merged = copy.deepcopy(base_model)
    per_layer: dict[str, list[_SBoRALinear]] = {}
    for m in task_models:
        for name, layer in adapter_layers(m):
            per_layer.setdefault(name, []).append(layer)
    for name, layers in per_layer.items():
        if len(layers) != len(task_models):
            raise ValueError(f"layer {name!r} is adapted in {len(layers)} of {len(task_models)} task models")
        parent, _, child = name.rpartition(".")
        new = merge_multi_sbora(as_linear(merged.get_submodule(name)), layers)
        setattr(merged.get_submodule(parent) if parent else merged, child, new)
    return merged
