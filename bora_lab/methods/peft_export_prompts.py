"""PEFT export of the model-level prompt methods: prompt tuning, P-tuning and prefix tuning.

PEFT saves a prompt-learning adapter as one table, ``prompt_embeddings``, and loads it frozen
(``PeftModel.from_pretrained`` refuses ``is_trainable=True`` for prompt learning, and feeds the table
as it is in inference mode). So the exact equivalent of a trained run is the table our model feeds
to its backbone:

* ``prompt`` (Lester et al., 2021, arXiv:2104.08691): ``PromptTuningConfig``; the ``n`` virtual token
  embeddings ``[n, d]``.
* ``ptuning`` (Liu et al., 2021, arXiv:2103.10385): ``PromptEncoderConfig`` with our encoder type
  (LSTM or MLP, the same layers as PEFT's) and hidden size; the table is the encoder's output
  ``P = MLP(BiLSTM(E))`` (or ``MLP(E)``), which is what PEFT itself saves for a P-tuning adapter.
* ``prefix`` (Li & Liang, 2021, arXiv:2101.00190): ``PrefixTuningConfig(prefix_projection=False)``; the
  keys and values of every layer as ``[n, layers·2·kv_heads·head_dim]`` (with ``reparameterize``, the
  MLP's output: only that reaches the model; PEFT cannot load a table into its projection form).

Two cases have no PEFT equivalent and are refused with the reason:

* a prompt after the first token (``position="auto"`` on an encoder, or ``"after_first"``): PEFT puts
  virtual tokens first, and its classifier then pools the first virtual token, ours [CLS]. Train with
  ``position="start"`` (PEFT's placement) to export.
* prefix tuning on a classifier whose forward takes no ``past_key_values`` (BERT under
  ``transformers`` 5, which renamed the argument to ``cache``): PEFT 0.21 raises "Model does not support
  past key values" at the first forward, so we check what PEFT checks before writing anything.

No merged export applies to these methods either: they change the input, not the weights.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .peft_export_common import saved_modules, set_base_name, write_notes

TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM"}
_NO_MERGED = "no merged export applies either (the method changes the input, not the weights)"


def task_type(model: nn.Module) -> str:
    """PEFT's ``task_type`` for ``model``: SEQ_CLS or CAUSAL_LM, from its class name.

    Raises:
        ValueError: another kind of model (PEFT's prompt learning needs one of its task classes).
    """
    name = type(model).__name__
    for suffix, kind in TASK_TYPES.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"PEFT prompt-learning export needs a sequence classifier or a causal LM, not {name}; "
                     f"{_NO_MERGED}")


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without our prompt modules and their forward hooks."""
    plain = copy.deepcopy(model)
    base = getattr(plain, "base_model", plain)
    for name in [n for n, _ in base.named_children() if n.startswith("bora_")]:
        hooked = getattr(base, name)
        for hooks in (base._forward_pre_hooks, base._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is hooked]:
                del hooks[key]
                for extra in (base._forward_pre_hooks_with_kwargs, base._forward_hooks_with_kwargs,
                              base._forward_hooks_always_called):
                    extra.pop(key, None)
        delattr(base, name)
    del plain.bora_lab_config
    return plain


def _accepts_past_key_values(model: nn.Module) -> bool:
    """PEFT's test before a classifier's prefix-tuning forward (``_prefix_tuning_forward``; its causal-LM
    forward passes the prefix on unchecked): the model's, else its backbone's, forward has the argument."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return True
    from transformers import PreTrainedModel

    backbone = next((m for _, m in model.named_children() if isinstance(m, PreTrainedModel)), None)
    return backbone is not None and "past_key_values" in inspect.signature(backbone.forward).parameters


@torch.no_grad()
def prompt_table(model: nn.Module) -> Tensor:
    """What the trained prompt method feeds the model, as PEFT's ``prompt_embeddings`` table.

    ``[n, d]`` input embeddings (prompt, P-tuning) or ``[n, layers·2·kv_heads·head_dim]`` keys and values
    (prefix: layer ``l``'s keys at column block ``2l``, values at ``2l + 1``, each ``(kv_heads, head_dim)``).
    """
    base = getattr(model, "base_model", model)
    if hasattr(base, "bora_prefix"):
        keys, values = base.bora_prefix.key_values()  # (layers, kv, n, hd) each
        n = keys.shape[2]
        return torch.stack([keys, values], 1).permute(3, 0, 1, 2, 4).reshape(n, -1).detach().clone()
    return base.bora_prompt.prompt().detach().clone()  # (n, d)


def _check(model: nn.Module, method: str, kind: str) -> None:
    base = getattr(model, "base_model", model)
    if method != "prefix" and base.bora_prompt.insert_at != 0:
        raise ValueError(f"{method!r} with the prompt after the first token ([CLS]; position 'auto' on an encoder) "
                         "has no PEFT equivalent: PEFT puts virtual tokens first, so its classifier pools the first "
                         f"virtual token, not [CLS]. Train with method option position='start' to export; {_NO_MERGED}")
    if method == "prefix" and kind == "SEQ_CLS" and not _accepts_past_key_values(model):
        import peft
        import transformers

        raise ValueError(f"'prefix' on {type(model).__name__} has no working PEFT equivalent here: PEFT "
                         f"{peft.__version__} passes past_key_values, which this model's forward does not take under "
                         f"transformers {transformers.__version__} (PEFT raises 'Model does not support past key "
                         f"values'); {_NO_MERGED}")


def _config(method: str, kind: str, opts: dict[str, Any], n: int):
    import peft

    common = {"task_type": kind, "num_virtual_tokens": n, "inference_mode": True}
    if method == "prompt":
        return peft.PromptTuningConfig(**common)
    if method == "ptuning":
        return peft.PromptEncoderConfig(**common, encoder_hidden_size=opts.get("encoder_hidden", 128),
                                        encoder_reparameterization_type=opts.get("encoder", "lstm").upper(),
                                        encoder_dropout=0.0)
    return peft.PrefixTuningConfig(**common, prefix_projection=False)


_NOTES = {
    "prompt": "Prompt tuning: the virtual token embeddings, placed first (PEFT's placement).",
    "ptuning": ("P-tuning: the table is the trained encoder's output (what PEFT saves for P-tuning); the encoder "
                "weights themselves are not part of a PEFT P-tuning checkpoint."),
    "prefix": ("Prefix tuning without projection: the keys and values of every layer (with our reparameterisation "
               "MLP, its output), placed before the real tokens, which start at position n."),
}


def export_prompt(model: nn.Module, directory: Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a trained prompt/P-tuning/prefix model as a PEFT prompt-learning adapter (module docstring).

    Raises:
        ValueError: no PEFT equivalent (the placement, the model kind, or PEFT's prefix forward).
    """
    import peft

    meta = model.bora_lab_config
    method, kind = meta["method"], task_type(model)
    _check(model, method, kind)
    table = prompt_table(model)
    config = _config(method, kind, meta["options"], table.shape[0])
    config.modules_to_save = saved_modules(model, meta)
    set_base_name(config, model, base_model_name_or_path)
    peft_model = peft.get_peft_model(_plain_copy(model), config)
    theirs = peft_model.prompt_encoder["default"].embedding.weight
    if theirs.shape != table.shape:
        raise ValueError(f"PEFT's {type(config).__name__} expects a {tuple(theirs.shape)} table, this run has "
                         f"{tuple(table.shape)}: no PEFT equivalent for this model's attention layout; {_NO_MERGED}")
    with torch.no_grad():
        theirs.copy_(table)
    peft_model.save_pretrained(str(directory))
    write_notes(directory, method, [_NOTES[method], "Inference only: PEFT loads prompt-learning adapters frozen.",
                                    f"PEFT task type {kind}; the trained head, if any, is in modules_to_save."],
                base_model_name_or_path)
    return directory
