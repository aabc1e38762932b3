"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190): trainable keys/values in every attention layer.

The pre-hook puts ``n`` trainable key/value vectors per layer into a fresh ``DynamicCache`` (passed as
``cache``, or ``past_key_values`` on older ``transformers``) and extends ``attention_mask``: every
attention layer attends to them, and ``transformers`` builds the masks (as PEFT does). As in PEFT,
the prefix holds positions ``0..n-1`` and the real tokens start at ``n`` (given ``position_ids`` are
shifted too, so cached generation matches a plain forward). Shares the hooking helpers of
:mod:`bora_lab.methods.prompts`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterConfig, ModelMethod
from .prompts import _SOURCE, _base, _cache_arg, _hidden, _Hooked, _kv_geometry, _n_tokens_field
from .registry import register


@dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning options (rank/alpha are unused)."""

    num_virtual_tokens: int = _n_tokens_field(10, "prefix length n: key/value vectors added to every attention layer")
    init: str = field(default="tokens", metadata={
        "help": "tokens: keys/values of random real tokens (Li & Liang's init ablation); random: N(0, 1)",
        "choices": ["tokens", "random"]})
    reparameterize: bool = field(default=False, metadata={
        "help": "produce the prefix with an MLP from n embeddings (Li & Liang's reparametrisation)"})
    encoder_hidden: int = field(default=128, metadata={
        "help": "hidden size of the reparameterisation MLP", "min": 1, "max": 4096})


# -- prefix tuning ---------------------------------------------------------------------------------
class PrefixKV(_Hooked):
    """Trainable keys/values ``[layers, kv_heads, n, head_dim]`` fed to the model as its key/value cache."""

    def __init__(self, model: nn.Module, cfg: PrefixConfig):
        n = cfg.num_virtual_tokens
        super().__init__(model, n)
        base = _base(model)
        self.geometry = layers, kv, hd = _kv_geometry(base.config)
        like = base.get_input_embeddings().weight
        kw = {"device": like.device, "dtype": like.dtype}
        if cfg.reparameterize:  # Li & Liang: P = MLP(P'), only for training stability
            d, h = like.shape[1], cfg.encoder_hidden
            self.prefix_embedding = nn.Parameter(torch.randn(n, d, **kw))
            self.prefix_mlp = nn.Sequential(nn.Linear(d, h, **kw), nn.Tanh(), nn.Linear(h, layers * 2 * kv * hd, **kw))
        elif cfg.init == "tokens":
            keys, values = _token_key_values(base, n)
            self.prefix_keys, self.prefix_values = nn.Parameter(keys), nn.Parameter(values)
        elif cfg.init == "random":
            self.prefix_keys = nn.Parameter(torch.randn(layers, kv, n, hd, **kw))
            self.prefix_values = nn.Parameter(torch.randn(layers, kv, n, hd, **kw))
        else:
            raise ValueError(f"prefix init must be 'tokens' or 'random', got {cfg.init!r}")

    def key_values(self) -> tuple[Tensor, Tensor]:
        """Keys and values, each ``(layers, kv_heads, n, head_dim)``."""
        if not hasattr(self, "prefix_mlp"):
            return self.prefix_keys, self.prefix_values
        layers, kv, hd = self.geometry
        out = self.prefix_mlp(self.prefix_embedding)  # (n, layers * 2 * kv * hd)
        out = out.view(self.n, layers, 2, kv, hd).permute(2, 1, 3, 0, 4)  # (2, layers, kv, n, hd)
        return out[0], out[1]

    def pre_hook(self, module, args, kwargs):
        from transformers import DynamicCache

        kw = self.bind(args, kwargs)
        ref = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        b, length = ref.shape[:2]
        past = kw.get(self.cache_arg)
        if past is None:
            past = kw[self.cache_arg] = DynamicCache(config=module.config)
        if past.get_seq_length() == 0:
            keys, values = self.key_values()
            for i in range(keys.shape[0]):
                past.update(keys[i].unsqueeze(0).expand(b, -1, -1, -1), values[i].unsqueeze(0).expand(b, -1, -1, -1), i)
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, past.get_seq_length() - self.n + length, dtype=torch.long, device=ref.device)
        kw["attention_mask"] = torch.cat([mask.new_ones(b, self.n), mask], dim=1)
        if kw.get("position_ids") is not None:  # the prefix holds positions 0..n-1, as when none are given
            kw["position_ids"] = kw["position_ids"] + self.n
        return (), kw


@torch.no_grad()
def _token_key_values(base: nn.Module, n: int) -> tuple[Tensor, Tensor]:
    """Keys/values that ``n`` random vocabulary tokens produce in every layer (eval mode)."""
    from transformers import DynamicCache

    cache, emb, was_training = DynamicCache(config=base.config), base.get_input_embeddings().weight, base.training
    base.eval()
    try:
        ids = torch.randint(0, emb.shape[0], (1, n), device=emb.device)
        base(input_ids=ids, use_cache=True, **{_cache_arg(base): cache})
    finally:
        base.train(was_training)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (layers, kv, n, hd)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.clone(), values.clone()


@register("prefix", PrefixConfig)
class PrefixTuning(ModelMethod):
    """Prefix tuning (Li & Liang, arXiv:2101.00190): trainable keys/values prepended in every layer.

    Each attention layer ``l`` computes ``softmax(q [K_l^P; K]^T / sqrt(d)) [V_l^P; V]`` with
    ``n`` trainable ``K_l^P, V_l^P``. With ``reparameterize`` they come from an MLP during
    training (the paper's trick; afterwards only ``P`` is needed). Not mergeable: attention over
    extra keys is no weight change.

    Not identity at init: the real tokens attend to the new vectors from the first step (no
    zero-initialised prompt leaves attention unchanged, since softmax weights are positive).
    """

    description = "Prefix tuning: n trainable key/value vectors prepended in every attention layer"
    formula = r"\mathrm{head}_l = \mathrm{softmax}\!\left(\tfrac{q\,[K^P_l;K]^\top}{\sqrt{d}}\right)[V^P_l;V]"
    paper = "Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021 (arXiv:2101.00190)"
    source = _SOURCE
    identity_at_init = False

    @classmethod
    def apply_to_model(cls, model, cfg: PrefixConfig, target_modules=None) -> None:
        PrefixKV(model, cfg).attach(model, "bora_prefix")

    @classmethod
    def count_params(cls, model, cfg: PrefixConfig, target_modules=None) -> int:
        layers, kv, hd = _kv_geometry(_base(model).config)
        n, out = cfg.num_virtual_tokens, layers * 2 * kv * hd
        if cfg.reparameterize:
            d, h = _hidden(model), cfg.encoder_hidden
            return n * d + (d * h + h) + (h * out + out)
        return n * out
