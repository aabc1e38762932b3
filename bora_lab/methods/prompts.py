"""Soft prompts: prompt tuning and P-tuning (input virtual tokens), and the hooks that prefix tuning
(:mod:`bora_lab.methods.prefix`, per-layer keys/values) shares with them.

All three hook the base model (``model.base_model``: ``BertModel``, ``LlamaModel``) so that the
ordinary call ``model(input_ids=..., attention_mask=..., labels=...)`` works unchanged: a forward
pre-hook embeds ``input_ids``, inserts ``n`` trainable vectors and extends ``attention_mask`` (and
``token_type_ids``/``position_ids`` when given); a forward hook removes the ``n`` positions from the
output hidden states, so logits, labels and pooling keep their shapes. Encoders get the prompt after
the first token ([CLS], which the pooler reads); decoders before the first token. The key/value
cache is read and passed under the name the backbone takes (``cache`` on newer ``transformers``,
``past_key_values`` before): newer releases silently ignore ``past_key_values`` whenever ``cache``
is passed too.

In cached generation the virtual tokens go in once (prefill); later steps only extend the mask and
shift given ``position_ids``. None of the three is mergeable or has an effective weight.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterConfig, ModelMethod
from .registry import register

_SOURCE = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), "
           "'PEFT Techniques': 2. Prefix Tuning, 3. Prompt Tuning")


def _n_tokens_field(default: int = 20, what: str = "virtual tokens n prepended to every input"):
    return field(default=default, metadata={"help": what, "min": 1, "max": 512})


def _position_field():
    return field(default="auto", metadata={
        "help": "where the prompt goes: auto (after [CLS] for encoders, at the start for decoders); start is PEFT's placement",
        "choices": ["auto", "start", "after_first"]})


@dataclass
class PromptConfig(AdapterConfig):
    """Prompt tuning options (rank/alpha are unused)."""

    num_virtual_tokens: int = _n_tokens_field()
    position: str = _position_field()
    init: str = field(default="vocab", metadata={
        "help": "vocab: copies of random token embeddings (Lester et al.); random: N(0, std of the embeddings) (PEFT's default is N(0, 1))",
        "choices": ["vocab", "random"]})


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning options (rank/alpha are unused)."""

    num_virtual_tokens: int = _n_tokens_field()
    position: str = _position_field()
    encoder: str = field(default="lstm", metadata={
        "help": "prompt encoder: lstm (2-layer bidirectional LSTM + MLP, as the paper) or mlp (PEFT's default, layer for layer)",
        "choices": ["lstm", "mlp"]})
    encoder_hidden: int = field(default=128, metadata={
        "help": "hidden size of the prompt encoder", "min": 1, "max": 4096})


# -- helpers ---------------------------------------------------------------------------------------
def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _hidden(model: nn.Module) -> int:
    return _base(model).get_input_embeddings().weight.shape[1]


