"""Model-level baselines that choose which existing parameters train: BitFit, head only, features, full.

None of them adds a tensor; each only unfreezes part of the pretrained model (or, for
``features``, runs the frozen body without gradients and in eval mode). The task head
(``classifier``/``pooler``/``score``) is unfrozen by :func:`bora_lab.methods.apply` when
``train_head=True``; ``head`` and ``features`` need a head, so they unfreeze it themselves.
``count_params`` counts what the method makes trainable *beyond* those head modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import AdapterConfig, ModelMethod
from .whole_model import head_module_names
from .registry import register

_LECTURE = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), "
            "'Finetuning of Convolutional Neural Networks': "
            "(1) full, (2) feature-based, (3) top-layer")


# -- helpers shared by the methods in this file --------------------------------------------------
def unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once (tied weights count once, as ``model.parameters()``)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def head_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter inside a task-head module (those :func:`apply` unfreezes)."""
    return {id(p) for p in unique_params([model.get_submodule(h) for h in head_module_names(model)])}


def classifier_modules(model: nn.Module) -> list[str]:
    """The modules a head-only/feature-based run trains: the task head, else the output layer (``lm_head``).

    Raises:
        ValueError: the model has neither (e.g. a bare ``BertModel``).
    """
    heads = head_module_names(model)
    if heads:
        return heads
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise ValueError(f"{type(model).__name__} has no task head (classifier/score/pooler) and no output layer")
    return [next(n for n, m in model.named_modules() if m is out)]


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks (``bert.encoder.layer``, ``model.layers``...).

    Picks the list of same-typed modules whose length is ``config.num_hidden_layers`` (else the longest).
    """
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks")
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == n]
    return (exact or sorted(lists, key=len, reverse=True))[0]


def _numel_outside_head(model: nn.Module, params: list[nn.Parameter]) -> int:
    heads = head_param_ids(model)
    return sum(p.numel() for p in params if id(p) not in heads)


# -- BitFit --------------------------------------------------------------------------------------
def _bias_params(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters():  # already deduplicated (tied weights once)
        if name.rsplit(".", 1)[-1] == "bias":
            seen.setdefault(id(p), p)
    return list(seen.values())


@register("bitfit", AdapterConfig)
class BitFit(ModelMethod):
    """BitFit (Ben Zaken et al., 2022, arXiv:2106.10199): train only the bias terms.

    Every parameter named ``bias`` outside the head becomes trainable: the attention and FFN
    Linear biases and the LayerNorm biases. Llama-style models have no biases (bias-free Linear
    layers, RMSNorm), so BitFit has nothing to train there and raises a ValueError.
    Identity at init: nothing changes until the first step.
    """

    description = "BitFit: train only the bias terms (plus the task head)"
    formula = r"y = W_0 x + b,\ \text{only } b \text{ trainable}"
    paper = ("Ben Zaken, Ravfogel & Goldberg, BitFit: Simple Parameter-efficient Fine-tuning for "
             "Transformer-based Masked Language-models, ACL 2022")
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), LoRA section, "
              "'LoRA Comparison on GPT-3' table (BitFit row)")

    @classmethod
    def apply_to_model(cls, model, cfg, target_modules=None) -> None:
        if cls.count_params(model, cfg, target_modules) == 0:
            raise ValueError(
                f"BitFit: {type(model).__name__} has no bias terms outside its head (Llama-style models use "
                "bias-free Linear layers and RMSNorm); choose another method")
        heads = head_param_ids(model)
        for p in _bias_params(model):
            if id(p) not in heads:
                p.requires_grad_(True)

    @classmethod
    def count_params(cls, model, cfg, target_modules=None) -> int:
        return _numel_outside_head(model, _bias_params(model))


# -- head only / top-layer fine-tuning ------------------------------------------------------------
@dataclass
class HeadConfig(AdapterConfig):
    """Top-layer fine-tuning: the head, optionally with the last transformer blocks."""

    top_layers: int = field(default=0, metadata={
        "help": "also train the last N transformer blocks (0 = the head only)", "min": 0, "max": 48})


@register("head", HeadConfig)
class HeadOnly(ModelMethod):
    """Top-layer fine-tuning (lecture, approach 3): train the output layers, freeze the rest.

    Trains the task head (``classifier``/``pooler``/``score``), or the output layer ``lm_head``
    of a causal LM (with tied embeddings this is the input embedding matrix too), plus the last
    ``top_layers`` transformer blocks. The head trains even with ``apply(..., train_head=False)``.
    Identity at init: nothing changes until the first step.
    """

    description = "Top-layer fine-tuning: train the head (and optionally the last N blocks)"
    formula = r"\theta_{\text{train}} = \theta_{\text{head}} \cup \theta_{\text{blocks}[L-N:L]}"
    paper = "Howard & Ruder 2018 (ULMFiT); Houlsby et al. 2019 compare adapters with top-layer tuning"
    source = _LECTURE + "; 'Adapter Performance on Finetuning BERT'"

    @classmethod
    def _trained_modules(cls, model: nn.Module, cfg: HeadConfig) -> list[nn.Module]:
        mods = [model.get_submodule(n) for n in classifier_modules(model)]
        if cfg.top_layers:
            blocks = transformer_blocks(model)
            if cfg.top_layers > len(blocks):
                raise ValueError(f"top_layers={cfg.top_layers} but the model has {len(blocks)} blocks")
            mods += list(blocks[len(blocks) - cfg.top_layers:])
        return mods

    @classmethod
    def apply_to_model(cls, model, cfg, target_modules=None) -> None:
        for p in unique_params(cls._trained_modules(model, cfg)):
            p.requires_grad_(True)

    @classmethod
    def count_params(cls, model, cfg, target_modules=None) -> int:
        return _numel_outside_head(model, unique_params(cls._trained_modules(model, cfg)))


# -- feature-based ---------------------------------------------------------------------------------
class _FrozenBody:
    """Forward hooks that run a model's body in eval mode without autograd; head modules inside it
    (BERT's pooler) run in the caller's grad and train/eval mode."""

    def __init__(self, body: list[nn.Module]):
        self.body = body
        self.saved: list[tuple[bool, list[bool]]] = []

    def enter(self, module, args):
        self.saved.append((torch.is_grad_enabled(), [m.training for m in self.body]))
        torch.set_grad_enabled(False)
        for m in self.body:
            m.training = False

    def leave(self, module, args, output):
        grad, modes = self.saved.pop()
        torch.set_grad_enabled(grad)
        for m, mode in zip(self.body, modes):
            m.training = mode

    def head_enter(self, module, args):
        torch.set_grad_enabled(self.saved[-1][0])

    def head_leave(self, module, args, output):
        torch.set_grad_enabled(False)


@register("features", AdapterConfig)
class FeatureBased(ModelMethod):
    """Feature-based training (lecture, approach 2): the pretrained body is a fixed feature extractor.

    The body runs under ``torch.no_grad()`` and in eval mode (no dropout), so its features are a
    deterministic function of the input; only the classifier on top learns (BERT: pooler +
    classifier; a causal LM: ``lm_head``). Unlike ``head``, the body's dropout is off while training.
    Identity at init: in eval mode the model computes exactly what it did.
    """

    description = "Feature-based: frozen body (no grad, eval mode) + a trained classifier on its features"
    formula = r"h = f_{\theta_0}(x)\ \text{(frozen, no grad)},\quad \hat y = g_\phi(h)"
    paper = "Peters et al. 2018 (ELMo) and Devlin et al. 2019 (BERT, sec. 5.3 feature-based approach)"
    source = _LECTURE

    @classmethod
    def apply_to_model(cls, model, cfg, target_modules=None) -> None:
        heads = [model.get_submodule(n) for n in classifier_modules(model)]
        for p in unique_params(heads):
            p.requires_grad_(True)
        base = getattr(model, "base_model", model)
        if base is model:
            raise ValueError(f"features: {type(model).__name__} has no separate body (base_model) to freeze")
        inner_heads = [h for h in heads if any(h is m for m in base.modules())]
        in_head = {id(m) for h in inner_heads for m in h.modules()}
        state = _FrozenBody([m for m in base.modules() if id(m) not in in_head])
        base.register_forward_pre_hook(state.enter)
        base.register_forward_hook(state.leave, always_call=True)
        for h in inner_heads:
            h.register_forward_pre_hook(state.head_enter)
            h.register_forward_hook(state.head_leave, always_call=True)

    @classmethod
    def count_params(cls, model, cfg, target_modules=None) -> int:
        return _numel_outside_head(model, unique_params([model.get_submodule(n) for n in classifier_modules(model)]))


# -- full fine-tuning of the whole model ----------------------------------------------------------
@register("full_model", AdapterConfig)
class FullModel(ModelMethod):
    """Full fine-tuning (lecture, approach 1): every parameter of the model trains.

    Unlike the layer-level ``full`` (a trainable copy of the targeted Linear layers only), this
    also trains the embeddings, LayerNorms and every other weight. Identity at init: nothing
    changes until the first step.
    """

    description = "Full fine-tuning of the whole model (every parameter)"
    # Its Linear weights are trained in place, so the ΔM/ΔD analysis reads them directly: the FT
    # reference line of DoRA figure 2 (negative slope) comes from this method.
    has_effective_weight = True
    formula = r"\theta = \theta_0 + \Delta\theta,\ \text{all of } \theta \text{ trainable}"
    paper = ("Full fine-tuning (FT), the baseline of the LoRA, DoRA and BoRA papers; "
             "Howard & Ruder 2018, Devlin et al. 2019")
    source = _LECTURE + "; 'Full Fine-Tuning (FFT)'"

    @classmethod
    def apply_to_model(cls, model, cfg, target_modules=None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    @classmethod
    def count_params(cls, model, cfg, target_modules=None) -> int:
        return _numel_outside_head(model, list(model.parameters()))
