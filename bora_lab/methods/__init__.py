"""BoRA Lab's adapter core: one registry of PEFT methods, and the functions to use them.

Public API::

    from bora_lab import methods
    methods.available()                               # ['full', 'lora', 'rslora', 'dora', ...]
    layer = methods.wrap(nn.Linear(64, 32), "bora", rank=8, alpha=16)
    layer.effective_weight(); layer.merge(); layer.unmerge()
    methods.apply(model, "dora", rank=8, target_modules=["query", "value"])
    methods.export_peft(model, "out/peft_dora")

A new method is one module with a ``@register``-ed class plus one import line below.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from . import registry
from .base import AdapterConfig, AdapterLinear, ModelMethod, NormConfig
from .whole_model import (
    adapter_layers, apply, default_analysis_module, default_targets, find_targets, load_adapter, merge,
    print_trainable_parameters, save_adapter, trainable_summary, unmerge,
)
from .peft_export import export_peft
from .registry import METHODS, available, config_fields, info, register

# The registry lines: one import per method module.
from . import full, lora, dora, bora, adapter, prompts, prefix, simple  # noqa: E402,F401  isort:skip
from . import lora2, adalora, pissa, asylora, vera  # noqa: E402,F401  isort:skip
from . import qlora, mora, sbora  # noqa: E402,F401  isort:skip
from . import matching, rates  # noqa: E402,F401  isort:skip


def wrap(linear: nn.Module, method: str, rank: int = 8, alpha: float = 16.0, **options: Any) -> AdapterLinear:
    """Wrap one ``nn.Linear`` with a layer-level ``method``; only the adapter requires grad.

    Raises:
        ValueError: unknown method or option, a model-level method, or a rank outside [1, min(in, out)].
    """
    cls = registry.get(method)
    if cls.kind != "layer":
        raise ValueError(f"{method!r} is a model-level method; use bora_lab.methods.apply(model, {method!r})")
    from .whole_model import as_linear

    return cls(as_linear(linear), registry.make_config(method, rank=rank, alpha=alpha, **options))


__all__ = [
    "METHODS", "AdapterConfig", "AdapterLinear", "ModelMethod", "NormConfig", "adapter_layers", "apply",
    "available", "config_fields", "default_analysis_module", "default_targets", "export_peft", "find_targets",
    "info", "load_adapter", "merge", "print_trainable_parameters", "register", "save_adapter",
    "trainable_summary", "unmerge", "wrap",
]
