"""Export ``lora``, ``rslora`` and ``dora`` adapters in PEFT's format.

We let PEFT write its own files: copy the model, put the original layers back, wrap them with
``peft.get_peft_model``, copy our tensors into PEFT's, and call ``save_pretrained``. So the export
follows whatever key layout the installed PEFT version uses, and ``PeftModel.from_pretrained``
loads it with the same logits (tested).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .base import AdapterLinear
from .whole_model import adapter_layers

EXPORTABLE = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _unwrapped_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every wrapped layer replaced by its pretrained Linear."""
    base = copy.deepcopy(model)
    for name, layer in list(adapter_layers(base)):
        layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, layer.base)
    del base.bora_lab_config
    return base


def export_peft(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapter as a PEFT LoRA/DoRA checkpoint in ``directory``.

    Args:
        model: a model prepared by :func:`bora_lab.methods.apply` with ``lora``, ``rslora`` or ``dora``.
        directory: output folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base_model_name_or_path: recorded in the config so ``PeftModel`` users know the base.
    """
    import peft

    meta = getattr(model, "bora_lab_config", None)
    if not meta or meta["method"] not in EXPORTABLE:
        got = meta["method"] if meta else "none"
        raise ValueError(f"PEFT export supports {', '.join(EXPORTABLE)}; this model has method {got!r}")
    layers = dict(adapter_layers(model))
    if any(type(m.base) is not nn.Linear for m in layers.values()) or any(
        type(model.get_submodule(n)).__name__ == "Conv1D" for n in layers
    ):
        raise ValueError("PEFT export supports nn.Linear targets only")
    opts = meta["options"]
    heads = sorted({h.rsplit(".", 1)[-1] for h in meta["head_modules"]})
    config = peft.LoraConfig(
        r=opts["rank"], lora_alpha=opts["alpha"], target_modules=sorted(layers), lora_dropout=0.0,
        modules_to_save=heads or None, **EXPORTABLE[meta["method"]],
    )
    if base_model_name_or_path:
        config.base_model_name_or_path = base_model_name_or_path
    peft_model = peft.get_peft_model(_unwrapped_copy(model), config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, ours in layers.items():
            theirs = inner.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
            if meta["method"] == "dora":
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    return directory


def is_wrapped(module: nn.Module) -> bool:
    """True for a layer wrapped by a BoRA Lab method."""
    return isinstance(module, AdapterLinear)
