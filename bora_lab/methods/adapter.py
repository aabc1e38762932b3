"""Houlsby adapters: a small bottleneck MLP after the attention and feed-forward sublayers.

Houlsby et al. 2019 (arXiv:1902.00751), fig. 2: each sublayer's output projection is followed by
``h + up(act(down(h)))`` before the residual sum and LayerNorm. BERT: the outputs of
``attention.output.dense`` and ``output.dense``; Llama: ``o_proj`` and ``down_proj``.
``up`` starts at zero, so the model is unchanged at init.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from .base import AdapterConfig, ModelMethod
from .whole_model import _model_type, _set_module, find_targets, head_module_names
from .registry import register

# Sublayer output projections per ``config.model_type`` (suffix match, as target_modules).
ADAPTER_SITES: dict[str, list[str]] = {
    "bert": ["output.dense"],  # matches attention.output.dense and output.dense (not the pooler)
    "roberta": ["output.dense"],
    "xlm-roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "distilbert": ["out_lin", "lin2"],
    "llama": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class HoulsbyConfig(AdapterConfig):
    """Options of Houlsby adapters (rank/alpha are unused)."""

    bottleneck: int = field(default=64, metadata={
        "help": "bottleneck size m of each adapter (d -> m -> d)", "min": 1, "max": 1024})
    activation: str = field(default="relu", metadata={
        "help": "non-linearity between down and up projection", "choices": list(ACTIVATIONS)})
    train_layer_norm: bool = field(default=False, metadata={
        "help": "also train the LayerNorm/RMSNorm weights inside the blocks (Houlsby et al. do)"})


class HoulsbyAdapterLinear(nn.Module):
    """A frozen sublayer output projection followed by a bottleneck adapter.

    ``y = h + W_up · act(W_down · h + b_down) + b_up`` with ``h = base(x)``.
    Shapes: ``W_down: [m, d]``, ``W_up: [d, m]`` (zeros, and ``b_up`` zeros) for ``d = base.out_features``.
    """

    def __init__(self, base: nn.Module, cfg: HoulsbyConfig):
        super().__init__()
        self.base = base
        w = base.weight
        d = base.out_features if isinstance(base, nn.Linear) else w.shape[1]  # GPT-2 Conv1D: [in, out]
        self.adapter_down = nn.Linear(d, cfg.bottleneck, device=w.device, dtype=w.dtype)  # kaiming-uniform
        self.adapter_act = ACTIVATIONS[cfg.activation]()
        self.adapter_up = nn.Linear(cfg.bottleneck, d, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.adapter_up.weight)  # up = 0 -> the adapter is the identity at init
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def weight(self) -> Tensor:
        """The frozen projection's weight (code that reads ``.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)  # (..., d)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))

    @staticmethod
    def num_params(d: int, m: int) -> int:
        """Trainable parameters of one adapter: ``2·d·m + m + d``."""
        return 2 * d * m + m + d


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    """LayerNorm/RMSNorm modules outside the task head."""
    heads = head_module_names(model)
    return [m for n, m in model.named_modules()
            if "Norm" in type(m).__name__ and not any(n == h or n.startswith(h + ".") for h in heads)]


@register("adapter", HoulsbyConfig)
class HoulsbyAdapter(ModelMethod):
    """Houlsby adapters (arXiv:1902.00751): a bottleneck MLP after each attention and FFN sublayer.

    ``h ← h + W_up σ(W_down h)`` on the output of each sublayer's projection, before the residual
    and LayerNorm. ``W_up = 0`` at init, so the model starts exactly at the pretrained function.
    Not mergeable: the non-linearity σ means no dense ``ΔW`` exists, so there is no effective weight.
    ``target_modules`` names the projections to follow (default: ``ADAPTER_SITES`` per architecture).
    """

    description = "Houlsby adapter: bottleneck MLP (d→m→d, up zero-init) after attention and FFN"
    formula = r"h \leftarrow h + W_{up}\,\sigma(W_{down} h + b_{down}) + b_{up},\ W_{up}=0\ \text{at init}"
    paper = "Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019 (arXiv:1902.00751)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), "
              "'Adapter Tuning (Houlsby and Giurgiu et al., 2019-02)'")

    @classmethod
    def default_targets(cls, model: nn.Module) -> list[str]:
        mt = _model_type(model)
        if mt not in ADAPTER_SITES:
            raise ValueError(f"adapter: no default sites for model type {mt!r}; pass target_modules "
                             "(the attention output and FFN output projections)")
        return list(ADAPTER_SITES[mt])

    @classmethod
    def _sites(cls, model: nn.Module, target_modules: list[str] | None) -> list[str]:
        return find_targets(model, list(target_modules) if target_modules else cls.default_targets(model))

    @classmethod
    def apply_to_model(cls, model, cfg: HoulsbyConfig, target_modules=None) -> None:
        for name in cls._sites(model, target_modules):
            _set_module(model, name, HoulsbyAdapterLinear(model.get_submodule(name), cfg))
        if cfg.train_layer_norm:
            for m in _norm_modules(model):
                m.requires_grad_(True)

    @classmethod
    def count_params(cls, model, cfg: HoulsbyConfig, target_modules=None) -> int:
        """Adapters at every site (``2·d·m + m + d`` each), plus the norms if trained; call before apply."""
        total = 0
        for name in cls._sites(model, target_modules):
            w = model.get_submodule(name).weight
            d = w.shape[0] if isinstance(model.get_submodule(name), nn.Linear) else w.shape[1]
            total += HoulsbyAdapterLinear.num_params(d, cfg.bottleneck)
        if cfg.train_layer_norm:
            total += sum(p.numel() for m in _norm_modules(model) for p in m.parameters())
        return total
