"""Applying a method to a whole ``transformers`` model: targets, freezing, counting, save/load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import registry
from .base import AdapterLinear

# Default target modules per ``config.model_type`` (the attention and FFN projections).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}
# Module whose weights the analysis tracks by default (the attention query, as in the BoRA paper).
DEFAULT_ANALYSIS: dict[str, str] = {
    "bert": "query", "roberta": "query", "xlm-roberta": "query", "distilbert": "q_lin",
    "deberta-v2": "query_proj", "llama": "q_proj", "qwen2": "q_proj", "mistral": "q_proj", "gpt2": "c_attn",
}
# Task heads stay trainable with every method (a random head over a frozen body learns nothing).
HEAD_NAMES = ("classifier", "score", "pooler", "pre_classifier")
# What of the head trains (``apply(train_head=...)``): BERT's pooler is pretrained but sits between
# the body and a new random classifier; frozen, MiniLM stays near the majority class on fine_foods.
HEAD_POLICIES = {"classifier+pooler": HEAD_NAMES, "classifier": ("classifier", "score", "pre_classifier"), "none": ()}


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def default_targets(model: nn.Module) -> list[str]:
    """Target module names for ``model``'s architecture (all Linear layers outside the head if unknown)."""
    if _model_type(model) in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[_model_type(model)])
    # unknown architecture: the Linear names of the first transformer block (the longest ModuleList)
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    scope = max(blocks, key=len)[0] if blocks else model
    names = [n.rsplit(".", 1)[-1] for n, m in scope.named_modules() if is_linear(m)]
    names = [n for n in dict.fromkeys(names) if n not in HEAD_NAMES and n != "lm_head"]
    if not names:
        raise ValueError(f"no default target modules known for {type(model).__name__}; name them explicitly")
    return names


def default_analysis_module(model: nn.Module) -> str:
    """The module type tracked by the magnitude/direction analysis by default."""
    return DEFAULT_ANALYSIS.get(_model_type(model), default_targets(model)[0])


def head_module_names(model: nn.Module, policy: str = "classifier+pooler") -> list[str]:
    """Full names of the task-head modules present in ``model`` that ``policy`` trains (see :func:`apply`)."""
    names = HEAD_POLICIES[policy]
    return [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in names]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def as_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; turn it into an equivalent ``nn.Linear`` (``[out, in]``)."""
    if isinstance(module, nn.Linear):
        return module
    w = module.weight  # (in, out)
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.T)
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


def find_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Full names of the Linear/Conv1D modules whose name equals or ends with a target.

    Raises a ValueError naming every target that matched nothing, with the valid choices.
    """
    linear = [n for n, m in model.named_modules() if is_linear(m)]
    head = set(head_module_names(model))
    found, missing = [], []
    for t in target_modules:
        hits = [n for n in linear if (n == t or n.endswith("." + t)) and not any(n.startswith(h) for h in head)]
        (found.extend(hits) if hits else missing.append(t))
    if missing:
        choices = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(
            f"target module(s) {', '.join(map(repr, missing))} not found in {type(model).__name__}; "
            f"linear layers available: {', '.join(choices)}"
        )
    return sorted(set(found), key=linear.index)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply(model: nn.Module, method: str, rank: int = 8, alpha: float = 16.0,
          target_modules: list[str] | None = None, train_head: bool | str = True, **options: Any) -> nn.Module:
    """Apply ``method`` to ``model`` in place and return it.

    Freezes everything, wraps the target layers (layer-level methods) or lets the method change
    the model (model-level methods), then unfreezes the task head if ``train_head``.

    Args:
        model: a ``transformers`` model (or any ``nn.Module`` with Linear layers).
        method: a name from :func:`bora_lab.methods.available`.
        rank, alpha: the update's rank and scaling numerator (ignored by methods without a rank).
        target_modules: module names to wrap (``["query", "value"]``); default per architecture.
        train_head: which task-head modules train with the method: ``"classifier+pooler"`` (or True,
            the default: classifier, score, pre_classifier and BERT's pooler), ``"classifier"`` (the
            new classifier only; the pooler stays frozen), ``"none"`` (or False). Head parameters are
            counted apart from the adapter's (:func:`trainable_summary`).
        **options: method-specific options (see ``registry.config_fields(method)``).
    """
    cls = registry.get(method)
    if getattr(model, "bora_lab_config", None):
        raise ValueError(f"this model already has method {model.bora_lab_config['method']!r} applied")
    cfg = registry.make_config(method, rank=rank, alpha=alpha, **options)
    if target_modules:
        targets = list(target_modules)
    else:  # model-level methods choose their own sites (adapters) or none (prompts, BitFit)
        targets = cls.default_targets(model) if cls.kind == "model" else default_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if cls.kind == "layer":
        for name in find_targets(model, targets):
            _set_module(model, name, cls(as_linear(model.get_submodule(name)), cfg))
    else:
        cls.apply_to_model(model, cfg, targets)
    policy = {True: "classifier+pooler", False: "none"}.get(train_head, train_head)
    if policy not in HEAD_POLICIES:
        raise ValueError(f"train_head must be one of {', '.join(HEAD_POLICIES)} (or True/False), got {train_head!r}")
    heads = head_module_names(model, policy)
    for h in heads:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    model.bora_lab_config = {"method": method, "options": dict(cfg.__dict__), "target_modules": targets,
                             "head_modules": heads, "head_policy": policy}
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(name, layer) for every wrapped layer; names are those of the original modules."""
    for name, m in model.named_modules():
        if isinstance(m, AdapterLinear):
            yield name, m


def merge(model: nn.Module) -> None:
    """Merge every wrapped layer (idempotent)."""
    for _, m in adapter_layers(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Unmerge every wrapped layer, restoring W0 exactly (idempotent)."""
    for _, m in adapter_layers(model):
        m.unmerge()


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """``{"trainable": n, "total": N, "percent": 100·n/N, "head": h, "adapter": n - h, "adapter_percent"}``.

    ``total`` counts adapters too (as PEFT); ``head`` is the trainable part of the task head
    (``apply(train_head=...)``), ``adapter`` the rest: the method's own parameters, comparable with
    the papers' Param% (which leave the classifier out).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    heads = getattr(model, "bora_lab_config", {}).get("head_modules", [])
    seen: set[int] = set()
    head = 0
    for h in heads:
        for p in model.get_submodule(h).parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                head += p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "head": head, "adapter": trainable - head, "adapter_percent": 100.0 * (trainable - head) / max(total, 1)}


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return PEFT's line: ``trainable params: n || all params: N || trainable%: p``."""
    s = trainable_summary(model)
    line = f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}"
    print(line)
    return line


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Save every trainable tensor (adapters and head) and the method config to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "adapter.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not getattr(model, "bora_lab_config", None):
        raise ValueError("no BoRA Lab method is applied to this model; call bora_lab.methods.apply first")
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"bora_lab_config": json.dumps(model.bora_lab_config)})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by :func:`save_adapter` into ``model`` (applying the method first if needed)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["bora_lab_config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not getattr(model, "bora_lab_config", None):
        opts = dict(meta["options"])
        apply(model, meta["method"], target_modules=meta["target_modules"],
              train_head=bool(meta["head_modules"]), **opts)
    elif model.bora_lab_config["method"] != meta["method"]:
        raise ValueError(f"file holds a {meta['method']!r} adapter, the model has {model.bora_lab_config['method']!r}")
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise ValueError(f"adapter file has tensors the model lacks: {missing[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].device, params[k].dtype))
    return model
