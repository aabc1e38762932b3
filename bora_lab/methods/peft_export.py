"""Export trained adapters in Hugging Face PEFT's format, for ``peft.PeftModel.from_pretrained``.

We let PEFT write its own files: copy the model, put plain layers back, wrap them with
``peft.get_peft_model``, copy our tensors (or their exact conversion) into PEFT's, and call
``save_pretrained``. So the export follows whatever key layout the installed PEFT uses, and
``PeftModel.from_pretrained`` on the same base gives the same logits (``tests/test_peft_export.py``).

Layer methods (this module), all as ``LoraConfig`` unless said otherwise; ``s`` is our scaling:

* ``lora``, ``rslora``, ``dora``: as they are (``use_rslora``, ``use_dora``).
* ``asylora`` (Zhu et al., 2024, arXiv:2402.16842): the frozen random ``A`` is part of ``ΔW = s·B·A``,
  so it is written as ``lora_A``.
* ``sbora_fa``/``sbora_fb`` (Po et al., 2024, arXiv:2407.05413): the fixed standard-basis factor is
  written as the dense one-hot matrix (``A[k, i_k] = 1`` for FA, ``B[i_k, k] = 1`` for FB).
* ``pissa`` (Meng et al., 2024, arXiv:2404.02948): PiSSA trains over ``W_res = W0 − s·B0·A0``; on the
  original ``W0`` the same function is ``W0 + s·(B·A − B0·A0) = W0 + s·[B, −B0]·[A; A0]``, a rank-2r
  LoRA with ``lora_alpha = 2·alpha`` (PEFT's own PiSSA-to-LoRA conversion,
  ``save_pretrained(path_initial_model_for_weight_conversion=...)``). ``B0·A0`` is recomputed from
  what the layer holds, ``(W0 − W_res)/s``, by an fp64 rank-r SVD.
* ``dora_mag`` (DoRA's magnitude-only ablation, Liu et al., 2024, arXiv:2402.09353): DoRA with a rank-1
  ``A = B = 0``, so ``W = m / ||W0||_row · W0``.
* ``qlora``/``qdora`` (Dettmers et al., 2023, arXiv:2305.14314): LoRA/DoRA, trained over the
  NF4-dequantised base, applied by PEFT to the base it is given: the full-precision model, which
  differs from the trained model by the quantisation error (the README.md of the export says so).
* ``adalora`` (Zhang et al., 2023, arXiv:2303.10512): ``AdaLoraConfig``. PEFT computes
  ``B·(A ⊙ E)·lora_alpha/(ranknum + 1e-5)`` with ``ranknum = r``; ours is ``(alpha/r)·P·diag(λ ⊙ mask)·Q``,
  so ``lora_E = λ ⊙ mask`` (pruned entries are zeros) and ``lora_alpha = alpha·(r + 1e-5)/r``.
* ``vera`` (Kopiczko et al., 2023, arXiv:2310.11454): ``VeraConfig(save_projection=True)`` with our
  frozen ``A``, ``B``, when every target layer has one shape: PEFT slices one shared pair for all
  layers, ours draws one pair per shape, so mixed shapes have no PEFT equivalent.

Model-level methods (``prompt``, ``ptuning``, ``prefix``): :mod:`bora_lab.methods.peft_export_prompts`.
Every other method raises ValueError naming the reason (:data:`NO_PEFT`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import AdapterLinear
from .peft_export_common import saved_modules, set_base_name, write_notes
from .whole_model import adapter_layers

# Pair functions: a wrapped layer -> (A [r', in], B [out, r']) with ΔW = s'·B·A in PEFT's LoRA form.
Pair = Callable[[AdapterLinear], tuple[Tensor, Tensor]]


def _ab(layer: AdapterLinear) -> tuple[Tensor, Tensor]:
    return layer.lora_A, layer.lora_B


def _sbora_fa(layer: AdapterLinear) -> tuple[Tensor, Tensor]:
    b = layer.sbora_B  # (out, r)
    a = torch.zeros(b.shape[1], layer.in_features, dtype=b.dtype, device=b.device)  # one-hot rows (r, in)
    a[torch.arange(b.shape[1]), layer.sb_index] = 1.0
    return a, b


def _sbora_fb(layer: AdapterLinear) -> tuple[Tensor, Tensor]:
    a = layer.sbora_A  # (r, in)
    b = torch.zeros(layer.out_features, a.shape[0], dtype=a.dtype, device=a.device)  # one-hot columns (out, r)
    b[layer.sb_index, torch.arange(a.shape[0])] = 1.0
    return a, b


def _pissa(layer: AdapterLinear) -> tuple[Tensor, Tensor]:
    from .pissa import principal_factors

    w0, res = layer.weight0.detach().double(), layer.w_res.double()
    a0, b0 = principal_factors(w0 - res, layer.cfg.rank, layer.scale)  # s·B0·A0 = W0 − W_res (fp64 SVD)
    dt = layer.lora_A.dtype
    return torch.cat([layer.lora_A, a0.to(dt)]), torch.cat([layer.lora_B, -b0.to(dt)], dim=1)  # (2r, in), (out, 2r)


def _zero_rank_one(layer: AdapterLinear) -> tuple[Tensor, Tensor]:
    like = layer.magnitude
    return like.new_zeros(1, layer.in_features), like.new_zeros(layer.out_features, 1)


# method -> (LoraConfig flags, pair function, rank of the export per rank of the run (None: rank 1, alpha 1))
LORA_EXPORTS: dict[str, tuple[dict[str, Any], Pair, int | None]] = {
    "lora": ({}, _ab, 1), "rslora": ({"use_rslora": True}, _ab, 1), "dora": ({"use_dora": True}, _ab, 1),
    "qlora": ({}, _ab, 1), "qdora": ({"use_dora": True}, _ab, 1), "asylora": ({}, _ab, 1),
    "sbora_fa": ({}, _sbora_fa, 1), "sbora_fb": ({}, _sbora_fb, 1), "pissa": ({}, _pissa, 2),
    "dora_mag": ({"use_dora": True}, _zero_rank_one, None),
}
PROMPT_EXPORTS = ("prompt", "ptuning", "prefix")
EXPORTABLE = (*LORA_EXPORTS, "adalora", "vera", *PROMPT_EXPORTS)

_MERGED = "use --format merged"
# method -> why PEFT cannot load it; shown in the error and in docs/export.md.
NO_PEFT = {
    "full": "dense trained weights, not an adapter",
    "dora_col": "PEFT's DoRA scales output features (rows) only; this variant scales input features (columns)",
    "bora": "PEFT has no row-and-column magnitudes",
    "qbora": "PEFT has no row-and-column magnitudes",
    "lora2": "PEFT has no two-plane update with a pruned diagonal",
    "mora": "PEFT has no square-matrix update with compress/decompress maps",
    "dvora": "PEFT's VeRA has no DoRA magnitude",
    "bitfit": "PEFT has no bias-only method",
    "head": "only the head and top layers train: the result is a plain model",
    "features": "only the head trains: the result is a plain model",
    "full_model": "the whole model trains: the result is a plain model",
    "adapter": "PEFT has no Houlsby bottleneck adapter",
}
NO_MERGED = ("adapter",)  # methods export_merged refuses too (prompt methods: peft_export_prompts)


def no_peft_equivalent(method: str) -> ValueError:
    """The error for a method PEFT cannot load: the supported list, the reason, and what to do instead."""
    why = NO_PEFT.get(method, "not mapped to a PEFT method")
    if method in NO_MERGED:
        return ValueError(f"PEFT export supports {', '.join(EXPORTABLE)}; {method!r} has no PEFT equivalent ({why}), "
                          "and no merged export applies either (it adds nonlinear layers): reload the run with "
                          "bora_lab.engine.reload.load_run")
    return ValueError(f"PEFT export supports {', '.join(EXPORTABLE)}; {method!r} has no PEFT equivalent; "
                      f"{_MERGED} ({why})")


def plain_linear(layer: AdapterLinear) -> nn.Linear:
    """The pretrained layer as an ``nn.Linear``: ``layer.base``, or for NF4 bases a Linear holding the
    dequantised ``W0`` (only PEFT's scaffolding: base weights are not part of an adapter file)."""
    layer.unmerge()
    if type(layer.base) is nn.Linear:
        return layer.base
    w, b = layer.weight0.detach(), layer.base.bias
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _unwrapped_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every wrapped layer replaced by its pretrained Linear."""
    base = copy.deepcopy(model)
    for name, layer in list(adapter_layers(base)):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, plain_linear(layer))
    del base.bora_lab_config
    return base


def export_peft(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                total_steps: int | None = None) -> Path:
    """Write ``model``'s adapter as a PEFT checkpoint in ``directory`` (see the module docstring).

    Args:
        model: a model prepared by :func:`bora_lab.methods.apply` (and trained).
        directory: output folder (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``).
        base_model_name_or_path: recorded in the config so ``PeftModel`` users know the base.
        total_steps: the run's training steps (AdaLoRA's ``total_step``, which PEFT requires).

    Raises:
        ValueError: the method has no PEFT equivalent (why, and whether a merged export applies), or VeRA
            over layers of different shapes.
    """
    meta = getattr(model, "bora_lab_config", None)
    method = meta["method"] if meta else None
    if method is None:
        raise ValueError(f"PEFT export supports {', '.join(EXPORTABLE)}; this model has no BoRA Lab method applied")
    if method in PROMPT_EXPORTS:
        from .peft_export_prompts import export_prompt

        return export_prompt(model, Path(directory), base_model_name_or_path)
    if method not in EXPORTABLE:
        raise no_peft_equivalent(method)
    layers = dict(adapter_layers(model))  # GPT-2's Conv1D too: PEFT's LoRA takes it (fan_in_fan_out), same A, B
    build = {"adalora": _adalora, "vera": _vera}.get(method, _lora)
    config, fill, notes = build(method, meta["options"], layers, total_steps)
    config.target_modules = sorted(layers)
    config.modules_to_save = saved_modules(model, meta)
    set_base_name(config, model, base_model_name_or_path)
    import peft

    peft_model = peft.get_peft_model(_unwrapped_copy(model), config)
    with torch.no_grad():
        fill(peft_model)
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    write_notes(directory, method, notes, base_model_name_or_path)
    return directory


def _lora(method: str, opts: dict[str, Any], layers: dict[str, AdapterLinear], total_steps: int | None):
    import peft

    flags, pair, factor = LORA_EXPORTS[method]
    r, alpha = (1, 1.0) if factor is None else (factor * opts["rank"], factor * opts["alpha"])
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, **flags)

    def fill(peft_model) -> None:
        inner = peft_model.base_model.model
        for name, ours in layers.items():
            theirs = inner.get_submodule(name)
            a, b = pair(ours)
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
            if flags.get("use_dora"):
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)

    notes = {
        "qlora": ["Trained over the NF4-quantised base (4-bit NormalFloat, double-quantised absmax): load the "
                  "**full-precision** base model. PEFT then computes W0 + s·B·A on the full-precision W0, which "
                  "differs from the trained model by the quantisation error; `--format merged` keeps the "
                  "trained function exactly (dequantised W0 + s·B·A)."],
        "pissa": ["PiSSA converted to a plain LoRA on the original W0: rank 2r = [A; A0], [B, -B0], lora_alpha "
                  "2·alpha (PEFT's PiSSA-to-LoRA conversion). Load the unmodified base model."],
        "asylora": ["AsyLoRA: lora_A is the frozen random A (it was not trained; freeze it to continue "
                    "training as AsyLoRA)."],
        "sbora_fa": ["SBoRA-FA: lora_A is the fixed one-hot standard-basis factor, written dense."],
        "sbora_fb": ["SBoRA-FB: lora_B is the fixed one-hot standard-basis factor, written dense."],
        "dora_mag": ["Magnitude-only DoRA as PEFT DoRA with a zero rank-1 update (A = B = 0): "
                     "W = m / ||W0||_row · W0."],
    }
    notes["qdora"] = ["Trained over the NF4-quantised base: load the **full-precision** base model. PEFT then "
                      "computes DoRA on the full-precision W0, which differs from the trained model by the "
                      "quantisation error; `--format merged` keeps the trained function exactly."]
    return config, fill, notes.get(method, [f"{method} as PEFT LoRA ({flags or 'plain'})."])


def _adalora(method: str, opts: dict[str, Any], layers: dict[str, AdapterLinear], total_steps: int | None):
    import peft

    r = opts["rank"]
    config = peft.AdaLoraConfig(
        init_r=r, target_r=min(opts.get("target_rank", r), r), lora_alpha=opts["alpha"] * (r + 1e-5) / r,
        lora_dropout=0.0, total_step=max(1, total_steps or 1), deltaT=opts.get("mask_interval", 1),
        beta1=opts.get("beta1", 0.85), beta2=opts.get("beta2", 0.85), orth_reg_weight=opts.get("orth_reg_weight", 0.5))

    def fill(peft_model) -> None:
        inner = peft_model.base_model.model
        for name, ours in layers.items():
            theirs = inner.get_submodule(name)
            theirs.lora_A["default"].copy_(ours.lora_A)
            theirs.lora_B["default"].copy_(ours.lora_B)
            theirs.lora_E["default"].copy_(ours.lora_E().detach().view(-1, 1))  # λ ⊙ mask: pruned = 0

    left = sorted({int(m.remaining_rank()) for m in layers.values()})
    return config, fill, [f"AdaLoRA: pruned singular values are zeros in lora_E (no rank_pattern); ranks left per "
                          f"layer: {', '.join(map(str, left))} of {r}. lora_alpha = alpha·(r + 1e-5)/r cancels "
                          "PEFT's division by ranknum + 1e-5."]


def _vera(method: str, opts: dict[str, Any], layers: dict[str, AdapterLinear], total_steps: int | None):
    import peft

    shapes = sorted({(m.out_features, m.in_features) for m in layers.values()})
    if len(shapes) > 1:
        raise ValueError(f"'vera' over layers of different shapes {shapes} has no PEFT equivalent; {_MERGED} "
                         "(PEFT slices one shared A, B for all layers, BoRA Lab draws one pair per shape; train with "
                         "target layers of one shape, e.g. query,value on BERT, for a PEFT export)")
    config = peft.VeraConfig(r=opts["rank"], projection_prng_key=opts.get("seed", 0), save_projection=True,
                             vera_dropout=0.0, d_initial=opts.get("d_initial", 0.1))
    first = next(iter(layers.values())).vera

    def fill(peft_model) -> None:
        tuner = peft_model.base_model
        tuner.vera_A["default"].copy_(first.A)  # shared by every layer (one shape: the whole matrices)
        tuner.vera_B["default"].copy_(first.B)
        for name, ours in layers.items():
            theirs = tuner.model.get_submodule(name)
            if not (torch.equal(ours.vera.A, first.A) and torch.equal(ours.vera.B, first.B)):
                raise ValueError(f"layer {name!r} has its own frozen VeRA pair: no PEFT equivalent; {_MERGED}")
            theirs.vera_lambda_b["default"].copy_(ours.vera.b)
            theirs.vera_lambda_d["default"].copy_(ours.vera.d)

    return config, fill, ["VeRA with the frozen A, B saved in the file (save_projection=True)."]


def is_wrapped(module: nn.Module) -> bool:
    """True for a layer wrapped by a BoRA Lab method."""
    return isinstance(module, AdapterLinear)