def _is_causal(model: nn.Module) -> bool:
    if getattr(getattr(model, "config", None), "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _kv_geometry(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a ``transformers`` config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv, getattr(config, "head_dim", None) or config.hidden_size // heads


_CACHE_ARGS = ("cache", "past_key_values")


def _cache_arg(base: nn.Module) -> str:
    """The name under which ``base.forward`` takes its key/value cache.

    Older ``transformers`` 5 releases call it ``past_key_values``; newer ones call it ``cache`` and
    ignore ``past_key_values`` (with a warning) whenever ``cache`` is passed too, even as ``None``,
    which is what the task heads (``LlamaForCausalLM``...) do. The prefix must go in under the name
    the model reads, or it is silently dropped.
    """
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _insert(t: Tensor, k: int, block: Tensor) -> Tensor:
    """``t[:, :k] ++ block ++ t[:, k:]`` along dim 1."""
    return torch.cat([t[:, :k], block, t[:, k:]], dim=1)


class _Hooked(nn.Module):
    """Base of the modules attached to the base model; binds positional args to names."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.arg_names, self.n = list(inspect.signature(_base(model).forward).parameters), n
        self.cache_arg = _cache_arg(_base(model))

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name; a key/value cache under either name ends up under ``cache_arg``."""
        kw = {**dict(zip(self.arg_names, args)), **kwargs}
        given = [kw.pop(name) for name in _CACHE_ARGS if name in kw]
        if given or self.cache_arg in self.arg_names:
            kw[self.cache_arg] = next((c for c in given if c is not None), None)
        return kw

    def attach(self, model: nn.Module, attr: str) -> None:
        base = _base(model)
        setattr(base, attr, self)
        base.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        if hasattr(self, "post_hook"):
            base.register_forward_hook(self.post_hook)


# -- input virtual tokens (prompt tuning, P-tuning) ------------------------------------------------
class VirtualTokens(_Hooked):
    """Inserts ``prompt(): [n, d]`` into the embedded input at position ``insert_at``."""

    def __init__(self, model: nn.Module, n: int, insert_at: int, encoder: nn.Module):
        super().__init__(model, n)
        self.insert_at, self.encoder, self._inserted = insert_at, encoder, False

    def prompt(self) -> Tensor:
        return self.encoder()  # (n, d)

    def pre_hook(self, module, args, kwargs):
        kw = self.bind(args, kwargs)
        n, k = self.n, self.insert_at
        past = kw.get(self.cache_arg)
        self._inserted = past is None or past.get_seq_length() == 0
        pos = kw.get("position_ids")
        if self._inserted:
            emb = kw.get("inputs_embeds")
            if emb is None:
                emb = module.get_input_embeddings()(kw["input_ids"])  # (B, L, d)
            b = emb.shape[0]
            kw["input_ids"] = None
            kw["inputs_embeds"] = _insert(emb, k, self.prompt().to(emb.dtype).unsqueeze(0).expand(b, -1, -1))
            tt = kw.get("token_type_ids")
            if tt is not None:  # the prompt takes the segment of its left neighbour
                kw["token_type_ids"] = _insert(tt, k, tt[:, max(k - 1, 0):max(k, 1)].expand(-1, n))
            if pos is not None:
                steps = torch.arange(n, device=pos.device, dtype=pos.dtype)
                kw["position_ids"] = _insert(pos + n * (torch.arange(pos.shape[1], device=pos.device) >= k),
                                             k, pos[:, k:k + 1] + steps)
        elif pos is not None:  # decoding: the cache already holds the prompt
            kw["position_ids"] = pos + n
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("prompt methods need a 2-D attention_mask of shape [batch, seq]")
            kw["attention_mask"] = _insert(mask, k, mask.new_ones(mask.shape[0], n))
        return (), kw

    def post_hook(self, module, args, output):
        if not self._inserted:
            return output
        self._inserted = False
        k, n = self.insert_at, self.n

        def strip(h: Tensor) -> Tensor:  # (B, L + n, d) -> (B, L, d)
            return torch.cat([h[:, :k], h[:, k + n:]], dim=1)

        if isinstance(output, tuple):
            return (strip(output[0]),) + tuple(output[1:])
        output.last_hidden_state = strip(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(strip(h) for h in output.hidden_states)
        return output


class PromptEmbedding(nn.Module):
    """Prompt tuning's free vectors ``P: [n, d]``."""

    def __init__(self, embeddings: Tensor, n: int, init: str):
        super().__init__()
        if init == "vocab":  # copies of random rows of the embedding matrix
            p = embeddings[torch.randint(0, embeddings.shape[0], (n,))].detach().clone()
        elif init == "random":
            p = torch.randn(n, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device) * embeddings.std()
        else:
            raise ValueError(f"prompt init must be 'vocab' or 'random', got {init!r}")
        self.prompt_embedding = nn.Parameter(p.detach())

    def forward(self) -> Tensor:
        return self.prompt_embedding


class PromptEncoder(nn.Module):
    """P-tuning's encoder: ``P = MLP(BiLSTM(E))`` (or ``P = MLP(E)``), ``E: [n, d]`` free embeddings."""

    def __init__(self, n: int, d: int, cfg: PTuningConfig, like: Tensor):
        super().__init__()
        h, kw = cfg.encoder_hidden, {"device": like.device, "dtype": like.dtype}
        self.prompt_embedding = nn.Parameter(torch.randn(n, d, **kw))  # as nn.Embedding's N(0, 1)
        if cfg.encoder == "lstm":
            self.lstm = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        elif cfg.encoder == "mlp":
            self.lstm = None
            self.mlp = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                     nn.Linear(h, d, **kw))
        else:
            raise ValueError(f"P-tuning encoder must be 'lstm' or 'mlp', got {cfg.encoder!r}")

    def forward(self) -> Tensor:
        e = self.prompt_embedding  # (n, d)
        if self.lstm is not None:
            e = self.lstm(e.unsqueeze(0))[0].squeeze(0)  # (n, 2h)
        return self.mlp(e)  # (n, d)

    @staticmethod
    def num_params(n: int, d: int, cfg: PTuningConfig) -> int:
        h = cfg.encoder_hidden
        if cfg.encoder == "mlp":
            return n * d + (d * h + h) + (h * h + h) + (h * d + d)
        lstm = sum(2 * (4 * h * d_in + 4 * h * h + 8 * h) for d_in in (d, 2 * h))  # 2 layers x 2 directions
        return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def _insert_at(model: nn.Module, position: str) -> int:
    if position not in ("auto", "start", "after_first"):
        raise ValueError(f"position must be auto, start or after_first, got {position!r}")
    return 0 if position == "start" or (position == "auto" and _is_causal(model)) else 1


@register("prompt", PromptConfig)
class PromptTuning(ModelMethod):
    """Prompt tuning (Lester et al., arXiv:2104.08691): ``n`` trainable input embeddings, nothing else.

    The input becomes ``[CLS] P_1..P_n x_1..x_L`` (encoders) or ``P_1..P_n x_1..x_L`` (decoders);
    every weight of the model stays frozen. The prompt positions are removed from the output, so
    logits and labels keep their shapes. Not mergeable: the prompt is input, not a weight change.

    Choices that differ from PEFT 0.21 (``PromptTuningConfig``), on purpose: with ``position="auto"``
    an encoder's prompt goes after [CLS] (which the pooler reads); PEFT puts it first
    (``position="start"`` matches PEFT exactly, tested). Our ``init="vocab"`` copies random vocabulary
    embeddings (Lester et al., §3.2's best init); PEFT's default is random N(0, 1) (``init="random"``
    here scales N(0, 1) to the embeddings' std).

    Not identity at init: the real tokens attend to the new vectors from the first step (no
    zero-initialised prompt leaves attention unchanged, since softmax weights are positive).
    """

    description = "Prompt tuning: n trainable embeddings inserted into the input (after [CLS]; PEFT: first)"
    formula = r"[\,e(x_{\mathrm{CLS}}),\ P_1,\dots,P_n,\ e(x_1),\dots,e(x_L)\,],\ P \in \mathbb{R}^{n\times d}"
    paper = ("Lester, Al-Rfou & Constant, The Power of Scale for Parameter-Efficient Prompt Tuning, EMNLP 2021 "
             "(arXiv:2104.08691)")
    source = _SOURCE
    identity_at_init = False

    @classmethod
    def apply_to_model(cls, model, cfg: PromptConfig, target_modules=None) -> None:
        emb = _base(model).get_input_embeddings().weight
        enc = PromptEmbedding(emb, cfg.num_virtual_tokens, cfg.init)
        VirtualTokens(model, cfg.num_virtual_tokens, _insert_at(model, cfg.position), enc).attach(model, "bora_prompt")

    @classmethod
    def count_params(cls, model, cfg: PromptConfig, target_modules=None) -> int:
        return cfg.num_virtual_tokens * _hidden(model)


@register("ptuning", PTuningConfig)
class PTuning(ModelMethod):
    """P-tuning (Liu et al., GPT Understands, Too, arXiv:2103.10385): prompts from a small encoder.

    ``P = MLP(BiLSTM(E))`` with free embeddings ``E: [n, d]``; the encoder couples the virtual
    tokens and steadies training. The paper interleaves prompts with a template; we place them as
    prompt tuning does. Not mergeable: the prompt is input, not a weight change.

    Choices that differ from PEFT 0.21 (``PromptEncoderConfig``), on purpose: the default encoder is
    the paper's LSTM (PEFT's default is the MLP; ``encoder="mlp"`` is PEFT's, layer for layer), and
    ``position="auto"`` puts an encoder's prompt after [CLS] (PEFT: first, ``position="start"``).
    With PEFT's placement and weights, the logits equal PEFT's for both encoders (tested).

    Not identity at init: the real tokens attend to the new vectors from the first step (no
    zero-initialised prompt leaves attention unchanged, since softmax weights are positive).
    """

    description = "P-tuning: virtual-token embeddings produced by a small LSTM (default) or MLP (PEFT's) encoder"
    formula = r"P = \mathrm{MLP}(\mathrm{BiLSTM}(E)),\ E \in \mathbb{R}^{n\times d};\ [\,P,\ e(x)\,]"
    paper = "Liu et al., GPT Understands, Too (P-tuning), arXiv:2103.10385, 2021"
    source = _SOURCE
    identity_at_init = False

    @classmethod
    def apply_to_model(cls, model, cfg: PTuningConfig, target_modules=None) -> None:
        emb = _base(model).get_input_embeddings().weight
        enc = PromptEncoder(cfg.num_virtual_tokens, emb.shape[1], cfg, emb)
        VirtualTokens(model, cfg.num_virtual_tokens, _insert_at(model, cfg.position), enc).attach(model, "bora_prompt")

    @classmethod
    def count_params(cls, model, cfg: PTuningConfig, target_modules=None) -> int:
        return PromptEncoder.num_params(cfg.num_virtual_tokens, _hidden(model), cfg)
